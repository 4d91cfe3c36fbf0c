use std::sync::Arc;

use super::util::*;
use crate::{open_image, DiskImage, Error, ImageFormat, OpenOptions, QCOW2_MAGIC};

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

#[test]
fn raw_read_write_round_trip() {
    let dir = tmpdir();
    let p = dir.as_path().join("disk.raw");
    write_file(&p, &vec![0u8; 1 << 20]);
    let img = open_image(&p, &rw()).unwrap();
    assert_eq!(img.format(), ImageFormat::Raw);
    assert_eq!(img.size(), 1 << 20);
    assert!(!img.read_only());
    let data = pattern(12345, 3);
    img.write_at(&data, 4097).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 4097).unwrap();
    assert_eq!(back, data);
    img.flush().unwrap();
    drop(img);
    let file = std::fs::read(&p).unwrap();
    assert_eq!(&file[4097..4097 + data.len()], &data[..]);
}

#[test]
fn raw_holes_read_as_zeros() {
    let dir = tmpdir();
    let p = dir.as_path().join("sparse.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    let img = open_image(&p, &ro()).unwrap();
    let mut buf = vec![0xffu8; 65536];
    img.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn raw_out_of_range_is_an_error() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &[0u8; 4096]);
    let img = open_image(&p, &rw()).unwrap();
    let mut buf = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut buf, 3585),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.read_at(&mut buf, u64::MAX - 10),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(&buf, 4096),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.discard(0, 4097),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_zeroes(u64::MAX, 2),
        Err(Error::OutOfRange { .. })
    ));
    img.read_at(&mut buf, 3584).unwrap();
    img.read_at(&mut [], 4096).unwrap();
}

#[test]
fn raw_read_past_a_shrunk_file_is_an_error() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &[1u8; 8192]);
    let img = open_image(&p, &ro()).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut buf = [0u8; 4096];
    let err = img.read_at(&mut buf, 4096).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn raw_read_only_refuses_writes() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &[0u8; 4096]);
    let img = open_image(&p, &ro()).unwrap();
    assert!(img.read_only());
    assert!(matches!(img.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    assert!(matches!(img.discard(0, 512), Err(Error::ReadOnly { .. })));
    assert!(matches!(
        img.write_zeroes(0, 512),
        Err(Error::ReadOnly { .. })
    ));
    img.flush().unwrap();
}

#[test]
fn raw_discard_and_write_zeroes() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &pattern(1 << 20, 9));
    let img = open_image(
        &p,
        &OpenOptions {
            format: Some(ImageFormat::Raw),
            ..rw()
        },
    )
    .unwrap();
    img.write_zeroes(65536 + 100, 300_000).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    img.read_at(&mut buf, 0).unwrap();
    let orig = pattern(1 << 20, 9);
    assert_eq!(&buf[..65636], &orig[..65636]);
    assert!(buf[65636..365636].iter().all(|&b| b == 0));
    assert_eq!(&buf[365636..], &orig[365636..]);
    img.discard(0, 1 << 20).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        1 << 20,
        "discard keeps the size"
    );
}

#[test]
fn exclusive_lock_keeps_a_second_writer_out() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &[0u8; 4096]);
    let a = open_image(&p, &rw()).unwrap();
    let err = open_image(&p, &rw())
        .err()
        .expect("second writer must fail");
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert!(matches!(open_image(&p, &ro()), Err(Error::Locked { .. })));
    drop(a);
    let r1 = open_image(&p, &ro()).unwrap();
    let _r2 = open_image(&p, &ro()).unwrap();
    assert!(matches!(open_image(&p, &rw()), Err(Error::Locked { .. })));
    drop(r1);
}

#[test]
fn probed_raw_refuses_to_become_qcow2() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.img");
    write_file(&p, &[0u8; 4096]);
    let img = open_image(&p, &rw()).unwrap();
    assert_eq!(img.format(), ImageFormat::Raw);
    let err = img.write_at(&QCOW2_MAGIC, 0).unwrap_err();
    assert!(matches!(err, Error::ProbedRawSignature { .. }), "{err}");
    // Byte by byte does not get there either.
    img.write_at(&QCOW2_MAGIC[..3], 0).unwrap();
    assert!(img.write_at(&QCOW2_MAGIC[3..], 3).is_err());
    img.write_at(&[0x55; 512], 512).unwrap();
    drop(img);
    // Said explicitly: allowed; and a raw file with a qcow2 magic stays raw only when told.
    let img = open_image(
        &p,
        &OpenOptions {
            format: Some(ImageFormat::Raw),
            ..rw()
        },
    )
    .unwrap();
    img.write_at(&QCOW2_MAGIC, 0).unwrap();
    drop(img);
    let err = open_image(&p, &rw())
        .err()
        .expect("a bare magic is not a valid qcow2");
    assert!(
        matches!(err, Error::Unsupported { .. } | Error::Corrupt { .. }),
        "{err}"
    );
    let img = open_image(
        &p,
        &OpenOptions {
            format: Some(ImageFormat::Raw),
            ..ro()
        },
    )
    .unwrap();
    assert_eq!(img.format(), ImageFormat::Raw);
}

#[test]
fn device_id_is_stable_short_and_distinct() {
    let dir = tmpdir();
    let (a, b) = (dir.as_path().join("a.raw"), dir.as_path().join("b.raw"));
    write_file(&a, &[0u8; 512]);
    write_file(&b, &[0u8; 512]);
    let id_a = open_image(&a, &ro()).unwrap().id();
    let id_a2 = open_image(&a, &ro()).unwrap().id();
    let id_b = open_image(&b, &ro()).unwrap().id();
    assert_eq!(id_a, id_a2);
    assert_ne!(id_a, id_b);
    assert!(id_a.len() <= crate::DEVICE_ID_LEN);
}

#[test]
fn open_errors_name_the_file() {
    let dir = tmpdir();
    let p = dir.as_path().join("missing.raw");
    let err = open_image(&p, &rw()).err().unwrap();
    assert!(err.to_string().contains("missing.raw"), "{err}");
    let q = dir.as_path().join("notq.raw");
    write_file(&q, &[0u8; 512]);
    let err = open_image(
        &q,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            ..ro()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::WrongFormat { .. }), "{err}");
}

#[test]
fn direct_io_raw_unaligned_requests() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.raw");
    write_file(&p, &pattern(1 << 20, 1));
    let opts = OpenOptions {
        direct: true,
        format: Some(ImageFormat::Raw),
        ..rw()
    };
    let img: Arc<dyn DiskImage> = match open_image(&p, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED direct_io_raw_unaligned_requests: {e}");
            return;
        }
    };
    let mut expect = pattern(1 << 20, 1);
    for (off, len, seed) in [
        (0usize, 4096usize, 2u8),
        (100, 1000, 3),
        (4000, 9000, 4),
        (8192, 65536, 5),
    ] {
        let d = pattern(len, seed);
        img.write_at(&d, off as u64).unwrap();
        expect[off..off + len].copy_from_slice(&d);
    }
    let mut back = vec![0u8; 1 << 20];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == expect);
    let mut small = vec![0u8; 77];
    img.read_at(&mut small, 4090).unwrap();
    assert_eq!(&small[..], &expect[4090..4167]);
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), expect);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
}

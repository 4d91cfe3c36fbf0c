use std::path::Path;
use std::sync::Arc;

use super::util::*;
use crate::{
    create_qcow2, create_qcow2_overlay, open_image, DiskImage, Error, ImageFormat, OpenOptions,
};

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

const CS: usize = 65536;

fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn create_write_read_reopen() {
    let dir = tmpdir();
    let p = dir.as_path().join("d.qcow2");
    create_qcow2(&p, 10 << 20).unwrap();
    assert!(
        matches!(create_qcow2(&p, 1 << 20), Err(Error::Open { .. })),
        "never overwrites"
    );
    let mut expect = vec![0u8; 10 << 20];
    {
        let img = open_image(&p, &rw()).unwrap();
        assert_eq!(img.format(), ImageFormat::Qcow2);
        assert_eq!(img.size(), 10 << 20);
        assert!(read_all(img.as_ref()).iter().all(|&b| b == 0));
        for (off, len, seed) in [
            (0usize, 512usize, 1u8),
            (CS - 100, 300, 2),
            (3 * CS + 7, 5 * CS, 3),
            (9 << 20, 1 << 20, 4),
            (100, 50, 5),
        ] {
            let d = pattern(len, seed);
            img.write_at(&d, off as u64).unwrap();
            expect[off..off + len].copy_from_slice(&d);
        }
        assert!(read_all(img.as_ref()) == expect);
        img.flush().unwrap();
    }
    let img = open_image(&p, &ro()).unwrap();
    assert!(read_all(img.as_ref()) == expect);
    assert!(matches!(img.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    if let Some(q) = qemu_img("create_write_read_reopen") {
        drop(img);
        qemu_check(&q, &p);
        let raw = dir.as_path().join("expect.raw");
        write_file(&raw, &expect);
        run(&q, &["compare", "-f", "qcow2", "-F", "raw", s(&p), s(&raw)]);
    }
}

#[test]
fn overlay_copy_on_write_keeps_the_base_intact() {
    let dir = tmpdir();
    let base = dir.as_path().join("base.raw");
    let base_data = pattern(4 << 20, 7);
    write_file(&base, &base_data);
    let sum = checksum(&base);
    let ov = dir.as_path().join("ov.qcow2");
    // A relative name: resolved against the overlay's directory.
    create_qcow2_overlay(&ov, Path::new("base.raw"), ImageFormat::Raw).unwrap();
    let mut expect = base_data.clone();
    {
        let img = open_image(&ov, &rw()).unwrap();
        assert_eq!(img.size(), 4 << 20);
        assert!(read_all(img.as_ref()) == base_data);
        // The base is shared-locked while the overlay is open.
        assert!(matches!(
            open_image(&base, &rw()),
            Err(Error::Locked { .. })
        ));
        for (off, len, seed) in [
            (1000usize, 10usize, 1u8),
            (CS * 2 - 5, 10, 2),
            (CS * 5, CS, 3),
        ] {
            let d = pattern(len, seed);
            img.write_at(&d, off as u64).unwrap();
            expect[off..off + len].copy_from_slice(&d);
        }
        img.write_zeroes(CS as u64 * 10, CS as u64 * 2 + 100)
            .unwrap();
        expect[CS * 10..CS * 12 + 100].fill(0);
        img.write_zeroes(CS as u64 * 20 + 1, 10).unwrap();
        expect[CS * 20 + 1..CS * 20 + 11].fill(0);
        // Discarding written clusters, whole and partial.
        img.discard(CS as u64 * 5, CS as u64).unwrap();
        expect[CS * 5..CS * 6].fill(0);
        img.discard(0, 100).unwrap();
        assert!(read_all(img.as_ref()) == expect);
        img.flush().unwrap();
    }
    assert_eq!(checksum(&base), sum, "the backing file must not change");
    let img = open_image(&ov, &ro()).unwrap();
    assert!(read_all(img.as_ref()) == expect);
    drop(img);
    if let Some(q) = qemu_img("overlay_copy_on_write_keeps_the_base_intact") {
        qemu_check(&q, &ov);
        let info = run(&q, &["info", s(&ov)]);
        assert!(info.contains("backing file: base.raw"), "{info}");
        assert!(info.contains("backing file format: raw"), "{info}");
        let raw = dir.as_path().join("expect.raw");
        write_file(&raw, &expect);
        run(
            &q,
            &["compare", "-f", "qcow2", "-F", "raw", s(&ov), s(&raw)],
        );
    }
}

#[test]
fn backing_chain_of_three() {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &pattern(1 << 20, 1));
    create_qcow2_overlay(
        &d.join("mid.qcow2"),
        Path::new("base.raw"),
        ImageFormat::Raw,
    )
    .unwrap();
    {
        let mid = open_image(&d.join("mid.qcow2"), &rw()).unwrap();
        mid.write_at(&[0xaa; 4096], 8192).unwrap();
    }
    create_qcow2_overlay(
        &d.join("top.qcow2"),
        &d.join("mid.qcow2"),
        ImageFormat::Qcow2,
    )
    .unwrap();
    let top = open_image(&d.join("top.qcow2"), &rw()).unwrap();
    top.write_at(&[0xbb; 100], 8192 + 4000).unwrap();
    let mut expect = pattern(1 << 20, 1);
    expect[8192..8192 + 4096].fill(0xaa);
    expect[8192 + 4000..8192 + 4100].fill(0xbb);
    assert!(read_all(top.as_ref()) == expect);
    // The middle image is read-only underneath.
    assert!(matches!(
        open_image(&d.join("mid.qcow2"), &rw()),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn backing_loop_is_stopped() {
    let dir = tmpdir();
    let d = dir.as_path();
    create_qcow2(&d.join("c.qcow2"), 1 << 20).unwrap();
    create_qcow2_overlay(&d.join("a.qcow2"), Path::new("c.qcow2"), ImageFormat::Qcow2).unwrap();
    create_qcow2_overlay(&d.join("b.qcow2"), Path::new("a.qcow2"), ImageFormat::Qcow2).unwrap();
    // Point a at b: a -> b -> a -> ...
    let mut a = std::fs::read(d.join("a.qcow2")).unwrap();
    let at = a.windows(7).position(|w| w == b"c.qcow2").unwrap();
    a[at..at + 7].copy_from_slice(b"b.qcow2");
    write_file(&d.join("a.qcow2"), &a);
    let err = open_image(&d.join("b.qcow2"), &ro()).err().unwrap();
    assert!(matches!(err, Error::BackingChainTooDeep { .. }), "{err}");
    // Read-write, the loop runs into b's own exclusive lock first.
    let err = open_image(&d.join("b.qcow2"), &rw()).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn missing_backing_file_names_both_files() {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &[0u8; 65536]);
    create_qcow2_overlay(&d.join("ov.qcow2"), Path::new("base.raw"), ImageFormat::Raw).unwrap();
    std::fs::remove_file(d.join("base.raw")).unwrap();
    let err = open_image(&d.join("ov.qcow2"), &ro()).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("ov.qcow2") && msg.contains("base.raw"),
        "{msg}"
    );
}

#[test]
fn overlay_reads_past_a_smaller_backing_file_as_zeros() {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &[7u8; 100_000]);
    create_qcow2_overlay(&d.join("ov.qcow2"), Path::new("base.raw"), ImageFormat::Raw).unwrap();
    // Grow the overlay's virtual size by hand, as `qemu-img resize` would.
    let mut f = std::fs::read(d.join("ov.qcow2")).unwrap();
    f[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    write_file(&d.join("ov.qcow2"), &f);
    let img = open_image(&d.join("ov.qcow2"), &rw()).unwrap();
    let all = read_all(img.as_ref());
    assert!(all[..100_000].iter().all(|&b| b == 7));
    assert!(all[100_000..].iter().all(|&b| b == 0));
    img.write_at(&[1], 99_999).unwrap();
    img.write_at(&[1], 100_000).unwrap();
    let all = read_all(img.as_ref());
    assert_eq!(&all[99_998..100_002], &[7, 1, 1, 0]);
}

#[test]
fn concurrent_writers_on_one_qcow2() {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &pattern(8 << 20, 2));
    create_qcow2_overlay(&d.join("ov.qcow2"), Path::new("base.raw"), ImageFormat::Raw).unwrap();
    let img: Arc<dyn DiskImage> = open_image(&d.join("ov.qcow2"), &rw()).unwrap();
    // Eight threads write interleaved 4 KiB blocks, several per cluster, all at once.
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let block = i * 8 + u64::from(t);
                    img.write_at(&[t + 1; 4096], block * 4096 * 3).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut expect = pattern(8 << 20, 2);
    for block in 0..512usize {
        let off = block * 4096 * 3;
        expect[off..off + 4096].fill((block % 8) as u8 + 1);
    }
    assert!(read_all(img.as_ref()) == expect);
    drop(img);
    if let Some(q) = qemu_img("concurrent_writers_on_one_qcow2") {
        qemu_check(&q, &d.join("ov.qcow2"));
    }
}

#[test]
fn direct_io_qcow2_overlay() {
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &pattern(2 << 20, 6));
    create_qcow2_overlay(&d.join("ov.qcow2"), Path::new("base.raw"), ImageFormat::Raw).unwrap();
    let opts = OpenOptions {
        direct: true,
        ..rw()
    };
    let img = match open_image(&d.join("ov.qcow2"), &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED direct_io_qcow2_overlay: {e}");
            return;
        }
    };
    let mut expect = pattern(2 << 20, 6);
    for (off, len, seed) in [
        (0usize, 4096usize, 1u8),
        (70_000, 333, 2),
        (CS * 3, CS * 2, 3),
    ] {
        let data = pattern(len, seed);
        img.write_at(&data, off as u64).unwrap();
        expect[off..off + len].copy_from_slice(&data);
    }
    img.write_zeroes(CS as u64 * 8, CS as u64).unwrap();
    expect[CS * 8..CS * 9].fill(0);
    assert!(read_all(img.as_ref()) == expect);
    img.flush().unwrap();
    drop(img);
    if let Some(q) = qemu_img("direct_io_qcow2_overlay") {
        qemu_check(&q, &d.join("ov.qcow2"));
        let raw = d.join("expect.raw");
        write_file(&raw, &expect);
        run(
            &q,
            &[
                "compare",
                "-q",
                "-F",
                "raw",
                s(&d.join("ov.qcow2")),
                s(&raw),
            ],
        );
    }
}

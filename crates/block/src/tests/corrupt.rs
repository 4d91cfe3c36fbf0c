//! Damaged and hostile qcow2 images: every one must end in an error, never a panic.

use super::util::*;
use crate::storage::MemStorage;
use crate::{create_qcow2, open_image, DiskImage, Error, OpenOptions, Qcow2Image};

const CS: u64 = 65536;

/// A small valid image (4 MiB disk) with data in clusters 0 and 2, as file bytes.
fn seed_image() -> Vec<u8> {
    let dir = tmpdir();
    let p = dir.as_path().join("seed.qcow2");
    create_qcow2(&p, 4 << 20).unwrap();
    let img = open_image(&p, &OpenOptions::default()).unwrap();
    img.write_at(&pattern(CS as usize, 1), 0).unwrap();
    img.write_at(&pattern(1000, 2), 2 * CS + 10).unwrap();
    drop(img);
    std::fs::read(&p).unwrap()
}

fn open_mem(bytes: Vec<u8>, read_only: bool) -> crate::Result<Qcow2Image> {
    Qcow2Image::open_storage(
        Box::new(MemStorage::new(bytes, 64 << 20)),
        "<memory>",
        read_only,
    )
}

/// Opens, reads a few clusters, writes one: whatever happens must be an `Err`, not a panic.
fn exercise(bytes: Vec<u8>) {
    for read_only in [true, false] {
        let Ok(img) = open_mem(bytes.clone(), read_only) else {
            continue;
        };
        let size = img.size();
        let mut buf = vec![0u8; 2 * CS as usize];
        for off in [0, CS - 512, 2 * CS, size.saturating_sub(4096)] {
            let len = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
            let _ = img.read_at(&mut buf[..len], off);
        }
        if !read_only {
            let _ = img.write_at(&[0x5a; 4096], CS / 2);
            let _ = img.write_at(&[0x5b; 512], 3 * CS + 1);
            let _ = img.write_zeroes(0, CS.min(size));
            let _ = img.discard(2 * CS, CS.min(size.saturating_sub(2 * CS)));
            let _ = img.flush();
            let _ = img.read_at(&mut buf[..4096.min(size as usize)], 0);
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn seed_image_is_valid() {
    let seed = seed_image();
    let img = open_mem(seed, true).unwrap();
    let mut buf = vec![0u8; CS as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, pattern(CS as usize, 1));
}

#[test]
fn hundreds_of_mutations_never_panic() {
    let seed = seed_image();
    let l1 = be64(&seed, 40) as usize;
    let l2 = (be64(&seed, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = be64(&seed, 48) as usize;
    let rb = (be64(&seed, rt) & !0x1ff) as usize;
    // Where damage matters most: header, extensions, L1, L2, refcount table and block.
    let hot = [
        (0usize, 128usize),
        (0, 512),
        (l1, 64),
        (l2, 64),
        (rt, 16),
        (rb, 32),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut errors = 0;
    for round in 0..400u64 {
        let mut m = seed.clone();
        match round % 5 {
            // Truncate anywhere (biased toward the metadata).
            0 => {
                let cut = if rng.below(2) == 0 {
                    rng.below(512)
                } else {
                    rng.below(m.len() as u64)
                };
                m.truncate(cut as usize);
            }
            // Flip bits in a hot region.
            1 | 2 => {
                let (start, len) = hot[rng.below(hot.len() as u64) as usize];
                for _ in 0..1 + rng.below(4) {
                    let at = start + rng.below(len as u64) as usize;
                    m[at] ^= 1 << rng.below(8);
                }
            }
            // Overwrite a header field or table entry with an extreme value.
            3 => {
                let fields = [
                    8,
                    16,
                    20,
                    24,
                    32,
                    36,
                    40,
                    48,
                    56,
                    60,
                    72,
                    96,
                    100,
                    l1,
                    l2,
                    l2 + 16,
                    rt,
                    rb,
                ];
                let at = fields[rng.below(fields.len() as u64) as usize];
                let v = [
                    0,
                    1,
                    u64::MAX,
                    1 << 63,
                    1 << 62,
                    0x7fff_ffff,
                    CS + 1,
                    rng.next(),
                ][rng.below(8) as usize];
                if rng.below(2) == 0 && at + 8 <= m.len() {
                    put64(&mut m, at, v);
                } else if at + 4 <= m.len() {
                    put32(&mut m, at, v as u32);
                }
            }
            // Random bytes anywhere.
            _ => {
                for _ in 0..8 {
                    let at = rng.below(m.len() as u64) as usize;
                    m[at] = rng.next() as u8;
                }
            }
        }
        if open_mem(m.clone(), true).is_err() {
            errors += 1;
        }
        exercise(m);
    }
    assert!(
        errors > 50,
        "mutations should mostly be caught at open ({errors})"
    );
}

fn expect_open_err(m: Vec<u8>, read_only: bool) -> Error {
    match open_mem(m, read_only) {
        Ok(_) => panic!("opened a broken image"),
        Err(e) => e,
    }
}

fn read_err(m: Vec<u8>, off: u64) -> Error {
    let img = open_mem(m, true).unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, off).unwrap_err()
}

#[test]
fn header_checks() {
    let seed = seed_image();
    let case = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut m = seed.clone();
        f(&mut m);
        expect_open_err(m, true)
    };
    assert!(matches!(case(&|m| m.truncate(50)), Error::Corrupt { .. }));
    assert!(matches!(
        case(&|m| m.truncate(3)),
        Error::WrongFormat { .. }
    ));
    assert!(matches!(
        case(&|m| put32(m, 4, 4)),
        Error::Unsupported { .. }
    ));
    for bits in [8, 22, 0, u32::MAX] {
        assert!(
            matches!(case(&|m| put32(m, 20, bits)), Error::Corrupt { .. }),
            "{bits}"
        );
    }
    let e = case(&|m| put32(m, 32, 1));
    assert!(e.to_string().contains("encryption"), "{e}");
    let e = case(&|m| put64(m, 72, 1 << 9));
    assert!(
        e.to_string().contains("unknown incompatible feature bit 9"),
        "{e}"
    );
    let e = case(&|m| put64(m, 72, 1 << 4));
    assert!(e.to_string().contains("extended L2"), "{e}");
    let e = case(&|m| put64(m, 72, 1 << 2));
    assert!(e.to_string().contains("external data file"), "{e}");
    assert!(
        matches!(case(&|m| put64(m, 40, 1 << 40)), Error::Corrupt { .. }),
        "L1 past EOF"
    );
    assert!(
        matches!(case(&|m| put64(m, 40, CS + 8)), Error::Corrupt { .. }),
        "L1 unaligned"
    );
    assert!(
        matches!(case(&|m| put64(m, 40, 0)), Error::Corrupt { .. }),
        "L1 at 0"
    );
    assert!(
        matches!(case(&|m| put32(m, 36, 0)), Error::Corrupt { .. }),
        "L1 too small"
    );
    assert!(
        matches!(case(&|m| put64(m, 24, 1 << 62)), Error::Corrupt { .. }),
        "size vs L1"
    );
    assert!(
        matches!(case(&|m| put32(m, 56, 0)), Error::Corrupt { .. }),
        "no refcount table"
    );
    assert!(matches!(
        case(&|m| put64(m, 48, 1 << 50)),
        Error::Corrupt { .. }
    ));
    assert!(
        matches!(case(&|m| put32(m, 96, 7)), Error::Corrupt { .. }),
        "refcount order"
    );
    assert!(
        matches!(case(&|m| put32(m, 100, 105)), Error::Corrupt { .. }),
        "header length"
    );
    // Backing file name outside the header cluster.
    let e = case(&|m| {
        put64(m, 8, CS - 4);
        put32(m, 16, 10);
    });
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    // A header extension running off the cluster.
    let e = case(&|m| {
        put32(m, 104, 0x1234_5678);
        put32(m, 108, 0xffff_0000);
    });
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
}

#[test]
fn dirty_and_corrupt_bits_allow_read_only() {
    let seed = seed_image();
    for bit in [1u64, 2] {
        let mut m = seed.clone();
        put64(&mut m, 72, bit);
        assert!(open_mem(m.clone(), true).is_ok());
        let e = expect_open_err(m, false);
        assert!(matches!(e, Error::NeedsReadOnly { .. }), "{e}");
        assert!(e.to_string().contains("qemu-img check -r all"), "{e}");
    }
}

#[test]
fn table_entries_pointing_outside_are_errors() {
    let seed = seed_image();
    let l1 = be64(&seed, 40) as usize;
    let l2 = (be64(&seed, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let copied = 1u64 << 63;
    let len = seed.len() as u64;
    let patch = |at: usize, v: u64| {
        let mut m = seed.clone();
        put64(&mut m, at, v);
        m
    };
    // L1 entry: past EOF, unaligned, offset 0 with COPIED, reserved bits.
    for v in [
        copied | (len + CS).next_multiple_of(CS),
        copied | (CS + 512),
        copied,
        copied | 1 << 60,
    ] {
        let e = read_err(patch(l1, v), 0);
        assert!(matches!(e, Error::Corrupt { .. }), "{v:#x}: {e}");
    }
    // L2 entry for cluster 0: the same.
    for v in [
        copied | (len + CS).next_multiple_of(CS),
        copied | (CS + 512),
        copied,
        copied | 2,
    ] {
        let e = read_err(patch(l2, v), 0);
        assert!(matches!(e, Error::Corrupt { .. }), "{v:#x}: {e}");
    }
    // Compressed cluster.
    let e = read_err(patch(l2, 1 << 62 | CS), 0);
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("compressed"), "{e}");
    // Writes onto the header or L1 table through a hostile L2 entry are refused.
    let img = open_mem(patch(l2, copied | l1 as u64), false).unwrap();
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert!(e.to_string().contains("overlaps the L1 table"), "{e}");
    // The same image, untouched, still reads fine past the damaged cluster.
    let img = open_mem(patch(l2, copied | (len + CS).next_multiple_of(CS)), true).unwrap();
    let mut buf = vec![0u8; 1000];
    img.read_at(&mut buf, 2 * CS + 10).unwrap();
    assert_eq!(buf, pattern(1000, 2));
}

#[test]
fn in_memory_images_refuse_backing_files() {
    let dir = tmpdir();
    let base = dir.as_path().join("b.raw");
    write_file(&base, &[0u8; 65536]);
    let ov = dir.as_path().join("o.qcow2");
    crate::create_qcow2_overlay(&ov, &base, crate::ImageFormat::Raw).unwrap();
    let e = expect_open_err(std::fs::read(&ov).unwrap(), true);
    assert!(matches!(e, Error::BackingNotAllowed { .. }), "{e}");
}

#[test]
fn out_of_range_qcow2_requests() {
    let img = open_mem(seed_image(), false).unwrap();
    let size = img.size();
    let mut buf = [0u8; 512];
    assert!(matches!(
        img.read_at(&mut buf, size - 511),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(&buf, u64::MAX - 1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.discard(size, 1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_zeroes(1, u64::MAX),
        Err(Error::OutOfRange { .. })
    ));
    img.read_at(&mut buf, size - 512).unwrap();
}

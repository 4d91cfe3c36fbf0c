//! Interoperability with QEMU's own tools. Each test skips (saying why) without them.

use std::path::Path;

use super::util::*;
use crate::{open_image, DiskImage, Error, ImageFormat, OpenOptions};

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn keel_reads_what_qemu_wrote() {
    let (Some(q), Some(io)) = (
        qemu_img("keel_reads_what_qemu_wrote"),
        qemu_io("keel_reads_what_qemu_wrote"),
    ) else {
        return;
    };
    for compat in ["1.1", "0.10"] {
        let dir = tmpdir();
        let p = dir.as_path().join("q.qcow2");
        run(
            &q,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                s(&p),
                "16M",
            ],
        );
        run(
            &io,
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 0 64k",
                "-c",
                "write -P 0xcd 1M 4k",
                "-c",
                "write -P 0xef 3M 128k",
                "-c",
                "write -z 3M 64k",
                "-c",
                "write -P 0x11 15M 1M",
                s(&p),
            ],
        );
        let img = open_image(&p, &ro()).unwrap();
        let all = read_all(img.as_ref());
        let mut expect = vec![0u8; 16 << 20];
        expect[..65536].fill(0xab);
        expect[1 << 20..(1 << 20) + 4096].fill(0xcd);
        expect[(3 << 20) + 65536..(3 << 20) + 131072].fill(0xef);
        expect[15 << 20..].fill(0x11);
        assert!(all == expect, "compat={compat}");
    }
}

/// Deterministic scattered writes, zeroing and discards through keel, checked by QEMU.
fn keel_writes(img: &dyn DiskImage, expect: &mut [u8], seed: u64, rounds: usize) {
    let size = expect.len() as u64;
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for r in 0..rounds {
        let off = next() % size;
        let len = (1 + next() % 200_000).min(size - off);
        let (o, l) = (off as usize, len as usize);
        match r % 8 {
            6 => {
                img.write_zeroes(off, len).unwrap();
                expect[o..o + l].fill(0);
            }
            7 => {
                // Discard leaves content unspecified; keel zeroes whole clusters. Follow it
                // with a write so the expected content is defined again.
                img.discard(off, len).unwrap();
                let d = pattern(l, r as u8);
                img.write_at(&d, off).unwrap();
                expect[o..o + l].copy_from_slice(&d);
            }
            _ => {
                let d = pattern(l, r as u8);
                img.write_at(&d, off).unwrap();
                expect[o..o + l].copy_from_slice(&d);
            }
        }
    }
}

#[test]
fn qemu_check_and_compare_after_keel_writes() {
    let Some(q) = qemu_img("qemu_check_and_compare_after_keel_writes") else {
        return;
    };
    let variants: &[&[&str]] = &[
        &["-o", "compat=1.1"],
        &["-o", "compat=0.10"],
        &["-o", "cluster_size=512"],
        &["-o", "cluster_size=2M"],
        &["-o", "refcount_bits=1"],
        &["-o", "refcount_bits=64,cluster_size=4096"],
        &["-o", "lazy_refcounts=on"],
    ];
    for (i, opts) in variants.iter().enumerate() {
        let dir = tmpdir();
        let p = dir.as_path().join("k.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&p), "24M"]);
        run(&q, &args);
        let mut expect = vec![0u8; 24 << 20];
        {
            let img = open_image(&p, &rw()).unwrap();
            keel_writes(img.as_ref(), &mut expect, 0x1234_5678 + i as u64, 60);
            assert!(read_all(img.as_ref()) == expect, "{opts:?}");
            img.flush().unwrap();
        }
        qemu_check(&q, &p);
        let raw = dir.as_path().join("expect.raw");
        write_file(&raw, &expect);
        run(
            &q,
            &["compare", "-q", "-f", "qcow2", "-F", "raw", s(&p), s(&raw)],
        );
    }
}

#[test]
fn refcount_table_growth_with_small_clusters() {
    let Some(q) = qemu_img("refcount_table_growth_with_small_clusters") else {
        return;
    };
    let dir = tmpdir();
    let p = dir.as_path().join("small.qcow2");
    // 512-byte clusters: one refcount table cluster covers only 8 MiB of file.
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            s(&p),
            "20M",
        ],
    );
    let expect = pattern(20 << 20, 5);
    {
        let img = open_image(&p, &rw()).unwrap();
        for chunk in 0..20u64 {
            let o = (chunk << 20) as usize;
            img.write_at(&expect[o..o + (1 << 20)], chunk << 20)
                .unwrap();
        }
        assert!(read_all(img.as_ref()) == expect);
    }
    let info = run(&q, &["info", "--output=json", s(&p)]);
    assert!(info.contains("\"cluster-size\": 512"), "{info}");
    qemu_check(&q, &p);
    let raw = dir.as_path().join("expect.raw");
    write_file(&raw, &expect);
    run(
        &q,
        &["compare", "-q", "-f", "qcow2", "-F", "raw", s(&p), s(&raw)],
    );
}

#[test]
fn qemu_overlay_over_raw_base() {
    let Some(q) = qemu_img("qemu_overlay_over_raw_base") else {
        return;
    };
    let dir = tmpdir();
    let d = dir.as_path();
    let base_data = pattern(8 << 20, 3);
    write_file(&d.join("base.raw"), &base_data);
    let sum = checksum(&d.join("base.raw"));
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&d.join("ov.qcow2")),
        ],
    );
    let mut expect = base_data.clone();
    {
        let img = open_image(&d.join("ov.qcow2"), &rw()).unwrap();
        assert!(read_all(img.as_ref()) == base_data);
        keel_writes(img.as_ref(), &mut expect, 99, 40);
        assert!(read_all(img.as_ref()) == expect);
    }
    assert_eq!(
        checksum(&d.join("base.raw")),
        sum,
        "the backing file must not change"
    );
    qemu_check(&q, &d.join("ov.qcow2"));
    write_file(&d.join("expect.raw"), &expect);
    run(
        &q,
        &[
            "compare",
            "-q",
            "-F",
            "raw",
            s(&d.join("ov.qcow2")),
            s(&d.join("expect.raw")),
        ],
    );
    // v2 overlay: no zero flag, write-zeroes falls back to writing zeros.
    run(
        &q,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&d.join("ov2.qcow2")),
        ],
    );
    let mut expect = base_data.clone();
    {
        let img = open_image(&d.join("ov2.qcow2"), &rw()).unwrap();
        keel_writes(img.as_ref(), &mut expect, 7, 40);
    }
    qemu_check(&q, &d.join("ov2.qcow2"));
    write_file(&d.join("expect.raw"), &expect);
    run(
        &q,
        &[
            "compare",
            "-q",
            "-F",
            "raw",
            s(&d.join("ov2.qcow2")),
            s(&d.join("expect.raw")),
        ],
    );
    assert_eq!(checksum(&d.join("base.raw")), sum);
}

#[test]
fn qemu_reads_what_keel_created_and_wrote() {
    let (Some(q), Some(io)) = (
        qemu_img("qemu_reads_what_keel_created_and_wrote"),
        qemu_io("qemu_reads_what_keel_created_and_wrote"),
    ) else {
        return;
    };
    let dir = tmpdir();
    let d = dir.as_path();
    write_file(&d.join("base.raw"), &[0x22; 1 << 20]);
    crate::create_qcow2_overlay(&d.join("ov.qcow2"), Path::new("base.raw"), ImageFormat::Raw)
        .unwrap();
    {
        let img = open_image(&d.join("ov.qcow2"), &rw()).unwrap();
        img.write_at(&[0xab; 65536], 0).unwrap();
        img.write_at(&[0xcd; 512], 70_000).unwrap();
        img.write_zeroes(196_608, 65536).unwrap();
    }
    qemu_check(&q, &d.join("ov.qcow2"));
    run(
        &io,
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0x22 65536 4464",
            "-c",
            "read -P 0xcd 70000 512",
            "-c",
            "read -P 0x22 70512 126096",
            "-c",
            "read -P 0 196608 64k",
            "-c",
            "read -P 0x22 262144 786432",
            s(&d.join("ov.qcow2")),
        ],
    );
    let out = run(
        &io,
        &[
            "-r",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 64k",
            s(&d.join("ov.qcow2")),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn internal_snapshots_and_compression() {
    let Some(q) = qemu_img("internal_snapshots_and_compression") else {
        return;
    };
    let dir = tmpdir();
    let d = dir.as_path();
    let p = d.join("snap.qcow2");
    write_file(&d.join("src.raw"), &pattern(1 << 20, 4));
    run(
        &q,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&d.join("src.raw")),
            s(&p),
        ],
    );
    run(&q, &["snapshot", "-c", "s1", s(&p)]);
    let img = open_image(&p, &ro()).unwrap();
    assert!(read_all(img.as_ref()) == pattern(1 << 20, 4));
    drop(img);
    let e = open_image(&p, &rw()).err().unwrap();
    assert!(matches!(e, Error::NeedsReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("snapshot"), "{e}");

    let c = d.join("comp.qcow2");
    run(
        &q,
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&d.join("src.raw")),
            s(&c),
        ],
    );
    let img = open_image(&c, &ro()).unwrap();
    let mut buf = [0u8; 512];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("compressed"), "{e}");
}

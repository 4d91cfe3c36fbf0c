use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("keel-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const KEY: &[u8] = b"a key of the operator's";

/// A snapshot with a state part and a 3 MiB "memory" part.
fn make(tag: &str, key: Option<&[u8]>) -> Dir {
    let d = Dir::new(tag);
    let mut w = Writer::create(&d.0).unwrap();
    w.write_part("vm.json", br#"{"vcpus":2}"#).unwrap();
    let mem: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    w.write_part("memory.raw", &mem).unwrap();
    w.finish(key).unwrap();
    d
}

fn edit_manifest(d: &Dir, f: impl FnOnce(&mut serde_json::Value)) {
    let p = d.0.join(MANIFEST);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn a_good_snapshot_opens_and_reads_back() {
    for key in [None, Some(KEY)] {
        let d = make("good", key);
        let s = Snapshot::open(&d.0, key).unwrap();
        assert_eq!(s.manifest().parts.len(), 2);
        assert_eq!(s.read_part("vm.json").unwrap(), br#"{"vcpus":2}"#);
        assert!(s.part("nothing").is_none());
    }
}

#[test]
fn each_bad_snapshot_gets_its_own_error() {
    // Corrupted: a flipped byte in memory.
    let d = make("corrupt", None);
    let p = d.0.join("memory.raw");
    let mut b = std::fs::read(&p).unwrap();
    b[12345] ^= 0x40;
    std::fs::write(&p, &b).unwrap();
    assert!(
        matches!(Snapshot::open(&d.0, None), Err(Error::Corrupted { name }) if name == "memory.raw")
    );

    // Truncated.
    let d = make("trunc", None);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.0.join("memory.raw"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::Truncated { .. })
    ));

    // Grown.
    let d = make("grown", None);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.0.join("vm.json"))
        .unwrap();
    f.set_len(100).unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::SizeMismatch { .. })
    ));

    // A newer format version.
    let d = make("version", None);
    edit_manifest(&d, |v| v["version"] = 2.into());
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::WrongVersion { found: 2 })
    ));

    // Not a snapshot; a malformed manifest; one too large.
    let d = Dir::new("none");
    std::fs::create_dir_all(&d.0).unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::NotASnapshot(_))
    ));
    std::fs::write(d.0.join(MANIFEST), b"{\"format\":\"keel-snapshot\",").unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::Malformed(_))
    ));
    std::fs::write(d.0.join(MANIFEST), vec![b' '; (MAX_MANIFEST + 1) as usize]).unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn keys_authenticate_the_whole_snapshot() {
    // Tampered: a part swapped for other bytes with a matching checksum in the manifest.
    let d = make("tamper", Some(KEY));
    std::fs::write(d.0.join("vm.json"), br#"{"vcpus":9}"#).unwrap();
    let (sha, _) = hash_file(&d.0.join("vm.json")).unwrap();
    edit_manifest(&d, |v| v["parts"][0]["digest"] = sha.into());
    assert!(matches!(
        Snapshot::open(&d.0, Some(KEY)),
        Err(Error::Tampered)
    ));
    // The wrong key, a missing key, a key for an unauthenticated snapshot, a bad tag.
    let d = make("keys", Some(KEY));
    assert!(matches!(
        Snapshot::open(&d.0, Some(b"another key")),
        Err(Error::Tampered)
    ));
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::KeyRequired)
    ));
    edit_manifest(&d, |v| v["hmac"] = "zz".into());
    assert!(matches!(
        Snapshot::open(&d.0, Some(KEY)),
        Err(Error::Tampered)
    ));
    let d = make("nokey", None);
    assert!(matches!(
        Snapshot::open(&d.0, Some(KEY)),
        Err(Error::NotAuthenticated)
    ));
    assert!(matches!(
        Snapshot::open(&d.0, Some(b"")),
        Err(Error::NotAuthenticated)
    ));
}

#[test]
fn part_names_never_leave_the_directory() {
    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "a/b",
        "",
        ".",
        "..",
        ".hidden",
        "x\u{0}",
    ] {
        let d = make("names", None);
        edit_manifest(&d, |v| v["parts"][0]["name"] = bad.into());
        assert!(
            matches!(Snapshot::open(&d.0, None), Err(Error::Malformed(_))),
            "{bad:?} accepted"
        );
    }
    let d = make("dup", None);
    edit_manifest(&d, |v| v["parts"][1]["name"] = "vm.json".into());
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::Malformed(_))
    ));
    let d = make("extra", None);
    edit_manifest(&d, |v| v["surprise"] = 1.into());
    assert!(matches!(
        Snapshot::open(&d.0, None),
        Err(Error::Malformed(_))
    ));
    let mut w = Writer::create(&Dir::new("w").0).unwrap();
    assert!(w.write_part("../x", b"").is_err());
}

#[test]
fn a_writer_never_reuses_a_directory() {
    let d = make("reuse", None);
    assert!(Writer::create(&d.0).is_err());
}

/// A sparse "memory" file: pages 3 and 700 hold data, one page is written but all zeros.
fn sparse_memory(path: &Path) -> (String, u64) {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).unwrap();
    let len = 1024 * PAGE as u64;
    f.set_len(len).unwrap();
    let mut h = PageHasher::new(len);
    let a = vec![0x11u8; PAGE];
    let z = vec![0u8; PAGE];
    let b: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
    for (index, bytes) in [(3u64, &a), (9, &z), (700, &b)] {
        f.write_all_at(bytes, index * PAGE as u64).unwrap();
        h.page(index, bytes);
    }
    (h.finish(), len)
}

#[test]
fn page_parts_hash_only_data_and_ignore_how_holes_are_stored() {
    let d = Dir::new("pages");
    std::fs::create_dir_all(&d.0).unwrap();
    let sparse = d.0.join("sparse");
    let (sum, len) = sparse_memory(&sparse);
    assert_eq!(hash_pages_file(&sparse).unwrap(), (sum.clone(), len));
    // The same bytes written densely (every zero page allocated) hash the same.
    let dense = d.0.join("dense");
    std::fs::write(&dense, std::fs::read(&sparse).unwrap()).unwrap();
    assert_eq!(hash_pages_file(&dense).unwrap().0, sum);
    // One changed byte in a data page, or data in a hole, changes it.
    let mut bytes = std::fs::read(&sparse).unwrap();
    bytes[700 * PAGE + 5] ^= 1;
    std::fs::write(&dense, &bytes).unwrap();
    assert_ne!(hash_pages_file(&dense).unwrap().0, sum);
    bytes[700 * PAGE + 5] ^= 1;
    bytes[500 * PAGE] = 1;
    std::fs::write(&dense, &bytes).unwrap();
    assert_ne!(hash_pages_file(&dense).unwrap().0, sum);
}

#[test]
fn page_and_disk_layer_parts_are_checked_by_their_kind() {
    let d = Dir::new("kinds");
    let mut w = Writer::create(&d.0).unwrap();
    let (digest, size) = sparse_memory(&w.part_path("memory").unwrap());
    w.add_hashed(Part {
        name: "memory".into(),
        size,
        digest,
        kind: PartKind::Pages,
    })
    .unwrap();
    std::fs::write(w.part_path("disk0.1.qcow2").unwrap(), vec![7u8; 8192]).unwrap();
    w.add_disk_layer("disk0.1.qcow2").unwrap();
    // A size that does not match the file is refused at once.
    std::fs::write(w.part_path("x").unwrap(), b"abc").unwrap();
    let bad = Part {
        name: "x".into(),
        size: 4,
        digest: "0".repeat(64),
        kind: PartKind::Whole,
    };
    assert!(matches!(w.add_hashed(bad), Err(Error::SizeMismatch { .. })));
    std::fs::remove_file(w.part_path("x").unwrap()).unwrap();
    w.finish(Some(KEY)).unwrap();
    Snapshot::open(&d.0, Some(KEY)).unwrap();

    // A disk layer's contents are not hashed, its size is.
    let layer = d.0.join("disk0.1.qcow2");
    std::fs::write(&layer, vec![8u8; 8192]).unwrap();
    Snapshot::open(&d.0, Some(KEY)).unwrap();
    std::fs::write(&layer, vec![8u8; 4096]).unwrap();
    assert!(matches!(
        Snapshot::open(&d.0, Some(KEY)),
        Err(Error::Truncated { .. })
    ));
    std::fs::write(&layer, vec![8u8; 8192]).unwrap();
    // Memory data in a hole is corruption.
    use std::os::unix::fs::FileExt;
    let mem = File::options()
        .write(true)
        .open(d.0.join("memory"))
        .unwrap();
    mem.write_all_at(&[1], 100 * PAGE as u64).unwrap();
    assert!(
        matches!(Snapshot::open(&d.0, Some(KEY)), Err(Error::Corrupted { name }) if name == "memory")
    );
    // A disk layer must not claim a checksum, and the kind cannot be dropped silently
    // under a key (the HMAC covers it).
    edit_manifest(&d, |v| v["parts"][1]["digest"] = "a".repeat(64).into());
    assert!(matches!(
        Snapshot::open(&d.0, Some(KEY)),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn page_checksums_over_many_chunks_match_the_writer() {
    use std::os::unix::fs::FileExt;
    let d = Dir::new("chunks");
    std::fs::create_dir_all(&d.0).unwrap();
    let p = d.0.join("memory");
    let f = File::create(&p).unwrap();
    // Five chunks, the last one short; data in chunks 0, 2 and 4, chunks 1 and 3 empty.
    let len = 4 * CHUNK + 3 * PAGE as u64;
    f.set_len(len).unwrap();
    let per = CHUNK / PAGE as u64;
    // Runs of adjacent pages, one across a chunk boundary, fed one page at a time here and
    // read back in big buffers by the reader.
    let pages = [
        0u64,
        1,
        2,
        5,
        per - 1,
        per,
        per * 2 + 7,
        len / PAGE as u64 - 1,
    ];
    let mut h = PageHasher::new(len);
    for (i, &index) in pages.iter().enumerate() {
        let bytes = vec![i as u8 + 1; PAGE];
        f.write_all_at(&bytes, index * PAGE as u64).unwrap();
        h.page(index, &bytes);
    }
    let sum = h.finish();
    assert_eq!(hash_pages_file(&p).unwrap(), (sum.clone(), len));
    // A byte changed in the last, short chunk is seen.
    f.write_all_at(&[9], len - 1).unwrap();
    assert_ne!(hash_pages_file(&p).unwrap().0, sum);
}

#[test]
fn a_chunk_reads_back_checked_with_its_data_extents() {
    let d = Dir::new("chunks");
    std::fs::create_dir_all(&d.0).unwrap();
    let sparse = d.0.join("sparse");
    let (sum, len) = sparse_memory(&sparse);
    let f = File::open(&sparse).unwrap();
    let chunks = chunk_count(len);
    assert_eq!(chunks, 1);
    // A dirty buffer: read_chunk zeroes what is not data, read_chunk_data leaves it.
    let mut buf = vec![0xeeu8; CHUNK as usize];
    let mut extents = Vec::new();
    let d1 = read_chunk_data(&f, len, 0, &mut buf, &mut extents).unwrap();
    assert!(extents.iter().any(|r| r.contains(&(3 * PAGE))));
    assert!(extents.iter().any(|r| r.contains(&(700 * PAGE))));
    assert!(extents
        .iter()
        .all(|r| r.start % PAGE == 0 && r.end % PAGE == 0 && r.end <= len as usize));
    assert!(!extents.iter().any(|r| r.contains(&(500 * PAGE))));
    assert_eq!(buf[500 * PAGE], 0xee, "holes are left alone");
    let d2 = read_chunk(&f, len, 0, &mut buf).unwrap();
    assert_eq!(d1, d2);
    assert_eq!(buf[500 * PAGE], 0);
    assert_eq!(buf[3 * PAGE], 0x11);
    assert_eq!(buf[700 * PAGE + 5], 5);
    assert!(
        buf[len as usize..].iter().all(|&b| b == 0xee),
        "nothing past the chunk"
    );
    // The chunk digests make the part's digest.
    assert_eq!(pages_digest(&[d1]), sum);
    // A buffer too small for the chunk is refused, not overrun.
    let mut small = vec![0u8; PAGE];
    assert!(read_chunk(&f, len, 0, &mut small).is_err());
    assert!(digest_hex(&d1).len() == 64 && parse_digest(&digest_hex(&d1)) == Some(d1));
    assert_eq!(parse_digest("zz"), None);
}

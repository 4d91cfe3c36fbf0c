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
    edit_manifest(&d, |v| v["parts"][0]["sha256"] = sha.into());
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

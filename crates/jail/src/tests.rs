use super::*;

#[test]
fn plan_drops_duplicates_and_what_a_directory_brings() {
    let e = [
        Entry::file("/srv/vm/api.sock", true),
        Entry::file("/boot/kernel", false),
        Entry::dir("/srv/vm", true),
        Entry::device("/dev/kvm"),
        Entry::file("/boot/kernel", false),
        Entry::file("/srv/vmx/disk.img", true),
    ];
    let p: Vec<PathBuf> = root::plan(&e).into_iter().map(|e| e.path).collect();
    assert_eq!(
        p,
        [
            PathBuf::from("/srv/vm"),
            "/boot/kernel".into(),
            "/dev/kvm".into(),
            "/srv/vmx/disk.img".into()
        ]
    );
}

#[test]
fn identities_are_per_vm_and_never_root() {
    let a = Identity::for_vm(100);
    let b = Identity::for_vm(101);
    assert_ne!(a, b);
    assert!(a.validate().is_ok());
    assert!(Identity { uid: 0, gid: 5 }.validate().is_err());
    assert!(Identity { uid: 5, gid: 0 }.validate().is_err());
}

#[test]
fn relative_paths_are_refused() {
    let spec = JailSpec {
        dir: "/run/keel/jail/x".into(),
        entries: vec![Entry::file("disk.img", true)],
        identity: Identity::for_vm(1),
        netns: NetNs::New,
        max_files: 1024,
        max_threads: 64,
    };
    assert!(matches!(spec.validate(), Err(JailError::Invalid(_))));
}

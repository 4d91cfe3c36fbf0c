//! Test helpers: temp dirs, patterns, and the qemu tools (tests skip without them).

use std::path::{Path, PathBuf};
use std::process::Command;

use vmm_sys_util::tempdir::TempDir;

pub fn tmpdir() -> TempDir {
    TempDir::new_with_prefix("/tmp/keel-block-").expect("temp dir")
}

/// A byte pattern that differs per offset and per seed.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(u32::from(seed) * 97) as u8
                ^ (i >> 9) as u8
        })
        .collect()
}

/// FNV-1a of a file, to check it did not change.
pub fn checksum(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("read file");
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write file");
}

fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// `qemu-img`, or `None` after printing why the calling test skips.
pub fn qemu_img(test: &str) -> Option<PathBuf> {
    let t = tool("qemu-img");
    if t.is_none() {
        eprintln!("SKIPPED {test}: qemu-img is not installed (apt-get install qemu-utils)");
    }
    t
}

/// `qemu-io`, or `None` after printing why the calling test skips.
pub fn qemu_io(test: &str) -> Option<PathBuf> {
    let t = tool("qemu-io");
    if t.is_none() {
        eprintln!("SKIPPED {test}: qemu-io is not installed (apt-get install qemu-utils)");
    }
    t
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
pub fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{} {:?} failed: {}\n{}",
        program.display(),
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must report a clean image.
pub fn qemu_check(img: &Path, path: &Path) {
    let out = Command::new(img)
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("spawn qemu-img");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}",
        path.display()
    );
    assert!(
        text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    assert!(!text.contains("leaked"), "qemu-img check: {text}");
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

//! What a VM is made of, as the user asked for it, and the checks that turn bad requests into
//! clear errors before anything is built.

use crate::device_config::{DiskConfig, NetConfig, VsockConfig};
use std::path::PathBuf;

/// The VM to build.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Append the guest-side parameters this host's KVM needs (PVM) to the command line.
    pub host_quirks: bool,
    /// Back all guest RAM with host memory before the guest starts (no page faults later;
    /// the whole size counts against the host at once).
    pub prefault: bool,
    /// Virtio block devices, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// Virtio network devices.
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// A virtio entropy source.
    pub rng: bool,
    /// A virtio memory balloon (driven through the API socket).
    pub balloon: bool,
    /// Where the VMM listens for control requests.
    pub api_socket: Option<PathBuf>,
    /// One limit shared by all the VM's disks (`--io-bps`, `--io-iops`), on top of each
    /// disk's own.
    #[serde(default)]
    pub io_limit: keel_rate_limiter::RateLimitConfig,
    /// cgroup limits for the VMM process (CPU, memory, pids); `None`: no cgroup of its own.
    pub limits: Option<keel_cgroup::Limits>,
    /// After SIGTERM presses the power button, how long the guest gets to power off before
    /// it is stopped.
    pub shutdown_timeout_secs: u32,
    /// Confine every VMM thread with the seccomp filter of its kind (see `keel-seccomp`).
    /// Off by default so in-process users (tests) keep an unfiltered process; `keel run`
    /// turns it on.
    pub seccomp: bool,
}

pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u32 = 30;

/// The command line used when the user gives none: serial console, and a panic reboots at
/// once (which ends `keel run`) instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
pub const DEFAULT_MEMORY: u64 = 512 << 20;
pub const DEFAULT_VCPUS: u32 = 1;

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: DEFAULT_VCPUS,
            memory: DEFAULT_MEMORY,
            host_quirks: true,
            prefault: false,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: false,
            balloon: false,
            api_socket: None,
            io_limit: keel_rate_limiter::RateLimitConfig::default(),
            limits: None,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            seccomp: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error(
        "'{0}' is not a size: use a number with an optional K, M, G or T suffix (e.g. 512M, 2G)"
    )]
    Malformed(String),
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// What a VMM needs beyond guest RAM, for `--memory-limit auto`: Keel's own heap, stacks,
/// device buffers and page tables (measured: ~2 MiB with no devices, a few MiB with every
/// device busy), with room to spare.
pub const VMM_MEMORY_OVERHEAD: u64 = 32 << 20;

/// Parses `512M`, `2G`, `1048576`, `64k`, `1.5G` (binary units; a bare number is bytes, a
/// trailing `B`/`iB` is accepted: `2GiB`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let malformed = || SizeError::Malformed(s.to_string());
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(malformed());
    }
    if let Some((int, frac)) = num.split_once('.') {
        if int.is_empty() || frac.is_empty() || frac.contains('.') || shift == 0 {
            return Err(malformed());
        }
        let whole: u64 = int
            .parse()
            .map_err(|_| SizeError::Overflow(s.to_string()))?;
        let frac_digits = frac.len().min(9);
        let frac_val: u64 = frac[..frac_digits].parse().map_err(|_| malformed())?;
        let scale = 10u64.pow(frac_digits as u32);
        let unit = 1u64 << shift;
        let whole_bytes = whole
            .checked_mul(unit)
            .ok_or_else(|| SizeError::Overflow(s.to_string()))?;
        let frac_bytes = (u128::from(frac_val) * u128::from(unit) / u128::from(scale)) as u64;
        return whole_bytes
            .checked_add(frac_bytes)
            .ok_or_else(|| SizeError::Overflow(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats a byte count the way users write it (`512M`, `2G`, `1536K`).
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}")
}

/// The host's total RAM in bytes, from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 256M "), Ok(256 << 20));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn malformed_sizes_are_errors() {
        for bad in [
            "", "M", "12Q", "-1G", "1.G", ".5G", "1.5", "1..5G", "0x10", "1 G", "G1", "１G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184T"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_format_back() {
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(1000), "1000");
    }
}

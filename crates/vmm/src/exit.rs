//! How a VM ended, and what `keel run` tells the user about it.

use serde::Serialize;
use std::time::Duration;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ExitReason {
    /// The guest powered off; `source` names the mechanism (e.g. "ACPI S5").
    PowerOff { source: &'static str },
    /// The guest reset itself: "i8042 reset", "ACPI reset", "triple fault", ...
    Reset { source: &'static str },
    /// Every vCPU halted with nothing left to wake it.
    Halted,
    /// The guest reported a crash through KVM.
    GuestCrash,
    /// The host asked Keel to stop (SIGINT, SIGTERM).
    Signal(i32),
    /// The user typed the console escape (Ctrl-A x).
    ConsoleEscape,
    /// A vCPU could not continue: KVM internal error, failed entry, or a KVM ioctl error.
    /// `state` holds the vCPU's registers and the code bytes at RIP.
    VcpuFailed {
        vcpu: u32,
        error: String,
        state: String,
    },
    /// The memory of the snapshot the VM was restored from failed its check when it was
    /// first used (or by the checker beside the guest): the VM cannot go on.
    SnapshotMemory { error: String },
    /// The VM moved to another host (`keel migrate`): it runs there now.
    Migrated,
    /// Post-copy: the source went away before every page it still held arrived here. The
    /// VM's memory is split between the hosts: it cannot go on anywhere.
    MigrationLost { error: String },
}

impl ExitReason {
    /// `keel run`'s exit status: 0 when the guest ended itself (power-off, reboot, halt) or the
    /// user quit from the console, 128+N for a signal, 1 for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff { .. }
            | ExitReason::Reset { .. }
            | ExitReason::Halted
            | ExitReason::ConsoleEscape
            | ExitReason::Migrated => 0,
            ExitReason::Signal(n) => 128 + n,
            ExitReason::GuestCrash | ExitReason::VcpuFailed { .. } => 1,
            // A bad snapshot, as when `keel restore` refuses one up front.
            ExitReason::SnapshotMemory { .. } => 2,
            ExitReason::MigrationLost { .. } => 1,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::PowerOff { source } => format!("guest powered off ({source})"),
            ExitReason::Reset { source } => format!("guest rebooted ({source})"),
            ExitReason::Halted => "all vCPUs halted".into(),
            ExitReason::GuestCrash => "guest reported a crash".into(),
            ExitReason::Signal(n) => format!("stopped by {}", signal_name(*n)),
            ExitReason::ConsoleEscape => "stopped from the console (Ctrl-A x)".into(),
            ExitReason::VcpuFailed { vcpu, error, .. } => format!("vCPU {vcpu} failed: {error}"),
            ExitReason::SnapshotMemory { error } => format!("stopped: {error}"),
            ExitReason::Migrated => "migrated: the VM runs on the destination now".into(),
            ExitReason::MigrationLost { error } => {
                format!("stopped: post-copy failed, the VM's memory is lost: {error}")
            }
        }
    }
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Counters of what the vCPUs did, for diagnostics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExitStats {
    pub io_exits: u64,
    pub mmio_exits: u64,
    /// Port accesses with no device behind them (reads see all-ones).
    pub unhandled_io: u64,
    /// MMIO accesses with no device behind them (reads see all-ones).
    pub unhandled_mmio: u64,
    /// Guest writes to the read-only ROM area (ignored).
    pub rom_writes: u64,
}

/// The end of a VM's life.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub reason: ExitReason,
    pub wall_time: Duration,
    pub stats: ExitStats,
    /// The last POST code the guest wrote to port 0x80, if any.
    pub last_post_code: Option<u8>,
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        self.reason.exit_code()
    }

    /// The summary `keel run` prints on stderr: one line, then the vCPU state for a failure.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "keel: {} after {:.2} s",
            self.reason.describe(),
            self.wall_time.as_secs_f64()
        );
        if let ExitReason::VcpuFailed { state, .. } = &self.reason {
            s.push('\n');
            s.push_str(state);
        }
        if let (Some(code), true) = (self.last_post_code, self.exit_code() != 0) {
            s.push_str(&format!("\n  last POST code (port 0x80): {code:#04x}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(ExitReason::PowerOff { source: "ACPI S5" }.exit_code(), 0);
        assert_eq!(
            ExitReason::Reset {
                source: "triple fault"
            }
            .exit_code(),
            0
        );
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
        let f = ExitReason::VcpuFailed {
            vcpu: 1,
            error: "x".into(),
            state: "  rip=0x1".into(),
        };
        assert_eq!(f.exit_code(), 1);
        assert!(f.describe().starts_with("vCPU 1 failed"));
        let o = Outcome {
            reason: ExitReason::Signal(libc::SIGINT),
            wall_time: Duration::from_millis(1500),
            stats: ExitStats::default(),
            last_post_code: None,
        };
        assert_eq!(o.summary(), "keel: stopped by SIGINT after 1.50 s");
        let failed = Outcome {
            reason: f,
            last_post_code: Some(0x42),
            ..o
        };
        assert_eq!(
            failed.summary(),
            "keel: vCPU 1 failed: x after 1.50 s\n  rip=0x1\n  last POST code (port 0x80): 0x42"
        );
    }
}

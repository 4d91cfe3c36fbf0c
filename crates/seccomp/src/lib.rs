//! Keel's seccomp filters: one per kind of VMM thread, each allowing only the system calls
//! (and, for `ioctl`, the request numbers) that kind of thread makes. Anything else traps:
//! the SIGSYS handler reports the thread and the call on stderr and the process dies by
//! SIGSYS.
//!
//! ```text
//! main thread: prepare() ── apply(Vmm) ──┬── spawns vCPU threads ── apply(Vcpu)
//!                                        ├── spawns the API thread ── apply(Api)
//!                                        ├── (a restored VM) the pager, checker ── apply(Pager)
//!                                        └── event loop: activates devices ──┬── apply(Device)
//!                                                                            └── apply(BlockIo)
//! ```
//! A thread inherits its creator's filter and stacked filters intersect: the vmm filter is a
//! superset of the filters of the threads it starts; a vCPU thread starts none.

mod ioctls;
mod names;
mod rules;
mod sigsys;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::sync::OnceLock;

/// The kinds of thread a Keel VMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop (the process's main thread): stop requests, console input, device
    /// activation and teardown; every other thread descends from it.
    Vmm,
    /// One per vCPU: `KVM_RUN` and the device emulation of its exits.
    Vcpu,
    /// A device's data path (virtio queues, tap, vsock sockets, io_uring completions).
    Device,
    /// A block I/O engine worker (positional I/O on disk images).
    BlockIo,
    /// The control socket.
    Api,
    /// The memory pager of a restored VM (userfaultfd) and its checker: reads of the
    /// snapshot's memory part, pages copied into guest memory.
    Pager,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::BlockIo,
        ThreadKind::Api,
        ThreadKind::Pager,
    ];

    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::BlockIo => "block-io",
            ThreadKind::Api => "api",
            ThreadKind::Pager => "pager",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the {kind} seccomp filter to BPF: {source}")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter on thread '{thread}': {source} (does this kernel have seccomp filters?)")]
    Apply {
        kind: &'static str,
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// The filter of `kind` for this process, compiled to BPF.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, Error> {
    let rules = rules::rules(kind, std::process::id());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| Error::Build {
        kind: kind.name(),
        source,
    })?;
    filter.try_into().map_err(|source| Error::Compile {
        kind: kind.name(),
        source,
    })
}

/// The refusal filter every thread but the event loop's carries beside its own: the calls in
/// `rules::REFUSED` fail with EACCES (see there why they are not trapped).
pub fn refusal_program() -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules::refusals(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|source| Error::Build {
        kind: "refusal",
        source,
    })?;
    filter.try_into().map_err(|source| Error::Compile {
        kind: "refusal",
        source,
    })
}

/// Every kind's program, then the refusal program.
static PROGRAMS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

/// Compiles every filter (so threads only install a ready program) and installs the SIGSYS
/// handler. Call once, on the thread that then applies [`ThreadKind::Vmm`], before any
/// filter is applied.
pub fn prepare() -> Result<(), Error> {
    if PROGRAMS.get().is_none() {
        let mut progs = ThreadKind::ALL
            .iter()
            .map(|&k| program(k))
            .collect::<Result<Vec<_>, _>>()?;
        progs.push(refusal_program()?);
        let _ = PROGRAMS.set(progs);
    }
    sigsys::install().map_err(Error::Handler)
}

/// Confines the calling thread with the filter of `kind` (for good: filters cannot be
/// removed). Uses the programs [`prepare`] compiled, or compiles this one.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    sigsys::record_thread(name, kind.name());
    // A program `prepare` compiled (at `index`), or built now.
    let install =
        |kind_name: &'static str, index: usize, build: &dyn Fn() -> Result<BpfProgram, Error>| {
            let built;
            let prog = match PROGRAMS.get().and_then(|p| p.get(index)) {
                Some(p) => p,
                None => {
                    built = build()?;
                    &built
                }
            };
            seccompiler::apply_filter(prog).map_err(|source| Error::Apply {
                kind: kind_name,
                thread: name.to_string(),
                source,
            })
        };
    if kind != ThreadKind::Vmm {
        install("refusal", ThreadKind::ALL.len(), &refusal_program)?;
    }
    install(kind.name(), kind.index(), &|| program(kind))
}

/// The name of system call `nr` on x86_64 ("unknown" if it has none).
pub fn syscall_name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .copied()
        .filter(|n| !n.is_empty())
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests;

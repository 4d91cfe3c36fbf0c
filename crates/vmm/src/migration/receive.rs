//! The receiving end of a migration: the VM is built from the stream. It runs in the VMM's
//! process before the jail (like a restore, which reads its snapshot there): every message is
//! bounded by the stream layer, every page checked against guest RAM, the state parsed with
//! the snapshot loader's checks.

use super::pages;
use super::send::Offer;
use crate::snapshot::format::parse_migration_state;
use crate::vm::{create_vm, join_cgroup, validate_memory};
use crate::{VmConfig, VmIo, Vmm, VmmError};
use keel_migration::{Channel, Message, Role};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long the receiver waits for the next message once a sender is connected.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn bad(what: impl std::fmt::Display) -> VmmError {
    VmmError::Migration(what.to_string())
}

/// What the receiving side sets for the arriving VM (the rest comes from the sender).
pub struct ReceiveOptions {
    pub listen: SocketAddr,
    pub key: Vec<u8>,
    pub api_socket: Option<std::path::PathBuf>,
    pub seccomp: bool,
}

impl Vmm {
    /// Waits for one sender on `opts.listen`, checks its key, builds the VM it offers, fills
    /// guest memory with the pages it sends and restores the state it sends last; says it is
    /// ready and returns only on the sender's go (it has stopped for good). The sender is
    /// told the VM runs here when [`Vmm::run`] has started its vCPUs.
    pub fn receive(opts: ReceiveOptions, io: VmIo) -> Result<Vmm, VmmError> {
        let listener = TcpListener::bind(opts.listen)
            .map_err(|e| bad(format!("cannot listen on {}: {e}", opts.listen)))?;
        tracing::info!("waiting for a migration on {}", opts.listen);
        let (stream, peer) = listener
            .accept()
            .map_err(|e| bad(format!("accepting on {}: {e}", opts.listen)))?;
        drop(listener);
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| bad(format!("the connection from {peer}: {e}")))?;
        let mut ch = Channel::handshake(stream, Role::Receiver, &opts.key).map_err(bad)?;
        tracing::info!("migration from {peer}: authenticated");
        match Self::receive_from(&mut ch, &opts, io) {
            Ok(mut vmm) => {
                vmm.migration_ack = Some(ch);
                Ok(vmm)
            }
            Err(e) => {
                let _ = ch.send(&Message::Abort(e.to_string()));
                Err(e)
            }
        }
    }

    fn receive_from(
        ch: &mut Channel<TcpStream>,
        opts: &ReceiveOptions,
        io: VmIo,
    ) -> Result<Vmm, VmmError> {
        let offer: Offer = match ch.recv().map_err(bad)? {
            Message::Config(json) => serde_json::from_slice(&json)
                .map_err(|e| bad(format!("the offered machine is malformed: {e}")))?,
            other => return Err(bad(format!("expected the machine first, got {other:?}"))),
        };
        let mut config: VmConfig = offer.config;
        config.api_socket = opts.api_socket.clone();
        config.seccomp = opts.seccomp;
        // Limits are this host's business (the supervisor's cgroup), not the sender's.
        config.limits = None;
        // Host resources are this host's to name: a sender (even one holding the key) must
        // not make this VMM open its paths as disks, attach to its taps or create sockets
        // where it says. Until `keel receive` can map them, such VMs are refused.
        let mut needs = Vec::new();
        if !config.disks.is_empty() {
            needs.push("disks");
        }
        if !config.nets.is_empty() {
            needs.push("network interfaces");
        }
        if config.vsock.is_some() {
            needs.push("a vsock device");
        }
        if !needs.is_empty() {
            return Err(bad(format!(
                "the offered VM has {}: this host would have to name them, which `keel \
                 receive` cannot do yet; refusing rather than using the sender's host paths",
                needs.join(", ")
            )));
        }
        validate_memory(&config)?;
        let cgroup = join_cgroup(&config)?;
        let (hv, vm) = create_vm(&config)?;
        let kind = format!("{:?}", hv.host_info().kind);
        if kind != offer.host_kind {
            return Err(bad(format!(
                "the VM runs on a {} host; this one is {kind}",
                offer.host_kind
            )));
        }
        let ram = crate::memory::allocate(config.memory).map_err(bad)?;
        let mut pages_in = 0u64;
        let state = loop {
            match ch.recv().map_err(bad)? {
                m @ (Message::Pages { .. } | Message::Zeros { .. }) => {
                    pages_in += pages::apply(&ram.all, &m).map_err(bad)?;
                }
                Message::RoundEnd { .. } => {}
                Message::State(json) => break json,
                Message::Abort(why) => return Err(bad(format!("the sender gave up: {why}"))),
                other => return Err(bad(format!("unexpected {other:?}"))),
            }
        };
        let saved = parse_migration_state(&state).map_err(bad)?;
        if (saved.config.vcpus, saved.config.memory) != (config.vcpus, config.memory) {
            return Err(bad("the state does not match the offered machine"));
        }
        let disks = crate::devices::open_disks(&config)?; // none (see above)
        tracing::info!("migration: {pages_in} pages in; building the VM");
        let mut vmm =
            Self::restore_machine(&saved, hv, vm, config.clone(), ram, disks, cgroup, io)?;
        vmm.restored_files = config
            .disks
            .iter()
            .map(|d| (d.path.clone(), false))
            .collect();
        // Built; it runs only once the sender has stopped for good.
        ch.send(&Message::Ready)
            .and_then(|()| ch.flush())
            .map_err(bad)?;
        match ch.recv() {
            Ok(Message::Go) => Ok(vmm),
            Ok(other) => Err(bad(format!(
                "the sender did not commit ({other:?}): not running the VM"
            ))),
            Err(e) => Err(bad(format!(
                "{e}; the sender did not commit: not running the VM"
            ))),
        }
    }
}

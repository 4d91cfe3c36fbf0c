//! The receiving end of a migration: the VM is built from the stream. It runs in the VMM's
//! process before the jail (like a restore, which reads its snapshot there): every message is
//! bounded by the stream layer, every page checked against guest RAM, the state parsed with
//! the snapshot loader's checks.

use super::send::Offer;
use crate::device_config::{DiskConfig, NetConfig, VsockConfig};
use crate::vm::{create_vm, join_cgroup, validate_memory};
use crate::{VmConfig, VmIo, Vmm, VmmError};
use keel_migration::{Channel, Message, Role};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long the receiver waits for the next message once a sender is connected.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn bad(what: impl std::fmt::Display) -> VmmError {
    VmmError::Migration(what.to_string())
}

/// What the receiving side sets for the arriving VM (the rest comes from the sender).
pub struct ReceiveOptions {
    pub listen: SocketAddr,
    pub key: Vec<u8>,
    pub api_socket: Option<std::path::PathBuf>,
    pub seccomp: bool,
    /// This host's side of the VM's disks, network interfaces and vsock device, in the
    /// order the sender's VM has them (`keel run`'s syntax): one each, or the VM is refused.
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
}

/// Puts this host's side of every device into the offered machine: paths, taps, sockets and
/// limits are this host's to name (a sender, even one holding the key, must not make this
/// VMM open its paths or attach to its taps); what the guest sees (a disk's size and
/// writability, a vsock CID) must be the same here. MAC addresses come with the device
/// state.
pub(super) fn host_side(
    config: &mut VmConfig,
    offer: &Offer,
    opts: &ReceiveOptions,
) -> Result<(), VmmError> {
    let count = |what: &str, flag: &str, offered: usize, named: usize| {
        if offered == named {
            return Ok(());
        }
        Err(bad(format!(
            "the VM has {offered} {what}, this side names {named} (`keel receive {flag} ...` \
             once for each, in the sender's order)"
        )))
    };
    count("disk(s)", "--disk", config.disks.len(), opts.disks.len())?;
    count(
        "network interface(s)",
        "--net",
        config.nets.len(),
        opts.nets.len(),
    )?;
    count(
        "vsock device(s)",
        "--vsock",
        usize::from(config.vsock.is_some()),
        usize::from(opts.vsock.is_some()),
    )?;
    for (i, (disk, mine)) in config.disks.iter_mut().zip(&opts.disks).enumerate() {
        let theirs = offer.disks.get(i);
        let read_only = theirs.map_or(disk.read_only, |d| d.read_only);
        if mine.read_only != read_only {
            return Err(bad(format!(
                "disk {i} ({}) is {} in the VM; --disk {} says otherwise",
                mine.path.display(),
                if read_only { "read-only" } else { "read-write" },
                if mine.read_only {
                    "readonly=on"
                } else {
                    "without readonly=on"
                },
            )));
        }
        *disk = mine.clone();
    }
    for (net, mine) in config.nets.iter_mut().zip(&opts.nets) {
        *net = NetConfig {
            mac: None, // the device state's
            ..mine.clone()
        };
    }
    if let (Some(v), Some(mine)) = (config.vsock.as_mut(), &opts.vsock) {
        if v.cid != mine.cid {
            return Err(bad(format!(
                "the VM's vsock CID is {}; --vsock cid={} (the guest knows its CID)",
                v.cid, mine.cid
            )));
        }
        *v = mine.clone();
    }
    Ok(())
}

/// The opened disks are the ones the VM had: same virtual size.
fn same_disks(disks: &[crate::devices::OpenedDisk], offer: &Offer) -> Result<(), VmmError> {
    for (i, (d, theirs)) in disks.iter().zip(&offer.disks).enumerate() {
        let size = d.images.last().map_or(0, |img| img.size());
        if size != theirs.size {
            let layer = theirs.layers.last().map(|l| l.path.display().to_string());
            return Err(bad(format!(
                "disk {i}: {size} bytes here, {} bytes in the VM (writing {}): not the same disk",
                theirs.size,
                layer.unwrap_or_default()
            )));
        }
    }
    Ok(())
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
        let arrived = super::intake::take(ch, opts, |config, offer| {
            validate_memory(config)?;
            let cgroup = join_cgroup(config)?;
            let (hv, vm) = create_vm(config)?;
            let kind = format!("{:?}", hv.host_info().kind);
            if kind != offer.host_kind {
                return Err(bad(format!(
                    "the VM runs on a {} host; this one is {kind}",
                    offer.host_kind
                )));
            }
            Ok((cgroup, hv, vm))
        })?;
        let super::intake::Arrived {
            offer,
            config,
            ram,
            saved,
            pages_in,
            postcopy,
            prepared: (cgroup, hv, vm),
        } = arrived;
        // Opened now, not before: until its state was sent the sender wrote them, and it
        // held their locks (it lets go once its devices are paused and flushed).
        let disks = crate::devices::open_disks(&config)?;
        same_disks(&disks, &offer)?;
        tracing::info!("migration: {pages_in} pages in; building the VM");
        let state_in = std::time::Instant::now();
        let Some(remote) = postcopy else {
            let vmm =
                Self::restore_machine(&saved, hv, vm, config.clone(), ram, disks, cgroup, io)?;
            let vmm = Self::received(vmm, &config, &saved, state_in);
            // Built; it runs only once the sender has stopped for good.
            ch.send(&Message::Ready)
                .and_then(|()| ch.flush())
                .map_err(bad)?;
            return match ch.recv() {
                Ok(Message::Go) => Ok(vmm),
                Ok(other) => Err(bad(format!(
                    "the sender did not commit ({other:?}): not running the VM"
                ))),
                Err(e) => Err(bad(format!(
                    "{e}; the sender did not commit: not running the VM"
                ))),
            };
        };
        // Post-copy: pages still at the source may be touched while the VM is built; a
        // thread serves them, says Ready once it is built and waits for Go.
        tracing::info!(
            "migration: post-copy, {} pages still at the source",
            remote.stale.left()
        );
        let remote = std::sync::Arc::new(remote);
        let built = std::sync::Mutex::new(super::postcopy::Built::Pending);
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            VmmError::Io {
                what: "post-copy eventfd",
                source,
            }
        })?;
        let (vmm, served) = std::thread::scope(|s| {
            let server = std::thread::Builder::new()
                .name("postcopy-setup".into())
                .spawn_scoped(s, || {
                    super::postcopy::serve_until_go(&remote, ch, &built, &wake)
                });
            let server = match server {
                Ok(t) => t,
                Err(e) => {
                    return (
                        Err(bad(format!("spawning the post-copy server: {e}"))),
                        Ok(()),
                    )
                }
            };
            let vmm = Self::restore_machine(&saved, hv, vm, config.clone(), ram, disks, cgroup, io);
            *built.lock().unwrap_or_else(|p| p.into_inner()) = if vmm.is_ok() {
                super::postcopy::Built::Ok
            } else {
                super::postcopy::Built::Failed
            };
            let _ = wake.write(1);
            let served = server
                .join()
                .unwrap_or_else(|_| Err("the post-copy server panicked".into()));
            (vmm, served)
        });
        let vmm = vmm?;
        served.map_err(|e| {
            bad(format!(
                "{e}; the sender did not commit: not running the VM"
            ))
        })?;
        let mut vmm = Self::received(vmm, &config, &saved, state_in);
        vmm.postcopy = Some(remote);
        Ok(vmm)
    }

    /// A received VM's finishing touches: its disks for the jail, its MACs to announce.
    fn received(
        mut vmm: Vmm,
        config: &VmConfig,
        saved: &crate::snapshot::format::SavedVm,
        t: std::time::Instant,
    ) -> Vmm {
        // The disks as `--disk` named them, for the jail.
        vmm.restored_files = config
            .disks
            .iter()
            .map(|d| (d.path.clone(), !d.read_only))
            .collect();
        let macs = saved.devices.iter().filter_map(|d| match &d.device {
            keel_virtio::DeviceState::Net(n) => Some(n.mac),
            _ => None,
        });
        vmm.announce = vmm.pci.taps.iter().cloned().zip(macs).collect();
        tracing::debug!("migration: built in {:?}", t.elapsed());
        vmm
    }
}

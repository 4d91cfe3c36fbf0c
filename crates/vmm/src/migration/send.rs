//! The sending end of a migration (stop-and-copy for now): on the event loop, with the VM
//! paused, its memory and state go over the connection `keel migrate` passed; the VM stops
//! here once the destination says it runs it.

use super::pages;
use crate::exit::ExitReason;
use crate::runner::Shared;
use crate::snapshot::Snapshotter;
use keel_api::{MigrateReply, MigrateRequest};
use keel_hypervisor::Vm;
use keel_migration::{Channel, Message, Role};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// How long the sender waits on the destination at any step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The machine to build, first on the stream.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Offer {
    pub config: crate::VmConfig,
    pub host_kind: String,
}

fn hex_key(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || s.is_empty() {
        return Err("the migration key is not hex".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| "the migration key is not hex".to_string())
        })
        .collect()
}

impl Snapshotter {
    /// Moves the VM over `fds[0]` (a connected TCP stream). Before the state is sent any
    /// failure leaves the VM running here; after it, without the destination's word, the VM
    /// stays paused here (it may run there: never both).
    pub(crate) fn migrate(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        req: MigrateRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<MigrateReply, String> {
        let start = Instant::now();
        let goes_on = |e: String| format!("{e}; the VM goes on here");
        let key = hex_key(&req.key_hex).map_err(goes_on)?;
        // What the destination cannot take yet (see `receive`): refused before the guest
        // is paused at all.
        let c = &self.config;
        if !c.disks.is_empty() || !c.nets.is_empty() || c.vsock.is_some() {
            return Err(goes_on(
                "the VM has disks, network interfaces or vsock: migrating those (their host \
                 side named by the destination) is not there yet"
                    .into(),
            ));
        }
        let mut fds = fds.into_iter();
        let (Some(fd), None) = (fds.next(), fds.next()) else {
            return Err(goes_on(
                "migrate takes exactly one descriptor: the connection".into(),
            ));
        };
        let stream = TcpStream::from(fd);
        let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| goes_on(io("the connection")(e)))?;
        let e = |e: keel_migration::Error| goes_on(e.to_string());
        let mut ch = Channel::handshake(stream, Role::Sender, &key).map_err(e)?;
        let offer = Offer {
            config: self.config.clone(),
            host_kind: self.host_kind.clone(),
        };
        let json = serde_json::to_vec(&offer).map_err(|e| goes_on(e.to_string()))?;
        ch.send(&Message::Config(json)).map_err(e)?;

        let was_paused = sh.pause.is_paused();
        if !was_paused {
            sh.pause
                .pause(|| sh.running_vcpus(), crate::pause::PAUSE_TIMEOUT)
                .map_err(goes_on)?;
        }
        let paused_at = Instant::now();
        let mut paused_devices = Vec::new();
        let mut state_sent = false;
        let result = self.send_paused(vm, sh, &mut ch, &mut paused_devices, &mut state_sent);
        let downtime = paused_at.elapsed();
        match result {
            Ok(sent) => {
                // The destination runs the VM: this one never runs again.
                sh.stop.request(ExitReason::Migrated);
                let reply = MigrateReply {
                    total_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                    downtime_us: u64::try_from(downtime.as_micros()).unwrap_or(u64::MAX),
                    bytes_sent: ch.sent_bytes,
                    rounds: 1,
                    data_pages: sent.data_pages,
                    zero_pages: sent.zero_pages,
                };
                tracing::info!(
                    "migrated: {} MiB sent in {:.1} ms, guest paused {:.1} ms",
                    reply.bytes_sent >> 20,
                    reply.total_us as f64 / 1000.0,
                    reply.downtime_us as f64 / 1000.0
                );
                Ok(reply)
            }
            Err(why) if state_sent => {
                tracing::error!("migration: {why}; the VM stays paused here");
                Err(format!(
                    "{why}; the state was sent, so the VM may run on the destination: it stays \
                     paused here (`keel resume` only if it does not run there)"
                ))
            }
            Err(why) => {
                let _ = ch.send(&Message::Abort(why.clone()));
                for d in paused_devices {
                    if let Err(e) = d.lock().unwrap_or_else(|p| p.into_inner()).resume() {
                        tracing::error!("after a failed migration, a device did not resume: {e}");
                    }
                }
                if !was_paused {
                    sh.pause.resume();
                }
                tracing::warn!("migration failed, the VM goes on here: {why}");
                Err(goes_on(why))
            }
        }
    }

    /// With the vCPUs paused: the machine state, every page the guest has, the state; then
    /// the destination's word.
    fn send_paused(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        ch: &mut Channel<TcpStream>,
        paused_devices: &mut Vec<std::sync::Arc<std::sync::Mutex<keel_virtio::VirtioPciDevice>>>,
        state_sent: &mut bool,
    ) -> Result<pages::Sent, String> {
        let e = |e: keel_migration::Error| e.to_string();
        let saved = self.capture_machine(vm, sh, paused_devices)?;
        // Pages never touched are zero on the destination too: only those this process has
        // (a restored VM's memory may still be in its snapshot: every page, read through the
        // pager).
        let mut list = Vec::new();
        for region in sh.mem.iter() {
            let first = region.start_addr().0 / keel_migration::PAGE as u64;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| e.to_string())?;
            let pagemap = if self.lazy.is_some() {
                None
            } else {
                self.pagemap.as_ref()
            };
            let want = crate::snapshot::memory::candidates(region, host, pagemap)
                .map_err(|e| e.to_string())?;
            list.extend(
                want.iter()
                    .enumerate()
                    .filter(|(_, w)| **w)
                    .map(|(i, _)| first + i as u64),
            );
        }
        let sent = pages::send(ch, &sh.mem, list)?;
        let state = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        *state_sent = true;
        ch.send(&Message::State(state)).map_err(e)?;
        ch.flush().map_err(e)?;
        match ch.recv().map_err(e)? {
            Message::Resumed => Ok(sent),
            Message::Abort(why) => {
                // A refusal is a clear no: the VM does not run there, it may go on here.
                *state_sent = false;
                Err(format!("the destination refused the VM: {why}"))
            }
            other => Err(format!("the destination answered {other:?}")),
        }
    }
}

//! The sending end of a migration (stop-and-copy for now): on the event loop, with the VM
//! paused, its memory and state go over the connection `keel migrate` passed; the VM stops
//! here once the destination says it runs it.

use super::pages;
use crate::exit::ExitReason;
use crate::runner::Shared;
use crate::snapshot::Snapshotter;
use keel_api::{MigrateReply, MigrateRequest};
use keel_block::DiskImage;
use keel_hypervisor::Vm;
use keel_migration::{Channel, Message, Role};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Pre-copy rounds before the sender gives up converging and copies what is left paused.
const MAX_ROUNDS: u32 = 30;

/// The guest pages written since the last look, clearing the logs: those KVM logged (the
/// guest's own writes) and those written from the host side (devices, the balloon). Sorted,
/// each once.
fn dirty_pages(vm: &Vm, mem: &crate::memory::GuestMemoryMmap) -> Result<Vec<u64>, String> {
    let logs = vm.take_dirty_log().map_err(|e| e.to_string())?;
    let mut pages: Vec<u64> = logs
        .iter()
        .flat_map(|l| l.pages().map(|gpa| gpa / keel_migration::PAGE as u64))
        .collect();
    pages.extend(crate::memory::take_host_written(mem));
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

/// `pages` (sorted) as (first, count) runs of consecutive pages.
fn ranges(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// How long each step of the pause took, for the log.
struct Steps {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Default for Steps {
    fn default() -> Steps {
        Steps {
            last: Instant::now(),
            done: Vec::new(),
        }
    }
}

impl Steps {
    fn mark(&mut self, what: &'static str) {
        let now = Instant::now();
        self.done.push((what, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (what, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{what} {:.1} ms", took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

type PausedDevice = Arc<Mutex<keel_virtio::VirtioPciDevice>>;

/// How long the sender waits on the destination at any step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The machine to build, first on the stream.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Offer {
    pub config: crate::VmConfig,
    pub host_kind: String,
    /// The disks as the VM has them now (size, writability, the layers it runs on).
    #[serde(default)]
    pub disks: Vec<keel_api::DiskInfo>,
}

impl Snapshotter {
    /// Moves the VM over `fds[0]` (a connected TCP stream). Until the destination is told to
    /// run the VM (`Go`, after it said it is `Ready`) any failure leaves the VM running here;
    /// after it, without the destination's word that it runs, the VM stays paused here (it
    /// may run there: never both).
    pub(crate) fn migrate(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        req: MigrateRequest,
        fds: Vec<OwnedFd>,
    ) -> Result<MigrateReply, String> {
        let start = Instant::now();
        let goes_on = |e: String| format!("{e}; the VM goes on here");
        let key = keel_migration::key_from_hex(&req.key_hex)
            .ok_or_else(|| goes_on("the migration key is not hex".into()))?;
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
            disks: self
                .disk_info
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        };
        let json = serde_json::to_vec(&offer).map_err(|e| goes_on(e.to_string()))?;
        ch.send(&Message::Config(json))
            .and_then(|()| ch.flush())
            .map_err(e)?;
        // The destination says whether it can take this machine before any memory moves.
        match ch.recv().map_err(e)? {
            Message::Ready => {}
            Message::Abort(why) => {
                return Err(goes_on(format!("the destination refused the VM: {why}")))
            }
            other => return Err(goes_on(format!("the destination answered {other:?}"))),
        }

        // Pre-copy while the guest runs: every write to guest memory is logged, the guest's
        // by KVM, the devices' by the memory's bitmap.
        let mut plan = super::plan::Plan::new(Duration::from_millis(req.downtime_ms), MAX_ROUNDS);
        let mut sent = pages::Sent::default();
        let (carried, converged) =
            match self.precopy(vm, sh, &mut ch, &mut plan, &mut sent, req.postcopy) {
                Ok(done) => done,
                Err(why) => {
                    let _ = vm.set_dirty_logging(false);
                    let _ = ch.send(&Message::Abort(why.clone()));
                    tracing::warn!("migration failed, the VM goes on here: {why}");
                    return Err(goes_on(why));
                }
            };

        let was_paused = sh.pause.is_paused();
        if !was_paused {
            if let Err(e) = sh
                .pause
                .pause(|| sh.running_vcpus(), crate::pause::PAUSE_TIMEOUT)
            {
                let _ = vm.set_dirty_logging(false);
                return Err(goes_on(e));
            }
        }
        let paused_at = Instant::now();
        let mut paused_devices = Vec::new();
        let mut handed_over = Vec::new();
        let mut committed = false;
        // Post-copy when asked, or when pre-copy did not converge (the guest dirties faster
        // than pages go: another pause-and-copy would be long).
        let postcopy = req.postcopy || !converged;
        let result = self.send_paused(
            vm,
            sh,
            &mut ch,
            (&mut paused_devices, &mut handed_over),
            &mut committed,
            carried,
            postcopy,
        );
        let downtime = match &result {
            Ok((_, Some(resumed))) => resumed.duration_since(paused_at),
            _ => paused_at.elapsed(),
        };
        let _ = vm.set_dirty_logging(false);
        match result {
            Ok((last, _)) => {
                // The destination runs the VM: this one never runs again.
                sh.stop.request(ExitReason::Migrated);
                let reply = MigrateReply {
                    total_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
                    downtime_us: u64::try_from(downtime.as_micros()).unwrap_or(u64::MAX),
                    bytes_sent: ch.sent_bytes(),
                    rounds: plan.rounds() + 1,
                    data_pages: sent.data_pages + last.data_pages,
                    zero_pages: sent.zero_pages + last.zero_pages,
                    converged,
                    postcopy_pages: if postcopy { last.data_pages } else { 0 },
                };
                tracing::info!(
                    "migrated: {} MiB sent in {:.1} ms over {} rounds, guest paused {:.1} ms",
                    reply.bytes_sent >> 20,
                    reply.total_us as f64 / 1000.0,
                    reply.rounds,
                    reply.downtime_us as f64 / 1000.0
                );
                Ok(reply)
            }
            Err(why) if committed => {
                tracing::error!("migration: {why}; the VM stays paused here");
                Err(format!(
                    "{why}; the destination was told to run the VM, so it may run there: it \
                     stays paused here (`keel resume` only if it does not run there)"
                ))
            }
            Err(why) => {
                let _ = ch.send(&Message::Abort(why.clone()));
                drop(ch);
                // The destination may have opened the disks: it lets go as it gives up.
                for img in handed_over {
                    if let Err(e) = keel_block::take_back(&img, STEP_TIMEOUT) {
                        tracing::error!(
                            "after a failed migration, disk {} could not be locked again \
                             (is the destination still running it?): {e}",
                            img.id()
                        );
                    }
                }
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

    /// Pre-copy, with the guest running: KVM's dirty log on, every page the process has,
    /// then rounds of the pages dirtied meanwhile until what is left fits the budget at the
    /// bandwidth measured (or the rounds run out). Returns the pages dirtied in the last
    /// look, not sent yet, and whether it converged.
    fn precopy(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        ch: &mut Channel<TcpStream>,
        plan: &mut super::plan::Plan,
        sent: &mut pages::Sent,
        postcopy: bool,
    ) -> Result<(Vec<u64>, bool), String> {
        let e = |e: keel_migration::Error| e.to_string();
        vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
        // Logged from here on: anything written while a round reads goes again.
        dirty_pages(vm, &sh.mem)?;
        let mut list = self.present_pages(sh)?;
        loop {
            let t = Instant::now();
            let before = ch.sent_bytes();
            let s = pages::send(ch, &sh.mem, list)?;
            sent.data_pages += s.data_pages;
            sent.zero_pages += s.zero_pages;
            let round = plan.rounds() + 1;
            ch.send(&Message::RoundEnd {
                round,
                pages: s.data_pages + s.zero_pages,
            })
            .and_then(|()| ch.flush())
            .map_err(e)?;
            // A round is over when the destination has it all (its echo), not when the
            // socket took it: the bandwidth is the real one, and no backlog is left for the
            // pause to wait on.
            match ch.recv().map_err(e)? {
                Message::RoundEnd { round: r, .. } if r == round => {}
                Message::Abort(why) => return Err(format!("the destination gave up: {why}")),
                other => return Err(format!("the destination answered {other:?}")),
            }
            plan.record(ch.sent_bytes() - before, t.elapsed());
            list = dirty_pages(vm, &sh.mem)?;
            let converged = match plan.next(list.len() as u64) {
                // Asked for post-copy: the first round is all of memory; the rest follows.
                _ if postcopy => true,
                super::plan::Next::Round => continue,
                super::plan::Next::StopAndCopy => true,
                super::plan::Next::NotConverging => false,
            };
            tracing::info!(
                "migration: {} pre-copy rounds{}, {} pages left for the pause (estimated {:?})",
                plan.rounds(),
                if converged { "" } else { " (not converging)" },
                list.len(),
                plan.estimate(list.len() as u64)
            );
            return Ok((list, converged));
        }
    }

    /// The pages this process has (never-touched pages are zero on the destination too; a
    /// restored VM's memory may still be in its snapshot: then every page, read through the
    /// pager).
    fn present_pages(&self, sh: &Shared) -> Result<Vec<u64>, String> {
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
        Ok(list)
    }

    /// With the vCPUs and devices paused: the machine state, the pages pre-copy carried and
    /// those dirtied since (or, post-copy, their numbers only), the state; then the
    /// destination's word (post-copy: while every missing page goes). The pages sent here,
    /// and when the destination said the VM runs, if later than the commit.
    #[allow(clippy::too_many_arguments)]
    fn send_paused(
        &mut self,
        vm: &Vm,
        sh: &Shared,
        ch: &mut Channel<TcpStream>,
        (paused_devices, handed_over): (&mut Vec<PausedDevice>, &mut Vec<Arc<dyn DiskImage>>),
        committed: &mut bool,
        mut list: Vec<u64>,
        postcopy: bool,
    ) -> Result<(pages::Sent, Option<Instant>), String> {
        let e = |e: keel_migration::Error| e.to_string();
        let mut steps = Steps::default();
        // Devices stop (their requests in flight complete) before the last look at the logs.
        let saved = self.capture_machine(vm, sh, paused_devices)?;
        steps.mark("capture");
        // Shared storage: the destination opens the disks once it has the state; they are
        // flushed and their locks let go of first.
        for slot in &self.disks {
            if let Some(top) = slot.images.last() {
                keel_block::hand_over(top).map_err(|e| format!("disk {}: {e}", top.id()))?;
                handed_over.push(top.clone());
            }
        }
        steps.mark("disks");
        list.extend(dirty_pages(vm, &sh.mem)?);
        list.sort_unstable();
        list.dedup();
        if postcopy {
            for (first_page, count) in ranges(&list) {
                ch.send(&Message::Missing { first_page, count })
                    .map_err(e)?;
            }
            let state = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
            ch.send(&Message::State(state))
                .and_then(|()| ch.flush())
                .map_err(e)?;
            steps.mark("missing list and state");
            tracing::info!("migration: post-copy of {} pages", list.len());
            let done = super::postcopy_send::serve(ch, &sh.mem, &list, committed)?;
            tracing::info!("migration: the pause, step by step: {steps}");
            return Ok(done);
        }
        let sent = pages::send(ch, &sh.mem, list)?;
        let state = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
        ch.send(&Message::State(state)).map_err(e)?;
        ch.flush().map_err(e)?;
        steps.mark("last pages and state");
        match ch.recv().map_err(e)? {
            Message::Ready => steps.mark("destination built"),
            Message::Abort(why) => return Err(format!("the destination refused the VM: {why}")),
            other => return Err(format!("the destination answered {other:?}")),
        }
        // The commit. A destination runs the VM only on this word: until it is written, any
        // failure lets the VM go on here (a frame cut short never decrypts there); once
        // written, this VM never runs again on its own.
        ch.send(&Message::Go).and_then(|()| ch.flush()).map_err(e)?;
        *committed = true;
        match ch.recv().map_err(e)? {
            Message::Resumed => {
                steps.mark("destination resumed");
                tracing::info!("migration: the pause, step by step: {steps}");
                Ok((sent, None))
            }
            other => Err(format!(
                "the destination did not confirm it runs the VM ({other:?})"
            )),
        }
    }
}

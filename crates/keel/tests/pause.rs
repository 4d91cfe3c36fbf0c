//! Pause and resume through the VMM's control socket (issue 5's first verbs): a kit guest
//! that prints a tick ten times a second stops printing while paused and carries on after
//! resume; `info` reports the state. Reported ignored, loudly, without a usable /dev/kvm.

#[allow(dead_code)]
mod support;

use keel_guest_kit::KitImage;
use libtest_mimic::{Arguments, Failed, Trial};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn ctl(socket: &std::path::Path, verb: &str) -> Result<String, Failed> {
    let o = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["ctl", "--api-socket", &socket.display().to_string(), verb])
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!("ctl {verb}: {}", String::from_utf8_lossy(&o.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The number in a "KIT: tick N" line.
fn tick(line: &str) -> Option<u32> {
    line.strip_prefix("KIT: tick ")?.trim().parse().ok()
}

fn pause_resume_test() -> Result<(), Failed> {
    let dir = support::Scratch::new("pause")?;
    let api = dir.path("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "run",
            "--kernel",
            &KitImage::PvhElf.path().display().to_string(),
        ])
        .args([
            "--cmdline",
            "test=ticks secs=60",
            "--memory",
            "64M",
            "--cpus",
            "2",
        ])
        .args([
            "--shutdown-timeout",
            "0",
            "--api-socket",
            &api.display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(n) = tick(&line) {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    let checks = (|| -> Result<String, Failed> {
        let wait_for = |want: u32, within: Duration| -> Result<u32, Failed> {
            let deadline = Instant::now() + within;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(n) if n >= want => return Ok(n),
                    Ok(_) => {}
                    Err(_) => return Err(format!("no tick {want} within {within:?}").into()),
                }
            }
        };
        wait_for(5, Duration::from_secs(20))?;
        let reply = ctl(&api, "pause")?;
        if !reply.contains("paused") {
            return Err(format!("pause answered {reply}").into());
        }
        // Ticks printed before the pause took hold may still be in the pipe.
        std::thread::sleep(Duration::from_millis(200));
        let before: Vec<u32> = rx.try_iter().collect();
        std::thread::sleep(Duration::from_millis(1500));
        let during: Vec<u32> = rx.try_iter().collect();
        if !during.is_empty() {
            return Err(format!("the guest ticked while paused: {during:?}").into());
        }
        let info = ctl(&api, "info")?;
        if !info.contains("\"state\": \"paused\"") {
            return Err(format!("info while paused: {info}").into());
        }
        // Pausing a paused VM is fine; so is resuming.
        ctl(&api, "pause")?;
        let reply = ctl(&api, "resume")?;
        if !reply.contains("running") {
            return Err(format!("resume answered {reply}").into());
        }
        let last = before.last().copied().unwrap_or(5);
        let next = wait_for(last + 3, Duration::from_secs(10))?;
        let info = ctl(&api, "info")?;
        if !info.contains("\"state\": \"running\"") {
            return Err(format!("info after resume: {info}").into());
        }
        Ok(format!(
            "paused after tick {last}; none for 1.5 s; tick {next} after resume"
        ))
    })();
    // SAFETY: kill(2) on the pid of a child we own and have not waited for.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&o.stderr);
    let summary = checks.map_err(|e| format!("{}\n{err}", e.message().unwrap_or_default()))?;
    eprintln!("{summary}");
    if o.status.code() != Some(143) || err.contains("panicked") {
        return Err(format!("status {:?}\n{err}", o.status).into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let trials = vec![Trial::test(
        "pause_stops_the_guest_and_resume_lets_it_go_on",
        pause_resume_test,
    )];
    let host = support::Host::probe();
    let trials = support::skip_all(trials, "pause tests", host.no_kvm.as_deref());
    libtest_mimic::run(&args, trials).exit();
}

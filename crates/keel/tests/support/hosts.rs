//! Two "hosts" on one machine for the migration tests: network namespaces, each with a
//! bridge, a persistent tap on it for a VM, and one end of a veth between the bridges (one L2
//! segment, like two hypervisors on a switch).
#![allow(dead_code)]

use super::console::run_cmd;
use libtest_mimic::Failed;
use std::process::Command;

/// Two namespaces with a bridge each, a veth between the bridges and a persistent tap on
/// each bridge; deleted (with everything in them) on drop.
pub struct Hosts {
    ns: [String; 2],
    /// The /24 both hosts and the guest are on: `10.<net>.2.0`.
    net: u32,
}

impl Hosts {
    pub const TAP: [&'static str; 2] = ["tapA", "tapB"];

    pub fn new() -> Result<Hosts, Failed> {
        // Tests of one binary run side by side: each pair of hosts of its own.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}x{nth}", std::process::id() % 100_000);
        let hosts = Hosts {
            ns: [format!("keelmigA{id}"), format!("keelmigB{id}")],
            net: (std::process::id() + nth * 41) % 200 + 20,
        };
        for ns in &hosts.ns {
            let _ = run_cmd("ip", &["netns", "del", ns]);
            run_cmd("ip", &["netns", "add", ns])?;
        }
        let [a, b] = &hosts.ns;
        run_cmd(
            "ip",
            &[
                "link", "add", "vethA", "netns", a, "type", "veth", "peer", "name", "vethB",
                "netns", b,
            ],
        )?;
        for (i, ns) in hosts.ns.iter().enumerate() {
            let ip = |args: &[&str]| {
                let mut v = vec!["-n", ns.as_str()];
                v.extend_from_slice(args);
                run_cmd("ip", &v)
            };
            let veth = ["vethA", "vethB"][i];
            ip(&["link", "set", "lo", "up"])?;
            ip(&["link", "add", "br0", "type", "bridge"])?;
            ip(&["link", "set", "br0", "up"])?;
            ip(&["link", "set", veth, "master", "br0", "up"])?;
            ip(&["tuntap", "add", "dev", Self::TAP[i], "mode", "tap"])?;
            ip(&["link", "set", Self::TAP[i], "master", "br0", "up"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", hosts.host_ip(i)),
                "dev",
                "br0",
            ])?;
        }
        Ok(hosts)
    }

    pub fn host_ip(&self, i: usize) -> String {
        format!("10.{}.2.{}", self.net, [1, 3][i])
    }

    pub fn guest_ip(&self) -> String {
        format!("10.{}.2.2", self.net)
    }

    /// `cmd args...` run in host `i`'s namespace.
    pub fn exec(&self, i: usize, cmd: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]).arg(cmd);
        c
    }

    pub fn keel(&self, i: usize) -> Command {
        self.exec(i, env!("CARGO_BIN_EXE_keel"))
    }

    /// One `ping` from host `i`: its summary line, or why it failed.
    pub fn ping(&self, i: usize, count: &str) -> Result<String, String> {
        let o = self
            .exec(i, "ping")
            .args(["-c", count, "-W", "5", &self.guest_ip()])
            .output()
            .map_err(|e| format!("ping: {e}"))?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            return Err(format!("ping from host {i} failed: {out}"));
        }
        Ok(out)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = run_cmd("ip", &["netns", "del", ns]);
        }
    }
}

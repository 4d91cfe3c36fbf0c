//! The control protocol of a running Keel VMM (`keel run --api-socket PATH`).
//!
//! One JSON object per line over a Unix stream socket: a [`Request`] in, a [`Response`]
//! out, as many as the client likes on one connection. Kept in its own crate so whatever
//! drives VMMs (the CLI, the daemon) speaks the protocol without linking the VMM.
//!
//! ```text
//! → {"op":"balloon-set","target_bytes":268435456}
//! ← {"ok":true,"result":{"balloon":{"target_bytes":268435456,"actual_bytes":0,...}}}
//! ```

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request or response line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Is the VMM alive?
    Ping,
    /// What the VM is made of and how it is doing.
    Info,
    /// Sets the balloon's target size (memory taken away from the guest).
    BalloonSet { target_bytes: u64 },
    /// The balloon's state and the guest's latest memory statistics.
    BalloonStats,
    /// Stops every vCPU (the guest does not run until `resume`); answers once they have.
    Pause,
    /// Lets a paused guest run again.
    Resume,
    /// Takes a snapshot (pausing the guest meanwhile; it runs again afterwards if it ran
    /// before). File descriptors travel with the request line (SCM_RIGHTS), in this order:
    /// the memory part, the state part, then one new empty file per entry of `overlays`.
    Snapshot(SnapshotRequest),
    /// Moves the VM to another host (`keel receive` there): the connected TCP stream travels
    /// with the request (SCM_RIGHTS). On success the VM runs there and this VMM exits.
    Migrate(MigrateRequest),
}

/// What `migrate` needs besides its connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The pre-shared migration key, hex (the control socket is the host operator's).
    pub key_hex: String,
    /// How long the guest may be paused for the last copy: pre-copy goes on until what is
    /// left fits, at the bandwidth measured.
    pub downtime_ms: u64,
    /// Switch to post-copy after the first round: the VM runs on the destination at once
    /// and pulls what it still lacks (otherwise only when pre-copy does not converge).
    #[serde(default)]
    pub postcopy: bool,
}

/// What `migrate` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateReply {
    /// From the request until the destination said it runs the VM, in microseconds.
    pub total_us: u64,
    /// How long the guest was paused (the copy and the switch-over), in microseconds.
    pub downtime_us: u64,
    /// Bytes sent on the stream (encrypted frames included).
    pub bytes_sent: u64,
    /// Rounds of pages sent (the last one with the guest paused).
    pub rounds: u32,
    /// Pages sent with their bytes, and as zero ranges.
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Whether pre-copy converged (what was left fitted the downtime budget at the
    /// bandwidth measured) rather than running out of rounds.
    #[serde(default)]
    pub converged: bool,
    /// Pages the destination fetched after it started the VM (post-copy), 0 without.
    #[serde(default)]
    pub postcopy_pages: u64,
}

/// What `snapshot` needs besides its files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// For every writable disk: where the VM writes from now on, a new qcow2 overlay over
    /// the disk as the snapshot froze it.
    #[serde(default)]
    pub overlays: Vec<NewOverlay>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOverlay {
    /// Index of the disk (`--disk` order).
    pub disk: usize,
    /// The overlay's host path (the file itself comes with the request), so later
    /// snapshots can name it.
    pub path: PathBuf,
    /// The backing file name written in its header (informational: Keel stacks layers by
    /// the snapshot's own list).
    pub backing_name: PathBuf,
}

/// One file of a disk's chain of images.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub path: PathBuf,
    /// "raw" or "qcow2".
    pub format: String,
}

/// Identity of a file at one moment: if any of it changed, so may the file's contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

/// A disk as the VM uses it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub index: usize,
    pub read_only: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bottom first. The first is the image the VM was started on (which may have a qcow2
    /// backing chain of its own); the others are Keel's overlays; the VM writes the last
    /// (unless `read_only`).
    pub layers: Vec<Layer>,
}

/// A disk as a snapshot froze it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenDisk {
    pub index: usize,
    /// The layers as they were at the snapshot (all read-only from then on), bottom first.
    pub layers: Vec<Layer>,
    /// Each layer's identity once frozen, in the same order.
    pub identities: Vec<FileIdentity>,
}

/// What `snapshot` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The memory and state parts, written and hashed.
    pub parts: Vec<keel_snapshot::Part>,
    pub disks: Vec<FrozenDisk>,
    /// How long the guest was paused, in microseconds.
    pub downtime_us: u64,
    /// Guest memory bytes written (non-zero pages).
    pub memory_data_bytes: u64,
}

/// Whether the guest runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    #[default]
    Running,
    Paused,
}

/// The balloon as the host sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonInfo {
    pub target_bytes: u64,
    /// What the guest driver reports it has given back.
    pub actual_bytes: u64,
    /// Guest memory statistics (name → value), when the driver has sent some.
    pub stats: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// PCI devices, in slot order.
    pub devices: Vec<String>,
    /// Resident set size of the VMM process.
    pub vmm_rss_bytes: u64,
    #[serde(default)]
    pub state: VmState,
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// For a VM restored from a snapshot: how much of its memory has come in on first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_pager: Option<PagerInfo>,
}

/// The memory pager of a restored VM (its memory arrives, checked, chunk by chunk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerInfo {
    /// Page faults served.
    pub faults: u64,
    /// Chunks of the snapshot's memory a fault was the first to need (read and checked).
    pub chunks_loaded: u64,
    /// Chunks the snapshot's memory has.
    pub chunks: u64,
    /// Bytes of non-zero pages copied into guest memory (on faults and by the checker).
    pub bytes_copied: u64,
    /// Time spent serving faults, in microseconds.
    pub busy_us: u64,
    /// How long the checker beside the guest took to check every chunk and fill what the
    /// guest had not touched, in microseconds (`None` while it runs).
    pub checked_in_us: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Pong,
    Info(VmInfo),
    Balloon(BalloonInfo),
    State(VmState),
    Snapshot(SnapshotReply),
    Migrated(MigrateReply),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Reply>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(r: Reply) -> Self {
        Response {
            ok: true,
            result: Some(r),
            error: None,
        }
    }
    pub fn error(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM API socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM sent a malformed reply: {0}")]
    Malformed(String),
    #[error("the VMM closed the connection without replying")]
    Closed,
    #[error("{0}")]
    Refused(String),
}

/// A connection to a VMM's API socket.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// How long to wait for a reply (30 s unless set; `None`: for ever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.writer.set_read_timeout(timeout)?;
        Ok(())
    }

    /// Sends `req` and waits for the reply; a refusal comes back as [`ClientError::Refused`].
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.call_with_fds(req, &[])
    }

    /// Like [`Client::call`], passing `fds` with the request (SCM_RIGHTS).
    pub fn call_with_fds(&mut self, req: &Request, fds: &[RawFd]) -> Result<Reply, ClientError> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let mut line =
            serde_json::to_string(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push('\n');
        if fds.is_empty() {
            self.writer.write_all(line.as_bytes())?;
        } else {
            // The descriptors ride on the first bytes; the rest of a long line follows.
            let sent = self
                .writer
                .send_with_fds(&[line.as_bytes()], fds)
                .map_err(|e| ClientError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
            self.writer
                .write_all(line.as_bytes().get(sent..).unwrap_or_default())?;
        }
        let mut reply = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64).read_line(&mut reply)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        let r: Response =
            serde_json::from_str(&reply).map_err(|e| ClientError::Malformed(e.to_string()))?;
        match (r.ok, r.result, r.error) {
            (true, Some(res), _) => Ok(res),
            (false, _, Some(e)) => Err(ClientError::Refused(e)),
            _ => Err(ClientError::Malformed(reply.trim().to_string())),
        }
    }
}

/// Parses one request line; the error text is what the VMM sends back.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let r = Request::BalloonSet {
            target_bytes: 1 << 28,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"balloon-set","target_bytes":268435456}"#);
        assert_eq!(parse_request(&s), Ok(r));
        assert_eq!(parse_request(r#"{"op":"ping"}"#), Ok(Request::Ping));
        for bad in [
            "",
            "{",
            "[]",
            r#"{"op":"explode"}"#,
            r#"{"op":"balloon-set"}"#,
            r#"{"op":"balloon-set","target_bytes":-1}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
        let resp = Response::error("no balloon");
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"ok":false,"error":"no balloon"}"#
        );
    }
}

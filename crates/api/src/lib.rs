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
use std::os::unix::net::UnixStream;
use std::path::Path;
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Pong,
    Info(VmInfo),
    Balloon(BalloonInfo),
    State(VmState),
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

    /// Sends `req` and waits for the reply; a refusal comes back as [`ClientError::Refused`].
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let mut line =
            serde_json::to_string(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
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

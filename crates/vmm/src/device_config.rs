//! The devices a user asks for on the command line: `--disk`, `--net`, `--vsock`, parsed from
//! `key=value,...` lists with errors that name the flag and the key at fault.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceConfigError {
    #[error("--{flag} '{input}': '{item}' is not key=value")]
    NotKeyValue {
        flag: &'static str,
        input: String,
        item: String,
    },
    #[error("--{flag} '{input}': unknown key '{key}' (known: {known})")]
    UnknownKey {
        flag: &'static str,
        input: String,
        key: String,
        known: String,
    },
    #[error("--{flag} '{input}': '{key}' given twice")]
    Duplicate {
        flag: &'static str,
        input: String,
        key: String,
    },
    #[error("--{flag} '{input}': '{key}' is required")]
    Missing {
        flag: &'static str,
        input: String,
        key: &'static str,
    },
    #[error("--{flag} '{input}': {key}={value}: {why}")]
    BadValue {
        flag: &'static str,
        input: String,
        key: &'static str,
        value: String,
        why: String,
    },
}

struct Kv<'a> {
    flag: &'static str,
    input: &'a str,
    map: BTreeMap<String, String>,
}

impl<'a> Kv<'a> {
    fn parse(
        flag: &'static str,
        input: &'a str,
        known: &[&str],
    ) -> Result<Self, DeviceConfigError> {
        let mut map = BTreeMap::new();
        for item in input.split(',').filter(|s| !s.is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(DeviceConfigError::NotKeyValue {
                    flag,
                    input: input.into(),
                    item: item.into(),
                });
            };
            if !known.contains(&k) {
                return Err(DeviceConfigError::UnknownKey {
                    flag,
                    input: input.into(),
                    key: k.into(),
                    known: known.join(", "),
                });
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(DeviceConfigError::Duplicate {
                    flag,
                    input: input.into(),
                    key: k.into(),
                });
            }
        }
        Ok(Kv { flag, input, map })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    fn required(&self, key: &'static str) -> Result<&str, DeviceConfigError> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .ok_or(DeviceConfigError::Missing {
                flag: self.flag,
                input: self.input.into(),
                key,
            })
    }

    fn bad(&self, key: &'static str, value: &str, why: impl Into<String>) -> DeviceConfigError {
        DeviceConfigError::BadValue {
            flag: self.flag,
            input: self.input.into(),
            key,
            value: value.into(),
            why: why.into(),
        }
    }

    fn on_off(&self, key: &'static str) -> Result<bool, DeviceConfigError> {
        match self.get(key) {
            None => Ok(false),
            Some("on" | "true" | "yes" | "1") => Ok(true),
            Some("off" | "false" | "no" | "0") => Ok(false),
            Some(v) => Err(self.bad(key, v, "use on or off")),
        }
    }
}

/// Disk image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// `--disk path=IMG[,format=raw|qcow2][,readonly=on]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// `None`: detect from the image (qcow2 magic), else raw.
    pub format: Option<DiskFormat>,
    pub read_only: bool,
}

impl DiskConfig {
    pub fn parse(s: &str) -> Result<Self, DeviceConfigError> {
        let kv = Kv::parse("disk", s, &["path", "format", "readonly"])?;
        let format = match kv.get("format") {
            None => None,
            Some("raw") => Some(DiskFormat::Raw),
            Some("qcow2") => Some(DiskFormat::Qcow2),
            Some(v) => return Err(kv.bad("format", v, "use raw or qcow2")),
        };
        Ok(DiskConfig {
            path: kv.required("path")?.into(),
            format,
            read_only: kv.on_off("readonly")?,
        })
    }
}

/// `--net tap=NAME[,mac=52:54:00:..]` (no tap: Keel creates one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: Option<String>,
    /// Validated when the device is built; `None` picks a random local MAC.
    pub mac: Option<String>,
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<Self, DeviceConfigError> {
        let kv = Kv::parse("net", s, &["tap", "mac"])?;
        let tap = kv.get("tap").map(str::to_string);
        if let Some(t) = &tap {
            if t.is_empty() || t.len() > 15 || t.contains('/') || t.contains(char::is_whitespace) {
                return Err(kv.bad("tap", t, "an interface name of 1 to 15 characters"));
            }
        }
        Ok(NetConfig {
            tap,
            mac: kv.get("mac").map(str::to_string),
        })
    }
}

/// `--vsock cid=N[,socket=PATH]`: the guest's context ID and the host-side Unix socket that
/// bridges host ↔ guest connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub socket: Option<PathBuf>,
}

impl VsockConfig {
    pub fn parse(s: &str) -> Result<Self, DeviceConfigError> {
        let kv = Kv::parse("vsock", s, &["cid", "socket"])?;
        let raw = kv.required("cid")?;
        let cid: u32 = raw
            .parse()
            .map_err(|_| kv.bad("cid", raw, "not a number"))?;
        // 0-2 are reserved (hypervisor, local, host); u32::MAX is VMADDR_CID_ANY.
        if cid < 3 || cid == u32::MAX {
            return Err(kv.bad("cid", raw, "guest CIDs are 3 to 4294967294"));
        }
        Ok(VsockConfig {
            cid,
            socket: kv.get("socket").map(PathBuf::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse() {
        assert_eq!(
            DiskConfig::parse("path=/a.img,format=qcow2,readonly=on"),
            Ok(DiskConfig {
                path: "/a.img".into(),
                format: Some(DiskFormat::Qcow2),
                read_only: true
            })
        );
        assert_eq!(DiskConfig::parse("path=x").map(|d| d.format), Ok(None));
        for bad in [
            "",
            "format=raw",
            "path=",
            "path=a,format=vmdk",
            "path=a,readonly=maybe",
            "path=a,path=b",
            "path=a,size=1",
            "/just/a/path",
        ] {
            let e = DiskConfig::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("--disk '"), "{e}");
        }
    }

    #[test]
    fn nets_and_vsock_parse() {
        assert_eq!(
            NetConfig::parse("tap=tap0,mac=52:54:00:00:00:01"),
            Ok(NetConfig {
                tap: Some("tap0".into()),
                mac: Some("52:54:00:00:00:01".into())
            })
        );
        assert_eq!(NetConfig::parse("").map(|n| n.tap), Ok(None));
        assert!(NetConfig::parse("tap=a-very-long-name-0").is_err());
        assert!(NetConfig::parse("tap=a/b").is_err());
        assert_eq!(VsockConfig::parse("cid=3").map(|v| v.cid), Ok(3));
        for bad in ["cid=2", "cid=x", "", "cid=4294967295", "port=3"] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad}");
        }
    }
}

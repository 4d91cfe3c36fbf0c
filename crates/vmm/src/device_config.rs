//! The devices a user asks for on the command line: `--disk`, `--net`, `--vsock`, parsed from
//! `key=value,...` lists with errors that name the flag and the key at fault.

use crate::config::parse_size;
use keel_rate_limiter::{default_burst, BucketConfig, RateLimitConfig};
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

    /// A positive rate or burst: a size (`10M`) for bytes, a plain number for counts.
    fn positive(&self, key: &'static str, size: bool) -> Result<Option<u64>, DeviceConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = if size {
            parse_size(v).map_err(|e| self.bad(key, v, e.to_string()))?
        } else {
            v.trim()
                .parse::<u64>()
                .map_err(|_| self.bad(key, v, "not a whole number"))?
        };
        if n == 0 {
            return Err(self.bad(
                key,
                v,
                "must be at least 1 (leave the key out for no limit)",
            ));
        }
        Ok(Some(n))
    }

    /// A token bucket from `rate` (per second) and an optional `burst` (default: a tenth of
    /// a second's worth).
    fn bucket(
        &self,
        rate: &'static str,
        burst: &'static str,
        size: bool,
    ) -> Result<Option<BucketConfig>, DeviceConfigError> {
        match (self.positive(rate, size)?, self.positive(burst, size)?) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(self.bad(
                burst,
                self.get(burst).unwrap_or_default(),
                format!("a burst needs a rate: add {rate}="),
            )),
            (Some(r), b) => Ok(Some(BucketConfig {
                rate: r,
                size: b.unwrap_or_else(|| default_burst(r)),
                one_time_burst: 0,
            })),
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

/// `--disk path=IMG[,format=raw|qcow2][,readonly=on][,bps=RATE][,iops=N][,bps_burst=SIZE]
/// [,iops_burst=N]`
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// `None`: detect from the image (qcow2 magic), else raw.
    pub format: Option<DiskFormat>,
    pub read_only: bool,
    /// This disk's own limit: data bytes (reads and writes) and requests per second.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

impl DiskConfig {
    /// A disk at `path` with defaults: format detected, read-write, no limit.
    pub fn new(path: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            format: None,
            read_only: false,
            rate_limit: RateLimitConfig::default(),
        }
    }

    pub fn parse(s: &str) -> Result<Self, DeviceConfigError> {
        let kv = Kv::parse(
            "disk",
            s,
            &[
                "path",
                "format",
                "readonly",
                "bps",
                "iops",
                "bps_burst",
                "iops_burst",
            ],
        )?;
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
            rate_limit: RateLimitConfig {
                bandwidth: kv.bucket("bps", "bps_burst", true)?,
                ops: kv.bucket("iops", "iops_burst", false)?,
            },
        })
    }
}

/// `--net tap=NAME[,mac=52:54:00:..][,rx_bps=RATE][,tx_bps=RATE][,rx_pps=N][,tx_pps=N]` and
/// the bursts `rx_bps_burst=`, `tx_bps_burst=`, `rx_pps_burst=`, `tx_pps_burst=` (no tap:
/// Keel creates one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: Option<String>,
    /// Validated when the device is built; `None` picks a random local MAC.
    pub mac: Option<String>,
    /// What the guest may receive: Ethernet bytes and frames per second.
    #[serde(default)]
    pub rx_limit: RateLimitConfig,
    /// What the guest may send.
    #[serde(default)]
    pub tx_limit: RateLimitConfig,
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<Self, DeviceConfigError> {
        let kv = Kv::parse(
            "net",
            s,
            &[
                "tap",
                "mac",
                "rx_bps",
                "tx_bps",
                "rx_pps",
                "tx_pps",
                "rx_bps_burst",
                "tx_bps_burst",
                "rx_pps_burst",
                "tx_pps_burst",
            ],
        )?;
        let tap = kv.get("tap").map(str::to_string);
        if let Some(t) = &tap {
            if t.is_empty() || t.len() > 15 || t.contains('/') || t.contains(char::is_whitespace) {
                return Err(kv.bad("tap", t, "an interface name of 1 to 15 characters"));
            }
        }
        Ok(NetConfig {
            tap,
            mac: kv.get("mac").map(str::to_string),
            rx_limit: RateLimitConfig {
                bandwidth: kv.bucket("rx_bps", "rx_bps_burst", true)?,
                ops: kv.bucket("rx_pps", "rx_pps_burst", false)?,
            },
            tx_limit: RateLimitConfig {
                bandwidth: kv.bucket("tx_bps", "tx_bps_burst", true)?,
                ops: kv.bucket("tx_pps", "tx_pps_burst", false)?,
            },
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
                format: Some(DiskFormat::Qcow2),
                read_only: true,
                ..DiskConfig::new("/a.img")
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
            "path=a,bps=0",
            "path=a,bps=fast",
            "path=a,iops=1.5",
            "path=a,iops=-3",
            "path=a,bps_burst=1M",
            "path=a,iops=10,iops_burst=0",
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
                mac: Some("52:54:00:00:00:01".into()),
                rx_limit: RateLimitConfig::default(),
                tx_limit: RateLimitConfig::default(),
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

    #[test]
    fn rate_limits_parse() {
        let d = DiskConfig::parse("path=a,bps=10M,iops=200,iops_burst=20").unwrap();
        assert_eq!(
            d.rate_limit,
            RateLimitConfig {
                bandwidth: Some(BucketConfig {
                    rate: 10 << 20,
                    size: (10 << 20) / 10,
                    one_time_burst: 0
                }),
                ops: Some(BucketConfig {
                    rate: 200,
                    size: 20,
                    one_time_burst: 0
                }),
            }
        );
        let d = DiskConfig::parse("path=a,bps=4M,bps_burst=64K").unwrap();
        assert_eq!(d.rate_limit.bandwidth.map(|b| b.size), Some(64 << 10));
        assert!(DiskConfig::parse("path=a")
            .unwrap()
            .rate_limit
            .is_unlimited());
        let e = DiskConfig::parse("path=a,bps_burst=1M").unwrap_err();
        assert!(e.to_string().contains("add bps="), "{e}");
        let e = DiskConfig::parse("path=a,bps=0").unwrap_err();
        assert!(e.to_string().contains("at least 1"), "{e}");

        let n = NetConfig::parse("rx_bps=1M,tx_pps=1000,tx_pps_burst=10").unwrap();
        assert_eq!(n.rx_limit.bandwidth.map(|b| b.rate), Some(1 << 20));
        assert_eq!(n.rx_limit.ops, None);
        assert_eq!(n.tx_limit.ops.map(|b| (b.rate, b.size)), Some((1000, 10)));
        assert_eq!(n.tx_limit.bandwidth, None);
        for bad in ["rx_bps=0", "tx_pps=many", "rx_pps_burst=5", "tx_bps=1Q"] {
            let e = NetConfig::parse(bad).expect_err(bad);
            assert!(e.to_string().starts_with("--net '"), "{e}");
        }
    }
}

//! The manifest: what a snapshot holds, parsed strictly.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The `format` field of every Keel snapshot manifest.
pub const FORMAT: &str = "keel-snapshot";
/// The format version this Keel writes and reads.
pub const VERSION: u32 = 1;
/// Most parts a manifest may list.
pub const MAX_PARTS: usize = 4096;

/// How a part's checksum covers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    /// `digest` is the SHA-256 of the file's bytes.
    #[default]
    Whole,
    /// A sparse file of 4 KiB pages (guest memory): `digest` is the BLAKE3 of the concatenated
    /// BLAKE3 digests of each [`crate::CHUNK`] of the file, each over, in order, the index (u64
    /// little-endian) and bytes of every page that is not all zeros: holes cost nothing to
    /// hash, the value does not depend on how the file system stores them, and a reader checks
    /// the chunks on every core (BLAKE3: about 4× SHA-256's speed here, so checking a guest's
    /// memory costs little beside the rest of a restore).
    Pages,
    /// A disk layer (a frozen qcow2 overlay): only its size is checked, because hashing it
    /// would make every snapshot and restore cost as much as reading the disk. Its contents
    /// are guest data, parsed as untrusted input by the qcow2 reader; `digest` is empty.
    DiskLayer,
}

impl PartKind {
    fn is_whole(&self) -> bool {
        *self == PartKind::Whole
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// A file name in the snapshot directory (no path separators).
    pub name: String,
    pub size: u64,
    /// Lower-case hex digest of the part ([`PartKind`] says which, of what).
    pub digest: String,
    #[serde(default, skip_serializing_if = "PartKind::is_whole")]
    pub kind: PartKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub parts: Vec<Part>,
    /// HMAC-SHA256 (hex) over the manifest without this field, when taken with a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac: Option<String>,
}

/// A part name must stay inside the snapshot directory: one plain file name.
pub(crate) fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Malformed(format!(
            "part name {name:?} is not a plain file name"
        )))
    }
}

impl Manifest {
    /// Parses and validates manifest bytes (format, version, part names, checksums' shape).
    pub fn parse(text: &[u8]) -> Result<Manifest> {
        // The version first, so a newer format gets "wrong version", not a parse error.
        #[derive(Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        let head: Head =
            serde_json::from_slice(text).map_err(|e| Error::Malformed(e.to_string()))?;
        if head.format.as_deref() != Some(FORMAT) {
            return Err(Error::Malformed(format!(
                "format is {:?}, not {FORMAT:?}",
                head.format
            )));
        }
        match head.version {
            Some(VERSION) => {}
            Some(found) => return Err(Error::WrongVersion { found }),
            None => return Err(Error::Malformed("no version".into())),
        }
        let m: Manifest =
            serde_json::from_slice(text).map_err(|e| Error::Malformed(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.parts.len() > MAX_PARTS {
            return Err(Error::Malformed(format!(
                "{} parts (at most {MAX_PARTS})",
                self.parts.len()
            )));
        }
        for (i, p) in self.parts.iter().enumerate() {
            check_name(&p.name)?;
            if p.name == crate::MANIFEST {
                return Err(Error::Malformed("a part is named like the manifest".into()));
            }
            if self.parts.iter().take(i).any(|q| q.name == p.name) {
                return Err(Error::Malformed(format!("part {} is listed twice", p.name)));
            }
            if p.kind == PartKind::DiskLayer {
                if !p.digest.is_empty() {
                    return Err(Error::Malformed(format!(
                        "part {}: a disk layer carries no digest",
                        p.name
                    )));
                }
            } else if p.digest.len() != 64
                || !p.digest.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
            {
                return Err(Error::Malformed(format!(
                    "part {}: digest is not 64 lower-case hex digits",
                    p.name
                )));
            }
        }
        Ok(())
    }

    /// The bytes the HMAC covers: the manifest as JSON without its `hmac` field.
    pub(crate) fn signed_bytes(&self) -> Result<Vec<u8>> {
        let mut m = self.clone();
        m.hmac = None;
        serde_json::to_vec(&m).map_err(|e| Error::Malformed(e.to_string()))
    }
}

//! L1/L2 entries and the small LRU cache of table clusters (L2 tables, refcount blocks).

use crate::storage::Storage;
use crate::{Error, Result};

/// Entry flag: the cluster's refcount is exactly 1 (writable in place).
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (v3): the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries (9..=55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Where a guest cluster's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not in this image: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (0 if none), `copied` its COPIED flag.
    Zero { host: u64, copied: bool },
    /// Data at `host` in this file.
    Data { host: u64, copied: bool },
}

/// Decodes an L1 entry: the L2 table's offset (0 when none) and its COPIED flag.
pub(crate) fn decode_l1(
    name: &str,
    entry: u64,
    index: usize,
    cs: u64,
    file_end: u64,
) -> Result<(u64, bool)> {
    let corrupt = |r: String| Error::corrupt(name, format!("L1 entry {index} ({entry:#x}) {r}"));
    if entry & L1_RESERVED != 0 {
        return Err(corrupt("has reserved bits set".into()));
    }
    let off = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if off == 0 {
        if copied {
            return Err(corrupt("points at offset 0 (the header)".into()));
        }
        return Ok((0, false));
    }
    if off % cs != 0 {
        return Err(corrupt(
            "points at an offset that is not cluster-aligned".into(),
        ));
    }
    if off.checked_add(cs).is_none_or(|e| e > file_end) {
        return Err(corrupt(format!(
            "points past the end of the file ({file_end} bytes)"
        )));
    }
    Ok((off, copied))
}

/// Decodes an L2 entry.
pub(crate) fn decode_l2(
    name: &str,
    entry: u64,
    version: u32,
    cs: u64,
    file_end: u64,
) -> Result<Mapping> {
    let corrupt = |r: &str| Error::corrupt(name, format!("L2 entry {entry:#x} {r}"));
    if entry & COMPRESSED != 0 {
        return Err(Error::unsupported(
            name,
            "compressed clusters; convert with `qemu-img convert -O qcow2` (without -c) first",
        ));
    }
    if entry & L2_RESERVED != 0 || (version < 3 && entry & ZERO != 0) {
        return Err(corrupt("has reserved bits set"));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if host != 0 {
        if host % cs != 0 {
            return Err(corrupt("points at an offset that is not cluster-aligned"));
        }
        if host >= file_end {
            return Err(corrupt(&format!(
                "points past the end of the file ({file_end} bytes)"
            )));
        }
    }
    if entry & ZERO != 0 {
        return Ok(Mapping::Zero { host, copied });
    }
    if host == 0 {
        if copied {
            return Err(corrupt("points at offset 0 (the header)"));
        }
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data { host, copied })
}

/// Reads a big-endian u64 at entry `index` of a table cluster (0 outside it).
pub(crate) fn get_entry(table: &[u8], index: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = table.get(index * 8..index * 8 + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

/// Stores a big-endian u64 at entry `index` of a table cluster.
pub(crate) fn set_entry(table: &mut [u8], index: usize, value: u64) {
    if let Some(d) = table.get_mut(index * 8..index * 8 + 8) {
        d.copy_from_slice(&value.to_be_bytes());
    }
}

/// A few whole table clusters, keyed by host offset, least recently used evicted first.
/// Write-through: whoever changes a cached cluster also writes the change to the file.
pub(crate) struct ClusterCache {
    slots: Vec<Slot>,
    capacity: usize,
    tick: u64,
}

struct Slot {
    offset: u64,
    data: Vec<u8>,
    used: u64,
}

impl ClusterCache {
    pub fn new(capacity: usize) -> Self {
        ClusterCache {
            slots: Vec::with_capacity(capacity),
            capacity: capacity.max(1),
            tick: 0,
        }
    }

    /// The cached cluster at `offset`, read from `storage` on a miss. `what` names the table
    /// for error messages.
    pub fn load(
        &mut self,
        storage: &dyn Storage,
        name: &str,
        what: &str,
        offset: u64,
        cs: u64,
    ) -> Result<&mut Vec<u8>> {
        if self.find(offset).is_none() {
            let mut data = vec![0u8; cs as usize];
            storage.read_exact_at(&mut data, offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::corrupt(
                        name,
                        format!("{what} at offset {offset} is cut short by the end of the file"),
                    )
                } else {
                    Error::io(name, "read metadata", offset, e)
                }
            })?;
            self.insert(offset, data);
        }
        let i = self
            .find(offset)
            .ok_or_else(|| Error::corrupt(name, "table cache lost an entry"))?;
        self.tick += 1;
        let slot = self
            .slots
            .get_mut(i)
            .ok_or_else(|| Error::corrupt(name, "table cache lost an entry"))?;
        slot.used = self.tick;
        Ok(&mut slot.data)
    }

    /// Puts a cluster in the cache (a newly written table).
    pub fn insert(&mut self, offset: u64, data: Vec<u8>) {
        self.tick += 1;
        if let Some(i) = self.find(offset) {
            if let Some(s) = self.slots.get_mut(i) {
                s.data = data;
                s.used = self.tick;
            }
            return;
        }
        if self.slots.len() >= self.capacity {
            if let Some(lru) = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i)
            {
                self.slots.swap_remove(lru);
            }
        }
        self.slots.push(Slot {
            offset,
            data,
            used: self.tick,
        });
    }

    fn find(&self, offset: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.offset == offset)
    }
}

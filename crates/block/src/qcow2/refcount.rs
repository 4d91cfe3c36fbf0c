//! Refcounts: the refcount table, refcount blocks (any width from 1 to 64 bits) and cluster
//! allocation.
//!
//! Allocation appends at the end of the file; freed clusters are not reused (their host
//! space is returned by punching holes). Every change is written through to the file at
//! once, in an order that leaves at worst a leaked cluster after a crash: refcount first,
//! then the data, then the table entry that points at it.

use super::header::{MAX_REFTABLE_BYTES, OFF_REFTABLE};
use super::table::{set_entry, ClusterCache};
use crate::storage::Storage;
use crate::{Error, Result};

/// Refcount blocks kept in memory.
const REFBLOCK_CACHE: usize = 4;

/// The file and its name, for I/O with error context.
pub(crate) struct Io<'a> {
    pub storage: &'a dyn Storage,
    pub name: &'a str,
}

impl Io<'_> {
    pub fn write(&self, buf: &[u8], offset: u64, what: &'static str) -> Result<()> {
        self.storage
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(self.name, what, offset, e))
    }
    pub fn corrupt(&self, reason: String) -> Error {
        Error::corrupt(self.name, reason)
    }
}

/// The refcount table and cached blocks of an image opened read-write.
pub(crate) struct Refcounts {
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    order: u32,
    cluster_bits: u32,
    cache: ClusterCache,
}

impl Refcounts {
    /// Loads the refcount table (already checked to lie inside the file).
    pub fn load(
        io: &Io,
        table_offset: u64,
        table_clusters: u32,
        order: u32,
        cluster_bits: u32,
    ) -> Result<Self> {
        let bytes = (u64::from(table_clusters) << cluster_bits) as usize;
        let mut raw = vec![0u8; bytes];
        io.storage
            .read_exact_at(&mut raw, table_offset)
            .map_err(|e| Error::io(io.name, "read refcount table", table_offset, e))?;
        let table = raw
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_be_bytes(a)
            })
            .collect();
        Ok(Refcounts {
            table,
            table_offset,
            table_clusters: u64::from(table_clusters),
            order,
            cluster_bits,
            cache: ClusterCache::new(REFBLOCK_CACHE),
        })
    }

    fn cs(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount entries per block.
    fn per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    /// The table range (for overlap checks).
    pub fn table_range(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters << self.cluster_bits)
    }

    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// The refcount of the cluster at host offset `host`.
    pub fn get(&mut self, io: &Io, host: u64, file_end: u64) -> Result<u64> {
        let cluster = host >> self.cluster_bits;
        let per = self.per_block();
        let Some(block) = self.block_offset(io, cluster / per, file_end)? else {
            return Ok(0);
        };
        let cs = self.cs();
        let data = self
            .cache
            .load(io.storage, io.name, "refcount block", block, cs)?;
        Ok(get_refcount(data, self.order, (cluster % per) as usize))
    }

    /// Sets the refcount of the cluster at `host`, allocating a refcount block (and growing
    /// the table) when there is none yet.
    pub fn set(&mut self, io: &Io, file_end: &mut u64, host: u64, value: u64) -> Result<()> {
        if value > self.max_value() {
            return Err(io.corrupt(format!(
                "refcount of cluster {host:#x} would exceed its {}-bit maximum",
                1u32 << self.order
            )));
        }
        let cluster = host >> self.cluster_bits;
        let per = self.per_block();
        let index = cluster / per;
        let block = match self.block_offset(io, index, *file_end)? {
            Some(b) => b,
            None => self.new_block(io, file_end, index)?,
        };
        let (order, cs) = (self.order, self.cs());
        let data = self
            .cache
            .load(io.storage, io.name, "refcount block", block, cs)?;
        let slot = (cluster % per) as usize;
        let (lo, hi) = set_refcount(data, order, slot, value);
        let bytes = data.get(lo..hi).unwrap_or_default().to_vec();
        io.write(&bytes, block + lo as u64, "write refcount")
    }

    /// The refcount block covering table index `index`, if one is allocated.
    fn block_offset(&self, io: &Io, index: u64, file_end: u64) -> Result<Option<u64>> {
        let Some(&entry) = usize::try_from(index).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        let off = entry & !0x1ff;
        if entry & 0x1ff != 0 || off % self.cs() != 0 {
            return Err(io.corrupt(format!(
                "refcount table entry {index} ({entry:#x}) is not a cluster-aligned offset"
            )));
        }
        if off == 0 {
            return Ok(None);
        }
        if off.checked_add(self.cs()).is_none_or(|e| e > file_end) {
            return Err(io.corrupt(format!(
                "refcount table entry {index} points past the end of the file ({off:#x})"
            )));
        }
        Ok(Some(off))
    }

    /// Allocates a zeroed refcount block for table index `index` at the end of the file.
    fn new_block(&mut self, io: &Io, file_end: &mut u64, index: u64) -> Result<u64> {
        if index >= self.table.len() as u64 {
            self.grow(io, file_end, index + 1)?;
            // Growing allocates blocks of its own: maybe the one wanted here.
            if let Some(b) = self.block_offset(io, index, *file_end)? {
                return Ok(b);
            }
        }
        let cs = self.cs();
        let off = *file_end;
        *file_end = off
            .checked_add(cs)
            .ok_or_else(|| io.corrupt("file offsets overflow".into()))?;
        let per = self.per_block();
        let own = off >> self.cluster_bits;
        let mut data = vec![0u8; cs as usize];
        // A block that covers itself carries its own refcount from the start.
        if own / per == index {
            set_refcount(&mut data, self.order, (own % per) as usize, 1);
        }
        io.write(&data, off, "write refcount block")?;
        self.cache.insert(off, data);
        if own / per != index {
            self.set(io, file_end, off, 1)?;
        }
        self.set_table_entry(io, index, off)?;
        Ok(off)
    }

    fn set_table_entry(&mut self, io: &Io, index: u64, value: u64) -> Result<()> {
        let slot = self
            .table
            .get_mut(index as usize)
            .ok_or_else(|| io.corrupt(format!("refcount table index {index} out of range")))?;
        *slot = value;
        io.write(
            &value.to_be_bytes(),
            self.table_offset + index * 8,
            "write refcount table",
        )
    }

    /// Moves the refcount table to a larger one at the end of the file, covering at least
    /// `min_entries` blocks plus everything this move itself allocates.
    fn grow(&mut self, io: &Io, file_end: &mut u64, min_entries: u64) -> Result<()> {
        let cs = self.cs();
        let per_table_cluster = cs / 8;
        let bytes_per_block = cs * self.per_block();
        let start = *file_end;
        let mut clusters = (self.table_clusters * 2).max(min_entries.div_ceil(per_table_cluster));
        // The new table and the blocks counting it must be covered by the new table too.
        loop {
            let blocks = clusters.div_ceil(self.per_block()) + 2;
            let end = start + (clusters + blocks) * cs;
            let needed = end.div_ceil(bytes_per_block).max(min_entries);
            if needed <= clusters * per_table_cluster {
                break;
            }
            clusters = needed.div_ceil(per_table_cluster);
        }
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                io.name,
                format!(
                    "growing the refcount table past {MAX_REFTABLE_BYTES} bytes (the image file \
                     is too large for its cluster size)"
                ),
            ));
        }
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        *file_end = start + clusters * cs;
        self.table
            .resize((clusters * per_table_cluster) as usize, 0);
        self.table_offset = start;
        self.table_clusters = clusters;
        for c in 0..clusters {
            self.set(io, file_end, start + c * cs, 1)?;
        }
        let mut raw = vec![0u8; (clusters * cs) as usize];
        for (i, e) in self.table.iter().enumerate() {
            set_entry(&mut raw, i, *e);
        }
        io.write(&raw, start, "write refcount table")?;
        io.storage
            .sync_data()
            .map_err(|e| Error::io(io.name, "flush", 0, e))?;
        let mut hdr = start.to_be_bytes().to_vec();
        hdr.extend_from_slice(&(clusters as u32).to_be_bytes());
        io.write(&hdr, OFF_REFTABLE, "write header")?;
        tracing::debug!(
            "{}: refcount table moved to {start:#x} ({clusters} clusters)",
            io.name
        );
        for c in 0..old_clusters {
            self.decref(io, file_end, old_offset + c * cs)?;
        }
        Ok(())
    }

    /// Reserves `n` new clusters at the end of the file with refcount 1; returns the first.
    pub fn alloc(&mut self, io: &Io, file_end: &mut u64, n: u64) -> Result<u64> {
        let cs = self.cs();
        let start = *file_end;
        *file_end = n
            .checked_mul(cs)
            .and_then(|b| start.checked_add(b))
            .ok_or_else(|| io.corrupt("file offsets overflow".into()))?;
        for i in 0..n {
            let host = start + i * cs;
            let old = self.get(io, host, *file_end)?;
            if old != 0 {
                return Err(io.corrupt(format!(
                    "cluster {host:#x} past the end of the file already has refcount {old}"
                )));
            }
            self.set(io, file_end, host, 1)?;
        }
        Ok(start)
    }

    /// Drops one reference to the cluster at `host`; returns the new refcount.
    pub fn decref(&mut self, io: &Io, file_end: &mut u64, host: u64) -> Result<u64> {
        let old = self.get(io, host, *file_end)?;
        if old == 0 {
            return Err(io.corrupt(format!(
                "cluster {host:#x} is in use but its refcount is already 0"
            )));
        }
        self.set(io, file_end, host, old - 1)?;
        Ok(old - 1)
    }
}

/// Refcount `index` of a block with `2^order`-bit entries (big-endian for whole bytes,
/// least significant bits first within a byte for narrower ones, as QEMU stores them).
pub(crate) fn get_refcount(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block.get(index / per_byte).copied().unwrap_or(0);
            u64::from(byte >> ((index % per_byte) * bits)) & ((1u64 << bits) - 1)
        }
        _ => {
            let width = 1usize << (order - 3);
            let mut a = [0u8; 8];
            if let (Some(d), Some(s)) = (
                a.get_mut(8 - width..),
                block.get(index * width..index * width + width),
            ) {
                d.copy_from_slice(s);
            }
            u64::from_be_bytes(a)
        }
    }
}

/// Stores refcount `index`; returns the byte range of `block` that changed.
pub(crate) fn set_refcount(
    block: &mut [u8],
    order: u32,
    index: usize,
    value: u64,
) -> (usize, usize) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let pos = index / per_byte;
            if let Some(b) = block.get_mut(pos) {
                *b = (*b & !mask) | (((value as u8) << shift) & mask);
            }
            (pos, pos + 1)
        }
        _ => {
            let width = 1usize << (order - 3);
            let bytes = value.to_be_bytes();
            let pos = index * width;
            if let (Some(d), Some(s)) = (block.get_mut(pos..pos + width), bytes.get(8 - width..)) {
                d.copy_from_slice(s);
            }
            (pos, pos + width)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_refcount(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} index {i}"
                );
            }
        }
        // QEMU's layout for 1-bit refcounts: index 0 is the least significant bit.
        let mut b = [0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        let mut b = [0u8; 2];
        set_refcount(&mut b, 4, 0, 0x0102);
        assert_eq!(b, [1, 2]);
    }
}

//! qcow2 images, versions 2 and 3.
//!
//! Supported: reads through L1 → L2 → cluster, backing chains (raw or qcow2, up to
//! [`crate::MAX_BACKING_DEPTH`] deep), v3 zero clusters, any refcount width, allocating
//! writes with copy-on-write from the backing file, refcount table growth, header
//! extensions (backing format, feature names; others skipped), clearing autoclear bits on
//! first write as the specification asks.
//!
//! Refused with [`Error::Unsupported`]: encryption, compressed clusters (only when read),
//! external data files, extended L2 entries, non-zlib compression types, unknown
//! incompatible features. Refused read-write with [`Error::NeedsReadOnly`] (read-only is
//! fine): dirty or corrupt-marked images (run `qemu-img check -r all`) and images with
//! internal snapshots (their shared clusters would need copy-on-write).
//!
//! Discard and write-zeroes deallocate whole clusters: the L2 entry becomes "unallocated"
//! when there is no backing file, the v3 zero flag when there is one (so backing data
//! stays hidden); the freed host cluster's refcount drops and, at 0, its space is punched
//! out of the file. Partial clusters: write-zeroes writes zeros, discard leaves them. On a
//! v2 image with a backing file, discard does nothing and write-zeroes writes zeros.
//!
//! Metadata lives under one mutex and is written through at once (so `flush` is an
//! `fdatasync`); guest data I/O to already-allocated clusters and all reads happen outside
//! the lock. New clusters are appended at the end of the file.

mod create;
pub(crate) mod header;
mod refcount;
mod table;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

pub use create::{create_qcow2, create_qcow2_overlay, create_qcow2_overlay_in};

use self::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR};
use self::refcount::{Io, Refcounts};
use self::table::{
    decode_l1, decode_l2, get_entry, set_entry, ClusterCache, Mapping, COPIED, ZERO,
};
use crate::storage::{FileStorage, Storage};
use crate::{
    check_range, device_id, open_image_at_depth, DiskImage, Error, ImageFormat, OpenOptions,
    Result, MAX_BACKING_DEPTH,
};

/// Bytes of L2 tables to keep cached.
const L2_CACHE_BYTES: u64 = 4 << 20;

/// Opens the backing file a header names (or refuses to).
type BackingOpener<'a> = dyn Fn(&Header) -> Result<Option<Arc<dyn DiskImage>>> + 'a;

/// A qcow2 image.
pub struct Qcow2Image {
    storage: Box<dyn Storage>,
    name: String,
    read_only: bool,
    version: u32,
    size: u64,
    cluster_bits: u32,
    l1_offset: u64,
    l1_bytes: u64,
    backing: Option<Arc<dyn DiskImage>>,
    meta: Mutex<Meta>,
}

/// Mutable metadata, under the image's mutex.
struct Meta {
    l1: Vec<u64>,
    l2_cache: ClusterCache,
    /// Present when opened read-write.
    refcounts: Option<Refcounts>,
    /// Where the next cluster is allocated: the file's end rounded up to a cluster.
    file_end: u64,
}

/// A run of a request that maps to one kind of place.
struct Extent {
    pos: usize,
    len: usize,
    kind: Source,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Zero,
    Backing,
    Host(u64),
}

impl Qcow2Image {
    /// Opens a qcow2 image held in `storage` (e.g. [`crate::storage::MemStorage`]). Images
    /// with a backing file are refused ([`Error::BackingNotAllowed`]): there is no directory
    /// to resolve it against. Use [`crate::open_image`] for files.
    pub fn open_storage(storage: Box<dyn Storage>, name: &str, read_only: bool) -> Result<Self> {
        Self::open_inner(
            storage,
            name.to_string(),
            read_only,
            &|h: &Header| match &h.backing_file {
                None => Ok(None),
                Some(b) => Err(Error::BackingNotAllowed {
                    image: name.to_string(),
                    backing: String::from_utf8_lossy(b).into_owned(),
                }),
            },
        )
    }

    /// Opens the qcow2 overlay in `storage` over `backing`, an image the caller already
    /// holds, whatever backing file name the header records (it must record one).
    pub(crate) fn open_over(
        storage: Box<dyn Storage>,
        name: String,
        read_only: bool,
        backing: Arc<dyn DiskImage>,
    ) -> Result<Self> {
        let image = name.clone();
        Self::open_inner(
            storage,
            name,
            read_only,
            &|h: &Header| match &h.backing_file {
                Some(_) => Ok(Some(backing.clone())),
                None => Err(Error::InvalidArgument(format!(
                    "{image}: not an overlay (its header names no backing file)"
                ))),
            },
        )
    }

    pub(crate) fn open_file(
        storage: FileStorage,
        path: &Path,
        options: &OpenOptions,
        depth: usize,
    ) -> Result<Self> {
        let name = path.display().to_string();
        let open_backing = |h: &Header| -> Result<Option<Arc<dyn DiskImage>>> {
            let Some(raw) = &h.backing_file else {
                return Ok(None);
            };
            if depth + 1 > MAX_BACKING_DEPTH {
                return Err(Error::BackingChainTooDeep {
                    image: name.clone(),
                    max: MAX_BACKING_DEPTH,
                });
            }
            if raw.starts_with(b"json:") {
                return Err(Error::unsupported(
                    &name,
                    "a json: backing file specification",
                ));
            }
            let backing = Path::new(OsStr::from_bytes(raw));
            let resolved = match (backing.is_relative(), path.parent()) {
                (true, Some(dir)) => dir.join(backing),
                _ => backing.to_path_buf(),
            };
            let opts = OpenOptions {
                format: h.backing_format,
                read_only: true,
                direct: options.direct,
            };
            open_image_at_depth(&resolved, &opts, depth + 1)
                .map(Some)
                .map_err(|e| match e {
                    // Keep one level of context: the deepest failure already names its file.
                    e @ (Error::Backing { .. } | Error::BackingChainTooDeep { .. }) => e,
                    e => Error::Backing {
                        image: name.clone(),
                        source: Box::new(e),
                    },
                })
        };
        Self::open_inner(
            Box::new(storage),
            name.clone(),
            options.read_only,
            &open_backing,
        )
    }

    fn open_inner(
        storage: Box<dyn Storage>,
        name: String,
        read_only: bool,
        open_backing: &BackingOpener,
    ) -> Result<Self> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io(&name, "size query", 0, e))?;
        let h = Header::read(storage.as_ref(), &name, file_len)?;
        if !read_only {
            let refuse = |reason: &str| Error::NeedsReadOnly {
                image: name.clone(),
                reason: reason.to_string(),
            };
            if h.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(refuse(
                    "it was not closed cleanly (dirty bit set); repair it with \
                     `qemu-img check -r all` first, or open it read-only",
                ));
            }
            if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(refuse(
                    "QEMU marked it corrupt; repair it with `qemu-img check -r all` first, or \
                     open it read-only",
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(refuse(&format!(
                    "it has {} internal snapshot(s), which writes would have to copy on write \
                     (not supported); delete them with `qemu-img snapshot -d`, or open it \
                     read-only",
                    h.nb_snapshots
                )));
            }
        }
        let cs = h.cluster_size();
        let file_end = file_len.next_multiple_of(cs);
        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        storage
            .read_exact_at(&mut raw, h.l1_table_offset)
            .map_err(|e| Error::io(&name, "read L1 table", h.l1_table_offset, e))?;
        let l1 = (0..h.l1_size as usize)
            .map(|i| get_entry(&raw, i))
            .collect();
        let refcounts = if read_only {
            None
        } else {
            let io = Io {
                storage: storage.as_ref(),
                name: &name,
            };
            let r = Refcounts::load(
                &io,
                h.refcount_table_offset,
                h.refcount_table_clusters,
                h.refcount_order,
                h.cluster_bits,
            )?;
            if h.autoclear_features != 0 {
                // Whatever those bits vouch for (bitmaps, ...) we do not keep up to date.
                io.write(&0u64.to_be_bytes(), OFF_AUTOCLEAR, "write header")?;
            }
            Some(r)
        };
        let backing = open_backing(&h)?;
        let l2_slots = (L2_CACHE_BYTES / cs).clamp(4, 64) as usize;
        Ok(Qcow2Image {
            storage,
            name,
            read_only,
            version: h.version,
            size: h.size,
            cluster_bits: h.cluster_bits,
            l1_offset: h.l1_table_offset,
            l1_bytes,
            backing,
            meta: Mutex::new(Meta {
                l1,
                l2_cache: ClusterCache::new(l2_slots),
                refcounts,
                file_end,
            }),
        })
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Arc<dyn DiskImage>> {
        self.backing.as_ref()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self) -> Io<'_> {
        Io {
            storage: self.storage.as_ref(),
            name: &self.name,
        }
    }

    fn l1_index(&self, guest: u64) -> usize {
        (guest >> (2 * self.cluster_bits - 3)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((self.cluster_size() / 8) - 1)) as usize
    }

    /// Where the cluster holding guest offset `guest` lives.
    fn translate(&self, meta: &mut Meta, guest: u64) -> Result<Mapping> {
        let cs = self.cluster_size();
        let i = self.l1_index(guest);
        let entry = *meta.l1.get(i).ok_or_else(|| {
            Error::corrupt(&self.name, format!("offset {guest} is beyond the L1 table"))
        })?;
        let (l2, _) = decode_l1(&self.name, entry, i, cs, meta.file_end)?;
        if l2 == 0 {
            return Ok(Mapping::Unallocated);
        }
        let table = meta
            .l2_cache
            .load(self.storage.as_ref(), &self.name, "L2 table", l2, cs)?;
        let entry = get_entry(table, self.l2_index(guest));
        decode_l2(&self.name, entry, self.version, cs, meta.file_end)
    }

    /// Splits `[offset, offset+len)` into runs by where their data is.
    fn plan(&self, offset: u64, len: usize) -> Result<Vec<Extent>> {
        let cs = self.cluster_size();
        let mut meta = self.lock();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let guest = offset + pos as u64;
            let within = guest & (cs - 1);
            let n = (cs - within).min((len - pos) as u64) as usize;
            let kind = match self.translate(&mut meta, guest)? {
                Mapping::Unallocated if self.backing.is_some() => Source::Backing,
                Mapping::Unallocated | Mapping::Zero { .. } => Source::Zero,
                Mapping::Data { host, .. } => Source::Host(host + within),
            };
            match out.last_mut() {
                Some(last)
                    if match (last.kind, kind) {
                        (Source::Host(a), Source::Host(b)) => a + last.len as u64 == b,
                        (a, b) => a == b,
                    } =>
                {
                    last.len += n
                }
                _ => out.push(Extent { pos, len: n, kind }),
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads guest bytes from the backing file; past its end (or without one) zeros.
    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(guest).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            b.read_at(head, guest)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                image: self.name.clone(),
            });
        }
        check_range(&self.name, offset, len, self.size)
    }

    /// Guest data must never land on the header, the L1 table or the refcount table.
    fn check_overlap(&self, meta: &Meta, host: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut regions = vec![
            (0, cs, "header"),
            (self.l1_offset, self.l1_bytes, "L1 table"),
        ];
        if let Some(r) = &meta.refcounts {
            let (o, l) = r.table_range();
            regions.push((o, l, "refcount table"));
        }
        for (start, rlen, what) in regions {
            if host < start.saturating_add(rlen) && start < host.saturating_add(len) {
                return Err(Error::corrupt(
                    &self.name,
                    format!("a data cluster at {host:#x} overlaps the {what}"),
                ));
            }
        }
        Ok(())
    }

    fn alloc(&self, meta: &mut Meta, n: u64) -> Result<u64> {
        let io = self.io();
        let Meta {
            refcounts,
            file_end,
            ..
        } = meta;
        let r = refcounts.as_mut().ok_or_else(|| Error::ReadOnly {
            image: self.name.clone(),
        })?;
        r.alloc(&io, file_end, n)
    }

    /// Drops a reference to a data cluster; punches its space out when it is free.
    fn release(&self, meta: &mut Meta, host: u64) -> Result<()> {
        let io = self.io();
        let Meta {
            refcounts,
            file_end,
            ..
        } = meta;
        let Some(r) = refcounts.as_mut() else {
            return Ok(());
        };
        if r.decref(&io, file_end, host)? == 0 {
            let cs = self.cluster_size();
            if let Err(e) = self.storage.punch_hole(host, cs) {
                tracing::debug!("{}: punching freed cluster {host:#x}: {e}", self.name);
            }
        }
        Ok(())
    }

    /// Points the L2 entry for `guest` at `entry`, allocating the L2 table if needed.
    fn set_l2(&self, meta: &mut Meta, guest: u64, entry: u64) -> Result<()> {
        let cs = self.cluster_size();
        let i = self.l1_index(guest);
        let l1e = *meta.l1.get(i).ok_or_else(|| {
            Error::corrupt(&self.name, format!("offset {guest} is beyond the L1 table"))
        })?;
        let (l2, copied) = decode_l1(&self.name, l1e, i, cs, meta.file_end)?;
        let j = self.l2_index(guest);
        let io = self.io();
        if l2 == 0 {
            let new = self.alloc(meta, 1)?;
            let mut table = vec![0u8; cs as usize];
            set_entry(&mut table, j, entry);
            io.write(&table, new, "write L2 table")?;
            meta.l2_cache.insert(new, table);
            let l1e = new | COPIED;
            if let Some(slot) = meta.l1.get_mut(i) {
                *slot = l1e;
            }
            return io.write(
                &l1e.to_be_bytes(),
                self.l1_offset + i as u64 * 8,
                "write L1",
            );
        }
        if !copied {
            return Err(Error::unsupported(
                &self.name,
                "writing through an L2 table shared with an internal snapshot",
            ));
        }
        let table = meta
            .l2_cache
            .load(self.storage.as_ref(), &self.name, "L2 table", l2, cs)?;
        set_entry(table, j, entry);
        io.write(&entry.to_be_bytes(), l2 + j as u64 * 8, "write L2 entry")
    }

    /// Writes `data` (inside one cluster) at guest offset `guest`.
    fn write_chunk(&self, data: &[u8], guest: u64) -> Result<()> {
        let cs = self.cluster_size();
        let within = guest & (cs - 1);
        let mut meta = self.lock();
        let mapping = self.translate(&mut meta, guest)?;
        if let Mapping::Data { host, copied: true } = mapping {
            self.check_overlap(&meta, host, cs)?;
            drop(meta);
            return self
                .storage
                .write_all_at(data, host + within)
                .map_err(|e| Error::io(&self.name, "write", host + within, e));
        }
        // Allocating write: under the lock, so two writers cannot both allocate the cluster.
        let reuse = match mapping {
            Mapping::Data { .. }
            | Mapping::Zero {
                copied: false,
                host: 1..,
            } => {
                return Err(Error::unsupported(
                    &self.name,
                    "writing to a cluster shared with an internal snapshot",
                ))
            }
            Mapping::Zero { host, .. } if host != 0 => Some(host),
            _ => None,
        };
        let cluster_start = guest - within;
        let mut full;
        let whole: &[u8] = if data.len() as u64 == cs {
            data
        } else {
            full = vec![0u8; cs as usize];
            if mapping == Mapping::Unallocated {
                self.read_backing(&mut full, cluster_start)?;
            }
            let dst = full
                .get_mut(within as usize..within as usize + data.len())
                .ok_or_else(|| Error::InvalidArgument("write crosses a cluster".into()))?;
            dst.copy_from_slice(data);
            &full
        };
        let host = match reuse {
            Some(h) => h,
            None => self.alloc(&mut meta, 1)?,
        };
        self.check_overlap(&meta, host, cs)?;
        self.storage
            .write_all_at(whole, host)
            .map_err(|e| Error::io(&self.name, "write", host, e))?;
        self.set_l2(&mut meta, guest, host | COPIED)
    }

    /// Makes the whole cluster at `guest` read as zeros by deallocating it. Returns false
    /// when this image cannot express that (v2 with a backing file).
    fn deallocate_cluster(&self, guest: u64) -> Result<bool> {
        let has_backing = self.backing.is_some();
        let new_entry = match (has_backing, self.version) {
            (false, _) => 0,
            (true, 3..) => ZERO,
            (true, _) => return Ok(false),
        };
        let mut meta = self.lock();
        let mapping = self.translate(&mut meta, guest)?;
        let old_host = match mapping {
            Mapping::Unallocated if !has_backing => return Ok(true),
            Mapping::Zero { host: 0, .. } => return Ok(true),
            Mapping::Unallocated => None,
            Mapping::Zero { host, .. } | Mapping::Data { host, .. } => Some(host),
        };
        self.set_l2(&mut meta, guest, new_entry)?;
        if let Some(host) = old_host {
            self.release(&mut meta, host)?;
        }
        Ok(true)
    }

    /// Applies `whole` to every whole cluster of `[offset, offset+len)` and `part` to the
    /// partial clusters at either end.
    fn for_clusters(
        &self,
        offset: u64,
        len: u64,
        mut whole: impl FnMut(u64) -> Result<()>,
        mut part: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut guest = offset;
        while guest < end {
            let within = guest & (cs - 1);
            let n = (cs - within).min(end - guest);
            if n == cs {
                whole(guest)?;
            } else {
                part(guest, n)?;
            }
            guest += n;
        }
        Ok(())
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, offset, buf.len() as u64, self.size)?;
        for e in self.plan(offset, buf.len())? {
            let Some(dst) = buf.get_mut(e.pos..e.pos + e.len) else {
                continue;
            };
            match e.kind {
                Source::Zero => dst.fill(0),
                Source::Backing => self.read_backing(dst, offset + e.pos as u64)?,
                Source::Host(host) => {
                    let n = self
                        .storage
                        .read_full(dst, host)
                        .map_err(|err| Error::io(&self.name, "read", host, err))?;
                    // A last cluster the file ends inside of: the rest reads as zeros.
                    if let Some(rest) = dst.get_mut(n..) {
                        rest.fill(0);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        let mut pos = 0usize;
        let cs = self.cluster_size();
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let n = (cs - (guest & (cs - 1))).min((buf.len() - pos) as u64) as usize;
            let chunk = buf.get(pos..pos + n).unwrap_or_default();
            self.write_chunk(chunk, guest)?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Metadata is written through when it changes: an fdatasync makes both durable.
        self.storage
            .sync_data()
            .map_err(|e| Error::io(&self.name, "flush", 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.for_clusters(
            offset,
            len,
            |guest| self.deallocate_cluster(guest).map(|_| ()),
            |_, _| Ok(()),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        let zeros = vec![0u8; self.cluster_size() as usize];
        self.for_clusters(
            offset,
            len,
            |guest| {
                if self.deallocate_cluster(guest)? {
                    Ok(())
                } else {
                    self.write_chunk(&zeros, guest)
                }
            },
            |guest, n| self.write_chunk(zeros.get(..n as usize).unwrap_or_default(), guest),
        )
    }

    fn lock_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.storage.raw_fd()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        device_id(self.storage.identity(), &self.name)
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }
}

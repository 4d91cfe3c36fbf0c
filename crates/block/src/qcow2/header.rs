//! The qcow2 header (v2 and v3) and its extensions: parsing, validation, encoding.

use crate::storage::Storage;
use crate::{Error, ImageFormat, Result, QCOW2_MAGIC};

/// v2 header length; v3 headers are at least [`V3_HEADER_LEN`].
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// The fixed part of a v3 header.
pub(crate) const V3_HEADER_LEN: u32 = 104;
/// QEMU's limit on the L1 table (bytes).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (bytes).
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the backing file name.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

/// Byte offsets of header fields we write after creation.
pub(crate) const OFF_REFTABLE: u64 = 48;
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension types.
pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// A parsed, validated qcow2 header.
#[derive(Clone, Debug, Default)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    /// The backing file name exactly as recorded (bytes: it is a host path).
    pub backing_file: Option<Vec<u8>>,
    /// From the backing-format extension, if present.
    pub backing_format: Option<ImageFormat>,
    /// Feature name table: (type, bit) → name, for messages.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Reads and validates the header of the image in `storage` (`file_len` bytes long).
    pub fn read(storage: &dyn Storage, name: &str, file_len: u64) -> Result<Header> {
        let corrupt = |r: String| Error::corrupt(name, r);
        let mut fixed = [0u8; V3_HEADER_LEN as usize];
        let n = storage
            .read_full(&mut fixed, 0)
            .map_err(|e| Error::io(name, "read header", 0, e))?;
        if n < 4 || fixed.get(..4) != Some(&QCOW2_MAGIC[..]) {
            return Err(Error::WrongFormat {
                image: name.into(),
                expected: "qcow2",
                reason: "the file does not start with the qcow2 magic".into(),
            });
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                name,
                format!("qcow2 version {version} (only versions 2 and 3 are supported)"),
            ));
        }
        let need = if version == 2 {
            V2_HEADER_LEN
        } else {
            V3_HEADER_LEN
        };
        if (n as u64) < u64::from(need) {
            return Err(corrupt(format!(
                "the file is {file_len} bytes, shorter than a version {version} header ({need} bytes)"
            )));
        }
        let mut h = Header {
            version,
            cluster_bits: be32(&fixed, 20),
            size: be64(&fixed, 24),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            refcount_order: 4,
            ..Header::default()
        };
        let backing_offset = be64(&fixed, 8);
        let backing_size = be32(&fixed, 16);
        let crypt_method = be32(&fixed, 32);
        let mut header_length = V2_HEADER_LEN;
        if version == 3 {
            h.incompatible_features = be64(&fixed, 72);
            h.autoclear_features = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            header_length = be32(&fixed, 100);
        }

        if !(9..=21).contains(&h.cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits is {} (valid: 9 to 21, i.e. 512 bytes to 2 MiB clusters)",
                h.cluster_bits
            )));
        }
        let cs = h.cluster_size();
        if version == 3
            && (header_length < V3_HEADER_LEN
                || header_length % 8 != 0
                || u64::from(header_length) > cs)
        {
            return Err(corrupt(format!(
                "header_length {header_length} (must be a multiple of 8 between 104 and the \
                 cluster size {cs})"
            )));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!(
                "refcount_order {} (at most 6: 64-bit refcounts)",
                h.refcount_order
            )));
        }
        if crypt_method != 0 {
            return Err(Error::unsupported(
                name,
                format!(
                    "encryption (method {crypt_method}); decrypt it with `qemu-img convert` first"
                ),
            ));
        }

        // The rest of cluster 0: compression type byte, extensions, backing file name.
        let head_len = cs.min(file_len) as usize;
        let mut head = vec![0u8; head_len];
        storage
            .read_exact_at(&mut head, 0)
            .map_err(|e| Error::io(name, "read header cluster", 0, e))?;
        if version == 3 && header_length > V3_HEADER_LEN {
            let compression_type = head.get(104).copied().unwrap_or(0);
            if compression_type != 0 {
                return Err(Error::unsupported(
                    name,
                    format!("compression type {compression_type} (only zlib images can be read)"),
                ));
            }
        }
        h.check_features_after_extensions(name, &head, header_length, backing_offset, cs)?;

        if backing_offset != 0 || backing_size != 0 {
            if backing_size == 0 || backing_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name is {backing_size} bytes (1 to {MAX_BACKING_NAME} allowed)"
                )));
            }
            let end = backing_offset.checked_add(u64::from(backing_size));
            let Some(bytes) = end
                .filter(|&e| e <= head_len as u64 && backing_offset >= u64::from(header_length))
                .and_then(|e| head.get(backing_offset as usize..e as usize))
            else {
                return Err(corrupt(format!(
                    "backing file name at offset {backing_offset} ({backing_size} bytes) is \
                     outside the header cluster"
                )));
            };
            h.backing_file = Some(bytes.to_vec());
        }

        h.validate_tables(name, file_len)?;
        Ok(h)
    }

    /// Walks the header extensions, then judges the incompatible feature bits (whose names
    /// the feature table extension may give).
    fn check_features_after_extensions(
        &mut self,
        name: &str,
        head: &[u8],
        header_length: u32,
        backing_offset: u64,
        cs: u64,
    ) -> Result<()> {
        let corrupt = |r: String| Error::corrupt(name, r);
        // Extensions end where the backing file name starts, or at the cluster's end.
        let end = if backing_offset != 0 {
            backing_offset.min(cs)
        } else {
            cs
        }
        .min(head.len() as u64) as usize;
        let mut off = header_length as usize;
        while off + 8 <= end {
            let ty = be32(head, off);
            let len = be32(head, off + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let data_start = off + 8;
            let data_end = data_start.saturating_add(len);
            let Some(data) = head.get(data_start..data_end).filter(|_| data_end <= end) else {
                return Err(corrupt(format!(
                    "header extension {ty:#x} at offset {off} ({len} bytes) runs past the end \
                     of the header area"
                )));
            };
            match ty {
                EXT_BACKING_FORMAT => {
                    let fmt = String::from_utf8_lossy(data);
                    let fmt = fmt.trim_end_matches('\0');
                    self.backing_format = Some(ImageFormat::from_name(fmt).ok_or_else(|| {
                        Error::unsupported(
                            name,
                            format!("backing file format {fmt:?} (raw and qcow2 are supported)"),
                        )
                    })?);
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let (ty, bit) = (entry.first().copied(), entry.get(1).copied());
                        let text = entry.get(2..).unwrap_or_default();
                        let text = text.split(|&b| b == 0).next().unwrap_or_default();
                        if let (Some(ty), Some(bit)) = (ty, bit) {
                            self.feature_names.push((
                                ty,
                                bit,
                                String::from_utf8_lossy(text).into_owned(),
                            ));
                        }
                    }
                }
                EXT_CRYPTO => {
                    return Err(Error::unsupported(
                        name,
                        "LUKS encryption; decrypt it with `qemu-img convert` first",
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(Error::unsupported(
                        name,
                        "external data file; convert with `qemu-img convert -O qcow2` first",
                    ))
                }
                // Bitmaps and anything newer: skip (autoclear bits are cleared on write).
                _ => {}
            }
            off = data_start.saturating_add(len.next_multiple_of(8));
        }

        let inc = self.incompatible_features;
        let refused = [
            (
                INCOMPAT_DATA_FILE,
                "external data file; convert with `qemu-img convert -O qcow2` first",
            ),
            (
                INCOMPAT_COMPRESSION,
                "non-zlib compression type; convert with `qemu-img convert -O qcow2` first",
            ),
            (
                INCOMPAT_EXTL2,
                "extended L2 entries (subclusters); convert with `qemu-img convert -O qcow2` first",
            ),
        ];
        for (bit, what) in refused {
            if inc & bit != 0 {
                return Err(Error::unsupported(name, what));
            }
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        let unknown = inc & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    match self
                        .feature_names
                        .iter()
                        .find(|(t, fb, _)| *t == 0 && *fb == b)
                    {
                        Some((_, _, n)) => format!("bit {b} ({n})"),
                        None => format!("bit {b}"),
                    }
                })
                .collect();
            return Err(Error::unsupported(
                name,
                format!(
                    "unknown incompatible feature {} (written by a newer QEMU?)",
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Size, L1 and refcount table against each other and the file.
    fn validate_tables(&self, name: &str, file_len: u64) -> Result<()> {
        let corrupt = |r: String| Error::corrupt(name, r);
        let cs = self.cluster_size();
        if self.size > i64::MAX as u64 {
            return Err(corrupt(format!(
                "virtual size {} is larger than 2^63",
                self.size
            )));
        }
        let l2_entries = cs / 8;
        let bytes_per_l1 = cs * l2_entries;
        let needed_l1 = self.size.div_ceil(bytes_per_l1);
        let l1_bytes = u64::from(self.l1_size) * 8;
        if u64::from(self.l1_size) < needed_l1 {
            return Err(corrupt(format!(
                "L1 table has {} entries, too few for a {}-byte disk ({needed_l1} needed)",
                self.l1_size, self.size
            )));
        }
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {l1_bytes} bytes (at most {MAX_L1_BYTES})"
            )));
        }
        if self.l1_size > 0 {
            check_table(
                name,
                "L1 table",
                self.l1_table_offset,
                l1_bytes,
                cs,
                file_len,
            )?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table of {} clusters (1 to {} allowed)",
                self.refcount_table_clusters,
                MAX_REFTABLE_BYTES / cs
            )));
        }
        check_table(
            name,
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > 65536 {
            return Err(corrupt(format!(
                "{} internal snapshots (at most 65536)",
                self.nb_snapshots
            )));
        }
        Ok(())
    }

    /// Encodes a fresh v3 header into `buf` (which is a whole cluster).
    pub fn encode_v3(&self, buf: &mut [u8], backing_name_offset: u64, backing_name_len: u32) {
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(d) = buf.get_mut(off..off + bytes.len()) {
                d.copy_from_slice(bytes);
            }
        };
        put(0, &QCOW2_MAGIC);
        put(4, &3u32.to_be_bytes());
        put(8, &backing_name_offset.to_be_bytes());
        put(16, &backing_name_len.to_be_bytes());
        put(20, &self.cluster_bits.to_be_bytes());
        put(24, &self.size.to_be_bytes());
        put(32, &0u32.to_be_bytes());
        put(36, &self.l1_size.to_be_bytes());
        put(40, &self.l1_table_offset.to_be_bytes());
        put(48, &self.refcount_table_offset.to_be_bytes());
        put(56, &self.refcount_table_clusters.to_be_bytes());
        put(60, &0u32.to_be_bytes());
        put(64, &0u64.to_be_bytes());
        put(72, &0u64.to_be_bytes());
        put(80, &0u64.to_be_bytes());
        put(88, &0u64.to_be_bytes());
        put(96, &self.refcount_order.to_be_bytes());
        put(100, &V3_HEADER_LEN.to_be_bytes());
    }
}

/// A table must start on a cluster boundary after the header cluster and end inside the file.
fn check_table(
    name: &str,
    what: &str,
    offset: u64,
    bytes: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    let end = offset.checked_add(bytes);
    if offset == 0 || offset % cs != 0 || end.is_none_or(|e| e > file_len) {
        return Err(Error::corrupt(
            name,
            format!(
                "{what} at offset {offset} ({bytes} bytes) is not a cluster-aligned range \
                 inside the {file_len}-byte file"
            ),
        ));
    }
    Ok(())
}

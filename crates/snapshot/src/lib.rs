//! The on-disk snapshot container (`docs/snapshot-format.md`): a directory holding the
//! snapshot's parts (VM config, vCPU and device state, guest memory, ...) as files, and a
//! manifest, `snapshot.json`, naming each part with its size and SHA-256, under a format
//! version and, when the snapshot was taken with a key, an HMAC-SHA256 over the manifest.
//!
//! A snapshot is untrusted input: [`Snapshot::open`] bounds the manifest's size, parses it
//! strictly, refuses part names that could leave the directory, and checks every part's size
//! and checksum (and the HMAC) before anything in it is used. Each way a snapshot can be bad
//! has its own [`Error`] variant, so the CLI can say exactly what is wrong.

mod manifest;

pub use manifest::{Manifest, Part, PartKind, FORMAT, VERSION};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The manifest's file name in a snapshot directory.
pub const MANIFEST: &str = "snapshot.json";
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a Keel snapshot (no {MANIFEST})")]
    NotASnapshot(PathBuf),
    #[error("snapshot manifest is malformed: {0}")]
    Malformed(String),
    #[error(
        "snapshot format version {found} is not supported (this Keel reads version {VERSION})"
    )]
    WrongVersion { found: u32 },
    #[error("snapshot part {name} is truncated: {actual} bytes, the manifest says {expected}")]
    Truncated {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("snapshot part {name} is corrupted: its SHA-256 does not match the manifest")]
    Corrupted { name: String },
    #[error("snapshot part {name} is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("the snapshot was tampered with: its HMAC does not match the key")]
    Tampered,
    #[error("the snapshot is authenticated: give the key it was taken with (--snapshot-key)")]
    KeyRequired,
    #[error("the snapshot is not authenticated, but a key was given: refusing it")]
    NotAuthenticated,
    #[error("the snapshot key is empty")]
    EmptyKey,
}

pub type Result<T> = std::result::Result<T, Error>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A 32-byte digest as lower-case hex.
pub fn digest_hex(d: &[u8; 32]) -> String {
    hex(d)
}

/// A 32-byte digest from 64 hex digits (`None` for anything else).
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    unhex(s)?.try_into().ok()
}

/// The SHA-256 and length of a file, read in blocks.
fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or(&[]));
        len += n as u64;
    }
    Ok((hex(&h.finalize()), len))
}

/// The lower-case hex SHA-256 of `bytes` (a [`PartKind::Whole`] checksum).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Page size of [`PartKind::Pages`] parts.
pub const PAGE: usize = 4096;
/// A [`PartKind::Pages`] part is hashed in chunks of this many bytes (so a reader can check
/// them on every core at once: a guest's data is often in a few places, e.g. Linux's page
/// array, so chunks are small and handed out one at a time).
pub const CHUNK: u64 = 4 << 20;

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Whether `page` (at most [`PAGE`] bytes) is all zeros: a `memcmp` against a zero page,
/// which runs at memory speed (a byte loop was the slowest part of checking memory).
pub fn is_zero_page(page: &[u8]) -> bool {
    ZERO_PAGE.get(..page.len()) == Some(page)
}

/// The digest of one [`CHUNK`] of a [`PartKind::Pages`] part: BLAKE3 over, for each maximal
/// run of consecutive non-zero pages in the chunk, in order, the run's bytes and then a
/// 1024-byte trailer (first page index u64 LE, page count u64 LE, zeros). Fed in pieces of
/// whole non-zero pages in increasing order; pieces that continue each other make one run.
/// (Trailers after the data keep the encoding unambiguous; whole 1024-byte blocks keep BLAKE3
/// on its wide SIMD path, which per-page updates with an index before each page did not.)
struct ChunkHasher {
    h: blake3::Hasher,
    /// The open run: first page index, pages so far.
    run: Option<(u64, u64)>,
}

impl ChunkHasher {
    fn new() -> Self {
        ChunkHasher {
            h: blake3::Hasher::new(),
            run: None,
        }
    }

    /// `bytes`: whole pages, none all zeros, the first one page `index`.
    fn piece(&mut self, index: u64, bytes: &[u8]) {
        let pages = (bytes.len() / PAGE) as u64;
        match self.run {
            Some((first, n)) if first + n == index => self.run = Some((first, n + pages)),
            _ => {
                self.close();
                self.run = Some((index, pages));
            }
        }
        self.h.update(bytes);
    }

    fn close(&mut self) {
        if let Some((first, n)) = self.run.take() {
            let mut trailer = [0u8; 1024];
            trailer[..8].copy_from_slice(&first.to_le_bytes());
            trailer[8..16].copy_from_slice(&n.to_le_bytes());
            self.h.update(&trailer);
        }
    }

    fn finish(mut self) -> [u8; 32] {
        self.close();
        self.h.finalize().into()
    }
}

/// Feeds `buf` (whole pages, the first one page `index`) to `h` as pieces of non-zero pages.
fn feed_pages(h: &mut ChunkHasher, index: u64, buf: &[u8]) {
    let mut start: Option<usize> = None;
    for (i, page) in buf.chunks(PAGE).enumerate() {
        match (is_zero_page(page), start) {
            (false, None) => start = Some(i),
            (true, Some(a)) => {
                h.piece(
                    index + a as u64,
                    buf.get(a * PAGE..i * PAGE).unwrap_or_default(),
                );
                start = None;
            }
            _ => {}
        }
    }
    if let Some(a) = start {
        h.piece(index + a as u64, buf.get(a * PAGE..).unwrap_or_default());
    }
}

/// Computes the checksum of a [`PartKind::Pages`] part of `len` bytes from its pages, fed in
/// increasing order (pages not fed are zero): the BLAKE3 of the concatenated digests of each
/// [`CHUNK`] (see `ChunkHasher`).
pub struct PageHasher {
    len: u64,
    chunk: u64,
    current: ChunkHasher,
    done: Vec<[u8; 32]>,
}

impl PageHasher {
    pub fn new(len: u64) -> Self {
        PageHasher {
            len,
            chunk: 0,
            current: ChunkHasher::new(),
            done: Vec::new(),
        }
    }

    fn advance_to(&mut self, chunk: u64) {
        while self.chunk < chunk {
            let d = std::mem::replace(&mut self.current, ChunkHasher::new()).finish();
            self.done.push(d);
            self.chunk += 1;
        }
    }

    /// Feeds whole pages starting at page `index` (all-zero pages are skipped, as holes are);
    /// calls must come in increasing page order.
    pub fn pages(&mut self, index: u64, bytes: &[u8]) {
        let per_chunk = CHUNK / PAGE as u64;
        let mut index = index;
        let mut rest = bytes;
        while !rest.is_empty() {
            self.advance_to(index / per_chunk);
            let room = (per_chunk - index % per_chunk) as usize * PAGE;
            let (now, later) = rest.split_at(room.min(rest.len()));
            feed_pages(&mut self.current, index, now);
            index += (now.len() / PAGE) as u64;
            rest = later;
        }
    }

    /// Feeds page `index` (exactly [`PAGE`] bytes).
    pub fn page(&mut self, index: u64, bytes: &[u8]) {
        self.pages(index, bytes);
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        self.finish_chunks().0
    }

    /// The hex digest and the digest of each chunk it is made of.
    pub fn finish_chunks(mut self) -> (String, Vec<[u8; 32]>) {
        self.advance_to(chunk_count(self.len));
        (pages_digest(&self.done), self.done)
    }
}

/// The number of [`CHUNK`]s of a [`PartKind::Pages`] part of `len` bytes.
pub fn chunk_count(len: u64) -> u64 {
    len.div_ceil(CHUNK).max(1)
}

/// The digest of a chunk with no data (all zeros).
pub fn empty_chunk_digest() -> [u8; 32] {
    ChunkHasher::new().finish()
}

/// The [`PartKind::Pages`] checksum (hex) made of its chunks' digests, in order.
pub fn pages_digest(chunks: &[[u8; 32]]) -> String {
    let mut top = blake3::Hasher::new();
    for d in chunks {
        top.update(d);
    }
    hex(top.finalize().as_bytes())
}

/// Reads chunk `chunk` of the [`PartKind::Pages`] part `file` (`len` bytes long) into the
/// front of `buf` and returns its digest. Only the file's data extents are read
/// (SEEK_DATA/SEEK_HOLE; a file system without them reports one extent: still right); the
/// rest of the chunk's bytes in `buf` are zeroed. `buf` must hold the chunk: [`CHUNK`]
/// bytes, or what is left of the file for the last one.
pub fn read_chunk(file: &File, len: u64, chunk: u64, buf: &mut [u8]) -> std::io::Result<[u8; 32]> {
    let mut extents = Vec::new();
    let digest = read_chunk_data(file, len, chunk, buf, &mut extents)?;
    let n = chunk_len(len, chunk);
    let mut pos = 0;
    for r in extents.iter().cloned().chain(std::iter::once(n..n)) {
        buf.get_mut(pos..r.start).unwrap_or_default().fill(0);
        pos = r.end;
    }
    Ok(digest)
}

/// The length of chunk `chunk` of a part of `len` bytes.
fn chunk_len(len: u64, chunk: u64) -> usize {
    let base = chunk.saturating_mul(CHUNK);
    usize::try_from(CHUNK.min(len.saturating_sub(base))).unwrap_or(0)
}

/// Like [`read_chunk`], but leaves the bytes of `buf` outside the chunk's data extents as
/// they were (they are zeros) and lists those extents (byte ranges of the chunk, whole
/// pages, in order) in `extents`: for readers that skip what is not data.
pub fn read_chunk_data(
    file: &File,
    len: u64,
    chunk: u64,
    buf: &mut [u8],
    extents: &mut Vec<std::ops::Range<usize>>,
) -> std::io::Result<[u8; 32]> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    extents.clear();
    let base = chunk.saturating_mul(CHUNK);
    let n = chunk_len(len, chunk);
    let out = buf
        .get_mut(..n)
        .ok_or_else(|| std::io::Error::other("chunk buffer too small"))?;
    let end = base + n as u64;
    let fd = file.as_raw_fd();
    let page = PAGE as u64;
    let mut h = ChunkHasher::new();
    let mut pos = base;
    while pos < end {
        let at = i64::try_from(pos).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a valid fd the caller holds; no memory is passed.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(e);
        }
        // Whole pages: an extent boundary inside a page reads that page.
        let data = ((data as u64) / page * page).clamp(pos, end);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64)
            .div_ceil(page)
            .saturating_mul(page)
            .clamp(data + 1, end);
        let range = (data - base) as usize..(hole - base) as usize;
        let dst = out.get_mut(range.clone()).unwrap_or_default();
        let mut got = 0;
        while got < dst.len() {
            match file.read_at(dst.get_mut(got..).unwrap_or_default(), data + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        dst.get_mut(got..).unwrap_or_default().fill(0);
        feed_pages(&mut h, data / page, dst);
        extents.push(range);
        pos = hole;
    }
    Ok(h.finish())
}

/// (chunk number, digest) pairs one thread computed.
type ChunkDigests = Vec<(u64, [u8; 32])>;

/// The [`PartKind::Pages`] checksum and length of a file, its chunks hashed on every core.
pub fn hash_pages_file(path: &Path) -> Result<(String, u64)> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    let chunks = chunk_count(len);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks as usize)
        .max(1) as u64;
    let next = std::sync::atomic::AtomicU64::new(0);
    let digests: Vec<Result<ChunkDigests>> = std::thread::scope(|s| {
        let next = &next;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let f = File::open(path).map_err(io(path))?;
                    let mut buf = vec![0u8; CHUNK as usize];
                    let mut extents = Vec::new();
                    let mut mine = Vec::new();
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= chunks {
                            return Ok(mine);
                        }
                        let d = read_chunk_data(&f, len, c, &mut buf, &mut extents);
                        mine.push((c, d.map_err(io(path))?));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Malformed("a checksum thread failed".into())))
            })
            .collect()
    });
    let mut all = vec![empty_chunk_digest(); chunks as usize];
    for part in digests {
        for (c, d) in part? {
            if let Some(slot) = all.get_mut(c as usize) {
                *slot = d;
            }
        }
    }
    Ok((pages_digest(&all), len))
}

fn mac(key: &[u8], body: &[u8]) -> Result<HmacSha256> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    let mut m = HmacSha256::new_from_slice(key).map_err(|_| Error::EmptyKey)?;
    m.update(body);
    Ok(m)
}

/// Writes a snapshot directory: parts first, the manifest last (a crash mid-way leaves no
/// manifest, so no half snapshot is ever taken for a whole one).
pub struct Writer {
    dir: PathBuf,
    parts: Vec<Part>,
}

impl Writer {
    /// Creates `dir` (which must not exist yet, or be empty).
    pub fn create(dir: &Path) -> Result<Writer> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the snapshot directory is not empty",
                ),
            });
        }
        Ok(Writer {
            dir: dir.to_path_buf(),
            parts: Vec::new(),
        })
    }

    /// Where part `name` goes, for parts written by other means (e.g. guest memory).
    pub fn part_path(&self, name: &str) -> Result<PathBuf> {
        manifest::check_name(name)?;
        Ok(self.dir.join(name))
    }

    /// Writes part `name` from bytes (hashed as they are, not read back).
    pub fn write_part(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.part_path(name)?;
        let mut f = File::create(&path).map_err(io(&path))?;
        f.write_all(bytes).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
        self.parts.push(Part {
            name: name.to_string(),
            size: bytes.len() as u64,
            digest: hex(&Sha256::digest(bytes)),
            kind: PartKind::Whole,
        });
        Ok(())
    }

    /// Records a part written and hashed by someone else (the VMM writes guest memory and
    /// device state as it saves them); its size is checked against the file.
    pub fn add_hashed(&mut self, part: Part) -> Result<()> {
        let path = self.part_path(&part.name)?;
        let actual = std::fs::metadata(&path).map_err(io(&path))?.len();
        if actual != part.size {
            return Err(Error::SizeMismatch {
                name: part.name,
                expected: part.size,
                actual,
            });
        }
        self.parts.push(part);
        Ok(())
    }

    /// Records disk layer `name`, already at [`Writer::part_path`] (size only).
    pub fn add_disk_layer(&mut self, name: &str) -> Result<()> {
        let path = self.part_path(name)?;
        let size = std::fs::metadata(&path).map_err(io(&path))?.len();
        self.parts.push(Part {
            name: name.to_string(),
            size,
            digest: String::new(),
            kind: PartKind::DiskLayer,
        });
        Ok(())
    }

    /// The directory being written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records part `name`, already written at [`Writer::part_path`].
    pub fn add_part(&mut self, name: &str) -> Result<()> {
        let path = self.part_path(name)?;
        let (digest, size) = hash_file(&path)?;
        self.parts.push(Part {
            name: name.to_string(),
            size,
            digest,
            kind: PartKind::Whole,
        });
        Ok(())
    }

    /// Writes the manifest (with an HMAC when `key` is given) and finishes the snapshot.
    pub fn finish(self, key: Option<&[u8]>) -> Result<Manifest> {
        let mut m = Manifest {
            format: FORMAT.to_string(),
            version: VERSION,
            parts: self.parts,
            hmac: None,
        };
        m.validate()?;
        if let Some(k) = key {
            let tag = mac(k, &m.signed_bytes()?)?.finalize().into_bytes();
            m.hmac = Some(hex(&tag));
        }
        let text = serde_json::to_vec_pretty(&m).map_err(|e| Error::Malformed(e.to_string()))?;
        let tmp = self.dir.join(".snapshot.json.tmp");
        let path = self.dir.join(MANIFEST);
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&text).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(m)
    }
}

/// Checks the digest of `part`, at `file`.
fn verify(file: &Path, part: &Part) -> Result<()> {
    let digest = match part.kind {
        PartKind::Whole => hash_file(file)?.0,
        PartKind::Pages => hash_pages_file(file)?.0,
        PartKind::DiskLayer => return Ok(()),
    };
    if digest != part.digest {
        return Err(Error::Corrupted {
            name: part.name.clone(),
        });
    }
    Ok(())
}

/// A snapshot directory whose manifest, part sizes, checksums and HMAC all checked out.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    manifest: Manifest,
}

impl Snapshot {
    /// Opens and verifies the snapshot in `dir`. With `key`, the snapshot must carry a
    /// matching HMAC; without, it must carry none.
    pub fn open(dir: &Path, key: Option<&[u8]>) -> Result<Snapshot> {
        Self::open_deferring(dir, key, &[])
    }

    /// Like [`Snapshot::open`], but the digests of the parts named in `deferred` are not
    /// checked yet (their sizes are): the caller checks them with [`Snapshot::verify_part`]
    /// before it uses their contents (a restore checks guest memory while it builds the VM,
    /// and starts no vCPU before the check passed).
    pub fn open_deferring(dir: &Path, key: Option<&[u8]>, deferred: &[&str]) -> Result<Snapshot> {
        let path = dir.join(MANIFEST);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotASnapshot(dir.to_path_buf()))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let mut text = Vec::new();
        f.take(MAX_MANIFEST + 1)
            .read_to_end(&mut text)
            .map_err(io(&path))?;
        if text.len() as u64 > MAX_MANIFEST {
            return Err(Error::Malformed(format!(
                "{MANIFEST} is larger than {MAX_MANIFEST} bytes"
            )));
        }
        let manifest = Manifest::parse(&text)?;
        match (key, &manifest.hmac) {
            (Some(k), Some(tag)) => {
                let tag = unhex(tag).ok_or(Error::Tampered)?;
                mac(k, &manifest.signed_bytes()?)?
                    .verify_slice(&tag)
                    .map_err(|_| Error::Tampered)?;
            }
            (Some(_), None) => return Err(Error::NotAuthenticated),
            (None, Some(_)) => return Err(Error::KeyRequired),
            (None, None) => {}
        }
        for p in &manifest.parts {
            let file = dir.join(&p.name);
            let actual = std::fs::metadata(&file).map_err(io(&file))?.len();
            if actual < p.size {
                return Err(Error::Truncated {
                    name: p.name.clone(),
                    expected: p.size,
                    actual,
                });
            }
            if actual != p.size {
                return Err(Error::SizeMismatch {
                    name: p.name.clone(),
                    expected: p.size,
                    actual,
                });
            }
            if !deferred.contains(&p.name.as_str()) {
                verify(&file, p)?;
            }
        }
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Checks part `name`'s digest (one [`Snapshot::open_deferring`] left for later).
    pub fn verify_part(&self, name: &str) -> Result<()> {
        let p = self
            .manifest
            .parts
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::Malformed(format!("the snapshot has no part {name}")))?;
        verify(&self.dir.join(&p.name), p)
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The path of part `name`, if the manifest lists it.
    pub fn part(&self, name: &str) -> Option<PathBuf> {
        self.manifest
            .parts
            .iter()
            .any(|p| p.name == name)
            .then(|| self.dir.join(name))
    }

    /// Reads part `name` whole (for the small state parts; memory is mapped instead).
    pub fn read_part(&self, name: &str) -> Result<Vec<u8>> {
        let path = self
            .part(name)
            .ok_or_else(|| Error::Malformed(format!("the snapshot has no part {name}")))?;
        std::fs::read(&path).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests;

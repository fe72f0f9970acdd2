//! Byte formats: store config, pack index, template manifest. Decoders check
//! every length against the bytes actually present before allocating, and
//! never panic.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bincode::{Decode, Encode};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::error::{IndexError, ManifestError};
use crate::{PackId, PageId, TemplateName, PAGE_SIZE};

pub const SECRET_LEN: usize = 192;

// ---------------------------------------------------------------- config

pub const CFG_MAGIC: &[u8; 8] = b"VMMSTCFG";
pub const CFG_MAJOR: u16 = 1;
pub const CFG_LEN: usize = 8 + 2 + 2 + SECRET_LEN + 8;

pub fn encode_config(secret: &[u8; SECRET_LEN]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CFG_LEN);
    v.extend_from_slice(CFG_MAGIC);
    v.extend_from_slice(&CFG_MAJOR.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(secret);
    let sum = xxh3_64(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

pub enum ConfigProblem {
    Bad(String),
    Future(u16),
}

pub fn decode_config(b: &[u8]) -> Result<Box<[u8; SECRET_LEN]>, ConfigProblem> {
    if b.len() < 12 || &b[..8] != CFG_MAGIC {
        return Err(ConfigProblem::Bad("bad magic".into()));
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    if major != CFG_MAJOR {
        return Err(ConfigProblem::Future(major));
    }
    if b.len() != CFG_LEN {
        return Err(ConfigProblem::Bad(format!(
            "length {} != {CFG_LEN}",
            b.len()
        )));
    }
    let (body, sum) = b.split_at(CFG_LEN - 8);
    if xxh3_64(body).to_le_bytes() != sum {
        return Err(ConfigProblem::Bad("checksum mismatch".into()));
    }
    let mut s = Box::new([0u8; SECRET_LEN]);
    s.copy_from_slice(&body[12..]);
    Ok(s)
}

// ---------------------------------------------------------------- pack index

pub const IDX_MAGIC: &[u8; 8] = b"VMMPKIDX";
pub const IDX_MAJOR: u16 = 1;
pub const IDX_HEADER: usize = 8 + 2 + 2 + 8 + 8 + 8;
pub const IDX_ENTRY: usize = 16 + 4 + 8;

#[derive(Clone, Copy, Debug)]
pub struct IdxEntry {
    pub id: PageId,
    pub offset: u64,
}

pub fn idx_entry_bytes(out: &mut Vec<u8>, e: &IdxEntry) {
    out.extend_from_slice(&e.id.hash().to_le_bytes());
    out.extend_from_slice(&e.id.slot().to_le_bytes());
    out.extend_from_slice(&e.offset.to_le_bytes());
}

/// Encodes a full index from already-encoded entry bytes.
pub fn encode_idx(pack: PackId, entry_bytes: &[u8]) -> Vec<u8> {
    let count = (entry_bytes.len() / IDX_ENTRY) as u64;
    let mut v = Vec::with_capacity(IDX_HEADER + entry_bytes.len());
    v.extend_from_slice(IDX_MAGIC);
    v.extend_from_slice(&IDX_MAJOR.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&pack.get().to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&xxh3_64(entry_bytes).to_le_bytes());
    v.extend_from_slice(entry_bytes);
    v
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes an index; returns the entries' byte range start and the entries.
pub fn decode_idx(path: &Path, pack: PackId, b: &[u8]) -> Result<Vec<IdxEntry>, IndexError> {
    let corrupt = |reason: String| IndexError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if b.len() < IDX_HEADER || &b[..8] != IDX_MAGIC {
        return Err(corrupt("bad magic or short header".into()));
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    if major != IDX_MAJOR {
        return Err(IndexError::FutureVersion {
            path: path.to_path_buf(),
            found: major,
            supported: IDX_MAJOR,
        });
    }
    let id = le_u64(b, 12);
    if id != pack.get() {
        return Err(corrupt(format!(
            "header names pack {id:016x}, file name says {pack}"
        )));
    }
    let count = le_u64(b, 20);
    let body = &b[IDX_HEADER..];
    if (body.len() as u64) != count.saturating_mul(IDX_ENTRY as u64) {
        return Err(corrupt(format!(
            "{count} entries announced, {} bytes present",
            body.len()
        )));
    }
    if xxh3_64(body) != le_u64(b, 28) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut out = Vec::with_capacity(body.len() / IDX_ENTRY);
    for c in body.chunks_exact(IDX_ENTRY) {
        let mut h = [0u8; 16];
        h.copy_from_slice(&c[..16]);
        let slot = u32::from_le_bytes([c[16], c[17], c[18], c[19]]);
        let offset = le_u64(c, 20);
        if !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(corrupt(format!(
                "entry offset {offset} is not page aligned"
            )));
        }
        out.push(IdxEntry {
            id: PageId::new(u128::from_le_bytes(h), slot),
            offset,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- manifest

pub const MAN_MAGIC: &[u8; 8] = b"VMMTMPL1";
pub const MAN_MAJOR: u16 = 1;
pub const MAN_MINOR: u16 = 0;
pub const MAN_HEADER: usize = 8 + 2 + 2 + 8 + 16;
/// Largest payload we accept, and the bincode allocation limit.
pub const MAN_LIMIT: usize = 1 << 30;
/// Largest guest memory a template may describe.
/// Largest guest memory a manifest may describe: the VMM maps at most 4 GiB, and resolving
/// a template allocates per frame, so a larger size in a hostile manifest is refused.
pub const MAX_MEM: u64 = 4 << 30;

fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAN_LIMIT>()
}

#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct ManifestV1 {
    pub name: String,
    pub parent: Option<String>,
    pub mem_size: u64,
    pub created_unix_ms: u64,
    /// (first frame, count), sorted, disjoint.
    pub zero_runs: Vec<(u64, u64)>,
    /// (first frame, pages), sorted, disjoint.
    pub page_runs: Vec<(u64, Vec<PageId>)>,
    pub vcpu_state: Vec<u8>,
    pub device_state: Vec<u8>,
    pub working_set: Vec<u64>,
}

pub fn encode_manifest(m: &ManifestV1) -> Vec<u8> {
    encode_manifest_version(m, MAN_MAJOR)
}

pub fn encode_manifest_version(m: &ManifestV1, major: u16) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these types.
    let payload = bincode::encode_to_vec(m, bincode::config::standard()).unwrap_or_default();
    let mut v = Vec::with_capacity(MAN_HEADER + payload.len());
    v.extend_from_slice(MAN_MAGIC);
    v.extend_from_slice(&major.to_le_bytes());
    v.extend_from_slice(&MAN_MINOR.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(&xxh3_128(&payload).to_le_bytes());
    v.extend_from_slice(&payload);
    v
}

/// The payload checksum in a manifest's header (0 if the header is short).
pub fn manifest_sum(b: &[u8]) -> u128 {
    let mut sum = [0u8; 16];
    match b.get(20..36) {
        Some(s) => {
            sum.copy_from_slice(s);
            u128::from_le_bytes(sum)
        }
        None => 0,
    }
}

/// A newer minor version may append payload fields this build ignores.
fn newer_minor(minor: u16) -> bool {
    minor > MAN_MINOR
}

pub fn decode_manifest(path: &Path, b: &[u8]) -> Result<ManifestV1, ManifestError> {
    let p = || path.to_path_buf();
    if b.len() < MAN_HEADER || &b[..8] != MAN_MAGIC {
        return Err(ManifestError::NotAManifest {
            path: p(),
            reason: "bad magic or short header".into(),
        });
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    let minor = u16::from_le_bytes([b[10], b[11]]);
    if major != MAN_MAJOR {
        return Err(ManifestError::FutureVersion {
            path: p(),
            found: major,
            supported: MAN_MAJOR,
        });
    }
    let len = le_u64(b, 12);
    let payload = &b[MAN_HEADER..];
    if len != payload.len() as u64 || len > MAN_LIMIT as u64 {
        return Err(ManifestError::Length {
            path: p(),
            expected: len,
            found: payload.len() as u64,
        });
    }
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&b[20..36]);
    let stored = u128::from_le_bytes(sum);
    let computed = xxh3_128(payload);
    if stored != computed {
        return Err(ManifestError::Checksum {
            path: p(),
            stored,
            computed,
        });
    }
    let (m, used): (ManifestV1, usize) = bincode::decode_from_slice(payload, bincode_cfg())
        .map_err(|source| ManifestError::Decode { path: p(), source })?;
    // A newer minor version may append fields; an equal/older one may not.
    if used != payload.len() && !newer_minor(minor) {
        return Err(ManifestError::Invalid {
            path: p(),
            reason: format!("{} trailing payload bytes", payload.len() - used),
        });
    }
    validate_manifest(path, &m)?;
    Ok(m)
}

/// Structural checks: names, sizes, runs in range and disjoint, working set in range.
pub fn validate_manifest(path: &Path, m: &ManifestV1) -> Result<(), ManifestError> {
    let bad = |reason: String| ManifestError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    TemplateName::new(&m.name).map_err(|e| bad(e.to_string()))?;
    if let Some(parent) = &m.parent {
        TemplateName::new(parent).map_err(|e| bad(format!("parent: {e}")))?;
    }
    if m.mem_size == 0 || !m.mem_size.is_multiple_of(PAGE_SIZE as u64) || m.mem_size > MAX_MEM {
        return Err(bad(format!(
            "guest memory size {} is not a valid multiple of 4096",
            m.mem_size
        )));
    }
    let frames = m.mem_size / PAGE_SIZE as u64;
    let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(m.zero_runs.len() + m.page_runs.len());
    for &(start, n) in &m.zero_runs {
        ranges.push((start, n));
    }
    for (start, pages) in &m.page_runs {
        ranges.push((*start, pages.len() as u64));
    }
    ranges.sort_unstable();
    let mut next_free = 0u64;
    for (start, n) in ranges {
        let end = start.checked_add(n).filter(|&e| n > 0 && e <= frames);
        let Some(end) = end else {
            return Err(bad(format!("run of {n} frames at frame {start} is empty or outside guest memory ({frames} frames)")));
        };
        if start < next_free {
            return Err(bad(format!(
                "run at frame {start} overlaps the previous run"
            )));
        }
        next_free = end;
    }
    if let Some(&f) = m.working_set.iter().find(|&&f| f >= frames) {
        return Err(bad(format!(
            "working set frame {f} is outside guest memory ({frames} frames)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------- atomic files

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub fn tmp_path(tmp_dir: &Path, final_path: &Path) -> PathBuf {
    let base = final_path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("file");
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    tmp_dir.join(format!("{base}.{}.{seq}.tmp", std::process::id()))
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to a temp file in `tmp_dir`, fsyncs, renames over
/// `final_path`, fsyncs the destination directory. `before_rename` lets tests
/// simulate a crash between the temp write and the rename.
pub fn write_atomic(
    tmp_dir: &Path,
    final_path: &Path,
    bytes: &[u8],
    before_rename: impl FnOnce() -> bool,
) -> io::Result<bool> {
    let tmp = tmp_path(tmp_dir, final_path);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        // A full disk, say: leave no half-written temp file behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if !before_rename() {
        return Ok(false);
    }
    if let Err(e) = fs::rename(&tmp, final_path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(parent) = final_path.parent() {
        fsync_dir(parent)?;
    }
    Ok(true)
}

// ---------------------------------------------------------------- template locations

pub const LOC_MAGIC: &[u8; 8] = b"VMMTLOC1";
pub const LOC_MAJOR: u16 = 1;
pub const LOC_MINOR: u16 = 0;
/// magic, major u16, minor u16, body length u64, keyed xxh3-128(body) u128 (the
/// store's secret: a record is only taken from this store, never forged).
pub const LOC_HEADER: usize = 8 + 2 + 2 + 8 + 16;
/// Per pack: id u64, inode u64, birth time (ns since the epoch, 0 = unknown) u64, extent u64.
pub const LOC_PACK: usize = 8 + 8 + 8 + 8;
/// Most packs one record may name (each pack holds up to 1 GiB).
pub const LOC_MAX_PACKS: usize = 4096;
/// Most page locations one record may hold: every frame of the largest guest memory.
pub const LOC_MAX_ENTRIES: u64 = MAX_MEM / PAGE_SIZE as u64;
/// Largest record accepted (body bytes).
pub const LOC_LIMIT: u64 = 16 + 4 + (LOC_MAX_PACKS * LOC_PACK) as u64 + 8 + LOC_MAX_ENTRIES * 8;

/// One pack a location record points into, with what identified it when the
/// record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocPack {
    pub id: PackId,
    /// Inode of the pack file.
    pub ino: u64,
    /// Birth time of the pack file in ns since the epoch (0 when the file system has none).
    pub born_ns: u64,
    /// Bytes of the pack the record needs (a multiple of 4096).
    pub extent: u64,
}

/// A template's location record (`templates/<name>.loc`): where each of its own
/// pages lives, in the order of the manifest's page runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocRecord {
    /// The checksum in the header of the manifest it describes (xxh3-128 of its payload).
    pub manifest_sum: u128,
    pub packs: Vec<LocPack>,
    /// One per own page: `pack position in packs << 40 | offset / 4096`.
    pub entries: Vec<u64>,
}

impl LocRecord {
    pub fn entry(pack: u32, offset: u64) -> u64 {
        (u64::from(pack) << 40) | (offset / PAGE_SIZE as u64)
    }
    /// (position in `packs`, byte offset) of an entry.
    pub fn split(e: u64) -> (u32, u64) {
        ((e >> 40) as u32, (e & ((1 << 40) - 1)) * PAGE_SIZE as u64)
    }
}

/// Why a location record was not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocProblem {
    /// Not a record, damaged, truncated or inconsistent (the reason).
    Damaged(String),
    /// Written by a newer, incompatible version.
    Future(u16),
}

impl std::fmt::Display for LocProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocProblem::Damaged(r) => write!(f, "damaged location record: {r}"),
            LocProblem::Future(v) => write!(
                f,
                "location record of major version {v} (this build reads {LOC_MAJOR})"
            ),
        }
    }
}

/// Encodes a record; `sum` is the store's keyed XXH3-128.
pub fn encode_locations(r: &LocRecord, sum: &dyn Fn(&[u8]) -> u128) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + 4 + r.packs.len() * LOC_PACK + 8 + r.entries.len() * 8);
    body.extend_from_slice(&r.manifest_sum.to_le_bytes());
    body.extend_from_slice(&(r.packs.len() as u32).to_le_bytes());
    for p in &r.packs {
        body.extend_from_slice(&p.id.get().to_le_bytes());
        body.extend_from_slice(&p.ino.to_le_bytes());
        body.extend_from_slice(&p.born_ns.to_le_bytes());
        body.extend_from_slice(&p.extent.to_le_bytes());
    }
    body.extend_from_slice(&(r.entries.len() as u64).to_le_bytes());
    for e in &r.entries {
        body.extend_from_slice(&e.to_le_bytes());
    }
    let mut v = Vec::with_capacity(LOC_HEADER + body.len());
    v.extend_from_slice(LOC_MAGIC);
    v.extend_from_slice(&LOC_MAJOR.to_le_bytes());
    v.extend_from_slice(&LOC_MINOR.to_le_bytes());
    v.extend_from_slice(&(body.len() as u64).to_le_bytes());
    v.extend_from_slice(&sum(&body).to_le_bytes());
    v.extend_from_slice(&body);
    v
}

/// Decodes a location record, checking lengths before allocating, the
/// checksum, and that every entry lies inside the extent of its pack.
pub fn decode_locations(b: &[u8], sum: &dyn Fn(&[u8]) -> u128) -> Result<LocRecord, LocProblem> {
    let bad = |r: String| LocProblem::Damaged(r);
    if b.len() < LOC_HEADER || &b[..8] != LOC_MAGIC {
        return Err(bad("bad magic or short header".into()));
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    if major != LOC_MAJOR {
        return Err(LocProblem::Future(major));
    }
    let len = le_u64(b, 12);
    let body = &b[LOC_HEADER..];
    if len != body.len() as u64 || len > LOC_LIMIT {
        return Err(bad(format!(
            "body of {len} bytes announced, {} present",
            body.len()
        )));
    }
    let mut stored = [0u8; 16];
    stored.copy_from_slice(&b[20..36]);
    if u128::from_le_bytes(stored) != sum(body) {
        return Err(bad("checksum mismatch".into()));
    }
    if body.len() < 16 + 4 {
        return Err(bad("body too short".into()));
    }
    let mut ms = [0u8; 16];
    ms.copy_from_slice(&body[..16]);
    let manifest_sum = u128::from_le_bytes(ms);
    let npacks = u32::from_le_bytes([body[16], body[17], body[18], body[19]]) as usize;
    if npacks > LOC_MAX_PACKS {
        return Err(bad(format!("{npacks} packs (at most {LOC_MAX_PACKS})")));
    }
    let packs_end = 20 + npacks * LOC_PACK;
    if body.len() < packs_end + 8 {
        return Err(bad(format!("{npacks} packs announced, body too short")));
    }
    let mut packs = Vec::with_capacity(npacks);
    for k in 0..npacks {
        let at = 20 + k * LOC_PACK;
        let p = LocPack {
            id: PackId::new(le_u64(body, at)),
            ino: le_u64(body, at + 8),
            born_ns: le_u64(body, at + 16),
            extent: le_u64(body, at + 24),
        };
        if !p.extent.is_multiple_of(PAGE_SIZE as u64) || p.extent / (PAGE_SIZE as u64) > 1 << 40 {
            return Err(bad(format!("pack {} extent {} is invalid", p.id, p.extent)));
        }
        if packs.iter().any(|q: &LocPack| q.id == p.id) {
            return Err(bad(format!("pack {} is named twice", p.id)));
        }
        packs.push(p);
    }
    let count = le_u64(body, packs_end);
    let rest = &body[packs_end + 8..];
    if count > LOC_MAX_ENTRIES || rest.len() as u64 != count.saturating_mul(8) {
        return Err(bad(format!(
            "{count} entries announced, {} bytes present",
            rest.len()
        )));
    }
    let mut entries = Vec::with_capacity(rest.len() / 8);
    for c in rest.chunks_exact(8) {
        let e = le_u64(c, 0);
        let (pack, offset) = LocRecord::split(e);
        let inside = packs.get(pack as usize).is_some_and(|p| {
            offset
                .checked_add(PAGE_SIZE as u64)
                .is_some_and(|end| end <= p.extent)
        });
        if !inside {
            return Err(bad(format!(
                "entry {e:#x} points outside the packs it names"
            )));
        }
        entries.push(e);
    }
    Ok(LocRecord {
        manifest_sum,
        packs,
        entries,
    })
}

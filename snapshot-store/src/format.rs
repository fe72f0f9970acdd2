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

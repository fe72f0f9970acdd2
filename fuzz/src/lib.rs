//! Shared by the fuzz targets and the seed generator: the tiny "store directory
//! image" archive format of the `store_dir` target, and checksum fix-ups that let
//! the fuzzer get past the checksums of the store's files.
//!
//! # Archive format
//!
//! A sequence of records, read until the input ends:
//!
//! ```text
//! kind: u8      file the record is written to: FILES[kind % FILES.len()]
//! flags: u8     bit 0: fix the file's magic, length and checksum fields after writing
//!               bit 1: append to the file instead of replacing it
//! len: u32 LE   number of bytes that follow (clamped to what is left of the input)
//! bytes[len]
//! ```

pub mod hostcall_input;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use snapshot_store::fuzzing as fmt;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// Files an archive record can write, relative to the store directory.
pub const FILES: &[&str] = &[
    "store.cfg",
    "packs/0000000000000001.pack",
    "packs/0000000000000001.idx",
    "packs/0000000000000002.pack",
    "packs/0000000000000002.idx",
    "templates/base.tmpl",
    "templates/fn.tmpl",
    "templates/x.tmpl",
    "templates/y.tmpl",
    "tmp/leftover.tmp",
    "packs/junk",
    "templates/.hidden.tmpl",
];

/// Template names the archive can hold (see [`FILES`]).
pub const TEMPLATE_NAMES: &[&str] = &["base", "fn", "x", "y", ".hidden"];

pub const FLAG_FIX: u8 = 1;
pub const FLAG_APPEND: u8 = 2;

/// Index of `path` in [`FILES`].
pub fn kind_of(path: &str) -> u8 {
    FILES
        .iter()
        .position(|f| *f == path)
        .unwrap_or_else(|| panic!("{path} is not in FILES")) as u8
}

/// Appends one record to an archive.
pub fn push_record(out: &mut Vec<u8>, path: &str, flags: u8, bytes: &[u8]) {
    out.push(kind_of(path));
    out.push(flags);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Splits an archive into (kind, flags, bytes) records. Never fails: a short
/// header ends the archive, a long length is clamped.
pub fn records(mut data: &[u8]) -> Vec<(usize, u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 6 {
        let kind = data[0] as usize % FILES.len();
        let flags = data[1];
        let len = u32::from_le_bytes([data[2], data[3], data[4], data[5]]) as usize;
        let rest = &data[6..];
        let len = len.min(rest.len());
        out.push((kind, flags, &rest[..len]));
        data = &rest[len..];
    }
    out
}

/// Rewrites magic, length, pack id and checksum fields of a store file so that
/// they are consistent with its contents. The version fields are left alone.
pub fn fix_file(path: &str, b: &mut Vec<u8>) {
    if path == "store.cfg" {
        if b.len() >= fmt::CFG_LEN {
            b.truncate(fmt::CFG_LEN);
            b[..8].copy_from_slice(fmt::CFG_MAGIC);
            let sum = xxh3_64(&b[..fmt::CFG_LEN - 8]);
            b[fmt::CFG_LEN - 8..].copy_from_slice(&sum.to_le_bytes());
        }
    } else if let Some(stem) = path
        .strip_prefix("packs/")
        .and_then(|s| s.strip_suffix(".idx"))
    {
        if b.len() >= fmt::IDX_HEADER {
            let id = u64::from_str_radix(stem, 16).unwrap_or(0);
            let body_len = (b.len() - fmt::IDX_HEADER) / fmt::IDX_ENTRY * fmt::IDX_ENTRY;
            b.truncate(fmt::IDX_HEADER + body_len);
            b[..8].copy_from_slice(fmt::IDX_MAGIC);
            b[12..20].copy_from_slice(&id.to_le_bytes());
            b[20..28].copy_from_slice(&((body_len / fmt::IDX_ENTRY) as u64).to_le_bytes());
            let sum = xxh3_64(&b[fmt::IDX_HEADER..]);
            b[28..36].copy_from_slice(&sum.to_le_bytes());
        }
    } else if path.ends_with(".tmpl") {
        fix_manifest(b);
    }
}

/// Makes a manifest's magic, length and checksum match its payload.
pub fn fix_manifest(b: &mut [u8]) {
    if b.len() >= fmt::MAN_HEADER {
        let payload_len = (b.len() - fmt::MAN_HEADER) as u64;
        let sum = xxh3_128(&b[fmt::MAN_HEADER..]);
        b[..8].copy_from_slice(fmt::MAN_MAGIC);
        b[12..20].copy_from_slice(&payload_len.to_le_bytes());
        b[20..36].copy_from_slice(&sum.to_le_bytes());
    }
}

/// Builds a manifest file around `payload` with a correct header (major 1, given minor).
pub fn manifest_with_payload(minor: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(fmt::MAN_HEADER + payload.len());
    b.extend_from_slice(fmt::MAN_MAGIC);
    b.extend_from_slice(&fmt::MAN_MAJOR.to_le_bytes());
    b.extend_from_slice(&minor.to_le_bytes());
    b.extend_from_slice(&[0u8; 24]);
    b.extend_from_slice(payload);
    fix_manifest(&mut b);
    b
}

/// Writes the archive `data` into the (empty, existing) directory `dir`.
pub fn unpack(data: &[u8], dir: &Path) {
    for sub in ["packs", "templates", "tmp"] {
        let _ = fs::create_dir_all(dir.join(sub));
    }
    for (kind, flags, bytes) in records(data) {
        let rel = FILES[kind];
        let path = dir.join(rel);
        let mut contents = if flags & FLAG_APPEND != 0 {
            let mut old = fs::read(&path).unwrap_or_default();
            old.extend_from_slice(bytes);
            old
        } else {
            bytes.to_vec()
        };
        if flags & FLAG_FIX != 0 {
            fix_file(rel, &mut contents);
        }
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path);
        if let Ok(mut f) = f {
            let _ = f.write_all(&contents);
        }
    }
}

/// A scratch directory for one fuzzing process, emptied before each use: under
/// `$VMM_FUZZ_SCRATCH` if set, else `/dev/shm` (tmpfs), else the temp directory.
pub struct Scratch {
    pub dir: std::path::PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = match std::env::var_os("VMM_FUZZ_SCRATCH") {
            Some(d) if !d.is_empty() => std::path::PathBuf::from(d),
            _ if Path::new("/dev/shm").is_dir() => std::path::PathBuf::from("/dev/shm"),
            _ => std::env::temp_dir(),
        };
        let dir = base.join(format!("vmm-fuzz-{tag}-{}", std::process::id()));
        Scratch { dir }
    }
    /// Empties (re-creates) the directory and returns its path.
    pub fn fresh(&self) -> &Path {
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).expect("create the scratch directory");
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Guest memory of the seed store's templates base, fn and x.
pub const SEED_MEM: u64 = 32 * snapshot_store::PAGE_SIZE as u64;

/// A deterministic pseudo-random page.
pub fn seed_page(seed: u64) -> [u8; snapshot_store::PAGE_SIZE] {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut p = [0u8; snapshot_store::PAGE_SIZE];
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

/// Commits the seed store's templates into `s`: base <- fn <- x (dedup inside a
/// template and against base, explicit zero frames) and an unrelated y. Used by
/// make-seeds and by the `import` target (to pre-populate a store).
pub fn build_seed_templates(s: &mut snapshot_store::Store) {
    use snapshot_store::PAGE_SIZE;
    const MEM: u64 = SEED_MEM;
    let page = seed_page;
    let mut w = s.begin_template("base", None, MEM).unwrap();
    for i in 0..6 {
        w.put_page(i, &page(i)).unwrap();
    }
    w.put_page(20, &page(1)).unwrap(); // dedup inside a template
    w.set_vcpu_state(b"vcpu-base".to_vec());
    w.set_device_state(b"dev-base".to_vec());
    w.set_working_set(vec![2, 1, 0, 20]);
    w.commit().unwrap();
    let mut w = s.begin_template("fn", Some("base"), MEM).unwrap();
    w.put_page(3, &page(103)).unwrap();
    w.put_page(4, &page(104)).unwrap();
    w.set_zero(5).unwrap();
    w.set_vcpu_state(b"vcpu-fn".to_vec());
    w.set_working_set(vec![4, 3, 9]);
    w.commit().unwrap();
    let mut w = s.begin_template("x", Some("fn"), MEM).unwrap();
    w.put_page(7, &page(2)).unwrap(); // dedup against base
    w.set_zero(3).unwrap();
    w.commit().unwrap();
    let mut w = s.begin_template("y", None, 8 * PAGE_SIZE as u64).unwrap();
    w.put_page(0, &page(200)).unwrap();
    w.commit().unwrap();
}

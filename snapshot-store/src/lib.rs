//! Content-addressed, deduplicated store of guest memory snapshots ("templates").
//!
//! A *template* is a snapshot of a booted guest: its memory (as 4 KiB pages)
//! plus opaque vCPU and device state bytes defined by the VMM, and the working
//! set recorded after restore. A *function template* is a diff layered on a
//! parent template; layers may chain (base -> runtime -> function).
//!
//! Every non-zero page is stored once, whatever the number of templates using
//! it. Pages are addressed by a keyed XXH3-128 hash (the key is a random
//! per-store secret, so outsiders cannot craft collisions); when a hash is
//! already present the bytes are compared, and a true collision is stored
//! apart under a different [`PageId`] (same hash, next `slot`).
//! All-zero pages are never stored.
//!
//! # On-disk layout
//!
//! ```text
//! <store>/                                 (default: see default_store_dir())
//! ├── store.cfg          config: magic "VMMSTCFG", major u16, minor u16,
//! │                       secret [u8; 192] (random, from the OS), xxh3-64 of all before
//! ├── LOCK               empty; flock()ed: exclusive by writers, shared by verify
//! ├── tmp/               temp files of in-flight atomic writes (garbage if a writer died)
//! ├── packs/
//! │   ├── 0000000000000001.pack   raw 4096-byte pages, appended, never rewritten:
//! │   │                           +--------+--------+--------+-----
//! │   │                           | page 0 | page 1 | page 2 | ... [torn tail ignored]
//! │   │                           +--------+--------+--------+-----
//! │   │                           (page-aligned so it can be mmap()ed and copied from)
//! │   └── 0000000000000001.idx    index of that pack, replaced atomically:
//! │                               header: magic "VMMPKIDX", major u16, minor u16,
//! │                                       pack id u64, count u64, xxh3-64(entries) u64
//! │                               entries[count]: hash u128 LE, slot u32 LE, offset u64 LE
//! ├── cache/             memory images for copy-on-write restores (derived data, see
//! │                       [`Store::memory_image`]): <name>.<created ms>.img, .<name>.<pid>.tmp
//! ├── artifacts/         compiled-module cache (derived data, no store lock; see below)
//! │   ├── <key: 64 hex>.art       header: magic "VMMARTF1", major u16, minor u16,
//! │   │                           engine length u32, settings length u32, artifact length u64,
//! │   │                           created (unix ms) u64, key [32], SHA-256 of the module [32];
//! │   │                           engine, settings (UTF-8), artifact bytes (at most 256 MiB);
//! │   │                           keyed XXH3-128 (the secret) of every byte before (16 bytes).
//! │   │                           Mode 0444; its mtime is when it was last used.
//! │   └── .<key>.<pid>.<nonce>.tmp  one being written by process <pid>
//! └── templates/
//!     └── <name>.tmpl    manifest:
//!                        header: magic "VMMTMPL1", major u16, minor u16,
//!                                payload length u64, xxh3-128(payload) u128 (all LE)
//!                        payload (bincode 2, standard config, size-limited):
//!                          name, parent: Option<name>, mem_size, created (unix ms),
//!                          zero_runs: [(first frame, count)]      explicit zeros
//!                          page_runs: [(first frame, [PageId])]   own pages
//!                          vcpu_state: bytes, device_state: bytes,
//!                          working_set: [frame] (first-touch order)
//!     └── <name>.loc     location record (a hint for lazy restores, see below):
//!                        header: magic "VMMTLOC1", major u16, minor u16,
//!                                body length u64, keyed xxh3-128(body) u128 (all LE)
//!                        body: manifest checksum u128, pack count u32,
//!                              packs[]: id u64, inode u64, birth ns u64 (0: none), extent u64
//!                              entry count u64, entries[]: u64 per own page, in
//!                              manifest order: pack position << 40 | offset / 4096
//!     └── <name>.ws      learned working set (a hint for prefetching restores, see
//!                        `learned.rs`): header magic "VMMTWS01", major u16, minor u16,
//!                        body length u64, keyed xxh3-128(body) u128; body: manifest
//!                        checksum u128, observations u32, frame count u32, frames u32[]
//! ```
//!
//! A frame listed in neither run list inherits from the parent (or is zero
//! when there is no parent).
//!
//! # Crash safety
//!
//! Writers hold the exclusive lock for a whole commit, which goes:
//! append new pages to the current pack -> fsync pack -> write the pack's new
//! index to `tmp/`, fsync, rename over the old one, fsync `packs/` -> same for
//! the manifest into `templates/`. A writer killed at any point leaves either
//! unindexed bytes at a pack tail (ignored: the next writer starts a new pack
//! rather than truncate them), indexed pages no manifest references, or temp
//! files: all reported by [`Store::verify`] as [`Severity::Garbage`], never as
//! corruption, and reclaimed by [`Store::gc`].
//!
//! What is garbage is decided from the manifests: a page counts as stored only
//! where an index entry points at bytes that hash to its id. While a template
//! needs a page no index accounts for (an index lost, damaged, stale or copied
//! from another store, forged offsets), `verify` reports the packs that still
//! hold it, `gc` refuses to delete or truncate anything, and
//! [`Store::reindex`] rebuilds the index from the pack. A directory holding
//! packs or manifests but no `store.cfg` is a damaged store, never a new one.
//!
//! # Location records and lazy restores
//!
//! [`Store::open_lazy`] reads no pack index: resolving a template reads its
//! layers' location records and maps only the packs they name, so a restore's
//! store work follows the template's size, not the store's. A record that is
//! missing (stores written before records existed), damaged, made with another
//! store's secret, bound to another version of its manifest, or stale (a pack
//! it names is gone, another file, shorter, or does not hold the page the
//! record says at a checked offset) is passed over for the pack indexes, with
//! the reason in [`Resolved::location_fallback`]. Every page is still checked
//! against its hash when a restore reads it. Writers keep records in step (see
//! `locations.rs`); `gc` rewrites them after moving pages and writes the ones
//! missing, which migrates older stores.
//!
//! # Compiled-module cache
//!
//! What an engine produces by compiling a WebAssembly module ahead of time is
//! kept under an [`ArtifactKey`]: SHA-256 over the module's SHA-256, the
//! engine string and the settings fingerprint (a cryptographic hash, since a
//! key selects code that will run). [`Store::put_artifact`] writes one
//! atomically (temp file, fsync, rename, fsync); [`Store::get_artifact`] returns
//! it only after checking its kind of file, size, header, key and keyed checksum,
//! and otherwise says why it refused it ([`ArtifactError::Damaged`]).
//! Artifacts are never changed in place, so they take no store lock.
//! [`Store::gc_artifacts`] removes damaged ones, those of engines no longer in
//! use, and with an age, unused ones; [`Store::verify`] checks them all.
//!
//! # Example
//!
//! ```
//! use snapshot_store::{Frame, Store, PAGE_SIZE};
//! # let tmp = std::env::temp_dir().join(format!("ss-doc-{}", std::process::id()));
//! let mut store = Store::create_or_open(&tmp)?;
//! let mut page = [0u8; PAGE_SIZE];
//! page[0] = 7;
//!
//! let mut w = store.begin_template("base", None, 16 * PAGE_SIZE as u64)?;
//! w.put_page(3, &page)?;
//! w.set_vcpu_state(vec![1, 2, 3]);
//! w.commit()?;
//!
//! let mut w = store.begin_template("fn-hello", Some("base"), 16 * PAGE_SIZE as u64)?;
//! page[1] = 9;
//! w.put_page(4, &page)?;
//! w.set_working_set(vec![4, 3]);
//! w.commit()?;
//!
//! let t = store.load("fn-hello")?;
//! let r = t.resolve(&store)?;
//! assert!(matches!(r.frame(3), Some(Frame::Data(p)) if p[0] == 7));
//! let mut guest = vec![0u8; r.mem_size() as usize];
//! r.copy_to_zeroed(&mut guest)?;
//! assert_eq!(guest[4 * PAGE_SIZE + 1], 9);
//! assert!(store.verify().iter().all(|p| !p.is_corruption()));
//! # std::fs::remove_dir_all(&tmp).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[cfg(test)]
mod artifact_tests;
mod artifacts;
mod cache;
mod error;
mod exchange;
#[cfg(any(test, feature = "fixtures"))]
#[doc(hidden)]
pub mod fixtures;
mod format;
mod functions;
mod gc;
mod inspect;
mod learned;
#[cfg(test)]
mod location_tests;
mod locations;
mod packs;
mod resolve;
mod scan;
mod size;
mod store;
#[cfg(test)]
mod tests;
mod transfer;
mod util;
mod verify;
mod writer;

/// The byte-format decoders, for the fuzz targets in `fuzz/` only: not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::format::*;
    pub fn page_id(hash: u128, slot: u32) -> crate::PageId {
        crate::PageId::new(hash, slot)
    }
    pub fn pack_id(id: u64) -> crate::PackId {
        crate::PackId::new(id)
    }
}

pub use artifacts::{
    ArtifactDamage, ArtifactError, ArtifactGcPolicy, ArtifactGcReason, ArtifactGcReport,
    ArtifactInfo, ArtifactKey, ArtifactList, RemovedArtifact, MAX_ARTIFACT_BYTES,
    MAX_ARTIFACT_FILE_BYTES, MAX_ENGINE_LEN, MAX_SETTINGS_LEN,
};
pub use cache::MemoryImage;
pub use error::{
    CacheError, ExportError, GcError, ImportError, IndexError, LoadError, ManifestError, NameError,
    OpenError, ReindexError, RemoveError, WriteError,
};
pub use exchange::{IncomingLayer, LayersError, LayersReport, PageSource, WrittenLayer};
pub use functions::{
    function_template_name, open_regular, valid_function_name, BlobDigest, FunctionRecord,
    FunctionStore, FunctionStoreError,
};
pub use gc::GcReport;
pub use inspect::{Diff, DiffRange, LayerReport, SharedPair, Stats, TemplateStats};
pub use learned::LearnedWorkingSet;
pub use resolve::{Frame, Resolved, Template, TemplateInfo, TemplateList};
pub use scan::ReindexReport;
pub use size::parse_size;
pub use store::Store;
pub use transfer::{ExportReport, ImportReport, ImportedTemplate};
pub use verify::{Problem, Severity};
pub use writer::{CommitInfo, TemplateWriter};

use std::fmt;
use std::path::PathBuf;

/// Size of a guest page, the unit of deduplication.
pub const PAGE_SIZE: usize = 4096;

/// Identity of a stored page: keyed XXH3-128 of its bytes plus a collision
/// slot (0 unless different bytes with the same hash were already stored).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, bincode::Encode, bincode::Decode)]
pub struct PageId {
    hash: u128,
    slot: u32,
}

impl PageId {
    /// The keyed hash of the page bytes.
    pub fn hash(&self) -> u128 {
        self.hash
    }
    /// Collision slot: 0 normally, n for the (n+1)-th distinct page with this hash.
    pub fn slot(&self) -> u32 {
        self.slot
    }
    pub(crate) fn new(hash: u128, slot: u32) -> Self {
        PageId { hash, slot }
    }
}

impl fmt::Debug for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}
impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}.{}", self.hash, self.slot)
    }
}

/// Identity of a pack file (`packs/<id as 16 hex digits>.pack`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PackId(u64);

impl PackId {
    pub fn get(self) -> u64 {
        self.0
    }
    pub(crate) fn new(v: u64) -> Self {
        PackId(v)
    }
}
/// A pack named by its id (1 to 16 hex digits) or by one of its files
/// (`0000000000000001.pack` or `.idx`, with or without a directory).
impl std::str::FromStr for PackId {
    type Err = String;
    fn from_str(s: &str) -> Result<PackId, String> {
        let base = s.rsplit('/').next().unwrap_or(s);
        let stem = base
            .strip_suffix(".pack")
            .or_else(|| base.strip_suffix(".idx"))
            .unwrap_or(base);
        if stem.is_empty() || stem.len() > 16 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{s:?} is not a pack: give its id (16 hex digits, as in packs/0000000000000001.pack) or the path of its .pack or .idx file"
            ));
        }
        u64::from_str_radix(stem, 16)
            .map(PackId)
            .map_err(|e| format!("{s:?} is not a pack id: {e}"))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A validated template name: 1..=128 chars of `[A-Za-z0-9._-]`, not starting
/// with `.` (it is used as a file name).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TemplateName(String);

impl TemplateName {
    pub fn new(name: &str) -> Result<Self, NameError> {
        let ok_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if name.is_empty() || name.len() > 128 || !ok_chars || name.starts_with('.') {
            return Err(NameError {
                name: name.to_string(),
            });
        }
        Ok(TemplateName(name.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Display for TemplateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl AsRef<str> for TemplateName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Default store directory: `$VMM_STORE`, else `$XDG_DATA_HOME/vmm/store`,
/// else `~/.local/share/vmm/store` (`None` if not even `$HOME` is set).
pub fn default_store_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = nonempty("VMM_STORE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = nonempty("XDG_DATA_HOME") {
        return Some(PathBuf::from(d).join("vmm").join("store"));
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".local/share/vmm/store"))
}

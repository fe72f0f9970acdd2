//! Error types, one per operation area. Each variant names the failing step,
//! the path involved, and what the user can do about it.

use std::io;
use std::path::PathBuf;

use crate::{PageId, TemplateName};

/// A template name that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid template name {name:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")]
pub struct NameError {
    pub name: String,
}

/// Opening or creating a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("creating store directory {path}: {source} (check permissions, or set $VMM_STORE to a writable directory)")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("no store at {path} (it has no store.cfg)")]
    NotAStore { path: PathBuf },
    #[error("{path} holds {packs} file(s) in packs/ and {templates} in templates/ but no store.cfg: the store is damaged, not new, and its page secret was in that file. Restore store.cfg from a backup; a new config would make every stored template unreadable, so none is created (to start a new store, use another directory or move this one away)")]
    MissingConfig {
        path: PathBuf,
        packs: u64,
        templates: u64,
    },
    #[error("{path} is not a store (no store.cfg) and is not empty (it holds {entry:?}); a new store is only created in an empty or new directory: choose another directory")]
    NotEmpty { path: PathBuf, entry: String },
    #[error("listing {path}: {source} (check permissions of the store directory)")]
    ListDir { path: PathBuf, source: io::Error },
    #[error("locking {path}: {source} (check permissions of the store directory)")]
    Lock { path: PathBuf, source: io::Error },
    #[error("reading store config {path}: {source}")]
    ReadConfig { path: PathBuf, source: io::Error },
    #[error("store config {path} is damaged ({reason}); the page secret is lost, so the store cannot be extended: restore store.cfg from a backup or start a new store")]
    BadConfig { path: PathBuf, reason: String },
    #[error("store config {path} has format version {found}, this build supports {supported}: upgrade the VMM")]
    FutureConfig {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("writing store config {path}: {source} (check free space and permissions)")]
    WriteConfig { path: PathBuf, source: io::Error },
    #[error("getting random bytes for the store secret: {0}")]
    Random(String),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Reading pack indexes (at open, refresh, and commit).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("listing pack directory {path}: {source}")]
    ListPacks { path: PathBuf, source: io::Error },
    #[error("reading pack index {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "pack index {path} is damaged: {reason}; run `vmm-store verify`, which says how to repair it"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("pack index {path} has format version {found}, this build supports {supported}: upgrade the VMM")]
    FutureVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("mapping pack {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
}

/// Decoding a template manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading manifest {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("manifest {path} is not a template manifest ({reason}); remove it or restore it from a backup")]
    NotAManifest { path: PathBuf, reason: String },
    #[error("manifest {path} has format version {found}, this build supports {supported}: upgrade the VMM to load it")]
    FutureVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("manifest {path} is truncated or has trailing bytes (header says {expected} payload bytes, file has {found}); re-create the template")]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("manifest {path} checksum mismatch (stored {stored:032x}, computed {computed:032x}): the file is damaged; re-create the template")]
    Checksum {
        path: PathBuf,
        stored: u128,
        computed: u128,
    },
    #[error("manifest {path} payload does not decode: {source}; re-create the template")]
    Decode {
        path: PathBuf,
        source: bincode::error::DecodeError,
    },
    #[error("manifest {path} is inconsistent: {reason}; re-create the template")]
    Invalid { path: PathBuf, reason: String },
}

/// Loading and resolving templates.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("the stored page of guest frame {frame} does not match its hash: a pack is damaged; run `vmm-store verify` and recreate the affected templates")]
    PageCorrupt { frame: u64 },
    #[error("template {name} not found (no {path})")]
    NotFound { name: TemplateName, path: PathBuf },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("listing templates in {path}: {source}")]
    List { path: PathBuf, source: io::Error },
    #[error("template {child} is layered on {parent}, which does not exist: re-create {parent} (with the same contents) or remove {child}")]
    MissingParent {
        child: TemplateName,
        parent: TemplateName,
    },
    #[error("template parent chain has a cycle: {}; re-create one of these templates", chain.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(" -> "))]
    ParentCycle { chain: Vec<TemplateName> },
    #[error("template {name} has a parent chain longer than {max} layers; flatten it")]
    TooDeep { name: TemplateName, max: usize },
    #[error("template {child} has {child_size} bytes of guest memory but its parent {parent} has {parent_size}; layers must have the same memory size")]
    SizeMismatch {
        child: TemplateName,
        child_size: u64,
        parent: TemplateName,
        parent_size: u64,
    },
    #[error("template {template} frame {frame} uses page {page} which is not in any pack index (or lies past the end of its pack): the store is damaged; run `vmm-store verify`")]
    PageMissing {
        template: TemplateName,
        frame: u64,
        page: PageId,
    },
    #[error("template {template} frame {frame} uses page {page}, whose pack cannot be read ({reason}): fix the pack file's permissions (whoever restores must be able to read it) or restore it from a backup")]
    PackUnreadable {
        template: TemplateName,
        frame: u64,
        page: PageId,
        reason: String,
    },
    #[error("template {template} frame {frame} uses page {page}, which is in no readable pack index; an index cannot be used ({reason}): fix its permissions, or run `vmm-store verify`")]
    IndexUnreadable {
        template: TemplateName,
        frame: u64,
        page: PageId,
        reason: String,
    },
    #[error("guest memory buffer is {found} bytes but template has {expected}")]
    BufferSize { expected: u64, found: u64 },
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Writing (committing) a template.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("guest memory size {mem_size} is not a non-zero multiple of 4096 (at most 4 GiB)")]
    BadMemSize { mem_size: u64 },
    #[error("frame {frame} is outside guest memory ({frames} frames)")]
    FrameOutOfRange { frame: u64, frames: u64 },
    #[error("memory slice of {len} bytes is not a multiple of 4096")]
    UnalignedSlice { len: usize },
    #[error("working set frame {frame} is outside guest memory ({frames} frames)")]
    WorkingSetOutOfRange { frame: u64, frames: u64 },
    #[error("template {name} already exists ({path}): remove it first, or choose another name")]
    AlreadyExists { name: TemplateName, path: PathBuf },
    #[error("template {name} not found (no {path})")]
    NotFound { name: TemplateName, path: PathBuf },
    #[error("template {name} cannot be rewritten: {source}")]
    Manifest {
        name: TemplateName,
        source: Box<ManifestError>,
    },
    #[error("cannot layer on {parent}: {source}")]
    Parent {
        parent: TemplateName,
        source: Box<LoadError>,
    },
    #[error("template {name} cannot be its own parent")]
    SelfParent { name: TemplateName },
    #[error("template {child} has {child_size} bytes of guest memory but its parent {parent} has {parent_size}; layers must have the same memory size")]
    SizeMismatch {
        child: TemplateName,
        child_size: u64,
        parent: TemplateName,
        parent_size: u64,
    },
    #[error("taking the store write lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("{step} ({path}): {source}; check free space and permissions. The store stays consistent; retry the commit")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("pack {path} cannot be extended: {reason}; run `vmm-store verify`")]
    BadPack { path: PathBuf, reason: String },
    #[cfg(test)]
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

/// Removing a template.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("template {name} not found ({path})")]
    NotFound { name: TemplateName, path: PathBuf },
    #[error("template {name} cannot be removed: templates {} are layered on it; remove them first", children.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "))]
    HasChildren {
        name: TemplateName,
        children: Vec<TemplateName>,
    },
    #[error("taking the store write lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("{step} ({path}): {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Garbage collection.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("gc: taking the store write lock {path}: {source} (check permissions of the store directory)")]
    Lock { path: PathBuf, source: io::Error },
    #[error("gc: listing templates: {0}")]
    Templates(LoadError),
    #[error("gc refused: template manifest {path} is unreadable ({source}), so the pages it needs are unknown; run `vmm-store verify`, then remove or restore that template and run gc again")]
    UnreadableTemplate {
        path: PathBuf,
        source: Box<LoadError>,
    },
    #[error("gc refused, nothing was changed: templates {} need {pages} page(s) that no pack index accounts for (an index is missing, damaged, stale or from another store, or the pages are damaged), so deleting or truncating a pack could lose them; {}. Run `vmm-store verify` for details, then rebuild the index or remove or re-create these templates, and run gc again", crate::scan::name_list(templates, 8), if packs.is_empty() { "no pack holds them any more".to_string() } else { format!("pack(s) {} still hold them", packs.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")) })]
    Unaccounted {
        templates: Vec<TemplateName>,
        pages: u64,
        /// Packs whose bytes hold some of those pages (their index can be rebuilt).
        packs: Vec<crate::PackId>,
    },
    #[error("gc: {step} ({path}): {source}; the store stays consistent (run `vmm-store verify`), free space or fix permissions and run gc again")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("gc: re-reading pack indexes: {0}")]
    Index(IndexError),
    #[error("gc: {0}")]
    Injected(String),
}

/// Building a template's memory image in the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{step} {path}: {source} (the image cache is derived data: free space or fix permissions of the store's cache/ directory, or use another memory strategy)")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Rebuilding a pack's index from the pack.
#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    #[error("reindex: taking the store write lock {path}: {source} (check permissions of the store directory)")]
    Lock { path: PathBuf, source: io::Error },
    #[error("reindex: there is no pack file {path}")]
    NoPack { path: PathBuf },
    #[error("reindex: reading pack {path}: {source} (check its permissions)")]
    Read { path: PathBuf, source: io::Error },
    #[error("reindex: writing the new index {path}: {source}; the old index is unchanged: free space or fix permissions and retry")]
    Write { path: PathBuf, source: io::Error },
    #[error("reindex: re-reading pack indexes: {0}")]
    Index(#[from] IndexError),
}

/// Exporting a template to a file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("export: {0}")]
    Load(#[from] LoadError),
    #[error("export: taking the store read lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("export: reading manifest {path}: {source}")]
    ReadManifest { path: PathBuf, source: io::Error },
    #[error("export: template {name} changed while being exported; retry")]
    Changed { name: TemplateName },
    #[error("export: page {page} of template {template} is missing or damaged; run `vmm-store verify` and re-create the template")]
    DamagedPage {
        template: TemplateName,
        page: PageId,
    },
    #[error(
        "export: writing the export file: {source} (check free space and the destination path)"
    )]
    Write { source: io::Error },
}

/// Importing an exported template file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(
        "import: not a template export file (bad magic); pass a file written by `vmm-store export`"
    )]
    NotAnExport,
    #[error("import: the file has export format version {found}, this build supports {supported}: upgrade vmm-store")]
    FutureVersion { found: u16, supported: u16 },
    #[error("import: the file is truncated (ended inside the {what}); copy it again")]
    Truncated { what: &'static str },
    #[error("import: reading the {what}: {source}")]
    Read {
        what: &'static str,
        source: io::Error,
    },
    #[error("import: the file is damaged ({what}: {reason}); nothing was imported, copy it again")]
    Corrupt { what: String, reason: String },
    #[error("import: {0}")]
    Manifest(#[from] ManifestError),
    #[error("import: {0}")]
    Name(#[from] NameError),
    #[error("import: a different template named {name} already exists in this store ({reason}); nothing was imported: remove it first (`vmm-store` cannot rename on import)")]
    Conflict { name: TemplateName, reason: String },
    #[error("import: taking the store write lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("import: {step} ({path}): {source}; check free space and permissions and retry (the store stays consistent)")]
    Store {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("import: writing pages: {0}")]
    Write(#[from] WriteError),
    #[error("import: {0}")]
    Index(#[from] IndexError),
}

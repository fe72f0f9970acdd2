//! The store: directory layout, open/create (config, secret), the template
//! manifests (read, list, remove, parent chains). Packs and their indexes are in
//! `packs`, the writer in `writer`, resolving in `resolve`, checking in `verify`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use xxhash_rust::xxh3::xxh3_128_with_secret;

use crate::error::{LoadError, ManifestError, OpenError, RemoveError, WriteError};
use crate::format::{self, ConfigProblem, SECRET_LEN};
use crate::packs::PackSet;
use crate::resolve::{Template, TemplateInfo, TemplateList};
use crate::util::{read_regular, take_lock};
use crate::{PackId, TemplateName, PAGE_SIZE};

/// Longest parent chain resolve() follows.
pub(crate) const MAX_DEPTH: usize = 256;
const PAGE: u64 = PAGE_SIZE as u64;

/// An open store. Reading (load, list, resolve, verify, stats, export) goes
/// through `&self` and may run on many threads at once (`Store` is `Send +
/// Sync`): the view of the packs is an immutable snapshot that a refresh
/// replaces, and a [`Resolved`](crate::Resolved) template keeps the snapshot it
/// was resolved against. Writing (commit, remove, gc, import, reindex) takes
/// `&mut self`; concurrent writers in other threads or processes open a
/// `Store` of their own: they serialise on the store's `LOCK` file.
pub struct Store {
    pub(crate) dir: PathBuf,
    pub(crate) hasher: PageHasher,
    /// The current pack view, replaced whole by a refresh.
    pub(crate) view: RwLock<Arc<PackSet>>,
    /// Held by a refresh, so that refreshes do not race to install their views.
    pub(crate) refreshing: Mutex<()>,
    /// Opened by [`Store::open_lazy`]: resolving uses the templates' location
    /// records before the pack indexes.
    pub(crate) lazy: bool,
    /// Whether the pack indexes have been read into the view (always, except
    /// in a lazy store that has not needed them yet).
    pub(crate) indexed: AtomicBool,
    #[cfg(test)]
    pub(crate) fail_at: Option<&'static str>,
}

/// The store's keyed page hash, shared with the templates resolved from it.
#[derive(Clone)]
pub(crate) struct PageHasher {
    secret: Arc<[u8; SECRET_LEN]>,
    /// Tests: every page "hashes" to this.
    #[cfg(test)]
    pub(crate) force: Option<u128>,
}

impl PageHasher {
    pub(crate) fn hash(&self, b: &[u8]) -> u128 {
        #[cfg(test)]
        if let Some(h) = self.force {
            return h;
        }
        xxh3_128_with_secret(b, &self.secret[..])
    }

    /// Keyed XXH3-128 of any bytes (artifact checksums; never forced by tests).
    pub(crate) fn keyed(&self, b: &[u8]) -> u128 {
        xxh3_128_with_secret(b, &self.secret[..])
    }
}

impl Store {
    pub(crate) fn cfg_path(&self) -> PathBuf {
        self.dir.join("store.cfg")
    }
    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
    pub(crate) fn templates_dir(&self) -> PathBuf {
        self.dir.join("templates")
    }
    pub(crate) fn pack_path(&self, id: PackId) -> PathBuf {
        self.packs_dir().join(format!("{id}.pack"))
    }
    pub(crate) fn idx_path(&self, id: PackId) -> PathBuf {
        self.packs_dir().join(format!("{id}.idx"))
    }
    pub(crate) fn manifest_path(&self, name: &TemplateName) -> PathBuf {
        self.templates_dir().join(format!("{name}.tmpl"))
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens an existing store (fails with [`OpenError::NotAStore`] if there is none).
    /// Damaged pack indexes do not fail the open: their pages are unavailable
    /// and [`Store::verify`] reports them.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, OpenError> {
        let s = Store::open_unindexed(dir.as_ref(), false)?;
        s.refresh()?;
        Ok(s)
    }

    /// Opens an existing store without reading its pack indexes, for callers
    /// that restore a few templates from a large store (a one-shot `vmm restore`):
    /// [`Template::resolve`] then reads the template's location records
    /// (`templates/<name>.loc`, one per layer) and maps only the packs they
    /// name, so its cost follows the template's size, not the store's. A
    /// record that is missing, damaged, stale or does not match its manifest is
    /// passed over for the pack indexes, as [`Store::open`] uses them (see
    /// [`Resolved::location_fallback`](crate::Resolved::location_fallback));
    /// every other operation reads the indexes on first need, so everything
    /// works as on a store from [`Store::open`].
    pub fn open_lazy(dir: impl AsRef<Path>) -> Result<Store, OpenError> {
        Store::open_unindexed(dir.as_ref(), true)
    }

    /// Whether the pack indexes have been read (always true for [`Store::open`];
    /// false for [`Store::open_lazy`] until an operation needed them).
    pub fn indexes_loaded(&self) -> bool {
        self.indexed.load(Ordering::Acquire)
    }

    fn open_unindexed(dir: &Path, lazy: bool) -> Result<Store, OpenError> {
        let dir = dir.to_path_buf();
        let cfg = dir.join("store.cfg");
        let bytes = match read_regular(&cfg) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Store data without a config is a damaged store, not a missing one.
                return Err(match uninitialised(&dir) {
                    Err(e @ OpenError::MissingConfig { .. }) => e,
                    _ => OpenError::NotAStore { path: dir },
                });
            }
            Err(source) => return Err(OpenError::ReadConfig { path: cfg, source }),
        };
        let secret = match format::decode_config(&bytes) {
            Ok(s) => s,
            Err(ConfigProblem::Bad(reason)) => {
                return Err(OpenError::BadConfig { path: cfg, reason })
            }
            Err(ConfigProblem::Future(found)) => {
                return Err(OpenError::FutureConfig {
                    path: cfg,
                    found,
                    supported: format::CFG_MAJOR,
                })
            }
        };
        for sub in ["packs", "templates", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|source| OpenError::CreateDir { path: p, source })?;
        }
        let s = Store {
            dir,
            hasher: PageHasher {
                secret: Arc::from(secret),
                #[cfg(test)]
                force: None,
            },
            view: RwLock::new(Arc::default()),
            refreshing: Mutex::new(()),
            lazy,
            indexed: AtomicBool::new(false),
            #[cfg(test)]
            fail_at: None,
        };
        Ok(s)
    }

    /// Opens the store at `dir`, creating it (with a fresh random secret) if
    /// `dir` does not exist or is empty. A directory that holds packs or
    /// manifests but no `store.cfg` is a damaged store and is refused with
    /// [`OpenError::MissingConfig`] (a new secret would make every page in it
    /// unreadable); any other non-empty directory with [`OpenError::NotEmpty`].
    pub fn create_or_open(dir: impl AsRef<Path>) -> Result<Store, OpenError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.into(),
            source,
        })?;
        let cfg = dir.join("store.cfg");
        if !config_exists(&cfg)? {
            let _lock = take_lock(dir, true).map_err(|source| OpenError::Lock {
                path: dir.join("LOCK"),
                source,
            })?;
            if !config_exists(&cfg)? {
                uninitialised(dir)?;
                let tmp = dir.join("tmp");
                fs::create_dir_all(&tmp).map_err(|source| OpenError::CreateDir {
                    path: tmp.clone(),
                    source,
                })?;
                let mut secret = [0u8; SECRET_LEN];
                getrandom::fill(&mut secret).map_err(|e| OpenError::Random(e.to_string()))?;
                format::write_atomic(&tmp, &cfg, &format::encode_config(&secret), || true)
                    .map_err(|source| OpenError::WriteConfig {
                        path: cfg.clone(),
                        source,
                    })?;
            }
        }
        Store::open(dir)
    }

    pub(crate) fn hash_page(&self, b: &[u8]) -> u128 {
        self.hasher.hash(b)
    }

    #[cfg(test)]
    pub(crate) fn fail(&self, at: &'static str) -> Result<(), WriteError> {
        if self.fail_at == Some(at) {
            return Err(WriteError::Injected(at));
        }
        Ok(())
    }
    #[cfg(not(test))]
    #[inline(always)]
    pub(crate) fn fail(&self, _at: &'static str) -> Result<(), WriteError> {
        Ok(())
    }

    /// Number of distinct pages in the store's index.
    pub fn page_count(&self) -> usize {
        self.view().index.len()
    }

    pub(crate) fn read_template(&self, name: &TemplateName) -> Result<Template, LoadError> {
        let path = self.manifest_path(name);
        let bytes = match read_regular(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LoadError::NotFound {
                    name: name.clone(),
                    path,
                })
            }
            Err(source) => return Err(ManifestError::Read { path, source }.into()),
        };
        let m = format::decode_manifest(&path, &bytes)?;
        if m.name != name.as_str() {
            return Err(ManifestError::Invalid {
                path,
                reason: format!("it names template {:?}, not {name}", m.name),
            }
            .into());
        }
        let mut t = Template::from_manifest(m, &path)?;
        t.manifest_sum = format::manifest_sum(&bytes);
        Ok(t)
    }

    /// Loads and verifies (checksum, structure) a template manifest. Refreshes
    /// the pack view first so templates written by other processes resolve.
    pub fn load(&self, name: &str) -> Result<Template, LoadError> {
        let name = TemplateName::new(name)?;
        let t = self.read_template(&name)?;
        // A lazy store that has not read the indexes does not start now.
        if self.indexes_loaded() {
            self.refresh()?;
        }
        Ok(t)
    }

    pub(crate) fn template_names(&self) -> Result<Vec<TemplateName>, LoadError> {
        let dir = self.templates_dir();
        let rd = fs::read_dir(&dir).map_err(|source| LoadError::List {
            path: dir.clone(),
            source,
        })?;
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(|source| LoadError::List {
                path: dir.clone(),
                source,
            })?;
            let fname = e.file_name();
            let Some(stem) = fname.to_str().and_then(|s| s.strip_suffix(".tmpl")) else {
                continue;
            };
            if let Ok(n) = TemplateName::new(stem) {
                names.push(n);
            }
        }
        names.sort();
        Ok(names)
    }

    /// All templates, sorted by name. Fails on the first unreadable manifest;
    /// [`Store::list_all`] lists the readable ones and the unreadable ones apart.
    pub fn list(&self) -> Result<Vec<TemplateInfo>, LoadError> {
        self.template_names()?
            .iter()
            .map(|n| self.read_template(n).map(|t| t.info()))
            .collect()
    }

    /// Every template, sorted by name: the readable ones, and apart, those
    /// whose manifest cannot be read, with the reason. Fails only when the
    /// templates directory itself cannot be listed.
    pub fn list_all(&self) -> Result<TemplateList, LoadError> {
        let mut out = TemplateList::default();
        for n in self.template_names()? {
            match self.read_template(&n) {
                Ok(t) => out.templates.push(t.info()),
                Err(e) => out.unreadable.push((n, e)),
            }
        }
        Ok(out)
    }

    /// Atomically rewrites template `name`'s manifest with a new working set
    /// (guest frame numbers in first-touch order); pages and state are
    /// unchanged. Runs under the writer lock: temp file, fsync, rename.
    pub fn set_working_set(&mut self, name: &str, frames: Vec<u64>) -> Result<(), WriteError> {
        let name = TemplateName::new(name)?;
        let _lock = take_lock(&self.dir, true).map_err(|source| WriteError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        let path = self.manifest_path(&name);
        let bytes = match read_regular(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(WriteError::NotFound { name, path })
            }
            Err(source) => {
                return Err(WriteError::Io {
                    step: "reading manifest",
                    path,
                    source,
                })
            }
        };
        let mut m = format::decode_manifest(&path, &bytes).map_err(|e| WriteError::Manifest {
            name: name.clone(),
            source: Box::new(e),
        })?;
        let nframes = m.mem_size / PAGE;
        if let Some(&frame) = frames.iter().find(|&&f| f >= nframes) {
            return Err(WriteError::WorkingSetOutOfRange {
                frame,
                frames: nframes,
            });
        }
        m.working_set = frames;
        let out = format::encode_manifest(&m);
        format::write_atomic(&self.tmp_dir(), &path, &out, || true).map_err(|source| {
            WriteError::Io {
                step: "writing manifest",
                path: path.clone(),
                source,
            }
        })?;
        // Same pages: the location record stays valid, bound to the new manifest.
        self.rebind_locations(
            &name,
            format::manifest_sum(&bytes),
            format::manifest_sum(&out),
        );
        Ok(())
    }

    /// Removes a template. Refuses if other templates are layered on it.
    /// Its pages stay in the packs (reported as garbage by `verify`); its
    /// cached memory images go.
    pub fn remove(&mut self, name: &str) -> Result<(), RemoveError> {
        let name = TemplateName::new(name)?;
        let _lock = take_lock(&self.dir, true).map_err(|source| RemoveError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        let path = self.manifest_path(&name);
        if !path.exists() {
            return Err(RemoveError::NotFound { name, path });
        }
        let names = self.template_names().map_err(|e| RemoveError::Io {
            step: "listing templates",
            path: self.templates_dir(),
            source: io::Error::other(e.to_string()),
        })?;
        let children: Vec<TemplateName> = names
            .iter()
            .filter_map(|n| self.read_template(n).ok())
            .filter(|t| t.parent.as_ref() == Some(&name))
            .map(|t| t.name)
            .collect();
        if !children.is_empty() {
            return Err(RemoveError::HasChildren { name, children });
        }
        fs::remove_file(&path).map_err(|source| RemoveError::Io {
            step: "removing manifest",
            path: path.clone(),
            source,
        })?;
        // A record left by a crash here is an orphan: verify reports it, gc removes it.
        let loc = self.loc_path(&name);
        self.remove_locations(&name)
            .map_err(|source| RemoveError::Io {
                step: "removing location record",
                path: loc,
                source,
            })?;
        let tdir = self.templates_dir();
        format::fsync_dir(&tdir).map_err(|source| RemoveError::Io {
            step: "syncing templates directory",
            path: tdir,
            source,
        })?;
        self.remove_cached_images(&name);
        // A learned working set left by a crash here is bound to a manifest that is gone:
        // never used, and gc removes it.
        let _ = self.remove_learned(&name);
        Ok(())
    }

    /// Walks the parent chain of `t`: returns ancestors from root to direct parent.
    pub(crate) fn ancestors(&self, t: &Template) -> Result<Vec<Template>, LoadError> {
        let mut seen = vec![t.name.clone()];
        let mut out: Vec<Template> = Vec::new();
        let mut next = t.parent.clone();
        while let Some(p) = next {
            if seen.contains(&p) {
                seen.push(p);
                return Err(LoadError::ParentCycle { chain: seen });
            }
            if seen.len() > MAX_DEPTH {
                return Err(LoadError::TooDeep {
                    name: t.name.clone(),
                    max: MAX_DEPTH,
                });
            }
            let child = seen.last().cloned().unwrap_or_else(|| t.name.clone());
            let pt = match self.read_template(&p) {
                Ok(pt) => pt,
                Err(LoadError::NotFound { .. }) => {
                    return Err(LoadError::MissingParent { child, parent: p })
                }
                Err(e) => return Err(e),
            };
            if pt.mem_size != t.mem_size {
                return Err(LoadError::SizeMismatch {
                    child,
                    child_size: t.mem_size,
                    parent: p,
                    parent_size: pt.mem_size,
                });
            }
            seen.push(p);
            next = pt.parent.clone();
            out.push(pt);
        }
        out.reverse();
        Ok(out)
    }

    pub(crate) fn clean_tmp(&self) {
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn config_exists(cfg: &Path) -> Result<bool, OpenError> {
    match fs::symlink_metadata(cfg) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(OpenError::ReadConfig {
            path: cfg.to_path_buf(),
            source,
        }),
    }
}

/// Checks that `dir` (which has no `store.cfg`) holds nothing but what an
/// interrupted creation leaves: `LOCK`, `tmp/` and empty `packs/`,
/// `templates/`, `cache/`, `artifacts/`. Packs or manifests mean a store that lost its
/// config ([`OpenError::MissingConfig`]); anything else a directory that is
/// not a store ([`OpenError::NotEmpty`]).
fn uninitialised(dir: &Path) -> Result<(), OpenError> {
    let list = |d: &Path| -> Result<Vec<String>, OpenError> {
        match fs::read_dir(d) {
            Ok(rd) => rd
                .map(|e| {
                    e.map(|e| e.file_name().to_string_lossy().into_owned())
                        .map_err(|source| OpenError::ListDir {
                            path: d.to_path_buf(),
                            source,
                        })
                })
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(OpenError::ListDir {
                path: d.to_path_buf(),
                source,
            }),
        }
    };
    let is_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let packs = if is_dir(&dir.join("packs")) {
        list(&dir.join("packs"))?.len() as u64
    } else {
        0
    };
    // Manifests and whatever else is there, but not their location records.
    let templates = if is_dir(&dir.join("templates")) {
        list(&dir.join("templates"))?
            .iter()
            .filter(|n| !n.ends_with(".loc") && !n.ends_with(".ws"))
            .count() as u64
    } else {
        0
    };
    if packs > 0 || templates > 0 {
        return Err(OpenError::MissingConfig {
            path: dir.to_path_buf(),
            packs,
            templates,
        });
    }
    let mut names = list(dir)?;
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let ours = match name.as_str() {
            "LOCK" => fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()),
            "tmp" => is_dir(&p),
            "packs" | "templates" | "cache" | "artifacts" => is_dir(&p) && list(&p)?.is_empty(),
            _ => false,
        };
        if !ours {
            return Err(OpenError::NotEmpty {
                path: dir.to_path_buf(),
                entry: name,
            });
        }
    }
    Ok(())
}

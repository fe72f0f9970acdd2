//! The store: packs + indexes + manifests, writer, resolver, verifier.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{Mmap, MmapOptions};
use xxhash_rust::xxh3::xxh3_128_with_secret;

use crate::error::{IndexError, LoadError, ManifestError, OpenError, RemoveError, WriteError};
use crate::format::{self, ConfigProblem, IdxEntry, ManifestV1, IDX_HEADER, SECRET_LEN};
use crate::{PackId, PageId, TemplateName, PAGE_SIZE};

/// A pack is closed (a new one started) once it holds this many bytes.
const PACK_TARGET: u64 = 1 << 30;
/// Longest parent chain resolve() follows.
const MAX_DEPTH: usize = 256;
const PAGE: u64 = PAGE_SIZE as u64;

/// The page hash is already keyed and uniformly distributed: use it directly.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 ^= (i as u64) ^ ((i >> 64) as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.0 ^= u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
pub(crate) type IdMap<V> = HashMap<PageId, V, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) pack: u32,
    pub(crate) offset: u64,
}

type Stamp = (u64, u64, i64, i64);

struct Pack {
    id: PackId,
    /// Mapping of the indexed part of the pack (None if empty or missing).
    map: Option<Mmap>,
    indexed_end: u64,
    idx_stamp: Option<Stamp>,
    loaded: bool,
    problem: Option<String>,
    /// Inode of the pack file when loaded: a different inode means the pack
    /// was deleted (by `gc`) and its id reused.
    pack_ino: Option<u64>,
    /// Deleted or replaced on disk: its entries are gone from the index, its
    /// mapping is kept (until no writer can hold a location in it) so an
    /// in-flight writer can still copy pages it had deduplicated against.
    retired: bool,
}

/// An open store. Cheap reads go through `&self`; anything that changes the
/// in-memory view of the packs (commit, refresh, load) needs `&mut self`, so
/// page slices handed out by [`Resolved`] stay valid while borrowed.
/// For concurrent writers open one `Store` per thread/process: they
/// serialise on the store's `LOCK` file.
pub struct Store {
    pub(crate) dir: PathBuf,
    secret: Box<[u8; SECRET_LEN]>,
    packs: Vec<Pack>,
    pack_pos: HashMap<PackId, u32>,
    pub(crate) index: IdMap<Loc>,
    #[cfg(test)]
    pub(crate) force_hash: Option<u128>,
    #[cfg(test)]
    pub(crate) fail_at: Option<&'static str>,
}

pub(crate) struct Lock(File);
impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

pub(crate) fn take_lock(dir: &Path, exclusive: bool) -> io::Result<Lock> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("LOCK"))?;
    if exclusive {
        f.lock()?;
    } else {
        f.lock_shared()?;
    }
    Ok(Lock(f))
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn parse_pack_file(name: &str) -> Option<(PackId, bool)> {
    let (stem, is_idx) = if let Some(s) = name.strip_suffix(".idx") {
        (s, true)
    } else {
        (name.strip_suffix(".pack")?, false)
    };
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16)
        .ok()
        .map(|v| (PackId::new(v), is_idx))
}

/// Maps the first `len` bytes of `path` read-only.
pub(crate) fn map_file(path: &Path, len: u64) -> io::Result<Mmap> {
    let f = File::open(path)?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("pack too large to map"))?;
    // SAFETY: the mapping is read-only and covers only bytes the store never
    // rewrites: packs are append-only and writers only ever truncate the
    // unindexed tail beyond the index's end, and callers pass a `len` no larger
    // than both the indexed end and the file size observed just before. If the
    // file is damaged externally (truncated below the index) accesses could
    // fault; `verify` detects that state and `refresh` maps only what exists.
    unsafe { MmapOptions::new().len(len).map(&f) }
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
        let dir = dir.as_ref().to_path_buf();
        let cfg = dir.join("store.cfg");
        let bytes = match fs::read(&cfg) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(OpenError::NotAStore { path: dir })
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
        let mut s = Store {
            dir,
            secret,
            packs: Vec::new(),
            pack_pos: HashMap::new(),
            index: IdMap::default(),
            #[cfg(test)]
            force_hash: None,
            #[cfg(test)]
            fail_at: None,
        };
        s.refresh()?;
        Ok(s)
    }

    /// Opens the store at `dir`, creating it (with a fresh random secret) if needed.
    pub fn create_or_open(dir: impl AsRef<Path>) -> Result<Store, OpenError> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.into(),
            source,
        })?;
        let cfg = dir.join("store.cfg");
        if !cfg.exists() {
            let _lock = take_lock(dir, true).map_err(|source| OpenError::Lock {
                path: dir.join("LOCK"),
                source,
            })?;
            if !cfg.exists() {
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

    /// Re-reads pack indexes changed by other processes (cheap when nothing changed).
    /// Packs deleted or replaced on disk (by `gc`) drop out of the index.
    pub fn refresh(&mut self) -> Result<(), IndexError> {
        self.refresh_inner(true)
    }

    /// `release`: also unmap retired packs (only when no writer can hold a
    /// [`Loc`] into them, i.e. not during a commit).
    pub(crate) fn refresh_inner(&mut self, release: bool) -> Result<(), IndexError> {
        let pdir = self.packs_dir();
        let rd = fs::read_dir(&pdir).map_err(|source| IndexError::ListPacks {
            path: pdir.clone(),
            source,
        })?;
        let mut ids = BTreeSet::new();
        for e in rd {
            let e = e.map_err(|source| IndexError::ListPacks {
                path: pdir.clone(),
                source,
            })?;
            if let Some((id, _)) = e.file_name().to_str().and_then(parse_pack_file) {
                ids.insert(id);
            }
        }
        // Packs gone from disk: their pages are no longer available for dedup.
        let gone: Vec<u32> = self
            .packs
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.retired && !ids.contains(&p.id))
            .map(|(i, _)| i as u32)
            .collect();
        for pos in gone {
            self.retire(pos);
        }
        for id in ids {
            let existing = self.pack_pos.get(&id).copied();
            if let Some(pos) = existing {
                let p = &self.packs[pos as usize];
                if p.loaded {
                    let ino = fs::metadata(self.pack_path(id)).ok().map(|m| m.ino());
                    let idx_gone = p.idx_stamp.is_some() && !self.idx_path(id).exists();
                    let replaced = p.pack_ino.is_some() && ino != p.pack_ino;
                    if idx_gone || replaced {
                        self.retire(pos);
                    }
                }
            }
            let pos = match self.pack_pos.get(&id) {
                Some(&p) => p,
                None => {
                    self.packs.push(Pack {
                        id,
                        map: None,
                        indexed_end: 0,
                        idx_stamp: None,
                        loaded: false,
                        problem: None,
                        pack_ino: None,
                        retired: false,
                    });
                    let p = (self.packs.len() - 1) as u32;
                    self.pack_pos.insert(id, p);
                    p
                }
            };
            self.load_pack(pos);
        }
        if release {
            for p in self.packs.iter_mut().filter(|p| p.retired) {
                p.map = None;
            }
        }
        Ok(())
    }

    /// Forgets a pack that was deleted or replaced on disk.
    fn retire(&mut self, pos: u32) {
        self.index.retain(|_, l| l.pack != pos);
        let p = &mut self.packs[pos as usize];
        p.retired = true;
        self.pack_pos.remove(&p.id);
    }

    /// (Re)loads one pack's index and mapping. Problems are recorded on the pack.
    fn load_pack(&mut self, pos: u32) {
        let id = self.packs[pos as usize].id;
        let idx_path = self.idx_path(id);
        let pack_path = self.pack_path(id);
        let stamp = fs::metadata(&idx_path)
            .ok()
            .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()));
        let pack = &self.packs[pos as usize];
        if pack.loaded && pack.idx_stamp == stamp {
            return;
        }
        let mut indexed_end = 0u64;
        let mut problem = None;
        if stamp.is_some() {
            let res = fs::read(&idx_path)
                .map_err(|source| IndexError::Read {
                    path: idx_path.clone(),
                    source,
                })
                .and_then(|b| format::decode_idx(&idx_path, id, &b));
            match res {
                Ok(entries) => {
                    for e in entries {
                        indexed_end = indexed_end.max(e.offset.saturating_add(PAGE));
                        self.index.insert(
                            e.id,
                            Loc {
                                pack: pos,
                                offset: e.offset,
                            },
                        );
                    }
                }
                Err(e) => problem = Some(e.to_string()),
            }
        }
        let mut map = None;
        let mut pack_ino = None;
        match fs::metadata(&pack_path) {
            Err(_) if indexed_end > 0 => {
                problem = Some(format!("pack file {} is missing", pack_path.display()))
            }
            Err(_) => {}
            Ok(m) => {
                pack_ino = Some(m.ino());
                let len = m.len().min(indexed_end);
                if len < indexed_end {
                    problem = Some(format!(
                        "pack {} is {} bytes but its index needs {indexed_end}",
                        pack_path.display(),
                        m.len()
                    ));
                }
                if len > 0 {
                    match map_file(&pack_path, len) {
                        Ok(m) => map = Some(m),
                        Err(e) => problem = Some(format!("mapping {}: {e}", pack_path.display())),
                    }
                }
            }
        }
        let pack = &mut self.packs[pos as usize];
        pack.map = map;
        pack.indexed_end = indexed_end;
        pack.idx_stamp = stamp;
        pack.loaded = true;
        pack.problem = problem;
        pack.pack_ino = pack_ino;
    }

    pub(crate) fn hash_page(&self, b: &[u8]) -> u128 {
        #[cfg(test)]
        if let Some(h) = self.force_hash {
            return h;
        }
        xxh3_128_with_secret(b, &self.secret[..])
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

    pub(crate) fn loc_bytes(&self, loc: Loc) -> Option<&[u8; PAGE_SIZE]> {
        let m = self.packs.get(loc.pack as usize)?.map.as_ref()?;
        let s = usize::try_from(loc.offset).ok()?;
        m.get(s..s.checked_add(PAGE_SIZE)?)?.try_into().ok()
    }

    /// The bytes of a stored page, straight from the pack mapping (no hashing).
    pub fn page_bytes(&self, id: PageId) -> Option<&[u8; PAGE_SIZE]> {
        self.loc_bytes(*self.index.get(&id)?)
    }

    /// Number of distinct pages in the store's index.
    pub fn page_count(&self) -> usize {
        self.index.len()
    }

    /// Starts writing a new template. `parent` must exist and have the same `mem_size`.
    pub fn begin_template(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        self.begin(name, parent, mem_size, false)
    }

    /// Like [`Store::begin_template`], but commit replaces an existing template of that name.
    pub fn begin_template_replacing(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        self.begin(name, parent, mem_size, true)
    }

    fn begin(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
        replace: bool,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        let name = TemplateName::new(name)?;
        let parent = parent.map(TemplateName::new).transpose()?;
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE) || mem_size > format::MAX_MEM {
            return Err(WriteError::BadMemSize { mem_size });
        }
        if let Some(p) = &parent {
            self.check_parent(&name, p, mem_size)?;
        }
        Ok(TemplateWriter {
            store: self,
            name,
            parent,
            replace,
            mem_size,
            frames: BTreeMap::new(),
            pending: PageBuf::default(),
            pending_hash: Vec::new(),
            pending_map: IdMap::default(),
            vcpu_state: Vec::new(),
            device_state: Vec::new(),
            working_set: Vec::new(),
        })
    }

    fn check_parent(
        &self,
        name: &TemplateName,
        p: &TemplateName,
        mem_size: u64,
    ) -> Result<(), WriteError> {
        if p == name {
            return Err(WriteError::SelfParent { name: name.clone() });
        }
        let pt = self.read_template(p).map_err(|e| WriteError::Parent {
            parent: p.clone(),
            source: Box::new(e),
        })?;
        if pt.mem_size != mem_size {
            return Err(WriteError::SizeMismatch {
                child: name.clone(),
                child_size: mem_size,
                parent: p.clone(),
                parent_size: pt.mem_size,
            });
        }
        Ok(())
    }

    pub(crate) fn read_template(&self, name: &TemplateName) -> Result<Template, LoadError> {
        let path = self.manifest_path(name);
        let bytes = match fs::read(&path) {
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
        Template::from_manifest(m, &path)
    }

    /// Loads and verifies (checksum, structure) a template manifest. Refreshes
    /// the pack view first so templates written by other processes resolve.
    pub fn load(&mut self, name: &str) -> Result<Template, LoadError> {
        let name = TemplateName::new(name)?;
        let t = self.read_template(&name)?;
        self.refresh()?;
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

    /// All templates, sorted by name. Fails on the first unreadable manifest (run `verify`).
    pub fn list(&self) -> Result<Vec<TemplateInfo>, LoadError> {
        self.template_names()?
            .iter()
            .map(|n| self.read_template(n).map(|t| t.info()))
            .collect()
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
        let bytes = match fs::read(&path) {
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
        Ok(())
    }

    /// Removes a template. Refuses if other templates are layered on it.
    /// Its pages stay in the packs (reported as garbage by `verify`).
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
        let tdir = self.templates_dir();
        format::fsync_dir(&tdir).map_err(|source| RemoveError::Io {
            step: "syncing templates directory",
            path: tdir,
            source,
        })?;
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

    /// Space accounting. See [`Stats`].
    pub fn stats(&self) -> Result<Stats, LoadError> {
        let mut templates = Vec::new();
        let all: Vec<Template> = self
            .template_names()?
            .iter()
            .map(|n| self.read_template(n))
            .collect::<Result<_, _>>()?;
        let mut users: IdMap<u32> = IdMap::default();
        for t in &all {
            let own: HashSet<PageId> = t.own_pages().map(|(_, id)| id).collect();
            for id in own {
                *users.entry(id).or_insert(0) += 1;
            }
        }
        let mut logical_bytes = 0;
        let mut logical_nonzero_bytes = 0;
        for t in &all {
            let mut layers = self.ancestors(t)?;
            let nonzero = {
                let mut nz = vec![false; t.frames() as usize];
                layers.push(t.clone());
                for l in &layers {
                    for &(s, n) in &l.zero_runs {
                        nz[s as usize..(s + n) as usize].fill(false);
                    }
                    for (s, pages) in &l.page_runs {
                        nz[*s as usize..*s as usize + pages.len()].fill(true);
                    }
                }
                nz.iter().filter(|&&b| b).count() as u64
            };
            let own: HashSet<PageId> = t.own_pages().map(|(_, id)| id).collect();
            let unique = own.iter().filter(|id| users.get(id) == Some(&1)).count() as u64;
            logical_bytes += t.mem_size;
            logical_nonzero_bytes += nonzero * PAGE;
            templates.push(TemplateStats {
                name: t.name.clone(),
                mem_size: t.mem_size,
                own_pages: t.own_page_count(),
                nonzero_frames: nonzero,
                unique_bytes: unique * PAGE,
            });
        }
        let (mut pack_bytes, mut index_bytes, mut manifest_bytes) = (0, 0, 0);
        for d in [self.packs_dir(), self.templates_dir()] {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.ends_with(".pack") {
                        pack_bytes += len;
                    } else if name.ends_with(".idx") {
                        index_bytes += len;
                    } else {
                        manifest_bytes += len;
                    }
                }
            }
        }
        let config_bytes = fs::metadata(self.cfg_path()).map(|m| m.len()).unwrap_or(0);
        let physical_bytes = pack_bytes + index_bytes + manifest_bytes + config_bytes;
        let shared_pairs = crate::inspect::shared_pairs(&all, 10);
        Ok(Stats {
            templates,
            logical_bytes,
            logical_nonzero_bytes,
            physical_bytes,
            pack_bytes,
            index_bytes,
            manifest_bytes,
            config_bytes,
            shared_pairs,
            stored_pages: self.index.len() as u64,
            referenced_pages: users.len() as u64,
        })
    }

    /// Checks everything, layer by layer, and returns every problem found
    /// (empty = healthy). Reads the disk afresh under a shared lock.
    pub fn verify(&self) -> Vec<Problem> {
        self.verify_with_progress(&mut |_, _| {})
    }

    /// [`Store::verify`] calling `progress(packs done, packs total)`.
    pub fn verify_with_progress(&self, progress: &mut dyn FnMut(u64, u64)) -> Vec<Problem> {
        let mut probs = Vec::new();
        let _lock = match take_lock(&self.dir, false) {
            Ok(l) => Some(l),
            Err(e) => {
                probs.push(Problem::garbage(
                    self.dir.join("LOCK"),
                    format!("cannot take shared lock ({e}); results may include a concurrent writer's in-flight state"),
                    "check permissions of the store directory",
                ));
                None
            }
        };
        // 1. config
        let cfg = self.cfg_path();
        match fs::read(&cfg) {
            Err(e) => probs.push(Problem::corrupt(
                &cfg,
                format!("unreadable: {e}"),
                "restore store.cfg from a backup",
            )),
            Ok(b) => {
                if format::decode_config(&b).is_err() {
                    probs.push(Problem::corrupt(
                        &cfg,
                        "damaged config".into(),
                        "restore store.cfg from a backup",
                    ));
                }
            }
        }
        // 2. packs and indexes
        let valid = self.verify_packs(&mut probs, progress);
        // 3. manifests
        self.verify_templates(&valid, &mut probs);
        // 4. temp files
        if let Ok(rd) = fs::read_dir(self.tmp_dir()) {
            for e in rd.flatten() {
                probs.push(Problem::garbage(
                    e.path(),
                    "leftover temp file of an interrupted write".into(),
                    "harmless; deleted by the next write (or delete it by hand)",
                ));
            }
        }
        probs
    }

    /// Returns the set of valid pages (present, in bounds, hash matches) and per-pack ids.
    fn verify_packs(
        &self,
        probs: &mut Vec<Problem>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> IdMap<PackId> {
        let mut valid: IdMap<PackId> = IdMap::default();
        let pdir = self.packs_dir();
        let rd = match fs::read_dir(&pdir) {
            Ok(rd) => rd,
            Err(e) => {
                probs.push(Problem::corrupt(
                    &pdir,
                    format!("cannot list packs: {e}"),
                    "check the store directory",
                ));
                return valid;
            }
        };
        let mut ids = BTreeSet::new();
        for e in rd.flatten() {
            match e.file_name().to_str().and_then(parse_pack_file) {
                Some((id, _)) => {
                    ids.insert(id);
                }
                None => probs.push(Problem::garbage(
                    e.path(),
                    "unknown file in packs/".into(),
                    "delete it",
                )),
            }
        }
        let total = ids.len() as u64;
        for (k, id) in ids.into_iter().enumerate() {
            progress(k as u64, total);
            let idx_path = self.idx_path(id);
            let pack_path = self.pack_path(id);
            let pack_len = fs::metadata(&pack_path).map(|m| m.len()).ok();
            let entries = match fs::read(&idx_path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if pack_len.unwrap_or(0) > 0 {
                        probs.push(Problem::garbage(
                            &pack_path,
                            format!("{} bytes in a pack with no index (interrupted first write)", pack_len.unwrap_or(0)),
                            "harmless; reused by the next write if it is the newest pack, else delete it",
                        ));
                    }
                    continue;
                }
                Err(e) => {
                    probs.push(Problem::corrupt(
                        &idx_path,
                        format!("unreadable: {e}"),
                        "check permissions; restore from backup",
                    ));
                    continue;
                }
                Ok(b) => match format::decode_idx(&idx_path, id, &b) {
                    Ok(es) => es,
                    Err(e) => {
                        probs.push(Problem::corrupt(
                            &idx_path,
                            e.to_string(),
                            "restore this index (and its pack) from a backup; templates using its pages must be re-created",
                        ));
                        continue;
                    }
                },
            };
            let indexed_end = entries
                .iter()
                .map(|e| e.offset.saturating_add(PAGE))
                .max()
                .unwrap_or(0);
            let Some(pack_len) = pack_len else {
                if !entries.is_empty() {
                    probs.push(Problem::corrupt(
                        &pack_path,
                        format!("pack file missing but its index lists {} pages", entries.len()),
                        "restore the pack from a backup; templates using its pages must be re-created",
                    ));
                }
                continue;
            };
            let entry_end_max = indexed_end;
            if pack_len < entry_end_max {
                probs.push(Problem::corrupt(
                    &pack_path,
                    format!("pack is truncated: {pack_len} bytes, index needs {entry_end_max}"),
                    "restore the pack from a backup; templates using the lost pages must be re-created",
                ));
            } else if pack_len > entry_end_max {
                probs.push(Problem::garbage(
                    &pack_path,
                    format!(
                        "{} unindexed bytes at the pack tail (interrupted write)",
                        pack_len - entry_end_max
                    ),
                    "harmless; truncated by the next write to this pack",
                ));
            }
            let map = if pack_len.min(entry_end_max) > 0 {
                match map_file(&pack_path, pack_len.min(entry_end_max)) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        probs.push(Problem::corrupt(
                            &pack_path,
                            format!("cannot map: {e}"),
                            "check permissions",
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            let mut seen_offsets = HashSet::new();
            for e in &entries {
                let start = e.offset as usize;
                let bytes = map
                    .as_ref()
                    .and_then(|m| m.get(start..start.saturating_add(PAGE_SIZE)));
                let Some(bytes) = bytes else {
                    probs.push(Problem::corrupt(
                        &idx_path,
                        format!("index entry for page {} at offset {} lies past the end of its pack ({pack_len} bytes)", e.id, e.offset),
                        "restore the pack from a backup; templates using this page must be re-created",
                    ));
                    continue;
                };
                if !seen_offsets.insert(e.offset) {
                    probs.push(Problem::corrupt(
                        &idx_path,
                        format!("two index entries point at offset {}", e.offset),
                        "restore the index from a backup",
                    ));
                    continue;
                }
                let h = self.hash_page(bytes);
                if h != e.id.hash() {
                    probs.push(Problem::corrupt(
                        &pack_path,
                        format!("page {} at offset {} is damaged: its bytes hash to {h:032x}", e.id, e.offset),
                        "restore the pack from a backup; templates using this page must be re-created",
                    ));
                    continue;
                }
                valid.insert(e.id, id);
            }
        }
        progress(total, total);
        valid
    }

    fn verify_templates(&self, valid: &IdMap<PackId>, probs: &mut Vec<Problem>) {
        let tdir = self.templates_dir();
        let rd = match fs::read_dir(&tdir) {
            Ok(rd) => rd,
            Err(e) => {
                probs.push(Problem::corrupt(
                    &tdir,
                    format!("cannot list templates: {e}"),
                    "check the store directory",
                ));
                return;
            }
        };
        let mut good: BTreeMap<TemplateName, Template> = BTreeMap::new();
        let mut broken: BTreeSet<TemplateName> = BTreeSet::new();
        for e in rd.flatten() {
            let path = e.path();
            let fname = e.file_name();
            let name = fname
                .to_str()
                .and_then(|s| s.strip_suffix(".tmpl"))
                .and_then(|s| TemplateName::new(s).ok());
            let Some(name) = name else {
                probs.push(Problem::garbage(
                    &path,
                    "unknown file in templates/".into(),
                    "delete it",
                ));
                continue;
            };
            match self.read_template(&name) {
                Ok(t) => {
                    good.insert(name, t);
                }
                Err(e) => {
                    probs.push(Problem::corrupt(
                        &path,
                        e.to_string(),
                        "re-create the template (or restore the manifest from a backup)",
                    ));
                    broken.insert(name);
                }
            }
        }
        let mut referenced: HashSet<PageId> = HashSet::new();
        let mut cycles_reported: BTreeSet<Vec<TemplateName>> = BTreeSet::new();
        for t in good.values() {
            let path = self.manifest_path(&t.name);
            let mut bad_pages = 0u64;
            let mut first_bad = None;
            for (frame, id) in t.own_pages() {
                referenced.insert(id);
                if !valid.contains_key(&id) {
                    bad_pages += 1;
                    first_bad.get_or_insert((frame, id));
                }
            }
            if let Some((frame, id)) = first_bad {
                probs.push(Problem::corrupt(
                    &path,
                    format!("{bad_pages} pages are missing or damaged (first: frame {frame}, page {id})"),
                    "re-create this template (and templates layered on it)",
                ));
            }
            // parent chain
            let mut chain = vec![t.name.clone()];
            let mut cur = t;
            while let Some(p) = &cur.parent {
                if let Some(i) = chain.iter().position(|n| n == p) {
                    let mut cyc: Vec<TemplateName> = chain[i..].to_vec();
                    let min = cyc
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, n)| (*n).clone())
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    cyc.rotate_left(min);
                    if cycles_reported.insert(cyc.clone()) {
                        cyc.push(cyc[0].clone());
                        probs.push(Problem::corrupt(
                            &path,
                            format!(
                                "parent chain has a cycle: {}",
                                cyc.iter()
                                    .map(|n| n.as_str())
                                    .collect::<Vec<_>>()
                                    .join(" -> ")
                            ),
                            "remove and re-create one of these templates",
                        ));
                    }
                    break;
                }
                match good.get(p) {
                    Some(pt) => {
                        if pt.mem_size != cur.mem_size {
                            probs.push(Problem::corrupt(
                                self.manifest_path(&cur.name),
                                format!(
                                    "memory size {} differs from parent {p}'s {}",
                                    cur.mem_size, pt.mem_size
                                ),
                                "re-create the template",
                            ));
                            break;
                        }
                        chain.push(p.clone());
                        cur = pt;
                    }
                    None => {
                        // Report only at the direct child of the missing/broken parent.
                        if cur.name == t.name {
                            let what = if broken.contains(p) {
                                "is unreadable"
                            } else {
                                "does not exist"
                            };
                            probs.push(Problem::corrupt(
                                &path,
                                format!("parent template {p} {what}"),
                                format!(
                                    "re-create {p} with the same contents, or remove {}",
                                    t.name
                                ),
                            ));
                        }
                        break;
                    }
                }
                if chain.len() > MAX_DEPTH {
                    probs.push(Problem::corrupt(
                        &path,
                        "parent chain too deep".into(),
                        "flatten the template",
                    ));
                    break;
                }
            }
        }
        let mut per_pack: BTreeMap<PackId, u64> = BTreeMap::new();
        for (id, pack) in valid {
            if !referenced.contains(id) {
                *per_pack.entry(*pack).or_insert(0) += 1;
            }
        }
        for (pack, n) in per_pack {
            probs.push(Problem::garbage(
                self.pack_path(pack),
                format!("{n} pages ({} bytes) are referenced by no template", n * PAGE),
                "left by removed templates or an interrupted commit; harmless (space is not reclaimed yet)",
            ));
        }
    }
}

// ---------------------------------------------------------------- writer

/// Append-only page buffer in fixed 4 MiB chunks (no realloc copies).
#[derive(Default)]
struct PageBuf {
    chunks: Vec<Vec<u8>>,
}
const CHUNK_PAGES: usize = 1024;
impl PageBuf {
    fn push(&mut self, page: &[u8; PAGE_SIZE]) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK_PAGES * PAGE_SIZE => c.extend_from_slice(page),
            _ => {
                let mut c = Vec::with_capacity(CHUNK_PAGES * PAGE_SIZE);
                c.extend_from_slice(page);
                self.chunks.push(c);
            }
        }
    }
    fn get(&self, i: u32) -> &[u8] {
        let (c, o) = (
            i as usize / CHUNK_PAGES,
            i as usize % CHUNK_PAGES * PAGE_SIZE,
        );
        &self.chunks[c][o..o + PAGE_SIZE]
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Zero,
    /// Already stored at this location when recorded.
    Known(PageId, Loc),
    Pending(u32),
}

/// Collects one template's pages and state; nothing is visible until [`TemplateWriter::commit`].
/// New (not yet stored) pages are buffered in memory until commit.
pub struct TemplateWriter<'a> {
    store: &'a mut Store,
    name: TemplateName,
    parent: Option<TemplateName>,
    replace: bool,
    mem_size: u64,
    frames: BTreeMap<u64, Slot>,
    pending: PageBuf,
    pending_hash: Vec<u128>,
    pending_map: IdMap<u32>,
    vcpu_state: Vec<u8>,
    device_state: Vec<u8>,
    working_set: Vec<u64>,
}

/// Result of a commit.
#[derive(Clone, Debug)]
pub struct CommitInfo {
    pub info: TemplateInfo,
    /// Pages written to a pack by this commit.
    pub new_pages: u64,
    /// Non-zero frames whose page was already stored (deduplicated).
    pub reused_pages: u64,
}

impl TemplateWriter<'_> {
    fn frames(&self) -> u64 {
        self.mem_size / PAGE
    }

    fn check_frame(&self, frame: u64) -> Result<(), WriteError> {
        if frame >= self.frames() {
            return Err(WriteError::FrameOutOfRange {
                frame,
                frames: self.frames(),
            });
        }
        Ok(())
    }

    fn pending_page(&self, i: u32) -> &[u8] {
        self.pending.get(i)
    }

    /// Records the contents of guest frame `frame`. All-zero pages are recorded as Zero.
    pub fn put_page(&mut self, frame: u64, bytes: &[u8; PAGE_SIZE]) -> Result<(), WriteError> {
        self.check_frame(frame)?;
        if is_zero(bytes) {
            self.frames.insert(frame, Slot::Zero);
            return Ok(());
        }
        let h = self.store.hash_page(bytes);
        let mut slot = 0;
        while let Some(loc) = self.store.index.get(&PageId::new(h, slot)) {
            if self.store.loc_bytes(*loc) == Some(bytes) {
                let loc = *loc;
                self.frames
                    .insert(frame, Slot::Known(PageId::new(h, slot), loc));
                return Ok(());
            }
            slot += 1;
        }
        let mut ls = 0;
        while let Some(&i) = self.pending_map.get(&PageId::new(h, ls)) {
            if self.pending_page(i) == bytes {
                self.frames.insert(frame, Slot::Pending(i));
                return Ok(());
            }
            ls += 1;
        }
        let i = self.pending_hash.len() as u32;
        self.pending.push(bytes);
        self.pending_hash.push(h);
        self.pending_map.insert(PageId::new(h, ls), i);
        self.frames.insert(frame, Slot::Pending(i));
        Ok(())
    }

    /// Records consecutive frames from a page-aligned slice of guest memory
    /// starting at `first_frame` (e.g. the whole guest RAM for a base template).
    pub fn put_memory(&mut self, first_frame: u64, mem: &[u8]) -> Result<(), WriteError> {
        if !mem.len().is_multiple_of(PAGE_SIZE) {
            return Err(WriteError::UnalignedSlice { len: mem.len() });
        }
        for (i, chunk) in mem.chunks_exact(PAGE_SIZE).enumerate() {
            if let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(chunk) {
                self.put_page(first_frame + i as u64, page)?;
            }
        }
        Ok(())
    }

    /// Records frame `frame` as all zeros (overriding the parent).
    pub fn set_zero(&mut self, frame: u64) -> Result<(), WriteError> {
        self.check_frame(frame)?;
        self.frames.insert(frame, Slot::Zero);
        Ok(())
    }

    pub fn set_vcpu_state(&mut self, state: Vec<u8>) {
        self.vcpu_state = state;
    }
    pub fn set_device_state(&mut self, state: Vec<u8>) {
        self.device_state = state;
    }
    /// Guest frame numbers in first-touch order (checked against guest RAM at commit).
    pub fn set_working_set(&mut self, frames: Vec<u64>) {
        self.working_set = frames;
    }

    /// Atomically stores the new pages and the manifest. On error nothing
    /// becomes visible (at most garbage that `verify` reports).
    pub fn commit(self) -> Result<CommitInfo, WriteError> {
        let frames = self.frames();
        if let Some(&frame) = self.working_set.iter().find(|&&f| f >= frames) {
            return Err(WriteError::WorkingSetOutOfRange { frame, frames });
        }
        let TemplateWriter {
            store,
            name,
            parent,
            replace,
            mem_size,
            frames: mut map,
            mut pending,
            mut pending_hash,
            pending_map: _,
            vcpu_state,
            device_state,
            working_set,
        } = self;
        let lock_path = store.dir.join("LOCK");
        let _lock = take_lock(&store.dir, true).map_err(|source| WriteError::Lock {
            path: lock_path,
            source,
        })?;
        store.fail("locked")?;
        store.clean_tmp();
        store.refresh_inner(false)?;
        // Pages deduplicated against a pack that `gc` has since removed or
        // rewritten: still there under another location, or copied again from
        // the (still mapped) old pack.
        for slot in map.values_mut() {
            let Slot::Known(id, loc) = *slot else {
                continue;
            };
            if store
                .index
                .get(&id)
                .is_some_and(|l| store.loc_bytes(*l).is_some())
            {
                continue;
            }
            let Some(bytes) = store.loc_bytes(loc) else {
                return Err(WriteError::BadPack {
                    path: store.packs_dir(),
                    reason: format!("page {id} vanished while the template was being written"),
                });
            };
            let i = pending_hash.len() as u32;
            pending.push(bytes);
            pending_hash.push(id.hash());
            *slot = Slot::Pending(i);
        }
        let page = |i: u32| pending.get(i);
        let mpath = store.manifest_path(&name);
        if !replace && mpath.exists() {
            return Err(WriteError::AlreadyExists { name, path: mpath });
        }
        if let Some(p) = &parent {
            store.check_parent(&name, p, mem_size)?;
        }

        // Final ids for pending pages, deduplicated against the fresh index.
        let mut referenced = vec![false; pending_hash.len()];
        for s in map.values() {
            if let Slot::Pending(i) = s {
                referenced[*i as usize] = true;
            }
        }
        let mut final_id: Vec<Option<PageId>> = vec![None; pending_hash.len()];
        let mut new_map: IdMap<u32> = IdMap::default();
        let mut new_pages: Vec<(PageId, u32)> = Vec::new();
        for (i, &h) in pending_hash.iter().enumerate() {
            if !referenced[i] {
                continue;
            }
            let bytes = page(i as u32);
            let mut slot = 0;
            let id = loop {
                let id = PageId::new(h, slot);
                if let Some(loc) = store.index.get(&id) {
                    if store.loc_bytes(*loc).map(|b| &b[..]) == Some(bytes) {
                        break id;
                    }
                } else if let Some(&j) = new_map.get(&id) {
                    if page(j) == bytes {
                        break id;
                    }
                } else {
                    new_map.insert(id, i as u32);
                    new_pages.push((id, i as u32));
                    break id;
                }
                slot += 1;
            };
            final_id[i] = Some(id);
        }

        if !new_pages.is_empty() {
            store.append_pages(&new_pages, &page)?;
        }

        // Manifest.
        let mut zero_runs: Vec<(u64, u64)> = Vec::new();
        let mut page_runs: Vec<(u64, Vec<PageId>)> = Vec::new();
        let mut own_nonzero = 0u64;
        for (&frame, slot) in &map {
            let id = match slot {
                Slot::Zero => {
                    if parent.is_none() {
                        continue; // zero is the default without a parent
                    }
                    match zero_runs.last_mut() {
                        Some((s, n)) if *s + *n == frame => *n += 1,
                        _ => zero_runs.push((frame, 1)),
                    }
                    continue;
                }
                Slot::Known(id, _) => *id,
                Slot::Pending(i) => match final_id[*i as usize] {
                    Some(id) => id,
                    None => continue, // unreachable: referenced pages all got ids
                },
            };
            own_nonzero += 1;
            match page_runs.last_mut() {
                Some((s, v)) if *s + v.len() as u64 == frame => v.push(id),
                _ => page_runs.push((frame, vec![id])),
            }
        }
        let m = ManifestV1 {
            name: name.as_str().to_string(),
            parent: parent.as_ref().map(|p| p.as_str().to_string()),
            mem_size,
            created_unix_ms: now_ms(),
            zero_runs,
            page_runs,
            vcpu_state,
            device_state,
            working_set,
        };
        let bytes = format::encode_manifest(&m);
        let tmp = store.tmp_dir();
        let done = format::write_atomic(&tmp, &mpath, &bytes, || {
            store.fail("before-manifest-rename").is_ok()
        })
        .map_err(|source| WriteError::Io {
            step: "writing manifest",
            path: mpath.clone(),
            source,
        })?;
        if !done {
            store.fail("before-manifest-rename")?;
        }
        drop(_lock);
        // The commit is durable; a failed refresh only delays seeing it in memory.
        let _ = store.refresh();
        let info = Template::from_manifest(m, &mpath)
            .map(|t| t.info())
            .map_err(|e| WriteError::Io {
                step: "re-reading manifest",
                path: mpath.clone(),
                source: io::Error::other(e.to_string()),
            })?;
        Ok(CommitInfo {
            info,
            new_pages: new_pages.len() as u64,
            reused_pages: own_nonzero.saturating_sub(new_pages.len() as u64),
        })
    }
}

impl Store {
    /// Appends pages to the newest pack (or a new one) and atomically
    /// replaces its index. Caller holds the exclusive lock and has refreshed.
    pub(crate) fn append_pages<'p>(
        &mut self,
        new_pages: &[(PageId, u32)],
        page: &dyn Fn(u32) -> &'p [u8],
    ) -> Result<(), WriteError> {
        let (pack_id, start) = match self
            .packs
            .iter()
            .filter(|p| !p.retired)
            .max_by_key(|p| p.id)
        {
            Some(p) if p.problem.is_none() && p.indexed_end < PACK_TARGET => (p.id, p.indexed_end),
            Some(p) => (PackId::new(p.id.get() + 1), 0),
            None => (PackId::new(1), 0),
        };
        let ppath = self.pack_path(pack_id);
        let ipath = self.idx_path(pack_id);
        let io_err = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| WriteError::Io { step, path, source }
        };
        let existed = ppath.exists();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&ppath)
            .map_err(io_err("opening pack", &ppath))?;
        let flen = f
            .metadata()
            .map_err(io_err("reading pack size", &ppath))?
            .len();
        if flen < start {
            return Err(WriteError::BadPack {
                path: ppath,
                reason: format!("{flen} bytes but index needs {start}"),
            });
        }
        if flen > start {
            // Torn tail from an interrupted writer: never indexed, drop it.
            f.set_len(start)
                .map_err(io_err("truncating torn pack tail", &ppath))?;
        }
        f.seek(SeekFrom::Start(start))
            .map_err(io_err("seeking pack", &ppath))?;
        {
            let mut w = BufWriter::with_capacity(1 << 20, &mut f);
            for (k, (_, i)) in new_pages.iter().enumerate() {
                if k == new_pages.len() / 2 {
                    if let Err(e) = self.fail("mid-append") {
                        // Leave a torn half page behind, like a killed writer would.
                        w.write_all(&page(*i)[..PAGE_SIZE / 2])
                            .map_err(io_err("appending pages", &ppath))?;
                        w.flush().map_err(io_err("appending pages", &ppath))?;
                        return Err(e);
                    }
                }
                w.write_all(page(*i))
                    .map_err(io_err("appending pages", &ppath))?;
            }
            w.flush().map_err(io_err("appending pages", &ppath))?;
        }
        f.sync_all().map_err(io_err("syncing pack", &ppath))?;
        if !existed {
            let pdir = self.packs_dir();
            format::fsync_dir(&pdir).map_err(io_err("syncing packs directory", &pdir))?;
        }
        self.fail("after-pack-sync")?;

        let mut body = match fs::read(&ipath) {
            Ok(b) => {
                format::decode_idx(&ipath, pack_id, &b)?;
                b.get(IDX_HEADER..).map(|s| s.to_vec()).unwrap_or_default()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(IndexError::Read {
                    path: ipath,
                    source,
                }
                .into())
            }
        };
        body.reserve(new_pages.len() * format::IDX_ENTRY);
        for (k, (id, _)) in new_pages.iter().enumerate() {
            format::idx_entry_bytes(
                &mut body,
                &IdxEntry {
                    id: *id,
                    offset: start + k as u64 * PAGE,
                },
            );
        }
        let bytes = format::encode_idx(pack_id, &body);
        let done = format::write_atomic(&self.tmp_dir(), &ipath, &bytes, || {
            self.fail("before-idx-rename").is_ok()
        })
        .map_err(io_err("writing pack index", &ipath))?;
        if !done {
            self.fail("before-idx-rename")?;
        }
        self.fail("after-idx")?;
        self.refresh_inner(false)?;
        Ok(())
    }
}

// ---------------------------------------------------------------- templates

/// A loaded, checksum-verified template manifest.
#[derive(Clone, Debug)]
pub struct Template {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    /// Guest memory size in bytes (multiple of 4096).
    pub mem_size: u64,
    pub created_unix_ms: u64,
    pub vcpu_state: Vec<u8>,
    pub device_state: Vec<u8>,
    /// Guest frame numbers in first-touch order.
    pub working_set: Vec<u64>,
    pub(crate) zero_runs: Vec<(u64, u64)>,
    pub(crate) page_runs: Vec<(u64, Vec<PageId>)>,
}

/// Summary of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateInfo {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    pub mem_size: u64,
    /// Frames with a page of this layer's own.
    pub own_pages: u64,
    /// Frames this layer explicitly sets to zero.
    pub zero_frames: u64,
    pub created_unix_ms: u64,
}

impl Template {
    pub(crate) fn from_manifest(m: ManifestV1, path: &Path) -> Result<Template, LoadError> {
        let bad = |reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let name = TemplateName::new(&m.name).map_err(|e| bad(e.to_string()))?;
        let parent = m
            .parent
            .as_deref()
            .map(TemplateName::new)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Template {
            name,
            parent,
            mem_size: m.mem_size,
            created_unix_ms: m.created_unix_ms,
            vcpu_state: m.vcpu_state,
            device_state: m.device_state,
            working_set: m.working_set,
            zero_runs: m.zero_runs,
            page_runs: m.page_runs,
        })
    }

    /// Number of guest frames.
    pub fn frames(&self) -> u64 {
        self.mem_size / PAGE
    }

    /// This layer's own pages as (frame, page).
    pub fn own_pages(&self) -> impl Iterator<Item = (u64, PageId)> + '_ {
        self.page_runs
            .iter()
            .flat_map(|(s, v)| v.iter().enumerate().map(move |(i, id)| (s + i as u64, *id)))
    }

    pub(crate) fn own_page_count(&self) -> u64 {
        self.page_runs.iter().map(|(_, v)| v.len() as u64).sum()
    }

    pub fn info(&self) -> TemplateInfo {
        TemplateInfo {
            name: self.name.clone(),
            parent: self.parent.clone(),
            mem_size: self.mem_size,
            own_pages: self.own_page_count(),
            zero_frames: self.zero_runs.iter().map(|(_, n)| n).sum(),
            created_unix_ms: self.created_unix_ms,
        }
    }

    /// Flattens the parent chain into a per-frame map of page locations.
    /// Errors on missing parents, cycles, size mismatches and missing pages.
    pub fn resolve<'s>(&self, store: &'s Store) -> Result<Resolved<'s>, LoadError> {
        let ancestors = store.ancestors(self)?;
        let n = self.frames() as usize;
        // A zeroed u64 allocation: pages of the map that no data frame touches stay unmapped.
        let mut frames: Vec<u64> = vec![0; n];
        let mut hashes = HashMap::new();
        let mut layers = Vec::with_capacity(ancestors.len() + 1);
        for t in ancestors.iter().chain(std::iter::once(self)) {
            layers.push(t.name.clone());
            for &(s, k) in &t.zero_runs {
                frames[s as usize..(s + k) as usize].fill(Src::ZERO.0);
            }
            for (frame, id) in t.own_pages() {
                let loc = store
                    .index
                    .get(&id)
                    .copied()
                    .filter(|l| store.loc_bytes(*l).is_some())
                    .ok_or_else(|| LoadError::PageMissing {
                        template: t.name.clone(),
                        frame,
                        page: id,
                    })?;
                frames[frame as usize] = Src::new(loc.pack, loc.offset)?.0;
                hashes.insert(frame, id);
            }
        }
        Ok(Resolved {
            store,
            mem_size: self.mem_size,
            frames,
            layers,
            hashes,
        })
    }
}

/// Where a frame's page lives, packed in a u64 so that a resolved map of mostly zero
/// frames is a zeroed allocation (the OS maps it lazily): 0 = zero frame, else
/// `(pack + 1) << 40 | offset / PAGE_SIZE`.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
struct Src(u64);
impl Src {
    const ZERO: Src = Src(0);
    fn new(pack: u32, offset: u64) -> Result<Src, LoadError> {
        let page = offset / PAGE;
        if !offset.is_multiple_of(PAGE) || page >= 1 << 40 || pack >= (1 << 23) {
            return Err(LoadError::BufferSize {
                expected: page,
                found: offset,
            });
        }
        Ok(Src(((pack as u64 + 1) << 40) | page))
    }
    fn pack(self) -> u32 {
        ((self.0 >> 40) - 1) as u32
    }
    fn offset(self) -> u64 {
        (self.0 & ((1 << 40) - 1)) * PAGE
    }
}

/// Contents of one guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Zero,
    /// The page, borrowed straight from the pack mapping.
    Data(&'a [u8; PAGE_SIZE]),
}

/// A template flattened over its parent chain: frame -> Zero | mmapped page.
pub struct Resolved<'s> {
    store: &'s Store,
    mem_size: u64,
    /// `Src` words, one per frame.
    frames: Vec<u64>,
    layers: Vec<TemplateName>,
    /// The page id each data frame must hash to (for verified reads).
    hashes: HashMap<u64, PageId>,
}

impl<'s> Resolved<'s> {
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }
    /// Layer names from the root (base) to this template.
    pub fn layers(&self) -> &[TemplateName] {
        &self.layers
    }
    pub fn frame_count(&self) -> u64 {
        self.frames.len() as u64
    }
    /// Number of frames that are not zero.
    pub fn nonzero_frames(&self) -> u64 {
        self.frames.iter().filter(|&&s| Src(s) != Src::ZERO).count() as u64
    }

    fn get(&self, s: Src) -> Frame<'s> {
        if s == Src::ZERO {
            return Frame::Zero;
        }
        // In range: checked by resolve(), and the store cannot be remapped
        // while borrowed.
        match self.store.loc_bytes(Loc {
            pack: s.pack(),
            offset: s.offset(),
        }) {
            Some(b) => Frame::Data(b),
            None => Frame::Zero,
        }
    }

    /// Contents of frame `gfn` (None past the end of guest memory).
    pub fn frame(&self, gfn: u64) -> Option<Frame<'s>> {
        let s = Src(*self.frames.get(usize::try_from(gfn).ok()?)?);
        Some(self.get(s))
    }

    /// Contents of frame `gfn`, with a data page re-hashed and checked against its id:
    /// what a restore uses, so that a damaged pack is refused instead of run.
    pub fn frame_verified(&self, gfn: u64) -> Result<Option<Frame<'s>>, LoadError> {
        let Some(f) = self.frame(gfn) else {
            return Ok(None);
        };
        if let Frame::Data(bytes) = f {
            let ok = self
                .hashes
                .get(&gfn)
                .is_some_and(|id| self.store.hash_page(bytes) == id.hash());
            if !ok {
                return Err(LoadError::PageCorrupt { frame: gfn });
            }
        }
        Ok(Some(f))
    }

    /// The frames that hold data (not zero), in no particular order: cheaper than
    /// [`Resolved::iter`] when most of guest memory is zero.
    pub fn data_frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.hashes.keys().copied()
    }

    /// All frames in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Frame<'s>)> + '_ {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, self.get(Src(*s))))
    }

    /// Fills `guest` (exactly `mem_size` bytes) with the template memory, zeroing zero frames.
    pub fn copy_to(&self, guest: &mut [u8]) -> Result<(), LoadError> {
        self.copy(guest, true)
    }

    /// Like [`Resolved::copy_to`] but skips zero frames: for freshly mapped
    /// (already zero) guest memory.
    pub fn copy_to_zeroed(&self, guest: &mut [u8]) -> Result<(), LoadError> {
        self.copy(guest, false)
    }

    fn copy(&self, guest: &mut [u8], write_zeros: bool) -> Result<(), LoadError> {
        if guest.len() as u64 != self.mem_size {
            return Err(LoadError::BufferSize {
                expected: self.mem_size,
                found: guest.len() as u64,
            });
        }
        for (dst, s) in guest.chunks_exact_mut(PAGE_SIZE).zip(&self.frames) {
            match self.get(Src(*s)) {
                Frame::Data(b) => dst.copy_from_slice(b),
                Frame::Zero if write_zeros => dst.fill(0),
                Frame::Zero => {}
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- verify / stats types

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Data is lost or inconsistent: some template cannot be restored.
    Corruption,
    /// Harmless leftovers (interrupted writes, removed templates).
    Garbage,
}

/// One finding of [`Store::verify`].
#[derive(Clone, Debug)]
pub struct Problem {
    pub severity: Severity,
    pub path: PathBuf,
    pub what: String,
    /// What to do about it.
    pub hint: String,
}

impl Problem {
    fn corrupt(path: impl AsRef<Path>, what: String, hint: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Corruption,
            path: path.as_ref().into(),
            what,
            hint: hint.into(),
        }
    }
    fn garbage(path: impl AsRef<Path>, what: String, hint: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Garbage,
            path: path.as_ref().into(),
            what,
            hint: hint.into(),
        }
    }
    pub fn is_corruption(&self) -> bool {
        self.severity == Severity::Corruption
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Corruption => "corruption",
            Severity::Garbage => "garbage",
        };
        write!(
            f,
            "[{sev}] {}: {} (hint: {})",
            self.path.display(),
            self.what,
            self.hint
        )
    }
}

/// Space accounting.
#[derive(Clone, Debug)]
pub struct Stats {
    pub templates: Vec<TemplateStats>,
    /// Sum of guest memory sizes: what raw full snapshots would take.
    pub logical_bytes: u64,
    /// Sum over templates of non-zero frames x 4096: what sparse full snapshots would take.
    pub logical_nonzero_bytes: u64,
    /// Bytes on disk (packs, indexes, manifests, config): the sum of the four below.
    pub physical_bytes: u64,
    /// Sizes of the `.pack` files, the `.idx` files, files in `templates/`, and `store.cfg`.
    pub pack_bytes: u64,
    pub index_bytes: u64,
    pub manifest_bytes: u64,
    pub config_bytes: u64,
    /// Template pairs sharing the most of their own (stored) pages, most first.
    pub shared_pairs: Vec<crate::inspect::SharedPair>,
    /// Distinct pages in the indexes.
    pub stored_pages: u64,
    /// Distinct pages referenced by at least one template.
    pub referenced_pages: u64,
}

#[derive(Clone, Debug)]
pub struct TemplateStats {
    pub name: TemplateName,
    pub mem_size: u64,
    pub own_pages: u64,
    pub nonzero_frames: u64,
    /// Bytes of pages used by this template only (freed if it alone were removed).
    pub unique_bytes: u64,
}

//! The pack set: which packs exist, their indexes (page id -> location) and
//! read-only mappings, kept in step with the disk; appending new pages.
//!
//! Readers never see the set change under them: the store holds an immutable
//! [`PackSet`] behind an `Arc`, and a refresh that finds new, changed or
//! deleted packs builds a new set and swaps it in under a lock. A
//! [`Resolved`](crate::Resolved) template keeps the set it was resolved
//! against (and so every pack mapping its pages come from) for as long as it
//! lives, whatever happens to the store's current set meanwhile.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use memmap2::Mmap;

use crate::error::{IndexError, WriteError};
use crate::format::{self, IdxEntry, IDX_HEADER};
use crate::store::Store;
use crate::util::{map_file, parse_pack_file, read_regular, IdMap};
use crate::{PackId, PageId, PAGE_SIZE};

/// A pack is closed (a new one started) once it holds this many bytes.
const PACK_TARGET: u64 = 1 << 30;
const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Position of the pack in [`PackSet::packs`] (stable across refreshes).
    pub(crate) pack: u32,
    pub(crate) offset: u64,
}

type Stamp = (u64, u64, i64, i64);

/// One pack as last loaded. Never changed once built: a reload builds a new one.
pub(crate) struct Pack {
    pub(crate) id: PackId,
    /// Mapping of the indexed part of the pack (None if empty or missing).
    pub(crate) map: Option<Mmap>,
    pub(crate) indexed_end: u64,
    pub(crate) idx_stamp: Option<Stamp>,
    pub(crate) problem: Option<String>,
    /// The index exists but cannot be read or decoded (the error).
    pub(crate) idx_error: Option<String>,
    /// The pack's bytes cannot be read or mapped (the error).
    pub(crate) map_error: Option<String>,
    /// Inode of the pack file when loaded: a different inode means the pack
    /// was deleted (by `gc`) and its id reused.
    pub(crate) pack_ino: Option<u64>,
    /// Deleted or replaced on disk: its entries are gone from the index and
    /// its mapping from this set (sets taken before keep theirs).
    pub(crate) retired: bool,
}

impl Pack {
    fn retired(id: PackId) -> Pack {
        Pack {
            id,
            map: None,
            indexed_end: 0,
            idx_stamp: None,
            problem: None,
            idx_error: None,
            map_error: None,
            pack_ino: None,
            retired: true,
        }
    }
}

/// The bytes at `loc` in `packs` (None: no such pack, unmapped, or out of range).
pub(crate) fn pack_bytes(packs: &[Arc<Pack>], loc: Loc) -> Option<&[u8; PAGE_SIZE]> {
    let m = packs.get(loc.pack as usize)?.map.as_ref()?;
    let s = usize::try_from(loc.offset).ok()?;
    m.get(s..s.checked_add(PAGE_SIZE)?)?.try_into().ok()
}

/// An immutable view of the packs: every pack seen (positions never reused;
/// retired ones stay as placeholders), and the index of page id -> location.
#[derive(Clone, Default)]
pub(crate) struct PackSet {
    pub(crate) packs: Vec<Arc<Pack>>,
    pub(crate) pack_pos: HashMap<PackId, u32>,
    pub(crate) index: IdMap<Loc>,
}

impl PackSet {
    pub(crate) fn loc_bytes(&self, loc: Loc) -> Option<&[u8; PAGE_SIZE]> {
        pack_bytes(&self.packs, loc)
    }

    /// The bytes of a stored page, straight from the pack mapping (no hashing).
    pub(crate) fn page(&self, id: PageId) -> Option<&[u8; PAGE_SIZE]> {
        self.loc_bytes(*self.index.get(&id)?)
    }

    /// Why the bytes of pack `pos` cannot be read, if that is why they are missing.
    pub(crate) fn pack_read_error(&self, pos: u32) -> Option<&str> {
        self.packs.get(pos as usize)?.map_error.as_deref()
    }

    /// The first pack index that exists but cannot be read or decoded.
    pub(crate) fn index_read_error(&self) -> Option<&str> {
        self.packs
            .iter()
            .filter(|p| !p.retired)
            .find_map(|p| p.idx_error.as_deref())
    }

    /// Forgets a pack that was deleted or replaced on disk.
    fn retire(&mut self, pos: u32) {
        self.index.retain(|_, l| l.pack != pos);
        if let Some(p) = self.packs.get_mut(pos as usize) {
            let id = p.id;
            *p = Arc::new(Pack::retired(id));
            self.pack_pos.remove(&id);
        }
    }
}

fn pack_file(pdir: &Path, id: PackId, ext: &str) -> PathBuf {
    pdir.join(format!("{id}.{ext}"))
}

/// Brings `set` in step with the packs in `pdir`. Leaves it borrowed (no copy
/// made) when nothing changed on disk.
fn update(pdir: &Path, set: &mut Cow<'_, PackSet>) -> Result<(), IndexError> {
    let rd = fs::read_dir(pdir).map_err(|source| IndexError::ListPacks {
        path: pdir.to_path_buf(),
        source,
    })?;
    let mut ids = BTreeSet::new();
    for e in rd {
        let e = e.map_err(|source| IndexError::ListPacks {
            path: pdir.to_path_buf(),
            source,
        })?;
        if let Some((id, _)) = e.file_name().to_str().and_then(parse_pack_file) {
            ids.insert(id);
        }
    }
    // Packs gone from disk: their pages are no longer available for dedup.
    let gone: Vec<u32> = set
        .packs
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.retired && !ids.contains(&p.id))
        .map(|(i, _)| i as u32)
        .collect();
    for pos in gone {
        set.to_mut().retire(pos);
    }
    for id in ids {
        if let Some(&pos) = set.pack_pos.get(&id) {
            let p = &set.packs[pos as usize];
            let ino = fs::metadata(pack_file(pdir, id, "pack"))
                .ok()
                .map(|m| m.ino());
            let idx_gone = p.idx_stamp.is_some() && !pack_file(pdir, id, "idx").exists();
            let replaced = p.pack_ino.is_some() && ino != p.pack_ino;
            if idx_gone || replaced {
                set.to_mut().retire(pos);
            }
        }
        let pos = match set.pack_pos.get(&id) {
            Some(&p) => p,
            None => {
                let s = set.to_mut();
                let p = s.packs.len() as u32;
                s.packs.push(Arc::new(Pack::retired(id)));
                s.pack_pos.insert(id, p);
                p
            }
        };
        load_pack(pdir, set, pos);
    }
    Ok(())
}

/// (Re)loads one pack's index and mapping if its index changed since it was
/// loaded (or it never was). Problems are recorded on the pack.
fn load_pack(pdir: &Path, set: &mut Cow<'_, PackSet>, pos: u32) {
    let Some(old) = set.packs.get(pos as usize) else {
        return;
    };
    let id = old.id;
    let idx_path = pack_file(pdir, id, "idx");
    let pack_path = pack_file(pdir, id, "pack");
    let stamp = fs::metadata(&idx_path)
        .ok()
        .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()));
    // A placeholder just added (retired, never loaded) always loads.
    if !old.retired && old.idx_stamp == stamp {
        return;
    }
    let s = set.to_mut();
    let mut indexed_end = 0u64;
    let mut problem = None;
    let mut idx_error = None;
    let mut map_error = None;
    if stamp.is_some() {
        let res = read_regular(&idx_path)
            .map_err(|source| IndexError::Read {
                path: idx_path.clone(),
                source,
            })
            .and_then(|b| format::decode_idx(&idx_path, id, &b));
        match res {
            Ok(entries) => {
                s.index.reserve(entries.len());
                for e in entries {
                    indexed_end = indexed_end.max(e.offset.saturating_add(PAGE));
                    s.index.insert(
                        e.id,
                        Loc {
                            pack: pos,
                            offset: e.offset,
                        },
                    );
                }
            }
            Err(e) => {
                problem = Some(e.to_string());
                idx_error = Some(e.to_string());
            }
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
                    Err(e) => {
                        let e = format!("reading pack {}: {e}", pack_path.display());
                        problem = Some(e.clone());
                        map_error = Some(e);
                    }
                }
            }
        }
    }
    s.packs[pos as usize] = Arc::new(Pack {
        id,
        map,
        indexed_end,
        idx_stamp: stamp,
        problem,
        idx_error,
        map_error,
        pack_ino,
        retired: false,
    });
}

impl Store {
    /// The current view of the packs. It never changes: a refresh swaps in a new one.
    /// In a lazy store, the first call reads the pack indexes.
    pub(crate) fn view(&self) -> Arc<PackSet> {
        if !self.indexes_loaded() {
            // As `Store::open` would have; an unlistable packs directory leaves
            // the view empty, and the operation reports the pages it misses.
            let _ = self.refresh();
        }
        self.current_view()
    }

    /// The view as it is, without reading indexes a lazy store has not read.
    pub(crate) fn current_view(&self) -> Arc<PackSet> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads pack indexes changed by other processes (cheap when nothing changed).
    /// Packs deleted or replaced on disk (by `gc`) drop out of the index.
    /// Pages already handed out ([`Resolved`](crate::Resolved)) stay valid.
    pub fn refresh(&self) -> Result<(), IndexError> {
        // One refresh at a time, so a slower one never replaces a newer view.
        let _serial = self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cur = self.current_view();
        let mut set = Cow::Borrowed(&*cur);
        update(&self.packs_dir(), &mut set)?;
        if let Cow::Owned(next) = set {
            *self.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        }
        self.indexed.store(true, Ordering::Release);
        Ok(())
    }

    /// [`Store::refresh`] for writers: updates the view in place (no copy of
    /// the index) when nothing else holds it.
    pub(crate) fn refresh_mut(&mut self) -> Result<(), IndexError> {
        let pdir = self.packs_dir();
        let view = self.view.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = Arc::get_mut(view) {
            let mut cow = Cow::Owned(std::mem::take(set));
            let r = update(&pdir, &mut cow);
            *set = cow.into_owned();
            if r.is_ok() {
                *self.indexed.get_mut() = true;
            }
            return r;
        }
        self.refresh()
    }

    /// The bytes of a stored page (a copy, straight from the pack: no hashing).
    pub fn page_bytes(&self, id: PageId) -> Option<[u8; PAGE_SIZE]> {
        self.view().page(id).copied()
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
        // Append to the newest pack only where its file ends exactly at its
        // index's end. Bytes past the index are never truncated here: they may
        // be a killed writer's torn tail, or pages that templates still need
        // but a lost, stale or forged index no longer lists; gc decides which
        // from the manifests. Otherwise start a new pack.
        let view = self.view();
        let newest = view
            .packs
            .iter()
            .filter(|p| !p.retired)
            .max_by_key(|p| p.id);
        let appendable = newest.filter(|p| {
            p.problem.is_none()
                && p.indexed_end < PACK_TARGET
                && fs::metadata(self.pack_path(p.id)).is_ok_and(|m| m.len() == p.indexed_end)
        });
        let (pack_id, start, existed) = match (appendable, newest) {
            (Some(p), _) => (p.id, p.indexed_end, true),
            (None, Some(p)) => (PackId::new(p.id.get() + 1), 0, false),
            (None, None) => (PackId::new(1), 0, false),
        };
        drop(view);
        let ppath = self.pack_path(pack_id);
        let ipath = self.idx_path(pack_id);
        let io_err = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| WriteError::Io { step, path, source }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(!existed)
            .open(&ppath)
            .map_err(io_err("opening pack", &ppath))?;
        let flen = f
            .metadata()
            .map_err(io_err("reading pack size", &ppath))?
            .len();
        if flen != start {
            return Err(WriteError::BadPack {
                path: ppath,
                reason: format!("it changed while locked: {flen} bytes, its index ends at {start}"),
            });
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

        let mut body = match read_regular(&ipath) {
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
        self.refresh_mut()?;
        Ok(())
    }
}

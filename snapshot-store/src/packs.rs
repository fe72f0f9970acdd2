//! The pack set: which packs exist, their indexes (page id -> location) and
//! read-only mappings, kept in step with the disk; appending new pages.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{IndexError, WriteError};
use crate::format::{self, IdxEntry, IDX_HEADER};
use crate::store::Store;
use crate::util::{map_file, parse_pack_file};
use crate::{PackId, PageId, PAGE_SIZE};

/// A pack is closed (a new one started) once it holds this many bytes.
const PACK_TARGET: u64 = 1 << 30;
const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) pack: u32,
    pub(crate) offset: u64,
}

type Stamp = (u64, u64, i64, i64);

pub(crate) struct Pack {
    pub(crate) id: PackId,
    /// Mapping of the indexed part of the pack (None if empty or missing).
    pub(crate) map: Option<Mmap>,
    pub(crate) indexed_end: u64,
    pub(crate) idx_stamp: Option<Stamp>,
    pub(crate) loaded: bool,
    pub(crate) problem: Option<String>,
    /// The index exists but cannot be read or decoded (the error).
    pub(crate) idx_error: Option<String>,
    /// The pack's bytes cannot be read or mapped (the error).
    pub(crate) map_error: Option<String>,
    /// Inode of the pack file when loaded: a different inode means the pack
    /// was deleted (by `gc`) and its id reused.
    pub(crate) pack_ino: Option<u64>,
    /// Deleted or replaced on disk: its entries are gone from the index, its
    /// mapping is kept (until no writer can hold a location in it) so an
    /// in-flight writer can still copy pages it had deduplicated against.
    pub(crate) retired: bool,
}

impl Store {
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
                        idx_error: None,
                        map_error: None,
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
        let mut idx_error = None;
        let mut map_error = None;
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
        let pack = &mut self.packs[pos as usize];
        pack.map = map;
        pack.indexed_end = indexed_end;
        pack.idx_stamp = stamp;
        pack.loaded = true;
        pack.problem = problem;
        pack.idx_error = idx_error;
        pack.map_error = map_error;
        pack.pack_ino = pack_ino;
    }

    pub(crate) fn loc_bytes(&self, loc: Loc) -> Option<&[u8; PAGE_SIZE]> {
        let m = self.packs.get(loc.pack as usize)?.map.as_ref()?;
        let s = usize::try_from(loc.offset).ok()?;
        m.get(s..s.checked_add(PAGE_SIZE)?)?.try_into().ok()
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

    /// The bytes of a stored page, straight from the pack mapping (no hashing).
    pub fn page_bytes(&self, id: PageId) -> Option<&[u8; PAGE_SIZE]> {
        self.loc_bytes(*self.index.get(&id)?)
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
        let newest = self
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

//! Reading the packs and indexes from disk and checking every index entry
//! against the bytes it points at: what `verify` reports on and `gc` plans
//! from. A page counts as *accounted for* only when an index entry points at
//! bytes of its pack that hash to the page's id, so a deleted, damaged, stale
//! or foreign index (or forged offsets) never makes a referenced page look
//! like garbage. Also: finding referenced pages that no index accounts for
//! inside the packs, and rebuilding a pack's index from its bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::path::PathBuf;

use memmap2::Mmap;

use crate::error::ReindexError;
use crate::format::{self, IdxEntry};
use crate::resolve::Template;
use crate::store::Store;
use crate::util::{is_zero, map_file, parse_pack_file, read_regular, take_lock, IdMap};
use crate::{PackId, PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// The state of a pack's `.idx` file.
pub(crate) enum IdxState {
    /// There is none.
    Missing,
    /// It exists but cannot be read (`unreadable`) or decoded: the reason.
    Bad {
        reason: String,
        unreadable: bool,
    },
    Ok {
        entries: Vec<IdxEntry>,
        bytes: u64,
    },
}

/// An index entry that does not point at its page.
pub(crate) enum BadEntry {
    PastEnd {
        id: PageId,
        offset: u64,
    },
    DupOffset {
        offset: u64,
    },
    Mismatch {
        id: PageId,
        offset: u64,
        computed: u128,
    },
}

/// One pack as found on disk.
pub(crate) struct PackScan {
    pub(crate) id: PackId,
    /// Size of the `.pack` file (None: there is none).
    pub(crate) pack_len: Option<u64>,
    /// Why the pack's bytes cannot be read, if they cannot.
    pub(crate) unreadable: Option<String>,
    pub(crate) idx: IdxState,
    /// End of the furthest index entry (0 without a usable index).
    pub(crate) indexed_end: u64,
    /// Entries whose bytes are in the pack and hash to their id.
    pub(crate) verified: Vec<IdxEntry>,
    pub(crate) bad: Vec<BadEntry>,
}

impl PackScan {
    /// Index readable, every entry verified, pack at least as long as the index needs.
    pub(crate) fn intact(&self) -> bool {
        matches!(self.idx, IdxState::Ok { .. })
            && self.bad.is_empty()
            && self.unreadable.is_none()
            && self.pack_len.unwrap_or(0) >= self.indexed_end
    }
    /// Bytes past the furthest index entry.
    pub(crate) fn tail(&self) -> u64 {
        self.pack_len.unwrap_or(0).saturating_sub(self.indexed_end)
    }
}

/// Every pack, index entry by index entry.
#[derive(Default)]
pub(crate) struct Scan {
    pub(crate) packs: Vec<PackScan>,
    /// Files in `packs/` that are neither packs nor indexes.
    pub(crate) strays: Vec<PathBuf>,
    /// Verified pages and the (first) pack holding each.
    pub(crate) valid: IdMap<PackId>,
}

/// Referenced pages that no index accounts for, by hash, with the templates
/// (indexes into a name list) whose own pages they are.
#[derive(Default)]
pub(crate) struct Unaccounted {
    pub(crate) templates: Vec<TemplateName>,
    pub(crate) pages: HashMap<u128, Vec<u32>>,
}

impl Unaccounted {
    /// Pages no index accounts for among the own pages of `all`.
    pub(crate) fn find(all: &[Template], valid: &IdMap<PackId>) -> Unaccounted {
        let mut u = Unaccounted::default();
        for t in all {
            let i = u.templates.len() as u32;
            for (_, id) in t.own_pages() {
                if !valid.contains_key(&id) {
                    let users = u.pages.entry(id.hash()).or_default();
                    if users.last() != Some(&i) {
                        users.push(i);
                    }
                }
            }
            u.templates.push(t.name.clone());
        }
        u
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
    /// The templates that need any of `hashes` (all templates affected when None).
    pub(crate) fn names(&self, hashes: Option<&[u128]>) -> Vec<TemplateName> {
        let mut set = BTreeSet::new();
        match hashes {
            Some(hs) => {
                for h in hs {
                    set.extend(self.pages.get(h).into_iter().flatten().copied());
                }
            }
            None => set.extend(self.pages.values().flatten().copied()),
        }
        set.into_iter()
            .map(|i| self.templates[i as usize].clone())
            .collect()
    }
}

/// Names as "a, b, c" (at most `max`, then "and N more").
pub(crate) fn name_list(names: &[TemplateName], max: usize) -> String {
    let mut s: Vec<&str> = names.iter().take(max).map(|n| n.as_str()).collect();
    let more;
    if names.len() > max {
        more = format!("and {} more", names.len() - max);
        s.push(&more);
    }
    s.join(", ")
}

/// Result of [`Store::reindex`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReindexReport {
    pub pack: PackId,
    /// Entries in the index that was replaced (None: there was none, or it was unreadable).
    pub old_entries: Option<u64>,
    /// Entries written: one per distinct non-zero page of the pack.
    pub entries: u64,
    /// Bytes of a partial page at the end of the pack, left unindexed.
    pub partial_tail: u64,
}

fn map_whole(path: &std::path::Path, len: u64) -> io::Result<Option<Mmap>> {
    if len == 0 {
        return Ok(None);
    }
    map_file(path, len).map(Some)
}

impl Store {
    /// Reads every pack and index in `packs/` and checks each index entry's bytes.
    /// Caller holds the store lock (shared or exclusive).
    pub(crate) fn scan_packs(&self, progress: &mut dyn FnMut(u64, u64)) -> io::Result<Scan> {
        let mut scan = Scan::default();
        let mut ids = BTreeSet::new();
        for e in fs::read_dir(self.packs_dir())? {
            let e = e?;
            match e.file_name().to_str().and_then(parse_pack_file) {
                Some((id, _)) => {
                    ids.insert(id);
                }
                None => scan.strays.push(e.path()),
            }
        }
        let total = ids.len() as u64;
        for (k, id) in ids.into_iter().enumerate() {
            progress(k as u64, total);
            let p = self.scan_pack(id);
            for e in &p.verified {
                scan.valid.entry(e.id).or_insert(id);
            }
            scan.packs.push(p);
        }
        progress(total, total);
        Ok(scan)
    }

    fn scan_pack(&self, id: PackId) -> PackScan {
        let (idx_path, pack_path) = (self.idx_path(id), self.pack_path(id));
        let idx = match read_regular(&idx_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => IdxState::Missing,
            Err(e) => IdxState::Bad {
                reason: format!("cannot read it: {e}"),
                unreadable: true,
            },
            Ok(b) => match format::decode_idx(&idx_path, id, &b) {
                Ok(entries) => IdxState::Ok {
                    entries,
                    bytes: b.len() as u64,
                },
                Err(e) => IdxState::Bad {
                    reason: e.to_string(),
                    unreadable: false,
                },
            },
        };
        let pack_len = fs::metadata(&pack_path).ok().map(|m| m.len());
        let mut p = PackScan {
            id,
            pack_len,
            unreadable: None,
            idx,
            indexed_end: 0,
            verified: Vec::new(),
            bad: Vec::new(),
        };
        let map = match pack_len.map(|len| map_whole(&pack_path, len)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                p.unreadable = Some(e.to_string());
                None
            }
            None => None,
        };
        let IdxState::Ok { entries, .. } = &p.idx else {
            return p;
        };
        p.indexed_end = entries
            .iter()
            .map(|e| e.offset.saturating_add(PAGE))
            .max()
            .unwrap_or(0);
        if pack_len.is_none() || p.unreadable.is_some() {
            return p;
        }
        let mut seen_offsets = HashSet::new();
        for e in entries {
            let bytes = usize::try_from(e.offset).ok().and_then(|s| {
                map.as_ref()
                    .and_then(|m| m.get(s..s.checked_add(PAGE_SIZE)?))
            });
            let Some(bytes) = bytes else {
                p.bad.push(BadEntry::PastEnd {
                    id: e.id,
                    offset: e.offset,
                });
                continue;
            };
            if !seen_offsets.insert(e.offset) {
                p.bad.push(BadEntry::DupOffset { offset: e.offset });
                continue;
            }
            let h = self.hash_page(bytes);
            if h != e.id.hash() {
                p.bad.push(BadEntry::Mismatch {
                    id: e.id,
                    offset: e.offset,
                    computed: h,
                });
                continue;
            }
            p.verified.push(*e);
        }
        p
    }

    /// Looks for the pages of `missing` in the bytes of every readable pack
    /// (whole pages at any offset, indexed or not): per pack, the hashes found.
    pub(crate) fn find_unaccounted(
        &self,
        scan: &Scan,
        missing: &Unaccounted,
    ) -> BTreeMap<PackId, Vec<u128>> {
        let mut found: BTreeMap<PackId, Vec<u128>> = BTreeMap::new();
        for p in &scan.packs {
            let Some(len) = p.pack_len.filter(|_| p.unreadable.is_none()) else {
                continue;
            };
            let Ok(Some(map)) = map_whole(&self.pack_path(p.id), len) else {
                continue;
            };
            let mut here = HashSet::new();
            for page in map.chunks_exact(PAGE_SIZE) {
                let h = self.hash_page(page);
                if missing.pages.contains_key(&h) {
                    here.insert(h);
                }
            }
            if !here.is_empty() {
                let mut v: Vec<u128> = here.into_iter().collect();
                v.sort_unstable();
                found.insert(p.id, v);
            }
        }
        found
    }

    /// Rebuilds the index of pack `pack` from its bytes: every whole, non-zero
    /// page is re-hashed with this store's secret and indexed at its offset
    /// (the first copy of repeated bytes; distinct bytes with the same hash get
    /// the next collision slot in pack order). Replaces a missing, damaged,
    /// stale or foreign index atomically, under the writer lock.
    pub fn reindex(&mut self, pack: PackId) -> Result<ReindexReport, ReindexError> {
        let _lock = take_lock(&self.dir, true).map_err(|source| ReindexError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        let (ppath, ipath) = (self.pack_path(pack), self.idx_path(pack));
        let len = match fs::metadata(&ppath) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ReindexError::NoPack { path: ppath })
            }
            Err(source) => {
                return Err(ReindexError::Read {
                    path: ppath,
                    source,
                })
            }
        };
        let old_entries = read_regular(&ipath)
            .ok()
            .and_then(|b| format::decode_idx(&ipath, pack, &b).ok())
            .map(|e| e.len() as u64);
        let map = map_whole(&ppath, len).map_err(|source| ReindexError::Read {
            path: ppath.clone(),
            source,
        })?;
        let mut body = Vec::new();
        let mut entries = 0u64;
        if let Some(map) = &map {
            // hash -> offsets of the distinct pages with that hash, in slot order.
            let mut slots: HashMap<u128, Vec<u64>> = HashMap::new();
            for (k, page) in map.chunks_exact(PAGE_SIZE).enumerate() {
                if is_zero(page) {
                    continue;
                }
                let offset = k as u64 * PAGE;
                let h = self.hash_page(page);
                let v = slots.entry(h).or_default();
                let same = v.iter().any(|&o| {
                    let o = o as usize;
                    map.get(o..o + PAGE_SIZE) == Some(page)
                });
                if same {
                    continue;
                }
                let slot = v.len() as u32;
                v.push(offset);
                format::idx_entry_bytes(
                    &mut body,
                    &IdxEntry {
                        id: PageId::new(h, slot),
                        offset,
                    },
                );
                entries += 1;
            }
        }
        format::write_atomic(
            &self.tmp_dir(),
            &ipath,
            &format::encode_idx(pack, &body),
            || true,
        )
        .map_err(|source| ReindexError::Write {
            path: ipath.clone(),
            source,
        })?;
        drop(_lock);
        self.refresh_mut()?;
        Ok(ReindexReport {
            pack,
            old_entries,
            entries,
            partial_tail: len % PAGE,
        })
    }
}

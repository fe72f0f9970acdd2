//! Per-template location records: `templates/<name>.loc`, beside the manifest,
//! say where each of the template's own pages lives (pack and offset), so that a
//! store opened with [`Store::open_lazy`] resolves a template by reading its
//! layers' records and mapping the packs they name, without reading every pack
//! index of the store.
//!
//! Format ([`format::encode_locations`]): header magic `VMMTLOC1`, major u16,
//! minor u16, body length u64, keyed xxh3-128(body) u128 (the store's secret, as
//! for artifacts: a record copied from another store or forged is refused); body: the checksum of the
//! manifest it describes u128, pack count u32, per pack (id u64, inode u64,
//! birth time in ns u64 or 0, extent u64), entry count u64, one entry u64 per
//! own page in the manifest's order (`pack position << 40 | offset / 4096`).
//!
//! A record is derived data and only ever a hint: it is used only when it
//! decodes, is bound to the manifest as it is now (checksum), names as many
//! pages as the manifest, and every pack it names is at least as long as the
//! record needs; then the first page of each layer in each pack is hashed and
//! checked against its id, and every page in a pack that is no longer the file
//! the record was written for (inode, birth time where the file system has
//! one: a copied store, a pack id reused after `gc`). Otherwise resolving falls back to the pack indexes (and says why in
//! [`Resolved::location_fallback`](crate::Resolved::location_fallback)). Every
//! page is still verified by its hash when a restore reads it.
//!
//! Writers keep records valid or remove them: a commit, import or pull writes
//! the record after the manifest (temp file, fsync, rename) under the store
//! lock; `set_working_set` rebinds it to the new manifest; `remove` deletes it;
//! `gc` deletes the records that name a pack it is about to delete or rewrite
//! (before deleting anything), and afterwards writes a record for every template
//! that has none (which also migrates stores written before records existed).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::format::{self, LocPack, LocRecord};
use crate::packs::{Loc, Pack, PackSet};
use crate::resolve::Template;
use crate::store::Store;
use crate::util::{map_opened, open_regular};
use crate::TemplateName;

/// Birth time of a file in ns since the epoch (0 when the file system has none).
fn born_ns(m: &fs::Metadata) -> u64 {
    m.created()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

impl Store {
    pub(crate) fn loc_path(&self, name: &TemplateName) -> PathBuf {
        self.templates_dir().join(format!("{name}.loc"))
    }

    /// The record of `t` from `view` (the pack indexes): None when one of its
    /// pages is in no index or past the end of its pack's mapping.
    pub(crate) fn build_locations(&self, t: &Template, view: &PackSet) -> Option<LocRecord> {
        let mut slots: HashMap<u32, u32> = HashMap::new();
        let mut packs: Vec<LocPack> = Vec::new();
        let mut entries = Vec::with_capacity(usize::try_from(t.own_page_count()).ok()?);
        for (_, id) in t.own_pages() {
            let loc = *view.index.get(&id)?;
            view.loc_bytes(loc)?;
            let slot = match slots.get(&loc.pack) {
                Some(&s) => s,
                None => {
                    let pack = view.packs.get(loc.pack as usize)?;
                    let m = fs::metadata(self.pack_path(pack.id)).ok()?;
                    if Some(m.ino()) != pack.pack_ino {
                        return None;
                    }
                    let s = packs.len() as u32;
                    if packs.len() >= format::LOC_MAX_PACKS {
                        return None;
                    }
                    packs.push(LocPack {
                        id: pack.id,
                        ino: m.ino(),
                        born_ns: born_ns(&m),
                        extent: 0,
                    });
                    slots.insert(loc.pack, s);
                    s
                }
            };
            let p = &mut packs[slot as usize];
            p.extent = p.extent.max(loc.offset + crate::PAGE_SIZE as u64);
            entries.push(LocRecord::entry(slot, loc.offset));
        }
        Some(LocRecord {
            manifest_sum: t.manifest_sum,
            packs,
            entries,
        })
    }

    /// Writes the location record of `t` (read from its manifest file, so that
    /// it carries the manifest's checksum) from the current pack view; when a
    /// page cannot be located, removes any record instead. Caller holds the
    /// writer lock. Returns whether a record was written.
    pub(crate) fn write_locations(&self, t: &Template) -> io::Result<bool> {
        let path = self.loc_path(&t.name);
        let view = self.view();
        match self
            .build_locations(t, &view)
            .filter(|_| t.manifest_sum != 0)
        {
            Some(rec) => {
                let bytes = format::encode_locations(&rec, &|b| self.hasher.keyed(b));
                format::write_atomic(&self.tmp_dir(), &path, &bytes, || true)?;
                Ok(true)
            }
            None => {
                self.remove_locations(&t.name)?;
                Ok(false)
            }
        }
    }

    /// [`Store::write_locations`] of template `name` as its manifest is now.
    pub(crate) fn write_locations_of(&self, name: &TemplateName) -> io::Result<bool> {
        match self.read_template(name) {
            Ok(t) => self.write_locations(&t),
            Err(e) => {
                self.remove_locations(name)?;
                Err(io::Error::other(e.to_string()))
            }
        }
    }

    /// Removes the location record of `name` (none is fine).
    pub(crate) fn remove_locations(&self, name: &TemplateName) -> io::Result<()> {
        match fs::remove_file(self.loc_path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// After a manifest rewrite that kept its pages (`set_working_set`): binds
    /// the record that matched the old manifest to the new one, or removes it.
    pub(crate) fn rebind_locations(&self, name: &TemplateName, old: u128, new: u128) {
        let path = self.loc_path(name);
        let rec = self
            .read_record(&path)
            .ok()
            .filter(|r| r.manifest_sum == old);
        let written = rec.is_some_and(|mut r| {
            r.manifest_sum = new;
            let bytes = format::encode_locations(&r, &|b| self.hasher.keyed(b));
            format::write_atomic(&self.tmp_dir(), &path, &bytes, || true).is_ok()
        });
        if !written {
            let _ = self.remove_locations(name);
        }
    }

    /// The record of `t`, checked against its manifest.
    pub(crate) fn read_locations(&self, t: &Template) -> Result<LocRecord, String> {
        let path = self.loc_path(&t.name);
        let rec = self
            .read_record(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if t.manifest_sum == 0 || rec.manifest_sum != t.manifest_sum {
            return Err(format!(
                "{}: written for another version of the manifest",
                path.display()
            ));
        }
        if rec.entries.len() as u64 != t.own_page_count() {
            return Err(format!(
                "{}: {} page locations for {} pages",
                path.display(),
                rec.entries.len(),
                t.own_page_count()
            ));
        }
        Ok(rec)
    }

    /// A private view of the packs for resolving `layers` (root first), built
    /// from their location records alone: only the packs they name, mapped,
    /// and an index of only their pages. Err: why the records cannot be used.
    pub(crate) fn located_view(&self, layers: &[&Template]) -> Result<PackSet, String> {
        let mut records = Vec::with_capacity(layers.len());
        for t in layers {
            records.push(self.read_locations(t)?);
        }
        // The packs named, merged across layers.
        let mut set = PackSet::default();
        let mut wanted: Vec<LocPack> = Vec::new();
        for r in &records {
            for p in &r.packs {
                match wanted.iter_mut().find(|w| w.id == p.id) {
                    Some(w) if (w.ino, w.born_ns) == (p.ino, p.born_ns) => {
                        w.extent = w.extent.max(p.extent)
                    }
                    Some(_) => {
                        return Err(format!(
                            "the records of two layers disagree on pack {}",
                            p.id
                        ))
                    }
                    None => wanted.push(*p),
                }
            }
        }
        let mut copied: Vec<bool> = Vec::with_capacity(wanted.len());
        for w in &wanted {
            let path = self.pack_path(w.id);
            let stale = |why: String| format!("pack {} {why}", path.display());
            let f = open_regular(&path).map_err(|e| stale(format!("cannot be opened: {e}")))?;
            let m = f
                .metadata()
                .map_err(|e| stale(format!("cannot be read: {e}")))?;
            // Another file under the same name (the store was copied, or the
            // pack id reused): usable only if every page the records locate
            // in it checks out (below).
            copied.push(m.ino() != w.ino || (w.born_ns != 0 && born_ns(&m) != w.born_ns));
            if m.len() < w.extent {
                return Err(stale(format!(
                    "is {} bytes, the record needs {}",
                    m.len(),
                    w.extent
                )));
            }
            // The extent lay inside the pack's index when the record was written:
            // indexes only grow (or are rebuilt from the pack), and gc cuts a pack
            // only past its index's end and only when every page a template needs
            // is indexed, so the range mapped here is not cut under a current record.
            let map = if w.extent > 0 {
                Some(
                    map_opened(&f, w.extent)
                        .map_err(|e| stale(format!("cannot be mapped: {e}")))?,
                )
            } else {
                None
            };
            let pos = set.packs.len() as u32;
            set.pack_pos.insert(w.id, pos);
            set.packs.push(Arc::new(Pack {
                id: w.id,
                map,
                indexed_end: w.extent,
                idx_stamp: None,
                problem: None,
                idx_error: None,
                map_error: None,
                pack_ino: Some(m.ino()),
                retired: false,
            }));
        }
        let total: usize = records.iter().map(|r| r.entries.len()).sum();
        set.index.reserve(total);
        // Checked against their ids: in a pack that is the file the record was
        // written for, the first page of each layer in it (a record that does
        // not match its pack is caught here, not by the restore); in any other
        // file, every page.
        let mut check: Vec<(crate::PageId, Loc)> = Vec::new();
        for (t, r) in layers.iter().zip(&records) {
            let mut first = vec![false; set.packs.len()];
            for ((_, id), &e) in t.own_pages().zip(&r.entries) {
                let (slot, offset) = LocRecord::split(e);
                let pos = r
                    .packs
                    .get(slot as usize)
                    .and_then(|p: &LocPack| set.pack_pos.get(&p.id).copied())
                    .ok_or_else(|| format!("entry {e:#x} names no pack"))?;
                let loc = Loc { pack: pos, offset };
                let p = pos as usize;
                if copied.get(p).copied().unwrap_or(true) || !first[p] {
                    first[p] = true;
                    check.push((id, loc));
                }
                set.index.insert(id, loc);
            }
        }
        for (id, loc) in check {
            let ok = set
                .loc_bytes(loc)
                .is_some_and(|b| self.hash_page(b) == id.hash());
            if !ok {
                return Err(format!(
                    "page {id} is not at offset {} of pack {} where the records say",
                    loc.offset,
                    self.pack_path(set.packs[loc.pack as usize].id).display()
                ));
            }
        }
        Ok(set)
    }
}

impl Store {
    /// Reads and decodes a record file (a regular file of bounded size).
    pub(crate) fn read_record(&self, path: &std::path::Path) -> Result<LocRecord, String> {
        let f = open_regular(path).map_err(|e| e.to_string())?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        let limit = format::LOC_HEADER as u64 + format::LOC_LIMIT;
        if len > limit {
            return Err(format!("{len} bytes, more than a record can hold"));
        }
        let mut b = Vec::with_capacity(len as usize);
        f.take(limit + 1)
            .read_to_end(&mut b)
            .map_err(|e| e.to_string())?;
        format::decode_locations(&b, &|b| self.hasher.keyed(b)).map_err(|e| e.to_string())
    }
}

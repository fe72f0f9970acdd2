//! Garbage collection: drop pages and packs no template references.
//!
//! Runs under the exclusive writer lock, so no commit interleaves. Crash
//! safety, step by step (each leaves a store that opens and verifies):
//!
//! 1. temp files in `tmp/` are deleted (leftovers of dead writers);
//! 2. live pages of packs that are partly garbage are copied into a new pack
//!    (written, fsynced) whose index is then written atomically — a crash
//!    before the index leaves an unindexed pack (garbage), after it every live
//!    page exists twice (harmless duplicates);
//! 3. the old packs' indexes are deleted, then the packs themselves — a crash
//!    in between leaves unindexed packs (garbage).
//!
//! Packs whose index or data is damaged are left untouched (run `verify`),
//! and gc refuses to run at all while a manifest is unreadable, since it
//! cannot know which pages that template needs.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::GcError;
use crate::format::{self, IdxEntry, IDX_ENTRY, IDX_HEADER};
use crate::store::Store;
use crate::util::{map_file, parse_pack_file, take_lock};
use crate::{PackId, PageId, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// Live pages copied into one new pack before starting another.
const REWRITE_TARGET_PAGES: usize = 1 << 18;

/// What [`Store::gc`] did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Templates whose pages were kept.
    pub templates: u64,
    /// Distinct pages referenced by some template.
    pub referenced_pages: u64,
    /// Indexed pages dropped (unreferenced, or duplicates of a kept page).
    pub removed_pages: u64,
    /// Packs deleted whole (no live page, or no index at all).
    pub packs_deleted: u64,
    /// Packs whose live pages were copied into a new pack before deletion.
    pub packs_rewritten: u64,
    /// Live pages copied by rewriting.
    pub pages_copied: u64,
    /// New packs written by rewriting.
    pub packs_created: Vec<PackId>,
    /// Unindexed bytes truncated from pack tails (interrupted writes).
    pub tail_bytes: u64,
    /// Temp files removed from `tmp/` and their bytes.
    pub tmp_files: u64,
    pub tmp_bytes: u64,
    /// Bytes of packs, indexes and temp files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Damaged packs left alone (each with the reason); run `verify`.
    pub skipped: Vec<String>,
}

impl GcReport {
    pub fn bytes_freed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

enum Plan {
    Keep { tail_to: Option<u64> },
    Delete,
    Rewrite { live: Vec<IdxEntry> },
}

struct PackPlan {
    id: PackId,
    pack_len: u64,
    idx_len: u64,
    entries: usize,
    plan: Plan,
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

impl Store {
    /// Removes pages and packs that no template references, plus temp-file
    /// garbage. With `dry_run`, only reports. See the module doc for crash safety.
    pub fn gc(&mut self, dry_run: bool) -> Result<GcReport, GcError> {
        self.gc_with_progress(dry_run, &mut |_, _| {})
    }

    /// [`Store::gc`] calling `progress(done, total)` as packs are processed.
    pub fn gc_with_progress(
        &mut self,
        dry_run: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<GcReport, GcError> {
        let _lock = take_lock(&self.dir, true).map_err(|source| GcError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        let mut rep = GcReport {
            dry_run,
            ..GcReport::default()
        };

        // 1. Referenced pages: every manifest must be readable.
        let names = self.template_names().map_err(GcError::Templates)?;
        let mut referenced: HashSet<PageId> = HashSet::new();
        for n in &names {
            let t = self
                .read_template(n)
                .map_err(|e| GcError::UnreadableTemplate {
                    path: self.manifest_path(n),
                    source: Box::new(e),
                })?;
            referenced.extend(t.own_pages().map(|(_, id)| id));
        }
        rep.templates = names.len() as u64;
        rep.referenced_pages = referenced.len() as u64;

        // 2. Temp files.
        let tmp = self.tmp_dir();
        let mut tmp_files = Vec::new();
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                rep.tmp_files += 1;
                rep.tmp_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                tmp_files.push(e.path());
            }
        }

        // 3. Plan per pack.
        let pdir = self.packs_dir();
        let io_err = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| GcError::Io { step, path, source }
        };
        let mut ids = BTreeSet::new();
        for e in fs::read_dir(&pdir)
            .map_err(io_err("listing packs", &pdir))?
            .flatten()
        {
            if let Some((id, _)) = e.file_name().to_str().and_then(parse_pack_file) {
                ids.insert(id);
            }
        }
        rep.bytes_before = rep.tmp_bytes
            + ids
                .iter()
                .map(|&id| file_len(&self.pack_path(id)) + file_len(&self.idx_path(id)))
                .sum::<u64>();
        let mut kept: HashSet<PageId> = HashSet::new();
        let mut plans = Vec::new();
        let total = ids.len() as u64;
        for (k, &id) in ids.iter().enumerate() {
            progress(k as u64, total * 2);
            let (ppath, ipath) = (self.pack_path(id), self.idx_path(id));
            let pack_len = fs::metadata(&ppath).map(|m| m.len()).ok();
            let idx = match fs::read(&ipath) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    rep.skipped
                        .push(format!("{}: unreadable index: {e}", ipath.display()));
                    continue;
                }
                Ok(b) => match format::decode_idx(&ipath, id, &b) {
                    Ok(es) => Some((es, b.len() as u64)),
                    Err(e) => {
                        rep.skipped.push(e.to_string());
                        continue;
                    }
                },
            };
            let Some((entries, idx_len)) = idx else {
                // A pack without an index: an interrupted first write.
                plans.push(PackPlan {
                    id,
                    pack_len: pack_len.unwrap_or(0),
                    idx_len: 0,
                    entries: 0,
                    plan: Plan::Delete,
                });
                continue;
            };
            let end = entries
                .iter()
                .map(|e| e.offset.saturating_add(PAGE))
                .max()
                .unwrap_or(0);
            let Some(pack_len) = pack_len.filter(|&l| l >= end) else {
                rep.skipped.push(format!(
                    "{}: pack missing or shorter than its index needs ({end} bytes)",
                    ppath.display()
                ));
                continue;
            };
            let mut live = Vec::new();
            for e in &entries {
                if referenced.contains(&e.id) && kept.insert(e.id) {
                    live.push(*e);
                }
            }
            let plan = if live.is_empty() {
                Plan::Delete
            } else if live.len() == entries.len() {
                Plan::Keep {
                    tail_to: (pack_len > end).then_some(end),
                }
            } else {
                // Check the bytes we are about to copy: never launder a damaged page.
                if end > 0 {
                    let map = map_file(&ppath, end).map_err(io_err("mapping pack", &ppath))?;
                    let bad = live.iter().find(|e| {
                        let s = e.offset as usize;
                        self.hash_page(&map[s..s + PAGE_SIZE]) != e.id.hash()
                    });
                    if let Some(e) = bad {
                        rep.skipped.push(format!(
                            "{}: page {} at offset {} is damaged",
                            ppath.display(),
                            e.id,
                            e.offset
                        ));
                        // Leave the whole pack alone; later copies of its
                        // pages (if any) are kept too.
                        for e in &live {
                            kept.remove(&e.id);
                        }
                        continue;
                    }
                }
                Plan::Rewrite { live }
            };
            plans.push(PackPlan {
                id,
                pack_len,
                idx_len,
                entries: entries.len(),
                plan,
            });
        }

        // Accounting (identical for dry runs).
        let mut after = 0u64;
        let mut copied_total = 0u64;
        for p in &plans {
            match &p.plan {
                Plan::Keep { tail_to } => {
                    after += tail_to.unwrap_or(p.pack_len) + p.idx_len;
                    rep.tail_bytes += p.pack_len - tail_to.unwrap_or(p.pack_len);
                }
                Plan::Delete => {
                    rep.packs_deleted += 1;
                    rep.removed_pages += p.entries as u64;
                }
                Plan::Rewrite { live } => {
                    rep.packs_rewritten += 1;
                    rep.pages_copied += live.len() as u64;
                    rep.removed_pages += (p.entries - live.len()) as u64;
                    copied_total += live.len() as u64;
                }
            }
        }
        let rewrite_packs = copied_total.div_ceil(REWRITE_TARGET_PAGES as u64);
        after += copied_total * (PAGE + IDX_ENTRY as u64) + rewrite_packs * IDX_HEADER as u64;
        // Skipped packs stay as they are.
        let planned: HashSet<PackId> = plans.iter().map(|p| p.id).collect();
        after += ids
            .iter()
            .filter(|id| !planned.contains(id))
            .map(|&id| file_len(&self.pack_path(id)) + file_len(&self.idx_path(id)))
            .sum::<u64>();
        rep.bytes_after = after;
        let mut next_id = ids.iter().next_back().map_or(1, |i| i.get() + 1);
        for i in 0..rewrite_packs {
            rep.packs_created.push(PackId::new(next_id + i));
        }
        if dry_run {
            progress(total * 2, total * 2);
            return Ok(rep);
        }

        // 4. Do it.
        for f in &tmp_files {
            let _ = fs::remove_file(f);
        }
        let live: Vec<(PackId, IdxEntry)> = plans
            .iter()
            .flat_map(|p| match &p.plan {
                Plan::Rewrite { live } => live.iter().map(|e| (p.id, *e)).collect(),
                _ => Vec::new(),
            })
            .collect();
        for chunk in live.chunks(REWRITE_TARGET_PAGES) {
            self.write_rewritten_pack(PackId::new(next_id), chunk)?;
            next_id += 1;
        }
        self.fail("gc-after-new-idx")
            .map_err(|e| GcError::Injected(e.to_string()))?;
        // Old indexes first, so a crash leaves only unindexed (garbage) packs.
        let doomed: Vec<PackId> = plans
            .iter()
            .filter(|p| !matches!(p.plan, Plan::Keep { .. }))
            .map(|p| p.id)
            .collect();
        for (k, id) in doomed.iter().enumerate() {
            progress(total + k as u64, total * 2);
            let ipath = self.idx_path(*id);
            match fs::remove_file(&ipath) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("deleting old pack index", &ipath)(e))
                }
                _ => {}
            }
        }
        format::fsync_dir(&pdir).map_err(io_err("syncing packs directory", &pdir))?;
        self.fail("gc-after-idx-delete")
            .map_err(|e| GcError::Injected(e.to_string()))?;
        for id in &doomed {
            let ppath = self.pack_path(*id);
            match fs::remove_file(&ppath) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("deleting old pack", &ppath)(e))
                }
                _ => {}
            }
        }
        for p in &plans {
            if let Plan::Keep { tail_to: Some(end) } = p.plan {
                let ppath = self.pack_path(p.id);
                OpenOptions::new()
                    .write(true)
                    .open(&ppath)
                    .and_then(|f| f.set_len(end).and_then(|_| f.sync_all()))
                    .map_err(io_err("truncating torn pack tail", &ppath))?;
            }
        }
        format::fsync_dir(&pdir).map_err(io_err("syncing packs directory", &pdir))?;
        progress(total * 2, total * 2);
        self.refresh().map_err(GcError::Index)?;
        Ok(rep)
    }

    /// Writes `pages` (copied from their old packs) as pack `id` with its index.
    fn write_rewritten_pack(
        &self,
        id: PackId,
        pages: &[(PackId, IdxEntry)],
    ) -> Result<(), GcError> {
        let ppath = self.pack_path(id);
        let io_err = |step: &'static str, path: &PathBuf| {
            let path = path.clone();
            move |source: io::Error| GcError::Io { step, path, source }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&ppath)
            .map_err(io_err("creating new pack", &ppath))?;
        let mut body = Vec::with_capacity(pages.len() * IDX_ENTRY);
        {
            let mut w = BufWriter::with_capacity(1 << 20, &mut f);
            let mut cur: Option<(PackId, memmap2::Mmap)> = None;
            for (k, (src, e)) in pages.iter().enumerate() {
                if cur.as_ref().map(|c| c.0) != Some(*src) {
                    let sp = self.pack_path(*src);
                    let len = File::open(&sp)
                        .and_then(|f| f.metadata())
                        .map_err(io_err("opening old pack", &sp))?
                        .len();
                    cur = Some((
                        *src,
                        map_file(&sp, len).map_err(io_err("mapping old pack", &sp))?,
                    ));
                }
                let map = &cur.as_ref().map(|c| &c.1).ok_or_else(|| GcError::Io {
                    step: "mapping old pack",
                    path: ppath.clone(),
                    source: io::Error::other("no mapping"),
                })?;
                let s = e.offset as usize;
                let bytes = map.get(s..s + PAGE_SIZE).ok_or_else(|| GcError::Io {
                    step: "copying live page",
                    path: self.pack_path(*src),
                    source: io::Error::other(format!("offset {} past the end", e.offset)),
                })?;
                w.write_all(bytes)
                    .map_err(io_err("writing new pack", &ppath))?;
                format::idx_entry_bytes(
                    &mut body,
                    &IdxEntry {
                        id: e.id,
                        offset: k as u64 * PAGE,
                    },
                );
            }
            w.flush().map_err(io_err("writing new pack", &ppath))?;
        }
        f.sync_all().map_err(io_err("syncing new pack", &ppath))?;
        let pdir = self.packs_dir();
        format::fsync_dir(&pdir).map_err(io_err("syncing packs directory", &pdir))?;
        self.fail("gc-after-new-pack")
            .map_err(|e| GcError::Injected(e.to_string()))?;
        let ipath = self.idx_path(id);
        format::write_atomic(
            &self.tmp_dir(),
            &ipath,
            &format::encode_idx(id, &body),
            || true,
        )
        .map_err(io_err("writing new pack index", &ipath))?;
        Ok(())
    }
}

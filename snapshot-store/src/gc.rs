//! Garbage collection: drop pages and packs no template references.
//!
//! Runs under the exclusive writer lock, so no commit interleaves. Crash
//! safety, step by step (each leaves a store that opens and verifies):
//!
//! 1. temp files in `tmp/` are deleted (leftovers of dead writers), and in
//!    `cache/` memory images of removed or replaced templates and temp files
//!    of dead processes;
//! 2. live pages of packs that are partly garbage are copied into a new pack
//!    (written, fsynced) whose index is then written atomically — a crash
//!    before the index leaves an unindexed pack (garbage), after it every live
//!    page exists twice (harmless duplicates);
//! 3. the old packs' indexes are deleted, then the packs themselves — a crash
//!    in between leaves unindexed packs (garbage).
//!
//! What is referenced is decided from the manifests, and a page counts as
//! stored only when an index entry points at bytes that hash to its id. gc
//! refuses to run at all while a manifest is unreadable (it cannot know which
//! pages that template needs) or while a template needs a page that no index
//! accounts for (a deleted, damaged, stale or foreign index, forged offsets,
//! damaged pages): deleting or truncating a pack then could lose it. Packs
//! whose index or data is damaged in pages nobody needs are left untouched.

use std::collections::{HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cache::{parse_cache_file, process_alive, CacheFile};
use crate::error::GcError;
use crate::format::{self, IdxEntry, IDX_ENTRY, IDX_HEADER};
use crate::resolve::Template;
use crate::scan::{BadEntry, IdxState, PackScan, Unaccounted};
use crate::store::Store;
use crate::util::{map_file, open_regular, take_lock};
use crate::{PackId, PageId, TemplateName, PAGE_SIZE};

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
    /// Files removed from `cache/` (memory images of removed or replaced
    /// templates, temp files of killed restores) and their bytes (allocated).
    pub cache_files: u64,
    pub cache_bytes: u64,
    /// Bytes of packs, indexes and temp files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Damaged packs left alone (each with the reason); run `verify`.
    pub skipped: Vec<String>,
    /// Template location records written (new, or rewritten after pages moved).
    pub location_records: u64,
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

/// Why a pack is left alone, in a few words.
fn describe_damage(p: &PackScan) -> String {
    if let Some(e) = &p.unreadable {
        return format!("cannot read the pack: {e}");
    }
    if p.pack_len.unwrap_or(0) < p.indexed_end {
        return format!(
            "pack missing or shorter than its index needs ({} bytes)",
            p.indexed_end
        );
    }
    let damaged = p
        .bad
        .iter()
        .filter(|b| matches!(b, BadEntry::Mismatch { .. }))
        .count();
    format!(
        "{} index entries do not match the pack's bytes ({damaged} damaged pages)",
        p.bad.len()
    )
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
        let mut all = Vec::with_capacity(names.len());
        for n in &names {
            let t = self
                .read_template(n)
                .map_err(|e| GcError::UnreadableTemplate {
                    path: self.manifest_path(n),
                    source: Box::new(e),
                })?;
            all.push(t);
        }
        let referenced: HashSet<PageId> = all
            .iter()
            .flat_map(|t| t.own_pages().map(|(_, id)| id))
            .collect();
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

        // 2b. Cache files of templates that are gone or replaced, and temp files
        // of dead processes.
        let created: HashMap<&TemplateName, u64> =
            all.iter().map(|t| (&t.name, t.created_unix_ms)).collect();
        let mut cache_files = Vec::new();
        if let Ok(rd) = fs::read_dir(self.cache_dir()) {
            for e in rd.flatten() {
                let doomed = match parse_cache_file(&e.file_name().to_string_lossy()) {
                    CacheFile::Image { name, created: c } => created.get(&name) != Some(&c),
                    CacheFile::Temp { pid, .. } => !process_alive(pid),
                    CacheFile::Unknown => false,
                };
                if doomed {
                    rep.cache_files += 1;
                    rep.cache_bytes += e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                    cache_files.push(e.path());
                }
            }
        }

        // 3. Every index entry checked against its bytes. Nothing is deleted or
        // truncated unless every page a template needs is accounted for.
        let pdir = self.packs_dir();
        let io_err = |step: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| GcError::Io { step, path, source }
        };
        let scan = self
            .scan_packs(&mut |done, total| progress(done, total * 2))
            .map_err(io_err("listing packs", &pdir))?;
        let missing = Unaccounted::find(&all, &scan.valid);
        if !missing.is_empty() {
            let holders = self.find_unaccounted(&scan, &missing);
            return Err(GcError::Unaccounted {
                templates: missing.names(None),
                pages: missing.pages.len() as u64,
                packs: holders.keys().copied().collect(),
            });
        }
        let ids: Vec<PackId> = scan.packs.iter().map(|p| p.id).collect();
        rep.bytes_before = rep.tmp_bytes
            + ids
                .iter()
                .map(|&id| file_len(&self.pack_path(id)) + file_len(&self.idx_path(id)))
                .sum::<u64>();
        let mut kept: HashSet<PageId> = HashSet::new();
        let mut plans = Vec::new();
        let total = ids.len() as u64;
        for p in &scan.packs {
            let pack_len = p.pack_len.unwrap_or(0);
            let (entries, idx_len) = match &p.idx {
                IdxState::Missing => {
                    // No index: an interrupted first write, or an index lost
                    // while no template needs the pages (checked above).
                    plans.push(PackPlan {
                        id: p.id,
                        pack_len,
                        idx_len: 0,
                        entries: 0,
                        plan: Plan::Delete,
                    });
                    continue;
                }
                IdxState::Bad { reason, .. } => {
                    rep.skipped.push(reason.clone());
                    continue;
                }
                IdxState::Ok { entries, bytes } => (entries.len(), *bytes),
            };
            if !p.intact() {
                // Damaged (in pages no template needs, see above): left alone,
                // and the good pages in it stay where they are.
                kept.extend(p.verified.iter().map(|e| e.id));
                rep.skipped.push(format!(
                    "{}: {}",
                    self.pack_path(p.id).display(),
                    describe_damage(p)
                ));
                continue;
            }
            let mut live = Vec::new();
            for e in &p.verified {
                if referenced.contains(&e.id) && kept.insert(e.id) {
                    live.push(*e);
                }
            }
            let plan = if live.is_empty() {
                Plan::Delete
            } else if live.len() == entries {
                Plan::Keep {
                    tail_to: (p.tail() > 0).then_some(p.indexed_end),
                }
            } else {
                Plan::Rewrite { live }
            };
            plans.push(PackPlan {
                id: p.id,
                pack_len,
                idx_len,
                entries,
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
        let mut next_id = ids.iter().max().map_or(1, |i| i.get() + 1);
        for i in 0..rewrite_packs {
            rep.packs_created.push(PackId::new(next_id + i));
        }
        if dry_run {
            progress(total * 2, total * 2);
            return Ok(rep);
        }

        // 4. Do it.
        for f in tmp_files.iter().chain(&cache_files) {
            let _ = fs::remove_file(f);
        }
        let live: Vec<(PackId, IdxEntry)> = plans
            .iter()
            .flat_map(|p| match &p.plan {
                Plan::Rewrite { live } => live.iter().map(|e| (p.id, *e)).collect(),
                _ => Vec::new(),
            })
            .collect();
        let mut created = Vec::new();
        for chunk in live.chunks(REWRITE_TARGET_PAGES) {
            let id = PackId::new(next_id);
            created.push(id);
            if let Err(e) = self.write_rewritten_pack(id, chunk) {
                if matches!(e, GcError::Io { .. }) {
                    // A real failure (a full disk, say): the old packs are
                    // untouched, so remove what this run wrote and leave the
                    // store as it was. (An injected crash leaves it, as a
                    // killed gc would.)
                    self.remove_new_packs(&created);
                }
                return Err(e);
            }
            next_id += 1;
        }
        self.fail("gc-after-new-idx")
            .map_err(|e| GcError::Injected(e.to_string()))?;
        let doomed: Vec<PackId> = plans
            .iter()
            .filter(|p| !matches!(p.plan, Plan::Keep { .. }))
            .map(|p| p.id)
            .collect();
        // Location records that name a pack about to go are removed before it
        // goes (a pack id may be reused later), with orphans and damaged ones.
        self.drop_location_records(&all, &doomed);
        self.fail("gc-after-locations")
            .map_err(|e| GcError::Injected(e.to_string()))?;
        // Old indexes first, so a crash leaves only unindexed (garbage) packs.

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
        self.refresh_mut().map_err(GcError::Index)?;
        // Every template gets a record that matches the packs as they are now
        // (this also gives records to templates written before they existed).
        for t in &all {
            if let Ok(true) = self.refresh_location_record(t) {
                rep.location_records += 1;
            }
        }
        Ok(rep)
    }

    /// Removes the location records that name one of `doomed`, that cannot be
    /// read, or whose template is gone.
    fn drop_location_records(&self, all: &[Template], doomed: &[PackId]) {
        let tdir = self.templates_dir();
        let Ok(rd) = fs::read_dir(&tdir) else {
            return;
        };
        for e in rd.flatten() {
            let fname = e.file_name();
            let learned = fname
                .to_str()
                .and_then(|s| s.strip_suffix(".ws"))
                .and_then(|s| TemplateName::new(s).ok());
            if let Some(name) = learned {
                // A learned working set whose template is gone.
                if !all.iter().any(|t| t.name == name) {
                    let _ = fs::remove_file(e.path());
                }
                continue;
            }
            let Some(name) = fname
                .to_str()
                .and_then(|s| s.strip_suffix(".loc"))
                .and_then(|s| TemplateName::new(s).ok())
            else {
                continue;
            };
            let keep = all.iter().any(|t| t.name == name)
                && self
                    .read_record(&e.path())
                    .is_ok_and(|r| !r.packs.iter().any(|p| doomed.contains(&p.id)));
            if !keep {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = format::fsync_dir(&tdir);
    }

    /// Rewrites `t`'s location record when it differs from what the pack
    /// indexes say now (or is missing). Returns whether it wrote one.
    fn refresh_location_record(&self, t: &Template) -> io::Result<bool> {
        let view = self.view();
        let want = self.build_locations(t, &view);
        let have = self.read_record(&self.loc_path(&t.name)).ok();
        if want.is_some() && want == have {
            return Ok(false);
        }
        self.write_locations(t)
    }

    /// Removes packs (index first) that a failed run had started to write.
    fn remove_new_packs(&self, ids: &[PackId]) {
        for &id in ids {
            let _ = fs::remove_file(self.idx_path(id));
        }
        for &id in ids {
            let _ = fs::remove_file(self.pack_path(id));
        }
        let _ = format::fsync_dir(&self.packs_dir());
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
                    let len = open_regular(&sp)
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
                if self.hash_page(bytes) != e.id.hash() {
                    return Err(GcError::Io {
                        step: "copying live page",
                        path: self.pack_path(*src),
                        source: io::Error::other(format!(
                            "page {} at offset {} changed since it was checked",
                            e.id, e.offset
                        )),
                    });
                }
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

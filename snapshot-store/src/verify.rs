//! Checking a store: config, every pack page against its id, every manifest
//! and parent chain, leftovers. See [`Store::verify`]. What is garbage is
//! decided from the manifests: bytes that may hold a page some template needs
//! are never called harmless.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cache::{parse_cache_file, process_alive, CacheFile};
use crate::format;
use crate::resolve::Template;
use crate::scan::{name_list, BadEntry, IdxState, PackScan, Scan, Unaccounted};
use crate::store::{Store, MAX_DEPTH};
use crate::util::{open_regular, read_regular, take_lock, IdMap};
use crate::{PackId, PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

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
    pub(crate) fn corrupt(
        path: impl AsRef<Path>,
        what: String,
        hint: impl Into<String>,
    ) -> Problem {
        Problem {
            severity: Severity::Corruption,
            path: path.as_ref().into(),
            what,
            hint: hint.into(),
        }
    }
    pub(crate) fn garbage(
        path: impl AsRef<Path>,
        what: String,
        hint: impl Into<String>,
    ) -> Problem {
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

impl Store {
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
        match read_regular(&cfg) {
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
        // 2. packs and indexes, every entry against its bytes
        let pdir = self.packs_dir();
        let scan = self.scan_packs(progress).unwrap_or_else(|e| {
            probs.push(Problem::corrupt(
                &pdir,
                format!("cannot list packs: {e}"),
                "check the store directory",
            ));
            Scan::default()
        });
        // 3. manifests and parent chains
        let mut tprobs = Vec::new();
        let good = self.verify_templates(&mut tprobs);
        // 4. pages templates need that no index accounts for, and where they are
        let all: Vec<Template> = good.values().cloned().collect();
        let missing = Unaccounted::find(&all, &scan.valid);
        let holders = if missing.is_empty() {
            BTreeMap::new()
        } else {
            self.find_unaccounted(&scan, &missing)
        };
        self.report_packs(&scan, &missing, &holders, &mut probs);
        self.report_missing_pages(&all, &scan.valid, &missing, &holders, &mut probs);
        probs.append(&mut tprobs);
        // 5. pages nobody needs
        let referenced: HashSet<PageId> = all
            .iter()
            .flat_map(|t| t.own_pages().map(|(_, id)| id))
            .collect();
        let mut per_pack: BTreeMap<PackId, u64> = BTreeMap::new();
        for (id, pack) in &scan.valid {
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
        // 6. memory-image cache
        self.verify_cache(&good, &mut probs);
        // 7. compiled-module cache
        self.verify_artifacts(&mut probs);
        // 8. temp files
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

    /// Checks every cached memory image of a current template against its
    /// page ids; reports stale images and temp files of dead processes.
    fn verify_cache(&self, good: &BTreeMap<TemplateName, Template>, probs: &mut Vec<Problem>) {
        let Ok(rd) = fs::read_dir(self.cache_dir()) else {
            return;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            match parse_cache_file(&e.file_name().to_string_lossy()) {
                CacheFile::Image { name, created } => {
                    let Some(t) = good.get(&name).filter(|t| t.created_unix_ms == created) else {
                        probs.push(Problem::garbage(
                            &path,
                            "memory image of a removed or replaced template".into(),
                            "harmless; gc deletes it",
                        ));
                        continue;
                    };
                    // A template whose chain is broken is reported above.
                    let Ok(ids) = self.page_ids(t) else {
                        continue;
                    };
                    let data: Vec<(u64, PageId)> = ids
                        .iter()
                        .enumerate()
                        .filter_map(|(f, id)| id.map(|id| (f as u64, id)))
                        .collect();
                    let res = open_regular(&path)
                        .map_err(|e| format!("cannot open it: {e}"))
                        .and_then(|f| self.check_image(&f, t.mem_size, &data));
                    if let Err(why) = res {
                        probs.push(Problem::corrupt(
                            &path,
                            format!("the cached memory image of template {name} is altered or damaged: {why}"),
                            "it is derived data: delete it (restores check an image before use and rebuild one that does not match, from the verified pages)",
                        ));
                    }
                }
                CacheFile::Temp { pid, .. } => {
                    if !process_alive(pid) {
                        probs.push(Problem::garbage(
                            &path,
                            format!("memory image left half-built by process {pid}, which is gone"),
                            "harmless; gc (or removing the template) deletes it",
                        ));
                    }
                }
                CacheFile::Unknown => probs.push(Problem::garbage(
                    &path,
                    "unknown file in cache/".into(),
                    "delete it",
                )),
            }
        }
    }

    /// Problems of each pack and index. `holders`: packs whose bytes hold
    /// pages that templates need but no index accounts for.
    fn report_packs(
        &self,
        scan: &Scan,
        missing: &Unaccounted,
        holders: &BTreeMap<PackId, Vec<u128>>,
        probs: &mut Vec<Problem>,
    ) {
        for path in &scan.strays {
            probs.push(Problem::garbage(
                path,
                "unknown file in packs/".into(),
                "delete it",
            ));
        }
        for p in &scan.packs {
            let (idx_path, pack_path) = (self.idx_path(p.id), self.pack_path(p.id));
            let held = holders.get(&p.id);
            if let Some(h) = held {
                let names = missing.names(Some(h));
                probs.push(Problem::corrupt(
                    &pack_path,
                    format!(
                        "holds {} page(s) that templates {} need, but no index accounts for them ({})",
                        h.len(),
                        name_list(&names, 8),
                        match &p.idx {
                            IdxState::Missing => "the pack has no index",
                            IdxState::Bad { .. } => "its index is damaged",
                            IdxState::Ok { .. } => "its index is stale, forged or from another store",
                        }
                    ),
                    format!(
                        "rebuild the index from the pack (`vmm-store reindex {}`); until then gc refuses to run",
                        p.id
                    ),
                ));
            }
            match &p.idx {
                IdxState::Missing => {
                    let len = p.pack_len.unwrap_or(0);
                    if len > 0 && held.is_none() {
                        probs.push(Problem::garbage(
                            &pack_path,
                            format!("{len} bytes in a pack with no index (interrupted first write); no template needs them"),
                            "harmless; gc deletes it",
                        ));
                    }
                    continue;
                }
                IdxState::Bad { reason, unreadable } => {
                    let hint = if *unreadable {
                        "check the permissions of the index file; restore it from a backup"
                    } else {
                        "restore this index (and its pack) from a backup, or rebuild it from the pack with `vmm-store reindex`; templates using its pages must otherwise be re-created"
                    };
                    probs.push(Problem::corrupt(&idx_path, reason.clone(), hint));
                    continue;
                }
                IdxState::Ok { .. } => {}
            }
            let entries = match &p.idx {
                IdxState::Ok { entries, .. } => entries.len(),
                _ => 0,
            };
            let Some(pack_len) = p.pack_len else {
                if entries > 0 {
                    probs.push(Problem::corrupt(
                        &pack_path,
                        format!("pack file missing but its index lists {entries} pages"),
                        "restore the pack from a backup; templates using its pages must be re-created",
                    ));
                }
                continue;
            };
            if let Some(e) = &p.unreadable {
                probs.push(Problem::corrupt(
                    &pack_path,
                    format!("cannot read the pack: {e}"),
                    "fix the permissions of the pack file (whoever restores templates must be able to read it), or restore it from a backup",
                ));
                continue;
            }
            if pack_len < p.indexed_end {
                probs.push(Problem::corrupt(
                    &pack_path,
                    format!(
                        "pack is truncated: {pack_len} bytes, index needs {}",
                        p.indexed_end
                    ),
                    "restore the pack from a backup; templates using the lost pages must be re-created",
                ));
            } else if p.tail() > 0 && held.is_none() {
                probs.push(Problem::garbage(
                    &pack_path,
                    format!(
                        "{} unindexed bytes at the pack tail (interrupted write); no template needs them",
                        p.tail()
                    ),
                    "harmless; gc truncates it",
                ));
            }
            self.report_bad_entries(p, pack_len, probs);
        }
    }

    /// Index entries that do not point at their page, one problem per kind
    /// (a forged or foreign index would otherwise give one per entry).
    fn report_bad_entries(&self, p: &PackScan, pack_len: u64, probs: &mut Vec<Problem>) {
        let (idx_path, pack_path) = (self.idx_path(p.id), self.pack_path(p.id));
        let more = |n: usize| {
            if n > 1 {
                format!(" ({} more like it)", n - 1)
            } else {
                String::new()
            }
        };
        let past: Vec<_> = p
            .bad
            .iter()
            .filter_map(|b| match b {
                BadEntry::PastEnd { id, offset } => Some((id, offset)),
                _ => None,
            })
            .collect();
        if let Some((id, offset)) = past.first() {
            probs.push(Problem::corrupt(
                &idx_path,
                format!("index entry for page {id} at offset {offset} lies past the end of its pack ({pack_len} bytes){}", more(past.len())),
                "restore the pack from a backup; templates using this page must be re-created",
            ));
        }
        let dups: Vec<u64> = p
            .bad
            .iter()
            .filter_map(|b| match b {
                BadEntry::DupOffset { offset } => Some(*offset),
                _ => None,
            })
            .collect();
        if let Some(offset) = dups.first() {
            probs.push(Problem::corrupt(
                &idx_path,
                format!(
                    "two index entries point at offset {offset}{}",
                    more(dups.len())
                ),
                format!("the index is damaged or forged: rebuild it from the pack (`vmm-store reindex {}`) or restore it from a backup", p.id),
            ));
        }
        let bad: Vec<_> = p
            .bad
            .iter()
            .filter_map(|b| match b {
                BadEntry::Mismatch {
                    id,
                    offset,
                    computed,
                } => Some((id, offset, computed)),
                _ => None,
            })
            .collect();
        if let Some((id, offset, h)) = bad.first() {
            let hint = if bad.len() > 1 && p.verified.is_empty() {
                format!("no entry of this index matches its bytes: it may come from another store; rebuild it from the pack (`vmm-store reindex {}`)", p.id)
            } else {
                "restore the pack from a backup; templates using this page must be re-created"
                    .to_string()
            };
            probs.push(Problem::corrupt(
                &pack_path,
                format!(
                    "page {id} at offset {offset} is damaged: its bytes hash to {h:032x}{}",
                    more(bad.len())
                ),
                hint,
            ));
        }
    }

    /// One problem per template whose own pages no index accounts for.
    fn report_missing_pages(
        &self,
        all: &[Template],
        valid: &IdMap<PackId>,
        missing: &Unaccounted,
        holders: &BTreeMap<PackId, Vec<u128>>,
        probs: &mut Vec<Problem>,
    ) {
        if missing.is_empty() {
            return;
        }
        for t in all {
            let mut bad_pages = 0u64;
            let mut first_bad = None;
            let mut found_in = BTreeSet::new();
            for (frame, id) in t.own_pages() {
                if !valid.contains_key(&id) {
                    bad_pages += 1;
                    first_bad.get_or_insert((frame, id));
                    for (pack, hs) in holders {
                        if hs.binary_search(&id.hash()).is_ok() {
                            found_in.insert(*pack);
                        }
                    }
                }
            }
            let Some((frame, id)) = first_bad else {
                continue;
            };
            let hint = if found_in.is_empty() {
                "re-create this template (and templates layered on it)".to_string()
            } else {
                let cmds: Vec<String> = found_in
                    .iter()
                    .map(|p| format!("`vmm-store reindex {p}`"))
                    .collect();
                format!(
                    "its pages are still in the bytes of {} pack(s) whose index does not list them: rebuild the index ({}); else re-create this template (and templates layered on it)",
                    found_in.len(),
                    cmds.join(", ")
                )
            };
            probs.push(Problem::corrupt(
                self.manifest_path(&t.name),
                format!(
                    "{bad_pages} pages are missing or damaged (first: frame {frame}, page {id})"
                ),
                hint,
            ));
        }
    }

    /// Reads every manifest and checks the parent chains; returns the readable templates.
    /// Location records (hints for lazy restores, never needed): orphaned,
    /// damaged or stale ones are garbage that `gc` rewrites or removes.
    /// Learned working sets (`<name>.ws`) are hints: one whose template is gone is
    /// garbage; one that cannot be used is reported (restores ignore it; the next restore
    /// that learns replaces it); one learned for an earlier version of the manifest is
    /// expected after a template is replaced, and nothing to report.
    fn verify_learned_sets(
        &self,
        sets: &[(TemplateName, std::path::PathBuf)],
        good: &BTreeMap<TemplateName, Template>,
        probs: &mut Vec<Problem>,
    ) {
        const HINT: &str = "run `vmm-store gc` or delete the file; restores use the working set in the manifest meanwhile";
        for (name, path) in sets {
            if !self.manifest_path(name).exists() {
                probs.push(Problem::garbage(
                    path,
                    format!("learned working set of template {name}, which does not exist"),
                    HINT,
                ));
                continue;
            }
            let Some(t) = good.get(name) else { continue };
            if let Err(why) = self.learned_working_set(t) {
                if !why.contains("another version") {
                    probs.push(Problem::garbage(
                        path,
                        format!("unusable learned working set: {why}"),
                        HINT,
                    ));
                }
            }
        }
    }

    fn verify_location_records(
        &self,
        records: &[(TemplateName, std::path::PathBuf)],
        good: &BTreeMap<TemplateName, Template>,
        probs: &mut Vec<Problem>,
    ) {
        const HINT: &str =
            "run `vmm-store gc` (it rewrites or removes location records) or delete the file; restores read the pack indexes meanwhile";
        for (name, path) in records {
            if !self.manifest_path(name).exists() {
                probs.push(Problem::garbage(
                    path,
                    format!("location record of template {name}, which does not exist"),
                    HINT,
                ));
                continue;
            }
            // An unreadable manifest is reported on its own.
            let Some(t) = good.get(name) else { continue };
            match self.read_record(path) {
                Err(why) => {
                    probs.push(Problem::garbage(
                        path,
                        format!("unusable location record: {why}"),
                        HINT,
                    ));
                    continue;
                }
                // Written for an earlier version of the manifest (one rewritten
                // by a tool that knows no records): ignored by restores, and
                // rewritten by the next gc; nothing to report.
                Ok(r) if r.manifest_sum != t.manifest_sum => continue,
                Ok(_) => {}
            }
            if let Err(why) = self.located_view(&[t]) {
                probs.push(Problem::garbage(
                    path,
                    format!("stale location record: {why}"),
                    HINT,
                ));
            }
        }
    }

    fn verify_templates(&self, probs: &mut Vec<Problem>) -> BTreeMap<TemplateName, Template> {
        let tdir = self.templates_dir();
        let mut good: BTreeMap<TemplateName, Template> = BTreeMap::new();
        let rd = match fs::read_dir(&tdir) {
            Ok(rd) => rd,
            Err(e) => {
                probs.push(Problem::corrupt(
                    &tdir,
                    format!("cannot list templates: {e}"),
                    "check the store directory",
                ));
                return good;
            }
        };
        let mut broken: BTreeSet<TemplateName> = BTreeSet::new();
        let mut records: Vec<(TemplateName, std::path::PathBuf)> = Vec::new();
        let mut learned_sets: Vec<(TemplateName, std::path::PathBuf)> = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            let fname = e.file_name();
            let record = fname
                .to_str()
                .and_then(|s| s.strip_suffix(".loc"))
                .and_then(|s| TemplateName::new(s).ok());
            if let Some(name) = record {
                records.push((name, path));
                continue;
            }
            let learned = fname
                .to_str()
                .and_then(|s| s.strip_suffix(".ws"))
                .and_then(|s| TemplateName::new(s).ok());
            if let Some(name) = learned {
                learned_sets.push((name, path));
                continue;
            }
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
        self.verify_location_records(&records, &good, probs);
        self.verify_learned_sets(&learned_sets, &good, probs);
        let mut cycles_reported: BTreeSet<Vec<TemplateName>> = BTreeSet::new();
        for t in good.values() {
            let path = self.manifest_path(&t.name);
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
        good
    }
}

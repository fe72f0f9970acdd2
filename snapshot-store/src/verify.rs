//! Checking a store: config, every pack page against its id, every manifest
//! and parent chain, leftovers. See [`Store::verify`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::format;
use crate::resolve::Template;
use crate::store::{Store, MAX_DEPTH};
use crate::util::{map_file, parse_pack_file, take_lock, IdMap};
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

impl Store {
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

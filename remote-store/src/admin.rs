//! Looking after a remote: list its templates, count its bytes, verify every
//! object, collect garbage (two passes a grace period apart; see the crate doc).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::client::{Listed, Remote, Traffic};
use crate::error::RemoteError;
use crate::functions;
use crate::objects::{self, GcMarks, Hash, Manifest, PackIndex, MAX_PACK_PAGES};
use crate::pull::MAX_CHAIN;
use crate::state;
use crate::Progress;
use snapshot_store::PAGE_SIZE;

/// A template on the remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteTemplate {
    pub name: String,
    pub parent: Option<String>,
    pub mem_size: u64,
    /// Frames with a page of this layer's own.
    pub own_pages: u64,
    pub created_unix_ms: u64,
    pub pushed_unix_ms: u64,
    /// Its manifest object (hex).
    pub manifest: String,
}

/// The remote's templates, and apart, references that cannot be read (with why).
#[derive(Clone, Debug, Default)]
pub struct RemoteList {
    pub templates: Vec<RemoteTemplate>,
    pub unreadable: Vec<(String, String)>,
}

fn ref_names(objs: &[Listed]) -> Vec<String> {
    let mut v: Vec<String> = objs
        .iter()
        .filter_map(|o| o.key.strip_prefix("templates/").map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Every template on the remote, sorted by name.
pub fn list(remote: &Remote) -> Result<RemoteList, RemoteError> {
    let mut out = RemoteList::default();
    for name in ref_names(&remote.list("listing templates", "templates")?) {
        let r = state::get_ref(remote, &name).and_then(|r| {
            let r = r.ok_or_else(|| RemoteError::NotOnRemote {
                name: name.clone(),
                remote: remote.display().to_string(),
            })?;
            let m = state::get_manifest(remote, &r.manifest)?.ok_or_else(|| {
                RemoteError::DamagedObject {
                    object: state::ref_key(&name),
                    reason: format!(
                        "it names manifest {}, which is missing",
                        state::manifest_key(&r.manifest)
                    ),
                }
            })?;
            Ok((r, m))
        });
        match r {
            Ok((r, m)) => out.templates.push(RemoteTemplate {
                name: m.name.clone(),
                parent: m.parent.as_ref().map(|(p, _)| p.clone()),
                mem_size: m.mem_size,
                own_pages: m.own_page_count(),
                created_unix_ms: m.created_unix_ms,
                pushed_unix_ms: r.pushed_unix_ms,
                manifest: objects::hex(&r.manifest),
            }),
            Err(e) => out.unreadable.push((name, e.to_string())),
        }
    }
    Ok(out)
}

/// Space on the remote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteStats {
    pub templates: u64,
    /// Sum over templates of their non-zero guest pages (whole chain), in bytes:
    /// what the templates would take stored apart without zero pages.
    pub logical_nonzero_bytes: u64,
    /// Distinct pages the templates reference, in bytes.
    pub unique_page_bytes: u64,
    /// Every object under the prefix.
    pub physical_bytes: u64,
    pub objects: u64,
    pub pack_bytes: u64,
    pub packs: u64,
    /// logical_nonzero_bytes / physical_bytes.
    pub dedup_ratio: f64,
    pub unreadable: Vec<(String, String)>,
}

/// Fetches manifests once each.
struct Manifests<'a> {
    remote: &'a Remote,
    got: HashMap<Hash, Manifest>,
}

impl Manifests<'_> {
    fn get(&mut self, h: &Hash) -> Result<&Manifest, RemoteError> {
        if !self.got.contains_key(h) {
            let m =
                state::get_manifest(self.remote, h)?.ok_or_else(|| RemoteError::DamagedObject {
                    object: state::manifest_key(h),
                    reason: "it is missing".into(),
                })?;
            self.got.insert(*h, m);
        }
        Ok(&self.got[h])
    }

    /// The chain of manifest `h`, root first.
    fn chain(&mut self, name: &str, h: Hash) -> Result<Vec<Hash>, RemoteError> {
        let mut v = vec![h];
        let mut cur = h;
        while let Some((_, p)) = self.get(&cur)?.parent.clone() {
            if v.len() >= MAX_CHAIN || v.contains(&p) {
                return Err(RemoteError::ChainTooLong {
                    name: name.to_string(),
                    max: MAX_CHAIN,
                });
            }
            v.push(p);
            cur = p;
        }
        v.reverse();
        Ok(v)
    }
}

/// Logical and physical bytes on the remote, and the dedup ratio.
pub fn stats(remote: &Remote) -> Result<RemoteStats, RemoteError> {
    let all = remote.list("listing the remote", "")?;
    let mut s = RemoteStats {
        objects: all.len() as u64,
        physical_bytes: all.iter().map(|o| o.size).sum(),
        ..Default::default()
    };
    for o in &all {
        if o.key.starts_with("packs/") && o.key.ends_with(".pack") {
            s.packs += 1;
            s.pack_bytes += o.size;
        }
    }
    let mut ms = Manifests {
        remote,
        got: HashMap::new(),
    };
    let mut unique: BTreeSet<Hash> = BTreeSet::new();
    for name in ref_names(&all) {
        let r = (|| {
            let r = state::get_ref(remote, &name)?.ok_or_else(|| RemoteError::NotOnRemote {
                name: name.clone(),
                remote: remote.display().to_string(),
            })?;
            let chain = ms.chain(&name, r.manifest)?;
            let frames = (ms.get(&r.manifest)?.mem_size / PAGE_SIZE as u64) as usize;
            let mut data = vec![false; frames];
            for h in &chain {
                let m = ms.get(h)?;
                // (a parent of another size is refused by pull; here it just counts less)
                for &(f, n) in &m.zero_runs {
                    if let Some(d) = data.get_mut(f as usize..(f + n) as usize) {
                        d.fill(false);
                    }
                }
                for (f, p) in m.own_pages() {
                    if let Some(d) = data.get_mut(f as usize) {
                        *d = true;
                    }
                    unique.insert(*p);
                }
            }
            Ok::<u64, RemoteError>(data.iter().filter(|d| **d).count() as u64)
        })();
        match r {
            Ok(n) => {
                s.templates += 1;
                s.logical_nonzero_bytes += n * PAGE_SIZE as u64;
            }
            Err(e) => s.unreadable.push((name, e.to_string())),
        }
    }
    s.unique_page_bytes = unique.len() as u64 * PAGE_SIZE as u64;
    s.dedup_ratio = if s.physical_bytes == 0 {
        0.0
    } else {
        s.logical_nonzero_bytes as f64 / s.physical_bytes as f64
    };
    Ok(s)
}

/// How bad a problem on the remote is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteSeverity {
    /// A template cannot be pulled as pushed.
    Corruption,
    /// Space nothing uses (gc reclaims it).
    Garbage,
}

/// A problem `verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteProblem {
    pub severity: RemoteSeverity,
    /// The object (key below the prefix).
    pub object: String,
    /// The templates affected (empty for garbage).
    pub templates: Vec<String>,
    pub message: String,
}

/// Checks every object: each template's reference and manifest chain, every
/// pack they use (downloaded whole: its name is the BLAKE3 of its bytes, and
/// each page used must hash to the name the manifest gives it), the pack
/// indexes, every deployed function's record and blob (downloaded whole: its
/// name is the SHA-256 of its bytes), and what nothing references (garbage;
/// never a function's record or blob).
pub fn verify(
    remote: &Remote,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<RemoteProblem>, u64, Traffic), RemoteError> {
    let t0 = remote.traffic();
    let all = remote.list("listing the remote", "")?;
    let mut problems = Vec::new();
    let corrupt = |object: String, templates: Vec<String>, message: String| RemoteProblem {
        severity: RemoteSeverity::Corruption,
        object,
        templates,
        message,
    };
    let mut ms = Manifests {
        remote,
        got: HashMap::new(),
    };
    // pack -> [(page number, page, template)]
    let mut uses: BTreeMap<Hash, Vec<(u32, Hash, String)>> = BTreeMap::new();
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let names = ref_names(&all);
    for name in &names {
        reached.insert(state::ref_key(name));
        let r = match state::get_ref(remote, name) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                problems.push(corrupt(
                    state::ref_key(name),
                    vec![name.clone()],
                    e.to_string(),
                ));
                continue;
            }
        };
        let chain = match ms.chain(name, r.manifest) {
            Ok(c) => c,
            Err(e) => {
                problems.push(corrupt(
                    state::manifest_key(&r.manifest),
                    vec![name.clone()],
                    e.to_string(),
                ));
                continue;
            }
        };
        for h in chain {
            if !reached.insert(state::manifest_key(&h)) {
                continue;
            }
            let m = match ms.get(&h) {
                Ok(m) => m.clone(),
                Err(e) => {
                    problems.push(corrupt(
                        state::manifest_key(&h),
                        vec![name.clone()],
                        e.to_string(),
                    ));
                    continue;
                }
            };
            for (k, page) in m.pages.iter().enumerate() {
                let (p, n) = m.locs[k];
                uses.entry(m.packs[p as usize])
                    .or_default()
                    .push((n, *page, m.name.clone()));
            }
        }
    }
    let listed: HashMap<&str, &Listed> = all.iter().map(|o| (o.key.as_str(), o)).collect();
    let total: u64 = uses
        .keys()
        .filter_map(|p| listed.get(state::pack_key(p).as_str()).map(|o| o.size))
        .sum();
    let mut done = 0u64;
    for (pack, pages) in &uses {
        let key = state::pack_key(pack);
        reached.insert(key.clone());
        reached.insert(state::idx_key(pack));
        let mut templates: Vec<String> = pages.iter().map(|p| p.2.clone()).collect();
        templates.sort();
        templates.dedup();
        if !listed.contains_key(key.as_str()) {
            problems.push(corrupt(key, templates, "the pack is missing".into()));
            continue;
        }
        let limit = (MAX_PACK_PAGES * PAGE_SIZE) as u64;
        let bytes = match remote.get("reading pack", &key, limit) {
            Ok(Some(b)) => b,
            Ok(None) => {
                problems.push(corrupt(key, templates, "the pack is missing".into()));
                continue;
            }
            Err(RemoteError::DamagedObject { reason, .. }) => {
                problems.push(corrupt(key, templates, reason));
                continue;
            }
            Err(e) => return Err(e),
        };
        done += bytes.len() as u64;
        progress(Progress::new("checking packs", done, total));
        for (n, page, t) in pages {
            let s = *n as usize * PAGE_SIZE;
            match bytes.get(s..s + PAGE_SIZE) {
                Some(b) if objects::hash(b) == *page => {}
                Some(_) => problems.push(corrupt(
                    key.clone(),
                    vec![t.clone()],
                    format!(
                        "page {n} does not match its identity {}",
                        objects::hex(page)
                    ),
                )),
                None => problems.push(corrupt(
                    key.clone(),
                    vec![t.clone()],
                    format!("page {n} is past the end of the pack"),
                )),
            }
        }
        // The index (push relies on it to find pages): it must name and describe the pack.
        let ik = state::idx_key(pack);
        let index_problem =
            match remote.get("reading pack index", &ik, objects::IDX_LIMIT as u64 + 64)? {
                None => None,
                Some(b) => match PackIndex::decode(pack, &b) {
                    Err(reason) => Some(reason),
                    Ok(i) if objects::pack_name(&i.salt, &bytes) != *pack => Some(
                        "its pack's bytes do not hash to the pack's name (the pack was altered)"
                            .into(),
                    ),
                    Ok(i)
                        if i.pack_len() != bytes.len() as u64
                            || !i.pages.iter().enumerate().all(|(n, h)| {
                                bytes
                                    .get(n * PAGE_SIZE..(n + 1) * PAGE_SIZE)
                                    .is_some_and(|b| objects::hash(b) == *h)
                            }) =>
                    {
                        Some("it does not describe its pack's pages".into())
                    }
                    Ok(_) => None,
                },
            };
        if let Some(message) = index_problem {
            problems.push(RemoteProblem {
                severity: RemoteSeverity::Corruption,
                object: ik,
                templates: templates.clone(),
                message,
            });
        }
    }
    // Deployed functions: each record must decode and name a spec blob the remote has,
    // each blob's bytes must hash to its name. Neither is garbage (gc keeps both).
    for o in &all {
        let Some(name) = functions::parse_function_key(&o.key) else {
            continue;
        };
        reached.insert(o.key.clone());
        let rec = match functions::remote_record(remote, name) {
            Ok(Some((rec, _))) => rec,
            Ok(None) => continue,
            Err(RemoteError::DamagedObject { reason, .. }) => {
                problems.push(corrupt(
                    o.key.clone(),
                    vec![],
                    format!("function {name}'s record is damaged: {reason}"),
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        let spec = functions::blob_key(&rec.spec_digest());
        if !rec.removed && !listed.contains_key(spec.as_str()) {
            problems.push(corrupt(
                spec,
                vec![],
                format!(
                    "function {name} (version {}) needs this spec blob, which is missing",
                    rec.version
                ),
            ));
        }
    }
    let blobs: Vec<(&Listed, snapshot_store::BlobDigest)> = all
        .iter()
        .filter_map(|o| functions::parse_blob_key(&o.key).map(|d| (o, d)))
        .collect();
    let total: u64 = blobs.iter().map(|(o, _)| o.size).sum();
    let mut done = 0u64;
    for (o, d) in blobs {
        reached.insert(o.key.clone());
        match remote.get("reading blob", &o.key, functions::MAX_BLOB_BYTES) {
            Ok(Some(b)) => {
                let actual = snapshot_store::BlobDigest::of(&b);
                if actual != d {
                    problems.push(corrupt(
                        o.key.clone(),
                        vec![],
                        format!("the blob's bytes hash to {actual}, not to its name"),
                    ));
                }
            }
            Ok(None) => {}
            Err(RemoteError::DamagedObject { reason, .. }) => {
                problems.push(corrupt(o.key.clone(), vec![], reason))
            }
            Err(e) => return Err(e),
        }
        done += o.size;
        progress(Progress::new("checking blobs", done, total));
    }
    for o in &all {
        if !reached.contains(&o.key) && o.key != state::MARKS_KEY {
            problems.push(RemoteProblem {
                severity: RemoteSeverity::Garbage,
                object: o.key.clone(),
                templates: vec![],
                message: format!("{} bytes no template references", o.size),
            });
        }
    }
    Ok((problems, names.len() as u64, remote.traffic().since(&t0)))
}

/// Options of [`gc`].
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Objects are deleted only when a pass at least this long ago marked them.
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

/// What a gc pass did (or, dry, would do).
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// Deleted now (marked by an earlier pass at least the grace period ago).
    pub deleted: Vec<String>,
    pub deleted_bytes: u64,
    /// Unreferenced, marked: deleted by a pass a grace period from `marked_unix_ms`.
    pub marked: Vec<String>,
    pub marked_bytes: u64,
    pub marked_unix_ms: u64,
    pub templates: u64,
}

/// One gc pass (see the crate doc). Refuses to delete anything while a
/// template reference or a manifest it reaches cannot be read.
pub fn gc(remote: &Remote, opts: GcOptions) -> Result<GcReport, RemoteError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let old = state::get_marks(remote)?.unwrap_or_default();
    let all = remote.list("listing the remote", "")?;
    let mut ms = Manifests {
        remote,
        got: HashMap::new(),
    };
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let names = ref_names(&all);
    for name in &names {
        let r = state::get_ref(remote, name)?.ok_or_else(|| RemoteError::NotOnRemote {
            name: name.clone(),
            remote: remote.display().to_string(),
        })?;
        for h in ms.chain(name, r.manifest)? {
            if reached.insert(state::manifest_key(&h)) {
                for p in &ms.get(&h)?.packs {
                    reached.insert(state::pack_key(p));
                    reached.insert(state::idx_key(p));
                }
            }
        }
    }
    let collectable = |k: &str| {
        (k.starts_with("packs/") && (k.ends_with(".pack") || k.ends_with(".idx")))
            || (k.starts_with("manifests/") && k.ends_with(".man"))
    };
    let unreached: BTreeMap<&str, u64> = all
        .iter()
        .filter(|o| collectable(&o.key) && !reached.contains(&o.key))
        .map(|o| (o.key.as_str(), o.size))
        .collect();
    let grace_ms = opts.grace.as_millis() as u64;
    let expired = !old.objects.is_empty() && old.marked_unix_ms.saturating_add(grace_ms) <= now;
    let mut report = GcReport {
        templates: names.len() as u64,
        ..Default::default()
    };
    let marks = if expired {
        // Delete what the last pass marked and is still unreached: indexes first,
        // so no push finds a pack about to go.
        let mut del: Vec<&str> = old
            .objects
            .iter()
            .map(String::as_str)
            .filter(|k| unreached.contains_key(k))
            .collect();
        del.sort_by_key(|k| (!k.ends_with(".idx"), *k));
        for k in &del {
            if !opts.dry_run {
                remote.delete("deleting unreferenced object", k)?;
            }
            report.deleted.push(k.to_string());
            report.deleted_bytes += unreached[k];
        }
        GcMarks {
            marked_unix_ms: now,
            grace_ms,
            objects: unreached
                .keys()
                .filter(|k| !del.contains(k))
                .map(|k| k.to_string())
                .collect(),
        }
    } else if old.objects.is_empty() {
        GcMarks {
            marked_unix_ms: now,
            grace_ms,
            objects: unreached.keys().map(|k| k.to_string()).collect(),
        }
    } else {
        // Not yet due: keep the earlier marks (those still unreached) and their time.
        GcMarks {
            objects: old
                .objects
                .iter()
                .filter(|k| unreached.contains_key(k.as_str()))
                .cloned()
                .collect(),
            ..old
        }
    };
    for k in &marks.objects {
        report.marked_bytes += unreached.get(k.as_str()).copied().unwrap_or(0);
    }
    report.marked = marks.objects.clone();
    report.marked_unix_ms = marks.marked_unix_ms;
    if !opts.dry_run {
        remote.put("writing gc marks", state::MARKS_KEY, marks.encode())?;
    }
    Ok(report)
}

//! `push`: templates and the layers they are built on, from a local store to the remote.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use snapshot_store::{PageId, Store, Template, PAGE_SIZE};

use crate::client::{Remote, Traffic};
use crate::error::RemoteError;
use crate::objects::{self, Hash, Manifest, PackIndex, TemplateRef, PACK_TARGET_PAGES};
use crate::state::{self, PageIndex};
use crate::Progress;

/// A push writes its template references at most this long after it last
/// checked that the packs they rely on are not marked by gc; later, it checks
/// again. gc's grace period must be longer (see the crate doc).
pub const SETTLE_WINDOW: Duration = Duration::from_secs(60);
const ATTEMPTS: usize = 4;

/// One template layer of a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedTemplate {
    pub name: String,
    /// The manifest object the template's reference now names (hex).
    pub manifest: String,
    /// false: the remote already had this template (same contents), nothing was written for it.
    pub uploaded: bool,
}

/// What a push did.
#[derive(Clone, Debug, Default)]
pub struct PushReport {
    /// Every layer, root first.
    pub templates: Vec<PushedTemplate>,
    /// Distinct pages of the layers that were uploaded.
    pub pages: u64,
    /// Pages sent (the others were on the remote already).
    pub pages_uploaded: u64,
    pub packs_uploaded: u64,
    /// Requests and bytes of this push.
    pub traffic: Traffic,
}

/// A local layer in remote terms.
struct Layer {
    t: Template,
    /// Distinct pages, first use first.
    pages: Vec<Hash>,
    page_runs: Vec<(u64, Vec<u32>)>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Uploads templates `names` (with every layer they are built on) from `store`
/// to `remote`, sending only pages the remote lacks. Each template becomes
/// visible on the remote (its reference written) only once everything it
/// needs is there, root layer first.
pub fn push(
    store: &Store,
    remote: &Remote,
    names: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<PushReport, RemoteError> {
    let t0 = remote.traffic();
    // The layers, root first, each once.
    let mut chain: Vec<Template> = Vec::new();
    let mut seen = HashSet::new();
    for n in names {
        for t in store.chain(n)? {
            if seen.insert(t.name.clone()) {
                chain.push(t);
            }
        }
    }
    // Every page by its remote identity (BLAKE3 of the bytes, which are checked
    // against the local id first).
    let total: u64 = chain.iter().map(|t| t.info().own_pages).sum();
    let mut local_of: HashMap<Hash, PageId> = HashMap::new();
    let mut hashed: HashMap<PageId, Hash> = HashMap::new();
    let mut layers: Vec<Layer> = Vec::with_capacity(chain.len());
    let mut done = 0u64;
    for t in chain {
        let mut pages: Vec<Hash> = Vec::new();
        let mut pos: HashMap<Hash, u32> = HashMap::new();
        let mut runs = Vec::with_capacity(t.page_runs().len());
        for (s, ids) in t.page_runs() {
            let mut run = Vec::with_capacity(ids.len());
            for id in ids {
                let h = match hashed.get(id) {
                    Some(h) => *h,
                    None => {
                        let b = store.page_verified(*id).ok_or_else(|| {
                            RemoteError::LocalPageDamaged {
                                name: t.name.clone(),
                                page: id.to_string(),
                            }
                        })?;
                        let h = objects::hash(&b);
                        hashed.insert(*id, h);
                        local_of.insert(h, *id);
                        h
                    }
                };
                let k = *pos.entry(h).or_insert_with(|| {
                    pages.push(h);
                    pages.len() as u32 - 1
                });
                run.push(k);
                done += 1;
                if done.is_multiple_of(4096) {
                    progress(Progress::new("hashing pages", done, total));
                }
            }
            runs.push((*s, run));
        }
        layers.push(Layer {
            t,
            pages,
            page_runs: runs,
        });
    }
    progress(Progress::new("hashing pages", total, total));

    let mut report = PushReport::default();
    let mut uploaded_pages: HashSet<Hash> = HashSet::new();
    for _ in 0..ATTEMPTS {
        // What gc has marked is not relied on: its pages are uploaded again.
        let marks = state::get_marks(remote)?;
        let marked: HashSet<String> = marks
            .as_ref()
            .map(|m| m.objects.iter().cloned().collect())
            .unwrap_or_default();
        let all_marked = marks.is_none();
        let listing = state::list_packs(remote)?;
        let excluded = |h: &Hash| {
            all_marked
                || marked.contains(&state::pack_key(h))
                || marked.contains(&state::idx_key(h))
        };
        let mut index = state::page_index(store, remote, &listing, &excluded)?;

        // Which layers the remote has already (same contents, on packs it keeps).
        let mut plan: Vec<(usize, Option<(Hash, Manifest)>)> = Vec::new();
        let mut decided: HashMap<String, Hash> = HashMap::new();
        let mut candidates: Vec<Manifest> = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let parent =
                l.t.parent
                    .as_ref()
                    .map(|p| (p.as_str().to_string(), decided[p.as_str()]));
            let mut nonce = [0u8; 16];
            getrandom::fill(&mut nonce).map_err(|e| RemoteError::Client {
                remote: remote.display().to_string(),
                message: format!("getting random bytes: {e}"),
            })?;
            let cand = Manifest {
                name: l.t.name.as_str().to_string(),
                parent,
                mem_size: l.t.mem_size,
                created_unix_ms: l.t.created_unix_ms,
                pushed_unix_ms: now_ms(),
                nonce,
                zero_runs: l.t.zero_runs().to_vec(),
                page_runs: l.page_runs.clone(),
                pages: l.pages.clone(),
                locs: Vec::new(),
                packs: Vec::new(),
                vcpu_state: l.t.vcpu_state.clone(),
                device_state: l.t.device_state.clone(),
                working_set: l.t.working_set.clone(),
            };
            let mut reuse = None;
            if let Some(r) = state::get_ref(remote, l.t.name.as_str()).ok().flatten() {
                if let Ok(Some(m)) = state::get_manifest(remote, &r.manifest) {
                    let keeps = !marked.contains(&state::manifest_key(&r.manifest))
                        && !all_marked
                        && m.packs.iter().all(|p| index.usable.contains(p));
                    if keeps && m.same_template(&cand) {
                        reuse = Some((r.manifest, m));
                    }
                }
            }
            let m = match &reuse {
                Some((h, _)) => *h,
                None => [0u8; 32],
            };
            decided.insert(l.t.name.as_str().to_string(), m);
            plan.push((i, reuse));
            candidates.push(cand);
        }

        // Pages of the layers to write that the remote lacks, in packs of 4 MiB.
        let mut missing: Vec<Hash> = Vec::new();
        let mut want: HashSet<Hash> = HashSet::new();
        for (i, reuse) in &plan {
            if reuse.is_some() {
                continue;
            }
            for h in &layers[*i].pages {
                if !index.page.contains_key(h) && want.insert(*h) {
                    missing.push(*h);
                }
            }
        }
        let total_bytes = (missing.len() * PAGE_SIZE) as u64;
        let mut sent = 0u64;
        progress(Progress::new("uploading pages", 0, total_bytes));
        for group in missing.chunks(PACK_TARGET_PAGES * remote.parallel.max(1)) {
            let mut packs: Vec<(String, Bytes)> = Vec::new();
            let mut idxs: Vec<(String, Bytes)> = Vec::new();
            let mut built: Vec<PackIndex> = Vec::new();
            for chunk in group.chunks(PACK_TARGET_PAGES) {
                let mut bytes = Vec::with_capacity(chunk.len() * PAGE_SIZE);
                for h in chunk {
                    let id = local_of[h];
                    let b = store
                        .page_verified(id)
                        .filter(|b| objects::hash(b) == *h)
                        .ok_or_else(|| RemoteError::LocalPageDamaged {
                            name: layers
                                .iter()
                                .find(|l| l.pages.contains(h))
                                .map(|l| l.t.name.clone())
                                .unwrap_or_else(|| layers[0].t.name.clone()),
                            page: id.to_string(),
                        })?;
                    bytes.extend_from_slice(&b);
                }
                let mut salt = [0u8; 16];
                getrandom::fill(&mut salt).map_err(|e| RemoteError::Client {
                    remote: remote.display().to_string(),
                    message: format!("getting random bytes: {e}"),
                })?;
                let ph = objects::pack_name(&salt, &bytes);
                let idx = PackIndex {
                    pack: ph,
                    salt,
                    pages: chunk.to_vec(),
                };
                packs.push((state::pack_key(&ph), Bytes::from(bytes)));
                idxs.push((state::idx_key(&ph), Bytes::from(idx.encode())));
                built.push(idx);
            }
            // A pack's index only once the pack is complete.
            remote.put_many("uploading pack", packs, |n| {
                sent += n;
                progress(Progress::new("uploading pages", sent, total_bytes));
            })?;
            remote.put_many("uploading pack index", idxs, |_| {})?;
            let dir = state::index_cache_dir(store, remote);
            for i in &built {
                let _ = crate::cache::store_index(&dir, &i.pack, &i.encode());
                index.add(i);
                report.packs_uploaded += 1;
                uploaded_pages.extend(i.pages.iter().copied());
            }
        }

        // Settle: nothing relied on may have been marked or removed meanwhile.
        let marks2 = state::get_marks(remote)?;
        let listing2 = state::list_packs(remote)?;
        let settled = Instant::now();
        let gone = |h: &Hash| -> bool {
            let Some(m) = &marks2 else { return true };
            m.objects.contains(&state::pack_key(h))
                || m.objects.contains(&state::idx_key(h))
                || !listing2.packs.contains_key(h)
                || !listing2.idxs.contains_key(h)
        };
        let mut ok = true;
        for (i, reuse) in &plan {
            let packs: Vec<Hash> = match reuse {
                Some((mh, m)) => {
                    if marks2
                        .as_ref()
                        .is_none_or(|mk| mk.objects.contains(&state::manifest_key(mh)))
                    {
                        ok = false;
                    }
                    m.packs.clone()
                }
                None => layers[*i]
                    .pages
                    .iter()
                    .filter_map(|h| index.page.get(h).map(|(p, _)| *p))
                    .collect(),
            };
            if packs.iter().any(gone) {
                ok = false;
            }
        }
        if !ok {
            continue;
        }

        // Manifests and references, root first.
        let mut written: HashMap<String, Hash> = HashMap::new();
        let mut out = Vec::new();
        let mut expired = false;
        for ((i, reuse), mut cand) in plan.into_iter().zip(candidates) {
            let l = &layers[i];
            let name = l.t.name.as_str().to_string();
            if let Some((p, h)) = &mut cand.parent {
                *h = written[p.as_str()];
            }
            let (mh, uploaded) = match reuse {
                Some((mh, m)) if m.parent == cand.parent => (mh, false),
                _ => {
                    if settled.elapsed() > SETTLE_WINDOW {
                        expired = true;
                        break;
                    }
                    if !fill_locations(&mut cand, &index) {
                        expired = true;
                        break;
                    }
                    let bytes = cand.encode();
                    let mh = objects::hash(&bytes);
                    remote.put("writing manifest", &state::manifest_key(&mh), bytes)?;
                    let r = TemplateRef {
                        name: name.clone(),
                        manifest: mh,
                        pushed_unix_ms: cand.pushed_unix_ms,
                    };
                    if settled.elapsed() > SETTLE_WINDOW {
                        expired = true;
                        break;
                    }
                    remote.put(
                        "writing template reference",
                        &state::ref_key(&name),
                        r.encode(),
                    )?;
                    (mh, true)
                }
            };
            written.insert(name.clone(), mh);
            out.push(PushedTemplate {
                name,
                manifest: objects::hex(&mh),
                uploaded,
            });
        }
        if expired {
            continue;
        }
        report.templates = out;
        let pushed: HashSet<&String> = report
            .templates
            .iter()
            .filter(|t| t.uploaded)
            .map(|t| &t.name)
            .collect();
        let distinct: HashSet<Hash> = layers
            .iter()
            .filter(|l| pushed.contains(&l.t.name.as_str().to_string()))
            .flat_map(|l| l.pages.iter().copied())
            .collect();
        report.pages = distinct.len() as u64;
        report.pages_uploaded = uploaded_pages.len() as u64;
        report.traffic = remote.traffic().since(&t0);
        return Ok(report);
    }
    Err(RemoteError::Unsettled)
}

/// Where each page of `m` is, from `index` (false: a page is in no usable pack).
fn fill_locations(m: &mut Manifest, index: &PageIndex) -> bool {
    let mut packs: Vec<Hash> = Vec::new();
    let mut pos: HashMap<Hash, u32> = HashMap::new();
    let mut locs = Vec::with_capacity(m.pages.len());
    for h in &m.pages {
        let Some(&(p, n)) = index.page.get(h) else {
            return false;
        };
        let k = *pos.entry(p).or_insert_with(|| {
            packs.push(p);
            packs.len() as u32 - 1
        });
        locs.push((k, n));
    }
    m.locs = locs;
    m.packs = packs;
    true
}

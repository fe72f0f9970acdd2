//! `pull`: templates from the remote into a local store, fetching only the pages it lacks.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use snapshot_store::{IncomingLayer, PageId, PageSource, Store, TemplateName, PAGE_SIZE};

use crate::cache;
use crate::client::{Remote, Traffic};
use crate::error::RemoteError;
use crate::objects::{self, Hash, Manifest};
use crate::state;
use crate::Progress;

/// Longest parent chain followed (as the local store).
pub const MAX_CHAIN: usize = 256;
/// Most pages fetched by one ranged read (1 MiB).
const MAX_RANGE_PAGES: u32 = 256;
/// Most page bytes one pull holds in memory (they are checked before any is written).
pub const MAX_PULL_BYTES: u64 = 4 << 30;

/// One template layer of a pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledTemplate {
    pub name: String,
    /// false: the local store had it already.
    pub created: bool,
}

/// What a pull did.
#[derive(Clone, Debug, Default)]
pub struct PullReport {
    /// Every layer of every template asked for, root first.
    pub templates: Vec<PulledTemplate>,
    /// Distinct pages of the layers the local store lacked.
    pub pages: u64,
    /// Pages fetched from the remote (the others were in the local store already).
    pub pages_fetched: u64,
    /// Ranged reads made for them (adjacent pages coalesced).
    pub ranges: u64,
    /// Pages appended to the local store.
    pub new_pages: u64,
    pub traffic: Traffic,
}

/// Fetches template `name`'s chain of manifests from the remote, root first.
pub fn remote_chain(remote: &Remote, name: &str) -> Result<Vec<(Hash, Manifest)>, RemoteError> {
    let r = state::get_ref(remote, name)?.ok_or_else(|| RemoteError::NotOnRemote {
        name: name.to_string(),
        remote: remote.display().to_string(),
    })?;
    let mut chain: Vec<(Hash, Manifest)> = Vec::new();
    let mut next = Some((name.to_string(), r.manifest));
    while let Some((n, mh)) = next {
        if chain.len() >= MAX_CHAIN || chain.iter().any(|(h, _)| *h == mh) {
            return Err(RemoteError::ChainTooLong {
                name: name.to_string(),
                max: MAX_CHAIN,
            });
        }
        let m = state::get_manifest(remote, &mh)?.ok_or_else(|| match chain.last() {
            Some((_, child)) => RemoteError::MissingParent {
                child: child.name.clone(),
                parent: n.clone(),
                object: state::manifest_key(&mh),
            },
            None => RemoteError::Damaged {
                template: n.clone(),
                object: state::manifest_key(&mh),
                reason: "its template reference names a manifest the remote does not have".into(),
            },
        })?;
        if m.name != n {
            return Err(RemoteError::Damaged {
                template: name.to_string(),
                object: state::manifest_key(&mh),
                reason: format!("it is a manifest of {:?}, expected {n:?}", m.name),
            });
        }
        if let Some((_, child)) = chain.last() {
            if child.mem_size != m.mem_size {
                return Err(RemoteError::Damaged {
                    template: child.name.clone(),
                    object: state::manifest_key(&mh),
                    reason: "its parent has another guest memory size".into(),
                });
            }
        }
        next = m.parent.clone();
        chain.push((mh, m));
    }
    chain.reverse();
    Ok(chain)
}

/// The local layer `name` in remote terms (pages as BLAKE3), for comparison.
fn local_as_remote(
    store: &Store,
    name: &str,
    parent: Option<(String, Hash)>,
) -> Result<Manifest, RemoteError> {
    let t = store.load(name)?;
    let mut pages = Vec::new();
    let mut pos: HashMap<PageId, u32> = HashMap::new();
    let mut runs = Vec::new();
    for (s, ids) in t.page_runs() {
        let mut run = Vec::with_capacity(ids.len());
        for id in ids {
            let k = match pos.get(id) {
                Some(k) => *k,
                None => {
                    let b =
                        store
                            .page_verified(*id)
                            .ok_or_else(|| RemoteError::LocalPageDamaged {
                                name: t.name.clone(),
                                page: id.to_string(),
                            })?;
                    pages.push(objects::hash(&b));
                    pos.insert(*id, pages.len() as u32 - 1);
                    pages.len() as u32 - 1
                }
            };
            run.push(k);
        }
        runs.push((*s, run));
    }
    Ok(Manifest {
        name: t.name.as_str().to_string(),
        parent,
        mem_size: t.mem_size,
        created_unix_ms: t.created_unix_ms,
        pushed_unix_ms: 0,
        nonce: [0; 16],
        zero_runs: t.zero_runs().to_vec(),
        page_runs: runs,
        pages,
        locs: Vec::new(),
        packs: Vec::new(),
        vcpu_state: t.vcpu_state,
        device_state: t.device_state,
        working_set: t.working_set,
    })
}

pub(crate) fn has_template(store: &Store, name: &str) -> bool {
    TemplateName::new(name).is_ok()
        && store
            .dir()
            .join("templates")
            .join(format!("{name}.tmpl"))
            .exists()
}

/// Fetches templates `names` (with the layers they are built on) from `remote`
/// into `store`: only pages the store lacks are read (ranged reads, adjacent
/// pages coalesced), every page is checked against its BLAKE3 identity, and
/// nothing is written before everything has been fetched and checked. One pull
/// of a template runs at a time on this machine (a lock file per template);
/// a second one waiting for it finds the template there and does nothing.
pub fn pull(
    store: &mut Store,
    remote: &Remote,
    names: &[String],
    progress: &mut dyn FnMut(Progress),
) -> Result<PullReport, RemoteError> {
    let t0 = remote.traffic();
    let mut report = PullReport::default();
    for name in names {
        TemplateName::new(name).map_err(snapshot_store::LoadError::from)?;
        let _lock = cache::lock_name(store, name)?;
        pull_one(store, remote, name, progress, &mut report)?;
    }
    report.traffic = remote.traffic().since(&t0);
    Ok(report)
}

fn pull_one(
    store: &mut Store,
    remote: &Remote,
    name: &str,
    progress: &mut dyn FnMut(Progress),
    report: &mut PullReport,
) -> Result<(), RemoteError> {
    let chain = remote_chain(remote, name)?;
    // Layers the store has must be the same templates; the first it lacks and
    // every one after it are written.
    let mut first_missing = chain.len();
    for (i, (_, m)) in chain.iter().enumerate() {
        if !has_template(store, &m.name) {
            first_missing = first_missing.min(i);
            continue;
        }
        let local = local_as_remote(store, &m.name, m.parent.clone())?;
        if !local.same_template(m) {
            return Err(RemoteError::Write(snapshot_store::LayersError::Conflict {
                name: TemplateName::new(&m.name).map_err(snapshot_store::LoadError::from)?,
                reason: "it differs from the remote's template of that name".into(),
            }));
        }
    }
    for (_, m) in &chain[..first_missing] {
        report.templates.push(PulledTemplate {
            name: m.name.clone(),
            created: false,
        });
    }
    let todo = &chain[first_missing..];
    if todo.is_empty() {
        return Ok(());
    }

    // Pages the store has (hashed again before they are relied on) and pages to fetch.
    let local = cache::local_page_hashes(store)?;
    let mut have: HashMap<Hash, PageId> = HashMap::new();
    // page -> (pack, page number, layer that needs it first)
    let mut fetch: BTreeMap<Hash, (Hash, u32, usize)> = BTreeMap::new();
    let mut distinct = 0u64;
    for (li, (_, m)) in todo.iter().enumerate() {
        for (k, h) in m.pages.iter().enumerate() {
            if have.contains_key(h) || fetch.contains_key(h) {
                continue;
            }
            distinct += 1;
            if let Some(id) = local.get(h) {
                if store
                    .page_verified(*id)
                    .is_some_and(|b| objects::hash(&b) == *h)
                {
                    have.insert(*h, *id);
                    continue;
                }
            }
            let (p, n) = m.locs[k];
            fetch.insert(*h, (m.packs[p as usize], n, li));
        }
    }
    report.pages += distinct;
    let need = fetch.len() as u64 * PAGE_SIZE as u64;
    if need > MAX_PULL_BYTES {
        return Err(RemoteError::Damaged {
            template: name.to_string(),
            object: state::ref_key(name),
            reason: format!(
                "its layers need {need} bytes of pages this store lacks, more than the {MAX_PULL_BYTES} one pull may hold"
            ),
        });
    }

    // Ranged reads: per pack, runs of adjacent page numbers.
    let mut by_pack: BTreeMap<Hash, Vec<(u32, Hash, usize)>> = BTreeMap::new();
    for (h, (p, n, li)) in &fetch {
        by_pack.entry(*p).or_default().push((*n, *h, *li));
    }
    let mut ranges: Vec<(String, Range<u64>)> = Vec::new();
    // For each range: the pages in it, in order (page number, hash, layer).
    let mut contents: Vec<Vec<(u32, Hash, usize)>> = Vec::new();
    for (p, mut v) in by_pack {
        v.sort_unstable_by_key(|e| e.0);
        v.dedup_by_key(|e| e.0);
        let mut cur: Vec<(u32, Hash, usize)> = Vec::new();
        for e in v {
            let adjacent = cur
                .last()
                .is_some_and(|l| l.0 + 1 == e.0 && cur.len() < MAX_RANGE_PAGES as usize);
            if !adjacent && !cur.is_empty() {
                let first = u64::from(cur[0].0);
                ranges.push((
                    state::pack_key(&p),
                    first * PAGE_SIZE as u64..(first + cur.len() as u64) * PAGE_SIZE as u64,
                ));
                contents.push(std::mem::take(&mut cur));
            }
            cur.push(e);
        }
        if !cur.is_empty() {
            let first = u64::from(cur[0].0);
            ranges.push((
                state::pack_key(&p),
                first * PAGE_SIZE as u64..(first + cur.len() as u64) * PAGE_SIZE as u64,
            ));
            contents.push(cur);
        }
    }
    let total = (fetch.len() * PAGE_SIZE) as u64;
    let mut got_bytes = 0u64;
    progress(Progress::new("downloading pages", 0, total));
    let got = remote
        .get_ranges("reading pages", &ranges, |n| {
            got_bytes += n;
            progress(Progress::new("downloading pages", got_bytes, total));
        })
        .map_err(|e| match e {
            RemoteError::Request {
                kind: crate::RequestKind::NotFound,
                object,
                ..
            } => RemoteError::Damaged {
                template: name.to_string(),
                object,
                reason: "the pack is missing from the remote".into(),
            },
            e => e,
        })?;
    report.ranges += ranges.len() as u64;
    let mut fetched: HashMap<Hash, Box<[u8; PAGE_SIZE]>> = HashMap::with_capacity(fetch.len());
    for (((key, r), pages), bytes) in ranges.iter().zip(&contents).zip(&got) {
        let want = (r.end - r.start) as usize;
        let layer = |li: usize| &todo[li].1.name;
        if bytes.len() != want {
            return Err(RemoteError::Damaged {
                template: name.to_string(),
                object: key.clone(),
                reason: format!(
                    "bytes {}..{} for layer {} were asked for, {} came back (the pack is shorter than its manifest says)",
                    r.start,
                    r.end,
                    layer(pages[0].2),
                    bytes.len()
                ),
            });
        }
        for (j, (n, h, li)) in pages.iter().enumerate() {
            let page = &bytes[j * PAGE_SIZE..(j + 1) * PAGE_SIZE];
            if objects::hash(page) != *h {
                return Err(RemoteError::Damaged {
                    template: name.to_string(),
                    object: key.clone(),
                    reason: format!(
                        "page {n}, needed by layer {}, does not match its identity {}",
                        layer(*li),
                        objects::hex(h)
                    ),
                });
            }
            let mut b = Box::new([0u8; PAGE_SIZE]);
            b.copy_from_slice(page);
            fetched.insert(*h, b);
        }
    }
    report.pages_fetched += fetched.len() as u64;

    // Everything is here and checked: write the layers, root first.
    let mut layers = Vec::with_capacity(todo.len());
    for (_, m) in todo {
        let pages: Vec<PageSource<'_>> = m
            .pages
            .iter()
            .map(|h| match fetched.get(h) {
                Some(b) => PageSource::Bytes(b),
                None => PageSource::Stored(have[h]),
            })
            .collect();
        let name = TemplateName::new(&m.name).map_err(snapshot_store::LoadError::from)?;
        let parent = m
            .parent
            .as_ref()
            .map(|(p, _)| TemplateName::new(p))
            .transpose()
            .map_err(snapshot_store::LoadError::from)?;
        layers.push(IncomingLayer {
            name,
            parent,
            mem_size: m.mem_size,
            created_unix_ms: m.created_unix_ms,
            zero_runs: m.zero_runs.clone(),
            page_runs: m.page_runs.clone(),
            pages,
            vcpu_state: m.vcpu_state.clone(),
            device_state: m.device_state.clone(),
            working_set: m.working_set.clone(),
        });
    }
    let w = store.write_layers(&layers)?;
    drop(layers);
    report.new_pages += w.new_pages;
    let mut new_hashes = Vec::new();
    for ((_, m), ids) in todo.iter().zip(&w.page_ids) {
        for (h, id) in m.pages.iter().zip(ids) {
            if fetched.contains_key(h) {
                new_hashes.push((*id, *h));
            }
        }
    }
    cache::add_page_hashes(store, &new_hashes);
    for l in w.layers {
        if l.created {
            crate::evict::record_pulled(store.dir(), l.name.as_str());
        }
        report.templates.push(PulledTemplate {
            name: l.name.as_str().to_string(),
            created: l.created,
        });
    }
    Ok(())
}

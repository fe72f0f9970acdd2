//! Read-only analysis: per-layer inspection, template diffs, sharing, space accounting.

use std::collections::{HashMap, HashSet};
use std::fs;

use crate::error::LoadError;
use crate::resolve::Template;
use crate::store::Store;
use crate::util::IdMap;
use crate::{PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages used by more templates than this are left out of pair counting
/// (they are shared by nearly everything; counting them is quadratic).
const PAIR_USERS_MAX: usize = 64;

/// One layer of [`Store::inspect`]: the template as resolved up to this layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerReport {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    pub mem_size: u64,
    pub created_unix_ms: u64,
    /// Frames with a page of this layer's own.
    pub own_pages: u64,
    /// Distinct pages among them (what this layer adds to the store at most).
    pub own_distinct_pages: u64,
    /// Non-zero frames whose page comes from an ancestor layer.
    pub inherited_pages: u64,
    /// Frames that are zero after resolving up to this layer.
    pub zero_frames: u64,
    /// Frames this layer explicitly sets to zero (over a parent's data).
    pub explicit_zero_frames: u64,
    /// Of its own distinct pages, how many other templates also store as their own.
    pub shared_pages: u64,
    /// Own distinct pages no other template uses: freed if this template alone were removed.
    pub unique_pages: u64,
    /// Bytes of its own distinct pages.
    pub own_bytes: u64,
    /// Non-zero bytes of the resolved memory (what a full sparse snapshot would take).
    pub resolved_bytes: u64,
    /// Frames in the recorded working set.
    pub working_set: u64,
    pub vcpu_state_bytes: u64,
    pub device_state_bytes: u64,
    pub manifest_bytes: u64,
}

/// A maximal run of frames whose resolved page differs between two templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffRange {
    pub first_frame: u64,
    pub frames: u64,
}

impl DiffRange {
    /// Guest physical address of the first byte.
    pub fn start_addr(&self) -> u64 {
        self.first_frame * PAGE
    }
    /// Guest physical address one past the last byte.
    pub fn end_addr(&self) -> u64 {
        (self.first_frame + self.frames) * PAGE
    }
}

/// Result of [`Store::diff`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub a: TemplateName,
    pub b: TemplateName,
    pub mem_size_a: u64,
    pub mem_size_b: u64,
    pub ranges: Vec<DiffRange>,
    /// Sum of the ranges' frames.
    pub differing_frames: u64,
}

/// Two templates and the number of distinct own pages both store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPair {
    pub a: TemplateName,
    pub b: TemplateName,
    pub pages: u64,
}

fn distinct_own(t: &Template) -> HashSet<PageId> {
    t.own_pages().map(|(_, id)| id).collect()
}

/// Top `limit` template pairs by shared own pages.
pub(crate) fn shared_pairs(all: &[Template], limit: usize) -> Vec<SharedPair> {
    let mut users: HashMap<PageId, Vec<u32>> = HashMap::new();
    for (i, t) in all.iter().enumerate() {
        for id in distinct_own(t) {
            users.entry(id).or_default().push(i as u32);
        }
    }
    let mut pairs: HashMap<(u32, u32), u64> = HashMap::new();
    for u in users.values() {
        if u.len() < 2 || u.len() > PAIR_USERS_MAX {
            continue;
        }
        for (k, &a) in u.iter().enumerate() {
            for &b in &u[k + 1..] {
                *pairs.entry((a, b)).or_insert(0) += 1;
            }
        }
    }
    let mut v: Vec<SharedPair> = pairs
        .into_iter()
        .map(|((a, b), pages)| SharedPair {
            a: all[a as usize].name.clone(),
            b: all[b as usize].name.clone(),
            pages,
        })
        .collect();
    v.sort_by(|x, y| {
        y.pages
            .cmp(&x.pages)
            .then_with(|| (&x.a, &x.b).cmp(&(&y.a, &y.b)))
    });
    v.truncate(limit);
    v
}

impl Store {
    /// The layer chain of `name` (root first) with per-layer page accounting.
    /// Sharing is counted against every readable template in the store.
    pub fn inspect(&self, name: &str) -> Result<Vec<LayerReport>, LoadError> {
        let name = TemplateName::new(name)?;
        let t = self.read_template(&name)?;
        let mut chain = self.ancestors(&t)?;
        chain.push(t);
        // Users of each page among all templates (by name, so chain members count once).
        let mut users: HashMap<PageId, u32> = HashMap::new();
        for n in self.template_names()? {
            if let Ok(o) = self.read_template(&n) {
                for id in distinct_own(&o) {
                    *users.entry(id).or_insert(0) += 1;
                }
            }
        }
        let frames = chain[0].frames() as usize;
        // Which layer supplies each frame (None = zero).
        let mut owner: Vec<Option<u32>> = vec![None; frames];
        let mut out = Vec::with_capacity(chain.len());
        for (li, l) in chain.iter().enumerate() {
            let li = li as u32;
            for &(s, n) in &l.zero_runs {
                owner[s as usize..(s + n) as usize].fill(None);
            }
            for (f, _) in l.own_pages() {
                owner[f as usize] = Some(li);
            }
            let inherited = owner
                .iter()
                .filter(|o| matches!(o, Some(j) if *j < li))
                .count();
            let zero = owner.iter().filter(|o| o.is_none()).count();
            let own = distinct_own(l);
            let shared = own
                .iter()
                .filter(|id| users.get(id).copied().unwrap_or(0) > 1)
                .count();
            let info = l.info();
            out.push(LayerReport {
                name: l.name.clone(),
                parent: l.parent.clone(),
                mem_size: l.mem_size,
                created_unix_ms: l.created_unix_ms,
                own_pages: info.own_pages,
                own_distinct_pages: own.len() as u64,
                inherited_pages: inherited as u64,
                zero_frames: zero as u64,
                explicit_zero_frames: info.zero_frames,
                shared_pages: shared as u64,
                unique_pages: (own.len() - shared) as u64,
                own_bytes: own.len() as u64 * PAGE,
                resolved_bytes: (frames - zero) as u64 * PAGE,
                working_set: l.working_set.len() as u64,
                vcpu_state_bytes: l.vcpu_state.len() as u64,
                device_state_bytes: l.device_state.len() as u64,
                manifest_bytes: fs::metadata(self.manifest_path(&l.name))
                    .map(|m| m.len())
                    .unwrap_or(0),
            });
        }
        Ok(out)
    }

    /// Guest address ranges (merged runs of frames) whose resolved contents
    /// differ between templates `a` and `b`. Frames beyond the smaller
    /// template count as zero there.
    pub fn diff(&self, a: &str, b: &str) -> Result<Diff, LoadError> {
        let ta = self.load(a)?;
        let tb = self.load(b)?;
        let ra = ta.resolve(self)?;
        let rb = tb.resolve(self)?;
        let ids_a = self.page_ids(&ta)?;
        let ids_b = self.page_ids(&tb)?;
        let n = ids_a.len().max(ids_b.len());
        let mut ranges: Vec<DiffRange> = Vec::new();
        for f in 0..n {
            let x = ids_a.get(f).copied().flatten();
            let y = ids_b.get(f).copied().flatten();
            if x == y {
                continue;
            }
            let f = f as u64;
            match ranges.last_mut() {
                Some(r) if r.first_frame + r.frames == f => r.frames += 1,
                _ => ranges.push(DiffRange {
                    first_frame: f,
                    frames: 1,
                }),
            }
        }
        drop((ra, rb));
        let differing_frames = ranges.iter().map(|r| r.frames).sum();
        Ok(Diff {
            a: ta.name,
            b: tb.name,
            mem_size_a: ta.mem_size,
            mem_size_b: tb.mem_size,
            ranges,
            differing_frames,
        })
    }

    /// Per frame, the page id after flattening the chain (None = zero).
    /// Equal ids mean equal bytes (ids are unique per content in a store).
    pub(crate) fn page_ids(&self, t: &Template) -> Result<Vec<Option<PageId>>, LoadError> {
        let mut chain = self.ancestors(t)?;
        chain.push(t.clone());
        let mut v = vec![None; t.frames() as usize];
        for l in &chain {
            for &(s, n) in &l.zero_runs {
                v[s as usize..(s + n) as usize].fill(None);
            }
            for (f, id) in l.own_pages() {
                v[f as usize] = Some(id);
            }
        }
        Ok(v)
    }
}

/// Space accounting.
#[derive(Clone, Debug)]
pub struct Stats {
    pub templates: Vec<TemplateStats>,
    /// Sum of guest memory sizes: what raw full snapshots would take.
    pub logical_bytes: u64,
    /// Sum over templates of non-zero frames x 4096: what sparse full snapshots would take.
    pub logical_nonzero_bytes: u64,
    /// Bytes on disk (packs, indexes, manifests, config): the sum of the four below.
    pub physical_bytes: u64,
    /// Sizes of the `.pack` files, the `.idx` files, files in `templates/`, and `store.cfg`.
    pub pack_bytes: u64,
    pub index_bytes: u64,
    pub manifest_bytes: u64,
    pub config_bytes: u64,
    /// Template pairs sharing the most of their own (stored) pages, most first.
    pub shared_pairs: Vec<SharedPair>,
    /// Distinct pages in the indexes.
    pub stored_pages: u64,
    /// Distinct pages referenced by at least one template.
    pub referenced_pages: u64,
    /// Compiled-module artifacts in `artifacts/` and the bytes of their files
    /// (not part of `physical_bytes`).
    pub artifacts: u64,
    pub artifact_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct TemplateStats {
    pub name: TemplateName,
    pub mem_size: u64,
    pub own_pages: u64,
    pub nonzero_frames: u64,
    /// Bytes of pages used by this template only (freed if it alone were removed).
    pub unique_bytes: u64,
}

impl Store {
    /// Space accounting. See [`Stats`].
    pub fn stats(&self) -> Result<Stats, LoadError> {
        let mut templates = Vec::new();
        let all: Vec<Template> = self
            .template_names()?
            .iter()
            .map(|n| self.read_template(n))
            .collect::<Result<_, _>>()?;
        let mut users: IdMap<u32> = IdMap::default();
        for t in &all {
            let own: HashSet<PageId> = t.own_pages().map(|(_, id)| id).collect();
            for id in own {
                *users.entry(id).or_insert(0) += 1;
            }
        }
        let mut logical_bytes = 0;
        let mut logical_nonzero_bytes = 0;
        for t in &all {
            let mut layers = self.ancestors(t)?;
            let nonzero = {
                let mut nz = vec![false; t.frames() as usize];
                layers.push(t.clone());
                for l in &layers {
                    for &(s, n) in &l.zero_runs {
                        nz[s as usize..(s + n) as usize].fill(false);
                    }
                    for (s, pages) in &l.page_runs {
                        nz[*s as usize..*s as usize + pages.len()].fill(true);
                    }
                }
                nz.iter().filter(|&&b| b).count() as u64
            };
            let own: HashSet<PageId> = t.own_pages().map(|(_, id)| id).collect();
            let unique = own.iter().filter(|id| users.get(id) == Some(&1)).count() as u64;
            logical_bytes += t.mem_size;
            logical_nonzero_bytes += nonzero * PAGE;
            templates.push(TemplateStats {
                name: t.name.clone(),
                mem_size: t.mem_size,
                own_pages: t.own_page_count(),
                nonzero_frames: nonzero,
                unique_bytes: unique * PAGE,
            });
        }
        let (mut pack_bytes, mut index_bytes, mut manifest_bytes) = (0, 0, 0);
        for d in [self.packs_dir(), self.templates_dir()] {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.ends_with(".pack") {
                        pack_bytes += len;
                    } else if name.ends_with(".idx") {
                        index_bytes += len;
                    } else {
                        manifest_bytes += len;
                    }
                }
            }
        }
        let config_bytes = fs::metadata(self.cfg_path()).map(|m| m.len()).unwrap_or(0);
        let physical_bytes = pack_bytes + index_bytes + manifest_bytes + config_bytes;
        let shared_pairs = shared_pairs(&all, 10);
        let (artifacts, artifact_bytes) = self.artifact_usage();
        Ok(Stats {
            templates,
            logical_bytes,
            logical_nonzero_bytes,
            physical_bytes,
            pack_bytes,
            index_bytes,
            manifest_bytes,
            config_bytes,
            shared_pairs,
            stored_pages: self.view().index.len() as u64,
            referenced_pages: users.len() as u64,
            artifacts,
            artifact_bytes,
        })
    }
}

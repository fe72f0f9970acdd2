//! Moving templates between this store and another tier (the `remote-store`
//! crate): reading a template's layers with their page ids and verified page
//! bytes, and writing layers whose pages come from elsewhere through the same
//! atomic path as every other writer (pages appended and indexed first, then
//! each manifest by temp file, fsync, rename; root layer first).
//!
//! Page ids stay private to this store: a layer written here names its pages
//! by position in a page table, each entry either the page's bytes (hashed
//! here with this store's secret and deduplicated) or the id of a page this
//! store already holds (checked against its bytes under the write lock).

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use crate::error::{IndexError, LoadError, ManifestError, NameError, WriteError};
use crate::format::{self, ManifestV1};
use crate::resolve::Template;
use crate::store::Store;
use crate::util::{is_zero, read_regular, take_lock, IdMap};
use crate::{PageId, TemplateName, PAGE_SIZE};

/// New pages buffered before they are appended to a pack.
const BATCH: usize = 4096;

impl PageId {
    /// A page id from its parts (as [`PageId::hash`] and [`PageId::slot`] give them),
    /// for caches kept outside the store. The store checks any id it is handed.
    pub fn from_parts(hash: u128, slot: u32) -> PageId {
        PageId::new(hash, slot)
    }
}

impl Template {
    /// Frames this layer sets to zero, as (first frame, count), sorted.
    pub fn zero_runs(&self) -> &[(u64, u64)] {
        &self.zero_runs
    }
    /// This layer's own pages as (first frame, pages of consecutive frames), sorted.
    pub fn page_runs(&self) -> &[(u64, Vec<PageId>)] {
        &self.page_runs
    }
}

/// Where a page of an [`IncomingLayer`] comes from.
#[derive(Clone, Copy, Debug)]
pub enum PageSource<'a> {
    /// Its bytes (verified by the caller against the identity it knows them by).
    Bytes(&'a [u8; PAGE_SIZE]),
    /// A page this store already holds; checked against its bytes before use.
    Stored(PageId),
}

/// One template layer to write into this store: the manifest's fields, with
/// pages named by their position in `pages`.
#[derive(Clone, Debug)]
pub struct IncomingLayer<'a> {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    pub mem_size: u64,
    pub created_unix_ms: u64,
    /// (first frame, count), sorted and disjoint.
    pub zero_runs: Vec<(u64, u64)>,
    /// (first frame, indexes into `pages` for consecutive frames), sorted and disjoint.
    pub page_runs: Vec<(u64, Vec<u32>)>,
    /// The layer's page table.
    pub pages: Vec<PageSource<'a>>,
    pub vcpu_state: Vec<u8>,
    pub device_state: Vec<u8>,
    pub working_set: Vec<u64>,
}

/// What [`Store::write_layers`] did with one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenLayer {
    pub name: TemplateName,
    /// false: an identical template of that name was already here.
    pub created: bool,
}

/// What [`Store::write_layers`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayersReport {
    /// Root first.
    pub layers: Vec<WrittenLayer>,
    /// Pages appended to this store's packs (the others were already here).
    pub new_pages: u64,
    /// For each layer, root first, the id each entry of its page table has in this store.
    pub page_ids: Vec<Vec<PageId>>,
}

/// Writing layers from another tier into this store failed; nothing became visible
/// (at most unreferenced pages, which `gc` reclaims).
#[derive(Debug, thiserror::Error)]
pub enum LayersError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("template {name} is inconsistent: {reason}")]
    Invalid { name: TemplateName, reason: String },
    #[error("a different template named {name} already exists in this store ({reason}); nothing was written")]
    Conflict { name: TemplateName, reason: String },
    #[error("template {name} is layered on {parent}, which is not in this store")]
    MissingParent {
        name: TemplateName,
        parent: TemplateName,
    },
    #[error("template {name} cannot be layered on {parent}: {source}")]
    Parent {
        name: TemplateName,
        parent: TemplateName,
        source: Box<WriteError>,
    },
    #[error("page {page} of template {name} was expected in this store but is missing or damaged (removed by gc meanwhile?); retry")]
    StoredPageMissing { name: TemplateName, page: PageId },
    #[error(
        "template {name} has an all-zero page in its page table (zero pages are never stored)"
    )]
    ZeroPage { name: TemplateName },
    #[error("taking the store write lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("{step} ({path}): {source}; check free space and permissions and retry (the store stays consistent)")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("writing pages: {0}")]
    Write(#[from] WriteError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl Store {
    /// Template `name` and every layer it is built on, root first.
    pub fn chain(&self, name: &str) -> Result<Vec<Template>, LoadError> {
        let t = self.load(name)?;
        let mut chain = self.ancestors(&t)?;
        chain.push(t);
        Ok(chain)
    }

    /// The bytes of a stored page, only if they still hash to its id.
    pub fn page_verified(&self, id: PageId) -> Option<[u8; PAGE_SIZE]> {
        let view = self.view();
        let b = view.page(id)?;
        (self.hash_page(b) == id.hash()).then_some(*b)
    }

    /// Every page id in the store's pack indexes (unordered).
    pub fn stored_page_ids(&self) -> Vec<PageId> {
        self.view().index.keys().copied().collect()
    }

    /// Writes `layers` (root first; each one's parent is the layer before it,
    /// or for the first, none or a template this store has) under the write
    /// lock: new pages are hashed, deduplicated and appended, then each
    /// manifest is written atomically, root first. A layer whose name exists
    /// already is accepted only if it is the same template (same parent,
    /// layout, page contents and state), and then left as it is; otherwise
    /// nothing is written.
    pub fn write_layers(
        &mut self,
        layers: &[IncomingLayer<'_>],
    ) -> Result<LayersReport, LayersError> {
        // Shape checks before taking the lock.
        for (i, l) in layers.iter().enumerate() {
            if i > 0 && l.parent.as_ref() != Some(&layers[i - 1].name) {
                return Err(LayersError::Invalid {
                    name: l.name.clone(),
                    reason: format!(
                        "its parent is {:?}, but the layer before it is {}",
                        l.parent.as_ref().map(|p| p.as_str()),
                        layers[i - 1].name
                    ),
                });
            }
            if let Some(bad) = l
                .page_runs
                .iter()
                .flat_map(|(_, v)| v.iter())
                .find(|&&k| k as usize >= l.pages.len())
            {
                return Err(LayersError::Invalid {
                    name: l.name.clone(),
                    reason: format!(
                        "page index {bad} is past its page table of {}",
                        l.pages.len()
                    ),
                });
            }
        }
        if layers.iter().map(|l| &l.name).collect::<HashSet<_>>().len() != layers.len() {
            return Err(LayersError::Invalid {
                name: layers[0].name.clone(),
                reason: "a name appears twice in the chain".into(),
            });
        }
        let _lock = take_lock(&self.dir, true).map_err(|source| LayersError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        self.clean_tmp();
        self.refresh_mut()?;
        if let Some(first) = layers.first() {
            if let Some(p) = &first.parent {
                if !self.manifest_path(p).exists() {
                    return Err(LayersError::MissingParent {
                        name: first.name.clone(),
                        parent: p.clone(),
                    });
                }
                self.check_parent_of(&first.name, p, first.mem_size)?;
            }
        }

        // Pages: check stored ones, hash and deduplicate the others, append in batches.
        let mut ids: Vec<Vec<PageId>> = Vec::with_capacity(layers.len());
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_ids: Vec<(PageId, u32)> = Vec::new();
        let mut batch_map: IdMap<u32> = IdMap::default();
        let mut new_pages = 0u64;
        for l in layers {
            let mut table = Vec::with_capacity(l.pages.len());
            for src in &l.pages {
                let id = match *src {
                    PageSource::Stored(id) => {
                        let view = self.view();
                        let ok = view
                            .page(id)
                            .is_some_and(|b| self.hash_page(b) == id.hash());
                        if !ok {
                            return Err(LayersError::StoredPageMissing {
                                name: l.name.clone(),
                                page: id,
                            });
                        }
                        id
                    }
                    PageSource::Bytes(bytes) => {
                        if is_zero(bytes) {
                            return Err(LayersError::ZeroPage {
                                name: l.name.clone(),
                            });
                        }
                        let hash = self.hash_page(bytes);
                        let view = self.view();
                        let mut slot = 0;
                        let id = loop {
                            let id = PageId::new(hash, slot);
                            if let Some(loc) = view.index.get(&id) {
                                if view.loc_bytes(*loc).map(|b| &b[..]) == Some(&bytes[..]) {
                                    break id;
                                }
                            } else if let Some(&j) = batch_map.get(&id) {
                                let s = j as usize * PAGE_SIZE;
                                if batch[s..s + PAGE_SIZE] == bytes[..] {
                                    break id;
                                }
                            } else {
                                let j = batch_ids.len() as u32;
                                batch.extend_from_slice(bytes);
                                batch_ids.push((id, j));
                                batch_map.insert(id, j);
                                new_pages += 1;
                                break id;
                            }
                            slot += 1;
                        };
                        drop(view);
                        if batch_ids.len() >= BATCH {
                            self.flush_batch(&mut batch, &mut batch_ids, &mut batch_map)?;
                        }
                        id
                    }
                };
                table.push(id);
            }
            ids.push(table);
        }
        self.flush_batch(&mut batch, &mut batch_ids, &mut batch_map)?;

        // Manifests: build, validate, compare with existing ones, then write root first.
        let mut out: Vec<(ManifestV1, bool)> = Vec::with_capacity(layers.len());
        for (l, table) in layers.iter().zip(&ids) {
            let m = ManifestV1 {
                name: l.name.as_str().to_string(),
                parent: l.parent.as_ref().map(|p| p.as_str().to_string()),
                mem_size: l.mem_size,
                created_unix_ms: l.created_unix_ms,
                zero_runs: l.zero_runs.clone(),
                page_runs: l
                    .page_runs
                    .iter()
                    .map(|(s, v)| (*s, v.iter().map(|&k| table[k as usize]).collect()))
                    .collect(),
                vcpu_state: l.vcpu_state.clone(),
                device_state: l.device_state.clone(),
                working_set: l.working_set.clone(),
            };
            let path = self.manifest_path(&l.name);
            format::validate_manifest(&path, &m).map_err(|e| LayersError::Invalid {
                name: l.name.clone(),
                reason: e.to_string(),
            })?;
            match read_regular(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => out.push((m, true)),
                Err(source) => {
                    return Err(LayersError::Io {
                        step: "reading existing manifest",
                        path,
                        source,
                    })
                }
                Ok(b) => {
                    let have = format::decode_manifest(&path, &b)?;
                    let reason = crate::transfer::structural_difference(&have, &m).or_else(|| {
                        (have.page_runs != m.page_runs).then(|| "its pages differ".to_string())
                    });
                    if let Some(reason) = reason {
                        return Err(LayersError::Conflict {
                            name: l.name.clone(),
                            reason,
                        });
                    }
                    out.push((m, false));
                }
            }
        }
        let mut report = LayersReport {
            layers: Vec::with_capacity(out.len()),
            new_pages,
            page_ids: ids,
        };
        for (m, create) in out {
            let name = TemplateName::new(&m.name)?;
            if create {
                let path = self.manifest_path(&name);
                let bytes = format::encode_manifest(&m);
                format::write_atomic(&self.tmp_dir(), &path, &bytes, || true).map_err(
                    |source| LayersError::Io {
                        step: "writing manifest",
                        path: path.clone(),
                        source,
                    },
                )?;
            }
            report.layers.push(WrittenLayer {
                name,
                created: create,
            });
        }
        // Location records of the new layers (hints for lazy restores: best effort).
        if self.refresh_mut().is_ok() {
            for l in report.layers.iter().filter(|l| l.created) {
                let _ = self.write_locations_of(&l.name);
            }
        }
        drop(_lock);
        let _ = self.refresh_mut();
        Ok(report)
    }

    fn check_parent_of(
        &self,
        name: &TemplateName,
        parent: &TemplateName,
        mem_size: u64,
    ) -> Result<(), LayersError> {
        let pt = self
            .read_template(parent)
            .map_err(|e| LayersError::Parent {
                name: name.clone(),
                parent: parent.clone(),
                source: Box::new(WriteError::Parent {
                    parent: parent.clone(),
                    source: Box::new(e),
                }),
            })?;
        if pt.mem_size != mem_size {
            return Err(LayersError::Invalid {
                name: name.clone(),
                reason: format!(
                    "it has {mem_size} bytes of guest memory but its parent {parent} has {}",
                    pt.mem_size
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    fn tmp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ss-exchange-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn page(b: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        p[0] = b;
        p[100] = b.wrapping_mul(3);
        p
    }

    /// The layers of `name` in `from` as incoming layers with their bytes.
    fn layers_of(from: &Store, name: &str) -> Vec<(Template, Vec<[u8; PAGE_SIZE]>)> {
        from.chain(name)
            .unwrap()
            .into_iter()
            .map(|t| {
                let pages: Vec<[u8; PAGE_SIZE]> = t
                    .page_runs()
                    .iter()
                    .flat_map(|(_, v)| v.iter())
                    .map(|id| from.page_verified(*id).unwrap())
                    .collect();
                (t, pages)
            })
            .collect()
    }

    fn incoming<'a>(t: &Template, pages: &'a [[u8; PAGE_SIZE]]) -> IncomingLayer<'a> {
        let mut k = 0u32;
        IncomingLayer {
            name: t.name.clone(),
            parent: t.parent.clone(),
            mem_size: t.mem_size,
            created_unix_ms: t.created_unix_ms,
            zero_runs: t.zero_runs().to_vec(),
            page_runs: t
                .page_runs()
                .iter()
                .map(|(s, v)| {
                    (
                        *s,
                        v.iter()
                            .map(|_| {
                                k += 1;
                                k - 1
                            })
                            .collect(),
                    )
                })
                .collect(),
            pages: pages.iter().map(PageSource::Bytes).collect(),
            vcpu_state: t.vcpu_state.clone(),
            device_state: t.device_state.clone(),
            working_set: t.working_set.clone(),
        }
    }

    #[test]
    fn layers_written_into_another_store_resolve_the_same_and_conflicts_write_nothing() {
        let (da, db) = (tmp("a"), tmp("b"));
        let mut a = Store::create_or_open(&da).unwrap();
        let mut w = a
            .begin_template("base", None, 16 * PAGE_SIZE as u64)
            .unwrap();
        w.put_page(1, &page(1)).unwrap();
        w.put_page(2, &page(2)).unwrap();
        w.set_vcpu_state(vec![7]);
        w.commit().unwrap();
        let mut w = a
            .begin_template("fn", Some("base"), 16 * PAGE_SIZE as u64)
            .unwrap();
        w.put_page(2, &page(9)).unwrap();
        w.put_page(3, &page(1)).unwrap();
        w.set_zero(1).unwrap();
        w.set_working_set(vec![3, 2]);
        w.commit().unwrap();

        let src = layers_of(&a, "fn");
        let mut b = Store::create_or_open(&db).unwrap();
        let layers: Vec<IncomingLayer<'_>> = src.iter().map(|(t, p)| incoming(t, p)).collect();
        let r = b.write_layers(&layers).unwrap();
        assert!(r.layers.iter().all(|l| l.created));
        assert_eq!(r.new_pages, 3, "page 1 is stored once");
        let ra = a.load("fn").unwrap().resolve(&a).unwrap();
        let rb = b.load("fn").unwrap().resolve(&b).unwrap();
        for f in 0..16 {
            let (x, y) = (ra.frame(f), rb.frame(f));
            match (x, y) {
                (Some(Frame::Data(p)), Some(Frame::Data(q))) => assert_eq!(p[..], q[..]),
                (None, None) | (Some(Frame::Zero), Some(Frame::Zero)) => {}
                (None, Some(Frame::Zero)) | (Some(Frame::Zero), None) => {}
                _ => panic!("frame {f} differs"),
            }
        }
        assert_eq!(b.load("fn").unwrap().working_set, vec![3, 2]);
        // Writing the same layers again: accepted, nothing new.
        let r = b.write_layers(&layers).unwrap();
        assert!(r.layers.iter().all(|l| !l.created));
        assert_eq!(r.new_pages, 0);
        // Stored pages named by id are checked and used.
        let ids: Vec<PageId> = b.chain("base").unwrap()[0]
            .page_runs()
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        let mut l = incoming(&src[0].0, &src[0].1);
        l.pages = ids.iter().map(|id| PageSource::Stored(*id)).collect();
        assert!(b.write_layers(&[l.clone()]).is_ok());
        l.pages[0] = PageSource::Stored(PageId::new(12345, 0));
        assert!(matches!(
            b.write_layers(&[l]),
            Err(LayersError::StoredPageMissing { .. })
        ));

        // A different template of the same name: refused, nothing written.
        let other = [page(1), page(3)];
        let l = incoming(&src[0].0, &other);
        let before = b.stored_page_ids().len();
        assert!(matches!(
            b.write_layers(&[l]),
            Err(LayersError::Conflict { .. })
        ));
        // (the page written before the conflict was found is garbage, never a template)
        assert!(b.stored_page_ids().len() <= before + 1);
        assert!(b.verify().iter().all(|p| !p.is_corruption()));

        // Zero pages, indexes past the table, and broken chains are refused.
        let zero = [[0u8; PAGE_SIZE], page(2)];
        let mut l = incoming(&src[0].0, &zero);
        l.name = TemplateName::new("z").unwrap();
        assert!(matches!(
            b.write_layers(&[l.clone()]),
            Err(LayersError::ZeroPage { .. })
        ));
        l.page_runs[0].1[0] = 5;
        assert!(matches!(
            b.write_layers(&[l]),
            Err(LayersError::Invalid { .. })
        ));
        let mut l = incoming(&src[1].0, &src[1].1);
        l.parent = Some(TemplateName::new("missing").unwrap());
        assert!(matches!(
            b.write_layers(&[l]),
            Err(LayersError::MissingParent { .. })
        ));
        let _ = std::fs::remove_dir_all(&da);
        let _ = std::fs::remove_dir_all(&db);
    }
}

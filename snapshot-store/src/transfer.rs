//! Export / import of a template with its whole parent chain as one
//! self-contained file, for moving templates between machines.
//!
//! ```text
//! header   magic "VMMSTEXP", major u16, minor u16, templates u32, pages u64,
//!          xxh3-64 of the 24 bytes before                                (32 bytes)
//! manifests[templates], root layer first:
//!          length u64, manifest file bytes (own magic, version, checksum)
//! pages[pages], every distinct page the manifests reference, once:
//!          hash u128, slot u32 (the exporting store's page id), bytes [4096],
//!          xxh3-64 of the 4116 bytes before
//! trailer  magic "VMMSTEND", xxh3-64 of every byte before the trailer
//! ```
//!
//! Page ids are keyed per store, so the importer re-hashes every page with its
//! own secret and rewrites the manifests' ids. Every length and count read
//! is bounded before anything is allocated.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{ExportError, ImportError};
use crate::format::{self, ManifestV1, MAN_LIMIT};
use crate::store::Store;
use crate::util::{is_zero, read_regular, take_lock, IdMap};
use crate::{PageId, TemplateName, PAGE_SIZE};

const MAGIC: &[u8; 8] = b"VMMSTEXP";
const END: &[u8; 8] = b"VMMSTEND";
const MAJOR: u16 = 1;
const MINOR: u16 = 0;
const HEADER: usize = 32;
const REC: usize = 16 + 4 + PAGE_SIZE;
/// Longest chain accepted (as resolve()).
const MAX_TEMPLATES: u32 = 257;
/// New pages buffered before they are appended to a pack.
const BATCH: usize = 4096;

/// What [`Store::export`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    /// The chain, root first.
    pub templates: Vec<TemplateName>,
    pub pages: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedTemplate {
    pub name: TemplateName,
    /// false: an identical template of that name was already there.
    pub created: bool,
}

/// What [`Store::import`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// The chain, root first.
    pub templates: Vec<ImportedTemplate>,
    /// Pages in the file.
    pub pages: u64,
    /// Pages written to the store (the rest were already present).
    pub new_pages: u64,
}

struct HashingWriter<W> {
    w: W,
    h: Xxh3,
    n: u64,
}
impl<W: Write> HashingWriter<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), ExportError> {
        self.h.update(b);
        self.n += b.len() as u64;
        self.w
            .write_all(b)
            .map_err(|source| ExportError::Write { source })
    }
}

struct HashingReader<R> {
    r: R,
    h: Xxh3,
}
impl<R: Read> HashingReader<R> {
    fn get(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), ImportError> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ImportError::Truncated { what }
            } else {
                ImportError::Read { what, source: e }
            }
        })?;
        self.h.update(buf);
        Ok(())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ImportError> {
        let mut b = [0u8; 8];
        self.get(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Store {
    /// Writes template `name` and all its ancestors (manifests and every page
    /// they reference) to `out` as one self-contained file.
    pub fn export(&self, name: &str, out: impl Write) -> Result<ExportReport, ExportError> {
        self.export_with_progress(name, out, &mut |_, _| {})
    }

    /// [`Store::export`] calling `progress(pages done, pages total)`.
    pub fn export_with_progress(
        &self,
        name: &str,
        out: impl Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ExportReport, ExportError> {
        let t = self.load(name)?;
        let _lock = take_lock(&self.dir, false).map_err(|source| ExportError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        // Under the shared lock the chain cannot change; re-read it and check it resolves.
        let t = self.read_template(&t.name)?;
        let resolved = t.resolve(self)?;
        let mut chain = self.ancestors(&t)?;
        chain.push(t);
        let mut manifests = Vec::with_capacity(chain.len());
        for l in &chain {
            let path = self.manifest_path(&l.name);
            let bytes = read_regular(&path).map_err(|source| ExportError::ReadManifest {
                path: path.clone(),
                source,
            })?;
            let m = format::decode_manifest(&path, &bytes).map_err(crate::LoadError::from)?;
            if m.name != l.name.as_str() {
                return Err(ExportError::Changed {
                    name: l.name.clone(),
                });
            }
            manifests.push(bytes);
        }
        let mut seen = HashSet::new();
        let mut pages: Vec<(PageId, crate::TemplateName)> = Vec::new();
        for l in &chain {
            for (_, id) in l.own_pages() {
                if seen.insert(id) {
                    pages.push((id, l.name.clone()));
                }
            }
        }
        let mut w = HashingWriter {
            w: io::BufWriter::with_capacity(1 << 20, out),
            h: Xxh3::new(),
            n: 0,
        };
        let mut hdr = Vec::with_capacity(HEADER);
        hdr.extend_from_slice(MAGIC);
        hdr.extend_from_slice(&MAJOR.to_le_bytes());
        hdr.extend_from_slice(&MINOR.to_le_bytes());
        hdr.extend_from_slice(&(chain.len() as u32).to_le_bytes());
        hdr.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        let sum = xxh3_64(&hdr);
        hdr.extend_from_slice(&sum.to_le_bytes());
        w.put(&hdr)?;
        for m in &manifests {
            w.put(&(m.len() as u64).to_le_bytes())?;
            w.put(m)?;
        }
        let total = pages.len() as u64;
        // The view the chain resolved against: every page it needs is in it.
        let view = resolved.view();
        let mut rec = Vec::with_capacity(REC + 8);
        for (k, (id, owner)) in pages.iter().enumerate() {
            if k % 256 == 0 {
                progress(k as u64, total);
            }
            let bytes = view.page(*id).ok_or_else(|| ExportError::DamagedPage {
                template: owner.clone(),
                page: *id,
            })?;
            if self.hash_page(bytes) != id.hash() {
                return Err(ExportError::DamagedPage {
                    template: owner.clone(),
                    page: *id,
                });
            }
            rec.clear();
            rec.extend_from_slice(&id.hash().to_le_bytes());
            rec.extend_from_slice(&id.slot().to_le_bytes());
            rec.extend_from_slice(bytes);
            let sum = xxh3_64(&rec);
            rec.extend_from_slice(&sum.to_le_bytes());
            w.put(&rec)?;
        }
        let sum = w.h.digest();
        w.put(END)?;
        w.put(&sum.to_le_bytes())?;
        w.w.flush()
            .map_err(|source| ExportError::Write { source })?;
        progress(total, total);
        Ok(ExportReport {
            templates: chain.into_iter().map(|t| t.name).collect(),
            pages: total,
            bytes: w.n,
        })
    }

    /// Imports a file written by [`Store::export`]. Pages already in the store
    /// are not written again; each template becomes visible atomically (root
    /// first); an existing template of the same name is accepted only if it is
    /// identical, otherwise nothing is imported. Every checksum is verified
    /// before any manifest is written.
    pub fn import(&mut self, input: impl Read) -> Result<ImportReport, ImportError> {
        self.import_with_progress(input, &mut |_, _| {})
    }

    /// [`Store::import`] calling `progress(pages done, pages total)`.
    pub fn import_with_progress(
        &mut self,
        input: impl Read,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ImportReport, ImportError> {
        let mut r = HashingReader {
            r: io::BufReader::with_capacity(1 << 20, input),
            h: Xxh3::new(),
        };
        // Header.
        let mut hdr = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            match r.r.read(&mut hdr[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ImportError::Read {
                        what: "header",
                        source,
                    })
                }
            }
        }
        let m = got.min(8);
        if hdr[..m] != MAGIC[..m] || got == 0 {
            return Err(ImportError::NotAnExport);
        }
        if got < HEADER {
            return Err(ImportError::Truncated { what: "header" });
        }
        r.h.update(&hdr);
        let major = u16::from_le_bytes([hdr[8], hdr[9]]);
        if major != MAJOR {
            return Err(ImportError::FutureVersion {
                found: major,
                supported: MAJOR,
            });
        }
        if xxh3_64(&hdr[..24]) != u64_at(&hdr, 24) {
            return Err(ImportError::Corrupt {
                what: "header".into(),
                reason: "checksum mismatch".into(),
            });
        }
        let n_templates = u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        let n_pages = u64_at(&hdr, 16);
        if n_templates == 0 || n_templates > MAX_TEMPLATES {
            return Err(ImportError::Corrupt {
                what: "header".into(),
                reason: format!("{n_templates} templates (1..={MAX_TEMPLATES} allowed)"),
            });
        }

        // Manifests, root first, forming one chain.
        let mut manifests: Vec<ManifestV1> = Vec::new();
        let mut budget = MAN_LIMIT as u64;
        for i in 0..n_templates {
            let len = r.u64("manifest length")?;
            if len > budget {
                return Err(ImportError::Corrupt {
                    what: format!("manifest {i}"),
                    reason: format!("length {len} exceeds the remaining limit of {budget} bytes"),
                });
            }
            budget -= len;
            let mut b = vec![0u8; len as usize];
            r.get(&mut b, "manifest")?;
            let path = PathBuf::from(format!("<import>/manifest-{i}"));
            let m = format::decode_manifest(&path, &b)?;
            let expect_parent = manifests.last().map(|p| p.name.clone());
            if m.parent != expect_parent {
                return Err(ImportError::Corrupt {
                    what: format!("manifest {i} ({})", m.name),
                    reason: format!(
                        "parent {:?}, but the chain needs {:?}",
                        m.parent, expect_parent
                    ),
                });
            }
            if let Some(p) = manifests.last() {
                if p.mem_size != m.mem_size {
                    return Err(ImportError::Corrupt {
                        what: format!("manifest {i} ({})", m.name),
                        reason: "memory size differs from its parent".into(),
                    });
                }
            }
            if manifests.iter().any(|p| p.name == m.name) {
                return Err(ImportError::Corrupt {
                    what: format!("manifest {i} ({})", m.name),
                    reason: "name appears twice in the chain".into(),
                });
            }
            manifests.push(m);
        }
        let needed: HashSet<PageId> = manifests
            .iter()
            .flat_map(|m| m.page_runs.iter().flat_map(|(_, v)| v.iter().copied()))
            .collect();
        if n_pages != needed.len() as u64 {
            return Err(ImportError::Corrupt {
                what: "header".into(),
                reason: format!(
                    "{n_pages} pages announced, the manifests reference {}",
                    needed.len()
                ),
            });
        }

        let _lock = take_lock(&self.dir, true).map_err(|source| ImportError::Lock {
            path: self.dir.join("LOCK"),
            source,
        })?;
        self.clean_tmp();
        self.refresh_mut()?;

        // Existing templates of the same names: refuse early on any visible difference.
        let mut existing: Vec<Option<ManifestV1>> = Vec::new();
        for m in &manifests {
            let name = TemplateName::new(&m.name)?;
            let path = self.manifest_path(&name);
            match read_regular(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => existing.push(None),
                Err(source) => {
                    return Err(ImportError::Store {
                        step: "reading existing manifest",
                        path,
                        source,
                    })
                }
                Ok(b) => {
                    let have = format::decode_manifest(&path, &b)?;
                    if let Some(reason) = structural_difference(&have, m) {
                        return Err(ImportError::Conflict { name, reason });
                    }
                    existing.push(Some(have));
                }
            }
        }

        // Pages: verify, re-hash, deduplicate, append new ones in batches.
        let mut map: HashMap<PageId, PageId> = HashMap::with_capacity(needed.len());
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_ids: Vec<(PageId, u32)> = Vec::new();
        let mut batch_map: IdMap<u32> = IdMap::default();
        let mut new_pages = 0u64;
        let mut rec = vec![0u8; REC];
        for k in 0..n_pages {
            if k % 256 == 0 {
                progress(k, n_pages);
            }
            r.get(&mut rec, "page record")?;
            let sum = r.u64("page record checksum")?;
            if xxh3_64(&rec) != sum {
                return Err(ImportError::Corrupt {
                    what: format!("page record {k}"),
                    reason: "checksum mismatch".into(),
                });
            }
            let mut h = [0u8; 16];
            h.copy_from_slice(&rec[..16]);
            let src = PageId::new(
                u128::from_le_bytes(h),
                u32::from_le_bytes([rec[16], rec[17], rec[18], rec[19]]),
            );
            if !needed.contains(&src) || map.contains_key(&src) {
                return Err(ImportError::Corrupt {
                    what: format!("page record {k}"),
                    reason: format!("page {src} is unreferenced or repeated"),
                });
            }
            let bytes = &rec[20..];
            if is_zero(bytes) {
                return Err(ImportError::Corrupt {
                    what: format!("page record {k}"),
                    reason: "an all-zero page (never stored)".into(),
                });
            }
            let hash = self.hash_page(bytes);
            let view = self.view();
            let mut slot = 0;
            let id = loop {
                let id = PageId::new(hash, slot);
                if let Some(loc) = view.index.get(&id) {
                    if view.loc_bytes(*loc).map(|b| &b[..]) == Some(bytes) {
                        break id;
                    }
                } else if let Some(&j) = batch_map.get(&id) {
                    let s = j as usize * PAGE_SIZE;
                    if &batch[s..s + PAGE_SIZE] == bytes {
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
            map.insert(src, id);
            // Unshared, the view is updated in place by the next flush.
            drop(view);
            if batch_ids.len() >= BATCH {
                self.flush_batch(&mut batch, &mut batch_ids, &mut batch_map)?;
            }
        }
        self.flush_batch(&mut batch, &mut batch_ids, &mut batch_map)?;

        // Trailer: whole-file checksum, before any manifest becomes visible.
        let computed = r.h.digest();
        let mut tr = [0u8; 16];
        r.r.read_exact(&mut tr).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ImportError::Truncated { what: "trailer" }
            } else {
                ImportError::Read {
                    what: "trailer",
                    source: e,
                }
            }
        })?;
        if &tr[..8] != END || u64_at(&tr, 8) != computed {
            return Err(ImportError::Corrupt {
                what: "trailer".into(),
                reason: "file checksum mismatch".into(),
            });
        }
        let mut extra = [0u8; 1];
        if r.r.read(&mut extra).map_err(|source| ImportError::Read {
            what: "end of file",
            source,
        })? != 0
        {
            return Err(ImportError::Corrupt {
                what: "trailer".into(),
                reason: "trailing bytes after the trailer".into(),
            });
        }

        // Rewrite ids; compare with existing templates; then write, root first.
        let mut out: Vec<(ManifestV1, bool)> = Vec::new();
        for (mut m, have) in manifests.into_iter().zip(existing) {
            for (_, v) in m.page_runs.iter_mut() {
                for id in v.iter_mut() {
                    *id = map[id];
                }
            }
            let name = TemplateName::new(&m.name)?;
            match have {
                Some(h) if h.page_runs == m.page_runs => out.push((m, false)),
                Some(_) => {
                    return Err(ImportError::Conflict {
                        name,
                        reason: "its pages differ".into(),
                    })
                }
                None => out.push((m, true)),
            }
        }
        let mut report = ImportReport {
            templates: Vec::new(),
            pages: n_pages,
            new_pages,
        };
        for (m, create) in out {
            let name = TemplateName::new(&m.name)?;
            if create {
                let path = self.manifest_path(&name);
                let bytes = format::encode_manifest(&m);
                format::write_atomic(&self.tmp_dir(), &path, &bytes, || true).map_err(
                    |source| ImportError::Store {
                        step: "writing manifest",
                        path: path.clone(),
                        source,
                    },
                )?;
            }
            report.templates.push(ImportedTemplate {
                name,
                created: create,
            });
        }
        progress(n_pages, n_pages);
        self.refresh_mut()?;
        // Location records of the new templates (hints for lazy restores: best effort).
        for t in report.templates.iter().filter(|t| t.created) {
            let _ = self.write_locations_of(&t.name);
        }
        Ok(report)
    }

    /// Append a batch of new pages (held back to back in `batch`) and empty the batch.
    /// Shared by import and the remote tier's pull (`exchange.rs`).
    pub(crate) fn flush_batch(
        &mut self,
        batch: &mut Vec<u8>,
        ids: &mut Vec<(PageId, u32)>,
        map: &mut IdMap<u32>,
    ) -> Result<(), crate::WriteError> {
        if ids.is_empty() {
            return Ok(());
        }
        {
            let b: &[u8] = batch;
            let page = |i: u32| &b[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE];
            self.append_pages(ids, &page)?;
        }
        batch.clear();
        ids.clear();
        map.clear();
        Ok(())
    }
}

/// Why two manifests of the same name are not the same template (ignoring
/// page ids, which are store-specific, and the creation time).
pub(crate) fn structural_difference(have: &ManifestV1, new: &ManifestV1) -> Option<String> {
    let layout = |m: &ManifestV1| -> Vec<(u64, usize)> {
        m.page_runs.iter().map(|(s, v)| (*s, v.len())).collect()
    };
    if have.parent != new.parent {
        return Some(format!(
            "it is layered on {:?} here but on {:?} in the file",
            have.parent, new.parent
        ));
    }
    if have.mem_size != new.mem_size {
        return Some("its memory size differs".into());
    }
    if have.zero_runs != new.zero_runs || layout(have) != layout(new) {
        return Some("its page layout differs".into());
    }
    if have.vcpu_state != new.vcpu_state || have.device_state != new.device_state {
        return Some("its vCPU or device state differs".into());
    }
    if have.working_set != new.working_set {
        return Some("its working set differs".into());
    }
    None
}

//! Writing templates: [`TemplateWriter`] collects pages and state, commit
//! appends new pages to a pack and writes the manifest atomically.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use crate::error::WriteError;
use crate::format::{self, ManifestV1};
use crate::packs::{pack_bytes, Loc, PackSet};
use crate::resolve::{Template, TemplateInfo};
use crate::store::Store;
use crate::util::{is_zero, now_ms, take_lock, IdMap};
use crate::{PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

impl Store {
    /// Starts writing a new template. `parent` must exist and have the same `mem_size`.
    pub fn begin_template(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        self.begin(name, parent, mem_size, false)
    }

    /// Like [`Store::begin_template`], but commit replaces an existing template of that name.
    pub fn begin_template_replacing(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        self.begin(name, parent, mem_size, true)
    }

    fn begin(
        &mut self,
        name: &str,
        parent: Option<&str>,
        mem_size: u64,
        replace: bool,
    ) -> Result<TemplateWriter<'_>, WriteError> {
        let name = TemplateName::new(name)?;
        let parent = parent.map(TemplateName::new).transpose()?;
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE) || mem_size > format::MAX_MEM {
            return Err(WriteError::BadMemSize { mem_size });
        }
        if let Some(p) = &parent {
            self.check_parent(&name, p, mem_size)?;
        }
        Ok(TemplateWriter {
            view: self.view(),
            store: self,
            name,
            parent,
            replace,
            mem_size,
            frames: BTreeMap::new(),
            pending: PageBuf::default(),
            pending_hash: Vec::new(),
            pending_map: IdMap::default(),
            vcpu_state: Vec::new(),
            device_state: Vec::new(),
            working_set: Vec::new(),
        })
    }

    fn check_parent(
        &self,
        name: &TemplateName,
        p: &TemplateName,
        mem_size: u64,
    ) -> Result<(), WriteError> {
        if p == name {
            return Err(WriteError::SelfParent { name: name.clone() });
        }
        let pt = self.read_template(p).map_err(|e| WriteError::Parent {
            parent: p.clone(),
            source: Box::new(e),
        })?;
        if pt.mem_size != mem_size {
            return Err(WriteError::SizeMismatch {
                child: name.clone(),
                child_size: mem_size,
                parent: p.clone(),
                parent_size: pt.mem_size,
            });
        }
        Ok(())
    }
}

/// Append-only page buffer in fixed 4 MiB chunks (no realloc copies).
#[derive(Default)]
struct PageBuf {
    chunks: Vec<Vec<u8>>,
}
const CHUNK_PAGES: usize = 1024;
impl PageBuf {
    fn push(&mut self, page: &[u8; PAGE_SIZE]) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK_PAGES * PAGE_SIZE => c.extend_from_slice(page),
            _ => {
                let mut c = Vec::with_capacity(CHUNK_PAGES * PAGE_SIZE);
                c.extend_from_slice(page);
                self.chunks.push(c);
            }
        }
    }
    fn get(&self, i: u32) -> &[u8] {
        let (c, o) = (
            i as usize / CHUNK_PAGES,
            i as usize % CHUNK_PAGES * PAGE_SIZE,
        );
        &self.chunks[c][o..o + PAGE_SIZE]
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Zero,
    /// Already stored at this location when recorded.
    Known(PageId, Loc),
    Pending(u32),
}

/// Collects one template's pages and state; nothing is visible until [`TemplateWriter::commit`].
/// New (not yet stored) pages are buffered in memory until commit.
pub struct TemplateWriter<'a> {
    store: &'a mut Store,
    /// The pack view pages are deduplicated against until commit (the
    /// locations in [`Slot::Known`] are in it).
    view: Arc<PackSet>,
    name: TemplateName,
    parent: Option<TemplateName>,
    replace: bool,
    mem_size: u64,
    frames: BTreeMap<u64, Slot>,
    pending: PageBuf,
    pending_hash: Vec<u128>,
    pending_map: IdMap<u32>,
    vcpu_state: Vec<u8>,
    device_state: Vec<u8>,
    working_set: Vec<u64>,
}

/// Result of a commit.
#[derive(Clone, Debug)]
pub struct CommitInfo {
    pub info: TemplateInfo,
    /// Pages written to a pack by this commit.
    pub new_pages: u64,
    /// Non-zero frames whose page was already stored (deduplicated).
    pub reused_pages: u64,
}

impl TemplateWriter<'_> {
    fn frames(&self) -> u64 {
        self.mem_size / PAGE
    }

    fn check_frame(&self, frame: u64) -> Result<(), WriteError> {
        if frame >= self.frames() {
            return Err(WriteError::FrameOutOfRange {
                frame,
                frames: self.frames(),
            });
        }
        Ok(())
    }

    fn pending_page(&self, i: u32) -> &[u8] {
        self.pending.get(i)
    }

    /// Records the contents of guest frame `frame`. All-zero pages are recorded as Zero.
    pub fn put_page(&mut self, frame: u64, bytes: &[u8; PAGE_SIZE]) -> Result<(), WriteError> {
        self.check_frame(frame)?;
        if is_zero(bytes) {
            self.frames.insert(frame, Slot::Zero);
            return Ok(());
        }
        let h = self.store.hash_page(bytes);
        let mut slot = 0;
        while let Some(loc) = self.view.index.get(&PageId::new(h, slot)) {
            if self.view.loc_bytes(*loc) == Some(bytes) {
                let loc = *loc;
                self.frames
                    .insert(frame, Slot::Known(PageId::new(h, slot), loc));
                return Ok(());
            }
            slot += 1;
        }
        let mut ls = 0;
        while let Some(&i) = self.pending_map.get(&PageId::new(h, ls)) {
            if self.pending_page(i) == bytes {
                self.frames.insert(frame, Slot::Pending(i));
                return Ok(());
            }
            ls += 1;
        }
        let i = self.pending_hash.len() as u32;
        self.pending.push(bytes);
        self.pending_hash.push(h);
        self.pending_map.insert(PageId::new(h, ls), i);
        self.frames.insert(frame, Slot::Pending(i));
        Ok(())
    }

    /// Records consecutive frames from a page-aligned slice of guest memory
    /// starting at `first_frame` (e.g. the whole guest RAM for a base template).
    pub fn put_memory(&mut self, first_frame: u64, mem: &[u8]) -> Result<(), WriteError> {
        if !mem.len().is_multiple_of(PAGE_SIZE) {
            return Err(WriteError::UnalignedSlice { len: mem.len() });
        }
        for (i, chunk) in mem.chunks_exact(PAGE_SIZE).enumerate() {
            if let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(chunk) {
                self.put_page(first_frame + i as u64, page)?;
            }
        }
        Ok(())
    }

    /// Records frame `frame` as all zeros (overriding the parent).
    pub fn set_zero(&mut self, frame: u64) -> Result<(), WriteError> {
        self.check_frame(frame)?;
        self.frames.insert(frame, Slot::Zero);
        Ok(())
    }

    pub fn set_vcpu_state(&mut self, state: Vec<u8>) {
        self.vcpu_state = state;
    }
    pub fn set_device_state(&mut self, state: Vec<u8>) {
        self.device_state = state;
    }
    /// Guest frame numbers in first-touch order (checked against guest RAM at commit).
    pub fn set_working_set(&mut self, frames: Vec<u64>) {
        self.working_set = frames;
    }

    /// Atomically stores the new pages and the manifest. On error nothing
    /// becomes visible (at most garbage that `verify` reports).
    pub fn commit(self) -> Result<CommitInfo, WriteError> {
        let frames = self.frames();
        if let Some(&frame) = self.working_set.iter().find(|&&f| f >= frames) {
            return Err(WriteError::WorkingSetOutOfRange { frame, frames });
        }
        let TemplateWriter {
            store,
            view,
            name,
            parent,
            replace,
            mem_size,
            frames: mut map,
            mut pending,
            mut pending_hash,
            pending_map: _,
            vcpu_state,
            device_state,
            working_set,
        } = self;
        let lock_path = store.dir.join("LOCK");
        let _lock = take_lock(&store.dir, true).map_err(|source| WriteError::Lock {
            path: lock_path,
            source,
        })?;
        store.fail("locked")?;
        store.clean_tmp();
        // The packs the Known locations point into stay mapped while held here.
        let old_packs = view.packs.clone();
        drop(view);
        store.refresh_mut()?;
        let cur = store.view();
        // Pages deduplicated against a pack that `gc` has since removed or
        // rewritten: still there under another location, or copied again from
        // the (still mapped) old pack.
        for slot in map.values_mut() {
            let Slot::Known(id, loc) = *slot else {
                continue;
            };
            if cur
                .index
                .get(&id)
                .is_some_and(|l| cur.loc_bytes(*l).is_some())
            {
                continue;
            }
            let Some(bytes) = pack_bytes(&old_packs, loc) else {
                return Err(WriteError::BadPack {
                    path: store.packs_dir(),
                    reason: format!("page {id} vanished while the template was being written"),
                });
            };
            let i = pending_hash.len() as u32;
            pending.push(bytes);
            pending_hash.push(id.hash());
            *slot = Slot::Pending(i);
        }
        let page = |i: u32| pending.get(i);
        let mpath = store.manifest_path(&name);
        if !replace && mpath.exists() {
            return Err(WriteError::AlreadyExists { name, path: mpath });
        }
        if let Some(p) = &parent {
            store.check_parent(&name, p, mem_size)?;
        }

        // Final ids for pending pages, deduplicated against the fresh index.
        let mut referenced = vec![false; pending_hash.len()];
        for s in map.values() {
            if let Slot::Pending(i) = s {
                referenced[*i as usize] = true;
            }
        }
        let mut final_id: Vec<Option<PageId>> = vec![None; pending_hash.len()];
        let mut new_map: IdMap<u32> = IdMap::default();
        let mut new_pages: Vec<(PageId, u32)> = Vec::new();
        for (i, &h) in pending_hash.iter().enumerate() {
            if !referenced[i] {
                continue;
            }
            let bytes = page(i as u32);
            let mut slot = 0;
            let id = loop {
                let id = PageId::new(h, slot);
                if let Some(loc) = cur.index.get(&id) {
                    if cur.loc_bytes(*loc).map(|b| &b[..]) == Some(bytes) {
                        break id;
                    }
                } else if let Some(&j) = new_map.get(&id) {
                    if page(j) == bytes {
                        break id;
                    }
                } else {
                    new_map.insert(id, i as u32);
                    new_pages.push((id, i as u32));
                    break id;
                }
                slot += 1;
            };
            final_id[i] = Some(id);
        }

        // Unshared, the view is updated in place by the append below.
        drop(cur);
        if !new_pages.is_empty() {
            store.append_pages(&new_pages, &page)?;
        }

        // Manifest.
        let mut zero_runs: Vec<(u64, u64)> = Vec::new();
        let mut page_runs: Vec<(u64, Vec<PageId>)> = Vec::new();
        let mut own_nonzero = 0u64;
        for (&frame, slot) in &map {
            let id = match slot {
                Slot::Zero => {
                    if parent.is_none() {
                        continue; // zero is the default without a parent
                    }
                    match zero_runs.last_mut() {
                        Some((s, n)) if *s + *n == frame => *n += 1,
                        _ => zero_runs.push((frame, 1)),
                    }
                    continue;
                }
                Slot::Known(id, _) => *id,
                Slot::Pending(i) => match final_id[*i as usize] {
                    Some(id) => id,
                    None => continue, // unreachable: referenced pages all got ids
                },
            };
            own_nonzero += 1;
            match page_runs.last_mut() {
                Some((s, v)) if *s + v.len() as u64 == frame => v.push(id),
                _ => page_runs.push((frame, vec![id])),
            }
        }
        let m = ManifestV1 {
            name: name.as_str().to_string(),
            parent: parent.as_ref().map(|p| p.as_str().to_string()),
            mem_size,
            created_unix_ms: now_ms(),
            zero_runs,
            page_runs,
            vcpu_state,
            device_state,
            working_set,
        };
        let bytes = format::encode_manifest(&m);
        let tmp = store.tmp_dir();
        let done = format::write_atomic(&tmp, &mpath, &bytes, || {
            store.fail("before-manifest-rename").is_ok()
        })
        .map_err(|source| WriteError::Io {
            step: "writing manifest",
            path: mpath.clone(),
            source,
        })?;
        if !done {
            store.fail("before-manifest-rename")?;
        }
        let mut t = Template::from_manifest(m, &mpath).map_err(|e| WriteError::Io {
            step: "re-reading manifest",
            path: mpath.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        t.manifest_sum = format::manifest_sum(&bytes);
        // The commit is durable: the location record is only a hint for lazy
        // restores (a stale one is bound to the old manifest and not used).
        let _ = store.write_locations(&t);
        drop(_lock);
        // The commit is durable; a failed refresh only delays seeing it in memory.
        let _ = store.refresh_mut();
        let info = t.info();
        Ok(CommitInfo {
            info,
            new_pages: new_pages.len() as u64,
            reused_pages: own_nonzero.saturating_sub(new_pages.len() as u64),
        })
    }
}

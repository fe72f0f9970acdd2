//! Loaded templates and resolving them over their parent chain into a
//! per-frame map of pages ([`Resolved`]).

use std::path::Path;
use std::sync::Arc;

use crate::error::{LoadError, ManifestError};
use crate::format::ManifestV1;
use crate::packs::{Loc, PackSet};
use crate::store::{PageHasher, Store};
use crate::util::FrameMap;
use crate::{PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A loaded, checksum-verified template manifest.
#[derive(Clone, Debug)]
pub struct Template {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    /// Guest memory size in bytes (multiple of 4096).
    pub mem_size: u64,
    pub created_unix_ms: u64,
    pub vcpu_state: Vec<u8>,
    pub device_state: Vec<u8>,
    /// Guest frame numbers in first-touch order.
    pub working_set: Vec<u64>,
    pub(crate) zero_runs: Vec<(u64, u64)>,
    pub(crate) page_runs: Vec<(u64, Vec<PageId>)>,
    /// The checksum in its manifest's header (0 when not read from a file): what
    /// its location record is bound to.
    pub(crate) manifest_sum: u128,
}

/// Summary of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateInfo {
    pub name: TemplateName,
    pub parent: Option<TemplateName>,
    pub mem_size: u64,
    /// Frames with a page of this layer's own.
    pub own_pages: u64,
    /// Frames this layer explicitly sets to zero.
    pub zero_frames: u64,
    pub created_unix_ms: u64,
}

/// Result of [`Store::list_all`].
#[derive(Debug, Default)]
pub struct TemplateList {
    /// Readable templates, sorted by name.
    pub templates: Vec<TemplateInfo>,
    /// Templates whose manifest cannot be read, sorted by name, with the reason.
    pub unreadable: Vec<(TemplateName, LoadError)>,
}

impl Template {
    pub(crate) fn from_manifest(m: ManifestV1, path: &Path) -> Result<Template, LoadError> {
        let bad = |reason: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let name = TemplateName::new(&m.name).map_err(|e| bad(e.to_string()))?;
        let parent = m
            .parent
            .as_deref()
            .map(TemplateName::new)
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        Ok(Template {
            name,
            parent,
            mem_size: m.mem_size,
            created_unix_ms: m.created_unix_ms,
            vcpu_state: m.vcpu_state,
            device_state: m.device_state,
            working_set: m.working_set,
            zero_runs: m.zero_runs,
            page_runs: m.page_runs,
            manifest_sum: 0,
        })
    }

    /// Number of guest frames.
    pub fn frames(&self) -> u64 {
        self.mem_size / PAGE
    }

    /// This layer's own pages as (frame, page).
    pub fn own_pages(&self) -> impl Iterator<Item = (u64, PageId)> + '_ {
        self.page_runs
            .iter()
            .flat_map(|(s, v)| v.iter().enumerate().map(move |(i, id)| (s + i as u64, *id)))
    }

    pub(crate) fn own_page_count(&self) -> u64 {
        self.page_runs.iter().map(|(_, v)| v.len() as u64).sum()
    }

    pub fn info(&self) -> TemplateInfo {
        TemplateInfo {
            name: self.name.clone(),
            parent: self.parent.clone(),
            mem_size: self.mem_size,
            own_pages: self.own_page_count(),
            zero_frames: self.zero_runs.iter().map(|(_, n)| n).sum(),
            created_unix_ms: self.created_unix_ms,
        }
    }

    /// Flattens the parent chain into a per-frame map of page locations.
    /// Errors on missing parents, cycles, size mismatches and missing pages.
    /// The result keeps the store's current view of the packs: it does not
    /// borrow the store, and its pages stay readable whatever the store does next.
    ///
    /// In a store opened with [`Store::open_lazy`], the pages are located by the
    /// layers' location records when they are all usable (see
    /// [`Resolved::from_locations`]), else by the pack indexes.
    pub fn resolve(&self, store: &Store) -> Result<Resolved, LoadError> {
        let ancestors = store.ancestors(self)?;
        let mut fallback = None;
        if store.lazy {
            let layers: Vec<&Template> = ancestors.iter().chain(std::iter::once(self)).collect();
            match store.located_view(&layers) {
                Ok(view) => match self.resolve_in(store, &ancestors, Arc::new(view)) {
                    Ok(mut r) => {
                        r.located = true;
                        return Ok(r);
                    }
                    Err(e) => fallback = Some(format!("the location records do not resolve: {e}")),
                },
                Err(why) => fallback = Some(why),
            }
        }
        let mut r = self.resolve_in(store, &ancestors, store.view())?;
        r.fallback = fallback;
        Ok(r)
    }

    fn resolve_in(
        &self,
        store: &Store,
        ancestors: &[Template],
        view: Arc<PackSet>,
    ) -> Result<Resolved, LoadError> {
        let n = self.frames() as usize;
        // A zeroed u64 allocation: pages of the map that no data frame touches stay unmapped.
        let mut frames: Vec<u64> = vec![0; n];
        let own: u64 =
            ancestors.iter().map(Template::own_page_count).sum::<u64>() + self.own_page_count();
        let mut hashes = FrameMap::default();
        hashes.reserve(usize::try_from(own).unwrap_or(0).min(n));
        let mut layers = Vec::with_capacity(ancestors.len() + 1);
        for t in ancestors.iter().chain(std::iter::once(self)) {
            layers.push(t.name.clone());
            for &(s, k) in &t.zero_runs {
                frames[s as usize..(s + k) as usize].fill(Src::ZERO.0);
                // A parent's page this layer zeroes is no data frame any more.
                if !hashes.is_empty() {
                    for f in s..s + k {
                        hashes.remove(&f);
                    }
                }
            }
            for (frame, id) in t.own_pages() {
                let loc = match view.index.get(&id) {
                    Some(l) if view.loc_bytes(*l).is_some() => *l,
                    found => {
                        let (template, page) = (t.name.clone(), id);
                        let pack_err = found.and_then(|l| view.pack_read_error(l.pack));
                        let idx_err = view.index_read_error().filter(|_| found.is_none());
                        return Err(match (pack_err, idx_err) {
                            (Some(reason), _) => LoadError::PackUnreadable {
                                template,
                                frame,
                                page,
                                reason: reason.to_string(),
                            },
                            (None, Some(reason)) => LoadError::IndexUnreadable {
                                template,
                                frame,
                                page,
                                reason: reason.to_string(),
                            },
                            (None, None) => LoadError::PageMissing {
                                template,
                                frame,
                                page,
                            },
                        });
                    }
                };
                frames[frame as usize] = Src::new(loc.pack, loc.offset)?.0;
                hashes.insert(frame, id);
            }
        }
        Ok(Resolved {
            view,
            hasher: store.hasher.clone(),
            mem_size: self.mem_size,
            frames,
            layers,
            hashes,
            located: false,
            fallback: None,
        })
    }
}

/// Where a frame's page lives, packed in a u64 so that a resolved map of mostly zero
/// frames is a zeroed allocation (the OS maps it lazily): 0 = zero frame, else
/// `(pack + 1) << 40 | offset / PAGE_SIZE`.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
struct Src(u64);
impl Src {
    const ZERO: Src = Src(0);
    fn new(pack: u32, offset: u64) -> Result<Src, LoadError> {
        let page = offset / PAGE;
        if !offset.is_multiple_of(PAGE) || page >= 1 << 40 || pack >= (1 << 23) {
            return Err(LoadError::BufferSize {
                expected: page,
                found: offset,
            });
        }
        Ok(Src(((pack as u64 + 1) << 40) | page))
    }
    fn pack(self) -> u32 {
        ((self.0 >> 40) - 1) as u32
    }
    fn offset(self) -> u64 {
        (self.0 & ((1 << 40) - 1)) * PAGE
    }
}

/// Contents of one guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Zero,
    /// The page, borrowed straight from the pack mapping.
    Data(&'a [u8; PAGE_SIZE]),
}

/// A template flattened over its parent chain: frame -> Zero | mmapped page.
/// It owns the view of the packs it was resolved against (`'static`, `Send +
/// Sync`: share it between threads, keep it while the store refreshes).
pub struct Resolved {
    view: Arc<PackSet>,
    hasher: PageHasher,
    mem_size: u64,
    /// `Src` words, one per frame.
    frames: Vec<u64>,
    layers: Vec<TemplateName>,
    /// The page id each data frame must hash to (for verified reads).
    hashes: FrameMap<PageId>,
    located: bool,
    fallback: Option<String>,
}

impl Resolved {
    /// Whether the pages were located by the layers' location records (in a
    /// store opened with [`Store::open_lazy`]), not by the pack indexes.
    pub fn from_locations(&self) -> bool {
        self.located
    }

    /// In a store opened with [`Store::open_lazy`]: why the location records
    /// were not used and the pack indexes were read instead (a record missing,
    /// as in stores written before records existed, damaged, or stale after
    /// `gc`). Worth a debug line, never an error: the result is the same.
    pub fn location_fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }
    /// Layer names from the root (base) to this template.
    pub fn layers(&self) -> &[TemplateName] {
        &self.layers
    }
    pub fn frame_count(&self) -> u64 {
        self.frames.len() as u64
    }
    /// Number of frames that are not zero.
    pub fn nonzero_frames(&self) -> u64 {
        self.frames.iter().filter(|&&s| Src(s) != Src::ZERO).count() as u64
    }

    fn get(&self, s: Src) -> Frame<'_> {
        if s == Src::ZERO {
            return Frame::Zero;
        }
        // In range: checked by resolve() against this view, which never changes.
        match self.view.loc_bytes(Loc {
            pack: s.pack(),
            offset: s.offset(),
        }) {
            Some(b) => Frame::Data(b),
            None => Frame::Zero,
        }
    }

    /// Contents of frame `gfn` (None past the end of guest memory).
    pub fn frame(&self, gfn: u64) -> Option<Frame<'_>> {
        let s = Src(*self.frames.get(usize::try_from(gfn).ok()?)?);
        Some(self.get(s))
    }

    /// Contents of frame `gfn`, with a data page re-hashed and checked against its id:
    /// what a restore uses, so that a damaged pack is refused instead of run.
    pub fn frame_verified(&self, gfn: u64) -> Result<Option<Frame<'_>>, LoadError> {
        let Some(f) = self.frame(gfn) else {
            return Ok(None);
        };
        if let Frame::Data(bytes) = f {
            let ok = self
                .hashes
                .get(&gfn)
                .is_some_and(|id| self.hasher.hash(bytes) == id.hash());
            if !ok {
                return Err(LoadError::PageCorrupt { frame: gfn });
            }
        }
        Ok(Some(f))
    }

    /// The view of the packs this template was resolved against.
    pub(crate) fn view(&self) -> &PackSet {
        &self.view
    }

    /// The data frames with the id of their page, sorted by frame.
    pub(crate) fn data_ids(&self) -> Vec<(u64, PageId)> {
        let mut v: Vec<(u64, PageId)> = self.hashes.iter().map(|(f, id)| (*f, *id)).collect();
        v.sort_unstable_by_key(|d| d.0);
        v
    }

    /// The frames that hold data (not zero), in no particular order: cheaper than
    /// [`Resolved::iter`] when most of guest memory is zero.
    pub fn data_frames(&self) -> impl Iterator<Item = u64> + '_ {
        self.hashes.keys().copied()
    }

    /// All frames in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Frame<'_>)> + '_ {
        self.frames
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, self.get(Src(*s))))
    }

    /// Fills `guest` (exactly `mem_size` bytes) with the template memory, zeroing zero frames.
    pub fn copy_to(&self, guest: &mut [u8]) -> Result<(), LoadError> {
        self.copy(guest, true)
    }

    /// Like [`Resolved::copy_to`] but skips zero frames: for freshly mapped
    /// (already zero) guest memory.
    pub fn copy_to_zeroed(&self, guest: &mut [u8]) -> Result<(), LoadError> {
        self.copy(guest, false)
    }

    fn copy(&self, guest: &mut [u8], write_zeros: bool) -> Result<(), LoadError> {
        if guest.len() as u64 != self.mem_size {
            return Err(LoadError::BufferSize {
                expected: self.mem_size,
                found: guest.len() as u64,
            });
        }
        for (dst, s) in guest.chunks_exact_mut(PAGE_SIZE).zip(&self.frames) {
            match self.get(Src(*s)) {
                Frame::Data(b) => dst.copy_from_slice(b),
                Frame::Zero if write_zeros => dst.fill(0),
                Frame::Zero => {}
            }
        }
        Ok(())
    }
}

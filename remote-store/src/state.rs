//! Reading the remote's state: object keys, template references, manifests,
//! the pack listing and the page index built from the pack indexes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use bytes::Bytes;
use snapshot_store::Store;

use crate::cache;
use crate::client::{Listed, Remote};
use crate::error::RemoteError;
use crate::objects::{self, GcMarks, Hash, Manifest, PackIndex, TemplateRef};

pub const MARKS_KEY: &str = "gc/marked";

pub fn pack_key(h: &Hash) -> String {
    format!("packs/{}.pack", objects::hex(h))
}
pub fn idx_key(h: &Hash) -> String {
    format!("packs/{}.idx", objects::hex(h))
}
pub fn manifest_key(h: &Hash) -> String {
    format!("manifests/{}.man", objects::hex(h))
}
pub fn ref_key(name: &str) -> String {
    format!("templates/{name}")
}

/// The local directory caching this remote's pack indexes.
pub fn index_cache_dir(store: &Store, remote: &Remote) -> PathBuf {
    let key = objects::hex(&objects::hash(remote.display().as_bytes()));
    cache::remote_dir(store).join(&key[..32]).join("idx")
}

pub fn get_ref(remote: &Remote, name: &str) -> Result<Option<TemplateRef>, RemoteError> {
    let key = ref_key(name);
    let Some(b) = remote.get(
        "reading template reference",
        &key,
        objects::REF_LIMIT as u64,
    )?
    else {
        return Ok(None);
    };
    TemplateRef::decode(name, &b)
        .map(Some)
        .map_err(|reason| RemoteError::DamagedObject {
            object: key,
            reason,
        })
}

pub fn get_manifest(remote: &Remote, m: &Hash) -> Result<Option<Manifest>, RemoteError> {
    let key = manifest_key(m);
    let Some(b) = remote.get("reading manifest", &key, objects::MAN_LIMIT as u64 + 64)? else {
        return Ok(None);
    };
    Manifest::decode(m, &b)
        .map(Some)
        .map_err(|reason| RemoteError::DamagedObject {
            object: key,
            reason,
        })
}

/// The gc marks now on the remote (none: nothing is marked). Damaged marks
/// count as marking nothing for gc, and as marking every pack for push (push then
/// uploads what it needs again rather than rely on a pack gc may delete).
pub fn get_marks(remote: &Remote) -> Result<Option<GcMarks>, RemoteError> {
    match remote.get("reading gc marks", MARKS_KEY, objects::GC_LIMIT as u64 + 64)? {
        None => Ok(Some(GcMarks::default())),
        Some(b) => Ok(GcMarks::decode(&b).ok()),
    }
}

/// What `packs/` holds.
#[derive(Default)]
pub struct PackListing {
    pub packs: HashMap<Hash, Listed>,
    pub idxs: HashMap<Hash, Listed>,
    /// Anything else under `packs/`.
    pub other: Vec<Listed>,
}

pub fn list_packs(remote: &Remote) -> Result<PackListing, RemoteError> {
    let mut l = PackListing::default();
    for o in remote.list("listing packs", "packs")? {
        let file = o.key.strip_prefix("packs/").unwrap_or(&o.key);
        let parsed = file
            .strip_suffix(".pack")
            .map(|s| (s, true))
            .or_else(|| file.strip_suffix(".idx").map(|s| (s, false)))
            .and_then(|(s, is_pack)| objects::parse_hex(s).map(|h| (h, is_pack)));
        match parsed {
            Some((h, true)) => {
                l.packs.insert(h, o);
            }
            Some((h, false)) => {
                l.idxs.insert(h, o);
            }
            None => l.other.push(o),
        }
    }
    Ok(l)
}

/// Which pages the remote holds, and where.
#[derive(Default)]
pub struct PageIndex {
    pub page: HashMap<Hash, (Hash, u32)>,
    /// Packs whose pages may be referenced: both objects listed, sizes agree, not marked by gc.
    pub usable: HashSet<Hash>,
    /// Packs whose index object is damaged (their pages are not offered).
    pub damaged: Vec<(Hash, String)>,
}

impl PageIndex {
    pub fn add(&mut self, i: &PackIndex) {
        for (n, h) in i.pages.iter().enumerate() {
            self.page.entry(*h).or_insert((i.pack, n as u32));
        }
        self.usable.insert(i.pack);
    }
}

/// Builds the page index from the listed packs: indexes from the local cache,
/// or fetched (and then cached). Packs in `excluded` are left out.
pub fn page_index(
    store: &Store,
    remote: &Remote,
    listing: &PackListing,
    excluded: &dyn Fn(&Hash) -> bool,
) -> Result<PageIndex, RemoteError> {
    let dir = index_cache_dir(store, remote);
    let mut out = PageIndex::default();
    let mut want: Vec<Hash> = Vec::new();
    let mut loaded: Vec<PackIndex> = Vec::new();
    for (h, pack) in &listing.packs {
        if excluded(h) || !listing.idxs.contains_key(h) {
            continue;
        }
        match cache::cached_index(&dir, h) {
            Some(i) if i.pack_len() == pack.size => loaded.push(i),
            _ => want.push(*h),
        }
    }
    if !want.is_empty() {
        let ranges: Vec<(String, std::ops::Range<u64>)> = want
            .iter()
            .map(|h| (idx_key(h), 0..objects::IDX_LIMIT as u64 + 64))
            .collect();
        let got: Vec<Bytes> = remote.get_ranges("reading pack index", &ranges, |_| {})?;
        for (h, b) in want.iter().zip(got) {
            match PackIndex::decode(h, &b) {
                Ok(i) if Some(i.pack_len()) == listing.packs.get(h).map(|p| p.size) => {
                    // Best effort: without the copy the index is fetched again next time.
                    let _ = cache::store_index(&dir, h, &b);
                    loaded.push(i);
                }
                Ok(i) => out.damaged.push((
                    *h,
                    format!(
                        "its index lists {} pages, the pack has {} bytes",
                        i.pages.len(),
                        listing.packs.get(h).map_or(0, |p| p.size)
                    ),
                )),
                Err(reason) => out.damaged.push((*h, reason)),
            }
        }
    }
    for i in &loaded {
        out.add(i);
    }
    cache::prune_indexes(&dir, &|h| listing.packs.contains_key(h));
    Ok(out)
}

//! Local caches kept under the store's `remote/` directory: derived data,
//! checked on every read, rebuilt when damaged, written atomically.
//!
//! * `remote/<remote key>/idx/<H>.idx`: copies of the remote's pack indexes
//!   (immutable on the remote, so a copy stays right while the pack exists;
//!   decoded and checked against its name on every read).
//! * `remote/page-hashes`: the BLAKE3 of each local page, by local page id, so
//!   that a pull knows which remote pages this store already has without
//!   hashing every page each time. An entry is used only for a page the
//!   store's index still lists, and the page's bytes are hashed again before
//!   the pull relies on it.
//! * `remote/locks/<name>.lock`: one pull of a template at a time on this machine;
//!   `remote/locks/functions/<name>.lock`: one pull of a function's record and blobs.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use snapshot_store::{PageId, Store};

use crate::error::RemoteError;
use crate::objects::{self, Hash, PackIndex};

const LID_MAGIC: &[u8; 8] = b"VMMRLID1";
const LID_ENTRY: usize = 16 + 4 + 32;
/// Largest page-hash cache read (about 40 million pages).
const LID_LIMIT: u64 = 2 << 30;
/// Largest pack index copy read.
const IDX_LIMIT: u64 = objects::IDX_LIMIT as u64;

pub fn remote_dir(store: &Store) -> PathBuf {
    store.dir().join("remote")
}

fn local_err(step: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RemoteError {
    let path = path.to_path_buf();
    move |source| RemoteError::Local { step, path, source }
}

/// Reads a regular file of at most `limit` bytes (None: missing, not regular, or too big).
fn read_bounded(path: &Path, limit: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.len() > limit {
        return None;
    }
    let mut b = Vec::with_capacity(m.len() as usize);
    f.take(limit + 1).read_to_end(&mut b).ok()?;
    (b.len() as u64 <= limit).then_some(b)
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RemoteError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(local_err("creating cache directory", dir))?;
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    let tmp = dir.join(format!(
        ".{}.{}.{:016x}.tmp",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("f"),
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    let r = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(local_err("writing cache file", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(local_err("renaming cache file", path)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(local_err("syncing cache directory", dir))
}

/// The cached copy of the remote pack index `pack`, if present and sound.
pub fn cached_index(dir: &Path, pack: &Hash) -> Option<PackIndex> {
    let b = read_bounded(&dir.join(format!("{}.idx", objects::hex(pack))), IDX_LIMIT)?;
    PackIndex::decode(pack, &b).ok()
}

pub fn store_index(dir: &Path, pack: &Hash, bytes: &[u8]) -> Result<(), RemoteError> {
    write_atomic(&dir.join(format!("{}.idx", objects::hex(pack))), bytes)
}

/// Drops cached indexes of packs no longer on the remote.
pub fn prune_indexes(dir: &Path, keep: &dyn Fn(&Hash) -> bool) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(stem) = name.to_str().and_then(|s| s.strip_suffix(".idx")) else {
            continue;
        };
        if objects::parse_hex(stem).is_some_and(|h| !keep(&h)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// BLAKE3 of every page of the local store, by remote identity: hash -> local page id.
/// Loads the cache, hashes the pages it lacks, drops pages gone, saves it if it changed.
pub fn local_page_hashes(store: &Store) -> Result<HashMap<Hash, PageId>, RemoteError> {
    let path = remote_dir(store).join("page-hashes");
    let mut cached: HashMap<PageId, Hash> = read_bounded(&path, LID_LIMIT)
        .and_then(|b| decode_lid(&b))
        .unwrap_or_default();
    let ids = store.stored_page_ids();
    let before = cached.len();
    let mut changed = false;
    let mut out: HashMap<Hash, PageId> = HashMap::with_capacity(ids.len());
    let mut live: HashMap<PageId, Hash> = HashMap::with_capacity(ids.len());
    for id in ids {
        let h = match cached.remove(&id) {
            Some(h) => h,
            None => {
                // A page whose bytes do not match its id (damaged) is not offered.
                let Some(bytes) = store.page_verified(id) else {
                    continue;
                };
                changed = true;
                objects::hash(&bytes)
            }
        };
        out.insert(h, id);
        live.insert(id, h);
    }
    if changed || live.len() != before {
        // Best effort: without a cache the next pull hashes the pages again.
        let _ = write_atomic(&path, &encode_lid(&live));
    }
    Ok(out)
}

/// Adds pages just written by a pull (their hashes are known) to the cache.
pub fn add_page_hashes(store: &Store, new: &[(PageId, Hash)]) {
    if new.is_empty() {
        return;
    }
    let path = remote_dir(store).join("page-hashes");
    let mut cached: HashMap<PageId, Hash> = read_bounded(&path, LID_LIMIT)
        .and_then(|b| decode_lid(&b))
        .unwrap_or_default();
    for (id, h) in new {
        cached.insert(*id, *h);
    }
    let _ = write_atomic(&path, &encode_lid(&cached));
}

fn encode_lid(m: &HashMap<PageId, Hash>) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + m.len() * LID_ENTRY + 32);
    v.extend_from_slice(LID_MAGIC);
    v.extend_from_slice(&(m.len() as u64).to_le_bytes());
    for (id, h) in m {
        v.extend_from_slice(&id.hash().to_le_bytes());
        v.extend_from_slice(&id.slot().to_le_bytes());
        v.extend_from_slice(h);
    }
    let sum = objects::hash(&v);
    v.extend_from_slice(&sum);
    v
}

fn decode_lid(b: &[u8]) -> Option<HashMap<PageId, Hash>> {
    if b.len() < 16 + 32 || &b[..8] != LID_MAGIC {
        return None;
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if objects::hash(body) != sum {
        return None;
    }
    let n = u64::from_le_bytes(body[8..16].try_into().ok()?);
    let entries = &body[16..];
    if entries.len() as u64 != n.checked_mul(LID_ENTRY as u64)? {
        return None;
    }
    let mut m = HashMap::with_capacity(n as usize);
    for c in entries.chunks_exact(LID_ENTRY) {
        let hash = u128::from_le_bytes(c[..16].try_into().ok()?);
        let slot = u32::from_le_bytes(c[16..20].try_into().ok()?);
        let mut h = [0u8; 32];
        h.copy_from_slice(&c[20..]);
        m.insert(PageId::from_parts(hash, slot), h);
    }
    Some(m)
}

/// An exclusive lock on `remote/locks/<name>.lock`, released on drop.
pub struct NameLock(#[allow(dead_code)] File);

pub fn lock_name(store: &Store, name: &str) -> Result<NameLock, RemoteError> {
    lock_in(&remote_dir(store).join("locks"), name)
}

/// An exclusive lock on `remote/locks/functions/<name>.lock`: one pull of a deployed
/// function's record and blobs at a time on this machine.
pub fn lock_function(store: &Store, name: &str) -> Result<NameLock, RemoteError> {
    lock_in(&remote_dir(store).join("locks").join("functions"), name)
}

fn lock_in(dir: &Path, name: &str) -> Result<NameLock, RemoteError> {
    fs::create_dir_all(dir).map_err(local_err("creating lock directory", dir))?;
    let path = dir.join(format!("{name}.lock"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(local_err("opening pull lock", &path))?;
    f.lock().map_err(local_err("taking pull lock", &path))?;
    Ok(NameLock(f))
}

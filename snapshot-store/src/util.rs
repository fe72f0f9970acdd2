//! Small helpers shared by the store's modules: the page-id hash map, the store lock,
//! file mapping and pack file names.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{Mmap, MmapOptions};

use crate::{PackId, PageId};

/// The page hash is already keyed and uniformly distributed: use it directly. Small
/// integers (frame numbers, pack positions) are multiplied by a large odd constant.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 ^= (i as u64) ^ ((i >> 64) as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.0 ^= u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0 ^ i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
pub(crate) type IdMap<V> = HashMap<PageId, V, BuildHasherDefault<IdHasher>>;

/// Guest frame number -> V. Frame numbers are small dense integers: [`IdHasher`] spreads
/// them with one multiply (Fibonacci hashing), far cheaper than SipHash on a restore's
/// ~10k lookups.
pub(crate) type FrameMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

pub(crate) struct Lock(File);
impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

pub(crate) fn take_lock(dir: &Path, exclusive: bool) -> io::Result<Lock> {
    let path = dir.join("LOCK");
    let open_rw = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    };
    // A shared lock needs only read access, so users who may read the store
    // but not write it can still verify, export and restore.
    let f = if exclusive {
        open_rw()?
    } else {
        // Non-blocking: a LOCK that is a FIFO must not block the open forever.
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => open_rw()?,
            Err(e) => return Err(e),
        }
    };
    if exclusive {
        f.lock()?;
    } else {
        f.lock_shared()?;
    }
    Ok(Lock(f))
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn parse_pack_file(name: &str) -> Option<(PackId, bool)> {
    let (stem, is_idx) = if let Some(s) = name.strip_suffix(".idx") {
        (s, true)
    } else {
        (name.strip_suffix(".pack")?, false)
    };
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16)
        .ok()
        .map(|v| (PackId::new(v), is_idx))
}

/// Opens a store file for reading: a regular file (links followed), nothing
/// else. A FIFO would block the open or the read forever, a device such as
/// /dev/zero never ends; both are refused (opened non-blocking, then checked).
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let t = f.metadata()?.file_type();
    if t.is_file() {
        return Ok(f);
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file"),
    ))
}

/// [`std::fs::read`] of a store file, refusing anything but a regular file
/// (see [`open_regular`]).
pub(crate) fn read_regular(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = open_regular(path)?;
    let mut b = Vec::with_capacity(f.metadata().map_or(0, |m| m.len() as usize));
    f.read_to_end(&mut b)?;
    Ok(b)
}

/// Maps the first `len` bytes of `path` read-only.
pub(crate) fn map_file(path: &Path, len: u64) -> io::Result<Mmap> {
    map_opened(&open_regular(path)?, len)
}

/// Maps the first `len` bytes of the open file `f` read-only.
pub(crate) fn map_opened(f: &File, len: u64) -> io::Result<Mmap> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: the mapping is read-only and `len` is no larger than the file
    // size the caller observed just before. Packs are append-only: the only
    // writer that shrinks one is gc, under the exclusive store lock, and only
    // past every index entry; mappings that reach past a pack's indexed end
    // are taken under the store lock (verify, gc, reindex). Cache images are
    // never written in place (a rebuild renames a new file over them). If a
    // file is damaged externally (truncated) accesses could fault; `verify`
    // detects that state and `refresh` maps only what exists.
    unsafe { MmapOptions::new().len(len).map(f) }
}

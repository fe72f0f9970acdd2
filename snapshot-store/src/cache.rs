//! The memory-image cache in `<store>/cache/`: for each template restored with
//! a copy-on-write mapping (the VMM's `--memory shared`), one sparse file
//! holding every data page at its guest offset, shared by all instances
//! through the page cache. It is derived data: built from verified pages,
//! checked against the template's page ids every time before it is handed
//! out (and rebuilt when it does not match), checked by `verify`, removed with
//! its template and by `gc`.
//!
//! ```text
//! cache/<name>.<created unix ms>.img   an image (a replaced template never meets an old one)
//! cache/.<name>.<pid>.tmp              an image being built by process <pid>
//! ```
//!
//! The check reads every data page of the image and re-hashes it against its
//! page id, and checks that every other page the file holds data for is zero
//! (the file's holes read as zero): altered bytes are detected before use. An
//! image is never modified in place; a rebuilt one replaces it by rename, so
//! instances that mapped the old one keep it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::CacheError;
use crate::resolve::{Frame, Resolved, Template};
use crate::store::Store;
use crate::util::{is_zero, map_opened, open_regular};
use crate::{PageId, TemplateName, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A verified memory image of a template, from [`Store::memory_image`].
#[derive(Debug)]
pub struct MemoryImage {
    /// The image, open read-only: map it privately (copy-on-write).
    pub file: File,
    pub path: PathBuf,
    /// The image was built by this call (none was cached, or the cached one was rejected).
    pub built: bool,
    /// Why the cached image was rejected and rebuilt, if it was.
    pub rejected: Option<String>,
    /// Time spent checking the cached image (zero when it was built).
    pub check_time: Duration,
}

/// What a file in `cache/` is.
pub(crate) enum CacheFile {
    /// `<name>.<created>.img`
    Image {
        name: TemplateName,
        created: u64,
    },
    /// `.<name>.<pid>.tmp`
    Temp {
        name: TemplateName,
        pid: u32,
    },
    Unknown,
}

pub(crate) fn parse_cache_file(file: &str) -> CacheFile {
    let split = |s: &str| -> Option<(TemplateName, u64)> {
        let (name, n) = s.rsplit_once('.')?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((TemplateName::new(name).ok()?, n.parse().ok()?))
    };
    if let Some(s) = file.strip_prefix('.').and_then(|s| s.strip_suffix(".tmp")) {
        if let Some((name, pid)) = split(s) {
            if let Ok(pid) = u32::try_from(pid) {
                return CacheFile::Temp { name, pid };
            }
        }
    } else if let Some((name, created)) = file.strip_suffix(".img").and_then(split) {
        return CacheFile::Image { name, created };
    }
    CacheFile::Unknown
}

/// Whether process `pid` exists (so its temp file may still be in use).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Start of the next data extent at or after `off` (None: only holes follow,
/// or the file system cannot tell: then `Err`).
fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::other("offset too large"))?;
    // SAFETY: lseek on a file descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// The byte ranges of `f` (of length `len`) that may hold data: its data
/// extents, or the whole file if the file system cannot tell.
fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let start = match seek(f, off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(_) => return vec![(0, len)],
        };
        let end = match seek(f, start, libc::SEEK_HOLE) {
            Ok(Some(e)) => e.min(len),
            Ok(None) => len,
            Err(_) => return vec![(0, len)],
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        off = end;
    }
    out
}

impl Store {
    pub(crate) fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn image_path(&self, t: &Template) -> PathBuf {
        self.cache_dir()
            .join(format!("{}.{}.img", t.name, t.created_unix_ms))
    }

    /// The memory image of template `t` (resolved as `r`) for a copy-on-write
    /// mapping: the cached one once it has been checked against the
    /// template's page ids, else a new one built from verified pages. A cached
    /// image that does not match (altered, truncated, stale) is replaced and
    /// the reason returned in [`MemoryImage::rejected`]; nothing altered is
    /// ever handed out.
    pub fn memory_image(&self, t: &Template, r: &Resolved) -> Result<MemoryImage, CacheError> {
        let path = self.image_path(t);
        let mut rejected = None;
        let t0 = Instant::now();
        match open_regular(&path) {
            Ok(f) => match self.check_image(&f, t.mem_size, &r.data_ids()) {
                Ok(()) => {
                    return Ok(MemoryImage {
                        file: f,
                        path,
                        built: false,
                        rejected: None,
                        check_time: t0.elapsed(),
                    })
                }
                Err(why) => rejected = Some(why),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => rejected = Some(format!("cannot open it: {e}")),
        }
        let check_time = if rejected.is_some() {
            t0.elapsed()
        } else {
            Duration::ZERO
        };
        let file = self.build_image(t, r, &path)?;
        Ok(MemoryImage {
            file,
            path,
            built: true,
            rejected,
            check_time,
        })
    }

    /// Checks an image of `mem_size` bytes whose data pages are `data` (guest
    /// frame and page id, sorted by frame): its size, every data page's hash,
    /// and that every other page the file holds data for is zero. Err: what is wrong.
    pub(crate) fn check_image(
        &self,
        f: &File,
        mem_size: u64,
        data: &[(u64, PageId)],
    ) -> Result<(), String> {
        let len = f
            .metadata()
            .map_err(|e| format!("cannot stat it: {e}"))?
            .len();
        if len != mem_size {
            return Err(format!(
                "it is {len} bytes, the template has {mem_size} bytes of memory"
            ));
        }
        let extents = data_extents(f, len);
        let map = map_opened(f, len).map_err(|e| format!("cannot read it: {e}"))?;
        // Every data page matches its id.
        for &(gfn, id) in data {
            let s = usize::try_from(gfn * PAGE).unwrap_or(usize::MAX);
            let bytes = map
                .get(s..s.saturating_add(PAGE_SIZE))
                .ok_or_else(|| format!("guest frame {gfn} lies past its end"))?;
            if self.hash_page(bytes) != id.hash() {
                return Err(format!(
                    "the page of guest frame {gfn} (offset {s}) does not match the template"
                ));
            }
        }
        // Everything else it holds is zero (holes read as zero).
        for (start, end) in extents {
            for gfn in start / PAGE..end.div_ceil(PAGE) {
                if data.binary_search_by_key(&gfn, |d| d.0).is_ok() {
                    continue;
                }
                let s = (gfn * PAGE) as usize;
                if let Some(b) = map.get(s..(s + PAGE_SIZE).min(len as usize)) {
                    if !is_zero(b) {
                        return Err(format!(
                            "guest frame {gfn} (offset {s}) must be zero but holds data"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a new image of `t` from verified pages and renames it into place.
    fn build_image(&self, t: &Template, r: &Resolved, path: &Path) -> Result<File, CacheError> {
        let dir = self.cache_dir();
        let io = |step: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| CacheError::Io { step, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("creating the image cache", &dir))?;
        let tmp = dir.join(format!(".{}.{}.tmp", t.name, std::process::id()));
        // A leftover of an earlier process with this pid: ours now.
        let _ = fs::remove_file(&tmp);
        let result = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io("creating a memory image", &tmp))?;
            f.set_len(t.mem_size)
                .map_err(io("sizing a memory image", &tmp))?;
            let mut data: Vec<u64> = r.data_frames().collect();
            data.sort_unstable();
            for gfn in data {
                if let Some(Frame::Data(p)) = r.frame_verified(gfn)? {
                    f.write_all_at(p, gfn * PAGE)
                        .map_err(io("writing a memory image", &tmp))?;
                }
            }
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
                .map_err(io("making a memory image read-only", &tmp))?;
            fs::rename(&tmp, path).map_err(io("installing a memory image", path))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        File::open(path).map_err(io("opening a memory image", path))
    }

    /// Removes the cache images of template `name` and temp files of dead
    /// processes building one. Best effort: the cache is derived data.
    pub(crate) fn remove_cached_images(&self, name: &TemplateName) {
        let Ok(rd) = fs::read_dir(self.cache_dir()) else {
            return;
        };
        for e in rd.flatten() {
            let fname = e.file_name();
            let doomed = match parse_cache_file(&fname.to_string_lossy()) {
                CacheFile::Image { name: n, .. } => &n == name,
                CacheFile::Temp { name: n, pid } => &n == name && !process_alive(pid),
                CacheFile::Unknown => false,
            };
            if doomed {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

//! Guest RAM: one anonymous, sparse host mapping, and bounds-checked access to it.
//!
//! Every address and length that reaches this module may come from the guest, so every
//! access is checked against the mapping's size and fails with an error, never a panic.

use std::ptr::NonNull;

const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("map {size} bytes of guest RAM: {source} (is the host short of memory, or is `ulimit -v` set?)")]
    Map { size: usize, source: std::io::Error },
    #[error(
        "guest memory access out of range: gpa {gpa:#x} + {len:#x} exceeds RAM size {size:#x}"
    )]
    OutOfRange { gpa: u64, len: u64, size: u64 },
}

/// `/proc/self/pagemap`, opened once per process and shared by every instance (reads are
/// positioned: `pread`), so that an idle instance holds no descriptor of its own for it.
pub fn pagemap() -> Result<&'static std::fs::File, std::io::Error> {
    static PAGEMAP: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    if let Some(f) = PAGEMAP.get() {
        return Ok(f);
    }
    let f = std::fs::File::open("/proc/self/pagemap")?;
    Ok(PAGEMAP.get_or_init(|| f))
}

/// What [`GuestMemory::page_states`] finds of a page of a private file mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Not mapped: never touched since the mapping was made.
    Absent,
    /// Mapped from the file: read, never written.
    Shared,
    /// A private copy: written.
    Private,
}

/// Guest RAM backed by a private anonymous mapping (`MAP_NORESERVE`: untouched pages
/// cost nothing). `MADV_HUGEPAGE` is requested because this machine's PVM back end maps
/// a guest 2 MiB page in one exit only if the host memory behind it is huge too.
pub struct GuestMemory {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: GuestMemory owns its mapping; the raw pointer is only dereferenced through
// bounds-checked methods, and the vCPU that shares the memory is stopped (or is the
// guest itself) whenever the host accesses it.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; shared references only read through bounds-checked copies.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    pub fn new(size: usize) -> Result<Self, MemoryError> {
        // Reserve 2 MiB more than needed and trim, so that guest 2 MiB pages line up with
        // host huge pages (KVM maps a guest huge page in one go only if the host's is too).
        let align = HUGE_PAGE;
        let reserve = size + align;
        // SAFETY: an anonymous private mapping with no address hint; the result is
        // checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        let start = raw as usize;
        let aligned = (start + align - 1) & !(align - 1);
        let head = aligned - start;
        let tail = reserve - head - size;
        // SAFETY: both ranges lie inside the reservation just made and outside
        // [aligned, aligned+size), which is what this GuestMemory keeps.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail);
            }
        }
        let ptr = aligned as *mut libc::c_void;
        // SAFETY: ptr/size describe the mapping kept above; madvise only changes paging
        // policy. Failure is harmless (no huge pages), so it is ignored.
        unsafe { libc::madvise(ptr, size, libc::MADV_HUGEPAGE) };
        Ok(GuestMemory {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null"),
            size,
        })
    }

    /// Guest RAM as a private (copy-on-write) mapping of `file`, 2 MiB aligned: pages are
    /// shared with every other mapping of the file through the page cache until written.
    pub fn from_file_private(file: &std::fs::File, size: usize) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let anon = Self::new(size)?;
        // SAFETY: MAP_FIXED over the reservation that `anon` owns (same address and
        // size), so nothing else is replaced; the result is checked.
        let p = unsafe {
            libc::mmap(
                anon.ptr.as_ptr().cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(anon)
    }

    /// Replace `[gpa, gpa+len)` (2 MiB aligned) with a private, copy-on-write mapping of
    /// `fd` at the same offset: its pages are shared with every other mapping of the file
    /// until the guest writes one (see [`GuestMemory::private_pages`]).
    pub fn map_file_range(
        &self,
        gpa: u64,
        len: u64,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        let off = self.check(gpa, len)?;
        // SAFETY: MAP_FIXED over a range inside this mapping (checked above), which this
        // GuestMemory owns, so nothing else is replaced; the result is checked.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(off).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                gpa as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size: len as usize,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// For each 4 KiB page of `[gpa, gpa+len)` of a private file mapping: whether it is
    /// mapped at all (the guest touched it), and whether it is a private page of this
    /// mapping, i.e. present and not a page of the file it maps, or swapped out (the guest
    /// wrote it, or it was never file-backed). Read from /proc/self/pagemap through
    /// `pagemap`.
    pub fn page_states(
        &self,
        pagemap: &std::fs::File,
        gpa: u64,
        len: u64,
        out: &mut Vec<PageState>,
    ) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let off = self.check(gpa, len)?;
        let first = (self.ptr.as_ptr() as u64 + off as u64) / 4096;
        let n = (len / 4096) as usize;
        let mut buf = vec![0u8; n * 8];
        let io = |source| MemoryError::Map {
            size: len as usize,
            source,
        };
        pagemap.read_exact_at(&mut buf, first * 8).map_err(io)?;
        out.clear();
        out.extend(buf.chunks_exact(8).map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap_or_default());
            // A swapped-out page of a private mapping is a page the guest wrote too.
            if (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) || e & SWAPPED != 0 {
                PageState::Private
            } else if e & PRESENT != 0 {
                PageState::Shared
            } else {
                PageState::Absent
            }
        }));
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// Host address of the mapping (for KVM_SET_USER_MEMORY_REGION and userfaultfd).
    pub fn host_addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, gpa: u64, len: u64) -> Result<usize, MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size as u64 => Ok(gpa as usize),
            _ => Err(MemoryError::OutOfRange {
                gpa,
                len,
                size: self.size as u64,
            }),
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.check(gpa, data.len() as u64)?;
        // SAFETY: [off, off+len) was checked to lie inside the mapping; `data` is a
        // host buffer that cannot overlap guest RAM handed out by this type.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    pub fn read_into(&self, gpa: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.check(gpa, out.len() as u64)?;
        // SAFETY: range checked above; `out` is a distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn read_vec(&self, gpa: u64, len: u64) -> Result<Vec<u8>, MemoryError> {
        self.check(gpa, len)?;
        let mut v = vec![0u8; len as usize];
        self.read_into(gpa, &mut v)?;
        Ok(v)
    }

    /// Ask for small pages in `[gpa, gpa+len)` (a sparse region not worth a 2 MiB zero
    /// fill). Advisory: out-of-range or failing requests are ignored.
    pub fn advise_small_pages(&self, gpa: u64, len: u64) {
        if let Ok(off) = self.check(gpa, len) {
            // SAFETY: the range lies inside this mapping; madvise only changes paging policy.
            unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(off).cast(),
                    len as usize,
                    libc::MADV_NOHUGEPAGE,
                )
            };
        }
    }

    /// Zero `[gpa, gpa+len)` in place (the pages stay resident: no new zero fill later).
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let off = self.check(gpa, len)?;
        // SAFETY: range checked above; the vCPU is stopped while the host rewrites RAM.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), 0, len as usize) };
        Ok(())
    }

    /// For each 4 KiB page of `[gpa, gpa+len)`: whether it is resident in the host
    /// (mincore(2)), into `out` (one flag per page, `len / 4096` of them; `scratch` is a
    /// reusable buffer). On failure every page is reported resident.
    pub fn resident_range(&self, gpa: u64, len: u64, scratch: &mut Vec<u8>, out: &mut [bool]) {
        let n = (len / 4096) as usize;
        let Ok(off) = self.check(gpa, len) else {
            out.iter_mut().for_each(|x| *x = true);
            return;
        };
        scratch.clear();
        scratch.resize(n, 0);
        // SAFETY: the range lies inside this mapping (checked, page aligned); `scratch` has
        // one byte per page as mincore requires.
        let r = unsafe {
            libc::mincore(
                self.ptr.as_ptr().add(off).cast(),
                len as usize,
                scratch.as_mut_ptr(),
            )
        };
        for (o, b) in out.iter_mut().zip(scratch.iter()) {
            *o = r != 0 || b & 1 == 1;
        }
    }

    /// One flag per 4 KiB page: whether it is resident in the host (mincore(2)). A page
    /// never touched since the mapping was made is still zero. On failure every page is
    /// reported resident (callers then treat all of RAM as touched).
    pub fn resident_pages(&self) -> Vec<bool> {
        let pages = self.size / 4096;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is exactly this mapping (page aligned); `vec` has one byte per
        // page as mincore requires.
        let r = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.size, vec.as_mut_ptr()) };
        if r != 0 {
            return vec![true; pages];
        }
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Append `len` bytes of guest RAM at `gpa` to `out` (a copy: no reference into guest
    /// RAM, which the guest may change, is handed out).
    pub fn append_to(&self, gpa: u64, len: u64, out: &mut Vec<u8>) -> Result<(), MemoryError> {
        self.check(gpa, len)?;
        let at = out.len();
        out.resize(at + len as usize, 0);
        self.read_into(gpa, &mut out[at..])
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; no views outlive self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_finds_exactly_the_pages_written_through_a_private_file_mapping() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let mut f = tempfile_in_memory();
        f.write_all(&vec![7u8; 2 << 20]).unwrap();
        let m = GuestMemory::new(4 << 20).unwrap();
        m.map_file_range(0, 2 << 20, f.as_fd()).unwrap();
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut states = Vec::new();
        m.page_states(&pm, 0, 2 << 20, &mut states).unwrap();
        assert!(states.iter().all(|&p| p == PageState::Absent));
        let mut b = [0u8; 1];
        m.read_into(5 * 4096, &mut b).unwrap(); // a read maps the file page: not private
        assert_eq!(b[0], 7);
        m.write(3 * 4096 + 10, b"x").unwrap(); // a write copies it: private
        m.page_states(&pm, 0, 2 << 20, &mut states).unwrap();
        let of = |s: PageState| -> Vec<usize> {
            (0..states.len()).filter(|&i| states[i] == s).collect()
        };
        assert_eq!(of(PageState::Private), vec![3]);
        // A read maps the pages around it too (the kernel's fault-around, 64 KiB here).
        let read = of(PageState::Shared);
        assert!(read.contains(&5) && read.len() <= 16, "{read:?}");
        assert_eq!(states[200], PageState::Absent);
    }

    fn tempfile_in_memory() -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is checked and owned here.
        let fd = unsafe { libc::memfd_create(c"vmm-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nothing else.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }

    #[test]
    fn bounds_are_checked() {
        let m = GuestMemory::new(2 << 20).unwrap();
        m.write(0x1000, b"hello").unwrap();
        assert_eq!(m.read_vec(0x1000, 5).unwrap(), b"hello");
        assert!(m.write((2 << 20) - 2, b"abc").is_err());
        assert!(m.read_vec(u64::MAX - 1, 4).is_err());
        assert!(m.append_to(0, (2 << 20) + 1, &mut Vec::new()).is_err());
    }
}

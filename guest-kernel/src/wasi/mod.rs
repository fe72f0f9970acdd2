//! WASI preview1 (`wasi_snapshot_preview1`).
//!
//! The logic lives in [`WasiCtx`] methods over a plain `&mut [u8]` linear-memory slice, so
//! it is testable on the host; [`link`] lists the functions once for the engines' glue. Every guest pointer and
//! length is untrusted: out-of-bounds accesses return `EFAULT`, arithmetic is checked,
//! nothing here panics on guest input.
//!
//! Output is buffered: stdout/stderr are handed to [`Host::write_output`] only when a
//! 1 MiB buffer is full (each hostcall is a VM exit); whatever remains is returned in
//! the run's output. stdin is read through one 1 MiB buffer, refilled only when empty
//! and not at EOF.
//!
//! The file tree always holds the character device `dev/urandom`: each read of it
//! takes fresh host entropy (like `random_get`) and returns CSPRNG bytes, with nothing
//! buffered in between, so a read after a snapshot restore never replays bytes.

pub mod fs;
pub mod link;
#[cfg(test)]
mod tests;

use crate::rng::Rng;
use crate::Host;
use alloc::vec::Vec;
use fs::{Device, FileTree, NodeKind, TreeError, ROOT};

/// A WASI errno (`u16` in the ABI; returned as i32 to wasm).
pub type Errno = u16;

/// `errno` values from the witx.
pub mod errno {
    use super::Errno;
    pub const SUCCESS: Errno = 0;
    pub const TOOBIG: Errno = 1;
    pub const ACCES: Errno = 2;
    pub const AGAIN: Errno = 6;
    pub const BADF: Errno = 8;
    pub const EXIST: Errno = 20;
    pub const FAULT: Errno = 21;
    pub const FBIG: Errno = 22;
    pub const ILSEQ: Errno = 25;
    pub const INVAL: Errno = 28;
    pub const IO: Errno = 29;
    pub const ISDIR: Errno = 31;
    pub const MFILE: Errno = 33;
    pub const NAMETOOLONG: Errno = 37;
    pub const NOENT: Errno = 44;
    pub const NOSPC: Errno = 51;
    pub const NOSYS: Errno = 52;
    pub const NOTDIR: Errno = 54;
    pub const NOTEMPTY: Errno = 55;
    pub const NOTSUP: Errno = 58;
    pub const NOTTY: Errno = 59;
    pub const OVERFLOW: Errno = 61;
    pub const PERM: Errno = 63;
    pub const ROFS: Errno = 69;
    pub const SPIPE: Errno = 70;
    pub const NOTCAPABLE: Errno = 76;
}

/// `filetype`.
pub mod filetype {
    pub const UNKNOWN: u8 = 0;
    pub const CHARACTER_DEVICE: u8 = 2;
    pub const DIRECTORY: u8 = 3;
    pub const REGULAR_FILE: u8 = 4;
}

/// The file type of stdin, stdout and stderr: a request body, a response and a log are
/// streams, not a terminal. wasi-libc's `isatty` is true exactly for a character device
/// without seek/tell rights, so reporting one made runtimes behave as if a user typed at
/// them (CPython reading a script from stdin printed its banner and prompts; libc
/// line-buffered stdout). Like a pipe under other WASI hosts: `unknown`.
pub const STDIO_FILETYPE: u8 = filetype::UNKNOWN;

/// `rights` bits.
pub mod rights {
    pub const FD_DATASYNC: u64 = 1 << 0;
    pub const FD_READ: u64 = 1 << 1;
    pub const FD_SEEK: u64 = 1 << 2;
    pub const FD_FDSTAT_SET_FLAGS: u64 = 1 << 3;
    pub const FD_SYNC: u64 = 1 << 4;
    pub const FD_TELL: u64 = 1 << 5;
    pub const FD_WRITE: u64 = 1 << 6;
    pub const FD_ADVISE: u64 = 1 << 7;
    pub const FD_ALLOCATE: u64 = 1 << 8;
    pub const PATH_CREATE_DIRECTORY: u64 = 1 << 9;
    pub const PATH_CREATE_FILE: u64 = 1 << 10;
    pub const PATH_OPEN: u64 = 1 << 13;
    pub const FD_READDIR: u64 = 1 << 14;
    pub const PATH_READLINK: u64 = 1 << 15;
    pub const PATH_FILESTAT_GET: u64 = 1 << 18;
    pub const FD_FILESTAT_GET: u64 = 1 << 21;
    pub const FD_FILESTAT_SET_SIZE: u64 = 1 << 22;
    pub const FD_FILESTAT_SET_TIMES: u64 = 1 << 23;
    pub const POLL_FD_READWRITE: u64 = 1 << 27;

    /// stdin: the request, a readable stream (no seek/tell).
    pub const STDIN: u64 = FD_READ | FD_FDSTAT_SET_FLAGS | FD_FILESTAT_GET | POLL_FD_READWRITE;
    /// stdout/stderr: the response and the log, writable streams (no seek/tell).
    pub const STDOUT: u64 = FD_WRITE | FD_FDSTAT_SET_FLAGS | FD_FILESTAT_GET | POLL_FD_READWRITE;
    /// A read-only regular file.
    pub const FILE: u64 = FD_READ
        | FD_SEEK
        | FD_TELL
        | FD_FDSTAT_SET_FLAGS
        | FD_ADVISE
        | FD_FILESTAT_GET
        | POLL_FD_READWRITE;
    /// A read-only directory.
    pub const DIR: u64 = PATH_OPEN
        | FD_READDIR
        | PATH_READLINK
        | PATH_FILESTAT_GET
        | FD_FILESTAT_GET
        | FD_FDSTAT_SET_FLAGS;
    /// A read-only character device (`/dev/urandom`); a subset of [`FILE`], so a
    /// directory passes it on like file rights. Seek/tell are accepted (and do nothing,
    /// as on Linux), which also keeps wasi-libc's `isatty` from calling it a tty.
    pub const DEVICE: u64 =
        FD_READ | FD_SEEK | FD_TELL | FD_FDSTAT_SET_FLAGS | FD_FILESTAT_GET | POLL_FD_READWRITE;
    /// Rights that would let an fd change a file: refused with EROFS.
    pub const MUTATING: u64 = FD_DATASYNC | FD_WRITE | FD_ALLOCATE | FD_FILESTAT_SET_SIZE;
}

pub mod clockid {
    pub const REALTIME: u32 = 0;
    pub const MONOTONIC: u32 = 1;
    pub const PROCESS_CPUTIME_ID: u32 = 2;
    pub const THREAD_CPUTIME_ID: u32 = 3;
}

pub mod oflags {
    pub const CREAT: u16 = 1 << 0;
    pub const DIRECTORY: u16 = 1 << 1;
    pub const EXCL: u16 = 1 << 2;
    pub const TRUNC: u16 = 1 << 3;
}

pub mod fdflags {
    pub const APPEND: u16 = 1 << 0;
}

pub mod whence {
    pub const SET: u8 = 0;
    pub const CUR: u8 = 1;
    pub const END: u8 = 2;
}

pub mod eventtype {
    pub const CLOCK: u8 = 0;
    pub const FD_READ: u8 = 1;
    pub const FD_WRITE: u8 = 2;
}

/// Output buffers are handed to the host when they reach this size. Like
/// [`STDIN_BUFFER`], just below the heap's [`LARGE_ALLOC`](crate::heap::LARGE_ALLOC): the
/// heap puts these buffers with its small blocks, never right after the wasm linear memory,
/// whose next growth they would otherwise turn into a copy.
pub const OUTPUT_FLUSH_THRESHOLD: usize = crate::heap::LARGE_ALLOC - 4096;
/// Capacity of an output buffer until more is written (see `push_output`).
pub const OUTPUT_FIRST_BUFFER: usize = 4096;
/// Total stdout+stderr a run may produce; beyond it `fd_write` fails with `EFBIG`.
pub const OUTPUT_CAP: u64 = vmm_abi::MAX_TRANSFER_LEN;
/// stdin is read from the host in chunks of this size (see [`OUTPUT_FLUSH_THRESHOLD`]).
pub const STDIN_BUFFER: usize = crate::heap::LARGE_ALLOC - 4096;
/// Most fds a module may hold open.
pub const MAX_FDS: usize = 1024;
/// The preopened directory.
pub const PREOPEN_FD: u32 = 3;
pub const PREOPEN_NAME: &[u8] = b"/";
/// The random device, relative to the preopen.
pub const URANDOM_PATH: &[u8] = b"dev/urandom";

// ---------------------------------------------------------------------------------
// Bounds-checked guest memory access.
// ---------------------------------------------------------------------------------

/// The byte range `[ptr, ptr+len)` of `mem`, or `EFAULT`.
#[inline]
pub fn mem_range(mem: &[u8], ptr: u32, len: u32) -> Result<core::ops::Range<usize>, Errno> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize).ok_or(errno::FAULT)?;
    if end > mem.len() {
        return Err(errno::FAULT);
    }
    Ok(start..end)
}

#[inline]
pub fn mem_slice(mem: &[u8], ptr: u32, len: u32) -> Result<&[u8], Errno> {
    let r = mem_range(mem, ptr, len)?;
    Ok(&mem[r])
}

#[inline]
pub fn mem_slice_mut(mem: &mut [u8], ptr: u32, len: u32) -> Result<&mut [u8], Errno> {
    let r = mem_range(mem, ptr, len)?;
    Ok(&mut mem[r])
}

#[inline]
fn read_bytes<const N: usize>(mem: &[u8], ptr: u32) -> Result<[u8; N], Errno> {
    let s = mem_slice(mem, ptr, N as u32)?;
    let mut b = [0u8; N];
    b.copy_from_slice(s);
    Ok(b)
}

#[inline]
pub fn read_u32(mem: &[u8], ptr: u32) -> Result<u32, Errno> {
    read_bytes::<4>(mem, ptr).map(u32::from_le_bytes)
}

#[inline]
pub fn read_u64(mem: &[u8], ptr: u32) -> Result<u64, Errno> {
    read_bytes::<8>(mem, ptr).map(u64::from_le_bytes)
}

#[inline]
pub fn write_bytes(mem: &mut [u8], ptr: u32, b: &[u8]) -> Result<(), Errno> {
    let len = u32::try_from(b.len()).map_err(|_| errno::FAULT)?;
    mem_slice_mut(mem, ptr, len)?.copy_from_slice(b);
    Ok(())
}

#[inline]
pub fn write_u32(mem: &mut [u8], ptr: u32, v: u32) -> Result<(), Errno> {
    write_bytes(mem, ptr, &v.to_le_bytes())
}

#[inline]
pub fn write_u64(mem: &mut [u8], ptr: u32, v: u64) -> Result<(), Errno> {
    write_bytes(mem, ptr, &v.to_le_bytes())
}

/// `ptr + i * size` as a guest address, or `EFAULT` on overflow.
#[inline]
fn elem(ptr: u32, i: u32, size: u32) -> Result<u32, Errno> {
    i.checked_mul(size)
        .and_then(|o| ptr.checked_add(o))
        .ok_or(errno::FAULT)
}

/// Read iovec `i` (`{buf: u32, len: u32}`) of the array at `iovs`.
#[inline]
fn iovec(mem: &[u8], iovs: u32, i: u32) -> Result<(u32, u32), Errno> {
    let at = elem(iovs, i, 8)?;
    let b = read_bytes::<8>(mem, at)?;
    Ok((
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

// ---------------------------------------------------------------------------------
// The context.
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdEntry {
    Stdin,
    Stdout,
    Stderr,
    Dir {
        node: usize,
        rights: u64,
        inheriting: u64,
    },
    File {
        node: usize,
        pos: u64,
        rights: u64,
    },
    /// An open character device.
    Device {
        node: usize,
        device: Device,
        rights: u64,
    },
}

#[derive(Debug, Default)]
struct Stdin {
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    eof: bool,
}

/// Why a function configuration could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigureError {
    File { path: Vec<u8>, error: TreeError },
}

impl core::fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigureError::File { path, error } => {
                let why = match error {
                    TreeError::BadPath => "is not a valid relative path",
                    TreeError::Conflict => "conflicts with another file or directory",
                };
                write!(
                    f,
                    "function config: file {:?} {why}",
                    alloc::string::String::from_utf8_lossy(path)
                )
            }
        }
    }
}

/// The WASI state of one run.
pub struct WasiCtx {
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    fs: FileTree,
    fds: Vec<Option<FdEntry>>,
    stdin: Stdin,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// stdout + stderr bytes accepted so far (flushed or not).
    output_total: u64,
    /// Whether a write to stdout / stderr was cut or refused at [`OUTPUT_CAP`].
    stdout_truncated: bool,
    stderr_truncated: bool,
    rng: Rng,
}

impl Default for WasiCtx {
    fn default() -> Self {
        Self::new()
    }
}

impl WasiCtx {
    /// An empty context: no args/env/files (only `dev/urandom`), stdio and the
    /// preopened `/`.
    pub fn new() -> Self {
        let mut fs = FileTree::new();
        // Cannot fail on an empty tree.
        let _ = fs.insert_node(URANDOM_PATH, NodeKind::Device(Device::Urandom), false);
        WasiCtx {
            args: Vec::new(),
            env: Vec::new(),
            fs,
            fds: alloc::vec![
                Some(FdEntry::Stdin),
                Some(FdEntry::Stdout),
                Some(FdEntry::Stderr),
                Some(FdEntry::Dir {
                    node: ROOT,
                    rights: rights::DIR,
                    inheriting: rights::DIR | rights::FILE,
                }),
            ],
            stdin: Stdin::default(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            output_total: 0,
            stdout_truncated: false,
            stderr_truncated: false,
            // Deterministic until the host supplies entropy (random_get asks first).
            rng: Rng::new(*b"vmm-guest-kernel wasi rng seed!!"),
        }
    }

    /// Install the function's args, env and files.
    pub fn configure(&mut self, cfg: &vmm_abi::FunctionConfig<'_>) -> Result<(), ConfigureError> {
        self.args = cfg.args.iter().map(|a| a.to_vec()).collect();
        self.env = cfg.env.iter().map(|e| e.to_vec()).collect();
        for f in &cfg.files {
            self.fs
                .insert(f.path, f.data)
                .map_err(|error| ConfigureError::File {
                    path: f.path.to_vec(),
                    error,
                })?;
        }
        Ok(())
    }

    pub fn set_args(&mut self, args: Vec<Vec<u8>>) {
        self.args = args;
    }

    pub fn set_env(&mut self, env: Vec<Vec<u8>>) {
        self.env = env;
    }

    pub fn add_file(&mut self, path: &[u8], data: &[u8]) -> Result<(), TreeError> {
        self.fs.insert(path, data)
    }

    /// Add a file that `fd_readdir` does not list (nor any directory this creates).
    pub fn add_hidden_file(&mut self, path: &[u8], data: &[u8]) -> Result<(), TreeError> {
        self.fs
            .insert_node(path, NodeKind::File(data.to_vec()), true)
    }

    /// Mix host entropy into the CSPRNG.
    pub fn reseed(&mut self, extra: [u8; 32]) {
        self.rng.reseed(extra);
    }

    /// Buffered stdout not yet handed to the host.
    pub fn take_stdout(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.stdout)
    }

    pub fn take_stderr(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.stderr)
    }

    /// Whether output to stdout / stderr was lost at [`OUTPUT_CAP`] (a write was cut short
    /// or refused with `EFBIG`).
    pub fn output_truncated(&self) -> (bool, bool) {
        (self.stdout_truncated, self.stderr_truncated)
    }

    /// Hand all buffered output to the host (used before reporting an error).
    pub fn flush(&mut self, host: &mut dyn Host) {
        if !self.stdout.is_empty() {
            host.write_output(1, &self.stdout);
            self.stdout.clear();
        }
        if !self.stderr.is_empty() {
            host.write_output(2, &self.stderr);
            self.stderr.clear();
        }
    }

    fn fd(&self, fd: u32) -> Result<FdEntry, Errno> {
        self.fds
            .get(fd as usize)
            .copied()
            .flatten()
            .ok_or(errno::BADF)
    }

    fn fd_mut(&mut self, fd: u32) -> Result<&mut FdEntry, Errno> {
        self.fds
            .get_mut(fd as usize)
            .and_then(Option::as_mut)
            .ok_or(errno::BADF)
    }

    fn alloc_fd(&mut self, entry: FdEntry) -> Result<u32, Errno> {
        let first = PREOPEN_FD as usize + 1;
        if let Some(i) = self
            .fds
            .iter()
            .skip(first)
            .position(Option::is_none)
            .map(|p| p + first)
        {
            self.fds[i] = Some(entry);
            return u32::try_from(i).map_err(|_| errno::MFILE);
        }
        if self.fds.len() >= MAX_FDS {
            return Err(errno::MFILE);
        }
        while self.fds.len() < first {
            self.fds.push(None);
        }
        self.fds.push(Some(entry));
        u32::try_from(self.fds.len() - 1).map_err(|_| errno::MFILE)
    }

    fn dir_node(&self, fd: u32) -> Result<usize, Errno> {
        match self.fd(fd)? {
            FdEntry::Dir { node, .. } => Ok(node),
            _ => Err(errno::NOTDIR),
        }
    }

    // --- args / environ -----------------------------------------------------------

    fn strings_sizes(list: &[Vec<u8>]) -> Result<(u32, u32), Errno> {
        let count = u32::try_from(list.len()).map_err(|_| errno::OVERFLOW)?;
        let mut size: u32 = 0;
        for s in list {
            let l = u32::try_from(s.len()).map_err(|_| errno::OVERFLOW)?;
            size = size
                .checked_add(l)
                .and_then(|x| x.checked_add(1))
                .ok_or(errno::OVERFLOW)?;
        }
        Ok((count, size))
    }

    fn strings_get(list: &[Vec<u8>], mem: &mut [u8], ptrs: u32, buf: u32) -> Result<(), Errno> {
        let (count, size) = Self::strings_sizes(list)?;
        // Check both regions up front so that a bad pointer writes nothing.
        mem_range(mem, ptrs, count.checked_mul(4).ok_or(errno::FAULT)?)?;
        mem_range(mem, buf, size)?;
        let mut at = buf;
        for (i, s) in list.iter().enumerate() {
            write_u32(mem, elem(ptrs, i as u32, 4)?, at)?;
            write_bytes(mem, at, s)?;
            let end = at.checked_add(s.len() as u32).ok_or(errno::FAULT)?;
            write_bytes(mem, end, &[0])?;
            at = end.checked_add(1).ok_or(errno::FAULT)?;
        }
        Ok(())
    }

    pub fn args_sizes_get(&self, mem: &mut [u8], argc: u32, buf_size: u32) -> Result<(), Errno> {
        let (n, size) = Self::strings_sizes(&self.args)?;
        mem_range(mem, argc, 4)?;
        mem_range(mem, buf_size, 4)?;
        write_u32(mem, argc, n)?;
        write_u32(mem, buf_size, size)
    }

    pub fn args_get(&self, mem: &mut [u8], argv: u32, buf: u32) -> Result<(), Errno> {
        Self::strings_get(&self.args, mem, argv, buf)
    }

    pub fn environ_sizes_get(&self, mem: &mut [u8], count: u32, size: u32) -> Result<(), Errno> {
        let (n, s) = Self::strings_sizes(&self.env)?;
        mem_range(mem, count, 4)?;
        mem_range(mem, size, 4)?;
        write_u32(mem, count, n)?;
        write_u32(mem, size, s)
    }

    pub fn environ_get(&self, mem: &mut [u8], environ: u32, buf: u32) -> Result<(), Errno> {
        Self::strings_get(&self.env, mem, environ, buf)
    }

    // --- clocks / random ------------------------------------------------------------

    pub fn clock_res_get(&self, mem: &mut [u8], id: u32, out: u32) -> Result<(), Errno> {
        let res = match id {
            clockid::REALTIME
            | clockid::MONOTONIC
            | clockid::PROCESS_CPUTIME_ID
            | clockid::THREAD_CPUTIME_ID => 1u64,
            _ => return Err(errno::INVAL),
        };
        write_u64(mem, out, res)
    }

    fn now(host: &mut dyn Host, id: u32) -> Result<u64, Errno> {
        match id {
            clockid::REALTIME => Ok(host.now_unix_ns()),
            clockid::MONOTONIC | clockid::PROCESS_CPUTIME_ID | clockid::THREAD_CPUTIME_ID => {
                Ok(host.monotonic_ns())
            }
            _ => Err(errno::INVAL),
        }
    }

    pub fn clock_time_get(
        &self,
        host: &mut dyn Host,
        mem: &mut [u8],
        id: u32,
        _precision: u64,
        out: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, out, 8)?;
        let t = Self::now(host, id)?;
        write_u64(mem, out, t)
    }

    pub fn random_get(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        buf: u32,
        len: u32,
    ) -> Result<(), Errno> {
        let dest = mem_slice_mut(mem, buf, len)?;
        self.refresh_entropy(host);
        self.rng.fill(dest);
        Ok(())
    }

    /// Mix in entropy the host has supplied since the last call (after a snapshot
    /// restore it always has), before any random bytes are handed out.
    fn refresh_entropy(&mut self, host: &mut dyn Host) {
        if let Some(e) = host.take_entropy() {
            self.rng.reseed(e);
        }
    }

    /// Fill the iovecs with bytes from `device` (all of them: a random device never
    /// runs short). The bytes are drawn now, after refreshing entropy, never buffered.
    fn device_read(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        device: Device,
        iovs: u32,
        iovs_len: u32,
    ) -> Result<usize, Errno> {
        let total = validate_iovs(mem, iovs, iovs_len)?;
        match device {
            Device::Urandom => {
                if total > 0 {
                    self.refresh_entropy(host);
                }
                for i in 0..iovs_len {
                    let (p, l) = iovec(mem, iovs, i)?;
                    self.rng.fill(mem_slice_mut(mem, p, l)?);
                }
            }
        }
        // validate_iovs caps the total at u32::MAX.
        usize::try_from(total).map_err(|_| errno::INVAL)
    }

    // --- fd_read / fd_write -----------------------------------------------------------

    /// Refill the stdin buffer if it is empty and stdin is not exhausted.
    fn stdin_fill(&mut self, host: &mut dyn Host) {
        let s = &mut self.stdin;
        if s.pos < s.len || s.eof {
            return;
        }
        if s.buf.len() < STDIN_BUFFER {
            s.buf.resize(STDIN_BUFFER, 0);
        }
        let (n, eof) = host.read_stdin(&mut s.buf);
        s.pos = 0;
        s.len = n.min(s.buf.len());
        // A host that returns nothing without EOF would make readers spin: treat as EOF.
        s.eof = eof || n == 0;
    }

    /// Bytes of stdin available without a hostcall (refilling if needed).
    fn stdin_available(&mut self, host: &mut dyn Host) -> usize {
        self.stdin_fill(host);
        self.stdin.len - self.stdin.pos
    }

    pub fn fd_read(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        nread: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, nread, 4)?;
        let entry = self.fd(fd)?;
        let n = match entry {
            FdEntry::Stdin => {
                validate_iovs(mem, iovs, iovs_len)?;
                self.stdin_fill(host);
                let s = &mut self.stdin;
                let mut total: usize = 0;
                for i in 0..iovs_len {
                    if s.pos >= s.len {
                        break;
                    }
                    let (p, l) = iovec(mem, iovs, i)?;
                    let dst = mem_slice_mut(mem, p, l)?;
                    let n = dst.len().min(s.len - s.pos);
                    dst[..n].copy_from_slice(&s.buf[s.pos..s.pos + n]);
                    s.pos += n;
                    total += n;
                }
                total
            }
            FdEntry::File { node, pos, .. } => {
                let n = self.file_read(mem, node, pos, iovs, iovs_len)?;
                if let FdEntry::File { pos, .. } = self.fd_mut(fd)? {
                    *pos = pos.saturating_add(n as u64);
                }
                n
            }
            FdEntry::Device { device, .. } => {
                self.device_read(host, mem, device, iovs, iovs_len)?
            }
            FdEntry::Dir { .. } => return Err(errno::ISDIR),
            FdEntry::Stdout | FdEntry::Stderr => return Err(errno::BADF),
        };
        write_u32(mem, nread, n as u32)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fd_pread(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        offset: u64,
        nread: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, nread, 4)?;
        let n = match self.fd(fd)? {
            FdEntry::File { node, .. } => self.file_read(mem, node, offset, iovs, iovs_len)?,
            // The offset means nothing to a random device (Linux ignores it too).
            FdEntry::Device { device, .. } => {
                self.device_read(host, mem, device, iovs, iovs_len)?
            }
            FdEntry::Dir { .. } => return Err(errno::ISDIR),
            FdEntry::Stdin | FdEntry::Stdout | FdEntry::Stderr => return Err(errno::SPIPE),
        };
        write_u32(mem, nread, n as u32)
    }

    fn file_read(
        &self,
        mem: &mut [u8],
        node: usize,
        pos: u64,
        iovs: u32,
        iovs_len: u32,
    ) -> Result<usize, Errno> {
        validate_iovs(mem, iovs, iovs_len)?;
        let Some(NodeKind::File(data)) = self.fs.node(node).map(|n| &n.kind) else {
            return Err(errno::BADF);
        };
        let mut at = usize::try_from(pos).unwrap_or(usize::MAX).min(data.len());
        let mut total: usize = 0;
        for i in 0..iovs_len {
            if at >= data.len() {
                break;
            }
            let (p, l) = iovec(mem, iovs, i)?;
            let dst = mem_slice_mut(mem, p, l)?;
            let n = dst.len().min(data.len() - at);
            dst[..n].copy_from_slice(&data[at..at + n]);
            at += n;
            total += n;
        }
        Ok(total)
    }

    pub fn fd_write(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        nwritten: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, nwritten, 4)?;
        let out_fd = match self.fd(fd)? {
            FdEntry::Stdout => 1u32,
            FdEntry::Stderr => 2u32,
            FdEntry::File { .. }
            | FdEntry::Dir { .. }
            | FdEntry::Device { .. }
            | FdEntry::Stdin => return Err(errno::BADF),
        };
        let total = validate_iovs(mem, iovs, iovs_len)?;
        let room = OUTPUT_CAP.saturating_sub(self.output_total);
        if total > room {
            if out_fd == 1 {
                self.stdout_truncated = true;
            } else {
                self.stderr_truncated = true;
            }
        }
        if total > 0 && room == 0 {
            return Err(errno::FBIG);
        }
        let mut budget = total.min(room);
        let accepted = budget;
        for i in 0..iovs_len {
            if budget == 0 {
                break;
            }
            let (p, l) = iovec(mem, iovs, i)?;
            let n = (l as u64).min(budget) as u32;
            let src = mem_slice(mem, p, n)?;
            self.push_output(host, out_fd, src);
            budget -= n as u64;
        }
        self.output_total += accepted;
        write_u32(mem, nwritten, accepted as u32)
    }

    /// Append to the fd's buffer, handing a full buffer to the host first.
    fn push_output(&mut self, host: &mut dyn Host, fd: u32, mut data: &[u8]) {
        let buf = if fd == 1 {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        while !data.is_empty() {
            if buf.len() >= OUTPUT_FLUSH_THRESHOLD {
                host.write_output(fd, buf);
                buf.clear();
            }
            let want = (buf.len() + data.len()).min(OUTPUT_FLUSH_THRESHOLD);
            if buf.capacity() < want {
                // Most responses are small: a first buffer of a page sits next to the
                // heap's other small blocks (a whole threshold's worth would put the start
                // of the response, the part that is written, a MiB away from them). A
                // larger one is a fresh block of the whole threshold, not a `realloc`,
                // which the heap would put after the wasm memory (see `heap`).
                let cap = if want <= OUTPUT_FIRST_BUFFER {
                    OUTPUT_FIRST_BUFFER
                } else {
                    OUTPUT_FLUSH_THRESHOLD
                };
                let mut bigger = Vec::with_capacity(cap);
                bigger.extend_from_slice(buf);
                *buf = bigger;
            }
            let n = (OUTPUT_FLUSH_THRESHOLD - buf.len()).min(data.len());
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    // --- fd management -------------------------------------------------------------

    /// `EBADF` unless `fd` is open.
    pub fn fd_check(&self, fd: u32) -> Result<(), Errno> {
        self.fd(fd).map(|_| ())
    }

    /// `fd_renumber(from, to)`: both must be open; `to` is replaced by `from`.
    pub fn fd_renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        let entry = self.fd(from)?;
        self.fd(to)?;
        if from != to {
            self.fds[to as usize] = Some(entry);
            self.fds[from as usize] = None;
        }
        Ok(())
    }

    /// `fd_pwrite`: nothing here is writable at an offset.
    pub fn fd_pwrite(&self, fd: u32) -> Result<(), Errno> {
        match self.fd(fd)? {
            FdEntry::Stdout | FdEntry::Stderr | FdEntry::Stdin => Err(errno::SPIPE),
            FdEntry::File { .. } | FdEntry::Device { .. } => Err(errno::BADF),
            FdEntry::Dir { .. } => Err(errno::ISDIR),
        }
    }

    /// `path_readlink`: there are no symlinks, so an existing path is `EINVAL`.
    pub fn path_readlink(
        &self,
        mem: &mut [u8],
        dirfd: u32,
        path: u32,
        path_len: u32,
    ) -> Result<(), Errno> {
        let base = self.dir_node(dirfd)?;
        let p = Self::path_bytes(mem, path, path_len)?;
        self.fs.lookup(base, p)?;
        Err(errno::INVAL)
    }

    pub fn fd_close(&mut self, fd: u32) -> Result<(), Errno> {
        self.fd(fd)?;
        self.fds[fd as usize] = None;
        Ok(())
    }

    pub fn fd_seek(
        &mut self,
        mem: &mut [u8],
        fd: u32,
        offset: i64,
        whence: u8,
        newoffset: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, newoffset, 8)?;
        let (node, pos) = match self.fd(fd)? {
            FdEntry::File { node, pos, .. } => (node, pos),
            // Seeking a random device succeeds and stays at 0, as on Linux.
            FdEntry::Device { .. } => {
                if whence > whence::END {
                    return Err(errno::INVAL);
                }
                return write_u64(mem, newoffset, 0);
            }
            FdEntry::Dir { .. } => return Err(errno::BADF),
            FdEntry::Stdin | FdEntry::Stdout | FdEntry::Stderr => return Err(errno::SPIPE),
        };
        let size = self.file_size(node);
        let base: u64 = match whence {
            whence::SET => 0,
            whence::CUR => pos,
            whence::END => size,
            _ => return Err(errno::INVAL),
        };
        let new = i64::try_from(base)
            .ok()
            .and_then(|b| b.checked_add(offset))
            .ok_or(errno::OVERFLOW)?;
        if new < 0 {
            return Err(errno::INVAL);
        }
        if let FdEntry::File { pos, .. } = self.fd_mut(fd)? {
            *pos = new as u64;
        }
        write_u64(mem, newoffset, new as u64)
    }

    pub fn fd_tell(&mut self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        match self.fd(fd)? {
            FdEntry::File { pos, .. } => write_u64(mem, out, pos),
            FdEntry::Device { .. } => write_u64(mem, out, 0),
            FdEntry::Dir { .. } => Err(errno::BADF),
            _ => Err(errno::SPIPE),
        }
    }

    fn file_size(&self, node: usize) -> u64 {
        match self.fs.node(node).map(|n| &n.kind) {
            Some(NodeKind::File(d)) => d.len() as u64,
            Some(NodeKind::Dir(c)) => c.len() as u64,
            Some(NodeKind::Device(_)) | None => 0,
        }
    }

    pub fn fd_fdstat_get(&self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let (ft, base, inh) = match self.fd(fd)? {
            FdEntry::Stdin => (STDIO_FILETYPE, rights::STDIN, 0),
            FdEntry::Stdout | FdEntry::Stderr => (STDIO_FILETYPE, rights::STDOUT, 0),
            FdEntry::Dir {
                rights, inheriting, ..
            } => (filetype::DIRECTORY, rights, inheriting),
            FdEntry::File { rights, .. } => (filetype::REGULAR_FILE, rights, 0),
            FdEntry::Device { rights, .. } => (filetype::CHARACTER_DEVICE, rights, 0),
        };
        let mut b = [0u8; 24];
        b[0] = ft;
        // fs_flags (u16 at 2) = 0
        b[8..16].copy_from_slice(&base.to_le_bytes());
        b[16..24].copy_from_slice(&inh.to_le_bytes());
        write_bytes(mem, out, &b)
    }

    pub fn fd_fdstat_set_flags(&mut self, fd: u32, _flags: u16) -> Result<(), Errno> {
        self.fd(fd).map(|_| ())
    }

    pub fn fd_prestat_get(&self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        if fd != PREOPEN_FD || self.fd(fd).is_err() {
            return Err(errno::BADF);
        }
        let mut b = [0u8; 8];
        // tag 0 = dir; pr_name_len at 4.
        b[4..8].copy_from_slice(&(PREOPEN_NAME.len() as u32).to_le_bytes());
        write_bytes(mem, out, &b)
    }

    pub fn fd_prestat_dir_name(
        &self,
        mem: &mut [u8],
        fd: u32,
        path: u32,
        path_len: u32,
    ) -> Result<(), Errno> {
        if fd != PREOPEN_FD || self.fd(fd).is_err() {
            return Err(errno::BADF);
        }
        if (path_len as usize) < PREOPEN_NAME.len() {
            return Err(errno::NAMETOOLONG);
        }
        write_bytes(mem, path, PREOPEN_NAME)
    }

    fn filestat_bytes(&self, ft: u8, ino: u64, size: u64) -> [u8; 64] {
        let mut b = [0u8; 64];
        // dev u64 @0 = 0
        b[8..16].copy_from_slice(&ino.to_le_bytes());
        b[16] = ft;
        b[24..32].copy_from_slice(&1u64.to_le_bytes()); // nlink
        b[32..40].copy_from_slice(&size.to_le_bytes());
        // atim/mtim/ctim = 0
        b
    }

    fn node_filestat(&self, node: usize) -> [u8; 64] {
        self.filestat_bytes(self.node_type(node), node as u64 + 1, self.file_size(node))
    }

    fn node_type(&self, node: usize) -> u8 {
        match self.fs.node(node).map(|n| &n.kind) {
            Some(NodeKind::Dir(_)) => filetype::DIRECTORY,
            Some(NodeKind::File(_)) => filetype::REGULAR_FILE,
            Some(NodeKind::Device(_)) => filetype::CHARACTER_DEVICE,
            None => filetype::UNKNOWN,
        }
    }

    pub fn fd_filestat_get(&self, mem: &mut [u8], fd: u32, out: u32) -> Result<(), Errno> {
        let b = match self.fd(fd)? {
            FdEntry::Stdin | FdEntry::Stdout | FdEntry::Stderr => {
                self.filestat_bytes(STDIO_FILETYPE, 0, 0)
            }
            FdEntry::Dir { node, .. }
            | FdEntry::File { node, .. }
            | FdEntry::Device { node, .. } => self.node_filestat(node),
        };
        write_bytes(mem, out, &b)
    }

    /// `fd_readdir`: entries are `.`, `..`, then the children in name order (hidden ones
    /// left out); the cookie of an entry is its index and `d_next` the index of the
    /// one after it (so cookies skip the hidden entries' indices). Entries are
    /// written until the buffer is full, the last one possibly truncated (the caller
    /// sees `bufused == buf_len` and retries with a bigger buffer or the next cookie).
    pub fn fd_readdir(
        &self,
        mem: &mut [u8],
        fd: u32,
        buf: u32,
        buf_len: u32,
        cookie: u64,
        bufused: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, bufused, 4)?;
        let node = match self.fd(fd)? {
            FdEntry::Dir { node, .. } => node,
            _ => return Err(errno::NOTDIR),
        };
        let out = mem_range(mem, buf, buf_len)?;
        let dir = self.fs.node(node).ok_or(errno::BADF)?;
        let NodeKind::Dir(children) = &dir.kind else {
            return Err(errno::NOTDIR);
        };
        let count = children.len() as u64 + 2;
        let mut used: usize = 0;
        let out_len = out.len();
        let mut idx = cookie;
        while idx < count && used < out_len {
            let (name, ino_node): (&[u8], usize) = match idx {
                0 => (b".", node),
                1 => (b"..", dir.parent),
                i => {
                    let (n, c) = &children[(i - 2) as usize];
                    if self.fs.node(*c).is_some_and(|n| n.hidden) {
                        idx += 1;
                        continue;
                    }
                    (n.as_slice(), *c)
                }
            };
            let ft = self.node_type(ino_node);
            let mut head = [0u8; 24];
            head[0..8].copy_from_slice(&(idx + 1).to_le_bytes());
            head[8..16].copy_from_slice(&(ino_node as u64 + 1).to_le_bytes());
            head[16..20].copy_from_slice(&(name.len() as u32).to_le_bytes());
            head[20] = ft;
            for part in [&head[..], name] {
                let room = out_len - used;
                let n = part.len().min(room);
                let at = out.start + used;
                mem[at..at + n].copy_from_slice(&part[..n]);
                used += n;
            }
            idx += 1;
        }
        write_u32(mem, bufused, used as u32)
    }

    // --- paths -----------------------------------------------------------------------

    fn path_bytes(mem: &[u8], path: u32, len: u32) -> Result<&[u8], Errno> {
        if len > 4096 {
            return Err(errno::NAMETOOLONG);
        }
        mem_slice(mem, path, len)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn path_open(
        &mut self,
        mem: &mut [u8],
        dirfd: u32,
        _dirflags: u32,
        path: u32,
        path_len: u32,
        oflags: u16,
        rights_base: u64,
        rights_inheriting: u64,
        fdflags: u16,
        fd_out: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, fd_out, 4)?;
        let base = self.dir_node(dirfd)?;
        let p = Self::path_bytes(mem, path, path_len)?;
        let found = self.fs.lookup(base, p);
        let creat = oflags & oflags::CREAT != 0;
        if creat
            || oflags & oflags::TRUNC != 0
            || rights_base & rights::MUTATING != 0
            || fdflags & fdflags::APPEND != 0
        {
            // Nothing here can be created or changed. A lookup failure other than a
            // missing file under O_CREAT is reported as such.
            return match found {
                Err(errno::NOENT) if creat => Err(errno::ROFS),
                Err(e) => Err(e),
                Ok(_) if creat && oflags & oflags::EXCL != 0 => Err(errno::EXIST),
                Ok(_) => Err(errno::ROFS),
            };
        }
        let node = found?;
        let kind = self.fs.node(node).map(|n| &n.kind).ok_or(errno::BADF)?;
        if oflags & oflags::DIRECTORY != 0 && !matches!(kind, NodeKind::Dir(_)) {
            return Err(errno::NOTDIR);
        }
        let entry = match kind {
            NodeKind::Dir(_) => FdEntry::Dir {
                node,
                rights: rights_base & rights::DIR,
                inheriting: rights_inheriting & (rights::DIR | rights::FILE),
            },
            NodeKind::File(_) => FdEntry::File {
                node,
                pos: 0,
                rights: rights_base & rights::FILE,
            },
            NodeKind::Device(device) => FdEntry::Device {
                node,
                device: *device,
                rights: rights_base & rights::DEVICE,
            },
        };
        let fd = self.alloc_fd(entry)?;
        write_u32(mem, fd_out, fd)
    }

    pub fn path_filestat_get(
        &self,
        mem: &mut [u8],
        dirfd: u32,
        _flags: u32,
        path: u32,
        path_len: u32,
        out: u32,
    ) -> Result<(), Errno> {
        mem_range(mem, out, 64)?;
        let base = self.dir_node(dirfd)?;
        let p = Self::path_bytes(mem, path, path_len)?;
        let node = self.fs.lookup(base, p)?;
        let b = self.node_filestat(node);
        write_bytes(mem, out, &b)
    }

    /// For path_* mutations: EBADF/ENOTDIR for a bad dir fd, else EROFS.
    pub fn path_mutation(&self, dirfd: u32) -> Result<(), Errno> {
        self.dir_node(dirfd)?;
        Err(errno::ROFS)
    }

    // --- poll_oneoff -----------------------------------------------------------------

    /// Clock subscriptions wait (by polling the clock: there are no interrupts) until
    /// the earliest deadline, unless an fd subscription is ready; stdin/stdout/stderr
    /// and files are always ready.
    pub fn poll_oneoff(
        &mut self,
        host: &mut dyn Host,
        mem: &mut [u8],
        subs: u32,
        events: u32,
        nsubs: u32,
        nevents: u32,
    ) -> Result<(), Errno> {
        if nsubs == 0 {
            return Err(errno::INVAL);
        }
        mem_range(mem, subs, nsubs.checked_mul(48).ok_or(errno::FAULT)?)?;
        mem_range(mem, events, nsubs.checked_mul(32).ok_or(errno::FAULT)?)?;
        mem_range(mem, nevents, 4)?;

        // Each clock's reading at the start, so both passes see the same deadlines.
        let mono_start = host.monotonic_ns();
        let mut clock_start: [Option<u64>; 4] = [None; 4];
        // Pass 1: is anything ready now, and how long until the first clock fires?
        let mut ready_now = false;
        let mut wait: Option<u64> = None;
        for i in 0..nsubs {
            let s = elem(subs, i, 48)?;
            match mem[s as usize + 8] {
                eventtype::CLOCK => match clock_remaining(host, mem, s, &mut clock_start) {
                    Ok(r) => wait = Some(wait.map_or(r, |w| w.min(r))),
                    Err(_) => ready_now = true, // reported as an error event
                },
                eventtype::FD_READ | eventtype::FD_WRITE => ready_now = true,
                _ => return Err(errno::INVAL),
            }
        }
        // No interrupts: poll the monotonic clock until the first deadline.
        if let (false, Some(w)) = (ready_now, wait) {
            while host.monotonic_ns().saturating_sub(mono_start) < w {
                core::hint::spin_loop();
            }
        }
        let elapsed = host.monotonic_ns().saturating_sub(mono_start);

        // Pass 2: write the events that are ready.
        let mut n: u32 = 0;
        for i in 0..nsubs {
            let s = elem(subs, i, 48)?;
            let base = s as usize;
            let mut ev = [0u8; 32];
            ev[0..8].copy_from_slice(&mem[base..base + 8]);
            let tag = mem[base + 8];
            ev[10] = tag;
            let ready = if tag == eventtype::CLOCK {
                match clock_remaining(host, mem, s, &mut clock_start) {
                    Ok(r) => r <= elapsed,
                    Err(e) => {
                        ev[8..10].copy_from_slice(&e.to_le_bytes());
                        true
                    }
                }
            } else {
                let fd = read_u32(mem, s + 16)?;
                let (err, nbytes): (Errno, u64) = match (tag, self.fd(fd)) {
                    (_, Err(e)) => (e, 0),
                    (eventtype::FD_READ, Ok(FdEntry::Stdin)) => {
                        (0, self.stdin_available(host) as u64)
                    }
                    (eventtype::FD_READ, Ok(FdEntry::File { node, pos, .. })) => {
                        (0, self.file_size(node).saturating_sub(pos))
                    }
                    // A random device can always be read; report a nominal amount.
                    (eventtype::FD_READ, Ok(FdEntry::Device { .. })) => (0, 1 << 20),
                    (eventtype::FD_WRITE, Ok(FdEntry::Stdout | FdEntry::Stderr)) => (0, 0),
                    _ => (errno::BADF, 0),
                };
                ev[8..10].copy_from_slice(&err.to_le_bytes());
                ev[16..24].copy_from_slice(&nbytes.to_le_bytes());
                true
            };
            if ready {
                let at = elem(events, n, 32)?;
                write_bytes(mem, at, &ev)?;
                n += 1;
            }
        }
        write_u32(mem, nevents, n)
    }
}

/// Nanoseconds from the start of a `poll_oneoff` until the clock subscription at `s`
/// fires. `clock_start` caches each clock's reading at the start.
fn clock_remaining(
    host: &mut dyn Host,
    mem: &[u8],
    s: u32,
    clock_start: &mut [Option<u64>; 4],
) -> Result<u64, Errno> {
    let id = read_u32(mem, s.checked_add(16).ok_or(errno::FAULT)?)?;
    let timeout = read_u64(mem, s.checked_add(24).ok_or(errno::FAULT)?)?;
    let flags = u16::from_le_bytes(read_bytes::<2>(
        mem,
        s.checked_add(40).ok_or(errno::FAULT)?,
    )?);
    let slot = clock_start.get_mut(id as usize).ok_or(errno::INVAL)?;
    let start = match *slot {
        Some(t) => t,
        None => {
            let t = WasiCtx::now(host, id)?;
            *slot = Some(t);
            t
        }
    };
    if flags & 1 == 0 {
        Ok(timeout)
    } else {
        Ok(timeout.saturating_sub(start))
    }
}

/// Check every iovec of the array and return the total length (u64, no overflow).
fn validate_iovs(mem: &[u8], iovs: u32, iovs_len: u32) -> Result<u64, Errno> {
    mem_range(mem, iovs, iovs_len.checked_mul(8).ok_or(errno::FAULT)?)?;
    let mut total: u64 = 0;
    for i in 0..iovs_len {
        let (p, l) = iovec(mem, iovs, i)?;
        mem_range(mem, p, l)?;
        total += l as u64;
    }
    if total > u32::MAX as u64 {
        // nread/nwritten is a u32.
        return Err(errno::INVAL);
    }
    Ok(total)
}

use super::*;
use crate::Phase;
use alloc::vec;

#[derive(Default)]
struct H {
    stdin: Vec<u8>,
    pos: usize,
    reads: usize,
    out: Vec<(u32, Vec<u8>)>,
    mono: u64,
    /// Handed out (front first) by take_entropy, one per call.
    entropy: Vec<[u8; 32]>,
    entropy_calls: usize,
}

impl Host for H {
    fn now_unix_ns(&mut self) -> u64 {
        self.mono += 10;
        1_000_000_000 + self.mono
    }
    fn monotonic_ns(&mut self) -> u64 {
        self.mono += 10;
        self.mono
    }
    fn take_entropy(&mut self) -> Option<[u8; 32]> {
        self.entropy_calls += 1;
        if self.entropy.is_empty() {
            None
        } else {
            Some(self.entropy.remove(0))
        }
    }
    fn get_function(&mut self) -> Vec<u8> {
        Vec::new()
    }
    fn read_stdin(&mut self, buf: &mut [u8]) -> (usize, bool) {
        self.reads += 1;
        let n = (self.stdin.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.stdin[self.pos..self.pos + n]);
        self.pos += n;
        (n, self.pos == self.stdin.len())
    }
    fn write_output(&mut self, fd: u32, data: &[u8]) {
        self.out.push((fd, data.to_vec()));
    }
    fn mark(&mut self, _: Phase) {}
    fn raw_hostcall(&mut self, _: u64, _: [u64; 4]) -> Option<u64> {
        None
    }
}

fn ctx() -> WasiCtx {
    let mut w = WasiCtx::new();
    w.add_file(b"a.txt", b"hello world").unwrap();
    w.add_file(b"lib/x.js", b"export default 1").unwrap();
    w.add_file(b"lib/y.js", b"y").unwrap();
    w.add_file(b"lib/deep/z", b"zz").unwrap();
    w
}

fn u32_at(m: &[u8], p: usize) -> u32 {
    u32::from_le_bytes(m[p..p + 4].try_into().unwrap())
}
fn u64_at(m: &[u8], p: usize) -> u64 {
    u64::from_le_bytes(m[p..p + 8].try_into().unwrap())
}

fn open(w: &mut WasiCtx, m: &mut [u8], dir: u32, path: &[u8], oflags: u16) -> Result<u32, Errno> {
    m[5000..5000 + path.len()].copy_from_slice(path);
    w.path_open(
        m,
        dir,
        0,
        5000,
        path.len() as u32,
        oflags,
        rights::FD_READ | rights::FD_SEEK | rights::FD_READDIR,
        0,
        0,
        4000,
    )?;
    Ok(u32_at(m, 4000))
}

#[test]
fn bounds_are_checked() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 1024];
    assert_eq!(w.args_sizes_get(&mut m, 1022, 0), Err(errno::FAULT));
    assert_eq!(w.args_sizes_get(&mut m, u32::MAX, 0), Err(errno::FAULT));
    assert_eq!(
        w.clock_time_get(&mut h, &mut m, 0, 0, 1020),
        Err(errno::FAULT)
    );
    assert_eq!(w.random_get(&mut h, &mut m, 1000, 100), Err(errno::FAULT));
    assert_eq!(w.random_get(&mut h, &mut m, u32::MAX, 2), Err(errno::FAULT));
    // iovec pointing outside memory
    m[0..4].copy_from_slice(&1000u32.to_le_bytes());
    m[4..8].copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(w.fd_write(&mut h, &mut m, 1, 0, 1, 16), Err(errno::FAULT));
    assert_eq!(w.fd_read(&mut h, &mut m, 0, 0, 1, 16), Err(errno::FAULT));
    // huge iovec count
    assert_eq!(
        w.fd_write(&mut h, &mut m, 1, 0, u32::MAX, 16),
        Err(errno::FAULT)
    );
    assert_eq!(
        w.poll_oneoff(&mut h, &mut m, 0, 100, u32::MAX, 8),
        Err(errno::FAULT)
    );
    assert_eq!(w.fd_readdir(&mut m, 3, 1000, 100, 0, 8), Err(errno::FAULT));
    assert!(h.out.is_empty());
    assert_eq!(w.take_stdout(), b"");
}

#[test]
fn args_and_env_layout() {
    let mut w = WasiCtx::new();
    w.set_args(vec![b"prog".to_vec(), b"x".to_vec()]);
    w.set_env(vec![b"A=1".to_vec()]);
    let mut m = vec![0u8; 256];
    w.args_sizes_get(&mut m, 0, 4).unwrap();
    assert_eq!((u32_at(&m, 0), u32_at(&m, 4)), (2, 7));
    w.args_get(&mut m, 16, 100).unwrap();
    assert_eq!((u32_at(&m, 16), u32_at(&m, 20)), (100, 105));
    assert_eq!(&m[100..107], b"prog\0x\0");
    w.environ_sizes_get(&mut m, 0, 4).unwrap();
    assert_eq!((u32_at(&m, 0), u32_at(&m, 4)), (1, 4));
    // The string buffer does not fit: nothing is written.
    let mut small = vec![0u8; 104];
    assert_eq!(w.args_get(&mut small, 16, 100), Err(errno::FAULT));
    assert_eq!(u32_at(&small, 16), 0);
}

/// wasi-libc's `isatty(fd)`: `fd_fdstat_get` succeeds, the file type is a character
/// device and the fd has neither the seek nor the tell right.
fn libc_isatty(w: &WasiCtx, fd: u32) -> bool {
    let mut m = vec![0u8; 24];
    w.fd_fdstat_get(&mut m, fd, 0).is_ok()
        && m[0] == filetype::CHARACTER_DEVICE
        && u64_at(&m, 8) & (rights::FD_SEEK | rights::FD_TELL) == 0
}

#[test]
fn stdio_is_a_stream_not_a_tty() {
    let mut w = ctx();
    let mut m = vec![0u8; 256];
    for fd in 0..3 {
        // A request body and a response: isatty() must be false, or runtimes act as if a
        // user typed at them (CPython printed its banner and prompts for `python -`).
        assert!(!libc_isatty(&w, fd), "fd {fd} looks like a terminal");
        w.fd_fdstat_get(&mut m, fd, 0).unwrap();
        assert_eq!(m[0], filetype::UNKNOWN, "fd {fd}");
        let base = u64_at(&m, 8);
        // Still streams: no seek or tell; stdin reads, stdout/stderr write.
        assert_eq!(base & (rights::FD_SEEK | rights::FD_TELL), 0, "fd {fd}");
        let (may, may_not) = if fd == 0 {
            (rights::FD_READ, rights::FD_WRITE)
        } else {
            (rights::FD_WRITE, rights::FD_READ)
        };
        assert_eq!(base & may, may, "fd {fd}");
        assert_eq!(base & may_not, 0, "fd {fd}");
        // fstat agrees with fdstat (a character device there would be S_IFCHR).
        m.fill(0xff);
        w.fd_filestat_get(&mut m, fd, 0).unwrap();
        assert_eq!(m[16], filetype::UNKNOWN, "fd {fd}");
    }
    w.fd_fdstat_get(&mut m, 3, 0).unwrap();
    assert_eq!(m[0], filetype::DIRECTORY);
    assert_eq!(w.fd_fdstat_get(&mut m, 9, 0), Err(errno::BADF));
    assert_eq!(w.fd_fdstat_get(&mut m, 0, 240), Err(errno::FAULT));
    // Nor is /dev/urandom, a character device with seek/tell.
    let mut big = vec![0u8; 8192];
    let fd = open(&mut w, &mut big, 3, b"dev/urandom", 0).unwrap();
    assert!(!libc_isatty(&w, fd));
}

#[test]
fn prestat() {
    let w = ctx();
    let mut m = vec![0u8; 64];
    w.fd_prestat_get(&mut m, 3, 0).unwrap();
    assert_eq!(m[0], 0);
    assert_eq!(u32_at(&m, 4), 1);
    w.fd_prestat_dir_name(&mut m, 3, 16, 1).unwrap();
    assert_eq!(m[16], b'/');
    assert_eq!(w.fd_prestat_get(&mut m, 4, 0), Err(errno::BADF));
    assert_eq!(w.fd_prestat_get(&mut m, 1, 0), Err(errno::BADF));
    assert_eq!(
        w.fd_prestat_dir_name(&mut m, 3, 16, 0),
        Err(errno::NAMETOOLONG)
    );
}

#[test]
fn path_open_and_read_files() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 8192];
    let fd = open(&mut w, &mut m, 3, b"lib/x.js", 0).unwrap();
    assert_eq!(fd, 4);
    w.fd_fdstat_get(&mut m, fd, 0).unwrap();
    assert_eq!(m[0], filetype::REGULAR_FILE);
    // read 6 bytes then the rest
    m[100..104].copy_from_slice(&200u32.to_le_bytes());
    m[104..108].copy_from_slice(&6u32.to_le_bytes());
    w.fd_read(&mut h, &mut m, fd, 100, 1, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 6);
    assert_eq!(&m[200..206], b"export");
    w.fd_tell(&mut m, fd, 130).unwrap();
    assert_eq!(u64_at(&m, 130), 6);
    m[104..108].copy_from_slice(&100u32.to_le_bytes());
    w.fd_read(&mut h, &mut m, fd, 100, 1, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 10);
    assert_eq!(&m[200..210], b" default 1");
    w.fd_read(&mut h, &mut m, fd, 100, 1, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 0, "EOF");
    // seek
    w.fd_seek(&mut m, fd, -1, whence::END, 130).unwrap();
    assert_eq!(u64_at(&m, 130), 15);
    assert_eq!(
        w.fd_seek(&mut m, fd, -100, whence::CUR, 130),
        Err(errno::INVAL)
    );
    assert_eq!(w.fd_seek(&mut m, fd, 0, 9, 130), Err(errno::INVAL));
    assert_eq!(w.fd_seek(&mut m, 1, 0, whence::SET, 130), Err(errno::SPIPE));
    // pread does not move the position
    w.fd_pread(&mut h, &mut m, fd, 100, 1, 7, 120).unwrap();
    assert_eq!(&m[200..209], b"default 1");
    w.fd_tell(&mut m, fd, 130).unwrap();
    assert_eq!(u64_at(&m, 130), 15);
    // filestat
    w.fd_filestat_get(&mut m, fd, 300).unwrap();
    assert_eq!(m[316], filetype::REGULAR_FILE);
    assert_eq!(u64_at(&m, 332), 16);
    // writes are refused on files
    assert_eq!(
        w.fd_write(&mut h, &mut m, fd, 100, 1, 120),
        Err(errno::BADF)
    );
    w.fd_close(fd).unwrap();
    assert_eq!(w.fd_close(fd), Err(errno::BADF));
    // the slot is reused
    assert_eq!(open(&mut w, &mut m, 3, b"a.txt", 0), Ok(4));
}

#[test]
fn path_open_errors() {
    let mut w = ctx();
    let mut m = vec![0u8; 8192];
    assert_eq!(open(&mut w, &mut m, 3, b"nope", 0), Err(errno::NOENT));
    assert_eq!(open(&mut w, &mut m, 3, b"", 0), Err(errno::NOENT));
    assert_eq!(open(&mut w, &mut m, 3, b"a.txt/x", 0), Err(errno::NOTDIR));
    assert_eq!(open(&mut w, &mut m, 3, b"a.txt/", 0), Err(errno::NOTDIR));
    assert_eq!(
        open(&mut w, &mut m, 3, b"a.txt", oflags::DIRECTORY),
        Err(errno::NOTDIR)
    );
    assert_eq!(open(&mut w, &mut m, 3, b"..", 0), Err(errno::NOTCAPABLE));
    assert_eq!(
        open(&mut w, &mut m, 3, b"lib/../../a.txt", 0),
        Err(errno::NOTCAPABLE)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, b"/a.txt", 0),
        Err(errno::NOTCAPABLE)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, b"new", oflags::CREAT),
        Err(errno::ROFS)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, b"a.txt", oflags::TRUNC),
        Err(errno::ROFS)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, b"a.txt", oflags::CREAT | oflags::EXCL),
        Err(errno::EXIST)
    );
    assert_eq!(open(&mut w, &mut m, 1, b"a.txt", 0), Err(errno::NOTDIR));
    assert_eq!(open(&mut w, &mut m, 77, b"a.txt", 0), Err(errno::BADF));
    m[5000..5005].copy_from_slice(b"a.txt");
    assert_eq!(
        w.path_open(&mut m, 3, 0, 5000, 5, 0, rights::FD_WRITE, 0, 0, 4000),
        Err(errno::ROFS)
    );
    // path out of bounds
    assert_eq!(
        w.path_open(&mut m, 3, 0, 8190, 5, 0, 0, 0, 0, 4000),
        Err(errno::FAULT)
    );
    // `..` that stays inside is fine; relative to an opened dir too.
    assert!(open(&mut w, &mut m, 3, b"lib/../a.txt", 0).is_ok());
    let lib = open(&mut w, &mut m, 3, b"lib", oflags::DIRECTORY).unwrap();
    assert!(open(&mut w, &mut m, lib, b"deep/z", 0).is_ok());
    assert!(open(&mut w, &mut m, lib, b"./x.js", 0).is_ok());
    assert_eq!(
        open(&mut w, &mut m, lib, b"../a.txt", 0),
        Err(errno::NOTCAPABLE)
    );
    assert_eq!(w.path_mutation(3), Err(errno::ROFS));
    assert_eq!(w.path_mutation(0), Err(errno::NOTDIR));
}

#[test]
fn path_filestat() {
    let w = ctx();
    let mut m = vec![0u8; 512];
    m[400..403].copy_from_slice(b"lib");
    w.path_filestat_get(&mut m, 3, 0, 400, 3, 0).unwrap();
    assert_eq!(m[16], filetype::DIRECTORY);
    m[400..405].copy_from_slice(b"a.txt");
    w.path_filestat_get(&mut m, 3, 0, 400, 5, 0).unwrap();
    assert_eq!(m[16], filetype::REGULAR_FILE);
    assert_eq!(u64_at(&m, 32), 11);
    assert_eq!(
        w.path_filestat_get(&mut m, 3, 0, 400, 4, 0),
        Err(errno::NOENT)
    );
}

/// Parse dirents from a readdir buffer: (d_next, name, type).
fn dirents(buf: &[u8]) -> Vec<(u64, Vec<u8>, u8)> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 24 <= buf.len() {
        let next = u64_at(buf, p);
        let len = u32_at(buf, p + 16) as usize;
        let ty = buf[p + 20];
        if p + 24 + len > buf.len() {
            break;
        }
        out.push((next, buf[p + 24..p + 24 + len].to_vec(), ty));
        p += 24 + len;
    }
    out
}

#[test]
fn readdir_cookies_and_truncation() {
    let mut w = ctx();
    let mut m = vec![0u8; 8192];
    let lib = open(&mut w, &mut m, 3, b"lib", oflags::DIRECTORY).unwrap();
    w.fd_readdir(&mut m, lib, 1000, 1000, 0, 0).unwrap();
    let used = u32_at(&m, 0) as usize;
    let ents = dirents(&m[1000..1000 + used]);
    let names: Vec<&[u8]> = ents.iter().map(|e| e.1.as_slice()).collect();
    assert_eq!(names, vec![&b"."[..], b"..", b"deep", b"x.js", b"y.js"]);
    assert_eq!(ents[2].2, filetype::DIRECTORY);
    assert_eq!(ents[3].2, filetype::REGULAR_FILE);
    assert_eq!(
        ents.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(used, 5 * 24 + 1 + 2 + 4 + 4 + 4);
    // Resume from cookie 3.
    w.fd_readdir(&mut m, lib, 1000, 1000, 3, 0).unwrap();
    let used = u32_at(&m, 0) as usize;
    let ents = dirents(&m[1000..1000 + used]);
    assert_eq!(ents.len(), 2);
    assert_eq!(ents[0].1, b"x.js");
    // A buffer that cuts an entry: filled completely (bufused == len).
    w.fd_readdir(&mut m, lib, 1000, 30, 0, 0).unwrap();
    assert_eq!(u32_at(&m, 0), 30);
    // Past the end: nothing.
    w.fd_readdir(&mut m, lib, 1000, 1000, 99, 0).unwrap();
    assert_eq!(u32_at(&m, 0), 0);
    // Not a directory.
    let f = open(&mut w, &mut m, 3, b"a.txt", 0).unwrap();
    assert_eq!(w.fd_readdir(&mut m, f, 1000, 100, 0, 0), Err(errno::NOTDIR));
    assert_eq!(w.fd_readdir(&mut m, 1, 1000, 100, 0, 0), Err(errno::NOTDIR));
}

#[test]
fn stdin_is_buffered_one_hostcall() {
    let mut w = ctx();
    let mut h = H {
        stdin: b"abcdefghij".to_vec(),
        ..Default::default()
    };
    let mut m = vec![0u8; 512];
    // two iovecs of 4 bytes
    m[0..4].copy_from_slice(&100u32.to_le_bytes());
    m[4..8].copy_from_slice(&4u32.to_le_bytes());
    m[8..12].copy_from_slice(&200u32.to_le_bytes());
    m[12..16].copy_from_slice(&4u32.to_le_bytes());
    w.fd_read(&mut h, &mut m, 0, 0, 2, 20).unwrap();
    assert_eq!(u32_at(&m, 20), 8);
    assert_eq!(&m[100..104], b"abcd");
    assert_eq!(&m[200..204], b"efgh");
    w.fd_read(&mut h, &mut m, 0, 0, 2, 20).unwrap();
    assert_eq!(u32_at(&m, 20), 2);
    w.fd_read(&mut h, &mut m, 0, 0, 2, 20).unwrap();
    assert_eq!(u32_at(&m, 20), 0);
    assert_eq!(h.reads, 1, "EOF reported with the data: no second hostcall");
    assert_eq!(w.fd_read(&mut h, &mut m, 1, 0, 2, 20), Err(errno::BADF));
}

#[test]
fn output_buffer_starts_at_a_page_and_keeps_its_contents_when_it_grows() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 64 + 3 * OUTPUT_FIRST_BUFFER];
    for (i, b) in m[64..].iter_mut().enumerate() {
        *b = (i % 251) as u8 + 1;
    }
    let mut write = |w: &mut WasiCtx, off: usize, len: usize| {
        m[0..4].copy_from_slice(&(64 + off as u32).to_le_bytes());
        m[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        w.fd_write(&mut h, &mut m, 1, 0, 1, 8).unwrap();
        assert_eq!(u32_at(&m, 8), len as u32);
        m[64 + off..64 + off + len].to_vec()
    };
    // A small response: one page of buffer, not the whole flush threshold.
    let mut expect = write(&mut w, 0, 100);
    expect.extend(write(&mut w, 100, 100));
    let out = w.take_stdout();
    assert_eq!(out.capacity(), OUTPUT_FIRST_BUFFER);
    assert_eq!(out, expect);
    // Past a page: the whole threshold, holding what was written before.
    let mut expect = write(&mut w, 0, 3000);
    expect.extend(write(&mut w, 3000, 3 * OUTPUT_FIRST_BUFFER - 3000));
    let out = w.take_stdout();
    assert_eq!(out.capacity(), OUTPUT_FLUSH_THRESHOLD);
    assert_eq!(out, expect);
}

#[test]
fn stdout_buffered_and_flushed_at_threshold() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 2 * OUTPUT_FLUSH_THRESHOLD];
    m[0..4].copy_from_slice(&64u32.to_le_bytes());
    m[4..8].copy_from_slice(&((OUTPUT_FLUSH_THRESHOLD - 100) as u32).to_le_bytes());
    w.fd_write(&mut h, &mut m, 1, 0, 1, 8).unwrap();
    assert!(h.out.is_empty());
    w.fd_write(&mut h, &mut m, 1, 0, 1, 8).unwrap();
    assert_eq!(h.out.len(), 1);
    assert_eq!(h.out[0].0, 1);
    assert_eq!(h.out[0].1.len(), OUTPUT_FLUSH_THRESHOLD);
    assert_eq!(w.take_stdout().len(), OUTPUT_FLUSH_THRESHOLD - 200);
    // stderr is separate
    m[4..8].copy_from_slice(&5u32.to_le_bytes());
    w.fd_write(&mut h, &mut m, 2, 0, 1, 8).unwrap();
    assert_eq!(w.take_stderr().len(), 5);
    assert_eq!(w.fd_write(&mut h, &mut m, 0, 0, 1, 8), Err(errno::BADF));
    assert_eq!(w.fd_write(&mut h, &mut m, 3, 0, 1, 8), Err(errno::BADF));
}

#[test]
fn output_cap_gives_efbig() {
    let mut w = ctx();
    let mut h = H::default();
    w.output_total = OUTPUT_CAP - 13;
    let mut m = vec![0u8; 256];
    m[0..4].copy_from_slice(&64u32.to_le_bytes());
    m[4..8].copy_from_slice(&10u32.to_le_bytes());
    w.fd_write(&mut h, &mut m, 1, 0, 1, 8).unwrap();
    assert_eq!(u32_at(&m, 8), 10, "a write that fits");
    assert_eq!(w.output_truncated(), (false, false), "nothing lost yet");
    w.fd_write(&mut h, &mut m, 1, 0, 1, 8).unwrap();
    assert_eq!(u32_at(&m, 8), 3, "partial write up to the cap");
    assert_eq!(w.output_truncated(), (true, false), "the cut is recorded");
    assert_eq!(w.fd_write(&mut h, &mut m, 1, 0, 1, 8), Err(errno::FBIG));
    // zero-length writes still succeed
    m[4..8].copy_from_slice(&0u32.to_le_bytes());
    w.fd_write(&mut h, &mut m, 2, 0, 1, 8).unwrap();
    assert_eq!(
        w.output_truncated(),
        (true, false),
        "an empty write loses nothing"
    );
    m[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(w.fd_write(&mut h, &mut m, 2, 0, 1, 8), Err(errno::FBIG));
    assert_eq!(
        w.output_truncated(),
        (true, true),
        "a refused stderr write too"
    );
}

#[test]
fn clocks() {
    let w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 64];
    w.clock_time_get(&mut h, &mut m, clockid::REALTIME, 0, 0)
        .unwrap();
    assert!(u64_at(&m, 0) > 1_000_000_000);
    w.clock_time_get(&mut h, &mut m, clockid::MONOTONIC, 0, 0)
        .unwrap();
    assert!(u64_at(&m, 0) < 1_000_000);
    assert_eq!(w.clock_time_get(&mut h, &mut m, 9, 0, 0), Err(errno::INVAL));
    w.clock_res_get(&mut m, clockid::MONOTONIC, 8).unwrap();
    assert_eq!(u64_at(&m, 8), 1);
    assert_eq!(w.clock_res_get(&mut m, 4, 8), Err(errno::INVAL));
}

fn clock_sub(m: &mut [u8], at: usize, userdata: u64, id: u32, timeout: u64, flags: u16) {
    m[at..at + 48].fill(0);
    m[at..at + 8].copy_from_slice(&userdata.to_le_bytes());
    m[at + 8] = eventtype::CLOCK;
    m[at + 16..at + 20].copy_from_slice(&id.to_le_bytes());
    m[at + 24..at + 32].copy_from_slice(&timeout.to_le_bytes());
    m[at + 40..at + 42].copy_from_slice(&flags.to_le_bytes());
}

#[test]
fn poll_oneoff_sleeps_and_reports() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 1024];
    // A relative 5 µs sleep on the monotonic clock.
    clock_sub(&mut m, 0, 42, clockid::MONOTONIC, 5_000, 0);
    let before = h.mono;
    w.poll_oneoff(&mut h, &mut m, 0, 512, 1, 1000).unwrap();
    assert!(h.mono - before >= 5_000, "waited by polling the clock");
    assert_eq!(u32_at(&m, 1000), 1);
    assert_eq!(u64_at(&m, 512), 42);
    assert_eq!(m[512 + 10], eventtype::CLOCK);
    assert_eq!(u16::from_le_bytes([m[520], m[521]]), 0);

    // Two clocks: only the earlier fires.
    clock_sub(&mut m, 0, 1, clockid::MONOTONIC, 1_000_000_000, 0);
    clock_sub(&mut m, 48, 2, clockid::MONOTONIC, 100, 0);
    w.poll_oneoff(&mut h, &mut m, 0, 512, 2, 1000).unwrap();
    assert_eq!(u32_at(&m, 1000), 1);
    assert_eq!(u64_at(&m, 512), 2);

    // stdin read + a long clock: stdin is ready now, no waiting.
    h.stdin = b"xyz".to_vec();
    clock_sub(&mut m, 0, 1, clockid::MONOTONIC, u64::MAX, 0);
    m[48..96].fill(0);
    m[48..56].copy_from_slice(&9u64.to_le_bytes());
    m[56] = eventtype::FD_READ;
    m[64..68].copy_from_slice(&0u32.to_le_bytes());
    let before = h.mono;
    w.poll_oneoff(&mut h, &mut m, 0, 512, 2, 1000).unwrap();
    assert!(h.mono - before < 1_000);
    assert_eq!(u32_at(&m, 1000), 1);
    assert_eq!(u64_at(&m, 512), 9);
    assert_eq!(m[512 + 10], eventtype::FD_READ);
    assert_eq!(u64_at(&m, 512 + 16), 3, "nbytes available");

    // An absolute deadline already in the past fires at once.
    clock_sub(&mut m, 0, 5, clockid::REALTIME, 1, 1);
    w.poll_oneoff(&mut h, &mut m, 0, 512, 1, 1000).unwrap();
    assert_eq!(u32_at(&m, 1000), 1);
    // Bad clock id: an error event, not a hang.
    clock_sub(&mut m, 0, 6, 77, 10, 0);
    w.poll_oneoff(&mut h, &mut m, 0, 512, 1, 1000).unwrap();
    assert_eq!(u32_at(&m, 1000), 1);
    assert_eq!(u16::from_le_bytes([m[520], m[521]]), errno::INVAL);
    assert_eq!(
        w.poll_oneoff(&mut h, &mut m, 0, 512, 0, 1000),
        Err(errno::INVAL)
    );
}

#[test]
fn renumber_and_misc() {
    let mut w = ctx();
    let mut m = vec![0u8; 8192];
    let a = open(&mut w, &mut m, 3, b"a.txt", 0).unwrap();
    let b = open(&mut w, &mut m, 3, b"lib/y.js", 0).unwrap();
    w.fd_renumber(b, a).unwrap();
    assert_eq!(w.fd_check(b), Err(errno::BADF));
    w.fd_filestat_get(&mut m, a, 0).unwrap();
    assert_eq!(u64_at(&m, 32), 1, "a now refers to y.js");
    assert_eq!(w.fd_renumber(99, a), Err(errno::BADF));
    assert_eq!(w.fd_fdstat_set_flags(1, 4), Ok(()));
    assert_eq!(w.fd_fdstat_set_flags(99, 0), Err(errno::BADF));
    m[5000..5005].copy_from_slice(b"a.txt");
    assert_eq!(w.path_readlink(&mut m, 3, 5000, 5), Err(errno::INVAL));
}

#[test]
fn too_many_fds() {
    let mut w = ctx();
    let mut m = vec![0u8; 8192];
    let mut last = Ok(0);
    for _ in 0..MAX_FDS + 10 {
        last = open(&mut w, &mut m, 3, b"a.txt", 0);
        if last.is_err() {
            break;
        }
    }
    assert_eq!(last, Err(errno::MFILE));
}

#[test]
fn tree_conflicts() {
    let mut t = fs::FileTree::new();
    t.insert(b"a/b", b"").unwrap();
    assert_eq!(t.insert(b"a/b", b""), Err(TreeError::Conflict));
    assert_eq!(t.insert(b"a/b/c", b""), Err(TreeError::Conflict));
    assert_eq!(t.insert(b"a", b""), Err(TreeError::Conflict));
    assert_eq!(t.insert(b"../x", b""), Err(TreeError::BadPath));
}

#[test]
fn hostile_arguments_never_panic() {
    // xorshift: every function with arbitrary pointers/lengths over a small memory.
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut w = ctx();
    let mut h = H {
        stdin: vec![7u8; 100],
        ..Default::default()
    };
    // A device fd among the fds the rounds pick from.
    let mut big = vec![0u8; 8192];
    assert_eq!(open(&mut w, &mut big, 3, URANDOM_PATH, 0), Ok(4));
    let mut m = vec![0u8; 4096];
    for round in 0..20_000u32 {
        let mut a = [0u32; 10];
        for x in a.iter_mut() {
            let r = next();
            // mix in-range, edge and wild values
            *x = match r % 4 {
                0 => (r >> 8) as u32 % 4200,
                1 => u32::MAX - ((r >> 8) as u32 % 64),
                2 => (r >> 8) as u32 % 8,
                _ => (r >> 8) as u32,
            };
        }
        // Sprinkle plausible structures in memory.
        let p = (next() % 4000) as usize;
        m[p..p + 8].copy_from_slice(&next().to_le_bytes());
        let _ = match round % 20 {
            0 => w.args_get(&mut m, a[0], a[1]),
            1 => w.environ_sizes_get(&mut m, a[0], a[1]),
            2 => w.clock_time_get(&mut h, &mut m, a[0] % 5, 0, a[1]),
            3 => w.random_get(&mut h, &mut m, a[0], a[1] % 8192),
            4 => w.fd_read(&mut h, &mut m, a[0] % 8, a[1], a[2], a[3]),
            5 => w.fd_pread(&mut h, &mut m, a[0] % 8, a[1], a[2], a[3] as u64, a[4]),
            6 => w.fd_write(&mut h, &mut m, a[0] % 8, a[1], a[2], a[3]),
            7 => w.fd_seek(&mut m, a[0] % 8, a[1] as i32 as i64, (a[2] % 4) as u8, a[3]),
            8 => w.fd_tell(&mut m, a[0] % 8, a[1]),
            9 => w.fd_fdstat_get(&mut m, a[0] % 8, a[1]),
            10 => w.fd_prestat_dir_name(&mut m, a[0] % 8, a[1], a[2]),
            11 => w.fd_filestat_get(&mut m, a[0] % 8, a[1]),
            12 => w.fd_readdir(&mut m, a[0] % 8, a[1], a[2], a[3] as u64, a[4]),
            13 => w.path_open(
                &mut m,
                a[0] % 8,
                0,
                a[1],
                a[2],
                a[3] as u16,
                a[4] as u64,
                a[5] as u64,
                a[6] as u16,
                a[7],
            ),
            14 => w.path_filestat_get(&mut m, a[0] % 8, 0, a[1], a[2], a[3]),
            15 => w.poll_oneoff(&mut h, &mut m, a[0], a[1], a[2] % 8, a[3]),
            16 => w.fd_close(a[0] % 8),
            17 => w.fd_renumber(a[0] % 8, a[1] % 8),
            18 => w.path_readlink(&mut m, a[0] % 8, a[1], a[2]),
            _ => w.fd_prestat_get(&mut m, a[0] % 8, a[1]),
        };
    }
}

/// Read `len` bytes from `fd` through one iovec at 100 -> buffer at 1000.
fn read_fd(w: &mut WasiCtx, h: &mut H, m: &mut [u8], fd: u32, len: u32) -> Vec<u8> {
    m[100..104].copy_from_slice(&1000u32.to_le_bytes());
    m[104..108].copy_from_slice(&len.to_le_bytes());
    w.fd_read(h, m, fd, 100, 1, 120).unwrap();
    assert_eq!(u32_at(m, 120), len);
    m[1000..1000 + len as usize].to_vec()
}

fn root_names(w: &WasiCtx, m: &mut [u8], dir: u32) -> Vec<(Vec<u8>, u8)> {
    w.fd_readdir(m, dir, 1000, 2000, 0, 0).unwrap();
    let used = u32_at(m, 0) as usize;
    dirents(&m[1000..1000 + used])
        .into_iter()
        .map(|(_, n, t)| (n, t))
        .collect()
}

#[test]
fn urandom_device() {
    let mut w = ctx();
    let mut h = H {
        entropy: vec![[1; 32]],
        ..Default::default()
    };
    let mut m = vec![0u8; 8192];
    // Listed as a directory `dev` holding a character device.
    let names = root_names(&w, &mut m, 3);
    assert!(
        names.contains(&(b"dev".to_vec(), filetype::DIRECTORY)),
        "{names:?}"
    );
    let dev = open(&mut w, &mut m, 3, b"dev", oflags::DIRECTORY).unwrap();
    let names = root_names(&w, &mut m, dev);
    assert_eq!(names[2], (b"urandom".to_vec(), filetype::CHARACTER_DEVICE));
    w.path_filestat_get(&mut m, 3, 0, 0, 0, 0).unwrap_err();
    m[500..511].copy_from_slice(b"dev/urandom");
    w.path_filestat_get(&mut m, 3, 0, 500, 11, 600).unwrap();
    assert_eq!(m[616], filetype::CHARACTER_DEVICE);

    let fd = open(&mut w, &mut m, 3, URANDOM_PATH, 0).unwrap();
    w.fd_fdstat_get(&mut m, fd, 0).unwrap();
    assert_eq!(m[0], filetype::CHARACTER_DEVICE);
    let r = u64_at(&m, 8);
    assert_ne!(r & rights::FD_READ, 0);
    assert_ne!(r & rights::FD_SEEK, 0, "not a tty for wasi-libc's isatty");
    assert_eq!(r & rights::FD_WRITE, 0);
    w.fd_filestat_get(&mut m, fd, 300).unwrap();
    assert_eq!(m[316], filetype::CHARACTER_DEVICE);

    // Every read asks the host for entropy first and returns fresh bytes.
    let a = read_fd(&mut w, &mut h, &mut m, fd, 8);
    assert_eq!(h.entropy_calls, 1);
    let b = read_fd(&mut w, &mut h, &mut m, fd, 8);
    assert_eq!(h.entropy_calls, 2);
    assert_ne!(a, b);
    // Two iovecs are both filled, with different bytes.
    m[100..104].copy_from_slice(&1000u32.to_le_bytes());
    m[104..108].copy_from_slice(&16u32.to_le_bytes());
    m[108..112].copy_from_slice(&2000u32.to_le_bytes());
    m[112..116].copy_from_slice(&16u32.to_le_bytes());
    w.fd_read(&mut h, &mut m, fd, 100, 2, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 32);
    assert_ne!(m[1000..1016], m[2000..2016]);
    // pread works too (the offset is ignored); zero-length reads take no entropy.
    let calls = h.entropy_calls;
    m[104..108].copy_from_slice(&0u32.to_le_bytes());
    w.fd_read(&mut h, &mut m, fd, 100, 1, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 0);
    assert_eq!(h.entropy_calls, calls);
    m[104..108].copy_from_slice(&8u32.to_le_bytes());
    w.fd_pread(&mut h, &mut m, fd, 100, 1, 12345, 120).unwrap();
    assert_eq!(u32_at(&m, 120), 8);
    assert_eq!(h.entropy_calls, calls + 1);
    // Seek/tell succeed and stay at 0; writes and write opens are refused.
    w.fd_seek(&mut m, fd, 10, whence::SET, 130).unwrap();
    assert_eq!(u64_at(&m, 130), 0);
    assert_eq!(w.fd_seek(&mut m, fd, 0, 9, 130), Err(errno::INVAL));
    m[130..138].fill(0xff);
    w.fd_tell(&mut m, fd, 130).unwrap();
    assert_eq!(u64_at(&m, 130), 0);
    m[100..104].copy_from_slice(&1000u32.to_le_bytes());
    assert_eq!(
        w.fd_write(&mut h, &mut m, fd, 100, 1, 120),
        Err(errno::BADF)
    );
    assert_eq!(
        w.fd_readdir(&mut m, fd, 1000, 100, 0, 0),
        Err(errno::NOTDIR)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, URANDOM_PATH, oflags::DIRECTORY),
        Err(errno::NOTDIR)
    );
    assert_eq!(
        open(&mut w, &mut m, 3, URANDOM_PATH, oflags::TRUNC),
        Err(errno::ROFS)
    );
    // Relative to the `dev` directory fd as well.
    assert!(open(&mut w, &mut m, dev, b"urandom", 0).is_ok());
    w.fd_close(fd).unwrap();
}

#[test]
fn urandom_reads_follow_host_entropy() {
    // Same state, then the host supplies new entropy before the second read of one of
    // them (as after a snapshot restore): the first reads agree, the second ones differ.
    let mut m = vec![0u8; 8192];
    let mut w1 = ctx();
    let mut w2 = ctx();
    let mut h1 = H {
        entropy: vec![[5; 32]],
        ..Default::default()
    };
    let mut h2 = H {
        entropy: vec![[5; 32]],
        ..Default::default()
    };
    let fd1 = open(&mut w1, &mut m, 3, URANDOM_PATH, 0).unwrap();
    let fd2 = open(&mut w2, &mut m, 3, URANDOM_PATH, 0).unwrap();
    // Odd lengths: nothing left over in a buffer may leak into the next read.
    let a1 = read_fd(&mut w1, &mut h1, &mut m, fd1, 5);
    let a2 = read_fd(&mut w2, &mut h2, &mut m, fd2, 5);
    assert_eq!(a1, a2);
    h2.entropy.push([6; 32]);
    let b1 = read_fd(&mut w1, &mut h1, &mut m, fd1, 5);
    let b2 = read_fd(&mut w2, &mut h2, &mut m, fd2, 5);
    assert_ne!(b1, b2);
    // random_get follows the same state.
    let mut w3 = ctx();
    let mut h3 = H {
        entropy: vec![[5; 32]],
        ..Default::default()
    };
    w3.random_get(&mut h3, &mut m, 1000, 5).unwrap();
    assert_eq!(m[1000..1005], a1[..]);
}

#[test]
fn hidden_files_and_device_conflicts() {
    let mut w = ctx();
    let mut h = H::default();
    let mut m = vec![0u8; 8192];
    w.add_hidden_file(b".vmm/prelude.js", b"prelude").unwrap();
    let names: Vec<Vec<u8>> = root_names(&w, &mut m, 3)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        vec![
            b".".to_vec(),
            b"..".to_vec(),
            b"a.txt".to_vec(),
            b"dev".to_vec(),
            b"lib".to_vec()
        ]
    );
    let fd = open(&mut w, &mut m, 3, b".vmm/prelude.js", 0).unwrap();
    assert_eq!(read_fd(&mut w, &mut h, &mut m, fd, 7), b"prelude");
    // Cookies still resume correctly around the hidden entry (index 2).
    w.fd_readdir(&mut m, 3, 1000, 2000, 2, 0).unwrap();
    let used = u32_at(&m, 0) as usize;
    let ents = dirents(&m[1000..1000 + used]);
    assert_eq!(ents[0].1, b"a.txt");
    assert_eq!(ents[0].0, 4);
    // Config files cannot replace the device, but may share its directory.
    assert_eq!(w.add_file(URANDOM_PATH, b"x"), Err(TreeError::Conflict));
    assert_eq!(w.add_file(b"dev", b"x"), Err(TreeError::Conflict));
    w.add_file(b"dev/null.txt", b"").unwrap();
    assert_eq!(
        w.add_file(b".vmm/prelude.js", b"x"),
        Err(TreeError::Conflict)
    );
}

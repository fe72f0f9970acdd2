//! Seccomp filters per thread kind (issue 21): every long-lived thread of `vmm serve`,
//! its worker processes and `vmm restore` installs the filter of its kind before any
//! guest code runs on it, and from then on may make only the system calls its list
//! allows (ioctls only with the request numbers listed). Anything else ends the process:
//! the filter traps, a SIGSYS handler writes one line naming the thread kind and the
//! system call to stderr, and the process exits with status 159 (128 + SIGSYS). A
//! daemon's worker process that ends so is logged and replaced like any other crash.
//!
//! The lists live in one file per kind ([`vcpu`], [`keeper`], [`api`], [`watchdog`],
//! [`reaper`], [`faults`], [`cancel`]), each system call with a comment saying who needs
//! it; [`common`] is what every thread of this program makes whatever it does (the
//! allocator, locks, its own start and exit, logging). Filters are stacked by the kernel
//! (a thread started by a filtered thread keeps its parent's filter and adds its own), so
//! a kind that starts threads or processes allows what they need: [`api`]'s list is the
//! union of every list, because the HTTP runtime's blocking threads build templates,
//! run cold starts and start replacement worker processes.
//!
//! [`Mode::Log`] (`--seccomp log`) allows everything but makes the kernel log each call a
//! list lacks (`dmesg`: `audit: type=1326 ... comm="vmm-worker-0" ... syscall=N`): how
//! the lists were built and how to extend them.

mod api;
mod cancel;
mod common;
mod faults;
mod keeper;
mod reaper;
mod vcpu;
mod watchdog;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// What the filters do with a system call their list lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stop the process with a line naming the call (the default).
    #[default]
    On,
    /// Allow it and have the kernel log it (for building the lists).
    Log,
    /// No filters (debugging only: a guest that escapes its engine then reaches every
    /// system call the process could make).
    Off,
}

impl Mode {
    /// `on`, `log` or `off`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "on" => Some(Mode::On),
            "log" => Some(Mode::Log),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }

    fn code(self) -> u8 {
        match self {
            Mode::On => 0,
            Mode::Log => 1,
            Mode::Off => 2,
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Set the process's mode (before its threads install their filters).
pub fn set_mode(m: Mode) {
    MODE.store(m.code(), Ordering::SeqCst);
}

/// The process's mode.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        0 => Mode::On,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

/// The kinds of threads, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Runs guests: a daemon's or worker process's vCPU threads, `vmm restore`'s main
    /// thread once its instance is set up. Restores instances on demand and resets them.
    Vcpu,
    /// The pool keeper: restores instances and keeps the pools filled.
    Keeper,
    /// The daemon's main thread and its HTTP runtime (async and blocking threads).
    Api,
    /// The watchdog timer that kicks vCPUs out of guests past their deadline.
    Watchdog,
    /// Destroys instances.
    Reaper,
    /// A userfaultfd server bringing an instance's pages on demand.
    Faults,
    /// A worker process's thread that reads cancellations from the daemon.
    Cancel,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Vcpu,
        Kind::Keeper,
        Kind::Api,
        Kind::Watchdog,
        Kind::Reaper,
        Kind::Faults,
        Kind::Cancel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vcpu",
            Kind::Keeper => "keeper",
            Kind::Api => "api",
            Kind::Watchdog => "watchdog",
            Kind::Reaper => "reaper",
            Kind::Faults => "faults",
            Kind::Cancel => "cancel",
        }
    }

    /// This kind's own entries (without [`common`]).
    fn own(self) -> &'static [Allow] {
        match self {
            Kind::Vcpu => vcpu::LIST,
            Kind::Keeper => keeper::LIST,
            Kind::Api => api::LIST,
            Kind::Watchdog => watchdog::LIST,
            Kind::Reaper => reaper::LIST,
            Kind::Faults => faults::LIST,
            Kind::Cancel => cancel::LIST,
        }
    }

    /// Every entry this kind's filter allows.
    pub fn entries(self) -> Vec<Allow> {
        let mut v: Vec<Allow> = common::LIST.to_vec();
        if self == Kind::Api {
            // The union: see the module's documentation.
            for k in Kind::ALL {
                v.extend_from_slice(k.own());
            }
        } else if self == Kind::Keeper {
            v.extend_from_slice(vcpu::LIST);
            v.extend_from_slice(keeper::LIST);
        } else {
            v.extend_from_slice(self.own());
        }
        v
    }

    /// The distinct system calls this kind's filter allows (some only with given
    /// arguments).
    pub fn syscalls(self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.entries().iter().map(|a| a.name()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// One entry of a list.
#[derive(Clone, Copy, Debug)]
pub enum Allow {
    /// Any call of this system call.
    Any(i64, &'static str),
    /// `ioctl` with one of these request numbers.
    Ioctl(&'static [(u64, &'static str)]),
    /// This system call only when argument `arg` equals one of `values`.
    ArgIn(i64, &'static str, u8, &'static [u64]),
}

impl Allow {
    pub fn name(&self) -> &'static str {
        match self {
            Allow::Any(_, n) | Allow::ArgIn(_, n, _, _) => n,
            Allow::Ioctl(_) => "ioctl",
        }
    }
    fn nr(&self) -> i64 {
        match self {
            Allow::Any(nr, _) | Allow::ArgIn(nr, _, _, _) => *nr,
            Allow::Ioctl(_) => libc::SYS_ioctl,
        }
    }
}

/// `sys!(SYS_read)`: any call of `read`.
macro_rules! sys {
    ($nr:ident) => {
        $crate::seccomp::Allow::Any(libc::$nr, stringify!($nr))
    };
}
pub(crate) use sys;

/// `ioctl!(NAME)`: the request number `NAME` of [`ioctls`], named.
macro_rules! ioctl {
    ($name:ident) => {
        ($crate::seccomp::ioctls::$name, stringify!($name))
    };
}
pub(crate) use ioctl;

pub(crate) mod ioctls;

impl Allow {
    /// The system call's name as `man 2` spells it.
    pub fn syscall(&self) -> &'static str {
        let n = self.name();
        n.strip_prefix("SYS_").unwrap_or(n)
    }
}

/// The filter of `kind` under `mode` (not [`Mode::Off`]), compiled.
pub fn compile(kind: Kind, mode: Mode) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let err = |e: seccompiler::BackendError| format!("the {} filter: {e}", kind.name());
    // An unconditional entry wins over conditional ones for the same call.
    let mut any = std::collections::BTreeSet::new();
    for a in kind.entries() {
        match a {
            Allow::Any(nr, _) => {
                any.insert(nr);
            }
            Allow::Ioctl(reqs) => {
                let v = rules.entry(a.nr()).or_default();
                for (req, _) in reqs {
                    v.push(
                        SeccompRule::new(vec![SeccompCondition::new(
                            1,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            *req,
                        )
                        .map_err(err)?])
                        .map_err(err)?,
                    );
                }
            }
            Allow::ArgIn(nr, _, arg, values) => {
                let v = rules.entry(nr).or_default();
                for val in values {
                    v.push(
                        SeccompRule::new(vec![SeccompCondition::new(
                            arg,
                            SeccompCmpArgLen::Qword,
                            SeccompCmpOp::Eq,
                            *val,
                        )
                        .map_err(err)?])
                        .map_err(err)?,
                    );
                }
            }
        }
    }
    for nr in any {
        rules.insert(nr, vec![]);
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| format!("the {} filter: {e}", kind.name()))?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| format!("the {} filter: {e}", kind.name()))
}

/// The compiled filters, once per process.
fn compiled(kind: Kind, mode: Mode) -> Result<&'static BpfProgram, String> {
    static CACHE: OnceLock<Vec<Result<BpfProgram, String>>> = OnceLock::new();
    static CACHE_LOG: OnceLock<Vec<Result<BpfProgram, String>>> = OnceLock::new();
    let cache = if mode == Mode::Log {
        &CACHE_LOG
    } else {
        &CACHE
    };
    let all = cache.get_or_init(|| Kind::ALL.iter().map(|k| compile(*k, mode)).collect());
    let i = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    match &all[i] {
        Ok(p) => Ok(p),
        Err(e) => Err(e.clone()),
    }
}

/// Compile every filter and install the SIGSYS handler: called once at start-up, before
/// the first thread installs its filter, so that a filter that cannot be built stops the
/// program there, with the reason.
pub fn prepare() -> Result<(), String> {
    let m = mode();
    if m == Mode::Off {
        return Ok(());
    }
    for k in Kind::ALL {
        compiled(k, m)?;
    }
    install_sigsys_handler()
}

std::thread_local! {
    /// The kind whose filter this thread installed last (for the SIGSYS line).
    static KIND: std::cell::Cell<Option<Kind>> = const { std::cell::Cell::new(None) };
}

/// Install `kind`'s filter on the calling thread (nothing under [`Mode::Off`]). Every
/// thread that may be running when a guest runs calls this first.
pub fn install(kind: Kind) -> Result<(), String> {
    let m = mode();
    if m == Mode::Off {
        return Ok(());
    }
    let prog = compiled(kind, m)?;
    install_sigsys_handler()?;
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(prog)
        .map_err(|e| format!("install the {} seccomp filter: {e}", kind.name()))
}

/// [`install`] for threads that cannot report an error: a failure ends the process with
/// the reason (running a thread unfiltered when filters were asked for is not an option).
pub fn install_or_exit(kind: Kind) {
    if let Err(e) = install(kind) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "vmm: error: {e}");
        std::process::exit(1);
    }
}

fn install_sigsys_handler() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid value to fill in; `on_sigsys` has the
        // SA_SIGINFO handler signature and only makes async-signal-safe calls (write,
        // exit_group) and reads thread-local state that needs no initialisation.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                return Err(format!(
                    "install the SIGSYS handler: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    })
    .clone()
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: signo, errno, code (3 x
/// i32), padding, then `_sigsys { void *call_addr; int syscall; unsigned arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The exit status of a process stopped for a forbidden call (128 + SIGSYS).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for SIGSYS
    // from seccomp its union holds `_sigsys`, whose `syscall` is at SI_SYSCALL_OFFSET.
    let nr = unsafe { *((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32) };
    let kind = KIND
        .try_with(|k| k.get())
        .ok()
        .flatten()
        .map(|k| k.name())
        .unwrap_or("unknown");
    let mut buf = [0u8; 256];
    let mut w = Line {
        buf: &mut buf,
        len: 0,
    };
    w.put("vmm: seccomp: a ");
    w.put(kind);
    w.put(" thread made system call ");
    w.put_num(nr as i64);
    if let Some(n) = name_of(nr as i64) {
        w.put(" (");
        w.put(n);
        w.put(")");
    }
    w.put(", which its filter does not allow; stopping the process (run with --seccomp log to see every such call in `dmesg`)\n");
    let len = w.len;
    // SAFETY: write(2) of a buffer we own, then exit_group(2); both are allowed by every
    // filter ([`common`]) and async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, EXIT_STATUS);
    }
}

/// A name for a system call number, if any list knows it.
fn name_of(nr: i64) -> Option<&'static str> {
    for k in Kind::ALL {
        for a in k.own().iter().chain(common::LIST) {
            if a.nr() == nr {
                return Some(a.syscall());
            }
        }
    }
    None
}

/// A fixed buffer written without allocating (in a signal handler).
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Line<'_> {
    fn put(&mut self, s: &str) {
        for b in s.bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn put_num(&mut self, n: i64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        let neg = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if neg {
            self.put("-");
        }
        for &b in &d[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
}

/// Whether the calling thread runs under a seccomp filter (`PR_GET_SECCOMP`).
pub fn filtered() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer and only returns the thread's mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) == 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process [`forbidden_call_stops_the_process`] starts: which kind
    /// to install, and whether to then make an allowed or a forbidden call.
    const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

    /// Runs only as that child (a test-only hook: in the test binary, never in `vmm`):
    /// installs the kind's filter on a thread of its own, then makes the call.
    #[test]
    fn child_process_entry() {
        let Ok(what) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (kind, call) = what.split_once(':').expect("KIND:CALL");
        let kind = *Kind::ALL.iter().find(|k| k.name() == kind).expect("a kind");
        set_mode(Mode::On);
        prepare().expect("prepare");
        let call = call.to_string();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            install(kind).expect("install");
            assert!(filtered());
            // SAFETY: gettid takes no arguments and cannot fail.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let _ = go_rx.recv();
            // SAFETY: plain system calls with no pointers; getpid cannot fail, and
            // `socket`, `ptrace` and the ioctl only return a value or an error.
            let r = unsafe {
                match call.as_str() {
                    "allowed" => libc::getpid() as i64,
                    "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
                    "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
                    "ioctl" => libc::ioctl(0, libc::TIOCSTI as _, 0) as i64,
                    other => panic!("unknown call {other}"),
                }
            };
            // Only reached when the call was allowed (stdout is written by write(2)).
            println!("survived {call}: {r}");
        });
        // The filtered thread's own status, read from this (unfiltered) one.
        let tid = tid_rx.recv().expect("the thread's id");
        let status =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
        for l in status.lines().filter(|l| l.starts_with("Seccomp")) {
            println!("{l}");
        }
        let _ = go_tx.send(());
        t.join().expect("the filtered thread");
        std::process::exit(0);
    }

    /// Runs the child above; its exit status and stderr.
    fn child(kind: Kind, call: &str) -> (Option<i32>, String, String) {
        let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                "seccomp::tests::child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{}:{call}", kind.name()))
            .output()
            .expect("run the child");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn forbidden_call_stops_the_process_with_a_line_naming_it() {
        for kind in Kind::ALL {
            // Allowed: the thread runs on, under its filter (mode 2).
            let (code, out, err) = child(kind, "allowed");
            assert_eq!(code, Some(0), "{kind:?} allowed: {out}\n{err}");
            assert!(out.contains("Seccomp:\t2"), "{kind:?}: {out}");
            assert!(out.contains("survived allowed"), "{kind:?}: {out}");
            // Forbidden on every kind: ptrace.
            let (code, out, err) = child(kind, "ptrace");
            assert_eq!(code, Some(EXIT_STATUS), "{kind:?} ptrace: {out}\n{err}");
            assert!(!out.contains("survived"), "{kind:?}: {out}");
            assert!(
                err.contains(&format!(
                    "a {} thread made system call {}",
                    kind.name(),
                    libc::SYS_ptrace
                )),
                "{kind:?}: {err}"
            );
            // An ioctl no list has (TIOCSTI): refused by its request number.
            let (code, out, err) = child(kind, "ioctl");
            assert_eq!(code, Some(EXIT_STATUS), "{kind:?} ioctl: {out}\n{err}");
            assert!(err.contains("(ioctl)"), "{kind:?}: {err}");
            // Sockets: only the HTTP threads open them.
            let (code, out, err) = child(kind, "socket");
            if kind == Kind::Api {
                assert_eq!(code, Some(0), "{out}\n{err}");
            } else {
                assert_eq!(code, Some(EXIT_STATUS), "{kind:?} socket: {out}\n{err}");
            }
        }
    }

    #[test]
    fn lists_are_subsets_where_threads_start_threads() {
        // The api filter is the union of all (its blocking threads and the worker
        // processes it starts keep it); the keeper's includes the vCPU's.
        let api = Kind::Api.syscalls();
        for k in Kind::ALL {
            for s in k.syscalls() {
                assert!(api.contains(&s), "{s} of {k:?} is not in api's list");
            }
        }
        let keeper = Kind::Keeper.syscalls();
        for s in Kind::Vcpu.syscalls() {
            assert!(keeper.contains(&s), "{s}");
        }
        for k in Kind::ALL {
            let p = compile(k, Mode::On).unwrap_or_else(|e| panic!("{k:?}: {e}"));
            let ioctls: usize = k
                .entries()
                .iter()
                .map(|a| match a {
                    Allow::Ioctl(r) => r.len(),
                    _ => 0,
                })
                .sum();
            eprintln!(
                "{:>8}: {} system calls, {} ioctl requests, {} BPF instructions",
                k.name(),
                k.syscalls().len(),
                ioctls,
                p.len()
            );
        }
    }
}

//! Shared pieces of the command line: function options, how inputs are read (every one
//! with a bound known before reading), and how results are printed and mapped to the
//! process exit status.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::error::{Error, ErrorKind};
use vmm::guest::{EngineKind, FunctionSpec, GuestFile, RunLimits, RuntimeKind, MAX_REQUEST_BYTES};
use vmm::instance::Response;
use vmm::vm::{GuestError, RunError};

/// Exit status when the VMM or the guest failed, or the function's output was cut at the
/// output cap (not the function's own exit code; the reason is on stderr and in `--json`).
pub const EXIT_FAILURE: i32 = 125;
/// Exit status when the guest was stopped by the timeout (as timeout(1) does).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit status when the function's own exit code does not fit in an exit status (outside
/// 0-255): a failure, never a code that wraps to 0.
pub const EXIT_CODE_OUT_OF_RANGE: i32 = 1;

/// Shortest and longest `--timeout`, in seconds.
pub const MIN_TIMEOUT_SECS: f64 = 0.001;
pub const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// `--help` text on exit statuses, shared by `run` and `restore`.
pub const EXIT_STATUS_HELP: &str = "Exit status: the function's own exit code (0-255); \
1 if its code is outside 0-255; 124 if the timeout stopped it; 125 if the VMM or the guest \
failed, or if the function's output went past the 64 MiB cap and was cut. stderr says \
which when the function's own code is 124 or 125; --json has the full code and the reason.";

/// `--runtime`: how to drive the module (the library's [`RuntimeKind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// A WASI command module (`_start`).
    Wasi,
    /// QuickJS-NG's WASI reactor: `qjs --std <script>`.
    Qjs,
    /// CPython for WASI (python.wasm): `python <script>`.
    Python,
}

impl From<RuntimeArg> for RuntimeKind {
    fn from(r: RuntimeArg) -> RuntimeKind {
        match r {
            RuntimeArg::Wasi => RuntimeKind::Wasi,
            RuntimeArg::Qjs => RuntimeKind::Qjs,
            RuntimeArg::Python => RuntimeKind::Python,
        }
    }
}

/// `--engine`: the WebAssembly engine in the guest (the library's [`EngineKind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    /// wasmtime: the module is compiled ahead of time on the host (Cranelift) and runs at
    /// native speed.
    Wasmtime,
    /// wasmi: an interpreter in the guest; no compilation on the host.
    Wasmi,
}

impl From<EngineArg> for EngineKind {
    fn from(e: EngineArg) -> EngineKind {
        match e {
            EngineArg::Wasmtime => EngineKind::Wasmtime,
            EngineArg::Wasmi => EngineKind::Wasmi,
        }
    }
}

/// `--memory`: how guest RAM is filled on restore (the library's
/// [`Backing`](vmm::instance::Backing)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryArg {
    /// Copy every non-zero page before the vCPU runs.
    Eager,
    /// Copy the template's working set (recorded by its trial request, then learned from
    /// real ones) before the vCPU runs (whole 2 MiB regions where it is dense, only its
    /// pages where it is sparse); the rest arrives on demand through userfaultfd.
    Prefetch,
    /// Nothing up front: every page arrives on demand through userfaultfd.
    Lazy,
    /// A copy-on-write mapping of the template's memory image, cached in the store.
    Shared,
}

impl From<MemoryArg> for vmm::instance::Backing {
    fn from(m: MemoryArg) -> Self {
        use vmm::instance::Backing as M;
        match m {
            MemoryArg::Eager => M::Eager,
            MemoryArg::Prefetch => M::Prefetch,
            MemoryArg::Lazy => M::Lazy,
            MemoryArg::Shared => M::Shared,
        }
    }
}

/// `--seccomp`: what `vmm serve` and `vmm restore` do about system calls.
#[derive(clap::Args, Debug, Clone)]
pub struct SeccompArg {
    /// System call filters, one per kind of thread (vCPU, HTTP, pool keeper, watchdog,
    /// reaper, page-fault server, cancellation reader), installed before any guest code
    /// runs: `on` stops the process with a line naming the thread kind and the call when
    /// a thread makes one its list lacks; `log` allows it and has the kernel log it
    /// (`dmesg`, audit type 1326: how the lists are extended); `off` installs none, for
    /// debugging only: a guest that escapes its engine then reaches every system call the
    /// process may make.
    #[arg(long, value_name = "MODE", env = "VMM_SECCOMP", default_value = "on",
          value_parser = ["on", "log", "off"])]
    pub seccomp: String,
}

impl SeccompArg {
    pub fn mode(&self) -> vmm::seccomp::Mode {
        vmm::seccomp::Mode::parse(&self.seccomp).unwrap_or_default()
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct FunctionArgs {
    /// The WebAssembly module (.wasm, or .wat text).
    #[arg(long, value_name = "PATH.wasm")]
    pub module: PathBuf,
    /// How to drive the module: `wasi` runs a command's `_start`; `qjs` drives QuickJS-NG's
    /// WASI reactor as `qjs --std <first --arg>`; `python` runs CPython's python.wasm as
    /// `python <first --arg>` (`-` reads the script from stdin), with `random` reseeded when
    /// the script first reads its request, so restores of a template do not repeat it.
    #[arg(long, value_enum, default_value = "wasi")]
    pub runtime: RuntimeArg,
    /// A host file to put in the guest's read-only tree, at GUEST (default: its file name).
    #[arg(long = "file", value_name = "HOST[:GUEST]")]
    pub files: Vec<String>,
    /// An argument for the function (argv[1..]; argv[0] is the module's file name). Under
    /// `--runtime qjs` and `--runtime python` the first one is the script to run
    /// (required), given with --file.
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable for the function.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// The WebAssembly engine in the guest. A function template runs in its runtime base's
    /// engine.
    #[arg(long, value_enum, env = "VMM_ENGINE", default_value = "wasmtime")]
    pub engine: EngineArg,
}

#[derive(clap::Args, Debug, Clone)]
pub struct InvokeArgs {
    /// Read the request from PATH instead of standard input (at most 64 MiB).
    #[arg(long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Stop the guest after this many seconds (0.001 to 86400).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30.0,
        allow_hyphen_values = true
    )]
    pub timeout: f64,
    /// Print a timing breakdown to stderr after the response.
    #[arg(long)]
    pub stats: bool,
    /// Print the result as one JSON object on stdout: "status" (the process exit status),
    /// "reason" (exit, output_truncated, timeout, guest_error, vmm_error), "exit_code" (the
    /// function's own full code, or null), "error", "stdout", "stderr",
    /// "stdout_truncated", "stderr_truncated" and "stats".
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--module {path}: not WebAssembly text: {msg}")]
    Wat { path: PathBuf, msg: String },
    #[error("--file {0}: the guest path must be relative, without `.`/`..` components")]
    BadGuestPath(String),
    #[error("--env {0}: expected KEY=VALUE")]
    BadEnv(String),
    #[error("--timeout {0:?}: must be a number of seconds from {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS}")]
    BadTimeout(f64),
    #[error(transparent)]
    Setup(#[from] vmm::vm::SetupError),
    #[error("--module {path}: larger than the guest's {mem_mib} MiB of RAM, which must hold it (raise --mem)")]
    ModuleTooLarge { path: PathBuf, mem_mib: u64 },
    #[error("--file {path}: the module and files together are larger than the guest's {mem_mib} MiB of RAM, which must hold them (raise --mem)")]
    FilesTooLarge { path: PathBuf, mem_mib: u64 },
    #[error("{what}: the request is larger than the limit of {} MiB", limit >> 20)]
    RequestTooLarge { what: String, limit: u64 },
    #[error("--runtime qjs needs the script to run as the first --arg (for example --file hello.js --arg hello.js)")]
    QjsWithoutScript,
    #[error("--runtime python needs the script to run as the first --arg (for example --file hello.py --arg hello.py)")]
    PythonWithoutScript,
}

/// What [`read_bounded`] found.
enum Bounded {
    Read(Vec<u8>),
    /// More than the limit (nothing beyond limit + 1 bytes was read).
    TooLarge,
}

/// Read all of `path` if it holds at most `limit` bytes. A regular file's size is checked
/// before reading; anything else (a pipe, a FIFO, a device such as /dev/zero) is read
/// through a `take(limit + 1)`, so host memory stays bounded by the limit whatever it is.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Bounded> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > limit {
        return Ok(Bounded::TooLarge);
    }
    let hint = if meta.is_file() { meta.len() } else { 0 };
    read_stream_bounded(file, limit, hint)
}

/// [`read_bounded`] for an open stream; `hint` is its expected size (0 if unknown).
fn read_stream_bounded(r: impl Read, limit: u64, hint: u64) -> std::io::Result<Bounded> {
    let mut buf = Vec::with_capacity(usize::try_from(hint.min(limit)).unwrap_or(0));
    r.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    Ok(if buf.len() as u64 > limit {
        Bounded::TooLarge
    } else {
        Bounded::Read(buf)
    })
}

/// Read a module (binary, or `.wat` text) of at most the largest guest RAM.
pub fn read_module(path: &Path) -> Result<Vec<u8>, CliError> {
    read_module_within(path, vmm_abi::layout::MAX_MEM_MIB)
}

/// Read a module that must fit in `mem_mib` MiB of guest RAM.
pub fn read_module_within(path: &Path, mem_mib: u64) -> Result<Vec<u8>, CliError> {
    let read_err = |source| CliError::Read {
        what: "module",
        path: path.into(),
        source,
    };
    let bytes = match read_bounded(path, mem_mib << 20).map_err(read_err)? {
        Bounded::Read(b) => b,
        Bounded::TooLarge => {
            return Err(CliError::ModuleTooLarge {
                path: path.into(),
                mem_mib,
            })
        }
    };
    let is_text = path.extension().is_some_and(|e| e == "wat")
        || bytes.trim_ascii_start().starts_with(b"(module");
    if is_text {
        return wat::parse_bytes(&bytes)
            .map(|b| b.into_owned())
            .map_err(|e| CliError::Wat {
                path: path.into(),
                msg: e.to_string(),
            });
    }
    Ok(bytes)
}

/// A `--timeout` in seconds as a duration: a finite number from [`MIN_TIMEOUT_SECS`] to
/// [`MAX_TIMEOUT_SECS`] (used by `run`, `restore` and `template create`).
pub fn timeout(secs: f64) -> Result<Duration, CliError> {
    if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&secs) {
        return Err(CliError::BadTimeout(secs));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| CliError::BadTimeout(secs))
}

/// Read a request (`--input PATH`, `--trial-input PATH`, or standard input when `path` is
/// `None`) of at most [`MAX_REQUEST_BYTES`]; `flag` names the option in errors.
pub fn read_request(flag: &str, path: Option<&Path>) -> Result<Vec<u8>, CliError> {
    let limit = MAX_REQUEST_BYTES as u64;
    let (what, read) = match path {
        Some(p) => (format!("{flag} {}", p.display()), read_bounded(p, limit)),
        None => (
            "standard input".to_string(),
            read_stream_bounded(std::io::stdin().lock(), limit, 0),
        ),
    };
    match read {
        Ok(Bounded::Read(b)) => Ok(b),
        Ok(Bounded::TooLarge) => Err(CliError::RequestTooLarge { what, limit }),
        Err(source) => Err(CliError::Read {
            what: "request",
            path: path.map_or_else(|| "<stdin>".into(), Path::to_path_buf),
            source,
        }),
    }
}

impl FunctionArgs {
    /// The function, with the module and files read within `mem_mib` MiB of guest RAM
    /// (together: the guest must hold them all).
    pub fn to_spec(&self, mem_mib: u64) -> Result<FunctionSpec, CliError> {
        let mem_size = vmm::guest::check_mem(mem_mib)?;
        if self.args.is_empty() {
            match self.runtime {
                RuntimeArg::Qjs => return Err(CliError::QjsWithoutScript),
                RuntimeArg::Python => return Err(CliError::PythonWithoutScript),
                RuntimeArg::Wasi => {}
            }
        }
        for e in &self.env {
            if !e.contains('=') || e.starts_with('=') {
                return Err(CliError::BadEnv(e.clone()));
            }
        }
        let module = read_module_within(&self.module, mem_mib)?;
        let mut budget = mem_size.saturating_sub(module.len() as u64);
        let mut files = Vec::new();
        for f in &self.files {
            // HOST[:GUEST]; a HOST that exists as given wins over splitting at ':'.
            let (host, guest) = match f.rsplit_once(':') {
                Some((h, g)) if !Path::new(f).exists() => (h.to_string(), g.to_string()),
                _ => {
                    let name = Path::new(f)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (f.clone(), name)
                }
            };
            let guest = guest.trim_start_matches("./").to_string();
            if !vmm_abi::valid_guest_path(guest.as_bytes()) {
                return Err(CliError::BadGuestPath(f.clone()));
            }
            let read = read_bounded(Path::new(&host), budget).map_err(|source| CliError::Read {
                what: "file",
                path: host.clone().into(),
                source,
            })?;
            let data = match read {
                Bounded::Read(d) => d,
                Bounded::TooLarge => {
                    return Err(CliError::FilesTooLarge {
                        path: host.into(),
                        mem_mib,
                    })
                }
            };
            budget -= data.len() as u64;
            files.push(GuestFile {
                guest_path: guest,
                data,
            });
        }
        let module_name = self
            .module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FunctionSpec {
            module,
            module_name,
            runtime: self.runtime.into(),
            engine: self.engine.into(),
            files,
            args: self.args.clone(),
            env: self.env.clone(),
        })
    }
}

impl InvokeArgs {
    /// The request: `--input PATH` or standard input, at most [`MAX_REQUEST_BYTES`].
    pub fn read_input(&self) -> Result<Vec<u8>, CliError> {
        read_request("--input", self.input.as_deref())
    }

    pub fn limits(&self, mem_mib: u64) -> Result<RunLimits, CliError> {
        Ok(RunLimits {
            timeout: timeout(self.timeout)?,
            mem_mib,
            ..limits_from_env()
        })
    }
}

/// Default limits with the test switches the environment asks for: `VMM_TEST_HOSTCALLS`
/// (expose the raw hostcall import, for hostile-guest tests) and `VMM_EAGER_COMPILE`.
/// Only the CLI reads the environment; the library takes explicit values.
pub fn limits_from_env() -> RunLimits {
    RunLimits {
        test_hostcalls: std::env::var_os("VMM_TEST_HOSTCALLS").is_some(),
        eager_compile: std::env::var_os("VMM_EAGER_COMPILE").is_some(),
        ..RunLimits::default()
    }
}

/// Why an invocation ended (`"reason"` in `--json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The function exited with its own code and its output is complete.
    Exit,
    /// The function exited, but output went past the cap and was cut.
    OutputTruncated,
    /// The timeout stopped the guest.
    Timeout,
    /// The guest could not run the function (invalid module, trap, CPU exception, guest
    /// kernel panic, guest out of memory, malformed hostcall...).
    GuestError,
    /// The VMM failed (KVM, host memory, the template store, an input it could not read).
    VmmError,
}

/// How an invocation maps to the process: its exit status, the reason, and what to say.
#[derive(Debug)]
pub struct Outcome {
    pub status: i32,
    pub reason: Reason,
    /// The function's own exit code, in full (not truncated to 8 bits).
    pub exit_code: Option<i32>,
    /// Why there is no (complete) response.
    pub error: Option<String>,
    /// Said on stderr when the status is ambiguous on its own.
    pub note: Option<String>,
}

/// The process exit status for a function's own exit `code`, and a note when that status
/// alone would mislead (a code that is also the VMM's own status, or one that does not fit).
pub fn exit_status(code: i32) -> (i32, Option<String>) {
    match code {
        EXIT_TIMEOUT => (
            code,
            Some(format!(
                "the function itself exited with code {code} (it was not stopped by the timeout)"
            )),
        ),
        EXIT_FAILURE => (
            code,
            Some(format!(
                "the function itself exited with code {code} (the VMM did not fail)"
            )),
        ),
        0..=255 => (code, None),
        _ => (
            EXIT_CODE_OUT_OF_RANGE,
            Some(format!(
                "the function exited with code {code}, which does not fit in an exit status (0-255); exiting with {EXIT_CODE_OUT_OF_RANGE}"
            )),
        ),
    }
}

/// Classify a finished invocation.
pub fn outcome(report: &Response) -> Outcome {
    match &report.result {
        Ok(code) if report.truncated.any() => {
            let which = match (report.truncated.stdout, report.truncated.stderr) {
                (true, true) => "stdout and stderr",
                (true, false) => "stdout",
                _ => "stderr",
            };
            Outcome {
                status: EXIT_FAILURE,
                reason: Reason::OutputTruncated,
                exit_code: Some(*code),
                error: Some(format!(
                    "the function wrote more than the {} MiB output cap; its {which} was cut there (the function exited with code {code})",
                    vmm_abi::MAX_TRANSFER_LEN >> 20
                )),
                note: None,
            }
        }
        Ok(code) => {
            let (status, note) = exit_status(*code);
            Outcome {
                status,
                reason: Reason::Exit,
                exit_code: Some(*code),
                error: None,
                note,
            }
        }
        Err(e) => {
            let (status, reason) = match e.kind() {
                ErrorKind::Timeout => (EXIT_TIMEOUT, Reason::Timeout),
                ErrorKind::GuestFault => (EXIT_FAILURE, Reason::GuestError),
                _ => (EXIT_FAILURE, Reason::VmmError),
            };
            Outcome {
                status,
                reason,
                exit_code: None,
                error: Some(with_hint(e)),
                note: None,
            }
        }
    }
}

/// The message of a failure, with what the user can do about it on the command line.
pub fn with_hint(e: &Error) -> String {
    use vmm::memory::MemoryError;
    use vmm::vm::{SetupError, VmError};
    let hint = match (e.kind(), e.find::<RunError>(), e.find::<VmError>()) {
        (ErrorKind::Timeout, _, _) => Some("raise --timeout if the function needs longer"),
        (_, Some(RunError::Guest(GuestError::Timeout(_))), _) => {
            Some("raise --timeout if the function needs longer")
        }
        (_, _, Some(VmError::Setup(SetupError::ModuleTooLarge { .. }))) => Some("raise --mem"),
        (_, _, Some(VmError::Setup(SetupError::BadMemSize(_)))) => Some("see --mem in --help"),
        (_, _, Some(VmError::Memory(MemoryError::Map { .. }))) => Some("or lower --mem"),
        (ErrorKind::NotFound, _, _) => Some("see `vmm template ls`"),
        (ErrorKind::Damaged, _, _) if e.find::<snapshot_store::LoadError>().is_some() => {
            Some("`vmm-store verify` says what is damaged")
        }
        _ => None,
    };
    // A failed run is said as the guest's failure, without the library's step.
    let what = match e.find::<RunError>() {
        Some(r) => r.to_string(),
        None => e.to_string(),
    };
    match hint {
        Some(h) => format!("{what} ({h})"),
        None => what,
    }
}

/// Write `line` and a newline to standard output, ignoring errors: a reader that went away
/// (`vmm run --json | head -c1`) must not make `println!` panic; the response is written the
/// same way.
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Report a failure before any function ran (unreadable input, store, bad option) the way
/// the user asked, and return the exit status: with `--json`, one JSON object on stdout.
pub fn fail_before_run(msg: &str, json: bool) -> i32 {
    if json {
        let v = serde_json::json!({
            "status": EXIT_FAILURE,
            "reason": Reason::VmmError,
            "exit_code": null,
            "error": msg,
            "stdout": "",
            "stderr": "",
            "stdout_truncated": false,
            "stderr_truncated": false,
        });
        print_line(&v.to_string());
    } else {
        eprintln!("vmm: error: {msg}");
    }
    EXIT_FAILURE
}

/// Print a report the way the user asked and return the process exit status.
pub fn finish(report: &Response, args: &InvokeArgs) -> i32 {
    let o = outcome(report);
    if args.json {
        let v = serde_json::json!({
            "status": o.status,
            "reason": o.reason,
            "exit_code": o.exit_code,
            "error": o.error,
            "stdout": String::from_utf8_lossy(&report.stdout),
            "stderr": String::from_utf8_lossy(&report.stderr),
            "stdout_truncated": report.truncated.stdout,
            "stderr_truncated": report.truncated.stderr,
            "stats": report.stats,
        });
        print_line(&v.to_string());
        return o.status;
    }
    let _ = std::io::stdout().write_all(&report.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&report.stderr);
    if (o.error.is_some() || o.note.is_some())
        && !report.stderr.is_empty()
        && !report.stderr.ends_with(b"\n")
    {
        eprintln!(); // the VMM's own lines start on a line of their own
    }
    if let Some(e) = &o.error {
        eprintln!("vmm: error: {e}");
    }
    if let Some(n) = &o.note {
        eprintln!("vmm: {n}");
    }
    if args.stats {
        print_stats(&report.stats);
    }
    o.status
}

pub fn print_stats(s: &vmm::stats::Stats) {
    match s.engine {
        "" => eprintln!("--- {} start on {} KVM ---", s.mode, s.backend),
        e => eprintln!("--- {} start on {} KVM, {e} ---", s.mode, s.backend),
    }
    let row = |name: &str, v: f64| eprintln!("{name:>18}: {v:>9.3} ms");
    let count = |name: &str, v: u64| eprintln!("{name:>18}: {v:>9}");
    match &s.restore {
        None => {
            if s.engine == EngineKind::Wasmtime.name() {
                row("host AOT compile", s.aot_compile_ms);
                eprintln!("{:>18}: {}", "artifact cache", s.artifact_cache.name());
            }
            row("vm create", s.vm_create_ms);
            row("guest boot", s.boot_ms);
            // wasmtime only deserializes in the guest: the compilation is the host's.
            let guest_compile = if s.engine == EngineKind::Wasmtime.name() {
                "module load"
            } else {
                "module compile"
            };
            row(guest_compile, s.compile_ms);
            row("instantiate", s.instantiate_ms);
            row("runtime init", s.runtime_init_ms);
            row("function run", s.function_ms);
        }
        Some(r) => {
            row("load template", r.load_ms);
            row("install memory", r.install_ms);
            row("vm+vcpu restore", r.vm_restore_ms);
            row("vm ready", r.setup_ms);
            row("run to response", r.run_ms);
            count("pages installed", r.pages_installed);
            count("uffd faults", r.uffd_faults);
            count("KiB from store", r.bytes_from_store / 1024);
        }
    }
    row("total", s.total_ms);
    count("exits", s.exits);
    count("hostcalls", s.hostcalls);
    if let Some(cpu) = &s.cpu {
        eprintln!("{:>18}: {}", "guest cpu model", cpu.model);
        if !cpu.compiled_for.is_empty() {
            eprintln!("{:>18}: {}", "compiled for", cpu.compiled_for.join(","));
        }
    }
}

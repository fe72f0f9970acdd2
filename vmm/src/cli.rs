//! Shared pieces of the command line: function options and how results are printed.

use crate::run::{FunctionSpec, GuestFile, RunLimits, RunReport, RuntimeKind};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit status when the VMM or the guest failed (not the function's own exit code).
pub const EXIT_FAILURE: i32 = 125;
/// Exit status when the guest was stopped by the timeout (as timeout(1) does).
pub const EXIT_TIMEOUT: i32 = 124;

#[derive(clap::Args, Debug, Clone)]
pub struct FunctionArgs {
    /// The WebAssembly module (.wasm, or .wat text).
    #[arg(long, value_name = "PATH.wasm")]
    pub module: PathBuf,
    /// How to drive the module: `wasi` runs a command's `_start`; `qjs` drives QuickJS-NG's
    /// WASI reactor as `qjs --std <first --arg>`.
    #[arg(long, value_enum, default_value = "wasi")]
    pub runtime: RuntimeKind,
    /// A host file to put in the guest's read-only tree, at GUEST (default: its file name).
    #[arg(long = "file", value_name = "HOST[:GUEST]")]
    pub files: Vec<String>,
    /// An argument for the function (argv[1..]; argv[0] is the module's file name).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable for the function.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct InvokeArgs {
    /// Read the request from PATH instead of standard input.
    #[arg(long, value_name = "PATH")]
    pub input: Option<PathBuf>,
    /// Stop the guest after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub timeout: f64,
    /// Print a timing breakdown to stderr after the response.
    #[arg(long)]
    pub stats: bool,
    /// Print the result (exit code, stdout, stderr, timings) as one JSON object on stdout.
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
    #[error("--timeout {0}: must be a positive number of seconds")]
    BadTimeout(f64),
}

pub fn read_module(path: &Path) -> Result<Vec<u8>, CliError> {
    let bytes = std::fs::read(path).map_err(|source| CliError::Read {
        what: "module",
        path: path.into(),
        source,
    })?;
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

impl FunctionArgs {
    pub fn to_spec(&self) -> Result<FunctionSpec, CliError> {
        let module = read_module(&self.module)?;
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
            let data = std::fs::read(&host).map_err(|source| CliError::Read {
                what: "file",
                path: host.into(),
                source,
            })?;
            files.push(GuestFile {
                guest_path: guest,
                data,
            });
        }
        for e in &self.env {
            if !e.contains('=') || e.starts_with('=') {
                return Err(CliError::BadEnv(e.clone()));
            }
        }
        let module_name = self
            .module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(FunctionSpec {
            module,
            module_name,
            runtime: self.runtime,
            files,
            args: self.args.clone(),
            env: self.env.clone(),
        })
    }
}

impl InvokeArgs {
    pub fn read_input(&self) -> Result<Vec<u8>, CliError> {
        let mut buf = Vec::new();
        match &self.input {
            Some(p) => {
                buf = std::fs::read(p).map_err(|source| CliError::Read {
                    what: "input",
                    path: p.clone(),
                    source,
                })?
            }
            None => {
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .map_err(|source| CliError::Read {
                        what: "input",
                        path: "<stdin>".into(),
                        source,
                    })?;
            }
        }
        Ok(buf)
    }

    pub fn limits(&self, mem_mib: u64) -> Result<RunLimits, CliError> {
        if !(self.timeout > 0.0 && self.timeout.is_finite()) {
            return Err(CliError::BadTimeout(self.timeout));
        }
        Ok(RunLimits {
            timeout: Duration::from_secs_f64(self.timeout),
            mem_mib,
            ..RunLimits::default()
        })
    }
}

/// Print a report the way the user asked and return the process exit status.
pub fn finish(report: &RunReport, args: &InvokeArgs) -> i32 {
    let (code, error) = match &report.result {
        Ok(code) => (*code, None),
        Err(e) => {
            let timeout = matches!(
                e,
                crate::vm::RunError::Guest(crate::vm::GuestError::Timeout(_))
            );
            (
                if timeout { EXIT_TIMEOUT } else { EXIT_FAILURE },
                Some(e.to_string()),
            )
        }
    };
    if args.json {
        let v = serde_json::json!({
            "exit_code": code,
            "error": error,
            "stdout": String::from_utf8_lossy(&report.stdout),
            "stderr": String::from_utf8_lossy(&report.stderr),
            "stats": report.stats,
        });
        println!("{v}");
        return code;
    }
    let _ = std::io::stdout().write_all(&report.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&report.stderr);
    if let Some(e) = &error {
        eprintln!("vmm: error: {e}");
    }
    if args.stats {
        print_stats(&report.stats);
    }
    code
}

pub fn print_stats(s: &crate::run::Stats) {
    eprintln!("--- {} start on {} KVM ---", s.mode, s.backend);
    let row = |name: &str, v: f64| eprintln!("{name:>18}: {v:>9.3} ms");
    let count = |name: &str, v: u64| eprintln!("{name:>18}: {v:>9}");
    match &s.restore {
        None => {
            row("vm create", s.vm_create_ms);
            row("guest boot", s.boot_ms);
            row("module compile", s.compile_ms);
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
}

//! `vmm`: run serverless functions in a KVM unikernel, cold or from snapshots.

use clap::{Parser, Subcommand};
use cli::{FunctionArgs, InvokeArgs};
use snapshot_store::Store;
use std::path::PathBuf;

mod bench;
mod cli;
mod fnclient;
mod hostwasm;
mod remote;
mod serve;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "Run WebAssembly functions in a native KVM unikernel; start them from snapshots.",
    after_help = "Environment:\n  VMM_CPU_WITHOUT=lzcnt,bmi2  leave these CPU features out of the guest CPU model (every\n                              command): modules are compiled without them, and templates\n                              made so restore on hosts that lack them. `--stats` shows\n                              the model; docs/guest-cpu.md says what it is on each back end.\n  VMM_ENGINE=wasmi            the default engine (wasmtime otherwise).\n  VMM_STORE=DIR               the default store."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the guest cold and run one function: request on stdin, response on stdout.
    ///
    /// Example: vmm run --module qjs-wasi-reactor.wasm --runtime qjs --file hello.js --arg hello.js < req.json
    #[command(after_help = cli::EXIT_STATUS_HELP)]
    Run {
        #[command(flatten)]
        function: FunctionArgs,
        #[command(flatten)]
        invoke: InvokeArgs,
        /// Guest RAM in MiB (sparse: untouched memory costs nothing). The module and the
        /// --file contents together must fit in it.
        #[arg(long, value_name = "MIB", default_value_t = vmm_abi::layout::DEFAULT_MEM_MIB)]
        mem: u64,
        /// The store whose compiled-module cache a wasmtime run uses: the module is compiled
        /// once and later runs load it from there (`vmm-store ls --artifacts`) [default:
        /// $VMM_STORE, else $XDG_DATA_HOME/vmm/store, else ~/.local/share/vmm/store]
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
        /// Compile the module even if the store has it compiled, and cache nothing.
        #[arg(long)]
        no_artifact_cache: bool,
    },
    /// Measure cold runs against restores, store dedup, restore throughput and native
    /// speed, side by side in one run, and print the tables the README quotes.
    Bench(bench::BenchArgs),
    /// Create, list and remove templates (snapshots that later invocations start from).
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Start a function from its template and serve one request: request on stdin,
    /// response on stdout.
    ///
    /// Example: echo '{"name":"x"}' | vmm restore hello
    #[command(after_help = cli::EXIT_STATUS_HELP)]
    Restore {
        /// The function template (see `vmm template ls`).
        name: String,
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        invoke: InvokeArgs,
        /// How guest memory is filled: `prefetch` copies the template's working set before
        /// the vCPU runs (whole 2 MiB regions where it is dense, only its pages where it is
        /// sparse) and serves the rest of the template's pages on demand through
        /// userfaultfd; `eager` copies everything; `lazy` serves every page on demand;
        /// `shared` maps a memory image cached in the store copy-on-write (see `vmm bench
        /// --only shapes`). Memory the template does not hold is zero-filled by the kernel.
        /// The pages a request touched beyond the working set are added to the template's
        /// learned working set in the store (for its first 10 requests that touch new
        /// ones), which later restores prefetch.
        #[arg(long, value_enum, default_value = "prefetch")]
        memory: cli::MemoryArg,
        #[command(flatten)]
        remote: remote::RemoteArgs,
        #[command(flatten)]
        seccomp: cli::SeccompArg,
    },
    /// Serve functions over HTTP from pools of ready instances, each reset to its
    /// template after every request.
    ///
    /// POST /v1/functions/NAME/invoke (body: the request; response: the function's
    /// stdout; 200 exit 0, 500 non-zero exit, x-vmm-exit-code header; 404 unknown template,
    /// 413 body too large, 429 queue full, 502 guest failed, 503 draining, 504 timeout;
    /// `Accept: application/json` for {stdout, stderr, exit_code, timings}),
    /// GET /v1/functions, GET /healthz, GET /metrics (Prometheus text).
    ///
    /// Example: vmm serve --listen 127.0.0.1:8080 & curl --data-binary '{"name":"x"}' localhost:8080/v1/functions/hello/invoke
    Serve(serve::ServeArgs),
    /// Deploy, invoke, show, list and remove functions on a `vmm serve` daemon over HTTP.
    ///
    /// Example: vmm fn deploy hello --runtime js --source hello.js && echo '{}' | vmm fn invoke hello
    #[command(subcommand, name = "fn", after_help = fnclient::AFTER_HELP)]
    Fn(fnclient::FnCommand),
    /// A worker process of `vmm serve` (started by it, with its socket as stdin).
    #[command(hide = true)]
    ServeCell,
}

#[derive(clap::Args, Debug, Clone)]
struct StoreArg {
    /// The template store [default: $VMM_STORE, else $XDG_DATA_HOME/vmm/store, else ~/.local/share/vmm/store]
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

impl StoreArg {
    fn dir(&self) -> Result<PathBuf, String> {
        self.store
            .clone()
            .or_else(snapshot_store::default_store_dir)
            .ok_or_else(|| "no store directory: pass --store DIR or set $VMM_STORE".to_string())
    }
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Create a function template: boots (or restores) the runtime base for the module,
    /// gives it the function, runs the function to its first read of stdin and snapshots it.
    /// The runtime base is created on first use and shared by every function of that module.
    ///
    /// Example: vmm template create hello --module qjs-wasi-reactor.wasm --runtime qjs --file hello.js --arg hello.js
    Create {
        /// Name of the new template (letters, digits, `-`, `_`, `.`).
        name: String,
        #[command(flatten)]
        function: FunctionArgs,
        /// Layer on this template instead of the module's automatically named runtime base;
        /// if no template has this name yet, the runtime base is created under it.
        #[arg(long, value_name = "TEMPLATE")]
        base: Option<String>,
        #[command(flatten)]
        store: StoreArg,
        /// The request of the trial invocation that records the template's working set
        /// (default: an empty request; at most 64 MiB).
        #[arg(long, value_name = "PATH")]
        trial_input: Option<PathBuf>,
        /// Guest RAM in MiB.
        #[arg(long, value_name = "MIB", default_value_t = vmm_abi::layout::DEFAULT_MEM_MIB)]
        mem: u64,
        /// Stop the guest after this many seconds (0.001 to 86400).
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 60.0,
            allow_hyphen_values = true
        )]
        timeout: f64,
        /// Print what was created as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the templates in the store: parent, runtime and engine they were made with, own
    /// pages, guest memory.
    Ls {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (refused while other templates are layered on it).
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
}

/// When the process started (as near as main gets): `total_ms` in --stats/--json is
/// measured from here to the response, for cold runs and restores alike.
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn since_start_ms() -> f64 {
    STARTED
        .get()
        .map(|t| t.elapsed().as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

fn main() {
    STARTED.get_or_init(std::time::Instant::now);
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run {
            function,
            invoke,
            mem,
            store,
            no_artifact_cache,
        } => {
            // Options first, then the module and files, then the request: every input is
            // read with a bound (guest RAM, the request limit) known before reading it.
            let prepared = invoke.limits(mem).and_then(|mut limits| {
                if !no_artifact_cache {
                    limits.artifact_store = store.or_else(snapshot_store::default_store_dir);
                }
                let spec = function.to_spec(mem)?;
                Ok((spec, invoke.read_input()?, limits))
            });
            match prepared {
                Ok((spec, input, limits)) => {
                    let dir = limits.artifact_store.clone().unwrap_or_default();
                    match vmm::engine::Engine::new(vmm::engine::Config::new(dir)) {
                        Ok(engine) => {
                            let (mut report, instance) = engine.run(&spec, &input, &limits);
                            report.stats.total_ms = since_start_ms();
                            report.stats.cpu = instance.as_ref().and_then(|i| i.cpu_report());
                            let code = cli::finish(&report, &invoke);
                            drop(instance); // tear the VM down after the response is out
                            code
                        }
                        Err(e) => cli::fail_before_run(&cli::with_hint(&e), invoke.json),
                    }
                }
                Err(e) => cli::fail_before_run(&e.to_string(), invoke.json),
            }
        }
        Command::Template(cmd) => template(cmd),
        Command::Bench(args) => match bench::bench(&args) {
            Ok(()) => 0,
            Err(e) => fail(format!("bench: {e}")),
        },
        Command::Restore {
            name,
            store,
            invoke,
            memory,
            remote,
            seccomp,
        } => restore(&name, &store, &invoke, memory, &remote, seccomp.mode()),
        Command::Fn(cmd) => fnclient::run(cmd),
        Command::ServeCell => serve::cell::run(),
        Command::Serve(args) => {
            let store = StoreArg {
                store: args.store.clone(),
            };
            match store.dir() {
                Ok(dir) => serve::serve(args, dir),
                Err(e) => fail(e),
            }
        }
    };
    std::process::exit(code);
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("vmm: error: {msg}");
    cli::EXIT_FAILURE
}

fn open_store(arg: &StoreArg, create: bool) -> Result<Store, String> {
    let dir = arg.dir()?;
    let r = if create {
        Store::create_or_open(&dir)
    } else {
        Store::open(&dir)
    };
    r.map_err(|e| format!("open the template store {}: {e}", dir.display()))
}

fn restore(
    name: &str,
    store: &StoreArg,
    invoke: &InvokeArgs,
    memory: cli::MemoryArg,
    remote: &remote::RemoteArgs,
    seccomp: vmm::seccomp::Mode,
) -> i32 {
    let backing = vmm::instance::Backing::from(memory);
    vmm::seccomp::set_mode(seccomp);
    if let Err(e) = vmm::seccomp::prepare() {
        return cli::fail_before_run(&e, invoke.json);
    }
    let dir = match store.dir() {
        Ok(d) => d,
        Err(e) => return cli::fail_before_run(&e, invoke.json),
    };
    // A one-shot process: shared instances map the store's cached image. KVM opens (and
    // the first VM is made) on a thread of its own while this one reads the request and
    // loads the template.
    let engine = vmm::engine::Engine::start(vmm::engine::Config {
        cached_images: true,
        ..vmm::engine::Config::new(&dir)
    });
    let prepared = (|| {
        let limits = invoke
            .limits(vmm_abi::layout::DEFAULT_MEM_MIB)
            .map_err(|e| e.to_string())?;
        let ready = remote::prepare(&dir, name, remote)?;
        if let Some(p) = &ready.pulled {
            eprintln!(
                "vmm: pulled {name} from the remote: {} layer(s), {} page(s), {} bytes in {:.1} ms",
                p.layers_created, p.pages_fetched, p.bytes_received, p.ms
            );
            if !p.evicted.is_empty() {
                eprintln!(
                    "vmm: evicted {} to keep the store within its limit",
                    p.evicted.join(", ")
                );
            }
        }
        let input = invoke.read_input().map_err(|e| e.to_string())?;
        Ok::<_, String>((input, limits, ready.in_use))
    })();
    let (input, limits, _in_use) = match prepared {
        Ok(p) => p,
        Err(e) => return cli::fail_before_run(&e, invoke.json),
    };
    let restored = engine
        .load_template_with_stats(name)
        .and_then(|(template, load)| {
            let instance = template.instantiate_with(backing)?;
            Ok((instance, load))
        });
    let (mut instance, load) = match restored {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("restore {name}: {}", cli::with_hint(&e));
            return cli::fail_before_run(&msg, invoke.json);
        }
    };
    // The guest runs on this thread: its filter first (the watchdog's thread started
    // before, unfiltered by this one's list; the page-fault server filters itself).
    vmm::watchdog::start();
    if let Err(e) = vmm::seccomp::install(vmm::seccomp::Kind::Vcpu) {
        return cli::fail_before_run(&e, invoke.json);
    }
    let mut report = instance.invoke(&input, &limits);
    report.stats.total_ms = since_start_ms();
    if let Some(r) = &mut report.stats.restore {
        r.load_ms = load.load_ms;
        report.stats.vm_create_ms = r.load_ms + r.setup_ms;
    }
    report.stats.cpu = instance.cpu_report();
    let code = cli::finish(&report, invoke);
    // After the response is out: what the request touched beyond the template's working
    // set goes into its learned working set, for later restores to prefetch.
    if report.result.is_ok() {
        if let Err(e) = instance.learn() {
            let read_only = e.find::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                )
            });
            if !read_only {
                eprintln!("vmm: warning: {}", cli::with_hint(&e));
            }
        }
    }
    drop(instance); // tear the VM down after the response is out
    code
}

fn template(cmd: TemplateCommand) -> i32 {
    match cmd {
        TemplateCommand::Create {
            name,
            function,
            base,
            store,
            trial_input,
            mem,
            timeout,
            json,
        } => {
            let prepared = (|| {
                let limits = vmm::guest::RunLimits {
                    timeout: cli::timeout(timeout).map_err(|e| e.to_string())?,
                    mem_mib: mem,
                    ..cli::limits_from_env()
                };
                let spec = function.to_spec(mem).map_err(|e| e.to_string())?;
                let trial = match &trial_input {
                    Some(p) => {
                        cli::read_request("--trial-input", Some(p)).map_err(|e| e.to_string())?
                    }
                    None => Vec::new(),
                };
                Ok::<_, String>((spec, trial, limits, open_store(&store, true)?))
            })();
            let (spec, trial, limits, mut store) = match prepared {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let created = vmm::engine::Engine::new(vmm::engine::Config::new(store.dir())).and_then(
                |engine| {
                    vmm::template::create::create_template(
                        &engine,
                        &mut store,
                        &name,
                        &spec,
                        base.as_deref(),
                        &trial,
                        &limits,
                    )
                },
            );
            match created {
                Ok(r) if json => {
                    cli::print_line(&serde_json::to_string(&r).unwrap_or_default());
                    0
                }
                Ok(r) => {
                    if r.base_created {
                        eprintln!(
                            "created runtime base {} ({} pages)",
                            r.base, r.base_new_pages
                        );
                    } else {
                        eprintln!("reused runtime base {}", r.base);
                    }
                    eprintln!(
                        "created template {} on {}: {} new pages, {} shared, working set {} pages, in {:.1} ms",
                        r.name, r.base, r.new_pages, r.reused_pages, r.working_set_pages, r.create_ms
                    );
                    0
                }
                Err(e) => {
                    let code = fail(format!("template create {name}: {}", cli::with_hint(&e)));
                    if e.kind() == vmm::error::ErrorKind::Timeout {
                        cli::EXIT_TIMEOUT
                    } else {
                        code
                    }
                }
            }
        }
        TemplateCommand::Ls { store, json } => {
            let store = match open_store(&store, false) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            // Unreadable manifests are flagged; the readable templates are still listed.
            let all = match store.list_all() {
                Ok(l) => l,
                Err(e) => return fail(format!("list templates: {e}")),
            };
            let (list, bad) = (&all.templates, &all.unreadable);
            // Runtime and engine come from each template's recorded provenance (templates
            // from before it was recorded have none: `-`).
            let made_with = |name: &str| {
                store
                    .load(name)
                    .ok()
                    .and_then(|t| vmm::template::checks::decode_device(&t).ok())
                    .and_then(|d| d.provenance)
                    .map(|p| (p.runtime, p.engine))
            };
            if json {
                let mut v: Vec<_> = list
                    .iter()
                    .map(|t| {
                        let made = made_with(t.name.as_str());
                        serde_json::json!({
                            "name": t.name.as_str(),
                            "parent": t.parent.as_ref().map(|p| p.as_str()),
                            "runtime": made.as_ref().map(|m| m.0.as_str()),
                            "engine": made.as_ref().map(|m| m.1.as_str()),
                            "mem_size": t.mem_size,
                            "own_pages": t.own_pages,
                            "created_unix_ms": t.created_unix_ms,
                        })
                    })
                    .collect();
                v.extend(bad.iter().map(|(n, e)| {
                    serde_json::json!({
                        "name": n.as_str(),
                        "unreadable": true,
                        "error": e.to_string(),
                    })
                }));
                cli::print_line(&serde_json::Value::Array(v).to_string());
            } else {
                cli::print_line(&format!(
                    "{:<32} {:<32} {:<7} {:<8} {:>10} {:>8}",
                    "NAME", "PARENT", "RUNTIME", "ENGINE", "OWN PAGES", "MEM MiB"
                ));
                let mut rows: Vec<(&str, String)> = list
                    .iter()
                    .map(|t| {
                        let made = made_with(t.name.as_str());
                        (
                            t.name.as_str(),
                            format!(
                                "{:<32} {:<32} {:<7} {:<8} {:>10} {:>8}",
                                t.name.as_str(),
                                t.parent.as_ref().map(|p| p.as_str()).unwrap_or("-"),
                                made.as_ref().map(|m| m.0.as_str()).unwrap_or("-"),
                                made.as_ref().map(|m| m.1.as_str()).unwrap_or("-"),
                                t.own_pages,
                                t.mem_size >> 20
                            ),
                        )
                    })
                    .collect();
                rows.extend(bad.iter().map(|(n, _)| {
                    (
                        n.as_str(),
                        format!("{:<32} UNREADABLE (see the error below)", n.as_str()),
                    )
                }));
                rows.sort();
                for (_, row) in rows {
                    cli::print_line(&row);
                }
            }
            for (n, e) in bad {
                eprintln!(
                    "vmm: error: template {n} cannot be read: {e}\n  `vmm-store verify` says what is damaged; `vmm template rm {n}` removes it"
                );
            }
            if bad.is_empty() {
                0
            } else {
                cli::EXIT_FAILURE
            }
        }
        TemplateCommand::Rm { name, store } => {
            let mut store = match open_store(&store, false) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            match store.remove(&name) {
                Ok(()) => {
                    eprintln!("removed template {name}");
                    0
                }
                Err(e) => fail(format!("template rm {name}: {e}")),
            }
        }
    }
}

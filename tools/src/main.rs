//! `vmm-store`: inspect and maintain the VMM's template store.
//!
//! Exit codes: 0 ok, 1 problems found (`verify`; `ls` with unreadable templates),
//! 2 usage or other errors.

use std::fs::{self, File};
use std::io::{self, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use snapshot_store::{
    ArtifactError, ArtifactGcPolicy, ArtifactGcReason, ExportError, GcError, ImportError,
    LoadError, OpenError, PackId, ReindexError, Severity, Store, PAGE_SIZE,
};

mod remote_cmds;
mod vmm_checks;

#[derive(Parser)]
#[command(
    name = "vmm-store",
    version,
    about = "Inspect and maintain the VMM template store"
)]
struct Cli {
    /// Store directory [default: $VMM_STORE, else $XDG_DATA_HOME/vmm/store, else ~/.local/share/vmm/store]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Machine-readable JSON on stdout instead of tables
    #[arg(long, global = true)]
    json: bool,
    /// The remote store, s3://BUCKET/PREFIX [default: $VMM_REMOTE]; with ls, stats, verify
    /// and gc it selects the remote instead of the local store (a bare --remote: $VMM_REMOTE)
    #[arg(long, global = true, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    remote: Option<String>,
    /// The remote's S3 endpoint, e.g. http://127.0.0.1:3900 [default: $VMM_REMOTE_ENDPOINT]
    #[arg(long, global = true, value_name = "URL")]
    remote_endpoint: Option<String>,
    /// The remote's signing region (Garage: garage) [default: $AWS_REGION, else us-east-1]
    #[arg(long, global = true, value_name = "REGION")]
    remote_region: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List templates with parent, size and creation time
    Ls {
        /// List the cached compiled modules instead (key, engine, size, module hash, last use)
        #[arg(long)]
        artifacts: bool,
    },
    /// Show a template's layer chain with per-layer page accounting
    Inspect { template: String },
    /// Logical vs physical bytes, dedup ratio, unique bytes, sharing
    Stats,
    /// Guest address ranges whose contents differ between two templates
    Diff { a: String, b: String },
    /// Check every pack, index and manifest (exit 1 on corruption)
    Verify,
    /// Remove pages and packs no template references, temp files, and damaged cached
    /// compiled modules (more of them with the options below)
    Gc {
        /// Report what would be removed without changing anything
        #[arg(long)]
        dry_run: bool,
        /// An engine in use (repeatable): cached compiled modules of any other engine
        /// are stale and removed
        #[arg(long = "current-engine", value_name = "ENGINE")]
        current_engines: Vec<String>,
        /// Also remove cached compiled modules not used for this long (e.g. 30d, 12h, 90m)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        artifacts_unused_for: Option<Duration>,
        /// Remove every cached compiled module
        #[arg(long)]
        all_artifacts: bool,
        /// With --remote: delete unreferenced objects only when a gc run at least this long
        /// ago marked them [default: 1h]; shorter than the longest push is unsafe
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Write a template and its parents into one self-contained file (`-`: stdout)
    Export {
        template: String,
        /// A new file, an existing regular file with --force, or `-` for stdout
        file: PathBuf,
        /// Replace FILE if it is an existing regular file (never a link, device, FIFO or directory)
        #[arg(long)]
        force: bool,
    },
    /// Import a file written by `export` (pages already present are not written again)
    Import { file: PathBuf },
    /// Upload templates (and every layer they are built on) to the remote, sending only
    /// pages it lacks (credentials: $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY)
    Push {
        #[arg(required = true)]
        templates: Vec<String>,
    },
    /// Fetch templates (and the layers they are built on) from the remote into the local
    /// store, reading only pages it lacks; every page is checked before it is written
    Pull {
        #[arg(required = true)]
        templates: Vec<String>,
        /// Then remove templates pulled earlier, least recently used first (never one in
        /// use, nor those just pulled), until the store's packs take at most SIZE (e.g. 8G)
        #[arg(long, value_name = "SIZE", value_parser = snapshot_store::parse_size)]
        store_limit: Option<u64>,
    },
    /// Rebuild a pack's index from the pack's bytes (when `verify` says its index is
    /// missing, damaged, stale or from another store)
    Reindex {
        /// The pack: its id (as in packs/0000000000000001.pack) or the path of its .pack or .idx file
        pack: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("no store directory: set $VMM_STORE or $HOME, or pass --store DIR")]
    NoStoreDir,
    #[error("opening the store: {0}{hint}", hint = open_hint(.0))]
    Open(#[from] OpenError),
    #[error("{}", load_message(step, source))]
    Load {
        step: &'static str,
        source: LoadError,
    },
    #[error("{msg}", msg = gc_message(.0))]
    Gc(#[from] GcError),
    #[error(transparent)]
    Reindex(#[from] ReindexError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error("{step} {path}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The library's gc error with the command that repairs it.
fn gc_message(e: &GcError) -> String {
    match e {
        GcError::Unaccounted { packs, .. } if !packs.is_empty() => format!(
            "{e}\n  hint: {}",
            packs
                .iter()
                .map(|p| format!("`vmm-store reindex {p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => e.to_string(),
    }
}

fn load_err(step: &'static str) -> impl FnOnce(LoadError) -> CliError {
    move |source| CliError::Load { step, source }
}

/// The library's load error with what to do at this command line.
fn load_message(step: &str, e: &LoadError) -> String {
    match e {
        LoadError::NotFound { .. } => {
            format!("{step}: {e}; `vmm-store ls` lists the templates")
        }
        _ => format!("{step}: {e}"),
    }
}

fn open_hint(e: &OpenError) -> &'static str {
    match e {
        OpenError::NotAStore { .. } => {
            "; pass --store DIR (or set $VMM_STORE) to use another store"
        }
        _ => "",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm-store: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn store_dir(cli: &Cli) -> Result<PathBuf, CliError> {
    cli.store
        .clone()
        .or_else(snapshot_store::default_store_dir)
        .ok_or(CliError::NoStoreDir)
}

fn progress_bar(what: &'static str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
    if io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{msg:8} [{bar:40}] {pos}/{len} ({eta})") {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(what);
    }
    pb
}

fn run(cli: &Cli) -> Result<u8, CliError> {
    let ra = remote_cmds::RemoteArgs {
        remote: cli.remote.as_deref(),
        endpoint: cli.remote_endpoint.as_deref(),
        region: cli.remote_region.as_deref(),
    };
    if cli.remote.is_some() {
        let out = match &cli.cmd {
            Cmd::Ls { artifacts: false } => return remote_cmds::ls(&ra, cli.json),
            Cmd::Verify => return remote_cmds::verify(&ra, cli.json),
            Cmd::Stats => remote_cmds::stats(&ra, cli.json)?,
            Cmd::Gc { dry_run, grace, .. } => remote_cmds::gc(&ra, *grace, *dry_run, cli.json)?,
            Cmd::Push { .. } | Cmd::Pull { .. } => String::new(),
            _ => {
                return Err(CliError::Usage(
                    "--remote works with push, pull, ls, stats, verify and gc".into(),
                ))
            }
        };
        if !out.is_empty() {
            print!("{out}");
            return Ok(0);
        }
    }
    if matches!(&cli.cmd, Cmd::Gc { grace: Some(_), .. }) {
        return Err(CliError::Usage("--grace is for gc --remote".into()));
    }
    let dir = store_dir(cli)?;
    let open = || Store::open(&dir).map_err(CliError::from);
    let out = match &cli.cmd {
        Cmd::Ls { artifacts: false } => return ls(&open()?, cli.json),
        Cmd::Ls { artifacts: true } => return ls_artifacts(&open()?, cli.json),
        Cmd::Inspect { template } => inspect(&open()?, template, cli.json)?,
        Cmd::Stats => stats(&open()?, cli.json)?,
        Cmd::Diff { a, b } => diff(&mut open()?, a, b, cli.json)?,
        Cmd::Verify => return verify(&open()?, cli.json),
        Cmd::Gc {
            dry_run,
            current_engines,
            artifacts_unused_for,
            all_artifacts,
            ..
        } => {
            let policy = ArtifactGcPolicy {
                current_engines: (!current_engines.is_empty()).then(|| current_engines.clone()),
                unused_for: *artifacts_unused_for,
                all: *all_artifacts,
            };
            gc(&mut open()?, *dry_run, &policy, cli.json)?
        }
        Cmd::Export {
            template,
            file,
            force,
        } => export(&mut open()?, template, file, *force, cli.json)?,
        Cmd::Import { file } => {
            let mut s = Store::create_or_open(&dir)?;
            import(&mut s, file, cli.json)?
        }
        Cmd::Reindex { pack } => reindex(&mut open()?, pack, cli.json)?,
        Cmd::Push { templates } => remote_cmds::push(&dir, &ra, templates, cli.json)?,
        Cmd::Pull {
            templates,
            store_limit,
        } => remote_cmds::pull(&dir, &ra, templates, *store_limit, cli.json)?,
    };
    print!("{out}");
    Ok(0)
}

// ---------------------------------------------------------------- formatting

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A duration such as `90s`, `30m`, `12h`, `30d` or `2w`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("{s:?} is not a duration: give a number and a unit, s, m, h, d or w (e.g. 30d)");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(bad)
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Left-aligned first column, right-aligned others.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 0 {
                s += &format!("{c:<w$}", w = w[0]);
            } else {
                s += &format!("  {c:>w$}", w = w[i]);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head.to_vec());
    for r in rows {
        s += &line(r.iter().map(|c| c.as_str()).collect());
    }
    s
}

fn to_json(v: Value) -> String {
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

const PAGE: u64 = PAGE_SIZE as u64;

// ---------------------------------------------------------------- commands

fn ls(s: &Store, as_json: bool) -> Result<u8, CliError> {
    let all = s.list_all().map_err(load_err("listing templates"))?;
    let (list, bad) = (&all.templates, &all.unreadable);
    let out = if as_json {
        let mut v: Vec<Value> = list
            .iter()
            .map(|t| {
                json!({
                    "name": t.name.as_str(),
                    "parent": t.parent.as_ref().map(|p| p.as_str()),
                    "mem_size": t.mem_size,
                    "own_pages": t.own_pages,
                    "own_bytes": t.own_pages * PAGE,
                    "zero_frames": t.zero_frames,
                    "created_unix_ms": t.created_unix_ms,
                })
            })
            .collect();
        v.extend(bad.iter().map(
            |(n, e)| json!({ "name": n.as_str(), "unreadable": true, "error": e.to_string() }),
        ));
        to_json(Value::Array(v))
    } else if list.is_empty() && bad.is_empty() {
        format!("no templates in {}\n", s.dir().display())
    } else {
        let mut rows: Vec<Vec<String>> = list
            .iter()
            .map(|t| {
                vec![
                    t.name.to_string(),
                    t.parent.as_ref().map_or("-".into(), |p| p.to_string()),
                    human(t.mem_size),
                    human(t.own_pages * PAGE),
                    utc(t.created_unix_ms),
                ]
            })
            .collect();
        rows.extend(bad.iter().map(|(n, _)| {
            let q = || "?".to_string();
            vec![n.to_string(), q(), q(), q(), "UNREADABLE".into()]
        }));
        rows.sort_by(|a, b| a[0].cmp(&b[0]));
        table(
            &["TEMPLATE", "PARENT", "MEMORY", "OWN PAGES", "CREATED (UTC)"],
            &rows,
        )
    };
    print!("{out}");
    if !as_json {
        if let Ok(a) = s.artifacts() {
            let n = a.artifacts.len() + a.unreadable.len();
            if n > 0 {
                let bytes: u64 = a.artifacts.iter().map(|a| a.file_bytes).sum();
                println!(
                    "\n{n} compiled module(s) cached ({}); `vmm-store ls --artifacts` lists them",
                    human(bytes)
                );
            }
        }
    }
    for (n, e) in bad {
        eprintln!(
            "vmm-store: warning: template {n} cannot be read: {e}\n  hint: `vmm-store verify` says what is damaged"
        );
    }
    Ok(if bad.is_empty() { 0 } else { 1 })
}

fn ls_artifacts(s: &Store, as_json: bool) -> Result<u8, CliError> {
    let mut all = s.artifacts()?;
    // Most recently used first.
    all.artifacts
        .sort_by_key(|a| std::cmp::Reverse(a.last_used_unix_ms));
    let (list, bad) = (&all.artifacts, &all.unreadable);
    let file = |p: &Path| {
        p.file_name().map_or_else(
            || p.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let out = if as_json {
        let mut v: Vec<Value> = list
            .iter()
            .map(|a| {
                json!({
                    "key": a.key.id(),
                    "engine": a.key.engine(),
                    "settings": a.key.settings(),
                    "module_sha256": a.key.module_sha256(),
                    "bytes": a.bytes,
                    "file_bytes": a.file_bytes,
                    "created_unix_ms": a.created_unix_ms,
                    "last_used_unix_ms": a.last_used_unix_ms,
                    "path": a.path.display().to_string(),
                })
            })
            .collect();
        v.extend(bad.iter().map(|(p, e)| {
            json!({ "path": p.display().to_string(), "unreadable": true, "error": e.to_string() })
        }));
        to_json(Value::Array(v))
    } else if list.is_empty() && bad.is_empty() {
        format!("no cached compiled modules in {}\n", s.dir().display())
    } else {
        let mut rows: Vec<Vec<String>> = list
            .iter()
            .map(|a| {
                vec![
                    a.key.short_id(),
                    a.key.engine().to_string(),
                    human(a.bytes),
                    a.key.module_sha256()[..16].to_string(),
                    utc(a.created_unix_ms),
                    utc(a.last_used_unix_ms),
                ]
            })
            .collect();
        rows.extend(bad.iter().map(|(p, _)| {
            let name = file(p);
            let q = || "?".to_string();
            vec![
                name.chars().take(16).collect(),
                q(),
                q(),
                q(),
                q(),
                "DAMAGED".into(),
            ]
        }));
        table(
            &[
                "KEY",
                "ENGINE",
                "SIZE",
                "MODULE SHA-256",
                "CREATED (UTC)",
                "LAST USED (UTC)",
            ],
            &rows,
        )
    };
    print!("{out}");
    for (p, e) in bad {
        eprintln!(
            "vmm-store: warning: {e}\n  hint: `vmm-store gc` removes damaged compiled modules ({})",
            file(p)
        );
    }
    Ok(if bad.is_empty() { 0 } else { 1 })
}

fn inspect(s: &Store, name: &str, as_json: bool) -> Result<String, CliError> {
    let layers = s.inspect(name).map_err(load_err("inspecting template"))?;
    if as_json {
        return Ok(to_json(json!({
            "template": name,
            "layers": layers.iter().map(|l| json!({
                "name": l.name.as_str(),
                "parent": l.parent.as_ref().map(|p| p.as_str()),
                "mem_size": l.mem_size,
                "created_unix_ms": l.created_unix_ms,
                "own_pages": l.own_pages,
                "own_distinct_pages": l.own_distinct_pages,
                "inherited_pages": l.inherited_pages,
                "zero_frames": l.zero_frames,
                "explicit_zero_frames": l.explicit_zero_frames,
                "shared_pages": l.shared_pages,
                "unique_pages": l.unique_pages,
                "own_bytes": l.own_bytes,
                "resolved_bytes": l.resolved_bytes,
                "working_set": l.working_set,
                "vcpu_state_bytes": l.vcpu_state_bytes,
                "device_state_bytes": l.device_state_bytes,
                "manifest_bytes": l.manifest_bytes,
            })).collect::<Vec<_>>(),
        })));
    }
    let chain: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let mut out = format!(
        "template {name}: {} layer(s): {}\nmemory {}, created {} UTC\n\n",
        layers.len(),
        chain.join(" -> "),
        human(layers[0].mem_size),
        utc(layers.last().map_or(0, |l| l.created_unix_ms)),
    );
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            vec![
                l.name.to_string(),
                l.own_pages.to_string(),
                l.inherited_pages.to_string(),
                l.zero_frames.to_string(),
                l.shared_pages.to_string(),
                human(l.own_bytes),
                human(l.resolved_bytes),
                l.working_set.to_string(),
            ]
        })
        .collect();
    out += &table(
        &[
            "LAYER",
            "OWN",
            "INHERITED",
            "ZERO",
            "SHARED",
            "OWN BYTES",
            "RESOLVED",
            "WORKING SET",
        ],
        &rows,
    );
    out += "\n(pages; SHARED = own pages other templates also store)\n";
    Ok(out)
}

fn stats(s: &Store, as_json: bool) -> Result<String, CliError> {
    let st = s.stats().map_err(load_err("computing stats"))?;
    let ratio = |l: u64| {
        if st.physical_bytes == 0 {
            0.0
        } else {
            l as f64 / st.physical_bytes as f64
        }
    };
    if as_json {
        return Ok(to_json(json!({
            "templates": st.templates.iter().map(|t| json!({
                "name": t.name.as_str(),
                "mem_size": t.mem_size,
                "own_pages": t.own_pages,
                "nonzero_frames": t.nonzero_frames,
                "unique_bytes": t.unique_bytes,
            })).collect::<Vec<_>>(),
            "logical_bytes": st.logical_bytes,
            "logical_nonzero_bytes": st.logical_nonzero_bytes,
            "physical_bytes": st.physical_bytes,
            "pack_bytes": st.pack_bytes,
            "index_bytes": st.index_bytes,
            "manifest_bytes": st.manifest_bytes,
            "config_bytes": st.config_bytes,
            "dedup_ratio": ratio(st.logical_bytes),
            "sparse_dedup_ratio": ratio(st.logical_nonzero_bytes),
            "stored_pages": st.stored_pages,
            "referenced_pages": st.referenced_pages,
            "artifacts": st.artifacts,
            "artifact_bytes": st.artifact_bytes,
            "shared_pairs": st.shared_pairs.iter().map(|p| json!({
                "a": p.a.as_str(), "b": p.b.as_str(), "pages": p.pages,
                "bytes": p.pages * PAGE,
            })).collect::<Vec<_>>(),
        })));
    }
    let mut out = format!(
        "templates          {}\n\
         logical (full)     {} ({} bytes)\n\
         logical (non-zero) {} ({} bytes)\n\
         physical on disk   {} ({} bytes: packs {}, indexes {}, manifests {}, config {})\n\
         dedup ratio        {:.2}x full, {:.2}x non-zero\n\
         pages              {} stored, {} referenced\n\
         compiled modules   {} cached, {} ({} bytes, apart from the above)\n\n",
        st.templates.len(),
        human(st.logical_bytes),
        st.logical_bytes,
        human(st.logical_nonzero_bytes),
        st.logical_nonzero_bytes,
        human(st.physical_bytes),
        st.physical_bytes,
        st.pack_bytes,
        st.index_bytes,
        st.manifest_bytes,
        st.config_bytes,
        ratio(st.logical_bytes),
        ratio(st.logical_nonzero_bytes),
        st.stored_pages,
        st.referenced_pages,
        st.artifacts,
        human(st.artifact_bytes),
        st.artifact_bytes,
    );
    let rows: Vec<Vec<String>> = st
        .templates
        .iter()
        .map(|t| {
            vec![
                t.name.to_string(),
                human(t.mem_size),
                human(t.nonzero_frames * PAGE),
                t.own_pages.to_string(),
                human(t.unique_bytes),
            ]
        })
        .collect();
    out += &table(
        &["TEMPLATE", "MEMORY", "NON-ZERO", "OWN PAGES", "UNIQUE"],
        &rows,
    );
    if !st.shared_pairs.is_empty() {
        out += "\nmost shared (own pages stored once for both):\n";
        let rows: Vec<Vec<String>> = st
            .shared_pairs
            .iter()
            .map(|p| {
                vec![
                    format!("{} + {}", p.a, p.b),
                    p.pages.to_string(),
                    human(p.pages * PAGE),
                ]
            })
            .collect();
        out += &table(&["TEMPLATES", "PAGES", "BYTES"], &rows);
    }
    Ok(out)
}

fn diff(s: &mut Store, a: &str, b: &str, as_json: bool) -> Result<String, CliError> {
    let d = s.diff(a, b).map_err(load_err("diffing templates"))?;
    if as_json {
        return Ok(to_json(json!({
            "a": d.a.as_str(),
            "b": d.b.as_str(),
            "differing_frames": d.differing_frames,
            "differing_bytes": d.differing_frames * PAGE,
            "ranges": d.ranges.iter().map(|r| json!({
                "start": r.start_addr(), "end": r.end_addr(),
                "first_frame": r.first_frame, "frames": r.frames,
            })).collect::<Vec<_>>(),
        })));
    }
    let mut out = format!(
        "{} vs {}: {} page(s) differ ({}) in {} range(s)\n",
        d.a,
        d.b,
        d.differing_frames,
        human(d.differing_frames * PAGE),
        d.ranges.len()
    );
    if !d.ranges.is_empty() {
        let rows: Vec<Vec<String>> = d
            .ranges
            .iter()
            .map(|r| {
                vec![
                    format!("{:#014x}", r.start_addr()),
                    format!("{:#014x}", r.end_addr()),
                    r.frames.to_string(),
                ]
            })
            .collect();
        out += &table(&["START", "END", "PAGES"], &rows);
    }
    Ok(out)
}

fn verify(s: &Store, as_json: bool) -> Result<u8, CliError> {
    let pb = progress_bar("verify");
    let mut probs = s.verify_with_progress(&mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    probs.extend(vmm_checks::problems(s));
    let corrupt = probs.iter().filter(|p| p.is_corruption()).count();
    let garbage = probs.len() - corrupt;
    let mut out = String::new();
    if as_json {
        out = to_json(json!({
            "ok": corrupt == 0,
            "corruption": corrupt,
            "garbage": garbage,
            "problems": probs.iter().map(|p| json!({
                "severity": match p.severity { Severity::Corruption => "corruption", Severity::Garbage => "garbage" },
                "path": p.path.display().to_string(),
                "what": p.what,
                "hint": p.hint,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for p in &probs {
            let sev = if p.is_corruption() {
                "error"
            } else {
                "warning"
            };
            out += &format!(
                "{sev}: {}: {}\n  hint: {}\n",
                p.path.display(),
                p.what,
                p.hint
            );
        }
        out += &if corrupt > 0 {
            format!(
                "{}: {corrupt} corruption problem(s), {garbage} garbage warning(s)\n",
                s.dir().display()
            )
        } else if garbage > 0 {
            format!(
                "{}: healthy; {garbage} garbage warning(s) (`vmm-store gc` reclaims the space)\n",
                s.dir().display()
            )
        } else {
            format!("{}: healthy\n", s.dir().display())
        };
    }
    print!("{out}");
    let _ = io::stdout().flush();
    Ok(if corrupt > 0 { 1 } else { 0 })
}

fn gc(
    s: &mut Store,
    dry_run: bool,
    policy: &ArtifactGcPolicy,
    as_json: bool,
) -> Result<String, CliError> {
    let pb = progress_bar("gc");
    let r = s.gc_with_progress(dry_run, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let r = r?;
    let a = s.gc_artifacts(policy, dry_run)?;
    let reason = |r: &ArtifactGcReason| match r {
        ArtifactGcReason::Damaged(_) => "damaged",
        ArtifactGcReason::Stale => "stale",
        ArtifactGcReason::Unused => "unused",
        ArtifactGcReason::All => "all",
        ArtifactGcReason::DeadTemp => "dead_temp",
    };
    if as_json {
        return Ok(to_json(json!({
            "artifacts": {
                "removed": a.removed.iter().map(|x| json!({
                    "path": x.path.display().to_string(),
                    "engine": x.engine,
                    "reason": reason(&x.reason),
                    "detail": x.reason.to_string(),
                    "bytes": x.file_bytes,
                })).collect::<Vec<_>>(),
                "removed_bytes": a.removed_bytes(),
                "kept": a.kept,
                "kept_bytes": a.kept_bytes,
                "skipped": a.skipped,
            },
            "dry_run": r.dry_run,
            "templates": r.templates,
            "referenced_pages": r.referenced_pages,
            "removed_pages": r.removed_pages,
            "packs_deleted": r.packs_deleted,
            "packs_rewritten": r.packs_rewritten,
            "pages_copied": r.pages_copied,
            "packs_created": r.packs_created.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "tail_bytes": r.tail_bytes,
            "tmp_files": r.tmp_files,
            "tmp_bytes": r.tmp_bytes,
            "cache_files": r.cache_files,
            "cache_bytes": r.cache_bytes,
            "bytes_before": r.bytes_before,
            "bytes_after": r.bytes_after,
            "bytes_freed": r.bytes_freed(),
            "skipped": r.skipped,
            "location_records": r.location_records,
        })));
    }
    let verb = if r.dry_run { "would remove" } else { "removed" };
    let mut out = format!(
        "{verb} {} unreferenced page(s): {} pack(s) deleted, {} rewritten ({} live page(s) copied), {} temp file(s), {} torn tail byte(s), {} stale cache file(s)\n\
         {} kept for {} template(s); packs+indexes {} -> {} ({} freed)\n",
        r.removed_pages,
        r.packs_deleted,
        r.packs_rewritten,
        r.pages_copied,
        r.tmp_files,
        r.tail_bytes,
        r.cache_files,
        r.referenced_pages,
        r.templates,
        human(r.bytes_before),
        human(r.bytes_after),
        human(r.bytes_freed()),
    );
    for sk in &r.skipped {
        out += &format!("warning: left damaged pack alone: {sk}\n  hint: run `vmm-store verify`\n");
    }
    if r.location_records > 0 {
        out += &format!(
            "wrote the location records of {} template(s) (new, or outdated by moved pages): a restore reads its template's records, not every pack index\n",
            r.location_records
        );
    }
    let count = |k: &str| a.removed.iter().filter(|x| reason(&x.reason) == k).count();
    out += &format!(
        "{verb} {} cached compiled module file(s) ({}): {} damaged, {} stale, {} unused, {} by --all-artifacts, {} left by dead writers; kept {} ({})\n",
        a.removed.len(),
        human(a.removed_bytes()),
        count("damaged"),
        count("stale"),
        count("unused"),
        count("all"),
        count("dead_temp"),
        a.kept,
        human(a.kept_bytes),
    );
    for x in &a.removed {
        let name = x
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out += &format!(
            "  {verb} {name}{}: {}\n",
            x.engine
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            x.reason
        );
    }
    for sk in &a.skipped {
        out += &format!("warning: left a cached compiled module alone: {sk}\n");
    }
    Ok(out)
}

/// Refuses destinations export must not replace: anything but a regular file,
/// and an existing regular file without `--force`. Returns whether it exists.
fn check_export_dest(file: &Path, force: bool) -> Result<bool, CliError> {
    use std::os::unix::fs::FileTypeExt;
    let refuse = |what: &str| {
        Err(CliError::Usage(format!(
            "export: {} is {what}; export only writes a new regular file, or replaces one with --force",
            file.display()
        )))
    };
    let m = match fs::symlink_metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(CliError::Io {
                step: "checking the export destination",
                path: file.to_path_buf(),
                source,
            })
        }
    };
    let t = m.file_type();
    if t.is_symlink() {
        refuse("a symbolic link (give the path it points to, if that is what you mean)")
    } else if t.is_dir() {
        refuse("a directory (give a file name inside it)")
    } else if t.is_char_device() || t.is_block_device() {
        refuse("a device")
    } else if t.is_fifo() {
        refuse("a FIFO (to stream the export, give `-` and redirect stdout)")
    } else if t.is_socket() {
        refuse("a socket")
    } else if !t.is_file() {
        refuse("not a regular file")
    } else if !force {
        Err(CliError::Usage(format!(
            "export: {} already exists; pass --force to replace it",
            file.display()
        )))
    } else {
        Ok(true)
    }
}

fn export(
    s: &mut Store,
    name: &str,
    file: &Path,
    force: bool,
    as_json: bool,
) -> Result<String, CliError> {
    let to_stdout = file.as_os_str() == "-";
    let io_err = |step: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::Io { step, path, source }
    };
    let pb = progress_bar("export");
    let mut progress = |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    };
    let r = if to_stdout {
        let out = io::stdout();
        if out.is_terminal() {
            return Err(CliError::Usage(
                "export: stdout is a terminal; redirect it to a file or a pipe (or give a file name)"
                    .into(),
            ));
        }
        let r = s.export_with_progress(name, out.lock(), &mut progress);
        pb.finish_and_clear();
        r?
    } else {
        let existed = check_export_dest(file, force)?;
        // Written beside the target and put in place at the end, so a failed export
        // leaves no partial file. The temp name is new (O_EXCL: never a link).
        let tmp = file.with_file_name(format!(
            ".{}.{}.partial",
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "export".into()),
            std::process::id()
        ));
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("creating export file", &tmp))?;
        let r = s.export_with_progress(name, &f, &mut progress);
        pb.finish_and_clear();
        let placed = r
            .and_then(|r| {
                f.sync_all()
                    .map(|_| r)
                    .map_err(|source| ExportError::Write { source })
            })
            .map_err(CliError::from)
            .and_then(|r| place_export(&tmp, file, existed, force).map(|_| r));
        match placed {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
    };
    let chain: Vec<&str> = r.templates.iter().map(|n| n.as_str()).collect();
    let dest = if to_stdout {
        "stdout".to_string()
    } else {
        file.display().to_string()
    };
    let summary = if as_json {
        to_json(json!({
            "file": dest,
            "templates": chain,
            "pages": r.pages,
            "bytes": r.bytes,
        }))
    } else {
        format!(
            "exported {} ({} pages, {}) to {dest}\n",
            chain.join(" -> "),
            r.pages,
            human(r.bytes),
        )
    };
    if to_stdout {
        // stdout holds the export itself.
        eprint!("{summary}");
        return Ok(String::new());
    }
    Ok(summary)
}

/// Moves the finished temp file to `file`: never over anything but the regular
/// file checked before (`--force`), and over nothing at all otherwise.
fn place_export(tmp: &Path, file: &Path, existed: bool, force: bool) -> Result<(), CliError> {
    let io_err = |step: &'static str| {
        let path = file.to_path_buf();
        move |source| CliError::Io { step, path, source }
    };
    if existed && force {
        // Checked again right before replacing it.
        check_export_dest(file, true)?;
        return fs::rename(tmp, file).map_err(io_err("putting the export file in place"));
    }
    // A hard link never replaces an existing name (whatever appeared there meanwhile).
    match fs::hard_link(tmp, file) {
        Ok(()) => fs::remove_file(tmp).map_err(io_err("removing the export temp file")),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            check_export_dest(file, force)?;
            Err(io_err("putting the export file in place")(e))
        }
        Err(_) => {
            // A file system without hard links.
            if check_export_dest(file, force)? {
                return Err(CliError::Usage(format!(
                    "export: {} appeared meanwhile; pass --force to replace it",
                    file.display()
                )));
            }
            fs::rename(tmp, file).map_err(io_err("putting the export file in place"))
        }
    }
}

fn import(s: &mut Store, file: &Path, as_json: bool) -> Result<String, CliError> {
    let f = File::open(file).map_err(|source| CliError::Io {
        step: "opening import file",
        path: file.to_path_buf(),
        source,
    })?;
    let pb = progress_bar("import");
    let r = s.import_with_progress(BufReader::new(f), &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    });
    pb.finish_and_clear();
    let r = r?;
    if as_json {
        return Ok(to_json(json!({
            "templates": r.templates.iter().map(|t| json!({
                "name": t.name.as_str(), "created": t.created,
            })).collect::<Vec<_>>(),
            "pages": r.pages,
            "new_pages": r.new_pages,
        })));
    }
    let mut out = String::new();
    for t in &r.templates {
        out += &format!(
            "{} {}\n",
            if t.created {
                "imported"
            } else {
                "already present"
            },
            t.name
        );
    }
    out += &format!(
        "{} page(s) in file, {} written, {} already in the store\n",
        r.pages,
        r.new_pages,
        r.pages - r.new_pages
    );
    Ok(out)
}

fn reindex(s: &mut Store, pack: &str, as_json: bool) -> Result<String, CliError> {
    let id: PackId = pack.parse().map_err(CliError::Usage)?;
    let r = s.reindex(id)?;
    if as_json {
        return Ok(to_json(json!({
            "pack": r.pack.to_string(),
            "old_entries": r.old_entries,
            "entries": r.entries,
            "partial_tail": r.partial_tail,
        })));
    }
    let old = r
        .old_entries
        .map_or("no readable index".to_string(), |n| format!("{n} entries"));
    Ok(format!(
        "rebuilt the index of pack {}: {} page(s) indexed (the old index had {old}){}\nrun `vmm-store verify` to check the store\n",
        r.pack,
        r.entries,
        if r.partial_tail > 0 {
            format!("; a partial page of {} bytes at its end stays unindexed", r.partial_tail)
        } else {
            String::new()
        }
    ))
}

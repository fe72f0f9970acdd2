//! `vmm-store push`, `pull`, and `ls`/`stats`/`verify`/`gc` with `--remote`.

use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use remote_store::{
    GcOptions, Progress, Remote, RemoteConfig, RemoteError, RemoteSeverity, RequestKind,
};
use serde_json::{json, Value};
use snapshot_store::{LayersError, Store};

use crate::{human, progress_bar, table, to_json, utc, CliError};

/// Where the remote is, from the command line or the environment.
pub struct RemoteArgs<'a> {
    /// `Some("")`: `--remote` without a value (use `$VMM_REMOTE`).
    pub remote: Option<&'a str>,
    pub endpoint: Option<&'a str>,
    pub region: Option<&'a str>,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Whether a signing region was given (flag or $AWS_REGION), for the hint on a refusal.
static REGION_GIVEN: AtomicBool = AtomicBool::new(false);

pub fn connect(a: &RemoteArgs<'_>) -> Result<Remote, CliError> {
    REGION_GIVEN.store(
        a.region.is_some() || env("AWS_REGION").is_some(),
        Ordering::Relaxed,
    );
    let url = match a.remote {
        Some(u) if !u.is_empty() => u.to_string(),
        _ => env("VMM_REMOTE").ok_or_else(|| {
            CliError::Usage("no remote: pass --remote s3://BUCKET/PREFIX or set $VMM_REMOTE".into())
        })?,
    };
    let endpoint = a
        .endpoint
        .map(str::to_string)
        .or_else(|| env("VMM_REMOTE_ENDPOINT"));
    let cfg = RemoteConfig::from_env(&url, endpoint.as_deref(), a.region).map_err(remote_err)?;
    Remote::connect(&cfg).map_err(remote_err)
}

/// The library's error with what to do at this command line.
pub fn remote_err(e: RemoteError) -> CliError {
    let hint = match &e {
        RemoteError::NoEndpoint => {
            "; pass --remote-endpoint URL or set $VMM_REMOTE_ENDPOINT (e.g. http://127.0.0.1:3900)"
        }
        RemoteError::Request {
            kind: RequestKind::Denied,
            ..
        } if !REGION_GIVEN.load(Ordering::Relaxed) => {
            "; the request was signed for region us-east-1: for Garage pass --remote-region garage (or set $AWS_REGION)"
        }
        RemoteError::Write(LayersError::Conflict { .. }) => {
            "; remove the local template first (`vmm template rm NAME`), or pull into another store"
        }
        RemoteError::NotOnRemote { .. } => "; `vmm-store ls --remote` lists the remote's templates",
        _ => "",
    };
    CliError::Usage(format!("{e}{hint}"))
}

/// A progress bar on a terminal (nothing otherwise) fed by the library's progress calls.
fn bar() -> (indicatif::ProgressBar, impl FnMut(Progress)) {
    let pb = progress_bar("remote");
    let pb2 = pb.clone();
    let mut phase = "";
    (pb, move |p: Progress| {
        if p.phase != phase {
            phase = p.phase;
            pb2.set_message(p.phase);
            pb2.set_position(0);
        }
        pb2.set_length(p.total);
        pb2.set_position(p.done);
    })
}

fn traffic_json(t: &remote_store::Traffic) -> Value {
    json!({
        "bytes_sent": t.bytes_up,
        "bytes_received": t.bytes_down,
        "puts": t.puts,
        "gets": t.gets,
        "lists": t.lists,
        "deletes": t.deletes,
    })
}

pub fn push(
    store: &Path,
    a: &RemoteArgs<'_>,
    names: &[String],
    as_json: bool,
) -> Result<String, CliError> {
    let s = Store::open(store)?;
    let remote = connect(a)?;
    let (pb, mut cb) = bar();
    let r = remote_store::push(&s, &remote, names, &mut cb);
    pb.finish_and_clear();
    let r = r.map_err(remote_err)?;
    if as_json {
        return Ok(to_json(json!({
            "remote": remote.display(),
            "templates": r.templates.iter().map(|t| json!({
                "name": t.name, "manifest": t.manifest, "uploaded": t.uploaded,
            })).collect::<Vec<_>>(),
            "pages": r.pages,
            "pages_uploaded": r.pages_uploaded,
            "packs_uploaded": r.packs_uploaded,
            "traffic": traffic_json(&r.traffic),
        })));
    }
    let rows: Vec<Vec<String>> = r
        .templates
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                if t.uploaded {
                    "pushed"
                } else {
                    "already there"
                }
                .into(),
                t.manifest[..16].to_string(),
            ]
        })
        .collect();
    let mut out = table(&["TEMPLATE", "STATUS", "MANIFEST"], &rows);
    out += &format!(
        "{}: {} page(s) in the pushed layers, {} uploaded in {} pack(s); {} sent in {} request(s)\n",
        remote.display(),
        r.pages,
        r.pages_uploaded,
        r.packs_uploaded,
        human(r.traffic.bytes_up),
        r.traffic.puts + r.traffic.gets + r.traffic.lists
    );
    Ok(out)
}

pub fn pull(
    store: &Path,
    a: &RemoteArgs<'_>,
    names: &[String],
    store_limit: Option<u64>,
    as_json: bool,
) -> Result<String, CliError> {
    let mut s = Store::create_or_open(store)?;
    let remote = connect(a)?;
    let (pb, mut cb) = bar();
    let r = remote_store::pull(&mut s, &remote, names, &mut cb);
    pb.finish_and_clear();
    let r = r.map_err(remote_err)?;
    let evicted = match store_limit {
        Some(limit) => {
            let keep: Vec<&str> = r.templates.iter().map(|t| t.name.as_str()).collect();
            Some(remote_store::evict(&mut s, limit, &keep).map_err(remote_err)?)
        }
        None => None,
    };
    if as_json {
        return Ok(to_json(json!({
            "remote": remote.display(),
            "templates": r.templates.iter().map(|t| json!({
                "name": t.name, "created": t.created,
            })).collect::<Vec<_>>(),
            "pages": r.pages,
            "pages_fetched": r.pages_fetched,
            "ranges": r.ranges,
            "new_pages": r.new_pages,
            "traffic": traffic_json(&r.traffic),
            "evicted": evicted.as_ref().map(|e| &e.removed),
            "pack_bytes": evicted.as_ref().map(|e| e.bytes_after),
        })));
    }
    let rows: Vec<Vec<String>> = r
        .templates
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                if t.created { "pulled" } else { "already here" }.into(),
            ]
        })
        .collect();
    let mut out = table(&["TEMPLATE", "STATUS"], &rows);
    out += &format!(
        "{}: {} page(s) needed, {} fetched in {} ranged read(s), {} received\n",
        remote.display(),
        r.pages,
        r.pages_fetched,
        r.ranges,
        human(r.traffic.bytes_down)
    );
    if let Some(e) = evicted {
        out += &format!(
            "store limit: evicted {} ({} -> {} of packs)\n",
            if e.removed.is_empty() {
                "nothing".into()
            } else {
                e.removed.join(", ")
            },
            human(e.bytes_before),
            human(e.bytes_after)
        );
    }
    Ok(out)
}

pub fn ls(a: &RemoteArgs<'_>, as_json: bool) -> Result<u8, CliError> {
    let remote = connect(a)?;
    let l = remote_store::list(&remote).map_err(remote_err)?;
    let out = if as_json {
        to_json(json!({
            "remote": remote.display(),
            "templates": l.templates.iter().map(|t| json!({
                "name": t.name,
                "parent": t.parent,
                "mem_size": t.mem_size,
                "own_pages": t.own_pages,
                "created_unix_ms": t.created_unix_ms,
                "pushed_unix_ms": t.pushed_unix_ms,
                "manifest": t.manifest,
            })).collect::<Vec<_>>(),
            "unreadable": l.unreadable.iter().map(|(n, e)| json!({"name": n, "error": e})).collect::<Vec<_>>(),
        }))
    } else {
        let rows: Vec<Vec<String>> = l
            .templates
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    t.parent.clone().unwrap_or_else(|| "-".into()),
                    human(t.mem_size),
                    t.own_pages.to_string(),
                    utc(t.pushed_unix_ms),
                ]
            })
            .collect();
        let mut out = table(
            &["NAME", "PARENT", "MEMORY", "OWN PAGES", "PUSHED (UTC)"],
            &rows,
        );
        for (n, e) in &l.unreadable {
            out += &format!("unreadable: {n}: {e}\n");
        }
        out
    };
    print!("{out}");
    let _ = io::stdout().flush();
    Ok(if l.unreadable.is_empty() { 0 } else { 1 })
}

pub fn stats(a: &RemoteArgs<'_>, as_json: bool) -> Result<String, CliError> {
    let remote = connect(a)?;
    let s = remote_store::stats(&remote).map_err(remote_err)?;
    if as_json {
        return Ok(to_json(json!({
            "remote": remote.display(),
            "templates": s.templates,
            "logical_nonzero_bytes": s.logical_nonzero_bytes,
            "unique_page_bytes": s.unique_page_bytes,
            "physical_bytes": s.physical_bytes,
            "objects": s.objects,
            "packs": s.packs,
            "pack_bytes": s.pack_bytes,
            "dedup_ratio": s.dedup_ratio,
            "unreadable": s.unreadable.iter().map(|(n, e)| json!({"name": n, "error": e})).collect::<Vec<_>>(),
        })));
    }
    let mut out = format!(
        "remote:              {}\ntemplates:           {}\nlogical (non-zero):  {}\nunique pages:        {}\nphysical (objects):  {} in {} object(s), packs {} in {}\ndedup ratio:         {:.2}x\n",
        remote.display(),
        s.templates,
        human(s.logical_nonzero_bytes),
        human(s.unique_page_bytes),
        human(s.physical_bytes),
        s.objects,
        human(s.pack_bytes),
        s.packs,
        s.dedup_ratio
    );
    for (n, e) in &s.unreadable {
        out += &format!("unreadable: {n}: {e}\n");
    }
    Ok(out)
}

pub fn verify(a: &RemoteArgs<'_>, as_json: bool) -> Result<u8, CliError> {
    let remote = connect(a)?;
    let (pb, mut cb) = bar();
    let r = remote_store::verify(&remote, &mut cb);
    pb.finish_and_clear();
    let (probs, templates, _) = r.map_err(remote_err)?;
    let corrupt = probs
        .iter()
        .filter(|p| p.severity == RemoteSeverity::Corruption)
        .count();
    let garbage = probs.len() - corrupt;
    let out = if as_json {
        to_json(json!({
            "remote": remote.display(),
            "ok": corrupt == 0,
            "templates": templates,
            "corruption": corrupt,
            "garbage": garbage,
            "problems": probs.iter().map(|p| json!({
                "severity": match p.severity { RemoteSeverity::Corruption => "corruption", RemoteSeverity::Garbage => "garbage" },
                "object": p.object,
                "templates": p.templates,
                "what": p.message,
            })).collect::<Vec<_>>(),
        }))
    } else {
        let mut out = String::new();
        for p in &probs {
            let sev = match p.severity {
                RemoteSeverity::Corruption => "error",
                RemoteSeverity::Garbage => "warning",
            };
            let t = if p.templates.is_empty() {
                String::new()
            } else {
                format!(" (template {})", p.templates.join(", "))
            };
            out += &format!("{sev}: {}{t}: {}\n", p.object, p.message);
        }
        out += &if corrupt > 0 {
            format!("{}: {corrupt} corruption problem(s), {garbage} garbage warning(s); push the affected templates again\n", remote.display())
        } else if garbage > 0 {
            format!("{}: healthy, {templates} template(s); {garbage} garbage warning(s) (`vmm-store gc --remote` reclaims the space)\n", remote.display())
        } else {
            format!("{}: healthy, {templates} template(s)\n", remote.display())
        };
        out
    };
    print!("{out}");
    let _ = io::stdout().flush();
    Ok(if corrupt > 0 { 1 } else { 0 })
}

pub fn gc(
    a: &RemoteArgs<'_>,
    grace: Option<Duration>,
    dry_run: bool,
    as_json: bool,
) -> Result<String, CliError> {
    let remote = connect(a)?;
    let mut opts = GcOptions {
        dry_run,
        ..Default::default()
    };
    if let Some(g) = grace {
        opts.grace = g;
    }
    let r = remote_store::gc(&remote, opts).map_err(remote_err)?;
    if as_json {
        return Ok(to_json(json!({
            "remote": remote.display(),
            "dry_run": dry_run,
            "grace_secs": opts.grace.as_secs(),
            "templates": r.templates,
            "deleted": r.deleted,
            "deleted_bytes": r.deleted_bytes,
            "marked": r.marked,
            "marked_bytes": r.marked_bytes,
            "marked_unix_ms": r.marked_unix_ms,
        })));
    }
    let verb = if dry_run { "would delete" } else { "deleted" };
    Ok(format!(
        "{}: {verb} {} object(s) ({}); {} unreferenced object(s) ({}) marked at {} UTC, deleted by a gc run at least {}s after that\n",
        remote.display(),
        r.deleted.len(),
        human(r.deleted_bytes),
        r.marked.len(),
        human(r.marked_bytes),
        utc(r.marked_unix_ms),
        opts.grace.as_secs()
    ))
}

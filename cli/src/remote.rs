//! Workers that pull on demand: `vmm restore NAME --remote URL` (and `vmm serve --remote`)
//! fetch a template the local store lacks from the remote store before restoring it.
//! Concurrent pulls of one template on one machine do the work once (the remote-store
//! crate takes a lock file per template; a waiting pull finds the template there).
//!
//! Deployed functions travel too (`vmm serve --remote`, issue 20): [`push_function`] after a
//! deploy, [`pull_function`] on a worker's first request for a function it lacks,
//! [`remove_function_remote`] after a removal (the remote-store crate's `functions` module
//! has the layout and the rules).
//!
//! tests/remote.rs compiles this file on its own (`#[path]`) to call these functions: it
//! may use external crates only, no `crate::` item.

use std::path::Path;
use std::time::Instant;

use clap::Args;
use snapshot_store::Store;

/// Where the remote store is (pulls need `$AWS_ACCESS_KEY_ID` and `$AWS_SECRET_ACCESS_KEY`).
#[derive(Args, Clone, Debug, Default)]
pub struct RemoteArgs {
    /// Pull the template from this remote store when the local store lacks it:
    /// s3://BUCKET/PREFIX (credentials from $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY)
    #[arg(long, value_name = "URL", env = "VMM_REMOTE")]
    pub remote: Option<String>,
    /// The remote's S3 endpoint, e.g. http://127.0.0.1:3900
    #[arg(long, value_name = "URL", env = "VMM_REMOTE_ENDPOINT")]
    pub remote_endpoint: Option<String>,
    /// The remote's signing region (Garage: garage) [default: $AWS_REGION, else us-east-1]
    #[arg(long, value_name = "REGION")]
    pub remote_region: Option<String>,
    /// After a pull, remove templates pulled earlier, least recently used first (never one
    /// in use), until the store's packs take at most this much (e.g. 512M, 8G)
    #[arg(long, value_name = "SIZE", value_parser = snapshot_store::parse_size, env = "VMM_STORE_LIMIT")]
    pub store_limit: Option<u64>,
}

/// What a pull on demand did.
#[derive(Clone, Debug)]
pub struct Pulled {
    pub layers_created: usize,
    pub pages_fetched: u64,
    pub bytes_received: u64,
    pub ms: f64,
    /// Templates evicted afterwards to keep the store within `--store-limit`.
    pub evicted: Vec<String>,
}

/// A template made ready for use from a remote: pulled if it was missing, marked in use
/// (eviction leaves it alone while this lives) and its use recorded.
pub struct Ready {
    pub pulled: Option<Pulled>,
    pub in_use: Option<remote_store::InUse>,
}

/// With a remote: marks template `name` in use (eviction leaves it alone while the
/// result lives; this waits while it is being evicted), records the use, and pulls it
/// if the store lacks it. Without a remote: nothing.
pub fn prepare(dir: &Path, name: &str, args: &RemoteArgs) -> Result<Ready, String> {
    if args.remote.as_deref().is_none_or(str::is_empty) {
        return Ok(Ready {
            pulled: None,
            in_use: None,
        });
    }
    // The store may not exist yet on a new worker; the lock lives in it.
    Store::create_or_open(dir)
        .map_err(|e| format!("open the template store {}: {e}", dir.display()))?;
    let in_use = remote_store::in_use(dir, name).map_err(|e| e.to_string())?;
    let pulled = pull_if_missing(dir, name, args)?;
    if !has_template(dir, name) {
        // On neither side (a made-up name, say): leave no marker files for it.
        drop(in_use);
        remote_store::forget(dir, name);
        return Ok(Ready {
            pulled,
            in_use: None,
        });
    }
    remote_store::touch_used(dir, name);
    Ok(Ready {
        pulled,
        in_use: Some(in_use),
    })
}

fn has_template(dir: &Path, name: &str) -> bool {
    snapshot_store::TemplateName::new(name).is_ok()
        && dir.join("templates").join(format!("{name}.tmpl")).exists()
}

/// Pulls template `name` into the store at `dir` (created if need be) when a remote is
/// given and the store lacks it. None: nothing to do (no remote, the store has it, or
/// the remote does not have it either).
pub fn pull_if_missing(
    dir: &Path,
    name: &str,
    args: &RemoteArgs,
) -> Result<Option<Pulled>, String> {
    let Some(url) = args.remote.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if has_template(dir, name) {
        return Ok(None);
    }
    let t0 = Instant::now();
    let cfg = remote_store::RemoteConfig::from_env(
        url,
        args.remote_endpoint.as_deref(),
        args.remote_region.as_deref(),
    )
    .map_err(|e| match e {
        remote_store::RemoteError::NoEndpoint => {
            format!("{e}: pass --remote-endpoint URL or set $VMM_REMOTE_ENDPOINT")
        }
        e => e.to_string(),
    })?;
    let remote = remote_store::Remote::connect(&cfg).map_err(|e| e.to_string())?;
    let mut store = Store::create_or_open(dir)
        .map_err(|e| format!("open the template store {}: {e}", dir.display()))?;
    let r = match remote_store::pull(&mut store, &remote, &[name.to_string()], &mut |_| {}) {
        Ok(r) => r,
        // Not there either: the caller reports the template as unknown.
        Err(remote_store::RemoteError::NotOnRemote { .. }) => return Ok(None),
        Err(e) => return Err(format!("pull {name} from the remote: {e}")),
    };
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut evicted = Vec::new();
    if let Some(limit) = args.store_limit {
        let e = remote_store::evict(&mut store, limit, &[name])
            .map_err(|e| format!("after pulling {name}: {e}"))?;
        evicted = e.removed;
    }
    Ok(Some(Pulled {
        layers_created: r.templates.iter().filter(|t| t.created).count(),
        pages_fetched: r.pages_fetched,
        bytes_received: r.traffic.bytes_down,
        ms,
        evicted,
    }))
}

/// The remote `args` names, connected (None: no remote given).
fn connect_remote(args: &RemoteArgs) -> Result<Option<remote_store::Remote>, String> {
    let Some(url) = args.remote.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let cfg = remote_store::RemoteConfig::from_env(
        url,
        args.remote_endpoint.as_deref(),
        args.remote_region.as_deref(),
    )
    .map_err(|e| match e {
        remote_store::RemoteError::NoEndpoint => {
            format!("{e}: pass --remote-endpoint URL or set $VMM_REMOTE_ENDPOINT")
        }
        e => e.to_string(),
    })?;
    remote_store::Remote::connect(&cfg)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn need_remote(args: &RemoteArgs) -> Result<remote_store::Remote, String> {
    connect_remote(args)?.ok_or_else(|| "no remote: pass --remote s3://BUCKET/PREFIX".into())
}

/// The blobs a deploy spec (`vmm::function::DeploySpec` JSON) names: its `module` and the
/// `digest` of each of its `files`.
pub fn spec_blobs(spec: &[u8]) -> Result<Vec<snapshot_store::BlobDigest>, String> {
    let s: vmm::function::DeploySpec =
        serde_json::from_slice(spec).map_err(|e| format!("not a deploy spec: {e}"))?;
    let parse = |what: &str, d: &str| {
        snapshot_store::BlobDigest::parse(d)
            .ok_or_else(|| format!("{what} {} is not sha256:HEX", vmm::text::shown(d)))
    };
    let mut out = Vec::with_capacity(s.files.len() + 1);
    if let Some(m) = &s.module {
        out.push(parse("module", m)?);
    }
    for f in &s.files {
        if let Some(d) = &f.digest {
            out.push(parse("file digest", d)?);
        }
    }
    Ok(out)
}

pub use remote_store::{FunctionTemplate, PulledFunction, PushedFunction};

/// Pushes function `name` from the store at `dir` to the remote: the blob of its spec,
/// every blob the spec names and the template its record names (each only if the remote
/// lacks it), then its record; a removed function's record goes alone. Nothing is sent
/// when the remote's record is later (another worker's deploy or removal:
/// `RecordPush::Superseded`) or holds another spec under the same version (another
/// worker's deploy at the same time: `RecordPush::Conflict`; deploy again as the next
/// version). Err: no remote given, the store lacks the function or a blob, or the remote
/// failed.
#[allow(dead_code)] // serve's deploy (issue 20)
pub fn push_function(dir: &Path, name: &str, args: &RemoteArgs) -> Result<PushedFunction, String> {
    let remote = need_remote(args)?;
    let store =
        Store::open(dir).map_err(|e| format!("open the template store {}: {e}", dir.display()))?;
    remote_store::push_function(&store, &remote, name, &spec_blobs, &mut |_| {})
        .map_err(|e| format!("push function {name} to the remote: {e}"))
}

/// Pulls function `name` into the store at `dir` (created if need be): the remote's
/// record, written locally when it is later than the local one (or there is none), with
/// the blobs of its spec the store lacks (each checked against its SHA-256 first), then
/// the template the record names if the store lacks it. `Ok(None)`: no remote given, or
/// the remote has no record of `name` (the store is untouched). `Ok(Some(rec))`: the
/// store's record now (the remote's when later, else the local one, kept); it may be
/// removed (`rec.removed`), and its template may be missing (not built yet, or missing on
/// the remote too): then build it from the spec.
#[allow(dead_code)] // serve's first request for a function it lacks (issue 20)
pub fn pull_function(
    dir: &Path,
    name: &str,
    args: &RemoteArgs,
) -> Result<Option<snapshot_store::FunctionRecord>, String> {
    Ok(pull_function_fitting(dir, name, args, None)?.map(|p| p.record))
}

/// [`pull_function`] with its report, pulling the template only when the record says it
/// was built for `fits` (`vmm::function::build_fingerprint`; None: whatever it was built
/// for): one built for something else is [`FunctionTemplate::DoesNotFit`], not fetched.
/// After a template is pulled, `--store-limit` evicts as [`pull_if_missing`] does.
#[allow(dead_code)] // serve (issue 20)
pub fn pull_function_fitting(
    dir: &Path,
    name: &str,
    args: &RemoteArgs,
    fits: Option<&str>,
) -> Result<Option<PulledFunction>, String> {
    let Some(remote) = connect_remote(args)? else {
        return Ok(None);
    };
    let mut store = Store::create_or_open(dir)
        .map_err(|e| format!("open the template store {}: {e}", dir.display()))?;
    let p = remote_store::pull_function(&mut store, &remote, name, &spec_blobs, fits, &mut |_| {})
        .map_err(|e| format!("pull function {name} from the remote: {e}"))?;
    if let (Some(p), Some(limit)) = (&p, args.store_limit) {
        if let (FunctionTemplate::Pulled(_), Some(t)) = (&p.template, &p.record.template) {
            remote_store::evict(&mut store, limit, &[t.as_str()])
                .map_err(|e| format!("after pulling {t}: {e}"))?;
        }
    }
    Ok(p)
}

/// The remote's record of function `name` (None: no remote given, or it has none): a
/// deploy continues its version numbers when it is later than the local store's.
#[allow(dead_code)] // serve's deploy (issue 20)
pub fn remote_function_record(
    name: &str,
    args: &RemoteArgs,
) -> Result<Option<snapshot_store::FunctionRecord>, String> {
    let Some(remote) = connect_remote(args)? else {
        return Ok(None);
    };
    remote_store::remote_record(&remote, name)
        .map(|r| r.map(|(rec, _)| rec))
        .map_err(|e| format!("read function {name}'s record on the remote: {e}"))
}

/// After a removal: pushes the store's record of function `name`, which must say removed
/// (write it locally first), so that every worker's next pull finds it removed. Its
/// template and blobs stay on the remote (older versions' do too).
#[allow(dead_code)] // serve's DELETE (issue 20)
pub fn remove_function_remote(
    dir: &Path,
    name: &str,
    args: &RemoteArgs,
) -> Result<PushedFunction, String> {
    let rec = snapshot_store::FunctionStore::new(dir)
        .record(name)
        .map_err(|e| format!("read function {name}'s record: {e}"))?;
    match rec {
        Some(r) if r.removed => push_function(dir, name, args),
        Some(_) => Err(format!(
            "function {name} is not removed in the store {}: write its removed record first",
            dir.display()
        )),
        None => Err(format!(
            "function {name} is not in the store {}",
            dir.display()
        )),
    }
}

//! Workers that pull on demand: `vmm restore NAME --remote URL` (and `vmm serve --remote`)
//! fetch a template the local store lacks from the remote store before restoring it.
//! Concurrent pulls of one template on one machine do the work once (the remote-store
//! crate takes a lock file per template; a waiting pull finds the template there).

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

/// Push deployed function `name` (placeholder until the remote side lands).
pub fn push_function(_dir: &Path, _name: &str, _args: &RemoteArgs) -> Result<(), String> {
    Err("pushing functions to a remote is not supported yet".into())
}

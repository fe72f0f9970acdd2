//! A size limit for a worker's local store: templates pulled from the remote (and only
//! those: they can be pulled again) are removed least recently used first, never one in
//! use, and the store's gc then reclaims their pages.
//!
//! Kept under the store's `remote/` directory:
//! * `pulled/<name>`: the template came from a remote (written by pull);
//! * `used/<name>`: its modification time is the template's last use (touched by
//!   [`touch_used`]: `vmm restore --remote` and `vmm serve --remote` on every use);
//! * `inuse/<name>.lock`: a shared `flock` held while the template is in use
//!   ([`InUse`]); eviction takes it exclusively without waiting, and skips a template
//!   whose lock it cannot take. A template with children is never removed before them.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use snapshot_store::{Store, TemplateName};

use crate::error::RemoteError;

fn dir(store: &Path, sub: &str) -> PathBuf {
    store.join("remote").join(sub)
}

fn open_lock(store: &Path, name: &str) -> Result<File, RemoteError> {
    let d = dir(store, "inuse");
    fs::create_dir_all(&d).map_err(|source| RemoteError::Local {
        step: "creating the in-use lock directory",
        path: d.clone(),
        source,
    })?;
    let p = d.join(format!("{name}.lock"));
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(|source| RemoteError::Local {
            step: "opening an in-use lock",
            path: p,
            source,
        })
}

/// Template `name` is in use while this lives: eviction leaves it alone.
pub struct InUse(#[allow(dead_code)] File);

/// Marks template `name` of the store at `store` in use (waits while it is being evicted).
pub fn in_use(store: &Path, name: &str) -> Result<InUse, RemoteError> {
    TemplateName::new(name).map_err(snapshot_store::LoadError::from)?;
    let f = open_lock(store, name)?;
    f.lock_shared().map_err(|source| RemoteError::Local {
        step: "taking an in-use lock",
        path: dir(store, "inuse").join(format!("{name}.lock")),
        source,
    })?;
    Ok(InUse(f))
}

fn touch(p: &Path) {
    if let Some(d) = p.parent() {
        let _ = fs::create_dir_all(d);
    }
    let ok = File::options()
        .write(true)
        .open(p)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if ok.is_err() {
        let _ = File::create(p);
    }
}

/// Records a use of template `name` (its last use decides when it is evicted).
pub fn touch_used(store: &Path, name: &str) {
    if TemplateName::new(name).is_ok() {
        touch(&dir(store, "used").join(name));
    }
}

/// Removes the marker files of template `name` (one that exists on neither side).
pub fn forget(store: &Path, name: &str) {
    if TemplateName::new(name).is_ok() {
        let _ = fs::remove_file(dir(store, "inuse").join(format!("{name}.lock")));
        let _ = fs::remove_file(dir(store, "used").join(name));
        let _ = fs::remove_file(dir(store, "locks").join(format!("{name}.lock")));
    }
}

/// Records that template `name` came from a remote (so it may be evicted).
pub(crate) fn record_pulled(store: &Path, name: &str) {
    touch(&dir(store, "pulled").join(name));
    touch(&dir(store, "used").join(name));
}

/// Bytes of the store's packs.
pub fn pack_bytes(store: &Path) -> u64 {
    fs::read_dir(store.join("packs"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".pack")))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// What [`evict`] did.
#[derive(Clone, Debug, Default)]
pub struct EvictReport {
    /// Templates removed, in order.
    pub removed: Vec<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Removes pulled templates, least recently used first, until the store's packs take
/// at most `limit` bytes (or nothing more may go). Never removes `keep`, a template in
/// use, one with children, or one that did not come from a remote.
pub fn evict(store: &mut Store, limit: u64, keep: &[&str]) -> Result<EvictReport, RemoteError> {
    let root = store.dir().to_path_buf();
    let mut report = EvictReport {
        bytes_before: pack_bytes(&root),
        ..Default::default()
    };
    report.bytes_after = report.bytes_before;
    while report.bytes_after > limit {
        let templates = store.list()?;
        let has_children = |n: &str| {
            templates
                .iter()
                .any(|t| t.parent.as_ref().is_some_and(|p| p.as_str() == n))
        };
        let mut cands: Vec<(SystemTime, String)> = Vec::new();
        if let Ok(rd) = fs::read_dir(dir(&root, "pulled")) {
            for e in rd.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if keep.contains(&name.as_str())
                    || !templates.iter().any(|t| t.name.as_str() == name)
                    || has_children(&name)
                {
                    continue;
                }
                let used = fs::metadata(dir(&root, "used").join(&name))
                    .or_else(|_| e.metadata())
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                cands.push((used, name));
            }
        }
        cands.sort();
        let mut removed = None;
        for (_, name) in cands {
            let f = open_lock(&root, &name)?;
            if f.try_lock().is_err() {
                continue; // in use
            }
            match store.remove(&name) {
                Ok(()) => {}
                // Gained a child or went meanwhile: not this one.
                Err(_) => continue,
            }
            let _ = fs::remove_file(dir(&root, "pulled").join(&name));
            let _ = fs::remove_file(dir(&root, "used").join(&name));
            removed = Some(name);
            break;
        }
        let Some(name) = removed else { break };
        report.removed.push(name);
        store.gc(false).map_err(|e| {
            RemoteError::Evict(format!(
                "reclaiming the pages of {}: {e}",
                report.removed.join(", ")
            ))
        })?;
        report.bytes_after = pack_bytes(&root);
    }
    Ok(report)
}

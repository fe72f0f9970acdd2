//! Deployed functions on the remote: a function's record and the content-addressed
//! blobs of its spec (the spec itself, the module and the files it names), beside the
//! templates, so that a function deployed on one worker is served by any other.
//!
//! ```text
//! s3://BUCKET/PREFIX/
//! ├── blobs/<HEX>.blob      a blob of a local store's `blobs/`, named by its SHA-256:
//! │                         uploaded once (a push skips one the remote has at that size),
//! │                         never changed, checked against its name by every pull before
//! │                         it is written into a local store
//! └── functions/<NAME>.fn   a function's record, the very bytes the local store keeps
//!                           (`FunctionStore::record_bytes`: magic, checksum, bincode);
//!                           replaced whole by each push, written after everything it names
//! ```
//!
//! A function's template (`templates/fn.NAME.vN...`) is an ordinary template, pushed and
//! pulled as any other, so gc keeps it while its reference exists. gc never deletes a blob
//! or a record (it collects only packs and manifests); `verify` checks every record and
//! every blob's bytes.
//!
//! # Which record wins
//!
//! Records are ordered by version, and at one version a removed record comes after the
//! one it removes, and one with a template after the same spec's record without (built
//! since; see [`supersedes`]). A push leaves the remote's record alone when it is later than the one
//! pushed ([`RecordPush::Superseded`]); a pull writes the remote's record into the local
//! store only when it is later than the local one (or the store has none), so neither
//! ever goes back to an earlier version. Two workers that deploy one name at once may
//! both make version N: the later push finds the other's spec under N and leaves it
//! ([`RecordPush::Conflict`]), so the remote keeps one spec per version.
//!
//! # What a killed or concurrent push or pull leaves
//!
//! A push sends the blobs, then the template, then the record: a reader that finds the
//! record finds everything it names (a killed push leaves at most blobs and template
//! layers no record names). A pull fetches the spec blob and every blob the spec names,
//! checks each against its SHA-256 before it is written (atomically, content-addressed),
//! and writes the record last; pulls of one function on one machine take a lock file
//! (`remote/locks/functions/<name>.lock`) in turn, so the later ones find the work done.

use std::collections::BTreeSet;

use snapshot_store::{
    function_template_name, valid_function_name, BlobDigest, FunctionRecord, FunctionStore,
    FunctionStoreError, Store,
};

use crate::cache;
use crate::client::{Remote, Traffic};
use crate::error::RemoteError;
use crate::pull::{has_template, PullReport};
use crate::push::PushReport;
use crate::Progress;

/// Largest spec blob read (a deploy's body is at most 16 MiB).
pub const MAX_SPEC_BYTES: u64 = 32 << 20;
/// Largest other blob (module or file) read from the remote.
pub const MAX_BLOB_BYTES: u64 = 1 << 30;
/// Most blobs one spec may name.
pub const MAX_SPEC_BLOBS: usize = 4096;

/// The blobs a spec names (its module and files), given the spec's bytes. The caller
/// knows the spec's format (the VMM's `DeploySpec`); this crate does not.
pub type SpecBlobs<'a> = dyn Fn(&[u8]) -> Result<Vec<BlobDigest>, String> + 'a;

/// `blobs/HEX.blob`.
pub fn blob_key(d: &BlobDigest) -> String {
    format!("blobs/{}.blob", d.hex())
}

/// `functions/NAME.fn`.
pub fn function_key(name: &str) -> String {
    format!("functions/{name}.fn")
}

/// The blob a key `blobs/HEX.blob` names (lower-case hex only, as push writes it).
pub fn parse_blob_key(key: &str) -> Option<BlobDigest> {
    let hex = key.strip_prefix("blobs/")?.strip_suffix(".blob")?;
    if hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    BlobDigest::parse(&format!("sha256:{hex}"))
}

/// The function a key `functions/NAME.fn` names.
pub fn parse_function_key(key: &str) -> Option<&str> {
    let name = key.strip_prefix("functions/")?.strip_suffix(".fn")?;
    valid_function_name(name).then_some(name)
}

/// Later records sort after earlier ones: by version, then a removal after what it removes.
fn order(r: &FunctionRecord) -> (u64, bool) {
    (r.version, r.removed)
}

/// Whether record `a` is later than `b`: a later version, a removal of `b`'s version, or
/// `b`'s very spec and version with a template where `b` has none (built since).
pub fn supersedes(a: &FunctionRecord, b: &FunctionRecord) -> bool {
    order(a) > order(b)
        || (order(a) == order(b)
            && a.spec == b.spec
            && a.template.is_some()
            && b.template.is_none())
}

fn check_name(name: &str) -> Result<(), RemoteError> {
    if valid_function_name(name) {
        Ok(())
    } else {
        Err(FunctionStoreError::BadName { name: name.into() }.into())
    }
}

/// The remote's record of function `name` and its bytes (None: the remote has none).
/// A record that does not decode, is another function's, or names a template that is
/// not one of this function's (`fn.NAME.` ...) is refused as damaged.
pub fn remote_record(
    remote: &Remote,
    name: &str,
) -> Result<Option<(FunctionRecord, Vec<u8>)>, RemoteError> {
    check_name(name)?;
    let key = function_key(name);
    let Some(b) = remote.get(
        "reading function record",
        &key,
        FunctionStore::MAX_RECORD_BYTES,
    )?
    else {
        return Ok(None);
    };
    let rec = decode_remote_record(name, &b).map_err(|reason| RemoteError::DamagedObject {
        object: key,
        reason,
    })?;
    Ok(Some((rec, b.to_vec())))
}

/// Decodes a record read from the remote (the reason when it is refused).
pub fn decode_remote_record(name: &str, bytes: &[u8]) -> Result<FunctionRecord, String> {
    let rec = FunctionStore::decode_record_bytes(name, bytes).map_err(|e| match e {
        FunctionStoreError::DamagedRecord { why, .. } => why,
        e => e.to_string(),
    })?;
    let prefix = format!("fn.{name}.");
    if let Some(t) = &rec.template {
        if !t.starts_with(&prefix) {
            return Err(format!(
                "it names template {t:?}, not one of function {name}'s (such as {})",
                function_template_name(name, rec.version)
            ));
        }
    }
    Ok(rec)
}

/// A function record on the remote.
#[derive(Clone, Debug)]
pub struct ListedFunction {
    pub name: String,
    /// Its record, or why it cannot be read.
    pub record: Result<FunctionRecord, String>,
}

/// Every function record on the remote, by name, each decoded or with why it cannot be.
pub fn list_functions(remote: &Remote) -> Result<Vec<ListedFunction>, RemoteError> {
    let mut names: Vec<String> = remote
        .list("listing functions", "functions")?
        .iter()
        .filter_map(|o| parse_function_key(&o.key).map(str::to_string))
        .collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let r = match remote_record(remote, &n) {
            Ok(Some((rec, _))) => Ok(rec),
            Ok(None) => continue,
            Err(RemoteError::DamagedObject { reason, .. }) => Err(reason),
            Err(e) => return Err(e),
        };
        out.push(ListedFunction { name: n, record: r });
    }
    Ok(out)
}

/// The spec's blob and every blob it names, each once, spec first.
fn spec_and_blobs(
    spec: BlobDigest,
    spec_bytes: &[u8],
    spec_blobs: &SpecBlobs<'_>,
) -> Result<Vec<BlobDigest>, String> {
    let named = spec_blobs(spec_bytes).map_err(|e| format!("its spec {spec}: {e}"))?;
    if named.len() > MAX_SPEC_BLOBS {
        return Err(format!(
            "its spec {spec} names {} blobs, more than {MAX_SPEC_BLOBS}",
            named.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut all = vec![spec];
    seen.insert(spec);
    for d in named {
        if seen.insert(d) {
            all.push(d);
        }
    }
    Ok(all)
}

/// What a push did with the function's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordPush {
    /// Written: the remote's record is now this store's.
    Written,
    /// The remote had these very bytes already: only blobs it lacked were sent (the
    /// template was pushed with the record then, and is not pushed again).
    AlreadyThere,
    /// The remote has a later record of the function (another worker's deploy or removal);
    /// it was left alone.
    Superseded { version: u64, removed: bool },
    /// The remote has another spec under this very version (another worker deployed the
    /// name at the same time); it was left alone. Deploy again as the next version.
    Conflict { version: u64 },
}

/// What [`push_function`] did.
#[derive(Clone, Debug)]
pub struct PushedFunction {
    /// The local record pushed.
    pub record: FunctionRecord,
    pub status: RecordPush,
    /// Blobs the function uses: its spec and what the spec names.
    pub blobs: u64,
    pub blobs_uploaded: u64,
    pub blob_bytes_uploaded: u64,
    /// The push of the record's template (None: no template pushed).
    pub template: Option<PushReport>,
    /// The record names a template this store does not have: it was not pushed (a worker
    /// that pulls the function builds it again from the spec).
    pub template_missing: bool,
    pub traffic: Traffic,
}

/// Uploads function `name` from `store` (its record, and unless it is removed, the blob
/// of its spec, every blob the spec names and the template the record names): blobs the
/// remote has (at their size) are not sent again, the template goes through [`push`]
/// (pages the remote lacks only), and the record is written last. A remote record later
/// than this store's, or another spec under the same version, is left alone and nothing
/// is sent ([`RecordPush::Superseded`], [`RecordPush::Conflict`]); when
/// the remote has this very record, only blobs it lacks are sent
/// ([`RecordPush::AlreadyThere`]).
///
/// [`push`]: crate::push::push
pub fn push_function(
    store: &Store,
    remote: &Remote,
    name: &str,
    spec_blobs: &SpecBlobs<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushedFunction, RemoteError> {
    check_name(name)?;
    let t0 = remote.traffic();
    let fs = FunctionStore::new(store.dir());
    let local_err = |e: FunctionStoreError| RemoteError::Function {
        name: name.to_string(),
        reason: e.to_string(),
    };
    let bytes = fs
        .record_bytes(name)
        .map_err(local_err)?
        .ok_or_else(|| RemoteError::Function {
            name: name.to_string(),
            reason: format!("it is not in the local store {}", store.dir().display()),
        })?;
    let rec = FunctionStore::decode_record_bytes(name, &bytes).map_err(local_err)?;
    // What every puller will check.
    decode_remote_record(name, &bytes).map_err(|reason| RemoteError::Function {
        name: name.to_string(),
        reason: format!("its record cannot go to the remote: {reason}"),
    })?;
    let mut out = PushedFunction {
        record: rec.clone(),
        status: RecordPush::Written,
        blobs: 0,
        blobs_uploaded: 0,
        blob_bytes_uploaded: 0,
        template: None,
        template_missing: false,
        traffic: Traffic::default(),
    };
    // A later record there: leave it and send nothing. The very same bytes: only blobs the
    // remote lacks (one may have been deleted since) are sent, not the template again.
    // One that does not decode is replaced.
    let check = |remote: &Remote| -> Result<Option<RecordPush>, RemoteError> {
        Ok(match remote_record(remote, name) {
            Ok(Some((_, b))) if b == bytes => Some(RecordPush::AlreadyThere),
            Ok(Some((r, _))) if supersedes(&r, &rec) => Some(RecordPush::Superseded {
                version: r.version,
                removed: r.removed,
            }),
            Ok(Some((r, _))) if order(&r) == order(&rec) && r.spec != rec.spec => {
                Some(RecordPush::Conflict { version: r.version })
            }
            Ok(_) | Err(RemoteError::DamagedObject { .. }) => None,
            Err(e) => return Err(e),
        })
    };
    let first = check(remote)?;
    if let Some(s @ (RecordPush::Superseded { .. } | RecordPush::Conflict { .. })) = first {
        out.status = s;
        out.traffic = remote.traffic().since(&t0);
        return Ok(out);
    }
    let already = first == Some(RecordPush::AlreadyThere);
    if !rec.removed {
        let spec_bytes = fs
            .get_blob(&rec.spec_digest(), MAX_SPEC_BYTES)
            .map_err(local_err)?;
        let all = spec_and_blobs(rec.spec_digest(), &spec_bytes, spec_blobs).map_err(|reason| {
            RemoteError::Function {
                name: name.to_string(),
                reason,
            }
        })?;
        drop(spec_bytes);
        out.blobs = all.len() as u64;
        let total: u64 = all.iter().filter_map(|d| fs.blob_size(d)).sum();
        let mut done = 0u64;
        for d in &all {
            let local_size = fs
                .blob_size(d)
                .ok_or_else(|| local_err(FunctionStoreError::MissingBlob { digest: *d }))?;
            let key = blob_key(d);
            if remote.size("looking for blob", &key)? != Some(local_size) {
                // Read (and checked against its name) only when it is sent.
                let b = fs.get_blob(d, MAX_BLOB_BYTES).map_err(local_err)?;
                let n = b.len() as u64;
                remote.put("uploading blob", &key, b)?;
                out.blobs_uploaded += 1;
                out.blob_bytes_uploaded += n;
            }
            done += local_size;
            progress(Progress::new("uploading blobs", done, total));
        }
        if let Some(t) = rec.template.as_ref().filter(|_| !already) {
            if has_template(store, t) {
                out.template = Some(crate::push::push(
                    store,
                    remote,
                    std::slice::from_ref(t),
                    progress,
                )?);
            } else {
                out.template_missing = true;
            }
        }
    }
    if already {
        out.status = RecordPush::AlreadyThere;
    } else if let Some(s) = check(remote)? {
        // Another worker wrote a later record meanwhile (or this very one).
        out.status = s;
    } else {
        remote.put("writing function record", &function_key(name), bytes)?;
    }
    out.traffic = remote.traffic().since(&t0);
    Ok(out)
}

/// What became of the template of a pulled function's record.
#[derive(Clone, Debug)]
pub enum FunctionTemplate {
    /// The record names none (built on first invoke, not yet built) or the function is removed.
    None,
    /// The local store has it (it had it already).
    Here,
    /// Pulled from the remote now.
    Pulled(PullReport),
    /// Built for something else than the `fits` asked for: not pulled.
    DoesNotFit,
    /// The remote does not have it either.
    NotOnRemote,
}

/// What [`pull_function`] did.
#[derive(Clone, Debug)]
pub struct PulledFunction {
    /// The local store's record now: the remote's when it was later, else the local one.
    pub record: FunctionRecord,
    /// The remote's record.
    pub remote: FunctionRecord,
    /// The remote's record was later and is now the local store's.
    pub record_written: bool,
    pub blobs_fetched: u64,
    pub blob_bytes_fetched: u64,
    pub template: FunctionTemplate,
    pub traffic: Traffic,
}

fn damaged(name: &str, key: String, reason: String) -> RemoteError {
    RemoteError::FunctionDamaged {
        function: name.to_string(),
        object: key,
        reason,
    }
}

/// Fetches blob `d` into `fs` (checked against its name first): its size.
fn fetch_blob(
    remote: &Remote,
    fs: &FunctionStore,
    name: &str,
    d: &BlobDigest,
    limit: u64,
) -> Result<u64, RemoteError> {
    let key = blob_key(d);
    let b = match remote.get("reading blob", &key, limit) {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(damaged(
                name,
                key,
                "is missing (the function's spec needs it): push the function again from a worker that has it".into(),
            ))
        }
        Err(RemoteError::DamagedObject { reason, .. }) => {
            return Err(damaged(
                name,
                key,
                format!("is refused ({reason}): delete it and push the function again from a worker that has it"),
            ))
        }
        Err(e) => return Err(e),
    };
    let actual = BlobDigest::of(&b);
    if actual != *d {
        return Err(damaged(
            name,
            key,
            format!(
                "is damaged: its bytes hash to {actual}, not to its name; delete it and push the function again from a worker that has it"
            ),
        ));
    }
    fs.put_blob(&b).map_err(|e| RemoteError::Function {
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(b.len() as u64)
}

/// Fetches function `name` from `remote` into `store`: the remote's record (Ok(None):
/// the remote has none, and nothing was done), and when it is later than the local
/// store's record (or the store has none, or a damaged one): the spec's blob and every
/// blob the spec names that the store lacks, each checked against its SHA-256 before it
/// is written, then the record. Then the template the local store's record now names,
/// unless the function is removed, the store has it, or it was built for something else
/// than `fits` (when given): pulled as [`pull`](crate::pull::pull) pulls it; one the
/// remote does not have is [`FunctionTemplate::NotOnRemote`], not an error (build it
/// again from the spec). Pulls of one function on one machine run one at a time.
pub fn pull_function(
    store: &mut Store,
    remote: &Remote,
    name: &str,
    spec_blobs: &SpecBlobs<'_>,
    fits: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<PulledFunction>, RemoteError> {
    check_name(name)?;
    let t0 = remote.traffic();
    let _lock = cache::lock_function(store, name)?;
    let fs = FunctionStore::new(store.dir());
    let key = function_key(name);
    let (theirs, bytes) = match remote_record(remote, name) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(RemoteError::DamagedObject { object, reason }) => {
            return Err(damaged(
                name,
                object,
                format!("is damaged ({reason}): push the function again from a worker that has it"),
            ))
        }
        Err(e) => return Err(e),
    };
    let local_err = |e: FunctionStoreError| RemoteError::Function {
        name: name.to_string(),
        reason: e.to_string(),
    };
    // A damaged local record is replaced.
    let ours = match fs.record(name) {
        Ok(r) => r,
        Err(FunctionStoreError::DamagedRecord { .. }) => None,
        Err(e) => return Err(local_err(e)),
    };
    let later =
        |ours: &Option<FunctionRecord>| ours.as_ref().is_none_or(|o| supersedes(&theirs, o));
    let mut out = PulledFunction {
        record: theirs.clone(),
        remote: theirs.clone(),
        record_written: false,
        blobs_fetched: 0,
        blob_bytes_fetched: 0,
        template: FunctionTemplate::None,
        traffic: Traffic::default(),
    };
    if later(&ours) {
        if !theirs.removed {
            let spec = theirs.spec_digest();
            let spec_bytes = match fs.get_blob(&spec, MAX_SPEC_BYTES) {
                Ok(b) => b,
                Err(
                    FunctionStoreError::MissingBlob { .. } | FunctionStoreError::DamagedBlob { .. },
                ) => {
                    fs.remove_blob(&spec).map_err(local_err)?;
                    let n = fetch_blob(remote, &fs, name, &spec, MAX_SPEC_BYTES)?;
                    out.blobs_fetched += 1;
                    out.blob_bytes_fetched += n;
                    fs.get_blob(&spec, MAX_SPEC_BYTES).map_err(local_err)?
                }
                Err(e) => return Err(local_err(e)),
            };
            let all = spec_and_blobs(spec, &spec_bytes, spec_blobs).map_err(|reason| {
                damaged(name, blob_key(&spec), format!("is refused: {reason}"))
            })?;
            drop(spec_bytes);
            let want: Vec<&BlobDigest> = all[1..].iter().filter(|d| !fs.has_blob(d)).collect();
            let total = want.len() as u64;
            for (i, d) in want.into_iter().enumerate() {
                let n = fetch_blob(remote, &fs, name, d, MAX_BLOB_BYTES)?;
                out.blobs_fetched += 1;
                out.blob_bytes_fetched += n;
                progress(Progress::new("downloading blobs", i as u64 + 1, total));
            }
        }
        // Still later than what the store has now (a deploy here may have written one)?
        let now = match fs.record(name) {
            Ok(r) => r,
            Err(FunctionStoreError::DamagedRecord { .. }) => None,
            Err(e) => return Err(local_err(e)),
        };
        if later(&now) {
            fs.put_record_bytes(name, &bytes).map_err(|e| match e {
                FunctionStoreError::DamagedRecord { why, .. } => damaged(
                    name,
                    key.clone(),
                    format!(
                        "is damaged ({why}): push the function again from a worker that has it"
                    ),
                ),
                e => local_err(e),
            })?;
            out.record_written = true;
        } else if let Some(r) = now {
            out.record = r;
        }
    } else if let Some(r) = ours {
        out.record = r;
    }
    out.template = match &out.record.template {
        _ if out.record.removed => FunctionTemplate::None,
        None => FunctionTemplate::None,
        Some(_) if fits.is_some_and(|f| out.record.built_for.as_deref() != Some(f)) => {
            FunctionTemplate::DoesNotFit
        }
        Some(t) if has_template(store, t) => FunctionTemplate::Here,
        Some(t) => match crate::pull::pull(store, remote, std::slice::from_ref(t), progress) {
            Ok(r) => FunctionTemplate::Pulled(r),
            Err(RemoteError::NotOnRemote { .. }) => FunctionTemplate::NotOnRemote,
            Err(e) => return Err(e),
        },
    };
    out.traffic = remote.traffic().since(&t0);
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_others_are_not_taken_for_blobs_or_records() {
        let d = BlobDigest::of(b"x");
        assert_eq!(parse_blob_key(&blob_key(&d)), Some(d));
        assert_eq!(parse_function_key(&function_key("f-1")), Some("f-1"));
        for k in [
            "blobs/zz.blob",
            "blobs/.blob",
            &format!("blobs/{}.blob", d.hex().to_uppercase()),
            &format!("blobs/{}", d.hex()),
            "packs/x.pack",
        ] {
            assert_eq!(parse_blob_key(k), None, "{k}");
        }
        for k in [
            "functions/a.b.fn",
            "functions/.fn",
            "functions/f",
            "templates/f",
        ] {
            assert_eq!(parse_function_key(k), None, "{k}");
        }
    }

    #[test]
    fn a_removal_is_later_than_what_it_removes() {
        let r = |version, removed| FunctionRecord {
            name: "f".into(),
            version,
            spec: [0; 32],
            template: None,
            built_for: None,
            created_unix_ms: 0,
            removed,
        };
        assert!(order(&r(2, false)) > order(&r(1, true)));
        assert!(order(&r(2, true)) > order(&r(2, false)));
        assert!(supersedes(&r(2, true), &r(2, false)));
        assert!(!supersedes(&r(2, false), &r(2, false)));
        assert!(!supersedes(&r(1, true), &r(2, false)));
        let mut built = r(2, false);
        built.template = Some("fn.f.v2".into());
        assert!(supersedes(&built, &r(2, false)));
        assert!(!supersedes(&r(2, false), &built));
        let mut other_spec = built.clone();
        other_spec.spec = [1; 32];
        assert!(!supersedes(&other_spec, &r(2, false)));
    }

    #[test]
    fn a_record_naming_another_functions_template_is_refused() {
        let d = std::env::temp_dir().join(format!("rs-fn-{}", std::process::id()));
        let fs = FunctionStore::new(&d);
        let mut rec = FunctionRecord {
            name: "f".into(),
            version: 1,
            spec: [0; 32],
            template: Some("fn.f.v1".into()),
            built_for: None,
            created_unix_ms: 0,
            removed: false,
        };
        fs.put_record(&rec).unwrap();
        let b = fs.record_bytes("f").unwrap().unwrap();
        assert_eq!(decode_remote_record("f", &b).unwrap(), rec);
        assert!(decode_remote_record("g", &b).is_err());
        rec.template = Some("fn.g.v1".into());
        fs.put_record(&rec).unwrap();
        let b = fs.record_bytes("f").unwrap().unwrap();
        let e = decode_remote_record("f", &b).unwrap_err();
        assert!(e.contains("fn.g.v1"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

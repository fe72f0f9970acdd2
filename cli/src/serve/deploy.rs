//! The deploy API (docs/api.md): `PUT /v1/modules` and `/v1/files` (content-addressed
//! uploads), `PUT`, `GET` and `DELETE /v1/functions/NAME`. Every answer is JSON.

use super::http::{json, read_limited, Resp, State};
use super::registry::Deployed;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use snapshot_store::{valid_function_name, BlobDigest, FunctionRecord};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use vmm::error::ErrorKind;
use vmm::function::{Build, DeploySpec, Runtime};

/// Largest spec (`PUT /v1/functions/NAME` body).
pub(super) const MAX_SPEC_BODY: usize = 16 << 20;

fn err(status: StatusCode, msg: impl Into<String>) -> Resp {
    json(status, &json!({ "error": msg.into() }))
}

fn etag(version: u64) -> String {
    format!("\"v{version}\"")
}

fn with_etag(mut r: Resp, version: u64) -> Resp {
    if let Ok(v) = etag(version).parse() {
        r.headers_mut().insert(hyper::header::ETAG, v);
    }
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `PUT /v1/modules` or `/v1/files`: store the body once, named by its SHA-256.
pub(super) async fn upload(state: &State, req: Request<Incoming>, module: bool) -> Resp {
    if !state.deploy {
        return off();
    }
    let reg = &state.registry;
    let body = match read_limited(req.into_body(), state.max_upload, state.upload_timeout).await {
        Ok(b) => b,
        Err((status, msg)) => return err(status, msg),
    };
    if module && !body.starts_with(b"\0asm") {
        return err(
            StatusCode::BAD_REQUEST,
            "not a WebAssembly binary (it does not start with \\0asm); compile .wat text first",
        );
    }
    let size = body.len();
    let fstore = reg.store().clone();
    let stored = tokio::task::spawn_blocking(move || fstore.put_blob(&body)).await;
    match stored {
        Ok(Ok((digest, created))) => json(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &json!({"digest": digest.to_string(), "size": size, "created": created}),
        ),
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("store the upload: {e}"),
        ),
        Err(_) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store the upload: the task panicked",
        ),
    }
}

/// `HEAD /v1/modules/sha256:HEX` (or files): 200 when the store has it, else 404.
pub(super) fn has_blob(state: &State, digest: &str) -> Resp {
    if !state.deploy {
        return off();
    }
    let reg = &state.registry;
    let Some(d) = BlobDigest::parse(digest) else {
        return err(
            StatusCode::BAD_REQUEST,
            "expected sha256:HEX (64 hex digits)",
        );
    };
    match reg.store().blob_size(&d) {
        Some(n) => {
            let mut r = json(StatusCode::OK, &json!({"digest": d.to_string(), "size": n}));
            r.headers_mut().insert("x-vmm-size", n.into());
            r
        }
        None => err(StatusCode::NOT_FOUND, format!("{d} is not uploaded")),
    }
}

/// Without `--auth` there is nobody to let deploy.
fn off() -> Resp {
    err(
        StatusCode::FORBIDDEN,
        "the deploy API is off: it needs callers with tokens (start vmm serve with --auth FILE and give a token the deploy scope)",
    )
}

/// `/v1/functions/NAME` by method.
pub(super) async fn function(state: &State, name: &str, req: Request<Incoming>) -> Resp {
    if !valid_function_name(name) {
        return err(
            StatusCode::BAD_REQUEST,
            format!(
                "{:?} is not a valid function name (1 to 64 of A-Z a-z 0-9 _ -, starting with a letter or digit)",
                vmm::text::shown(name)
            ),
        );
    }
    match *req.method() {
        Method::PUT => put(state, name, req).await,
        Method::GET => get(state, name),
        Method::DELETE => delete(state, name).await,
        _ => err(
            StatusCode::METHOD_NOT_ALLOWED,
            "use PUT (deploy), GET or DELETE on /v1/functions/NAME, POST on .../invoke",
        ),
    }
}

/// `PUT /v1/functions/NAME`: check the spec, build the template (unless asked to wait
/// for the first invocation), then switch the function to the new version. Nothing is
/// recorded when the build fails: the version before keeps serving.
async fn put(state: &State, name: &str, req: Request<Incoming>) -> Resp {
    if !state.deploy {
        return off();
    }
    let reg = &state.registry;
    let t0 = Instant::now();
    let (parts, body) = req.into_parts();
    let req_head = Request::from_parts(parts, ());
    let body = match read_limited(body, MAX_SPEC_BODY, state.upload_timeout).await {
        Ok(b) => b,
        Err((status, msg)) => return err(status, msg),
    };
    let mut spec: DeploySpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("the spec: {e}")),
    };
    if spec.runtime != Runtime::Wasi && spec.module.is_none() {
        match reg.runtime_module(spec.runtime) {
            Some(d) => spec.module = Some(d.to_string()),
            None => {
                return err(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "this daemon has no {} runtime module (it was started without --runtime-module {}=PATH); give \"module\": the digest of one uploaded with PUT /v1/modules",
                        spec.runtime.name(),
                        spec.runtime.name()
                    ),
                )
            }
        }
    }
    if let Err(m) = spec.validate() {
        return err(StatusCode::BAD_REQUEST, m);
    }
    // Everything the spec names must be here before anything is built or recorded.
    for d in spec
        .module
        .iter()
        .chain(spec.files.iter().filter_map(|f| f.digest.as_ref()))
    {
        if let Some(digest) = BlobDigest::parse(d) {
            if !reg.store().has_blob(&digest) {
                return err(
                    StatusCode::BAD_REQUEST,
                    format!("{digest} is not uploaded: PUT it to /v1/modules or /v1/files first"),
                );
            }
        }
    }
    let lock = reg.lock(name);
    let _turn = lock.lock().await;
    let current = match reg.store().record(name) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if let Some(r) = precondition_head(&req_head, current.as_ref()) {
        return r;
    }
    let replaced = current.as_ref().is_some_and(|r| !r.removed);
    let mut version = current.as_ref().map_or(1, |r| r.version + 1);
    // With a remote, other daemons deploy too: never reuse a version number they used.
    if let Some(remote) = reg.remote.clone() {
        let n = name.to_string();
        let theirs =
            tokio::task::spawn_blocking(move || crate::remote::remote_function_record(&n, &remote))
                .await
                .unwrap_or_else(|_| Err("the remote lookup panicked".into()));
        match theirs {
            Ok(Some(r)) => version = version.max(r.version + 1),
            Ok(None) => {}
            Err(e) => {
                return err(
                    StatusCode::BAD_GATEWAY,
                    format!("read the function's record on the remote: {e}"),
                )
            }
        }
    }
    let spec_bytes = match serde_json::to_vec(&spec) {
        Ok(b) => b,
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let spec_digest = match reg.store().put_blob(&spec_bytes) {
        Ok((d, _)) => d,
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("store the spec: {e}"),
            )
        }
    };
    let mut record = FunctionRecord {
        name: name.to_string(),
        version,
        spec: spec_digest.0,
        template: None,
        built_for: None,
        created_unix_ms: now_ms(),
        removed: false,
    };
    let mut report = None;
    let mut create_ms = None;
    if spec.build == Build::Now {
        let d = Deployed {
            record: record.clone(),
            spec: spec.clone(),
        };
        match reg.build(&d).await {
            Ok(b) => {
                record.template = Some(b.template);
                record.built_for = reg.fingerprint().ok();
                create_ms = Some(b.ms);
                report = b.report;
            }
            Err(e) => return build_failed(&e),
        }
    }
    if let Err(e) = reg.put_record(&record) {
        return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    // Keep the version before (requests may have resolved to it just now).
    if version > 1 {
        let (reg2, n) = (reg.clone(), name.to_string());
        tokio::task::spawn_blocking(move || reg2.remove_templates(&n, version - 1));
    }
    let pushed = push(reg, name).await;
    tracing::info!(function = %name, version, template = ?record.template, "deployed");
    let mut answer = json!({
        "name": name,
        "version": version,
        "etag": etag(version),
        "template": record.template,
        "built": record.template.is_some(),
        "build": spec.build,
        "own_pages": report.as_ref().map(|r| r.new_pages),
        "shared_pages": report.as_ref().map(|r| r.reused_pages),
        "working_set_pages": report.as_ref().map(|r| r.working_set_pages),
        "create_ms": create_ms,
        "deploy_ms": t0.elapsed().as_secs_f64() * 1e3,
    });
    if let Some(p) = pushed {
        answer["remote"] = p;
    }
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    with_etag(json(status, &answer), version)
}

fn precondition_head(req: &Request<()>, current: Option<&FunctionRecord>) -> Option<Resp> {
    let live = current.filter(|r| !r.removed);
    let header = |h| req.headers().get(h).and_then(|v| v.to_str().ok());
    if let Some(m) = header(hyper::header::IF_MATCH) {
        let ok = live
            .is_some_and(|r| m.trim() == "*" || m.split(',').any(|t| t.trim() == etag(r.version)));
        if !ok {
            return Some(err(
                StatusCode::PRECONDITION_FAILED,
                format!(
                    "If-Match {m}: the function is {}",
                    live.map_or("not deployed".into(), |r| format!(
                        "at version {}",
                        etag(r.version)
                    ))
                ),
            ));
        }
    }
    if header(hyper::header::IF_NONE_MATCH).is_some_and(|m| m.trim() == "*") && live.is_some() {
        return Some(err(
            StatusCode::PRECONDITION_FAILED,
            "If-None-Match *: the function is already deployed",
        ));
    }
    None
}

/// A build that failed: 400 with the runtime's own message when the function is at
/// fault, else the daemon's failure.
fn build_failed(e: &vmm::error::Error) -> Resp {
    let status = match e.kind() {
        ErrorKind::BadRequest
        | ErrorKind::GuestFault
        | ErrorKind::Timeout
        | ErrorKind::NotFound => StatusCode::BAD_REQUEST,
        ErrorKind::Damaged | ErrorKind::Host | ErrorKind::Interrupted => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let msg = match e.kind() {
        ErrorKind::Timeout => format!("{e} (the function's initialisation outlasted its timeout)"),
        _ => e.to_string(),
    };
    json(
        status,
        &json!({"error": msg, "step": e.step(), "kind": e.kind()}),
    )
}

/// With `--remote`: push the function (record, spec, blobs, template) so other daemons
/// find it. A failure does not undo the deploy: it is reported in the answer.
async fn push(reg: &Arc<super::registry::Registry>, name: &str) -> Option<serde_json::Value> {
    let remote = reg.remote.clone()?;
    let (dir, n) = (reg.store_dir().to_path_buf(), name.to_string());
    let r = tokio::task::spawn_blocking(move || reg_push(&dir, &n, &remote))
        .await
        .unwrap_or_else(|_| Err("the push panicked".into()));
    Some(match r {
        Ok(()) => json!({"pushed": true}),
        Err(e) => {
            tracing::warn!(function = %name, "push to the remote failed: {e}");
            json!({"pushed": false, "error": e})
        }
    })
}

/// Push function `name` as the local store has it (a removal when its record says so);
/// another daemon's later deploy on the remote is an error naming it.
pub(super) fn reg_push(
    dir: &std::path::Path,
    name: &str,
    remote: &crate::remote::RemoteArgs,
) -> Result<(), String> {
    let removed = snapshot_store::FunctionStore::new(dir)
        .record(name)
        .map_err(|e| e.to_string())?
        .is_some_and(|r| r.removed);
    let pushed = if removed {
        crate::remote::remove_function_remote(dir, name, remote)?
    } else {
        crate::remote::push_function(dir, name, remote)?
    };
    match pushed.status {
        remote_store::RecordPush::Written | remote_store::RecordPush::AlreadyThere => Ok(()),
        remote_store::RecordPush::Superseded { version, removed } => Err(format!(
            "the remote has a later {} of the function (version {version}) from another daemon",
            if removed { "removal" } else { "deploy" }
        )),
        remote_store::RecordPush::Conflict { version } => Err(format!(
            "another daemon deployed version {version} of the function at the same time; deploy again"
        )),
    }
}

/// `GET /v1/functions/NAME`.
fn get(state: &State, name: &str) -> Resp {
    let reg = &state.registry;
    match reg.current(name) {
        Ok(Some(d)) if !d.record.removed => json(StatusCode::OK, &describe(state, &d)),
        Ok(_) => err(StatusCode::NOT_FOUND, format!("no function named {name:?}")),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What `GET /v1/functions[/NAME]` says about a deployed function.
fn describe(state: &State, d: &Deployed) -> serde_json::Value {
    describe_with(state, d, &state.backend.status())
}

/// [`describe`] with the pools' status read once by the caller.
pub(super) fn describe_with(
    state: &State,
    d: &Deployed,
    status: &super::proto::Status,
) -> serde_json::Value {
    let pool = d
        .record
        .template
        .as_ref()
        .and_then(|t| status.functions.iter().find(|f| &f.name == t));
    let c = state.registry.counters(&d.record.name);
    json!({
        "name": d.record.name,
        "version": d.record.version,
        "etag": etag(d.record.version),
        "runtime": d.spec.runtime,
        "interface": d.spec.interface,
        "public": d.spec.public,
        "template": d.record.template,
        "built": d.record.template.is_some(),
        "created_unix_ms": d.record.created_unix_ms,
        "spec": d.spec,
        "pool": {
            "ready": pool.map_or(0, |p| p.ready),
            "busy": pool.map_or(0, |p| p.busy),
            "served": pool.map_or(0, |p| p.served),
        },
        "requests": {
            "cold": c.cold.load(Ordering::Relaxed),
            "warm": c.warm.load(Ordering::Relaxed),
            "hot": c.hot.load(Ordering::Relaxed),
        },
    })
}

/// `DELETE /v1/functions/NAME`: the function is gone for later requests; those running
/// finish. Its version count is kept so a later deploy of the name never reuses one.
async fn delete(state: &State, name: &str) -> Resp {
    if !state.deploy {
        return off();
    }
    let reg = &state.registry;
    let lock = reg.lock(name);
    let _turn = lock.lock().await;
    let mut record = match reg.store().record(name) {
        Ok(Some(r)) if !r.removed => r,
        Ok(_) => return err(StatusCode::NOT_FOUND, format!("no function named {name:?}")),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    record.removed = true;
    record.template = None;
    record.built_for = None;
    if let Err(e) = reg.put_record(&record) {
        return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let (reg2, n) = (reg.clone(), name.to_string());
    let _ = tokio::task::spawn_blocking(move || reg2.remove_templates(&n, u64::MAX)).await;
    let pushed = push(reg, name).await;
    tracing::info!(function = %name, "removed");
    let mut r = json!({"name": name, "removed": true, "version": record.version});
    if let Some(p) = pushed {
        r["remote"] = p;
    }
    json(StatusCode::OK, &r)
}

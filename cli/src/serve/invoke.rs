//! `POST /v1/functions/NAME/invoke`: admission, the request body, the job for a worker and
//! the answer made of what the function did.

use super::http::{error_status, json, read_limited, text, wants_json, Resp, State};
use super::registry::{Path3, Target};
use super::workers::{Finished, Job, JobResult, Reply};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;
use vmm::error::ErrorKind;

/// Bytes of request bodies held now (reserved before reading, released with the guard).
struct BodyBytes(Arc<AtomicU64>, u64);

impl BodyBytes {
    fn reserve(held: &Arc<AtomicU64>, want: u64, budget: u64) -> Option<BodyBytes> {
        let mut now = held.load(Ordering::Relaxed);
        loop {
            // One request is always let through, whatever its size (up to --max-body).
            if now > 0 && now + want > budget {
                return None;
            }
            match held.compare_exchange_weak(now, now + want, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(BodyBytes(held.clone(), want)),
                Err(x) => now = x,
            }
        }
    }
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// The template name in `/v1/functions/NAME/invoke` (the name is checked when looked up).
pub(super) fn invoke_target(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/functions/")?.strip_suffix("/invoke")
}

/// `POST /v1/functions/NAME/invoke`: admit the request, read its body, find what runs it
/// (a deployed function's current template, built now if it has none that fits: the cold
/// path; else the template NAME), pull the template first with `--remote`, queue the job
/// for a worker, and answer with what the function did. A step that refuses the request
/// says why ([`Refusal`]); it is counted and answered here.
pub(super) async fn invoke(state: &State, name: String, req: Request<Incoming>) -> Resp {
    let t0 = Instant::now();
    let as_json = wants_json(&req);
    let answer = async {
        admit(state, &req)?;
        // Held until the response is made.
        let _held = reserve_body(state, &req)?;
        let (head, body) = req.into_parts();
        let body = read_limited(body, state.max_body, state.body_timeout)
            .await
            .map_err(|(status, msg)| Refusal::new(status, msg))?;
        let mut target = resolve(state, &name).await?;
        let template = target.as_ref().map_or(name.clone(), |t| t.template.clone());
        let cold = target.as_mut().and_then(|t| t.cold.take());
        if let (Some((dir, remote)), None) = (&state.remote, &cold) {
            pull_if_missing(state, &template, dir, remote).await?;
        }
        let http = target
            .as_ref()
            .is_some_and(|t| t.interface == vmm::function::Interface::Http);
        let stdin = if http {
            Bytes::from(super::event::build_event(&super::event::EventRequest {
                method: head.method.as_str(),
                raw_path: head.uri.path(),
                raw_query: head.uri.query().unwrap_or(""),
                headers: &head.headers,
                body: &body,
                source_ip: None,
                request_id: request_id(),
                time_epoch_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            }))
        } else {
            body
        };
        let timeout = target.as_ref().and_then(|t| t.timeout);
        let is_cold = cold.is_some();
        let result = match cold {
            Some(cold) => match run_cold(state, cold, stdin.clone(), timeout).await? {
                Some(done) => JobResult::Done(done),
                None => run_job(state, &template, stdin, timeout).await?,
            },
            None => run_job(state, &template, stdin, timeout).await?,
        };
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok::<_, Refusal>(match result {
            JobResult::Refused(kind, msg) => refused(state, &name, kind, &msg, as_json, total_ms),
            JobResult::Done(done) => {
                let path = match &target {
                    _ if is_cold => Path3::Cold,
                    _ if done.timings.restored_on_demand => Path3::Warm,
                    _ => Path3::Hot,
                };
                state.metrics.path(path.name(), total_ms / 1e3);
                if target.is_some() {
                    let c = state.registry.counters(&name);
                    match path {
                        Path3::Cold => &c.cold,
                        Path3::Warm => &c.warm,
                        Path3::Hot => &c.hot,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                }
                let mut r = if http && !as_json {
                    finished_http(state, &name, done, total_ms)
                } else {
                    finished(state, &name, done, as_json, total_ms)
                };
                r.headers_mut()
                    .insert("x-vmm-path", path.name().parse().expect("static header"));
                r
            }
        })
    };
    match answer.await {
        Ok(r) => r,
        Err(refusal) => {
            state.count(&name, refusal.status.as_u16());
            refusal.response()
        }
    }
}

/// The cold path: the request builds its function's template and is served by the
/// instance the template is taken from (see [`Registry::cold_blocking`]); `None` when the
/// build made only the template (and its runtime base), which the request then runs on.
/// If this future is dropped (the client went away), the guest is stopped.
///
/// [`Registry::cold_blocking`]: super::registry::Registry::cold_blocking
async fn run_cold(
    state: &State,
    cold: super::registry::Cold,
    stdin: Bytes,
    timeout: Option<std::time::Duration>,
) -> Result<Option<Finished>, Refusal> {
    use super::registry::ColdOutcome;
    let interrupt = vmm::watchdog::InterruptHandle::new();
    let mut guard = InterruptOnDrop(Some(interrupt.clone()));
    let limits = vmm::guest::RunLimits {
        timeout: timeout.unwrap_or(state.registry.max_timeout()),
        interrupt: Some(interrupt),
        ..vmm::guest::RunLimits::default()
    };
    let (tx, rx) = oneshot::channel();
    let reg = state.registry.clone();
    let slot = reg.build_slot().await;
    tokio::task::spawn_blocking(move || {
        reg.cold_blocking(cold, &stdin, &limits, |r| {
            let _ = tx.send(r);
        });
        drop(slot);
    });
    let answer = rx.await;
    guard.0 = None;
    match answer {
        Ok(Ok(ColdOutcome::Served(resp))) => {
            let resp = *resp;
            Ok(Some(Finished {
                exit: resp.result.map_err(|e| (e.kind(), e.to_string())),
                stdout: resp.stdout,
                stderr: resp.stderr,
                truncated: resp.truncated,
                timings: vmm::pool::Timings {
                    acquire_ms: 0.0,
                    restored_on_demand: false,
                    invoke: Box::new(resp.stats),
                },
                queue_ms: 0.0,
            }))
        }
        Ok(Ok(ColdOutcome::Built)) => Ok(None),
        Ok(Err(e)) => Err(build_refusal(&e)),
        Err(_) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the build of the function's template ended without an answer",
        )),
    }
}

/// The answer to a request whose function's template could not be built: the function is
/// at fault (502, its own message), or the daemon (503).
fn build_refusal(e: &vmm::error::Error) -> Refusal {
    let status = match e.kind() {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Host => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    Refusal::new(
        status,
        format!("the function's template could not be built: {e}"),
    )
}

/// Stops the guest when dropped armed (the request's future was dropped: the client went
/// away).
struct InterruptOnDrop(Option<vmm::watchdog::InterruptHandle>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.interrupt();
        }
    }
}

/// An id for an event's `requestContext.requestId`: unique within this daemon's life.
fn request_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    });
    format!("{start:x}-{:x}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// What runs a request for NAME: a deployed function's target (its template built now
/// when it has none that fits), or `None` for a plain template of that name.
async fn resolve(state: &State, name: &str) -> Result<Option<Target>, Refusal> {
    if state.registry.remote.is_some() {
        let (reg, n) = (state.registry.clone(), name.to_string());
        tokio::task::spawn_blocking(move || reg.pull_if_needed(&n))
            .await
            .unwrap_or_else(|_| Err("the pull panicked".into()))
            .map_err(|e| {
                Refusal::new(
                    StatusCode::BAD_GATEWAY,
                    format!("function {name}: pull it from the remote: {e}"),
                )
            })?;
    }
    let deployed = state
        .registry
        .current(name)
        .map_err(|e| Refusal::new(StatusCode::BAD_GATEWAY, format!("function {name}: {e}")))?;
    let Some(d) = deployed else {
        return Ok(None);
    };
    if d.record.removed {
        return Err(Refusal::new(
            StatusCode::NOT_FOUND,
            format!("function {name} was removed"),
        ));
    }
    state
        .registry
        .target(d)
        .await
        .map(Some)
        .map_err(|e| build_refusal(&e))
}

/// The answer of an `http` function that ran: its own response when it exited 0 and
/// printed a valid one (502 with the reason when not), else what [`finished`] makes.
fn finished_http(state: &State, name: &str, done: Finished, total_ms: f64) -> Resp {
    if !matches!(done.exit, Ok(0)) || done.truncated.any() {
        return finished(state, name, done, false, total_ms);
    }
    let run_ms = done.timings.invoke.run_ms;
    let parsed = super::event::parse_response(&done.stdout);
    let (status, mut r) = match parsed {
        Ok(fr) => {
            let status = StatusCode::from_u16(fr.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut r = Response::new(Full::new(Bytes::from(fr.body)));
            *r.status_mut() = status;
            for (k, v) in fr.headers {
                r.headers_mut().append(k, v);
            }
            (status, r)
        }
        Err(why) => {
            tracing::info!(function = %name, "malformed http response: {why}");
            let status = StatusCode::BAD_GATEWAY;
            let mut r = text(
                status,
                format!("function {name} returned a malformed response: {why}"),
            );
            r.headers_mut().insert(
                "x-vmm-error",
                "malformed_response".parse().expect("static header"),
            );
            (status, r)
        }
    };
    state.metrics.count(true, name, status.as_u16());
    tracing::info!(function = %name, status = status.as_u16(), run_ms, total_ms, "invoke");
    let h = r.headers_mut();
    h.insert("x-vmm-exit-code", 0.into());
    if let Ok(v) = format!("{run_ms:.3}").parse() {
        h.insert("x-vmm-run-ms", v);
    }
    r
}

/// Why a request was answered before its function ran: a status and a plain-text message.
struct Refusal {
    status: StatusCode,
    msg: String,
    /// Whether to tell the client to retry in a second (`retry-after: 1`).
    retry_soon: bool,
}

impl Refusal {
    fn new(status: StatusCode, msg: impl Into<String>) -> Refusal {
        Refusal {
            status,
            msg: msg.into(),
            retry_soon: false,
        }
    }

    fn retry_soon(self) -> Refusal {
        Refusal {
            retry_soon: true,
            ..self
        }
    }

    fn response(self) -> Resp {
        let mut r = text(self.status, self.msg);
        if self.retry_soon {
            r.headers_mut()
                .insert("retry-after", "1".parse().expect("static header"));
        }
        r
    }
}

/// Refuse a request before its body is read: the server is draining (503), or the body
/// is declared larger than `--max-body` (413).
fn admit(state: &State, req: &Request<Incoming>) -> Result<(), Refusal> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the server is shutting down",
        ));
    }
    if declared_length(req).is_some_and(|n| n > state.max_body as u64) {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over the {}-byte limit", state.max_body),
        ));
    }
    Ok(())
}

/// The request's `content-length`, if it has a valid one.
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Bound the request bodies held at once: reserve what this one may take before reading
/// (429 when they are at their budget).
fn reserve_body(state: &State, req: &Request<Incoming>) -> Result<BodyBytes, Refusal> {
    let want = declared_length(req)
        .unwrap_or(state.max_body as u64)
        .min(state.max_body as u64);
    BodyBytes::reserve(&state.body_bytes, want, state.body_budget).ok_or_else(|| {
        Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too many request bodies are held at once; retry",
        )
        .retry_soon()
    })
}

/// `--remote`: a template the store lacks is pulled first (502 when that fails), off the
/// async executor; pulls of one template queue on its lock file and the later ones find
/// it there.
async fn pull_if_missing(
    state: &State,
    name: &str,
    dir: &std::path::Path,
    remote: &crate::remote::RemoteArgs,
) -> Result<(), Refusal> {
    let held = state
        .in_use
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains_key(name);
    let (dir, remote, n) = (dir.to_path_buf(), remote.clone(), name.to_string());
    // On tokio's pool of blocking threads (bounded), not a thread of its own per request.
    let ready = tokio::task::spawn_blocking(move || {
        if held {
            remote_store::touch_used(&dir, &n);
            crate::remote::pull_if_missing(&dir, &n, &remote).map(|pulled| crate::remote::Ready {
                pulled,
                in_use: None,
            })
        } else {
            crate::remote::prepare(&dir, &n, &remote)
        }
    })
    .await
    .unwrap_or_else(|_| Err("the pull task panicked".into()));
    let pulled = ready.map(|r| {
        if let Some(g) = r.in_use {
            state
                .in_use
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_string(), g);
        }
        r.pulled
    });
    match pulled {
        Ok(Some(p)) => tracing::info!(
            template = %name,
            layers = p.layers_created,
            pages = p.pages_fetched,
            bytes = p.bytes_received,
            ms = p.ms,
            "pulled from the remote"
        ),
        Ok(None) => {}
        Err(e) => return Err(Refusal::new(StatusCode::BAD_GATEWAY, e)),
    }
    Ok(())
}

/// Queue the job (429 when the queue is full) and wait for its worker's answer. If this
/// future is dropped (the client disconnected), the guest is stopped.
async fn run_job(
    state: &State,
    name: &str,
    body: Bytes,
    timeout: Option<std::time::Duration>,
) -> Result<JobResult, Refusal> {
    let (tx, rx) = oneshot::channel();
    // If this future is dropped (the client disconnected), stop the guest.
    let interrupt = vmm::watchdog::InterruptHandle::new();
    let mut guard = InterruptOnDrop(Some(interrupt.clone()));
    let job = Job {
        name: name.to_string(),
        body,
        timeout,
        interrupt,
        enqueued: Instant::now(),
        reply: Reply::Local(tx),
    };
    if !state.backend.submit(job) {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "the request queue is full; retry",
        )
        .retry_soon());
    }
    let result = match rx.await {
        Ok(r) => r,
        Err(_) => JobResult::Refused(ErrorKind::Host, "the worker stopped".into()),
    };
    guard.0 = None; // answered: nothing to interrupt
    Ok(result)
}

/// The answer to a job no instance could be had for: the status of its error kind, the
/// message as text or (`accept: application/json`) JSON.
fn refused(
    state: &State,
    name: &str,
    kind: ErrorKind,
    msg: &str,
    as_json: bool,
    total_ms: f64,
) -> Resp {
    let msg = format!("template {name}: {msg}");
    let status = error_status(kind);
    state.count(name, status.as_u16());
    tracing::info!(template = %name, status = status.as_u16(), total_ms, "refused: {msg}");
    let mut r = if as_json {
        json(status, &serde_json::json!({"error": msg, "kind": kind}))
    } else {
        text(status, msg)
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert("retry-after", "1".parse().expect("static header"));
    }
    r
}

/// The answer to a job that ran: 200 for exit code 0 with the whole output, 500 for
/// another code or a cut output, the error kind's status when the guest failed; the
/// function's stdout (or JSON with everything) and `x-vmm-*` headers.
fn finished(state: &State, name: &str, done: Finished, as_json: bool, total_ms: f64) -> Resp {
    let Finished {
        exit,
        stdout,
        stderr,
        truncated,
        timings,
        queue_ms,
    } = done;
    let (status, code, error) = match &exit {
        // Output cut at the cap is not a success, whatever the exit code.
        Ok(c) if truncated.any() => (StatusCode::INTERNAL_SERVER_ERROR, Some(*c), None),
        Ok(0) => (StatusCode::OK, Some(0), None),
        Ok(c) => (StatusCode::INTERNAL_SERVER_ERROR, Some(*c), None),
        Err((kind, msg)) => (error_status(*kind), None, Some((*kind, msg.clone()))),
    };
    // It ran, so the pools know its template: no lookup (with worker processes that is
    // every worker's status, on every request).
    state.metrics.count(true, name, status.as_u16());
    tracing::info!(
        template = %name,
        status = status.as_u16(),
        exit_code = code,
        queue_ms,
        acquire_ms = timings.acquire_ms,
        run_ms = timings.invoke.run_ms,
        total_ms,
        on_demand = timings.restored_on_demand,
        "invoke"
    );
    let mut r = if as_json {
        json(
            status,
            &serde_json::json!({
                "stdout": String::from_utf8_lossy(&stdout),
                "stderr": String::from_utf8_lossy(&stderr),
                "exit_code": code,
                "stdout_truncated": truncated.stdout,
                "stderr_truncated": truncated.stderr,
                "error": error.as_ref().map(|e| &e.1),
                "error_kind": error.as_ref().map(|e| e.0),
                "timings": {
                    "queue_ms": queue_ms,
                    "acquire_ms": timings.acquire_ms,
                    "run_ms": timings.invoke.run_ms,
                    "total_ms": total_ms,
                    "exits": timings.invoke.exits,
                    "restored_on_demand": timings.restored_on_demand,
                },
            }),
        )
    } else {
        let mut body = stdout;
        if let Some((_, msg)) = &error {
            if body.is_empty() {
                body = format!("{msg}\n").into_bytes();
            }
        }
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    let h = r.headers_mut();
    if let Some(c) = code {
        h.insert("x-vmm-exit-code", c.into());
    }
    if let Some((kind, _)) = &error {
        if let Ok(v) = serde_json::to_value(kind) {
            if let Some(s) = v.as_str().and_then(|s| s.parse().ok()) {
                h.insert("x-vmm-error", s);
            }
        }
    }
    if truncated.any() {
        h.insert(
            "x-vmm-output-truncated",
            "true".parse().expect("static header"),
        );
    }
    if let Ok(v) = format!("{:.3}", timings.invoke.run_ms).parse() {
        h.insert("x-vmm-run-ms", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_paths_are_parsed_without_panicking() {
        assert_eq!(invoke_target("/v1/functions/hello/invoke"), Some("hello"));
        assert_eq!(invoke_target("/v1/functions//invoke"), Some(""));
        assert_eq!(invoke_target("/v1/functions/invoke"), None);
        assert_eq!(invoke_target("/v1/functions/"), None);
        assert_eq!(invoke_target("/v1/functions/a/b/invoke"), Some("a/b"));
    }

    #[test]
    fn request_bodies_held_at_once_stay_within_the_budget() {
        let held = Arc::new(AtomicU64::new(0));
        let a = BodyBytes::reserve(&held, 600, 1000).expect("first");
        assert!(
            BodyBytes::reserve(&held, 600, 1000).is_none(),
            "over the budget"
        );
        let b = BodyBytes::reserve(&held, 400, 1000).expect("fits");
        assert_eq!(held.load(Ordering::Relaxed), 1000);
        drop((a, b));
        assert_eq!(held.load(Ordering::Relaxed), 0);
        // One body is always let through, even one larger than the budget.
        let c = BodyBytes::reserve(&held, 5000, 1000).expect("alone");
        assert!(BodyBytes::reserve(&held, 1, 1000).is_none());
        drop(c);
    }
}

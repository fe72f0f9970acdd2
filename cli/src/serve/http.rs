//! The HTTP side of `vmm serve`: the listener (TCP or Unix socket), the accept loop with
//! its graceful drain, and the handlers: `POST /v1/functions/NAME/invoke`,
//! `GET /v1/functions`, `/healthz` and `/metrics`.

use super::auth::{Auth, Denied, Scope};
use super::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmm::error::ErrorKind;

/// What every connection's handlers share.
pub(super) struct State {
    pub(super) backend: super::backend::Backend,
    /// `--auth`: the tokens requests must carry (none: every request is allowed).
    pub(super) auth: Option<Auth>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) draining: AtomicBool,
    pub(super) max_body: usize,
    /// How long a client has to send its body once its headers are in.
    pub(super) body_timeout: Duration,
    /// Request body bytes held now, and the most that may be.
    pub(super) body_bytes: Arc<AtomicU64>,
    pub(super) body_budget: u64,
    /// `--remote`: the store and where to pull templates it lacks from.
    pub(super) remote: Option<(PathBuf, crate::remote::RemoteArgs)>,
    /// The deployed functions (and the builder of their templates).
    pub(super) registry: Arc<super::registry::Registry>,
    /// The deploy API is on (only with `--auth`: someone must be allowed to deploy).
    pub(super) deploy: bool,
    /// `--max-upload`: the largest module or file `PUT /v1/modules` takes.
    pub(super) max_upload: usize,
    /// How long an upload's or a spec's body may take to arrive.
    pub(super) upload_timeout: Duration,
    /// Templates this daemon serves from the remote, held in use (never evicted) while it runs.
    pub(super) in_use: std::sync::Mutex<std::collections::HashMap<String, remote_store::InUse>>,
}

impl State {
    pub(super) fn count(&self, name: &str, status: u16) {
        let known =
            self.backend.is_known(name) || matches!(self.registry.current(name), Ok(Some(_)));
        self.metrics.count(known, name, status);
    }
}

/// The daemon's listening socket, bound before anything else is set up (and before
/// `--user` drops the privileges a port below 1024 or a socket's directory may need).
pub(super) enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// Bind `--listen`; Err: the message and the exit status.
pub(super) fn bind(listen: &str) -> Result<Bound, (String, i32)> {
    let bound = if let Some(path) = listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err((
                    format!(
                        "--listen {listen}: exists and is not a socket; refusing to replace it"
                    ),
                    2,
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => Bound::Unix(l, path),
            Err(e) => return Err((format!("listen on {listen}: {e}"), 1)),
        }
    } else {
        match std::net::TcpListener::bind(listen) {
            Ok(l) => Bound::Tcp(l),
            Err(e) => {
                return Err((
                    format!(
                        "listen on {listen}: {e} (is another server on that port? pass --listen)"
                    ),
                    1,
                ))
            }
        }
    };
    let nonblocking = match &bound {
        Bound::Tcp(l) => l.set_nonblocking(true),
        Bound::Unix(l, _) => l.set_nonblocking(true),
    };
    nonblocking.map_err(|e| (format!("listen on {listen}: {e}"), 1))?;
    Ok(bound)
}

pub(super) async fn accept_loop(
    bound: Bound,
    state: Arc<State>,
    header_timeout: Duration,
    drain_for: Duration,
) -> i32 {
    enum Listener {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, PathBuf),
    }
    let listener = match bound {
        Bound::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Listener::Tcp),
        Bound::Unix(l, p) => tokio::net::UnixListener::from_std(l).map(|l| Listener::Unix(l, p)),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            say!("vmm: error: listen: {e}");
            return 1;
        }
    };
    let shown = match &listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into()),
        Listener::Unix(_, p) => format!("unix:{}", p.display()),
    };
    tracing::info!(listen = %shown, "serving");
    // Machine-readable line for scripts and tests that pass port 0.
    say!("vmm serve: listening on {shown}");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            say!("vmm: error: install the SIGTERM handler: {e}");
            return 1;
        }
    };
    let builder = {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        b
    };
    loop {
        let stream: Box<dyn IoStream> = tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            accepted = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, _)| { let _ = s.set_nodelay(true); Box::new(s) as Box<dyn IoStream> }),
                    Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn IoStream>),
                }
            } => match accepted {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let st = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |req| handle(st.clone(), req)),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!("draining: no new connections; waiting for requests in flight");
    if let Listener::Unix(_, p) = &listener {
        let _ = std::fs::remove_file(p);
    }
    match tokio::time::timeout(drain_for, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("drained; bye");
            0
        }
        Err(_) => {
            tracing::warn!("requests still running after {drain_for:?}; exiting");
            0
        }
    }
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> IoStream for T {}

pub(super) type Resp = Response<Full<Bytes>>;

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("static header"),
    );
    r
}

pub(super) fn json(status: StatusCode, v: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    r
}

pub(super) fn wants_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

pub(super) fn error_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::GuestFault | ErrorKind::Damaged => StatusCode::BAD_GATEWAY,
        ErrorKind::Host => StatusCode::SERVICE_UNAVAILABLE,
        // The client went away: nobody reads this (499 as nginx logs it).
        ErrorKind::Interrupted => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let r = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else {
                text(StatusCode::OK, "ok")
            }
        }
        (&Method::GET, "/metrics") => {
            unauthorized(&state, &req, &Scope::Metrics).unwrap_or_else(|| metrics(&state))
        }
        (&Method::GET, "/v1/functions") => {
            unauthorized(&state, &req, &Scope::Metrics).unwrap_or_else(|| functions(&state))
        }
        (_, p) if super::invoke::invoke_target(p).is_some() => {
            let name = super::invoke::invoke_target(p).unwrap_or_default().to_string();
            if !state.registry.is_public(&name) {
                if let Some(r) = unauthorized(&state, &req, &Scope::InvokeOne(name.clone())) {
                    state.count(&name, r.status().as_u16());
                    return Ok(r);
                }
            }
            if method != Method::POST {
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use POST to invoke a function",
                )
            } else {
                super::invoke::invoke(&state, name, req).await
            }
        }
        (&Method::PUT, "/v1/modules") | (&Method::PUT, "/v1/files") => {
            let module = path == "/v1/modules";
            match unauthorized(&state, &req, &Scope::Deploy) {
                Some(r) => r,
                None => super::deploy::upload(&state, req, module).await,
            }
        }
        (&Method::HEAD | &Method::GET, p) if blob_target(p).is_some() => {
            match unauthorized(&state, &req, &Scope::Deploy) {
                Some(r) => r,
                None => super::deploy::has_blob(&state, blob_target(p).unwrap_or_default()),
            }
        }
        (_, p) if function_target(p).is_some() => {
            let name = function_target(p).unwrap_or_default().to_string();
            // Reading a function is allowed with either scope; changing it needs deploy.
            let denied = if method == Method::GET {
                unauthorized(&state, &req, &Scope::Metrics)
                    .and_then(|_| unauthorized(&state, &req, &Scope::Deploy))
            } else {
                unauthorized(&state, &req, &Scope::Deploy)
            };
            match denied {
                Some(r) => r,
                None => super::deploy::function(&state, &name, req).await,
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: POST /v1/functions/NAME/invoke, PUT|GET|DELETE /v1/functions/NAME, GET /v1/functions, PUT /v1/modules, PUT /v1/files, /healthz, /metrics (docs/api.md)",
        ),
    };
    Ok(r)
}

/// Read a body of at most `limit` bytes (413 past that) within `timeout` (408 after it).
pub(super) async fn read_limited(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, (StatusCode, String)> {
    use http_body_util::{BodyExt, Limited};
    let read = Limited::new(body, limit).collect();
    let Ok(read) = tokio::time::timeout(timeout, read).await else {
        return Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {timeout:?}"),
        ));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over the {limit}-byte limit"),
                ))
            } else {
                Err((
                    StatusCode::BAD_REQUEST,
                    format!("read the request body: {e}"),
                ))
            }
        }
    }
}

/// NAME in `/v1/functions/NAME` (one path segment).
fn function_target(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/functions/")
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// The digest in `/v1/modules/DIGEST` or `/v1/files/DIGEST`.
fn blob_target(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/modules/")
        .or_else(|| path.strip_prefix("/v1/files/"))
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

/// With `--auth`, the answer to a request whose bearer token does not allow `want`: 401
/// with `WWW-Authenticate`, or 403 naming the token's entry (never the token); `None`
/// when it is allowed.
fn unauthorized(state: &State, req: &Request<Incoming>, want: &Scope) -> Option<Resp> {
    let auth = state.auth.as_ref()?;
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match auth.check(header, want) {
        Ok(()) => None,
        Err(Denied::Unauthenticated) => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is needed (Authorization: Bearer TOKEN)",
            );
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                "Bearer realm=\"vmm\"".parse().expect("static header"),
            );
            Some(r)
        }
        Err(Denied::Forbidden { who }) => {
            let what = match want {
                Scope::InvokeOne(f) => format!("invoke {f}"),
                Scope::Invoke => "invoke".into(),
                Scope::Metrics => "read the metrics and the function list".into(),
                Scope::Deploy => "deploy".into(),
            };
            Some(text(
                StatusCode::FORBIDDEN,
                format!("token {who} may not {what}"),
            ))
        }
    }
}

/// `GET /v1/functions`: the templates the pools know, with their instances.
fn functions(state: &State) -> Resp {
    let status = state.backend.status();
    // Deployed functions first (their templates are listed under them), then templates
    // made with `vmm template create`.
    let all = state.registry.all();
    let deployed: std::collections::HashSet<String> =
        all.iter().map(|d| d.record.name.clone()).collect();
    let mut list: Vec<_> = all
        .iter()
        .map(|d| {
            let mut v = super::deploy::describe_with(state, d, &status);
            // The list stays short: the spec (sources included) is in GET .../NAME.
            if let Some(o) = v.as_object_mut() {
                o.remove("spec");
            }
            v
        })
        .collect();
    list.extend(
        status
            .functions
            .iter()
            // A template named like a deployed function is not what that name serves.
            .filter(|f| !f.name.starts_with("fn.") && !deployed.contains(&f.name))
            .map(|f| {
                serde_json::json!({
                    "name": f.name,
                    "ready": f.ready,
                    "busy": f.busy,
                    "served": f.served,
                    // How the pool's new instances hold memory (`auto` switches a template
                    // whose requests change the guest's page tables to copies).
                    "instance_memory": if f.shared { "shared" } else { "copy" },
                    "maps_memory": f.maps_memory,
                    "data_pages": f.data_pages,
                    "image_bytes": f.image_bytes,
                })
            }),
    );
    json(
        StatusCode::OK,
        &serde_json::json!({
            "functions": list,
            "live_instances": status.live,
            "pool": state.backend.pool(),
        }),
    )
}

/// `GET /metrics`: Prometheus metrics (OpenMetrics text).
fn metrics(state: &State) -> Resp {
    let out = match state
        .metrics
        .encode(&state.backend.status(), state.backend.queued())
    {
        Ok(out) => out,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encode metrics: {e}"),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
            .parse()
            .expect("static header"),
    );
    r
}

//! `vmm fn deploy|invoke|get|ls|rm`: the client of `vmm serve`'s HTTP API (docs/api.md),
//! for a daemon given by its URL and a bearer token.
//!
//! Plain `http://` only (ureq without TLS): a daemon reached over a network it does not
//! trust sits behind a reverse proxy (or an SSH tunnel) that does TLS. Every answer body is
//! read with a bound, and nothing the server sends is trusted to be well formed: a missing
//! or odd field is printed as `-`, control characters in the daemon's messages are masked
//! before they reach a terminal.

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the daemon is when neither `--url` nor `$VMM_URL` says (`vmm serve`'s default).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
/// The most of an invoke's response body written to stdout (the daemon's own output cap).
const INVOKE_OUTPUT_MAX: u64 = 64 << 20;
/// The most read of `invoke --json`'s answer (64 MiB of output, escaped, and its stderr).
const INVOKE_JSON_MAX: u64 = 256 << 20;
/// The most read of any other answer (JSON of the deploy API, an error's text).
const ANSWER_MAX: u64 = 4 << 20;
/// `--file`s up to this size that are UTF-8 text go inline in the spec as `content`.
const INLINE_FILE_MAX: usize = 64 << 10;
/// Uploads over this size say so on stderr first.
const PROGRESS_OVER: usize = 4 << 20;
/// The most read of a module or a `--file` (the daemon's own `--max-upload` is 256 MiB by
/// default).
const UPLOAD_MAX: u64 = 1 << 30;
/// The deploy request's bound on the daemon (docs/api.md); a `--source` must fit in it.
const SPEC_MAX: usize = 16 << 20;
/// The most read of an invoke's request (`--input` or stdin).
const INPUT_MAX: u64 = 1 << 30;
/// The most read of a `--token-file`.
const TOKEN_FILE_MAX: u64 = 64 << 10;
/// Requests that are not a deploy, an upload or an invoke give up after this long.
const QUICK_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `after_help` of `vmm fn`.
pub const AFTER_HELP: &str = "\
Connection (every subcommand): --url URL [default: $VMM_URL, else http://127.0.0.1:8080],
--token-file FILE [default: $VMM_TOKEN_FILE] or the token itself in $VMM_TOKEN (sent as
`Authorization: Bearer TOKEN`), --json (the daemon's JSON answer on stdout, one line).

Plain http:// only: the token travels in clear. To reach a daemon over a network you do not
trust, put TLS in a reverse proxy in front of `vmm serve` (or use an SSH tunnel) and give
this client the proxy's or the tunnel's local http:// URL. The API is docs/api.md.

Exit status: 0 when the daemon did it (for invoke: answered 2xx), 1 otherwise.";

/// Options every `vmm fn` subcommand takes: where the daemon is and how to talk to it.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// The daemon's base URL: plain http:// (TLS belongs to a reverse proxy in front of the
    /// daemon); a path prefix is kept (http://host/vmm/); no scheme means http://.
    #[arg(long, value_name = "URL", env = "VMM_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// A file holding the bearer token (surrounding whitespace trimmed); without it, the
    /// token in $VMM_TOKEN if set; without either, no Authorization header.
    #[arg(long, value_name = "FILE", env = "VMM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the daemon's JSON answer on stdout, on one line (errors too; a failure with no
    /// JSON answer prints {"error": "..."}); messages still go to stderr.
    #[arg(long)]
    pub json: bool,
    /// Print each request, the status, the x-vmm-* headers and the time on stderr.
    #[arg(short, long)]
    pub verbose: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FnRuntime {
    /// JavaScript on QuickJS-NG (--source main.js).
    Js,
    /// Python on CPython for WASI (--source main.py).
    Python,
    /// Any WASI command module (--module).
    Wasi,
}

impl FnRuntime {
    fn as_str(self) -> &'static str {
        match self {
            FnRuntime::Js => "js",
            FnRuntime::Python => "python",
            FnRuntime::Wasi => "wasi",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FnInterface {
    /// The request body is the function's stdin, its stdout the response body.
    Raw,
    /// One JSON event in, one JSON response out (AWS Lambda's HTTP API payload 2.0).
    Http,
}

#[derive(Subcommand, Debug)]
pub enum FnCommand {
    /// Deploy a function to the daemon, or replace it: upload what it needs that the daemon
    /// lacks (by content hash), then have the daemon build its template.
    ///
    /// Example: vmm fn deploy hello --runtime js --source hello.js --file data/words.txt:words.txt --env GREETING=hi
    ///
    /// Example: vmm fn deploy tool --runtime wasi --module tool.wasm --arg --verbose --memory 256 --lazy
    Deploy(DeployArgs),
    /// Invoke a function: the request body from --input or stdin, the response body to
    /// stdout as it came (exit 1 unless the daemon answered 2xx).
    ///
    /// Example: echo '{"name":"x"}' | vmm fn invoke hello
    ///
    /// Example: vmm fn invoke hello --input req.json -v --header content-type:application/json
    Invoke(InvokeArgs),
    /// Show a function: version, runtime, interface, template, its pool.
    ///
    /// Example: vmm fn get hello --url http://10.0.0.5:8080 --token-file ~/.config/vmm/token
    Get {
        /// The function.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the functions and templates the daemon serves, with their pools.
    ///
    /// Example: vmm fn ls --json | jq '.functions[].name'
    Ls {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a function (requests already running finish).
    ///
    /// Example: vmm fn rm hello
    Rm {
        /// The function.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

impl FnCommand {
    fn conn(&self) -> &ConnArgs {
        match self {
            FnCommand::Deploy(a) => &a.conn,
            FnCommand::Invoke(a) => &a.conn,
            FnCommand::Get { conn, .. } | FnCommand::Ls { conn } | FnCommand::Rm { conn, .. } => {
                conn
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct DeployArgs {
    /// The function's name: 1 to 64 of A-Z a-z 0-9 _ -, starting with a letter or digit.
    pub name: String,
    /// What runs the function.
    #[arg(long, value_enum)]
    pub runtime: FnRuntime,
    /// js/python: the script (UTF-8), sent inline; the guest runs it under its file name.
    #[arg(long, value_name = "FILE")]
    pub source: Option<PathBuf>,
    /// The WebAssembly module (.wasm, or .wat text compiled here), uploaded only if the
    /// daemon lacks it; or `sha256:HEX` of one the daemon has. Required for wasi; for
    /// js/python it replaces the daemon's --runtime-module.
    #[arg(long, value_name = "FILE|sha256:HEX")]
    pub module: Option<String>,
    /// A file of the function's read-only tree, at GUEST (default: its file name). Files up
    /// to 64 KiB that are UTF-8 text go inline in the spec; others are uploaded (only if the
    /// daemon lacks them) and named by their hash. Repeatable.
    #[arg(long = "file", value_name = "HOST[:GUEST]")]
    pub files: Vec<String>,
    /// An argument after the script (wasi: after argv[0]). Repeatable.
    #[arg(long = "arg", value_name = "A", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable (the last of a key wins). Repeatable.
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Guest RAM in MiB [daemon's default: 512].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory: Option<u64>,
    /// Stop a request after this many seconds [daemon's default: its --timeout].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// How requests reach the function [daemon's default: raw].
    #[arg(long, value_enum)]
    pub interface: Option<FnInterface>,
    /// Build the template on the first request instead of now (the deploy answers at once
    /// and does not try the function).
    #[arg(long)]
    pub lazy: bool,
    /// Anyone may invoke it, without a token.
    #[arg(long)]
    pub public: bool,
    /// Replace the function only if its current version is this ETag (`vmm fn get`).
    #[arg(long, value_name = "ETAG")]
    pub if_match: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Args, Debug, Clone)]
pub struct InvokeArgs {
    /// The function (or a template the daemon serves).
    pub name: String,
    /// The request body [default: stdin; `-` is stdin too].
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// A request header (for --interface http functions, which see them). Repeatable.
    #[arg(long = "header", short = 'H', value_name = "K:V")]
    pub headers: Vec<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// A failure: the message for stderr and, when the daemon answered JSON, that answer (what
/// `--json` prints).
#[derive(Debug)]
struct Fail {
    msg: String,
    json: Option<Value>,
}

impl From<String> for Fail {
    fn from(msg: String) -> Self {
        Fail { msg, json: None }
    }
}

impl Fail {
    fn report(&self, as_json: bool, out: &mut dyn Write) {
        eprintln!("vmm: error: {}", self.msg);
        if as_json {
            let v = self
                .json
                .clone()
                .unwrap_or_else(|| json!({ "error": self.msg }));
            let _ = writeln!(out, "{v}");
        }
    }
}

/// Run one `vmm fn` subcommand and return the process exit status.
pub fn run(cmd: FnCommand) -> i32 {
    let as_json = cmd.conn().json;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let r = match &cmd {
        FnCommand::Deploy(a) => deploy(a, &mut out).map(|()| 0),
        FnCommand::Invoke(a) => read_input(a.input.as_deref())
            .map_err(Fail::from)
            .and_then(|input| invoke(a, &input, &mut out)),
        FnCommand::Get { name, conn } => get(name, conn, &mut out).map(|()| 0),
        FnCommand::Ls { conn } => ls(conn, &mut out).map(|()| 0),
        FnCommand::Rm { name, conn } => rm(name, conn, &mut out).map(|()| 0),
    };
    let code = match r {
        Ok(code) => code,
        Err(f) => {
            f.report(as_json, &mut out);
            1
        }
    };
    match out.flush() {
        Err(e) if code == 0 => {
            eprintln!("vmm: error: write to stdout: {e}");
            1
        }
        _ => code,
    }
}

// ---------------------------------------------------------------------------------------
// Connection: URL, token, requests.

/// The base URL as given, checked: http:// (added when there is no scheme), no https://,
/// without its trailing slashes.
fn base_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let (scheme, rest) = full.split_once("://").unwrap_or(("", &full));
    if scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "{url}: this client speaks plain http:// only; put TLS in a reverse proxy in front \
             of `vmm serve` (or an SSH tunnel) and give --url its local http:// address"
        ));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("{url}: not an http:// URL"));
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || rest.contains(['?', '#']) || rest.chars().any(|c| c.is_whitespace()) {
        return Err(format!(
            "{url}: not a daemon URL (want http://HOST:PORT[/PREFIX])"
        ));
    }
    Ok(format!("http://{}", rest.trim_end_matches('/')))
}

/// `base` (from [`base_url`], or any URL) and an absolute API path, with one slash between.
fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Where the token came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenSource {
    File(PathBuf),
    Env,
}

/// The bearer token: the file's contents trimmed if a file is given, else `env_token`
/// (`$VMM_TOKEN`) trimmed, else none.
fn resolve_token(
    file: Option<&Path>,
    env_token: Option<String>,
) -> Result<Option<(String, TokenSource)>, String> {
    let (token, source) = match file {
        Some(path) => {
            let bytes = match read_bounded(path, TOKEN_FILE_MAX) {
                Ok(Some(b)) => b,
                Ok(None) => return Err(format!("token file {}: too large", path.display())),
                Err(e) => return Err(format!("token file {}: {e}", path.display())),
            };
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("token file {}: not text", path.display()))?;
            (text, TokenSource::File(path.to_path_buf()))
        }
        None => match env_token {
            Some(t) => (t, TokenSource::Env),
            None => return Ok(None),
        },
    };
    let token = token.trim().to_string();
    let where_ = match &source {
        TokenSource::File(p) => format!("token file {}", p.display()),
        TokenSource::Env => "$VMM_TOKEN".to_string(),
    };
    if token.is_empty() {
        return Err(format!("{where_} is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{where_}: a token is one line of printable ASCII without spaces"
        ));
    }
    Ok(Some((token, source)))
}

/// The scope of the deploy API's routes.
const SCOPE_DEPLOY: &str = "deploy";

/// A client of one daemon.
struct Client {
    base: String,
    token: Option<(String, TokenSource)>,
    agent: ureq::Agent,
    verbose: bool,
}

/// An answer read whole (up to a bound).
struct Answer {
    status: u16,
    status_text: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// "404 Not Found".
    fn status_line(&self) -> String {
        format!("{} {}", self.status, clean(&self.status_text, false))
    }

    /// The daemon's message: the JSON answer's `error`, else the body's first line, else
    /// the status.
    fn message(&self) -> String {
        let from_json = self
            .json()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
        let msg = from_json.unwrap_or_else(|| first_line(&self.body));
        if msg.is_empty() {
            self.status_line()
        } else {
            format!("{}: {}", self.status_line(), clean(&cap(&msg, 1000), false))
        }
    }
}

impl Client {
    fn new(conn: &ConnArgs) -> Result<Client, String> {
        let base = base_url(&conn.url)?;
        let token = resolve_token(
            conn.token_file.as_deref(),
            std::env::var("VMM_TOKEN").ok().filter(|t| !t.is_empty()),
        )?;
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            // A redirect would carry the request (and its body) elsewhere: say so instead.
            .redirects(0)
            .user_agent(concat!("vmm/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            base,
            token,
            agent,
            verbose: conn.verbose,
        })
    }

    fn url(&self, path: &str) -> String {
        join_url(&self.base, path)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut r = self.agent.request(method, &self.url(path));
        if let Some((t, _)) = &self.token {
            r = r.set("authorization", &format!("Bearer {t}"));
        }
        r
    }

    /// Send `req` (with `body` if any) and return the response, whatever its status.
    fn send(&self, req: ureq::Request, body: Option<&[u8]>) -> Result<ureq::Response, String> {
        let what = format!("{} {}", req.method(), req.url());
        if self.verbose {
            match body {
                Some(b) => eprintln!("> {what} ({} bytes)", b.len()),
                None => eprintln!("> {what}"),
            }
        }
        let t0 = Instant::now();
        let r = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
            Err(ureq::Error::Transport(t)) => return Err(self.transport_error(&what, &t)),
        };
        if self.verbose {
            eprintln!(
                "< {} {} ({:.1} ms to the headers)",
                resp.status(),
                clean(resp.status_text(), false),
                t0.elapsed().as_secs_f64() * 1e3
            );
            for name in resp.headers_names() {
                if name.starts_with("x-vmm-") || name == "etag" || name == "www-authenticate" {
                    for v in resp.all(&name) {
                        eprintln!("< {name}: {}", clean(v, false));
                    }
                }
            }
        }
        Ok(resp)
    }

    fn transport_error(&self, what: &str, t: &ureq::Transport) -> String {
        match t.kind() {
            ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
                // The cause ("Connection refused (os error 111)") without ureq's wrapping.
                let cause = std::error::Error::source(t)
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| t.to_string());
                format!(
                    "cannot reach the daemon at {}: {cause}\n  is `vmm serve` running there? \
                     Start it with `vmm serve`, or point --url (or $VMM_URL) at it",
                    self.base
                )
            }
            _ => format!("{what}: {t}"),
        }
    }

    /// Send and read the whole answer, up to `max` bytes (more is an error).
    fn call(&self, req: ureq::Request, body: Option<&[u8]>, max: u64) -> Result<Answer, String> {
        let what = format!("{} {}", req.method(), req.url());
        let resp = self.send(req, body)?;
        let status = resp.status();
        let status_text = resp.status_text().to_string();
        let (body, over) = read_capped(resp.into_reader(), max)
            .map_err(|e| format!("{what}: reading the answer: {e}"))?;
        if over {
            return Err(format!(
                "{what}: the daemon's answer ({status}) is over {} MiB; not read",
                max >> 20
            ));
        }
        Ok(Answer {
            status,
            status_text,
            body,
        })
    }

    /// The failure for an answer that is not what was asked: with hints for 401/403 and for
    /// a daemon without the route. `scope`: the scopes that would do (docs/api.md).
    fn refused(&self, what: &str, a: &Answer, scope: &str) -> Fail {
        let mut msg = format!("{what}: {}", a.message());
        match a.status {
            401 => match &self.token {
                None => msg.push_str(
                    "\n  no token was sent: pass --token-file FILE (or set $VMM_TOKEN_FILE or \
                     $VMM_TOKEN) with a token of the daemon's --auth file",
                ),
                Some((_, src)) => {
                    let src = match src {
                        TokenSource::File(p) => format!("--token-file {}", p.display()),
                        TokenSource::Env => "$VMM_TOKEN".to_string(),
                    };
                    msg.push_str(&format!(
                        "\n  the daemon did not accept the token from {src}: check it (--token-file)"
                    ));
                }
            },
            403 => {
                if self.token.is_none() {
                    msg.push_str(&format!(
                        "\n  no token was sent: pass --token-file FILE with a token that has the \
                         {scope} scope (deploying needs a daemon started with --auth)"
                    ));
                } else {
                    msg.push_str(&format!(
                        "\n  this needs a token with the {scope} scope (--token-file)"
                    ));
                }
            }
            _ => {}
        }
        Fail {
            msg,
            json: a.json(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Names, digests, local files.

/// A deployable function name (docs/api.md).
fn check_function_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad function name {:?}: 1 to 64 of A-Z a-z 0-9 _ -, starting with a letter or digit",
            clean(&cap(name, 100), false)
        ))
    }
}

/// A name to look up or invoke: a function, or a plain template (which may have dots).
fn check_target_name(name: &str) -> Result<(), String> {
    let ok = (1..=255).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad name {:?}: letters, digits, _, - and .",
            clean(&cap(name, 100), false)
        ))
    }
}

/// `sha256:HEX` of `bytes`, the way the daemon names blobs.
fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// `sha256:HEX` (64 hex digits, either case) normalised to lower case; `None` if `s` is not one.
fn parse_digest(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// Read at most `limit` bytes of a file; `None` if it is larger.
fn read_bounded(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::other("is a directory"));
    }
    if meta.is_file() && meta.len() > limit {
        return Ok(None);
    }
    let (buf, over) = read_capped(file, limit)?;
    Ok((!over).then_some(buf))
}

/// Read up to `limit` bytes; the flag says there was more.
fn read_capped(r: impl Read, limit: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    r.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    let over = buf.len() as u64 > limit;
    if over {
        buf.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    Ok((buf, over))
}

fn read_file(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>, String> {
    match read_bounded(path, limit) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(format!(
            "{what} {}: over {} MiB",
            path.display(),
            limit >> 20
        )),
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
    }
}

/// The module at `path`: a .wasm as it is, .wat text compiled.
fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = read_file(path, UPLOAD_MAX, "module")?;
    let is_text = path.extension().is_some_and(|e| e == "wat")
        || bytes.trim_ascii_start().starts_with(b"(module");
    let bytes = if is_text {
        wat::parse_bytes(&bytes)
            .map(|b| b.into_owned())
            .map_err(|e| format!("module {}: {e}", path.display()))?
    } else {
        bytes
    };
    if !bytes.starts_with(b"\0asm") {
        return Err(format!(
            "module {}: not a WebAssembly module (a .wasm binary or .wat text)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// The request body: the file, or stdin for none or `-`.
fn read_input(input: Option<&Path>) -> Result<Vec<u8>, String> {
    match input {
        Some(p) if p != Path::new("-") => read_file(p, INPUT_MAX, "input"),
        _ => {
            let stdin = io::stdin();
            if stdin.is_terminal() {
                eprintln!("vmm: reading the request from the terminal (end it with Ctrl-D; --input FILE reads a file)");
            }
            match read_capped(stdin.lock(), INPUT_MAX) {
                Ok((b, false)) => Ok(b),
                Ok((_, true)) => Err(format!("stdin: over {} MiB", INPUT_MAX >> 20)),
                Err(e) => Err(format!("stdin: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Deploy.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlobKind {
    Module,
    File,
}

impl BlobKind {
    fn path(self) -> &'static str {
        match self {
            BlobKind::Module => "/v1/modules",
            BlobKind::File => "/v1/files",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            BlobKind::Module => "module",
            BlobKind::File => "file",
        }
    }
}

/// A blob the spec names by digest: uploaded unless the daemon has it (`bytes: None`: the
/// user gave only the digest, so the daemon must have it).
#[derive(Debug)]
struct Upload {
    kind: BlobKind,
    digest: String,
    label: String,
    bytes: Option<Vec<u8>>,
}

/// What a deploy sends: the spec (complete: digests are computed here) and the blobs it
/// names.
#[derive(Debug)]
struct Plan {
    spec: Value,
    uploads: Vec<Upload>,
}

/// Build the deploy from the arguments and local files, without the daemon.
fn plan_deploy(a: &DeployArgs) -> Result<Plan, String> {
    check_function_name(&a.name)?;
    let mut spec = Map::new();
    let mut uploads = Vec::new();
    spec.insert("runtime".into(), a.runtime.as_str().into());
    match (a.runtime, &a.source) {
        (FnRuntime::Wasi, Some(_)) => {
            return Err(
                "--source is for js and python; a wasi function is its --module (give its \
                 files with --file)"
                    .into(),
            )
        }
        (FnRuntime::Wasi, None) if a.module.is_none() => {
            return Err("--runtime wasi needs --module FILE|sha256:HEX".into())
        }
        (FnRuntime::Js | FnRuntime::Python, None) => {
            return Err(format!(
                "--runtime {} needs --source FILE (the script)",
                a.runtime.as_str()
            ))
        }
        (_, Some(path)) => {
            let bytes = read_file(path, SPEC_MAX as u64, "source")?;
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("source {}: not UTF-8 text", path.display()))?;
            let entry = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("source {}: no UTF-8 file name", path.display()))?;
            spec.insert("source".into(), text.into());
            spec.insert("entry".into(), entry.into());
        }
        (FnRuntime::Wasi, None) => {}
    }
    if let Some(m) = &a.module {
        let digest = match parse_digest(m) {
            Some(d) => {
                uploads.push(Upload {
                    kind: BlobKind::Module,
                    digest: d.clone(),
                    label: d.clone(),
                    bytes: None,
                });
                d
            }
            None => {
                let path = Path::new(m);
                let bytes = read_module(path)?;
                let d = digest_of(&bytes);
                uploads.push(Upload {
                    kind: BlobKind::Module,
                    digest: d.clone(),
                    label: file_label(path),
                    bytes: Some(bytes),
                });
                d
            }
        };
        spec.insert("module".into(), digest.into());
    }
    if !a.args.is_empty() {
        spec.insert("args".into(), a.args.clone().into());
    }
    if !a.env.is_empty() {
        let mut env = Map::new();
        for e in &a.env {
            match e.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    env.insert(k.to_string(), v.into());
                }
                _ => return Err(format!("--env {e:?}: want KEY=VALUE")),
            }
        }
        spec.insert("env".into(), env.into());
    }
    if !a.files.is_empty() {
        let mut files = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for f in &a.files {
            let (host, guest) = split_file_arg(f);
            if !vmm_abi::valid_guest_path(guest.as_bytes()) {
                return Err(format!(
                    "--file {f:?}: bad guest path {guest:?} (relative, no empty, . or .. parts)"
                ));
            }
            if !seen.insert(guest.clone()) {
                return Err(format!("--file {f:?}: a second file at {guest}"));
            }
            let bytes = read_file(Path::new(&host), UPLOAD_MAX, "file")?;
            if bytes.len() <= INLINE_FILE_MAX {
                if let Ok(text) = std::str::from_utf8(&bytes) {
                    files.push(json!({"path": guest, "content": text}));
                    continue;
                }
            }
            let d = digest_of(&bytes);
            files.push(json!({"path": guest, "digest": d}));
            if !uploads
                .iter()
                .any(|u| u.kind == BlobKind::File && u.digest == d)
            {
                uploads.push(Upload {
                    kind: BlobKind::File,
                    digest: d,
                    label: file_label(Path::new(&host)),
                    bytes: Some(bytes),
                });
            }
        }
        spec.insert("files".into(), files.into());
    }
    if let Some(m) = a.memory {
        spec.insert("memory_mib".into(), m.into());
    }
    if let Some(t) = a.timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(format!("--timeout {t}: want a number of seconds over 0"));
        }
        // Whole seconds as an integer: a daemon reading whole seconds takes it either way.
        let v: Value = if t.fract() == 0.0 && t <= u64::MAX as f64 {
            (t as u64).into()
        } else {
            t.into()
        };
        spec.insert("timeout_secs".into(), v);
    }
    if let Some(i) = a.interface {
        let i = match i {
            FnInterface::Raw => "raw",
            FnInterface::Http => "http",
        };
        spec.insert("interface".into(), i.into());
    }
    if a.lazy {
        spec.insert("build".into(), "on_first_invoke".into());
    }
    if a.public {
        spec.insert("public".into(), true.into());
    }
    Ok(Plan {
        spec: spec.into(),
        uploads,
    })
}

/// `HOST[:GUEST]` as `run --file` reads it: a HOST that exists as given wins over splitting
/// at ':'; GUEST defaults to HOST's file name; a leading `./` of GUEST is dropped.
fn split_file_arg(f: &str) -> (String, String) {
    let (host, guest) = match f.rsplit_once(':') {
        Some((h, g)) if !Path::new(f).exists() => (h.to_string(), g.to_string()),
        _ => (f.to_string(), file_label(Path::new(f))),
    };
    let guest = guest.trim_start_matches("./").to_string();
    (host, guest)
}

fn file_label(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Make sure the daemon has `up`: `HEAD` its digest, upload it on a 404.
fn ensure_blob(c: &Client, up: &Upload) -> Result<(), Fail> {
    let noun = up.kind.noun();
    let head = format!("{}/{}", up.kind.path(), up.digest);
    let what = format!("HEAD {}", c.url(&head));
    let a = c.call(
        c.request("HEAD", &head).timeout(QUICK_TIMEOUT),
        None,
        ANSWER_MAX,
    )?;
    match a.status {
        200 | 204 => {
            if c.verbose {
                eprintln!("vmm: the daemon has {noun} {} ({})", up.label, up.digest);
            }
            return Ok(());
        }
        404 => {}
        _ => return Err(c.refused(&what, &a, SCOPE_DEPLOY)),
    }
    let Some(bytes) = &up.bytes else {
        return Err(format!(
            "the daemon at {} has no {noun} {}: give the {noun}'s file instead of its digest to \
             upload it",
            c.base, up.digest
        )
        .into());
    };
    let mib = bytes.len() as f64 / (1u64 << 20) as f64;
    if bytes.len() > PROGRESS_OVER {
        eprintln!("uploading {} ({mib:.1} MiB)...", up.label);
    }
    let what = format!("upload {noun} {} (PUT {})", up.label, c.url(up.kind.path()));
    let req = c
        .request("PUT", up.kind.path())
        .set("content-type", "application/octet-stream")
        .set("accept", "application/json");
    let a = c.call(req, Some(bytes), ANSWER_MAX)?;
    match a.status {
        200 | 201 => {}
        404 | 405 => {
            let mut f = c.refused(&what, &a, SCOPE_DEPLOY);
            f.msg.push_str(
                "\n  the daemon has no deploy API (docs/api.md): is it an older `vmm serve`?",
            );
            return Err(f);
        }
        413 => {
            let mut f = c.refused(&what, &a, SCOPE_DEPLOY);
            f.msg.push_str(&format!(
                "\n  {mib:.1} MiB is over the daemon's upload limit (vmm serve --max-upload)"
            ));
            return Err(f);
        }
        _ => return Err(c.refused(&what, &a, SCOPE_DEPLOY)),
    }
    // The daemon names what it stored: it must be what the spec will name.
    if let Some(d) = a
        .json()
        .and_then(|v| v.get("digest")?.as_str().map(str::to_string))
    {
        if d != up.digest {
            return Err(format!(
                "{what}: the daemon stored it as {}, not {}",
                clean(&cap(&d, 100), false),
                up.digest
            )
            .into());
        }
    }
    if c.verbose {
        eprintln!("vmm: uploaded {noun} {} ({})", up.label, up.digest);
    }
    Ok(())
}

fn deploy(a: &DeployArgs, out: &mut dyn Write) -> Result<(), Fail> {
    let plan = plan_deploy(a)?;
    let body = serde_json::to_vec(&plan.spec).map_err(|e| format!("the spec: {e}"))?;
    if body.len() > SPEC_MAX {
        return Err(format!(
            "the deploy request is {:.1} MiB, over the daemon's 16 MiB: ship big files with \
             --file (over 64 KiB they are uploaded, not inline)",
            body.len() as f64 / (1u64 << 20) as f64
        )
        .into());
    }
    let c = Client::new(&a.conn)?;
    for up in &plan.uploads {
        ensure_blob(&c, up)?;
    }
    let path = format!("/v1/functions/{}", a.name);
    let mut req = c
        .request("PUT", &path)
        .set("content-type", "application/json")
        .set("accept", "application/json");
    if let Some(etag) = &a.if_match {
        req = req.set("if-match", &quote_etag(etag));
    }
    let what = format!("deploy {} (PUT {})", a.name, c.url(&path));
    let t0 = Instant::now();
    let ans = c.call(req, Some(&body), ANSWER_MAX)?;
    if c.verbose {
        eprintln!(
            "vmm: deploy answered in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    let v = ans.json();
    match ans.status {
        200 | 201 => {
            let v = v.unwrap_or(Value::Null);
            if a.conn.json {
                writeln!(out, "{v}").map_err(|e| format!("write to stdout: {e}"))?;
            } else {
                writeln!(
                    out,
                    "{}\n  invoke: POST {}/invoke",
                    deploy_summary(&a.name, &v),
                    c.url(&path)
                )
                .map_err(|e| format!("write to stdout: {e}"))?;
            }
            Ok(())
        }
        400 => {
            let v = v.unwrap_or(Value::Null);
            let mut msg = format!("deploying {} failed", a.name);
            if let Some(step) = v.get("step").and_then(Value::as_str) {
                msg.push_str(&format!(" at {}", clean(&cap(step, 100), false)));
            }
            let err = v
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| first_line(&ans.body));
            msg.push_str(&format!(": {}", clean(&cap(&err, 4000), true)));
            if let Some(stderr) = v.get("stderr").and_then(Value::as_str) {
                if !stderr.trim().is_empty() {
                    msg.push_str("\n  the function's stderr:");
                    for line in clean(stderr, true).trim_end().lines() {
                        msg.push_str(&format!("\n  | {line}"));
                    }
                }
            }
            Err(Fail { msg, json: Some(v) })
        }
        412 => {
            let since = a.if_match.as_deref().unwrap_or("the version you named");
            let mut f = c.refused(&what, &ans, SCOPE_DEPLOY);
            f.msg = format!(
                "{} changed since {}: not replaced (see its current version with `vmm fn get {}`)\n  {}",
                a.name,
                clean(since, false),
                a.name,
                f.msg
            );
            Err(f)
        }
        413 => {
            let mut f = c.refused(&what, &ans, SCOPE_DEPLOY);
            f.msg
                .push_str("\n  over one of the daemon's bounds (a spec is at most 16 MiB)");
            Err(f)
        }
        404 | 405 => {
            let mut f = c.refused(&what, &ans, SCOPE_DEPLOY);
            f.msg.push_str(
                "\n  the daemon has no deploy API (docs/api.md): is it an older `vmm serve`?",
            );
            Err(f)
        }
        _ => Err(c.refused(&what, &ans, SCOPE_DEPLOY)),
    }
}

/// `If-Match` wants a quoted entity tag; `vmm fn get` and the answers may show it bare.
fn quote_etag(etag: &str) -> String {
    let e = etag.trim();
    if e.starts_with('"') || e.starts_with("W/\"") || e == "*" {
        e.to_string()
    } else {
        format!("\"{e}\"")
    }
}

/// `deployed hello version 3 (template fn.hello.v3, 6 own pages, built in 41.2 ms)`.
fn deploy_summary(name: &str, v: &Value) -> String {
    if !v.is_object() {
        return format!("deployed {name} (the daemon's answer is not the JSON docs/api.md says)");
    }
    let version = cell(v.get("version"));
    let template = v.get("template").and_then(Value::as_str);
    let built = v
        .get("built")
        .and_then(Value::as_bool)
        .unwrap_or(template.is_some());
    if !built {
        return format!("deployed {name} version {version} (built on its first request)");
    }
    let mut parts = Vec::new();
    if let Some(t) = template {
        parts.push(format!("template {}", clean(&cap(t, 200), false)));
    }
    if let Some(p) = v.get("own_pages").and_then(Value::as_u64) {
        parts.push(format!("{p} own pages"));
    }
    let ms = v
        .get("create_ms")
        .and_then(Value::as_f64)
        .or_else(|| v.get("deploy_ms").and_then(Value::as_f64));
    if let Some(ms) = ms {
        parts.push(format!("built in {ms:.1} ms"));
    }
    if parts.is_empty() {
        format!("deployed {name} version {version}")
    } else {
        format!("deployed {name} version {version} ({})", parts.join(", "))
    }
}

// ---------------------------------------------------------------------------------------
// Invoke.

/// Parse `K:V` into a header name and value.
fn parse_header(h: &str) -> Result<(String, String), String> {
    let (k, v) = h
        .split_once(':')
        .ok_or_else(|| format!("--header {h:?}: want NAME:VALUE"))?;
    let k = k.trim();
    let v = v.trim();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if k.is_empty() || !k.bytes().all(token) {
        return Err(format!("--header {h:?}: bad header name"));
    }
    if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("--header {h:?}: bad header value"));
    }
    Ok((k.to_ascii_lowercase(), v.to_string()))
}

/// POST `input` to the function; the body to `out`. Returns the exit status: 0 for 2xx.
fn invoke(a: &InvokeArgs, input: &[u8], out: &mut dyn Write) -> Result<i32, Fail> {
    check_target_name(&a.name)?;
    let headers = a
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    let c = Client::new(&a.conn)?;
    let path = format!("/v1/functions/{}/invoke", a.name);
    let mut req = c.request("POST", &path);
    for (k, v) in &headers {
        req = req.set(k, v);
    }
    if a.conn.json {
        req = req.set("accept", "application/json");
    }
    let what = format!("POST {}", c.url(&path));
    let t0 = Instant::now();
    let resp = c.send(req, Some(input))?;
    let status = resp.status();
    let ok = (200..300).contains(&status);
    let exit_code = resp
        .header("x-vmm-exit-code")
        .map(|s| clean(&cap(s, 20), false));
    let vmm_error = resp
        .header("x-vmm-error")
        .map(|s| clean(&cap(s, 100), false));
    let client_time = |t0: Instant| {
        if c.verbose {
            eprintln!(
                "vmm: client time {:.1} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
    };
    if a.conn.json {
        let status_text = resp.status_text().to_string();
        let (body, over) = read_capped(resp.into_reader(), INVOKE_JSON_MAX)
            .map_err(|e| format!("{what}: reading the answer: {e}"))?;
        client_time(t0);
        if over {
            return Err(format!(
                "{what}: the answer is over {} MiB; not read",
                INVOKE_JSON_MAX >> 20
            )
            .into());
        }
        let ans = Answer {
            status,
            status_text,
            body,
        };
        let v = ans
            .json()
            .unwrap_or_else(|| json!({"error": ans.message(), "status": status}));
        writeln!(out, "{v}").map_err(|e| format!("write to stdout: {e}"))?;
        if ok {
            return Ok(0);
        }
        eprintln!(
            "vmm: error: {}",
            invoke_failure(&c, &a.name, &ans, &exit_code)
        );
        return Ok(1);
    }
    // The function ran (the daemon says its exit code) or it answered 2xx: the body is the
    // function's output, whatever the status.
    if ok || exit_code.is_some() {
        let status_line = format!("{status} {}", clean(resp.status_text(), false));
        let mut reader = resp.into_reader().take(INVOKE_OUTPUT_MAX);
        let copied = io::copy(&mut reader, out);
        let mut rest = reader.into_inner();
        let cut = copied.is_ok() && rest.read(&mut [0u8; 1]).map(|n| n > 0).unwrap_or(false);
        client_time(t0);
        match copied {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                return Err(format!("write to stdout: {e}").into())
            }
            Err(e) => return Err(format!("{what}: the response body: {e}").into()),
        }
        out.flush().map_err(|e| format!("write to stdout: {e}"))?;
        if cut {
            eprintln!(
                "vmm: error: the response body was cut at {} MiB",
                INVOKE_OUTPUT_MAX >> 20
            );
            return Ok(1);
        }
        if ok {
            return Ok(0);
        }
        let mut msg = format!("{} answered {status_line}", a.name);
        if let Some(code) = &exit_code {
            msg.push_str(&format!(" (exit code {code})"));
        }
        if let Some(e) = &vmm_error {
            msg.push_str(&format!(" ({e})"));
        }
        eprintln!("vmm: error: {msg}");
        return Ok(1);
    }
    let status_text = resp.status_text().to_string();
    let (body, _) = read_capped(resp.into_reader(), ANSWER_MAX)
        .map_err(|e| format!("{what}: reading the answer: {e}"))?;
    client_time(t0);
    let ans = Answer {
        status,
        status_text,
        body,
    };
    Err(Fail {
        msg: invoke_failure(&c, &a.name, &ans, &exit_code),
        json: None,
    })
}

fn invoke_failure(c: &Client, name: &str, a: &Answer, exit_code: &Option<String>) -> String {
    let what = format!("invoke {name}");
    let mut msg = c.refused(&what, a, &format!("invoke or invoke:{name}")).msg;
    if let Some(code) = exit_code {
        msg.push_str(&format!(" (exit code {code})"));
    }
    if a.status == 404 {
        msg.push_str(&format!(
            "\n  the daemon at {} serves no {name} (`vmm fn ls` lists what it has)",
            c.base
        ));
    }
    msg
}

// ---------------------------------------------------------------------------------------
// Get, ls, rm.

fn get(name: &str, conn: &ConnArgs, out: &mut dyn Write) -> Result<(), Fail> {
    check_target_name(name)?;
    let c = Client::new(conn)?;
    let path = format!("/v1/functions/{name}");
    let req = c
        .request("GET", &path)
        .set("accept", "application/json")
        .timeout(QUICK_TIMEOUT);
    let what = format!("GET {}", c.url(&path));
    let a = c.call(req, None, ANSWER_MAX)?;
    if a.status == 404 {
        let mut f = c.refused(&what, &a, "deploy or metrics");
        f.msg = format!("no function {name} at {}\n  {}", c.base, f.msg);
        return Err(f);
    }
    if !a.ok() {
        return Err(c.refused(&what, &a, "deploy or metrics"));
    }
    let v = a
        .json()
        .ok_or_else(|| format!("{what}: the answer is not JSON"))?;
    let text = if conn.json {
        v.to_string()
    } else {
        function_summary(name, &v)
    };
    writeln!(out, "{text}").map_err(|e| format!("write to stdout: {e}").into())
}

/// The first of `paths` (each a path of object keys) that `v` has, not null.
fn pick<'a>(v: &'a Value, paths: &[&[&str]]) -> Option<&'a Value> {
    paths.iter().find_map(|p| {
        let mut at = v;
        for k in *p {
            at = at.get(k)?;
        }
        (!at.is_null()).then_some(at)
    })
}

/// A value for a table or summary: `-` when missing or not a scalar.
fn cell(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => clean(&cap(s, 200), false),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => if *b { "yes" } else { "no" }.to_string(),
        _ => "-".to_string(),
    }
}

/// The pool counters, at the top or under `pool`.
fn pool_field<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    pick(v, &[&[k], &["pool", k]])
}

fn function_summary(name: &str, v: &Value) -> String {
    let rows = [
        (
            "name",
            pick(v, &[&["name"]])
                .map(|n| cell(Some(n)))
                .unwrap_or(name.to_string()),
        ),
        ("version", cell(pick(v, &[&["version"]]))),
        (
            "runtime",
            cell(pick(v, &[&["runtime"], &["spec", "runtime"]])),
        ),
        (
            "interface",
            cell(pick(v, &[&["interface"], &["spec", "interface"]])),
        ),
        ("template", cell(pick(v, &[&["template"]]))),
        ("built", cell(pick(v, &[&["built"]]))),
        (
            "pool",
            format!(
                "{} ready, {} busy, {} served",
                cell(pool_field(v, "ready")),
                cell(pool_field(v, "busy")),
                cell(pool_field(v, "served"))
            ),
        ),
        ("public", cell(pick(v, &[&["public"], &["spec", "public"]]))),
        ("etag", cell(pick(v, &[&["etag"]]))),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<10} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ls(conn: &ConnArgs, out: &mut dyn Write) -> Result<(), Fail> {
    let c = Client::new(conn)?;
    let req = c
        .request("GET", "/v1/functions")
        .set("accept", "application/json")
        .timeout(QUICK_TIMEOUT);
    let what = format!("GET {}", c.url("/v1/functions"));
    let a = c.call(req, None, ANSWER_MAX)?;
    if !a.ok() {
        return Err(c.refused(&what, &a, "metrics"));
    }
    let v = a
        .json()
        .ok_or_else(|| format!("{what}: the answer is not JSON"))?;
    let text = if conn.json {
        v.to_string()
    } else {
        function_table(&v).ok_or_else(|| format!("{what}: the answer has no `functions` list"))?
    };
    writeln!(out, "{text}").map_err(|e| format!("write to stdout: {e}").into())
}

/// NAME VERSION RUNTIME READY BUSY SERVED, one row per entry of `functions` (sorted by name).
fn function_table(v: &Value) -> Option<String> {
    let list = v.get("functions")?.as_array()?;
    let mut rows: Vec<[String; 6]> = list
        .iter()
        .filter(|f| f.is_object())
        .map(|f| {
            [
                cell(f.get("name")),
                cell(pick(f, &[&["version"]])),
                cell(pick(f, &[&["runtime"], &["spec", "runtime"]])),
                cell(pool_field(f, "ready")),
                cell(pool_field(f, "busy")),
                cell(pool_field(f, "served")),
            ]
        })
        .collect();
    rows.sort();
    let header = ["NAME", "VERSION", "RUNTIME", "READY", "BUSY", "SERVED"].map(String::from);
    let mut width = [0usize; 6];
    for r in std::iter::once(&header).chain(&rows) {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in r.iter().zip(width).enumerate() {
            if i + 1 == r.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s
    };
    Some(
        std::iter::once(&header)
            .chain(&rows)
            .map(line)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn rm(name: &str, conn: &ConnArgs, out: &mut dyn Write) -> Result<(), Fail> {
    check_target_name(name)?;
    let c = Client::new(conn)?;
    let path = format!("/v1/functions/{name}");
    let req = c
        .request("DELETE", &path)
        .set("accept", "application/json")
        .timeout(QUICK_TIMEOUT);
    let what = format!("DELETE {}", c.url(&path));
    let a = c.call(req, None, ANSWER_MAX)?;
    match a.status {
        200 | 202 | 204 => {
            let text = if conn.json {
                a.json()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"name": name, "removed": true}))
                    .to_string()
            } else {
                format!("removed {name}")
            };
            writeln!(out, "{text}").map_err(|e| format!("write to stdout: {e}").into())
        }
        404 => {
            let mut f = c.refused(&what, &a, SCOPE_DEPLOY);
            f.msg = format!("no function {name} at {}\n  {}", c.base, f.msg);
            Err(f)
        }
        _ => Err(c.refused(&what, &a, SCOPE_DEPLOY)),
    }
}

// ---------------------------------------------------------------------------------------
// Text from the server, for a terminal.

/// `s` with control characters masked (`\n` and `\t` kept when `multiline`; `\r` dropped).
fn clean(s: &str, multiline: bool) -> String {
    s.chars()
        .filter(|&c| c != '\r')
        .map(|c| {
            if c.is_control() && !(multiline && (c == '\n' || c == '\t')) {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// At most `n` characters of `s` (`...` marks a cut).
fn cap(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The first non-empty line of a body, trimmed and capped, as text.
fn first_line(body: &[u8]) -> String {
    let head = &body[..body.len().min(4096)];
    let text = String::from_utf8_lossy(head);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    clean(&cap(line, 300), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    /// A fresh directory under the system's temporary one.
    fn temp_dir() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "vmm-fnclient-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn conn(url: &str) -> ConnArgs {
        ConnArgs {
            url: url.into(),
            token_file: None,
            json: false,
            verbose: false,
        }
    }

    fn deploy_args(name: &str, runtime: FnRuntime) -> DeployArgs {
        DeployArgs {
            name: name.into(),
            runtime,
            source: None,
            module: None,
            files: vec![],
            args: vec![],
            env: vec![],
            memory: None,
            timeout: None,
            interface: None,
            lazy: false,
            public: false,
            if_match: None,
            conn: conn(DEFAULT_URL),
        }
    }

    const WAT: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

    #[test]
    fn js_spec_has_the_source_inline_files_and_env() {
        let d = temp_dir();
        std::fs::write(d.join("hello.js"), "print('hi')\n").unwrap();
        std::fs::write(d.join("words.txt"), "a b c").unwrap();
        let big: Vec<u8> = (0..(INLINE_FILE_MAX + 1))
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        std::fs::write(d.join("big.txt"), &big).unwrap();
        std::fs::write(d.join("bin.dat"), [0xffu8, 0xfe, 0]).unwrap();
        let mut a = deploy_args("hello", FnRuntime::Js);
        a.source = Some(d.join("hello.js"));
        a.files = vec![
            format!("{}:data/words.txt", d.join("words.txt").display()),
            d.join("big.txt").display().to_string(),
            format!("{}:./bin.dat", d.join("bin.dat").display()),
        ];
        a.env = vec![
            "GREETING=hi=there".into(),
            "EMPTY=".into(),
            "GREETING=hello".into(),
        ];
        a.args = vec!["--flag".into()];
        a.memory = Some(256);
        a.timeout = Some(10.0);
        a.interface = Some(FnInterface::Http);
        a.lazy = true;
        a.public = true;
        let plan = plan_deploy(&a).unwrap();
        let big_digest = digest_of(&big);
        let bin_digest = digest_of(&[0xff, 0xfe, 0]);
        assert_eq!(
            plan.spec,
            json!({
                "runtime": "js",
                "source": "print('hi')\n",
                "entry": "hello.js",
                "args": ["--flag"],
                "env": {"GREETING": "hello", "EMPTY": ""},
                "files": [
                    {"path": "data/words.txt", "content": "a b c"},
                    {"path": "big.txt", "digest": big_digest},
                    {"path": "bin.dat", "digest": bin_digest},
                ],
                "memory_mib": 256,
                "timeout_secs": 10,
                "interface": "http",
                "build": "on_first_invoke",
                "public": true,
            })
        );
        let ups: Vec<_> = plan
            .uploads
            .iter()
            .map(|u| (u.kind, u.digest.clone()))
            .collect();
        assert_eq!(
            ups,
            vec![(BlobKind::File, big_digest), (BlobKind::File, bin_digest)]
        );
        // Nothing unset is sent (the daemon refuses unknown fields, defaults the rest).
        let mut a = deploy_args("hello", FnRuntime::Python);
        a.source = Some(d.join("hello.js"));
        let plan = plan_deploy(&a).unwrap();
        assert_eq!(
            plan.spec,
            json!({"runtime": "python", "source": "print('hi')\n", "entry": "hello.js"})
        );
        a.timeout = Some(2.5);
        assert_eq!(plan_deploy(&a).unwrap().spec["timeout_secs"], json!(2.5));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn wasi_spec_names_the_module_by_digest() {
        let d = temp_dir();
        std::fs::write(d.join("m.wat"), WAT).unwrap();
        let wasm = wat::parse_str(WAT).unwrap();
        let digest = digest_of(&wasm);
        let mut a = deploy_args("tool", FnRuntime::Wasi);
        a.module = Some(d.join("m.wat").display().to_string());
        a.args = vec!["-x".into()];
        let plan = plan_deploy(&a).unwrap();
        assert_eq!(
            plan.spec,
            json!({"runtime": "wasi", "module": digest, "args": ["-x"]})
        );
        assert_eq!(plan.uploads.len(), 1);
        assert_eq!(plan.uploads[0].kind, BlobKind::Module);
        assert_eq!(plan.uploads[0].label, "m.wat");
        assert_eq!(plan.uploads[0].bytes.as_deref(), Some(&wasm[..]));
        // A digest given: referenced as it is (lower case), nothing to upload.
        let hex = "AB".repeat(32);
        a.module = Some(format!("sha256:{hex}"));
        let plan = plan_deploy(&a).unwrap();
        assert_eq!(
            plan.spec["module"],
            json!(format!("sha256:{}", "ab".repeat(32)))
        );
        assert!(plan.uploads[0].bytes.is_none());
        // What is refused before the daemon is asked.
        let mut b = deploy_args("tool", FnRuntime::Wasi);
        assert!(plan_deploy(&b).is_err(), "wasi without --module");
        b.module = a.module.clone();
        b.source = Some(d.join("m.wat"));
        assert!(plan_deploy(&b).is_err(), "wasi with --source");
        assert!(
            plan_deploy(&deploy_args("x", FnRuntime::Js)).is_err(),
            "js without --source"
        );
        std::fs::write(d.join("not.wasm"), "hello").unwrap();
        let mut c = deploy_args("tool", FnRuntime::Wasi);
        c.module = Some(d.join("not.wasm").display().to_string());
        assert!(plan_deploy(&c)
            .unwrap_err()
            .contains("not a WebAssembly module"));
        let mut e = deploy_args("bad name", FnRuntime::Wasi);
        e.module = a.module.clone();
        assert!(plan_deploy(&e).unwrap_err().contains("bad function name"));
        e.name = "ok".into();
        e.env = vec!["=x".into()];
        assert!(plan_deploy(&e).is_err());
        e.env = vec![];
        e.files = vec![format!("{}:../up", d.join("m.wat").display())];
        assert!(plan_deploy(&e).unwrap_err().contains("bad guest path"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn token_from_file_trimmed_else_env() {
        let d = temp_dir();
        let f = d.join("token");
        std::fs::write(&f, "  s3cret-token\n\n").unwrap();
        let (t, src) = resolve_token(Some(&f), Some("from-env".into()))
            .unwrap()
            .unwrap();
        assert_eq!(t, "s3cret-token");
        assert_eq!(src, TokenSource::File(f.clone()));
        let (t, src) = resolve_token(None, Some(" from-env\n".into()))
            .unwrap()
            .unwrap();
        assert_eq!((t.as_str(), src), ("from-env", TokenSource::Env));
        assert_eq!(resolve_token(None, None).unwrap(), None);
        std::fs::write(&f, " \n").unwrap();
        assert!(resolve_token(Some(&f), None).unwrap_err().contains("empty"));
        std::fs::write(&f, "two words").unwrap();
        assert!(resolve_token(Some(&f), None).is_err());
        assert!(resolve_token(Some(&d.join("missing")), None).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(
            base_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(base_url("127.0.0.1:9000").unwrap(), "http://127.0.0.1:9000");
        assert_eq!(base_url("http://h/vmm//").unwrap(), "http://h/vmm");
        assert!(base_url("https://h").unwrap_err().contains("reverse proxy"));
        assert!(base_url("ftp://h").is_err());
        assert!(base_url("http://").is_err());
        assert_eq!(
            join_url("http://h:1/", "/v1/functions"),
            "http://h:1/v1/functions"
        );
        assert_eq!(
            join_url(&base_url("http://h:1/prefix/").unwrap(), "/v1/functions/x"),
            "http://h:1/prefix/v1/functions/x"
        );
        assert_eq!(join_url("http://h", "v1/modules"), "http://h/v1/modules");
    }

    #[test]
    fn digests_and_names() {
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let d = digest_of(b"abc");
        assert_eq!(parse_digest(&d), Some(d.clone()));
        assert_eq!(
            parse_digest(&d.to_uppercase().replace("SHA256", "sha256")),
            Some(d)
        );
        assert_eq!(parse_digest("sha256:abc"), None);
        assert_eq!(parse_digest(&format!("md5:{}", "0".repeat(64))), None);
        assert_eq!(parse_digest(&format!("sha256:{}", "g".repeat(64))), None);
        assert!(check_function_name("hello-1_x").is_ok());
        assert!(check_function_name("_x").is_err());
        assert!(check_function_name(&"a".repeat(65)).is_err());
        assert!(check_function_name("a.b").is_err());
        assert!(check_target_name("fn.hello.v3").is_ok());
        assert!(check_target_name("a/b").is_err());
        assert!(check_target_name("..").is_err());
        assert_eq!(quote_etag("abc"), "\"abc\"");
        assert_eq!(quote_etag("\"abc\""), "\"abc\"");
    }

    #[test]
    fn summaries_read_fields_defensively() {
        let v = json!({"name": "hello", "version": 3, "template": "fn.hello.v3", "built": true,
                       "own_pages": 6, "create_ms": 41.23, "deploy_ms": 50.0});
        assert_eq!(
            deploy_summary("hello", &v),
            "deployed hello version 3 (template fn.hello.v3, 6 own pages, built in 41.2 ms)"
        );
        let v = json!({"version": 1, "template": null, "built": false});
        assert_eq!(
            deploy_summary("hello", &v),
            "deployed hello version 1 (built on its first request)"
        );
        assert_eq!(
            deploy_summary("x", &json!("odd")),
            "deployed x (the daemon's answer is not the JSON docs/api.md says)"
        );
        assert_eq!(
            deploy_summary("x", &json!({"version": 2})),
            "deployed x version 2 (built on its first request)"
        );
        let list = json!({"functions": [
            {"name": "zeta", "ready": 2, "busy": 0, "served": 7},
            {"name": "hello", "version": 3, "spec": {"runtime": "js"},
             "pool": {"ready": 1, "busy": 1, "served": 41}},
            "garbage",
            {"name": "evil\u{1b}[2J", "version": {"x": 1}},
        ]});
        assert_eq!(
            function_table(&list).unwrap(),
            "NAME      VERSION  RUNTIME  READY  BUSY  SERVED\n\
             evil?[2J  -        -        -      -     -\n\
             hello     3        js       1      1     41\n\
             zeta      -        -        2      0     7"
        );
        assert!(function_table(&json!({"functions": 1})).is_none());
        let s = function_summary("hello", &json!({"version": 2, "public": false}));
        assert!(s.contains("version:   2"), "{s}");
        assert!(s.contains("pool:      - ready, - busy, - served"), "{s}");
        assert!(s.contains("public:    no"), "{s}");
        assert_eq!(first_line(b"\n  first\r\nsecond"), "first");
        assert_eq!(cap("\u{e9}\u{e9}\u{e9}", 2), "\u{e9}\u{e9}...");
    }

    /// A fake daemon: answers each request with the canned response for its method and path
    /// (404 otherwise), one request per connection, and records what it was asked.
    struct Fake {
        url: String,
        seen: Seen,
    }

    /// Method, path and body of each request the fake daemon got.
    type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

    fn fake_daemon(canned: Vec<(&'static str, String, String)>) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = Vec::new();
                let mut byte = [0u8; 1];
                while !buf.ends_with(b"\r\n\r\n") && buf.len() < 65536 {
                    match s.read(&mut byte) {
                        Ok(1) => buf.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let mut words = head.split_whitespace();
                let method = words.next().unwrap_or("").to_string();
                let path = words.next().unwrap_or("").to_string();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = s.read_exact(&mut body);
                let answer = canned
                    .iter()
                    .find(|(m, p, _)| *m == method && *p == path)
                    .map(|(_, _, r)| r.clone())
                    .unwrap_or_else(|| {
                        "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 9\r\n\r\nnot found".into()
                    });
                log.lock().unwrap().push((method, path, body));
                let _ = s.write_all(answer.as_bytes());
            }
        });
        Fake { url, seen }
    }

    fn http(status: &str, headers: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn against_a_fake_daemon() {
        let d = temp_dir();
        std::fs::write(d.join("m.wat"), WAT).unwrap();
        let digest = digest_of(&wat::parse_str(WAT).unwrap());
        let other = digest_of(b"other");
        let deployed = r#"{"name":"tool","version":1,"etag":"v1","template":"fn.tool.v1","built":true,"own_pages":6,"create_ms":41.2}"#;
        let fake = fake_daemon(vec![
            (
                "POST",
                "/v1/functions/hello/invoke".into(),
                http("200 OK", "x-vmm-exit-code: 0\r\n", "hi\0there\n"),
            ),
            (
                "POST",
                "/v1/functions/fails/invoke".into(),
                http(
                    "500 Internal Server Error",
                    "x-vmm-exit-code: 3\r\n",
                    "partial",
                ),
            ),
            (
                "POST",
                "/v1/functions/locked/invoke".into(),
                http(
                    "401 Unauthorized",
                    "content-type: application/json\r\n",
                    r#"{"error":"missing token"}"#,
                ),
            ),
            (
                "HEAD",
                format!("/v1/modules/{digest}"),
                http("200 OK", "", ""),
            ),
            (
                "PUT",
                "/v1/functions/tool".into(),
                http("201 Created", "etag: \"v1\"\r\n", deployed),
            ),
            (
                "PUT",
                "/v1/modules".into(),
                http(
                    "201 Created",
                    "",
                    &format!(r#"{{"digest":"{other}","size":5,"created":true}}"#),
                ),
            ),
            (
                "PUT",
                "/v1/functions/broken".into(),
                http(
                    "400 Bad Request",
                    "",
                    r#"{"error":"SyntaxError: unexpected token","step":"init","stderr":"line 1\nline 2"}"#,
                ),
            ),
        ]);
        let invoke_args = |name: &str| InvokeArgs {
            name: name.into(),
            input: None,
            headers: vec!["content-type: text/plain".into()],
            conn: conn(&fake.url),
        };
        // 200: the body, byte for byte, exit 0.
        let mut out = Vec::new();
        assert_eq!(invoke(&invoke_args("hello"), b"req", &mut out).unwrap(), 0);
        assert_eq!(out, b"hi\0there\n");
        // The function ran and failed: its output still on stdout, exit 1.
        let mut out = Vec::new();
        assert_eq!(invoke(&invoke_args("fails"), b"", &mut out).unwrap(), 1);
        assert_eq!(out, b"partial");
        // The daemon refused: nothing on stdout, an error (exit 1) naming what it said.
        let mut out = Vec::new();
        let e = invoke(&invoke_args("locked"), b"", &mut out).unwrap_err();
        assert!(
            e.msg.contains("401") && e.msg.contains("missing token"),
            "{}",
            e.msg
        );
        assert!(e.msg.contains("--token-file"), "{}", e.msg);
        assert!(out.is_empty());
        let e = invoke(&invoke_args("nothing"), b"", &mut Vec::new()).unwrap_err();
        assert!(e.msg.contains("404"), "{}", e.msg);
        {
            let seen = fake.seen.lock().unwrap();
            assert_eq!(seen[0].1, "/v1/functions/hello/invoke");
            assert_eq!(seen[0].2, b"req");
        }

        // Deploy: HEAD says the daemon has the module, so it is not uploaded.
        let mut a = deploy_args("tool", FnRuntime::Wasi);
        a.conn = conn(&format!("{}/", fake.url));
        a.module = Some(d.join("m.wat").display().to_string());
        fake.seen.lock().unwrap().clear();
        let mut out = Vec::new();
        deploy(&a, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "deployed tool version 1 (template fn.tool.v1, 6 own pages, built in 41.2 ms)\n"
            ),
            "{text}"
        );
        {
            let seen = fake.seen.lock().unwrap();
            let calls: Vec<_> = seen.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
            assert_eq!(
                calls,
                [
                    format!("HEAD /v1/modules/{digest}"),
                    "PUT /v1/functions/tool".into()
                ]
            );
            let spec: Value = serde_json::from_slice(&seen[1].2).unwrap();
            assert_eq!(spec, json!({"runtime": "wasi", "module": digest}));
        }
        // --json: the daemon's answer, one line.
        a.conn.json = true;
        let mut out = Vec::new();
        deploy(&a, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);

        // HEAD says 404: uploaded first; a daemon naming another digest is an error.
        let mut b = deploy_args("tool", FnRuntime::Wasi);
        b.conn = conn(&fake.url);
        std::fs::write(d.join("other.wasm"), b"\0asm\x01\0\0\0").unwrap();
        b.module = Some(d.join("other.wasm").display().to_string());
        fake.seen.lock().unwrap().clear();
        let e = deploy(&b, &mut Vec::new()).unwrap_err();
        assert!(e.msg.contains("stored it as"), "{}", e.msg);
        let calls: Vec<_> = fake
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        assert_eq!(calls[1], "PUT /v1/modules");

        // 400: the daemon's error and the function's stderr.
        let mut c = deploy_args("broken", FnRuntime::Wasi);
        c.conn = conn(&fake.url);
        c.module = Some(d.join("m.wat").display().to_string());
        let e = deploy(&c, &mut Vec::new()).unwrap_err();
        assert!(e.msg.contains("SyntaxError: unexpected token"), "{}", e.msg);
        assert!(e.msg.contains("at init"), "{}", e.msg);
        assert!(e.msg.contains("| line 2"), "{}", e.msg);
        assert!(e.json.is_some());

        // Nobody listening: says so.
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = rm("x", &conn(&format!("http://{gone}")), &mut Vec::new()).unwrap_err();
        assert!(e.msg.contains("cannot reach the daemon"), "{}", e.msg);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

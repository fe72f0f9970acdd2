//! End-to-end tests of deployed functions (issue 20, docs/api.md): the real `vmm serve`
//! with `--auth`, its deploy API driven over real HTTP (ureq), the real QuickJS, CPython
//! and WASI guests on /dev/kvm. Each test has its own store and daemon on a free port.

mod common;
use common::daemon::Daemon;
use common::*;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// The token with every scope (`deploy,invoke,metrics`) in each test's token file.
const DEPLOYER: &str = "deployer-secret-1";

fn sha_hex(t: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(t.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the daemon answered.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("a JSON answer ({e}): {} {}", self.status, self.text()))
    }
    /// The first value of header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
    /// The `error` of a JSON error answer.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.status, self.headers, self.text())
    }
}

/// A daemon with `--auth` (token [`DEPLOYER`] and `extra_tokens`, `NAME TOKEN SCOPES`) and
/// the JS runtime module (and Python's with `python`), on its own store.
struct Fx {
    // Dropped in this order: the daemon, then its store and token file.
    d: Daemon,
    store: TempDir,
    _etc: TempDir,
    agent: ureq::Agent,
}

/// Start options of [`Fx::start`].
#[derive(Default)]
struct Opts<'a> {
    python: Option<&'a str>,
    tokens: &'a [(&'a str, &'a str, &'a str)],
    flags: &'a [&'a str],
    /// Run on the store before the daemon starts.
    prepare: Option<fn(&TempDir)>,
}

impl Fx {
    fn start(tag: &str, o: Opts) -> Fx {
        let store = TempDir::new(tag);
        let etc = TempDir::created(&format!("{tag}-etc"));
        let tokens = etc.0.join("tokens");
        let mut text = format!(
            "# name hash scopes\ndeployer sha256:{} deploy,invoke,metrics\n",
            sha_hex(DEPLOYER)
        );
        for (name, token, scopes) in o.tokens {
            text += &format!("{name} sha256:{} {scopes}\n", sha_hex(token));
        }
        std::fs::write(&tokens, text).unwrap();
        let js = format!("js={}", workload("qjs-wasi-reactor.wasm"));
        let py = o.python.map(|p| format!("python={p}"));
        let mut args = vec![
            "--auth",
            tokens.to_str().unwrap(),
            "--runtime-module",
            js.as_str(),
        ];
        if let Some(py) = &py {
            args.extend(["--runtime-module", py.as_str()]);
        }
        args.extend_from_slice(o.flags);
        if let Some(prepare) = o.prepare {
            prepare(&store);
        }
        let d = Daemon::start(&store, &args);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(180))
            .build();
        Fx {
            d,
            store,
            _etc: etc,
            agent,
        }
    }

    /// `method path` with `token` (if any), `headers` and `body` (if any).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Answer {
        let mut r = self.agent.request(method, &self.d.url(path));
        if let Some(t) = token {
            r = r.set("authorization", &format!("Bearer {t}"));
        }
        for (k, v) in headers {
            r = r.set(k, v);
        }
        let r = match body {
            Some(b) => r.send_bytes(b),
            None => r.call(),
        };
        let resp = match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}; daemon log:\n{}", self.d.log()),
        };
        let status = resp.status();
        // A name comes once per header line, and `all` gives every line of it.
        let mut names = resp.headers_names();
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        let headers = names
            .into_iter()
            .flat_map(|n| {
                resp.all(&n)
                    .into_iter()
                    .map(|v| (n.clone(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut body = Vec::new();
        resp.into_reader()
            .take(64 << 20)
            .read_to_end(&mut body)
            .unwrap_or_else(|e| panic!("{method} {path}: read the answer: {e}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `PUT /v1/functions/NAME` with `spec` as the deployer, and `headers`.
    fn put_with(&self, name: &str, spec: &Value, headers: &[(&str, &str)]) -> Answer {
        self.call(
            "PUT",
            &format!("/v1/functions/{name}"),
            Some(DEPLOYER),
            headers,
            Some(spec.to_string().as_bytes()),
        )
    }

    fn put(&self, name: &str, spec: &Value) -> Answer {
        self.put_with(name, spec, &[])
    }

    /// Deploy `name` (new): 201, or the test fails with the daemon's answer.
    fn deploy(&self, name: &str, spec: &Value) -> Value {
        let a = self.put(name, spec);
        assert_eq!(a.status, 201, "deploy {name}: {a:?}");
        a.json()
    }

    fn get_fn(&self, name: &str) -> Answer {
        self.call(
            "GET",
            &format!("/v1/functions/{name}"),
            Some(DEPLOYER),
            &[],
            None,
        )
    }

    fn invoke_as(&self, name: &str, token: Option<&str>, body: &[u8]) -> Answer {
        self.call(
            "POST",
            &format!("/v1/functions/{name}/invoke"),
            token,
            &[],
            Some(body),
        )
    }

    fn invoke(&self, name: &str, body: &[u8]) -> Answer {
        self.invoke_as(name, Some(DEPLOYER), body)
    }

    /// `PUT /v1/modules` with `bytes`.
    fn upload_module(&self, bytes: &[u8]) -> Answer {
        self.call("PUT", "/v1/modules", Some(DEPLOYER), &[], Some(bytes))
    }

    /// The files of STORE/templates belonging to function `name` (`fn.NAME.*`).
    fn templates_of(&self, name: &str) -> Vec<String> {
        let prefix = format!("fn.{name}.");
        let mut v: Vec<String> = std::fs::read_dir(self.store.0.join("templates"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The daemon's log has no panic in it.
    fn assert_no_panic(&self) {
        let log = self.d.log();
        assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    }
}

fn js(source: &str) -> Value {
    json!({"runtime": "js", "source": source})
}

/// A raw JS function answering `TAG:` and its request.
fn js_tagged(tag: &str) -> Value {
    js(&format!(
        "const input = std.in.readAsString();\nprint({tag:?} + \":\" + input);\n"
    ))
}

fn py_tagged(tag: &str) -> Value {
    json!({"runtime": "python", "source": format!(
        "import sys\ndata = sys.stdin.read()\nsys.stdout.write({tag:?} + \":\" + data)\n"
    )})
}

/// One invocation made by a load thread: when it was sent and answered, and the answer.
struct Sample {
    sent: Instant,
    answered: Instant,
    status: u16,
    body: Vec<u8>,
}

/// Deploy `specs[0]` as `name`, then, while three threads invoke it in a loop with
/// `input`, replace it with `specs[1]` and then `specs[2]` (`want[i]` is what version
/// `i + 1` answers): no request fails, each gets one version's exact answer, none sent
/// after a PUT's answer gets an older version, none answered before a PUT was sent gets
/// its version. Then delete it: later invocations and GETs are 404 and its templates are
/// gone from the store.
fn replace_under_load(f: &Fx, name: &str, specs: &[Value; 3], input: &[u8], want: &[Vec<u8>; 3]) {
    assert!(want[0] != want[1] && want[1] != want[2] && want[0] != want[2]);
    let a = f.put(name, &specs[0]);
    assert_eq!(a.status, 201, "deploy {name}: {a:?}");
    assert_eq!(a.header("etag"), Some("\"v1\""), "{a:?}");
    let v = a.json();
    assert_eq!(
        (v["version"].as_u64(), v["built"].as_bool()),
        (Some(1), Some(true)),
        "{v}"
    );
    let template = v["template"].as_str().unwrap_or_default().to_string();
    assert!(template.starts_with(&format!("fn.{name}.v1.")), "{v}");
    assert!(
        !f.templates_of(name).is_empty(),
        "no template in the store: {v}"
    );
    let a = f.invoke(name, input);
    assert_eq!((a.status, &a.body), (200, &want[0]), "{a:?}");
    let g = f.get_fn(name);
    assert_eq!(g.status, 200, "{g:?}");
    let g = g.json();
    assert_eq!(
        (g["version"].as_u64(), g["template"].as_str()),
        (Some(1), Some(template.as_str())),
        "{g}"
    );

    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (samples, stop) = (samples.clone(), stop.clone());
            let (agent, url, input) = (
                f.agent.clone(),
                f.d.url(&format!("/v1/functions/{name}/invoke")),
                input.to_vec(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let r = agent
                        .post(&url)
                        .set("authorization", &format!("Bearer {DEPLOYER}"))
                        .send_bytes(&input);
                    let (status, body) = match r {
                        Ok(r) | Err(ureq::Error::Status(_, r)) => {
                            let s = r.status();
                            let mut b = Vec::new();
                            let _ = r.into_reader().take(1 << 20).read_to_end(&mut b);
                            (s, b)
                        }
                        Err(e) => (0, e.to_string().into_bytes()),
                    };
                    samples.lock().unwrap().push(Sample {
                        sent,
                        answered: Instant::now(),
                        status,
                        body,
                    });
                }
            })
        })
        .collect();
    // Wait until `n` requests sent after `t` were answered.
    let wait_for = |t: Instant, n: usize| {
        let t0 = Instant::now();
        loop {
            let got = samples
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.sent > t)
                .count();
            if got >= n {
                return;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "only {got} requests answered in 120 s; daemon log:\n{}",
                    f.d.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(Instant::now(), 6);
    let mut put_sent = Vec::new();
    let mut put_answered = Vec::new();
    for (i, spec) in specs.iter().enumerate().skip(1) {
        let etag = format!("\"v{i}\"");
        put_sent.push(Instant::now());
        let a = f.put_with(name, spec, &[("if-match", &etag)]);
        put_answered.push(Instant::now());
        assert_eq!(
            a.status,
            200,
            "replace {name} with version {}: {a:?}",
            i + 1
        );
        assert_eq!(a.json()["version"].as_u64(), Some(i as u64 + 1), "{a:?}");
        wait_for(*put_answered.last().unwrap(), 9);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let samples = samples.lock().unwrap();
    let shown = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (k, s) in samples.iter().enumerate() {
        assert_eq!(
            s.status,
            200,
            "request {k} failed during the replace: {}",
            shown(&s.body)
        );
        let Some(version) = want.iter().position(|w| *w == s.body) else {
            panic!("request {k}: {:?} is no version's answer", shown(&s.body));
        };
        for p in 0..2 {
            // Version p + 2 was the current one from put_answered[p] on, and it did not
            // exist before put_sent[p].
            if s.sent > put_answered[p] {
                assert!(
                    version > p,
                    "request {k} sent after version {} was deployed got version {}",
                    p + 2,
                    version + 1
                );
            }
            if s.answered < put_sent[p] {
                assert!(
                    version <= p,
                    "request {k} answered before version {} was deployed got it",
                    p + 2
                );
            }
        }
    }
    let after = |p: usize| samples.iter().filter(|s| s.sent > put_answered[p]).count();
    assert!(after(0) >= 9 && after(1) >= 9, "{} samples", samples.len());
    drop(samples);
    let a = f.invoke(name, input);
    assert_eq!((a.status, &a.body), (200, &want[2]), "{a:?}");
    let g = f.get_fn(name).json();
    assert_eq!(g["version"].as_u64(), Some(3), "{g}");
    // The spec as it was given (defaults filled in).
    for (k, v) in specs[2].as_object().unwrap() {
        assert_eq!(&g["spec"][k], v, "{k} in {g}");
    }

    // Delete it: gone for every later request, and from the store.
    let path = format!("/v1/functions/{name}");
    let a = f.call("DELETE", &path, Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["removed"], true, "{a:?}");
    let a = f.invoke(name, input);
    assert_eq!(a.status, 404, "invoke after DELETE: {a:?}");
    let a = f.get_fn(name);
    assert_eq!(a.status, 404, "GET after DELETE: {a:?}");
    let a = f.call("DELETE", &path, Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 404, "a second DELETE: {a:?}");
    assert_eq!(
        f.templates_of(name),
        Vec::<String>::new(),
        "templates left after DELETE"
    );
    let list = f.call("GET", "/v1/functions", Some(DEPLOYER), &[], None);
    assert!(!list.text().contains(&format!("\"{name}\"")), "{list:?}");
    f.assert_no_panic();
}

#[test]
fn js_deploy_invoke_replace_under_load_and_delete() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-js", Opts::default());
    let want = ["v1", "v2", "v3"].map(|t| format!("{t}:load\n").into_bytes());
    replace_under_load(
        &f,
        "greet",
        &["v1", "v2", "v3"].map(js_tagged),
        b"load",
        &want,
    );
    // The name can be deployed again; its versions go on from where they were.
    let a = f.put("greet", &js_tagged("again"));
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.json()["version"].as_u64(), Some(4), "{a:?}");
    let a = f.invoke("greet", b"x");
    assert_eq!((a.status, a.text().as_str()), (200, "again:x\n"), "{a:?}");

    // A request running when its function is deleted finishes; later ones are 404.
    f.deploy(
        "slow",
        &js("const input = std.in.readAsString();\nconst t0 = Date.now();\nwhile (Date.now() - t0 < 1500) {}\nprint(\"slow:\" + input);\n"),
    );
    let f = Arc::new(f);
    let running = {
        let f = f.clone();
        std::thread::spawn(move || f.invoke("slow", b"inflight"))
    };
    let t0 = Instant::now();
    while f.get_fn("slow").json()["pool"]["busy"].as_u64() != Some(1) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the request never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let a = f.call("DELETE", "/v1/functions/slow", Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 200, "{a:?}");
    let a = f.invoke("slow", b"late");
    assert_eq!(a.status, 404, "{a:?}");
    let a = running.join().unwrap();
    assert_eq!(
        (a.status, a.text().as_str()),
        (200, "slow:inflight\n"),
        "the request in flight during the DELETE: {a:?}"
    );
    assert_eq!(f.templates_of("slow"), Vec::<String>::new());
    f.assert_no_panic();
}

#[test]
fn python_deploy_invoke_replace_under_load_and_delete() {
    if !kvm_available() {
        return;
    }
    let Some(python) = optional_workload("python.wasm") else {
        return;
    };
    let f = Fx::start(
        "fn-py",
        Opts {
            python: Some(&python),
            ..Opts::default()
        },
    );
    let want = ["p1", "p2", "p3"].map(|t| format!("{t}:load").into_bytes());
    replace_under_load(
        &f,
        "pyfn",
        &["p1", "p2", "p3"].map(py_tagged),
        b"load",
        &want,
    );
}

#[test]
fn wasi_deploy_invoke_replace_under_load_and_delete() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-wasi", Opts::default());
    let wasm = wat::parse_file(path("examples/upper.wat")).expect("compile upper.wat");
    let digest = format!("sha256:{}", {
        use sha2::Digest;
        sha2::Sha256::digest(&wasm)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    let head = format!("/v1/modules/{digest}");
    let a = f.call("HEAD", &head, Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 404, "not uploaded yet: {a:?}");
    let a = f.upload_module(&wasm);
    assert_eq!(a.status, 201, "{a:?}");
    let v = a.json();
    assert_eq!(
        (
            v["digest"].as_str(),
            v["size"].as_u64(),
            v["created"].as_bool()
        ),
        (Some(digest.as_str()), Some(wasm.len() as u64), Some(true)),
        "{v}"
    );
    let a = f.upload_module(&wasm);
    assert_eq!(
        (a.status, a.json()["created"].as_bool()),
        (200, Some(false)),
        "{a:?}"
    );
    let a = f.call("HEAD", &head, Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 200, "uploaded: {a:?}");
    let spec = |arg: &str| json!({"runtime": "wasi", "module": digest, "args": [arg]});
    let want = ["one", "two", "three"].map(|t| format!("LOAD TEST\n{t}\n").into_bytes());
    replace_under_load(
        &f,
        "upper",
        &["one", "two", "three"].map(spec),
        b"load test\n",
        &want,
    );
}

/// Raw HTTP: send `head` and `body` on one thread while the answer is read on this one (a
/// server refusing a large body may answer before it has read it all).
fn raw_exchange(addr: &str, head: &str, body: Vec<u8>) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let head = head.to_string();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        let _ = w.write_all(&body);
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // The whole answer: its head and a content-length's worth of body.
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if got.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            Err(e) if got.is_empty() => panic!("read the answer: {e}"),
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

/// A refused PUT: what it is, the function's name, the body, the request's headers, the
/// status, and words the error must hold.
type Case<'a> = (
    &'a str,
    String,
    Vec<u8>,
    Vec<(&'a str, &'a str)>,
    u16,
    Vec<&'a str>,
);

#[test]
fn hostile_deploys_get_their_status_and_reason_and_the_daemon_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-hostile", Opts::default());
    f.deploy("good", &js_tagged("good"));
    let serving = |after: &str| {
        let a = f.invoke("good", b"still");
        assert_eq!(
            (a.status, a.text().as_str()),
            (200, "good:still\n"),
            "after {after}: {a:?}"
        );
    };
    serving("the deploy");
    let spec_cases: Vec<Case> = vec![
        ("invalid JSON", "bad1".into(), b"{\"runtime\": \"js\", ".to_vec(), vec![], 400, vec!["the spec"]),
        ("not an object", "bad1".into(), b"[1, 2]".to_vec(), vec![], 400, vec!["the spec"]),
        (
            "an unknown field",
            "bad1".into(),
            json!({"runtime": "js", "source": "print(1)", "colour": "red"}).to_string().into_bytes(),
            vec![],
            400,
            vec!["unknown field", "colour"],
        ),
        (
            "an unknown runtime",
            "bad1".into(),
            json!({"runtime": "cobol", "source": "x"}).to_string().into_bytes(),
            vec![],
            400,
            vec!["cobol"],
        ),
        (
            "no source",
            "bad1".into(),
            json!({"runtime": "js"}).to_string().into_bytes(),
            vec![],
            400,
            vec!["source"],
        ),
        (
            "a name with a dot",
            "a.b".into(),
            js_tagged("x").to_string().into_bytes(),
            vec![],
            400,
            vec!["not a valid function name"],
        ),
        (
            "a 65-character name",
            "n".repeat(65),
            js_tagged("x").to_string().into_bytes(),
            vec![],
            400,
            vec!["not a valid function name"],
        ),
        (
            "a module that was never uploaded",
            "bad1".into(),
            json!({"runtime": "wasi", "module": format!("sha256:{}", "ab".repeat(32))}).to_string().into_bytes(),
            vec![],
            400,
            vec!["not uploaded"],
        ),
        (
            "a file that was never uploaded",
            "bad1".into(),
            json!({"runtime": "js", "source": "print(1)", "files": [{"path": "d.txt", "digest": format!("sha256:{}", "cd".repeat(32))}]}).to_string().into_bytes(),
            vec![],
            400,
            vec!["not uploaded"],
        ),
        (
            "a file path escaping the tree",
            "bad1".into(),
            json!({"runtime": "js", "source": "print(1)", "files": [{"path": "../x", "content": "x"}]}).to_string().into_bytes(),
            vec![],
            400,
            vec!["../x", "not a valid relative path"],
        ),
        (
            "an absolute file path",
            "bad1".into(),
            json!({"runtime": "js", "source": "print(1)", "files": [{"path": "/etc/passwd", "content": "x"}]}).to_string().into_bytes(),
            vec![],
            400,
            vec!["/etc/passwd", "not a valid relative path"],
        ),
        (
            "an entry escaping the tree",
            "bad1".into(),
            json!({"runtime": "js", "source": "print(1)", "entry": "../main.js"}).to_string().into_bytes(),
            vec![],
            400,
            vec!["entry"],
        ),
        (
            "a JS syntax error",
            "bad2".into(),
            js("let x = ;\n").to_string().into_bytes(),
            vec![],
            400,
            vec!["SyntaxError"],
        ),
        (
            "a function that exits before reading its request",
            "bad3".into(),
            js("std.exit(3);\n").to_string().into_bytes(),
            vec![],
            400,
            vec!["code 3", "before reading its request"],
        ),
        (
            "If-Match with another version's etag",
            "good".into(),
            js_tagged("v2").to_string().into_bytes(),
            vec![("if-match", "\"v7\"")],
            412,
            vec!["If-Match", "\"v1\""],
        ),
        (
            "If-None-Match: * on a deployed function",
            "good".into(),
            js_tagged("v2").to_string().into_bytes(),
            vec![("if-none-match", "*")],
            412,
            vec!["already deployed"],
        ),
        (
            "If-Match on a function never deployed",
            "nothere".into(),
            js_tagged("v2").to_string().into_bytes(),
            vec![("if-match", "\"v1\"")],
            412,
            vec!["not deployed"],
        ),
        (
            "a replacement with a syntax error",
            "good".into(),
            js("print(\"unclosed);\n").to_string().into_bytes(),
            vec![],
            400,
            vec!["SyntaxError"],
        ),
    ];
    for (what, name, body, headers, status, words) in &spec_cases {
        let a = f.call(
            "PUT",
            &format!("/v1/functions/{name}"),
            Some(DEPLOYER),
            headers,
            Some(body),
        );
        assert_eq!(a.status, *status, "{what}: {a:?}");
        let e = a.error();
        for w in words {
            assert!(e.contains(w), "{what}: the error does not say {w:?}: {a:?}");
        }
        serving(what);
    }
    // A function whose initialisation never ends is stopped at its timeout.
    let t0 = Instant::now();
    let a = f.put(
        "bad4",
        &json!({"runtime": "js", "source": "while (true) {}\n", "timeout_secs": 1}),
    );
    let took = t0.elapsed();
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.error().contains("timeout"), "{a:?}");
    assert!(
        took < Duration::from_secs(20),
        "the 1 s timeout took {took:?}"
    );
    serving("an endless initialisation");
    // Uploads that are not WebAssembly modules.
    for junk in [&b"hello"[..], b"", b"\0as", b"(module)"] {
        let a = f.upload_module(junk);
        assert_eq!(a.status, 400, "{junk:?}: {a:?}");
        assert!(a.error().contains("not a WebAssembly binary"), "{a:?}");
    }
    let a = f.call("HEAD", "/v1/modules/sha256:xyz", Some(DEPLOYER), &[], None);
    assert_eq!(a.status, 400, "{a:?}");
    // A spec over 16 MiB: 413, whether or not the client got to send all of it.
    let big = json!({"runtime": "js", "source": "x".repeat(17 << 20)})
        .to_string()
        .into_bytes();
    let head = format!(
        "PUT /v1/functions/big HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {DEPLOYER}\r\ncontent-length: {}\r\n\r\n",
        big.len()
    );
    let (status, text) = raw_exchange(&f.d.addr, &head, big);
    assert_eq!(status, 413, "{}", &text[..text.len().min(2000)]);
    assert!(text.contains("limit"), "{text}");
    serving("a spec over 16 MiB");

    // None of them left a function or a template behind, and good is still version 1.
    for name in ["bad1", "bad2", "bad3", "bad4", "big", "nothere"] {
        assert_eq!(f.get_fn(name).status, 404, "{name}");
        assert_eq!(f.templates_of(name), Vec::<String>::new(), "{name}");
    }
    let g = f.get_fn("good").json();
    assert_eq!(g["version"].as_u64(), Some(1), "{g}");
    let list = f
        .call("GET", "/v1/functions", Some(DEPLOYER), &[], None)
        .json();
    let names: Vec<&str> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["good"], "{list}");
    // The longest name there may be.
    let long = "n".repeat(64);
    f.deploy(&long, &js_tagged("long"));
    let a = f.invoke(&long, b"64");
    assert_eq!((a.status, a.text().as_str()), (200, "long:64\n"), "{a:?}");
    // A good deploy after all that still works.
    let a = f.put_with("fresh", &js_tagged("fresh"), &[("if-none-match", "*")]);
    assert_eq!(a.status, 201, "{a:?}");
    let a = f.invoke("fresh", b"1");
    assert_eq!((a.status, a.text().as_str()), (200, "fresh:1\n"), "{a:?}");
    serving("everything");
    f.assert_no_panic();
}

/// Caught a real bug: a template commit empties the store's tmp/ under its lock, and
/// records, specs and uploads were staged there without it (now in fn-tmp/).
#[test]
fn a_hundred_concurrent_deploys_each_serve_their_own_function() {
    if !kvm_available() {
        return;
    }
    let f = Arc::new(Fx::start(
        "fn-many",
        Opts {
            flags: &["--pool", "1"],
            ..Opts::default()
        },
    ));
    const N: usize = 100;
    const THREADS: usize = 16;
    const FILES: usize = 200;
    let name = |i: usize| format!("f{i:03}");
    let t0 = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                (t..N)
                    .step_by(THREADS)
                    .map(|i| {
                        let a = f.put(&name(i), &js_tagged(&name(i)));
                        (i, a.status, a.text())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // Meanwhile, uploads of distinct files.
    let uploads = {
        let f = f.clone();
        std::thread::spawn(move || {
            (0..FILES)
                .map(|i| {
                    let a = f.call(
                        "PUT",
                        "/v1/files",
                        Some(DEPLOYER),
                        &[],
                        Some(format!("file {i} of the concurrent deploys").as_bytes()),
                    );
                    (i, a.status, a.text())
                })
                .collect::<Vec<_>>()
        })
    };
    let mut answers: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    eprintln!("{N} deploys in {:?}", t0.elapsed());
    let uploads = uploads.join().unwrap();
    answers.sort_by_key(|a| a.0);
    assert_eq!(answers.len(), N);
    let failed: Vec<String> = answers
        .iter()
        .filter(|a| a.1 != 201)
        .map(|(i, status, body)| format!("deploy {}: {status} {body}", name(*i)))
        .chain(
            uploads
                .iter()
                .filter(|u| u.1 != 201)
                .map(|(i, status, body)| format!("upload {i}: {status} {body}")),
        )
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {N} concurrent deploys and {FILES} uploads failed (ENOENT: the daemon bug \
         described above this test):\n{}",
        failed.len(),
        failed.join("\n")
    );
    let list = f
        .call("GET", "/v1/functions", Some(DEPLOYER), &[], None)
        .json();
    assert_eq!(
        list["functions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["built"] == true)
            .count(),
        N,
        "{list}"
    );
    for i in 0..N {
        let a = f.invoke(&name(i), b"ping");
        assert_eq!(
            (a.status, a.text()),
            (200, format!("{}:ping\n", name(i))),
            "{a:?}"
        );
        let tmpl = f.templates_of(&name(i));
        assert_eq!(
            tmpl.iter().filter(|t| t.ends_with(".tmpl")).count(),
            1,
            "{tmpl:?}"
        );
    }
    f.assert_no_panic();
}

#[test]
fn built_on_first_invoke_two_concurrent_first_requests_build_it_once() {
    if !kvm_available() {
        return;
    }
    let f = Arc::new(Fx::start("fn-lazy", Opts::default()));
    let mut spec = js_tagged("lazy");
    spec["build"] = json!("on_first_invoke");
    let v = f.deploy("lazy", &spec);
    assert_eq!(
        (v["built"].as_bool(), v["template"].is_null()),
        (Some(false), true),
        "{v}"
    );
    assert_eq!(
        f.templates_of("lazy"),
        Vec::<String>::new(),
        "built on deploy"
    );
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f.invoke("lazy", format!("r{i}").as_bytes())
            })
        })
        .collect();
    let answers: Vec<Answer> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!((a.status, a.text()), (200, format!("lazy:r{i}\n")), "{a:?}");
    }
    let paths: Vec<&str> = answers
        .iter()
        .map(|a| a.header("x-vmm-path").unwrap_or("none"))
        .collect();
    assert_eq!(
        paths.iter().filter(|p| **p == "cold").count(),
        1,
        "one request built it: {paths:?}"
    );
    let tmpl: Vec<String> = f
        .templates_of("lazy")
        .into_iter()
        .filter(|t| t.ends_with(".tmpl"))
        .collect();
    assert_eq!(tmpl.len(), 1, "{tmpl:?}");
    assert!(tmpl[0].starts_with("fn.lazy.v1."), "{tmpl:?}");
    let g = f.get_fn("lazy").json();
    assert_eq!(g["requests"]["cold"].as_u64(), Some(1), "{g}");
    assert_eq!(g["built"].as_bool(), Some(true), "{g}");
    // Later requests are not cold.
    let a = f.invoke("lazy", b"later");
    assert_eq!(
        (a.status, a.text().as_str()),
        (200, "lazy:later\n"),
        "{a:?}"
    );
    assert_ne!(a.header("x-vmm-path"), Some("cold"), "{a:?}");
    let g = f.get_fn("lazy").json();
    assert_eq!(g["requests"]["cold"].as_u64(), Some(1), "{g}");
    let r = &g["requests"];
    assert_eq!(
        r["cold"].as_u64().unwrap() + r["warm"].as_u64().unwrap() + r["hot"].as_u64().unwrap(),
        3,
        "{g}"
    );
    f.assert_no_panic();
}

#[test]
fn deploying_and_invoking_need_the_right_token_and_the_deploy_api_is_off_without_auth() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start(
        "fn-auth",
        Opts {
            tokens: &[
                ("caller", "caller-secret-2", "invoke,metrics"),
                ("one", "one-secret-3", "invoke:f1"),
            ],
            ..Opts::default()
        },
    );
    let spec = js_tagged("f1");
    let put = |token: Option<&str>| {
        f.call(
            "PUT",
            "/v1/functions/f1",
            token,
            &[],
            Some(spec.to_string().as_bytes()),
        )
    };
    // No token, or an unknown one: 401 with the challenge, and nothing deployed.
    for t in [None, Some("wrong-secret"), Some("DEPLOYER-SECRET-1")] {
        let a = put(t);
        assert_eq!(a.status, 401, "{t:?}: {a:?}");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"vmm\""),
            "{a:?}"
        );
    }
    assert_eq!(f.get_fn("f1").status, 404);
    // A token without the deploy scope: 403 naming the token's entry, on every deploy route.
    let a = put(Some("caller-secret-2"));
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.text().contains("token caller may not deploy"), "{a:?}");
    let wasm = wat::parse_str("(module)").unwrap();
    for (m, p, body) in [
        ("PUT", "/v1/modules", Some(&wasm[..])),
        ("PUT", "/v1/files", Some(&b"data"[..])),
        ("DELETE", "/v1/functions/f1", None),
    ] {
        let a = f.call(m, p, Some("one-secret-3"), &[], body);
        assert_eq!(a.status, 403, "{m} {p}: {a:?}");
        let a = f.call(m, p, None, &[], body);
        assert_eq!(a.status, 401, "{m} {p}: {a:?}");
    }
    assert_eq!(put(Some(DEPLOYER)).status, 201);
    f.deploy("f2", &js_tagged("f2"));
    let mut public = js_tagged("pub");
    public["public"] = json!(true);
    f.deploy("pub", &public);
    // invoke:f1 may invoke f1 only, and not read it.
    let a = f.invoke_as("f1", Some("one-secret-3"), b"a");
    assert_eq!((a.status, a.text().as_str()), (200, "f1:a\n"), "{a:?}");
    let a = f.invoke_as("f2", Some("one-secret-3"), b"a");
    assert_eq!(a.status, 403, "{a:?}");
    assert!(a.text().contains("token one may not invoke f2"), "{a:?}");
    let a = f.call("GET", "/v1/functions/f1", Some("one-secret-3"), &[], None);
    assert_eq!(a.status, 403, "{a:?}");
    // The invoke scope invokes every function; the metrics scope reads them.
    let a = f.invoke_as("f2", Some("caller-secret-2"), b"b");
    assert_eq!((a.status, a.text().as_str()), (200, "f2:b\n"), "{a:?}");
    let a = f.call(
        "GET",
        "/v1/functions/f2",
        Some("caller-secret-2"),
        &[],
        None,
    );
    assert_eq!(a.status, 200, "{a:?}");
    // Without a token: only the public function, and 401 for the others.
    let a = f.invoke_as("pub", None, b"c");
    assert_eq!((a.status, a.text().as_str()), (200, "pub:c\n"), "{a:?}");
    let a = f.invoke_as("f1", None, b"c");
    assert_eq!(a.status, 401, "{a:?}");
    let a = f.invoke_as("pub", Some("wrong-secret"), b"c");
    assert_eq!(a.status, 200, "a public function ignores the token: {a:?}");
    // Once replaced by a version that is not public, it needs a token again.
    let a = f.put("pub", &js_tagged("pub2"));
    assert_eq!(a.status, 200, "{a:?}");
    let a = f.invoke_as("pub", None, b"d");
    assert_eq!(a.status, 401, "no longer public: {a:?}");
    let a = f.invoke_as("pub", Some("caller-secret-2"), b"d");
    assert_eq!((a.status, a.text().as_str()), (200, "pub2:d\n"), "{a:?}");
    let log = f.d.log();
    for secret in [DEPLOYER, "caller-secret-2", "one-secret-3"] {
        assert!(!log.contains(secret), "a token in the log:\n{log}");
    }
    f.assert_no_panic();

    // The same store without --auth: the functions deployed serve, the deploy API is off.
    let Fx { d, store, _etc, .. } = f;
    drop(d);
    let d = Daemon::start(&store, &[]);
    let (s, body, _) = d.invoke("f1", b"e");
    assert_eq!((s, body.as_str()), (200, "f1:e\n"));
    let agent = ureq::Agent::new();
    for (m, p, body) in [
        (
            "PUT",
            "/v1/functions/f3",
            Some(spec.to_string().into_bytes()),
        ),
        (
            "PUT",
            "/v1/functions/f1",
            Some(spec.to_string().into_bytes()),
        ),
        ("PUT", "/v1/modules", Some(wasm.clone())),
        ("PUT", "/v1/files", Some(b"data".to_vec())),
        ("DELETE", "/v1/functions/f1", None),
    ] {
        let r = agent.request(m, &d.url(p));
        let r = match &body {
            Some(b) => r.send_bytes(b),
            None => r.call(),
        };
        let (s, text) = match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                (r.status(), r.into_string().unwrap_or_default())
            }
            Err(e) => panic!("{m} {p}: {e}"),
        };
        assert_eq!(s, 403, "{m} {p}: {text}");
        assert!(
            text.contains("the deploy API is off") && text.contains("--auth"),
            "{m} {p}: {text}"
        );
    }
    let (s, body, _) = d.invoke("f1", b"f");
    assert_eq!((s, body.as_str()), (200, "f1:f\n"), "f1 is still there");
}

/// A `memory_mib` no guest boots with is the spec's fault (400), found before any build,
/// also for a function built on its first request.
#[test]
fn a_memory_size_no_guest_can_have_is_refused_as_the_specs_fault() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-mem", Opts::default());
    let spec = |mib: u64, build: &str| {
        let mut s = js_tagged("mem");
        s["memory_mib"] = json!(mib);
        s["build"] = json!(build);
        s
    };
    // Sizes a guest can have.
    for mib in [64, 66, 4096] {
        f.deploy(&format!("ok{mib}"), &spec(mib, "now"));
        let a = f.invoke(&format!("ok{mib}"), b"m");
        assert_eq!(
            (a.status, a.text().as_str()),
            (200, "mem:m\n"),
            "{mib} MiB: {a:?}"
        );
    }
    // Sizes none can: the spec's fault, 400 saying so, and nothing deployed.
    let mut wrong = Vec::new();
    for mib in [0, 31, 4097, 32, 33, 63, 65, 4095] {
        for build in ["now", "on_first_invoke"] {
            let name = format!("bad{mib}{}", &build[..3]);
            let a = f.put(&name, &spec(mib, build));
            let says = a.status == 400 && a.error().contains("memory_mib");
            if !says || f.get_fn(&name).status != 404 {
                let later = f.invoke(&name, b"m");
                wrong.push(format!(
                    "memory_mib {mib}, build {build}: {} {} (then invoke: {} {})",
                    a.status,
                    a.text(),
                    later.status,
                    later.text().trim()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "deploys of a memory size no guest can have were not refused with 400 naming \
         memory_mib (the daemon bug described above this test):\n{}",
        wrong.join("\n")
    );
    f.assert_no_panic();
}

/// An http-interface function: `?mode=crlf|badjson|status700` misbehave; otherwise it
/// answers 201 with the request's body as it came (base64 or not), and what it saw in
/// headers.
const HTTP_ECHO: &str = r#"
const ev = JSON.parse(std.in.readAsString());
const q = ev.queryStringParameters || {};
const h = ev.headers || {};
const mode = q.mode || "echo";
if (mode === "crlf") {
  print(JSON.stringify({statusCode: 200, headers: {"x": "a\r\nset-cookie: evil=1"}, body: "crlf"}));
} else if (mode === "badjson") {
  print('{"statusCode": 200, "body": "unterminated');
} else if (mode === "status700") {
  print(JSON.stringify({statusCode: 700, body: "seven hundred"}));
} else {
  const mine = Object.keys(h).filter(k => k.startsWith("x-h-"));
  const all = mine.every(k => h[k] === "value-" + k.slice(4));
  let sum = 0;
  let n = 0;
  if (ev.isBase64Encoded) {
    const b = atob(ev.body || "");
    n = b.length;
    for (let i = 0; i < b.length; i++) sum += b.charCodeAt(i);
  }
  const http = (ev.requestContext && ev.requestContext.http) || {};
  print(JSON.stringify({
    statusCode: 201,
    headers: {
      "content-type": "application/octet-stream",
      "x-count": String(mine.length),
      "x-all-match": String(all),
      "x-query": JSON.stringify(q),
      "x-raw-query": ev.rawQueryString || "",
      "x-cookies": JSON.stringify(ev.cookies || []),
      "x-base64": String(ev.isBase64Encoded),
      "x-bytes": String(n),
      "x-sum": String(sum),
      "x-method": String(http.method),
    },
    cookies: ["s1=one; Path=/", "s2=two; HttpOnly"],
    body: ev.body || "",
    isBase64Encoded: ev.isBase64Encoded,
  }));
}
"#;

#[test]
fn the_http_interface_carries_bodies_headers_query_and_cookies_and_refuses_bad_responses() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-http", Opts::default());
    f.deploy(
        "echo",
        &json!({"runtime": "js", "interface": "http", "source": HTTP_ECHO}),
    );
    let example = std::fs::read_to_string(path("examples/http.js")).unwrap();
    f.deploy(
        "example",
        &json!({"runtime": "js", "interface": "http", "source": example}),
    );
    let invoke = |name: &str, query: &str, headers: &[(&str, &str)], body: &[u8]| {
        f.call(
            "POST",
            &format!("/v1/functions/{name}/invoke{query}"),
            Some(DEPLOYER),
            headers,
            Some(body),
        )
    };
    // Every byte value, and bytes that are not UTF-8.
    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend_from_slice(b"\xff\xfe\xc3\x28 not utf-8 \x80\x00");
    let names: Vec<String> = (0..60).map(|i| format!("x-h-{i}")).collect();
    let values: Vec<String> = (0..60).map(|i| format!("value-{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(values.iter().map(String::as_str))
        .collect();
    headers.push(("cookie", "c1=v1; c2=v2"));
    let a = invoke("echo", "?a=1&b=two%20words&empty=", &headers, &binary);
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body, binary, "the binary body did not round-trip: {a:?}");
    let h = |n: &str| a.header(n).unwrap_or_default().to_string();
    assert_eq!(h("x-base64"), "true", "{a:?}");
    assert_eq!(h("x-bytes"), binary.len().to_string(), "{a:?}");
    let sum: u64 = binary.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(
        h("x-sum"),
        sum.to_string(),
        "the function saw other bytes: {a:?}"
    );
    assert_eq!(h("x-count"), "60", "{a:?}");
    assert_eq!(h("x-all-match"), "true", "{a:?}");
    assert_eq!(h("x-method"), "POST", "{a:?}");
    assert_eq!(h("x-raw-query"), "a=1&b=two%20words&empty=", "{a:?}");
    let q: Value = serde_json::from_str(&h("x-query")).unwrap();
    assert_eq!(q, json!({"a": "1", "b": "two words", "empty": ""}), "{a:?}");
    let c: Value = serde_json::from_str(&h("x-cookies")).unwrap();
    assert_eq!(c, json!(["c1=v1", "c2=v2"]), "{a:?}");
    assert_eq!(
        a.all("set-cookie"),
        ["s1=one; Path=/", "s2=two; HttpOnly"],
        "{a:?}"
    );
    assert_eq!(h("content-type"), "application/octet-stream", "{a:?}");
    assert_eq!(h("x-vmm-exit-code"), "0", "{a:?}");
    // A text body travels as text.
    let text = "héllo, wörld\n\"quoted\" \\ tab\t".as_bytes();
    let a = invoke("echo", "", &[], text);
    assert_eq!((a.status, &a.body[..]), (201, text), "{a:?}");
    assert_eq!(a.header("x-base64"), Some("false"), "{a:?}");
    // An empty one too.
    let a = invoke("echo", "", &[], b"");
    assert_eq!((a.status, &a.body[..]), (201, &b""[..]), "{a:?}");
    // examples/http.js measures the body and sets its own header and cookie.
    let a = invoke("example", "?x=y", &[("x-one", "1")], &binary);
    assert_eq!(a.status, 200, "{a:?}");
    let v = a.json();
    assert_eq!(v["bodyLength"].as_u64(), Some(binary.len() as u64), "{v}");
    assert_eq!(v["rawQueryString"], "x=y", "{v}");
    assert_eq!(v["method"], "POST", "{v}");
    assert_eq!(a.header("x-example"), Some("js"), "{a:?}");
    assert_eq!(
        a.all("set-cookie"),
        ["example=js; Path=/; HttpOnly"],
        "{a:?}"
    );
    let a = invoke("example", "", &[], b"abc");
    assert_eq!(a.json()["upper"], "ABC", "{a:?}");

    // Responses the daemon refuses: 502 with the reason, and nothing of theirs leaks.
    let a = invoke("echo", "?mode=crlf", &[], b"");
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.text().contains("CR, LF"), "{a:?}");
    assert_eq!(a.header("x-vmm-error"), Some("malformed_response"), "{a:?}");
    assert!(a.header("x").is_none(), "{a:?}");
    assert!(
        !a.headers
            .iter()
            .any(|(k, v)| v.contains("evil") || k.contains("evil")),
        "{a:?}"
    );
    assert!(a.all("set-cookie").is_empty(), "{a:?}");
    let a = invoke("echo", "?mode=badjson", &[], b"");
    assert_eq!(a.status, 502, "{a:?}");
    assert!(a.text().contains("not JSON"), "{a:?}");
    assert_eq!(a.header("x-vmm-error"), Some("malformed_response"), "{a:?}");
    let a = invoke("echo", "?mode=status700", &[], b"");
    assert_eq!(a.status, 502, "{a:?}");
    assert!(
        a.text().contains("statusCode") && a.text().contains("700"),
        "{a:?}"
    );
    assert!(!a.text().contains("seven hundred"), "{a:?}");
    // And it goes on serving.
    let a = invoke("echo", "", &[], b"after");
    assert_eq!((a.status, &a.body[..]), (201, &b"after"[..]), "{a:?}");
    f.assert_no_panic();
}

#[test]
fn with_worker_processes_deployed_functions_and_their_timeouts_reach_the_workers() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start(
        "fn-procs",
        Opts {
            flags: &["--processes", "2", "--timeout", "30"],
            ..Opts::default()
        },
    );
    let want = ["w1", "w2", "w3"].map(|t| format!("{t}:load\n").into_bytes());
    replace_under_load(
        &f,
        "greet",
        &["w1", "w2", "w3"].map(js_tagged),
        b"load",
        &want,
    );
    // A function with its own 1 s timeout that loops on its request: 504 in about a
    // second, not the daemon's 30.
    f.deploy(
        "spin",
        &json!({"runtime": "js", "source": "std.in.readAsString();\nwhile (true) {}\n", "timeout_secs": 1}),
    );
    for _ in 0..2 {
        let t0 = Instant::now();
        let a = f.invoke("spin", b"go");
        let took = t0.elapsed();
        assert_eq!(a.status, 504, "{a:?}");
        assert!(a.text().contains("1s timeout"), "{a:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(15),
            "a 1 s timeout took {took:?}"
        );
    }
    // Built on its first request, by the daemon, for a worker process to run.
    let mut lazy = js_tagged("after");
    lazy["build"] = json!("on_first_invoke");
    f.deploy("after", &lazy);
    let a = f.invoke("after", b"z");
    assert_eq!((a.status, a.text().as_str()), (200, "after:z\n"), "{a:?}");
    assert_eq!(a.header("x-vmm-path"), Some("cold"), "{a:?}");
    let a = f.invoke("after", b"y");
    assert_eq!((a.status, a.text().as_str()), (200, "after:y\n"), "{a:?}");
    f.assert_no_panic();
}

/// The spec is kept with the template: a function whose template was built for another
/// VMM (another guest kernel, ABI or CPU model: its record says so) is built again from
/// its spec on its next request, which is then a cold start, instead of failing.
#[test]
fn a_template_that_no_longer_fits_is_built_again_from_the_spec() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-refit", Opts::default());
    let a = f.put("f", &js_tagged("fit"));
    assert_eq!(a.status, 201, "{a:?}");
    let a = f.invoke("f", b"1");
    assert_eq!((a.status, a.text().as_str()), (200, "fit:1\n"), "{a:?}");
    // What an older VMM left: a record naming a template built for something else.
    let fs = snapshot_store::FunctionStore::new(&f.store.0);
    let mut rec = fs.record("f").unwrap().expect("the record");
    let fp = rec.built_for.clone().expect("built for this VMM");
    assert!(fp.starts_with("kernel="), "{fp}");
    rec.built_for = Some("kernel=0000000000000000 abi=0 state=0 cpu=0".into());
    rec.template = Some("fn.f.v1.00000000".into());
    fs.put_record(&rec).unwrap();
    let a = f.invoke("f", b"2");
    assert_eq!((a.status, a.text().as_str()), (200, "fit:2\n"), "{a:?}");
    assert_eq!(a.header("x-vmm-path"), Some("cold"), "{a:?}");
    // Built again for this VMM, and recorded (once the template is written).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = fs.record("f").unwrap().unwrap();
        if now.built_for.as_deref() == Some(fp.as_str()) {
            assert_ne!(now.template.as_deref(), Some("fn.f.v1.00000000"));
            break;
        }
        assert!(Instant::now() < deadline, "never recorded: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = f.invoke("f", b"3");
    assert_eq!((a.status, a.text().as_str()), (200, "fit:3\n"), "{a:?}");
    assert_ne!(a.header("x-vmm-path"), Some("cold"), "{a:?}");
    f.assert_no_panic();
}

/// A store where `vmm template create` made JavaScript templates (and so the runtime
/// base, named after the module's file) takes deployed JavaScript functions on that same
/// base: the module's bytes are the same, only the name a base records for messages
/// differs (the deploy was refused as "made on an earlier runtime base ... replaced").
#[test]
fn functions_deploy_onto_a_runtime_base_that_vmm_template_create_made() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start(
        "fn-cli-base",
        Opts {
            prepare: Some(|store| create(store, "hello-js", &qjs_function_args("hello.js", &[]))),
            ..Opts::default()
        },
    );
    let a = f.put("x", &js_tagged("x"));
    assert_eq!(a.status, 201, "{a:?}");
    let a = f.invoke("x", b"1");
    assert_eq!((a.status, a.text().as_str()), (200, "x:1\n"), "{a:?}");
    let a = f.invoke("hello-js", br#"{"name":"cli"}"#);
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.text().contains("Hello, cli!"), "{a:?}");
    f.assert_no_panic();
}

/// The client, `vmm fn`, against the real daemon: deploy (a script, a WASI module given as
/// .wat text and uploaded once), invoke, get, ls and rm, each printing what a person needs
/// and, with `--json`, the daemon's answer; a wrong token is refused with the reason.
#[test]
fn the_vmm_fn_client_deploys_invokes_lists_and_removes() {
    if !kvm_available() {
        return;
    }
    let f = Fx::start("fn-client", Opts::default());
    let etc = TempDir::created("fn-client-token");
    let token = etc.0.join("token");
    std::fs::write(&token, format!("{DEPLOYER}\n")).unwrap();
    let url = format!("http://{}", f.d.addr);
    let run = |args: &[&str], stdin: &[u8]| {
        let mut cmd = vmm();
        cmd.arg("fn")
            .args(args)
            .args(["--url", &url, "--token-file", token.to_str().unwrap()])
            .env_remove("VMM_TOKEN")
            .env_remove("VMM_URL");
        run_with_input(cmd, stdin)
    };
    let src = etc.0.join("tagged.js");
    std::fs::write(
        &src,
        "const input = std.in.readAsString();\nprint(\"cli:\" + input);\n",
    )
    .unwrap();
    let r = run(
        &[
            "deploy",
            "tagged",
            "--runtime",
            "js",
            "--source",
            src.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(
        r.stdout().contains("deployed tagged version 1"),
        "{}",
        r.stdout()
    );
    let r = run(&["invoke", "tagged"], b"hello");
    assert_eq!(
        (r.code(), r.stdout().as_str()),
        (0, "cli:hello\n"),
        "{}",
        r.stderr()
    );

    // A WASI module as .wat: compiled by the client, uploaded (once), referenced by digest.
    let wat = path("examples/upper.wat");
    let deploy_upper = || {
        run(
            &[
                "deploy",
                "upper",
                "--runtime",
                "wasi",
                "--module",
                &wat,
                "--arg",
                "x",
                "--json",
            ],
            b"",
        )
    };
    let r = deploy_upper();
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let v: Value = serde_json::from_str(r.stdout().trim()).expect("--json prints JSON");
    assert_eq!(v["version"].as_u64(), Some(1), "{v}");
    let r = deploy_upper();
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let v: Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["version"].as_u64(), Some(2), "{v}");
    let r = run(&["invoke", "upper"], b"shout\n");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(r.stdout().starts_with("SHOUT\n"), "{}", r.stdout());

    let r = run(&["get", "upper", "--json"], b"");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let v: Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["runtime"].as_str()),
        (Some("upper"), Some("wasi"))
    );
    let r = run(&["ls"], b"");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert!(
        r.stdout().lines().any(|l| l.starts_with("tagged ")) && r.stdout().contains("upper"),
        "{}",
        r.stdout()
    );
    let r = run(&["rm", "tagged"], b"");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let r = run(&["invoke", "tagged"], b"x");
    assert_ne!(r.code(), 0, "invoking a removed function must fail");
    let r = run(&["rm", "tagged"], b"");
    assert_ne!(r.code(), 0);

    // A wrong token: refused, and the client says so (and never prints the token).
    std::fs::write(&token, "not-the-token\n").unwrap();
    let r = run(&["ls"], b"");
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("401"), "{}", r.stderr());
    assert!(!r.stderr().contains("not-the-token"), "{}", r.stderr());
}

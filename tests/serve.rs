//! End-to-end tests of `vmm serve`: the real daemon on /dev/kvm, a real store on disk, the
//! real QuickJS reactor, and a real HTTP client (ureq) or raw sockets for misbehaving
//! clients.

mod common;
use common::daemon::Daemon;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn upper_args() -> Vec<String> {
    vec![
        "--module".into(),
        path("examples/upper.wat"),
        "--arg".into(),
        "one".into(),
        "--arg".into(),
        "two".into(),
    ]
}

fn behave_args() -> Vec<String> {
    vec!["--module".into(), path("tests/guests/behave.wat")]
}

fn marked() -> String {
    format!("{}:marked.esm.js", workload("marked.esm.js"))
}

fn run_cold(function: &[String], input: &[u8]) -> String {
    let mut cmd = vmm();
    cmd.arg("run").args(function);
    let r = run_with_input(cmd, input);
    assert_eq!(r.code(), 0, "vmm run: {}", r.stderr());
    r.stdout()
}

#[test]
fn every_example_answers_over_http_exactly_as_vmm_run_does() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-examples");
    let hello = qjs_function_args("hello.js", &[]);
    let markdown = qjs_function_args("markdown.js", &[marked()]);
    create(&store, "hello", &hello);
    create(&store, "markdown", &markdown);
    create(&store, "upper", &upper_args());
    let d = Daemon::start(&store, &[]);
    d.wait_pools(3, 2);
    let cases: [(&str, &Vec<String>, &[u8]); 4] = [
        ("hello", &hello, br#"{"name":"http"}"#),
        ("markdown", &markdown, b"# Title\n\n*em* and `code`\n"),
        ("markdown", &markdown, b"- a\n- b\n"),
        ("upper", &upper_args(), b"some text\n"),
    ];
    for (name, function, input) in cases {
        let want = run_cold(function, input);
        for _ in 0..3 {
            let (status, body, code) = d.invoke(name, input);
            assert_eq!(status, 200, "{name}: {body}");
            assert_eq!(code.as_deref(), Some("0"));
            assert_eq!(body, want, "{name} over HTTP differs from vmm run");
        }
    }
    // JSON form.
    let r = ureq::post(&d.url("/v1/functions/hello/invoke"))
        .set("accept", "application/json")
        .send_bytes(br#"{"name":"j"}"#)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["stdout"], "{\"greeting\":\"Hello, j!\",\"length\":1}\n");
    assert!(v["timings"]["run_ms"].as_f64().unwrap() > 0.0);
    let (s, list) = d.get("/v1/functions");
    assert_eq!(s, 200);
    assert!(
        list.contains("\"hello\"") && list.contains("\"markdown\""),
        "{list}"
    );
    let (s, metrics) = d.get("/metrics");
    assert_eq!(s, 200);
    assert!(
        metrics.contains(r#"vmm_requests_total{template="hello",status="200"} 4"#),
        "{metrics}"
    );
    assert!(metrics.contains("vmm_reset_seconds_count"), "{metrics}");
    assert_eq!(d.get("/healthz").0, 200);
    // Every pool is back at exactly --pool (2) ready instances: resets never made the
    // pool keeper restore extra ones.
    std::thread::sleep(Duration::from_millis(600));
    let v: serde_json::Value = serde_json::from_str(&d.get("/v1/functions").1).unwrap();
    for f in v["functions"].as_array().unwrap() {
        assert_eq!(
            (f["ready"].as_u64(), f["busy"].as_u64()),
            (Some(2), Some(0)),
            "{v}"
        );
    }
    assert_eq!(v["live_instances"], 6, "{v}");
}

#[test]
fn no_request_sees_what_an_earlier_one_left_in_a_reused_instance() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-isolation");
    create(
        &store,
        "iso",
        &qjs_function_args("tests/guests/isolation.js", &[]),
    );
    // What a fresh restore answers: the function sees only its own request.
    let mut cmd = vmm();
    cmd.args(["restore", "iso", "--store", &store.arg()]);
    let fresh = run_with_input(cmd, b"req-fresh");
    assert_eq!(fresh.code(), 0, "{}", fresh.stderr());
    // One worker and a pool of one: every request runs in the same instance, reset between;
    // with a private copy of the template's memory, and with a shared copy-on-write one.
    for sharing in [
        &["--instance-memory", "copy"][..],
        &["--instance-memory", "shared"][..],
    ] {
        let mut flags = vec!["--pool", "1", "--workers", "1", "--max-instances", "1"];
        flags.extend_from_slice(sharing);
        let d = Daemon::start(&store, &flags);
        // The pooled instance (not one restored on demand) serves every request.
        d.wait_pools(1, 1);
        for i in 0..60 {
            let req = format!("req-{i}");
            let (status, body, _) = d.invoke("iso", req.as_bytes());
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body,
                fresh.stdout().replace("req-fresh", &req),
                "{flags:?}: request {i} saw state left by an earlier request"
            );
        }
        let (_, list) = d.get("/v1/functions");
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        assert_eq!(
            v["live_instances"], 1,
            "the one instance was reused: {list}"
        );
        assert_eq!(v["functions"][0]["served"], 60);
    }
}

#[test]
fn failures_get_their_status_and_the_daemon_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-status");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(&store, "behave", &behave_args());
    let d = Daemon::start(
        &store,
        &[
            "--timeout",
            "1",
            "--max-body",
            "1000",
            "--header-timeout",
            "1",
        ],
    );
    let ok = |d: &Daemon| {
        let (s, b, _) = d.invoke("hello", br#"{"name":"ok"}"#);
        assert_eq!(s, 200, "{b}");
        assert!(b.contains("Hello, ok!"));
    };
    assert_eq!(d.invoke("nope", b"x").0, 404);
    assert_eq!(d.invoke("bad/name", b"x").0, 404);
    assert_eq!(d.invoke("", b"x").0, 404);
    // Names a client makes up do not each get a metrics series (unbounded memory).
    let before = d.get("/metrics").1.len();
    for i in 0..300 {
        assert_eq!(d.invoke(&format!("made-up-{i}"), b"x").0, 404);
    }
    let metrics = d.get("/metrics").1;
    assert!(!metrics.contains("made-up-"), "{metrics}");
    assert!(
        metrics.contains(r#"template="(unknown)",status="404""#),
        "{metrics}"
    );
    // One series per made-up name would add ~16 KB; other series (pool gauges of templates
    // the keeper loads meanwhile, one "(unknown)" line) add far less.
    assert!(
        metrics.len() < before + 4000,
        "metrics grew with made-up names: {} -> {} bytes",
        before,
        metrics.len()
    );
    // `/v1/functions/invoke` names a function called "invoke", which is deployed with
    // PUT, not POST (405); the others are no route at all.
    for (path, want) in [
        ("/v1/functions/invoke", 405),
        ("/v1/functions/", 404),
        ("/nope", 404),
    ] {
        let s = match ureq::post(&d.url(path)).send_bytes(b"x") {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("POST {path}: {e}"),
        };
        assert_eq!(s, want, "POST {path}");
    }
    assert_eq!(d.invoke("hello", &vec![b'a'; 2000]).0, 413);
    ok(&d);
    let (s, _, code) = d.invoke("behave", b"e");
    assert_eq!(
        (s, code.as_deref()),
        (500, Some("3")),
        "a non-zero exit is a 500 with its code"
    );
    let (s, b, _) = d.invoke("behave", b"t");
    assert_eq!(s, 502, "a trapping guest: {b}");
    ok(&d);
    let t0 = Instant::now();
    let (s, b, _) = d.invoke("behave", b"loop");
    assert_eq!(s, 504, "an endless guest is stopped by --timeout: {b}");
    assert!(
        !b.contains("--"),
        "a CLI flag hint reached an HTTP client: {b}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    ok(&d);
    assert_eq!(d.invoke("behave", b"hi").1, "hi");

    // A client that never finishes its headers is dropped after --header-timeout.
    let mut slow = TcpStream::connect(&d.addr).unwrap();
    slow.write_all(b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ok(&d);
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );

    // A client that sends its headers and then stalls in its body gets 408 after
    // --header-timeout, instead of holding the connection (and its body budget) forever.
    let mut stall = TcpStream::connect(&d.addr).unwrap();
    stall
        .write_all(b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        .unwrap();
    stall
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut head = [0u8; 12];
    stall.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    ok(&d);

    // A client that disconnects mid-body, and one that leaves while its function runs.
    let mut gone = TcpStream::connect(&d.addr).unwrap();
    gone.write_all(
        b"POST /v1/functions/hello/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"na",
    )
    .unwrap();
    drop(gone);
    let mut gone = TcpStream::connect(&d.addr).unwrap();
    gone.write_all(
        b"POST /v1/functions/behave/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nspin",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(gone);
    ok(&d);
    assert_eq!(d.invoke("behave", b"again").1, "again");
}

#[test]
fn concurrent_requests_to_one_and_to_many_templates_all_get_their_own_answer() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-concurrent");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(
        &store,
        "markdown",
        &qjs_function_args("markdown.js", &[marked()]),
    );
    create(&store, "upper", &upper_args());
    // In the daemon's own process, and in two worker processes.
    for processes in ["0", "2"] {
        concurrent_requests(&store, processes);
    }
}

fn concurrent_requests(store: &TempDir, processes: &str) {
    let d = Arc::new(Daemon::start(
        store,
        &["--pool", "2", "--processes", processes],
    ));
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..15 {
                    let (name, req, want): (&str, String, String) = match (t + i) % 3 {
                        0 => (
                            "hello",
                            format!(r#"{{"name":"t{t}i{i}"}}"#),
                            format!(
                                "{{\"greeting\":\"Hello, t{t}i{i}!\",\"length\":{}}}\n",
                                format!("t{t}i{i}").len()
                            ),
                        ),
                        1 => (
                            "markdown",
                            format!("# h{t}x{i}\n"),
                            format!("<h1>h{t}x{i}</h1>\n\n"),
                        ),
                        _ => (
                            "upper",
                            format!("t{t}i{i}\n"),
                            format!("T{t}I{i}\none\ntwo\n"),
                        ),
                    };
                    let (s, body, _) = d.invoke(name, req.as_bytes());
                    assert_eq!(s, 200, "{name}: {body}");
                    assert_eq!(body, want, "{name} thread {t} request {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn templates_created_and_removed_while_serving_are_followed() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-follow");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(&store, "behave", &behave_args());
    let d = Daemon::start(&store, &[]);
    assert_eq!(d.invoke("upper", b"x").0, 404);
    create(&store, "upper", &upper_args());
    let (s, b, _) = d.invoke("upper", b"late\n");
    assert_eq!((s, b.as_str()), (200, "LATE\none\ntwo\n"));
    // A request in flight when its template is removed finishes; later ones are 404.
    let addr = d.addr.clone();
    let inflight = std::thread::spawn(move || {
        ureq::post(&format!("http://{addr}/v1/functions/behave/invoke"))
            .send_bytes(b"spin")
            .map(|r| (r.status(), r.into_string().unwrap()))
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(30));
    let mut rm = vmm();
    rm.args(["template", "rm", "behave", "--store", &store.arg()]);
    let r = run_with_input(rm, b"");
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let (s, b) = inflight.join().unwrap().expect("in-flight request");
    assert_eq!((s, b.as_str()), (200, "spin"));
    assert_eq!(d.invoke("behave", b"x").0, 404);
    assert_eq!(d.invoke("hello", b"{}").0, 200);
}

#[test]
fn sigterm_drains_requests_in_flight_and_exits_zero() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-drain");
    create(&store, "behave", &behave_args());
    let mut d = Daemon::start(&store, &[]);
    let addr = d.addr.clone();
    let inflight = std::thread::spawn(move || {
        ureq::post(&format!("http://{addr}/v1/functions/behave/invoke"))
            .send_bytes(b"spin")
            .map(|r| (r.status(), r.into_string().unwrap()))
            .map_err(|e| e.to_string())
    });
    // SIGTERM only once the request is in the server (an instance busy with it, or done):
    // a fixed sleep raced the client's connect on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let listing: serde_json::Value = ureq::get(&format!("http://{}/v1/functions", d.addr))
            .call()
            .expect("GET /v1/functions")
            .into_string()
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .expect("a JSON listing");
        let behave = listing["functions"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == "behave"))
            .cloned()
            .unwrap_or_default();
        if behave["busy"].as_u64().unwrap_or(0) + behave["served"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the server: {listing}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    let (s, b) = inflight
        .join()
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!((s, b.as_str()), (200, "spin"));
    assert!(
        TcpStream::connect(&d.addr).is_err(),
        "no new connections after drain"
    );
    assert!(d.logged("drain"), "{}", d.log());
}

#[test]
fn serve_refuses_a_missing_store_and_a_bad_listen_address_with_a_clear_error() {
    let store = TempDir::new("serve-nostore");
    let r = run_with_input(
        {
            let mut c = vmm();
            c.args(["serve", "--store", &store.arg(), "--listen", "127.0.0.1:0"]);
            c
        },
        b"",
    );
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("no template store"), "{}", r.stderr());
    // Absurd values are refused up front, never a panic or an abort later (a huge queue
    // was allocated at once, huge worker counts and header timeouts panicked).
    for flags in [
        ["--queue", "100000000000"],
        ["--workers", "200000"],
        ["--workers", "0"],
        ["--header-timeout", "18446744073709551615"],
        ["--max-body", "18446744073709551615"],
        ["--pool", "100000000"],
        ["--max-instances", "0"],
    ] {
        let mut c = vmm();
        c.args(["serve", "--store", &store.arg(), "--listen", "127.0.0.1:0"])
            .args(flags);
        let r = run_with_input(c, b"");
        assert_eq!(r.code(), 2, "{flags:?}: {}", r.stderr());
        assert!(
            r.stderr().contains(flags[0]) && !r.stderr().contains("panicked"),
            "{flags:?}: {}",
            r.stderr()
        );
    }
    let _ = Command::new("true");
}

#[test]
fn pools_stay_within_max_instances_and_memory_limit_evicting_the_least_recently_used() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-limits");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(&store, "upper", &upper_args());
    create(&store, "behave", &behave_args());
    let live = |d: &Daemon| -> u64 {
        let v: serde_json::Value = serde_json::from_str(&d.get("/v1/functions").1).unwrap();
        let sum: u64 = v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["ready"].as_u64().unwrap() + f["busy"].as_u64().unwrap())
            .sum();
        // An instance being reset after its response counts as live but neither ready nor busy.
        let live = v["live_instances"].as_u64().unwrap();
        assert!(sum <= live, "{v}");
        live
    };
    for (flags, max) in [
        (vec!["--pool", "2", "--max-instances", "3"], 3),
        // A memory limit below the daemon's own floor: one instance at a time, still served.
        (vec!["--pool", "2", "--memory-limit", "1M"], 1),
    ] {
        let d = Daemon::start(&store, &flags);
        for round in 0..3 {
            for (name, req, want) in [
                (
                    "hello",
                    &br#"{"name":"l"}"#[..],
                    "{\"greeting\":\"Hello, l!\",\"length\":1}\n",
                ),
                ("upper", b"abc\n", "ABC\none\ntwo\n"),
                ("behave", b"xyz", "xyz"),
            ] {
                let (s, body, _) = d.invoke(name, req);
                assert_eq!((s, body.as_str()), (200, want), "{flags:?} round {round}");
                let n = live(&d);
                assert!(n <= max, "{flags:?}: {n} instances alive, limit {max}");
            }
        }
        std::thread::sleep(Duration::from_millis(500)); // the pool keeper runs
        assert!(live(&d) <= max, "{flags:?}: the keeper went past the limit");
    }
}

#[test]
fn a_client_that_goes_away_stops_its_guest_and_frees_the_worker() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-interrupt");
    create(&store, "behave", &behave_args());
    // One worker and a long timeout: if the endless guest were not stopped when its client
    // leaves, the next request would wait a minute behind it.
    // In the daemon's own process, and in a worker process (told to cancel).
    for processes in ["0", "1"] {
        client_goes_away(&store, processes);
    }
}

fn client_goes_away(store: &TempDir, processes: &str) {
    let d = Daemon::start(
        store,
        &[
            "--workers",
            "1",
            "--timeout",
            "60",
            "--processes",
            processes,
        ],
    );
    let mut gone = TcpStream::connect(&d.addr).unwrap();
    gone.write_all(
        b"POST /v1/functions/behave/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nloop",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(gone);
    let r = ureq::post(&d.url("/v1/functions/behave/invoke"))
        .timeout(Duration::from_secs(20))
        .send_bytes(b"next");
    let body = r
        .unwrap_or_else(|e| {
            panic!(
                "the worker is still busy with the abandoned guest: {e}\n{}",
                d.log()
            )
        })
        .into_string()
        .unwrap();
    assert_eq!(body, "next");
    assert!(d.logged("status=499"), "{}", d.log());
}

#[test]
fn serves_on_a_unix_socket_and_refuses_to_replace_a_file_that_is_not_one() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::net::UnixStream;
    let store = TempDir::new("serve-unix");
    create(&store, "upper", &upper_args());
    let dir = TempDir::created("serve-unix-sock");
    // A regular file where the socket should go is not replaced.
    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let r = run_with_input(
        {
            let mut c = vmm();
            c.args(["serve", "--store", &store.arg(), "--listen"])
                .arg(format!("unix:{}", file.display()));
            c
        },
        b"",
    );
    assert_ne!(r.code(), 0);
    assert!(r.stderr().contains("not a socket"), "{}", r.stderr());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let sock = dir.0.join("vmm.sock");
    let mut child = vmm()
        .args(["serve", "--store", &store.arg(), "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.starts_with("vmm serve: listening on unix:"))),
        "vmm serve did not listen on the socket"
    );
    std::thread::spawn(move || for _ in lines {});
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"POST /v1/functions/upper/invoke HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabc\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("x-vmm-exit-code: 0"), "{resp}");
    assert!(resp.ends_with("ABC\none\ntwo\n"), "{resp}");
    // SAFETY: SIGTERM to our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn a_damaged_template_is_refused_with_502_and_the_others_keep_serving() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-damaged");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(&store, "upper", &upper_args());
    // Flip a byte of the last page stored: upper's function layer, written last (a page
    // already stored would have been deduplicated, not appended).
    let pack = std::fs::read_dir(store.0.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .expect("a pack");
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x5a;
    std::fs::write(&pack, &bytes).unwrap();
    let d = Daemon::start(&store, &[]);
    for _ in 0..3 {
        let (s, body, _) = d.invoke("upper", b"x\n");
        assert_eq!(
            s, 502,
            "a template whose pages do not match their ids: {body}"
        );
        assert!(
            body.contains("template upper") && body.contains("hash"),
            "{body}"
        );
    }
    let (s, body, _) = d.invoke("hello", br#"{"name":"ok"}"#);
    assert_eq!(s, 200, "{body}");
}

/// The default `--instance-memory auto`: templates start with shared instances; once a
/// request of one changes the guest's page tables (a wasm memory that grows under wasmtime
/// maps pages),
/// that template's instances get their own copy, and every request still answers as a
/// fresh restore does. A template whose requests map nothing stays shared.
#[test]
fn auto_instance_memory_gives_copies_to_a_template_whose_requests_map_memory() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-auto");
    create(&store, "up", &upper_args());
    // Under wasmtime a growing linear memory maps pages in the guest (under wasmi, which
    // `VMM_ENGINE=wasmi` makes the default, it does not).
    create(
        &store,
        "grow",
        &[
            "--engine".to_string(),
            "wasmtime".to_string(),
            "--module".to_string(),
            path("tests/guests/grow_per_request.wat"),
        ],
    );
    let d = Daemon::start(&store, &["--pool", "1", "--workers", "1"]);
    d.wait_pools(2, 1);
    let modes = || -> Vec<(String, String, bool)> {
        let (status, list) = d.get("/v1/functions");
        assert_eq!(status, 200, "{list}");
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        let mut m: Vec<_> = v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_string(),
                    f["instance_memory"].as_str().unwrap().to_string(),
                    f["maps_memory"].as_bool().unwrap(),
                )
            })
            .collect();
        m.sort();
        m
    };
    let shared = |n: &str| (n.to_string(), "shared".to_string(), false);
    assert_eq!(modes(), vec![shared("grow"), shared("up")]);
    for _ in 0..3 {
        let (status, body, _) = d.invoke("up", b"abc");
        assert_eq!((status, body.as_str()), (200, "ABCone\ntwo\n"));
    }
    assert_eq!(modes(), vec![shared("grow"), shared("up")]);
    for i in 0..6 {
        let req: &[u8] = if i % 2 == 0 { b"g" } else { b"G" };
        let (status, body, _) = d.invoke("grow", req);
        assert_eq!(status, 200, "#{i}: {body}");
        assert_eq!(
            body, "grew from 2 saw 0\n",
            "#{i}: memory left by an earlier request"
        );
    }
    assert_eq!(
        modes(),
        vec![("grow".to_string(), "copy".to_string(), true), shared("up")]
    );
    assert!(
        d.logged("its instances get their own copy of memory"),
        "{}",
        d.log()
    );
}

/// The worker processes of `d` (children of any of its threads).
fn worker_pids(d: &Daemon) -> Vec<u32> {
    let mut pids = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", d.child.id())).unwrap();
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids.sort();
    pids
}

fn metric(d: &Daemon, name: &str) -> Option<f64> {
    let (_, text) = d.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_worker_process_killed_under_load_loses_only_its_requests_and_is_replaced() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-processes");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    let d = Arc::new(Daemon::start(
        &store,
        &["--processes", "2", "--pool", "8", "--workers", "2"],
    ));
    // The pool is shared out: four in each worker.
    d.wait_pools(1, 8);
    let before = worker_pids(&d);
    assert_eq!(before.len(), 2, "two worker processes: {before:?}");
    assert_eq!(metric(&d, "vmm_worker_processes"), Some(2.0));
    // Load from four clients; one worker is killed while it runs.
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let mut i = 0;
                while t0.elapsed() < Duration::from_secs(4) {
                    let name = format!("c{c}r{i}");
                    let (status, body, _) =
                        d.invoke("hello", format!(r#"{{"name":"{name}"}}"#).as_bytes());
                    if status == 200 {
                        assert!(
                            body.contains(&format!("Hello, {name}!")),
                            "request {name} got another's answer: {body}"
                        );
                    } else {
                        assert_eq!(status, 503, "{body}");
                        assert!(body.contains("worker process"), "{body}");
                    }
                    seen.push((t0.elapsed(), status));
                    i += 1;
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let victim = before[0];
    let killed_at = t0.elapsed();
    // SAFETY: sends SIGKILL to a child of the daemon this test started (read from its
    // /proc children list a moment ago; the daemon reaps it, so the pid is not reused
    // while the daemon runs).
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let seen: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    let failed = seen.iter().filter(|(_, s)| *s != 200).count();
    let after_kill = seen
        .iter()
        .filter(|(t, s)| *t > killed_at + Duration::from_millis(100) && *s == 200)
        .count();
    // At most the requests that were running or sent to it (two per vCPU thread) fail.
    assert!(
        failed <= 4,
        "{failed} requests failed: {seen:?}\n{}",
        d.log()
    );
    assert!(
        after_kill > 10,
        "requests kept succeeding: {after_kill}\n{}",
        d.log()
    );
    // The lost worker is replaced and fills its share again.
    d.wait_pools(1, 8);
    let now = worker_pids(&d);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(&victim), "{now:?} still has {victim}");
    assert_eq!(metric(&d, "vmm_worker_process_exits_total"), Some(1.0));
    assert_eq!(metric(&d, "vmm_worker_processes"), Some(2.0));
    assert!(
        d.logged("worker process ended (killed by signal 9)"),
        "{}",
        d.log()
    );
    let (status, body, _) = d.invoke("hello", br#"{"name":"after"}"#);
    assert_eq!(
        (status, body.contains("Hello, after!")),
        (200, true),
        "{body}"
    );
}

#[test]
fn a_stuck_worker_process_is_killed_and_replaced() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-stuck");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    let d = Daemon::start(
        &store,
        &["--processes", "1", "--pool", "2", "--timeout", "1"],
    );
    d.wait_pools(1, 2);
    let before = worker_pids(&d);
    assert_eq!(before.len(), 1, "{before:?}");
    // SAFETY: stops a child of the daemon this test started (see worker_pids); the
    // daemon reaps it, so its pid is not reused while the daemon runs.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGSTOP) }, 0);
    // Its request gets no answer: after twice --timeout and a margin the worker is
    // killed, the request answered 503, and a new worker serves the next ones.
    let t0 = Instant::now();
    let (status, body, _) = d.invoke("hello", br#"{"name":"stuck"}"#);
    assert_eq!(status, 503, "{body}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert!(d.logged("worker process stuck"), "{}", d.log());
    d.wait_pools(1, 2);
    let (status, body, _) = d.invoke("hello", br#"{"name":"later"}"#);
    assert_eq!(
        (status, body.contains("Hello, later!")),
        (200, true),
        "{body}"
    );
    assert!(!worker_pids(&d).contains(&before[0]));
}

#[test]
fn with_auth_callers_need_a_token_with_the_scope_and_without_it_the_network_is_refused() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("serve-auth");
    create(&store, "hello", &qjs_function_args("hello.js", &[]));
    create(&store, "upper", &upper_args());
    let sha = |t: &str| -> String {
        let mut c = Command::new("sha256sum");
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut p = c.spawn().expect("sha256sum");
        p.stdin.take().unwrap().write_all(t.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let tokens = store.0.join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "# who   hash   scopes\nops sha256:{} invoke,metrics\nalice sha256:{} invoke:hello\n",
            sha("ops-secret-1"),
            sha("alice-secret-2")
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &store,
        &["--auth", tokens.to_str().unwrap(), "--public", "upper"],
    );
    let call = |path: &str, token: Option<&str>| -> (u16, String, Option<String>) {
        let mut r = if path.ends_with("/invoke") {
            ureq::post(&d.url(path))
        } else {
            ureq::get(&d.url(path))
        };
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        let r = if path.ends_with("/invoke") {
            r.send_bytes(br#"{"name":"a"}"#)
        } else {
            r.call()
        };
        match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                let auth = r.header("www-authenticate").map(str::to_string);
                (r.status(), r.into_string().unwrap_or_default(), auth)
            }
            Err(e) => panic!("{path}: {e}"),
        }
    };
    let hello = "/v1/functions/hello/invoke";
    // No token, an unknown one, one of another case: 401 with the challenge.
    for t in [None, Some("nope"), Some("OPS-SECRET-1")] {
        let (s, body, challenge) = call(hello, t);
        assert_eq!(s, 401, "{t:?}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"vmm\""));
    }
    // The right scope: 200; alice may invoke hello only, and not read the metrics.
    assert_eq!(call(hello, Some("ops-secret-1")).0, 200);
    let (s, body, _) = call(hello, Some("alice-secret-2"));
    assert_eq!((s, body.contains("Hello, a!")), (200, true), "{body}");
    let (s, body, _) = call("/v1/functions/upper/invoke", Some("alice-secret-2"));
    assert_eq!(s, 200, "upper is public: {body}");
    let (s, body, _) = call("/metrics", Some("alice-secret-2"));
    assert_eq!(s, 403, "{body}");
    assert!(body.contains("token alice may not"), "{body}");
    assert_eq!(call("/metrics", Some("ops-secret-1")).0, 200);
    assert_eq!(call("/v1/functions", None).0, 401);
    // A public function needs no token; health needs none.
    assert_eq!(call("/v1/functions/upper/invoke", None).0, 200);
    assert_eq!(call("/healthz", None).0, 200);
    // No token ever reaches the log.
    let log = d.log();
    assert!(
        !log.contains("ops-secret-1") && !log.contains("alice-secret-2"),
        "{log}"
    );
    drop(d);
    // Without --auth, a network address is refused unless said so explicitly.
    let r = vmm()
        .args(["serve", "--listen", "0.0.0.0:0", "--store", &store.arg()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("--no-auth-on-network") && err.contains("--auth"),
        "{err}"
    );
    // A malformed token file is refused with its line.
    std::fs::write(&tokens, "ops sha256:1234 invoke\n").unwrap();
    let r = vmm()
        .args(["serve", "--listen", "127.0.0.1:0", "--store", &store.arg()])
        .args(["--auth", tokens.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("line 1") && err.contains("64 hex digits"),
        "{err}"
    );
}

//! End-to-end tests of the remote tier against a real Garage cluster on loopback: templates
//! created by the real `vmm` in a real store, pushed and pulled by the real `vmm-store`,
//! restored on /dev/kvm.

mod common;
#[path = "common/garage.rs"]
mod garage;

use common::*;
use garage::Garage;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `vmm-store` binary of the same build as `vmm`.
fn vmm_store_bin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_vmm")).parent().unwrap();
    let p = dir.join("vmm-store");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo build --release --workspace)",
        p.display()
    );
    p
}

fn store_cmd(g: &Garage, prefix: &str, store: &TempDir, args: &[&str]) -> Run {
    let mut cmd = Command::new(vmm_store_bin());
    g.env(&mut cmd, prefix);
    cmd.arg("--store").arg(&store.0).args(args);
    run_with_input(cmd, b"")
}

fn json_of(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): exit {}, stdout {}, stderr {}",
            r.code(),
            r.stdout(),
            r.stderr()
        )
    })
}

fn create(store: &TempDir, name: &str, function: &[String]) {
    let mut cmd = vmm();
    cmd.args(["template", "create", name, "--store", &store.arg()])
        .args(function);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "template create {name}: {}", r.stderr());
}

fn restore(store: &TempDir, name: &str, input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.args(["restore", name, "--store", &store.arg()]);
    run_with_input(cmd, input)
}

/// A client of the cluster for looking at (and damaging) objects through the S3 API.
fn client(g: &Garage, prefix: &str) -> remote_store::Remote {
    let cfg = remote_store::RemoteConfig {
        url: format!("s3://{}/{prefix}", g.bucket),
        endpoint: g.endpoint(),
        region: "garage".into(),
        access_key_id: g.key_id.clone(),
        secret_access_key: g.secret.clone(),
        connect_timeout: std::time::Duration::from_secs(5),
        request_timeout: std::time::Duration::from_secs(60),
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(20),
    };
    remote_store::Remote::connect(&cfg).unwrap()
}

/// Sum of the sizes of every object under the prefix, as the S3 API lists them.
fn listed_bytes(c: &remote_store::Remote) -> u64 {
    c.list("listing", "").unwrap().iter().map(|o| o.size).sum()
}

fn marked() -> String {
    format!("{}:marked.esm.js", workload("marked.esm.js"))
}

#[test]
fn pushed_templates_pulled_into_an_empty_store_restore_with_the_same_output() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "roundtrip") else {
        return;
    };
    let a = TempDir::new("remote-a");
    let b = TempDir::new("remote-b");
    let cases: Vec<(&str, Vec<String>, &[u8])> = vec![
        (
            "hello",
            qjs_function_args("hello.js", &[]),
            br#"{"name":"remote"}"#,
        ),
        (
            "markdown",
            qjs_function_args("markdown.js", &[marked()]),
            b"# Title\n\n*em* and `code`\n",
        ),
        (
            "upper",
            vec![
                "--module".into(),
                path("examples/upper.wat"),
                "--arg".into(),
                "one".into(),
            ],
            b"some text\n",
        ),
    ];
    for (name, function, _) in &cases {
        create(&a, name, function);
    }
    let push = store_cmd(
        &g,
        "rt",
        &a,
        &["push", "hello", "markdown", "upper", "--json"],
    );
    assert_eq!(push.code(), 0, "push: {}", push.stderr());
    let pj = json_of(&push);
    let pushed: Vec<&str> = pj["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for (name, _, _) in &cases {
        assert!(pushed.contains(name), "{name} not pushed: {pj}");
    }
    let (bytes, objects) = g.bucket_info();
    assert!(
        objects > 0 && bytes > 0,
        "garage holds nothing after the push"
    );

    let pull = store_cmd(
        &g,
        "rt",
        &b,
        &["pull", "hello", "markdown", "upper", "--json"],
    );
    assert_eq!(pull.code(), 0, "pull: {}", pull.stderr());
    for (name, _, input) in &cases {
        let ra = restore(&a, name, input);
        let rb = restore(&b, name, input);
        assert_eq!(ra.code(), 0, "restore {name} in A: {}", ra.stderr());
        assert!(!ra.stdout().is_empty());
        assert_eq!(
            rb.stdout(),
            ra.stdout(),
            "restore {name} in B: {}",
            rb.stderr()
        );
        assert_eq!(rb.code(), 0);
    }
    let v = store_cmd(&g, "rt", &b, &["verify"]);
    assert_eq!(
        v.code(),
        0,
        "B does not verify: {}{}",
        v.stdout(),
        v.stderr()
    );
    assert!(!v.stdout().contains("warning"), "{}", v.stdout());
    // The remote verifies too, and lists what was pushed.
    let vr = store_cmd(&g, "rt", &b, &["verify", "--remote", "--json"]);
    assert_eq!(vr.code(), 0, "{}{}", vr.stdout(), vr.stderr());
    assert_eq!(json_of(&vr)["corruption"], 0);
    let ls = json_of(&store_cmd(&g, "rt", &b, &["ls", "--remote", "--json"]));
    assert_eq!(
        ls["templates"].as_array().unwrap().len(),
        pushed.len(),
        "{ls}"
    );
    // A second pull finds everything there and fetches nothing.
    let again = json_of(&store_cmd(&g, "rt", &b, &["pull", "hello", "--json"]));
    assert_eq!(again["pages_fetched"], 0, "{again}");
    assert!(again["templates"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["created"] == false));
}

/// A QuickJS function of its own: hello.js with a constant that makes its pages differ.
fn function_file(dir: &TempDir, i: usize) -> String {
    let src = std::fs::read_to_string(root().join("examples/hello.js")).unwrap();
    let p = dir.0.join(format!("fn{i:02}.js"));
    std::fs::write(
        &p,
        format!("// function {i}\nconst FN_{i} = {};\n{src}", i * 7919),
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn twenty_functions_on_one_base_send_and_fetch_only_their_own_pages() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "dedup") else {
        return;
    };
    let c = client(&g, "dd");
    let a = TempDir::new("dedup-a");
    let files = TempDir::created("dedup-files");
    let names: Vec<String> = (0..20).map(|i| format!("fn{i:02}")).collect();
    for (i, n) in names.iter().enumerate() {
        create(&a, n, &qjs_function_args(&function_file(&files, i), &[]));
    }
    let mut sent = Vec::new();
    let mut stored = Vec::new();
    let mut before = listed_bytes(&c);
    for n in &names {
        let r = store_cmd(&g, "dd", &a, &["push", n, "--json"]);
        assert_eq!(r.code(), 0, "push {n}: {}", r.stderr());
        let v = json_of(&r);
        sent.push(v["traffic"]["bytes_sent"].as_u64().unwrap());
        let now = listed_bytes(&c);
        stored.push(now - before);
        before = now;
    }
    eprintln!("bytes sent per push (client): {sent:?}");
    eprintln!("bytes added on the remote per push (S3 listing): {stored:?}");
    for i in 1..names.len() {
        assert!(
            sent[i] * 10 <= sent[0],
            "push {i} sent {} bytes, more than 10% of the first push's {}",
            sent[i],
            sent[0]
        );
        assert!(
            stored[i] * 10 <= stored[0],
            "push {i} added {} bytes to the bucket, more than 10% of the first push's {}",
            stored[i],
            stored[0]
        );
    }
    // Garage's own count agrees with the listing (its figure is rounded to 0.1 of a unit).
    let (gbytes, gobjects) = g.bucket_info();
    let listed = c.list("listing", "").unwrap();
    assert_eq!(
        gobjects,
        listed.len() as u64,
        "garage counts other objects than S3 lists"
    );
    let total: u64 = listed.iter().map(|o| o.size).sum();
    assert!(
        gbytes.abs_diff(total) * 20 <= total,
        "garage says {gbytes} bytes, S3 lists {total}"
    );
    // Twenty functions take far less than twenty bases.
    assert!(
        total < 2 * stored[0],
        "{total} bytes for 20 functions, first alone {}",
        stored[0]
    );
    let st = json_of(&store_cmd(&g, "dd", &a, &["stats", "--remote", "--json"]));
    assert!(st["dedup_ratio"].as_f64().unwrap() > 10.0, "{st}");

    // Pulls: the first brings the base, the second only its own pages.
    let b = TempDir::new("dedup-b");
    let read0 = g.metric(0, "block_bytes_read");
    let p1 = json_of(&store_cmd(&g, "dd", &b, &["pull", "fn00", "--json"]));
    let read1 = g.metric(0, "block_bytes_read");
    let p2 = json_of(&store_cmd(&g, "dd", &b, &["pull", "fn07", "--json"]));
    let read2 = g.metric(0, "block_bytes_read");
    let r1 = p1["traffic"]["bytes_received"].as_u64().unwrap();
    let r2 = p2["traffic"]["bytes_received"].as_u64().unwrap();
    eprintln!(
        "pull 1: {r1} bytes received, garage read {} block bytes; pull 2: {r2} bytes, garage read {} block bytes",
        read1 - read0,
        read2 - read1
    );
    // Garage reads (and counts) whole compressed 1 MiB blocks, so its figure is shown, not
    // held to 10%: the client's count of the bytes that came back is.
    assert!(r2 * 10 <= r1, "second pull received {r2} bytes, first {r1}");
    assert!(
        read2 - read1 < read1 - read0,
        "garage read more blocks for the second pull"
    );
    assert_eq!(
        p2["templates"][0]["created"], false,
        "the base was pulled again: {p2}"
    );
    assert!(
        p2["pages_fetched"].as_u64().unwrap() * 10 <= p1["pages_fetched"].as_u64().unwrap(),
        "{p1} {p2}"
    );
    let input = br#"{"name":"seven"}"#;
    let ra = restore(&a, "fn07", input);
    let rb = restore(&b, "fn07", input);
    assert_eq!(ra.code(), 0, "{}", ra.stderr());
    assert_eq!(rb.stdout(), ra.stdout(), "{}", rb.stderr());
}

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

/// xorshift64*: the fault delays, from a seed printed so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("VMM_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("fault delays: VMM_FAULT_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// Starts `vmm-store ARGS` against the cluster, SIGKILLs it after `delay` if it still runs.
/// Returns whether it was killed (false: it had finished).
fn kill_after(
    g: &Garage,
    prefix: &str,
    store: &TempDir,
    args: &[&str],
    delay: std::time::Duration,
) -> bool {
    let mut cmd = Command::new(vmm_store_bin());
    g.env(&mut cmd, prefix);
    cmd.arg("--store")
        .arg(&store.0)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn vmm-store");
    std::thread::sleep(delay);
    let killed = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let _ = child.wait();
    killed
}

/// Runs `vmm-store ARGS` with `env` and a watchdog: the command must end within `limit`
/// (a bound on a hang, not a measurement).
fn store_cmd_bounded(
    g: &Garage,
    env: &[(&str, &str)],
    args: &[&str],
    limit: std::time::Duration,
) -> Run {
    let mut cmd = Command::new(vmm_store_bin());
    g.env(&mut cmd, "bounded");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args);
    let mut p = Piped::spawn(&mut cmd, b"");
    let started = p.started;
    let (status, _) = reap_watched(&mut p.child, || {
        (started.elapsed() > limit)
            .then(|| format!("vmm-store {args:?} still runs after {limit:?}"))
    });
    p.finish(status)
}

fn remote_is_consistent(g: &Garage, prefix: &str, store: &TempDir) -> Vec<String> {
    let v = store_cmd(g, prefix, store, &["verify", "--remote", "--json"]);
    let j = json_of(&v);
    assert_eq!(
        j["corruption"], 0,
        "the remote lists a template whose data is incomplete: {j}"
    );
    assert_eq!(v.code(), 0, "{}", v.stderr());
    let ls = json_of(&store_cmd(g, prefix, store, &["ls", "--remote", "--json"]));
    assert!(ls["unreadable"].as_array().unwrap().is_empty(), "{ls}");
    ls["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn faults_on_a_three_node_cluster() {
    if !kvm_available() {
        return;
    }
    let Some(mut g) = Garage::start(3, "faults") else {
        return;
    };
    let mut rng = Rng::new();
    let a = TempDir::new("faults-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    let input = br#"{"name":"faults"}"#;
    let want = restore(&a, "hello", input);
    assert_eq!(want.code(), 0, "{}", want.stderr());
    let base = {
        let mut cmd = vmm();
        cmd.args(["template", "ls", "--json", "--store", &a.arg()]);
        let v: serde_json::Value =
            serde_json::from_str(&run_with_input(cmd, b"").stdout()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|t| t["parent"].is_null())
            .unwrap()["name"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // 1. Pushes killed at random moments: the remote never lists a template whose data is
    //    incomplete, and the next push completes it.
    let t0 = std::time::Instant::now();
    let full = store_cmd(&g, "timing", &a, &["push", "hello"]);
    assert_eq!(full.code(), 0, "{}", full.stderr());
    let span = t0.elapsed().as_micros() as u64 + 20_000;
    let mut interrupted = 0;
    for i in 0..8 {
        let prefix = format!("push-kill-{i}");
        // Two kills on the same prefix, then a push that must complete what they left.
        for _ in 0..2 {
            let d = std::time::Duration::from_micros(rng.below(span));
            if kill_after(&g, &prefix, &a, &["push", "hello"], d) {
                interrupted += 1;
            }
            let listed = remote_is_consistent(&g, &prefix, &a);
            assert!(
                listed.iter().all(|t| t == "hello" || *t == base),
                "{listed:?}"
            );
            // A child is listed only with its parent.
            assert!(!listed.contains(&"hello".to_string()) || listed.contains(&base));
        }
        let r = store_cmd(&g, &prefix, &a, &["push", "hello", "--json"]);
        assert_eq!(r.code(), 0, "push after kills: {}", r.stderr());
        let listed = remote_is_consistent(&g, &prefix, &a);
        assert_eq!(listed.len(), 2, "{listed:?}");
    }
    eprintln!("pushes interrupted by SIGKILL: {interrupted} of 16");
    assert!(
        interrupted > 0,
        "no push was interrupted: the delays missed every push"
    );
    // What the last killed pushes left is garbage for gc, never a template; and a pull of
    // the completed push restores.
    let b = TempDir::new("faults-b");
    let r = store_cmd(&g, "push-kill-7", &b, &["pull", "hello"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(restore(&b, "hello", input).stdout(), want.stdout());

    // 2. Pulls killed mid-way: the local store verifies, the next pull completes.
    let t0 = std::time::Instant::now();
    let c0 = TempDir::new("faults-c0");
    assert_eq!(
        store_cmd(&g, "push-kill-0", &c0, &["pull", "hello"]).code(),
        0
    );
    let span = t0.elapsed().as_micros() as u64 + 20_000;
    let mut interrupted = 0;
    for i in 0..6 {
        let c = TempDir::new(&format!("faults-pull-{i}"));
        for _ in 0..2 {
            let d = std::time::Duration::from_micros(rng.below(span));
            if kill_after(&g, "push-kill-0", &c, &["pull", "hello"], d) {
                interrupted += 1;
            }
            if c.0.join("store.cfg").exists() {
                let v = store_cmd(&g, "push-kill-0", &c, &["verify"]);
                assert_eq!(
                    v.code(),
                    0,
                    "store verify after a killed pull: {}{}",
                    v.stdout(),
                    v.stderr()
                );
            }
        }
        let r = store_cmd(&g, "push-kill-0", &c, &["pull", "hello"]);
        assert_eq!(r.code(), 0, "pull after kills: {}", r.stderr());
        assert_eq!(restore(&c, "hello", input).stdout(), want.stdout());
    }
    eprintln!("pulls interrupted by SIGKILL: {interrupted} of 12");

    // 3. A pack altered through the S3 API: pull refuses, naming the template and the
    //    object, and nothing enters the local store.
    let cl = client(&g, "push-kill-1");
    // A pack the template uses (killed pushes may have left unreferenced copies too).
    let chain = remote_store::pull::remote_chain(&cl, "hello").unwrap();
    let victim = format!(
        "packs/{}.pack",
        remote_store::objects::hex(&chain[0].1.packs[chain[0].1.locs[3].0 as usize])
    );
    let original = cl.get("reading", &victim, 1 << 30).unwrap().unwrap();
    let mut bad = original.to_vec();
    // The bytes of a page the template needs (its base layer's page 3).
    bad[chain[0].1.locs[3].1 as usize * 4096 + 100] ^= 0x55;
    cl.put("altering", &victim, bad).unwrap();
    let d = TempDir::new("faults-damaged");
    let r = store_cmd(&g, "push-kill-1", &d, &["pull", "hello"]);
    assert_eq!(
        r.code(),
        2,
        "a pull of altered data succeeded: {}",
        r.stdout()
    );
    let err = r.stderr();
    assert!(err.contains("template hello"), "{err}");
    assert!(
        err.contains(&victim),
        "the error does not name the object: {err}"
    );
    let entries = |sub: &str| {
        std::fs::read_dir(d.0.join(sub))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    assert_eq!(
        entries("templates"),
        0,
        "a template entered the local store"
    );
    assert_eq!(entries("packs"), 0, "pages entered the local store");
    let vr = store_cmd(&g, "push-kill-1", &d, &["verify", "--remote"]);
    assert_eq!(
        vr.code(),
        1,
        "remote verify missed the altered pack: {}",
        vr.stdout()
    );
    assert!(vr.stdout().contains(&victim), "{}", vr.stdout());
    cl.put("restoring", &victim, original.to_vec()).unwrap();
    let r = store_cmd(&g, "push-kill-1", &d, &["pull", "hello"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());

    // 4. Wrong credentials and an unreachable endpoint: a clear error, within a bound.
    let limit = std::time::Duration::from_secs(90);
    let wrong = "wrong-secret-0123456789abcdef0123456789abcdef";
    let r = store_cmd_bounded(
        &g,
        &[("AWS_SECRET_ACCESS_KEY", wrong)],
        &["--store", &a.arg(), "push", "hello"],
        limit,
    );
    assert_eq!(r.code(), 2);
    let err = r.stderr();
    assert!(err.contains("access denied"), "{err}");
    assert!(
        !err.contains(wrong) && !r.stdout().contains(wrong),
        "the secret was printed: {err}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{closed}");
    let r = store_cmd_bounded(
        &g,
        &[("VMM_REMOTE_ENDPOINT", &endpoint)],
        &["--store", &a.arg(), "ls", "--remote"],
        limit,
    );
    assert_eq!(r.code(), 2);
    assert!(r.stderr().contains("cannot be reached"), "{}", r.stderr());
    assert!(!r.stderr().contains(&g.secret), "the secret was printed");

    // 5. One node of three killed: push and pull still work with the other two.
    g.kill_node(2);
    create(&a, "hello2", &qjs_function_args("hello.js", &[]));
    let r = store_cmd(&g, "degraded", &a, &["push", "hello", "hello2"]);
    assert_eq!(r.code(), 0, "push with a node down: {}", r.stderr());
    let e = TempDir::new("faults-degraded");
    let r = store_cmd(&g, "degraded", &e, &["pull", "hello2"]);
    assert_eq!(r.code(), 0, "pull with a node down: {}", r.stderr());
    assert_eq!(restore(&e, "hello2", input).stdout(), want.stdout());
}

#[test]
fn gc_removes_only_what_a_pass_a_grace_period_earlier_marked_and_push_never_relies_on_it() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "gc") else {
        return;
    };
    let a = TempDir::new("gc-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    let cl = client(&g, "gc");
    let r = store_cmd(&g, "gc", &a, &["push", "hello"]);
    assert_eq!(r.code(), 0, "first push: {}", r.stderr());
    let keys = |c: &remote_store::Remote| -> Vec<String> {
        c.list("listing", "")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    };
    let pushed = keys(&cl);
    // Garbage: a pack with its index that nothing references (as a killed push leaves).
    let orphan = vec![0x5au8; 4096];
    let ph = remote_store::objects::pack_name(&[9; 16], &orphan);
    let pack = format!("packs/{}.pack", remote_store::objects::hex(&ph));
    let idx = format!("packs/{}.idx", remote_store::objects::hex(&ph));
    cl.put("test", &pack, orphan.clone()).unwrap();
    let i = remote_store::objects::PackIndex {
        pack: ph,
        salt: [9; 16],
        pages: vec![remote_store::objects::hash(&orphan)],
    };
    cl.put("test", &idx, i.encode()).unwrap();

    let gc = |args: &[&str]| {
        let mut v = vec!["gc", "--remote", "--json"];
        v.extend_from_slice(args);
        let r = store_cmd(&g, "gc", &a, &v);
        assert_eq!(r.code(), 0, "gc: {}", r.stderr());
        json_of(&r)
    };
    let strs = |v: &serde_json::Value| -> Vec<String> {
        let mut s: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    // First pass: marks, deletes nothing.
    let p1 = gc(&[]);
    assert!(strs(&p1["deleted"]).is_empty(), "{p1}");
    let mut want = vec![idx.clone(), pack.clone()];
    want.sort();
    assert_eq!(strs(&p1["marked"]), want, "{p1}");
    // Within the grace period (default one hour) nothing is deleted.
    let p2 = gc(&[]);
    assert!(strs(&p2["deleted"]).is_empty(), "{p2}");
    // A dry run past the grace period reports and changes nothing.
    let dry = gc(&["--grace", "0s", "--dry-run"]);
    assert_eq!(strs(&dry["deleted"]), want);
    assert!(keys(&cl).contains(&pack));
    // Past it, what was marked and is still unreferenced goes; the templates stay whole.
    let p3 = gc(&["--grace", "0s"]);
    assert_eq!(strs(&p3["deleted"]), want, "{p3}");
    let mut left = keys(&cl);
    left.retain(|k| k != "gc/marked");
    let mut pushed = pushed;
    pushed.retain(|k| k != "gc/marked");
    left.sort();
    pushed.sort();
    assert_eq!(left, pushed, "gc removed something the templates use");
    let v = json_of(&store_cmd(&g, "gc", &a, &["verify", "--remote", "--json"]));
    assert_eq!(v["corruption"], 0, "{v}");
    assert_eq!(v["garbage"], 0, "{v}");

    // Templates whose references went (their packs now unreferenced) are marked; pushing
    // them again meanwhile must not rely on the marked packs: the push uploads the pages
    // again, so the pass that deletes the marked packs leaves the templates whole.
    for k in keys(&cl).iter().filter(|k| k.starts_with("templates/")) {
        cl.delete("test", k).unwrap();
    }
    let m = gc(&["--grace", "0s"]);
    assert!(
        strs(&m["marked"]).iter().any(|k| k.ends_with(".pack")),
        "{m}"
    );
    let again = json_of(&store_cmd(&g, "gc", &a, &["push", "hello", "--json"]));
    assert!(
        again["pages_uploaded"].as_u64().unwrap() > 0,
        "push relied on packs gc had marked: {again}"
    );
    let d = gc(&["--grace", "0s"]);
    assert!(
        strs(&d["deleted"]).iter().any(|k| k.ends_with(".pack")),
        "{d}"
    );
    let v = json_of(&store_cmd(&g, "gc", &a, &["verify", "--remote", "--json"]));
    assert_eq!(v["corruption"], 0, "{v}");
    let b = TempDir::new("gc-b");
    let r = store_cmd(&g, "gc", &b, &["pull", "hello"]);
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let input = br#"{"name":"gc"}"#;
    assert_eq!(
        restore(&b, "hello", input).stdout(),
        restore(&a, "hello", input).stdout()
    );
}

#[test]
fn restore_with_a_remote_pulls_a_missing_template_once_even_when_restores_race() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "worker") else {
        return;
    };
    let a = TempDir::new("worker-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    let r = store_cmd(&g, "wk", &a, &["push", "hello"]);
    assert_eq!(r.code(), 0, "push: {}", r.stderr());
    let input = br#"{"name":"worker"}"#;
    let want = restore(&a, "hello", input);
    assert_eq!(want.code(), 0, "{}", want.stderr());

    // Without a remote, a worker without the template fails as before.
    let w = TempDir::new("worker-w");
    let mut cmd = vmm();
    cmd.args(["restore", "hello", "--store", &w.arg()])
        .env_remove("VMM_REMOTE");
    let r = run_with_input(cmd, input);
    assert_ne!(r.code(), 0);

    // Four restores on an empty worker at once: each answers, the pages are fetched once.
    let runs: Vec<Piped> = (0..4)
        .map(|i| {
            let mut cmd = vmm();
            g.env(&mut cmd, "wk");
            cmd.args(["restore", "hello", "--store", &w.arg()]);
            if i == 0 {
                cmd.args([
                    "--remote",
                    &format!("s3://{}/wk", g.bucket),
                    "--remote-endpoint",
                    &g.endpoint(),
                ]);
            }
            Piped::spawn(&mut cmd, input)
        })
        .collect();
    let mut fetched_layers = 0;
    for mut p in runs {
        let status = p.child.wait().unwrap();
        let r = p.finish(status);
        assert_eq!(r.code(), 0, "restore --remote: {}", r.stderr());
        assert_eq!(r.stdout(), want.stdout());
        if let Some(l) = r
            .stderr()
            .lines()
            .find(|l| l.starts_with("vmm: pulled hello"))
        {
            let n: usize = l
                .split(": ")
                .nth(2)
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{l}"));
            fetched_layers += n;
        }
    }
    assert_eq!(
        fetched_layers, 2,
        "the base and hello were not pulled exactly once"
    );
    let v = store_cmd(&g, "wk", &w, &["verify"]);
    assert_eq!(v.code(), 0, "{}", v.stdout());
    assert!(
        !v.stdout().contains("warning"),
        "pages written twice: {}",
        v.stdout()
    );
}

#[test]
fn serve_with_a_remote_pulls_a_template_on_its_first_request() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "serve") else {
        return;
    };
    let a = TempDir::new("serve-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    let r = store_cmd(&g, "sv", &a, &["push", "hello"]);
    assert_eq!(r.code(), 0, "push: {}", r.stderr());
    let input = br#"{"name":"served"}"#;
    let want = restore(&a, "hello", input);

    // An empty worker: the store does not even exist yet.
    let w = TempDir::new("serve-w");
    let mut cmd = vmm();
    g.env(&mut cmd, "sv");
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--pool",
        "1",
        "--store",
        &w.arg(),
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn vmm serve");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let _guard = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(a) = line.strip_prefix("vmm serve: listening on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("vmm serve did not start");
    let post = |name: &str| {
        let r = ureq::post(&format!("http://{addr}/v1/functions/{name}/invoke"))
            .timeout(std::time::Duration::from_secs(120))
            .send_bytes(input);
        match r {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
            Err(e) => panic!("POST {name}: {e}"),
        }
    };
    let (status, body) = post("hello");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, want.stdout());
    let (status, body) = post("hello");
    assert_eq!((status, body), (200, want.stdout()));
    // A template on neither the worker nor the remote is unknown, as without a remote.
    let (status, _) = post("nowhere");
    assert_eq!(status, 404);
    assert!(w.0.join("templates/hello.tmpl").exists());
}

#[test]
fn a_store_limit_evicts_pulled_templates_least_recently_used_first_never_one_in_use() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "evict") else {
        return;
    };
    let a = TempDir::new("evict-a");
    create(&a, "hello", &qjs_function_args("hello.js", &[]));
    create(
        &a,
        "markdown",
        &qjs_function_args("markdown.js", &[marked()]),
    );
    create(
        &a,
        "upper",
        &[
            "--module".into(),
            path("examples/upper.wat"),
            "--arg".into(),
            "one".into(),
        ],
    );
    let p = store_cmd(&g, "ev", &a, &["push", "hello", "markdown", "upper"]);
    assert_eq!(p.code(), 0, "{}", p.stderr());
    let inputs: [(&str, &[u8]); 3] = [
        ("hello", br#"{"name":"ev"}"#),
        ("markdown", b"# t\n"),
        ("upper", b"abc\n"),
    ];
    let want: Vec<String> = inputs
        .iter()
        .map(|(n, i)| restore(&a, n, i).stdout())
        .collect();
    let w = TempDir::new("evict-w");
    let worker = |name: &str, input: &[u8]| {
        let mut cmd = vmm();
        g.env(&mut cmd, "ev");
        cmd.args(["restore", name, "--store", &w.arg(), "--store-limit", "1"]);
        let r = run_with_input(cmd, input);
        assert_eq!(r.code(), 0, "restore {name}: {}", r.stderr());
        r
    };
    let evicted = |r: &Run| -> String {
        r.stderr()
            .lines()
            .find_map(|l| l.strip_prefix("vmm: evicted ").map(str::to_string))
            .unwrap_or_default()
    };
    let names = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(w.0.join("templates"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".tmpl")
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    };
    let pack_bytes = || remote_store::evict::pack_bytes(&w.0);
    // The limit (1 byte) can never be met: every template that may go, goes.
    let r = worker("hello", inputs[0].1);
    assert_eq!(r.stdout(), want[0]);
    assert_eq!(
        evicted(&r),
        "",
        "the template just pulled (and its base) must stay"
    );
    let before = pack_bytes();
    let r = worker("markdown", inputs[1].1);
    assert_eq!(r.stdout(), want[1]);
    assert!(evicted(&r).starts_with("hello "), "{}", r.stderr());
    assert!(!names().contains(&"hello".to_string()), "{:?}", names());
    assert!(
        names().iter().any(|n| n.starts_with("base-qjs")),
        "the base has a child: it stays"
    );
    assert!(
        pack_bytes() < before + 2_000_000,
        "hello's pages were not reclaimed"
    );
    // A template in use is never evicted (here: held by this test process).
    let guard = remote_store::in_use(&w.0, "markdown").unwrap();
    let r = worker("upper", inputs[2].1);
    assert_eq!(r.stdout(), want[2]);
    assert_eq!(evicted(&r), "", "evicted a template in use: {}", r.stderr());
    assert!(names().contains(&"markdown".to_string()));
    drop(guard);
    // Once not in use, it goes, and then its base.
    let full = pack_bytes();
    let r = store_cmd(
        &g,
        "ev",
        &w,
        &["pull", "upper", "--store-limit", "1", "--json"],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr());
    let j = json_of(&r);
    let gone: Vec<&str> = j["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(gone.len(), 2, "{j}");
    assert_eq!(gone[0], "markdown", "{j}");
    assert!(gone[1].starts_with("base-qjs"), "{j}");
    assert!(
        pack_bytes() * 2 < full,
        "the evicted pages were not reclaimed"
    );
    let v = store_cmd(&g, "ev", &w, &["verify"]);
    assert_eq!(v.code(), 0, "{}", v.stdout());
    assert_eq!(worker("upper", inputs[2].1).stdout(), want[2]);
    // An evicted template comes back on its next use.
    assert_eq!(worker("hello", inputs[0].1).stdout(), want[0]);
    // Templates created on the worker itself are never evicted.
    create(&w, "local", &qjs_function_args("hello.js", &[]));
    let r = worker("markdown", inputs[1].1);
    assert!(!evicted(&r).contains("local"), "{}", r.stderr());
    assert!(names().contains(&"local".to_string()));
}

#[test]
fn pushes_from_two_workers_at_once_each_leave_complete_chains() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "concurrent") else {
        return;
    };
    // Two workers create the same runtime base on their own (same name, their own
    // snapshot of it) and a function on it each, then push at the same moment.
    let (a, c) = (TempDir::new("conc-a"), TempDir::new("conc-c"));
    let files = TempDir::created("conc-files");
    create(&a, "fa", &qjs_function_args(&function_file(&files, 1), &[]));
    create(&c, "fc", &qjs_function_args(&function_file(&files, 2), &[]));
    let push = |s: &TempDir, n: &str| {
        let mut cmd = Command::new(vmm_store_bin());
        g.env(&mut cmd, "cc");
        cmd.arg("--store").arg(&s.0).args(["push", n]);
        Piped::spawn(&mut cmd, b"")
    };
    for _ in 0..3 {
        let (pa, pc) = (push(&a, "fa"), push(&c, "fc"));
        for mut p in [pa, pc] {
            let st = p.child.wait().unwrap();
            let r = p.finish(st);
            assert_eq!(r.code(), 0, "concurrent push: {}", r.stderr());
        }
        let listed = remote_is_consistent(&g, "cc", &a);
        assert!(listed.contains(&"fa".to_string()) && listed.contains(&"fc".to_string()));
    }
    // Each function comes back with the base it was pushed with.
    let input = br#"{"name":"conc"}"#;
    for (src, n) in [(&a, "fa"), (&c, "fc")] {
        let w = TempDir::new(&format!("conc-w-{n}"));
        let r = store_cmd(&g, "cc", &w, &["pull", n]);
        assert_eq!(r.code(), 0, "{}", r.stderr());
        assert_eq!(
            restore(&w, n, input).stdout(),
            restore(src, n, input).stdout()
        );
    }
}

// The worker side of `vmm serve --remote`'s deployed functions, compiled from the CLI's own
// source (it uses no item of the binary crate): push_function, pull_function, ...
#[allow(dead_code, unused_imports)]
#[path = "../cli/src/remote.rs"]
mod cli_remote;

use snapshot_store::{FunctionRecord, FunctionStore};

/// Deploys function `name` into `store` the way the daemon stores it: the spec's blob, then
/// the record (`template`: the template it serves from, created apart).
fn deploy_record(
    store: &TempDir,
    name: &str,
    version: u64,
    spec: &serde_json::Value,
    template: Option<&str>,
) -> FunctionRecord {
    let fs = FunctionStore::new(&store.0);
    let bytes = serde_json::to_vec(spec).unwrap();
    // What the daemon accepts.
    serde_json::from_slice::<vmm::function::DeploySpec>(&bytes)
        .unwrap()
        .validate()
        .unwrap();
    let (d, _) = fs.put_blob(&bytes).unwrap();
    let rec = FunctionRecord {
        name: name.into(),
        version,
        spec: d.0,
        template: template.map(str::to_string),
        built_for: Some("test-fingerprint".into()),
        created_unix_ms: 1,
        removed: false,
    };
    fs.put_record(&rec).unwrap();
    rec
}

#[test]
fn a_function_deployed_on_one_worker_is_pulled_whole_by_another() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "functions") else {
        return;
    };
    // The CLI's functions read the credentials from the environment, as the daemon does.
    // Only this test sets them, to its own cluster's; the others give theirs to the
    // processes they start.
    std::env::set_var("AWS_ACCESS_KEY_ID", &g.key_id);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &g.secret);
    let args = cli_remote::RemoteArgs {
        remote: Some(format!("s3://{}/fn", g.bucket)),
        remote_endpoint: Some(g.endpoint()),
        remote_region: Some("garage".into()),
        store_limit: None,
    };
    let cl = client(&g, "fn");
    let keys = || -> Vec<String> {
        let mut k: Vec<String> = cl
            .list("listing", "")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k != "gc/marked")
            .collect();
        k.sort();
        k
    };

    // Worker A: a deployed function, its module and a file uploaded as blobs, its
    // template built.
    let a = TempDir::new("fn-a");
    let tmpl = snapshot_store::function_template_name("greet", 1);
    create(&a, &tmpl, &qjs_function_args("hello.js", &[]));
    let fa = FunctionStore::new(&a.0);
    let module = std::fs::read(workload("qjs-wasi-reactor.wasm")).unwrap();
    let (module_d, _) = fa.put_blob(&module).unwrap();
    let file: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    let (file_d, _) = fa.put_blob(&file).unwrap();
    let source = std::fs::read_to_string(root().join("examples/hello.js")).unwrap();
    let spec = serde_json::json!({
        "runtime": "js",
        "source": source,
        "entry": "hello.js",
        "module": module_d.to_string(),
        "files": [
            {"path": "data/words.txt", "digest": file_d.to_string()},
            {"path": "note.txt", "content": "inline"},
        ],
    });
    let rec = deploy_record(&a, "greet", 1, &spec, Some(&tmpl));
    let spec_d = rec.spec_digest();
    assert_eq!(
        cli_remote::spec_blobs(&fa.get_blob(&spec_d, 1 << 20).unwrap()).unwrap(),
        vec![module_d, file_d]
    );

    let p = cli_remote::push_function(&a.0, "greet", &args).unwrap();
    assert_eq!(p.status, remote_store::RecordPush::Written);
    assert_eq!((p.blobs, p.blobs_uploaded), (3, 3));
    assert!(p.template.as_ref().unwrap().templates[0].uploaded, "{p:?}");
    assert!(!p.template_missing);
    let pushed = keys();
    for k in [
        "functions/greet.fn".to_string(),
        remote_store::functions::blob_key(&spec_d),
        remote_store::functions::blob_key(&module_d),
        remote_store::functions::blob_key(&file_d),
        format!("templates/{tmpl}"),
    ] {
        assert!(pushed.contains(&k), "{k} not on the remote: {pushed:?}");
    }
    // The record on the remote is the local store's, byte for byte.
    assert_eq!(
        cl.get("t", "functions/greet.fn", 1 << 20)
            .unwrap()
            .unwrap()
            .to_vec(),
        fa.record_bytes("greet").unwrap().unwrap()
    );
    // Pushed again: nothing but a look at the record and the blobs' sizes.
    let again = cli_remote::push_function(&a.0, "greet", &args).unwrap();
    assert_eq!(again.status, remote_store::RecordPush::AlreadyThere);
    assert_eq!(
        (again.blobs_uploaded, again.traffic.puts),
        (0, 0),
        "{again:?}"
    );
    assert!(again.template.is_none());

    // Worker B, empty (no store yet): the first request pulls the record, the blobs and
    // the template.
    let b = TempDir::new("fn-b");
    let pb = cli_remote::pull_function_fitting(&b.0, "greet", &args, Some("test-fingerprint"))
        .unwrap()
        .expect("the remote has greet");
    assert_eq!(pb.record, rec);
    assert!(pb.record_written);
    assert_eq!(pb.blobs_fetched, 3);
    assert!(
        matches!(pb.template, cli_remote::FunctionTemplate::Pulled(_)),
        "{:?}",
        pb.template
    );
    let fb = FunctionStore::new(&b.0);
    assert_eq!(fb.record("greet").unwrap(), Some(rec.clone()));
    assert_eq!(
        fb.record_bytes("greet").unwrap(),
        fa.record_bytes("greet").unwrap()
    );
    for d in [spec_d, module_d, file_d] {
        assert_eq!(
            fb.get_blob(&d, 1 << 30).unwrap(),
            fa.get_blob(&d, 1 << 30).unwrap(),
            "blob {d}"
        );
    }
    let input = br#"{"name":"function"}"#;
    let ra = restore(&a, &tmpl, input);
    assert_eq!(ra.code(), 0, "{}", ra.stderr());
    let rb = restore(&b, &tmpl, input);
    assert_eq!(rb.stdout(), ra.stdout(), "restore in B: {}", rb.stderr());
    assert_eq!(rb.code(), 0);
    // Pulled again: the store has it all, nothing is fetched or written.
    let pb2 = cli_remote::pull_function_fitting(&b.0, "greet", &args, None)
        .unwrap()
        .unwrap();
    assert!(!pb2.record_written);
    assert_eq!(pb2.blobs_fetched, 0);
    assert!(matches!(pb2.template, cli_remote::FunctionTemplate::Here));
    // A function the remote does not have, and no remote at all: nothing.
    assert_eq!(
        cli_remote::pull_function(&b.0, "nowhere", &args).unwrap(),
        None
    );
    assert_eq!(
        cli_remote::pull_function(&b.0, "greet", &cli_remote::RemoteArgs::default()).unwrap(),
        None
    );
    // A worker whose VMM the template was not built for gets the record and blobs, not the
    // template (it builds its own from the spec).
    let c = TempDir::new("fn-c");
    let pc = cli_remote::pull_function_fitting(&c.0, "greet", &args, Some("another-vmm"))
        .unwrap()
        .unwrap();
    assert!(matches!(
        pc.template,
        cli_remote::FunctionTemplate::DoesNotFit
    ));
    assert_eq!(pc.blobs_fetched, 3);
    assert!(!c.0.join(format!("templates/{tmpl}.tmpl")).exists());

    // Requests racing on a new worker: one pull does the work, the others find it done.
    let d = TempDir::new("fn-d");
    let results: Vec<remote_store::PulledFunction> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| cli_remote::pull_function_fitting(&d.0, "greet", &args, None)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap().unwrap())
            .collect()
    });
    assert_eq!(results.iter().filter(|r| r.record_written).count(), 1);
    assert_eq!(results.iter().map(|r| r.blobs_fetched).sum::<u64>(), 3);
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r.template, cli_remote::FunctionTemplate::Pulled(_)))
            .count(),
        1
    );
    assert_eq!(restore(&d, &tmpl, input).stdout(), ra.stdout());

    // The remote's gc keeps a function's record, blobs and template; verify finds them
    // sound and calls none of them garbage.
    for _ in 0..2 {
        let r = store_cmd(&g, "fn", &a, &["gc", "--remote", "--grace", "0s", "--json"]);
        assert_eq!(r.code(), 0, "gc: {}", r.stderr());
        let j = json_of(&r);
        assert!(j["deleted"].as_array().unwrap().is_empty(), "{j}");
        assert!(j["marked"].as_array().unwrap().is_empty(), "{j}");
    }
    assert_eq!(keys(), pushed, "gc removed something");
    let v = json_of(&store_cmd(&g, "fn", &a, &["verify", "--remote", "--json"]));
    assert_eq!(
        (v["corruption"].clone(), v["garbage"].clone()),
        (0.into(), 0.into()),
        "{v}"
    );
    let ls = store_cmd(&g, "fn", &a, &["ls", "--remote"]);
    assert_eq!(ls.code(), 0, "{}", ls.stderr());
    assert!(ls.stdout().contains(&tmpl), "{}", ls.stdout());

    // A damaged blob on the remote is refused, named, and nothing of the function is
    // recorded; verify names it too. A push from a worker that has it mends it.
    let module_key = remote_store::functions::blob_key(&module_d);
    cl.put("test", &module_key, b"\0asm not the module".to_vec())
        .unwrap();
    let e = TempDir::new("fn-e");
    let err = cli_remote::pull_function(&e.0, "greet", &args).unwrap_err();
    assert!(
        err.contains(&module_key) && err.contains("damaged"),
        "the refusal does not name the blob: {err}"
    );
    let fe = FunctionStore::new(&e.0);
    assert_eq!(fe.record("greet").unwrap(), None);
    assert!(!fe.has_blob(&module_d));
    let v = store_cmd(&g, "fn", &a, &["verify", "--remote"]);
    assert_eq!(v.code(), 1, "{}{}", v.stdout(), v.stderr());
    assert!(v.stdout().contains(&module_key), "{}", v.stdout());
    let mend = cli_remote::push_function(&a.0, "greet", &args).unwrap();
    assert_eq!(mend.blobs_uploaded, 1, "{mend:?}");
    let pe = cli_remote::pull_function(&e.0, "greet", &args).unwrap();
    assert_eq!(pe, Some(rec.clone()));
    assert_eq!(fe.get_blob(&module_d, 1 << 30).unwrap(), module);

    // Version 2, deployed on A to be built on its first invocation (no template yet):
    // B takes the new record and the one new blob, and builds the template itself.
    let mut spec2 = spec.clone();
    spec2["files"][1]["content"] = "inline, version 2".into();
    let rec2 = deploy_record(&a, "greet", 2, &spec2, None);
    let p2 = cli_remote::push_function(&a.0, "greet", &args).unwrap();
    assert_eq!(
        (p2.status.clone(), p2.blobs_uploaded),
        (remote_store::RecordPush::Written, 1)
    );
    let pb3 = cli_remote::pull_function_fitting(&b.0, "greet", &args, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        (pb3.record.clone(), pb3.record_written, pb3.blobs_fetched),
        (rec2.clone(), true, 1)
    );
    assert!(matches!(pb3.template, cli_remote::FunctionTemplate::None));
    // A worker still on version 1 neither overwrites version 2 on the remote nor goes back
    // to version 1 when it pulls.
    let old = cli_remote::push_function(&c.0, "greet", &args).unwrap();
    assert_eq!(
        old.status,
        remote_store::RecordPush::Superseded {
            version: 2,
            removed: false
        }
    );
    assert_eq!(old.traffic.puts, 0);
    assert_eq!(
        cli_remote::remote_function_record("greet", &args).unwrap(),
        Some(rec2.clone())
    );
    // One that deployed its own version 2 at the same time leaves the remote's alone.
    let fc = FunctionStore::new(&c.0);
    fc.put_record(&FunctionRecord {
        version: 2,
        ..rec.clone()
    })
    .unwrap();
    let clash = cli_remote::push_function(&c.0, "greet", &args).unwrap();
    assert_eq!(
        clash.status,
        remote_store::RecordPush::Conflict { version: 2 }
    );
    assert_eq!(clash.traffic.puts, 0);
    fc.put_record(&FunctionRecord {
        version: 3,
        ..rec.clone()
    })
    .unwrap();
    let pc3 = cli_remote::pull_function_fitting(&c.0, "greet", &args, None)
        .unwrap()
        .unwrap();
    assert!(!pc3.record_written);
    assert_eq!(pc3.record.version, 3);

    // A's template of version 2, built on its first invocation, goes up with the record of
    // the same version, which B then takes with the template.
    let tmpl2 = snapshot_store::function_template_name("greet", 2);
    create(&a, &tmpl2, &qjs_function_args("hello.js", &[]));
    let built = FunctionRecord {
        template: Some(tmpl2.clone()),
        ..rec2.clone()
    };
    FunctionStore::new(&a.0).put_record(&built).unwrap();
    let p2b = cli_remote::push_function(&a.0, "greet", &args).unwrap();
    assert_eq!(p2b.status, remote_store::RecordPush::Written);
    assert_eq!(p2b.blobs_uploaded, 0);
    assert!(p2b.template.is_some());
    let pb4 = cli_remote::pull_function_fitting(&b.0, "greet", &args, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        (pb4.record.clone(), pb4.record_written),
        (built.clone(), true)
    );
    assert!(matches!(
        pb4.template,
        cli_remote::FunctionTemplate::Pulled(_)
    ));
    assert_eq!(restore(&b, &tmpl2, input).stdout(), ra.stdout());

    // The removal: every worker's next pull finds the function removed.
    let removed = FunctionRecord {
        removed: true,
        ..built.clone()
    };
    assert!(cli_remote::remove_function_remote(&a.0, "greet", &args).is_err());
    FunctionStore::new(&a.0).put_record(&removed).unwrap();
    let r = cli_remote::remove_function_remote(&a.0, "greet", &args).unwrap();
    assert_eq!((r.status, r.blobs), (remote_store::RecordPush::Written, 0));
    let pbr = cli_remote::pull_function_fitting(&b.0, "greet", &args, None)
        .unwrap()
        .unwrap();
    assert_eq!(pbr.record, removed);
    assert!(matches!(pbr.template, cli_remote::FunctionTemplate::None));

    // A record naming a template its worker no longer has (nor the remote): the puller
    // gets the record and blobs, and builds the template.
    let lonely = deploy_record(&a, "lonely", 1, &spec, Some("fn.lonely.v1"));
    let pl = cli_remote::push_function(&a.0, "lonely", &args).unwrap();
    assert!(pl.template_missing && pl.template.is_none());
    let pbl = cli_remote::pull_function_fitting(&b.0, "lonely", &args, None)
        .unwrap()
        .unwrap();
    assert_eq!(pbl.record, lonely);
    assert!(matches!(
        pbl.template,
        cli_remote::FunctionTemplate::NotOnRemote
    ));
    let listed = remote_store::list_functions(&cl).unwrap();
    assert_eq!(
        listed.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["greet", "lonely"]
    );
}

/// A `vmm serve` with the deploy API on (token `t0ken`, every scope) and `--remote`.
struct Daemon {
    child: std::process::Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(g: &Garage, key: &str, store: &TempDir, auth: &Path) -> Daemon {
        let mut cmd = vmm();
        g.env(&mut cmd, key);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--pool",
            "1",
            "--store",
            &store.arg(),
            "--auth",
            &auth.to_string_lossy(),
            "--runtime-module",
            &format!("js={}", workload("qjs-wasi-reactor.wasm")),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vmm serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("[serve] {line}");
                if let Some(a) = line.strip_prefix("vmm serve: listening on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("vmm serve did not start");
        Daemon { child, addr }
    }

    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, String, Option<String>) {
        let r = ureq::request(method, &format!("http://{}{path}", self.addr))
            .set("authorization", "Bearer t0ken")
            .timeout(std::time::Duration::from_secs(120))
            .send_bytes(body);
        let (status, resp) = match r {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(s, r)) => (s, r),
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let path_taken = resp.header("x-vmm-path").map(str::to_string);
        (status, resp.into_string().unwrap_or_default(), path_taken)
    }
}

#[test]
fn a_function_deployed_on_one_daemon_is_served_by_another_on_the_same_remote() {
    if !kvm_available() {
        return;
    }
    let Some(g) = Garage::start(1, "faas") else {
        return;
    };
    let dir = TempDir::new("faas-auth");
    std::fs::create_dir_all(&dir.0).unwrap();
    let auth = dir.0.join("auth");
    let hash = {
        use sha2::Digest;
        sha2::Sha256::digest(b"t0ken")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    std::fs::write(&auth, format!("ops sha256:{hash} deploy,invoke,metrics\n")).unwrap();
    let (sa, sb) = (TempDir::new("faas-a"), TempDir::new("faas-b"));
    let a = Daemon::start(&g, "fa", &sa, &auth);
    let b = Daemon::start(&g, "fa", &sb, &auth);
    let source = std::fs::read_to_string(path("examples/hello.js")).unwrap();
    let spec = |src: &str, build: &str| {
        serde_json::json!({"runtime": "js", "entry": "hello.js", "source": src, "build": build})
            .to_string()
    };

    // Built on deploy on A: B answers its first request by pulling it (no build there).
    let (s, body, _) = a.call("PUT", "/v1/functions/hi", spec(&source, "now").as_bytes());
    assert_eq!(s, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["remote"]["pushed"], true, "{body}");
    let template = v["template"].as_str().unwrap().to_string();
    let (s, out, _) = b.call("POST", "/v1/functions/hi/invoke", br#"{"name":"b"}"#);
    assert_eq!(
        (s, out.as_str()),
        (200, "{\"greeting\":\"Hello, b!\",\"length\":1}\n")
    );
    assert!(
        sb.0.join(format!("templates/{template}.tmpl")).exists(),
        "B serves A's template, pulled"
    );
    let (s, body, _) = b.call("GET", "/v1/functions/hi", b"");
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["version"].as_u64(), v["requests"]["cold"].as_u64()),
        (Some(1), Some(0))
    );

    // Deployed lazily on A and first invoked there: A builds it once and pushes it; B's
    // first request pulls the template instead of building another.
    let lazy = source.replace("Hello, ", "Lazy, ");
    let (s, body, _) = a.call(
        "PUT",
        "/v1/functions/lz",
        spec(&lazy, "on_first_invoke").as_bytes(),
    );
    assert_eq!(s, 201, "{body}");
    let (s, out, p) = a.call("POST", "/v1/functions/lz/invoke", br#"{"name":"a"}"#);
    assert_eq!((s, p.as_deref()), (200, Some("cold")), "{out}");
    assert!(out.contains("Lazy, a!"), "{out}");
    // The push follows the template write, after the response: wait until the remote's
    // record names the template.
    let cl = client(&g, "fa");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let lz_template = loop {
        if let Some((r, _)) = remote_store::functions::remote_record(&cl, "lz").unwrap() {
            if let Some(t) = r.template {
                break t;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A never pushed lz's template"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (s, out, p) = b.call("POST", "/v1/functions/lz/invoke", br#"{"name":"b"}"#);
    assert_eq!(s, 200, "{out}");
    assert!(out.contains("Lazy, b!"), "{out}");
    assert_ne!(
        p.as_deref(),
        Some("cold"),
        "B built lz instead of pulling it"
    );
    assert!(sb.0.join(format!("templates/{lz_template}.tmpl")).exists());

    // A removal on A reaches B's later first requests for the name: a third daemon on an
    // empty store finds it removed.
    let (s, body, _) = a.call("DELETE", "/v1/functions/hi", b"");
    assert_eq!(s, 200, "{body}");
    let sc = TempDir::new("faas-c");
    let c = Daemon::start(&g, "fa", &sc, &auth);
    let (s, body, _) = c.call("POST", "/v1/functions/hi/invoke", b"{}");
    assert_eq!(s, 404, "{body}");
    // A redeploy on C continues A's version numbers (never reuses one).
    let (s, body, _) = c.call("PUT", "/v1/functions/hi", spec(&source, "now").as_bytes());
    assert!(s == 200 || s == 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"].as_u64(), Some(2), "{body}");
}

//! End-to-end tests of Python functions: the real CPython 3.12 for WASI (python.wasm,
//! fetched by tools/fetch-workloads.sh) in the real `vmm` binary on /dev/kvm, with a real
//! store on disk and a real `vmm serve`.

mod common;
use common::daemon::Daemon;
use common::*;

const HELLO_INPUT: &[u8] = br#"{"name":"py"}"#;
const HELLO_OUTPUT: &str = "{\"greeting\":\"Hello, py!\",\"length\":2}\n";

const WORDFREQ_INPUT: &str =
    "The cat sat on the mat. The dog sat too! Did the cat see the dog?\nDon\u{2019}t panic.";
/// What CPython prints for `wordfreq.py 3` on [`WORDFREQ_INPUT`] (the same on the host).
const WORDFREQ_OUTPUT: &str = concat!(
    r#"{"bytes": 80, "length_stdev": 0.687, "mean_length": 3.167, "median_length": 3.0, "#,
    r#""sentences": 4, "sha256": "e7fb6e536e3035eb3925c0b3b4de4df5a78f3fba13f6010558c082c0b0870628", "#,
    r#""top": [["the", 5], ["cat", 2], ["dog", 2]], "unique": 11, "words": 18}"#,
    "\n"
);

/// python.wasm if /dev/kvm and the workload are there (else the test skips, or fails
/// under VMM_REQUIRE_KVM=1).
fn python() -> Option<String> {
    if !kvm_available() {
        return None;
    }
    optional_workload("python.wasm")
}

/// The function options of a Python function: `script` is a path relative to the
/// repository, run as `python <its file name> <args>...`.
fn function(python: &str, script: &str, args: &[&str]) -> Vec<String> {
    let name = std::path::Path::new(script)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut a: Vec<String> = vec![
        "--module".into(),
        python.into(),
        "--runtime".into(),
        "python".into(),
        "--file".into(),
        path(script),
        "--arg".into(),
        name,
    ];
    for x in args {
        a.push("--arg".into());
        a.push(x.to_string());
    }
    a
}

fn run(function: &[String], input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.arg("run").args(function);
    run_with_input(cmd, input)
}

fn assert_ok(what: &str, r: &Run, want: &str) {
    assert_eq!(r.stdout(), want, "{what}: stderr: {}", r.stderr());
    assert_eq!(r.code(), 0, "{what}: stderr: {}", r.stderr());
    assert_eq!(r.stderr(), "", "{what}");
}

#[test]
fn examples_give_exact_output_through_run_restore_and_serve() {
    let Some(py) = python() else { return };
    let hello = function(&py, "examples/hello.py", &[]);
    // Further --args follow the script: `wordfreq.py 3`.
    let wordfreq = function(&py, "examples/wordfreq.py", &["3"]);
    let cases: [(&str, &Vec<String>, &[u8], &str); 2] = [
        ("hello", &hello, HELLO_INPUT, HELLO_OUTPUT),
        (
            "wordfreq",
            &wordfreq,
            WORDFREQ_INPUT.as_bytes(),
            WORDFREQ_OUTPUT,
        ),
    ];
    let store = TempDir::new("python-examples");
    for (name, f, input, want) in cases {
        assert_ok(&format!("vmm run {name}"), &run(f, input), want);
        create(&store, name, f);
        for i in 0..2 {
            assert_ok(
                &format!("vmm restore {name} (#{i})"),
                &restore(&store, name, input),
                want,
            );
        }
    }
    // Both function templates sit on one runtime base, recorded as a Python one.
    let mut ls = vmm();
    ls.args(["template", "ls", "--json", "--store", &store.arg()]);
    let v: serde_json::Value = serde_json::from_str(&run_with_input(ls, b"").stdout()).unwrap();
    let parents: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["parent"].as_str())
        .collect();
    assert_eq!(parents.len(), 2, "{v}");
    assert!(
        parents
            .iter()
            .all(|p| p.starts_with("base-python-") && *p == parents[0]),
        "{v}"
    );

    let d = Daemon::start(&store, &["--pool", "1"]);
    d.wait_pools(2, 1);
    for (name, _, input, want) in cases {
        for i in 0..3 {
            let (status, body, code) = d.invoke(name, input);
            assert_eq!(status, 200, "{name} over HTTP (#{i}): {body}");
            assert_eq!(code.as_deref(), Some("0"));
            assert_eq!(body, want, "{name} over HTTP (#{i})");
        }
    }
}

#[test]
fn a_script_piped_to_python_dash_runs_without_banner_or_prompt() {
    let Some(py) = python() else { return };
    // Plain WASI: stdin is a request body, not a terminal, so CPython runs what it reads
    // as a script instead of starting its interactive loop (banner and `>>>` prompts).
    let mut cmd = vmm();
    cmd.args(["run", "--module", &py, "--arg", "-"]);
    let r = run_with_input(cmd, b"print(1)\n");
    assert_ok("python -", &r, "1\n");
    // The same through --runtime python, with arguments after the `-`.
    let mut cmd = vmm();
    cmd.args(["run", "--module", &py, "--runtime", "python"])
        .args(["--arg", "-", "--arg", "a b", "--arg", "c"]);
    let r = run_with_input(
        cmd,
        b"import sys\nprint(sys.argv, sys.stdin.isatty(), sys.stdout.isatty())\n",
    );
    assert_ok("--runtime python -", &r, "['-', 'a b', 'c'] False False\n");
}

#[test]
fn failures_exit_non_zero_with_the_reason_on_stderr() {
    let Some(py) = python() else { return };
    // An uncaught exception: status 1, CPython's traceback (the script's frames only),
    // output printed before it kept; cold and restored alike.
    let raises = function(&py, "tests/guests/raises.py", &[]);
    let store = TempDir::new("python-failures");
    create(&store, "raises", &raises);
    for (how, r) in [
        ("vmm run", run(&raises, b"{}")),
        ("vmm restore", restore(&store, "raises", b"{}")),
    ] {
        assert_eq!(r.code(), 1, "{how}: {}", r.stderr());
        assert_eq!(r.stdout(), "before the failure\n", "{how}");
        let want = "Traceback (most recent call last):\n  \
                    File \"/raises.py\", line 11, in <module>\n    \
                    parse(sys.stdin.read())\n  \
                    File \"/raises.py\", line 7, in parse\n    \
                    return json.loads(text)[\"missing\"]\n";
        assert!(
            r.stderr().starts_with(want) && r.stderr().ends_with("KeyError: 'missing'\n"),
            "{how}: stderr: {}",
            r.stderr()
        );
    }

    // sys.exit's status and message; a syntax error; a script that is not there.
    let cases: [(&[u8], i32, &str); 3] = [
        (b"import sys\nprint('out')\nsys.exit(7)\n", 7, ""),
        (b"import sys\nsys.exit('bye')\n", 1, "bye\n"),
        (b"x = (\n", 1, "SyntaxError: '(' was never closed\n"),
    ];
    for (script, code, err) in cases {
        let mut cmd = vmm();
        cmd.args(["run", "--module", &py, "--runtime", "python", "--arg", "-"]);
        let r = run_with_input(cmd, script);
        assert_eq!(
            r.code(),
            code,
            "{}: {}",
            String::from_utf8_lossy(script),
            r.stderr()
        );
        assert!(r.stderr().ends_with(err), "stderr: {}", r.stderr());
    }
    let mut cmd = vmm();
    cmd.args([
        "run",
        "--module",
        &py,
        "--runtime",
        "python",
        "--arg",
        "nope.py",
    ]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(
        r.stderr().contains("can't open file '/nope.py'"),
        "{}",
        r.stderr()
    );

    // No script at all is refused before anything runs, naming the fix.
    let mut cmd = vmm();
    cmd.args(["run", "--module", &py, "--runtime", "python"]);
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 125);
    assert!(
        r.stderr()
            .contains("--runtime python needs the script to run as the first --arg"),
        "{}",
        r.stderr()
    );
}

#[test]
fn restores_of_a_python_template_draw_fresh_randomness_and_time() {
    let Some(py) = python() else { return };
    let store = TempDir::new("python-fresh");
    create(
        &store,
        "fresh",
        &function(&py, "tests/guests/fresh.py", &[]),
    );
    let outs: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let r = restore(&store, "fresh", b"");
            assert_eq!(r.code(), 0, "{}", r.stderr());
            serde_json::from_str(r.stdout().trim())
                .unwrap_or_else(|e| panic!("{e}: {} {}", r.stdout(), r.stderr()))
        })
        .collect();
    for key in ["random", "randint", "urandom"] {
        assert_ne!(
            outs[0][key], outs[1][key],
            "{key} repeated across restores: {outs:?}"
        );
    }
    // The clock: read before the request, it is the template's (the same in both);
    // after it, each restore's own, later than the template's and than the first's.
    assert_eq!(outs[0]["before"], outs[1]["before"], "{outs:?}");
    let (t0, t1) = (
        outs[0]["time"].as_f64().unwrap(),
        outs[1]["time"].as_f64().unwrap(),
    );
    assert!(t0 > outs[0]["before"].as_f64().unwrap(), "{outs:?}");
    assert!(
        t1 > t0,
        "time.time() did not advance across restores: {outs:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - t1).abs() < 30.0,
        "time.time() is stale: {t1} vs {now}"
    );

    // A script that seeds random itself keeps its sequence (CPython's for seed 42).
    create(
        &store,
        "seeded",
        &function(&py, "tests/guests/seeded.py", &[]),
    );
    for _ in 0..2 {
        assert_ok(
            "seeded",
            &restore(&store, "seeded", b""),
            "{\"random\": 0.6394267984578837}\n",
        );
    }
}

/// A template whose trial request (empty: `template create`'s default) imported nothing
/// learns from real requests: the first restore of a request that imports modules faults
/// for their pages, later restores of it fault at most a tenth as often, the learned
/// working set sits beside the manifest in the store, and `vmm-store verify` accepts it.
#[test]
fn a_template_learns_the_working_set_of_requests_unlike_its_trial() {
    let Some(py) = python() else { return };
    let store = TempDir::new("python-learn");
    create(
        &store,
        "imports",
        &function(&py, "examples/imports.py", &[]),
    );
    let learned = store.0.join("templates/imports.ws");
    assert!(!learned.exists());
    let request = b"a request that takes the import path, from 10.0.0.1";
    let faults = |i: usize| -> u64 {
        let mut cmd = vmm();
        cmd.args(["restore", "imports", "--json", "--store", &store.arg()]);
        let r = run_with_input(cmd, request);
        assert_eq!(r.code(), 0, "restore #{i}: {}", r.stderr());
        let v: serde_json::Value = serde_json::from_str(r.stdout().trim())
            .unwrap_or_else(|e| panic!("restore #{i}: {e}: {}", r.stdout()));
        assert_eq!(v["exit_code"], 0, "restore #{i}: {v}");
        let out: serde_json::Value =
            serde_json::from_str(v["stdout"].as_str().unwrap().trim()).unwrap();
        assert_eq!(out["bytes"], request.len(), "restore #{i}: {out}");
        assert_eq!(
            out["ips"],
            serde_json::json!(["10.0.0.1"]),
            "restore #{i}: {out}"
        );
        assert_eq!(v["stats"]["restore"]["strategy"], "prefetch", "{v}");
        v["stats"]["restore"]["uffd_faults"].as_u64().unwrap()
    };
    let first = faults(0);
    assert!(
        first >= 10,
        "the request's imports should fault beyond the trial's working set: {first} faults"
    );
    assert!(learned.exists(), "no learned working set was written");
    let later: Vec<u64> = (1..=10).map(faults).collect();
    assert!(
        later[9] * 10 <= first,
        "restores did not converge: {first} faults first, then {later:?}"
    );
    let mut verify = vmm_store();
    verify.args(["verify", "--store", &store.arg()]);
    let v = run_with_input(verify, b"");
    assert_eq!(v.code(), 0, "{}{}", v.stdout(), v.stderr());
    // The empty request still works (the learned set is a hint, not a requirement).
    assert_ok(
        "empty request",
        &restore(&store, "imports", b""),
        "{\"empty\": true}\n",
    );
}

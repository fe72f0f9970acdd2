//! The two WebAssembly engines in the guest, wasmtime (the default: modules compiled ahead
//! of time on the host) and wasmi (`--engine wasmi`): traps reported alike, wasm exceptions
//! under wasmtime, templates per engine, and pooled instances reset in place after a request
//! that changed the guest's page tables.

mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use vmm::guest::RunLimits;
use vmm::instance::Backing;

const ENGINES: [&str; 2] = ["wasmtime", "wasmi"];

fn write_wat(dir: &TempDir, name: &str, wat: &str) -> String {
    let p = dir.0.join(name);
    std::fs::write(&p, wat).unwrap();
    p.to_string_lossy().into_owned()
}

fn run_module(module: &str, engine: &str, input: &[u8]) -> Run {
    let mut cmd = vmm();
    cmd.args(["run", "--module", module, "--engine", engine]);
    run_with_input(cmd, input)
}

fn template_create(store: &TempDir, name: &str, engine: &str, function: &[String]) -> Run {
    let mut cmd = vmm();
    cmd.args([
        "template",
        "create",
        name,
        "--store",
        &store.arg(),
        "--engine",
        engine,
    ])
    .args(function);
    run_with_input(cmd, b"")
}

/// A module that writes "before\n", then runs `body` (which must trap).
fn trapping(body: &str, extra: &str) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "before\n")
  {extra}
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 7))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    {body}))"#
    )
}

#[test]
fn every_trap_is_reported_alike_on_both_engines() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("engines-traps");
    let cases = [
        (
            "oob",
            "(drop (i32.load (i32.const 0x10000)))",
            "",
            "out of bounds memory access",
        ),
        ("unreachable", "unreachable", "", "unreachable"),
        (
            "stack",
            "(call $deep (i64.const 0)) drop",
            "(func $deep (param $n i64) (result i64) (i64.add (call $deep (i64.add (local.get $n) (i64.const 1))) (i64.const 1)))",
            "call stack exhausted",
        ),
        (
            "div",
            "(drop (i32.div_u (i32.const 1) (i32.load (i32.const 200))))",
            "",
            "integer divide by zero",
        ),
        (
            "overflow",
            "(drop (i32.div_s (i32.const 0x80000000) (i32.sub (i32.load (i32.const 200)) (i32.const 1))))",
            "",
            "integer overflow",
        ),
        (
            "signature",
            "(drop (call_indirect (type $ii) (i32.const 5) (i32.load (i32.const 200))))",
            "(type $ii (func (param i32) (result i32))) (table 1 funcref) (elem (i32.const 0) $nop) (func $nop)",
            "indirect call type mismatch",
        ),
    ];
    for (name, body, extra, expect) in cases {
        let module = write_wat(&dir, &format!("{name}.wat"), &trapping(body, extra));
        for engine in ENGINES {
            let r = run_module(&module, engine, b"");
            let what = format!("{name} under {engine}");
            eprintln!("[{what}] exit {}: {}", r.code(), r.stderr().trim());
            assert_eq!(r.code(), 125, "{what}: {}", r.stderr());
            assert!(
                r.stderr().contains("vmm: error: wasm trap: ") && r.stderr().contains(expect),
                "{what}: the error names the trap ({expect:?}): {}",
                r.stderr()
            );
            assert_eq!(
                r.stdout(),
                "before\n",
                "{what}: output before the trap is kept"
            );
            assert!(!r.stderr().contains("panicked"), "{what}: {}", r.stderr());
        }
    }
}

const EXCEPTIONS: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (tag $boom (param i32))
  (data (i32.const 100) "caught   \n")
  (func $thrower (param $v i32)
    (if (local.get $v) (then (throw $boom (local.get $v)))))
  (func $catcher (param $v i32) (result i32)
    (block $handler (result i32)
      (try_table (catch $boom $handler)
        (call $thrower (local.get $v)))
      (i32.const 99)))
  (func (export "_start")
    (local $v i32)
    ;; one throw caught with its payload, one call that does not throw
    (local.set $v (i32.add (call $catcher (i32.const 42)) (i32.sub (call $catcher (i32.const 0)) (i32.const 99))))
    (i32.store8 (i32.const 107) (i32.add (i32.const 48) (i32.div_u (local.get $v) (i32.const 10))))
    (i32.store8 (i32.const 108) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 10))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    ;; and one that nobody catches
    (call $thrower (i32.const 7))))"#;

#[test]
fn a_wasm_exception_is_thrown_and_caught_in_the_guest_under_wasmtime() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::created("engines-exceptions");
    let module = write_wat(&dir, "exceptions.wat", EXCEPTIONS);
    let r = run_module(&module, "wasmtime", b"");
    assert_eq!(r.stdout(), "caught 42\n", "{}", r.stderr());
    // The uncaught one ends the run like a trap, with the output before it kept.
    assert_eq!(r.code(), 125, "{}", r.stderr());
    assert!(r.stderr().contains("exception"), "{}", r.stderr());
    // wasmi does not implement the proposal: a clean refusal.
    let r = run_module(&module, "wasmi", b"");
    assert_eq!(r.code(), 125, "{}", r.stderr());
    assert!(
        r.stderr().contains("not valid WebAssembly"),
        "{}",
        r.stderr()
    );
}

#[test]
fn templates_of_each_engine_restore_and_never_mix() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::created("engines-templates");
    let hello = qjs_function_args("examples/hello.js", &[]);
    for engine in ENGINES {
        let name = format!("hello-{engine}");
        let c = template_create(&store, &name, engine, &hello);
        assert_eq!(c.code(), 0, "{engine}: {}", c.stderr());
        for who in ["a", "bb"] {
            let r = restore(&store, &name, format!(r#"{{"name":"{who}"}}"#).as_bytes());
            assert_eq!(
                r.stdout(),
                format!(
                    "{{\"greeting\":\"Hello, {who}!\",\"length\":{}}}\n",
                    who.len()
                ),
                "{engine}: {}",
                r.stderr()
            );
        }
    }
    // Each engine has its own runtime base: two bases, one per engine.
    let ls = vmm()
        .args(["template", "ls", "--json", "--store", &store.arg()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let bases: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["parent"].is_null())
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(bases.len(), 2, "{v}");
    // `template ls` shows what each template was made with.
    let mut engines: Vec<(&str, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["engine"].as_str().unwrap(),
                t["runtime"].as_str().unwrap(),
            )
        })
        .collect();
    engines.sort();
    engines.dedup();
    assert_eq!(engines, [("wasmi", "qjs"), ("wasmtime", "qjs")], "{v}");
    // A function layer on a base made with the other engine is refused, naming both.
    let wasmi_base = {
        let c = vmm()
            .args([
                "template",
                "create",
                "probe",
                "--json",
                "--store",
                &store.arg(),
                "--engine",
                "wasmi",
            ])
            .args(&hello)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&c.stdout).unwrap();
        v["base"].as_str().unwrap().to_string()
    };
    let mut cmd = vmm();
    cmd.args([
        "template",
        "create",
        "mixed",
        "--base",
        &wasmi_base,
        "--store",
        &store.arg(),
    ])
    .args(["--engine", "wasmtime"])
    .args(&hello);
    let r = run_with_input(cmd, b"");
    assert_ne!(r.code(), 0, "layered across engines: {}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("engine wasmtime") && err.contains("engine wasmi"),
        "the error names both engines: {err}"
    );
    assert!(!Path::new(&store.0.join("templates/mixed.tmpl")).exists());
}

/// Pooled instances of a function whose requests grow its memory (under wasmtime: new
/// page-table entries in the guest, which the host's rewrite of the page-table pages
/// alone would not take back from KVM's shadow page tables): every request sees exactly
/// what a fresh restore sees, and a page an earlier request mapped traps.
#[test]
fn an_instance_whose_request_grew_memory_answers_like_a_fresh_restore() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::created("engines-grow");
    let function = vec![
        "--module".to_string(),
        path("tests/guests/grow_per_request.wat"),
    ];
    let limits = RunLimits::default();
    for engine in ENGINES {
        let name = format!("grow-{engine}");
        let c = template_create(&store, &name, engine, &function);
        assert_eq!(c.code(), 0, "{engine}: {}", c.stderr());
        let fresh = restore(&store, &name, b"g");
        assert_eq!(fresh.stdout(), "grew from 2 saw 0\n", "{}", fresh.stderr());
        let probe = restore(&store, &name, b"p");
        assert_eq!(probe.code(), 125, "a fresh probe traps: {}", probe.stdout());

        let vmm_engine =
            Arc::new(vmm::engine::Engine::new(vmm::engine::Config::new(&store.0)).unwrap());
        let t = vmm_engine.load_template(&name).unwrap();
        for sharing in [Backing::Eager, Backing::Shared] {
            let what = format!("{engine} {sharing:?}");
            let mut inst = t.instantiate_with(sharing).unwrap();
            for last in [b"g", b"G"] {
                for i in 0..4 {
                    let req: &[u8] = if i % 2 == 0 { b"g" } else { b"G" };
                    let r = inst.invoke(req, &limits);
                    assert!(matches!(r.result, Ok(0)), "{what} #{i}: {:?}", r.result);
                    assert_eq!(
                        String::from_utf8_lossy(&r.stdout),
                        "grew from 2 saw 0\n",
                        "{what} #{i}: memory left by an earlier request"
                    );
                    let rs = inst.reset().unwrap();
                    // Under wasmtime each request maps new pages: KVM forgets its mappings.
                    assert!(!rs.restored, "{what} #{i}: {rs:?}");
                    assert_eq!(
                        rs.mappings_dropped,
                        engine == "wasmtime",
                        "{what} #{i}: {rs:?}"
                    );
                }
                let r = inst.invoke(last, &limits);
                assert!(matches!(r.result, Ok(0)), "{what}: {:?}", r.result);
                inst.reset().unwrap();
                // The pages the last request added must be gone: reading them traps.
                let r = inst.invoke(b"p", &limits);
                assert!(
                    r.result
                        .as_ref()
                        .is_err_and(|e| e.to_string().contains("out of bounds")),
                    "{what}: a page added by an earlier request is still mapped: {:?} {}",
                    r.result,
                    String::from_utf8_lossy(&r.stdout)
                );
                // A failed invocation leaves the instance broken: a new one.
                inst = t.instantiate_with(sharing).unwrap();
            }
        }
    }
}

#[test]
fn stats_show_the_engine_and_the_host_compile_apart_from_the_guest_phases() {
    if !kvm_available() {
        return;
    }
    for engine in ENGINES {
        let mut cmd = vmm();
        cmd.args(["run", "--module", &path("examples/upper.wat"), "--json"])
            .args(["--engine", engine]);
        let r = run_with_input(cmd, b"abc");
        let v: serde_json::Value =
            serde_json::from_str(r.stdout().trim()).expect("one JSON object");
        assert_eq!(v["stdout"], "ABC", "{engine}: {v}");
        let stats = &v["stats"];
        assert_eq!(stats["engine"], engine, "{stats}");
        let aot = stats["aot_compile_ms"].as_f64().unwrap();
        // wasmtime compiles on the host; wasmi compiles (translates) in the guest.
        assert_eq!(aot > 0.0, engine == "wasmtime", "{engine}: {stats}");
        assert!(
            stats["compile_ms"].as_f64().unwrap() > 0.0,
            "{engine}: {stats}"
        );
        let total = stats["total_ms"].as_f64().unwrap();
        assert!(aot < total, "{engine}: {stats}");
    }
}

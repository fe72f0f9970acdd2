//! The library's Template/Instance API on /dev/kvm: an instance serves a request, is reset
//! in place to its template, and serves again with exactly a fresh restore's output.

mod common;
use common::*;
use std::sync::Arc;
use vmm::guest::RunLimits;
use vmm::instance::Backing;

fn create(store: &TempDir, name: &str, script: &str) {
    let mut cmd = vmm();
    cmd.args(["template", "create", name, "--store", &store.arg()])
        .args(qjs_function_args(script, &[]));
    let r = run_with_input(cmd, b"");
    assert_eq!(r.code(), 0, "template create {name}: {}", r.stderr());
}

fn restore(store: &TempDir, name: &str, input: &[u8]) -> String {
    let mut cmd = vmm();
    cmd.args(["restore", name, "--store", &store.arg()]);
    let r = run_with_input(cmd, input);
    assert_eq!(r.code(), 0, "restore {name}: {}", r.stderr());
    r.stdout()
}

#[test]
fn an_instance_reset_in_place_answers_like_a_fresh_restore_every_time() {
    if !kvm_available() {
        return;
    }
    let store = TempDir::new("instance-reset");
    create(&store, "iso", "tests/guests/isolation.js");
    create(&store, "hello", "examples/hello.js");
    let engine = Arc::new(vmm::engine::Engine::new(vmm::engine::Config::new(&store.0)).unwrap());
    let limits = RunLimits::default();
    for (name, mk) in [
        (
            "iso",
            (|i: usize| format!("request-{i}")) as fn(usize) -> String,
        ),
        ("hello", |i: usize| format!(r#"{{"name":"n{i}"}}"#)),
    ] {
        let (t, stats) = engine.load_template_with_stats(name).unwrap();
        eprintln!("{name}: {stats:?}");
        for sharing in [Backing::Eager, Backing::Shared] {
            let mut inst = t.instantiate_with(sharing).unwrap();
            for i in 0..30 {
                let req = mk(i);
                let r = inst.invoke(req.as_bytes(), &limits);
                assert!(
                    matches!(r.result, Ok(0)),
                    "{name} #{i}: {:?} {}",
                    r.result,
                    String::from_utf8_lossy(&r.stderr)
                );
                let got = String::from_utf8_lossy(&r.stdout).into_owned();
                if i % 10 == 3 {
                    assert_eq!(got, restore(&store, name, req.as_bytes()), "{name} #{i}");
                }
                if name == "iso" {
                    assert!(
                        got.contains(&format!(r#"{{"seen":["{req}"],"marks":0,"before":"","#)),
                        "{got}"
                    );
                }
                let rs = inst.reset().unwrap();
                if i < 3 || i == 29 {
                    eprintln!("{name} {sharing:?} #{i}: {:?} {rs:?}", r.stats);
                }
            }
        }
    }
}

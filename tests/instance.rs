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

/// KVM's per-slot metadata is sized by the slots (~10 bytes per 4 KiB page here), so an
/// instance's memory slots cover only what its guest was granted: a hello instance far less
/// than its 512 MiB of guest RAM; a function that allocates well past its template's
/// regions is granted more as it grows, restored (`vmm restore`), reset in place (library)
/// and served (`vmm serve`, a pool reset after every request) alike.
#[test]
fn memory_slots_cover_what_the_guest_uses_and_grow_on_demand() {
    if !kvm_available() {
        return;
    }
    const MIB: u64 = 1 << 20;
    let store = TempDir::new("instance-slots");
    create(&store, "hello", "examples/hello.js");
    create(&store, "alloc", "examples/alloc.js");
    let restore_json = |name: &str, input: &[u8]| -> serde_json::Value {
        let mut cmd = vmm();
        cmd.args(["restore", name, "--store", &store.arg(), "--json"]);
        let r = run_with_input(cmd, input);
        assert_eq!(r.code(), 0, "restore {name}: {}", r.stderr());
        serde_json::from_str(r.stdout().trim()).unwrap()
    };
    let engine = Arc::new(vmm::engine::Engine::new(vmm::engine::Config::new(&store.0)).unwrap());
    let limits = RunLimits::default();

    // hello: slots over a small part of guest RAM, exactly the template's grants.
    let hello = engine.load_template_with_stats("hello").unwrap().0;
    assert_eq!(hello.mem_size(), 512 * MIB);
    let granted = hello.granted_bytes();
    assert!(
        granted < 128 * MIB,
        "hello template granted {} MiB",
        granted / MIB
    );
    let v = restore_json("hello", br#"{"name":"slots"}"#);
    assert!(
        v["stdout"].as_str().unwrap().contains("Hello, slots!"),
        "{v}"
    );
    assert_eq!(v["stats"]["slot_bytes"].as_u64(), Some(granted), "{v}");
    let slots = v["stats"]["memory_slots"].as_u64().unwrap();
    assert!((1..=8).contains(&slots), "{slots} slots");

    // alloc: 48 MiB per request, far past what its template was granted.
    let alloc = engine.load_template_with_stats("alloc").unwrap().0;
    let template_granted = alloc.granted_bytes();
    assert!(
        template_granted < 128 * MIB,
        "{} MiB",
        template_granted / MIB
    );
    let expect = r#"{"bytes":50331648,"sum":1566720,"req":3}"#;
    for _ in 0..2 {
        let v = restore_json("alloc", b"abc");
        assert_eq!(v["stdout"].as_str().unwrap().trim(), expect, "{v}");
        let bytes = v["stats"]["slot_bytes"].as_u64().unwrap();
        assert!(bytes >= template_granted + 48 * MIB, "{} MiB", bytes / MIB);
        assert!(bytes < 512 * MIB, "{} MiB", bytes / MIB);
    }
    for backing in [Backing::Eager, Backing::Shared] {
        let mut inst = alloc.instantiate_with(backing).unwrap();
        assert_eq!(inst.slot_bytes().0, template_granted);
        let mut first = None;
        for i in 0..6 {
            let r = inst.invoke(b"abc", &limits);
            assert!(
                matches!(r.result, Ok(0)),
                "{backing:?} #{i}: {:?}",
                r.result
            );
            assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), expect);
            let (bytes, slots) = inst.slot_bytes();
            assert!(bytes >= template_granted + 48 * MIB, "{} MiB", bytes / MIB);
            assert!(slots <= 64, "{slots} slots");
            eprintln!(
                "alloc {backing:?} #{i}: {} MiB in {slots} slots, {} exits, run {:.2} ms",
                bytes / MIB,
                r.stats.exits,
                r.stats.run_ms
            );
            match first {
                None => first = Some((bytes, r.stats.exits)),
                // After a reset the guest's grant map names what the instance already has:
                // nothing more is granted and no request is needed.
                Some((b, exits)) => {
                    assert_eq!(bytes, b, "{backing:?} #{i}");
                    assert!(
                        r.stats.exits < exits,
                        "{backing:?} #{i}: {} exits",
                        r.stats.exits
                    );
                }
            }
            inst.reset().unwrap();
        }
    }

    // Served: a pool of instances reset after every request, alongside hello.
    let d = common::daemon::Daemon::start(&store, &["--pool", "1"]);
    for i in 0..8 {
        let (status, body, code) = d.invoke("alloc", b"abc");
        assert_eq!((status, code.as_deref()), (200, Some("0")), "#{i}: {body}");
        assert_eq!(body.trim(), expect, "#{i}");
        let (status, body, _) = d.invoke("hello", br#"{"name":"s"}"#);
        assert_eq!(status, 200, "#{i}: {body}");
        assert!(body.contains("Hello, s!"), "{body}");
    }
}

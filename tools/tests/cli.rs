//! `vmm-store` end to end, on real stores built with the snapshot-store API.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use snapshot_store::fixtures::{self, page, TempDir, DAMAGES, MEM};
use snapshot_store::{Frame, Store};

mod common;
use common::{healthy_store, with_vmm_states};

fn vmm_store(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm-store"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("VMM_STORE")
        .output()
        .unwrap()
}

fn ok(store: &Path, args: &[&str]) -> String {
    let o = vmm_store(store, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: stdout {} stderr {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn ok_json(store: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(store, &a)).unwrap()
}

/// base + fn (fixtures) + "twin" sharing one page with fn + "orphaned" removed.
fn rich_store(dir: &Path) -> Store {
    let mut s = healthy_store(dir);
    let mut w = s.begin_template("twin", None, MEM).unwrap();
    w.put_page(0, &page(104)).unwrap();
    w.put_page(1, &page(9000)).unwrap();
    w.commit().unwrap();
    let mut w = s.begin_template("orphaned", Some("base"), MEM).unwrap();
    for f in 40..45 {
        w.put_page(f, &page(7000 + f)).unwrap();
    }
    w.commit().unwrap();
    s.remove("orphaned").unwrap();
    with_vmm_states(dir);
    s
}

fn resolved(s: &mut Store, name: &str) -> Vec<u8> {
    let t = s.load(name).unwrap();
    let r = t.resolve(s).unwrap();
    let mut g = vec![0u8; r.mem_size() as usize];
    r.copy_to(&mut g).unwrap();
    g
}

#[test]
fn ls_and_inspect() {
    let d = TempDir::new();
    rich_store(d.path());
    let out = ok(d.path(), &["ls"]);
    assert!(out.starts_with("TEMPLATE"), "{out}");
    let fn_line = out.lines().find(|l| l.starts_with("fn ")).unwrap();
    assert!(
        fn_line.contains("base") && fn_line.contains("256.0 KiB"),
        "{out}"
    );
    let j = ok_json(d.path(), &["ls"]);
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "fn", "twin"]);
    assert_eq!(j[1]["parent"], "base");
    assert_eq!(j[1]["own_pages"], 2);
    assert!(j[1]["created_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let out = ok(d.path(), &["inspect", "fn"]);
    assert!(out.contains("base -> fn"), "{out}");
    let j = ok_json(d.path(), &["inspect", "fn"]);
    let l = &j["layers"][1];
    assert_eq!(l["name"], "fn");
    assert_eq!(
        (
            &l["own_pages"],
            &l["inherited_pages"],
            &l["zero_frames"],
            &l["shared_pages"],
            &l["working_set"]
        ),
        (
            &Value::from(2),
            &Value::from(7),
            &Value::from(55),
            &Value::from(1),
            &Value::from(3)
        )
    );
    assert_eq!(j["layers"][0]["own_pages"], 10);

    let o = vmm_store(d.path(), &["inspect", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let d = TempDir::new();
    assert_eq!(vmm_store(d.path(), &["frobnicate"]).status.code(), Some(2));
    // No store there: a clear error, not a new empty store.
    let o = vmm_store(&d.path().join("none"), &["ls"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no store at"));
    assert!(!d.path().join("none").exists());
}

#[test]
fn default_store_dir_from_env() {
    let d = TempDir::new();
    rich_store(d.path());
    let o = Command::new(env!("CARGO_BIN_EXE_vmm-store"))
        .args(["ls", "--json"])
        .env("VMM_STORE", d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j.as_array().unwrap().len(), 3);
}

/// Sum of the sizes of every pack, index, manifest and the config, via `du`.
fn du_bytes(dir: &Path) -> u64 {
    let mut files = Vec::new();
    for sub in ["packs", "templates"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    files.push(dir.join("store.cfg"));
    let o = Command::new("du")
        .args(["-b", "-c"])
        .args(&files)
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    s.lines()
        .last()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn stats_agree_with_du() {
    let d = TempDir::new();
    rich_store(d.path());
    let j = ok_json(d.path(), &["stats"]);
    let physical = j["physical_bytes"].as_u64().unwrap();
    assert_eq!(physical, du_bytes(d.path()));
    let logical = j["logical_bytes"].as_u64().unwrap();
    assert_eq!(logical, 3 * MEM);
    let ratio = j["dedup_ratio"].as_f64().unwrap();
    assert!((ratio - logical as f64 / du_bytes(d.path()) as f64).abs() < 1e-9);
    assert_eq!(j["shared_pairs"][0]["a"], "fn");
    assert_eq!(j["shared_pairs"][0]["b"], "twin");
    let twin = j["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "twin")
        .unwrap();
    assert_eq!(twin["unique_bytes"], 4096);
    let out = ok(d.path(), &["stats"]);
    assert!(out.contains("dedup ratio"), "{out}");
    assert!(out.contains("fn + twin"), "{out}");
}

#[test]
fn diff_ranges() {
    let d = TempDir::new();
    rich_store(d.path());
    let j = ok_json(d.path(), &["diff", "base", "fn"]);
    assert_eq!(j["differing_frames"], 3);
    assert_eq!(j["ranges"][0]["start"], 3 * 4096);
    assert_eq!(j["ranges"][0]["end"], 6 * 4096);
    assert_eq!(j["ranges"][0]["frames"], 3);
    let out = ok(d.path(), &["diff", "base", "fn"]);
    assert!(out.contains("3 page(s) differ"), "{out}");
    assert!(out.contains("0x000000003000"), "{out}");
}

#[test]
fn verify_healthy_exits_0_and_reports_garbage_as_warnings() {
    let d = TempDir::new();
    let s = healthy_store(d.path());
    drop(s);
    let out = ok(d.path(), &["verify"]);
    assert!(out.contains("healthy"), "{out}");
    let d = TempDir::new();
    rich_store(d.path());
    let out = ok(d.path(), &["verify"]);
    assert!(
        out.contains("warning:") && out.contains("referenced by no template"),
        "{out}"
    );
    let j = ok_json(d.path(), &["verify"]);
    assert_eq!(j["ok"], true);
    assert_eq!(j["corruption"], 0);
}

#[test]
fn verify_reports_each_damaged_fixture_and_exits_1() {
    for dmg in DAMAGES {
        let d = TempDir::new();
        drop(healthy_store(d.path()));
        (dmg.apply)(d.path());
        let o = vmm_store(d.path(), &["verify"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(1), "{}: {out}", dmg.name);
        assert!(
            out.lines()
                .any(|l| l.starts_with("error:") && l.contains(dmg.expect)),
            "{}: {out}",
            dmg.name
        );
        assert!(out.contains("  hint: "), "{}: {out}", dmg.name);
        let o = vmm_store(d.path(), &["verify", "--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", dmg.name);
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(j["ok"], false);
        assert!(j["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["severity"] == "corruption"
                && p["what"].as_str().unwrap().contains(dmg.expect)
                && !p["hint"].as_str().unwrap().is_empty()));
    }
}

#[test]
fn gc_removes_orphan_and_keeps_referenced() {
    let d = TempDir::new();
    let mut s = rich_store(d.path());
    std::fs::write(d.path().join("tmp/dead.tmp"), b"x").unwrap();
    let want: Vec<Vec<u8>> = ["base", "fn", "twin"]
        .iter()
        .map(|n| resolved(&mut s, n))
        .collect();
    let j = ok_json(d.path(), &["gc", "--dry-run"]);
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["removed_pages"], 5);
    assert!(d.path().join("tmp/dead.tmp").exists());
    let out = ok(d.path(), &["gc"]);
    assert!(out.contains("removed 5 unreferenced page(s)"), "{out}");
    assert!(!d.path().join("tmp/dead.tmp").exists());
    let out = ok(d.path(), &["verify"]);
    assert!(out.contains("healthy") && !out.contains("warning"), "{out}");
    let mut s = Store::open(d.path()).unwrap();
    for (n, w) in ["base", "fn", "twin"].iter().zip(&want) {
        assert_eq!(&resolved(&mut s, n), w, "{n}");
    }
    let t = s.load("fn").unwrap();
    assert_eq!(
        t.resolve(&s).unwrap().frame(4),
        Some(Frame::Data(&page(104)))
    );
    let j = ok_json(d.path(), &["gc"]);
    assert_eq!(j["removed_pages"], 0);
}

#[test]
fn gc_refuses_on_unreadable_manifest() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    fixtures::bad_manifest_checksum(d.path());
    let o = vmm_store(d.path(), &["gc"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("gc refused") && err.contains("verify"),
        "{err}"
    );
}

#[test]
fn export_import_round_trip_with_dedup() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let mut sa = rich_store(a.path());
    let file = a.path().join("fn.vmmt");
    let file_s = file.to_str().unwrap();
    let j = ok_json(a.path(), &["export", "fn", file_s]);
    assert_eq!(j["templates"], serde_json::json!(["base", "fn"]));
    assert_eq!(j["pages"], 12);
    assert_eq!(j["bytes"], std::fs::metadata(&file).unwrap().len());

    // The target already holds some of the pages.
    let mut sb = Store::create_or_open(b.path()).unwrap();
    let mut w = sb.begin_template("local", None, MEM).unwrap();
    w.put_page(7, &page(3)).unwrap();
    w.put_page(8, &page(4)).unwrap();
    w.commit().unwrap();
    drop(sb);
    with_vmm_states(b.path());
    let j = ok_json(b.path(), &["import", file_s]);
    assert_eq!(j["pages"], 12);
    assert_eq!(j["new_pages"], 10);
    let mut sb = Store::open(b.path()).unwrap();
    for n in ["base", "fn"] {
        assert_eq!(resolved(&mut sa, n), resolved(&mut sb, n), "{n}");
    }
    assert!(ok(b.path(), &["verify"]).contains("healthy"));
    // Twice: nothing added.
    let before = du_bytes(b.path());
    let out = ok(b.path(), &["import", file_s]);
    assert!(out.contains("already present base"), "{out}");
    assert!(out.contains("0 written"), "{out}");
    assert_eq!(du_bytes(b.path()), before);

    // A different template of the same name: refused, clear error.
    let c = TempDir::new();
    let mut sc = Store::create_or_open(c.path()).unwrap();
    let mut w = sc.begin_template("base", None, MEM).unwrap();
    w.put_page(0, &page(1)).unwrap();
    w.commit().unwrap();
    let o = vmm_store(c.path(), &["import", file_s]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("different template named base already exists"),
        "{err}"
    );
    // A damaged file: refused.
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 4;
    let bad = a.path().join("bad.vmmt");
    std::fs::write(&bad, bytes).unwrap();
    let e = TempDir::new();
    let o = vmm_store(e.path(), &["import", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("damaged"));
    // Export of a missing template leaves no file behind.
    let missing = a.path().join("missing.vmmt");
    let o = vmm_store(a.path(), &["export", "nope", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!missing.exists());
    assert!(std::fs::read_dir(a.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".partial")));
}

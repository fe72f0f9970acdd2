//! `vmm-store` and the compiled-module cache: `ls --artifacts`, `ls`, `stats`,
//! `verify` and `gc` (its policy and `--dry-run`) on real stores on disk, through the
//! real binary; damaged artifacts and special files planted where artifacts go.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use snapshot_store::fixtures::TempDir;
use snapshot_store::{ArtifactKey, Store};

mod common;
use common::healthy_store;

const ENGINE: &str = "wasmtime-48.0.8";
const OLD_ENGINE: &str = "wasmtime-47.0.0";
const SETTINGS: &str = "x86_64 sse4.2; reservation 0";

fn cmd(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm-store"));
    c.arg("--store")
        .arg(store)
        .args(args)
        .env_remove("VMM_STORE")
        .stdin(Stdio::null());
    c
}

fn run(store: &Path, args: &[&str]) -> Output {
    cmd(store, args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(store: &Path, args: &[&str], code: i32) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = run(store, &a);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&o)))
}

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn art_path(dir: &Path, key: &ArtifactKey) -> PathBuf {
    dir.join("artifacts").join(format!("{key}.art"))
}

/// Every file in `artifacts/` with its bytes (links and FIFOs by their kind).
fn artifact_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir.join("artifacts"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let b = if m.is_file() {
                fs::read(&p).unwrap()
            } else {
                format!("{:?}", m.file_type()).into_bytes()
            };
            (p, b)
        })
        .collect();
    v.sort();
    v
}

fn flip_a_byte(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = fs::read(p).unwrap();
    let i = b.len() / 2;
    b[i] ^= 1;
    fs::write(p, b).unwrap();
}

/// The store fixtures' two templates, and three artifacts: two of the current engine,
/// one of an older one.
fn store_with_artifacts(dir: &Path) -> [(ArtifactKey, Vec<u8>); 3] {
    let s = healthy_store(dir);
    let arts = [
        (
            ArtifactKey::new(b"\0asm one", ENGINE, SETTINGS),
            blob(1, 300_000),
        ),
        (
            ArtifactKey::new(b"\0asm two", ENGINE, SETTINGS),
            blob(2, 200_000),
        ),
        (
            ArtifactKey::new(b"\0asm one", OLD_ENGINE, SETTINGS),
            blob(3, 100_000),
        ),
    ];
    for (k, b) in &arts {
        s.put_artifact(k, b).unwrap();
    }
    arts
}

#[test]
fn ls_and_stats_show_the_cached_compiled_modules() {
    let d = TempDir::new();
    let arts = store_with_artifacts(d.path());

    let o = run(d.path(), &["ls", "--artifacts"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = stdout(&o);
    assert!(out.starts_with("KEY"), "{out}");
    for (k, b) in &arts {
        let line = out
            .lines()
            .find(|l| l.starts_with(&k.short_id()))
            .unwrap_or_else(|| panic!("{} not listed: {out}", k.short_id()));
        assert!(line.contains(k.engine()), "{line}");
        assert!(line.contains(&k.module_sha256()[..16]), "{line}");
        assert!(
            line.contains(&format!("{:.1} KiB", b.len() as f64 / 1024.0)),
            "{line}"
        );
    }

    let j = json(d.path(), &["ls", "--artifacts"], 0);
    let list = j.as_array().unwrap();
    assert_eq!(list.len(), 3);
    for (k, b) in &arts {
        let a = list.iter().find(|a| a["key"] == k.id()).unwrap();
        assert_eq!(a["engine"], k.engine());
        assert_eq!(a["settings"], SETTINGS);
        assert_eq!(a["module_sha256"], k.module_sha256());
        assert_eq!(a["bytes"], b.len() as u64);
        assert!(a["last_used_unix_ms"].as_u64().unwrap() > 0);
    }

    // Plain ls: the templates, and a pointer to the artifacts.
    let out = stdout(&run(d.path(), &["ls"]));
    assert!(out.contains("base") && out.contains("fn"), "{out}");
    assert!(out.contains("3 compiled module(s) cached"), "{out}");
    // Its JSON stays the list of templates.
    assert_eq!(json(d.path(), &["ls"], 0).as_array().unwrap().len(), 2);

    // stats counts their bytes, apart from the templates' physical bytes.
    let on_disk: u64 = artifact_files(d.path())
        .iter()
        .map(|(p, _)| fs::metadata(p).unwrap().len())
        .sum();
    let j = json(d.path(), &["stats"], 0);
    assert_eq!(j["artifacts"], 3);
    assert_eq!(j["artifact_bytes"], on_disk);
    let out = stdout(&run(d.path(), &["stats"]));
    assert!(
        out.contains("compiled modules   3 cached") && out.contains(&format!("({on_disk} bytes")),
        "{out}"
    );

    // An empty cache says so.
    let e = TempDir::new();
    drop(healthy_store(e.path()));
    let out = stdout(&run(e.path(), &["ls", "--artifacts"]));
    assert!(out.contains("no cached compiled modules"), "{out}");
    assert!(!stdout(&run(e.path(), &["ls"])).contains("compiled module"));
}

#[test]
fn verify_names_a_damaged_artifact_and_gc_removes_it_by_policy() {
    let d = TempDir::new();
    let arts = store_with_artifacts(d.path());
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(stdout(&o).contains("healthy"));

    let damaged = art_path(d.path(), &arts[1].0);
    flip_a_byte(&damaged);
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.contains(&*damaged.to_string_lossy()))
        .unwrap_or_else(|| panic!("damaged artifact not named: {out}"));
    assert!(
        line.starts_with("error:") && line.contains("checksum"),
        "{line}"
    );
    assert_eq!(out.matches("error:").count(), 1, "{out}");

    // Dry run: says what would go, changes nothing.
    let before = artifact_files(d.path());
    let j = json(
        d.path(),
        &["gc", "--dry-run", "--current-engine", ENGINE],
        0,
    );
    let removed = j["artifacts"]["removed"].as_array().unwrap();
    let mut what: Vec<(String, String)> = removed
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    what.sort();
    let mut want = vec![
        (damaged.display().to_string(), "damaged".to_string()),
        (
            art_path(d.path(), &arts[2].0).display().to_string(),
            "stale".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(what, want);
    assert_eq!(j["artifacts"]["kept"], 1);
    assert_eq!(artifact_files(d.path()), before);
    let o = run(d.path(), &["gc", "--dry-run", "--current-engine", ENGINE]);
    let out = stdout(&o);
    assert!(
        out.contains("would remove 2 cached compiled module file(s)"),
        "{out}"
    );
    assert_eq!(artifact_files(d.path()), before);

    // Default gc: only the damaged one goes; the others are the cache.
    let j = json(d.path(), &["gc"], 0);
    assert_eq!(j["artifacts"]["removed"].as_array().unwrap().len(), 1);
    assert!(!damaged.exists());
    let s = Store::open(d.path()).unwrap();
    for (k, b) in [&arts[0], &arts[2]] {
        assert_eq!(s.get_artifact(k).unwrap().as_ref(), Some(b));
    }

    // With the current engine: the older engine's artifact is stale.
    let o = run(d.path(), &["gc", "--current-engine", ENGINE]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = stdout(&o);
    assert!(
        out.contains(&format!("removed {}.art ({OLD_ENGINE}): stale", arts[2].0)),
        "{out}"
    );
    assert_eq!(s.get_artifact(&arts[2].0).unwrap(), None);
    assert_eq!(
        s.get_artifact(&arts[0].0).unwrap().as_ref(),
        Some(&arts[0].1)
    );

    // Unused for a while: by the last use, not the creation.
    let p0 = art_path(d.path(), &arts[0].0);
    let f = fs::File::open(&p0).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(40 * 86400))
        .unwrap();
    let j = json(
        d.path(),
        &["gc", "--dry-run", "--artifacts-unused-for", "30d"],
        0,
    );
    assert_eq!(j["artifacts"]["removed"][0]["reason"], "unused");
    s.get_artifact(&arts[0].0).unwrap().unwrap();
    let j = json(d.path(), &["gc", "--artifacts-unused-for", "30d"], 0);
    assert_eq!(j["artifacts"]["removed"].as_array().unwrap().len(), 0);
    assert!(p0.exists());

    let j = json(d.path(), &["gc", "--all-artifacts"], 0);
    assert_eq!(j["artifacts"]["removed"].as_array().unwrap().len(), 1);
    assert!(artifact_files(d.path()).is_empty());
    // The templates were never touched.
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let o = run(d.path(), &["gc", "--artifacts-unused-for", "30 days"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a duration"));
}

/// Runs `vmm-store` with at most 2 GiB of address space; None if it had not
/// finished after 30 s (then it is killed).
fn run_bounded(store: &Path, args: &[&str]) -> Option<Output> {
    use std::os::unix::process::CommandExt;
    let mut c = cmd(store, args);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        c.pre_exec(|| {
            let l = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &l);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

#[test]
fn special_files_and_wrong_or_oversize_artifacts_are_refused_not_read() {
    let d = TempDir::new();
    let arts = store_with_artifacts(d.path());
    let dir = d.path().join("artifacts");
    let fifo = dir.join(format!("{}.art", "f".repeat(64)));
    let zero = dir.join(format!("{}.art", "0".repeat(64)));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    // Another key's artifact under a name, and a sparse file over the size limit.
    let wrong = art_path(d.path(), &arts[0].0);
    fs::remove_file(&wrong).unwrap();
    fs::copy(art_path(d.path(), &arts[1].0), &wrong).unwrap();
    let huge = dir.join(format!("{}.art", "e".repeat(64)));
    fs::File::create(&huge)
        .unwrap()
        .set_len(snapshot_store::MAX_ARTIFACT_FILE_BYTES + 1)
        .unwrap();

    for args in [
        &["ls", "--artifacts"][..],
        &["ls"],
        &["stats"],
        &["verify"],
        &["gc", "--dry-run"],
    ] {
        let o = run_bounded(d.path(), args).unwrap_or_else(|| panic!("{args:?} did not finish"));
        assert!(
            o.status.code().is_some(),
            "{args:?} was killed: {}",
            text(&o)
        );
        match args[0] {
            "verify" => {
                assert_eq!(o.status.code(), Some(1), "{}", text(&o));
                let out = stdout(&o);
                for (p, what) in [
                    (&fifo, "it is a FIFO"),
                    (&zero, "it is a device"),
                    (&wrong, "holds the artifact of key"),
                    (&huge, "over the limit"),
                ] {
                    let line = out
                        .lines()
                        .find(|l| l.contains(&*p.to_string_lossy()))
                        .unwrap_or_else(|| panic!("{} not reported: {out}", p.display()));
                    assert!(line.starts_with("error:") && line.contains(what), "{line}");
                }
            }
            "ls" if args.len() == 2 => {
                assert_eq!(o.status.code(), Some(1), "{}", text(&o));
                assert_eq!(stdout(&o).matches("DAMAGED").count(), 4, "{}", text(&o));
            }
            _ => assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o)),
        }
    }
    let o = run_bounded(d.path(), &["gc"]).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        stdout(&o).contains("removed 4 cached compiled module file(s)"),
        "{}",
        text(&o)
    );
    for p in [&fifo, &zero, &wrong, &huge] {
        assert!(fs::symlink_metadata(p).is_err(), "{} left", p.display());
    }
    assert!(Path::new("/dev/zero").exists());
    let s = Store::open(d.path()).unwrap();
    assert_eq!(
        s.get_artifact(&arts[1].0).unwrap().as_ref(),
        Some(&arts[1].1)
    );
    let o = run(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

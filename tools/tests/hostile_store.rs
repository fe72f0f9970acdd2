//! Hostile-store maintenance (issue 7): `vmm-store` gc, verify, export, import and
//! reindex against damaged, foreign, forged and stale indexes, a missing config,
//! unreadable packs and manifests, special-file destinations and a full disk. On real
//! stores on disk, through the real binary. Whatever happens, nothing a manifest
//! references is ever deleted.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use snapshot_store::fixtures::{self, page, TempDir, INDEX_DAMAGES, MEM};

mod common;
use common::{healthy_store, with_vmm_states};
use snapshot_store::Store;

fn cmd(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm-store"));
    c.arg("--store")
        .arg(store)
        .args(args)
        .env_remove("VMM_STORE");
    c
}

fn run(store: &Path, args: &[&str]) -> Output {
    cmd(store, args).stdin(Stdio::null()).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every template's resolved memory (what a restore would see), by name.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let s = Store::open(dir).unwrap();
    let names: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names
        .into_iter()
        .map(|n| {
            let t = s.load(&n).unwrap();
            let r = t.resolve(&s).unwrap();
            let mut g = vec![0u8; r.mem_size() as usize];
            r.copy_to(&mut g).unwrap();
            (n, g)
        })
        .collect()
}

/// Every file of the store (packs, indexes, manifests, config) with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["packs", "templates"] {
        let mut v: Vec<PathBuf> = fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        out.extend(v.into_iter().map(|p| {
            let b = fs::read(&p).unwrap();
            (p, b)
        }));
    }
    if let Ok(b) = fs::read(dir.join("store.cfg")) {
        out.push((dir.join("store.cfg"), b));
    }
    out
}

#[test]
fn gc_and_verify_with_a_lost_foreign_forged_or_stale_index_then_reindex() {
    for (name, damage) in INDEX_DAMAGES {
        let d = TempDir::new();
        drop(healthy_store(d.path()));
        let want = contents(d.path());
        damage(d.path());
        let before = files(d.path());

        // gc (and its dry run) refuses, names the templates and the repair, changes nothing.
        for args in [&["gc", "--dry-run"][..], &["gc"], &["gc", "--json"]] {
            let o = run(d.path(), args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{name} {args:?}: {}", text(&o));
            assert!(
                err.contains("gc refused") && err.contains("base") && err.contains("fn"),
                "{name}: {err}"
            );
            assert!(
                err.contains("vmm-store reindex 0000000000000001"),
                "{name}: {err}"
            );
            assert_eq!(files(d.path()), before, "{name} {args:?} changed the store");
        }

        // verify: damage (exit 1), not garbage; says which templates and how to repair.
        let o = run(d.path(), &["verify"]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(1), "{name}: {}", text(&o));
        let line = out
            .lines()
            .find(|l| l.contains("no index accounts for them"))
            .unwrap_or_else(|| panic!("{name}: {out}"));
        assert!(
            line.starts_with("error:") && line.contains("templates base, fn need"),
            "{name}: {out}"
        );
        assert!(out.contains("reindex 0000000000000001"), "{name}: {out}");
        assert!(
            !out.lines()
                .any(|l| l.starts_with("warning:") && l.contains(".pack")),
            "{name}: pack called harmless: {out}"
        );

        // export of a template whose pages are not accounted for: refused, no file left.
        let dest = d.path().join("fn.vmmt");
        let o = run(d.path(), &["export", "fn", dest.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{name}: {}", text(&o));
        assert!(!dest.exists());
        assert!(fs::read_dir(d.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")));

        // The repair: rebuild the index from the pack (by path here).
        let o = run(d.path(), &["reindex", "packs/0000000000000001.pack"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("12 page(s) indexed"),
            "{name}: {}",
            text(&o)
        );
        let o = run(d.path(), &["verify"]);
        assert!(
            o.status.code() == Some(0) && String::from_utf8_lossy(&o.stdout).contains("healthy"),
            "{name}: {}",
            text(&o)
        );
        let o = run(d.path(), &["gc"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", text(&o));
        assert_eq!(contents(d.path()), want, "{name}: templates changed");
        let o = run(d.path(), &["export", "fn", dest.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", text(&o));
    }
}

#[test]
fn reindex_rejects_what_is_not_a_pack() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    for bad in ["../../etc/passwd", "xyz", "00000000000000000001"] {
        let o = run(d.path(), &["reindex", bad]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(stderr(&o).contains("is not a pack"), "{bad}: {}", text(&o));
    }
    let o = run(d.path(), &["reindex", "0000000000000007"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("no pack file"), "{}", text(&o));
}

#[test]
fn a_store_without_its_config_is_refused_not_recreated() {
    let d = TempDir::new();
    let s = healthy_store(d.path());
    let file = TempDir::new();
    fs::create_dir_all(file.path()).unwrap();
    let export = file.path().join("fn.vmmt");
    s.export("fn", fs::File::create(&export).unwrap()).unwrap();
    drop(s);
    fixtures::missing_config(d.path());
    let before = files(d.path());
    for args in [
        &["import", export.to_str().unwrap()][..],
        &["gc"],
        &["verify"],
        &["ls"],
    ] {
        let o = run(d.path(), args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            err.contains("no store.cfg") && err.contains("damaged") && err.contains("backup"),
            "{args:?}: {err}"
        );
        assert!(
            !d.path().join("store.cfg").exists(),
            "{args:?} wrote a config"
        );
        assert_eq!(files(d.path()), before, "{args:?} changed the store");
    }
    // A directory that is not a store at all is not made into one either.
    let o = run(file.path(), &["import", export.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("not empty"), "{}", text(&o));
    assert!(!file.path().join("store.cfg").exists());
}

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn export_refuses_to_replace_anything_but_a_regular_file_it_was_told_to() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    let w = TempDir::new();
    fs::create_dir_all(w.path()).unwrap();
    let export = |dest: &Path, force: bool| {
        let mut a = vec!["export", "fn", dest.to_str().unwrap()];
        if force {
            a.push("--force");
        }
        run(d.path(), &a)
    };
    let refused = |o: &Output, what: &str| {
        assert_eq!(o.status.code(), Some(2), "{what}: {}", text(o));
        assert!(stderr(o).contains(what), "{what}: {}", text(o));
    };

    // A FIFO: refused (never opened, so this does not block), still a FIFO.
    let fifo = w.path().join("fifo");
    mkfifo(&fifo);
    for force in [false, true] {
        refused(&export(&fifo, force), "FIFO");
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    }

    // A symlink: refused even with --force; the link and its target are untouched.
    let target = w.path().join("target");
    fs::write(&target, b"keep me").unwrap();
    let link = w.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for force in [false, true] {
        refused(&export(&link, force), "symbolic link");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"keep me");
    }
    // A dangling one too.
    let dangling = w.path().join("dangling");
    std::os::unix::fs::symlink(w.path().join("nowhere"), &dangling).unwrap();
    refused(&export(&dangling, false), "symbolic link");
    assert!(!w.path().join("nowhere").exists());

    // A directory: refused.
    let sub = w.path().join("sub");
    fs::create_dir(&sub).unwrap();
    refused(&export(&sub, true), "directory");
    assert!(sub.is_dir());

    // A character device (made here, never a real /dev node): root only.
    if is_root() {
        let dev = w.path().join("null-like");
        let c = CString::new(dev.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid path; the node is created in our own temp dir.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(r, 0, "mknod");
        for force in [false, true] {
            refused(&export(&dev, force), "a device");
            assert!(fs::symlink_metadata(&dev)
                .unwrap()
                .file_type()
                .is_char_device());
        }
    } else {
        eprintln!("SKIPPED (part): a character device destination needs root to create one");
    }

    // An existing regular file: refused without --force, replaced with it.
    let existing = w.path().join("existing.vmmt");
    fs::write(&existing, b"precious").unwrap();
    refused(&export(&existing, false), "--force");
    assert_eq!(fs::read(&existing).unwrap(), b"precious");
    let o = export(&existing, true);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let exported = fs::read(&existing).unwrap();
    assert!(exported.starts_with(b"VMMSTEXP"));

    // A new file: written; no temp files left anywhere.
    let new = w.path().join("new.vmmt");
    let o = export(&new, false);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(fs::read(&new).unwrap(), exported);
    assert!(fs::read_dir(w.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));

    // `-`: the export on stdout, the summary on stderr; it imports.
    let o = run(d.path(), &["export", "fn", "-"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(o.stdout, exported);
    assert!(stderr(&o).contains("exported base -> fn"), "{}", text(&o));
    let e = TempDir::new();
    let mut child = cmd(e.path(), &["import", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&o.stdout).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(contents(e.path()), contents(d.path())[..2].to_vec());
}

#[test]
fn ls_lists_the_readable_templates_and_flags_a_damaged_one() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    fixtures::bad_manifest_checksum(d.path()); // fn
    let o = run(d.path(), &["ls"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.lines().any(|l| l.starts_with("base ")), "{}", text(&o));
    assert!(
        out.lines()
            .any(|l| l.starts_with("fn ") && l.contains("UNREADABLE")),
        "{}",
        text(&o)
    );
    let err = stderr(&o);
    assert!(
        err.contains("template fn cannot be read") && err.contains("checksum mismatch"),
        "{err}"
    );
    let o = run(d.path(), &["ls", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j[0]["name"], "base");
    assert_eq!(j[1]["name"], "fn");
    assert_eq!(j[1]["unreadable"], true);
}

/// Runs vmm-store as an unprivileged user when we are root (root reads a chmod 000
/// file anyway), else as ourselves.
fn run_unprivileged(store: &Path, args: &[&str]) -> Output {
    let mut c = cmd(store, args);
    if is_root() {
        // (std drops root's supplementary groups when it sets the uid.)
        c.uid(65534).gid(65534);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

#[test]
fn an_unreadable_pack_is_reported_as_unreadable() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    for sub in ["", "packs", "templates", "tmp"] {
        fs::set_permissions(d.path().join(sub), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let pack = d.path().join("packs/0000000000000001.pack");
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o000)).unwrap();
    let o = run_unprivileged(d.path(), &["export", "fn", "-"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(o.stdout.is_empty(), "{}", text(&o));
    assert!(
        err.contains("cannot be read") && err.contains("ermission denied"),
        "{err}"
    );
    assert!(!err.contains("not in any pack index"), "{err}");
    let o = run_unprivileged(d.path(), &["verify"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        out.contains("cannot read the pack") && out.contains("ermission denied"),
        "{}",
        text(&o)
    );
    // Readable again: everything is there.
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run_unprivileged(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // An unreadable index: said so, not "not in any pack index".
    let idx = d.path().join("packs/0000000000000001.idx");
    fs::set_permissions(&idx, fs::Permissions::from_mode(0o000)).unwrap();
    let o = run_unprivileged(d.path(), &["export", "fn", "-"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        err.contains("no readable pack index") && err.contains("ermission denied"),
        "{err}"
    );
    let o = run_unprivileged(d.path(), &["verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("check the permissions of the index"),
        "{}",
        text(&o)
    );
    fs::set_permissions(&idx, fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn errors_point_at_commands_that_exist() {
    let d = TempDir::new();
    drop(healthy_store(d.path()));
    let o = run(d.path(), &["inspect", "nope"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        err.contains("not found") && err.contains("`vmm-store ls`"),
        "{err}"
    );
    let o = run(&d.path().join("none"), &["ls"]);
    let err = stderr(&o);
    assert!(
        err.contains("no store at") && err.contains("--store"),
        "{err}"
    );
    for o in [run(d.path(), &["inspect", "nope"]), o] {
        let err = stderr(&o);
        assert!(!err.contains("Store::") && !err.contains("`list`"), "{err}");
    }
}

#[test]
fn gc_on_a_full_disk_leaves_the_store_as_it_was() {
    // 300 live pages and 50 garbage ones in one pack: gc copies the live ones into a
    // new pack, and the file size limit stops that copy halfway, as a full disk would.
    let d = TempDir::new();
    let mut s = Store::create_or_open(d.path()).unwrap();
    let mem = 1024 * MEM;
    let mut w = s.begin_template("keep", None, mem).unwrap();
    for i in 0..300 {
        w.put_page(i, &page(10_000 + i)).unwrap();
    }
    w.commit().unwrap();
    let mut w = s.begin_template("gone", None, mem).unwrap();
    for i in 0..50 {
        w.put_page(i, &page(20_000 + i)).unwrap();
    }
    w.commit().unwrap();
    s.remove("gone").unwrap();
    drop(s);
    with_vmm_states(d.path());
    let want = contents(d.path());
    let before = files(d.path());
    let limit: u64 = 150 * 4096;
    let mut c = cmd(d.path(), &["gc"]);
    // SAFETY: setrlimit and signal are async-signal-safe; in the child before exec they
    // cap the size of any file it writes (EFBIG past it, instead of a SIGXFSZ kill).
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("writing new pack"), "{}", text(&o));
    assert_eq!(files(d.path()), before, "gc left a partial pack behind");
    assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    let o = run(d.path(), &["verify", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (j["corruption"].as_u64(), j["garbage"].as_u64()),
        (Some(0), Some(1)),
        "{j}"
    );
    // With room, gc completes.
    let o = run(d.path(), &["gc"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(String::from_utf8_lossy(&run(d.path(), &["verify"]).stdout).contains("healthy"));
    assert_eq!(contents(d.path()), want);
}

/// Runs `vmm-store` with at most 2 GiB of address space and kills it after 30 s:
/// (exit code, stderr), or None if it had to be killed.
fn run_bounded(store: &Path, args: &[&str]) -> Option<(Option<i32>, String)> {
    let mut c = cmd(store, args);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
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
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    Some((o.status.code(), stderr(&o)))
}

#[test]
fn fifos_and_devices_in_the_store_are_refused_not_read_forever() {
    // A FIFO blocks an open (or read) forever and /dev/zero never ends: every store
    // file that is not a regular file is reported, never read.
    type Plant = (&'static str, fn(&Path));
    let plants: [Plant; 5] = [
        ("FIFO lock", |d| {
            fs::remove_file(d.join("LOCK")).unwrap();
            mkfifo(&d.join("LOCK"))
        }),
        ("FIFO manifest", |d| mkfifo(&d.join("templates/evil.tmpl"))),
        ("FIFO index", |d| {
            mkfifo(&d.join("packs/0000000000000009.idx"))
        }),
        ("/dev/zero index", |d| {
            std::os::unix::fs::symlink("/dev/zero", d.join("packs/0000000000000009.idx")).unwrap()
        }),
        ("/dev/zero config", |d| {
            fs::remove_file(d.join("store.cfg")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join("store.cfg")).unwrap()
        }),
    ];
    for (what, plant) in plants {
        let d = TempDir::new();
        drop(healthy_store(d.path()));
        plant(d.path());
        for args in [&["ls"][..], &["verify"], &["gc", "--dry-run"]] {
            let Some((code, err)) = run_bounded(d.path(), args) else {
                panic!("{what}: {args:?} did not finish in 30 s");
            };
            assert_ne!(code, None, "{what}: {args:?} was killed: {err}");
            if what.contains("config") {
                assert_eq!(code, Some(2), "{what}: {args:?}: {err}");
                assert!(
                    err.contains("not a regular file"),
                    "{what}: {args:?}: {err}"
                );
            }
            if what.contains("manifest") && args[0] != "verify" {
                assert!(err.contains("it is a FIFO"), "{what}: {args:?}: {err}");
            }
        }
    }
}

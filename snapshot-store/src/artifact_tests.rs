//! The compiled-module cache (`artifacts/`) on a real store on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::fixtures::TempDir;
use crate::*;

const ENGINE: &str = "wasmtime-48.0.8";
const OLD_ENGINE: &str = "wasmtime-47.0.0";
const SETTINGS: &str = "x86_64 sse4.2 popcnt; memory reservation 0, guard 0";

/// Deterministic pseudo-random bytes standing in for a compiled module.
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn art_path(s: &Store, key: &ArtifactKey) -> PathBuf {
    s.dir().join("artifacts").join(format!("{key}.art"))
}

fn damage_of(r: Result<Option<Vec<u8>>, ArtifactError>) -> ArtifactDamage {
    match r {
        Err(ArtifactError::Damaged { damage, .. }) => damage,
        Err(e) => panic!("not refused as damaged: {e}"),
        Ok(Some(b)) => panic!("a damaged artifact was returned ({} bytes)", b.len()),
        Ok(None) => panic!("a damaged artifact was reported absent"),
    }
}

fn corruption_at(s: &Store, path: &Path) -> Option<Problem> {
    s.verify()
        .into_iter()
        .find(|p| p.is_corruption() && p.path == path)
}

/// Makes `path` writable (artifacts are 0444) for a test that damages it.
fn writable(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

fn set_mtime(path: &Path, ago: Duration) {
    fs::File::open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

#[test]
fn put_get_round_trip_and_key_parts() {
    let d = TempDir::new();
    let s = Store::create_or_open(d.path()).unwrap();
    let module = b"\0asm\x01\0\0\0 a module";
    let key = ArtifactKey::new(module, ENGINE, SETTINGS);
    assert_eq!(s.get_artifact(&key).unwrap(), None);
    let art = blob(1, 3 << 20);
    s.put_artifact(&key, &art).unwrap();
    assert_eq!(s.get_artifact(&key).unwrap().as_deref(), Some(&art[..]));

    // The key depends on every part; the module hash is the module's SHA-256.
    assert_eq!(
        ArtifactKey::new(b"abc", ENGINE, "").module_sha256(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(key, ArtifactKey::new(module, ENGINE, SETTINGS));
    for other in [
        ArtifactKey::new(b"\0asm\x01\0\0\0 another", ENGINE, SETTINGS),
        ArtifactKey::new(module, OLD_ENGINE, SETTINGS),
        ArtifactKey::new(module, ENGINE, "x86_64 avx2"),
        // Length-prefixed: moving bytes between engine and settings is another key.
        ArtifactKey::new(module, "wasmtime-48.0.8x", &SETTINGS[1..]),
    ] {
        assert_ne!(other.id(), key.id());
        assert_eq!(s.get_artifact(&other).unwrap(), None);
    }

    // Another handle (another process) reads it; the listing shows what it records.
    let s2 = Store::open(d.path()).unwrap();
    assert_eq!(s2.get_artifact(&key).unwrap().as_deref(), Some(&art[..]));
    let l = s2.artifacts().unwrap();
    assert!(l.unreadable.is_empty() && l.temp.is_empty() && l.unknown.is_empty());
    let [a] = &l.artifacts[..] else {
        panic!("{l:?}")
    };
    assert_eq!(a.key, key);
    assert_eq!(a.key.engine(), ENGINE);
    assert_eq!(a.key.settings(), SETTINGS);
    assert_eq!(a.bytes, art.len() as u64);
    assert_eq!(a.file_bytes, fs::metadata(&a.path).unwrap().len());
    assert!(a.file_bytes > a.bytes);
    // Read-only on disk: nothing modifies an artifact in place.
    assert_eq!(
        fs::metadata(&a.path).unwrap().permissions().mode() & 0o222,
        0
    );

    // An empty artifact is an artifact; a new put replaces the old one.
    s.put_artifact(&key, b"").unwrap();
    assert_eq!(s.get_artifact(&key).unwrap(), Some(Vec::new()));
    assert!(s.verify().iter().all(|p| !p.is_corruption()));
}

#[test]
fn put_refuses_what_it_cannot_store_faithfully() {
    let d = TempDir::new();
    let s = Store::create_or_open(d.path()).unwrap();
    let too_big = vec![0u8; MAX_ARTIFACT_BYTES as usize + 1];
    let key = ArtifactKey::new(b"m", ENGINE, SETTINGS);
    assert!(matches!(
        s.put_artifact(&key, &too_big),
        Err(ArtifactError::TooLarge { .. })
    ));
    for key in [
        ArtifactKey::new(b"m", "", SETTINGS),
        ArtifactKey::new(b"m", &"e".repeat(MAX_ENGINE_LEN + 1), SETTINGS),
        ArtifactKey::new(b"m", "wasmtime\n48", SETTINGS),
        ArtifactKey::new(b"m", ENGINE, &"s".repeat(MAX_SETTINGS_LEN + 1)),
    ] {
        let r = s.put_artifact(&key, b"code");
        assert!(matches!(r, Err(ArtifactError::Invalid { .. })), "{r:?}");
    }
    assert!(s.artifacts().unwrap().artifacts.is_empty());
}

/// Bytes this thread has read with read(2) and friends so far.
fn thread_rchar() -> u64 {
    let io = fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn every_kind_of_damage_is_refused_reported_and_replaceable() {
    type Damage = (
        &'static str,
        fn(&Store, &Path, &Path),
        fn(&ArtifactDamage) -> bool,
    );
    let damages: [Damage; 8] = [
        (
            "flipped byte",
            |_, p, _| {
                writable(p);
                let mut b = fs::read(p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x40;
                fs::write(p, b).unwrap();
            },
            |d| *d == ArtifactDamage::Checksum,
        ),
        (
            "flipped byte in the recorded engine",
            |_, p, _| {
                writable(p);
                let mut b = fs::read(p).unwrap();
                b[100] ^= 1;
                fs::write(p, b).unwrap();
            },
            |d| *d == ArtifactDamage::Checksum,
        ),
        (
            "truncated",
            |_, p, _| {
                writable(p);
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len - 1000).unwrap();
            },
            |d| matches!(d, ArtifactDamage::Length { .. }),
        ),
        (
            "another key's artifact under its name",
            |_, p, other| {
                fs::remove_file(p).unwrap();
                fs::copy(other, p).unwrap();
            },
            |d| matches!(d, ArtifactDamage::WrongKey { .. }),
        ),
        (
            "copied from another store",
            |_, p, _| {
                let d2 = TempDir::new();
                let s2 = Store::create_or_open(d2.path()).unwrap();
                let name = p.file_name().unwrap().to_str().unwrap();
                let key = ArtifactKey::new(b"\0asm module one", ENGINE, SETTINGS);
                assert_eq!(format!("{key}.art"), name);
                s2.put_artifact(&key, &blob(1, 1 << 20)).unwrap();
                fs::remove_file(p).unwrap();
                fs::copy(d2.path().join("artifacts").join(name), p).unwrap();
            },
            |d| *d == ArtifactDamage::Checksum,
        ),
        (
            "not an artifact",
            |_, p, _| {
                fs::remove_file(p).unwrap();
                fs::write(p, b"#!/bin/sh\necho hello\n".repeat(100)).unwrap();
            },
            |d| matches!(d, ArtifactDamage::Header { .. }),
        ),
        (
            "FIFO",
            |_, p, _| {
                fs::remove_file(p).unwrap();
                let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
                // SAFETY: c is a valid NUL-terminated path.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
            },
            |d| matches!(d, ArtifactDamage::NotRegular { what } if what.contains("FIFO")),
        ),
        (
            "link to /dev/zero",
            |_, p, _| {
                fs::remove_file(p).unwrap();
                std::os::unix::fs::symlink("/dev/zero", p).unwrap();
            },
            |d| matches!(d, ArtifactDamage::NotRegular { what } if what.contains("device")),
        ),
    ];
    for (what, damage, kind) in damages {
        let d = TempDir::new();
        let s = Store::create_or_open(d.path()).unwrap();
        let key = ArtifactKey::new(b"\0asm module one", ENGINE, SETTINGS);
        let other = ArtifactKey::new(b"\0asm module two", ENGINE, SETTINGS);
        let art = blob(1, 1 << 20);
        s.put_artifact(&key, &art).unwrap();
        s.put_artifact(&other, &blob(2, 1 << 20)).unwrap();
        let p = art_path(&s, &key);
        damage(&s, &p, &art_path(&s, &other));

        let got = damage_of(s.get_artifact(&key));
        assert!(kind(&got), "{what}: refused as {got:?}");
        let prob = corruption_at(&s, &p).unwrap_or_else(|| panic!("{what}: verify is silent"));
        assert!(prob.what.contains("damaged"), "{what}: {prob}");
        // The undamaged one is untouched by it.
        assert!(s.get_artifact(&other).unwrap().is_some(), "{what}");
        // The caller compiles again and stores the result over it.
        s.put_artifact(&key, &art).unwrap();
        assert_eq!(
            s.get_artifact(&key).unwrap().as_deref(),
            Some(&art[..]),
            "{what}"
        );
        assert!(corruption_at(&s, &p).is_none(), "{what}");
    }
}

#[test]
fn an_oversize_file_is_refused_before_it_is_read() {
    let d = TempDir::new();
    let s = Store::create_or_open(d.path()).unwrap();
    let key = ArtifactKey::new(b"m", ENGINE, SETTINGS);
    s.put_artifact(&key, &blob(3, 4096)).unwrap();
    let p = art_path(&s, &key);
    writable(&p);
    // A sparse file one byte over the limit: no disk space, but 256 MiB to read.
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(MAX_ARTIFACT_FILE_BYTES + 1)
        .unwrap();
    let before = thread_rchar();
    let got = damage_of(s.get_artifact(&key));
    let read = thread_rchar() - before;
    assert!(
        matches!(got, ArtifactDamage::Oversize { len, max } if len == MAX_ARTIFACT_FILE_BYTES + 1 && max == MAX_ARTIFACT_FILE_BYTES),
        "{got:?}"
    );
    assert!(read < 1 << 20, "read {read} bytes of an oversize artifact");
    assert!(corruption_at(&s, &p).is_some());
    assert!(matches!(
        &s.artifacts().unwrap().unreadable[..],
        [(
            _,
            ArtifactError::Damaged {
                damage: ArtifactDamage::Oversize { .. },
                ..
            }
        )]
    ));
}

#[test]
fn concurrent_puts_of_one_key_all_succeed_and_readers_see_whole_artifacts() {
    let d = TempDir::new();
    drop(Store::create_or_open(d.path()).unwrap());
    let key = ArtifactKey::new(b"\0asm the reactor", ENGINE, SETTINGS);
    // Two compilations need not be byte-identical: either is a valid artifact.
    let versions: Arc<[Vec<u8>; 2]> = Arc::new([blob(10, 3 << 20), blob(11, 3 << 20)]);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, key, versions, done) = (d.0.clone(), key.clone(), versions.clone(), done.clone());
        std::thread::spawn(move || {
            let s = Store::open(&dir).unwrap();
            let mut seen = 0;
            while !done.load(Ordering::Relaxed) {
                match s.get_artifact(&key) {
                    Ok(None) => {}
                    Ok(Some(b)) => {
                        assert!(versions.contains(&b), "a reader saw a mixed artifact");
                        seen += 1;
                    }
                    Err(e) => panic!("a reader saw a partial artifact: {e}"),
                }
            }
            seen
        })
    };
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (dir, key, versions) = (d.0.clone(), key.clone(), versions.clone());
            std::thread::spawn(move || {
                // Each its own handle, as two processes would have.
                let s = Store::open(&dir).unwrap();
                for _ in 0..15 {
                    s.put_artifact(&key, &versions[w]).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let seen = reader.join().unwrap();
    let s = Store::open(d.path()).unwrap();
    eprintln!("the reader saw {seen} whole artifacts");
    let got = s.get_artifact(&key).unwrap().unwrap();
    assert!(versions.contains(&got));
    let l = s.artifacts().unwrap();
    assert_eq!(l.artifacts.len(), 1);
    assert!(l.temp.is_empty(), "temp files left: {:?}", l.temp);
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
}

/// A pid no process has (a child that has been reaped).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn a_writer_killed_before_its_rename_leaves_only_a_temp_file() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(d.path()).unwrap();
    let key = ArtifactKey::new(b"m", ENGINE, SETTINGS);
    s.fail_at = Some("artifact-before-rename");
    assert!(s.put_artifact(&key, &blob(4, 1 << 20)).is_err());
    s.fail_at = None;
    assert_eq!(s.get_artifact(&key).unwrap(), None);
    let l = s.artifacts().unwrap();
    let [(tmp, pid, alive)] = &l.temp[..] else {
        panic!("{l:?}")
    };
    assert_eq!((*pid, *alive), (std::process::id(), true));
    // A live writer's temp file is neither garbage nor collected.
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    let r = s.gc_artifacts(&ArtifactGcPolicy::default(), false).unwrap();
    assert!(r.removed.is_empty() && tmp.exists());

    // Once its writer is gone, it is garbage and gc removes it.
    let name = tmp.file_name().unwrap().to_str().unwrap();
    let dead = tmp.with_file_name(name.replace(
        &format!(".{}.", std::process::id()),
        &format!(".{}.", dead_pid()),
    ));
    fs::rename(tmp, &dead).unwrap();
    let v = s.verify();
    assert!(
        v.iter().any(|p| !p.is_corruption() && p.path == dead),
        "{v:#?}"
    );
    let r = s.gc_artifacts(&ArtifactGcPolicy::default(), false).unwrap();
    assert_eq!(r.removed.len(), 1);
    assert_eq!(r.removed[0].reason, ArtifactGcReason::DeadTemp);
    assert!(!dead.exists());
    assert!(s.verify().is_empty());
}

#[test]
fn gc_policy_stale_engines_unused_and_all() {
    let d = TempDir::new();
    let s = Store::create_or_open(d.path()).unwrap();
    let cur = ArtifactKey::new(b"m1", ENGINE, SETTINGS);
    let cur_old_use = ArtifactKey::new(b"m2", ENGINE, SETTINGS);
    let stale = ArtifactKey::new(b"m1", OLD_ENGINE, SETTINGS);
    let damaged = ArtifactKey::new(b"m3", ENGINE, SETTINGS);
    for (i, k) in [&cur, &cur_old_use, &stale, &damaged].iter().enumerate() {
        s.put_artifact(k, &blob(i as u64, 64 << 10)).unwrap();
    }
    let dp = art_path(&s, &damaged);
    writable(&dp);
    let mut b = fs::read(&dp).unwrap();
    b[5000] ^= 1;
    fs::write(&dp, b).unwrap();
    set_mtime(&art_path(&s, &cur_old_use), Duration::from_secs(10 * 86400));
    let snapshot = || {
        let mut v: Vec<_> = fs::read_dir(d.path().join("artifacts"))
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        v.sort();
        v
    };
    let present = |k: &ArtifactKey| art_path(&s, k).exists();
    let reasons = |r: &ArtifactGcReport| {
        let mut v: Vec<(String, ArtifactGcReason)> = r
            .removed
            .iter()
            .map(|x| {
                (
                    x.path.file_name().unwrap().to_string_lossy().into(),
                    x.reason.clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let name = |k: &ArtifactKey| format!("{k}.art");

    // Dry runs report and change nothing.
    let before = snapshot();
    let policy = ArtifactGcPolicy {
        current_engines: Some(vec![ENGINE.into()]),
        unused_for: Some(Duration::from_secs(7 * 86400)),
        all: false,
    };
    let r = s.gc_artifacts(&policy, true).unwrap();
    assert!(r.dry_run);
    let mut want = vec![
        (name(&cur_old_use), ArtifactGcReason::Unused),
        (name(&stale), ArtifactGcReason::Stale),
        (
            name(&damaged),
            ArtifactGcReason::Damaged(ArtifactDamage::Checksum),
        ),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(reasons(&r), want);
    assert_eq!(snapshot(), before);

    // Default: only the damaged one goes; every valid artifact is the cache.
    let r = s.gc_artifacts(&ArtifactGcPolicy::default(), false).unwrap();
    assert_eq!(
        reasons(&r),
        vec![(
            name(&damaged),
            ArtifactGcReason::Damaged(ArtifactDamage::Checksum)
        )]
    );
    assert_eq!(r.kept, 3);
    assert!(!present(&damaged) && present(&cur) && present(&stale) && present(&cur_old_use));

    // A current engine list: the other engine's artifacts are stale.
    let only_engines = ArtifactGcPolicy {
        current_engines: Some(vec![ENGINE.into()]),
        ..ArtifactGcPolicy::default()
    };
    let r = s.gc_artifacts(&only_engines, false).unwrap();
    assert_eq!(reasons(&r), vec![(name(&stale), ArtifactGcReason::Stale)]);
    assert_eq!(r.removed[0].engine.as_deref(), Some(OLD_ENGINE));
    assert!(!present(&stale) && present(&cur) && present(&cur_old_use));

    // Using an artifact makes it recent again: the age counts from the last use.
    assert!(s.get_artifact(&cur_old_use).unwrap().is_some());
    let unused = ArtifactGcPolicy {
        unused_for: Some(Duration::from_secs(7 * 86400)),
        ..ArtifactGcPolicy::default()
    };
    assert!(s.gc_artifacts(&unused, false).unwrap().removed.is_empty());
    set_mtime(&art_path(&s, &cur_old_use), Duration::from_secs(8 * 86400));
    let r = s.gc_artifacts(&unused, false).unwrap();
    assert_eq!(
        reasons(&r),
        vec![(name(&cur_old_use), ArtifactGcReason::Unused)]
    );
    assert!(present(&cur));
    assert_eq!(s.get_artifact(&cur).unwrap().unwrap(), blob(0, 64 << 10));

    let all = ArtifactGcPolicy {
        all: true,
        ..ArtifactGcPolicy::default()
    };
    let r = s.gc_artifacts(&all, false).unwrap();
    assert_eq!(reasons(&r), vec![(name(&cur), ArtifactGcReason::All)]);
    assert!(s.artifacts().unwrap().artifacts.is_empty());
}

#[test]
fn a_read_marks_the_artifact_used_without_rewriting_it() {
    let d = TempDir::new();
    let s = Store::create_or_open(d.path()).unwrap();
    let key = ArtifactKey::new(b"m", ENGINE, SETTINGS);
    let now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let put_at = now();
    s.put_artifact(&key, &blob(5, 1 << 16)).unwrap();
    let put_done = now();
    let p = art_path(&s, &key);
    set_mtime(&p, Duration::from_secs(30 * 86400));
    let info = || s.artifacts().unwrap().artifacts.remove(0);
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let old = info();
    let ino = fs::metadata(&p).unwrap();
    let t0 = ms(SystemTime::now());
    assert!(old.last_used_unix_ms + 29 * 86_400_000 < t0, "{old:?}");
    assert!(
        old.created_unix_ms >= put_at && old.created_unix_ms <= put_done,
        "{old:?}"
    );
    s.get_artifact(&key).unwrap().unwrap();
    let new = info();
    assert!(new.last_used_unix_ms >= t0, "{new:?} vs {t0}");
    assert_eq!(new.created_unix_ms, old.created_unix_ms);
    let after = fs::metadata(&p).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((after.ino(), after.len()), (ino.ino(), ino.len()));
}

#[test]
fn a_new_store_directory_may_hold_an_empty_artifact_directory() {
    // What an interrupted creation can leave is not "a directory that is not a store".
    let d = TempDir::new();
    fs::create_dir_all(d.path().join("artifacts")).unwrap();
    let s = Store::create_or_open(d.path()).unwrap();
    assert!(s.artifacts().unwrap().artifacts.is_empty());
}

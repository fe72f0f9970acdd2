use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::fixtures::*;
use crate::format;
use crate::*;

fn corruptions(store: &Store) -> Vec<Problem> {
    store
        .verify()
        .into_iter()
        .filter(|p| p.is_corruption())
        .collect()
}

fn assert_healthy(store: &Store) {
    let c = corruptions(store);
    assert!(c.is_empty(), "unexpected corruption: {c:#?}");
}

fn check_fn(store: &mut Store) {
    let t = store.load("fn").unwrap();
    assert_eq!(t.parent.as_ref().map(|p| p.as_str()), Some("base"));
    assert_eq!(t.vcpu_state, b"vcpu-fn");
    assert_eq!(t.working_set, vec![4, 3, 9]);
    let r = t.resolve(store).unwrap();
    assert_eq!(r.layers().len(), 2);
    for i in 0..64u64 {
        let want = match i {
            3 => Some(page(103)),
            4 => Some(page(104)),
            5 => None,
            0..10 => Some(page(i)),
            _ => None,
        };
        match (r.frame(i).unwrap(), want) {
            (Frame::Zero, None) => {}
            (Frame::Data(b), Some(w)) => assert_eq!(b, &w, "frame {i}"),
            (got, want) => panic!("frame {i}: got {got:?}, want {:?}", want.map(|_| "data")),
        }
    }
    assert!(r.frame(64).is_none());
    let mut guest = vec![0xAAu8; MEM as usize];
    r.copy_to(&mut guest).unwrap();
    assert_eq!(&guest[3 * PAGE_SIZE..4 * PAGE_SIZE], &page(103)[..]);
    assert!(guest[5 * PAGE_SIZE..6 * PAGE_SIZE].iter().all(|&b| b == 0));
}

#[test]
fn round_trip_with_parent() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    check_fn(&mut s);
    let base = s.load("base").unwrap();
    assert_eq!(base.device_state, b"dev-base");
    assert_eq!(base.resolve(&s).unwrap().nonzero_frames(), 10);
    // Reopen from disk.
    drop(s);
    let mut s = Store::open(&d.0).unwrap();
    check_fn(&mut s);
    let names: Vec<String> = s
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name.to_string())
        .collect();
    assert_eq!(names, ["base", "fn"]);
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    // Existing name is refused unless replacing.
    let e = s
        .begin_template("base", None, MEM)
        .unwrap()
        .commit()
        .unwrap_err();
    assert!(matches!(e, WriteError::AlreadyExists { .. }), "{e}");
    let mut w = s.begin_template_replacing("fn", Some("base"), MEM).unwrap();
    w.put_page(0, &page(7)).unwrap();
    w.commit().unwrap();
    let t = s.load("fn").unwrap();
    assert_eq!(t.resolve(&s).unwrap().frame(3), Some(Frame::Data(&page(3))));
}

#[test]
fn open_missing_store_and_bad_names() {
    let d = TempDir::new();
    assert!(matches!(
        Store::open(&d.0),
        Err(OpenError::NotAStore { .. })
    ));
    let mut s = Store::create_or_open(&d.0).unwrap();
    assert!(s.begin_template("../x", None, MEM).is_err());
    assert!(s.begin_template("", None, MEM).is_err());
    assert!(matches!(
        s.begin_template("a", None, 100),
        Err(WriteError::BadMemSize { .. })
    ));
    let e = s.begin_template("a", Some("nope"), MEM).err().unwrap();
    assert!(e.to_string().contains("nope"), "{e}");
    let mut w = s.begin_template("a", None, MEM).unwrap();
    assert!(matches!(
        w.put_page(64, &page(1)),
        Err(WriteError::FrameOutOfRange { .. })
    ));
    w.set_working_set(vec![64]);
    assert!(matches!(
        w.commit(),
        Err(WriteError::WorkingSetOutOfRange { .. })
    ));
    let e = s.load("missing").unwrap_err();
    assert!(matches!(e, LoadError::NotFound { .. }), "{e}");
}

#[test]
fn dedup_across_templates() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    let mut mem = vec![0u8; MEM as usize];
    for i in 0..40 {
        mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&page(i as u64));
    }
    let mut w = s.begin_template("a", None, MEM).unwrap();
    w.put_memory(0, &mem).unwrap();
    let c1 = w.commit().unwrap();
    assert_eq!(c1.new_pages, 40);
    let packs_after_a = s.stats().unwrap().physical_bytes;
    // Second, independent template with the same memory except one page.
    mem[..PAGE_SIZE].copy_from_slice(&page(999));
    let mut w = s.begin_template("b", None, MEM).unwrap();
    w.put_memory(0, &mem).unwrap();
    let c2 = w.commit().unwrap();
    assert_eq!(c2.new_pages, 1);
    assert_eq!(c2.reused_pages, 39);
    let st = s.stats().unwrap();
    assert_eq!(st.stored_pages, 41);
    assert!(
        st.physical_bytes - packs_after_a < 3 * PAGE_SIZE as u64,
        "{st:?}"
    );
    assert_eq!(st.logical_nonzero_bytes, 80 * PAGE_SIZE as u64);
    assert_eq!(st.logical_bytes, 2 * MEM);
    let b = st
        .templates
        .iter()
        .find(|t| t.name.as_str() == "b")
        .unwrap();
    assert_eq!(b.unique_bytes, PAGE_SIZE as u64);
    // Duplicates inside one template are stored once too.
    let mut w = s.begin_template("c", None, MEM).unwrap();
    for f in 0..10 {
        w.put_page(f, &page(5000)).unwrap();
    }
    assert_eq!(w.commit().unwrap().new_pages, 1);
    assert_healthy(&s);
}

#[test]
fn zero_pages_not_stored() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    let mut w = s.begin_template("z", None, MEM).unwrap();
    w.put_memory(0, &vec![0u8; MEM as usize]).unwrap();
    let c = w.commit().unwrap();
    assert_eq!(c.new_pages, 0);
    assert_eq!(c.info.own_pages, 0);
    assert_eq!(s.page_count(), 0);
    let packs: Vec<_> = fs::read_dir(d.0.join("packs")).unwrap().collect();
    assert!(packs.is_empty());
    let r = s.load("z").unwrap().resolve(&s).unwrap();
    assert_eq!(r.nonzero_frames(), 0);
    // A zero page over a parent's data frame is an explicit zero.
    let mut w = s.begin_template("base", None, MEM).unwrap();
    w.put_page(1, &page(1)).unwrap();
    w.commit().unwrap();
    let mut w = s.begin_template("child", Some("base"), MEM).unwrap();
    w.put_page(1, &[0u8; PAGE_SIZE]).unwrap();
    let c = w.commit().unwrap();
    assert_eq!((c.new_pages, c.info.zero_frames), (0, 1));
    let r = s.load("child").unwrap().resolve(&s).unwrap();
    assert_eq!(r.frame(1), Some(Frame::Zero));
}

#[test]
fn collision_stored_apart() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    s.hasher.force = Some(0x42); // every page "hashes" the same
    let mut w = s.begin_template("a", None, MEM).unwrap();
    w.put_page(0, &page(1)).unwrap();
    w.put_page(1, &page(2)).unwrap();
    w.put_page(2, &page(1)).unwrap();
    let c = w.commit().unwrap();
    assert_eq!(c.new_pages, 2);
    let t = s.load("a").unwrap();
    let ids: Vec<PageId> = t.own_pages().map(|(_, id)| id).collect();
    assert_eq!(ids[0].hash(), ids[1].hash());
    assert_ne!(ids[0], ids[1]);
    assert_eq!(ids[0], ids[2]);
    let r = t.resolve(&s).unwrap();
    assert_eq!(r.frame(0), Some(Frame::Data(&page(1))));
    assert_eq!(r.frame(1), Some(Frame::Data(&page(2))));
    // Across commits: an existing colliding page is reused, a third distinct one gets slot 2.
    let mut w = s.begin_template("b", None, MEM).unwrap();
    w.put_page(0, &page(2)).unwrap();
    w.put_page(1, &page(3)).unwrap();
    let c = w.commit().unwrap();
    assert_eq!((c.new_pages, c.reused_pages), (1, 1));
    let t = s.load("b").unwrap();
    let slots: Vec<u32> = t.own_pages().map(|(_, id)| id.slot()).collect();
    assert_eq!(slots, [1, 2]);
    assert_eq!(t.resolve(&s).unwrap().frame(1), Some(Frame::Data(&page(3))));
    assert_healthy(&s);
}

#[test]
fn torn_tail_and_temp_garbage_tolerated() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    drop(s);
    // A writer killed mid-append: one and a half unindexed pages at the tail.
    let pack = d.0.join("packs/0000000000000001.pack");
    let len = fs::metadata(&pack).unwrap().len();
    let mut junk = page(77).to_vec();
    junk.extend_from_slice(&page(78)[..2000]);
    let mut bytes = fs::read(&pack).unwrap();
    bytes.extend_from_slice(&junk);
    fs::write(&pack, &bytes).unwrap();
    fs::write(d.0.join("tmp/fn.tmpl.123.0.tmp"), b"half a manifest").unwrap();
    fs::write(d.0.join("packs/0000000000000002.pack"), &page(5)[..100]).unwrap();

    let mut s = Store::open(&d.0).unwrap();
    let probs = s.verify();
    assert!(probs.iter().all(|p| !p.is_corruption()), "{probs:#?}");
    assert!(
        probs.iter().any(|p| p.what.contains("unindexed bytes")),
        "{probs:#?}"
    );
    assert!(
        probs.iter().any(|p| p.what.contains("temp file")),
        "{probs:#?}"
    );
    assert!(
        probs.iter().any(|p| p.what.contains("no index")),
        "{probs:#?}"
    );
    check_fn(&mut s);
    // The next write removes the temp files but truncates nothing: the orphan
    // pack 2 and pack 1's tail may hold pages that templates need (a lost or
    // stale index looks the same), so it starts pack 3 and leaves them to gc.
    let mut w = s.begin_template("more", Some("fn"), MEM).unwrap();
    w.put_page(20, &page(20)).unwrap();
    w.commit().unwrap();
    assert_eq!(fs::metadata(&pack).unwrap().len(), len + junk.len() as u64);
    let p2 = d.0.join("packs/0000000000000002.pack");
    assert_eq!(fs::metadata(&p2).unwrap().len(), 100);
    let p3 = d.0.join("packs/0000000000000003.pack");
    assert_eq!(fs::metadata(&p3).unwrap().len(), PAGE_SIZE as u64);
    let probs = s.verify();
    assert!(probs.iter().all(|p| !p.is_corruption()), "{probs:#?}");
    assert!(
        !probs.iter().any(|p| p.what.contains("temp file")),
        "{probs:#?}"
    );
    check_fn(&mut s);
    assert_eq!(
        s.load("more").unwrap().resolve(&s).unwrap().frame(20),
        Some(Frame::Data(&page(20)))
    );
    // gc, which checks the manifests, reclaims both.
    let rep = s.gc(false).unwrap();
    assert_eq!(rep.tail_bytes, junk.len() as u64, "{rep:?}");
    assert_eq!(rep.packs_deleted, 1, "{rep:?}");
    assert!(!p2.exists());
    assert_eq!(fs::metadata(&pack).unwrap().len(), len);
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    check_fn(&mut s);
}

#[test]
fn torn_tail_left_to_gc_next_write_starts_a_new_pack() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    let pack = d.0.join("packs/0000000000000001.pack");
    let len = fs::metadata(&pack).unwrap().len();
    let mut bytes = fs::read(&pack).unwrap();
    bytes.extend_from_slice(&page(1)[..1234]);
    fs::write(&pack, &bytes).unwrap();
    let mut w = s.begin_template("x", None, MEM).unwrap();
    w.put_page(0, &page(4242)).unwrap();
    w.commit().unwrap();
    assert_eq!(fs::metadata(&pack).unwrap().len(), len + 1234);
    let p2 = d.0.join("packs/0000000000000002.pack");
    assert_eq!(fs::metadata(&p2).unwrap().len(), PAGE_SIZE as u64);
    let probs = s.verify();
    assert!(
        probs.len() == 1 && probs[0].what.contains("unindexed bytes"),
        "{probs:#?}"
    );
    assert_eq!(s.gc(false).unwrap().tail_bytes, 1234);
    assert_eq!(fs::metadata(&pack).unwrap().len(), len);
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
}

#[test]
fn writer_killed_at_any_step_leaves_usable_store() {
    for step in [
        "locked",
        "mid-append",
        "after-pack-sync",
        "before-idx-rename",
        "after-idx",
        "before-manifest-rename",
    ] {
        let d = TempDir::new();
        let mut s = Store::create_or_open(&d.0).unwrap();
        make_base_and_fn(&mut s);
        s.fail_at = Some(step);
        let mut w = s.begin_template("new", Some("fn"), MEM).unwrap();
        for i in 0..8 {
            w.put_page(30 + i, &page(300 + i)).unwrap();
        }
        let e = w.commit().unwrap_err();
        assert!(matches!(e, WriteError::Injected(_)), "{step}: {e}");
        drop(s);
        let mut s = Store::open(&d.0).unwrap();
        assert_healthy(&s);
        check_fn(&mut s);
        assert!(
            matches!(s.load("new"), Err(LoadError::NotFound { .. })),
            "{step}"
        );
        // And the store keeps working.
        let mut w = s.begin_template("new", Some("fn"), MEM).unwrap();
        for i in 0..8 {
            w.put_page(30 + i, &page(300 + i)).unwrap();
        }
        w.commit().unwrap();
        let r = s.load("new").unwrap();
        let r = r.resolve(&s).unwrap();
        assert_eq!(r.frame(33), Some(Frame::Data(&page(303))), "{step}");
        let probs = s.verify();
        assert!(
            probs.iter().all(|p| !p.is_corruption()),
            "{step}: {probs:#?}"
        );
        // What the killed writer left (a torn tail, unindexed pages) is garbage gc reclaims.
        s.gc(false).unwrap();
        assert!(s.verify().is_empty(), "{step}: {:#?}", s.verify());
        let r = s.load("new").unwrap();
        let r = r.resolve(&s).unwrap();
        assert_eq!(r.frame(33), Some(Frame::Data(&page(303))), "{step}");
        check_fn(&mut s);
    }
}

fn store_with_fixture(damage: impl FnOnce(&Path)) -> (TempDir, Store) {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    assert!(s.verify().is_empty());
    drop(s);
    damage(&d.0);
    let s = Store::open(&d.0).unwrap();
    (d, s)
}

fn expect_problem(s: &Store, needle: &str) {
    let c = corruptions(s);
    assert!(
        c.iter()
            .any(|p| p.what.contains(needle) || p.to_string().contains(needle)),
        "no corruption mentioning {needle:?}: {c:#?}"
    );
    for p in &c {
        assert!(!p.hint.is_empty());
    }
}

#[test]
fn damaged_truncated_pack() {
    let (_d, s) = store_with_fixture(truncated_pack);
    expect_problem(&s, "truncated");
    // Resolving a template that needs the lost page fails clearly instead of faulting.
    let t = s.load("fn").unwrap();
    let e = t.resolve(&s).err().unwrap();
    assert!(matches!(e, LoadError::PageMissing { .. }), "{e}");
}

#[test]
fn damaged_flipped_bit() {
    let (_d, s) = store_with_fixture(flipped_bit);
    expect_problem(&s, "is damaged");
    expect_problem(&s, "missing or damaged");
}

#[test]
fn damaged_manifest_checksum() {
    let (d, s) = store_with_fixture(bad_manifest_checksum);
    expect_problem(&s, "checksum mismatch");
    let e = s.load("fn").unwrap_err();
    assert!(
        e.to_string()
            .contains(&d.0.join("templates/fn.tmpl").display().to_string()),
        "{e}"
    );
}

#[test]
fn damaged_missing_parent() {
    let (_d, s) = store_with_fixture(missing_parent);
    expect_problem(&s, "parent template base does not exist");
    let e = s.load("fn").unwrap().resolve(&s).err().unwrap();
    assert!(matches!(e, LoadError::MissingParent { .. }), "{e}");
}

#[test]
fn damaged_index_entry_past_end() {
    let (_d, s) = store_with_fixture(index_entry_past_end);
    expect_problem(&s, "past the end of its pack");
}

#[test]
fn damaged_future_format_version() {
    let (_d, s) = store_with_fixture(future_format_version);
    expect_problem(&s, "format version 7");
    let e = s.load("fn").unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::Manifest(ManifestError::FutureVersion { found: 7, .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade"), "{e}");
}

#[test]
fn damaged_parent_cycle() {
    let (_d, s) = store_with_fixture(parent_cycle);
    expect_problem(&s, "cycle");
    let e = s.load("fn").unwrap().resolve(&s).err().unwrap();
    assert!(matches!(e, LoadError::ParentCycle { .. }), "{e}");
    assert!(e.to_string().contains("fn -> base -> fn"), "{e}");
}

#[test]
fn damaged_working_set_outside_ram() {
    let (_d, s) = store_with_fixture(working_set_outside_ram);
    expect_problem(&s, "working set frame");
}

#[test]
fn decoders_never_panic() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    let p = d.0.join("templates/fn.tmpl");
    let good = fs::read(&p).unwrap();
    let path = Path::new("x");
    for cut in 0..good.len() {
        assert!(format::decode_manifest(path, &good[..cut]).is_err());
    }
    // Valid header + checksum over hostile payloads (huge length prefixes).
    let mut hostile: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
    ];
    let mut x = 1u64;
    for _ in 0..2000 {
        let mut b = good[format::MAN_HEADER..].to_vec();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
        }
        hostile.push(b);
    }
    for payload in hostile {
        let mut f = good[..format::MAN_HEADER].to_vec();
        f[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        f[20..36].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&payload).to_le_bytes());
        f.extend_from_slice(&payload);
        let _ = format::decode_manifest(path, &f);
    }
    let idx = fs::read(d.0.join("packs/0000000000000001.idx")).unwrap();
    for cut in 0..idx.len() {
        let _ = format::decode_idx(path, PackId::new(1), &idx[..cut]);
    }
}

#[test]
fn concurrent_writers() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dir = d.0.clone();
            std::thread::spawn(move || {
                let mut s = Store::open(&dir).unwrap();
                let mut w = s
                    .begin_template(&format!("t{t}"), Some("base"), MEM)
                    .unwrap();
                for f in 10..50 {
                    // Frames 10..30 identical across threads, the rest distinct.
                    let seed = if f < 30 {
                        1000 + f
                    } else {
                        10_000 * (t + 1) + f
                    };
                    w.put_page(f, &page(seed)).unwrap();
                }
                w.commit().unwrap()
            })
        })
        .collect();
    let infos: Vec<CommitInfo> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let new_total: u64 = infos.iter().map(|c| c.new_pages).sum();
    assert_eq!(
        new_total,
        20 + 4 * 20,
        "shared pages stored once: {infos:?}"
    );
    let s = Store::open(&d.0).unwrap();
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    for t in 0..4u64 {
        let tpl = s.load(&format!("t{t}")).unwrap();
        let r = tpl.resolve(&s).unwrap();
        assert_eq!(r.frame(45), Some(Frame::Data(&page(10_000 * (t + 1) + 45))));
        assert_eq!(r.frame(15), Some(Frame::Data(&page(1015))));
        assert_eq!(r.frame(2), Some(Frame::Data(&page(2))));
    }
    assert_eq!(s.list().unwrap().len(), 6);
}

#[test]
fn concurrent_writers_separate_processes() {
    // Re-run this test binary as child processes writing into one store.
    if let Ok(dir) = std::env::var("SNAPSHOT_STORE_CHILD_DIR") {
        let t: u64 = std::env::var("SNAPSHOT_STORE_CHILD_N")
            .unwrap()
            .parse()
            .unwrap();
        let mut s = Store::open(&dir).unwrap();
        let mut w = s
            .begin_template(&format!("p{t}"), Some("base"), MEM)
            .unwrap();
        for f in 10..40 {
            w.put_page(
                f,
                &page(if f < 20 {
                    7000 + f
                } else {
                    70_000 * (t + 1) + f
                }),
            )
            .unwrap();
        }
        w.commit().unwrap();
        return;
    }
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|t| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "tests::concurrent_writers_separate_processes",
                    "--nocapture",
                ])
                .env("SNAPSHOT_STORE_CHILD_DIR", &d.0)
                .env("SNAPSHOT_STORE_CHILD_N", t.to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    for t in 0..3u64 {
        let tpl = s.load(&format!("p{t}")).unwrap();
        let r = tpl.resolve(&s).unwrap();
        assert_eq!(r.frame(25), Some(Frame::Data(&page(70_000 * (t + 1) + 25))));
    }
    assert_eq!(s.stats().unwrap().stored_pages, 10 + 2 + 10 + 3 * 20);
}

#[test]
fn remove_refuses_with_children() {
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    make_base_and_fn(&mut s);
    let e = s.remove("base").unwrap_err();
    assert!(
        matches!(&e, RemoveError::HasChildren { children, .. } if children.len() == 1),
        "{e}"
    );
    assert!(e.to_string().contains("fn"), "{e}");
    s.remove("fn").unwrap();
    s.remove("base").unwrap();
    assert!(matches!(
        s.remove("base"),
        Err(RemoveError::NotFound { .. })
    ));
    assert!(s.list().unwrap().is_empty());
    let probs = s.verify();
    assert!(probs.iter().all(|p| !p.is_corruption()));
    assert!(
        probs
            .iter()
            .any(|p| p.what.contains("referenced by no template")),
        "{probs:#?}"
    );
}

#[test]
fn secret_is_random_per_store() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let sa = Store::create_or_open(&a.0).unwrap();
    let sb = Store::create_or_open(&b.0).unwrap();
    assert_ne!(sa.hash_page(&page(1)), sb.hash_page(&page(1)));
    assert_eq!(
        sa.hash_page(&page(1)),
        Store::open(&a.0).unwrap().hash_page(&page(1))
    );
}

/// `cargo test -p snapshot-store --release -- --ignored --nocapture throughput`
#[test]
#[ignore]
fn throughput() {
    const N: u64 = 65536;
    let d = TempDir::new();
    let mut s = Store::create_or_open(&d.0).unwrap();
    let mem_size = N * PAGE_SIZE as u64;
    let mut mem = vec![0u8; mem_size as usize];
    for i in 0..N as usize {
        mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&page(i as u64 + 1));
    }
    let t0 = Instant::now();
    let mut w = s.begin_template("big", None, mem_size).unwrap();
    w.put_memory(0, &mem).unwrap();
    let t_put = t0.elapsed();
    w.commit().unwrap();
    let t_commit = t0.elapsed();
    let t1 = Instant::now();
    let mut w = s.begin_template("big2", None, mem_size).unwrap();
    w.put_memory(0, &mem).unwrap();
    w.commit().unwrap();
    let t_dedup = t1.elapsed();
    let t2 = Instant::now();
    let t = s.load("big").unwrap();
    let r = t.resolve(&s).unwrap();
    let t_resolve = t2.elapsed();
    let mut guest = vec![1u8; mem_size as usize]; // pre-faulted, like populated guest RAM
    let t4 = Instant::now();
    r.copy_to(&mut guest).unwrap();
    let t_copy = t4.elapsed();
    let t4 = Instant::now();
    r.copy_to(&mut guest).unwrap();
    let t_copy2 = t4.elapsed();
    let t_load = t_resolve + t_copy;
    assert!(guest == mem);
    let t3 = Instant::now();
    assert!(s.verify().is_empty());
    let t_verify = t3.elapsed();
    let mib = mem_size as f64 / (1 << 20) as f64;
    println!(
        "{N} pages ({mib} MiB): put+hash {t_put:?} ({:.0} MiB/s), put+commit {t_commit:?} ({:.0} MiB/s), \
         fully-deduped template {t_dedup:?}, load+resolve {t_resolve:?}, load+resolve+copy {t_load:?} ({:.0} MiB/s; copy {t_copy:?}, warm copy {t_copy2:?}), verify {t_verify:?}",
        mib / t_put.as_secs_f64(),
        mib / t_commit.as_secs_f64(),
        mib / t_load.as_secs_f64()
    );
}

fn resolved_bytes(s: &mut Store, name: &str) -> Vec<u8> {
    let t = s.load(name).unwrap();
    let r = t.resolve(s).unwrap();
    let mut g = vec![0u8; r.mem_size() as usize];
    r.copy_to(&mut g).unwrap();
    g
}

#[test]
fn set_working_set_rewrites_only_the_working_set() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let before = s.load("fn").unwrap();
    let bytes = resolved_bytes(&mut s, "fn");
    s.set_working_set("fn", vec![9, 8, 7, 3]).unwrap();
    let after = s.load("fn").unwrap();
    assert_eq!(after.working_set, vec![9, 8, 7, 3]);
    assert_eq!(after.vcpu_state, before.vcpu_state);
    assert_eq!(after.created_unix_ms, before.created_unix_ms);
    assert_eq!(after.info(), before.info());
    assert_eq!(resolved_bytes(&mut s, "fn"), bytes);
    assert!(matches!(
        s.set_working_set("fn", vec![64]),
        Err(WriteError::WorkingSetOutOfRange { frame: 64, .. })
    ));
    assert!(matches!(
        s.set_working_set("nope", vec![1]),
        Err(WriteError::NotFound { .. })
    ));
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    assert_eq!(fs::read_dir(d.0.join("tmp")).unwrap().count(), 0);
}

/// base + fn + "gone" (its own pages 40..50), then "gone" removed.
fn store_with_orphans(d: &Path) -> Store {
    let mut s = healthy_store(d);
    let mut w = s.begin_template("gone", Some("base"), MEM).unwrap();
    for f in 40..50 {
        w.put_page(f, &page(4000 + f)).unwrap();
    }
    w.put_page(11, &page(103)).unwrap(); // shared with fn: must survive
    w.commit().unwrap();
    let mut w = s.begin_template("later", None, MEM).unwrap();
    w.put_page(0, &page(5000)).unwrap();
    w.commit().unwrap();
    s.remove("gone").unwrap();
    s
}

#[test]
fn gc_removes_orphans_keeps_referenced() {
    let d = TempDir::new();
    let mut s = store_with_orphans(&d.0);
    fs::write(d.0.join("tmp/x.tmp"), b"junk").unwrap();
    let want: Vec<(String, Vec<u8>)> = ["base", "fn", "later"]
        .iter()
        .map(|n| (n.to_string(), resolved_bytes(&mut s, n)))
        .collect();
    let before = s.stats().unwrap().physical_bytes;
    let dry = s.gc(true).unwrap();
    assert_eq!(dry.removed_pages, 10);
    assert_eq!((dry.tmp_files, dry.packs_rewritten), (1, 1));
    assert!(d.0.join("tmp/x.tmp").exists(), "dry run changed nothing");
    assert_eq!(s.stats().unwrap().physical_bytes, before);
    let rep = s.gc(false).unwrap();
    assert_eq!(rep.removed_pages, dry.removed_pages);
    assert_eq!(rep.bytes_after, dry.bytes_after);
    assert!(rep.bytes_freed() >= 10 * PAGE_SIZE as u64, "{rep:?}");
    assert!(!d.0.join("tmp/x.tmp").exists());
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    for (n, bytes) in &want {
        assert_eq!(&resolved_bytes(&mut s, n), bytes, "{n}");
    }
    // Reopened from disk too.
    let mut s2 = Store::open(&d.0).unwrap();
    for (n, bytes) in &want {
        assert_eq!(&resolved_bytes(&mut s2, n), bytes, "{n}");
    }
    // Nothing left to do.
    let again = s.gc(false).unwrap();
    assert_eq!((again.removed_pages, again.packs_rewritten), (0, 0));
    // Remove everything: all packs go.
    for n in ["fn", "base", "later"] {
        s.remove(n).unwrap();
    }
    let rep = s.gc(false).unwrap();
    assert!(rep.packs_deleted >= 1);
    assert_eq!(fs::read_dir(d.0.join("packs")).unwrap().count(), 0);
    assert!(s.verify().is_empty());
    // And the store keeps working (pack ids may be reused).
    make_base_and_fn(&mut s);
    check_fn(&mut s);
}

#[test]
fn gc_killed_at_any_step_leaves_usable_store() {
    for step in [
        "gc-after-new-pack",
        "gc-after-new-idx",
        "gc-after-idx-delete",
    ] {
        let d = TempDir::new();
        let mut s = store_with_orphans(&d.0);
        let want = resolved_bytes(&mut s, "fn");
        s.fail_at = Some(step);
        assert!(s.gc(false).is_err(), "{step}");
        drop(s);
        let mut s = Store::open(&d.0).unwrap();
        assert_healthy(&s);
        assert_eq!(resolved_bytes(&mut s, "fn"), want, "{step}");
        check_fn(&mut s);
        s.gc(false).unwrap();
        assert!(s.verify().is_empty(), "{step}: {:#?}", s.verify());
        assert_eq!(resolved_bytes(&mut s, "fn"), want, "{step}");
    }
}

#[test]
fn gc_refuses_with_unreadable_manifest_and_skips_damaged_packs() {
    let (_d, mut s) = store_with_fixture(bad_manifest_checksum);
    let e = s.gc(false).unwrap_err();
    assert!(matches!(e, GcError::UnreadableTemplate { .. }), "{e}");
    assert!(e.to_string().contains("verify"), "{e}");
    // Pages a template needs are lost: gc changes nothing and says which templates.
    let (d, mut s) = store_with_fixture(truncated_pack);
    let before = fs::metadata(d.0.join("packs/0000000000000001.pack")).unwrap();
    match s.gc(false).unwrap_err() {
        GcError::Unaccounted {
            templates, packs, ..
        } => {
            assert_eq!(templates, [TemplateName::new("fn").unwrap()]);
            assert!(packs.is_empty(), "{packs:?}");
        }
        e => panic!("wrong error: {e}"),
    }
    let after = fs::metadata(d.0.join("packs/0000000000000001.pack")).unwrap();
    assert_eq!(before.len(), after.len());
    // A damaged page nobody needs: that pack is left alone, the rest is collected.
    let d = TempDir::new();
    let mut s = store_with_orphans(&d.0);
    let want = resolved_bytes(&mut s, "fn");
    let pack = d.0.join("packs/0000000000000001.pack");
    let mut b = fs::read(&pack).unwrap();
    b[12 * PAGE_SIZE + 5] ^= 1; // the first page of the removed template "gone"
    fs::write(&pack, &b).unwrap();
    let rep = s.gc(false).unwrap();
    assert_eq!(rep.skipped.len(), 1, "{rep:?}");
    assert!(rep.skipped[0].contains("damaged"), "{rep:?}");
    assert_eq!(rep.packs_deleted + rep.packs_rewritten, 0, "{rep:?}");
    assert_eq!(fs::read(&pack).unwrap(), b);
    assert_eq!(resolved_bytes(&mut s, "fn"), want);
}

#[test]
fn writer_survives_concurrent_gc() {
    // A writer deduplicates against pages, gc (another Store) moves them, commit still works.
    let d = TempDir::new();
    let mut s = store_with_orphans(&d.0);
    let mut w = s.begin_template("new", Some("fn"), MEM).unwrap();
    w.put_page(20, &page(103)).unwrap(); // known: in the pack gc rewrites
    w.put_page(21, &page(4041)).unwrap(); // known now, garbage for gc
    w.put_page(22, &page(777)).unwrap(); // new
    let mut other = Store::open(&d.0).unwrap();
    let rep = other.gc(false).unwrap();
    assert!(rep.packs_rewritten + rep.packs_deleted >= 1, "{rep:?}");
    w.commit().unwrap();
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    let s = Store::open(&d.0).unwrap();
    let t = s.load("new").unwrap();
    let r = t.resolve(&s).unwrap();
    assert_eq!(r.frame(20), Some(Frame::Data(&page(103))));
    assert_eq!(r.frame(21), Some(Frame::Data(&page(4041))));
    assert_eq!(r.frame(22), Some(Frame::Data(&page(777))));
    drop(r);
    // The other store sees the move after a refresh.
    other.refresh().unwrap();
    let t = other.load("new").unwrap();
    assert_eq!(
        t.resolve(&other).unwrap().frame(21),
        Some(Frame::Data(&page(4041)))
    );
}

#[test]
fn diff_merges_runs() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let df = s.diff("base", "fn").unwrap();
    assert_eq!(
        df.ranges,
        vec![DiffRange {
            first_frame: 3,
            frames: 3
        }]
    );
    assert_eq!(df.differing_frames, 3);
    assert_eq!(df.ranges[0].start_addr(), 3 * PAGE_SIZE as u64);
    assert_eq!(df.ranges[0].end_addr(), 6 * PAGE_SIZE as u64);
    assert!(s.diff("fn", "fn").unwrap().ranges.is_empty());
    let mut w = s.begin_template("other", None, MEM).unwrap();
    for f in 0..10 {
        w.put_page(f, &page(f)).unwrap();
    }
    w.put_page(30, &page(1)).unwrap();
    w.commit().unwrap();
    let df = s.diff("base", "other").unwrap();
    assert_eq!(
        df.ranges,
        vec![DiffRange {
            first_frame: 30,
            frames: 1
        }]
    );
}

#[test]
fn inspect_counts_per_layer() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let mut w = s.begin_template("twin", None, MEM).unwrap();
    w.put_page(0, &page(104)).unwrap(); // shares fn's page 104
    w.commit().unwrap();
    let l = s.inspect("fn").unwrap();
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].name.as_str(), "base");
    assert_eq!(
        (l[0].own_pages, l[0].inherited_pages, l[0].zero_frames),
        (10, 0, 54)
    );
    assert_eq!(l[0].working_set, 3);
    let f = &l[1];
    assert_eq!(f.own_pages, 2);
    assert_eq!(f.inherited_pages, 7); // 0..10 minus 3,4 (own) and 5 (zeroed)
    assert_eq!(f.zero_frames, 55);
    assert_eq!(f.explicit_zero_frames, 1);
    assert_eq!((f.shared_pages, f.unique_pages), (1, 1));
    assert_eq!(f.own_bytes, 2 * PAGE_SIZE as u64);
    assert_eq!(f.resolved_bytes, 9 * PAGE_SIZE as u64);
    assert_eq!(f.working_set, 3);
    assert!(f.manifest_bytes > 0);
    let st = s.stats().unwrap();
    assert_eq!(
        st.physical_bytes,
        st.pack_bytes + st.index_bytes + st.manifest_bytes + st.config_bytes
    );
    assert_eq!(st.shared_pairs.len(), 1);
    assert_eq!(
        (
            st.shared_pairs[0].a.as_str(),
            st.shared_pairs[0].b.as_str(),
            st.shared_pairs[0].pages
        ),
        ("fn", "twin", 1)
    );
}

#[test]
fn export_import_round_trip_dedups() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let mut sa = healthy_store(&a.0);
    let mut w = sa.begin_template("fn2", Some("fn"), MEM).unwrap();
    w.put_page(30, &page(3000)).unwrap();
    w.put_page(31, &page(3)).unwrap(); // same bytes as base frame 3
    w.set_device_state(b"dev2".to_vec());
    w.commit().unwrap();
    let mut file = Vec::new();
    let ex = sa.export("fn2", &mut file).unwrap();
    assert_eq!(ex.pages, 10 + 2 + 1);
    assert_eq!(ex.bytes, file.len() as u64);
    let names: Vec<&str> = ex.templates.iter().map(|n| n.as_str()).collect();
    assert_eq!(names, ["base", "fn", "fn2"]);

    // The target already has base's pages under another template.
    let mut sb = Store::create_or_open(&b.0).unwrap();
    let mut w = sb.begin_template("unrelated", None, MEM).unwrap();
    for f in 0..10 {
        w.put_page(f + 20, &page(f)).unwrap();
    }
    w.commit().unwrap();
    let im = sb.import(&file[..]).unwrap();
    assert_eq!((im.pages, im.new_pages), (13, 3));
    assert!(im.templates.iter().all(|t| t.created));
    for n in ["base", "fn", "fn2"] {
        assert_eq!(
            resolved_bytes(&mut sa, n),
            resolved_bytes(&mut sb, n),
            "{n}"
        );
        let (x, y) = (sa.load(n).unwrap(), sb.load(n).unwrap());
        assert_eq!(
            (
                &x.vcpu_state,
                &x.device_state,
                &x.working_set,
                x.created_unix_ms
            ),
            (
                &y.vcpu_state,
                &y.device_state,
                &y.working_set,
                y.created_unix_ms
            )
        );
    }
    assert!(sb.verify().is_empty(), "{:#?}", sb.verify());
    // Twice: nothing added.
    let size = sb.stats().unwrap().physical_bytes;
    let im = sb.import(&file[..]).unwrap();
    assert_eq!(im.new_pages, 0);
    assert!(im.templates.iter().all(|t| !t.created));
    assert_eq!(sb.stats().unwrap().physical_bytes, size);

    // A different template of the same name is refused, nothing written.
    let c = TempDir::new();
    let mut sc = Store::create_or_open(&c.0).unwrap();
    let mut w = sc.begin_template("base", None, MEM).unwrap();
    w.put_page(0, &page(1)).unwrap();
    w.commit().unwrap();
    let e = sc.import(&file[..]).unwrap_err();
    assert!(matches!(e, ImportError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("base"), "{e}");
    assert_eq!(sc.list().unwrap().len(), 1);
}

#[test]
fn import_rejects_damaged_files_without_panicking() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let sa = healthy_store(&a.0);
    let mut file = Vec::new();
    sa.export("fn", &mut file).unwrap();
    let mut sb = Store::create_or_open(&b.0).unwrap();
    for cut in (0..file.len()).step_by(97) {
        assert!(sb.import(&file[..cut]).is_err(), "cut {cut}");
    }
    let mut x = 7u64;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut f = file.clone();
        let i = (x as usize) % f.len();
        f[i] ^= 1 << (x >> 60 & 7);
        assert!(sb.import(&f[..]).is_err(), "flip at {i}");
    }
    // Huge counts and lengths in a header with a valid checksum.
    let mut f = file[..32].to_vec();
    f[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&f[..24]);
    f[24..32].copy_from_slice(&sum.to_le_bytes());
    f.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(sb.import(&f[..]).is_err());
    let e = sb.import(&b"not an export"[..]).unwrap_err();
    assert!(e.to_string().contains("not a template export"), "{e}");
    assert!(sb.list().unwrap().is_empty());
    assert!(sb.verify().iter().all(|p| !p.is_corruption()));
    // Still importable afterwards.
    sb.import(&file[..]).unwrap();
    assert!(sb.verify().iter().all(|p| !p.is_corruption()));
}

#[test]
fn missing_config_is_damage_not_a_new_store() {
    // Issue 7 item 4: a store that lost store.cfg must not get a new secret.
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let want = resolved_bytes(&mut s, "fn");
    drop(s);
    let cfg = fs::read(d.0.join("store.cfg")).unwrap();
    missing_config(&d.0);
    for r in [Store::create_or_open(&d.0), Store::open(&d.0)] {
        match r {
            Err(
                e @ OpenError::MissingConfig {
                    packs: 2,
                    templates: 2,
                    ..
                },
            ) => {
                let m = e.to_string();
                assert!(m.contains("no store.cfg") && m.contains("backup"), "{m}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a store without store.cfg was opened"),
        }
    }
    assert!(!d.0.join("store.cfg").exists(), "a new config was written");
    // Manifests alone are enough to recognise a store.
    let m = TempDir::new();
    fs::create_dir_all(m.0.join("templates")).unwrap();
    fs::copy(d.0.join("templates/fn.tmpl"), m.0.join("templates/fn.tmpl")).unwrap();
    assert!(matches!(
        Store::create_or_open(&m.0),
        Err(OpenError::MissingConfig {
            packs: 0,
            templates: 1,
            ..
        })
    ));
    // The remedy works: with the config back, every template reads as before.
    fs::write(d.0.join("store.cfg"), cfg).unwrap();
    let mut s = Store::create_or_open(&d.0).unwrap();
    assert_healthy(&s);
    assert_eq!(resolved_bytes(&mut s, "fn"), want);
}

#[test]
fn only_empty_or_new_directories_become_stores() {
    // New directory: created.
    let d = TempDir::new();
    Store::create_or_open(d.0.join("a/b")).unwrap();
    assert!(d.0.join("a/b/store.cfg").exists());
    // Empty directory, and what an interrupted creation leaves: created.
    let e = TempDir::new();
    fs::create_dir_all(e.0.join("tmp")).unwrap();
    fs::create_dir_all(e.0.join("packs")).unwrap();
    fs::write(e.0.join("LOCK"), b"").unwrap();
    fs::write(e.0.join("tmp/store.cfg.1.0.tmp"), b"half").unwrap();
    Store::create_or_open(&e.0).unwrap();
    // A directory holding something else: refused, nothing written.
    let f = TempDir::new();
    fs::create_dir_all(&f.0).unwrap();
    fs::write(f.0.join("notes.txt"), b"mine").unwrap();
    match Store::create_or_open(&f.0) {
        Err(e @ OpenError::NotEmpty { .. }) => {
            assert!(e.to_string().contains("notes.txt"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a store was created in a non-empty directory"),
    }
    assert!(!f.0.join("store.cfg").exists());
    assert!(matches!(
        Store::open(&f.0),
        Err(OpenError::NotAStore { .. })
    ));
}

/// Every file under `dir` with its bytes.
fn snapshot_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["packs", "templates"] {
        let mut v: Vec<_> = fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        for p in v {
            let b = fs::read(&p).unwrap();
            out.push((p, b));
        }
    }
    out
}

#[test]
fn gc_never_deletes_what_a_manifest_needs_when_an_index_is_lost_foreign_forged_or_stale() {
    // Issue 7 item 3.
    for (name, damage) in INDEX_DAMAGES {
        let d = TempDir::new();
        let mut s = healthy_store(&d.0);
        let want: Vec<Vec<u8>> = ["base", "fn"]
            .iter()
            .map(|n| resolved_bytes(&mut s, n))
            .collect();
        drop(s);
        damage(&d.0);
        let mut s = Store::open(&d.0).unwrap();
        let files = snapshot_files(&d.0);
        for dry in [true, false] {
            match s.gc(dry) {
                Err(e @ GcError::Unaccounted { .. }) => {
                    let GcError::Unaccounted {
                        templates, packs, ..
                    } = &e
                    else {
                        unreachable!()
                    };
                    assert!(
                        templates.iter().any(|t| t.as_str() == "base"),
                        "{name}: {e}"
                    );
                    assert_eq!(packs, &[PackId::new(1)], "{name}: {e}");
                    let m = e.to_string();
                    assert!(m.contains("refused") && m.contains("base"), "{name}: {m}");
                }
                Err(e) => panic!("{name}: wrong error: {e}"),
                Ok(r) => panic!("{name}: gc ran on a store with unaccounted pages: {r:?}"),
            }
            assert_eq!(snapshot_files(&d.0), files, "{name}: gc changed files");
        }
        // verify: damaged (not garbage), names the templates and the remedy.
        let probs = s.verify();
        let p = probs
            .iter()
            .find(|p| p.what.contains("no index accounts for them"))
            .unwrap_or_else(|| panic!("{name}: {probs:#?}"));
        assert!(p.is_corruption(), "{name}: {p}");
        assert!(
            p.what.contains("base") && p.what.contains("fn"),
            "{name}: {p}"
        );
        assert!(p.hint.contains("reindex 0000000000000001"), "{name}: {p}");
        assert!(
            !probs
                .iter()
                .any(|p| !p.is_corruption() && p.path.ends_with("0000000000000001.pack")),
            "{name}: pack 1 called garbage: {probs:#?}"
        );
        // A writer does not truncate pack 1 either (it may append to it).
        let len = fs::metadata(d.0.join("packs/0000000000000001.pack"))
            .unwrap()
            .len();
        let mut w = s.begin_template("other", None, MEM).unwrap();
        w.put_page(1, &page(31337)).unwrap();
        w.commit().unwrap();
        let len2 = fs::metadata(d.0.join("packs/0000000000000001.pack"))
            .unwrap()
            .len();
        assert!(len2 >= len, "{name}: a writer truncated pack 1");
        // The remedy: rebuild the index from the pack.
        let rep = s.reindex(PackId::new(1)).unwrap();
        assert_eq!(
            rep.entries,
            12 + (len2 - len) / PAGE_SIZE as u64,
            "{name}: {rep:?}"
        );
        assert_healthy(&s);
        for (n, w) in ["base", "fn"].iter().zip(&want) {
            assert_eq!(&resolved_bytes(&mut s, n), w, "{name}: {n}");
        }
        let rep = s.gc(false).unwrap();
        assert_eq!(rep.removed_pages, 0, "{name}: {rep:?}");
        assert!(s.verify().is_empty(), "{name}: {:#?}", s.verify());
        let mut s = Store::open(&d.0).unwrap();
        for (n, w) in ["base", "fn"].iter().zip(&want) {
            assert_eq!(&resolved_bytes(&mut s, n), w, "{name}: {n} reopened");
        }
    }
}

#[test]
fn reindex_of_a_missing_pack_is_a_clear_error() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let e = s.reindex(PackId::new(9)).unwrap_err();
    assert!(matches!(e, ReindexError::NoPack { .. }), "{e}");
    assert!(e.to_string().contains("0000000000000009.pack"), "{e}");
    assert_eq!("0000000000000001".parse::<PackId>(), Ok(PackId::new(1)));
    assert_eq!(
        "packs/000000000000000a.idx".parse::<PackId>(),
        Ok(PackId::new(10))
    );
    assert!("../x".parse::<PackId>().is_err());
}

#[test]
fn memory_images_are_checked_before_use_and_cleaned_up() {
    // Issue 7 item 6, at the store level.
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let t = s.load("fn").unwrap();
    let r = t.resolve(&s).unwrap();
    let mut want = vec![0u8; MEM as usize];
    r.copy_to(&mut want).unwrap();
    let img = s.memory_image(&t, &r).unwrap();
    assert!(img.built && img.rejected.is_none());
    assert_eq!(fs::read(&img.path).unwrap(), want);
    let again = s.memory_image(&t, &r).unwrap();
    assert!(!again.built, "a good image is reused");
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    let path = img.path.clone();
    drop((img, again));

    // Altered data page, data in a zero frame, wrong size: each rejected and rebuilt.
    type Alter = (&'static str, fn(&mut Vec<u8>));
    let alter: [Alter; 3] = [
        ("data page", |b| b[4 * PAGE_SIZE + 9] ^= 1),
        ("zero frame", |b| b[40 * PAGE_SIZE] = 1),
        ("size", |b| b.truncate(b.len() - PAGE_SIZE)),
    ];
    for (what, f) in alter {
        let mut b = fs::read(&path).unwrap();
        f(&mut b);
        fs::remove_file(&path).unwrap();
        fs::write(&path, &b).unwrap();
        let probs = s.verify();
        assert!(
            probs.iter().any(|p| p.is_corruption()
                && p.what.contains("memory image")
                && p.hint.contains("delete it")),
            "{what}: {probs:#?}"
        );
        let img = s.memory_image(&t, &r).unwrap();
        assert!(img.built && img.rejected.is_some(), "{what}: {img:?}");
        assert_eq!(fs::read(&img.path).unwrap(), want, "{what}");
        assert!(s.verify().is_empty(), "{what}: {:#?}", s.verify());
    }
    drop(r);

    // gc: stale images and dead processes' temp files go; a live one and the current image stay.
    let cache = d.0.join("cache");
    let live = cache.join(format!(".fn.{}.tmp", std::process::id()));
    fs::write(cache.join("fn.1.img"), b"old").unwrap();
    fs::write(cache.join("gone.5.img"), b"removed").unwrap();
    fs::write(cache.join(".fn.2147483647.tmp"), b"killed").unwrap();
    fs::write(&live, b"building").unwrap();
    let probs = s.verify();
    assert_eq!(
        probs.iter().filter(|p| p.path.starts_with(&cache)).count(),
        3,
        "{probs:#?}"
    );
    assert!(probs.iter().all(|p| !p.is_corruption()), "{probs:#?}");
    let rep = s.gc(false).unwrap();
    assert_eq!(rep.cache_files, 3, "{rep:?}");
    let mut left: Vec<String> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let image_name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        left,
        [format!(".fn.{}.tmp", std::process::id()), image_name]
    );
    // remove: the template's images go (a live builder's temp file stays).
    fs::write(cache.join(".fn.2147483647.tmp"), b"killed").unwrap();
    s.remove("fn").unwrap();
    let left: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, [live]);
}

#[test]
fn error_messages_name_no_internal_functions() {
    // Issue 7 item 11: messages named Store::create_or_open, begin_template_replacing,
    // Store::refresh and a `list` command that does not exist.
    let internal = [
        "create_or_open",
        "begin_template",
        "Store::",
        "refresh",
        "`list`",
    ];
    let check = |m: String| {
        for w in internal {
            assert!(!m.contains(w), "{w:?} in: {m}");
        }
        m
    };
    let d = TempDir::new();
    let m = check(Store::open(d.0.join("none")).err().unwrap().to_string());
    assert!(m.contains("no store at"), "{m}");
    let mut s = healthy_store(&d.0);
    let mut w = s.begin_template("fn", Some("base"), MEM).unwrap();
    w.put_page(1, &page(1)).unwrap();
    let m = check(w.commit().unwrap_err().to_string());
    assert!(
        m.contains("already exists") && m.contains("remove it first"),
        "{m}"
    );
    let m = check(s.load("nope").unwrap_err().to_string());
    assert!(m.contains("not found"), "{m}");
    let m = check(s.set_working_set("nope", vec![]).unwrap_err().to_string());
    assert!(m.contains("not found"), "{m}");
    drop(s);
    deleted_index(&d.0);
    let s = Store::open(&d.0).unwrap();
    let t = s.load("fn").unwrap();
    let e = t.resolve(&s).err().unwrap();
    assert!(matches!(e, LoadError::PageMissing { .. }), "{e}");
    let m = check(e.to_string());
    assert!(m.contains("vmm-store verify"), "{m}");
}

/// Compile-time: a resolved template owns what it reads (no borrow of the
/// store) and can be shared between threads, as can the store itself.
#[test]
fn resolved_and_store_are_send_sync_and_static() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Resolved>();
    shareable::<Store>();
    shareable::<Template>();
}

#[test]
fn readers_share_one_store_across_threads_while_another_process_writes() {
    // One `Store` shared by reference: threads load and resolve through `&self`
    // while another handle (as another process would) commits new templates
    // into new packs; every reader sees them, with the right bytes.
    let d = TempDir::new();
    let mut w = healthy_store(&d.0);
    let shared = std::sync::Arc::new(Store::open(&d.0).unwrap());
    let n = 6u64;
    std::thread::scope(|sc| {
        let (txs, readers): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::channel::<u64>();
                let s = shared.clone();
                let h = sc.spawn(move || {
                    let mut seen = 0;
                    // Told of each commit; loads it while the next ones are written.
                    while let Ok(i) = rx.recv() {
                        let t = s.load(&format!("t{i}")).unwrap();
                        let r = t.resolve(&s).unwrap();
                        assert_eq!(r.frame(2), Some(Frame::Data(&page(9000 + i))));
                        assert_eq!(r.frame(3), Some(Frame::Data(&page(103))), "from fn");
                        assert!(matches!(r.frame_verified(2), Ok(Some(Frame::Data(_)))));
                        seen += 1;
                    }
                    seen
                });
                (tx, h)
            })
            .unzip();
        for i in 0..n {
            let mut tw = w.begin_template(&format!("t{i}"), Some("fn"), MEM).unwrap();
            tw.put_page(2, &page(9000 + i)).unwrap();
            tw.commit().unwrap();
            for tx in &txs {
                tx.send(i).unwrap();
            }
        }
        drop(txs);
        for r in readers {
            assert_eq!(r.join().unwrap(), n);
        }
    });
    assert_eq!(shared.page_count(), w.page_count());
}

#[test]
fn resolved_template_outlives_refresh_and_gc_of_its_packs() {
    // A template resolved from a shared store keeps the pack view it was resolved
    // against: gc in another handle rewrites the pack its pages live in, the
    // store refreshes (dropping that pack from its view), and the resolved
    // template still reads (and verifies) the same bytes.
    let d = TempDir::new();
    let mut other = store_with_orphans(&d.0);
    let s = Store::open(&d.0).unwrap();
    let t = s.load("fn").unwrap();
    let r = t.resolve(&s).unwrap();
    let mut before = vec![0u8; MEM as usize];
    r.copy_to(&mut before).unwrap();
    let packs_before: Vec<_> = fs::read_dir(d.0.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let rep = other.gc(false).unwrap();
    assert!(rep.packs_rewritten + rep.packs_deleted >= 1, "{rep:?}");
    s.refresh().unwrap();
    // The pack the template resolved against is gone from disk and from the view.
    let packs_after: Vec<_> = fs::read_dir(d.0.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(packs_before.iter().any(|p| !packs_after.contains(p)));
    let mut after = vec![0u8; MEM as usize];
    r.copy_to(&mut after).unwrap();
    assert_eq!(before, after);
    for gfn in r.data_frames().collect::<Vec<_>>() {
        assert!(r.frame_verified(gfn).unwrap().is_some());
    }
    // A new resolve goes through the refreshed view, with the same result.
    let r2 = s.load("fn").unwrap().resolve(&s).unwrap();
    let mut again = vec![0u8; MEM as usize];
    r2.copy_to(&mut again).unwrap();
    assert_eq!(before, again);
    assert_healthy(&s);
}

#[test]
fn a_cached_memory_image_that_is_a_fifo_is_rebuilt_not_opened_forever() {
    let d = TempDir::new();
    let s = healthy_store(&d.0);
    let t = s.load("fn").unwrap();
    let r = t.resolve(&s).unwrap();
    let path = s.memory_image(&t, &r).unwrap().path;
    fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Before: opening the FIFO for reading blocked until a writer came (forever).
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = d.0.clone();
    std::thread::spawn(move || {
        let s = Store::open(&dir).unwrap();
        let t = s.load("fn").unwrap();
        let r = t.resolve(&s).unwrap();
        let probs = s.verify();
        let img = s.memory_image(&t, &r).map(|i| (i.built, i.rejected));
        let _ = tx.send((probs, img));
    });
    let (probs, img) = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("verify or memory_image blocked on a FIFO");
    assert!(
        probs
            .iter()
            .any(|p| p.is_corruption() && p.what.contains("FIFO")),
        "{probs:#?}"
    );
    let (built, rejected) = img.unwrap();
    assert!(built && rejected.unwrap().contains("FIFO"));
    assert!(fs::metadata(&path).unwrap().is_file());
}

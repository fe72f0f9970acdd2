//! Tests of the per-template location records and lazily opened stores, on real
//! stores on disk.

use std::fs;
use std::path::Path;

use crate::fixtures::*;
use crate::format::{self, LocPack, LocProblem, LocRecord};
use crate::*;

/// Guest memory of `name` as resolved by `s`, read the way a restore reads it
/// (every data page verified by its hash), and whether records were used.
fn restored(s: &Store, name: &str) -> (Vec<u8>, bool, Option<String>) {
    let t = s.load(name).unwrap();
    let r = t.resolve(s).unwrap();
    let mut g = vec![0u8; r.mem_size() as usize];
    for f in r.data_frames().collect::<Vec<_>>() {
        match r.frame_verified(f).unwrap() {
            Some(Frame::Data(p)) => {
                g[f as usize * PAGE_SIZE..(f as usize + 1) * PAGE_SIZE].copy_from_slice(p)
            }
            other => panic!("frame {f}: {other:?}"),
        }
    }
    let mut copy = vec![0xAAu8; r.mem_size() as usize];
    r.copy_to(&mut copy).unwrap();
    assert_eq!(copy, g, "{name}: copy_to and verified frames differ");
    (
        g,
        r.from_locations(),
        r.location_fallback().map(str::to_string),
    )
}

/// What the pack indexes say (a store opened the old way).
fn by_index(d: &Path, name: &str) -> Vec<u8> {
    let s = Store::open(d).unwrap();
    let (g, located, fallback) = restored(&s, name);
    assert!(!located && fallback.is_none());
    g
}

fn loc(d: &Path, name: &str) -> std::path::PathBuf {
    d.join(format!("templates/{name}.loc"))
}

/// Resolves `name` in a fresh lazy store: must equal the indexed result and
/// report whether the records were used.
fn lazy(d: &Path, name: &str) -> (bool, Option<String>) {
    let s = Store::open_lazy(d).unwrap();
    let (g, located, fallback) = restored(&s, name);
    assert_eq!(
        g,
        by_index(d, name),
        "{name}: lazy and indexed restores differ"
    );
    assert_eq!(located, fallback.is_none(), "{fallback:?}");
    if located {
        assert!(
            !s.indexes_loaded(),
            "a restore from records read the pack indexes"
        );
    }
    (located, fallback)
}

#[test]
fn lazy_store_resolves_from_records_without_reading_indexes() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    assert!(loc(&d.0, "base").exists() && loc(&d.0, "fn").exists());
    // A template with no page of its own, and one layered twice.
    s.begin_template("empty", Some("fn"), MEM)
        .unwrap()
        .commit()
        .unwrap();
    let mut w = s.begin_template("fn2", Some("fn"), MEM).unwrap();
    w.put_page(20, &page(3)).unwrap(); // deduplicated against base
    w.put_page(21, &page(2000)).unwrap();
    w.commit().unwrap();
    drop(s);
    for n in ["base", "fn", "empty", "fn2"] {
        assert_eq!(lazy(&d.0, n), (true, None), "{n}");
    }
    // Everything else works on a lazy store (the indexes are read on need).
    let mut s = Store::open_lazy(&d.0).unwrap();
    assert_eq!(s.page_count(), 13);
    assert!(s.indexes_loaded());
    let mut w = s.begin_template("fn3", Some("base"), MEM).unwrap();
    w.put_page(30, &page(3000)).unwrap();
    w.commit().unwrap();
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    drop(s);
    assert_eq!(lazy(&d.0, "fn3"), (true, None));
}

fn sample_record() -> LocRecord {
    LocRecord {
        manifest_sum: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
        packs: vec![
            LocPack {
                id: PackId::new(1),
                ino: 77,
                born_ns: 1_700_000_000_000_000_000,
                extent: 8 * PAGE_SIZE as u64,
            },
            LocPack {
                id: PackId::new(3),
                ino: 78,
                born_ns: 0,
                extent: PAGE_SIZE as u64,
            },
        ],
        entries: vec![
            LocRecord::entry(0, 0),
            LocRecord::entry(0, 7 * PAGE_SIZE as u64),
            LocRecord::entry(1, 0),
        ],
    }
}

#[test]
fn record_round_trip_and_damaged_truncated_forged_records_are_refused() {
    let key = |b: &[u8]| xxhash_rust::xxh3::xxh3_128_with_seed(b, 7);
    let r = sample_record();
    let b = format::encode_locations(&r, &key);
    assert_eq!(format::decode_locations(&b, &key), Ok(r.clone()));
    // Every truncation, every flipped bit: refused, never a panic.
    for n in 0..b.len() {
        assert!(
            format::decode_locations(&b[..n], &key).is_err(),
            "cut at {n}"
        );
    }
    for i in 0..b.len() * 8 {
        if (80..96).contains(&i) {
            continue; // the minor version: a newer minor one is read the same
        }
        let mut x = b.clone();
        x[i / 8] ^= 1 << (i % 8);
        assert!(format::decode_locations(&x, &key).is_err(), "bit {i}");
    }
    // Made with another key (another store, or forged): refused.
    let other = |b: &[u8]| xxhash_rust::xxh3::xxh3_128_with_seed(b, 8);
    assert!(format::decode_locations(&format::encode_locations(&r, &other), &key).is_err());
    // Well-formed but inconsistent: an entry past its pack's extent, an entry
    // naming no pack, a pack named twice, an unaligned extent.
    let mut bad = vec![];
    let mut x = r.clone();
    x.entries.push(LocRecord::entry(1, PAGE_SIZE as u64));
    bad.push(x);
    let mut x = r.clone();
    x.entries.push(LocRecord::entry(2, 0));
    bad.push(x);
    let mut x = r.clone();
    x.packs[1].id = PackId::new(1);
    bad.push(x);
    let mut x = r.clone();
    x.packs[0].extent += 1;
    bad.push(x);
    for x in bad {
        let e = format::decode_locations(&format::encode_locations(&x, &key), &key);
        assert!(matches!(e, Err(LocProblem::Damaged(_))), "{x:?}: {e:?}");
    }
    // Announced lengths far beyond what is there allocate nothing.
    let mut x = b.clone();
    x[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(format::decode_locations(&x, &key).is_err());
    // A future major version says so.
    let mut x = b.clone();
    x[8..10].copy_from_slice(&9u16.to_le_bytes());
    assert_eq!(
        format::decode_locations(&x, &key),
        Err(LocProblem::Future(9))
    );
}

#[test]
fn missing_damaged_forged_or_foreign_records_fall_back_to_the_indexes() {
    let d = TempDir::new();
    drop(healthy_store(&d.0));
    let good = fs::read(loc(&d.0, "fn")).unwrap();
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "missing",
            Box::new(|d: &Path| fs::remove_file(loc(d, "fn")).unwrap()),
        ),
        (
            "truncated",
            Box::new(|d: &Path| {
                let b = fs::read(loc(d, "fn")).unwrap();
                fs::write(loc(d, "fn"), &b[..b.len() - 3]).unwrap()
            }),
        ),
        (
            "flipped",
            Box::new(|d: &Path| {
                let mut b = fs::read(loc(d, "fn")).unwrap();
                let n = b.len();
                b[n - 2] ^= 0x10;
                fs::write(loc(d, "fn"), &b).unwrap()
            }),
        ),
        (
            "the base's record in its place",
            Box::new(|d: &Path| fs::copy(loc(d, "base"), loc(d, "fn")).map(|_| ()).unwrap()),
        ),
        (
            "a directory",
            Box::new(|d: &Path| {
                fs::remove_file(loc(d, "fn")).unwrap();
                fs::create_dir(loc(d, "fn")).unwrap()
            }),
        ),
    ];
    for (what, damage) in cases {
        damage(&d.0);
        let (located, why) = lazy(&d.0, "fn");
        assert!(!located, "{what}: a bad record was used");
        assert!(why.is_some_and(|w| w.contains("fn.loc")), "{what}");
        // The base's own record is still used for the base.
        assert_eq!(lazy(&d.0, "base"), (true, None), "{what}");
        let p = loc(&d.0, "fn");
        let _ = fs::remove_dir(&p);
        fs::write(&p, &good).unwrap();
        assert_eq!(lazy(&d.0, "fn"), (true, None), "{what}: restored");
    }
    // A record from another store (same layout, another secret) is refused.
    let e = TempDir::new();
    drop(healthy_store(&e.0));
    fs::copy(loc(&e.0, "fn"), loc(&d.0, "fn")).unwrap();
    assert!(!lazy(&d.0, "fn").0);
}

#[test]
fn stale_records_fall_back_replaced_manifest_pack_or_pages() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let old = fs::read(loc(&d.0, "fn")).unwrap();
    // Replacing the template writes a record bound to the new manifest.
    let mut w = s.begin_template_replacing("fn", Some("base"), MEM).unwrap();
    w.put_page(7, &page(700)).unwrap();
    w.commit().unwrap();
    drop(s);
    assert_eq!(lazy(&d.0, "fn"), (true, None));
    // The old record is bound to the old manifest.
    fs::write(loc(&d.0, "fn"), &old).unwrap();
    let (located, why) = lazy(&d.0, "fn");
    assert!(!located && why.unwrap().contains("another version of the manifest"));

    // A pack replaced by another file (same bytes, another inode).
    let d = TempDir::new();
    drop(healthy_store(&d.0));
    let pack = d.0.join("packs/0000000000000001.pack");
    fs::copy(&pack, d.0.join("tmp/p")).unwrap();
    fs::rename(d.0.join("tmp/p"), &pack).unwrap();
    // Usable (every page in it is checked), so a copied store keeps its records.
    assert_eq!(lazy(&d.0, "fn"), (true, None), "pack replaced");
    let c = TempDir::new();
    copy_store(&d.0, &c.0);
    assert_eq!(lazy(&c.0, "fn"), (true, None), "copied store");
    // A replaced pack with one page the records use changed: not used.
    let mut b = fs::read(&pack).unwrap();
    b[9 * PAGE_SIZE + 5] ^= 1; // a page of the base's, not its first
    fs::write(d.0.join("tmp/p"), &b).unwrap();
    fs::rename(d.0.join("tmp/p"), &pack).unwrap();
    let s = Store::open_lazy(&d.0).unwrap();
    let r = s.load("fn").unwrap().resolve(&s).unwrap();
    assert!(!r.from_locations());
    assert!(r.location_fallback().unwrap().contains("is not at offset"));

    // Pages moved within the same pack file (as if a pack id were reused):
    // the record points at other pages; the check of one page per pack sees it.
    let d = TempDir::new();
    drop(healthy_store(&d.0));
    let mut b = fs::read(pack_path(&d.0)).unwrap();
    b.rotate_left(PAGE_SIZE);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(pack_path(&d.0))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &b, 0).unwrap();
    drop(f);
    let s = Store::open_lazy(&d.0).unwrap();
    let t = s.load("fn").unwrap();
    // The indexes are as wrong as the record here: the store is damaged, and the
    // restore refuses it rather than run wrong pages.
    let r = t.resolve(&s).unwrap();
    assert!(!r.from_locations());
    assert!(r.location_fallback().unwrap().contains("is not at offset"));
    assert!(r
        .data_frames()
        .any(|f| matches!(r.frame_verified(f), Err(LoadError::PageCorrupt { .. }))));

    // A pack cut shorter than the record needs.
    let d = TempDir::new();
    drop(healthy_store(&d.0));
    truncated_pack(&d.0);
    let s = Store::open_lazy(&d.0).unwrap();
    let t = s.load("fn").unwrap();
    let r = t.resolve(&s);
    // Same outcome as the indexed path: a clear error, not wrong data.
    assert!(r.is_err() || !r.unwrap().from_locations());
}

fn copy_store(from: &Path, to: &Path) {
    for sub in ["packs", "templates", "tmp"] {
        fs::create_dir_all(to.join(sub)).unwrap();
        for e in fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
        }
    }
    fs::copy(from.join("store.cfg"), to.join("store.cfg")).unwrap();
}

fn pack_path(d: &Path) -> std::path::PathBuf {
    d.join("packs/0000000000000001.pack")
}

#[test]
fn set_working_set_and_remove_keep_records_in_step() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    s.set_working_set("fn", vec![9, 3]).unwrap();
    assert_eq!(lazy(&d.0, "fn"), (true, None));
    let mut w = s.begin_template("leaf", Some("fn"), MEM).unwrap();
    w.put_page(12, &page(1200)).unwrap();
    w.commit().unwrap();
    s.remove("leaf").unwrap();
    assert!(!loc(&d.0, "leaf").exists());
    // Only its page is left over (garbage until gc), no record.
    let p = s.verify();
    assert!(
        p.len() == 1 && p[0].what.contains("referenced by no template"),
        "{p:#?}"
    );
    assert_eq!(fs::read_dir(d.0.join("tmp")).unwrap().count(), 0);
}

#[test]
fn gc_keeps_records_correct_and_gives_old_stores_records() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    // "gone" shares pack 1 with the others; removing it and collecting
    // rewrites pack 1, so every page moves.
    let mut w = s.begin_template("gone", Some("base"), MEM).unwrap();
    for f in 40..50 {
        w.put_page(f, &page(4000 + f)).unwrap();
    }
    w.commit().unwrap();
    let mut w = s.begin_template("later", Some("base"), MEM).unwrap();
    w.put_page(0, &page(5000)).unwrap();
    w.commit().unwrap();
    s.remove("gone").unwrap();
    let before: Vec<Vec<u8>> = ["base", "fn", "later"]
        .iter()
        .map(|n| by_index(&d.0, n))
        .collect();
    let old_fn = fs::read(loc(&d.0, "fn")).unwrap();
    let rep = s.gc(false).unwrap();
    assert!(rep.packs_rewritten + rep.packs_deleted > 0, "{rep:?}");
    assert!(rep.location_records >= 3, "{rep:?}");
    assert_ne!(fs::read(loc(&d.0, "fn")).unwrap(), old_fn);
    for (n, want) in ["base", "fn", "later"].iter().zip(&before) {
        assert_eq!(lazy(&d.0, n), (true, None), "{n}");
        assert_eq!(&by_index(&d.0, n), want, "{n}");
    }
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    // The record written before gc names a pack that is gone: not used.
    fs::write(loc(&d.0, "fn"), &old_fn).unwrap();
    assert!(!lazy(&d.0, "fn").0);
    assert!(!s.verify().is_empty());
    // A store without records (written before they existed) reads the old
    // way, and gc gives it records.
    for n in ["base", "fn", "later"] {
        let _ = fs::remove_file(loc(&d.0, n));
    }
    assert!(!lazy(&d.0, "fn").0);
    let rep = s.gc(false).unwrap();
    assert_eq!(rep.location_records, 3);
    for n in ["base", "fn", "later"] {
        assert_eq!(lazy(&d.0, n), (true, None), "{n}");
    }
    // Nothing to do: nothing rewritten.
    assert_eq!(s.gc(false).unwrap().location_records, 0);
}

#[test]
fn gc_killed_after_dropping_records_leaves_usable_store() {
    let d = TempDir::new();
    let mut s = healthy_store(&d.0);
    let mut w = s.begin_template("gone", Some("base"), MEM).unwrap();
    w.put_page(40, &page(4040)).unwrap();
    w.commit().unwrap();
    s.remove("gone").unwrap();
    s.fail_at = Some("gc-after-locations");
    assert!(s.gc(false).is_err());
    s.fail_at = None;
    // The records naming the doomed pack are gone; restores read the indexes.
    for n in ["base", "fn"] {
        let (located, _) = lazy(&d.0, n);
        assert!(!located, "{n}");
    }
    s.gc(false).unwrap();
    for n in ["base", "fn"] {
        assert_eq!(lazy(&d.0, n), (true, None), "{n}");
    }
}

#[test]
fn verify_reports_orphaned_and_damaged_records_as_garbage() {
    let d = TempDir::new();
    let s = healthy_store(&d.0);
    assert!(s.verify().is_empty(), "{:#?}", s.verify());
    fs::copy(loc(&d.0, "fn"), loc(&d.0, "nobody")).unwrap();
    fs::write(loc(&d.0, "base"), b"VMMTLOC1 nonsense").unwrap();
    let p = s.verify();
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p.iter().all(|p| !p.is_corruption()), "{p:#?}");
    assert!(p.iter().any(|p| p.what.contains("does not exist")));
    assert!(p
        .iter()
        .any(|p| p.what.contains("unusable location record")));
    // Still restores, from the indexes.
    assert!(!lazy(&d.0, "base").0);
}

#[test]
fn import_writes_records() {
    let (a, b) = (TempDir::new(), TempDir::new());
    let sa = healthy_store(&a.0);
    let mut file = Vec::new();
    sa.export("fn", &mut file).unwrap();
    let mut sb = Store::create_or_open(&b.0).unwrap();
    sb.import(&file[..]).unwrap();
    for n in ["base", "fn"] {
        assert_eq!(lazy(&b.0, n), (true, None), "{n}");
    }
}

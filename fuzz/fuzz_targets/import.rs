//! `Store::import` of a fuzzed export file (snapshot-store/src/transfer.rs) into a
//! fresh store under `$VMM_FUZZ_SCRATCH` (default `/dev/shm`), re-created for every
//! input: empty, or (mode bit 1) a copy of make-seeds' store (base <- fn <- x, y;
//! same contents as the seed exports, another secret), so the "already there",
//! dedup and conflict paths run. Nothing may panic; a refused import leaves the
//! store's templates as they were; and if the import succeeds:
//!
//! * `verify` reports no corruption;
//! * every imported template lists, loads and resolves (templates of at most
//!   64 MiB of guest memory, as in `store_dir`), its chain is the file's chain, and
//!   every page the file's manifest puts at a frame resolves to the bytes of that
//!   page's record in the file;
//! * a template is reported created iff it was not in the store before;
//! * importing the same file again succeeds, creates nothing and writes no page.
//!
//! Input: a mode byte, then the export file. Mode bit 1 picks the pre-populated
//! store. Mode bit 0 set = fix up the file's
//! checksums before importing (manifest payload length + checksum, header checksum,
//! every page record's checksum, the trailer's magic and whole-file checksum, as far
//! as the file's structure can be followed), so mutations reach the manifest
//! decoder, the chain checks, page dedup and the store writes instead of stopping
//! at the first checksum.
#![no_main]

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapshot_store::fuzzing as fmt;
use snapshot_store::{Frame, Store, PAGE_SIZE};
use vmm_fuzz::{Scratch, FILES};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

const HEADER: usize = 32;
const REC: usize = 16 + 4 + PAGE_SIZE;
const MAN_HEADER: usize = 8 + 2 + 2 + 8 + 16;
/// As in `store_dir`: resolve only templates of at most this much guest memory.
const RESOLVE_MAX_MEM: u64 = 64 << 20;

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// What the file says, as far as it can be followed: the manifests' bytes and
/// every page record's (hash, slot) and bytes. With `fix`, checksums are rewritten.
struct Parsed {
    manifests: Vec<Vec<u8>>,
    pages: Vec<(u128, u32, Vec<u8>)>,
}

fn walk(f: &mut [u8], fix: bool) -> Parsed {
    let mut p = Parsed {
        manifests: Vec::new(),
        pages: Vec::new(),
    };
    if f.len() < HEADER {
        return p;
    }
    if fix {
        let sum = xxh3_64(&f[..24]);
        f[24..32].copy_from_slice(&sum.to_le_bytes());
    }
    let n_templates = u32::from_le_bytes(f[12..16].try_into().unwrap()).min(300);
    let n_pages = u64_at(f, 16).unwrap();
    let mut at = HEADER;
    for _ in 0..n_templates {
        let Some(len) = u64_at(f, at) else { return p };
        at += 8;
        if len > (f.len() - at) as u64 {
            return p;
        }
        let m = &mut f[at..at + len as usize];
        if fix && m.len() >= MAN_HEADER {
            let plen = (m.len() - MAN_HEADER) as u64;
            m[12..20].copy_from_slice(&plen.to_le_bytes());
            let sum = xxh3_128(&m[MAN_HEADER..]);
            m[20..36].copy_from_slice(&sum.to_le_bytes());
        }
        p.manifests.push(m.to_vec());
        at += len as usize;
    }
    let mut k = 0;
    while k < n_pages && f.len() - at >= REC + 8 {
        let rec = &f[at..at + REC];
        let hash = u128::from_le_bytes(rec[..16].try_into().unwrap());
        let slot = u32::from_le_bytes(rec[16..20].try_into().unwrap());
        p.pages.push((hash, slot, rec[20..].to_vec()));
        if fix {
            let sum = xxh3_64(rec);
            f[at + REC..at + REC + 8].copy_from_slice(&sum.to_le_bytes());
        }
        at += REC + 8;
        k += 1;
    }
    if fix && k == n_pages && f.len() - at >= 16 {
        let sum = xxh3_64(&f[..at]);
        f[at..at + 8].copy_from_slice(b"VMMSTEND");
        f[at + 8..at + 16].copy_from_slice(&sum.to_le_bytes());
    }
    p
}

/// The files of a store holding the seed templates, built once.
fn seed_store() -> &'static [(&'static str, Vec<u8>)] {
    static FILES_OF: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    FILES_OF.get_or_init(|| {
        let scratch = Scratch::new("import-seed-store");
        let dir = scratch.fresh();
        let mut s = Store::create_or_open(dir).expect("create the seed store");
        vmm_fuzz::build_seed_templates(&mut s);
        drop(s);
        FILES
            .iter()
            .filter_map(|f| std::fs::read(dir.join(f)).ok().map(|b| (*f, b)))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let mut file = file.to_vec();
    let parsed = walk(&mut file, mode & 1 != 0);

    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    let dir = SCRATCH.get_or_init(|| Scratch::new("import")).fresh();
    let populated = mode & 2 != 0;
    if populated {
        for (f, b) in seed_store() {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b).unwrap();
        }
    }
    let mut store = Store::create_or_open(dir).expect("create a fresh store");
    let before: Vec<String> = store
        .list()
        .expect("list the fresh store")
        .iter()
        .map(|t| t.name.as_str().to_string())
        .collect();
    assert_eq!(before.len(), if populated { 4 } else { 0 });

    let mut calls = 0u64;
    let report = match store.import_with_progress(&file[..], &mut |done, total| {
        calls += 1;
        assert!(done <= total, "progress {done} of {total}");
    }) {
        Ok(r) => r,
        Err(e) => {
            black_box(e.to_string());
            // A refused import leaves the templates as they were, all healthy.
            match store.list() {
                Ok(l) => {
                    let now: Vec<&str> = l.iter().map(|t| t.name.as_str()).collect();
                    assert_eq!(now, before, "refused import changed the templates");
                }
                Err(e) => panic!("list() fails after a refused import: {e}"),
            }
            if populated {
                let bad: Vec<String> = store
                    .verify()
                    .iter()
                    .filter(|p| p.is_corruption())
                    .map(|p| p.to_string())
                    .collect();
                assert!(bad.is_empty(), "refused import damaged the store: {bad:?}");
            }
            return;
        }
    };
    black_box(calls);

    // Accepted: the file's structure was followed to its end.
    assert_eq!(report.pages, parsed.pages.len() as u64);
    assert_eq!(report.templates.len(), parsed.manifests.len());
    assert!(report.new_pages <= report.pages);
    for t in &report.templates {
        let existed = before.iter().any(|b| b == t.name.as_str());
        assert_eq!(t.created, !existed, "{report:?}");
    }

    let problems = store.verify();
    let bad: Vec<String> = problems
        .iter()
        .filter(|p| p.is_corruption())
        .map(|p| p.to_string())
        .collect();
    assert!(
        bad.is_empty(),
        "import succeeded but verify reports: {bad:?}"
    );

    let listed = store.list().expect("list() after a successful import");
    let created = report.templates.iter().filter(|t| t.created).count();
    assert_eq!(listed.len(), before.len() + created);

    let pages: HashMap<(u128, u32), &[u8]> = parsed
        .pages
        .iter()
        .map(|(h, s, b)| ((*h, *s), &b[..]))
        .collect();
    for (i, imported) in report.templates.iter().enumerate() {
        let name = imported.name.as_str();
        let m = fmt::decode_manifest(Path::new("<file>"), &parsed.manifests[i])
            .expect("import accepted a manifest that does not decode");
        assert_eq!(m.name, name);
        let t = store
            .load(name)
            .unwrap_or_else(|e| panic!("imported template {name} does not load: {e}"));
        assert_eq!(t.mem_size, m.mem_size);
        if t.mem_size > RESOLVE_MAX_MEM {
            continue;
        }
        let r = t
            .resolve(&store)
            .unwrap_or_else(|e| panic!("imported template {name} does not resolve: {e}"));
        assert_eq!(r.frame_count(), t.mem_size / PAGE_SIZE as u64);
        let chain: Vec<&str> = r.layers().iter().map(|n| n.as_str()).collect();
        let expect: Vec<&str> = report.templates[..=i]
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(chain, expect, "{name}: chain differs from the file's");
        for (first, ids) in &m.page_runs {
            for (k, id) in ids.iter().enumerate() {
                let gfn = first + k as u64;
                let want = pages
                    .get(&(id.hash(), id.slot()))
                    .unwrap_or_else(|| panic!("{name}: page {id} has no record"));
                match r.frame(gfn) {
                    Some(Frame::Data(p)) => {
                        assert!(&p[..] == *want, "{name}: frame {gfn} has the wrong bytes")
                    }
                    other => panic!("{name}: frame {gfn} resolves to {other:?}"),
                }
            }
        }
        let mut n = 0u64;
        for (_, f) in r.iter() {
            if let Frame::Data(p) = f {
                n = n.wrapping_add(p[0] as u64);
            }
        }
        black_box(n);
    }

    // Importing the same file again is a no-op.
    let again = store
        .import(&file[..])
        .unwrap_or_else(|e| panic!("second import of an accepted file fails: {e}"));
    assert!(again.templates.iter().all(|t| !t.created), "{again:?}");
    assert_eq!(again.new_pages, 0, "{again:?}");
    assert!(!store.verify().iter().any(|p| p.is_corruption()));
});

//! A whole store from a fuzzed directory image (see `vmm_fuzz` for the archive
//! format): `Store::open`, `verify`, `list`, `stats`, `load` + `resolve` of every
//! template, and reading every resolved page. Nothing may panic, and:
//!
//! * if `verify` reports no corruption, every template lists, loads and resolves,
//!   and every page a template owns has the bytes its id names (keyed hash);
//! * a resolved template yields exactly `mem_size / 4096` frames.
#![no_main]

use std::hint::black_box;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use snapshot_store::fuzzing as fmt;
use snapshot_store::{Frame, Store, PAGE_SIZE};
use vmm_fuzz::{Scratch, TEMPLATE_NAMES};
use xxhash_rust::xxh3::xxh3_128_with_secret;

/// Largest guest memory resolved/copied per template. `resolve` allocates 16 bytes
/// per frame and `stats` 1 byte per frame, so a 1 TiB manifest (accepted by
/// `validate_manifest`) would make a single input take seconds and GiBs; see the
/// README ("known limits").
const RESOLVE_MAX_MEM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    let dir = SCRATCH.get_or_init(|| Scratch::new("store_dir")).fresh();
    vmm_fuzz::unpack(data, dir);

    let Ok(store) = Store::open(dir) else {
        return;
    };
    let problems = store.verify();
    for p in &problems {
        black_box(p.to_string());
    }
    let healthy = !problems.iter().any(|p| p.is_corruption());
    let secret = std::fs::read(dir.join("store.cfg")).ok();

    let listed = store.list();
    if healthy {
        if let Err(e) = &listed {
            panic!("verify found no corruption but list() fails: {e}");
        }
    }
    let all_small = match &listed {
        Ok(infos) => infos.iter().all(|t| t.mem_size <= RESOLVE_MAX_MEM),
        Err(_) => false,
    };
    if all_small {
        match store.stats() {
            Ok(s) => {
                black_box(s.stored_pages);
            }
            Err(e) => {
                if healthy {
                    panic!("verify found no corruption but stats() fails: {e}");
                }
            }
        }
    }
    let _ = store.page_count();

    for name in TEMPLATE_NAMES {
        let present = dir.join(format!("templates/{name}.tmpl")).exists();
        let t = match store.load(name) {
            Ok(t) => t,
            Err(e) => {
                black_box(e.to_string());
                if healthy && present && !name.starts_with('.') {
                    panic!("verify found no corruption but load({name}) fails: {e}");
                }
                continue;
            }
        };
        let info = t.info();
        black_box(&info);
        if t.mem_size > RESOLVE_MAX_MEM {
            continue;
        }
        let r = match t.resolve(&store) {
            Ok(r) => r,
            Err(e) => {
                black_box(e.to_string());
                if healthy {
                    panic!("verify found no corruption but resolve({name}) fails: {e}");
                }
                continue;
            }
        };
        assert_eq!(r.mem_size(), t.mem_size);
        assert_eq!(r.frame_count(), t.mem_size / PAGE_SIZE as u64);
        assert!(r.layers().last().map(|n| n.as_str()) == Some(*name));
        let mut sum = 0u64;
        let mut nonzero = 0u64;
        for (gfn, f) in r.iter() {
            if let Frame::Data(p) = f {
                nonzero += 1;
                sum = sum.wrapping_add(p[gfn as usize % PAGE_SIZE] as u64);
                sum = sum.wrapping_add(p[PAGE_SIZE - 1] as u64);
            }
        }
        black_box(sum);
        // `nonzero_frames` counts frames mapped to a page; a page that went
        // missing after resolve reads as zero, so it may only be larger.
        assert!(r.nonzero_frames() >= nonzero);
        assert!(r.frame(r.frame_count()).is_none());
        if healthy {
            if let Some(cfg) = &secret {
                let key = &cfg[12..12 + fmt::SECRET_LEN];
                for (gfn, id) in t.own_pages() {
                    match r.frame(gfn) {
                        Some(Frame::Data(p)) => assert_eq!(
                            xxh3_128_with_secret(p, key),
                            id.hash(),
                            "{name}: frame {gfn} resolves to bytes that are not page {id}"
                        ),
                        other => panic!("{name}: own frame {gfn} resolves to {other:?}"),
                    }
                }
            }
        }
        let mut guest = vec![0xa5u8; t.mem_size as usize];
        r.copy_to(&mut guest)
            .expect("copy_to with a buffer of mem_size bytes");
        for (gfn, f) in r.iter() {
            let dst = &guest[gfn as usize * PAGE_SIZE..][..PAGE_SIZE];
            match f {
                Frame::Zero => assert!(dst.iter().all(|&b| b == 0), "frame {gfn} not zeroed"),
                Frame::Data(p) => assert_eq!(dst, &p[..], "frame {gfn} copied wrong"),
            }
        }
        assert!(
            r.copy_to_zeroed(&mut guest[1..]).is_err(),
            "short buffer accepted"
        );
    }
});

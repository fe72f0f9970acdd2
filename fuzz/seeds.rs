//! Seed corpus generator for the fuzz targets.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin make-seeds -- [OUT_DIR]`
//! (default `fuzz/corpus`) writes `OUT_DIR/<target>/<seed>` for every target:
//! a real store built through the snapshot-store API (templates base <- fn <- x,
//! and an unrelated y), its files one by one, and damaged versions of it (truncated
//! pack, flipped bit, bad checksum, missing parent, index entry past the end of the
//! pack, future version, parent cycle, ...) as store directory images, plus the
//! damaged fixtures of snapshot-store's own tests (`snapshot_store::fixtures`);
//! for `import`, real exports of the store's templates and damaged variants.

use std::fs;
use std::path::{Path, PathBuf};

use snapshot_store::fuzzing as fmt;
use snapshot_store::{Store, PAGE_SIZE};
use vmm_abi::{ConfigFile, FunctionConfig, Mailbox, Op, MAILBOX_MAGIC};
use vmm_fuzz::{push_record, seed_page as page, Scratch, FLAG_APPEND, FLAG_FIX, SEED_MEM as MEM};

struct Out {
    root: PathBuf,
    n: usize,
}

impl Out {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.root.join(target);
        fs::create_dir_all(&d).expect("create corpus directory");
        fs::write(d.join(format!("seed-{name}")), bytes).expect("write seed");
        self.n += 1;
    }
}

/// The files of a store directory, by archive path.
type Files = Vec<(&'static str, Vec<u8>)>;

fn build_store(dir: &Path) -> Files {
    let mut s = Store::create_or_open(dir).expect("create store");
    vmm_fuzz::build_seed_templates(&mut s);
    assert!(s.verify().is_empty(), "fresh seed store is not clean");
    drop(s);
    vmm_fuzz::FILES
        .iter()
        .filter_map(|f| fs::read(dir.join(f)).ok().map(|b| (*f, b)))
        .collect()
}

fn get<'a>(files: &'a Files, path: &str) -> &'a Vec<u8> {
    &files.iter().find(|(p, _)| *p == path).unwrap().1
}

fn set(files: &mut Files, path: &'static str, bytes: Vec<u8>) {
    files.retain(|(p, _)| *p != path);
    files.push((path, bytes));
}

fn archive(files: &Files, flags: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (p, b) in files {
        push_record(&mut out, p, flags, b);
    }
    out
}

fn manifest(files: &Files, name: &str) -> fmt::ManifestV1 {
    let p = format!("templates/{name}.tmpl");
    fmt::decode_manifest(Path::new(&p), get(files, &p)).unwrap()
}

const PACK1: &str = "packs/0000000000000001.pack";
const IDX1: &str = "packs/0000000000000001.idx";

fn store_seeds(out: &mut Out, files: &Files) {
    let t = "store_dir";
    out.put(t, "clean", &archive(files, 0));
    out.put(t, "clean-fixed", &archive(files, FLAG_FIX));

    let mut damaged: Vec<(&str, Files)> = Vec::new();
    let pack = get(files, PACK1).clone();
    let idx = get(files, IDX1).clone();

    let mut f = files.clone();
    set(&mut f, PACK1, pack[..pack.len() - 6000].to_vec());
    damaged.push(("truncated-pack", f));

    let mut f = files.clone();
    let mut p = pack.clone();
    p[5 * PAGE_SIZE + 17] ^= 0x10;
    set(&mut f, PACK1, p);
    damaged.push(("flipped-bit", f));

    let mut f = files.clone();
    let mut m = get(files, "templates/fn.tmpl").clone();
    let n = m.len();
    m[n - 3] ^= 1;
    set(&mut f, "templates/fn.tmpl", m);
    damaged.push(("manifest-checksum", f));

    let mut f = files.clone();
    f.retain(|(p, _)| *p != "templates/base.tmpl");
    damaged.push(("missing-parent", f));

    let mut f = files.clone();
    let mut body = idx[fmt::IDX_HEADER..].to_vec();
    fmt::idx_entry_bytes(
        &mut body,
        &fmt::IdxEntry {
            id: fmt::page_id(123, 0),
            offset: 1 << 30,
        },
    );
    set(&mut f, IDX1, fmt::encode_idx(fmt::pack_id(1), &body));
    damaged.push(("index-entry-past-end", f));

    let mut f = files.clone();
    let m = manifest(files, "fn");
    set(
        &mut f,
        "templates/fn.tmpl",
        fmt::encode_manifest_version(&m, 7),
    );
    damaged.push(("future-version", f));

    let mut f = files.clone();
    let mut m = manifest(files, "base");
    m.parent = Some("fn".into());
    set(&mut f, "templates/base.tmpl", fmt::encode_manifest(&m));
    damaged.push(("parent-cycle", f));

    let mut f = files.clone();
    let mut m = manifest(files, "fn");
    m.working_set.push(1 << 40);
    set(&mut f, "templates/fn.tmpl", fmt::encode_manifest(&m));
    damaged.push(("working-set-outside-ram", f));

    let mut f = files.clone();
    let mut m = manifest(files, "fn");
    m.mem_size *= 2;
    set(&mut f, "templates/fn.tmpl", fmt::encode_manifest(&m));
    damaged.push(("size-mismatch", f));

    let mut f = files.clone();
    f.retain(|(p, _)| *p != PACK1);
    damaged.push(("missing-pack", f));

    let mut f = files.clone();
    f.retain(|(p, _)| *p != IDX1);
    damaged.push(("missing-index", f));

    let mut f = files.clone();
    let mut p = pack.clone();
    p.extend_from_slice(&[0x5a; 100]);
    set(&mut f, PACK1, p);
    set(&mut f, "tmp/leftover.tmp", b"half a manifest".to_vec());
    set(&mut f, "packs/junk", b"?".to_vec());
    set(
        &mut f,
        "templates/.hidden.tmpl",
        get(files, "templates/y.tmpl").clone(),
    );
    damaged.push(("torn-tail-and-garbage", f));

    // A second pack holding a copy of pack 1's first page under the same id.
    let mut f = files.clone();
    let mut body = idx[fmt::IDX_HEADER..fmt::IDX_HEADER + fmt::IDX_ENTRY].to_vec();
    body[20..28].copy_from_slice(&0u64.to_le_bytes());
    let first_off = u64::from_le_bytes(idx[fmt::IDX_HEADER + 20..][..8].try_into().unwrap());
    let first = pack[first_off as usize..][..PAGE_SIZE].to_vec();
    set(&mut f, "packs/0000000000000002.pack", first.clone());
    set(
        &mut f,
        "packs/0000000000000002.idx",
        fmt::encode_idx(fmt::pack_id(2), &body),
    );
    damaged.push(("same-page-in-two-packs", f.clone()));
    let mut other = first;
    other[0] ^= 1;
    set(&mut f, "packs/0000000000000002.pack", other);
    damaged.push(("damaged-copy-in-second-pack", f));

    let mut f = files.clone();
    let mut m = manifest(files, "x");
    let mut b = fmt::encode_manifest(&m);
    b[10] = 1; // minor 1 may carry trailing payload bytes
    b.extend_from_slice(&[1, 2, 3]);
    vmm_fuzz::fix_manifest(&mut b);
    set(&mut f, "templates/x.tmpl", b);
    m.name = "y".into();
    set(&mut f, "templates/y.tmpl", fmt::encode_manifest(&m));
    damaged.push(("newer-minor-and-duplicate", f));

    let mut f = files.clone();
    let mut c = get(files, "store.cfg").clone();
    c[8] = 2;
    set(&mut f, "store.cfg", c);
    damaged.push(("future-config", f));

    let mut f = files.clone();
    let mut c = get(files, "store.cfg").clone();
    c[40] ^= 1;
    set(&mut f, "store.cfg", c);
    damaged.push(("config-checksum", f));

    let mut f = files.clone();
    let mut m = manifest(files, "y");
    m.mem_size = 1 << 20;
    m.zero_runs = vec![(8, 8), (255, 1)];
    set(&mut f, "templates/y.tmpl", fmt::encode_manifest(&m));
    damaged.push(("bigger-guest", f));

    for (name, f) in &damaged {
        out.put(t, name, &archive(f, 0));
    }
    // Records that append: a pack written in two halves, a torn index.
    let mut a = archive(files, 0);
    push_record(&mut a, PACK1, FLAG_APPEND, &[0u8; 10]);
    push_record(
        &mut a,
        IDX1,
        FLAG_APPEND | FLAG_FIX,
        &idx[fmt::IDX_HEADER..][..28],
    );
    out.put(t, "appended", &a);
}

/// The damaged stores of snapshot-store's own tests (`snapshot_store::fixtures`),
/// as store directory images.
fn fixture_seeds(out: &mut Out) {
    use snapshot_store::fixtures;
    for damage in fixtures::DAMAGES {
        let scratch = Scratch::new(&format!("make-seeds-{}", damage.name));
        let dir = scratch.fresh();
        drop(fixtures::healthy_store(dir));
        (damage.apply)(dir);
        let files: Files = vmm_fuzz::FILES
            .iter()
            .filter_map(|f| fs::read(dir.join(f)).ok().map(|b| (*f, b)))
            .collect();
        out.put(
            "store_dir",
            &format!("fixture-{}", damage.name),
            &archive(&files, 0),
        );
    }
}

fn file_seeds(out: &mut Out, files: &Files) {
    for (p, b) in files {
        let tag = p.replace('/', "_");
        if p.ends_with(".tmpl") {
            let mut s = vec![0u8];
            s.extend_from_slice(b);
            out.put("manifest", &format!("file-{tag}"), &s);
            let mut s = vec![1u8];
            s.extend_from_slice(&b[fmt::MAN_HEADER..]);
            out.put("manifest", &format!("payload-{tag}"), &s);
        } else if p.ends_with(".idx") {
            for mode in [0u8, 1] {
                let mut s = vec![mode];
                s.extend_from_slice(b);
                out.put("pack_index", &format!("{mode}-{tag}"), &s);
            }
        } else if p.ends_with(".loc") {
            // Mode 1 re-keys the checksum, so the body's decoder is reached.
            for mode in [0u8, 1] {
                let mut s = vec![mode];
                s.extend_from_slice(b);
                out.put("locations", &format!("{mode}-{tag}"), &s);
            }
        } else if *p == "store.cfg" {
            for mode in [2u8, 3] {
                let mut s = vec![mode];
                s.extend_from_slice(b);
                out.put("pack_index", &format!("{mode}-{tag}"), &s);
            }
        }
    }
    // Manifests the validator must refuse, as payloads behind a valid header.
    let base = manifest(files, "base");
    let variants: Vec<(&str, fmt::ManifestV1)> = vec![
        ("overlap", {
            let mut m = base.clone();
            m.zero_runs.push((0, 2));
            m
        }),
        ("huge-mem", {
            let mut m = base.clone();
            m.mem_size = 1 << 40;
            m.zero_runs = vec![((1 << 28) - 1, 1)];
            m
        }),
        ("run-past-end", {
            let mut m = base.clone();
            m.zero_runs = vec![(u64::MAX, 2)];
            m
        }),
        ("bad-names", {
            let mut m = base.clone();
            m.name = "../etc".into();
            m.parent = Some(String::new());
            m
        }),
    ];
    for (name, m) in variants {
        let b = fmt::encode_manifest(&m);
        let mut s = vec![1u8];
        s.extend_from_slice(&b[fmt::MAN_HEADER..]);
        out.put("manifest", name, &s);
    }
}

fn mailbox_seeds(out: &mut Out) {
    let cfg = FunctionConfig {
        args: vec![&b"qjs"[..], b"--std", b"hello.js"],
        env: vec![&b"A=1"[..], b"PATH=/"],
        files: vec![
            ConfigFile {
                path: b"hello.js",
                data: b"console.log('hi')",
            },
            ConfigFile {
                path: b"lib/x.js",
                data: b"export default 1",
            },
        ],
    }
    .encode();
    let mem: u64 = 512 << 20;
    let cases: [(&str, u64, [u64; 6]); 9] = [
        (
            "get-function",
            Op::GetFunction as u64,
            [0x160_0000, 4096, 0, 0, 0, 0],
        ),
        (
            "read-stdin",
            Op::ReadStdin as u64,
            [0x170_0000, 65536, 0, 0, 0, 0],
        ),
        ("write", Op::Write as u64, [1, 0x180_0000, 100, 0, 0, 0]),
        (
            "exit",
            Op::Exit as u64,
            [0, 0x180_0000, 10, 0x190_0000, 5, 0],
        ),
        (
            "fault",
            Op::Fault as u64,
            [14, 2, 0x20_1000, 0xdead_0000, 0xdf_fff8, 0],
        ),
        ("panic", Op::Panic as u64, [0x180_0000, 20, 1, 0, 0, 0]),
        ("error", Op::Error as u64, [3, 0x180_0000, 30, 0, 0, 0]),
        ("end-of-ram", Op::Write as u64, [2, mem - 16, 16, 0, 0, 0]),
        ("unknown-op", 99, [0; 6]),
    ];
    for (name, op, args) in cases {
        let mb = Mailbox {
            magic: MAILBOX_MAGIC,
            abi_version: 1,
            mem_size: mem,
            op,
            args,
            ..Default::default()
        };
        let mut s = mem.to_le_bytes().to_vec();
        s.extend_from_slice(&mb.to_bytes());
        s.extend_from_slice(&cfg);
        out.put("mailbox", name, &s);
    }
}

/// `hostcall`: runs as the guest kernel makes them (function, body, output, grants, exit),
/// fragmenting grants, and malformed ones (see `vmm_fuzz::hostcall_input`).
fn hostcall_seeds(out: &mut Out) {
    use vmm_fuzz::hostcall_input::Builder;
    let cfg = FunctionConfig {
        args: vec![&b"fn"[..]],
        ..Default::default()
    }
    .encode();
    // 16 MiB (8 regions), the fixed grants, 64 KiB of output.
    let mem: u64 = 16 << 20;
    let mut b = Builder::header(7, true, 1024, Some(&cfg), Some(b"hello, world"));
    b.call(Op::GetFunction as u64, &[0x1000, 4])
        .call(Op::GetFunction as u64, &[0x1000, cfg.len() as u64])
        .call(Op::ReadStdin as u64, &[0x2000, 5])
        .call(Op::ReadStdin as u64, &[0x2000, 4096])
        .call(Op::Grant as u64, &[4 << 20, 4 << 20])
        .poke(0x3000, b"output!")
        .call(Op::Write as u64, &[1, 0x3000, 7])
        .call(Op::Write as u64, &[2, 0x3000, 3])
        .call(Op::Exit as u64, &[0, 0x3000, 7, 0x3000, 2, 1]);
    out.put("hostcall", "run", &b.b);
    // A pooled instance: stopped at its read, answered with a new body.
    let mut b = Builder::header(7, true, 1024, Some(&cfg), None);
    b.call(Op::GetFunction as u64, &[0x1000, 4096])
        .call(Op::ReadStdin as u64, &[0x2000, 4096])
        .answer(b"next request")
        .call(Op::Exit as u64, &[0, 0x2000, 12, 0, 0, 0]);
    out.put("hostcall", "pooled", &b.b);
    // Buffers over the mailbox and the grant map; output at the end of RAM.
    let mut b = Builder::header(7, false, 1024, Some(&cfg), Some(&[0x55; 300]));
    b.call(Op::GetFunction as u64, &[0x8000 - 8, 4096])
        .call(Op::ReadStdin as u64, &[0xa000 - 100, 300])
        .call(Op::Write as u64, &[1, mem - 16, 16])
        .call(Op::Grant as u64, &[0, mem]);
    out.put("hostcall", "overlap", &b.b);
    // 320 MiB, every other region granted one by one: past the slot limit.
    let mut b = Builder::header(0xf0, true, 16, None, None);
    b.grants(11, 1, 100);
    out.put("hostcall", "fragments", &b.b);
    for (name, op, args) in [
        ("oob", Op::ReadStdin as u64, vec![mem - 8, 16]),
        (
            "oversize",
            Op::Write as u64,
            vec![1, 0, vmm_abi::MAX_TRANSFER_LEN + 1],
        ),
        ("limit", Op::Write as u64, vec![1, 0x1000, 65537]),
        ("unaligned", Op::Grant as u64, vec![0x1000, 2 << 20]),
        ("panic", Op::Panic as u64, vec![0x3000, 7, 1]),
        ("error", Op::Error as u64, vec![1, 0x3000, 7]),
        (
            "fault",
            Op::Fault as u64,
            vec![14, 2, 0x20_1000, 0xdead_0000, 0xdf_fff8],
        ),
        ("unknown", 99, vec![]),
    ] {
        let mut b = Builder::header(7, true, 1024, None, None);
        b.poke(0x3000, b"message").call(op, &args);
        out.put("hostcall", name, &b.b);
    }
}

fn state_seeds(out: &mut Out) {
    let pat = |n: usize, k: u8| {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(k))
            .collect::<Vec<u8>>()
    };
    for (name, backend) in [("kvm", "kvm"), ("pvm", "pvm")] {
        let s = vmm::persist::VcpuState {
            version: vmm::persist::VCPU_STATE_VERSION,
            backend: backend.into(),
            tsc_khz: 2_900_000,
            regs: pat(144, 3),
            sregs: pat(312, 5),
            xsave: pat(4096, 7),
            xcrs: pat(392, 11),
            events: pat(64, 13),
            debugregs: pat(128, 17),
            msrs: vec![(0x10, 1 << 40), (0xc000_0080, 0xd01), (0x4b56_4d01, 0x1000)],
            clock: pat(48, 19),
        };
        let mut b = vec![0u8];
        b.extend_from_slice(&s.encode());
        out.put("vcpu_state", &format!("vcpu-{name}"), &b);
    }
    let provenance = vmm::template::device::Provenance {
        module_hash: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        module_name: "qjs-wasi-reactor.wasm".into(),
        runtime: "qjs".into(),
        engine: vmm::template::device::ENGINES[0].into(),
        mem_size: 512 << 20,
        kernel_hash: 0x1234_5678_9abc_def0,
        abi_version: 1,
    };
    for version in [1, vmm::template::device::DEVICE_STATE_VERSION] {
        for (name, op, args) in [
            ("device-base", 1u64, vec![]),
            ("device-fn", 2, vec!["hello.js".to_string(), "--x".into()]),
        ] {
            let d = vmm::template::device::DeviceState {
                version,
                pending_op: op,
                buf_gpa: 0x160_0000,
                buf_len: 4096,
                runtime: "qjs".into(),
                module_name: "qjs-wasi-reactor.wasm".into(),
                args,
                provenance: Some(provenance.clone()),
                base: (op == 2).then(|| vmm::template::device::BaseRef {
                    name: "base".into(),
                    created_unix_ms: 1_700_000_000_000,
                }),
            };
            let mut b = vec![1u8];
            b.extend_from_slice(&d.encode());
            out.put("vcpu_state", &format!("{name}-v{version}"), &b);
        }
    }
}

/// `import`: mode byte (bit 0 = fix checksums, bit 1 = import into a copy of the
/// seed store) + real exports of the seed store's templates (base alone, the fn
/// chain, base <- fn <- x, y), then truncated and bit-flipped variants of the fn
/// chain's export, and templates that conflict with the seed store's.
fn import_seeds(out: &mut Out, dir: &Path) {
    let t = "import";
    let s = Store::open(dir).expect("reopen the seed store");
    let mut exports = Vec::new();
    for name in ["base", "fn", "x", "y"] {
        let mut f = Vec::new();
        s.export(name, &mut f).expect("export a seed template");
        for mode in [0u8, 1, 2, 3] {
            let mut b = vec![mode];
            b.extend_from_slice(&f);
            out.put(t, &format!("export-{name}-{mode}"), &b);
        }
        exports.push((name, f));
    }
    // Importing each export into a fresh store must work (sanity of the seeds).
    let check = Scratch::new("make-seeds-import");
    for (name, f) in &exports {
        let mut s = Store::create_or_open(check.fresh()).expect("create store");
        s.import(&f[..])
            .unwrap_or_else(|e| panic!("seed export of {name} does not import: {e}"));
    }
    let f = &exports[1].1;
    let n = f.len();
    // Cut inside the header, a manifest length, a manifest, the first/last page
    // record and the trailer; and one byte short / one byte too many.
    for cut in [
        0,
        7,
        20,
        32,
        36,
        60,
        300,
        n / 2,
        n - 4200,
        n - 17,
        n - 9,
        n - 1,
    ] {
        if cut < n {
            for mode in [0u8, 1] {
                let mut b = vec![mode];
                b.extend_from_slice(&f[..cut]);
                out.put(t, &format!("trunc-{cut}-{mode}"), &b);
            }
        }
    }
    let mut long = vec![0u8];
    long.extend_from_slice(f);
    long.push(0);
    out.put(t, "trailing-byte", &long);
    // Flipped bits: header fields (version, counts), manifest length and body,
    // a page hash/slot/byte/checksum, the trailer.
    for at in [
        9,
        12,
        16,
        24,
        32,
        40,
        80,
        n / 2,
        n - 4200,
        n - 4110,
        n - 10,
        n - 12,
        n - 1,
    ] {
        for mode in [0u8, 1] {
            let mut b = vec![mode];
            b.extend_from_slice(f);
            b[1 + at] ^= 1 << (at % 8);
            out.put(t, &format!("flip-{at}-{mode}"), &b);
        }
    }
    // Zero the page count / raise the template count, checksums fixed by the target.
    let mut b = vec![1u8];
    b.extend_from_slice(f);
    b[1 + 16..1 + 24].copy_from_slice(&0u64.to_le_bytes());
    out.put(t, "zero-pages", &b);
    let mut b = vec![1u8];
    b.extend_from_slice(f);
    b[1 + 12..1 + 16].copy_from_slice(&300u32.to_le_bytes());
    out.put(t, "many-templates", &b);
    // Two concatenated exports (trailing bytes) and an empty file.
    let mut b = vec![0u8];
    b.extend_from_slice(&exports[0].1);
    b.extend_from_slice(&exports[3].1);
    out.put(t, "two-exports", &b);
    out.put(t, "empty", &[1u8]);
    // Conflicts with the seed store: a base of other pages; fn on a y; x of another size.
    let conflict = Scratch::new("make-seeds-conflict");
    let mut s = Store::create_or_open(conflict.fresh()).expect("create store");
    let mut w = s.begin_template("base", None, MEM).unwrap();
    w.put_page(0, &page(999)).unwrap();
    w.commit().unwrap();
    let mut w = s.begin_template("y", None, 8 * PAGE_SIZE as u64).unwrap();
    w.put_page(0, &page(200)).unwrap();
    w.commit().unwrap();
    let mut w = s
        .begin_template("fn", Some("y"), 8 * PAGE_SIZE as u64)
        .unwrap();
    w.put_page(1, &page(103)).unwrap();
    w.commit().unwrap();
    let mut w = s.begin_template("x", None, 2 * MEM).unwrap();
    w.put_page(7, &page(2)).unwrap();
    w.commit().unwrap();
    for name in ["base", "fn", "x"] {
        let mut f = vec![3u8];
        s.export(name, &mut f)
            .expect("export a conflicting template");
        out.put(t, &format!("conflict-{name}"), &f);
    }
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus")));
    let scratch = Scratch::new("make-seeds");
    let files = build_store(scratch.fresh());
    let mut out = Out { root, n: 0 };
    store_seeds(&mut out, &files);
    import_seeds(&mut out, &scratch.dir);
    fixture_seeds(&mut out);
    file_seeds(&mut out, &files);
    mailbox_seeds(&mut out);
    hostcall_seeds(&mut out);
    state_seeds(&mut out);
    println!(
        "make-seeds: wrote {} seeds under {}",
        out.n,
        out.root.display()
    );
}

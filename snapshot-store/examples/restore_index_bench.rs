//! Bench (issue 17 item 3): the store work of restoring one function template from
//! a store holding 1,000 function templates on one base, against the same restore
//! from a store holding only that template and its base.
//!
//! Measured per restore, in this process, without KVM: open the store, load the
//! manifest, resolve the parent chain, and read every data page of the template
//! verified by its hash (what an eager `vmm restore` does with the store before
//! it copies pages into guest memory). Both ways to open are shown:
//! `Store::open_lazy` (location records; what `vmm restore` uses) and
//! `Store::open` (every pack index read up front).
//!
//! ```text
//! nice -n 19 cargo run --release -p snapshot-store --features fixtures --example restore_index_bench -- [DIR] [RUNS]
//! ```
//! DIR (default: a directory under /tmp) keeps the two stores between runs;
//! RUNS (default 30) restores per configuration, interleaved, after 3 warm-up rounds.
//!
//! `restore_index_bench grow STORE N` adds N small function templates on the
//! base `base` of a real store (one made by `vmm template create`), for
//! timing `vmm restore` end to end in a store of 1,000 templates (see
//! `tools/bench-restore-index.sh`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use snapshot_store::fixtures::page;
use snapshot_store::{Frame, Store};

const TEMPLATES: usize = 1000;
/// Guest memory of every template.
const MEM: u64 = 64 << 20;
/// Non-zero pages of the base (~8.4 MiB, as the JavaScript runtime base in the README).
const BASE_PAGES: u64 = 2150;
/// Own pages of each function template (~147 KiB, the README's average increment).
const FN_PAGES: u64 = 37;
/// The template restored.
const PICK: usize = 500;

fn fn_name(i: usize) -> String {
    format!("fn-{i:04}")
}

fn write_base(s: &mut Store) {
    let mut w = s.begin_template("base", None, MEM).expect("begin base");
    for f in 0..BASE_PAGES {
        w.put_page(f * 3, &page(f)).expect("base page");
    }
    w.set_vcpu_state(vec![1; 4096]);
    w.set_device_state(vec![2; 1024]);
    w.commit().expect("commit base");
}

/// Function `i`: a few base frames changed, the rest new frames above the base's.
fn write_fn(s: &mut Store, i: usize) {
    let mut w = s
        .begin_template(&fn_name(i), Some("base"), MEM)
        .expect("begin fn");
    let seed = 1_000_000 + i as u64 * 1000;
    for k in 0..FN_PAGES {
        let frame = if k < 8 { k * 3 } else { BASE_PAGES * 3 + k };
        w.put_page(frame, &page(seed + k)).expect("fn page");
    }
    w.set_vcpu_state(vec![3; 4096]);
    w.set_device_state(vec![4; 1024]);
    w.set_working_set((0..FN_PAGES).collect());
    w.commit().expect("commit fn");
}

fn build(dir: &Path, fns: &[usize]) {
    if dir.join("templates/base.tmpl").exists() {
        return;
    }
    let t = Instant::now();
    let mut s = Store::create_or_open(dir).expect("create store");
    write_base(&mut s);
    for &i in fns {
        write_fn(&mut s, i);
    }
    eprintln!(
        "built {} ({} function templates) in {:.1} s",
        dir.display(),
        fns.len(),
        t.elapsed().as_secs_f64()
    );
}

/// One restore's store work: (open+load+resolve ms, total ms, pages read, from records).
fn restore(dir: &Path, lazy: bool, name: &str) -> (f64, f64, u64, bool) {
    let t = Instant::now();
    let s = if lazy {
        Store::open_lazy(dir)
    } else {
        Store::open(dir)
    }
    .expect("open");
    let tmpl = s.load(name).expect("load");
    let r = tmpl.resolve(&s).expect("resolve");
    let resolved = t.elapsed().as_secs_f64() * 1e3;
    let mut sum = 0u64;
    let mut pages = 0u64;
    for f in r.data_frames() {
        if let Some(Frame::Data(p)) = r.frame_verified(f).expect("verified page") {
            sum = sum.wrapping_add(u64::from(p[0]));
            pages += 1;
        }
    }
    std::hint::black_box(sum);
    let total = t.elapsed().as_secs_f64() * 1e3;
    (resolved, total, pages, r.from_locations())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
fn p90(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

/// `grow DIR N`: adds N small function templates (random pages) on the base
/// `base` of the store at DIR, e.g. one made by `vmm template create`, for an
/// end-to-end comparison of `vmm restore` in a small and a large store.
fn grow(dir: &Path, n: usize) {
    let mut s = Store::open(dir).expect("open store");
    let base = s.load("base").expect("load base");
    // The vCPU and device state of a real function layer when there is one (`fn`),
    // so that the new layers are function templates to `vmm-store verify` too.
    let like = s.load("fn").unwrap_or_else(|_| base.clone());
    let frames = base.frames();
    let t = Instant::now();
    for i in 0..n {
        let name = format!("bench-fn-{i:04}");
        let mut w = s
            .begin_template(&name, Some("base"), base.mem_size)
            .expect("begin");
        let seed = 9_000_000 + i as u64 * 1000;
        for k in 0..FN_PAGES {
            w.put_page((seed + k * 7919) % frames, &page(seed + k))
                .expect("page");
        }
        w.set_vcpu_state(like.vcpu_state.clone());
        w.set_device_state(like.device_state.clone());
        w.commit().expect("commit");
    }
    eprintln!(
        "added {n} function templates to {} in {:.1} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    if std::env::args().nth(1).as_deref() == Some("grow") {
        let dir = std::env::args().nth(2).expect("grow DIR N");
        let n = std::env::args()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .expect("grow DIR N");
        grow(Path::new(&dir), n);
        return;
    }
    let root = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("restore-index-bench"));
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let small = root.join("one");
    let big = root.join("thousand");
    build(&small, &[PICK]);
    build(&big, &(0..TEMPLATES).collect::<Vec<_>>());
    let name = fn_name(PICK);
    let configs = [
        ("base + 1 function", &small, true),
        ("base + 1,000 functions", &big, true),
        ("base + 1 function", &small, false),
        ("base + 1,000 functions", &big, false),
    ];
    let mut res: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut tot: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut info = vec![(0u64, false); configs.len()];
    for round in 0..runs + 3 {
        // Interleaved, in a rotating order.
        for k in 0..configs.len() {
            let c = (k + round) % configs.len();
            let (_, dir, lazy) = configs[c];
            let (r, t, pages, located) = restore(dir, lazy, &name);
            info[c] = (pages, located);
            if round >= 3 {
                res[c].push(r);
                tot[c].push(t);
            }
        }
    }
    println!(
        "Restore store work of {name} (own pages {FN_PAGES}, base {BASE_PAGES} pages, guest {} MiB), median of {runs}, interleaved:\n",
        MEM >> 20
    );
    println!("| store | opened with | pages located by | open+load+resolve ms | + read {} verified pages: total ms | p90 total ms | total vs 1-function store |", info[0].0);
    println!("|---|---|---|---:|---:|---:|---:|");
    let mut base_total = [0.0f64; 2];
    for (c, (label, _, lazy)) in configs.iter().enumerate() {
        let r = median(&mut res[c]);
        let t = median(&mut tot[c]);
        let p = p90(&mut tot[c]);
        let slot = usize::from(!*lazy);
        if c % 2 == 0 {
            base_total[slot] = t;
        }
        println!(
            "| {label} | {} | {} | {r:.3} | {t:.3} | {p:.3} | {:.2}x |",
            if *lazy {
                "Store::open_lazy"
            } else {
                "Store::open"
            },
            if info[c].1 {
                "location records"
            } else {
                "pack indexes"
            },
            t / base_total[slot]
        );
    }
}

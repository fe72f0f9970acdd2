#!/usr/bin/env bash
# Issue 17 item 3, end to end: wall time of `vmm restore fn` (QuickJS hello.js on its
# runtime base, made by `vmm template create`) in a store holding only it and its base,
# against the same store grown by 999 more function templates (small synthetic layers on
# the same base, written through the store API by the restore_index_bench example).
# Interleaved, median of RUNS (default 20) after 2 warm-up rounds each.
#
#   nice -n 19 cargo build --release -p vmm-cli -p vmm-store-tools
#   nice -n 19 cargo build --release -p snapshot-store --features fixtures --example restore_index_bench
#   ./tools/fetch-workloads.sh
#   tools/bench-restore-index.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release"
work="${1:-$(mktemp -d)}"
runs="${RUNS:-20}"
small="$work/one"
big="$work/thousand"
if [ ! -e "$small/templates/fn.tmpl" ]; then
  "$bin/vmm" template create fn --base base --store "$small" \
    --module "$root/workloads/qjs-wasi-reactor.wasm" --runtime qjs \
    --file "$root/examples/hello.js" --arg hello.js >/dev/null
fi
if [ ! -e "$big/templates/bench-fn-0998.tmpl" ]; then
  rm -rf "$big"
  cp -r "$small" "$big"
  # A copied store's packs are other files: gc rewrites the location records for them.
  "$bin/vmm-store" gc --store "$big" >/dev/null
  "$bin/examples/restore_index_bench" grow "$big" 999
fi
# The same large store as a store from before location records: restores read every
# pack index (what every restore did before issue 17 item 3).
norec="$work/thousand-without-records"
if [ ! -e "$norec/templates/bench-fn-0998.tmpl" ]; then
  rm -rf "$norec"
  cp -r "$big" "$norec"
  rm -f "$norec"/templates/*.loc
fi
python3 - "$bin/vmm" "$small" "$big" "$runs" "$norec" <<'PY'
import subprocess, sys, time, statistics, os
vmm, small, big, runs, norec = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
req = b'{"name":"store"}'
want = b'{"greeting":"Hello, store!","length":5}\n'
def count(d):
    return len([f for f in os.listdir(os.path.join(d, "templates")) if f.endswith(".tmpl")])
def idx_bytes(d):
    p = os.path.join(d, "packs")
    return sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".idx"))
stores = [("base + fn", small), ("base + fn + 999 functions", big),
          ("base + fn + 999 functions, no location records (as before)", norec)]
times = {s: [] for _, s in stores}
for r in range(runs + 2):
    for k in range(len(stores)):
        label, d = stores[(k + r) % len(stores)]
        t = time.perf_counter()
        out = subprocess.run([vmm, "restore", "fn", "--store", d], input=req,
                             capture_output=True, check=True).stdout
        dt = (time.perf_counter() - t) * 1e3
        assert out == want, out
        if r >= 2:
            times[d].append(dt)
print(f"`vmm restore fn` (QuickJS hello.js, default --memory), process wall time, median of {runs}, interleaved:\n")
print("| store | templates | pack index bytes | median ms | p90 ms | vs base + fn |")
print("|---|---:|---:|---:|---:|---:|")
m0 = statistics.median(times[small])
for label, d in stores:
    v = sorted(times[d])
    m = statistics.median(v)
    p90 = v[min(len(v) - 1, len(v) * 9 // 10)]
    print(f"| {label} | {count(d)} | {idx_bytes(d)} | {m:.2f} | {p90:.2f} | {m / m0:.3f}x |")
PY

#!/usr/bin/env bash
# The main job: fetch the workloads, build the VMM and its guest kernel, and run the
# JavaScript example functions, printing the response and a timing breakdown.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/fetch-workloads.sh
cargo build --release --locked
vmm=target/release/vmm
qjs=workloads/qjs-wasi-reactor.wasm

echo "== cold: hello.js =="
echo '{"name":"world"}' | $vmm run --module $qjs --runtime qjs --file examples/hello.js --arg hello.js --stats
echo "== cold: markdown.js (imports marked from npm) =="
printf '# Title\n\nSome *markdown*.\n' | $vmm run --module $qjs --runtime qjs \
  --file examples/markdown.js --file workloads/marked.esm.js --arg markdown.js --stats

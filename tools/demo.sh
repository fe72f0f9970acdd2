#!/usr/bin/env bash
# The main job: install missing system packages (tools/setup.sh), fetch the pinned
# workloads, build the VMM (which builds the guest kernel), then serve the JavaScript
# example functions: the first time cold (`vmm run`) while their
# templates are created in the default store, then from the templates (`vmm restore`),
# printing the response and a timing breakdown of each.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
cargo build --release --locked -p vmm
vmm=target/release/vmm
qjs=workloads/qjs-wasi-reactor.wasm
store="${VMM_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/vmm/store}"
echo "store: $store"

serve() { # name request -- function args...
  local name=$1 request=$2
  shift 3
  if ! $vmm template ls --store "$store" 2>/dev/null | grep -q "^$name "; then
    echo "== $name: no template yet: cold run =="
    printf '%s' "$request" | $vmm run "$@" --stats
    echo "== $name: creating the template =="
    $vmm template create "$name" --store "$store" "$@"
  fi
  echo "== $name: restore from the template =="
  printf '%s' "$request" | $vmm restore "$name" --store "$store" --stats
}

serve hello '{"name":"world"}' -- \
  --module $qjs --runtime qjs --file examples/hello.js --arg hello.js
serve markdown $'# Title\n\nSome *markdown*, rendered by [marked](https://marked.js.org).\n' -- \
  --module $qjs --runtime qjs --file examples/markdown.js --file workloads/marked.esm.js --arg markdown.js

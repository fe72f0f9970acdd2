#!/usr/bin/env bash
# The main job: install missing system packages (tools/setup.sh), fetch the pinned
# workloads, build the VMM (which builds the guest kernel), make sure the example functions
# have templates in the default store (the first time: a cold `vmm run` of each, then
# `vmm template create`), restore each once from the CLI, then start `vmm serve` on that
# store, invoke every example over HTTP with curl (a real client), print each response with
# the client's and the server's timings, and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
cargo build --release --locked -p vmm-cli
vmm=target/release/vmm
qjs=workloads/qjs-wasi-reactor.wasm
store="${VMM_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/vmm/store}"
echo "store: $store"

ensure() { # name request -- function args...
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

ensure hello '{"name":"world"}' -- \
  --module $qjs --runtime qjs --file examples/hello.js --arg hello.js
ensure markdown $'# Title\n\nSome *markdown*, rendered by [marked](https://marked.js.org).\n' -- \
  --module $qjs --runtime qjs --file examples/markdown.js --file workloads/marked.esm.js --arg markdown.js
ensure upper $'text for a WASI command module\n' -- --module examples/upper.wat --arg one --arg two
ensure hello-py '{"name":"world"}' -- \
  --module workloads/python.wasm --runtime python --file examples/hello.py --arg hello.py
ensure wordfreq-py $'the quick brown fox jumps over the lazy dog; the dog sleeps\n' -- \
  --module workloads/python.wasm --runtime python --file examples/wordfreq.py --arg wordfreq.py

command -v curl >/dev/null || { echo "demo: curl is needed for the HTTP part (apt-get install curl)" >&2; exit 1; }
echo "== vmm serve: pools of ready instances, each reset to its template after every request =="
log="$(mktemp)"
$vmm serve --store "$store" --listen 127.0.0.1:0 2>"$log" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 300); do
  addr="$(sed -n 's/^vmm serve: listening on //p' "$log")"
  [ -n "$addr" ] && break
  kill -0 $daemon 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "demo: vmm serve did not start" >&2; cat "$log" >&2; exit 1; }
echo "listening on $addr"

invoke() { # name request
  local name=$1 request=$2 i
  echo "-- POST /v1/functions/$name/invoke"
  printf '%s' "$request" | curl -sS --data-binary @- "http://$addr/v1/functions/$name/invoke"
  for i in 1 2 3 4 5; do
    printf '%s' "$request" | curl -sS -o /dev/null --data-binary @- \
      -w "   client: %{http_code} in %{time_total}s" \
      -D - "http://$addr/v1/functions/$name/invoke" | tr -d '\r' | sed -n 's/^x-vmm-run-ms: \(.*\)/   (server: guest run \1 ms)/p;/client:/p' | tr '\n' ' '
    echo
  done
}
invoke hello '{"name":"world"}'
invoke markdown $'# Title\n\nSome *markdown*, rendered by [marked](https://marked.js.org).\n'
invoke upper $'text for a WASI command module\n'
invoke hello-py '{"name":"world"}'
invoke wordfreq-py $'the quick brown fox jumps over the lazy dog; the dog sleeps\n'
echo "-- GET /v1/functions"
curl -sS "http://$addr/v1/functions"; echo
echo "-- SIGTERM: drain and stop"
kill -TERM $daemon
wait $daemon && echo "vmm serve exited 0"
grep -E 'invoke|drain' "$log" | tail -4 || true

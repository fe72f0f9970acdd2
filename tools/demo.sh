#!/usr/bin/env bash
# The main job: install missing system packages (tools/setup.sh), fetch the pinned
# workloads, build the VMM (which builds the guest kernel), start `vmm serve` with a bearer
# token of its own and the JavaScript and Python runtimes, deploy the example functions
# through its HTTP API (the raw API with curl for one, the `vmm fn` client for the rest),
# invoke each over HTTP with curl (a real client) showing SEUSS's cold, warm and hot paths
# with the client's and the server's timings, replace one under the same name, list them,
# and stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
cargo build --release --locked -p vmm-cli
command -v curl >/dev/null || { echo "demo: curl is needed (apt-get install curl)" >&2; exit 1; }
vmm="$PWD/target/release/vmm"
store="${VMM_STORE:-${XDG_DATA_HOME:-$HOME/.local/share}/vmm/store}"
echo "store: $store"

work="$(mktemp -d)"
daemon=""
trap '[ -n "$daemon" ] && kill $daemon 2>/dev/null; rm -rf "$work"' EXIT
# A token for this run: the daemon keeps only its SHA-256.
token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "demo sha256:$(printf %s "$token" | sha256sum | cut -d' ' -f1) deploy,invoke,metrics" >"$work/auth"
printf %s "$token" >"$work/token"
export VMM_TOKEN_FILE="$work/token"

echo "== vmm serve: the deploy API on, JavaScript and Python runtimes given =="
"$vmm" serve --store "$store" --listen 127.0.0.1:0 --auth "$work/auth" \
  --runtime-module js=workloads/qjs-wasi-reactor.wasm \
  --runtime-module python=workloads/python.wasm 2>"$work/log" &
daemon=$!
addr=""
for _ in $(seq 1 300); do
  addr="$(sed -n 's/^vmm serve: listening on //p' "$work/log")"
  [ -n "$addr" ] && break
  kill -0 $daemon 2>/dev/null || { cat "$work/log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "demo: vmm serve did not start" >&2; cat "$work/log" >&2; exit 1; }
export VMM_URL="http://$addr"
echo "listening on $addr"
auth=(-H "Authorization: Bearer $token")

echo "== deploy hello with the raw API: PUT /v1/functions/hello (the first JS deploy builds the runtime base) =="
python3 -c 'import json,sys; print(json.dumps({"runtime":"js","entry":"hello.js","source":open(sys.argv[1]).read()}))' \
  examples/hello.js >"$work/hello.json"
curl -sS -X PUT "${auth[@]}" -H 'content-type: application/json' --data-binary @"$work/hello.json" \
  "http://$addr/v1/functions/hello"
echo
echo "== deploy the rest with the client: vmm fn deploy =="
"$vmm" fn deploy markdown --runtime js --source examples/markdown.js --file workloads/marked.esm.js
"$vmm" fn deploy upper --runtime wasi --module examples/upper.wat --arg one --arg two
"$vmm" fn deploy hello-py --runtime python --source examples/hello.py
"$vmm" fn deploy wordfreq-py --runtime python --source examples/wordfreq.py
"$vmm" fn deploy web --runtime js --source examples/http.js --interface http --public
# Built on its first request: SEUSS's cold start.
"$vmm" fn deploy lazy --runtime js --source examples/hello.js --lazy

invoke() { # name request [extra curl args...]: the response, then each request's timings
  local name=$1 request=$2 i
  shift 2
  echo "-- POST /v1/functions/$name/invoke"
  for i in 1 2 3 4 5; do
    printf '%s' "$request" | curl -sS "${auth[@]}" "$@" -o "$work/body" --data-binary @- \
      -w "client %{http_code} %{time_total}\n" -D - "http://$addr/v1/functions/$name/invoke" \
      | tr -d '\r' | awk '/^x-vmm-path:/{p=$2} /^x-vmm-run-ms:/{r=$2} /^client /{c=$2; t=$3}
          END{printf "   %s in %.2f ms at the client (%s path, guest run %s ms)\n", c, t*1000, p, r}'
    if [ "$i" = 1 ]; then
      sed 's/^/   | /' "$work/body"
      echo
    fi
  done
}
echo "== invoke: the first request of 'lazy' builds its template (cold), the rest are warm or hot =="
invoke lazy '{"name":"cold start"}'
invoke hello '{"name":"world"}'
invoke markdown $'# Title\n\nSome *markdown*, rendered by [marked](https://marked.js.org).\n'
invoke upper $'text for a WASI command module\n'
invoke hello-py '{"name":"world"}'
invoke wordfreq-py $'the quick brown fox jumps over the lazy dog; the dog sleeps\n'
echo "== the http interface (AWS Lambda's payload 2.0), public: no token =="
curl -sS -i --data-binary 'some text' "http://$addr/v1/functions/web/invoke?lang=en" | tr -d '\r' \
  | grep -iv '^date:'
echo
echo "== replace hello under the same name: requests from now on get its next version =="
sed 's/Hello, /Hi again, /' examples/hello.js >"$work/hello.js"
"$vmm" fn deploy hello --runtime js --source "$work/hello.js"
printf '{"name":"world"}' | "$vmm" fn invoke hello
echo
echo "== vmm fn ls =="
"$vmm" fn ls
echo "-- SIGTERM: drain and stop"
kill -TERM $daemon
wait $daemon && echo "vmm serve exited 0"
daemon=""
grep -E 'built on|deployed|drain' "$work/log" | tail -6 || true

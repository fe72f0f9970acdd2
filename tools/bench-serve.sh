#!/usr/bin/env bash
# Load benchmark of `vmm serve` (issue 8, section 4): builds the release binaries, fetches
# the pinned workloads, installs the HTTP load generator oha (cached), then runs
# tools/bench_serve.py, which prints markdown tables on stdout (progress on stderr).
#
#   tools/bench-serve.sh             full run (5 s per load point)
#   tools/bench-serve.sh --quick     smoke run (1 s per point, concurrency 1 and 16)
#   tools/bench-serve.sh --json      everything as one JSON object instead of tables
#   tools/bench-serve.sh --seconds 10 --runs 30   (see tools/bench_serve.py --help)
#   tools/bench-serve.sh --sections faas --burst 100   issue 20's deploy API bench (smoke size)
#
# Templates go into a store in a temporary directory, never the default store. Every
# `vmm serve` daemon the driver starts is killed when it ends, and again here from the
# PIDs it records, whatever the exit path (error, Ctrl-C, SIGTERM).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

OHA_VERSION=1.16.0
oha_root="${XDG_CACHE_HOME:-$HOME/.cache}/vmm-tools/oha-$OHA_VERSION"
oha="$oha_root/bin/oha"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/bench-serve.XXXXXX")"
cleanup() {
  local pid
  if [ -f "$tmp/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] || continue
      # Only a vmm serve of this run that is still alive (not a reused PID).
      if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "vmm serve .*$tmp"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
          kill -0 "$pid" 2>/dev/null || break
          sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
      fi
    done <"$tmp/pids"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case " $* " in
  *" -h "* | *" --help "*) exec python3 "$root/tools/bench_serve.py" --help ;;
esac

./tools/fetch-workloads.sh
echo "bench-serve: cargo build --release --workspace" >&2
cargo build --release --workspace >&2

if ! [ -x "$oha" ] || [ "$("$oha" --version 2>/dev/null)" != "oha $OHA_VERSION" ]; then
  echo "bench-serve: installing oha $OHA_VERSION into $oha_root (one time; ~7 min here)" >&2
  mkdir -p "$oha_root"
  cargo install --locked --force "oha@$OHA_VERSION" --root "$oha_root" >&2
fi

# In the background so that a signal to this script is handled at once: the traps stop
# the driver (which kills its daemons and load generators), then `cleanup` makes sure.
BENCH_SERVE_TMP="$tmp" python3 "$root/tools/bench_serve.py" \
  --vmm "$root/target/release/vmm" --oha "$oha" "$@" &
py=$!
trap 'kill -TERM "$py" 2>/dev/null || true; wait "$py" || true; exit 130' INT
trap 'kill -TERM "$py" 2>/dev/null || true; wait "$py" || true; exit 143' TERM
wait "$py"

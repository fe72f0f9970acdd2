#!/usr/bin/env bash
# Builds every fuzz target, generates the seed corpora and fuzzes each target for
# SECONDS (default 30), one after the other. Exits non-zero if a build fails or any
# target finds a crash, leak, timeout or OOM (the input is left in
# fuzz/artifacts/<target>/; the log in fuzz/target/run-logs/<target>.log).
#
#   fuzz/run.sh [SECONDS]
#
# Environment:
#   FUZZ_TARGETS   space-separated subset of targets (default: all)
#   FUZZ_JOBS      libFuzzer processes per target (default 1)
#   FUZZ_ARGS      extra libFuzzer flags, e.g. "-only_ascii=1"
#
# Needs the nightly toolchain (cargo +nightly) and installs cargo-fuzz if missing.
set -euo pipefail

SECONDS_PER_TARGET="${1:-30}"
case "$SECONDS_PER_TARGET" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS]" >&2
    exit 2
    ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
cd "$ROOT"

ALL_TARGETS="manifest pack_index locations store_dir import mailbox hostcall vcpu_state"
TARGETS="${FUZZ_TARGETS:-$ALL_TARGETS}"
JOBS="${FUZZ_JOBS:-1}"

# Per-target input size limits (bytes).
max_len() {
    case "$1" in
    store_dir) echo 131072 ;;
    import) echo 262144 ;;
    vcpu_state) echo 16384 ;;
    *) echo 8192 ;;
    esac
}

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "run.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
echo "run.sh: $(cargo fuzz --version), $(cargo +nightly --version)"

# The vmm crate's build script would build the guest kernel to embed it; the fuzz
# targets only use its decoders, so embed nothing.
export VMM_GUEST_KERNEL="${VMM_GUEST_KERNEL:-none}"

# Scratch directories of the store_dir and import targets (one per process), removed at exit.
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/vmm-fuzz.XXXXXX")"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    rmdir "$SCRATCH"
    SCRATCH="$(mktemp -d /dev/shm/vmm-fuzz.XXXXXX)"
fi
export VMM_FUZZ_SCRATCH="$SCRATCH"
trap 'rm -rf "$SCRATCH"' EXIT

# One build of every bin (the targets and make-seeds, which runs fine instrumented);
# the `cargo fuzz run`s below then find them up to date.
echo "run.sh: building fuzz targets"
cargo +nightly fuzz build

echo "run.sh: generating seed corpora in fuzz/corpus"
HOST="$(rustc +nightly -vV | sed -n 's/^host: //p')"
"$FUZZ/target/$HOST/release/make-seeds" "$FUZZ/corpus"

LOGS="$FUZZ/target/run-logs"
mkdir -p "$LOGS"
failed=""
summary=""
for t in $TARGETS; do
    mkdir -p "$FUZZ/corpus/$t" "$FUZZ/artifacts/$t"
    dirs=("$FUZZ/corpus/$t")
    [ -d "$FUZZ/seeds/$t" ] && dirs+=("$FUZZ/seeds/$t")
    log="$LOGS/$t.log"
    parallel=""
    [ "$JOBS" -gt 1 ] && parallel="-jobs=$JOBS -workers=$JOBS"
    echo "run.sh: fuzzing $t for ${SECONDS_PER_TARGET}s (log: $log)"
    # shellcheck disable=SC2086
    if cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -max_len="$(max_len "$t")" \
        -timeout=25 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        $parallel ${FUZZ_ARGS:-} >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed="$failed $t"
    fi
    if [ "$JOBS" -gt 1 ]; then
        cat fuzz-*.log >>"$log" 2>/dev/null || true
        rm -f fuzz-*.log
    fi
    execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')"
    summary="$summary$(printf '%-12s %-7s %12s execs in %ss' "$t" "$status" "$execs" "$SECONDS_PER_TARGET")"$'\n'
    if [ "$status" != ok ]; then
        echo "run.sh: $t FAILED; last lines of $log:" >&2
        tail -n 40 "$log" >&2
        echo "run.sh: reproduce with: cargo +nightly fuzz run $t fuzz/artifacts/$t/<file>" >&2
    fi
done

echo
echo "run.sh: summary"
printf '%s' "$summary"
if [ -n "$failed" ]; then
    echo "run.sh: crashes in:$failed (inputs in fuzz/artifacts/)" >&2
    exit 1
fi

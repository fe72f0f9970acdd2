#!/usr/bin/env bash
# Remote-store bench: push/pull throughput against a local Garage cluster (3 nodes,
# replication factor 3, loopback) and the time from "template only on the remote" to the
# first response on a new worker. NODES=1 for a single node, RUNS=N for more runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
./tools/install-garage.sh
cargo build --release --workspace --locked
exec python3 tools/bench_remote.py

#!/usr/bin/env bash
# Set up and run every test: install missing system packages (tools/setup.sh), fetch the
# pinned workloads, build (the guest kernel is built by vmm/build.rs), then run the whole
# workspace's tests in release mode.
# Tests that need /dev/kvm skip with a reason when it is absent; VMM_REQUIRE_KVM=1 makes
# that a failure instead (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
./tools/install-garage.sh   # the S3 server the remote-store tests run against
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"
./tools/hw-kvm-test.sh

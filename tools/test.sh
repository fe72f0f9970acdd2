#!/usr/bin/env bash
# Set up and run every test: install missing system packages (tools/setup.sh), fetch the
# pinned workloads, build (the guest kernel is built by vmm/build.rs), then run the whole
# workspace's tests in release mode (the VMM's a second time with --engine wasmi), then the
# hardware-KVM suite under emulated AMD SVM (tools/hw-kvm-test.sh).
# Tests that need /dev/kvm skip with a reason when it is absent; VMM_REQUIRE_KVM=1 makes
# that a failure instead (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh
./tools/fetch-workloads.sh
./tools/install-garage.sh   # the S3 server the remote-store tests run against
cargo build --release --workspace --locked
cargo test --release --workspace --locked "$@"
# The VMM's end-to-end tests again on the second engine (wasmtime is the default): every
# example and behaviour must hold on both.
VMM_ENGINE=wasmi cargo test --release -p vmm-cli --locked "$@"
./tools/hw-kvm-test.sh

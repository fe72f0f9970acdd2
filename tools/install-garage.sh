#!/usr/bin/env bash
# Garage 2.5.0 (an S3-compatible distributed object store) for the remote-store tests:
# built from crates.io with `cargo install --locked` into ~/.cache/vmm-tools/garage-2.5.0
# when it is not there yet (~12 minutes on 2 cores), reused afterwards. The tests find it
# there, or at $VMM_GARAGE.
set -euo pipefail
root="${VMM_TOOLS_CACHE:-$HOME/.cache/vmm-tools}/garage-2.5.0"
bin="$root/bin/garage"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q 'cargo:2.5.0'; then
  exit 0
fi
echo "install-garage: building garage 2.5.0 into $root (cached for later runs; ~12 minutes on 2 cores)"
cargo install --locked garage@2.5.0 --root "$root"
"$bin" --version

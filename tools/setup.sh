#!/usr/bin/env bash
# What the build needs beyond the Rust toolchain, installed only when missing (safe to run
# again; tools/test.sh and tools/demo.sh call it before building).
#
#   x86_64-unknown-none  the Rust target the guest kernel is built for (bare metal: for the
#                 host target, wasmtime's dependencies would pull `std` into it); rustup
#                 installs its standard library (`rustup target add`, idempotent).
#   libclang-dev  the `userfaultfd` crate's -sys crate generates its bindings with bindgen,
#                 which loads libclang at build time.
#
# Needs root (or sudo) only when a system package is missing; CI runs it as root on fresh
# Debian.
set -euo pipefail

guest_target=x86_64-unknown-none
if ! command -v rustup >/dev/null 2>&1; then
  if ! rustc --print target-list 2>/dev/null | grep -qx "$guest_target" \
    || ! rustc --print sysroot >/dev/null 2>&1 \
    || [ ! -d "$(rustc --print sysroot)/lib/rustlib/$guest_target" ]; then
    echo "setup: the Rust target $guest_target (for the guest kernel) is not installed and rustup is not available: install that target's standard library for this toolchain" >&2
    exit 1
  fi
elif ! rustup target list --installed 2>/dev/null | grep -qx "$guest_target"; then
  echo "setup: installing the Rust target $guest_target (the guest kernel is built for it)"
  if ! rustup target add "$guest_target"; then
    echo "setup: \`rustup target add $guest_target\` failed (see above): the guest kernel cannot be built without it; run it again with network access to the Rust distribution server" >&2
    exit 1
  fi
fi

missing=()
for pkg in libclang-dev; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]} (needed to build the VMM: bindgen loads libclang)"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: apt-get not found: install ${missing[*]} (libclang for bindgen) with this system's package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "setup: ${missing[*]} is missing and installing it needs root: run \`apt-get install ${missing[*]}\` as root, then this again" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "setup: installed ${missing[*]}"

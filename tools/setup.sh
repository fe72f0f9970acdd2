#!/usr/bin/env bash
# System packages the build needs beyond the Rust toolchain, installed only when missing
# (safe to run again; tools/test.sh and tools/demo.sh call it before building).
#
#   libclang-dev  the `userfaultfd` crate's -sys crate generates its bindings with bindgen,
#                 which loads libclang at build time.
#
# Needs root (or sudo) only when something is missing; CI runs it as root on fresh Debian.
set -euo pipefail

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

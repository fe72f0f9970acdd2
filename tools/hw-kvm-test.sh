#!/usr/bin/env bash
# The hardware-KVM path under test: boot a Debian kernel under QEMU TCG with an emulated
# AMD CPU (SVM + nested paging), load kvm_amd in it, and run the release `vmm` and
# `vmm-store` against that ordinary (non-PVM) /dev/kvm.
#
#  1. Installs what is missing (qemu-system-x86, busybox-static, cpio, kmod) with apt; downloads
#     the current Debian kernel package with `apt-get download` and unpacks the kernel and
#     the KVM modules into a cache (never installs it).
#  2. Builds the release binaries and fetches the workloads (both no-ops when done), runs
#     tools/hw-kvm/suite.sh on this machine's own /dev/kvm to record what every step prints.
#  3. Packs an initramfs (busybox, the binaries and their shared libraries, examples/,
#     workloads/, the test guests, the recorded outputs, a template exported from the host's
#     store) and boots it; tools/hw-kvm/init.sh runs the suite there, comparing every output
#     with the host's, exactly, and sends the store it made back over the serial console.
#  4. Here again: the guest's template is imported and must be refused on this back end with
#     an error naming both back ends.
#
# Passes or fails on a final `RESULT: N passed, M failed` (guest and host steps together).
# Without QEMU (and no way to install it), without /dev/kvm here, or without the kernel
# package it skips with the reason, unless VMM_REQUIRE_KVM=1 (CI), where that is a failure.
#
# Environment: VMM_HW_KVM_CACHE (default ~/.cache/vmm-hw-kvm: the unpacked kernel),
# VMM_HW_KVM_TIMEOUT (seconds for the whole QEMU run, default 900), VMM_HW_KVM_SMP (guest
# CPUs, default 1), VMM_HW_KVM_KERNEL (a Debian linux-image package name instead of the one
# linux-image-amd64 depends on).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${VMM_HW_KVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm-hw-kvm}
WORK=$ROOT/target/hw-kvm
TIMEOUT=${VMM_HW_KVM_TIMEOUT:-900}
SMP=${VMM_HW_KVM_SMP:-1}

say() { echo "hw-kvm-test: $*"; }
skip() {
  if [ "${VMM_REQUIRE_KVM:-}" = 1 ]; then
    say "FAILED: $* (VMM_REQUIRE_KVM=1 makes a missing prerequisite a failure)" >&2
    exit 1
  fi
  say "SKIPPED: $* (set VMM_REQUIRE_KVM=1 to make this a failure)"
  exit 0
}
fail() {
  say "FAILED: $*" >&2
  exit 1
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
T_START=$(date +%s.%N)

# --- 1. prerequisites -----------------------------------------------------------------------
apt_updated=
apt_update() {
  [ -n "$apt_updated" ] && return 0
  apt-get update -q >/dev/null || return 1
  apt_updated=1
}
as_root() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; }

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
DEPMOD=$(command -v depmod || echo /sbin/depmod)
[ -x "$DEPMOD" ] || missing+=(kmod)
if [ ${#missing[@]} -gt 0 ]; then
  if ! as_root; then
    skip "${missing[*]} not installed, and installing needs root and apt-get: run \`apt-get install ${missing[*]}\` as root"
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_update || skip "apt-get update failed: cannot install ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    skip "apt-get install ${missing[*]} failed"
fi
for dep in dpkg-deb apt-get apt-cache gzip base64 sha256sum timeout ldd; do
  command -v "$dep" >/dev/null || skip "$dep not found (the script needs a Debian system)"
done
[ -r /dev/kvm ] && [ -w /dev/kvm ] ||
  skip "/dev/kvm is not usable here: the outputs the guest must print are recorded on it first"

# The guest kernel: the package linux-image-amd64 depends on now (Debian replaces it from
# time to time), or VMM_HW_KVM_KERNEL. Its kernel and the KVM modules are unpacked into the
# cache once; the package itself is never installed.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
}
KPKG=${VMM_HW_KVM_KERNEL:-$(kernel_package)}
if [ -z "$KPKG" ] && as_root && apt_update; then KPKG=$(kernel_package); fi
[ -n "$KPKG" ] || skip "apt-cache knows no linux-image-amd64 (set VMM_HW_KVM_KERNEL to a linux-image package)"
KDIR=$CACHE/$KPKG
if [ ! -s "$KDIR/vmlinuz" ] || [ ! -s "$KDIR/modules/order" ]; then
  say "downloading $KPKG (unpacked into $KDIR, not installed)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download -q "$KPKG" >/dev/null 2>&1) ||
    { as_root && apt_update && (cd "$tmp" && apt-get download -q "$KPKG" >/dev/null 2>&1); } ||
    skip "apt-get download $KPKG failed"
  dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/x"
  kver=${KPKG#linux-image-}
  mods=$tmp/x/lib/modules/$kver
  [ -f "$tmp/x/boot/vmlinuz-$kver" ] && [ -d "$mods" ] ||
    fail "$KPKG holds no boot/vmlinuz-$kver or lib/modules/$kver"
  # The package has no modules.dep (installing it would run depmod): make one, in the
  # unpacked tree only.
  "$DEPMOD" -b "$tmp/x" "$kver" || fail "depmod of $KPKG failed"
  mkdir -p "$tmp/k/modules"
  cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/k/vmlinuz"
  # kvm-amd and what it needs, in load order (modules.dep lists the dependencies of a
  # module so that the last one loads first).
  line=$(grep -E '^kernel/arch/x86/kvm/kvm-amd\.ko(\.[a-z]+)?:' "$mods/modules.dep") ||
    fail "$KPKG has no kvm-amd module"
  order=$(echo "${line#*:}" | tr ' ' '\n' | sed '/^$/d' | tac; echo "${line%%:*}")
  for m in $order; do
    name=$(basename "$m")
    case $name in
      *.ko) cp "$mods/$m" "$tmp/k/modules/$name" ;;
      *.ko.xz) xz -dc "$mods/$m" >"$tmp/k/modules/${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$mods/$m" >"$tmp/k/modules/${name%.zst}" ;;
      *) fail "cannot unpack module $m" ;;
    esac
    basename "$name" | sed 's/\.\(xz\|zst\)$//' >>"$tmp/k/modules/order"
  done
  mkdir -p "$CACHE"
  rm -rf "$KDIR"
  mv "$tmp/k" "$KDIR"
  rm -rf "$tmp"
  trap - EXIT
fi
say "guest kernel $KPKG; modules: $(tr '\n' ' ' <"$KDIR/modules/order")"

# --- 2. build, and record on this machine's /dev/kvm ----------------------------------------
./tools/fetch-workloads.sh
cargo build --release --workspace --locked
VMM=$ROOT/target/release/vmm
VSTORE=$ROOT/target/release/vmm-store
rm -rf "$WORK"
mkdir -p "$WORK"
say "recording every step on this machine's /dev/kvm"
T_RECORD=$(date +%s.%N)
if ! VMM=$VMM VMM_STORE_BIN=$VSTORE HW_SUITE_WORK=$WORK/host sh tools/hw-kvm/suite.sh record "$WORK/expect" >"$WORK/record.log" 2>&1; then
  cat "$WORK/record.log"
  fail "the suite failed on this machine's own /dev/kvm: nothing to compare the guest with"
fi
HOST_BACKEND=$(cat "$WORK/expect/backend")
say "recorded on $HOST_BACKEND KVM in $(elapsed "$T_RECORD") s ($(tail -n 1 "$WORK/record.log"))"

# --- 3. the initramfs, the boot -------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,proc,sys,dev,tmp,lib/modules,repo/tools/hw-kvm,repo/tests}
# Copy an executable and the shared libraries it loads, at their own paths.
with_libs() {
  cp "$1" "$R/bin/$(basename "$1")"
  { ldd "$1" 2>/dev/null || true; } | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
}
with_libs /bin/busybox
with_libs "$VMM"
with_libs "$VSTORE"
cp tools/hw-kvm/init.sh "$R/init"
chmod +x "$R/init"
cp "$KDIR"/modules/* "$R/lib/modules/"
cp -r examples workloads "$R/repo/"
cp -r tests/guests "$R/repo/tests/"
cp tools/hw-kvm/suite.sh tools/hw-kvm/cases "$R/repo/tools/hw-kvm/"
cp -r "$WORK/expect" "$R/expect"
# The engine the host's steps ran on (VMM_ENGINE, when set) is the guest's too.
env | grep '^VMM_ENGINE=' >"$R/env" || true
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initrd.gz"
say "initramfs $(($(stat -c %s "$WORK/initrd.gz") >> 20)) MiB; booting qemu-system-x86_64 -accel tcg -cpu max (timeout ${TIMEOUT} s)"

T_BOOT=$(date +%s.%N)
set +e
timeout "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 3G -smp "$SMP" \
  -kernel "$KDIR/vmlinuz" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1" \
  -display none -monitor none -serial stdio -net none -no-reboot </dev/null |
  tr -d '\r' | tee "$WORK/console.log" |
  awk '/^=== BEGIN guest-store/ { quiet = 1; print "guest| " $0 " (payload not shown)"; next }
       /^=== END guest-store/ { quiet = 0 }
       !quiet { print "guest| " $0; fflush() }'
qemu_rc=${PIPESTATUS[0]}
set -e
BOOT_S=$(elapsed "$T_BOOT")
[ "$qemu_rc" = 124 ] && say "QEMU did not finish within ${TIMEOUT} s and was stopped"
[ "$qemu_rc" = 0 ] || [ "$qemu_rc" = 124 ] || say "QEMU exited with status $qemu_rc"

# --- 4. the guest's verdict, and its template on this back end -------------------------------
passed=0
failed=0
result=$(grep -E '^RESULT: [0-9]+ passed, [0-9]+ failed$' "$WORK/console.log" | tail -n 1 || true)
if [ -z "$result" ]; then
  say "FAIL: the guest printed no RESULT line (see $WORK/console.log)"
  failed=$((failed + 1))
else
  read -r gp gf <<<"$(echo "$result" | sed 's/RESULT: \([0-9]*\) passed, \([0-9]*\) failed/\1 \2/')"
  passed=$((passed + gp))
  failed=$((failed + gf))
fi
GUEST_BACKEND=$(sed -n 's/^BACKEND //p' "$WORK/console.log" | head -n 1)
host_step() { # NAME OK DETAIL
  if [ "$2" = ok ]; then
    passed=$((passed + 1))
    say "PASS $1"
  else
    failed=$((failed + 1))
    say "FAIL $1: $3"
  fi
}
sum=$(sed -n 's/^=== BEGIN guest-store \([0-9a-f]*\)$/\1/p' "$WORK/console.log")
if [ -z "$sum" ]; then
  host_step "the guest's template arrives" no "no guest-store block on the console"
else
  sed -n '/^=== BEGIN guest-store/,/^=== END guest-store/p' "$WORK/console.log" | sed '1d;$d' |
    base64 -d 2>/dev/null | gunzip -c >"$WORK/guest.export" 2>/dev/null || true
  if [ "$(sha256sum <"$WORK/guest.export" | cut -d' ' -f1)" != "$sum" ]; then
    host_step "the guest's template arrives" no "the copy over the console is damaged"
  else
    host_step "the guest's template arrives ($(stat -c %s "$WORK/guest.export") bytes)" ok
    out=$("$VSTORE" import "$WORK/guest.export" --store "$WORK/guest-store" 2>&1) &&
      host_step "import the guest's template" ok ||
      host_step "import the guest's template" no "$out"
    out=$("$VSTORE" verify --store "$WORK/guest-store" 2>&1) &&
      host_step "vmm-store verify of the guest's store" ok ||
      host_step "vmm-store verify of the guest's store" no "$out"
    set +e
    printf 'hello, nested svm\n' | "$VMM" restore hw-upper --store "$WORK/guest-store" \
      >"$WORK/cross.out" 2>"$WORK/cross.err"
    rc=$?
    set -e
    name="restore a template made on ${GUEST_BACKEND:-?} KVM, on $HOST_BACKEND KVM"
    if [ "$GUEST_BACKEND" = "$HOST_BACKEND" ] && [ "$rc" = 0 ] &&
      cmp -s "$WORK/expect/restore-upper-prefetch.out" "$WORK/cross.out"; then
      host_step "$name" ok # a hardware-KVM host: the same back end
    elif [ "$rc" = 125 ] && [ ! -s "$WORK/cross.out" ] && [ -n "$GUEST_BACKEND" ] &&
      { [ "$GUEST_BACKEND" = "$HOST_BACKEND" ] && grep -q 'here lacks' "$WORK/cross.err" ||
        grep -q -- "made on $GUEST_BACKEND KVM" "$WORK/cross.err" &&
        grep -q -- "restored on $HOST_BACKEND KVM" "$WORK/cross.err"; }; then
      host_step "$name" ok
      say "  refused: $(cat "$WORK/cross.err")"
    else
      host_step "$name" no "exit status $rc, neither restored nor refused naming both back ends: $(head -c 400 "$WORK/cross.err")"
    fi
  fi
fi

say "boot + suite under TCG: $BOOT_S s; whole script: $(elapsed "$T_START") s; console: $WORK/console.log"
echo "RESULT: $passed passed, $failed failed"
[ "$failed" = 0 ] && [ -n "$result" ]

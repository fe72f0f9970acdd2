#!/bin/sh
# The hardware-KVM suite's steps (tools/hw-kvm-test.sh runs it twice):
#
#   suite.sh record DIR   on the host's own /dev/kvm, before the boot: run every step and
#                         keep what each printed (stdout, stderr, exit status) in DIR
#   suite.sh check DIR    inside the emulated AMD SVM guest: run the same steps and compare
#                         every output with DIR, exactly
#
# Both print one line per step (PASS/FAIL/SKIP, name, seconds) and end with
# `RESULT: N passed, M failed`; the exit status is 0 only when nothing failed.
# Run it from the repository root (the guest's /repo); $VMM and $VMM_STORE_BIN name the
# binaries. POSIX sh: the guest runs it with busybox.
set -u
MODE=$1
EXP=$2
VMM=${VMM:-vmm}
VSTORE=${VMM_STORE_BIN:-vmm-store}
WORK=${HW_SUITE_WORK:-/tmp/hw-kvm-suite}
STORE=$WORK/store
# `vmm run` caches compiled modules in the same store as the templates: under TCG, compiling
# CPython with Cranelift takes minutes, and a run and a template of one module need it once.
export VMM_STORE="$STORE"
CASES=tools/hw-kvm/cases
# Generous: under TCG a guest runs 10-50x slower than natively (QEMU's own timeout bounds all).
T=${HW_SUITE_STEP_TIMEOUT:-600}
case $MODE in record | check) ;; *)
	echo "usage: suite.sh record|check DIR" >&2
	exit 2
	;;
esac
rm -rf "$WORK"
mkdir -p "$WORK" "$EXP" || exit 2

passed=0
failed=0
now() { cut -d' ' -f1 /proc/uptime; }
begin() {
	STEP=$1
	T0=$(now)
}
secs() { awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
pass() {
	passed=$((passed + 1))
	echo "PASS $STEP ($(secs) s)"
}
fail() {
	failed=$((failed + 1))
	echo "FAIL $STEP ($(secs) s): $1"
}
# The first 400 bytes of a file on one line, for failure messages.
show() { head -c 400 "$1" | tr '\n\r' '~~'; }

# invoke ID REQUEST-FILE ARGS...: run $VMM ARGS with the request on stdin, keep
# $WORK/ID.out, .err and .rc.
invoke() {
	id=$1
	req=$2
	shift 2
	"$VMM" "$@" <"$req" >"$WORK/$id.out" 2>"$WORK/$id.err"
	echo $? >"$WORK/$id.rc"
}

# settle ID: record step ID's outputs, or compare them with the recorded ones; sets WHY.
settle() {
	if [ "$MODE" = record ]; then
		cp "$WORK/$1.out" "$WORK/$1.err" "$WORK/$1.rc" "$EXP/" && return 0
		WHY="cannot keep the outputs in $EXP"
		return 1
	fi
	for f in rc out err; do
		if ! cmp -s "$EXP/$1.$f" "$WORK/$1.$f"; then
			WHY="$f differs from the host's: expected [$(show "$EXP/$1.$f")], got [$(show "$WORK/$1.$f")] (stderr [$(show "$WORK/$1.err")])"
			return 1
		fi
	done
}

# expect_rc ID CODE: step ID exited with CODE; sets WHY.
expect_rc() {
	rc=$(cat "$WORK/$1.rc")
	[ "$rc" = "$2" ] && return 0
	WHY="exit status $rc, not $2; stdout [$(show "$WORK/$1.out")] stderr [$(show "$WORK/$1.err")]"
	return 1
}

# check_step ID CODE: the step exited with CODE (on the host) and printed what the host did.
check_step() {
	if expect_rc "$1" "$2" && settle "$1"; then pass; else fail "$WHY"; fi
}

# The files a line's options name (--module PATH, --file HOST[:GUEST]) that are missing.
missing_files() {
	m=
	prev=
	for w in "$@"; do
		case $prev in --module | --file)
			f=${w%%:*}
			[ -e "$f" ] || m="$m $f"
			;;
		esac
		prev=$w
	done
	echo "$m"
}

# The back end `vmm` runs on here, from the --stats banner ("--- cold start on pvm KVM ---").
begin "back end"
invoke backend /dev/null run --module examples/upper.wat --stats
BACKEND=$(sed -n 's/^--- .* start on \([a-z]*\) KVM.*---$/\1/p' "$WORK/backend.err" | head -n 1)
if expect_rc backend 0 && [ -n "$BACKEND" ]; then
	echo "BACKEND $BACKEND"
	pass
else
	fail "no back end in the --stats output: ${WHY:-} $(show "$WORK/backend.err")"
fi
[ "$MODE" = record ] && echo "$BACKEND" >"$EXP/backend"
sed 's/^/  /' "$WORK/backend.err"

# counts ID FROM: step ID is the exits and hostcalls `--stats` counted in step FROM (the
# same on every back end: one exit per hostcall, nothing else reaches the VMM).
counts() {
	grep -E '^ *(exits|hostcalls):' "$WORK/$2.err" | tr -s ' ' >"$WORK/$1.out"
	: >"$WORK/$1.err"
	echo 0 >"$WORK/$1.rc"
}
begin "exits of a cold run"
counts counts-run backend
if [ -s "$WORK/counts-run.out" ]; then check_step counts-run 0; else fail "no exits in the --stats output"; fi

# Every memory strategy `vmm restore --help` lists under --memory.
STRATEGIES=$("$VMM" restore --help | sed -n '/--memory/,/\[default/ s/^ *- \([a-z][a-z-]*\): .*/\1/p' | tr '\n' ' ')
begin "restore strategies"
if [ -n "$STRATEGIES" ]; then
	echo "STRATEGIES $STRATEGIES"
	pass
else
	fail "vmm restore --help lists no --memory strategy"
fi

# Every example has a line in the cases table.
begin "every example has a case"
unlisted=
for f in examples/*; do
	[ -f "$f" ] || continue # examples/bench/: the bench's own scripts
	grep -v '^#' "$CASES" | grep -q -- "$f" || unlisted="$unlisted $f"
done
if [ -z "$unlisted" ]; then pass; else fail "not in $CASES:$unlisted"; fi

# The functions: cold run, template, restore with every strategy.
TEMPLATES=
while IFS='|' read -r name req kinds opts; do
	case $name in '' | '#'*) continue ;; esac
	# shellcheck disable=SC2086 # the options are split on blanks on purpose
	missing=$(missing_files $opts)
	if [ -n "$missing" ]; then
		if [ "$MODE" = check ] && [ -e "$EXP/case-$name" ]; then
			begin "$name"
			fail "missing$missing here, though the host ran it"
		else
			echo "SKIP $name: missing$missing"
		fi
		continue
	fi
	[ "$MODE" = record ] && : >"$EXP/case-$name"
	if [ "$req" = - ]; then : >"$WORK/$name.req"; else printf '%b' "$req" >"$WORK/$name.req"; fi
	case ,$kinds, in *,run,*)
		begin "run $name"
		# shellcheck disable=SC2086
		invoke "run-$name" "$WORK/$name.req" run --timeout "$T" $opts
		check_step "run-$name" 0
		;;
	esac
	case ,$kinds, in *,template,*)
		TEMPLATES="$TEMPLATES $name"
		begin "template create $name"
		# shellcheck disable=SC2086
		invoke "create-$name" /dev/null template create "hw-$name" --store "$STORE" --timeout "$T" $opts
		if expect_rc "create-$name" 0; then pass; else fail "$WHY"; fi
		for s in $STRATEGIES; do
			begin "restore $name --memory $s"
			invoke "restore-$name-$s" "$WORK/$name.req" restore "hw-$name" --store "$STORE" --timeout "$T" --memory "$s"
			check_step "restore-$name-$s" 0
		done
		;;
	esac
done <"$CASES"

# vmm serve: each template's response over HTTP, three times from a pool of one instance
# (reset in place between requests), equal to what `vmm restore` printed.
begin "vmm serve"
"$VMM" serve --listen 127.0.0.1:0 --store "$STORE" --pool 1 </dev/null >"$WORK/serve.out" 2>"$WORK/serve.err" &
serve_pid=$!
addr=
tries=0
while [ -z "$addr" ] && [ $tries -lt 600 ] && kill -0 $serve_pid 2>/dev/null; do
	sleep 0.1
	tries=$((tries + 1))
	addr=$(sed -n 's/^vmm serve: listening on //p' "$WORK/serve.err")
done
WHY=
if [ -z "$addr" ]; then
	WHY="vmm serve did not listen: [$(show "$WORK/serve.err")]"
else
	for name in $TEMPLATES; do
		for i in 1 2 3; do
			timeout 300 busybox wget -q -O "$WORK/serve-$name-$i.out" --post-file="$WORK/$name.req" \
				"http://$addr/v1/functions/hw-$name/invoke" 2>"$WORK/serve-$name-$i.err"
			if ! cmp -s "$EXP/restore-$name-prefetch.out" "$WORK/serve-$name-$i.out"; then
				WHY="$WHY $name request $i: expected [$(show "$EXP/restore-$name-prefetch.out")], got [$(show "$WORK/serve-$name-$i.out")] $(show "$WORK/serve-$name-$i.err");"
			fi
		done
	done
fi
kill -TERM $serve_pid 2>/dev/null
wait $serve_pid
serve_rc=$?
[ -n "$addr" ] && [ $serve_rc != 0 ] && WHY="$WHY vmm serve exited $serve_rc after SIGTERM: [$(show "$WORK/serve.err")]"
if [ -z "$WHY" ]; then pass; else fail "$WHY"; fi

begin "exits of a restore"
invoke restore-stats "$WORK/upper.req" restore hw-upper --store "$STORE" --stats
sed 's/^/  /' "$WORK/restore-stats.err"
counts counts-restore restore-stats
if expect_rc restore-stats 0 && [ -s "$WORK/counts-restore.out" ]; then check_step counts-restore 0; else fail "${WHY:-no exits in the --stats output}"; fi

# Guest CPU exceptions (the kernel's self-tests, behind VMM_TEST_HOSTCALLS): reported
# with vector, error code, RIP and CR2, exit status 125.
for t in ud pf; do
	begin "guest CPU exception ($t)"
	printf '\000vmm-selftest:%s' "$t" >"$WORK/selftest-$t"
	VMM_TEST_HOSTCALLS=1 invoke "fault-$t" /dev/null run --module "$WORK/selftest-$t" --mem 64 --timeout 60
	if expect_rc "fault-$t" 125 && grep -q 'guest CPU exception: .*(vector [0-9]*).* at rip 0x' "$WORK/fault-$t.err" && settle "fault-$t"; then
		pass
	else
		fail "${WHY:-no vector and rip in [$(show "$WORK/fault-$t.err")]}"
	fi
done

# A guest that never ends is stopped by --timeout: exit status 124.
begin "timeout"
invoke timeout /dev/null run --module tests/guests/loop.wat --timeout 2
check_step timeout 124

# Fresh entropy per restore: two restores of one template print different random bytes
# (entropy.wat: 16 bytes of random_get, then the clock) and different Math.random().
begin "template create entropy"
invoke create-entropy /dev/null template create hw-entropy --store "$STORE" --module tests/guests/entropy.wat
if expect_rc create-entropy 0; then pass; else fail "$WHY"; fi
begin "fresh entropy per restore (wasi random_get)"
invoke entropy-1 /dev/null restore hw-entropy --store "$STORE"
invoke entropy-2 /dev/null restore hw-entropy --store "$STORE"
if expect_rc entropy-1 0 && expect_rc entropy-2 0; then
	head -c 16 "$WORK/entropy-1.out" >"$WORK/entropy-1.rand"
	head -c 16 "$WORK/entropy-2.out" >"$WORK/entropy-2.rand"
	if [ "$(wc -c <"$WORK/entropy-1.out")" -ne 24 ]; then
		fail "expected 24 bytes, got $(wc -c <"$WORK/entropy-1.out")"
	elif cmp -s "$WORK/entropy-1.rand" "$WORK/entropy-2.rand"; then
		fail "two restores printed the same random bytes"
	else
		pass
	fi
else
	fail "$WHY"
fi
# ... and the current time (the template's clock was read when it was made): within 30 s
# of this machine's clock, as tests/templates.rs asks.
begin "the restored guest's clock is the current time"
g=$(od -An -t u8 -j 16 -N 8 "$WORK/entropy-2.out" | tr -d ' \n')
n=$(date +%s)
if [ -z "$g" ]; then
	fail "no clock in [$(show "$WORK/entropy-2.out")]"
else
	d=$((n - g / 1000000000))
	if [ "$d" -le 30 ] && [ "$d" -ge -30 ]; then pass; else fail "guest clock $g ns, this machine's $n s"; fi
fi
if [ -e workloads/qjs-wasi-reactor.wasm ]; then
	begin "template create random.js"
	invoke create-random /dev/null template create hw-random --store "$STORE" \
		--module workloads/qjs-wasi-reactor.wasm --runtime qjs --file tests/guests/random.js --arg random.js
	if expect_rc create-random 0; then pass; else fail "$WHY"; fi
	begin "fresh Math.random() per restore"
	invoke random-1 /dev/null restore hw-random --store "$STORE"
	invoke random-2 /dev/null restore hw-random --store "$STORE"
	r1=$(sed -n 's/.*"random":\([0-9.e-]*\).*/\1/p' "$WORK/random-1.out")
	r2=$(sed -n 's/.*"random":\([0-9.e-]*\).*/\1/p' "$WORK/random-2.out")
	if ! { expect_rc random-1 0 && expect_rc random-2 0; }; then
		fail "$WHY"
	elif [ -z "$r1" ] || [ -z "$r2" ]; then
		fail "no random value in [$(show "$WORK/random-1.out")] [$(show "$WORK/random-2.out")]"
	elif [ "$r1" = "$r2" ]; then
		fail "two restores printed the same Math.random() $r1"
	else
		pass
	fi
fi

# The store this suite made passes `vmm-store verify`.
begin "vmm-store verify"
"$VSTORE" verify --store "$STORE" >"$WORK/verify.out" 2>"$WORK/verify.err"
echo $? >"$WORK/verify.rc"
if expect_rc verify 0; then pass; else fail "$WHY"; fi

# Templates across back ends. The host's store goes into the guest: a template made on the
# host's back end is refused here with an error naming both back ends (never run: its vCPU
# state is the other back end's). The guest's store goes back out (tools/hw-kvm-test.sh).
if [ "$MODE" = record ]; then
	begin "export a template for the guest"
	rm -f "$EXP/host.export"
	"$VSTORE" export hw-upper "$EXP/host.export" --store "$STORE" >"$WORK/export.out" 2>"$WORK/export.err"
	echo $? >"$WORK/export.rc"
	if expect_rc export 0; then pass; else fail "$WHY"; fi
else
	HOST_BACKEND=$(cat "$EXP/backend")
	begin "import the host's template"
	"$VSTORE" import "$EXP/host.export" --store "$WORK/host-store" >"$WORK/import.out" 2>"$WORK/import.err"
	echo $? >"$WORK/import.rc"
	if expect_rc import 0; then pass; else fail "$WHY"; fi
	begin "restore a template made on $HOST_BACKEND KVM, on $BACKEND KVM"
	invoke cross "$WORK/upper.req" restore hw-upper --store "$WORK/host-store"
	if [ "$HOST_BACKEND" = "$BACKEND" ]; then
		# A hardware-KVM host: the same back end, restored exactly, or refused for CPU
		# features the emulated CPU lacks.
		if expect_rc cross 0 && cmp -s "$EXP/restore-upper-prefetch.out" "$WORK/cross.out"; then
			pass
		elif expect_rc cross 125 && grep -q 'here lacks' "$WORK/cross.err"; then
			echo "  refused: $(cat "$WORK/cross.err")"
			pass
		else
			fail "neither restored exactly nor refused for CPU features: ${WHY:-stdout [$(show "$WORK/cross.out")]}"
		fi
	elif expect_rc cross 125 && [ ! -s "$WORK/cross.out" ] && grep -q -- "made on $HOST_BACKEND KVM" "$WORK/cross.err" &&
		grep -q -- "restored on $BACKEND KVM" "$WORK/cross.err"; then
		echo "  refused: $(cat "$WORK/cross.err")"
		pass
	else
		fail "not refused naming both back ends: ${WHY:-stderr [$(show "$WORK/cross.err")]}"
	fi
	"$VSTORE" export hw-upper "$WORK/guest.export" --store "$STORE" >/dev/null 2>&1
fi

echo "RESULT: $passed passed, $failed failed"
[ "$failed" = 0 ]

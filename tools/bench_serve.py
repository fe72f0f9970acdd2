#!/usr/bin/env python3
"""Load benchmark of `vmm serve` (issue 8, section 4). Python 3.11 standard library only.

Run through tools/bench-serve.sh, which builds the binaries, fetches the workloads and
installs oha first. In one run it measures, on a store in a temporary directory:

1. load: hello and markdown over HTTP with oha (keep-alive connections, a fixed duration
   per point) at several concurrencies, with a warm pool (--pool 2) and with --pool 0:
   requests per second, p50/p99/p99.9 time to response at the client, non-200 count;
2. cli: `vmm restore NAME` and cold `vmm run` as whole processes (median and p90 wall
   time), to set the served p50 against;
3. burst: 10 distinct function templates, 100 requests each, all 1000 fired at once
   (10 concurrent oha processes, -n 100 -c 100), the pool at its default;
4. memory: host memory per idle instance, from /proc/PID/smaps_rollup of a daemon with
   100 ready hello instances minus one with none (--pool 0, after one request);
5. density (only when asked for): issue 19's many ready instances in one daemon;
6. faas (only when asked for; `--sections faas [--burst N]`, no oha needed): issue 20's bench
   of deployed functions (the deploy API, --auth, --runtime-module): hello.js one request at a
   time on SEUSS's cold / warm / hot paths (each sample's x-vmm-path checked) against the
   targets and SEUSS's numbers; a burst of --burst new functions (JS and Python mixed, built
   on their first request) at concurrency 32 against a cold `vmm run` per request; the time
   to deploy (build now) a JS and a Python function.

Markdown tables on stdout (or one JSON object with --json), progress on stderr. Every
process it starts is killed when it ends, on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QJS = ROOT / "workloads" / "qjs-wasi-reactor.wasm"

HELLO_BODY = b'{"name":"world"}'
MARKDOWN_BODY = b"# Title\n\nSome *markdown*, rendered by [marked](https://marked.js.org).\n"

# name -> (template create / vmm run arguments, request body, text the response must hold)
FUNCTIONS = {
    "hello": (
        ["--module", str(QJS), "--runtime", "qjs",
         "--file", str(ROOT / "examples" / "hello.js"), "--arg", "hello.js"],
        HELLO_BODY,
        b'"greeting":"Hello, world!"',
    ),
    "markdown": (
        ["--module", str(QJS), "--runtime", "qjs",
         "--file", str(ROOT / "examples" / "markdown.js"),
         "--file", str(ROOT / "workloads" / "marked.esm.js"), "--arg", "markdown.js"],
        MARKDOWN_BODY,
        b"<h1>Title</h1>",
    ),
}

BURST_TEMPLATES = 10
BURST_PER_TEMPLATE = 100
MEMORY_INSTANCES = 100

_children: list[subprocess.Popen] = []
_pidfile: Path | None = None


def log(msg: str) -> None:
    print(f"bench-serve: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- processes


def spawn(args: list[str], **kw) -> subprocess.Popen:
    p = subprocess.Popen([str(a) for a in args], **kw)
    _children.append(p)
    return p


def reap(p: subprocess.Popen) -> None:
    if p in _children:
        _children.remove(p)


def run(args: list[str], stdin: bytes = b"", timeout: float = 300) -> tuple[int, bytes, bytes, float]:
    """Run a process to its end; returns (code, stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    p = spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"timed out after {timeout} s: {' '.join(map(str, args))}")
    finally:
        reap(p)
    return p.returncode, out, err, time.perf_counter() - t0


def record_pid(pid: int, add: bool) -> None:
    """Keep the daemons' PIDs where tools/bench-serve.sh's trap can find them."""
    if _pidfile is None:
        return
    pids = _pidfile.read_text().split() if _pidfile.exists() else []
    pids = [p for p in pids if p != str(pid)] + ([str(pid)] if add else [])
    _pidfile.write_text("".join(p + "\n" for p in pids))


def kill_all() -> None:
    """Stop every child still running: daemons get SIGTERM then SIGKILL, the rest SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for p in list(_children):
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        record_pid(p.pid, False)
        reap(p)


class Daemon:
    """A `vmm serve` on a free loopback port, stopped on exit from the `with` block."""

    def __init__(self, vmm: Path, store: Path, tmp: Path, tag: str, pool: int | None,
                 extra: list[str] | None = None, token: str | None = None):
        self.log_path = tmp / f"serve-{tag}.log"
        # `Authorization: Bearer TOKEN` on every request (a daemon started with --auth).
        self.token = token
        args = [vmm, "serve", "--listen", "127.0.0.1:0", "--store", store]
        if pool is not None:
            args += ["--pool", str(pool)]
        args += extra or []
        self.args = args
        with open(self.log_path, "wb") as logf:
            self.proc = spawn(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
        record_pid(self.proc.pid, True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 120
        while True:
            m = re.search(rb"vmm serve: listening on (\S+)", self.log_path.read_bytes())
            if m:
                self.host, port = m.group(1).decode().rsplit(":", 1)
                self.port = int(port)
                break
            if self.proc.poll() is not None:
                raise BenchError(f"vmm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"vmm serve did not listen within 120 s:\n{self.log_tail()}")
            time.sleep(0.02)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        record_pid(self.pid, False)
        reap(self.proc)

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"vmm serve died (exit {self.proc.returncode}):\n{self.log_tail()}")

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        c = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            c.request(method, path, body=body, headers=self.auth_headers())
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def functions(self) -> dict:
        status, body = self.request("GET", "/v1/functions")
        if status != 200:
            raise BenchError(f"GET /v1/functions: {status} {body[:200]!r}")
        return json.loads(body)

    def invoke(self, name: str, body: bytes) -> tuple[int, bytes]:
        return self.request("POST", f"/v1/functions/{name}/invoke", body)

    def metrics(self) -> dict[str, float]:
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics: {status}")
        out = {}
        for line in body.decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
        return out

    def wait_pool(self, want: dict[str, int], timeout: float = 120) -> dict:
        """Wait until each named template has at least `want[name]` ready instances."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            f = self.functions()
            ready = {e["name"]: e["ready"] for e in f["functions"]}
            if all(ready.get(n, 0) >= k for n, k in want.items()):
                return f
            if time.monotonic() > deadline:
                raise BenchError(f"pools not filled within {timeout} s: want {want}, have {ready}")
            time.sleep(0.1)

    def wait_idle(self, timeout: float = 30) -> dict:
        """Wait until no instance is busy and the live count holds still for 0.2 s (an
        instance is no longer busy once its response is sent, before its reset or
        destruction is over)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            f = self.functions()
            if time.monotonic() > deadline:
                raise BenchError(f"instances still busy after {timeout} s: {f}")
            if all(e["busy"] == 0 for e in f["functions"]):
                if last is not None and last["live_instances"] == f["live_instances"]:
                    return f
                last = f
                time.sleep(0.2)
            else:
                last = None
                time.sleep(0.05)


# ---------------------------------------------------------------- helpers


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in loadavg())


def percentile(sorted_xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_xs:
        return None
    k = max(0, min(len(sorted_xs) - 1, -(-len(sorted_xs) * q // 100) - 1))
    return sorted_xs[int(k)]


def create_template(vmm: Path, store: Path, name: str, function: list[str]) -> None:
    code, out, err, _ = run([vmm, "template", "create", name, "--store", store, *function])
    if code != 0:
        raise BenchError(f"template create {name}: exit {code}\n{err.decode(errors='replace')}")


def verify(d: Daemon, name: str, body: bytes, expect: bytes) -> None:
    status, resp = d.invoke(name, body)
    if status != 200 or expect not in resp:
        raise BenchError(f"{name}: expected 200 with {expect!r}, got {status}: {resp[:300]!r}\n{d.log_tail()}")


SERVER_HISTOGRAMS = ("queue_wait", "acquire", "run", "reset")


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean of each server-side histogram over the requests between two /metrics scrapes."""
    out: dict[str, float | None] = {}
    for h in SERVER_HISTOGRAMS:
        s = after.get(f"vmm_{h}_seconds_sum", 0) - before.get(f"vmm_{h}_seconds_sum", 0)
        n = after.get(f"vmm_{h}_seconds_count", 0) - before.get(f"vmm_{h}_seconds_count", 0)
        out[f"{h}_ms"] = s / n * 1e3 if n > 0 else None
    return out


def oha_summary(d: dict) -> dict:
    codes = {str(k): int(v) for k, v in (d.get("statusCodeDistribution") or {}).items()}
    errors = {str(k): int(v) for k, v in (d.get("errorDistribution") or {}).items()}
    lat = d.get("latencyPercentiles") or {}

    def ms(k: str) -> float | None:
        v = lat.get(k)
        return None if v is None else v * 1e3

    non200 = sum(v for k, v in codes.items() if k != "200")
    return {
        "responses": sum(codes.values()),
        "ok": codes.get("200", 0),
        "status_codes": codes,
        "errors": errors,
        # Responses with another status plus requests that got no response at all.
        "non_200": non200 + sum(errors.values()),
        "rps": d["summary"].get("requestsPerSec"),
        "duration_s": d["summary"].get("total"),
        "p50_ms": ms("p50"),
        "p90_ms": ms("p90"),
        "p99_ms": ms("p99"),
        "p99_9_ms": ms("p99.9"),
        "max_ms": None if d["summary"].get("slowest") is None else d["summary"]["slowest"] * 1e3,
    }


def oha_args(oha: Path, body_file: Path) -> list:
    return [oha, "--no-tui", "--output-format", "json", "-t", "60s", "-m", "POST", "-D", body_file]


# ---------------------------------------------------------------- sections


def section_load(a, tmp: Path, store: Path, concurrencies: list[int]) -> list[dict]:
    points = []
    for name in ("hello", "markdown"):
        _, body, expect = FUNCTIONS[name]
        body_file = tmp / f"{name}.body"
        body_file.write_bytes(body)
        modes = [(2, []), (0, [])] + ([(2, ["--instance-memory", "copy"])] if name == "hello" else [])
        for pool, extra in modes:
            label = f"{pool} copy" if extra else pool
            with Daemon(a.vmm, store, tmp, f"load-{name}-pool{pool}{'-copy' if extra else ''}",
                        pool, extra) as d:
                d.wait_pool({name: pool})
                verify(d, name, body, expect)
                for c in concurrencies:
                    log(f"load: {name}, --pool {label}, concurrency {c}, {a.seconds:g} s")
                    d.wait_idle()
                    before = d.metrics()
                    code, out, err, _ = run(
                        [*oha_args(a.oha, body_file), "-z", f"{int(a.seconds * 1000)}ms", "-w",
                         "-c", str(c), d.url(f"/v1/functions/{name}/invoke")],
                        timeout=a.seconds + 180,
                    )
                    if code != 0:
                        raise BenchError(f"oha exit {code}: {err.decode(errors='replace')}")
                    d.check_alive()
                    d.wait_idle()
                    after = d.metrics()
                    f = d.functions()
                    p = {"function": name, "pool": label, "concurrency": c}
                    p.update(oha_summary(json.loads(out)))
                    p["server"] = server_means(before, after)
                    p["live_instances_after"] = f["live_instances"]
                    p["load1_after"] = loadavg()[0]
                    points.append(p)
                    log(f"  {p['rps']:.0f} req/s, p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
                        f"non-200 {p['non_200']}")
    return points


def section_seccomp(a, tmp: Path, store: Path, concurrencies: list[int]) -> list[dict]:
    """Issue 21: hello and markdown served with the per-thread system call filters
    (`--seccomp on`, the default) against none (`--seccomp off`), side by side: the two
    daemons alternate, `--seccomp-rounds` times each, so that drift on the machine falls
    on both alike; each point is the median of its rounds."""
    rows = []
    for name in ("hello", "markdown"):
        _, body, expect = FUNCTIONS[name]
        body_file = tmp / f"{name}.body"
        body_file.write_bytes(body)
        samples: dict = {}
        for rnd in range(a.seccomp_rounds):
            for mode in ("on", "off"):
                with Daemon(a.vmm, store, tmp, f"seccomp-{name}-{mode}-{rnd}", 2,
                            ["--seccomp", mode]) as d:
                    d.wait_pool({name: 2})
                    verify(d, name, body, expect)
                    for c in concurrencies:
                        log(f"seccomp: {name}, --seccomp {mode}, round {rnd + 1}, concurrency {c}, {a.seconds:g} s")
                        d.wait_idle()
                        code, out, err, _ = run(
                            [*oha_args(a.oha, body_file), "-z", f"{int(a.seconds * 1000)}ms", "-w",
                             "-c", str(c), d.url(f"/v1/functions/{name}/invoke")],
                            timeout=a.seconds + 180,
                        )
                        if code != 0:
                            raise BenchError(f"oha exit {code}: {err.decode(errors='replace')}")
                        d.check_alive()
                        samples.setdefault((mode, c), []).append(oha_summary(json.loads(out)))
        for c in concurrencies:
            row = {"function": name, "concurrency": c}
            for mode in ("on", "off"):
                pts = samples[(mode, c)]
                for k in ("rps", "p50_ms", "p99_ms"):
                    row[f"{k}_{mode}"] = statistics.median(p[k] for p in pts)
                row[f"non_200_{mode}"] = sum(p["non_200"] for p in pts)
            rows.append(row)
    return rows


def print_seccomp(rows: list[dict]) -> None:
    print()
    print("## Seccomp filters: `--seccomp on` (default) against `--seccomp off`")
    print()
    print("`--pool 2`, the two daemons alternating, the median of the rounds per point; "
          "ratio = on / off (req/s above 1 or p50 below 1: the filtered daemon did better).")
    print()
    print("| function | concurrency | req/s on | req/s off | ratio | p50 ms on | p50 ms off | ratio | p99 ms on | p99 ms off | non-200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rr = r["rps_on"] / r["rps_off"] if r["rps_off"] else float("nan")
        pr = r["p50_ms_on"] / r["p50_ms_off"] if r["p50_ms_off"] else float("nan")
        print(f"| {r['function']} | {r['concurrency']} | {r['rps_on']:.0f} | {r['rps_off']:.0f} | {rr:.3f} "
              f"| {r['p50_ms_on']:.3f} | {r['p50_ms_off']:.3f} | {pr:.3f} | {r['p99_ms_on']:.2f} "
              f"| {r['p99_ms_off']:.2f} | {r['non_200_on'] + r['non_200_off']} |")


def section_cli(a, store: Path) -> list[dict]:
    rows = []
    for name in ("hello", "markdown"):
        function, body, expect = FUNCTIONS[name]
        cmds = {
            "restore": [a.vmm, "restore", name, "--store", store],
            "cold": [a.vmm, "run", *function],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        log(f"cli: {name}: {a.runs} x vmm restore and vmm run, interleaved")
        for _ in range(a.runs):
            for mode, cmd in cmds.items():
                code, out, err, dt = run(cmd, stdin=body)
                if code != 0 or expect not in out:
                    raise BenchError(f"{name} {mode}: exit {code}, stdout {out[:200]!r}, "
                                     f"stderr {err.decode(errors='replace')[-500:]}")
                times[mode].append(dt * 1e3)
        for mode, ts in times.items():
            ts.sort()
            rows.append({
                "function": name,
                "mode": mode,
                "runs": len(ts),
                "median_ms": statistics.median(ts),
                "p90_ms": percentile(ts, 90),
                "min_ms": ts[0],
                "max_ms": ts[-1],
            })
    return rows


BURST_JS = """// bench-serve burst function {i}: a hello variant with its own constants.
const K = {k};
const req = JSON.parse(std.in.readAsString() || "{{}}");
const name = typeof req.name === "string" ? req.name : "world";
print(JSON.stringify({{ fn: {i}, greeting: `Hello {i}, ${{name}}!`, k: K, mix: (K * name.length + {i}) % 997 }}));
"""


def section_burst(a, tmp: Path) -> dict:
    store = tmp / "store-burst"
    fndir = tmp / "burst-functions"
    fndir.mkdir()
    names = []
    log(f"burst: creating {BURST_TEMPLATES} templates")
    for i in range(BURST_TEMPLATES):
        js = fndir / f"burst{i}.js"
        js.write_text(BURST_JS.format(i=i, k=1000 + 37 * i))
        name = f"burst-{i}"
        create_template(a.vmm, store, name,
                        ["--module", QJS, "--runtime", "qjs", "--file", js, "--arg", js.name])
        names.append(name)
    body_file = tmp / "burst.body"
    body_file.write_bytes(HELLO_BODY)
    with Daemon(a.vmm, store, tmp, "burst", None) as d:
        f = d.functions()
        default_pool = f["pool"]
        d.wait_pool({n: default_pool for n in names})
        for i, n in enumerate(names):
            verify(d, n, HELLO_BODY, f'"fn":{i},'.encode())
        d.wait_idle()
        f = d.functions()
        live_before = f["live_instances"]
        log_offset = d.log_path.stat().st_size
        before = d.metrics()
        load1 = loadavg()[0]
        log(f"burst: {BURST_TEMPLATES} oha processes x -n {BURST_PER_TEMPLATE} -c {BURST_PER_TEMPLATE}, at once")
        procs = []
        t0 = time.perf_counter()
        for i, n in enumerate(names):
            out = tmp / f"burst-{i}.json"
            db = tmp / f"burst-{i}.sqlite"
            cmd = [*oha_args(a.oha, body_file), "-n", str(BURST_PER_TEMPLATE), "-c", str(BURST_PER_TEMPLATE),
                   "--db-url", db, "-o", out, d.url(f"/v1/functions/{n}/invoke")]
            procs.append((spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE), out, db))
        errs = []
        for p, _, _ in procs:
            try:
                _, err = p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                raise BenchError("burst: an oha process did not finish within 300 s")
            finally:
                reap(p)
            if p.returncode != 0:
                errs.append(err.decode(errors="replace"))
        wall = time.perf_counter() - t0
        if errs:
            raise BenchError("burst: oha failed:\n" + "\n".join(errs))
        d.check_alive()
        d.wait_idle()
        after = d.metrics()
        f_after = d.functions()
        durations: list[float] = []
        statuses: dict[str, int] = {}
        per_oha = []
        errors: dict[str, int] = {}
        for _, out, db in procs:
            s = oha_summary(json.loads(out.read_text()))
            per_oha.append(s)
            for k, v in s["errors"].items():
                errors[k] = errors.get(k, 0) + v
            con = sqlite3.connect(db)
            try:
                for dur, st in con.execute("SELECT duration, status FROM oha"):
                    durations.append(dur * 1e3)
                    statuses[str(st)] = statuses.get(str(st), 0) + 1
            finally:
                con.close()
        durations.sort()
        # Instances restored because no ready one was there, from the daemon's request log.
        with open(d.log_path, "rb") as lf:
            lf.seek(log_offset)
            on_demand = len(re.findall(rb"on_demand=true", lf.read()))
    oha_codes: dict[str, int] = {}
    for s in per_oha:
        for k, v in s["status_codes"].items():
            oha_codes[k] = oha_codes.get(k, 0) + v
    non200 = sum(v for k, v in oha_codes.items() if k != "200") + sum(errors.values())
    return {
        "templates": BURST_TEMPLATES,
        "requests": BURST_TEMPLATES * BURST_PER_TEMPLATE,
        "pool": default_pool,
        "wall_s": wall,
        "longest_oha_s": max(s["duration_s"] for s in per_oha),
        "responses": sum(oha_codes.values()),
        "ok": oha_codes.get("200", 0),
        "non_200": non200,
        "status_codes": oha_codes,
        "errors": errors,
        "recorded": len(durations),
        "p50_ms": percentile(durations, 50),
        "p99_ms": percentile(durations, 99),
        "max_ms": durations[-1] if durations else None,
        "restored_on_demand": on_demand,
        "live_instances_before": live_before,
        "live_instances_after": f_after["live_instances"],
        "server": server_means(before, after),
        "load1_before": load1,
    }


SMAPS_KEYS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "AnonHugePages")


def smaps_rollup(pid: int) -> dict[str, float]:
    """Fields of /proc/PID/smaps_rollup in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m and m.group(1) in SMAPS_KEYS:
            out[m.group(1)] = int(m.group(2)) / 1024
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    out["Shared"] = out.get("Shared_Clean", 0) + out.get("Shared_Dirty", 0)
    return out


def section_memory(a, tmp: Path) -> dict:
    store = tmp / "store-memory"
    function, body, expect = FUNCTIONS["hello"]
    log("memory: a store with only hello")
    create_template(a.vmm, store, "hello", function)
    n = MEMORY_INSTANCES
    log("memory: vmm serve --pool 0, one request")
    with Daemon(a.vmm, store, tmp, "memory-empty", 0) as d:
        verify(d, "hello", body, expect)
        f = d.wait_idle()
        time.sleep(0.5)
        f = d.functions()
        if f["live_instances"] != 0:
            raise BenchError(f"--pool 0 still has {f['live_instances']} instances after its request")
        empty = smaps_rollup(d.pid)
    result = {"instances": n, "pool_0_mib": empty, "modes": []}
    for mode, extra in (("shared", ["--instance-memory", "shared"]), ("copy", ["--instance-memory", "copy"])):
        log(f"memory: vmm serve --pool {n} {' '.join(extra)}")
        with Daemon(a.vmm, store, tmp, f"memory-full-{mode}", n, extra) as d:
            t0 = time.perf_counter()
            d.wait_pool({"hello": n})
            fill_s = time.perf_counter() - t0
            time.sleep(0.5)
            full = smaps_rollup(d.pid)
            live = d.functions()["live_instances"]
        per = {k: (full[k] - empty.get(k, 0)) / n for k in full}
        result["modes"].append({
            "mode": mode,
            "flags": extra,
            "live_instances": live,
            "wait_for_ready_s": fill_s,
            "pool_full_mib": full,
            "per_instance_mib": per,
        })
    return result


MEMINFO_KEYS = ("MemAvailable", "VmallocUsed", "Slab", "SecPageTables", "PageTables",
                "KernelStack", "AnonPages")


def meminfo() -> dict[str, int]:
    """The /proc/meminfo fields of MEMINFO_KEYS, KiB."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m and m.group(1) in MEMINFO_KEYS:
            out[m.group(1)] = int(m.group(2))
    return out


def section_density(a, tmp: Path) -> list[dict]:
    """Issue 19's measure: a daemon holding 2 ready hello instances against one holding
    `--density` of them: host memory per instance (MemAvailable and the kernel's own
    counters, before the daemon starts and once its pool is full), the fill rate, and hello
    at concurrency 1 and 16 with those instances idle beside the one serving."""
    store = tmp / "store-density"
    function, body, expect = FUNCTIONS["hello"]
    body_file = tmp / "density.body"
    body_file.write_bytes(body)
    mem = ["--mem", str(a.density_mem)] if a.density_mem else []
    log(f"density: a store with only hello {' '.join(mem)}")
    create_template(a.vmm, store, "hello", function + mem)
    rows = []
    # The daemon the big pool needs (worker processes: one per 256 instances, its default),
    # with 2 ready and with `--density` ready; and, for reference, the default daemon
    # with 2 (instances in its own process).
    max_instances = a.density + 16
    processes = -(-max_instances // 256)
    for n, procs in ((2, 0), (2, processes), (a.density, processes)):
        time.sleep(3.0)
        before = meminfo()
        extra = ["--max-instances", str(max_instances if procs else n + 16), "--memory-limit", "1000G",
                 "--processes", str(procs)]
        log(f"density: vmm serve --pool {n} --processes {procs}")
        with Daemon(a.vmm, store, tmp, f"density-{n}", n, extra) as d:
            t0 = time.perf_counter()
            marks = []
            deadline = t0 + max(120.0, n / 20)
            while True:
                d.check_alive()
                ready = {e["name"]: e["ready"] for e in d.functions()["functions"]}.get("hello", 0)
                marks.append((time.perf_counter() - t0, ready))
                if ready >= n:
                    break
                if time.perf_counter() > deadline:
                    raise BenchError(f"density: {ready} of {n} instances ready after {deadline - t0:.0f} s")
                time.sleep(0.05 if n < 100 else 0.1)
            fill_s = marks[-1][0]
            # The last tenth of the fill: does it slow down as instances pile up?
            tenth = next((t for t, r in marks if r >= 0.9 * n), fill_s)
            time.sleep(1.0)
            after = meminfo()
            verify(d, "hello", body, expect)
            row = {"instances": n, "fill_s": fill_s,
                   "fill_per_s": n / fill_s if fill_s > 0 else None,
                   "last_tenth_per_s": (n - int(0.9 * n)) / (fill_s - tenth) if fill_s > tenth else None,
                   "per_instance_kib": {k: (before[k] - after[k] if k == "MemAvailable" else after[k] - before[k]) / n
                                        for k in MEMINFO_KEYS if k in before and k in after},
                   "load": {}}
            for c in (1, 16):
                log(f"density: {n} ready, concurrency {c}, {a.seconds:g} s")
                d.wait_idle()
                m_before = d.metrics()
                code, out, err, _ = run(
                    [*oha_args(a.oha, body_file), "-z", f"{int(a.seconds * 1000)}ms", "-w",
                     "-c", str(c), d.url("/v1/functions/hello/invoke")],
                    timeout=a.seconds + 180,
                )
                if code != 0:
                    raise BenchError(f"oha exit {code}: {err.decode(errors='replace')}")
                d.check_alive()
                row["load"][str(c)] = oha_summary(json.loads(out))
                row["load"][str(c)]["server"] = server_means(m_before, d.metrics())
            row["guest_mib"] = a.density_mem or 512
            row["processes"] = procs
            rows.append(row)
            log(f"  {n} instances in {fill_s:.1f} s, {row['per_instance_kib'].get('MemAvailable', 0):.0f} KiB each")
    return rows


# ---------------------------------------------------------------- faas (issue 20)


PYTHON_WASM = ROOT / "workloads" / "python.wasm"

# Issue 20's targets and SEUSS's own measurements, ms per request, by path.
FAAS_TARGET_MS = {"cold": 5.0, "warm": 1.5, "hot": 0.3}
SEUSS_MS = {"cold": 7.5, "warm": 3.5, "hot": 0.8}
FAAS_CONCURRENCY = 32
FAAS_ENTRY = {"js": "hello.js", "python": "hello.py"}
FAAS_TOKEN = "bench-serve-faas-" + os.urandom(8).hex()

INVOKE_LOG = re.compile(rb" invoke template=(\S+) .*? total_ms=([0-9.e+-]+)")
BUILD_LOG = re.compile(rb"built on its first request function=(\S+) .*? ms=([0-9.e+-]+)")


class Client:
    """One keep-alive HTTP connection to a daemon, with its token (one per thread). The
    connection is opened before the first request's clock starts, as oha's are."""

    def __init__(self, d: Daemon, timeout: float = 600):
        self.d = d
        self.timeout = timeout
        self.c: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = None

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers with lower-case names, body, seconds from sending the request to
        its response's last byte)."""
        h = {**self.d.auth_headers(), **(headers or {})}
        for attempt in (0, 1):
            fresh = self.c is None
            if fresh:
                self.c = http.client.HTTPConnection(self.d.host, self.d.port, timeout=self.timeout)
                self.c.connect()
            try:
                t0 = time.perf_counter()
                self.c.request(method, path, body=body, headers=h)
                r = self.c.getresponse()
                data = r.read()
                dt = time.perf_counter() - t0
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the daemon closed: once more on a new one.
                self.close()
                if fresh or attempt:
                    raise
                continue
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            if r.will_close:
                self.close()
            return r.status, hdrs, data, dt
        raise AssertionError("unreachable")


def faas_source(runtime: str, comment: str, marker: str | None = None) -> str:
    """examples/hello.js or hello.py with a comment of its own first (a distinct source, so
    a template of its own); with `marker`, a constant the function puts in its output."""
    src = (ROOT / "examples" / FAAS_ENTRY[runtime]).read_text()
    if runtime == "js":
        head, old, new = f"// {comment}\n", "print(JSON.stringify({ greeting:", "print(JSON.stringify({ fn: FN, greeting:"
        const = f'const FN = "{marker}";\n'
    else:
        head, old, new = f"# {comment}\n", 'print(json.dumps({"greeting":', 'print(json.dumps({"fn": FN, "greeting":'
        const = f'FN = "{marker}"\n'
    if marker is None:
        return head + src
    if old not in src:
        raise BenchError(f"examples/{FAAS_ENTRY[runtime]} no longer has {old!r}: update faas_source")
    return head + const + src.replace(old, new, 1)


def faas_expect(marker: str | None) -> list[bytes]:
    """What a faas function's response to HELLO_BODY must hold."""
    out = [b'"greeting":"Hello, world!"']
    if marker is not None:
        out.append(f'"fn":"{marker}"'.encode())
    return out


def faas_deploy(cl: Client, name: str, runtime: str, source: str, build: str) -> tuple[dict, float]:
    """PUT /v1/functions/NAME; returns the daemon's answer and the seconds to it."""
    spec = {"runtime": runtime, "source": source, "entry": FAAS_ENTRY[runtime], "build": build}
    status, _, body, dt = cl.call("PUT", f"/v1/functions/{name}", json.dumps(spec).encode(),
                                  {"Content-Type": "application/json"})
    if status not in (200, 201):
        raise BenchError(f"deploy {name}: {status} {body[:500]!r}\n{cl.d.log_tail()}")
    return json.loads(body), dt


def faas_wait_ready(d: Daemon, cl: Client, name: str, want: int, timeout: float = 30) -> bool:
    """Wait until deployed function `name` has `want` ready instances (its pool filled);
    False if it has not within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        d.check_alive()
        status, _, body, _ = cl.call("GET", f"/v1/functions/{name}")
        if status == 200 and json.loads(body)["pool"]["ready"] >= want:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def log_since(d: Daemon, offset: int) -> bytes:
    with open(d.log_path, "rb") as f:
        f.seek(offset)
        return f.read()


def path_mean_ms(before: dict[str, float], after: dict[str, float], path: str) -> float | None:
    """Mean of vmm_invoke_path_seconds{path=PATH} over the requests between two scrapes."""
    k = f'vmm_invoke_path_seconds_{{}}{{{{path="{path}"}}}}'
    s = after.get(k.format("sum"), 0) - before.get(k.format("sum"), 0)
    n = after.get(k.format("count"), 0) - before.get(k.format("count"), 0)
    return s / n * 1e3 if n > 0 else None


def dist(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "max": xs[-1] if xs else None, "mean": statistics.fmean(xs) if xs else None}


def faas_per_request(d: Daemon, cl: Client, path: str, names: list[str], between) -> dict:
    """One request at a time to each of `names` (in order), each expected to take `path`:
    the client's time, the daemon's (its log's total_ms for the request, the mean of
    vmm_invoke_path_seconds), the guest's (x-vmm-run-ms). A sample whose x-vmm-path says
    another path is dropped and counted; `between(name)` runs after each sample."""
    d.check_alive()
    load0 = loadavg()
    offset = d.log_path.stat().st_size
    m0 = d.metrics()
    samples = []
    for n in names:
        status, h, out, dt = cl.call("POST", f"/v1/functions/{n}/invoke", HELLO_BODY)
        ok = status == 200 and all(e in out for e in faas_expect(None))
        samples.append({"name": n, "status": status, "ok": ok, "path": h.get("x-vmm-path"),
                        "client_ms": dt * 1e3, "run_ms": float(h["x-vmm-run-ms"]) if "x-vmm-run-ms" in h else None,
                        "body": out[:200].decode(errors="replace")})
        between(n)
    d.check_alive()
    m1 = d.metrics()
    # The daemon logs each request as it answers it: the i-th line of a name is its i-th request.
    text = log_since(d, offset)
    totals: dict[str, list[float]] = {}
    for m in INVOKE_LOG.finditer(text):
        totals.setdefault(m.group(1).decode(), []).append(float(m.group(2)))
    builds = [float(m.group(2)) for m in BUILD_LOG.finditer(text)]
    for s in samples:
        q = totals.get(s["name"])
        s["daemon_ms"] = q.pop(0) if q else None
    kept = [s for s in samples if s["ok"] and s["path"] == path]
    mism = [s for s in samples if s["ok"] and s["path"] != path]
    failed = [s for s in samples if not s["ok"]]
    for s in failed[:3]:
        log(f"  {path}: {s['name']} failed: {s['status']} {s['body']!r}")
    paths_seen: dict[str, int] = {}
    for s in mism:
        paths_seen[str(s["path"])] = paths_seen.get(str(s["path"]), 0) + 1
    r = {
        "path": path,
        "requests": len(samples),
        "kept": len(kept),
        "mismatched": len(mism),
        "mismatched_paths": paths_seen,
        "failed": len(failed),
        "client_ms": dist([s["client_ms"] for s in kept]),
        "daemon_ms": dist([s["daemon_ms"] for s in kept if s["daemon_ms"] is not None]),
        "run_ms": dist([s["run_ms"] for s in kept if s["run_ms"] is not None]),
        "daemon_metrics_mean_ms": path_mean_ms(m0, m1, path),
        "build_ms": dist(builds) if builds else None,
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
    }
    log(f"  {path}: {r['kept']} kept, {r['mismatched']} on another path, {r['failed']} failed; "
        f"client p50 {fmt(r['client_ms']['p50'])} ms, daemon p50 {fmt(r['daemon_ms']['p50'])} ms")
    return r


def faas_deploy_times(d: Daemon, cl: Client, n: int, pool: int) -> list[dict]:
    """Section 3: PUT to 201 with build now, JS then Python; the first of each runtime builds
    its runtime base (and compiles the runtime: the store is new) and is reported apart."""
    rows = []
    for runtime in ("js", "python"):
        first = None
        times, deploy_ms, create_ms, unfilled = [], [], [], 0
        log(f"faas: deploy time, {runtime}: 1 + {n} deploys (build now)")
        load0 = loadavg()
        for i in range(n + 1):
            name = f"deploy-{runtime}-{i:03d}"
            ans, dt = faas_deploy(cl, name, runtime, faas_source(runtime, f"bench-serve deploy {name}"), "now")
            if not ans.get("built"):
                raise BenchError(f"deploy {name} (build now) answered built=false: {ans}")
            if i == 0:
                first = {"client_ms": dt * 1e3, "deploy_ms": ans.get("deploy_ms"), "create_ms": ans.get("create_ms")}
            else:
                times.append(dt * 1e3)
                deploy_ms.append(ans["deploy_ms"])
                create_ms.append(ans["create_ms"])
            # The next deploy with the pool keeper done: the deploy alone is measured.
            if not faas_wait_ready(d, cl, name, pool):
                unfilled += 1
        rows.append({"runtime": runtime, "deploys": len(times), "first": first,
                     "client_ms": dist(times), "deploy_ms": dist(deploy_ms), "create_ms": dist(create_ms),
                     "pool_not_filled_within_30s": unfilled,
                     "loadavg_before": load0, "loadavg_after": loadavg()})
        log(f"  first {first['client_ms']:.0f} ms, then p50 {fmt(rows[-1]['client_ms']['p50'])} ms")
    return rows


def faas_burst_names(n: int) -> list[tuple[str, str]]:
    """(name, runtime) of the burst's functions: 3 of 4 JS, every 4th Python."""
    return [(f"burst-{i:04d}", "python" if i % 4 == 3 else "js") for i in range(n)]


def faas_run_bounded(fn, items: list, concurrency: int, deadline_s: float, answer_timeout_s: float,
                     stop_check=None) -> tuple[list[dict], str | None, float]:
    """Run `fn(item)` over `items`, `concurrency` at a time, in order. Stops submitting
    when `deadline_s` has passed, when no answer was right for `answer_timeout_s`
    (stalled), or when `stop_check()` names a reason; what is still running then gets
    `answer_timeout_s` more and is counted as unanswered after that. `fn` returns a dict
    with "ok". Returns (results in completion order, why it stopped early or None, wall
    seconds from the first submission to the last answer waited for)."""
    ex = concurrent.futures.ThreadPoolExecutor(concurrency)
    pending: dict = {}
    results: list[dict] = []
    stop = None
    nxt = 0
    t0 = time.perf_counter()
    last_ok = t0
    try:
        while nxt < len(items) and len(pending) < concurrency:
            pending[ex.submit(fn, items[nxt])] = items[nxt]
            nxt += 1
        while pending:
            timeout = None if stop is None else max(0.0, stop_until - time.perf_counter())
            done, _ = concurrent.futures.wait(list(pending), timeout=1.0 if stop is None else timeout,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            now = time.perf_counter()
            for f in done:
                pending.pop(f)
                r = f.result()
                results.append(r)
                if r["ok"]:
                    last_ok = now
            if stop is None:
                if now - t0 > deadline_s:
                    stop = f"past the {deadline_s:g}-s deadline"
                elif now - last_ok > answer_timeout_s:
                    stop = f"stalled: no right answer for {answer_timeout_s:g} s"
                elif stop_check is not None:
                    stop = stop_check()
                if stop is not None:
                    stop_until = now + answer_timeout_s
                    log(f"  stopping: {stop}; {len(results)} answered, {len(pending)} in flight, "
                        f"{len(items) - nxt} not sent")
            if stop is None:
                while nxt < len(items) and len(pending) < concurrency:
                    pending[ex.submit(fn, items[nxt])] = items[nxt]
                    nxt += 1
            elif not done and time.perf_counter() >= stop_until:
                break
        wall = time.perf_counter() - t0
        for item in pending.values():
            results.append({"name": item[0], "runtime": item[1], "status": None, "ok": False, "path": None,
                            "ms": None, "body": "no answer before the run stopped"})
    finally:
        # Never wait here for requests that hang: the daemon is stopped after this, which
        # ends them.
        ex.shutdown(wait=not pending, cancel_futures=True)
    for item in items[nxt:]:
        results.append({"name": item[0], "runtime": item[1], "status": None, "ok": False, "path": None,
                        "ms": None, "body": "not sent", "not_sent": True})
    if stop is not None and nxt >= len(items) and not pending:
        stop = None  # every item was sent and answered all the same
    return results, stop, wall


def low_host_memory() -> str | None:
    """A reason to stop a burst before the host runs out of memory (it is shared)."""
    m = meminfo()
    avail = m.get("MemAvailable")
    total = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    if avail is not None and avail < max(2 << 20, total // 8):
        return f"the host's MemAvailable fell to {avail >> 10} MiB"
    return None


class ProcMemory:
    """Samples a process's VmRSS and RssShmem (MiB) every half second in a thread."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak_rss = 0.0
        self.peak_shmem = 0.0
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def sample(self) -> dict[str, float]:
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                m = re.match(r"(VmRSS|RssShmem|RssAnon):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2)) / 1024
        except OSError:
            pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            if s:
                self.last = s
                self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
                self.peak_shmem = max(self.peak_shmem, s.get("RssShmem", 0))
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {"peak_rss_mib": self.peak_rss, "peak_shmem_mib": self.peak_shmem, "last_mib": self.last}


def faas_burst_served(a, d: Daemon, names: list[tuple[str, str]]) -> tuple[dict, dict]:
    """Section 2, served: deploy every function (on_first_invoke, 8 at a time, timed apart),
    then one request to each at FAAS_CONCURRENCY."""
    local = threading.local()

    def client(timeout: float = 600) -> Client:
        if not hasattr(local, "c"):
            local.c = Client(d, timeout)
        return local.c

    log(f"faas: burst: deploying {len(names)} functions (on_first_invoke, 8 at a time)")
    t0 = time.perf_counter()

    def put(nr):
        name, runtime = nr
        ans, dt = faas_deploy(client(), name, runtime,
                              faas_source(runtime, f"bench-serve burst {name}", name), "on_first_invoke")
        if ans.get("built") or ans.get("template") is not None:
            raise BenchError(f"deploy {name} (on_first_invoke) built it already: {ans}")
        return dt * 1e3

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        put_ms = list(ex.map(put, names))
    deploy = {"functions": len(names), "wall_s": time.perf_counter() - t0, "ms": dist(put_ms)}
    log(f"  {deploy['wall_s']:.1f} s")

    d.check_alive()
    m0 = d.metrics()
    load0 = loadavg()
    offset = d.log_path.stat().st_size
    log(f"faas: burst: one request to each of {len(names)} new functions, {FAAS_CONCURRENCY} at a time")

    def invoke(nr):
        name, runtime = nr
        cl = client(a.burst_answer_timeout)
        try:
            status, h, out, dt = cl.call("POST", f"/v1/functions/{name}/invoke", HELLO_BODY)
        except (OSError, http.client.HTTPException) as e:
            cl.close()
            return {"name": name, "runtime": runtime, "status": None, "ok": False, "path": None,
                    "ms": None, "body": f"{type(e).__name__}: {e}"}
        ok = status == 200 and all(e in out for e in faas_expect(name))
        return {"name": name, "runtime": runtime, "status": status, "ok": ok, "path": h.get("x-vmm-path"),
                "ms": dt * 1e3, "body": out[:300].decode(errors="replace")}

    local = threading.local()  # new connections for the burst, with its answer timeout
    mem = ProcMemory(d.pid)
    res, stop, wall = faas_run_bounded(invoke, names, FAAS_CONCURRENCY, a.burst_deadline,
                                       a.burst_answer_timeout, low_host_memory)
    memory = mem.stop()
    d.check_alive()
    m1 = d.metrics()
    served = faas_burst_result("served", res, wall, load0, stop)
    served["daemon_cold_mean_ms"] = path_mean_ms(m0, m1, "cold")
    served["live_instances_after"] = d.functions()["live_instances"]
    served["daemon_memory"] = memory
    text = log_since(d, offset)
    served["built"] = len(BUILD_LOG.findall(text))
    served["daemon_refusals"] = [m.decode(errors="replace") for m in
                                 re.findall(rb"refused: template \S+: ([^\n]*?) template=", text)]
    return deploy, served


def faas_burst_result(how: str, res: list[dict], wall: float, load0: list[float], stop: str | None) -> dict:
    sent = [r for r in res if not r.get("not_sent")]
    failed = [r for r in sent if not r["ok"]]
    for r in failed[:5]:
        log(f"  {how}: {r['name']} failed: {r['status']} {r['body']!r}")
    paths: dict[str, int] = {}
    for r in sent:
        paths[str(r.get("path"))] = paths.get(str(r.get("path")), 0) + 1
    reasons: dict[str, int] = {}
    for r in failed:
        # The daemon's message without the function's name, to count alike failures.
        why = re.sub(r"burst-\d+", "NAME", f"{r['status']}: {r['body'].strip()}")
        why = re.sub(r"/\S*/store-faas/", "STORE/", why)[:200]
        reasons[why] = reasons.get(why, 0) + 1
    by_rt = {rt: dist([r["ms"] for r in sent if r["ok"] and r["runtime"] == rt]) for rt in ("js", "python")}
    ok = len(sent) - len(failed)
    out = {
        "how": how,
        "functions": len(res),
        "sent": len(sent),
        "js": sum(r["runtime"] == "js" for r in res),
        "python": sum(r["runtime"] == "python" for r in res),
        "concurrency": FAAS_CONCURRENCY,
        "wall_s": wall,
        "per_s": ok / wall if wall > 0 else None,
        "ok": ok,
        "failed": len(failed),
        "failure_reasons": reasons,
        "stopped": stop,
        "paths": paths,
        "ms": dist([r["ms"] for r in sent if r["ok"]]),
        "ms_by_runtime": by_rt,
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
    }
    log(f"  {how}: {ok} of {len(res)} right in {wall:.1f} s, {fmt(out['per_s'], 1)} functions/s, "
        f"p50 {fmt(out['ms']['p50'])} ms, p99 {fmt(out['ms']['p99'])} ms, {out['failed']} failed, paths {paths}"
        + (f", stopped: {stop}" if stop else ""))
    return out


def faas_burst_cold_boot(a, store: Path, fndir: Path, names: list[tuple[str, str]]) -> dict:
    """Section 2, the platform without snapshots: a `vmm run` (cold boot) per request, the
    same functions, FAAS_CONCURRENCY at a time, the compiled-module cache of the store warm."""
    module = {"js": QJS, "python": PYTHON_WASM}
    rtflag = {"js": "qjs", "python": "python"}
    files = {}
    for name, runtime in names:
        f = fndir / f"{name}.{'js' if runtime == 'js' else 'py'}"
        f.write_text(faas_source(runtime, f"bench-serve burst {name}", name))
        files[name] = f

    def cmd(name, runtime):
        return [a.vmm, "run", "--module", module[runtime], "--runtime", rtflag[runtime],
                "--file", files[name], "--arg", files[name].name, "--store", store]

    # Untimed: one run of each runtime, so both its compiled module and the files are cached.
    for name, runtime in ({rt: (n, rt) for n, rt in names}).values():
        code, out, err, _ = run(cmd(name, runtime), stdin=HELLO_BODY, timeout=600)
        if code != 0 or not all(e in out for e in faas_expect(name)):
            raise BenchError(f"vmm run {name}: exit {code}, {out[:200]!r} {err.decode(errors='replace')[-500:]}")

    log(f"faas: burst: a cold `vmm run` per function, {len(names)} functions, {FAAS_CONCURRENCY} at a time")

    def one(nr):
        name, runtime = nr
        try:
            code, out, err, dt = run(cmd(name, runtime), stdin=HELLO_BODY, timeout=a.burst_answer_timeout)
        except BenchError as e:
            return {"name": name, "runtime": runtime, "status": None, "ok": False, "path": "cold boot",
                    "ms": None, "body": str(e)}
        ok = code == 0 and all(e in out for e in faas_expect(name))
        return {"name": name, "runtime": runtime, "status": code, "ok": ok, "path": "cold boot",
                "ms": dt * 1e3, "body": (out[:200] + err[-300:]).decode(errors="replace")}

    load0 = loadavg()
    res, stop, wall = faas_run_bounded(one, names, FAAS_CONCURRENCY, a.burst_deadline,
                                       a.burst_answer_timeout, low_host_memory)
    return faas_burst_result("cold boot", res, wall, load0, stop)


def section_faas(a, tmp: Path) -> dict:
    """Issue 20's bench: deployed functions (the deploy API) on SEUSS's three paths, a burst
    of new functions against a cold boot per request, and the time to deploy."""
    store = tmp / "store-faas"
    auth = tmp / "faas.auth"
    digest = hashlib.sha256(FAAS_TOKEN.encode()).hexdigest()
    auth.write_text(f"bench sha256:{digest} deploy,invoke,metrics\n")
    extra = ["--auth", auth, "--runtime-module", f"js={QJS}", "--runtime-module", f"python={PYTHON_WASM}"]
    fndir = tmp / "faas-functions"
    fndir.mkdir()
    n_samples = a.faas_samples
    result: dict = {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                    "loadavg_start": loadavg(), "samples": n_samples}
    names = faas_burst_names(a.burst)
    with Daemon(a.vmm, store, tmp, "faas", None, extra, token=FAAS_TOKEN) as d:
        cl = Client(d)
        pool = d.functions()["pool"]
        result["pool"] = pool
        # 3 first: it builds the runtime bases that every later build starts from.
        result["deploy"] = faas_deploy_times(d, cl, a.faas_deploys, pool)

        # 1. cold: N distinct copies of hello.js, each built on its first request.
        cold = [f"cold-{i:03d}" for i in range(n_samples)]
        log(f"faas: cold: deploying {n_samples} copies of hello.js (on_first_invoke)")
        for n in cold:
            faas_deploy(cl, n, "js", faas_source("js", f"bench-serve cold {n}"), "on_first_invoke")
        log(f"faas: cold: one request to each, one at a time (each after the last one's pool filled)")
        paths = {}
        paths["cold"] = faas_per_request(
            d, cl, "cold", cold, lambda n: (faas_wait_ready(d, cl, n, pool), time.sleep(0.01)))

        # 1. hot: one function with its pool (default) filled, again and again.
        hot = "hot-hello"
        faas_deploy(cl, hot, "js", faas_source("js", "bench-serve hot"), "now")
        if not faas_wait_ready(d, cl, hot, pool):
            raise BenchError(f"{hot}: pool not filled in 30 s")
        for _ in range(5):  # untimed
            cl.call("POST", f"/v1/functions/{hot}/invoke", HELLO_BODY)
        time.sleep(0.2)
        # The client's floor: the daemon's cheapest answer on the same connection.
        floor = []
        for _ in range(n_samples):
            status, _, _, dt = cl.call("GET", "/healthz")
            if status == 200:
                floor.append(dt * 1e3)
            time.sleep(0.01)
        result["healthz_ms"] = dist(floor)
        log(f"faas: hot: {n_samples} requests to {hot}, one at a time, --pool {pool}")
        paths["hot"] = faas_per_request(d, cl, "hot", [hot] * n_samples, lambda n: time.sleep(0.01))

        # 1. warm: the same function from a second daemon on the store, --pool 0.
        log("faas: warm: a second daemon on the same store, --pool 0")
        with Daemon(a.vmm, store, tmp, "faas-pool0", 0, extra, token=FAAS_TOKEN) as d0:
            cl0 = Client(d0)
            for _ in range(5):  # untimed: loads the template
                cl0.call("POST", f"/v1/functions/{hot}/invoke", HELLO_BODY)
            time.sleep(0.2)
            log(f"faas: warm: {n_samples} requests to {hot}, one at a time, --pool 0")
            paths["warm"] = faas_per_request(d0, cl0, "warm", [hot] * n_samples, lambda n: time.sleep(0.01))
            cl0.close()
        result["paths"] = [paths[p] for p in ("cold", "warm", "hot")]

        # 2. the burst, served.
        result["burst_deploy"], served = faas_burst_served(a, d, names)
        cl.close()
    # 2. the burst, a cold boot per request (the daemon stopped: all the CPUs for it).
    base_n = a.burst_baseline if a.burst_baseline else len(names)
    base_n = min(base_n, len(names))
    cold_boot = faas_burst_cold_boot(a, store, fndir, names[:base_n])
    result["burst"] = [served, cold_boot]
    result["loadavg_end"] = loadavg()
    return result


def print_faas(f: dict) -> None:
    la = lambda xs: " ".join(f"{x:.2f}" for x in xs)
    print()
    print("## FaaS (issue 20): deployed functions over the deploy API")
    print()
    print(f"{f['cpus']} CPUs (nproc {f['affinity']}); load average at the section's start "
          f"`{la(f['loadavg_start'])}`, at its end `{la(f['loadavg_end'])}`. One daemon "
          f"(`vmm serve --auth ... --runtime-module js=... --runtime-module python=...`, pool {f['pool']}) "
          "on a new store; time at the client: Python http.client on a kept-alive connection, "
          "from sending the request to the response's last byte.")
    print()
    print(f"### Per request, one at a time: hello (examples/hello.js), by path ({f['samples']} requests each)")
    print()
    print("cold: a distinct copy of hello.js per request (a comment of its own), deployed with "
          '`"build": "on_first_invoke"` and asked once; each after the previous one\'s pool filled. '
          f"warm: one function from a second daemon on the same store with `--pool 0` (an instance "
          f"restored for each request, destroyed after it). hot: the same function with its pool "
          f"({f['pool']}) filled. 10 ms between requests; 5 untimed requests first for warm and hot. "
          "Every sample's `x-vmm-path` is checked: one saying another path is dropped and counted. "
          "Daemon: its log's `total_ms` for the request (arrival to answer); metrics mean: "
          "`vmm_invoke_path_seconds` sum / count over the samples; guest run: `x-vmm-run-ms`. "
          f"The client's floor, `GET /healthz` on the same connection: p50 {fmt(f['healthz_ms']['p50'])} ms, "
          f"p99 {fmt(f['healthz_ms']['p99'])} ms.")
    print()
    print("| path | kept | other path | failed | client p50 ms | client p99 ms | daemon p50 ms | daemon p99 ms "
          "| metrics mean ms | guest run p50 ms | build p50 ms | target ms | SEUSS ms | client p50 / target | load1 before / after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in f["paths"]:
        other = str(p["mismatched"]) + (f" ({', '.join(f'{k} {v}' for k, v in p['mismatched_paths'].items())})"
                                        if p["mismatched"] else "")
        b = p.get("build_ms")
        print(f"| {p['path']} | {p['kept']}/{p['requests']} | {other} | {p['failed']} | {fmt(p['client_ms']['p50'])} "
              f"| {fmt(p['client_ms']['p99'])} | {fmt(p['daemon_ms']['p50'])} | {fmt(p['daemon_ms']['p99'])} "
              f"| {fmt(p['daemon_metrics_mean_ms'])} | {fmt(p['run_ms']['p50'])} | {fmt(b['p50']) if b else '-'} "
              f"| {fmt(FAAS_TARGET_MS[p['path']], 1)} | {fmt(SEUSS_MS[p['path']], 1)} "
              f"| {ratio(p['client_ms']['p50'], FAAS_TARGET_MS[p['path']])} "
              f"| {fmt(p['loadavg_before'][0])} / {fmt(p['loadavg_after'][0])} |")
    served, boot = f["burst"]
    dep = f["burst_deploy"]
    print()
    print(f"### Burst of new functions: {served['functions']} distinct functions, one request each, "
          f"{served['concurrency']} at a time")
    print()
    print(f"3 of 4 JS (examples/hello.js), every 4th Python (examples/hello.py), each with its name in a "
          f"constant it prints; every response checked for its own function's name and greeting. "
          f"Served: deployed with `\"build\": \"on_first_invoke\"` first ({dep['functions']} PUTs, 8 at a time: "
          f"{fmt(dep['wall_s'])} s, p50 {fmt(dep['ms']['p50'])} ms, p99 {fmt(dep['ms']['p99'])} ms; not in the "
          f"times below), so each request builds its function's template. Cold boot: `vmm run --module "
          f"qjs-wasi-reactor.wasm|python.wasm --runtime qjs|python --file F --arg F --store STORE` per function, "
          f"the request on stdin, the same concurrency (a thread pool), the daemon stopped; `--store` is the "
          f"daemon's store, so the compiled-module cache is warm for both (and one untimed run of each runtime "
          f"first). Wall: first request sent to last response; functions/s: those answered right / wall.")
    if boot["functions"] < served["functions"]:
        print()
        print(f"**The cold-boot baseline ran on the first {boot['functions']} of the {served['functions']} "
              f"functions (same mix: {boot['js']} JS, {boot['python']} Python).**")
    print()
    print("| how | functions (JS / Python) | right / sent | conc | wall s | functions/s | p50 ms | p99 ms | max ms "
          "| JS p50 / p99 ms | Python p50 / p99 ms | failed | paths | load1 before / after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|")
    for r in (served, boot):
        js, py = r["ms_by_runtime"]["js"], r["ms_by_runtime"]["python"]
        print(f"| {'served (deploy API, cold path)' if r is served else 'cold boot (`vmm run`)'} "
              f"| {r['functions']} ({r['js']} / {r['python']}) | {r['ok']} / {r['sent']} | {r['concurrency']} "
              f"| {fmt(r['wall_s'])} | {fmt(r['per_s'], 1)} | {fmt(r['ms']['p50'])} | {fmt(r['ms']['p99'])} "
              f"| {fmt(r['ms']['max'])} | {fmt(js['p50'])} / {fmt(js['p99'])} | {fmt(py['p50'])} / {fmt(py['p99'])} "
              f"| {r['failed']} | {', '.join(f'{k} {v}' for k, v in r['paths'].items())} "
              f"| {fmt(r['loadavg_before'][0])} / {fmt(r['loadavg_after'][0])} |")
    print()
    print(f"Served over cold boot, functions/s (right answers / wall): **{ratio(served['per_s'], boot['per_s'])}**; "
          f"cold boot's latency over served: p50 {ratio(boot['ms']['p50'], served['ms']['p50'])}, "
          f"p99 {ratio(boot['ms']['p99'], served['ms']['p99'])} (above 1x: served is faster).")
    mem = served.get("daemon_memory") or {}
    print()
    print(f"Served, in the daemon: {served.get('built')} templates built on a first request; mean on the cold path "
          f"{fmt(served.get('daemon_cold_mean_ms'))} ms; instances alive after: {served.get('live_instances_after')} "
          f"(the pool keeper fills each new template's pool up to --max-instances during the burst); its memory "
          f"peaked at {fmt(mem.get('peak_rss_mib'), 0)} MiB VmRSS, {fmt(mem.get('peak_shmem_mib'), 0)} MiB of it "
          f"RssShmem (the templates' memory images).")
    for r in (served, boot):
        if r.get("stopped"):
            print()
            print(f"**{r['how']}: stopped early, {r['stopped']}**: {r['sent']} of {r['functions']} functions sent; "
                  "the rows above count only those, and what was unanswered when it stopped as failed.")
        if r["failure_reasons"]:
            print()
            print(f"{r['how']}: failures by answer (status: body, the function's name as NAME):")
            print()
            for why, k in sorted(r["failure_reasons"].items(), key=lambda kv: -kv[1]):
                print(f"* {k} x `{why}`")
    print()
    print("### Deploy time: `PUT /v1/functions/NAME` to its 201, `\"build\": \"now\"`")
    print()
    print("Distinct functions (hello.js / hello.py with a comment of their own), one at a time, each after "
          "the previous one's pool filled. The first deploy of each runtime also builds its runtime base (in "
          "a new store; the runtime is compiled too unless wasmtime's compiled module is cached already) and "
          "is not in the p50/p99. Daemon: the answer's `deploy_ms` and `create_ms` (the template build).")
    print()
    print("| runtime | deploys | client p50 ms | client p99 ms | daemon deploy_ms p50 / p99 | create_ms p50 "
          "| first deploy (runtime base) client ms | its create_ms | load1 before / after |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for r in f["deploy"]:
        print(f"| {r['runtime']} | {r['deploys']} | {fmt(r['client_ms']['p50'])} | {fmt(r['client_ms']['p99'])} "
              f"| {fmt(r['deploy_ms']['p50'])} / {fmt(r['deploy_ms']['p99'])} | {fmt(r['create_ms']['p50'])} "
              f"| {fmt(r['first']['client_ms'], 0)} | {fmt(r['first']['create_ms'], 0)} "
              f"| {fmt(r['loadavg_before'][0])} / {fmt(r['loadavg_after'][0])} |")
        if r["pool_not_filled_within_30s"]:
            print(f"\n{r['pool_not_filled_within_30s']} {r['runtime']} deploys' pools were not filled within 30 s.")


# ---------------------------------------------------------------- output


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def ratio(num, den) -> str:
    if num is None or den in (None, 0):
        return "-"
    return f"{num / den:.1f}x"


def print_density(rows: list[dict]) -> None:
    print()
    print("## Density: ready hello instances in one daemon (and its worker processes)")
    print()
    print("Per instance, KiB: the fall in MemAvailable and the rise of the kernel's counters "
          "from before the daemon started to its pool being full. Fill: from start to all "
          "ready, and the rate over the last tenth. Then hello over HTTP (oha) with those "
          "instances idle: p50/p99 ms at concurrency 1, req/s and p99 at 16.")
    print()
    keys = [k for k in MEMINFO_KEYS]
    print("| ready | processes | guest MiB | fill s | inst/s | last tenth inst/s | " + " | ".join(keys)
          + " | c=1 p50 / p99 ms | c=16 req/s | c=16 p99 ms | non-200 | c=16 server run / reset ms |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(keys) + "---|---:|---:|---:|---|")
    for row in rows:
        per = row["per_instance_kib"]
        l1, l16 = row["load"]["1"], row["load"]["16"]
        print(f"| {row['instances']} | {row.get('processes', 0)} | {row.get('guest_mib', 512)} | {fmt(row['fill_s'])} | {fmt(row['fill_per_s'], 0)} "
              f"| {fmt(row['last_tenth_per_s'], 0)} | "
              + " | ".join(fmt(per.get(k), 0) for k in keys)
              + f" | {fmt(l1['p50_ms'])} / {fmt(l1['p99_ms'])} | {fmt(l16['rps'], 0)} "
              f"| {fmt(l16['p99_ms'])} | {l1['non_200'] + l16['non_200']} "
              f"| {fmt(l16.get('server', {}).get('run_ms'))} / {fmt(l16.get('server', {}).get('reset_ms'))} |")


def print_markdown(r: dict) -> None:
    m = r["meta"]
    print("# vmm serve: load benchmark (tools/bench-serve.sh)")
    print()
    if m["sections"] == ["faas"]:
        print(f"commit {m['commit']}, {m['date']}, {m['cpus']} CPUs, Linux {m['kernel']}")
    else:
        print(f"commit {m['commit']}, {m['date']}, {m['cpus']} CPUs, Linux {m['kernel']}, {m['oha']}, "
              f"{m['seconds']:g} s per load point, {m['runs']} CLI runs")
    print()
    print(f"* at start: `{m['uptime_start']}`")
    print(f"* at end:   `{m['uptime_end']}`")
    cli = {(c["function"], c["mode"]): c for c in r.get("cli", [])}
    points = r.get("load", [])
    if points:
        print()
        print(f"## Requests over HTTP (oha, keep-alive connections, {m['seconds']:g} s per point)")
        print()
        print("Time to response at the client. `restore/p50` and `cold/p50`: the median wall time of a "
              "`vmm restore` / `vmm run` process of the same function over the served p50. "
              "In the server (means, ms): queue wait / acquire (take a ready instance, or restore one) "
              "/ run / reset after the response.")
        print()
        print("| function | pool | conc | req/s | p50 ms | p99 ms | p99.9 ms | non-200 | responses "
              "| restore/p50 | cold/p50 | server: queue / acquire / run / reset ms | live after | load1 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for p in points:
            s = p["server"]
            rest = cli.get((p["function"], "restore"), {}).get("median_ms")
            cold = cli.get((p["function"], "cold"), {}).get("median_ms")
            srv = " / ".join(fmt(s[f"{h}_ms"]) for h in SERVER_HISTOGRAMS)
            print(f"| {p['function']} | {p['pool']} | {p['concurrency']} | {fmt(p['rps'], 0)} "
                  f"| {fmt(p['p50_ms'])} | {fmt(p['p99_ms'])} | {fmt(p['p99_9_ms'])} | {p['non_200']} "
                  f"| {p['responses']} | {ratio(rest, p['p50_ms'])} | {ratio(cold, p['p50_ms'])} "
                  f"| {srv} | {p['live_instances_after']} | {fmt(p['load1_after'])} |")
    if cli:
        print()
        print("## One request at a time: served against a process per request")
        print()
        print("Served: p50 and p90 of all responses at concurrency 1. CLI: wall time of the whole "
              f"process (spawn to exit, {m['runs']} runs each, restore and cold interleaved).")
        print()
        print("| function | how | median ms | p90 ms | cold / this | this / served (pool 2) |")
        print("|---|---|---:|---:|---:|---:|")
        for name in ("hello", "markdown"):
            served = {p["pool"]: p for p in points if p["function"] == name and p["concurrency"] == 1}
            cold = cli.get((name, "cold"), {}).get("median_ms")
            base = served.get(2, {}).get("p50_ms")
            rows = []
            for pool in (2, "2 copy", 0):
                if pool in served:
                    flags = "--pool 2 --instance-memory copy" if pool == "2 copy" else f"--pool {pool}"
                    rows.append((f"served, `{flags}`", served[pool]["p50_ms"], served[pool]["p90_ms"]))
            for mode, label in (("restore", f"`vmm restore {name}`"), ("cold", "`vmm run` (cold)")):
                if (name, mode) in cli:
                    rows.append((label, cli[(name, mode)]["median_ms"], cli[(name, mode)]["p90_ms"]))
            for label, med, p90 in rows:
                print(f"| {name} | {label} | {fmt(med)} | {fmt(p90)} | {ratio(cold, med)} | {ratio(med, base)} |")
    b = r.get("burst")
    if b:
        s = b["server"]
        print()
        print(f"## Burst: {b['templates']} templates x {b['requests'] // b['templates']} requests fired at once "
              f"(default pool: {b['pool']})")
        print()
        print("10 concurrent oha processes, `-n 100 -c 100` each, one per template. Wall: from starting the "
              "first to the exit of the last. p50/p99/max over all responses (oha's per-request records).")
        print()
        print("| requests | wall s | longest oha s | p50 ms | p99 ms | max ms | 200 | non-200 "
              "| restored on demand | live before / after | server: queue / acquire / run / reset ms | load1 before |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
        srv = " / ".join(fmt(s[f"{h}_ms"]) for h in SERVER_HISTOGRAMS)
        print(f"| {b['requests']} | {fmt(b['wall_s'], 3)} | {fmt(b['longest_oha_s'], 3)} | {fmt(b['p50_ms'])} "
              f"| {fmt(b['p99_ms'])} | {fmt(b['max_ms'])} | {b['ok']} | {b['non_200']} | {b['restored_on_demand']} "
              f"| {b['live_instances_before']} / {b['live_instances_after']} | {srv} | {fmt(b['load1_before'])} |")
        if b["non_200"]:
            print()
            print(f"non-200: status codes {b['status_codes']}, errors {b['errors']}")
    mem = r.get("memory")
    if mem:
        print()
        print(f"## Host memory per idle instance (hello, {mem['instances']} ready instances)")
        print()
        print(f"`/proc/PID/smaps_rollup` of `vmm serve --pool {mem['instances']}` once all were ready, "
              "minus `--pool 0` after one request (template loaded, no instance), divided by the "
              "instances. MiB. `copy` (`--instance-memory copy`): each instance has its own copy of the template's memory; "
              "`shared` (`--instance-memory shared`; `auto`, the default, stays shared for hello): instances map one image copy-on-write "
              "and hold only the pages their guest wrote (each was warmed up with one empty request).")
        print()
        print("| mode | instances ready | fill s | Rss | Pss | Private (clean+dirty) | Shared (clean+dirty) | AnonHugePages |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for m in mem["modes"]:
            v = m["per_instance_mib"]
            print(f"| {m['mode']} | {m['live_instances']} | {fmt(m['wait_for_ready_s'])} | {fmt(v['Rss'])} "
                  f"| {fmt(v['Pss'])} | {fmt(v['Private'])} | {fmt(v['Shared'])} | {fmt(v.get('AnonHugePages'))} |")
    if r.get("density"):
        print_density(r["density"])
    if r.get("seccomp"):
        print_seccomp(r["seccomp"])
    if r.get("faas"):
        print_faas(r["faas"])


# ---------------------------------------------------------------- main


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vmm", type=Path, default=ROOT / "target" / "release" / "vmm", help="the vmm binary")
    cached_oha = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm-tools" / "oha-1.16.0" / "bin" / "oha"
    ap.add_argument("--oha", type=Path, default=cached_oha if cached_oha.exists() else Path("oha"),
                    help="the oha 1.16.0 binary (default: tools/bench-serve.sh's, else oha on PATH)")
    ap.add_argument("--seconds", type=float, default=None, help="duration of each load point (default 5, --quick 1)")
    ap.add_argument("--runs", type=int, default=None, help="processes per CLI measurement (default 20, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 s per point, concurrency 1 and 16 only")
    ap.add_argument("--json", action="store_true", help="print everything as one JSON object instead of tables")
    ap.add_argument("--sections", default="load,cli,burst,memory",
                    help="comma-separated subset of load,cli,burst,memory,density,faas,seccomp "
                         "(default: all but density, faas and seccomp)")
    ap.add_argument("--density-mem", type=int, default=None, metavar="MIB",
                    help="guest RAM of the density section's template (`template create --mem`; "
                         "default: vmm's own, 512)")
    ap.add_argument("--density", type=int, default=2000,
                    help="ready instances in the density section (default 2000; --max-instances "
                         "is checked against vm.max_map_count and the open-files limit)")
    ap.add_argument("--seccomp-rounds", type=int, default=3, metavar="N",
                    help="seccomp: rounds of the filtered and unfiltered daemons, alternating (default 3)")
    ap.add_argument("--burst", type=int, default=1000, metavar="N",
                    help="faas: new functions in the burst (default 1000; 100 for a smoke run)")
    ap.add_argument("--burst-baseline", type=int, default=0, metavar="N",
                    help="faas: run the cold-boot baseline on the first N of the burst's functions "
                         "only (default: all of them)")
    ap.add_argument("--burst-deadline", type=float, default=240, metavar="SECS",
                    help="faas: stop sending the burst's requests after this long (each of its two "
                         "runs; default 240)")
    ap.add_argument("--burst-answer-timeout", type=float, default=60, metavar="SECS",
                    help="faas: a burst request unanswered this long fails, and a burst with no right "
                         "answer for this long stops (default 60)")
    ap.add_argument("--faas-samples", type=int, default=50, metavar="N",
                    help="faas: requests per path at concurrency 1 (default 50)")
    ap.add_argument("--faas-deploys", type=int, default=20, metavar="N",
                    help="faas: deploys per runtime timed after its first (default 20)")
    a = ap.parse_args()
    if a.seconds is None:
        a.seconds = 1.0 if a.quick else 5.0
    if a.runs is None:
        a.runs = 5 if a.quick else 20
    if a.seconds <= 0 or a.runs < 1:
        ap.error("--seconds must be positive and --runs at least 1")
    if a.density < 1 or (a.density_mem is not None and a.density_mem < 1):
        ap.error("--density and --density-mem must be at least 1")
    if a.burst < 1 or a.faas_samples < 1 or a.faas_deploys < 1 or a.burst_baseline < 0:
        ap.error("--burst, --faas-samples and --faas-deploys must be at least 1")
    sections = set(a.sections.split(","))
    unknown = sections - {"load", "cli", "burst", "memory", "density", "faas", "seccomp"}
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    concurrencies = [1, 16] if a.quick else [1, 2, 16, 64]
    a.vmm = a.vmm.resolve()
    for need in (a.vmm, QJS, ROOT / "workloads" / "marked.esm.js") + ((PYTHON_WASM,) if "faas" in sections else ()):
        if not need.exists():
            ap.error(f"{need} is missing: run tools/bench-serve.sh (it builds and fetches first)")
    # Only the faas section does without oha.
    oha_version = run([a.oha, "--version"])[1].decode().strip() if sections - {"faas"} else "-"

    # Ctrl-C and SIGTERM end the run through the `finally` below, which kills every child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    global _pidfile
    own_tmp = None
    if os.environ.get("BENCH_SERVE_TMP"):
        tmp = Path(os.environ["BENCH_SERVE_TMP"])
    else:
        own_tmp = tempfile.TemporaryDirectory(prefix="bench-serve.")
        tmp = Path(own_tmp.name)
    _pidfile = tmp / "pids"
    store = tmp / "store"
    # Never the user's default store, whatever a child resolves.
    os.environ["VMM_STORE"] = str(store)

    result: dict = {"meta": {
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "oha": oha_version,
        "seconds": a.seconds,
        "runs": a.runs,
        "concurrencies": concurrencies,
        "sections": sorted(sections),
        "uptime_start": uptime(),
        "loadavg_start": loadavg(),
    }}
    log(f"start: {result['meta']['uptime_start']}")
    try:
        if sections & {"load", "cli", "seccomp"}:
            for name, (function, _, _) in FUNCTIONS.items():
                log(f"creating template {name} in {store}")
                create_template(a.vmm, store, name, function)
        if "load" in sections:
            result["load"] = section_load(a, tmp, store, concurrencies)
        if "cli" in sections:
            result["cli"] = section_cli(a, store)
        if "seccomp" in sections:
            result["seccomp"] = section_seccomp(a, tmp, store, [1, 16])
        if "burst" in sections:
            result["burst"] = section_burst(a, tmp)
        if "memory" in sections:
            result["memory"] = section_memory(a, tmp)
        if "density" in sections:
            result["density"] = section_density(a, tmp)
        if "faas" in sections:
            result["faas"] = section_faas(a, tmp)
    except BenchError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        kill_all()
        if own_tmp is not None:
            own_tmp.cleanup()
    result["meta"]["uptime_end"] = uptime()
    result["meta"]["loadavg_end"] = loadavg()
    log(f"end: {result['meta']['uptime_end']}")
    if a.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_markdown(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

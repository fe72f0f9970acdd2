#!/usr/bin/env python3
"""Remote-store bench: push and pull throughput against a local Garage cluster, and the
time from "the template exists only on the remote" to the first response on a new worker.

Run by tools/bench-remote.sh (which builds everything first). Starts a Garage cluster of
NODES nodes (replication factor = NODES) on free loopback ports in a temp directory,
creates templates with the real `vmm`, and drives the real `vmm-store` and `vmm restore`.
Prints Markdown tables (medians of RUNS runs, each on a fresh prefix / empty store).
"""
import json, os, secrets, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/release/vmm")
STORE = os.path.join(ROOT, "target/release/vmm-store")
GARAGE = os.environ.get("VMM_GARAGE") or os.path.expanduser("~/.cache/vmm-tools/garage-2.5.0/bin/garage")
NODES = int(os.environ.get("NODES", "3"))
RUNS = int(os.environ.get("RUNS", "5"))
QJS = os.path.join(ROOT, "workloads/qjs-wasi-reactor.wasm")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def garage(cfg, *args):
    for _ in range(300):
        r = subprocess.run([GARAGE, "-c", cfg, *args], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout
        time.sleep(0.2)
    sys.exit(f"garage {args} failed: {r.stdout}{r.stderr}")


def start_cluster(tmp):
    secret = secrets.token_hex(32)
    nodes = []
    for i in range(NODES):
        d = os.path.join(tmp, f"node{i}")
        os.makedirs(d)
        s3, rpc, admin = free_port(), free_port(), free_port()
        cfg = os.path.join(d, "garage.toml")
        with open(cfg, "w") as f:
            f.write(f'''metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {NODES}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{secrets.token_hex(16)}"
''')
        log = open(os.path.join(d, "log"), "w")
        p = subprocess.Popen([GARAGE, "-c", cfg, "server"], stdout=log, stderr=log,
                             env={**os.environ, "RUST_LOG": "warn"})
        nodes.append((p, cfg, s3))
    ids = [garage(cfg, "node", "id", "-q").strip() for _, cfg, _ in nodes]
    c0 = nodes[0][1]
    for i in ids[1:]:
        garage(c0, "node", "connect", i)
    for i in ids:
        garage(c0, "layout", "assign", "-z", "dc1", "-c", "1G", i.split("@")[0])
    garage(c0, "layout", "apply", "--version", "1")
    garage(c0, "bucket", "create", "vmm-bench")
    garage(c0, "key", "create", "bench")
    garage(c0, "bucket", "allow", "--read", "--write", "--owner", "vmm-bench", "--key", "bench")
    info = garage(c0, "key", "info", "bench", "--show-secret")
    field = lambda k: next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith(k))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": field("Key ID"), "AWS_SECRET_ACCESS_KEY": field("Secret key"),
           "AWS_REGION": "garage", "VMM_REMOTE_ENDPOINT": f"http://127.0.0.1:{nodes[0][2]}"}
    return nodes, env


def run(cmd, env, input=b""):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=input, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{cmd} failed ({r.returncode}): {r.stderr.decode()}")
    return r, dt


def create(store, name, script, extra=()):
    args = [VMM, "template", "create", name, "--store", store, "--module", QJS, "--runtime", "qjs",
            "--file", script, "--arg", os.path.basename(script)]
    for e in extra:
        args += ["--file", e]
    run(args, os.environ)


def med(v):
    return statistics.median(v)


def main():
    for p in (VMM, STORE, GARAGE, QJS):
        if not os.path.exists(p):
            sys.exit(f"{p} is missing: run tools/bench-remote.sh (it builds and installs what is needed)")
    tmp = tempfile.mkdtemp(prefix="vmm-bench-remote-")
    nodes = []
    try:
        nodes, env = start_cluster(tmp)
        a = os.path.join(tmp, "a")
        create(a, "hello", os.path.join(ROOT, "examples/hello.js"))
        create(a, "markdown", os.path.join(ROOT, "examples/markdown.js"),
               [os.path.join(ROOT, "workloads/marked.esm.js") + ":marked.esm.js"])
        req = b'{"name":"bench"}'
        local, _ = run([VMM, "restore", "hello", "--store", a], env, req)
        rows = {k: [] for k in ("push_s", "push_b", "pull_s", "pull_b", "pull_ranges", "fn_pull_s", "fn_pull_b",
                                "first_s", "first_pull_ms", "warm_s", "local_s")}
        for i in range(RUNS):
            e = {**env, "VMM_REMOTE": f"s3://vmm-bench/run{i}"}
            r, dt = run([STORE, "--store", a, "push", "hello", "markdown", "--json"], e)
            rows["push_s"].append(dt)
            rows["push_b"].append(json.loads(r.stdout)["traffic"]["bytes_sent"])
            b = os.path.join(tmp, f"b{i}")
            r, dt = run([STORE, "--store", b, "pull", "hello", "--json"], e)
            rows["pull_s"].append(dt)
            j = json.loads(r.stdout)
            rows["pull_b"].append(j["traffic"]["bytes_received"])
            rows["pull_ranges"].append(j["ranges"])
            # A second function on a worker that has the base already.
            r, dt = run([STORE, "--store", b, "pull", "markdown", "--json"], e)
            rows["fn_pull_s"].append(dt)
            rows["fn_pull_b"].append(json.loads(r.stdout)["traffic"]["bytes_received"])
            # A new worker: the template only on the remote, until the first response.
            w = os.path.join(tmp, f"w{i}")
            r, dt = run([VMM, "restore", "hello", "--store", w], e, req)
            assert r.stdout == local.stdout, (r.stdout, local.stdout)
            rows["first_s"].append(dt)
            line = next(l for l in r.stderr.decode().splitlines() if l.startswith("vmm: pulled"))
            rows["first_pull_ms"].append(float(line.rsplit(" in ", 1)[1].split()[0]))
            _, dt = run([VMM, "restore", "hello", "--store", w], e, req)
            rows["warm_s"].append(dt)
            _, dt = run([VMM, "restore", "hello", "--store", a], env, req)
            rows["local_s"].append(dt)
        mib = 1024 * 1024
        print(f"### Remote store: {NODES}-node Garage 2.5.0 on loopback (replication factor {NODES}), median of {RUNS} runs\n")
        print("| step | median ms | bytes | MiB/s |")
        print("|---|---:|---:|---:|")
        for label, s, b in (("push hello + markdown (base + 2 functions) to an empty prefix", "push_s", "push_b"),
                            ("pull hello (base + function) into an empty store", "pull_s", "pull_b"),
                            ("pull markdown into a store that has its base", "fn_pull_s", "fn_pull_b")):
            t, n = med(rows[s]), med(rows[b])
            print(f"| {label} | {t * 1e3:.1f} | {int(n)} | {n / mib / t:.1f} |")
        print(f"\npull hello: {med(rows['pull_ranges']):.0f} ranged reads (adjacent pages coalesced, up to 1 MiB each)\n")
        print("| new worker, template only on the remote | median ms |")
        print("|---|---:|")
        print(f"| `vmm restore hello --remote ...` on an empty store, process start to exit (first response) | {med(rows['first_s']) * 1e3:.1f} |")
        print(f"| of which the pull (as `vmm` reports it) | {med(rows['first_pull_ms']):.1f} |")
        print(f"| the next `vmm restore hello` on that worker (local) | {med(rows['warm_s']) * 1e3:.1f} |")
        print(f"| `vmm restore hello` on the machine that created it | {med(rows['local_s']) * 1e3:.1f} |")
    finally:
        for p, _, _ in nodes:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

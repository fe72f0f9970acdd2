"""`vmm bench --only engines`: a request handler that does real work with the standard
library (JSON, regular expressions, collections, sorting, string formatting, hashlib), run
ITERATIONS times (after ITERATIONS/5 runs of warm-up); prints the time per run, measured
inside Python, so that process start, compilation and restore are left out. The same script
runs under every engine the bench compares; `check` shows they all computed the same thing.

    python python-loop.py ITERATIONS
"""
import collections
import hashlib
import json
import re
import sys
import time

TEXT = (
    "The quick brown fox jumps over the lazy dog. A restored function is fast to start "
    "and then slow to run: for any function with real work, the interpreter is now most "
    "of the time to response. Measure before you optimise, and measure again after. "
) * 4

ORDERS = json.dumps(
    [
        {
            "id": i,
            "customer": f"customer-{i % 17}",
            "items": [{"sku": f"sku-{(i * 7 + k) % 31}", "qty": 1 + (i + k) % 5, "price": 0.5 + ((i * k) % 97) / 4} for k in range(1 + i % 6)],
            "note": TEXT[(i * 13) % 200 : (i * 13) % 200 + 60],
        }
        for i in range(40)
    ]
)

WORD = re.compile(r"[a-z]+")


def handle(request):
    orders = json.loads(request)
    totals = collections.defaultdict(float)
    skus = collections.Counter()
    for order in orders:
        for item in order["items"]:
            totals[order["customer"]] += item["qty"] * item["price"]
            skus[item["sku"]] += item["qty"]
    words = collections.Counter(WORD.findall((TEXT + " ".join(o["note"] for o in orders)).lower()))
    top = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    report = {
        "top_customers": [{"customer": c, "total": f"{t:.2f}"} for c, t in top],
        "top_skus": skus.most_common(5),
        "top_words": words.most_common(8),
        "orders": len(orders),
    }
    body = json.dumps(report, sort_keys=True)
    return body, hashlib.sha256(body.encode()).hexdigest()[:16]


def main():
    try:
        n = int(sys.argv[1])
    except (IndexError, ValueError):
        n = 0
    if n < 1:
        sys.exit("usage: python-loop.py ITERATIONS (a positive integer)")
    for _ in range(max(1, -(-n // 5))):
        body, check = handle(ORDERS)
    t0 = time.perf_counter()
    for _ in range(n):
        body, check = handle(ORDERS)
    ms = (time.perf_counter() - t0) * 1e3 / n
    print(f"per-iteration ms={ms:.4f} iterations={n} check={check}")


main()

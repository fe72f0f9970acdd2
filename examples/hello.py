# JSON in, JSON out: {"name": "x"} -> {"greeting": "Hello, x!", ...} (as examples/hello.js)
import json
import sys

req = json.loads(sys.stdin.read() or "{}")
name = req.get("name") if isinstance(req, dict) else None
if not isinstance(name, str):
    name = "world"
print(json.dumps({"greeting": f"Hello, {name}!", "length": len(name)}, separators=(",", ":"), ensure_ascii=False))

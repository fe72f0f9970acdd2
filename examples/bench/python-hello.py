"""`vmm bench --only engines`: the Python function of the time-to-response rows. JSON in,
JSON out: {"name": "x"} -> {"greeting": "Hello, x!"}. A template of it waits at its read of
stdin, with the interpreter started and its imports done."""
import json
import sys

request = json.loads(sys.stdin.read() or "{}")
name = request.get("name", "world") if isinstance(request, dict) else "world"
print(json.dumps({"greeting": f"Hello, {name}!"}))

// JSON in, JSON out: {"name": "x"} -> {"greeting": "Hello, x!", ...}
const req = JSON.parse(std.in.readAsString() || "{}");
const name = typeof req.name === "string" ? req.name : "world";
print(JSON.stringify({ greeting: `Hello, ${name}!`, length: name.length }));

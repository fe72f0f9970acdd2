// Memory-heavy function: allocates and touches 48 MiB per request (one byte per 4 KiB page).
const req = std.in.readAsString();
const n = 48 << 20, a = new Uint8Array(n);
let s = 0;
for (let i = 0; i < n; i += 4096) { a[i] = (i >> 12) & 255; s += a[i]; }
print(JSON.stringify({ bytes: n, sum: s, req: req.length }));

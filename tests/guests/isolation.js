// Remembers every request it sees: in a global, in a heap object, in a typed array and in
// a file it appends to. An instance that starts from its template sees only its own request.
globalThis.seen = [];
const big = new Uint8Array(1 << 20);
const req = std.in.readAsString();
globalThis.seen.push(req);
let marks = 0;
for (let i = 0; i < big.length; i += 4096) { if (big[i] !== 0) marks++; big[i] = 1; }
let before = "";
try { const f = std.open("/tmp/isolation.txt", "r"); if (f) { before = f.readAsString(); f.close(); } } catch (e) {}
try { const f = std.open("/tmp/isolation.txt", "a"); if (f) { f.puts(req); f.close(); } } catch (e) {}
print(JSON.stringify({ seen: globalThis.seen, marks, before, random: Math.random() > 2 }));

// Compute-bound function that allocates little: {"limit": N} -> the number of primes below N
// (default 100,000: ~20 ms in QuickJS), by a segmented sieve that reuses one 32 KiB buffer.
const req = JSON.parse(std.in.readAsString() || "{}");
const limit = Math.min(Math.max(Math.floor(Number(req.limit)) || 100000, 2), 10000000);
const root = Math.floor(Math.sqrt(limit));
const small = new Uint8Array(root + 1);
const primes = [];
for (let i = 2; i <= root; i++) {
  if (small[i]) continue;
  primes.push(i);
  for (let j = i * i; j <= root; j += i) small[j] = 1;
}
const SEG = 32768, seg = new Uint8Array(SEG);
let count = 0;
for (let lo = 2; lo < limit; lo += SEG) {
  const hi = Math.min(lo + SEG, limit);
  seg.fill(0);
  for (const p of primes) {
    if (p * p >= hi) break;
    for (let j = Math.max(p * p, Math.ceil(lo / p) * p); j < hi; j += p) seg[j - lo] = 1;
  }
  for (let i = lo; i < hi; i++) if (!seg[i - lo]) count++;
}
print(JSON.stringify({ limit, primes: count }));

// `vmm bench --only engines`: render a small Markdown document with marked ITERATIONS times
// (after ITERATIONS/5 renders of warm-up) and print the time per render, measured inside the
// runtime, so that process start, compilation and restore are left out. The same script runs
// under every engine the bench compares; `check` (an FNV-1a hash of the HTML) shows they all
// rendered the same thing.
//
//   qjs --std markdown-loop.js ITERATIONS      (with marked.esm.js beside it)
import { marked } from "./marked.esm.js";

const n = Number(scriptArgs[1]);
if (!Number.isInteger(n) || n < 1) {
  throw new Error("usage: markdown-loop.js ITERATIONS (a positive integer)");
}

const doc = `# Release notes

Version **2.4** brings *faster* restores, a [new store format](https://example.com/store)
and fewer surprises.

## What changed

- Templates restore in \`~6 ms\` instead of ~20 ms.
- The store deduplicates pages across functions:
  1. identical pages are kept once,
  2. zero pages are not kept at all.
- \`vmm serve\` keeps a pool of ready instances.

> Measure before you optimise, and measure again after.

| mode | median | p90 |
|---|---:|---:|
| cold | 82.7 | 83.8 |
| restore | 7.9 | 8.7 |

\`\`\`js
const html = marked.parse(src);
print(html);
\`\`\`

That's all, see the [changelog](https://example.com/changelog) for the rest.
`;

const now = typeof performance === "object" ? () => performance.now() : () => Date.now();

function fnv1a(s) {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, "0");
}

let html = "";
for (let i = 0; i < Math.max(1, Math.ceil(n / 5)); i++) html = marked.parse(doc);
const t0 = now();
for (let i = 0; i < n; i++) html = marked.parse(doc);
const ms = (now() - t0) / n;
print(`per-iteration ms=${ms.toFixed(4)} iterations=${n} check=${fnv1a(html)}`);

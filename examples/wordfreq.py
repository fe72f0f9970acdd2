# Text in, JSON out: word statistics of the request, with the standard library only.
# `--arg wordfreq.py [--arg N]`: the N most frequent words (default 5).
# The output depends on the request alone (ties are ordered alphabetically).
import collections
import hashlib
import json
import re
import statistics
import sys
import unicodedata

top_n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")

body = sys.stdin.buffer.read()
text = unicodedata.normalize("NFKC", body.decode("utf-8", errors="replace"))
words = [w.casefold() for w in WORD.findall(text)]
counts = collections.Counter(words)
lengths = [len(w) for w in words]
top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]

print(json.dumps({
    "bytes": len(body),
    "sha256": hashlib.sha256(body).hexdigest(),
    "words": len(words),
    "unique": len(counts),
    "sentences": len(SENTENCE_END.findall(text)),
    "top": [[w, n] for w, n in top],
    "mean_length": round(statistics.fmean(lengths), 3) if lengths else 0,
    "median_length": statistics.median(lengths) if lengths else 0,
    "length_stdev": round(statistics.pstdev(lengths), 3) if lengths else 0,
}, ensure_ascii=False, sort_keys=True))

# Text in, JSON out, through a dozen standard-library modules imported on the request path:
# an empty request (the trial request `vmm template create` records the working set with)
# imports none of them, so a restore's recorded working set lacks what a real request runs.
import json
import sys

body = sys.stdin.read()
if not body:
    print(json.dumps({"empty": True}))
    sys.exit(0)

loaded = set(sys.modules)
import base64
import calendar
import csv
import datetime
import decimal
import difflib
import fractions
import hashlib
import html
import html.parser
import io
import ipaddress
import statistics
import string
import textwrap
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
from email.message import EmailMessage


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


text = unicodedata.normalize("NFKC", body)
lines = text.splitlines() or [""]
words = text.split() or [""]
lengths = [len(w) for w in words]
parser = Tags()
parser.feed(text)
ips = []
for w in words:
    try:
        ips.append(ipaddress.ip_address(w.strip(".,;")))
    except ValueError:
        pass
urls = [urllib.parse.urlsplit(w) for w in words if "://" in w]
msg = EmailMessage()
msg["Subject"] = string.capwords(lines[0][:60])
msg.set_content(text)
root = ET.Element("words", count=str(len(words)))
for w in words[:5]:
    ET.SubElement(root, "w").text = w
day = datetime.date(2024, 1, 1) + datetime.timedelta(days=len(words))
print(json.dumps({
    "bytes": len(body),
    "sha256": hashlib.sha256(body.encode()).hexdigest()[:16],
    "b64": base64.b64encode(body.encode()[:12]).decode(),
    "lines": len(lines),
    "csv_fields": sum(len(r) for r in csv.reader(io.StringIO(text))),
    "mean_word": str(decimal.Decimal(sum(lengths)) / decimal.Decimal(len(lengths))),
    "words_per_line": str(fractions.Fraction(len(words), len(lines))),
    "median_word": statistics.median(lengths),
    "closest": difflib.get_close_matches("python", words, n=1),
    "wrapped": len(textwrap.wrap(text, 32)),
    "tags": parser.tags,
    "escaped": html.escape(lines[0][:40]),
    "ips": [str(i) for i in ips if i.is_private],
    "hosts": [u.hostname for u in urls],
    "query": urllib.parse.urlencode({"w": words[0]}),
    "mail_bytes": len(msg.as_bytes()),
    "xml_bytes": len(ET.tostring(root)),
    "day": day.isoformat(),
    "leap": calendar.isleap(day.year),
    "new_modules": len(set(sys.modules) - loaded),
}, sort_keys=True))

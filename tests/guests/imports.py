import sys, json
req = sys.stdin.read()
out = {"len": len(req)}
if req:
    import decimal, fractions, difflib, textwrap, html.parser, urllib.parse, statistics, datetime, ipaddress, base64, email.message, string, collections
    out["dec"] = str(decimal.Decimal(len(req)) / 7)
    out["frac"] = str(fractions.Fraction(len(req), 12))
    out["diff"] = list(difflib.unified_diff([req], [req.upper()]))[:1]
    out["wrap"] = textwrap.wrap(req, 10)[:2]
    out["url"] = urllib.parse.quote(req)
    out["mean"] = statistics.mean([len(w) for w in req.split()] or [0])
    out["b64"] = base64.b64encode(req.encode()).decode()
    m = email.message.Message(); m["Subject"] = req[:20]
    out["subj"] = m["Subject"]
    out["ip"] = str(ipaddress.ip_address("10.0.0.1"))
print(json.dumps(out))

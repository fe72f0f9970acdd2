# The http interface: one event on stdin in AWS Lambda's HTTP API payload format 2.0, one
# response on stdout ({"statusCode", "headers", "cookies", "body"}). This one echoes what
# it was asked, and the body uppercased when it is text (as examples/http.js).
import base64
import json
import sys


def respond(status, value):
    print(json.dumps({
        "statusCode": status,
        "headers": {"content-type": "application/json", "x-example": "py"},
        "cookies": ["example=py; Path=/; HttpOnly"],
        "body": json.dumps(value, separators=(",", ":"), ensure_ascii=False),
    }, separators=(",", ":"), ensure_ascii=False))


try:
    event = json.loads(sys.stdin.buffer.read())
    if not isinstance(event, dict):
        raise ValueError("not an object")
except ValueError as e:
    respond(400, {"error": f"the event is not a JSON object: {e}"})
else:
    http = (event.get("requestContext") or {}).get("http") or {}
    body = event.get("body") or ""
    answer = {
        "method": http.get("method"),
        "rawPath": event.get("rawPath"),
        "rawQueryString": event.get("rawQueryString"),
        "headers": len(event.get("headers") or {}),
    }
    if event.get("isBase64Encoded"):
        answer["bodyLength"] = len(base64.b64decode(body))
    else:
        answer["bodyLength"] = len(body.encode())
        answer["upper"] = body.upper()
    respond(200, answer)

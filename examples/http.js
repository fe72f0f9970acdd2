// The http interface: one event on stdin in AWS Lambda's HTTP API payload format 2.0, one
// response on stdout ({"statusCode", "headers", "cookies", "body"}). This one echoes what
// it was asked, and the body uppercased when it is text.
function utf8Length(s) {
  let n = 0;
  for (const c of s) {
    const p = c.codePointAt(0);
    n += p < 0x80 ? 1 : p < 0x800 ? 2 : p < 0x10000 ? 3 : 4;
  }
  return n;
}

function respond(statusCode, value) {
  print(JSON.stringify({
    statusCode,
    headers: { "content-type": "application/json", "x-example": "js" },
    cookies: ["example=js; Path=/; HttpOnly"],
    body: JSON.stringify(value),
  }));
}

let event;
try {
  event = JSON.parse(std.in.readAsString());
  if (event === null || typeof event !== "object" || Array.isArray(event)) {
    throw new Error("not an object");
  }
} catch (e) {
  respond(400, { error: `the event is not a JSON object: ${e.message}` });
  event = undefined;
}
if (event !== undefined) {
  const http = (event.requestContext && event.requestContext.http) || {};
  const body = typeof event.body === "string" ? event.body : "";
  const answer = {
    method: http.method,
    rawPath: event.rawPath,
    rawQueryString: event.rawQueryString,
    headers: Object.keys(event.headers || {}).length,
  };
  if (event.isBase64Encoded) {
    answer.bodyLength = atob(body).length; // a "binary string": one char per byte
  } else {
    answer.bodyLength = utf8Length(body);
    answer.upper = body.toUpperCase();
  }
  respond(200, answer);
}

"""Test app that echoes each request as JSON, plus routes for testing a reverse proxy.

Any path not listed below returns the echo. Header names come back as Werkzeug's
EnvironHeaders reports them: title-cased, in the order received, with repeated headers joined
by commas and headers whose names contain "_" dropped by the dev server.
"""

import gzip
import hashlib
import sys
import time
from datetime import UTC, datetime

from flask import Flask, Response, jsonify, request

# Upper bounds so that a mistyped test cannot make the app allocate or sleep without limit.
MAX_BYTES = 100 * 1024 * 1024
MAX_LINES = 10_000
MAX_DELAY_SECONDS = 10.0

ECHO_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# Fixed so that tests can compare the exact Set-Cookie values. The comma in the Expires date
# breaks proxies that join repeated Set-Cookie headers into one.
COOKIE_EXPIRES = datetime(2099, 1, 1, tzinfo=UTC)

GZIP_TEXT = b"floydd gzip test line\n" * 200

app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=ECHO_METHODS)
@app.route("/<path:path>", methods=ECHO_METHODS)
def echo(path):
    body = request.get_data()
    environ = request.environ
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw_uri is None:
        query = environ.get("QUERY_STRING", "")
        raw_uri = environ.get("PATH_INFO", "/") + (f"?{query}" if query else "")
    return jsonify(
        method=request.method,
        uri=raw_uri,
        path=request.path,
        remote_addr=request.remote_addr,
        headers=[[name, value] for name, value in request.headers],
        body_length=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
    )


@app.get("/bytes/<int:count>")
def send_bytes(count):
    """Return ``count`` bytes where byte i is i % 256, with Content-Length set."""
    if count > MAX_BYTES:
        return jsonify(error="too many bytes", detail=f"{count} is over the limit of {MAX_BYTES}"), 400
    pattern = bytes(range(256))
    data = pattern * (count // 256) + pattern[: count % 256]
    response = Response(data, mimetype="application/octet-stream")
    response.headers["X-Content-SHA256"] = hashlib.sha256(data).hexdigest()
    return response


@app.get("/stream")
def stream():
    """Stream ``lines`` lines ("line 0" to "line N-1"), sleeping ``delay`` seconds between them.

    The generator response has no Content-Length, so the HTTP/1.1 dev server sends it chunked.
    """
    lines = request.args.get("lines", default=5, type=int)
    delay = request.args.get("delay", default=0.1, type=float)
    if not 0 <= lines <= MAX_LINES or not 0.0 <= delay <= MAX_DELAY_SECONDS:
        detail = f"lines must be 0 to {MAX_LINES} and delay 0 to {MAX_DELAY_SECONDS} seconds"
        return jsonify(error="invalid stream parameters", detail=detail), 400

    def generate():
        for index in range(lines):
            if index:
                time.sleep(delay)
            yield f"line {index}\n"

    return Response(generate(), mimetype="text/plain")


@app.get("/cookies")
def cookies():
    response = jsonify(cookies=["session", "theme", "tracking"])
    response.set_cookie("session", "abc123", expires=COOKIE_EXPIRES, httponly=True)
    response.set_cookie("theme", "dark", expires=COOKIE_EXPIRES, path="/")
    response.set_cookie("tracking", "off", expires=COOKIE_EXPIRES, max_age=3600)
    return response


@app.get("/gzip")
def gzipped():
    """Return GZIP_TEXT gzip-compressed, with the uncompressed length and digest in headers."""
    # mtime=0 keeps the compressed bytes identical from one run to the next.
    data = gzip.compress(GZIP_TEXT, mtime=0)
    response = Response(data, mimetype="text/plain")
    response.headers["Content-Encoding"] = "gzip"
    response.headers["X-Uncompressed-Length"] = str(len(GZIP_TEXT))
    response.headers["X-Uncompressed-SHA256"] = hashlib.sha256(GZIP_TEXT).hexdigest()
    return response


@app.get("/status/<int:code>")
def status(code):
    if not 200 <= code <= 599:
        return jsonify(error="invalid status", detail=f"{code} is not in 200 to 599"), 400
    return Response(b"", status=code)


@app.get("/print")
def print_message():
    """Print ``msg`` to stdout, or to stderr with ``stream=stderr``, and return it."""
    message = request.args.get("msg", "")
    output = sys.stderr if request.args.get("stream") == "stderr" else sys.stdout
    print(message, file=output, flush=True)
    return Response(message, mimetype="text/plain")


if __name__ == "__main__":
    print("echo app listening on 5000", flush=True)
    app.run(host="0.0.0.0", port=5000, threaded=True)

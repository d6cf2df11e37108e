"""Benchmark app: the style-transfer example plus routes that cost the app almost nothing.

The harness uploads this file as app.py next to the example's app.py (renamed
example_app.py) and styles.py, so the container runs the real example with
three extra routes:

    GET  /hello               a few bytes, to measure what the path in front of the app costs
    POST /sink                reads the body in chunks and returns its size, never holding it whole
    GET  /source?bytes=N      streams N bytes of zeros with a Content-Length, built chunk by chunk

/sink reads wsgi.input directly because the example sets MAX_CONTENT_LENGTH
to 50 MiB for its photo uploads, and the benchmark sends 1 GiB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from example_app import app
from flask import Response, jsonify, request

CHUNK_BYTES = 1024 * 1024
MAX_SOURCE_BYTES = 16 * 1024**3
ZEROS = bytes(CHUNK_BYTES)


@app.get("/hello")
def hello() -> Response:
    return Response("hello\n", mimetype="text/plain")


@app.post("/sink")
def sink() -> tuple[Response, int] | Response:
    length = request.content_length
    if length is None:
        return jsonify(error="missing Content-Length", detail="send the body with a Content-Length header"), 411
    stream = request.environ["wsgi.input"]
    received = 0
    while received < length:
        chunk = stream.read(min(CHUNK_BYTES, length - received))
        if not chunk:
            break
        received += len(chunk)
    return jsonify(received=received, expected=length)


@app.get("/source")
def source() -> tuple[Response, int] | Response:
    try:
        size = int(request.args.get("bytes", "0"))
    except ValueError:
        return jsonify(error="invalid bytes", detail="bytes must be an integer"), 400
    if not 0 <= size <= MAX_SOURCE_BYTES:
        return jsonify(error="invalid bytes", detail=f"bytes must be between 0 and {MAX_SOURCE_BYTES}"), 400
    return Response(_zeros(size), mimetype="application/octet-stream", headers={"Content-Length": str(size)})


def _zeros(size: int) -> Iterator[bytes]:
    remaining = size
    while remaining >= CHUNK_BYTES:
        yield ZEROS
        remaining -= CHUNK_BYTES
    if remaining:
        yield ZEROS[:remaining]


if __name__ == "__main__":
    # Werkzeug's per-request log lines would cost the app more than /hello itself.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    print("benchmark app listening on 0.0.0.0:5000", flush=True)
    app.run(host="0.0.0.0", port=5000, threaded=True)

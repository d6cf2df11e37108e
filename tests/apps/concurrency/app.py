"""Test app that records how many requests run its handler at the same time.

The dev server is threaded, so if a proxy lets two requests through at once, /stats shows a
max_concurrency above 1. The order list records the seq of each /work request as it enters.
"""

import threading
import time

from flask import Flask, jsonify, request

WORK_SECONDS = 0.2

app = Flask(__name__)

lock = threading.Lock()
active = 0
max_concurrency = 0
order: list[int] = []


@app.get("/work")
def work():
    global active, max_concurrency
    seq = request.args.get("seq", type=int)
    if seq is None:
        return jsonify(error="missing seq", detail="pass an integer query parameter, e.g. /work?seq=1"), 400

    with lock:
        active += 1
        max_concurrency = max(max_concurrency, active)
        order.append(seq)
    try:
        time.sleep(WORK_SECONDS)
    finally:
        with lock:
            active -= 1
    return jsonify(seq=seq)


@app.get("/stats")
def stats():
    with lock:
        return jsonify(max_concurrency=max_concurrency, order=list(order))


@app.post("/reset")
def reset():
    global max_concurrency
    with lock:
        # Requests still inside the handler stay counted in active, so only the history resets.
        max_concurrency = active
        order.clear()
    return jsonify(reset=True)


if __name__ == "__main__":
    print("concurrency app listening on 5000", flush=True)
    app.run(host="0.0.0.0", port=5000, threaded=True)

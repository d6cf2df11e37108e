"""The proxy against small upstreams on 127.0.0.1 that misbehave on purpose.

These run floydd's Proxy in-process (tests/proxy_harness.py) because the
faults (a refused port, a stall, a response cut short, a reused connection
closed under the proxy) cannot be produced on demand by a Flask app.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing
from aiohttp import web

from floydd import upstream as upstream_module
from floydd.config import ServerSettings
from floydd.errors import JobNotServing
from floydd.front import FrontConnection
from floydd.metrics import ProxyMetrics
from floydd.proxy import Proxy, Relay
from floydd.queue import Admission, JobQueue
from floydd.upstream import AppConnection
from tests.proxy_harness import (
    Handler,
    ProxyUnderTest,
    RawUpstream,
    http_response,
    raw_exchange,
    raw_upstream,
    read_request,
    running_proxy,
)


async def keepalive_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(http_response(b"kept"))
        await writer.drain()


async def closing_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(http_response(b"closed", headers=("Connection: close",)))
    await writer.drain()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("handler", "connections"),
    [(keepalive_app, 1), (closing_app, 5)],
    ids=["keep-alive", "close"],
)
async def test_upstream_connection_reuse(tmp_path: Path, handler, connections: int) -> None:
    upstream = await raw_upstream(handler)
    async with running_proxy(tmp_path, upstream.port, preconnect=False) as proxy, aiohttp.ClientSession() as client:
        statuses = []
        for _ in range(5):
            async with client.get(proxy.url + proxy.path("/")) as response:
                await response.read()
                statuses.append(response.status)
    assert statuses == [200] * 5
    assert upstream.connections == connections


async def test_preconnect_opens_one_spare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app that closes connections gets its next connection while a request is in flight."""
    monkeypatch.setattr(upstream_module, "POOL_IDLE_TIMEOUT_S", 0.3)
    requests_per_connection: list[int] = []
    closed_unused = asyncio.Event()

    async def closing_app_counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(requests_per_connection)
        requests_per_connection.append(0)
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            # The spare, closed by floydd after POOL_IDLE_TIMEOUT_S without a request.
            closed_unused.set()
            return
        requests_per_connection[index] += 1
        writer.write(http_response(b"closed", headers=("Connection: close",)))
        await writer.drain()

    upstream = await raw_upstream(closing_app_counting)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        for _ in range(5):
            async with client.get(proxy.url + proxy.path("/")) as response:
                assert await response.read() == b"closed"
        # The first response shows floydd that the app closes connections. The
        # second request opens its own connection and the spare for the third, and so on.
        async with asyncio.timeout(5):
            await closed_unused.wait()
    assert upstream.connections == 6
    assert sorted(requests_per_connection) == [0, 1, 1, 1, 1, 1]


async def test_preconnect_spare_closed_by_app(tmp_path: Path) -> None:
    """A spare that the app closed unused is never sent a request, so even a POST succeeds."""
    answered = 0

    async def impatient_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Like a server with a short header timeout: a connection that stays silent is closed.
        nonlocal answered
        try:
            async with asyncio.timeout(0.02):
                await read_request(reader)
        except TimeoutError:
            return
        answered += 1
        writer.write(http_response(b"ok", headers=("Connection: close",)))
        await writer.drain()

    upstream = await raw_upstream(impatient_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        statuses = []
        for method in ("GET", "POST", "GET", "POST"):
            async with client.request(method, proxy.url + proxy.path("/"), data=b"x" * (method == "POST")) as response:
                await response.read()
                statuses.append(response.status)
            # Longer than the app's patience, so each spare is closed before the next request.
            await asyncio.sleep(0.1)
    assert statuses == [200, 200, 200, 200]
    assert answered == 4
    assert upstream.connections > 4


# The first connection serves the first request, the second the second, and the third is the first spare.
FIRST_SPARE = 3


@dataclasses.dataclass
class DelayedConnects:
    """What delay_connects saw: the connects floydd started, and whether a delayed one was cancelled."""

    calls: int = 0
    cancelled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def delay_connects(
    monkeypatch: pytest.MonkeyPatch, delay_s: float, *, only: int | None = None, after_connect: bool = False
) -> DelayedConnects:
    """Make ConnectionPool._open wait `delay_s` on every call, or on the `only`-th, before it connects.

    With `after_connect`, the `only`-th connect, which must be a spare's, succeeds
    at once, and floydd learns of it `delay_s` later.
    """
    open_connection = upstream_module.ConnectionPool._open
    seen = DelayedConnects()

    async def delayed_open(
        pool: upstream_module.ConnectionPool, connection: upstream_module.AppConnection | None = None
    ) -> upstream_module.AppConnection:
        seen.calls += 1
        delayed = only is None or seen.calls == only
        if delayed and not after_connect:
            try:
                await asyncio.sleep(delay_s)
            except asyncio.CancelledError:
                seen.cancelled.set()
                raise
        if delayed and after_connect:
            assert connection is not None and connection.on_connected is not None, "only a spare is noticed late"
            notify = connection.on_connected

            def notice_late(spare: upstream_module.AppConnection) -> None:
                pool.loop.call_later(delay_s, notify, spare)

            connection.on_connected = notice_late
        return await open_connection(pool, connection)

    monkeypatch.setattr(upstream_module.ConnectionPool, "_open", delayed_open)
    return seen


async def test_slow_spare_used_by_next_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that arrives while the spare is still connecting waits for it instead of opening another.

    The app serves one connection at a time, in the order it accepts them, like
    Werkzeug with threaded=False. A request sent on a second new connection would
    wait behind the spare, on which the app waits for a request, until floydd
    closes the unused spare after POOL_IDLE_TIMEOUT_S, past the response timeout.
    """
    # The spare is connected, but floydd notices only after the next request arrived, though within SPARE_WAIT_S.
    delay_connects(monkeypatch, upstream_module.SPARE_WAIT_S / 2, only=FIRST_SPARE, after_connect=True)
    serving = asyncio.Lock()

    async def one_at_a_time_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with serving:
            await read_request(reader)
            writer.write(http_response(b"served", headers=("Connection: close",)))
            await writer.drain()
            writer.close()

    upstream = await raw_upstream(one_at_a_time_app)
    async with (
        running_proxy(tmp_path, upstream.port, response_timeout_s=1) as proxy,
        aiohttp.ClientSession() as client,
    ):
        statuses = []
        bodies = []
        for _ in range(4):
            async with client.get(proxy.url + proxy.path("/")) as response:
                bodies.append(await response.read())
                statuses.append(response.status)
    assert statuses == [200, 200, 200, 200]
    assert bodies == [b"served"] * 4


async def test_stuck_spare_not_awaited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waits for a spare whose connect is stuck only SPARE_WAIT_S, then opens its own connection."""
    # The spare's connect hangs, as after a lost SYN, until CONNECT_TIMEOUT_S.
    delay_connects(monkeypatch, 30, only=FIRST_SPARE)
    upstream = await raw_upstream(closing_app)
    # Well below CONNECT_TIMEOUT_S, so a request that waited for the stuck spare until then would get 504.
    async with (
        running_proxy(tmp_path, upstream.port, total_timeout_s=1) as proxy,
        aiohttp.ClientSession() as client,
    ):
        statuses = []
        for _ in range(3):
            async with client.get(proxy.url + proxy.path("/")) as response:
                await response.read()
                statuses.append(response.status)
    assert statuses == [200, 200, 200]


async def test_concurrent_clients_closing_app(tmp_path: Path) -> None:
    upstream = await raw_upstream(closing_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:

        async def worker() -> list[int]:
            statuses = []
            for _ in range(50):
                async with client.get(proxy.url + proxy.path("/")) as response:
                    await response.read()
                    statuses.append(response.status)
            return statuses

        results = await asyncio.gather(*(worker() for _ in range(4)))
    assert [status for result in results for status in result] == [200] * 200


@pytest.mark.parametrize(("method", "expected"), [("GET", 200), ("POST", 502)])
async def test_stale_pooled_connection_retry(tmp_path: Path, method: str, expected: int) -> None:
    """The app answers one request per connection, then drops the next one unanswered."""
    answered: list[bytes] = []

    async def one_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        answered.append(head.split(b" ")[0])
        writer.write(http_response(b"first"))
        await writer.drain()
        await read_request(reader)

    upstream = await raw_upstream(one_then_drop)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.request(method, proxy.url + proxy.path("/"), data=b"x" * (method == "POST")) as first:
            assert first.status == 200
        async with client.request(method, proxy.url + proxy.path("/"), data=b"x" * (method == "POST")) as second:
            assert second.status == expected
    assert answered == [method.encode()] * (expected == 200 and 2 or 1)


async def test_refused_connection_gives_502(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, free_port()) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/")) as response:
            body = await response.json()
    assert response.status == 502
    assert "not accepting connections" in body["detail"]
    assert response.headers["X-Request-ID"]


async def test_stalled_app_gives_504(tmp_path: Path) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    upstream = await raw_upstream(stall)
    async with running_proxy(tmp_path, upstream.port, response_timeout_s=0.3) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/")) as response:
            body = await response.json()
        in_flight = proxy.queue.in_flight
    assert response.status == 504
    assert body["limit"] == "response_timeout_s"
    assert in_flight == 0


async def test_slow_headers_hit_total_timeout(tmp_path: Path) -> None:
    async def slow_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for part in (b"HTTP/1.1 200 OK\r\n", b"X-Slow: 1\r\n", b"X-Slower: 1\r\n"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.2)
        await asyncio.sleep(30)

    upstream = await raw_upstream(slow_head)
    async with running_proxy(tmp_path, upstream.port, total_timeout_s=0.3) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/")) as response:
            body = await response.json()
    assert response.status == 504
    assert body["limit"] == "total_timeout_s"


@pytest.mark.parametrize(
    "response_bytes",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100_000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_app_dying_mid_response_aborts(tmp_path: Path, response_bytes: bytes) -> None:
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_bytes)
        await writer.drain()
        writer.transport.abort()

    upstream = await raw_upstream(die)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        raw = await raw_exchange(
            proxy.url, f"GET {proxy.path('/')} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if b"Content-Length: 200000" in head:
        assert len(body) < 200000
    else:
        assert not body.endswith(b"0\r\n\r\n")


async def test_app_dying_in_small_response_gives_502(tmp_path: Path) -> None:
    """A response of at most 64 KiB is sent in one write once complete, so a cut-off one becomes a 502."""

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        writer.transport.abort()

    upstream = await raw_upstream(die)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/")) as response:
            body = await response.json()
    assert response.status == 502
    assert "before the response body was complete" in body["detail"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcde\r\n0\r\n\r\n",
        b"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n\r\n",
        b"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcd\r\n0\r\n\r\n",
    ],
    ids=["chunk-size-mismatch", "length-and-chunked", "two-lengths", "bad-chunk-size"],
)
async def test_bad_framing_gives_400(tmp_path: Path, request_bytes: bytes) -> None:
    upstream = await raw_upstream(keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        raw = await raw_exchange(proxy.url, request_bytes.replace(b"{path}", proxy.path("/").encode()))
        in_flight = proxy.queue.in_flight
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"400"
    assert b"Content-Type: application/json" in head
    assert json.loads(body)["error"] == "invalid_request"
    assert upstream.connections == 0
    assert in_flight == 0


async def test_late_bad_chunk_rejected(tmp_path: Path) -> None:
    """The malformed chunk arrives after the handler has started reading the body."""
    upstream = await raw_upstream(keepalive_app)
    async with running_proxy(tmp_path, upstream.port, request_body_timeout_s=30) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
        writer.write(f"POST {proxy.path('/')} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"4\r\nabcde\r\n0\r\n\r\n")
        async with asyncio.timeout(5):
            raw = await reader.read(-1)
        writer.close()
    assert raw.split(b" ")[1] == b"400"
    assert b"malformed chunked request body" in raw
    assert upstream.connections == 0


async def test_chunked_body_sent_with_length(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        received.append(head)
        writer.write(http_response(str(len(body)).encode()))

    upstream = await raw_upstream(record)
    payload = bytes(range(256)) * 4096 * 2
    async with running_proxy(tmp_path, upstream.port, request_buffer_bytes=64 * 1024) as proxy:
        async with aiohttp.ClientSession() as client:

            async def chunks():
                for start in range(0, len(payload), 100_000):
                    yield payload[start : start + 100_000]

            async with client.post(proxy.url + proxy.path("/"), data=chunks()) as response:
                text = await response.text()
    assert text == str(len(payload))
    assert f"Content-Length: {len(payload)}".encode() in received[0]
    assert b"chunked" not in received[0].lower()


@pytest.mark.parametrize(
    ("target", "length", "status"),
    [("known", 10, b"200"), ("unknown", 10, b"404"), ("known", 10_000, b"413")],
)
async def test_expect_continue(tmp_path: Path, target: str, length: int, status: bytes) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        received.append(head)
        writer.write(http_response(body))

    upstream = await raw_upstream(record)
    async with running_proxy(tmp_path, upstream.port, max_request_body_bytes=1000) as proxy:
        path = proxy.path("/") if target == "known" else "/expose/0123456789abcdef0123456789abcdef/"
        reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(5):
            first = await reader.readuntil(b"\r\n\r\n")
        if status == b"200":
            assert first.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"x" * length)
            async with asyncio.timeout(5):
                final = await reader.readuntil(b"\r\n\r\n")
        else:
            final = first
        writer.close()
    assert final.split(b" ")[1] == status
    if status == b"200":
        assert b"expect" not in received[0].lower()
    else:
        assert upstream.connections == 0


async def test_hop_by_hop_headers_dropped(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        received.append(head)
        headers = ("Connection: keep-alive, X-App-Hop", "X-App-Hop: 1", "Keep-Alive: timeout=5", "X-End: 1")
        writer.write(http_response(b"ok", headers=headers))

    upstream = await raw_upstream(record)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        request = (
            f"GET {proxy.path('/')} HTTP/1.1\r\nHost: t\r\nConnection: close, X-Client-Hop\r\n"
            "X-Client-Hop: 1\r\nTE: trailers\r\nProxy-Authorization: secret\r\nX-Kept: 1\r\n\r\n"
        )
        raw = await raw_exchange(proxy.url, request.encode())
    head = raw.split(b"\r\n\r\n")[0].lower()
    sent = received[0].lower()
    for name in (b"x-client-hop", b"te:", b"proxy-authorization", b"connection"):
        assert name not in sent
    assert b"x-kept: 1" in sent
    for name in (b"x-app-hop", b"keep-alive"):
        assert name not in head
    assert b"x-end: 1" in head


async def test_request_id_kept_or_generated(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            received.append(head)
            writer.write(http_response())

    upstream = await raw_upstream(record)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/"), headers={"X-Request-ID": "abc-123"}) as kept:
            assert kept.headers["X-Request-ID"] == "abc-123"
        async with client.get(proxy.url + proxy.path("/")) as generated:
            generated_id = generated.headers["X-Request-ID"]
            timing = generated.headers["Server-Timing"]
    assert b"X-Request-ID: abc-123\r\n" in received[0]
    assert f"X-Request-ID: {generated_id}\r\n".encode() in received[1]
    assert received[0].count(b"X-Request-ID") == 1
    assert timing.startswith("queue;dur=")
    assert ", app;dur=" in timing


async def hold_upstream(release: asyncio.Event, entered: list[bytes]) -> RawUpstream:
    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        entered.append(head.split(b" ")[1])
        await release.wait()
        writer.write(http_response(b"done", headers=("Connection: close",)))
        await writer.drain()

    return await raw_upstream(held)


async def test_crowd_served_in_order(tmp_path: Path) -> None:
    release = asyncio.Event()
    entered: list[bytes] = []
    upstream = await hold_upstream(release, entered)
    async with running_proxy(tmp_path, upstream.port, max_queue_depth=20) as proxy:
        async with aiohttp.ClientSession() as client:

            async def call(seq: int, timeout_s: float = 30) -> int:
                try:
                    async with client.get(
                        proxy.url + proxy.path(f"/{seq}"), timeout=aiohttp.ClientTimeout(total=timeout_s)
                    ) as response:
                        await response.read()
                        return response.status
                except TimeoutError:
                    return 0

            calls = []
            for seq in range(10):
                calls.append(asyncio.create_task(call(seq)))
                await asyncio.sleep(0.02)
            leavers = [asyncio.create_task(call(100 + seq, timeout_s=0.3)) for seq in range(5)]
            left = await asyncio.gather(*leavers)
            for _ in range(50):
                if proxy.queue.depth == 9:
                    break
                await asyncio.sleep(0.05)
            depth_after_leaving = proxy.queue.depth
            release.set()
            statuses = await asyncio.gather(*calls)
    assert left == [0] * 5
    assert depth_after_leaving == 9
    assert statuses == [200] * 10
    assert entered == [f"/{seq}".encode() for seq in range(10)]


async def test_full_queue_gives_503(tmp_path: Path) -> None:
    release = asyncio.Event()
    upstream = await hold_upstream(release, [])
    async with running_proxy(tmp_path, upstream.port, max_queue_depth=2) as proxy:
        async with aiohttp.ClientSession() as client:
            waiting = [asyncio.create_task(client.get(proxy.url + proxy.path("/"))) for _ in range(3)]
            await asyncio.sleep(0.3)
            async with client.get(proxy.url + proxy.path("/")) as rejected:
                body = await rejected.json()
            release.set()
            for response in await asyncio.gather(*waiting):
                response.release()
    assert rejected.status == 503
    assert body["error"] == "queue_full"
    assert body["queue_depth"] == 2
    assert int(rejected.headers["Retry-After"]) >= 1


async def test_queue_rejections_logged_once_per_code(tmp_path: Path) -> None:
    release = asyncio.Event()
    upstream = await hold_upstream(release, [])
    async with running_proxy(tmp_path, upstream.port, max_queue_depth=1, queue_timeout_s=1.0) as proxy:
        async with aiohttp.ClientSession() as client:
            with structlog.testing.capture_logs() as logs:
                in_flight = asyncio.create_task(client.get(proxy.url + proxy.path("/")))
                queued = asyncio.create_task(client.get(proxy.url + proxy.path("/")))
                await asyncio.sleep(0.3)
                statuses = []
                for _ in range(5):
                    async with client.get(proxy.url + proxy.path("/")) as rejected:
                        statuses.append(rejected.status)
                # The queued request waits past queue_timeout_s, a second code for the same job.
                timed_out = await queued
                timed_out.release()
            release.set()
            (await in_flight).release()
    failures = [
        (entry["error"], entry["not_logged_before"]) for entry in logs if entry["event"] == "proxy_request_failed"
    ]
    assert statuses == [503] * 5
    assert timed_out.status == 503
    assert sorted(failures) == [("queue_full", 0), ("queue_timeout", 0)]


async def test_queue_wait_limit_gives_503(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, None, queue_timeout_s=0.2) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/")) as response:
            body = await response.json()
    assert response.status == 503
    assert body["limit"] == "queue_timeout_s"


async def test_job_end_answers_everyone(tmp_path: Path) -> None:
    release = asyncio.Event()
    upstream = await hold_upstream(release, [])
    async with running_proxy(tmp_path, upstream.port) as proxy:
        async with aiohttp.ClientSession() as client:

            async def call() -> tuple[int, dict[str, object]]:
                async with client.get(proxy.url + proxy.path("/")) as response:
                    return response.status, await response.json()

            calls = [asyncio.create_task(call()) for _ in range(4)]
            await asyncio.sleep(0.3)
            ended = JobNotServing("job is failed (out of memory), not serving", state="failed", reason="out of memory")
            proxy.queues.remove(proxy.job_id, ended)
            async with asyncio.timeout(2):
                results = await asyncio.gather(*calls)
        release.set()
    statuses = sorted(status for status, _ in results)
    in_flight_body = next(body for status, body in results if status == 502)
    assert statuses == [502, 503, 503, 503]
    assert in_flight_body["error"] == "job_ended"
    assert in_flight_body["reason"] == "out of memory"


async def test_client_leaving_frees_slot(tmp_path: Path) -> None:
    upstream_closed = asyncio.Event()

    async def stream_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/forever" not in head:
            writer.write(http_response(b"next", headers=("Connection: close",)))
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nline\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            upstream_closed.set()

    upstream = await raw_upstream(stream_forever)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        with pytest.raises(TimeoutError):
            async with client.get(
                proxy.url + proxy.path("/forever"), timeout=aiohttp.ClientTimeout(total=0.5)
            ) as response:
                await response.read()
        async with asyncio.timeout(2):
            await upstream_closed.wait()
        async with client.get(proxy.url + proxy.path("/next"), timeout=aiohttp.ClientTimeout(total=5)) as response:
            text = await response.text()
    assert text == "next"


async def test_websocket_passes_without_slot(tmp_path: Path) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo:" + message.data)
        return ws

    async def plain(request: web.Request) -> web.Response:
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    app.router.add_get("/plain", plain)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_proxy(tmp_path, port) as proxy, aiohttp.ClientSession() as client:
            async with client.ws_connect(proxy.url + proxy.path("/ws")) as ws:
                await ws.send_str("hello")
                echoed = await ws.receive_str()
                async with client.get(proxy.url + proxy.path("/plain")) as response:
                    plain_text = await response.text()
                await ws.send_str("again")
                echoed_again = await ws.receive_str()
    finally:
        await runner.cleanup()
    assert echoed == "echo:hello"
    assert plain_text == "plain"
    assert echoed_again == "echo:again"


async def test_metrics_count_requests(tmp_path: Path) -> None:
    upstream = await raw_upstream(keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/")) as response:
            await response.read()
        async with client.get(proxy.url + "/metrics") as anonymous:
            assert anonymous.status == 401
        headers = {"Authorization": f"Bearer {proxy.admin_token}"}
        async with client.get(proxy.url + "/metrics", headers=headers) as response:
            text = await response.text()
    job = proxy.job_id
    assert f'floydd_proxy_requests_total{{job_id="{job}",status_class="2xx"}} 1.0' in text
    assert f'floydd_proxy_queue_depth{{job_id="{job}"}} 0.0' in text
    assert f'floydd_proxy_queue_wait_seconds_count{{job_id="{job}"}} 1.0' in text
    assert 'floydd_jobs{state="serving"} 1.0' in text


@pytest.mark.parametrize(
    "header",
    [
        b"X-Note: a\rInjected: 1",  # bare CR inside a value
        b"X-Note: a\nInjected: 1",  # bare LF ends the line early in lenient parsers
        b"X-Note: a\r\n Injected: 1",  # obsolete line folding
        b"X-Note: a\x00Injected: 1",  # NUL inside a value
    ],
    ids=["bare-cr", "bare-lf", "obs-fold", "nul"],
)
async def test_app_cannot_inject_headers(tmp_path: Path, header: bytes) -> None:
    async def injecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + header + b"\r\n\r\nok")
        await writer.drain()

    upstream = await raw_upstream(injecting)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        raw = await raw_exchange(
            proxy.url, f"GET {proxy.path('/')} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
        )
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\ninjected:" not in head.lower()
    assert raw.split(b" ")[1] == b"502"


async def scripted_keepalive_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive app whose response to each request depends on its path."""
    while True:
        head, _ = await read_request(reader)
        method, target = head.split(b" ")[:2]
        if target.endswith(b"/split"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"late")
        elif target.endswith(b"/large"):
            writer.write(http_response(b"x" * 100_000))
        elif target.endswith(b"/stall"):
            await asyncio.sleep(30)
        elif target.endswith(b"/stall-body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(30)
        elif target.endswith(b"/die"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            await writer.drain()
            writer.transport.abort()
            return
        elif method == b"HEAD" and target.endswith(b"/head-body"):
            # A careless app: a body after the head of a HEAD response, in the same write.
            writer.write(http_response(b"hello"))
        elif method == b"HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            writer.write(http_response(b"warm"))
        await writer.drain()


@pytest.mark.parametrize(
    ("method", "tail", "settings", "status", "expected", "connections"),
    [
        ("GET", "/split", {}, 200, b"late", 1),
        ("GET", "/large", {}, 200, b"x" * 100_000, 1),
        ("HEAD", "/head", {}, 200, b"", 1),
        ("HEAD", "/head-body", {}, 200, b"", 2),
        ("GET", "/stall", {"response_timeout_s": 0.3}, 504, b"response_timeout_s", 2),
        ("GET", "/stall-body", {"total_timeout_s": 0.3}, 504, b"total_timeout_s", 2),
        ("GET", "/die", {}, 502, b"bad_gateway", 2),
    ],
    ids=["head-then-body", "large-body", "head-method", "head-with-body", "no-head", "no-body", "cut-off"],
)
async def test_request_on_pooled_connection(
    tmp_path: Path,
    method: str,
    tail: str,
    settings: dict[str, Any],
    status: int,
    expected: bytes,
    connections: int,
) -> None:
    """A request with a free slot and a pooled connection is served from callbacks. Any fault hands it to a task."""
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port, **settings) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            assert await warm.read() == b"warm"
        # Well below the default timeouts, after which a stuck exchange would be handed on and still succeed.
        async with client.request(
            method, proxy.url + proxy.path(tail), timeout=aiohttp.ClientTimeout(total=5)
        ) as response:
            body = await response.read()
            assert response.status == status
            assert response.headers["X-Request-ID"]
            if status == 200:
                assert body == expected
                assert response.headers["Content-Length"] == str(len(expected) or 5)
            else:
                assert expected in body
        # The slot is free again and the pool still works.
        async with client.get(proxy.url + proxy.path("/warm")) as after:
            assert await after.read() == b"warm"
        assert proxy.queue.in_flight == 0
    assert upstream.connections == connections


async def test_job_end_on_pooled_connection(tmp_path: Path) -> None:
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        call = asyncio.create_task(client.get(proxy.url + proxy.path("/stall")))
        await asyncio.sleep(0.2)
        ended = JobNotServing("job is stopped, not serving", state="stopped", reason="stopped by a user")
        proxy.queues.remove(proxy.job_id, ended)
        async with asyncio.timeout(2):
            response = await call
        body = await response.json()
        response.release()
    assert response.status == 502
    assert body["error"] == "job_ended"
    assert body["state"] == "stopped"


async def give_up_on(client: aiohttp.ClientSession, url: str) -> None:
    """Request `url` as a client that gives up after 0.2 s, before the app has responded."""
    with pytest.raises(TimeoutError):
        async with client.get(url, timeout=aiohttp.ClientTimeout(total=0.2)):
            pass


async def read_body(client: aiohttp.ClientSession, url: str) -> bytes:
    """Return the body of a GET of `url`, which may wait in the queue for up to 5 s."""
    async with client.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
        return await response.read()


def timed_app(events: list[str], delays: dict[bytes, float], *, interim: bytes = b"") -> Handler:
    """Return a keep-alive app that records when each request starts and ends, and responds `delays[target]` s late.

    A delayed response starts with the `interim` response head right away, if one is given.
    """

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            name = head.split(b" ")[1].rsplit(b"/", 1)[1].decode()
            events.append(f"start {name}")
            delay = delays.get(name.encode(), 0.0)
            if delay and interim:
                writer.write(interim)
            await asyncio.sleep(delay)
            events.append(f"end {name}")
            writer.write(http_response(name.encode()))
            await writer.drain()

    return app


@pytest.mark.parametrize("pooled", [False, True], ids=["task", "lane"])
async def test_client_leaving_waits_for_app(tmp_path: Path, pooled: bool) -> None:
    """A client that leaves while the app works on its request keeps the slot busy until the app responds.

    With a pooled connection the request goes out from callbacks (a lane), without one from a task.
    """
    events: list[str] = []
    upstream = await raw_upstream(timed_app(events, {b"slow": 0.5}))
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        if pooled:
            async with client.get(proxy.url + proxy.path("/warm")) as warm:
                await warm.read()
            events.clear()
        await give_up_on(client, proxy.url + proxy.path("/slow"))
        body = await read_body(client, proxy.url + proxy.path("/next"))
        in_flight = proxy.queue.in_flight
    assert body == b"next"
    # Without the wait, /next would start while the app still works on /slow.
    assert events == ["start slow", "end slow", "start next", "end next"]
    assert in_flight == 0
    # The connection of the abandoned request was closed, so /next needed a new one.
    assert upstream.connections == 2


async def test_abandoned_request_held_until_timeout(tmp_path: Path) -> None:
    """An abandoned request that the app never responds to keeps its slot busy for response_timeout_s at most."""
    events: list[str] = []
    upstream = await raw_upstream(timed_app(events, {b"stall": 30.0}))
    async with (
        running_proxy(tmp_path, upstream.port, response_timeout_s=1.0) as proxy,
        aiohttp.ClientSession() as client,
    ):
        await give_up_on(client, proxy.url + proxy.path("/stall"))
        # Time for floydd to see the client go, well before the response timeout.
        await asyncio.sleep(0.1)
        in_flight_while_held = proxy.queue.in_flight
        body = await read_body(client, proxy.url + proxy.path("/next"))
        in_flight = proxy.queue.in_flight
    assert in_flight_while_held == 1
    assert body == b"next"
    assert events == ["start stall", "start next", "end next"]
    assert in_flight == 0


async def test_interim_response_keeps_slot_busy(tmp_path: Path) -> None:
    """A 103 Early Hints before the client leaves does not end the app's work, so the slot stays busy."""
    events: list[str] = []
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    upstream = await raw_upstream(timed_app(events, {b"slow": 0.5}, interim=early_hints))
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        await give_up_on(client, proxy.url + proxy.path("/slow"))
        body = await read_body(client, proxy.url + proxy.path("/next"))
    assert body == b"next"
    assert events == ["start slow", "end slow", "start next", "end next"]


async def socket_watching_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An app that, like an ASGI server, stops working on /slow as soon as its client closes the connection."""
    while True:
        head, _ = await read_request(reader)
        name = head.split(b" ")[1].rsplit(b"/", 1)[1]
        if name == b"slow":
            # Nothing more should arrive on this connection, so b"" means the client has closed it.
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), timeout=30) == b"":
                    writer.transport.abort()
                    return
        writer.write(http_response(name))
        await writer.drain()


@pytest.mark.parametrize("pooled", [False, True], ids=["task", "lane"])
async def test_abandoned_request_half_closed(tmp_path: Path, pooled: bool) -> None:
    """floydd half-closes an abandoned request's connection, so an app that watches its socket stops at once."""
    upstream = await raw_upstream(socket_watching_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        if pooled:
            async with client.get(proxy.url + proxy.path("/warm")) as warm:
                await warm.read()
        await give_up_on(client, proxy.url + proxy.path("/slow"))
        # Without the half-close the app would work on /slow for 30 s, and /next would wait as long.
        body = await read_body(client, proxy.url + proxy.path("/next"))
        in_flight = proxy.queue.in_flight
    assert body == b"next"
    assert in_flight == 0


async def test_job_end_frees_abandoned_slot(tmp_path: Path) -> None:
    """The job's end closes the connection of an abandoned request at once and frees its slot."""
    events: list[str] = []
    upstream = await raw_upstream(timed_app(events, {b"stall": 30.0}))
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        await give_up_on(client, proxy.url + proxy.path("/stall"))
        await asyncio.sleep(0.1)
        in_flight_while_held = proxy.queue.in_flight
        proxy.queue.close(JobNotServing("job is stopped, not serving", state="stopped", reason="stopped by a user"))
        in_flight = proxy.queue.in_flight
    assert in_flight_while_held == 1
    assert in_flight == 0


async def test_shutdown_lets_pooled_request_finish(tmp_path: Path) -> None:
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        # A keep-alive request, so the connection closes only because floydd stops.
        request = f"GET {proxy.path('/split')} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
        call = asyncio.create_task(raw_exchange(proxy.url, request))
        await asyncio.sleep(0.1)
        await proxy.front.shutdown(2.0)
        raw = await call
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nlate")


async def test_queued_request_continues_in_lane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request admitted after a wait is sent on the pooled connection from callbacks, with its wait reported."""
    exchanges: list[str] = []
    exchange = Proxy.exchange

    async def counted_exchange(self: Proxy, relay: Relay, admission: Admission, job_id: str, *args: Any) -> None:
        exchanges.append(job_id)
        await exchange(self, relay, admission, job_id, *args)

    monkeypatch.setattr(Proxy, "exchange", counted_exchange)
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        # The first request found no pooled connection and went through a task.
        assert exchanges == [proxy.job_id]
        exchanges.clear()
        # The app sends /split's body 0.2 s after its head, so /warm waits in the queue for about that long.
        first = asyncio.create_task(raw_exchange(proxy.url, split_request(proxy)))
        await asyncio.sleep(0.05)
        async with client.get(proxy.url + proxy.path("/warm")) as queued:
            body = await queued.read()
            timing = queued.headers["Server-Timing"]
        raw = await first
        in_flight = proxy.queue.in_flight
    assert queued.status == 200
    assert body == b"warm"
    queued_ms = float(timing.split("queue;dur=")[1].split(",")[0])
    assert queued_ms >= 100
    assert raw.endswith(b"\r\n\r\nlate")
    assert in_flight == 0
    # No request went through the task's exchange, and all three shared the app's one keep-alive connection.
    assert exchanges == []
    assert upstream.connections == 1


async def test_queued_request_sent_before_response(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The response that frees the slot goes to its client after the queued request has gone to the app."""
    events: list[str] = []
    record_app_writes(monkeypatch, lambda head: events.append("app " + head.split(b" ")[1].rsplit(b"/", 1)[1].decode()))
    client_write = FrontConnection.write

    def record_client_write(connection: FrontConnection, data: bytes) -> None:
        events.append("client " + data[-4:].decode())
        client_write(connection, data)

    monkeypatch.setattr(FrontConnection, "write", record_client_write)
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        events.clear()
        first = asyncio.create_task(raw_exchange(proxy.url, split_request(proxy)))
        await asyncio.sleep(0.05)
        async with client.get(proxy.url + proxy.path("/warm")) as queued:
            body = await queued.read()
        await first
    assert body == b"warm"
    assert events == ["app split", "app warm", "client late", "client warm"]


async def test_gone_client_request_not_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting client that has closed its connection when its turn comes gets nothing sent to the app."""
    release = JobQueue.release

    def close_waiting_clients_then_release(queue: JobQueue, admission: Admission) -> None:
        # The client's close has reached the transport, and connection_lost has not run yet.
        for connection in list(proxy.front.connections):
            if connection._task is not None:  # noqa: SLF001
                connection.abort()
        release(queue, admission)

    sent: list[bytes] = []
    record_app_writes(monkeypatch, sent.append)
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        first = asyncio.create_task(raw_exchange(proxy.url, split_request(proxy)))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(
            raw_exchange(proxy.url, f"GET {proxy.path('/gone')} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        )
        await asyncio.sleep(0.05)
        monkeypatch.setattr(JobQueue, "release", close_waiting_clients_then_release)
        raw = await first
        gone_response = await waiting
        monkeypatch.setattr(JobQueue, "release", release)
        async with client.get(proxy.url + proxy.path("/warm")) as after:
            body = await after.read()
        in_flight = proxy.queue.in_flight
    assert raw.endswith(b"\r\n\r\nlate")
    assert gone_response == b""
    assert [head for head in sent if b"/gone" in head] == []
    assert body == b"warm"
    assert in_flight == 0
    assert upstream.connections == 1


async def test_lane_crash_after_wait_frees_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued request whose move to a lane fails gets a 500, and its slot goes back to the queue."""

    def failing_continue_in_lane(connection: FrontConnection, *args: Any) -> bool:
        raise RuntimeError("injected fault")

    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        async with client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        monkeypatch.setattr(FrontConnection, "continue_in_lane", failing_continue_in_lane)
        first = asyncio.create_task(raw_exchange(proxy.url, split_request(proxy)))
        await asyncio.sleep(0.05)
        async with client.get(proxy.url + proxy.path("/warm")) as queued:
            await queued.read()
        await first
        in_flight = proxy.queue.in_flight
    assert queued.status == 500
    assert in_flight == 0


def record_app_writes(monkeypatch: pytest.MonkeyPatch, record: Callable[[bytes], object]) -> None:
    """Pass every request head that floydd's lanes write to the app to `record`."""
    app_write = AppConnection.write

    def recording_write(connection: AppConnection, data: bytes) -> None:
        record(data)
        app_write(connection, data)

    monkeypatch.setattr(AppConnection, "write", recording_write)


def split_request(proxy: ProxyUnderTest) -> bytes:
    return f"GET {proxy.path('/split')} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


async def test_handover_cancelled_before_start(tmp_path: Path) -> None:
    """A client that leaves in the same instant as a hand-over still frees the slot and the app connection."""
    upstream = await raw_upstream(scripted_keepalive_app)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        # The session closes its connection, so the raw client below is the front's only one.
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))
        writer.write(f"GET {proxy.path('/stall')} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.1)
        (connection,) = proxy.front.connections
        # The job's end hands the exchange to a new task. The client's loss, delivered before
        # that task's first step, cancels it before it can run.
        ended = JobNotServing("job is stopped, not serving", state="stopped", reason="stopped by a user")
        proxy.queue.close(ended)
        connection.connection_lost(None)
        writer.close()
        await asyncio.sleep(0.1)
        in_flight = proxy.queue.in_flight
    assert in_flight == 0
    assert upstream.connections == 1


async def test_response_timeout_starts_after_connect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """proxy.response_timeout_s counts from the request's write, not from before a slow connect."""

    async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.3)
        writer.write(http_response(b"slow", headers=("Connection: close",)))
        await writer.drain()

    delay_connects(monkeypatch, 0.4)
    upstream = await raw_upstream(slow_app)
    async with (
        running_proxy(tmp_path, upstream.port, response_timeout_s=0.5) as proxy,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(proxy.url + proxy.path("/")) as response:
            body = await response.read()
    assert response.status == 200
    assert body == b"slow"


async def test_non_reading_client_cut_off(tmp_path: Path) -> None:
    """A client that pipelines requests and never reads loses its connection at proxy.total_timeout_s."""

    async def large_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(http_response(b"x" * 60_000))
            await writer.drain()

    upstream = await raw_upstream(large_app)
    async with running_proxy(tmp_path, upstream.port, total_timeout_s=0.5) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/")) as warm:
            await warm.read()
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])))
            request = f"GET {proxy.path('/')} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
            await loop.sock_sendall(sock, request * 200)
            # Well past total_timeout_s: the responses fill the socket buffers long before.
            await asyncio.sleep(2.0)
            connections = len(proxy.front.connections)
            in_flight = proxy.queue.in_flight
    assert connections == 0
    assert in_flight == 0


async def test_pipelined_lane_crash_frees_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error while the next pipelined request starts gives a 500 and keeps no slot."""
    upstream = await raw_upstream(scripted_keepalive_app)
    fast_path = ProxyMetrics.fast_path
    calls = 0

    def failing_fast_path(metrics: ProxyMetrics) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected fault")
        fast_path(metrics)

    async with running_proxy(tmp_path, upstream.port) as proxy:
        async with aiohttp.ClientSession() as client, client.get(proxy.url + proxy.path("/warm")) as warm:
            await warm.read()
        monkeypatch.setattr(ProxyMetrics, "fast_path", failing_fast_path)
        path = proxy.path
        pipelined = f"GET {path('/warm')} HTTP/1.1\r\nHost: t\r\n\r\nGET {path('/split')} HTTP/1.1\r\nHost: t\r\n\r\n"
        raw = await raw_exchange(proxy.url, pipelined.encode())
        # The app still sends the /split response, and the slot is free once it has.
        async with aiohttp.ClientSession() as client, client.get(proxy.url + path("/warm")) as after:
            body = await after.read()
        in_flight = proxy.queue.in_flight
    first, _, second = raw.partition(b"\r\n\r\nwarm")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert second.startswith(b"HTTP/1.1 500 ")
    assert body == b"warm"
    assert in_flight == 0


async def test_keepalive_limit_counts_idle_time_only(tmp_path: Path) -> None:
    """A fast-path connection closes after server.keepalive_timeout_s idle, never while it is in use.

    One timer per connection serves both the keep-alive limit and the response
    limit of a request served from callbacks. Here the response limit falls
    after the keep-alive limit that the timer was last set for.
    """
    upstream = await raw_upstream(scripted_keepalive_app)
    server_settings = dataclasses.replace(ServerSettings(), keepalive_timeout_s=0.3)
    async with running_proxy(tmp_path, upstream.port, server_settings=server_settings, response_timeout_s=0.6) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]))

        async def get(tail: str) -> bytes:
            writer.write(f"GET {proxy.path(tail)} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            assert length is not None
            return head + await reader.readexactly(int(length[1]))

        try:
            # Twice as long as the keep-alive limit in all, but never idle for as long.
            responses = []
            for _ in range(6):
                responses.append(await get("/warm"))
                await asyncio.sleep(0.1)
            # Served from callbacks on the pooled connection, until its response limit hands it to a task.
            stalled = await get("/stall")
            async with asyncio.timeout(5):
                closed_when_idle = await reader.read() == b""
        finally:
            writer.close()
    assert all(response.endswith(b"\r\n\r\nwarm") for response in responses)
    assert stalled.startswith(b"HTTP/1.1 504 ")
    assert b"response_timeout_s" in stalled
    assert closed_when_idle


@pytest.mark.parametrize("handler", [keepalive_app, closing_app], ids=["keep-alive", "close"])
async def test_requests_leave_no_reference_cycles(tmp_path: Path, handler: Handler) -> None:
    """floydd's objects for a request are freed as it ends, not later by the cycle collector.

    The collector's pauses grow with the garbage it finds, and they show in the
    latency of whichever requests they delay.
    """
    upstream = await raw_upstream(handler)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession() as client:
        # The first responses decide between pooled connections and spares.
        for _ in range(3):
            async with client.get(proxy.url + proxy.path("/")) as response:
                await response.read()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                async with client.get(proxy.url + proxy.path("/")) as response:
                    await response.read()
            gc.collect()
            in_cycles = {type(found).__qualname__ for found in gc.garbage if _from_floydd_or_its_parser(found)}
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert in_cycles == set()


def _from_floydd_or_its_parser(found: object) -> bool:
    module = type(found).__module__
    if module == "builtins" and hasattr(found, "__self__"):
        # A bound method, as a parser keeps its protocol's callbacks.
        module = type(found.__self__).__module__
    return module.startswith(("floydd.", "httptools."))


async def test_stuck_spare_connect_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request gives up a spare connect pending past CONNECT_TIMEOUT_S instead of waiting for it."""
    monkeypatch.setattr(upstream_module, "CONNECT_TIMEOUT_S", 0.2)
    # Longer than the client waits below, so a request that waited for the stuck spare would time out.
    monkeypatch.setattr(upstream_module, "SPARE_WAIT_S", 5.0)
    # As after a lost SYN: nothing happens until the connect is given up.
    connects = delay_connects(monkeypatch, 30, only=FIRST_SPARE)
    upstream = await raw_upstream(closing_app)
    timeout = aiohttp.ClientTimeout(total=2)
    async with running_proxy(tmp_path, upstream.port) as proxy, aiohttp.ClientSession(timeout=timeout) as client:
        statuses = []
        # The second request opens the stuck spare, and the third comes after CONNECT_TIMEOUT_S.
        for pause_s in (0.0, 0.0, 0.3, 0.0, 0.0):
            await asyncio.sleep(pause_s)
            async with client.get(proxy.url + proxy.path("/")) as response:
                await response.read()
                statuses.append(response.status)
        calls = connects.calls
    assert statuses == [200] * 5
    assert connects.cancelled.is_set()
    # Connects went on after the stuck one: the requests after it opened spares again.
    assert calls > FIRST_SPARE + 2


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 6\r\nX-Second: 1\r\n\r\nsecond",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x-second\r\n\r\nsecond",
        b"\x00 no response\r\n\r\n",
    ],
    ids=["response", "upgrade", "invalid"],
)
async def test_second_response_in_one_read_dropped(tmp_path: Path, extra: bytes) -> None:
    """Bytes that follow a complete response in the same read are dropped, with the connection.

    floydd sent no request that such bytes respond to. Passed on, a second response
    would reach the client as the response to its next request.
    """

    async def doubling_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if b"/double" in head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + extra)
            else:
                writer.write(http_response(b"warm"))
            await writer.drain()

    upstream = await raw_upstream(doubling_app)
    async with running_proxy(tmp_path, upstream.port) as proxy:
        path = proxy.path
        # The first /double goes to the app from a task on a new connection. The second is served
        # from callbacks on the connection pooled after /warm.
        pipelined = (
            f"GET {path('/double')} HTTP/1.1\r\nHost: t\r\n\r\n"
            f"GET {path('/warm')} HTTP/1.1\r\nHost: t\r\n\r\n"
            f"GET {path('/double')} HTTP/1.1\r\nHost: t\r\n\r\n"
            f"GET {path('/warm')} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        raw = await raw_exchange(proxy.url, pipelined.encode())
    responses = raw.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 4
    for response in responses[0::2]:
        assert response.startswith(b"200 OK\r\n")
        assert b"\r\nContent-Length: 5\r\n" in response
        assert b"x-second" not in response.lower()
        assert response.endswith(b"\r\n\r\nfirst")
    for response in responses[1::2]:
        assert response.endswith(b"\r\n\r\nwarm")
    # Neither connection that carried an extra response was used again.
    assert upstream.connections == 3

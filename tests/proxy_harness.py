"""An in-process proxy in front of small upstreams on 127.0.0.1, for faults a Flask app cannot produce.

The proxy is floydd's own `Proxy` with a real queue, store, aiohttp server
and front (floydd.front), built the way floydd.app and floydd.cli build
them; only the supervisor is left out, so a test opens and closes the job's
queue itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from aiohttp import web

from floydd.api import error_middleware
from floydd.auth import AUTHENTICATOR, Authenticator, TokenStore, auth_middleware
from floydd.config import ProxySettings, ServerSettings
from floydd.front import FrontServer
from floydd.jobs import Job, JobMode, JobState, new_job_id, utcnow
from floydd.metrics import ProxyMetrics
from floydd.proxy import Proxy, no_automatic_continue
from floydd.queue import JobQueue, QueueRegistry
from floydd.store import JobStore
from floydd.upstream import Upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A TCP server on 127.0.0.1 that runs `handler` per connection and records what arrived."""

    port: int
    server: asyncio.Server
    connections: int = 0
    received: list[bytes] = field(default_factory=list)


async def raw_upstream(handler: Handler) -> RawUpstream:
    state: RawUpstream | None = None

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert state is not None
        state.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state = RawUpstream(port=server.sockets[0].getsockname()[1], server=server)
    return state


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request head and its Content-Length body; return (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


def http_response(body: bytes = b"ok", *, status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class ProxyUnderTest:
    url: str
    job_id: str
    queue: JobQueue
    queues: QueueRegistry
    store: JobStore
    # Sent as a bearer token, it reads /metrics.
    admin_token: str
    front: FrontServer

    def path(self, tail: str = "/") -> str:
        return f"/expose/{self.job_id}{tail}"


@contextlib.asynccontextmanager
async def running_proxy(
    tmp_path: Path,
    upstream_port: int | None,
    *,
    concurrency: int = 1,
    server_settings: ServerSettings | None = None,
    **settings: object,
) -> AsyncIterator[ProxyUnderTest]:
    """Serve `/expose/<id>` for one job whose queue is open to `upstream_port` (or still closed when None).

    `settings` are ProxySettings fields, and `server_settings` replaces the default ServerSettings.
    """
    proxy_settings = dataclasses.replace(ProxySettings(), **settings)  # type: ignore[arg-type]
    store = JobStore(tmp_path / "floydd.sqlite3")
    await store.open()
    now = utcnow()
    job = Job(
        id=new_job_id(),
        mode=JobMode.SERVE,
        env="flask",
        image="floydd/flask:latest",
        state=JobState.SERVING,
        created_at=now,
        deadline=now + timedelta(hours=1),
    )
    await store.insert(job)
    queues = QueueRegistry(proxy_settings.max_queue_depth, preconnect=proxy_settings.preconnect)
    queue = queues.create(job.id, concurrency=concurrency, public=True)
    if upstream_port is not None:
        queue.open(Upstream("127.0.0.1", upstream_port))
    metrics = ProxyMetrics(queues, store)
    proxy = Proxy(proxy_settings, queues, store, metrics, tmp_path / "spool")
    tokens = TokenStore(store)
    admin_token, _ = await tokens.create("admin", admin=True)
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    # The proxy checks private jobs through the app's authenticator, as in floydd.app.
    app[AUTHENTICATOR] = Authenticator(tokens, store)
    app.router.add_get("/metrics", metrics.handle)
    for path in ("/expose/{job_id}", "/expose/{job_id}/{tail:.*}"):
        app.router.add_route("*", path, proxy.handle, expect_handler=no_automatic_continue)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None
    # floydd's front, as floydd.cli installs it: plain GETs take the fast path, the rest go to aiohttp.
    front = FrontServer(runner.server, proxy, queues, metrics, server_settings or ServerSettings())
    server = await asyncio.get_running_loop().create_server(front, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield ProxyUnderTest(f"http://127.0.0.1:{port}", job.id, queue, queues, store, admin_token, front)
    finally:
        server.close()
        await front.shutdown(1.0)
        await runner.cleanup()
        await store.close()


async def raw_exchange(url: str, request: bytes, *, timeout_s: float = 10.0) -> bytes:
    """Send raw request bytes to the proxy and return every byte until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            return await reader.read(-1)
    finally:
        writer.close()

"""Reference servers that bound what a Python proxy can reach on this machine.

Run as `python -m bench.reference lean-proxy PORT APP_PORT`,
`python -m bench.reference bare-proxy PORT APP_PORT` or
`python -m bench.reference aiohttp-hello PORT`; all listen on 127.0.0.1.

- **lean-proxy** is the smallest proxy that can be built from the same parts
  as floydd. It is an asyncio Protocol that parses requests with httptools,
  with one lock to send one request at a time and floydd's own upstream
  client (`floydd.upstream`, preconnect on). It has no queue limits, timeouts,
  metrics, request ids, forwarded headers or JSON errors, and it sends
  the app's head and body in one write. Its CPU per request is what
  Python, uvloop and the kernel cost for one proxied request on this
  machine, so the gap between it and floydd is the cost of floydd's features.
- **bare-proxy** is the least a Python proxy can do per request: asyncio
  Protocols and callbacks only, with no task, no parser beyond finding the
  end of the head and the Content-Length, and one connection opened ahead
  for the next request. It is no usable proxy (one client, small responses
  with a Content-Length only), but it bounds what floydd's design can reach
  on this machine.
- **aiohttp-hello** is aiohttp answering `GET /hello` itself with 6 bytes:
  the per-request cost of the aiohttp server that floydd is built on.
"""

from __future__ import annotations

import asyncio
import re
import sys
from typing import cast

import httptools
import uvloop
from aiohttp import web

from floydd.proxy import HOP_BY_HOP
from floydd.upstream import ConnectionPool, Upstream, send_request

LOOPBACK = "127.0.0.1"


class LeanProxyConnection(asyncio.Protocol):
    """One client connection of the lean proxy, whose requests get their responses in order."""

    def __init__(self, pool: ConnectionPool, turn: asyncio.Lock) -> None:
        self._pool = pool
        self._turn = turn
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._previous: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self._headers.append((name, value))

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii")
        url, headers = self._url, self._headers
        self._url, self._headers = b"", []
        # Chained so that the responses of pipelined requests leave in order.
        self._previous = asyncio.get_running_loop().create_task(self._answer(method, url, headers, self._previous))

    async def _answer(
        self, method: str, url: bytes, headers: list[tuple[bytes, bytes]], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await previous
        async with self._turn:
            upstream = await send_request(
                self._pool, method, url, headers, None, content_length=None, response_timeout_s=60
            )
            try:
                body = b"".join([chunk async for chunk in upstream.iter_body()])
            finally:
                await upstream.close()
        head = [b"HTTP/1.1 %d %s\r\n" % (upstream.status, upstream.reason.encode("latin-1"))]
        for name, value in upstream.headers:
            if name.lower() not in HOP_BY_HOP and name.lower() != b"content-length":
                head += (name, b": ", value, b"\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join([*head, body]))


async def serve_lean_proxy(port: int, app_port: int) -> None:
    pool = ConnectionPool(Upstream(LOOPBACK, app_port))
    turn = asyncio.Lock()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: LeanProxyConnection(pool, turn), LOOPBACK, port)
    await server.serve_forever()


CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")
CONNECTION_LINE = re.compile(rb"(?im)^connection:[^\r\n]*\r\n")


class BareUpstream(asyncio.Protocol):
    """One connection of the bare proxy to the app, which carries one exchange."""

    def __init__(self, pool: BarePool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # The length of the whole response once its head has arrived.
        self._expected = -1
        self.client: BareProxyConnection | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self.pending:
            self._transport.write(self.pending)
        else:
            self._pool.spare = self

    def send(self, client: BareProxyConnection, head: bytes) -> None:
        self.client = client
        assert self._transport is not None
        self._transport.write(head)

    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._expected < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = CONTENT_LENGTH.search(self._buffer, 0, end)
            self._expected = end + 4 + (int(length.group(1)) if length else 0)
        if len(self._buffer) >= self._expected and self.client is not None:
            end = self._buffer.find(b"\r\n\r\n")
            # The app closes its connection; the client's stays open.
            head = CONNECTION_LINE.sub(b"", bytes(self._buffer[: end + 2]))
            client, self.client = self.client, None
            client.respond(head + bytes(self._buffer[end + 2 :]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pool.spare is self:
            self._pool.spare = None


class BarePool:
    """The bare proxy's connections to the app: one spare, opened as the previous one is taken."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app_port: int) -> None:
        self._loop = loop
        self._app_port = app_port
        self.spare: BareUpstream | None = None

    def send(self, client: BareProxyConnection, head: bytes) -> None:
        upstream, self.spare = self.spare, None
        if upstream is not None and upstream.usable():
            upstream.send(client, head)
        else:
            upstream = BareUpstream(self)
            upstream.client = client
            upstream.pending = head
            self._connect(upstream)
        self._connect(BareUpstream(self))

    def _connect(self, upstream: BareUpstream) -> None:
        self._loop.create_task(self._loop.create_connection(lambda: upstream, LOOPBACK, self._app_port))


class BareProxyConnection(asyncio.Protocol):
    """One client connection of the bare proxy, which forwards one request at a time."""

    def __init__(self, pool: BarePool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._next_request()

    def respond(self, response: bytes) -> None:
        self._busy = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(response)
            self._next_request()

    def _next_request(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if self._busy or end < 0:
            return
        head = bytes(self._buffer[: end + 4])
        del self._buffer[: end + 4]
        self._busy = True
        self._pool.send(self, head)


async def serve_bare_proxy(port: int, app_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool = BarePool(loop, app_port)
    server = await loop.create_server(lambda: BareProxyConnection(pool), LOOPBACK, port)
    await server.serve_forever()


async def serve_aiohttp_hello(port: int) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"hello\n")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, port).start()
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "lean-proxy":
        uvloop.run(serve_lean_proxy(int(argv[1]), int(argv[2])))
    elif len(argv) == 3 and argv[0] == "bare-proxy":
        uvloop.run(serve_bare_proxy(int(argv[1]), int(argv[2])))
    elif len(argv) == 2 and argv[0] == "aiohttp-hello":
        uvloop.run(serve_aiohttp_hello(int(argv[1])))
    else:
        print(
            "usage: python -m bench.reference lean-proxy PORT APP_PORT | bare-proxy PORT APP_PORT | aiohttp-hello PORT",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

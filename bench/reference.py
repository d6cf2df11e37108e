"""Reference servers that bound what a Python proxy can reach on this machine.

Run as `python -m bench.reference lean-proxy PORT APP_PORT` or
`python -m bench.reference aiohttp-hello PORT`; both listen on 127.0.0.1.

- **lean-proxy** is the smallest proxy that can be built from the same parts
  as floydd. It is an asyncio Protocol that parses requests with httptools,
  with one lock to send one request at a time and floydd's own upstream
  client (`floydd.upstream`, preconnect on). It has no queue limits, timeouts,
  metrics, request ids, forwarded headers or JSON errors, and it sends
  the app's head and body in one write. Its CPU per request is what
  Python, uvloop and the kernel cost for one proxied request on this
  machine, so the gap between it and floydd is the cost of floydd's features.
- **aiohttp-hello** is aiohttp answering `GET /hello` itself with 6 bytes:
  the per-request cost of the aiohttp server that floydd is built on.
"""

from __future__ import annotations

import asyncio
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
    elif len(argv) == 2 and argv[0] == "aiohttp-hello":
        uvloop.run(serve_aiohttp_hello(int(argv[1])))
    else:
        print("usage: python -m bench.reference lean-proxy PORT APP_PORT | aiohttp-hello PORT", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

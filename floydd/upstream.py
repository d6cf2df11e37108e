"""A lean HTTP/1.1 client for the one hop from floydd to a job's app.

It is built on asyncio streams and httptools (llhttp) instead of aiohttp's
client because the proxy needs the raw bytes: the request target passes
byte for byte, repeated headers keep their order, bodies are never decoded
or decompressed, and the response framing is known exactly, so a response
cut short by the app can be told from a complete one.

Connections to an app that keeps them alive are reused from a small
per-job pool (`ConnectionPool`). A connection goes back to the pool only
after a complete, framed HTTP/1.1 response that did not ask to close it,
and only when the whole request body was sent. The Werkzeug development
server closes every connection, so with it each request opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools

from floydd.errors import BadGateway, GatewayTimeout

READ_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
# Idle connections kept per job; more than the max concurrency is never useful.
POOL_MAX_IDLE = 8
# An idle connection older than this is closed instead of reused, because
# servers close idle keep-alive connections too (gunicorn after 2 s, uvicorn 5 s).
POOL_IDLE_TIMEOUT_S = 2.0
# A request that cannot be retried on a fresh connection reuses only a
# connection idle for less than this, so the app has had no time to close it.
UNSAFE_REUSE_IDLE_S = 0.5
# Methods that RFC 9110 section 9.2.2 defines as idempotent.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True)
class Upstream:
    """Where a serve job's app accepts connections."""

    host: str
    port: int


class UpstreamBroken(BadGateway):
    """The app broke off the exchange after the response had started."""


class UpstreamRefused(BadGateway):
    """The app did not accept a connection."""


class _ClosedBeforeResponse(BadGateway):
    """The app closed the connection before sending one byte of a response."""


class _Connection:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def is_usable(self) -> bool:
        return not self.writer.transport.is_closing() and not self.reader.at_eof() and self.reader.exception() is None

    def abort(self) -> None:
        self.writer.transport.abort()


class ConnectionPool:
    """Idle keep-alive connections to one app, most recently used first."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._idle: list[_Connection] = []
        self._closed = False

    def take(self, max_idle_s: float) -> _Connection | None:
        """Return an idle connection used less than `max_idle_s` ago, closing stale ones."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < max_idle_s and connection.is_usable():
                return connection
            connection.abort()
        return None

    async def connect(self) -> _Connection:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.upstream.host, self.upstream.port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamRefused(
                f"the app is not accepting connections on port {self.upstream.port}: {exc or 'connect timed out'}",
            ) from exc
        return _Connection(reader, writer)

    def put(self, connection: _Connection) -> None:
        if self._closed or len(self._idle) >= POOL_MAX_IDLE or not connection.is_usable():
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    def close(self) -> None:
        """Close the idle connections; connections in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().abort()


@dataclass
class _Message:
    """Parser callbacks collect the response here."""

    status: int = 0
    reason: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers_complete: bool = False
    complete: bool = False
    upgrade: bool = False
    keep_alive: bool = False
    # Bytes after a 101 response head, which belong to the upgraded protocol.
    upgrade_tail: bytes = b""
    body: list[bytes] = field(default_factory=list)
    parser: httptools.HttpResponseParser | None = None

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        if not _is_interim(self.status):
            self.headers_complete = True
            # Read here: llhttp resets these flags once the message is complete.
            self.keep_alive = self.parser.get_http_version() == "1.1" and bool(self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if _is_interim(self.status):
            # 100 Continue or 103 Early Hints: discard it, the real response follows.
            self.reason.clear()
            self.headers.clear()
            self.status = 0
            return
        self.complete = True


def _is_interim(status: int) -> bool:
    return 100 <= status < 200 and status != 101


class UpstreamResponse:
    """A response whose head has arrived and whose body is read on demand."""

    def __init__(
        self,
        message: _Message,
        parser: httptools.HttpResponseParser,
        connection: _Connection,
        pool: ConnectionPool,
        sender: asyncio.Task[bool] | None,
        bodyless: bool,
    ) -> None:
        self._message = message
        self._parser = parser
        self._connection = connection
        self._pool = pool
        self._sender = sender
        self._bodyless = bodyless
        self._released = False
        self.status = message.status
        self.reason = bytes(message.reason).decode("latin-1")
        self.headers = message.headers
        if bodyless:
            # The parser cannot know the request was HEAD, so it may wait for a body that never comes.
            message.complete = not message.body

    def detach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Hand over the connection after a 101 response, with the bytes already read past its head."""
        self._released = True
        return self._connection.reader, self._connection.writer, self._message.upgrade_tail

    def framed(self) -> bool:
        """Return True when the body length is known from Content-Length or chunked encoding."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                return True
            if lowered == b"transfer-encoding" and b"chunked" in value.lower():
                return True
        return False

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield body chunks as they arrive; raise UpstreamBroken if the app breaks off."""
        message = self._message
        if self._bodyless:
            return
        reader = self._connection.reader
        while True:
            if message.body:
                chunks, message.body = message.body, []
                for chunk in chunks:
                    yield chunk
            if message.complete:
                return
            try:
                data = await reader.read(READ_BYTES)
            except OSError as exc:
                raise UpstreamBroken(f"the connection to the app failed during the response body: {exc}") from exc
            if not data:
                if self.framed():
                    raise UpstreamBroken("the app closed the connection before the response body was complete")
                # No framing: the body ends with the connection (HTTP/1.0 style).
                return
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise UpstreamBroken(f"the app sent an invalid response body: {exc}") from exc

    def abort(self) -> None:
        """Break off the exchange at once; a pending read or write fails."""
        self._connection.abort()

    async def close(self) -> None:
        """Return the connection to the pool when it is clean, else close it."""
        if self._released:
            return
        self._released = True
        sender = self._sender
        body_sent = sender is None or (sender.done() and not sender.cancelled() and sender.result())
        if sender is not None and not sender.done():
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
        if body_sent and self._message.complete and self._reusable():
            self._pool.put(self._connection)
        else:
            self._connection.abort()

    def _reusable(self) -> bool:
        return self._message.keep_alive and not self._message.upgrade and not self._message.body


async def send_request(
    pool: ConnectionPool,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: AsyncIterator[bytes] | None,
    *,
    content_length: int | None,
    response_timeout_s: float,
) -> UpstreamResponse:
    """Send a request to the app and return once the response head has arrived.

    `headers` must already be end-to-end only; the framing headers are added
    here. With a body and no `content_length`, the body is sent chunked.
    A request that found its pooled connection closed by the app is sent
    again on a new connection when that is safe: an idempotent method, no
    body, and no byte of a response received.
    """
    retryable = method in IDEMPOTENT_METHODS and body is None
    connection = pool.take(POOL_IDLE_TIMEOUT_S if retryable else UNSAFE_REUSE_IDLE_S)
    head = _request_head(method, target, headers, body is not None, content_length)
    if connection is not None:
        try:
            return await _exchange(pool, connection, method, head, body, content_length, response_timeout_s)
        except _ClosedBeforeResponse:
            if not retryable:
                raise
    connection = await pool.connect()
    return await _exchange(pool, connection, method, head, body, content_length, response_timeout_s)


async def _exchange(
    pool: ConnectionPool,
    connection: _Connection,
    method: str,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    content_length: int | None,
    response_timeout_s: float,
) -> UpstreamResponse:
    chunked = body is not None and content_length is None
    sender: asyncio.Task[bool] | None = None
    message = _Message()
    parser = httptools.HttpResponseParser(message)
    message.parser = parser
    try:
        connection.writer.write(head)
        if body is not None:
            # The body goes out while the response is awaited, because an app
            # may answer (413, 400) before it has read the whole body.
            sender = asyncio.create_task(_send_body(connection.writer, body, chunked=chunked))
        async with asyncio.timeout(response_timeout_s):
            await _read_head(connection.reader, parser, message, sender)
    except TimeoutError as exc:
        await _abandon(connection, sender)
        raise GatewayTimeout(
            f"the app did not start its response within {response_timeout_s:g} s (proxy.response_timeout_s)",
            limit="response_timeout_s",
        ) from exc
    except BaseException:
        await _abandon(connection, sender)
        raise
    bodyless = method == "HEAD" or message.status in (204, 304) or message.upgrade
    return UpstreamResponse(message, parser, connection, pool, sender, bodyless)


def _request_head(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], has_body: bool, content_length: int | None
) -> bytes:
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if content_length is not None:
        parts += (b"Content-Length: ", str(content_length).encode("ascii"), b"\r\n")
    elif has_body:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def _send_body(writer: asyncio.StreamWriter, body: AsyncIterator[bytes], *, chunked: bool) -> bool:
    """Send the body; return whether all of it was sent."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                writer.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                writer.write(chunk)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        # The app stopped reading; its response, read elsewhere, says why.
        return False
    return True


async def _read_head(
    reader: asyncio.StreamReader,
    parser: httptools.HttpResponseParser,
    message: _Message,
    sender: asyncio.Task[bool] | None,
) -> None:
    received = 0
    while not message.headers_complete:
        try:
            data = await reader.read(READ_BYTES)
        except OSError as exc:
            if not received:
                raise _ClosedBeforeResponse(f"the connection to the app failed before a response: {exc}") from exc
            raise BadGateway(f"the connection to the app failed during the response head: {exc}") from exc
        if not data:
            if not received:
                raise _ClosedBeforeResponse("the app closed the connection without sending a response")
            raise BadGateway("the app closed the connection in the middle of the response head")
        received += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # A 101 upgrade; its head is complete and the rest belongs to the new protocol.
            message.headers_complete = True
            message.upgrade = True
            message.upgrade_tail = data[int(upgrade.args[0]) :]
        except httptools.HttpParserError as exc:
            raise BadGateway(f"the app sent an invalid HTTP response: {exc}") from exc
    if sender is not None and sender.done() and not sender.cancelled() and sender.exception() is not None:
        raise BadGateway(f"sending the request body to the app failed: {sender.exception()}")


async def _abandon(connection: _Connection, sender: asyncio.Task[bool] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    connection.abort()


async def send_upgrade(
    pool: ConnectionPool, target: bytes, headers: list[tuple[bytes, bytes]], *, response_timeout_s: float
) -> UpstreamResponse:
    """Send a GET with `Upgrade` on a new connection, which is never pooled afterwards."""
    connection = await pool.connect()
    head = _request_head("GET", target, headers, False, None)
    return await _exchange(pool, connection, "GET", head, None, None, response_timeout_s)

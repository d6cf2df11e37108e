"""A lean HTTP/1.1 client for the one hop from floydd to a job's app.

It is an asyncio Protocol that feeds httptools (llhttp) straight from
`data_received`, instead of aiohttp's client or asyncio streams, because
this hop is on every request's path and the proxy needs the raw bytes. The
request target passes byte for byte, repeated headers keep their order, and
bodies are never decoded or decompressed. The response framing is known
exactly, so a response cut short by the app is distinguished from a complete one.

Connections to an app that keeps them alive are reused from a small
per-job pool (`ConnectionPool`). A connection goes back to the pool only
after a complete, framed HTTP/1.1 response that did not ask to close it,
and only when the whole request body was sent.

An app that closes every connection (the Werkzeug development server, which
`python app.py` runs) would otherwise cost a connect on every request, in
series with the app's work. For such an app the pool opens the next
connection while the current request is in flight (preconnect, as Envoy
calls it), so the next request finds it ready. The pool keeps one such
spare at most, and only while requests keep coming. It closes a spare after
POOL_IDLE_TIMEOUT_S unused and opens a new one only when a request takes a
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import httptools
import structlog

from floydd.errors import BadGateway, GatewayTimeout
from floydd.flow import WriteFlowControl

log = structlog.get_logger(__name__)

READ_BYTES = 256 * 1024
# Response body bytes buffered from the app before floydd stops reading from
# it until the client has taken them, so memory stays flat for any body size.
READ_HIGH_WATER_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
# Idle connections kept per job; more than the max concurrency is never useful.
POOL_MAX_IDLE = 8
# An idle connection older than this is closed instead of reused, because
# servers close idle keep-alive connections too (gunicorn after 2 s, uvicorn 5 s).
POOL_IDLE_TIMEOUT_S = 2.0
# How long a request waits for the spare whose connect is in flight before it opens its own
# connection. A spare's connect to docker-proxy took at most 1 ms in the benchmark, and a
# lost SYN is sent again only after 1 s (Linux's TCP_TIMEOUT_INIT), so a connect still
# pending at 0.1 s is stuck.
SPARE_WAIT_S = 0.1
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


class _Message:
    """One response from the app, filled in by the parser's callbacks."""

    __slots__ = (
        "status",
        "reason",
        "headers",
        "headers_complete",
        "complete",
        "upgrade",
        "keep_alive",
        "upgrade_tail",
        "body",
        "body_bytes",
        "head_at",
        "overflow",
        "parser",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_complete = False
        self.complete = False
        self.upgrade = False
        self.keep_alive = False
        # Bytes after a 101 response head, which belong to the upgraded protocol.
        self.upgrade_tail = b""
        self.body: list[bytes] = []
        self.body_bytes = 0
        # time.monotonic() when the head was complete.
        self.head_at = 0.0
        # Set when bytes of another response followed this one in the same read. They are dropped,
        # and the connection is not reused, since the app has broken the request-response order.
        self.overflow = False
        # The parser refers to the message too; AppConnection._end_parsing() breaks the cycle.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    # llhttp goes on parsing after a complete response, so each callback leaves a complete message alone.

    def on_message_begin(self) -> None:
        if self.complete:
            self.overflow = True

    def on_status(self, status: bytes) -> None:
        if not self.complete:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        parser = self.parser
        assert parser is not None, "a message is parsed only until its exchange ends"
        self.status = parser.get_status_code()
        if not _is_interim(self.status):
            self.headers_complete = True
            self.head_at = time.monotonic()
            # Read here: llhttp resets these flags once the message is complete.
            self.keep_alive = parser.get_http_version() == "1.1" and bool(parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)
            self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if _is_interim(self.status):
            # 100 Continue or 103 Early Hints: discard it, the real response follows.
            self.reason = b""
            self.headers.clear()
            self.status = 0
            return
        self.complete = True


def _is_interim(status: int) -> bool:
    return 100 <= status < 200 and status != 101


class AppConnection(asyncio.Protocol):
    """One TCP connection to the app, which parses each response as its bytes arrive.

    The task that sent a request waits in `wait()` and is woken when bytes,
    the end of the connection, or an error arrive. Instead of a task, a
    `listener` callback may take these events, for an exchange driven from
    callbacks alone (floydd.front).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_connected: Callable[[AppConnection], None] | None = None
    ) -> None:
        self.loop = loop
        # Called from connection_made, a loop pass or two before the task that opened the connection resumes.
        self.on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        # The response being read, or None between exchanges.
        self.message: _Message | None = None
        # Bytes of the current response received so far. 0 means the app sent no response.
        self.received = 0
        self.eof = False
        self.error: BadGateway | None = None
        self.lost: Exception | None = None
        self.head_timed_out = False
        self.listener: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._flow = WriteFlowControl()
        self._read_paused = False
        # Set when bytes arrive between exchanges, so the connection is never reused.
        self._stray = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        on_connected, self.on_connected = self.on_connected, None
        if on_connected is not None:
            on_connected(self)

    def data_received(self, data: bytes) -> None:
        message = self.message
        if message is None or message.complete or message.parser is None:
            self._stray = True
            return
        self.received += len(data)
        try:
            message.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # A second response in the read that asks for an upgrade is dropped by the overflow check below.
            if not message.overflow:
                # A 101 upgrade; its head is complete and the rest belongs to the new protocol.
                message.headers_complete = True
                message.upgrade = True
                message.upgrade_tail = data[int(upgrade.args[0]) :]
                self._pause_reading()
        except httptools.HttpParserError as exc:
            if message.complete:
                # Invalid bytes after a complete response are dropped with the connection, like a second response.
                self._stray = True
            elif message.headers_complete:
                self.error = UpstreamBroken(f"the app sent an invalid response body: {exc}")
            else:
                self.error = BadGateway(f"the app sent an invalid HTTP response: {exc}")
            self._pause_reading()
        if message.overflow:
            self._stray = True
        if message.body_bytes > READ_HIGH_WATER_BYTES:
            self._pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        # False closes the transport: the app has nothing more to send.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._end_parsing()
        self._wake()
        self._flow.fail_drain(ConnectionResetError("the connection to the app was lost"))

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection to the app is closed")
        await self._flow.wait_writable()

    async def wait(self) -> None:
        """Wait for the next event on the connection: bytes, the end, or an error."""
        self._resume_reading()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def begin(self) -> _Message:
        """Start a new exchange and return the response it will fill in."""
        self.message = _Message()
        self.received = 0
        self.head_timed_out = False
        return self.message

    def idle(self) -> None:
        """End the exchange and keep reading, so a close or stray bytes from the app are noticed while idle."""
        self._end_parsing()
        self.message = None
        self.idle_since = time.monotonic()
        self._resume_reading()

    def time_out_head(self) -> None:
        """Wake the request waiting for the response head, which then fails with 504."""
        self.head_timed_out = True
        self._wake()

    def is_usable(self) -> bool:
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self.eof
            and self.error is None
            and not self._stray
        )

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, data: tuple[bytes, ...]) -> None:
        assert self.transport is not None
        self.transport.writelines(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Hand the transport over to asyncio streams, for a connection upgraded to another protocol."""
        assert self.transport is not None
        self._end_parsing()
        reader = asyncio.StreamReader(limit=READ_BYTES, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self.eof:
            reader.feed_eof()
        writer = asyncio.StreamWriter(self.transport, protocol, reader, self.loop)
        self._resume_reading()
        return reader, writer

    def _end_parsing(self) -> None:
        """Drop the current message's parser, which no more bytes will reach.

        The parser keeps references to the message's bound methods, and the
        message to the parser. Left alone, every exchange would leave this cycle
        for the garbage collector, whose more frequent pauses then show in the
        latency tail.
        """
        if self.message is not None:
            self.message.parser = None

    def _wake(self) -> None:
        listener = self.listener
        if listener is not None:
            listener()
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()


class ConnectionPool:
    """Idle connections to one app, most recently used first.

    Idle connections are keep-alive connections returned after an exchange,
    and the spare opened ahead of time for an app that closes connections.
    """

    def __init__(self, upstream: Upstream, *, preconnect: bool = True) -> None:
        self.upstream = upstream
        self._idle: list[AppConnection] = []
        self._closed = False
        self._preconnect = preconnect
        # Set once the app has closed a connection after a complete response,
        # which shows that the next request would need a new connection.
        self._app_closes_connections = False
        self._connecting: asyncio.Task[None] | None = None
        self._connecting_since = 0.0
        # Resolved once the spare being opened is offered or has failed. It is created only when a request waits.
        self._spare_waiter: asyncio.Future[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Connections whose client has gone while the app still works on their request (abandon()), with the
        # timer that gives up on each. The queue counts them as busy.
        self._abandoned: dict[AppConnection, asyncio.TimerHandle] = {}
        # Called when an abandoned request ends, so that the queue can admit the next one.
        self.on_app_free: Callable[[], None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Kept because asyncio.get_running_loop() makes a getpid() system call on every call in Python 3.11.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def take(self, max_idle_s: float) -> AppConnection | None:
        """Return an idle connection used less than `max_idle_s` ago, closing stale ones."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < max_idle_s and connection.is_usable():
                return connection
            connection.abort()
        return None

    async def take_spare_being_opened(self, max_idle_s: float) -> AppConnection | None:
        """Wait for the spare connection being opened, if there is one, and return it unless another request took it.

        A new connection in its place would stall an app that serves one
        connection at a time (Werkzeug with threaded=False, wsgiref): the app
        accepts the spare first and waits for a request on it, while this
        request waits on the new connection until the unused spare is closed
        after POOL_IDLE_TIMEOUT_S. Waiting for the spare costs little: in one
        benchmark run at one client through docker-proxy, 8 % of the spares'
        connects took 0.3 to 1 ms and none took longer. The wait ends after
        SPARE_WAIT_S, since a connect pending that long is stuck, and a connect
        already pending past CONNECT_TIMEOUT_S is given up without a wait.
        """
        if self._connecting is None or self._give_up_stuck_connect():
            return None
        waiter = self._spare_waiter
        if waiter is None:
            waiter = self._spare_waiter = self.loop.create_future()
        # asyncio.wait, unlike awaiting the future, leaves it pending for other waiters if this request is cancelled.
        await asyncio.wait({waiter}, timeout=SPARE_WAIT_S)
        return self.take(max_idle_s)

    async def connect(self) -> AppConnection:
        """Open a connection to the app, or raise UpstreamRefused after at most CONNECT_TIMEOUT_S."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                return await self._open()
        except TimeoutError as exc:
            raise self._not_accepting("connect timed out") from exc

    async def _open(self, connection: AppConnection | None = None) -> AppConnection:
        """Connect `connection`, or a new AppConnection, to the app."""
        loop = self.loop
        protocol = connection or AppConnection(loop)
        try:
            await loop.create_connection(lambda: protocol, self.upstream.host, self.upstream.port)
        except OSError as exc:
            raise self._not_accepting(str(exc)) from exc
        return protocol

    def _not_accepting(self, reason: str) -> UpstreamRefused:
        return UpstreamRefused(f"the app is not accepting connections on port {self.upstream.port}: {reason}")

    def put(self, connection: AppConnection) -> None:
        if self._closed or len(self._idle) >= POOL_MAX_IDLE or not connection.is_usable():
            connection.abort()
            return
        connection.idle()
        self._idle.append(connection)
        self._schedule_expiry()

    def finish(self, connection: AppConnection, message: _Message, *, body_sent: bool = True) -> None:
        """Keep the connection of an ended exchange for the next request if it is clean, else close it."""
        if body_sent and message.complete and _reusable(message):
            self.put(connection)
        else:
            self.discard(connection, closed_by_app=body_sent and message.complete and not message.keep_alive)

    def discard(self, connection: AppConnection, *, closed_by_app: bool) -> None:
        """Close a connection that cannot be reused.

        `closed_by_app` marks a complete response after which the app did not
        keep the connection, which turns on preconnecting for this pool.
        """
        connection.abort()
        if closed_by_app:
            self._app_closes_connections = True

    def open_spare(self) -> None:
        """Start opening a connection for the next request if this app will need one."""
        if not self._preconnect or not self._app_closes_connections or self._closed or self._idle:
            return
        if self._connecting is not None:
            self._give_up_stuck_connect()
            return
        self._connecting_since = time.monotonic()
        spare = AppConnection(self.loop, self._spare_connected)
        self._connecting = self.loop.create_task(self._connect_spare(spare))

    def _give_up_stuck_connect(self) -> bool:
        """Cancel the spare's connect if it is pending past CONNECT_TIMEOUT_S, and return whether it was.

        The next request checks this, since a timer or asyncio.timeout() per connect would cost
        more than the connect's own Python code, and an app that closes connections needs one
        connect per request.
        """
        # NOTE: without a next request, a connect whose SYN is lost ends only when the kernel gives up.
        connecting = self._connecting
        if connecting is None or time.monotonic() - self._connecting_since <= CONNECT_TIMEOUT_S:
            return False
        connecting.cancel()
        return True

    @property
    def abandoned(self) -> int:
        """Requests whose client has gone and which the app may still be working on."""
        return len(self._abandoned)

    def abandon(self, connection: AppConnection, deadline: float) -> None:
        """Close the connection of a request whose client has gone, once the app is done with the request.

        A WSGI app such as Flask goes on with a request after its client has
        gone, and notices only when it writes the response. A request sent
        in its place meanwhile would run beside it. So the request counts as
        busy (`abandoned`) until its response head arrives, the app closes the
        connection, or `deadline` (time.monotonic()) passes. The connection is
        then closed, which ends whatever response follows. Until then it is
        half-closed, so that an app that watches its socket stops at once.
        """
        delay = deadline - time.monotonic()
        if self._closed or _app_done(connection) or not connection.is_usable() or delay <= 0:
            connection.abort()
            return
        connection.listener = lambda: self._check_abandoned(connection)
        self._abandoned[connection] = self.loop.call_later(delay, self._end_abandoned, connection)
        assert connection.transport is not None
        if connection.transport.can_write_eof():
            connection.transport.write_eof()

    def _check_abandoned(self, connection: AppConnection) -> None:
        if _app_done(connection):
            self._end_abandoned(connection)

    def _end_abandoned(self, connection: AppConnection) -> None:
        timer = self._abandoned.pop(connection, None)
        if timer is None:
            return
        timer.cancel()
        connection.listener = None
        connection.abort()
        if self.on_app_free is not None:
            self.on_app_free()

    def close(self) -> None:
        """Close the idle connections; connections in use close when their exchange ends."""
        self._closed = True
        abandoned, self._abandoned = self._abandoned, {}
        for connection, timer in abandoned.items():
            timer.cancel()
            connection.listener = None
            connection.abort()
        self._spare_settled()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        while self._idle:
            self._idle.pop().abort()

    async def _connect_spare(self, spare: AppConnection) -> None:
        try:
            await self._open(spare)
        except UpstreamRefused as exc:
            # The request that needs a connection next tries on its own and reports the error.
            log.debug("upstream_preconnect_failed", port=self.upstream.port, error=exc.detail)
        finally:
            if spare.transport is None:
                # Never connected, so _spare_connected did not run. A connected spare may be followed
                # by a new connect by now, which this task must not forget.
                self._connecting = None
                self._spare_settled()

    def _spare_connected(self, spare: AppConnection) -> None:
        """Offer the spare as soon as its connection is made, before the task that opened it resumes."""
        self._connecting = None
        self.put(spare)
        self._spare_settled()

    def _spare_settled(self) -> None:
        """Wake the requests waiting in take_spare_being_opened."""
        waiter, self._spare_waiter = self._spare_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _schedule_expiry(self) -> None:
        if self._expiry is None and self._idle:
            oldest = min(connection.idle_since for connection in self._idle)
            delay = max(0.0, oldest + POOL_IDLE_TIMEOUT_S - time.monotonic())
            self._expiry = self.loop.call_later(delay, self._expire_idle)

    def _expire_idle(self) -> None:
        """Close idle connections past POOL_IDLE_TIMEOUT_S, so no app connection stays open unused."""
        self._expiry = None
        deadline = time.monotonic() - POOL_IDLE_TIMEOUT_S
        fresh = []
        for connection in self._idle:
            if connection.idle_since > deadline:
                fresh.append(connection)
            else:
                connection.abort()
        self._idle = fresh
        self._schedule_expiry()


class UpstreamResponse:
    """A response whose head has arrived and whose body is read on demand."""

    def __init__(
        self,
        message: _Message,
        connection: AppConnection,
        pool: ConnectionPool,
        sender: asyncio.Task[bool] | None,
        bodyless: bool,
    ) -> None:
        self._message = message
        self._connection = connection
        self._pool = pool
        self._sender = sender
        self._bodyless = bodyless
        self._released = False
        self.status = message.status
        self.reason = message.reason.decode("latin-1")
        self.headers = message.headers
        self.head_at = message.head_at
        if bodyless:
            # The parser cannot know the request was HEAD, so it may wait for a body that never comes.
            message.complete = not message.body

    def detach(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Hand over the connection after a 101 response, with the bytes already read past its head."""
        self._released = True
        reader, writer = self._connection.detach()
        return reader, writer, self._message.upgrade_tail

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
        if self._bodyless:
            return
        message = self._message
        connection = self._connection
        while True:
            if message.body:
                chunks = message.body
                message.body = []
                message.body_bytes = 0
                for chunk in chunks:
                    yield chunk
            if message.complete:
                return
            if connection.error is not None:
                raise connection.error
            if connection.eof:
                if connection.lost is not None:
                    raise UpstreamBroken(
                        f"the connection to the app failed during the response body: {connection.lost}"
                    )
                if self.framed():
                    raise UpstreamBroken("the app closed the connection before the response body was complete")
                # No framing: the body ends with the connection (HTTP/1.0 style).
                return
            await connection.wait()

    def abort(self) -> None:
        """Break off the exchange at once; a pending read or write fails."""
        self._connection.abort()

    async def close(self) -> None:
        """Return the connection to the pool when it is clean, else close it."""
        if self._released:
            return
        self._released = True
        sender = self._sender
        body_sent = sender is None or (
            sender.done() and not sender.cancelled() and sender.exception() is None and sender.result()
        )
        message = self._message
        try:
            if sender is not None and not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
        finally:
            self._pool.finish(self._connection, message, body_sent=body_sent)


def _app_done(connection: AppConnection) -> bool:
    """Return whether the app has finished working on the request on `connection`: a final response head, or the end.

    An interim response (100 Continue, 103 Early Hints) does not count, since the app goes on working after it.
    """
    message = connection.message
    return message is None or message.headers_complete or connection.eof or connection.error is not None


def _reusable(message: _Message) -> bool:
    """Return whether a connection may carry another exchange after this response, all of whose body was read."""
    return message.keep_alive and not message.upgrade and not message.body


async def send_request(
    pool: ConnectionPool,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: AsyncIterator[bytes] | None,
    *,
    content_length: int | None,
    response_timeout_s: float,
    sent: AppConnection | None = None,
    sent_at: float | None = None,
) -> UpstreamResponse:
    """Send a request to the app and return once the response head has arrived.

    `headers` must already be end-to-end only; the framing headers are added
    here. With a body and no `content_length`, the body is sent chunked.
    A request that found its pooled connection closed by the app is sent
    again on a new connection when that is safe: an idempotent method, no
    body, and no byte of a response received.

    `sent` is a pooled connection on which the caller has already begun the
    exchange and written the same head, at `sent_at` (time.monotonic()).
    This call then waits for its response, within the time left.
    """
    retryable = method in IDEMPOTENT_METHODS and body is None
    head = request_head(method, target, headers, body is not None, content_length)
    connection = sent
    if connection is None:
        max_idle_s = POOL_IDLE_TIMEOUT_S if retryable else UNSAFE_REUSE_IDLE_S
        connection = pool.take(max_idle_s) or await pool.take_spare_being_opened(max_idle_s)
        if connection is not None:
            pool.open_spare()
    if connection is not None:
        try:
            return await _exchange(
                pool, connection, method, head, body, content_length, response_timeout_s, sent_at if sent else None
            )
        except _ClosedBeforeResponse:
            if not retryable:
                raise
    connection = await pool.connect()
    pool.open_spare()
    return await _exchange(pool, connection, method, head, body, content_length, response_timeout_s)


async def _exchange(
    pool: ConnectionPool,
    connection: AppConnection,
    method: str,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    content_length: int | None,
    response_timeout_s: float,
    sent_at: float | None = None,
    *,
    holds_slot: bool = True,
) -> UpstreamResponse:
    """Send the request on `connection` and wait for the response head.

    With `sent_at`, the caller has already begun the exchange and written
    `head` at that time, and the response timeout counts from then. If the
    wait is cancelled after the whole request was sent, a request that
    `holds_slot` in the job's queue stays busy while the app may still work
    on it (ConnectionPool.abandon).
    """
    chunked = body is not None and content_length is None
    sender: asyncio.Task[bool] | None = None
    message = connection.begin() if sent_at is None else connection.message
    assert message is not None, "sent_at given for a connection with no exchange begun"
    deadline = 0.0
    try:
        if sent_at is None:
            connection.write(head)
            sent_at = time.monotonic()
        deadline = sent_at + response_timeout_s
        if body is not None:
            # The body goes out while the response is awaited, because an app
            # may answer (413, 400) before it has read the whole body.
            sender = asyncio.create_task(_send_body(connection, body, chunked=chunked))
        await _read_head(connection, message, sender, response_timeout_s, deadline)
    except asyncio.CancelledError:
        # The client has gone, or a limit or the job's end broke off the exchange.
        if await _stop_sending_body(sender) and holds_slot:
            pool.abandon(connection, deadline)
        else:
            connection.abort()
        raise
    except BaseException:
        await _stop_sending_body(sender)
        connection.abort()
        raise
    bodyless = method == "HEAD" or message.status in (204, 304) or message.upgrade
    return UpstreamResponse(message, connection, pool, sender, bodyless)


def request_head(
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


async def _send_body(connection: AppConnection, body: AsyncIterator[bytes], *, chunked: bool) -> bool:
    """Send the body; return whether all of it was sent."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            if connection.transport is None or connection.transport.is_closing():
                return False
            if chunked:
                connection.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                connection.write(chunk)
            await connection.drain()
        if chunked:
            connection.write(b"0\r\n\r\n")
            await connection.drain()
    except (ConnectionError, OSError):
        # The app stopped reading; its response, read elsewhere, says why.
        return False
    return True


async def _read_head(
    connection: AppConnection,
    message: _Message,
    sender: asyncio.Task[bool] | None,
    response_timeout_s: float,
    deadline: float,
) -> None:
    """Wait for the response head until `deadline` (time.monotonic()), `response_timeout_s` after the request."""
    timer = connection.loop.call_later(max(0.0, deadline - time.monotonic()), connection.time_out_head)
    try:
        while not message.headers_complete:
            if connection.error is not None:
                raise connection.error
            if connection.head_timed_out:
                raise GatewayTimeout(
                    f"the app did not start its response within {response_timeout_s:g} s (proxy.response_timeout_s)",
                    limit="response_timeout_s",
                )
            if connection.eof:
                raise _closed_before_head(connection)
            await connection.wait()
    finally:
        timer.cancel()
    if sender is not None and sender.done() and not sender.cancelled() and sender.exception() is not None:
        raise BadGateway(f"sending the request body to the app failed: {sender.exception()}")


def _closed_before_head(connection: AppConnection) -> BadGateway:
    lost = connection.lost
    if not connection.received:
        if lost is not None:
            return _ClosedBeforeResponse(f"the connection to the app failed before a response: {lost}")
        return _ClosedBeforeResponse("the app closed the connection without sending a response")
    if lost is not None:
        return BadGateway(f"the connection to the app failed during the response head: {lost}")
    return BadGateway("the app closed the connection in the middle of the response head")


async def _stop_sending_body(sender: asyncio.Task[bool] | None) -> bool:
    """Stop sending the request body if that is still going on, and return whether all of it was sent."""
    if sender is None:
        return True
    if not sender.done():
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        return False
    return not sender.cancelled() and sender.exception() is None and sender.result()


async def send_upgrade(
    pool: ConnectionPool, target: bytes, headers: list[tuple[bytes, bytes]], *, response_timeout_s: float
) -> UpstreamResponse:
    """Send a GET with `Upgrade` on a new connection, which is never pooled afterwards."""
    connection = await pool.connect()
    head = request_head("GET", target, headers, False, None)
    # A WebSocket takes no slot of the queue, so nothing waits for the app if the client goes.
    return await _exchange(pool, connection, "GET", head, None, None, response_timeout_s, holds_slot=False)

"""The protocol on floydd's listening socket: a fast path for plain `/expose` requests, aiohttp for the rest.

Every connection starts here. `FrontConnection` itself parses, queues and
relays a bodyless HTTP/1.1 request to a public serve job that needs nothing
of aiohttp's handling. It parses the head with httptools and sends the app's
response as raw bytes, in one write when the response is small. Such
requests are what a model endpoint mostly serves, and aiohttp's request and
response objects cost more CPU per request than the rest of the proxy
(docs/benchmarks.md has the measurements).

Any other request makes the connection switch to aiohttp for good: the API,
uploads, request bodies, WebSockets, `Expect`, `Authorization`, private and
unknown jobs, HTTP/1.0, and oversized or malformed heads. The bytes read so
far go to a fresh aiohttp RequestHandler, which parses them as if it had
accepted the connection. Both paths produce the same response contract
(docs/proxy.md).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import httptools
import structlog
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from floydd.app import METRICS, PROXY, QUEUES
from floydd.config import ServerSettings
from floydd.errors import FloyddError, GatewayTimeout, HttpVersionNotSupported, InvalidRequest
from floydd.flow import WriteFlowControl
from floydd.log import LogThrottle
from floydd.metrics import ProxyMetrics
from floydd.proxy import Proxy, log_aborted, new_request_id, response_end_to_end, server_timing, upstream_headers
from floydd.queue import Admission, JobQueue, QueueRegistry
from floydd.upstream import POOL_IDLE_TIMEOUT_S, AppConnection, UpstreamResponse, request_head

log = structlog.get_logger(__name__)

EXPOSE_PREFIX = b"/expose/"
# A request head with any of these headers needs aiohttp's handling.
SLOW_PATH_HEADERS = frozenset({b"authorization", b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
# A longer request head goes to aiohttp, which applies server.max_request_line_bytes,
# max_header_bytes and max_headers and responds with 400 or 431 as soon as one is exceeded.
FAST_HEAD_BYTES = 8 * 1024
# A response with a Content-Length up to this goes out in one write, head and body together.
COALESCE_BYTES = 64 * 1024
# The `Server` value aiohttp sends when the app sends none.
SERVER_HEADER = SERVER_SOFTWARE.encode("latin-1")
# Pipelined bytes kept while a request is in flight. Past this, floydd stops reading from the client.
PIPELINE_BUFFER_BYTES = 64 * 1024
# An HTTP version in a request line.
HTTP_VERSION = re.compile(rb"HTTP/\d\.\d")
# The point at which aiohttp's parser messages quote the request, as in "Invalid header value char:\n\n  b'...'".
QUOTED_BYTES = re.compile(r":\s*(?:\n|b['\"])")


class FrontServer:
    """The protocol factory for the listening socket, which tracks its connections for shutdown."""

    def __init__(
        self,
        aiohttp_server: web.Server,
        proxy: Proxy,
        queues: QueueRegistry,
        metrics: ProxyMetrics,
        settings: ServerSettings,
    ) -> None:
        self.aiohttp_server = aiohttp_server
        self.proxy = proxy
        self.queues = queues
        self.metrics = metrics
        self.settings = settings
        self.connections: set[FrontConnection] = set()
        self._closing = False
        self._handler_options = handler_options(settings)
        self.rejection_log = LogThrottle()

    def __call__(self) -> FrontConnection:
        return FrontConnection(self)

    def new_handler(self, loop: asyncio.AbstractEventLoop) -> JsonErrorHandler:
        """Return aiohttp's protocol for a connection handed off by the fast path."""
        return JsonErrorHandler(
            self.aiohttp_server, loop=loop, rejection_log=self.rejection_log, **self._handler_options
        )

    @property
    def closing(self) -> bool:
        return self._closing

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections at once and the others after their request, waiting up to `timeout_s`.

        Connections handed to aiohttp are closed by aiohttp's server in the
        same window, so stopping takes at most `timeout_s` for both.
        """
        self._closing = True
        self.aiohttp_server.pre_shutdown()
        busy = []
        for connection in list(self.connections):
            task = connection.close_when_idle()
            if task is not None:
                busy.append(task)
        fast_path = asyncio.wait(busy, timeout=timeout_s) if busy else asyncio.sleep(0)
        await asyncio.gather(fast_path, self.aiohttp_server.shutdown(timeout_s))
        cut_off = sum(connection.abort_if_busy() for connection in list(self.connections))
        if cut_off:
            log.warning("proxy_requests_cut_off", count=cut_off, grace_s=timeout_s)


def handler_options(settings: ServerSettings) -> dict[str, Any]:
    """Return the options of aiohttp's request handler, for web.AppRunner and for FrontServer.new_handler."""
    return {
        "max_line_size": settings.max_request_line_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        # aiohttp's timer for idle keep-alive connections starts when a connection
        # opens and closes it if no complete request head arrived: the header timeout.
        "keepalive_timeout": settings.keepalive_timeout_s,
    }


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, which sends its own errors with floydd's JSON body.

    aiohttp responds itself to a request it cannot parse (a malformed head
    or chunked body, an oversized line or header), without running
    floydd's handlers and so without error_middleware.
    """

    def __init__(self, manager: web.Server, *, rejection_log: LogThrottle, **options: Any) -> None:
        super().__init__(manager, **options)
        self._rejection_log = rejection_log

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400:
            log_rejected(self._rejection_log, request.remote, _without_quoted_bytes(message))
        else:
            # aiohttp's own method logs the failure with its traceback, and raises if the response has started.
            super().handle_error(request, status, exc, message)
        error = _handler_error(status, message)
        response = web.json_response(error.to_json(), status=status)
        response.headers["X-Request-ID"] = new_request_id()
        response.force_close()
        return response


def log_rejected(throttle: LogThrottle, remote: str | None, detail: str | None) -> None:
    """Log a request rejected before routing. It is the client's fault, and any client can repeat it at will."""
    not_logged = throttle.allow()
    if not_logged is not None:
        log.info("http_request_rejected", remote=remote, detail=detail, not_logged_before=not_logged)


def _without_quoted_bytes(message: str | None) -> str | None:
    """Return aiohttp's parser message without the request bytes it quotes, which may hold a token."""
    if message is None:
        return None
    return QUOTED_BYTES.split(message, maxsplit=1)[0]


def _handler_error(status: int, message: str | None) -> FloyddError:
    """Return the floydd error for a status that aiohttp's request handler sends itself: 400, 504 or 500."""
    if status == 400:
        return InvalidRequest(f"invalid HTTP request: {message or 'malformed request'}")
    if status == 504:
        return GatewayTimeout("the request timed out")
    return FloyddError("internal error; see the daemon's log")


def build_front(runner: web.AppRunner, settings: ServerSettings) -> FrontServer:
    """Return the front for an aiohttp runner set up over floydd's app (floydd.app.build_app)."""
    server = runner.server
    assert server is not None, "runner.setup() must run first"
    app = runner.app
    return FrontServer(server, app[PROXY], app[QUEUES], app[METRICS], settings)


class FastRequest:
    """A bodyless request head parsed by httptools, with what the fast path needs from it."""

    __slots__ = (
        "method",
        "url",
        "job_id",
        "headers",
        "host",
        "request_id",
        "complete",
        "version",
        "keep_alive",
        "queue",
        "parser",
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.method = ""
        self.url = b""
        self.job_id = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = b""
        self.request_id = b""
        self.complete = False
        self.version = ""
        self.keep_alive = False
        self.queue: JobQueue | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read here: llhttp resets these once the message is complete.
        assert self.parser is not None
        self.version = self.parser.get_http_version()
        self.keep_alive = bool(self.parser.should_keep_alive())

    def on_message_complete(self) -> None:
        self.complete = True


class FrontConnection(asyncio.Protocol):
    """One client connection: fast-path requests one at a time, until it switches to aiohttp."""

    def __init__(self, server: FrontServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None
        # The request in flight when callbacks alone serve it (_Lane), instead of a task.
        self._lane: _Lane | None = None
        # Set while shutdown waits for the lane's request to end.
        self._lane_ended: asyncio.Future[None] | None = None
        # One timer serves both the keep-alive limit of an idle connection and the lane's response limit.
        # It moves only to a deadline earlier than the one it is set for, and a timer that fires before
        # the current deadline is set again. So a steady stream of requests makes no timer calls at all.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # When the connection closes if it stays idle. It is meaningful only while no request is in flight.
        self._idle_deadline = 0.0
        self._flow = WriteFlowControl()
        self._read_paused = False
        self._close_when_idle = False
        # Whether a byte of the current request's response has been written.
        self._response_started = False
        self.peer = b""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = str(peername[0]).encode("latin-1")
        self._start_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None and self._lane is None:
            self._next_request()
        elif len(self._buffer) > PIPELINE_BUFFER_BYTES and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._cancel_timer()
        # Like aiohttp's handler_cancellation: the request leaves the queue or breaks off the app's exchange.
        if self._task is not None:
            self._task.cancel()
        if self._lane is not None:
            self._lane.cancel()
            self._end_lane()
        self._flow.fail_drain(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    # Used by the fast-path relay

    @property
    def task(self) -> asyncio.Task[None]:
        """The task that serves the request in flight."""
        assert self._task is not None, "no request in flight"
        return self._task

    @property
    def closing(self) -> bool:
        """Whether the connection closes after the response in flight."""
        return self._close_when_idle or self._server.closing

    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self._response_started = True
        self._transport.write(data)

    async def drain(self) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        await self._flow.wait_writable()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def abort_if_busy(self) -> bool:
        """Abort the connection if its request is still in flight, and return whether it did.

        An idle connection is left to close by itself, since it may still be sending its last response.
        """
        if self._task is None and self._lane is None:
            return False
        self.abort()
        return True

    def close_when_idle(self) -> asyncio.Future[None] | None:
        """Close the connection now if no request is in flight, else after it; return what ends with the request."""
        if self._lane is not None:
            self._close_when_idle = True
            if self._lane_ended is None:
                self._lane_ended = self._loop.create_future()
            return self._lane_ended
        if self._task is None:
            if self._transport is not None:
                self._transport.close()
            return None
        self._close_when_idle = True
        return self._task

    # Requests

    def _next_request(self) -> None:
        buffer = self._buffer
        if not buffer:
            return
        if self._server.closing:
            # Like aiohttp's idle connections at shutdown: a request not yet started is not served.
            if self._transport is not None:
                self._transport.close()
            return
        end = buffer.find(b"\r\n\r\n", 0, FAST_HEAD_BYTES)
        if end < 0:
            # Wait for the rest of the head, unless it is too long for the fast path or uses bare LF line ends.
            if len(buffer) >= FAST_HEAD_BYTES or b"\n\n" in buffer:
                self._hand_off()
            return
        head = bytes(buffer[: end + 4])
        request = self._parse(head)
        if request is None:
            self._hand_off()
            return
        del buffer[: end + 4]
        self._response_started = False
        if not self._start_lane(request):
            self._task = self._loop.create_task(self._serve(request))

    def _start_lane(self, request: FastRequest) -> bool:
        """Serve the request from callbacks alone if it can go to the app at once; return whether it does."""
        queue = request.queue
        if queue is None or not queue.can_admit_now():
            return False
        pool = queue.pool
        assert pool is not None
        connection = pool.take(POOL_IDLE_TIMEOUT_S)
        if connection is None:
            return False
        lane = _Lane(self._server, self, request, queue, queue.admit_now(), connection, _outgoing(self, request))
        self._run_lane(lane, waited=False)
        return True

    def continue_in_lane(
        self, request: FastRequest, queue: JobQueue, admission: Admission, outgoing: _Outgoing
    ) -> bool:
        """Serve a request admitted after a wait from callbacks if a connection is ready, and return whether it did.

        A connection that is closing keeps the request in its task, which is what shutdown waits for.
        So does a client that has gone, because its task, cancelled by connection_lost, passes the
        slot on without sending the request to the app. The job has not ended: JobQueue.admit() raises
        instead of admitting a request of an ended job.
        """
        if self.closing or self._transport is None or self._transport.is_closing():
            return False
        connection = admission.pool.take(POOL_IDLE_TIMEOUT_S)
        if connection is None:
            return False
        # The waiting task has nothing left to do, and the lane may end before that task runs again.
        self._task = None
        self._run_lane(_Lane(self._server, self, request, queue, admission, connection, outgoing), waited=True)
        return True

    def _run_lane(self, lane: _Lane, *, waited: bool) -> None:
        self._lane = lane
        try:
            lane.start(waited=waited)
        except Exception:
            log.exception("proxy_request_crashed", path=lane.request.url.decode("latin-1"), method=lane.request.method)
            lane.cancel()
            self.fail_lane(lane)

    def _parse(self, head: bytes) -> FastRequest | None:
        """Return the request if the fast path may serve it, or None to hand the connection to aiohttp."""
        if not head.startswith((b"GET ", b"HEAD ", b"DELETE ", b"OPTIONS ")):
            return None

        request = FastRequest()
        parser = request.parser
        assert parser is not None
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # HttpParserUpgrade is not an HttpParserError (httptools 0.9): a WebSocket or h2c upgrade request.
            return None
        # The parser refers to the request and the request to the parser, so break the cycle.
        request.parser = None
        if not request.complete or request.version != "1.1":
            return None

        settings = self._server.settings
        if len(request.url) > settings.max_request_line_bytes or len(request.headers) > settings.max_headers:
            return None
        for name, value in request.headers:
            lowered = name.lower()
            if lowered in SLOW_PATH_HEADERS or len(name) + len(value) + 2 > settings.max_header_bytes:
                return None
            if lowered == b"host":
                if request.host:
                    # Two Host headers: RFC 9112 section 3.2 requires a 400, which aiohttp sends.
                    return None
                request.host = value
            elif lowered == b"x-request-id" and not request.request_id:
                request.request_id = value

        request.method = parser.get_method().decode("ascii")
        if not request.host or not self._routable(request):
            return None
        return request

    def _routable(self, request: FastRequest) -> bool:
        """Return True for `/expose/<id>[/...]` of a public serve job that has a queue, and note the job id."""
        url = request.url
        if not url.startswith(EXPOSE_PREFIX) or b"%" in url or b"#" in url:
            return False
        request.job_id = _job_id(url)
        queue = request.queue = self._server.queues.get(request.job_id)
        return queue is not None and queue.public

    async def _serve(self, request: FastRequest, lane: _Lane | None = None) -> None:
        try:
            if await serve_fast(self._server, self, request, lane):
                # A lane took the request over after its wait in the queue, and ends it.
                return
        except (asyncio.CancelledError, ConnectionResetError):
            # The client left; the exchange has been broken off.
            return
        except Exception:
            log.exception("proxy_request_crashed", path=request.url.decode("latin-1"), method=request.method)
            self._fail_internal(request)
            return
        finally:
            # A lane started from the queue's grant may have handed its request to a new task by now.
            if self._task is asyncio.current_task(self._loop):
                self._task = None
        self._request_done(request)

    def lane_handed_over(self, request: FastRequest, lane: _Lane) -> None:
        """Continue a lane's request in a task, which takes over the exchange with the app."""
        task = self._task = self._loop.create_task(self._serve(request, lane))
        # A task cancelled before its first step never runs serve_fast, which would release the slot.
        task.add_done_callback(lane.release_if_task_never_ran)
        self._end_lane(task)

    def lane_done(self, lane: _Lane) -> None:
        """End a lane's request once its response is written, as `_serve` ends a task's."""
        if self._flow.paused:
            # Like the task path, which awaits the drain: no next request until the client takes this response.
            self._task = self._loop.create_task(self._drain_then_done(lane))
            self._end_lane(self._task)
            return
        self._end_lane()
        self._request_done(lane.request)

    async def _drain_then_done(self, lane: _Lane) -> None:
        total_timeout_s = self._server.proxy.settings.total_timeout_s
        try:
            # The task path drains under proxy.total_timeout_s too, so a client that stops reading is cut off.
            async with asyncio.timeout(max(0.0, lane.sent_at + total_timeout_s - time.monotonic())):
                await self.drain()
        except ConnectionResetError:
            return
        except TimeoutError:
            error = GatewayTimeout(
                f"the client did not read the response within {total_timeout_s:g} s (proxy.total_timeout_s)",
                limit="total_timeout_s",
            )
            log_aborted(lane.request.job_id, lane.request_id, error)
            self.abort()
            return
        finally:
            self._task = None
        self._request_done(lane.request)

    def fail_lane(self, lane: _Lane) -> None:
        """End a lane that raised an unexpected exception, as `_serve` ends a crashed task."""
        if self._lane is lane:
            self._end_lane()
        self._fail_internal(lane.request)

    def _end_lane(self, successor: asyncio.Task[None] | None = None) -> None:
        """Forget the lane; a shutdown waiting for it waits for `successor` instead, if the request goes on there."""
        self._lane = None
        ended = self._lane_ended
        if ended is None:
            return
        self._lane_ended = None
        if successor is not None:
            successor.add_done_callback(lambda _: _resolve(ended))
        else:
            _resolve(ended)

    def _request_done(self, request: FastRequest) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self._close_when_idle or not request.keep_alive:
            self._transport.close()
            return
        self._start_idle_timer()
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        self._next_request()

    def _fail_internal(self, request: FastRequest) -> None:
        """Send a 500 and close, or abort a connection whose response has started: the one way to end it cleanly."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._response_started:
            transport.abort()
            return
        error = FloyddError("internal error; see the daemon's log")
        transport.write(error_response(error, new_request_id(), head_only=request.method == "HEAD", close=True))
        transport.close()

    def _hand_off(self) -> None:
        """Give the connection, with every byte read and not yet served, to a new aiohttp RequestHandler.

        A request line with an HTTP version other than 1.0 and 1.1 gets floydd's error instead, because
        aiohttp would serve it and repeat that version in its status line, which no client can read.
        """
        # NOTE: only the first request that reaches aiohttp is checked. A later one on the same
        # connection with another version is served by aiohttp as before.
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._cancel_timer()
        error = _version_error(self._buffer)
        if error is not None:
            log_rejected(self._server.rejection_log, self.peer.decode("latin-1"), error.detail)
            transport.write(error_response(error, new_request_id(), head_only=False, close=True))
            transport.close()
            return
        self._server.connections.discard(self)
        handler = self._server.new_handler(self._loop)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        pending = bytes(self._buffer)
        self._buffer.clear()
        self._transport = None
        if pending:
            handler.data_received(pending)

    def _start_idle_timer(self) -> None:
        # aiohttp's keep-alive timeout, which it also applies to a connection whose first head has not arrived.
        self._idle_deadline = time.monotonic() + self._server.settings.keepalive_timeout_s
        self.set_timer(self._idle_deadline)

    def set_timer(self, deadline: float) -> None:
        """Make the connection's timer fire no later than `deadline` (time.monotonic())."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        """Hand a lane past its deadline to a task, or close a connection idle past its keep-alive limit.

        A timer that fired before the current deadline is set again for it.
        """
        self._timer = None
        now = time.monotonic()
        lane = self._lane
        if lane is not None:
            if now < lane.deadline:
                self.set_timer(lane.deadline)
            else:
                lane.deadline_passed()
        elif self._task is None:
            if now < self._idle_deadline:
                self.set_timer(self._idle_deadline)
            elif self._transport is not None:
                self._transport.close()
        # A request served by a task applies its own limits, and the timer is set again when it ends.


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _version_error(buffer: bytearray) -> FloyddError | None:
    """Return the error for a first request line without HTTP/1.0 or HTTP/1.1, or None to let aiohttp parse it."""
    end = buffer.find(b"\n", 0, FAST_HEAD_BYTES)
    if end < 0:
        # Incomplete or longer than the fast path reads: aiohttp applies its line limit.
        return None
    parts = bytes(buffer[:end]).rstrip(b"\r").split(b" ")
    if len(parts) == 2:
        return InvalidRequest("the request line has no HTTP version; send HTTP/1.1")
    if len(parts) == 3 and HTTP_VERSION.fullmatch(parts[2]) and parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        version = parts[2].decode("ascii")
        return HttpVersionNotSupported(f"{version} is not supported on this port; send HTTP/1.1")
    return None


def _job_id(url: bytes) -> str:
    rest = url[len(EXPOSE_PREFIX) :]
    for separator in (b"/", b"?"):
        index = rest.find(separator)
        if index >= 0:
            rest = rest[:index]
    return rest.decode("latin-1")


def _upstream_target(url: bytes, job_id: str) -> bytes:
    """Return the target for the app: what follows `/expose/<id>`, query included, starting with `/`."""
    rest = url[len(EXPOSE_PREFIX) + len(job_id) :]
    return rest if rest.startswith(b"/") else b"/" + rest


async def serve_fast(
    server: FrontServer, client: FrontConnection, request: FastRequest, lane: _Lane | None = None
) -> bool:
    """Queue a fast-path request, relay the app's response, or send floydd's JSON error.

    With `lane`, the request has been admitted and sent to the app by a
    `_Lane`, and this call takes over the exchange where the lane left it.
    Returns True when the request, once admitted, went on in a new `_Lane`
    instead, which then ends it; False when this call has ended it.
    """
    job_id = request.job_id
    queue = server.queues.get(job_id) if lane is None else lane.queue
    proxy = server.proxy
    status = 0
    try:
        if lane is None:
            server.metrics.fast_path()
            request_id = _request_id(request)
            if queue is None:
                raise await proxy.not_serving(job_id)
            # Built before the request waits, so that its turn starts with the write to the app.
            outgoing = _outgoing(client, request, request_id)
            headers, target = outgoing.headers, outgoing.target

            def on_grant(granted: Admission) -> bool:
                if not client.continue_in_lane(request, queue, granted, outgoing):
                    return False
                server.metrics.admitted(job_id, granted.queued_s)
                return True

            slot = await queue.admit_or_hand_over(proxy.settings.queue_timeout_s, on_grant)
            if slot is None:
                # A lane took the slot when it was granted, and serves the request now.
                return True
            admission = slot
            try:
                server.metrics.admitted(job_id, admission.queued_s)
                if client.continue_in_lane(request, queue, admission, outgoing):
                    return True
            except BaseException:
                queue.release(admission)
                raise
            sent, sent_at = None, None
        else:
            lane.task_started = True
            request_id, headers, target = lane.request_id, lane.headers, lane.target
            admission, sent, sent_at = lane.admission, lane.connection, lane.sent_at
        assert queue is not None
        relay = _FastRelay(client, request, job_id, request_id)
        try:
            await proxy.exchange(
                relay, admission, job_id, request.method, target, headers, None, None, client.task, sent, sent_at
            )
            status = relay.status
        finally:
            queue.release(admission)
    except FloyddError as exc:
        proxy.log_failure(exc, job_id, request_id)
        client.write(error_response(exc, request_id, head_only=request.method == "HEAD", close=not request.keep_alive))
        status = exc.status
        if queue is not None:
            server.metrics.rejected(job_id, exc)
        else:
            server.metrics.unrouted(exc)
    if queue is not None and status:
        server.metrics.answered(job_id, status)
    return False


def _request_id(request: FastRequest) -> str:
    """Return the client's X-Request-ID, or a new id when it sent none."""
    return request.request_id.decode("latin-1") if request.request_id else new_request_id()


class _Outgoing(NamedTuple):
    """The parts of a fast-path request that floydd sends the app, besides the method."""

    request_id: str
    headers: list[tuple[bytes, bytes]]
    target: bytes


def _outgoing(client: FrontConnection, request: FastRequest, request_id: str | None = None) -> _Outgoing:
    """Build the request id, end-to-end headers and target sent to the app; `request_id` if already chosen."""
    if request_id is None:
        request_id = _request_id(request)
    headers = upstream_headers(
        request.headers,
        peer=client.peer,
        host=request.host,
        scheme=b"http",
        job_id=request.job_id,
        request_id=request_id,
    )
    return _Outgoing(request_id, headers, _upstream_target(request.url, request.job_id))


class _Lane:
    """One fast-path request served from callbacks alone, without a task, while all goes as usual.

    A task per request, with its awaits and the wake-ups between them, adds
    CPU time to every request (docs/benchmarks.md). A lane starts once
    the request has a slot, at once or after its wait in the queue, and
    the pool has a ready connection. It writes the request at once and
    sends the response from the app connection's read callback once a
    small response is complete. Anything
    else (a large or streamed body, a closed or broken connection, a timer,
    the job's end) hands the exchange to a task running `serve_fast`,
    which handles it exactly as if it had sent the request itself.
    """

    __slots__ = (
        "server",
        "client",
        "request",
        "queue",
        "admission",
        "connection",
        "message",
        "request_id",
        "headers",
        "target",
        "sent_at",
        "deadline",
        "head",
        "bodyless",
        "ended",
        "task_started",
    )

    def __init__(
        self,
        server: FrontServer,
        client: FrontConnection,
        request: FastRequest,
        queue: JobQueue,
        admission: Admission,
        connection: AppConnection,
        outgoing: _Outgoing,
    ) -> None:
        self.server = server
        self.client = client
        self.request = request
        self.queue = queue
        self.admission = admission
        self.connection = connection
        self.request_id, self.headers, self.target = outgoing
        self.message = connection.begin()
        self.sent_at = 0.0
        # When the lane hands the exchange to a task, which applies proxy.response_timeout_s and total_timeout_s.
        self.deadline = 0.0
        # The response head for the client, once the app's head has arrived and the body is small.
        self.head = b""
        # Whether the response has no body for the client: HEAD, 204, 304.
        self.bodyless = False
        # Set once the lane has sent the response, handed over or been cancelled.
        self.ended = False
        # Set by serve_fast when the task that takes over the exchange starts.
        self.task_started = False

    def start(self, *, waited: bool) -> None:
        """Send the request to the app. `waited` is False for a request that has not been counted yet."""
        server = self.server
        request = self.request
        connection = self.connection
        connection.listener = self._on_app_event
        self.sent_at = time.monotonic()
        connection.write(request_head(request.method, self.target, self.headers, False, None))
        self.admission.pool.open_spare()
        settings = server.proxy.settings
        # One deadline serves both limits, and the task that takes over applies each exactly.
        self.deadline = self.sent_at + min(settings.response_timeout_s, settings.total_timeout_s)
        self.client.set_timer(self.deadline)
        self.admission.on_job_end(self._on_job_end)
        if not waited:
            # serve_fast counts a request that waited in the queue when it arrives and when it is admitted.
            server.metrics.fast_path()
            server.metrics.admitted(request.job_id, 0.0)

    def release_if_task_never_ran(self, task: asyncio.Task[None]) -> None:
        """Give back the slot and the connection of a hand-over whose task never ran serve_fast."""
        if not self.task_started:
            self._abandon()

    def cancel(self) -> None:
        """Break off the exchange because the client left or the lane failed."""
        if self.ended:
            return
        self._detach()
        self._abandon()

    def _abandon(self) -> None:
        """Release the slot, which stays busy while the app may still work on the request (ConnectionPool.abandon)."""
        deadline = self.sent_at + self.server.proxy.settings.response_timeout_s
        self.admission.pool.abandon(self.connection, deadline)
        self.queue.release(self.admission)

    def _on_app_event(self) -> None:
        self._run(self._advance)

    def deadline_passed(self) -> None:
        # The client's timer may outlive a lane that a vanished client ended, until connection_lost runs.
        if not self.ended:
            self._run(self._hand_over)

    def _on_job_end(self) -> None:
        self._run(self._job_ended)

    def _run(self, step: Callable[[], None]) -> None:
        """Run one step from a callback. On an error, free the slot and respond as a crashed task would."""
        try:
            step()
        except ConnectionResetError:
            # The client closed its connection, and connection_lost has not run yet.
            self.cancel()
        except Exception:
            log.exception("proxy_request_crashed", path=self.request.url.decode("latin-1"), method=self.request.method)
            self.cancel()
            self.client.fail_lane(self)

    def _advance(self) -> None:
        """Act on what the app connection now contains: wait, send the response, or hand over to a task."""
        connection = self.connection
        message = self.message
        if connection.error is not None or message.upgrade:
            self._hand_over()
            return
        if not message.headers_complete:
            if connection.eof:
                self._hand_over()
            return
        if not self.head and not self._prepare_head():
            self._hand_over()
            return
        if self.bodyless:
            if self.request.method == "HEAD":
                # The parser cannot know the request was HEAD, so it may wait for a body that never comes.
                # Bytes that came anyway keep the connection from being reused, as on the task path.
                message.complete = not message.body
            self._finish()
        elif message.complete:
            self._finish()
        elif connection.eof:
            self._hand_over()

    def _prepare_head(self) -> bool:
        """Build the client's response head; return False if the body is not small enough to hold back."""
        message = self.message
        request = self.request
        timing = server_timing(self.admission.queued_s, message.head_at - self.sent_at)
        close = self.client.closing or not request.keep_alive
        head, framing, length = response_head(
            message.status, message.reason, message.headers, request.method, self.request_id, timing, close=close
        )
        if not coalesced(framing, length):
            return False
        self.head = head
        self.bodyless = framing == "empty"
        return True

    def _finish(self) -> None:
        message = self.message
        if self.bodyless:
            response = self.head
        else:
            response = b"".join([self.head, *message.body])
            message.body = []
        if self.queue.depth:
            # A request waits, so the slot goes to it before this response goes out, and the app gets
            # its next request without waiting for the write to the client. A client that has gone
            # makes the write raise ConnectionResetError, and the lane has ended, so nothing is left to undo.
            self._end_exchange()
            self.client.write(response)
        else:
            # Nothing waits, so the response goes out first. A write that raises ConnectionResetError
            # cancels the lane, which frees the slot and the connection.
            self.client.write(response)
            self._end_exchange()
        metrics = self.server.metrics
        job_id = self.request.job_id
        metrics.app_started(job_id, message.head_at - self.sent_at)
        metrics.answered(job_id, message.status)
        self.client.lane_done(self)

    def _end_exchange(self) -> None:
        """Give the app connection back to the pool, or close it, and release the slot."""
        self._detach()
        self.admission.pool.finish(self.connection, self.message)
        self.queue.release(self.admission)

    def _hand_over(self) -> None:
        self._detach()
        self.client.lane_handed_over(self.request, self)

    def _job_ended(self) -> None:
        # The task that takes over responds with the job's final state, as for a request it sent itself.
        self.connection.abort()
        self._hand_over()

    def _detach(self) -> None:
        self.ended = True
        self.connection.listener = None
        self.admission.on_job_end(None)


class _FastRelay:
    """The relay of a fast-path request: writes the response head and body as raw bytes."""

    def __init__(self, client: FrontConnection, request: FastRequest, job_id: str, request_id: str) -> None:
        self._client = client
        self._request = request
        self._job_id = job_id
        self.request_id = request_id
        self.status = 0
        self.timed_out = False
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def time_out(self, task: asyncio.Task[object]) -> None:
        self.timed_out = True
        task.cancel()

    async def send(self, upstream: UpstreamResponse, queued_s: float, app_s: float) -> None:
        request = self._request
        client = self._client
        timing = server_timing(queued_s, app_s)
        close = client.closing or not request.keep_alive
        head, framing, length = response_head(
            upstream.status,
            upstream.reason.encode("latin-1"),
            upstream.headers,
            request.method,
            self.request_id,
            timing,
            close=close,
        )
        self.status = upstream.status
        if coalesced(framing, length):
            # A small body of known length: the whole response goes out in one write once it has arrived.
            body = [chunk async for chunk in upstream.iter_body()]
            self._started = True
            client.write(b"".join([head, *body]))
            await client.drain()
            return
        # Anything else streams as the app writes it, like a server-sent event stream.
        self._started = True
        client.write(head)
        chunked = framing == "chunked"
        async for chunk in upstream.iter_body():
            if not chunk:
                continue
            client.write(b"".join((b"%x\r\n" % len(chunk), chunk, b"\r\n")) if chunked else chunk)
            await client.drain()
        if chunked:
            client.write(b"0\r\n\r\n")
        await client.drain()

    def fail(self, error: FloyddError) -> None:
        if not self._started:
            raise error
        log_aborted(self._job_id, self.request_id, error)
        self._client.abort()


def coalesced(framing: str, length: int | None) -> bool:
    """Return whether a response goes out in one write once complete: no body, or a small one of known length."""
    return framing == "empty" or (framing == "length" and length is not None and length <= COALESCE_BYTES)


def response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    method: str,
    request_id: str,
    timing: str,
    *,
    close: bool,
) -> tuple[bytes, str, int | None]:
    """Return the head sent to the client, its framing ("length", "chunked" or "empty") and its Content-Length.

    It keeps what aiohttp would send for the same response, so both paths
    look alike: the app's end-to-end headers in order, plus `Date`, `Server`
    and a default `Content-Type` when the app sent none. Header values pass
    as the app sent them because llhttp has already rejected a value with a
    bare CR or LF, obsolete line folding or NUL.
    """
    phrase = reason or _reason_phrase(status).encode("latin-1")
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
    end_to_end, content_length = response_end_to_end(headers)
    seen: set[bytes] = set()
    for name, value in end_to_end:
        seen.add(name.lower())
        lines += (name, b": ", value, b"\r\n")

    empty = method == "HEAD" or status in (204, 304) or status < 200
    if empty:
        framing = "empty"
        # As aiohttp does: a HEAD or 304 response keeps the length of the body it stands for, 204 and 1xx do not.
        if content_length is not None and status != 204 and status >= 200:
            lines.append(b"Content-Length: %d\r\n" % content_length)
    elif content_length is not None:
        framing = "length"
        lines.append(b"Content-Length: %d\r\n" % content_length)
    else:
        framing = "chunked"
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not empty and content_length != 0 and b"content-type" not in seen:
        lines.append(b"Content-Type: application/octet-stream\r\n")
    if b"date" not in seen:
        lines += (b"Date: ", http_date(), b"\r\n")
    if b"server" not in seen:
        lines += (b"Server: ", SERVER_HEADER, b"\r\n")
    if close:
        lines.append(b"Connection: close\r\n")
    lines += (b"X-Request-ID: ", request_id.encode("latin-1"), b"\r\n")
    lines += (b"Server-Timing: ", timing.encode("latin-1"), b"\r\n\r\n")
    return b"".join(lines), framing, content_length


def error_response(error: FloyddError, request_id: str, *, head_only: bool, close: bool) -> bytes:
    """Return floydd's JSON error response, as the aiohttp path sends it."""
    body = json.dumps(error.to_json()).encode()
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (error.status, _reason_phrase(error.status).encode("latin-1")),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    for name, value in error.headers.items():
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    lines += (
        b"Date: ",
        http_date(),
        b"\r\nServer: ",
        SERVER_HEADER,
        b"\r\nX-Request-ID: ",
        request_id.encode("latin-1"),
        b"\r\n\r\n",
    )
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


_date_second = 0
_date_value = b""


def http_date() -> bytes:
    """Return the current time as an HTTP date, formatted once per second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_value = email.utils.formatdate(now, usegmt=True).encode("ascii")
    return _date_value

"""The `/expose/<id>` reverse proxy: queue each request, then stream it to the app.

Requests for one job wait in that job's FIFO queue (floydd.queue) and reach
the app `concurrency` at a time (one by default). Bodies stream in both
directions in chunks, so memory does not grow with their size. Hop-by-hop
headers (RFC 9110, section 7.6.1, plus those that `Connection` names) are
dropped both ways; every other header passes unchanged and in order.
docs/proxy.md describes the contract that clients see.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import web
from multidict import CIMultiDict

from floydd.auth import AUTHENTICATOR
from floydd.config import ProxySettings
from floydd.errors import (
    BadGateway,
    FloyddError,
    GatewayTimeout,
    JobNotFound,
    JobNotServing,
    PayloadTooLarge,
    ServiceUnavailable,
)
from floydd.log import LogThrottle
from floydd.metrics import ProxyMetrics
from floydd.queue import Admission, JobQueue, QueueRegistry
from floydd.request_body import RequestBody, read_chunked_body, stream_body
from floydd.store import JobStore
from floydd.tunnel import is_websocket_upgrade, tunnel_websocket
from floydd.upstream import AppConnection, UpstreamBroken, UpstreamResponse, send_request

log = structlog.get_logger(__name__)

# The maximum number of rejection-log throttles kept, one per job and error code.
MAX_REJECTION_LOGS = 1024

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set again from what is really sent, so never copied: the framing, `Expect`
# (answered by floydd itself), and the headers floydd adds for the app.
REQUEST_DROP = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-prefix",
    b"x-request-id",
}

# How long a request whose app connection broke waits for the supervisor to
# record that the job ended, so the 502 can say why (out of memory, exit code).
JOB_END_WAIT_S = 3.0


class JobEnded(BadGateway):
    """The job ended while the app handled the request."""

    code = "job_ended"


class ExpectationFailed(FloyddError):
    status = 417
    code = "expectation_failed"


# Request ids are a random prefix per daemon start and a counter: unique like
# a UUID4, without reading the system's random source on every request.
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_numbers = itertools.count(1)


def new_request_id() -> str:
    """Return a new request id of 32 hex digits."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers):016x}"


def upstream_target(raw_path: str, job_id: str) -> bytes:
    """Return the request target for the app: the raw path after `/expose/<id>`, query included."""
    prefix = f"/expose/{job_id}"
    rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else ""
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest.encode("latin-1")


def upstream_headers(
    raw_headers: Iterable[tuple[bytes, bytes]],
    *,
    peer: bytes,
    host: bytes,
    scheme: bytes,
    job_id: str,
    request_id: str,
) -> list[tuple[bytes, bytes]]:
    """Return the headers sent to the app: the client's end-to-end ones, then those floydd sets."""
    headers = []
    prior = []
    named: set[bytes] = set()
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered not in REQUEST_DROP:
            headers.append((name, value))
        elif lowered == b"x-forwarded-for":
            prior.append(value)
        elif lowered == b"connection":
            named.update(connection_tokens(value))
    if named:
        headers = [(name, value) for name, value in headers if name.lower() not in named]
    headers += (
        (b"Host", host),
        (b"X-Forwarded-For", b", ".join([*prior, peer]) if prior else peer),
        (b"X-Forwarded-Proto", scheme),
        (b"X-Forwarded-Host", host),
        (b"X-Forwarded-Prefix", b"/expose/" + job_id.encode("latin-1")),
        (b"X-Request-ID", request_id.encode("latin-1")),
    )
    return headers


def _current_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None, "called outside a task"
    return task


def _request_upstream_headers(request: web.Request, job_id: str, request_id: str) -> list[tuple[bytes, bytes]]:
    return upstream_headers(
        request.raw_headers,
        peer=(request.remote or "").encode("latin-1"),
        host=(request.host or "").encode("latin-1"),
        scheme=request.scheme.encode("latin-1"),
        job_id=job_id,
        request_id=request_id,
    )


# Connection options that name no header to drop. The HTTP field name registry reserves "Close"
# so that no header clashes with the close option, and Keep-Alive is hop-by-hop anyway.
# Werkzeug sends "close" with every response, so skipping it saves a second pass over the headers.
CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})


def connection_tokens(value: bytes) -> list[bytes]:
    """Return the header names, lowercased, that a `Connection` header value marks as hop-by-hop."""
    lowered = value.lower()
    if lowered in CONNECTION_OPTIONS:
        return []
    return [
        token for token in (part.strip() for part in lowered.split(b",")) if token and token not in CONNECTION_OPTIONS
    ]


async def no_automatic_continue(request: web.Request) -> None:
    """Keep aiohttp from sending `100 Continue` before floydd has checked the request."""


class Proxy:
    def __init__(
        self, settings: ProxySettings, queues: QueueRegistry, store: JobStore, metrics: ProxyMetrics, spool_dir: Path
    ) -> None:
        self._settings = settings
        self._queues = queues
        self._store = store
        self._metrics = metrics
        self._spool_dir = spool_dir
        # One throttle per job and error code, so one busy job's rejections do not hide another's.
        self._rejection_logs: dict[tuple[str, str], LogThrottle] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        request_id = request.headers.get("X-Request-ID") or new_request_id()
        queue = self._queues.get(job_id)
        try:
            # A private job admits only its owner's or an admin's token; floydd tokens are never forwarded.
            request = await request.app[AUTHENTICATOR].authorize_expose(request, job_id)
            if queue is None:
                raise await self.not_serving(job_id)
            if is_websocket_upgrade(request):
                return await self._tunnel(request, queue, job_id, request_id)
            response = await self._proxy(request, queue, job_id, request_id)
        except FloyddError as exc:
            response = await self._error_response(request, exc, job_id, request_id)
            if queue is not None:
                self._metrics.rejected(job_id, exc)
            else:
                self._metrics.unrouted(exc)
        if queue is not None:
            self._metrics.answered(job_id, response.status)
        return response

    @property
    def settings(self) -> ProxySettings:
        return self._settings

    def log_failure(self, error: FloyddError, job_id: str, request_id: str) -> None:
        """Log an error response that is floydd's or the app's fault (5xx).

        Requests turned away because a job is busy or not serving come in bursts
        that any client can cause, so they get one line per job, code and interval.
        The metrics count each one.
        """
        if error.status < 500:
            return
        fields: dict[str, object] = {}
        if isinstance(error, ServiceUnavailable):
            not_logged = self._rejection_log(job_id, error.code).allow()
            if not_logged is None:
                return
            fields["not_logged_before"] = not_logged
        log.warning(
            "proxy_request_failed",
            job_id=job_id,
            request_id=request_id,
            status=error.status,
            error=error.code,
            detail=error.detail,
            **fields,
        )

    def _rejection_log(self, job_id: str, code: str) -> LogThrottle:
        throttle = self._rejection_logs.get((job_id, code))
        if throttle is None:
            if len(self._rejection_logs) >= MAX_REJECTION_LOGS:
                # Ended jobs' throttles are not needed any more; starting over costs at most one line per job.
                self._rejection_logs.clear()
            throttle = self._rejection_logs[(job_id, code)] = LogThrottle()
        return throttle

    async def not_serving(self, job_id: str) -> FloyddError:
        """Return the error for a job without a queue: unknown, or ended."""
        job = await self._store.get(job_id)
        if job is None:
            return JobNotFound(f"no job with id {job_id}")
        reason = f" ({job.reason})" if job.reason else ""
        return JobNotServing(
            f"job {job_id} is {job.state.value}{reason}, not serving", state=job.state.value, reason=job.reason
        )

    async def _error_response(
        self, request: web.Request, exc: FloyddError, job_id: str, request_id: str
    ) -> web.StreamResponse:
        self.log_failure(exc, job_id, request_id)
        response = web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
        response.headers["X-Request-ID"] = request_id
        if not request.content.is_eof():
            # The body was not read; draining an unwanted (maybe huge) body costs more than a new connection.
            # After a malformed body aiohttp keeps the connection open despite force_close, so close it here.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
        return response

    async def _proxy(self, request: web.Request, queue: JobQueue, job_id: str, request_id: str) -> web.StreamResponse:
        expects_continue = _expects_continue(request)
        body = await self._request_body(request, expects_continue)
        try:
            admission = await queue.admit(self._settings.queue_timeout_s)
            try:
                self._metrics.admitted(job_id, admission.queued_s)
                if expects_continue and not body.buffered:
                    await _send_continue(request)
                relay = _Relay(request, job_id, request_id)
                headers = _request_upstream_headers(request, job_id, request_id)
                await self.exchange(
                    relay,
                    admission,
                    job_id,
                    request.method,
                    upstream_target(request.raw_path, job_id),
                    headers,
                    body.chunks(),
                    body.length,
                    _current_task(),
                )
                return relay.response
            finally:
                queue.release(admission)
        finally:
            body.close()

    async def _request_body(self, request: web.Request, expects_continue: bool) -> RequestBody:
        """Check the body's size and framing before the request is queued.

        A chunked body is read whole first (memory, then a temporary file), so
        the app gets a Content-Length and a malformed body never reaches it.
        """
        limit = self._settings.max_request_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(
                f"the request body of {length} bytes is over the limit of {limit} bytes (proxy.max_request_body_bytes)",
                max_request_body_bytes=limit,
            )
        if not request.body_exists:
            return stream_body(request, None)
        if length is not None:
            return stream_body(request, length)
        if expects_continue:
            await _send_continue(request)
        return await read_chunked_body(
            request,
            limit,
            self._settings.request_buffer_bytes,
            self._spool_dir,
            self._settings.request_body_timeout_s,
        )

    async def exchange(
        self,
        relay: Relay,
        admission: Admission,
        job_id: str,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
        content_length: int | None,
        task: asyncio.Task[Any],
        sent: AppConnection | None = None,
        sent_at: float | None = None,
    ) -> None:
        """Send an admitted request to the app and relay its response to the client.

        `task` is the task that runs this call. Raises FloyddError when no byte
        of a response has reached the client yet; later failures abort the
        client's connection instead. `sent` and `sent_at` take over an
        exchange already begun on that connection (floydd.upstream.send_request).
        """
        if admission.ended is not None:
            # The job ended before this task took over the exchange.
            if sent is not None:
                sent.abort()
            relay.fail(_job_ended(job_id, admission.ended))
            return
        # The supervisor closes the queue when the job ends; cancelling breaks off whatever this request awaits.
        admission.on_job_end(task.cancel)
        started = time.monotonic() if sent_at is None else sent_at
        # A timer that cancels the task, not asyncio.timeout(), which costs more on every request.
        total_timer = admission.pool.loop.call_later(
            max(0.0, started + self._settings.total_timeout_s - time.monotonic()), relay.time_out, task
        )
        upstream: UpstreamResponse | None = None
        try:
            upstream = await send_request(
                admission.pool,
                method,
                target,
                headers,
                body,
                content_length=content_length,
                response_timeout_s=self._settings.response_timeout_s,
                sent=sent,
                sent_at=sent_at,
            )
            app_s = upstream.head_at - started
            self._metrics.app_started(job_id, app_s)
            await relay.send(upstream, admission.queued_s, app_s)
        except asyncio.CancelledError:
            if relay.timed_out:
                task.uncancel()
                relay.fail(
                    GatewayTimeout(
                        f"the app did not finish its response within {self._settings.total_timeout_s:g} s "
                        "(proxy.total_timeout_s)",
                        limit="total_timeout_s",
                    )
                )
                return
            if admission.ended is None:
                raise
            task.uncancel()
            relay.fail(_job_ended(job_id, admission.ended))
        except ConnectionResetError:
            # The client closed its connection mid-response (aiohttp raises
            # ClientConnectionResetError, a ConnectionResetError). Nothing is
            # left to answer, and it is not a fault of floydd or of the app.
            log.debug("proxy_client_disconnected", job_id=job_id, request_id=relay.request_id)
        except BadGateway as exc:
            if isinstance(exc, UpstreamBroken) or relay.started:
                relay.fail(exc)
                return
            total_timer.cancel()
            # The job's end is what this request now waits for, so it must not cancel the wait.
            admission.on_job_end(None)
            ended = await admission.wait_ended(JOB_END_WAIT_S)
            if ended is not None:
                raise _job_ended(job_id, ended) from exc
            raise
        finally:
            total_timer.cancel()
            admission.on_job_end(None)
            if upstream is not None:
                await upstream.close()

    async def _tunnel(self, request: web.Request, queue: JobQueue, job_id: str, request_id: str) -> web.StreamResponse:
        pool = await queue.wait_open(self._settings.queue_timeout_s)
        headers = _request_upstream_headers(request, job_id, request_id)
        return await tunnel_websocket(
            request,
            pool,
            upstream_target(request.raw_path, job_id),
            headers,
            response_timeout_s=self._settings.response_timeout_s,
            request_id=request_id,
            job_id=job_id,
        )


class Relay(Protocol):
    """The client side of one exchange: sends the app's response, or fails it cleanly."""

    request_id: str
    timed_out: bool

    @property
    def started(self) -> bool:
        """Whether any byte of the response has gone to the client."""

    def time_out(self, task: asyncio.Task[object]) -> None:
        """Break off the exchange at proxy.total_timeout_s."""

    async def send(self, upstream: UpstreamResponse, queued_s: float, app_s: float) -> None:
        """Send the app's response, streaming its body."""

    def fail(self, error: FloyddError) -> None:
        """Raise `error` if the response has not started, else abort the client's connection."""


class _Relay:
    """The relay of a request that aiohttp parsed: the response is an aiohttp StreamResponse."""

    def __init__(self, request: web.Request, job_id: str, request_id: str) -> None:
        self._request = request
        self._job_id = job_id
        self.request_id = request_id
        self._response: web.StreamResponse | None = None
        self.timed_out = False

    @property
    def response(self) -> web.StreamResponse:
        if self._response is None:
            self._response = web.StreamResponse()
        return self._response

    @property
    def started(self) -> bool:
        return self._response is not None and self._response.prepared

    def time_out(self, task: asyncio.Task[object]) -> None:
        """Break off the exchange at proxy.total_timeout_s."""
        self.timed_out = True
        task.cancel()

    async def send(self, upstream: UpstreamResponse, queued_s: float, app_s: float) -> None:
        headers = _response_headers(upstream.headers)
        headers.append(("X-Request-ID", self.request_id))
        headers.append(("Server-Timing", server_timing(queued_s, app_s)))
        response = self._response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason or None, headers=CIMultiDict(headers)
        )
        await response.prepare(self._request)
        async for chunk in upstream.iter_body():
            await response.write(chunk)
        await response.write_eof()

    def fail(self, error: FloyddError) -> None:
        if not self.started:
            raise error
        log_aborted(self._job_id, self.request_id, error)
        transport = self._request.transport
        if transport is not None:
            transport.abort()


def log_aborted(job_id: str, request_id: str, error: FloyddError) -> None:
    """Log a response cut off after it started.

    An aborted connection is what tells the client that a response it has
    begun to receive is incomplete; a clean end would look complete.
    """
    log.warning("proxy_response_aborted", job_id=job_id, request_id=request_id, error=error.code, detail=error.detail)


def server_timing(queued_s: float, app_s: float) -> str:
    """Return the `Server-Timing` value: time queued and time until the app started its response, in ms."""
    return f"queue;dur={queued_s * 1000:.1f}, app;dur={app_s * 1000:.1f}"


def response_end_to_end(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """Split the app's response headers into the end-to-end ones, in order, and the Content-Length.

    Both relays set the framing themselves from the Content-Length, which
    llhttp has checked is a number. It is dropped, like any other header,
    when `Connection` names it.
    """
    end_to_end = []
    named: set[bytes] = set()
    content_length = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            content_length = int(value)
        elif lowered not in HOP_BY_HOP:
            end_to_end.append((name, value))
        elif lowered == b"connection":
            named.update(connection_tokens(value))
    if named:
        end_to_end = [(name, value) for name, value in end_to_end if name.lower() not in named]
        if b"content-length" in named:
            content_length = None
    return end_to_end, content_length


def _response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Return the app's end-to-end response headers for aiohttp, with the Content-Length by which it frames the body."""
    end_to_end, content_length = response_end_to_end(headers)
    decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in end_to_end]
    if content_length is not None:
        decoded.append(("Content-Length", str(content_length)))
    return decoded


def _expects_continue(request: web.Request) -> bool:
    expect = request.headers.get("Expect")
    if expect is None:
        return False
    if expect.lower() != "100-continue":
        raise ExpectationFailed(f"unsupported Expect header {expect!r}: only 100-continue is supported")
    return request.version >= (1, 1) and request.body_exists


async def _send_continue(request: web.Request) -> None:
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim response is not part of the final response's size.
    request.writer.output_size = 0


def _job_ended(job_id: str, ended: FloyddError) -> JobEnded:
    state = ended.extra.get("state")
    reason = ended.extra.get("reason")
    why = f"{state} ({reason})" if reason else f"{state}"
    return JobEnded(
        f"job {job_id} ended while the app handled this request: {why}",
        state=state,
        reason=reason,
    )

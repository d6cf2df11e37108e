"""The `/expose/<id>` reverse proxy: queue each request, then stream it to the app.

Requests for one job wait in that job's FIFO queue (floydd.queue) and reach
the app one at a time. Bodies stream in both directions in chunks, so memory
does not grow with their size. Hop-by-hop headers (RFC 9110, section 7.6.1,
plus those that `Connection` names) are dropped both ways; every other header
passes unchanged and in order.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from floydd.auth import AUTHENTICATOR
from floydd.config import ProxySettings
from floydd.errors import FloyddError, JobNotFound, JobNotServing
from floydd.queue import Admission, QueueRegistry
from floydd.store import JobStore
from floydd.upstream import UpstreamBroken, UpstreamResponse, send_request

log = structlog.get_logger(__name__)

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
# Set again from what is really sent, so never copied.
_REQUEST_FRAMING = frozenset({b"content-length", b"expect", b"host"})
_RESPONSE_FRAMING = frozenset({b"content-length"})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix"})

BODY_CHUNK_BYTES = 256 * 1024


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Return the header names that `Connection` marks as hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(tokens)


def end_to_end(headers: list[tuple[bytes, bytes]], also_drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    drop = HOP_BY_HOP | connection_tokens(headers) | also_drop
    return [(name, value) for name, value in headers if name.lower() not in drop]


def upstream_target(raw_path: str, job_id: str) -> bytes:
    """Return the request target for the app: the raw path after `/expose/<id>`, query included."""
    prefix = f"/expose/{job_id}"
    rest = raw_path[len(prefix) :] if raw_path.startswith(prefix) else ""
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest.encode("latin-1")


class Proxy:
    def __init__(self, settings: ProxySettings, queues: QueueRegistry, store: JobStore) -> None:
        self._settings = settings
        self._queues = queues
        self._store = store

    async def handle(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        # A private job answers only its owner's or an admin's token, which is not forwarded.
        request = await request.app[AUTHENTICATOR].authorize_expose(request, job_id)
        queue = self._queues.get(job_id)
        if queue is None:
            raise await self._not_serving(job_id)
        request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        async with queue.slot(self._settings.queue_timeout_s) as admission:
            return await self._forward(request, job_id, admission, request_id)

    async def _not_serving(self, job_id: str) -> FloyddError:
        job = await self._store.get(job_id)
        if job is None:
            return JobNotFound(f"no job with id {job_id}")
        return JobNotServing(f"job {job_id} is {job.state.value}, not serving", state=job.state.value)

    async def _forward(
        self, request: web.Request, job_id: str, admission: Admission, request_id: str
    ) -> web.StreamResponse:
        started = time.monotonic()
        raw_headers = [(bytes(name), bytes(value)) for name, value in request.raw_headers]
        headers = end_to_end(raw_headers, _REQUEST_FRAMING | _FORWARDED)
        headers.extend(self._forwarded_headers(request, job_id, raw_headers, request_id))
        body, content_length = _request_body(request)
        response = await send_request(
            admission.upstream,
            request.method,
            upstream_target(request.raw_path, job_id),
            headers,
            body,
            content_length=content_length,
            response_timeout_s=self._settings.response_timeout_s,
        )
        try:
            app_s = time.monotonic() - started
            return await self._relay(request, response, admission, app_s, request_id, job_id)
        finally:
            await response.close()

    def _forwarded_headers(
        self, request: web.Request, job_id: str, raw_headers: list[tuple[bytes, bytes]], request_id: str
    ) -> list[tuple[bytes, bytes]]:
        peer = request.remote or ""
        prior = [value for name, value in raw_headers if name.lower() == b"x-forwarded-for"]
        forwarded_for = b", ".join([*prior, peer.encode("latin-1")]) if prior else peer.encode("latin-1")
        return [
            (b"Host", (request.host or "").encode("latin-1")),
            (b"X-Forwarded-For", forwarded_for),
            (b"X-Forwarded-Proto", request.scheme.encode("latin-1")),
            (b"X-Forwarded-Host", (request.host or "").encode("latin-1")),
            (b"X-Forwarded-Prefix", f"/expose/{job_id}".encode("latin-1")),
            (b"X-Request-ID", request_id.encode("latin-1")),
        ]

    async def _relay(
        self,
        request: web.Request,
        upstream: UpstreamResponse,
        admission: Admission,
        app_s: float,
        request_id: str,
        job_id: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
        content_length = None
        for name, value in end_to_end(upstream.headers, frozenset()):
            if name.lower() in _RESPONSE_FRAMING:
                content_length = int(value)
                continue
            response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
        response.headers["X-Request-ID"] = request_id
        response.headers.add("Server-Timing", f"queue;dur={admission.queued_s * 1000:.1f}, app;dur={app_s * 1000:.1f}")
        if content_length is not None:
            response.content_length = content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.iter_body():
                await response.write(chunk)
        except UpstreamBroken as exc:
            log.warning("proxy_upstream_broken", job_id=job_id, request_id=request_id, error=exc.detail)
            # Abort so the client sees a cut-off response, never one that looks complete.
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response


def _request_body(request: web.Request) -> tuple[AsyncIterator[bytes] | None, int | None]:
    """Return the request body as a stream, and its length when the client sent one."""
    if request.content_length is not None:
        if request.content_length == 0:
            return None, 0
        return _iter_content(request), request.content_length
    if request.body_exists:
        return _iter_content(request), None
    return None, None


async def _iter_content(request: web.Request) -> AsyncIterator[bytes]:
    while chunk := await request.content.read(BODY_CHUNK_BYTES):
        yield chunk

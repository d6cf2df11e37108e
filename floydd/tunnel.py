"""WebSocket pass-through: after the app's `101 Switching Protocols`, bytes flow both ways untouched.

A WebSocket can stay open for hours, so it does not take one of the job's
queue slots; it only waits until the app accepts connections. Frames are not
parsed: the two connections are spliced, with backpressure in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web

from floydd.upstream import ConnectionPool, send_upgrade

log = structlog.get_logger(__name__)

READ_BYTES = 64 * 1024
# Bytes buffered towards the app before floydd stops reading from the client.
HIGH_WATER_BYTES = 1024 * 1024


def is_websocket_upgrade(request: web.Request) -> bool:
    connection = request.headers.get("Connection", "").lower()
    return "upgrade" in connection and request.headers.get("Upgrade", "").lower() == "websocket"


class _ClientToApp:
    """Feeds what the client sends after the handshake to the app; aiohttp calls it as a payload parser."""

    def __init__(self, writer: asyncio.StreamWriter, client: asyncio.Transport) -> None:
        self._writer = writer
        self._client = client
        self.closed = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._writer.transport.is_closing():
            return True, b""
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > HIGH_WATER_BYTES:
            self._client.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_after_drain())
        return False, b""

    def feed_eof(self) -> None:
        if self._writer.can_write_eof() and not self._writer.transport.is_closing():
            self._writer.write_eof()
        self.closed.set()

    async def _resume_after_drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        if not self._client.is_closing():
            self._client.resume_reading()


async def tunnel_websocket(
    request: web.Request,
    pool: ConnectionPool,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    response_timeout_s: float,
    request_id: str,
    job_id: str,
) -> web.StreamResponse:
    """Send the upgrade request to the app; on 101, splice the connections until either side closes."""
    upgrade_headers = [*headers]
    for header in ("Upgrade", "Connection"):
        upgrade_headers.append((header.encode("latin-1"), request.headers[header].encode("latin-1")))
    upstream = await send_upgrade(pool, target, upgrade_headers, response_timeout_s=response_timeout_s)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason or None)
    for raw_name, raw_value in upstream.headers:
        response.headers.add(raw_name.decode("latin-1"), raw_value.decode("latin-1"))
    response.headers["X-Request-ID"] = request_id
    if upstream.status != 101:
        # The app turned the upgrade down; pass its answer on and close.
        response.force_close()
        body = b"".join([chunk async for chunk in upstream.iter_body()])
        await upstream.close()
        response.headers.popall("Transfer-Encoding", None)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    reader, writer, tail = upstream.detach()
    response.force_close()
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    client_to_app = _ClientToApp(writer, transport)
    request.protocol.set_parser(client_to_app)  # type: ignore[arg-type]
    log.info("websocket_opened", job_id=job_id, request_id=request_id)
    try:
        if tail:
            transport.write(tail)
        while data := await reader.read(READ_BYTES):
            if transport.is_closing():
                break
            transport.write(data)
            await request.writer.drain()
    finally:
        writer.transport.abort()
        log.info("websocket_closed", job_id=job_id, request_id=request_id)
    return response

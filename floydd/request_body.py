"""Request bodies on their way to the app: streamed as they arrive, or read whole first.

A body with a Content-Length streams to the app once the request holds its
slot. A chunked body is read whole before the request is queued, because
then a malformed chunk is rejected with 400 before anything reaches the app,
the app gets a Content-Length (which every WSGI server handles), and a slow
upload does not hold the job's only slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from floydd.errors import FloyddError, InvalidRequest, PayloadTooLarge

CHUNK_BYTES = 256 * 1024


class RequestBody:
    """A request body and its length; `buffered` when it was read before queueing."""

    def __init__(
        self,
        length: int | None,
        *,
        request: web.Request | None = None,
        memory: list[bytes] | None = None,
        spool: IO[bytes] | None = None,
    ) -> None:
        self.length = length
        self.buffered = request is None
        self._request = request
        self._memory = memory or []
        self._spool = spool

    def chunks(self) -> AsyncIterator[bytes] | None:
        """Return the body's chunks, or None when there is no body."""
        if not self.length:
            return None
        if self._request is not None:
            return _iter_request(self._request)
        return self._iter_buffered()

    async def _iter_buffered(self) -> AsyncIterator[bytes]:
        for chunk in self._memory:
            yield chunk
        if self._spool is not None:
            spool = self._spool
            await asyncio.to_thread(spool.seek, 0)
            while chunk := await asyncio.to_thread(spool.read, CHUNK_BYTES):
                yield chunk

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def stream_body(request: web.Request, length: int | None) -> RequestBody:
    """Return the body to stream after admission; `length` None means the request has none."""
    return RequestBody(length, request=request)


class RequestTimeout(FloyddError):
    status = 408
    code = "request_timeout"


async def read_chunked_body(
    request: web.Request, limit: int, memory_bytes: int, spool_dir: Path, idle_timeout_s: float
) -> RequestBody:
    """Read a chunked body whole: the first `memory_bytes` in memory, the rest in a temporary file.

    Raises PayloadTooLarge past `limit` bytes, InvalidRequest when the chunked
    framing is malformed, and RequestTimeout when no data arrives for `idle_timeout_s`.
    """
    memory: list[bytes] = []
    spool: IO[bytes] | None = None
    total = 0
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout_s):
                    chunk = await request.content.read(CHUNK_BYTES)
            except TimeoutError as exc:
                # NOTE: aiohttp (3.14) does not fail the body stream when a chunk
                # that arrives late is malformed, so such a body ends up here.
                raise RequestTimeout(
                    f"no request body data arrived for {idle_timeout_s:g} s (proxy.request_body_timeout_s)",
                    limit="request_body_timeout_s",
                ) from exc
            except HttpProcessingError as exc:
                raise InvalidRequest(f"malformed chunked request body: {exc.message}") from exc
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(
                    f"the request body is over the limit of {limit} bytes (proxy.max_request_body_bytes)",
                    max_request_body_bytes=limit,
                )
            if spool is None and total <= memory_bytes:
                memory.append(chunk)
                continue
            if spool is None:
                spool = await asyncio.to_thread(_open_spool, spool_dir)
            await asyncio.to_thread(spool.write, chunk)
    except BaseException:
        if spool is not None:
            with contextlib.suppress(OSError):
                spool.close()
        raise
    return RequestBody(total, memory=memory, spool=spool)


def _open_spool(spool_dir: Path) -> IO[bytes]:
    spool_dir.mkdir(parents=True, exist_ok=True)
    # Unnamed where the OS allows, so the file goes away even if floydd is killed.
    return tempfile.TemporaryFile(dir=spool_dir)


async def _iter_request(request: web.Request) -> AsyncIterator[bytes]:
    while chunk := await request.content.read(CHUNK_BYTES):
        yield chunk

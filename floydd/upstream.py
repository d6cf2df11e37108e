"""A lean HTTP/1.1 client for the one hop from floydd to a job's app.

It is built on asyncio streams and httptools (llhttp) instead of aiohttp's
client because the proxy needs the raw bytes: the request target passes
byte for byte, repeated headers keep their order, bodies are never decoded
or decompressed, and the response framing is known exactly, so a response
cut short by the app can be told from a complete one.

Each request uses its own connection and asks the app to close it
afterwards, which matches the Werkzeug development server (it closes every
connection anyway) and keeps a half-read connection from ever being reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools

from floydd.errors import BadGateway, GatewayTimeout
from floydd.queue import Upstream

READ_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 10.0


class UpstreamBroken(BadGateway):
    """The app broke off the exchange after the response had started."""


@dataclass
class _Message:
    """Parser callbacks collect the response here."""

    status: int = 0
    reason: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    headers_complete: bool = False
    complete: bool = False
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
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        sender: asyncio.Task[None] | None,
        bodyless: bool,
    ) -> None:
        self._message = message
        self._parser = parser
        self._reader = reader
        self._writer = writer
        self._sender = sender
        self._bodyless = bodyless
        self.status = message.status
        self.reason = bytes(message.reason).decode("latin-1")
        self.headers = list(message.headers)

    @property
    def framed(self) -> bool:
        """True when the body length is known from Content-Length or chunked encoding."""
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
        while True:
            if message.body:
                chunks, message.body = message.body, []
                for chunk in chunks:
                    yield chunk
            if message.complete:
                return
            data = await self._reader.read(READ_BYTES)
            if not data:
                if self.framed:
                    raise UpstreamBroken("the app closed the connection before the response body was complete")
                # No framing: the body ends with the connection (HTTP/1.0 style).
                return
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise UpstreamBroken(f"the app sent an invalid response body: {exc}") from exc

    async def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(BaseException):
                await self._sender
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await self._writer.wait_closed()


async def send_request(
    upstream: Upstream,
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
    """
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except (OSError, TimeoutError) as exc:
        raise BadGateway(
            f"the app is not accepting connections on port {upstream.port}: {exc or 'connect timed out'}",
        ) from exc

    head = _request_head(method, target, headers, body is not None, content_length)
    chunked = body is not None and content_length is None
    sender: asyncio.Task[None] | None = None
    try:
        writer.write(head)
        if body is not None:
            # The body goes out while the response is awaited, because an app
            # may answer (413, 400) before it has read the whole body.
            sender = asyncio.create_task(_send_body(writer, body, chunked=chunked))
        message = _Message()
        parser = httptools.HttpResponseParser(message)
        message.parser = parser
        async with asyncio.timeout(response_timeout_s):
            await _read_head(reader, parser, message, sender)
    except TimeoutError as exc:
        await _abandon(writer, sender)
        raise GatewayTimeout(
            f"the app did not start its response within {response_timeout_s:g} s (proxy.response_timeout_s)",
            limit="response_timeout_s",
        ) from exc
    except BaseException:
        await _abandon(writer, sender)
        raise
    bodyless = method == "HEAD" or message.status in (204, 304)
    return UpstreamResponse(message, parser, reader, writer, sender, bodyless)


def _request_head(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], has_body: bool, content_length: int | None
) -> bytes:
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in headers)
    if content_length is not None:
        lines.append(b"Content-Length: " + str(content_length).encode("ascii"))
    elif has_body:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _send_body(writer: asyncio.StreamWriter, body: AsyncIterator[bytes], *, chunked: bool) -> None:
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            else:
                writer.write(chunk)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        # The app stopped reading; its response, read elsewhere, says why.
        return


async def _read_head(
    reader: asyncio.StreamReader,
    parser: httptools.HttpResponseParser,
    message: _Message,
    sender: asyncio.Task[None] | None,
) -> None:
    while not message.headers_complete:
        data = await reader.read(READ_BYTES)
        if not data:
            raise BadGateway("the app closed the connection without sending a response")
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 101 upgrade; its head is complete and the rest belongs to the new protocol.
            message.headers_complete = True
        except httptools.HttpParserError as exc:
            raise BadGateway(f"the app sent an invalid HTTP response: {exc}") from exc
    if sender is not None and sender.done() and not sender.cancelled() and sender.exception() is not None:
        raise BadGateway(f"sending the request body to the app failed: {sender.exception()}")


async def _abandon(writer: asyncio.StreamWriter, sender: asyncio.Task[None] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
    writer.transport.abort()

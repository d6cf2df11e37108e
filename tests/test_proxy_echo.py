"""The proxy in front of the Flask echo app in a container, one serve job shared by the module."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import httptools
import pytest
import pytest_asyncio

from tests.conftest import (
    APPS,
    Daemon,
    admin_headers,
    remove_job_containers,
    start_daemon,
    submit_ok,
    wait_for_state,
)

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def echo(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> AsyncIterator[tuple[Daemon, str]]:
    daemon = await start_daemon(tmp_path_factory.mktemp("echo") / "state")
    try:
        async with aiohttp.ClientSession() as client:
            job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
            await wait_for_state(client, daemon, job["id"], {"serving"})
        yield daemon, job["endpoint"]
    finally:
        await daemon.stop()
        await remove_job_containers(daemon)


async def raw(endpoint: str, request: bytes) -> bytes:
    address = endpoint.removeprefix("http://").split("/", 1)[0]
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(30):
        data = await reader.read(-1)
    writer.close()
    return data


def path_of(endpoint: str) -> str:
    return "/" + endpoint.removeprefix("http://").split("/", 1)[1]


async def test_closing_app_many_clients(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    async with aiohttp.ClientSession() as client:

        async def worker(count: int) -> list[int]:
            statuses = []
            for _ in range(count):
                async with client.get(endpoint + "/") as response:
                    await response.read()
                    statuses.append(response.status)
            return statuses

        sequential = await worker(5)
        parallel = await asyncio.gather(*(worker(13) for _ in range(4)))
    assert sequential == [200] * 5
    assert [status for statuses in parallel for status in statuses] == [200] * 52


async def test_streamed_response_one_framing_header(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    data = await raw(endpoint, f"GET {path_of(endpoint)}/stream?lines=3&delay=0 HTTP/1.1\r\nHost: t\r\n"
                     "Connection: close\r\n\r\n".encode())  # fmt: skip
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    framing = [line for line in head.split(b"\r\n") if line.startswith((b"content-length", b"transfer-encoding"))]
    assert framing == [b"transfer-encoding: chunked"]
    assert b"keep-alive:" not in head
    assert data.endswith(b"0\r\n\r\n")


async def test_head_twice_on_one_connection(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    request = f"HEAD {path_of(endpoint)}/bytes/1234 HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    last = f"HEAD {path_of(endpoint)}/bytes/1234 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    data = await raw(endpoint, request + last)
    responses = data.split(b"\r\n\r\n")
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.count(b"Content-Length: 1234") == 2
    assert responses[-1] == b""


async def test_gzip_body_untouched(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    async with aiohttp.ClientSession(auto_decompress=False) as client, client.get(endpoint + "/gzip") as response:
        body = await response.read()
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(body)
    assert hashlib.sha256(gzip.decompress(body)).hexdigest() == response.headers["X-Uncompressed-SHA256"]


async def test_cookies_stay_separate(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    data = await raw(
        endpoint, f"GET {path_of(endpoint)}/cookies HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    )
    cookies = [line for line in data.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"set-cookie:")]
    assert len(cookies) == 3
    assert all(b"Expires=Thu, 01 Jan 2099 00:00:00 GMT" in cookie for cookie in cookies)


@pytest.mark.parametrize("tail", ["/f/a%2Fb/c+d%2B?q=1+2&r=%2F", "/trailing/", "", "/%E2%82%AC?x=%20"])
async def test_raw_path_reaches_app(echo: tuple[Daemon, str], tail: str) -> None:
    _, endpoint = echo
    data = await raw(
        endpoint, f"GET {path_of(endpoint)}{tail} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    )
    assert f'"uri":"{tail or "/"}"'.encode() in data.replace(b" ", b"")


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_request_body_reaches_app(echo: tuple[Daemon, str], chunked: bool) -> None:
    _, endpoint = echo
    payload = bytes(range(256)) * 4096
    async with aiohttp.ClientSession() as client:
        if chunked:

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(payload), 65536):
                    yield payload[start : start + 65536]

            data: object = chunks()
        else:
            data = payload
        async with client.post(endpoint + "/", data=data) as response:
            body = await response.json()
    assert body["body_length"] == 1048576
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()


async def test_forwarded_headers_seen(echo: tuple[Daemon, str]) -> None:
    _, endpoint = echo
    async with aiohttp.ClientSession() as client, client.get(endpoint + "/") as response:
        body = await response.json()
    headers = dict(body["headers"])
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Request-Id"] == response.headers["X-Request-ID"]


async def test_metrics_endpoint_lists_job(echo: tuple[Daemon, str]) -> None:
    daemon, endpoint = echo
    job_id = endpoint.rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as client:
        async with client.get(endpoint + "/") as response:
            await response.read()
        async with client.get(daemon.url + "/metrics", headers=admin_headers(daemon)) as response:
            text = await response.text()
    assert f'floydd_proxy_requests_total{{job_id="{job_id}",status_class="2xx"}}' in text
    assert 'floydd_jobs{state="serving"} 1.0' in text


async def fast_path_count(daemon: Daemon) -> float:
    async with (
        aiohttp.ClientSession(headers=admin_headers(daemon)) as client,
        client.get(f"{daemon.url}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("floydd_proxy_fast_path_requests_total "):
            return float(line.split()[1])
    raise AssertionError("floydd_proxy_fast_path_requests_total is missing from /metrics")


def parse_responses(data: bytes) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """Split raw bytes into (status, headers, de-chunked body) per response, with httptools."""
    responses: list[tuple[int, list[tuple[bytes, bytes]], bytes]] = []

    class Collector:
        headers: list[tuple[bytes, bytes]]
        body: bytearray

        def on_message_begin(self) -> None:
            self.headers, self.body = [], bytearray()

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            responses.append((parser.get_status_code(), self.headers, bytes(self.body)))

    parser = httptools.HttpResponseParser(Collector())
    parser.feed_data(data)
    return responses


# Headers that differ between any two responses.
PER_RESPONSE_HEADERS = {b"date", b"x-request-id", b"server-timing"}


@pytest.mark.parametrize(
    "tail",
    ["/bytes/1234", "/stream?lines=3&delay=0", "/cookies", "/gzip", "/status/204", "/status/404", "/print?msg=hi"],
)
async def test_fast_path_matches_aiohttp(echo: tuple[Daemon, str], tail: str) -> None:
    """A request that floydd parses itself gets the same response as one that aiohttp handles."""
    daemon, endpoint = echo
    request = f"GET {path_of(endpoint)}{tail} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    before = await fast_path_count(daemon)
    fast = parse_responses(await raw(endpoint, (request + "\r\n").encode()))
    # An Authorization header that is not a floydd token passes to the app, through aiohttp's parser.
    slow = parse_responses(await raw(endpoint, (request + "Authorization: Basic dTpw\r\n\r\n").encode()))
    after = await fast_path_count(daemon)
    assert after - before == 1
    assert len(fast) == len(slow) == 1
    (fast_status, fast_headers, fast_body), (slow_status, slow_headers, slow_body) = fast[0], slow[0]
    assert fast_status == slow_status
    assert fast_body == slow_body
    assert sorted(h for h in fast_headers if h[0] not in PER_RESPONSE_HEADERS) == sorted(
        h for h in slow_headers if h[0] not in PER_RESPONSE_HEADERS
    )
    for name in PER_RESPONSE_HEADERS:
        assert [h for h in fast_headers if h[0] == name], f"{name!r} missing from the fast path's response"


async def test_connection_switches_to_aiohttp(echo: tuple[Daemon, str]) -> None:
    """A keep-alive connection serves a GET itself, then hands a POST and what follows to aiohttp."""
    daemon, endpoint = echo
    path = path_of(endpoint)
    requests = (
        f"GET {path}/first HTTP/1.1\r\nHost: t\r\n\r\n"
        f"POST {path}/second HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        f"GET {path}/third HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    before = await fast_path_count(daemon)
    responses = parse_responses(await raw(endpoint, requests.encode()))
    after = await fast_path_count(daemon)
    assert [status for status, _, _ in responses] == [200, 200, 200]
    echoed = [json.loads(body) for _, _, body in responses]
    assert [item["uri"] for item in echoed] == ["/first", "/second", "/third"]
    assert echoed[1]["body_length"] == 5
    # Pipelined: the POST arrives while the first GET is in flight, so only the GET takes the fast path.
    assert after - before == 1


async def test_fast_path_pipelined_in_order(echo: tuple[Daemon, str]) -> None:
    daemon, endpoint = echo
    path = path_of(endpoint)
    requests = "".join(f"GET {path}/p{index} HTTP/1.1\r\nHost: t\r\n\r\n" for index in range(4))
    requests += f"GET {path}/p4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    before = await fast_path_count(daemon)
    responses = parse_responses(await raw(endpoint, requests.encode()))
    after = await fast_path_count(daemon)
    assert [json.loads(body)["uri"] for _, _, body in responses] == [f"/p{index}" for index in range(5)]
    assert after - before == 5


@pytest.mark.parametrize(
    "upgrade",
    [
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==",
        "Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
    ],
    ids=["websocket", "h2c"],
)
async def test_upgrade_request_goes_to_aiohttp(echo: tuple[Daemon, str], upgrade: str) -> None:
    """An upgrade request to a public job is handed to aiohttp, which passes on the app's refusal."""
    daemon, endpoint = echo
    before = await fast_path_count(daemon)
    data = await raw(endpoint, f"GET {path_of(endpoint)}/ws HTTP/1.1\r\nHost: t\r\n{upgrade}\r\n\r\n".encode())
    after = await fast_path_count(daemon)
    responses = parse_responses(data)
    assert len(responses) == 1
    status, headers, _ = responses[0]
    # The app does not switch protocols, and its own response comes back.
    assert status < 500
    assert [value for name, value in headers if name == b"server" and value.startswith(b"Werkzeug/")]
    assert [value for name, value in headers if name == b"x-request-id"]
    assert after == before


async def test_fast_path_streams_response(echo: tuple[Daemon, str]) -> None:
    """A chunked response reaches the client as the app writes it, not once it is complete."""
    _, endpoint = echo
    address = endpoint.removeprefix("http://").split("/", 1)[0]
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path_of(endpoint)}/stream?lines=3&delay=0.5 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()
    received = b""
    async with asyncio.timeout(30):
        while b"line 0" not in received:
            received += await reader.read(65536)
    first_read_done = received
    async with asyncio.timeout(30):
        while not received.endswith(b"0\r\n\r\n"):
            received += await reader.read(65536)
    writer.close()
    # The app sleeps 0.5 s between lines, so the first line arrives while the rest is still being written.
    assert b"line 2" not in first_read_done
    assert b"line 2" in received

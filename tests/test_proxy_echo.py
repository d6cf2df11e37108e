"""The proxy in front of the Flask echo app in a container, one serve job shared by the module."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from tests.conftest import APPS, Daemon, remove_job_containers, start_daemon, submit_ok, wait_for_state

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
        async with client.get(daemon.url + "/metrics") as response:
            text = await response.text()
    assert f'floydd_proxy_requests_total{{job_id="{job_id}",status_class="2xx"}}' in text
    assert 'floydd_jobs{state="serving"} 1.0' in text

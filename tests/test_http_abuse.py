"""Malformed and hostile HTTP over raw sockets, where a client library would fix or refuse the bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from floydd.openapi import openapi_document
from tests.conftest import Daemon, create_token, running_daemon
from tests.hostile import tar_gz_bytes

pytestmark = pytest.mark.docker


async def connect(daemon: Daemon) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(daemon.url)
    assert url.host is not None and url.port is not None
    return await asyncio.open_connection(url.host, url.port)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one response: status, headers (lower-case names), body by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 30)
    return status, headers, body


async def exchange(daemon: Daemon, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(daemon)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


def post_jobs(token: str, content_type: str, body: bytes, extra: str = "") -> bytes:
    head = (
        "POST /api/v1/jobs HTTP/1.1\r\nHost: floydd\r\nConnection: close\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


def part(name: str, data: bytes, filename: str | None = None, extra_headers: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--b\r\nContent-Disposition: {disposition}\r\n{extra_headers}\r\n".encode() + data + b"\r\n"


END = b"--b--\r\n"
MULTIPART = "multipart/form-data; boundary=b"


def error_of(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    return parsed


MULTIPART_ABUSE = {
    "no-boundary": ("multipart/form-data", part("code", b"x", "p.tgz") + END, "boundary"),
    "empty-boundary": ("multipart/form-data; boundary=", part("code", b"x", "p.tgz") + END, "boundary"),
    "thousands-of-parts": (MULTIPART, b"".join(part(f"f{i}", b"1") for i in range(5000)) + END, "too many multipart"),
    "huge-field": (MULTIPART, part("mode", b"s" * 1_000_000) + part("code", b"x", "p.tgz") + END, "'mode' is longer"),
    "missing-code": (MULTIPART, part("mode", b"serve") + END, "missing 'code' part"),
    "two-code-parts": (
        MULTIPART,
        part("code", b"x", "a.tgz") + part("code", b"y", "b.tgz") + END,
        "more than one 'code'",
    ),
    "nameless-part": (MULTIPART, b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n" + END, "has no name"),
    "repeated-field": (
        MULTIPART,
        part("mode", b"serve") + part("mode", b"command") + END,
        "'mode' given more than once",
    ),
    "not-utf8-field": (MULTIPART, part("mode", b"\xff\xfe") + END, "not valid UTF-8"),
    "empty-code": (MULTIPART, part("code", b"", "p.tgz") + END, "archive is empty"),
    "wrong-type": ("text/plain", b"hello", "expected multipart/form-data"),
}


@pytest.mark.parametrize("case", sorted(MULTIPART_ABUSE))
async def test_multipart_abuse_is_400(daemon: Daemon, case: str) -> None:
    content_type, body, fragment = MULTIPART_ABUSE[case]
    status, _, payload = await exchange(daemon, post_jobs(daemon.admin_token, content_type, body))
    error = error_of(payload)
    assert status == 400, error
    assert fragment in error["detail"]
    assert list((daemon.state_dir / "jobs").glob("*")) == []
    assert list((daemon.state_dir / "uploads").glob("*")) == []


async def test_huge_part_header_is_400(daemon: Daemon) -> None:
    body = part("code", b"x", "p.tgz", extra_headers=f"X-Padding: {'a' * 200_000}\r\n") + END
    status, _, payload = await exchange(daemon, post_jobs(daemon.admin_token, MULTIPART, body))
    assert status == 400, payload
    assert "invalid multipart body" in error_of(payload)["detail"]
    assert list((daemon.state_dir / "uploads").glob("*")) == []


async def test_daemon_survives_abuse(daemon: Daemon) -> None:
    for content_type, body, _ in MULTIPART_ABUSE.values():
        await exchange(daemon, post_jobs(daemon.admin_token, content_type, body))
    status, _, _ = await exchange(daemon, b"GET /healthz HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n")
    assert status == 200
    assert daemon.process.returncode is None


# Expect: 100-continue. The body is never sent: the final status must come without it.


def expect_request(method: str, path: str, length: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: floydd\r\n{auth}Expect: 100-continue\r\n"
        f"Content-Type: {MULTIPART}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("method", "path", "length", "with_token", "status"),
    [
        ("POST", "/api/v1/jobs", 50 * 1024**2, False, 401),
        ("POST", "/api/v1/jobs", 2 * 1024**3, True, 413),
        ("POST", "/api/v1/nothing", 50 * 1024**2, True, 404),
        ("POST", "/api/v1/nothing", 50 * 1024**2, False, 401),
        ("PUT", "/api/v1/jobs", 50 * 1024**2, True, 405),
        ("POST", "/api/v1/jobs/0123/stop", 50 * 1024**2, False, 401),
    ],
)
async def test_expect_final_status_before_body(
    daemon: Daemon, method: str, path: str, length: int, with_token: bool, status: int
) -> None:
    token = daemon.admin_token if with_token else None
    reader, writer = await connect(daemon)
    try:
        writer.write(expect_request(method, path, length, token))
        code, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert code == status
    assert headers["content-type"].startswith("application/json")
    assert headers.get("connection") == "close"
    assert "error" in error_of(body)
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")


def described_operations() -> list[tuple[str, str]]:
    """Return every (METHOD, path) of the OpenAPI description, which a test keeps equal to the routes."""
    operations = []
    for path, item in openapi_document()["paths"].items():
        for method in item:
            if method != "parameters":
                operations.append((method.upper(), path.replace("{job_id}", "0" * 32)))
    return operations


@pytest.mark.parametrize(("method", "path"), described_operations())
async def test_every_route_authenticates_before_continue(daemon: Daemon, method: str, path: str) -> None:
    reader, writer = await connect(daemon)
    try:
        writer.write(expect_request(method, path, 50 * 1024**2, None))
        code, headers, _ = await read_response(reader)
    finally:
        writer.close()
    assert code == 401
    assert headers["www-authenticate"].startswith("Bearer")


async def test_expect_continue_when_admitted(daemon: Daemon) -> None:
    body = part("mode", b"serve") + END
    reader, writer = await connect(daemon)
    try:
        writer.write(expect_request("POST", "/api/v1/jobs", len(body), daemon.admin_token))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        writer.write(body)
        status, _, payload = await read_response(reader)
    finally:
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert status == 400
    assert "missing 'code' part" in error_of(payload)["detail"]


async def test_unsupported_expect_is_417(daemon: Daemon) -> None:
    raw = (
        "POST /api/v1/jobs HTTP/1.1\r\nHost: f\r\nExpect: something-else\r\n"
        f"Authorization: Bearer {daemon.admin_token}\r\nContent-Length: 10\r\n\r\n"
    ).encode()
    status, _, payload = await exchange(daemon, raw)
    assert status == 417
    assert "100-continue" in error_of(payload)["detail"]


# Request limits and slow clients.


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /api/v1/jobs?" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: f\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: f\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: f\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(500)) + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: f\r\nNo colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: f\r\nX-Bad: a\x01b\r\n\r\n",
    ],
    ids=["request-line", "header-size", "header-count", "header-without-colon", "control-character"],
)
async def test_unparsable_request_head_is_json_400(daemon: Daemon, raw: bytes) -> None:
    reader, writer = await connect(daemon)
    try:
        writer.write(raw)
        await writer.drain()
        status, headers, payload = await read_response(reader)
        after = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    error = error_of(payload)
    assert status == 400
    assert after == b""
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    assert error["error"] == "invalid_request"
    assert error["detail"].startswith("invalid HTTP request: ")


@pytest.mark.parametrize(
    ("raw", "status_line", "code"),
    [
        (b"GET /healthz\r\n\r\n", b"HTTP/1.1 400 Bad Request", "invalid_request"),
        (b"GET /expose/0123456789abcdef\r\n\r\n", b"HTTP/1.1 400 Bad Request", "invalid_request"),
        (
            b"GET /healthz HTTP/2.0\r\nHost: f\r\n\r\n",
            b"HTTP/1.1 505 HTTP Version Not Supported",
            "http_version_not_supported",
        ),
    ],
    ids=["no-version", "no-version-expose", "http-2.0"],
)
async def test_unsupported_http_version_rejected(daemon: Daemon, raw: bytes, status_line: bytes, code: str) -> None:
    reader, writer = await connect(daemon)
    try:
        writer.write(raw)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == status_line
    assert b"\r\nConnection: close" in head
    assert error_of(body)["error"] == code


async def test_unparsable_requests_logged_once_per_interval(daemon: Daemon) -> None:
    for _ in range(3):
        status, _, _ = await exchange(
            daemon, b"GET /healthz HTTP/1.1\r\nHost: f\r\nAuthorization: Bearer secret-token\x01\r\n\r\n"
        )
        assert status == 400
    await daemon.stop()

    rejected = daemon.logged("http_request_rejected")
    errors = [event for event in daemon.events if event.get("level") == "error"]
    assert len(rejected) == 1
    assert rejected[0]["not_logged_before"] == 0
    assert rejected[0]["detail"] == "Invalid header value char"
    assert "secret-token" not in json.dumps(daemon.events)
    assert errors == []


@pytest.fixture
async def impatient_daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    env = {"FLOYDD_SERVER_KEEPALIVE_TIMEOUT_S": "1", "FLOYDD_SERVER_BODY_TIMEOUT_S": "1"}
    async with running_daemon(tmp_path, env=env) as running:
        yield running


async def test_slow_headers_are_cut_off(impatient_daemon: Daemon) -> None:
    reader, writer = await connect(impatient_daemon)
    head = b"GET /healthz HTTP/1.1\r\nHost: f\r\n" + b"".join(b"X-Slow-%d: 1\r\n" % i for i in range(100))
    closed = False
    try:
        # One byte every 50 ms would take 75 s; the header timeout is 1 s.
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof() or await _closed_within(reader, 0.05):
                closed = True
                break
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    assert closed


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return False
    return data == b""


async def test_stalled_body_is_408(impatient_daemon: Daemon) -> None:
    start = part("code", b"", "p.tgz")[:-2]
    raw = post_jobs(impatient_daemon.admin_token, MULTIPART, b"")
    raw = raw.replace(b"Content-Length: 0", b"Content-Length: 100000") + start + b"partial"
    status, _, payload = await exchange(impatient_daemon, raw)
    assert status == 408
    assert error_of(payload)["error"] == "request_timeout"
    assert list((impatient_daemon.state_dir / "uploads").glob("*")) == []


async def test_job_limit_429_before_body(tmp_path: Path, docker_engine: None) -> None:
    async with running_daemon(tmp_path, env={"FLOYDD_LIMITS_MAX_RUNNING_JOBS": "1"}) as daemon:
        token = await create_token(daemon.state_dir, "carol")
        project = part("code", _sleep_project(), "p.tar.gz") + part("command", b"sleep 60") + END
        status, _, payload = await exchange(daemon, post_jobs(token, MULTIPART, project))
        assert status == 201, payload
        reader, writer = await connect(daemon)
        try:
            writer.write(expect_request("POST", "/api/v1/jobs", 10_000, token))
            code, _, body = await read_response(reader)
        finally:
            writer.close()
        error = error_of(body)
        assert code == 429
        assert error["limit"] == 1
        assert "limit is 1" in error["detail"]


def _sleep_project() -> bytes:
    return tar_gz_bytes([("run.sh", b"sleep 60\n")])

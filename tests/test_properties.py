"""Property-based tests: archive checking, multipart parsing, durations and config loading.

Each property is the contract a hostile input must not break: the code under
test either succeeds or raises its documented error, and never writes outside
its folder, crashes with another exception, or answers 500.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import socket
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floydd.api import error_middleware, parse_duration
from floydd.config import ConfigError, Settings, load_settings
from floydd.errors import InvalidRequest
from floydd.uploads import ArchiveRejected, UnpackLimits, receive_submission, unpack_archive

LIMITS = UnpackLimits(max_unpacked_bytes=64 * 1024, max_files=50, max_file_bytes=16 * 1024, max_compression_ratio=50)

# Archive checking

SEGMENTS = st.sampled_from(["a", "b", "c", "..", ".", "", "app.py", "x" * 20])
NAMES = st.lists(SEGMENTS, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/etc/passwd", "/tmp/x", "./"])
MEMBERS = st.lists(
    st.tuples(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]), NAMES, NAMES, st.binary(max_size=64)),
    max_size=8,
)


def build_tar(members: list[tuple[str, str, str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for kind, name, target, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MEMBERS)
def test_unpack_stays_inside(members: list[tuple[str, str, str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        sandbox = Path(scratch) / "sandbox"
        job = sandbox / "state" / "job"
        job.mkdir(parents=True)
        (sandbox / "canary").write_text("untouched")
        archive = sandbox / "upload.tar"
        archive.write_bytes(build_tar(members))
        before = tree(sandbox)
        try:
            unpack_archive(archive, job / "code", LIMITS)
        except ArchiveRejected as exc:
            assert exc.extra.get("rule") or "archive" in exc.detail
            assert tree(sandbox) == before
            return
        code = job / "code"
        assert (sandbox / "canary").read_text() == "untouched"
        assert sorted(entry.name for entry in job.iterdir()) == ["code"]
        inside = os.path.realpath(code)
        for path in code.rglob("*"):
            resolved = os.path.realpath(path)
            assert resolved == inside or resolved.startswith(inside + os.sep)
            assert not path.is_symlink() or path.exists()
            assert path.is_symlink() or path.is_dir() or path.is_file()


# Multipart parsing, through a real aiohttp server on loopback

SPOOL = web.AppKey("spool", Path)


async def submission_handler(request: web.Request) -> web.Response:
    spool = request.app[SPOOL] / f"{id(request)}.part"
    try:
        submission = await receive_submission(request, spool, max_upload_bytes=4096, body_timeout_s=5)
    finally:
        spool.unlink(missing_ok=True)
    return web.json_response({"fields": submission.fields, "archive_bytes": submission.archive_bytes})


@pytest.fixture(scope="module")
def submission_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Serve `receive_submission` from a thread, and return its port on 127.0.0.1."""
    app = web.Application(middlewares=[error_middleware])
    app[SPOOL] = tmp_path_factory.mktemp("spool")
    app.router.add_post("/submit", submission_handler)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    listener = socket.create_server(("127.0.0.1", 0))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, listener).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


PART_NAMES = st.sampled_from(["code", "mode", "command", "env", "", 'a"b', "é"])
PARTS = st.lists(
    st.tuples(PART_NAMES, st.booleans(), st.binary(max_size=300)),
    max_size=6,
)


def encode_form(parts: list[tuple[str, bool, bytes]], boundary: str) -> bytes:
    body = b""
    for name, is_file, data in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="p.tgz"' if is_file else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def post(port: int, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/submit", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@settings(max_examples=200, deadline=None)
@given(
    parts=PARTS,
    boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='";\\'), max_size=80),
    cut=st.none() | st.integers(min_value=0, max_value=2000),
    noise=st.binary(max_size=40),
)
def test_multipart_never_500(
    submission_server: int, parts: list[tuple[str, bool, bytes]], boundary: str, cut: int | None, noise: bytes
) -> None:
    body = encode_form(parts, boundary or "b")
    if cut is not None:
        body = body[:cut] + noise
    status, answer = post(submission_server, body, f'multipart/form-data; boundary="{boundary}"')
    assert status in (200, 400, 413), answer
    if status != 200:
        assert answer["error"] in ("invalid_request", "payload_too_large")
        assert answer["detail"]


@settings(max_examples=100, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["mode", "command", "env"]), st.text(max_size=50), max_size=3))
def test_multipart_fields_round_trip(submission_server: int, fields: dict[str, str]) -> None:
    parts = [(name, False, value.encode()) for name, value in fields.items()] + [("code", True, b"archive")]
    status, answer = post(submission_server, encode_form(parts, "b0undary"), "multipart/form-data; boundary=b0undary")
    assert status == 200, answer
    assert answer["fields"] == fields
    assert answer["archive_bytes"] == len(b"archive")


# Duration parsing

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@given(amount=st.integers(min_value=1, max_value=10**6), unit=st.sampled_from(sorted(UNITS)))
def test_duration_round_trip(amount: int, unit: str) -> None:
    seconds = amount * UNITS[unit]
    if seconds > 10 * 365 * 86400:
        with pytest.raises(InvalidRequest):
            parse_duration(f"{amount}{unit}")
    else:
        assert parse_duration(f" {amount} {unit} ") == seconds


@given(st.text(max_size=40) | st.from_regex(r"\A\s*\d{1,400}(\.\d{0,40})?\s*[smhd]?\s*\Z"))
def test_duration_never_crashes(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except InvalidRequest as exc:
        assert repr(text) in exc.detail
        return
    assert 1 <= seconds <= 10 * 365 * 86400


# Config loading

SCALARS = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
)
KNOWN_KEYS = {
    "server": ["host", "port", "max_headers", "keepalive_timeout_s", "bogus"],
    "uploads": ["max_upload_bytes", "max_files", "max_compression_ratio"],
    "limits": ["max_running_jobs", "max_dataset_bytes"],
    "proxy": ["max_queue_depth", "queue_timeout_s"],
    "jobs": ["default_env", "default_max_uptime_s", "stop_grace_s"],
    "sever": ["port"],
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        if value == float("-inf"):
            return "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    # JSON strings without ASCII escaping are valid TOML basic strings.
    return json.dumps(value, ensure_ascii=False)


@st.composite
def config_documents(draw: st.DrawFn) -> str:
    lines = []
    for section in draw(st.lists(st.sampled_from(sorted(KNOWN_KEYS)), unique=True, max_size=4)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(KNOWN_KEYS[section]), unique=True, max_size=3)):
            lines.append(f"{key} = {toml_value(draw(SCALARS))}")
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=20)))
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=config_documents())
def test_config_loads_or_names_error(tmp_path: Path, document: str) -> None:
    path = tmp_path / "floydd.toml"
    path.write_text(document, encoding="utf-8", errors="surrogatepass")
    try:
        loaded = load_settings(path, environ={})
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(loaded, Settings)
    assert loaded.server.keepalive_timeout_s > 0
    assert loaded.uploads.max_compression_ratio < float("inf")


@given(
    variable=st.sampled_from(
        ["FLOYDD_SERVER_PORT", "FLOYDD_PROXY_QUEUE_TIMEOUT_S", "FLOYDD_UPLOADS_MAX_COMPRESSION_RATIO", "FLOYDD_X_Y"]
    ),
    text=st.text(max_size=12) | st.sampled_from(["nan", "inf", "-1", "0", "1e309", "true"]),
)
def test_environment_override_loads_or_names_error(variable: str, text: str) -> None:
    try:
        loaded = load_settings(None, environ={variable: text})
    except ConfigError as exc:
        # A value that does not parse names the variable; one out of range names its setting.
        setting = variable.removeprefix("FLOYDD_").lower().replace("_", ".", 1)
        assert variable in str(exc) or setting in str(exc)
        return
    assert loaded.proxy.queue_timeout_s > 0
    assert loaded.uploads.max_compression_ratio < float("inf")

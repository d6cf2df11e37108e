"""Hostile archives and uploads of every size through the real API.

Each rejected upload must answer 400 or 413 naming the rule and the member,
write nothing outside the job's folder, and leave nothing in the state dir.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Daemon, create_token, get_logs, running_daemon, submit, wait_for_state
from tests.hostile import device, empty_files_tar_gz, link, tar_gz_bytes, zeros_tar_gz, zeros_zip

pytestmark = pytest.mark.docker

APP = ("app.py", b"print('hello')\n")
# Enough '..' to climb from any state dir to the file system root.
UP = "../" * 32


def snapshot(folder: Path) -> dict[str, str]:
    """Map every path under `folder` (links not followed) to its type and content hash."""
    entries = {}
    for current, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(current) / name
            if path.is_symlink():
                entries[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                entries[str(path)] = "dir"
    return entries


def assert_left_nothing(daemon: Daemon) -> None:
    assert list((daemon.state_dir / "jobs").glob("*")) == []
    assert list((daemon.state_dir / "uploads").glob("*")) == []


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the state dir that no upload may change, holding a target file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "target").write_text("original\n")
    return folder


async def submit_rejected(
    client: aiohttp.ClientSession, daemon: Daemon, archive: bytes, filename: str = "project.tar.gz"
) -> dict[str, Any]:
    status, body = await submit(client, daemon, archive, filename=filename, mode="serve")
    assert status == 400, body
    assert body["error"] == "archive_rejected"
    return body


def escaping_archives(outside: Path) -> dict[str, tuple[list[Any], str, str]]:
    """Name -> (members, expected member in the error, expected rule)."""
    escape = f"{UP}{outside.as_posix().lstrip('/')}/pwned"
    return {
        "dotdot": ([APP, (escape, b"x")], escape, "parent_component"),
        "absolute": ([APP, (f"{outside}/pwned2", b"x")], f"{outside}/pwned2", "absolute_path"),
        "symlink-then-file": ([APP, link("l", f"{outside}/target"), ("l", b"pwned")], "l", "link_escape"),
        "symlink-dir-then-file": ([APP, link("d", str(outside)), ("d/x", b"pwned")], "d", "link_escape"),
        "relative-symlink-escape": ([APP, link("up", UP.rstrip("/")), ("up/x", b"pwned")], "up", "link_escape"),
        "hardlink-etc-passwd": ([APP, link("h", "/etc/passwd", tarfile.LNKTYPE)], "h", "link_escape"),
        "hardlink-relative-escape": ([APP, link("h", UP + "etc/passwd", tarfile.LNKTYPE)], "h", "link_escape"),
        "device-node": ([APP, device("null")], "null", "special_file"),
        "late-link-escape": ([APP, link("a", "b/.."), link("b", "."), ("z", b"")], "a", "link_escape"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "symlink-then-file",
        "symlink-dir-then-file",
        "relative-symlink-escape",
        "hardlink-etc-passwd",
        "hardlink-relative-escape",
        "device-node",
        "late-link-escape",
    ],
)
async def test_escaping_tar_rejected(daemon: Daemon, client: aiohttp.ClientSession, outside: Path, case: str) -> None:
    members, member, rule = escaping_archives(outside)[case]
    before = snapshot(outside)
    passwd = os.stat("/etc/passwd")
    body = await submit_rejected(client, daemon, tar_gz_bytes(members))
    assert body["rule"] == rule
    assert body["member"].endswith(member)
    assert member in body["detail"]
    assert snapshot(outside) == before
    assert os.stat("/etc/passwd").st_nlink == passwd.st_nlink
    assert_left_nothing(daemon)


@pytest.mark.parametrize("name", ["dotdot", "absolute"])
async def test_zip_slip_rejected(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path, outside: Path, name: str
) -> None:
    bad = f"{UP}{outside.as_posix().lstrip('/')}/pwned" if name == "dotdot" else f"{outside}/pwned2"
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("app.py", "print(1)\n")
        bundle.writestr(bad, "x")
    before = snapshot(outside)
    body = await submit_rejected(client, daemon, archive.read_bytes(), filename="slip.zip")
    assert body["member"] == bad
    assert snapshot(outside) == before
    assert_left_nothing(daemon)


async def test_ten_gib_tar_bomb_rejected(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    archive = zeros_tar_gz(tmp_path / "bomb.tar.gz", "zeros.bin", 10 * 1024**3)
    body = await submit_rejected(client, daemon, archive.read_bytes())
    assert body["member"] == "zeros.bin"
    assert body["rule"] == "max_file_bytes"
    assert_left_nothing(daemon)


async def test_ten_gib_zip_bomb_rejected(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    archive = zeros_zip(tmp_path / "bomb.zip", "zeros.bin", 10 * 1024**3)
    body = await submit_rejected(client, daemon, archive.read_bytes(), filename="bomb.zip")
    assert body["member"] == "zeros.bin"
    assert body["rule"] == "max_compression_ratio"
    assert_left_nothing(daemon)


@pytest.fixture
async def few_files_daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path, env={"FLOYDD_UPLOADS_MAX_FILES": "10000"}) as running:
        yield running


async def test_hundred_thousand_files_rejected(
    few_files_daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    archive = empty_files_tar_gz(tmp_path / "many.tar.gz", 100_000)
    body = await submit_rejected(client, few_files_daemon, archive.read_bytes())
    assert body["rule"] == "max_files"
    assert body["member"] == "f10000"
    assert_left_nothing(few_files_daemon)


async def test_in_tree_links_work_in_job(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    archive = tar_gz_bytes(
        [
            link("data", "./assets"),
            ("assets/x.txt", b"linked content\n"),
            link("dangling", "missing.txt"),
            ("run.sh", b"cat data/x.txt; test -e dangling || echo no-dangling\n"),
        ]
    )
    status, job = await submit(client, daemon, archive, command="sh run.sh")
    assert status == 201, job
    await wait_for_state(client, daemon, job["id"], {"succeeded"})
    logs = await get_logs(client, daemon, job["id"])
    assert "linked content" in logs
    assert "no-dangling" in logs
    code = daemon.state_dir / "jobs" / job["id"] / "code"
    assert (code / "data").is_symlink()
    assert not (code / "dangling").is_symlink()


async def test_project_over_one_mib_accepted(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    blob = os.urandom(1536 * 1024)
    archive = tar_gz_bytes([("blob.bin", blob), ("run.sh", b"wc -c < blob.bin\n")])
    status, job = await submit(client, daemon, archive, command="sh run.sh")
    assert status == 201, job
    await wait_for_state(client, daemon, job["id"], {"succeeded"})
    assert str(len(blob)) in await get_logs(client, daemon, job["id"])


@pytest.fixture
async def big_upload_daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    limit = str(4 * 1024**3)
    env = {"FLOYDD_UPLOADS_MAX_UPLOAD_BYTES": limit, "FLOYDD_LIMITS_MAX_UPLOAD_BYTES": limit}
    async with running_daemon(tmp_path, env=env) as running:
        yield running


def peak_rss_bytes(daemon: Daemon) -> int:
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def three_gib_tar() -> tuple[bytes, int]:
    """Return the header of an uncompressed tar whose one member is 3 GiB, and the member size."""
    info = tarfile.TarInfo("weights.bin")
    info.size = 3 * 1024**3
    return info.tobuf(format=tarfile.GNU_FORMAT), info.size


async def stream_zeros(prefix: bytes, size: int, suffix: bytes = b"") -> AsyncIterator[bytes]:
    """Yield `prefix`, `size` zero bytes in chunks of at most 1 MiB, then `suffix`."""
    yield prefix
    chunk = bytes(1024 * 1024)
    full, rest = divmod(size, len(chunk))
    for _ in range(full):
        yield chunk
    yield bytes(rest) + suffix


@pytest.mark.parametrize("framing", ["raw", "multipart"])
async def test_three_gib_upload_streams(big_upload_daemon: Daemon, client: aiohttp.ClientSession, framing: str) -> None:
    header, size = three_gib_tar()
    url = f"{big_upload_daemon.url}/api/v1/jobs?mode=command&command=true"
    if framing == "raw":
        body = stream_zeros(header, size + 1024)
        headers = {"Content-Type": "application/x-tar"}
    else:
        start = b'--b\r\nContent-Disposition: form-data; name="code"; filename="w.tar"\r\n\r\n' + header
        body = stream_zeros(
            start, size + 1024, b'\r\n--b\r\nContent-Disposition: form-data; name="command"\r\n\r\ntrue\r\n--b--\r\n'
        )
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with client.post(url, data=body, headers=headers) as response:
        result = await response.json()
    # The whole body reached the unpacker, which then stopped at the 2 GiB single-file limit.
    assert response.status == 400, result
    assert result["rule"] == "max_file_bytes"
    assert result["member"] == "weights.bin"
    assert peak_rss_bytes(big_upload_daemon) < 300 * 1024**2
    assert_left_nothing(big_upload_daemon)


@pytest.fixture
async def small_upload_daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path, env={"FLOYDD_LIMITS_MAX_UPLOAD_BYTES": "100000"}) as running:
        yield running


@pytest.mark.parametrize("declared", [True, False])
async def test_raw_upload_over_limit_is_413(
    small_upload_daemon: Daemon, client: aiohttp.ClientSession, declared: bool
) -> None:
    user_token = await create_token(small_upload_daemon.state_dir, "alice")
    payload = bytes(200_000)
    data: bytes | AsyncIterator[bytes] = payload if declared else stream_zeros(b"", len(payload))
    headers = {"Content-Type": "application/gzip", "Authorization": f"Bearer {user_token}"}
    url = f"{small_upload_daemon.url}/api/v1/jobs?command=true"
    async with client.post(url, data=data, headers=headers) as response:
        body = await response.json()
    assert response.status == 413
    assert body["limit"] == 100000
    assert "100000" in body["detail"]
    assert_left_nothing(small_upload_daemon)

"""The jobs API against a real daemon: validation, errors as JSON, limits."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import APPS, Daemon, running_daemon, submit, submit_ok, tar_gz, wait_for_state

pytestmark = pytest.mark.docker


def small_project(tmp_path: Path) -> bytes:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "app.py").write_text("print('hello')\n")
    return tar_gz(project)


async def test_unknown_job_is_404(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    for url in (f"{daemon.url}/api/v1/jobs/nope", f"{daemon.url}/api/v1/jobs/nope/logs"):
        async with client.get(url) as response:
            assert response.status == 404
            body = await response.json()
        assert body["error"] == "job_not_found"
    async with client.post(f"{daemon.url}/api/v1/jobs/nope/stop") as response:
        assert response.status == 404


async def test_unknown_expose_job_is_404(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{daemon.url}/expose/0123456789abcdef/x") as response:
        assert response.status == 404
        body = await response.json()
    assert body == {"error": "job_not_found", "detail": "no job with id 0123456789abcdef"}


async def test_unknown_route_is_json_404(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{daemon.url}/api/v1/nothing") as response:
        assert response.status == 404
        body = await response.json()
    assert body == {"error": "not_found", "detail": "not found: GET /api/v1/nothing"}


async def test_wrong_method_is_json_405(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    async with client.put(f"{daemon.url}/api/v1/jobs") as response:
        assert response.status == 405
        allow = response.headers["Allow"]
        body = await response.json()
    assert set(allow.split(",")) == {"GET", "HEAD", "POST"}
    assert body == {"error": "method_not_allowed", "detail": "method not allowed: PUT /api/v1/jobs"}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"mode": "train"}, "invalid mode"),
        ({"mode": "serve", "command": "python x.py"}, "not allowed in serve mode"),
        ({"mode": "command"}, "needs a non-empty command"),
        ({"mode": "serve", "env": "tensorflow-0.1"}, "unknown env"),
        ({"mode": "serve", "max_uptime": "soon"}, "invalid duration"),
        ({"mode": "serve", "gpus": "1"}, "unknown field 'gpus'"),
    ],
)
async def test_invalid_fields_are_400(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path, fields: dict[str, str], fragment: str
) -> None:
    status, body = await submit(client, daemon, small_project(tmp_path), **fields)
    assert status == 400
    assert body["error"] == "invalid_request"
    assert fragment in body["detail"]
    assert not list((daemon.state_dir / "jobs").glob("*"))


async def test_missing_code_part_is_400(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("mode", "serve")
    form.add_field("placeholder", b"x", filename="x.bin")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form) as response:
        assert response.status == 400
        body = await response.json()
    assert "unknown field" in body["detail"] or "missing 'code'" in body["detail"]


async def test_not_multipart_is_400(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{daemon.url}/api/v1/jobs", json={"mode": "serve"}) as response:
        assert response.status == 400
        body = await response.json()
    assert "multipart/form-data" in body["detail"]


async def test_escaping_archive_is_400_and_leaves_nothing(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in ("app.py", "../../tmp/pwned-by-test"):
            info = tarfile.TarInfo(name)
            info.size = 1
            archive.addfile(info, io.BytesIO(b"x"))
    status, body = await submit(client, daemon, buffer.getvalue(), mode="serve")
    assert status == 400
    assert body["error"] == "archive_rejected"
    assert body["member"] == "../../tmp/pwned-by-test"
    assert not Path("/tmp/pwned-by-test").exists()
    assert not list((daemon.state_dir / "jobs").glob("*"))
    assert not list((daemon.state_dir / "uploads").glob("*"))


async def test_max_uptime_is_capped(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve", max_uptime="30d")
    created = datetime.fromisoformat(job["created_at"])
    deadline = datetime.fromisoformat(job["deadline"])
    assert (deadline - created).total_seconds() == 7 * 24 * 3600


async def test_job_shows_accepted_requests(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    capped = await submit_ok(client, daemon, APPS / "echo", mode="serve", concurrency="9", memory="300m")
    plain = await submit_ok(client, daemon, APPS / "echo", mode="serve")

    assert capped["concurrency"] == 8
    assert capped["memory_bytes"] == 300 * 1024 * 1024
    assert plain["concurrency"] == 1
    assert plain["memory_bytes"] is None
    assert plain["cpus"] is None
    assert plain["gpus"] == 0
    assert plain["data"] == []


async def test_list_jobs_filters_by_state(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    project = tmp_path / "quick"
    project.mkdir()
    (project / "run.py").write_text("print('done')\n")
    job = await submit_ok(client, daemon, project, command="python run.py")
    await wait_for_state(client, daemon, job["id"], {"succeeded"})
    listed = {}
    for query in (
        "",
        "?state=succeeded",
        "?state=running",
        "?state=running,succeeded",
        "?state=running&state=succeeded",
    ):
        async with client.get(f"{daemon.url}/api/v1/jobs{query}") as response:
            assert response.status == 200
            listed[query] = [entry["id"] for entry in (await response.json())["jobs"]]
    async with client.get(f"{daemon.url}/api/v1/jobs?state=running&state=bogus") as response:
        bogus_status = response.status
        bogus = await response.json()

    assert listed[""] == [job["id"]]
    assert listed["?state=succeeded"] == [job["id"]]
    assert listed["?state=running"] == []
    assert listed["?state=running,succeeded"] == [job["id"]]
    assert listed["?state=running&state=succeeded"] == [job["id"]]
    assert bogus_status == 400
    assert "'running,bogus'" in bogus["detail"]


@pytest.fixture
async def small_limit_daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path, env={"FLOYDD_UPLOADS_MAX_UPLOAD_BYTES": "2000"}) as running:
        yield running


async def test_upload_over_limit_is_413(small_limit_daemon: Daemon, client: aiohttp.ClientSession) -> None:
    large = bytes(range(256)) * 40
    status, body = await submit(client, small_limit_daemon, large, mode="serve")
    assert status == 413
    assert body["error"] == "payload_too_large"
    assert body["limit"] == 2000
    assert not list((small_limit_daemon.state_dir / "uploads").glob("*"))


async def test_streamed_upload_over_limit_is_413(small_limit_daemon: Daemon, client: aiohttp.ClientSession) -> None:
    # No Content-Length: the limit must be enforced while the body streams in.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="code"; filename="p.tgz"\r\n\r\n'
        for _ in range(10):
            yield bytes(1000)
        yield b"\r\n--b--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with client.post(f"{small_limit_daemon.url}/api/v1/jobs", data=chunks(), headers=headers) as response:
        assert response.status == 413

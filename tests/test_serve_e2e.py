"""End to end: a real floydd, a real Docker engine, real uploads and real HTTP clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import zipfile
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from tests.conftest import (
    APPS,
    DATA,
    EXAMPLES,
    Daemon,
    container_exists,
    get_job,
    get_logs,
    submit,
    submit_ok,
    tar_gz,
    wait_for_state,
)

pytestmark = pytest.mark.docker


async def test_style_transfer_restyles_photo(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, EXAMPLES / "style-transfer", mode="serve")
    assert job["state"] == "queued"
    assert job["endpoint"] == f"{daemon.url}/expose/{job['id']}"
    await wait_for_state(client, daemon, job["id"], {"serving"})

    photo = (DATA / "rocket.jpg").read_bytes()
    form = aiohttp.FormData()
    form.add_field("file", photo, filename="rocket.jpg", content_type="image/jpeg")
    async with client.post(job["endpoint"], data=form) as response:
        assert response.status == 200
        restyled = await response.read()

    original = Image.open(io.BytesIO(photo))
    result = Image.open(io.BytesIO(restyled))
    result.load()
    assert result.format == "JPEG"
    assert result.size == original.size
    assert restyled != photo


async def test_style_transfer_rejects_non_image(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, EXAMPLES / "style-transfer", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    form = aiohttp.FormData()
    form.add_field("file", b"this is not an image\n", filename="notes.txt", content_type="text/plain")
    async with client.post(job["endpoint"], data=form) as response:
        assert response.status == 400
        body = await response.json()
    assert "error" in body


async def test_queue_admits_one_request_in_arrival_order(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "concurrency", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    endpoint = job["endpoint"]

    async def call(seq: int) -> int:
        async with client.get(f"{endpoint}/work?seq={seq}") as response:
            await response.read()
            return response.status

    # Requests leave 50 ms apart, so their arrival order is known, while the
    # app takes 200 ms each: all 20 are outstanding at once.
    calls = []
    for seq in range(20):
        calls.append(asyncio.create_task(call(seq)))
        await asyncio.sleep(0.05)
    statuses = await asyncio.gather(*calls)

    async with client.get(f"{endpoint}/stats") as response:
        stats = await response.json()
    assert statuses == [200] * 20
    assert stats["max_concurrency"] == 1
    assert stats["order"] == list(range(20))


async def test_requests_wait_while_job_starts(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    # Sent at once, before the container is up: they wait in the queue.
    async with client.get(f"{job['endpoint']}/early?n=1") as response:
        assert response.status == 200
        body = await response.json()
    assert body["uri"] == "/early?n=1"
    current = await get_job(client, daemon, job["id"])
    assert current["state"] == "serving"


async def test_max_uptime_times_out_job(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve", max_uptime="3s")
    ended = await wait_for_state(client, daemon, job["id"], {"timed_out"}, timeout_s=60)
    assert ended["reason"] == "max uptime reached"
    assert not await container_exists(job["id"])
    async with client.get(job["endpoint"]) as response:
        assert response.status == 503
        body = await response.json()
    assert body["state"] == "timed_out"


async def test_stop_removes_container_keeps_logs(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    async with client.get(f"{job['endpoint']}/print?msg=marker-7f3a") as response:
        assert response.status == 200

    async with client.post(f"{daemon.url}/api/v1/jobs/{job['id']}/stop") as response:
        assert response.status == 200
        stopped = await response.json()

    assert stopped["state"] == "stopped"
    assert not await container_exists(job["id"])
    logs = await get_logs(client, daemon, job["id"])
    assert "echo app listening on 5000" in logs
    assert "marker-7f3a" in logs
    assert daemon.logged("job_state_changed", job_id=job["id"], state="stopped")


async def test_stop_rejects_queued_requests(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    """Requests queued behind one in flight get 503 when the job is stopped; none reaches the dying app."""
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    endpoint = job["endpoint"]

    async def get(path: str) -> tuple[int, dict[str, object] | None]:
        async with client.get(endpoint + path) as response:
            body = await response.read()
            return response.status, (await response.json()) if response.status >= 500 and body else None

    in_flight = asyncio.create_task(get("/stream?lines=50&delay=0.1"))
    await asyncio.sleep(0.5)
    queued = [asyncio.create_task(get(f"/queued-{index}")) for index in range(3)]
    await asyncio.sleep(0.3)
    async with client.post(f"{daemon.url}/api/v1/jobs/{job['id']}/stop") as response:
        assert response.status == 200
    # The stream in flight is cut off by the stop, which the client sees as an incomplete body.
    (cut_off,) = await asyncio.gather(in_flight, return_exceptions=True)
    results = await asyncio.gather(*queued)

    assert isinstance(cut_off, aiohttp.ClientPayloadError)

    assert [status for status, _ in results] == [503, 503, 503]
    assert [body["error"] for _, body in results if body] == ["job_not_serving"] * 3
    logs = await get_logs(client, daemon, job["id"])
    assert "/queued-" not in logs


async def test_broken_app_fails_with_traceback(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "broken", mode="serve")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"})
    assert ended["exit_code"] == 1
    assert ended["reason"] == "exited with code 1"
    logs = await get_logs(client, daemon, job["id"])
    assert "Traceback (most recent call last)" in logs
    assert "RuntimeError: model file missing: weights.h5" in logs
    assert not await container_exists(job["id"])


async def test_logs_follow_streams_until_end(daemon: Daemon, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "counter"
    project.mkdir()
    (project / "count.py").write_text(
        "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(0.3)\n"
    )
    job = await submit_ok(client, daemon, project, command="python count.py")
    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/logs?follow=true") as response:
        followed = await response.text()
    assert [f"line {i}" for i in range(5)] == [line for line in followed.splitlines() if line.startswith("line")]
    current = await get_job(client, daemon, job["id"])
    assert current["state"] == "succeeded"


async def test_command_job_exit_code(daemon: Daemon, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("import sys\nprint('training')\nsys.exit(3)\n")
    job = await submit_ok(client, daemon, project, command="python train.py")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"})
    assert ended["exit_code"] == 3
    assert ended["reason"] == "exited with code 3"
    assert "training" in await get_logs(client, daemon, job["id"])


async def test_command_job_writes_output(daemon: Daemon, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "run.sh").write_text("echo result > /output/result.txt\n")
    job = await submit_ok(client, daemon, project, command="sh run.sh")
    await wait_for_state(client, daemon, job["id"], {"succeeded"})
    output = daemon.state_dir / "jobs" / job["id"] / "output" / "result.txt"
    assert output.read_text() == "result\n"


async def test_serve_upload_without_app_py(daemon: Daemon, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "server.py").write_text("print('hi')\n")
    status, body = await submit(client, daemon, tar_gz(project), mode="serve")
    assert status == 400
    assert "app.py" in body["detail"]
    assert not list((daemon.state_dir / "jobs").glob("*"))


async def test_loopback_only_app_fails_clearly(daemon: Daemon, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "loopback"
    project.mkdir()
    # Flask's default host is 127.0.0.1, which Docker's published port cannot reach.
    (project / "app.py").write_text(
        "from flask import Flask\n"
        "app = Flask(__name__)\n"
        "@app.get('/')\n"
        "def index():\n"
        "    return 'hi'\n"
        "app.run(port=5000)\n"
    )
    job = await submit_ok(client, daemon, project, mode="serve")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=60)
    assert "listens on 127.0.0.1:5000 only" in ended["reason"]
    assert 'host="0.0.0.0"' in ended["reason"]
    assert not await container_exists(job["id"])


def probe_wheel(folder: Path) -> str:
    """Write a wheel of one module, `floydd_probe`, into `folder` and return its file name.

    pip installs a local wheel without a package index, so the test needs no network.
    """
    name = "floydd_probe-1.0-py3-none-any.whl"
    files = {
        "floydd_probe.py": b'VALUE = "installed from floyd_requirements.txt"\n',
        "floydd_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: floydd-probe\nVersion: 1.0\n",
        "floydd_probe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: floydd-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    record.append("floydd_probe-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(folder / name, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr("floydd_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return name


async def test_requirements_installed_before_app(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    project = tmp_path / "needs-probe"
    project.mkdir()
    (project / "floyd_requirements.txt").write_text(f"./{probe_wheel(project)}\n")
    (project / "app.py").write_text(
        "from flask import Flask\nimport floydd_probe\n\napp = Flask(__name__)\n\n\n"
        "@app.route('/')\ndef value():\n    return floydd_probe.VALUE\n\n\n"
        "app.run(host='0.0.0.0', port=5000)\n"
    )
    job = await submit_ok(client, daemon, project, mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"}, timeout_s=120)
    async with client.get(job["endpoint"]) as response:
        status = response.status
        text = await response.text()
    logs = await get_logs(client, daemon, job["id"])

    assert status == 200
    assert text == "installed from floyd_requirements.txt"
    assert "floydd: installing floyd_requirements.txt" in logs
    assert "Successfully installed floydd-probe-1.0" in logs


async def test_failed_requirements_named_in_reason(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    project = tmp_path / "missing-requirement"
    project.mkdir()
    # A local path that does not exist fails at once, without asking a package index.
    (project / "floyd_requirements.txt").write_text("./not-a-package-1.0-py3-none-any.whl\n")
    (project / "app.py").write_text("print('never started')\n")
    job = await submit_ok(client, daemon, project, mode="serve")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=120)
    logs = await get_logs(client, daemon, job["id"])

    assert ended["exit_code"] == 1
    assert ended["reason"] == "installing floyd_requirements.txt failed: pip exited with code 1; see the job's logs"
    assert "never started" not in logs


async def test_requirements_out_of_memory_reason(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    project = tmp_path / "small-memory"
    project.mkdir()
    (project / "floyd_requirements.txt").write_text(f"./{probe_wheel(project)}\n")
    (project / "app.py").write_text("print('never started')\n")
    # pip needs more memory than this, so the kernel kills it during the install.
    job = await submit_ok(client, daemon, project, mode="serve", memory="24m")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=120)

    assert ended["reason"] == "out of memory"
    assert ended["exit_code"] == 137

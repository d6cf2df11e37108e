"""Restarts and faults against a real Docker engine: SIGKILL, SIGTERM, containers removed behind floydd's back."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from tests.conftest import (
    APPS,
    Daemon,
    container_exists,
    get_job,
    get_logs,
    remove_job_containers,
    start_daemon,
    submit_ok,
    wait_for_state,
)

pytestmark = pytest.mark.docker


class Daemons:
    """Daemons started one after another on the same state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.current: Daemon | None = None

    async def start(self, env: dict[str, str] | None = None) -> Daemon:
        self.current = await start_daemon(self.state_dir, env=env)
        return self.current

    async def kill(self) -> None:
        """SIGKILL the running daemon: no cleanup of any kind runs."""
        assert self.current is not None
        self.current.process.kill()
        await self.current.stop()


@pytest.fixture
async def daemons(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemons]:
    group = Daemons(tmp_path / "state")
    try:
        yield group
    finally:
        if group.current is not None:
            await group.current.stop()
            await remove_job_containers(group.current)


async def container_id(job_id: str) -> str:
    async with aiodocker.Docker() as docker:
        info = await docker.containers.container(f"floydd-{job_id}").show()
    return str(info["Id"])


async def serving_job_then_sigkill(daemons: Daemons, client: aiohttp.ClientSession) -> tuple[Daemon, dict[str, Any]]:
    """Start a daemon with a serving echo job, then SIGKILL the daemon; return the daemon and the job."""
    first = await daemons.start()
    job = await submit_ok(client, first, APPS / "echo", mode="serve")
    await wait_for_state(client, first, job["id"], {"serving"})
    await daemons.kill()
    return first, job


async def echo(client: aiohttp.ClientSession, endpoint: str, path: str) -> dict[str, object]:
    async with client.get(f"{endpoint}{path}") as response:
        assert response.status == 200, await response.text()
        body: dict[str, object] = await response.json()
        return body


async def test_sigkill_adopts_serving_container(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    first = await daemons.start()
    job = await submit_ok(client, first, APPS / "echo", mode="serve")
    await wait_for_state(client, first, job["id"], {"serving"})
    before = await container_id(job["id"])

    # Requests in flight while the daemon dies: the kill lands mid-traffic.
    calls = [asyncio.create_task(client.get(f"{job['endpoint']}/stream?lines=3&delay=0.2")) for _ in range(3)]
    await asyncio.sleep(0.1)
    await daemons.kill()
    for call in calls:
        with contextlib.suppress(aiohttp.ClientError):
            (await call).release()

    second = await daemons.start()
    adopted = await wait_for_state(client, second, job["id"], {"serving"}, timeout_s=30)
    body = await echo(client, job["endpoint"].replace(first.url, second.url), "/after-restart")

    assert adopted["state"] == "serving"
    assert body["uri"] == "/after-restart"
    assert await container_id(job["id"]) == before
    assert second.logged("job_adopted", job_id=job["id"])
    assert not second.logged("container_started", job_id=job["id"])


async def test_restart_two_jobs_then_two_more(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    first = await daemons.start()
    old = [await submit_ok(client, first, APPS / "echo", mode="serve") for _ in range(2)]
    for job in old:
        await wait_for_state(client, first, job["id"], {"serving"})
    await daemons.kill()

    second = await daemons.start()
    new = [await submit_ok(client, second, APPS / "echo", mode="serve") for _ in range(2)]
    jobs = [*old, *new]
    for job in jobs:
        await wait_for_state(client, second, job["id"], {"serving"})
    answers = [await echo(client, f"{second.url}/expose/{job['id']}", f"/job/{job['id']}") for job in jobs]
    ports = {(await get_job(client, second, job["id"]))["id"]: await host_port(job["id"]) for job in jobs}

    assert [answer["uri"] for answer in answers] == [f"/job/{job['id']}" for job in jobs]
    assert len(set(ports.values())) == 4
    assert sorted(await instance_containers(daemons.state_dir)) == sorted(job["id"] for job in jobs)


async def host_port(job_id: str) -> int:
    async with aiodocker.Docker() as docker:
        info = await docker.containers.container(f"floydd-{job_id}").show()
    return int(info["NetworkSettings"]["Ports"]["5000/tcp"][0]["HostPort"])


async def instance_containers(state_dir: Path) -> list[str]:
    """Return the job ids of all containers labelled with this state directory's instance."""
    instance = (state_dir / "instance-id").read_text().strip()
    async with aiodocker.Docker() as docker:
        containers = await docker.containers.list(all=True, filters={"label": [f"org.floydd.instance={instance}"]})
    return [container._container["Labels"]["org.floydd.job"] for container in containers]


async def test_restart_removes_orphan_container(
    daemons: Daemons, client: aiohttp.ClientSession, default_image: str
) -> None:
    first = await daemons.start()
    await daemons.kill()
    instance = (daemons.state_dir / "instance-id").read_text().strip()
    labels = {"org.floydd.managed": "true", "org.floydd.instance": instance, "org.floydd.job": "0" * 32}
    async with aiodocker.Docker() as docker:
        orphan = await docker.containers.create(
            {"Image": default_image, "Cmd": ["sleep", "300"], "Labels": labels}, name=f"floydd-test-orphan-{instance}"
        )
        try:
            second = await daemons.start()
            orphans = await instance_containers(daemons.state_dir)
        finally:
            with contextlib.suppress(aiodocker.DockerError):
                await orphan.delete(force=True)
    assert first.url != ""
    assert orphans == []
    assert second.logged("orphan_container_removed", job_id="0" * 32)


async def test_removed_container_fails_job(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    async with aiodocker.Docker() as docker:
        await docker.containers.container(f"floydd-{job['id']}").delete(force=True)

    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=15)
    async with client.get(job["endpoint"]) as response:
        status = response.status

    assert "container vanished" in ended["reason"]
    assert status == 503


async def test_vanished_while_down_fails_job(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    first, job = await serving_job_then_sigkill(daemons, client)
    async with aiodocker.Docker() as docker:
        await docker.containers.container(f"floydd-{job['id']}").delete(force=True)

    second = await daemons.start()
    ended = await get_job(client, second, job["id"])

    assert ended["state"] == "failed"
    assert ended["reason"] == "container vanished while floydd was down"


async def test_deadline_enforced_after_restart(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "sleeper"
    project.mkdir()
    (project / "run.sh").write_text("echo started\nsleep 300\n")
    first = await daemons.start()
    job = await submit_ok(client, first, project, command="sh run.sh", max_uptime="8s")
    await wait_for_state(client, first, job["id"], {"running"})
    await daemons.kill()

    second = await daemons.start()
    ended = await wait_for_state(client, second, job["id"], {"timed_out"}, timeout_s=60)

    assert ended["reason"] == "max uptime reached"
    assert not await container_exists(job["id"])


async def test_logs_exact_across_restarts(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "counter"
    project.mkdir()
    # Bursts of lines printed within the same instant are the hard case for resuming by timestamp.
    (project / "count.py").write_text(
        "import time\n"
        "for burst in range(30):\n"
        "    for line in range(5):\n"
        "        print(f'line {burst * 5 + line}', flush=True)\n"
        "    time.sleep(0.1)\n"
    )
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, project, command="python count.py")
    await wait_for_state(client, daemon, job["id"], {"running"})
    for _ in range(2):
        await asyncio.sleep(0.7)
        await daemons.kill()
        daemon = await daemons.start()
    await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
    logs = await get_logs(client, daemon, job["id"])

    assert logs.splitlines() == [f"line {index}" for index in range(150)]


async def test_sigterm_leaves_container_running(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    first = await daemons.start()
    job = await submit_ok(client, first, APPS / "echo", mode="serve")
    await wait_for_state(client, first, job["id"], {"serving"})
    before = await container_id(job["id"])
    exit_code = await first.stop()
    running_between = await container_exists(job["id"])

    second = await daemons.start()
    await wait_for_state(client, second, job["id"], {"serving"}, timeout_s=30)
    body = await echo(client, f"{second.url}/expose/{job['id']}", "/again")

    assert exit_code == 0
    assert running_between
    assert await container_id(job["id"]) == before
    assert body["uri"] == "/again"


async def test_sigterm_can_stop_containers(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    env = {"FLOYDD_LIFECYCLE_STOP_CONTAINERS_ON_SHUTDOWN": "true", "FLOYDD_JOBS_STOP_GRACE_S": "1"}
    first = await daemons.start(env=env)
    job = await submit_ok(client, first, APPS / "echo", mode="serve")
    await wait_for_state(client, first, job["id"], {"serving"})
    await first.stop()

    second = await daemons.start()
    ended = await get_job(client, second, job["id"])

    assert ended["state"] == "stopped"
    assert not await container_exists(job["id"])


async def test_oom_killed_job_reason(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "hungry"
    project.mkdir()
    # Writing every byte makes the kernel back all 256 MiB with real pages.
    (project / "eat.py").write_text("print('allocating', flush=True)\nblock = b'x' * (256 * 1024 * 1024)\n")
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, project, command="python eat.py", memory="64m")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=60)

    assert ended["reason"] == "out of memory"
    assert ended["exit_code"] == 137


async def test_exit_137_without_oom_is_not_oom(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "killer"
    project.mkdir()
    (project / "run.sh").write_text("kill -9 $$\n")
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, project, command="sh run.sh")
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=60)

    assert ended["exit_code"] == 137
    assert ended["reason"] == "exited with code 137"


async def test_container_is_confined(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve", memory="256m", cpus="0.5")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    async with aiodocker.Docker() as docker:
        info = await docker.containers.container(f"floydd-{job['id']}").show()
    host = info["HostConfig"]
    binds = sorted(bind.split(":")[1] for bind in host["Binds"])

    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert "SYS_ADMIN" not in host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] == 4096
    assert host["Memory"] == 256 * 1024 * 1024
    assert host["MemorySwap"] == 256 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000
    assert job["memory_bytes"] == 256 * 1024 * 1024
    assert job["cpus"] == 0.5
    assert job["concurrency"] == 1
    assert binds == ["/code", "/output"]
    assert not any("docker.sock" in bind for bind in host["Binds"])
    assert host["NetworkMode"] == "floydd-jobs"
    async with aiodocker.Docker() as docker:
        network = await (await docker.networks.get("floydd-jobs")).show()
    assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"


async def test_serve_oom_ends_queued_requests(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "hungry"
    project.mkdir()
    (project / "app.py").write_text(
        "from flask import Flask\n"
        "app = Flask(__name__)\n"
        "@app.get('/eat')\n"
        "def eat():\n"
        "    block = b'x' * (1024 * 1024 * 1024)\n"
        "    return str(len(block))\n"
        "app.run(host='0.0.0.0', port=5000)\n"
    )
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, project, mode="serve", memory="128m")
    await wait_for_state(client, daemon, job["id"], {"serving"})

    async def call() -> tuple[int, str]:
        async with client.get(f"{job['endpoint']}/eat") as response:
            return response.status, await response.text()

    first = asyncio.create_task(call())
    await asyncio.sleep(0.05)
    queued = [asyncio.create_task(call()) for _ in range(3)]
    answers = await asyncio.wait_for(asyncio.gather(first, *queued), timeout=60)
    ended = await wait_for_state(client, daemon, job["id"], {"failed"}, timeout_s=30)

    assert ended["reason"] == "out of memory"
    # The request in the app when it died gets a 502 that names the reason;
    # those still queued are answered at once with the job's final state.
    first_status, first_body = answers[0]
    assert first_status == 502
    assert "out of memory" in first_body
    for status, body in answers[1:]:
        assert status == 503
        assert "out of memory" in body


async def test_exit_while_down_is_recorded(daemons: Daemons, client: aiohttp.ClientSession, tmp_path) -> None:
    project = tmp_path / "short"
    project.mkdir()
    (project / "run.sh").write_text("echo begin\nsleep 2\necho end\nexit 4\n")
    first = await daemons.start()
    job = await submit_ok(client, first, project, command="sh run.sh")
    await wait_for_state(client, first, job["id"], {"running"})
    await daemons.kill()
    await asyncio.sleep(4)

    restarted_at = datetime.now(UTC)
    second = await daemons.start()
    ended = await wait_for_state(client, second, job["id"], {"failed"}, timeout_s=30)
    logs = await get_logs(client, second, job["id"])

    # The exit time Docker recorded, before floydd came back.
    assert datetime.fromisoformat(ended["ended_at"]) < restarted_at
    assert ended["exit_code"] == 4
    assert ended["reason"] == "exited with code 4"
    assert logs == "begin\nend\n"
    assert not await container_exists(job["id"])


async def test_serve_exit_while_down_gets_no_requests(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    first, job = await serving_job_then_sigkill(daemons, client)
    async with aiodocker.Docker() as docker:
        await docker.containers.container(f"floydd-{job['id']}").kill()

    second = await daemons.start()
    async with client.get(f"{job['endpoint'].replace(first.url, second.url)}/after-exit") as response:
        status = response.status
        error = await response.json()
    ended = await wait_for_state(client, second, job["id"], {"failed"}, timeout_s=30)

    assert status == 503
    assert error["error"] == "job_not_serving"
    assert ended["reason"] == "exited with code 137"
    assert second.logged("job_adopted", job_id=job["id"], container_running=False)


async def test_sigterm_finishes_request_in_flight(daemons: Daemons, client: aiohttp.ClientSession) -> None:
    daemon = await daemons.start()
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})

    async def slow_call() -> tuple[int, str]:
        async with client.get(f"{job['endpoint']}/stream?lines=8&delay=0.25") as response:
            return response.status, await response.text()

    call = asyncio.create_task(slow_call())
    await asyncio.sleep(0.5)
    daemon.process.terminate()
    status, text = await call
    exit_code = await daemon.stop()

    assert status == 200
    assert text == "".join(f"line {index}\n" for index in range(8))
    assert exit_code == 0
    assert await container_exists(job["id"])


async def test_job_killed_while_starting_relaunched(
    daemons: Daemons, client: aiohttp.ClientSession, tmp_path, default_image: str
) -> None:
    project = tmp_path / "once"
    project.mkdir()
    (project / "run.sh").write_text("echo ran\n")
    first = await daemons.start()
    job = await submit_ok(client, first, project, command="sh run.sh")
    await wait_for_state(client, first, job["id"], {"succeeded"})
    await daemons.kill()
    # The state a SIGKILL leaves between `docker create` and recording the
    # container's id: the record says starting, and a created container exists.
    with sqlite3.connect(daemons.state_dir / "floydd.sqlite3") as database:
        database.execute(
            "UPDATE jobs SET state = 'starting', container_id = NULL, ended_at = NULL, exit_code = NULL WHERE id = ?",
            (job["id"],),
        )
    instance = (daemons.state_dir / "instance-id").read_text().strip()
    labels = {"org.floydd.managed": "true", "org.floydd.instance": instance, "org.floydd.job": job["id"]}
    async with aiodocker.Docker() as docker:
        await docker.containers.create(
            {"Image": default_image, "Cmd": ["sleep", "300"], "Labels": labels}, name=f"floydd-{job['id']}"
        )

    second = await daemons.start()
    ended = await wait_for_state(client, second, job["id"], {"succeeded"}, timeout_s=60)

    assert second.logged("job_relaunched", job_id=job["id"])
    assert ended["exit_code"] == 0
    assert await get_logs(client, second, job["id"]) == "ran\n"
    assert not await container_exists(job["id"])

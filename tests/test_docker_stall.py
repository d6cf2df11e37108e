"""A Docker engine that stops responding, simulated by a proxy socket that stops relaying.

Pausing the real dockerd (`kill -STOP`) would stall every other user of the
shared engine, so the daemon under test reaches Docker through a unix-socket
proxy instead. A paused proxy behaves like a paused engine for floydd:
connections open, requests go out, and no answer comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    APPS,
    Daemon,
    container_exists,
    get_job,
    remove_job_containers,
    start_daemon,
    submit,
    tar_gz,
    wait_for_state,
)

pytestmark = pytest.mark.docker

CALL_TIMEOUT_S = 2


class StallingProxy:
    """A unix-socket relay to the Docker engine that can hold all traffic, like a stopped dockerd."""

    def __init__(self, path: Path, engine: str) -> None:
        self.path = path
        self.engine = engine
        self.flowing = asyncio.Event()
        self.flowing.set()
        # The engine's responses to requests that contain this marker are held until release().
        self._held_marker: bytes | None = None
        self._held: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._relay, path=str(self.path))

    def hold_responses(self, marker: bytes) -> None:
        """Let requests that contain `marker` reach the engine, and hold the engine's responses until release()."""
        self._held_marker = marker

    def release(self) -> None:
        self._held_marker = None
        for responses in self._held:
            responses.set()

    async def cut(self) -> int:
        """Break every open connection, as a dockerd restart does; return how many pipes were cut."""
        pipes = list(self._tasks)
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        return len(pipes)

    async def close(self) -> None:
        self.flowing.set()
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        engine_reader, engine_writer = await asyncio.open_unix_connection(self.engine)
        responses = asyncio.Event()
        responses.set()
        pipes = [
            asyncio.create_task(self._pipe(client_reader, engine_writer, on_request=responses)),
            asyncio.create_task(self._pipe(engine_reader, client_writer, gate=responses)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._tasks.difference_update(pipes)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        *,
        on_request: asyncio.Event | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        """Copy bytes from `source` to `target`.

        The request pipe gets `on_request`, the connection's response gate, and closes it for a held request.
        The response pipe gets the same event as `gate` and waits for it to open.
        """
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                if gate is not None:
                    await gate.wait()
                if on_request is not None and self._held_marker is not None and self._held_marker in data:
                    on_request.clear()
                    self._held.append(on_request)
                target.write(data)
                await target.drain()
        finally:
            target.close()
            with contextlib.suppress(OSError):
                await target.wait_closed()


@pytest.fixture
async def stalled(tmp_path: Path, docker_engine: None) -> AsyncIterator[tuple[StallingProxy, Daemon]]:
    engine = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    assert engine.startswith("unix://"), "this test relays a unix socket"
    proxy = StallingProxy(tmp_path / "docker.sock", engine.removeprefix("unix://"))
    await proxy.start()
    env = {"DOCKER_HOST": f"unix://{proxy.path}", "FLOYDD_DOCKER_CALL_TIMEOUT_S": str(CALL_TIMEOUT_S)}
    daemon = await start_daemon(tmp_path / "state", env=env)
    try:
        yield proxy, daemon
    finally:
        proxy.flowing.set()
        await daemon.stop()
        await remove_job_containers(daemon)
        await proxy.close()


async def test_api_answers_while_docker_hangs(
    stalled: tuple[StallingProxy, Daemon], client: aiohttp.ClientSession
) -> None:
    proxy, daemon = stalled
    archive = tar_gz(APPS / "echo", top="echo")
    status, job = await submit(client, daemon, archive, mode="serve")
    assert status == 201, job
    await wait_for_state(client, daemon, job["id"], {"serving"})

    proxy.flowing.clear()
    shown = await get_job(client, daemon, job["id"])
    async with client.get(f"{job['endpoint']}/during-stall") as response:
        proxied = response.status
    rejected_status, rejected = await submit(client, daemon, archive, mode="serve")

    proxy.flowing.set()
    recovered_status, recovered = await submit(client, daemon, archive, mode="serve")
    assert recovered_status == 201, recovered
    await wait_for_state(client, daemon, recovered["id"], {"serving"})

    assert shown["state"] == "serving"
    assert proxied == 200
    assert rejected_status == 503
    assert rejected["error"] == "docker_unavailable"
    assert f"within {CALL_TIMEOUT_S} s" in rejected["detail"]
    assert (await get_job(client, daemon, job["id"]))["state"] == "serving"


async def test_broken_streams_resume(
    stalled: tuple[StallingProxy, Daemon], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, daemon = stalled
    project = tmp_path / "counter"
    project.mkdir()
    (project / "count.py").write_text(
        "import time\nfor index in range(40):\n    print(f'line {index}', flush=True)\n    time.sleep(0.1)\n"
    )
    status, job = await submit(client, daemon, tar_gz(project), command="python count.py")
    assert status == 201, job
    await wait_for_state(client, daemon, job["id"], {"running"})
    await asyncio.sleep(1)
    cut = await proxy.cut()

    ended = await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/logs") as response:
        logs = await response.text()

    assert cut >= 4
    assert ended["exit_code"] == 0
    assert logs.splitlines() == [f"line {index}" for index in range(40)]
    assert daemon.logged("container_wait_retried")
    assert daemon.logged("job_logs_interrupted", job_id=job["id"])


async def test_shutdown_mid_create_removes_container(
    stalled: tuple[StallingProxy, Daemon], client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy, daemon = stalled
    project = tmp_path / "idle"
    project.mkdir()
    (project / "run.sh").write_text("sleep 60\n")
    proxy.hold_responses(b"/containers/create")
    status, job = await submit(client, daemon, tar_gz(project), command="sh run.sh")
    assert status == 201, job
    # The engine has made the container, and floydd waits for the response.
    await _until(lambda: container_exists(job["id"]))

    daemon.process.terminate()
    await _until(lambda: bool(daemon.logged("container_create_settling", job_id=job["id"])))
    proxy.release()
    exit_code = await daemon.stop()

    assert exit_code == 0
    assert daemon.logged("container_create_undone", job_id=job["id"])
    assert not await container_exists(job["id"])


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            done = check()
            if not isinstance(done, bool):
                done = await done
            if done:
                return
            await asyncio.sleep(0.05)

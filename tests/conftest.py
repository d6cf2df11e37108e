"""Fixtures: a real floydd daemon on an ephemeral port, a real HTTP client, real Docker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from floydd.config import load_settings
from floydd.runtime import LABEL_INSTANCE

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
DATA = REPO / "tests" / "data"
EXAMPLES = REPO / "examples"
CONFIG = REPO / "floydd.toml"
FINAL_STATES = {"succeeded", "failed", "stopped", "timed_out"}
# Admin token of each daemon the tests started, by base URL; the `client` fixture sends it.
ADMIN_TOKENS: dict[str, str] = {}


def tar_gz(folder: Path, top: str | None = None) -> bytes:
    """Pack `folder` as a .tar.gz, inside one top folder named `top` when given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            if "__pycache__" in path.parts:
                continue
            relative = path.relative_to(folder).as_posix()
            archive.add(path, arcname=f"{top}/{relative}" if top else relative, recursive=False)
    return buffer.getvalue()


@dataclass
class Daemon:
    """A floydd process started by the tests, and what it logged."""

    url: str
    state_dir: Path
    process: asyncio.subprocess.Process
    admin_token: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.events
            if line.get("event") == event and all(line.get(key) == value for key, value in fields.items())
        ]

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(30):
                code = await self.process.wait()
        except TimeoutError:
            self.process.kill()
            code = await self.process.wait()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)
        return code


async def start_daemon(state_dir: Path, env: dict[str, str] | None = None, config: Path = CONFIG) -> Daemon:
    """Create an admin token, start `floydd serve --port 0`, and return once it listens."""
    admin_token = await create_token(state_dir, "admin", "--admin", config=config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "floydd", "--log-format", "json", "serve",
        "--config", str(config), "--port", "0", "--state-dir", str(state_dir),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    daemon = Daemon(url="", state_dir=state_dir, process=process, admin_token=admin_token)
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    daemon.reader = asyncio.create_task(_read_events(daemon, listening))
    try:
        async with asyncio.timeout(60):
            daemon.url = await listening
    except BaseException:
        await daemon.stop()
        raise
    ADMIN_TOKENS[daemon.url] = admin_token
    return daemon


async def create_token(state_dir: Path, *args: str, config: Path = CONFIG) -> str:
    """Run `floydd token create ARGS` on a state dir and return the printed token."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "floydd", "token", "create", *args,
        "--config", str(config), "--state-dir", str(state_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")
    return stdout.decode().strip()


def admin_headers(daemon: Daemon) -> dict[str, str]:
    """Return the header that authenticates as the daemon's admin, for sessions without `send_admin_token`."""
    return {"Authorization": f"Bearer {daemon.admin_token}"}


async def send_admin_token(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: send the admin token of the daemon a request goes to, unless it has its own."""
    token = ADMIN_TOKENS.get(str(request.url.origin()))
    if token and "Authorization" not in request.headers:
        request.headers["Authorization"] = f"Bearer {token}"
    return await handler(request)


async def _read_events(daemon: Daemon, listening: asyncio.Future[str]) -> None:
    assert daemon.process.stderr is not None
    output: list[bytes] = []
    async for line in daemon.process.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            output.append(line)
            sys.stderr.write(line.decode(errors="replace"))
            continue
        daemon.events.append(event)
        if event.get("event") == "floydd_listening" and not listening.done():
            listening.set_result(event["url"])
    if not listening.done():
        listening.set_exception(RuntimeError(f"floydd exited before listening: {b''.join(output)[-2000:]!r}"))


@pytest.fixture(scope="session")
def default_image() -> str:
    return load_settings(CONFIG).envs["flask"].image


@pytest.fixture(scope="session")
def docker_engine(default_image: str) -> Iterator[None]:
    """Fail, not skip, when the engine or the env image is missing: the suite needs both."""

    async def check() -> None:
        async with aiodocker.Docker() as docker:
            await docker.version()
            await docker.images.inspect(default_image)

    try:
        asyncio.run(check())
    except Exception as exc:
        pytest.fail(f"Docker engine or image {default_image} unavailable ({exc}); run scripts/bootstrap.sh")
    yield


@pytest.fixture
async def daemon(tmp_path: Path, docker_engine: None) -> AsyncIterator[Daemon]:
    async with running_daemon(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, env: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    """Run a daemon with a state dir under `tmp_path` and `env` overrides; stop it and its jobs' containers after."""
    running = await start_daemon(tmp_path / "state", env=env)
    try:
        yield running
    finally:
        await running.stop()
        await remove_job_containers(running)


async def remove_job_containers(daemon: Daemon) -> None:
    """Remove containers of this daemon's jobs, which outlive the daemon by design.

    The daemon's instance label finds them all, including one whose job is no longer in
    the state directory.
    """
    names = {f"floydd-{path.name}" for path in (daemon.state_dir / "jobs").glob("*")}
    instance_path = daemon.state_dir / "instance-id"
    async with aiodocker.Docker() as docker:
        if instance_path.exists():
            labelled = await docker.containers.list(
                all=True, filters={"label": [f"{LABEL_INSTANCE}={instance_path.read_text().strip()}"]}
            )
            names.update(container["Names"][0].lstrip("/") for container in labelled)
        for name in names:
            try:
                await docker.containers.container(name).delete(force=True)
            except aiodocker.DockerError:
                pass


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=120), middlewares=(send_admin_token,)
    ) as session:
        yield session


async def submit(
    client: aiohttp.ClientSession, daemon: Daemon, archive: bytes, filename: str = "project.tar.gz", **fields: str
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("code", archive, filename=filename, content_type="application/gzip")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form, headers=admin_headers(daemon)) as response:
        return response.status, await response.json()


async def submit_ok(client: aiohttp.ClientSession, daemon: Daemon, folder: Path, **fields: str) -> dict[str, Any]:
    status, body = await submit(client, daemon, tar_gz(folder, top=folder.name), **fields)
    assert status == 201, body
    return body


async def get_job(client: aiohttp.ClientSession, daemon: Daemon, job_id: str) -> dict[str, Any]:
    async with client.get(f"{daemon.url}/api/v1/jobs/{job_id}", headers=admin_headers(daemon)) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def wait_for_state(
    client: aiohttp.ClientSession, daemon: Daemon, job_id: str, states: set[str], timeout_s: float = 120
) -> dict[str, Any]:
    """Poll the job until it reaches one of `states`; fail early if it ends in another."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await get_job(client, daemon, job_id)
        if job["state"] in states:
            return job
        if job["state"] in FINAL_STATES:
            logs = await get_logs(client, daemon, job_id)
            pytest.fail(f"job ended {job['state']} ({job.get('reason')}) while waiting for {states}:\n{logs}")
        if time.monotonic() > deadline:
            pytest.fail(f"job still {job['state']} after {timeout_s} s, expected {states}")
        await asyncio.sleep(0.2)


async def get_logs(client: aiohttp.ClientSession, daemon: Daemon, job_id: str) -> str:
    async with client.get(f"{daemon.url}/api/v1/jobs/{job_id}/logs", headers=admin_headers(daemon)) as response:
        assert response.status == 200
        return await response.text()


async def container_exists(job_id: str) -> bool:
    async with aiodocker.Docker() as docker:
        try:
            await docker.containers.container(f"floydd-{job_id}").show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise
    return True

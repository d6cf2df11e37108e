"""The servers under test: a floydd daemon and its serve jobs, HAProxy 2.6, and the reference servers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "style-transfer"
BENCH_APP = REPO / "bench" / "app" / "app.py"
LOOPBACK = "127.0.0.1"
APP_PORT = 5000
INSTANCE_LABEL = "org.floydd.instance"


class BenchError(RuntimeError):
    """A step of the benchmark that failed, so its numbers would mean nothing."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        # HTTP status of floydd's response, when the failure was one.
        self.status = status


def bench_app_files() -> dict[str, bytes]:
    """Return the files of the benchmark app: the example renamed to example_app.py, styles.py, the bench app.

    The example's floyd_requirements.txt is left out on purpose: it lists
    nothing, and leaving it out keeps a pip start-up out of the cold-start time.
    """
    return {
        "app.py": BENCH_APP.read_bytes(),
        "example_app.py": (EXAMPLE / "app.py").read_bytes(),
        "styles.py": (EXAMPLE / "styles.py").read_bytes(),
    }


def write_bench_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in bench_app_files().items():
        (folder / name).write_bytes(content)
    return folder


def bench_app_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in bench_app_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = int(time.time())
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def free_port() -> int:
    # NOTE: another process may take the port between this close and the caller's bind.
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing accepted connections on {LOOPBACK}:{port} within {timeout_s:g} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


@dataclass
class Floydd:
    """A `floydd serve --port 0` process with a temporary state directory, and its serve jobs."""

    results_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="floydd-bench-")))
    process: asyncio.subprocess.Process | None = None
    session: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.results_dir / "floydd.log"

    async def start(self, timeout_s: float = 60) -> None:
        token = await self._create_admin_token()
        log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "floydd", "--log-format", "json", "serve",
            "--port", "0", "--state-dir", str(self.state_dir),
            stdout=log, stderr=log,
            env={**os.environ, **self.env},
        )  # fmt: skip
        log.close()
        self.url = await self._wait_listening(timeout_s)
        # The API needs a token; /expose of a public job, which the load uses, does not.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=600), headers={"Authorization": f"Bearer {token}"}
        )

    async def _create_admin_token(self) -> str:
        """Create an admin token in the daemon's state dir with `floydd token create`."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "floydd", "token", "create", "bench", "--admin",
            "--state-dir", str(self.state_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env},
        )  # fmt: skip
        stdout, stderr = await process.communicate()
        if process.returncode != 0:
            raise BenchError(f"floydd token create failed: {stderr.decode(errors='replace')[-500:]}")
        return stdout.decode().strip()

    async def _wait_listening(self, timeout_s: float) -> str:
        """Read the daemon's JSON log until its floydd_listening line, which carries the URL."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise BenchError(f"floydd exited with {self.process.returncode}; see {self.log_path}")
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"floydd_listening"' in line:
                    return str(json.loads(line)["url"])
            await asyncio.sleep(0.1)
        raise BenchError(f"floydd did not log floydd_listening within {timeout_s:g} s; see {self.log_path}")

    async def instance_id(self) -> str:
        return (self.state_dir / "instance-id").read_text().strip()

    async def submit_serve_job(self, archive: bytes) -> str:
        assert self.session is not None
        form = aiohttp.FormData()
        form.add_field("mode", "serve")
        form.add_field("code", archive, filename="bench-app.tar.gz", content_type="application/gzip")
        async with self.session.post(f"{self.url}/api/v1/jobs", data=form) as response:
            body = await response.json()
            if response.status != 201:
                raise BenchError(f"job submission failed with {response.status}: {body}", status=response.status)
        return str(body["id"])

    async def job(self, job_id: str) -> dict[str, Any]:
        assert self.session is not None
        async with self.session.get(f"{self.url}/api/v1/jobs/{job_id}") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def wait_serving(self, job_id: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = await self.job(job_id)
            if job["state"] == "serving":
                return
            if job["state"] not in ("queued", "starting"):
                raise BenchError(f"job {job_id} ended {job['state']} ({job.get('reason')}) instead of serving")
            await asyncio.sleep(0.2)
        raise BenchError(f"job {job_id} was not serving after {timeout_s:g} s")

    def expose_url(self, job_id: str, path: str) -> str:
        return f"{self.url}/expose/{job_id}{path}"

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    async def remove_containers(self) -> int:
        """Force-remove the containers of this daemon's instance, which outlive the daemon by design."""
        instance = await self.instance_id()
        filters = json.dumps({"label": [f"{INSTANCE_LABEL}={instance}"]})
        async with aiodocker.Docker() as docker:
            containers = await docker.containers.list(all=True, filters=filters)
            await asyncio.gather(*(container.delete(force=True) for container in containers), return_exceptions=True)
        return len(containers)

    def remove_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)


async def published_port(container_name: str) -> int:
    """Return the host port on 127.0.0.1 that Docker published for the container's port 5000."""
    async with aiodocker.Docker() as docker:
        info = await docker.containers.container(container_name).show()
    bindings = (info["NetworkSettings"].get("Ports") or {}).get(f"{APP_PORT}/tcp") or []
    for binding in bindings:
        if binding.get("HostIp") == LOOPBACK and binding.get("HostPort"):
            return int(binding["HostPort"])
    raise BenchError(f"container {container_name} has no port published on {LOOPBACK} for {APP_PORT}/tcp")


async def container_pid(container_name: str) -> int:
    """Return the host pid of the container's first process (docker-init, with the app below it)."""
    async with aiodocker.Docker() as docker:
        info = await docker.containers.container(container_name).show()
    pid = int(info["State"].get("Pid") or 0)
    if not pid:
        raise BenchError(f"container {container_name} is not running (`docker inspect {container_name}` shows why)")
    return pid


HAPROXY_CONFIG = """\
global
    # Far above the 64 clients of the rounds, and low enough for a 20,000 open-file limit.
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    # Requests wait for the one server slot at most this long, like floydd's proxy.queue_timeout_s.
    timeout queue 300s

frontend bench
    bind {host}:{listen_port}
{forwarding}    default_backend app

backend app
    # maxconn 1 serialises requests into the app; the others wait in the backend's queue.
    server app {host}:{app_port} maxconn 1
"""


@dataclass
class LocalServer:
    """A server process on 127.0.0.1 that the benchmark starts, measures by pid, and stops."""

    results_dir: Path
    port: int = 0
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def _spawn(self, name: str, *command: str) -> None:
        """Run `command`, logging to `<name>.log`, and wait until it listens on `self.port`."""
        log_path = self.results_dir / f"{name}.log"
        log = log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=log, cwd=REPO)
        log.close()
        try:
            await wait_for_port(self.port, timeout_s=10)
        except BenchError:
            raise BenchError(f"{name} did not start; see {log_path}") from None

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


# The headers floydd adds to every request it sends the app (floydd.proxy.upstream_headers),
# in HAProxy 2.6's terms, so that the app receives the same headers through both.
HAPROXY_FORWARDING = """\
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Forwarded-Prefix {prefix}
    unique-id-format %[uuid()]
    unique-id-header X-Request-ID
"""


@dataclass
class HAProxy(LocalServer):
    """HAProxy in front of one app port with `maxconn 1` and a queue, as the classic way to serialise requests.

    With `forwarded_prefix`, it adds the same forwarding and request-id
    headers as floydd, with that X-Forwarded-Prefix. Without it, HAProxy adds no header.
    """

    app_port: int = 0
    forwarded_prefix: str = ""
    name: str = "haproxy"

    async def start(self) -> None:
        self.port = free_port()
        config = self.results_dir / f"{self.name}.cfg"
        forwarding = HAPROXY_FORWARDING.format(prefix=self.forwarded_prefix) if self.forwarded_prefix else ""
        config.write_text(
            HAPROXY_CONFIG.format(host=LOOPBACK, listen_port=self.port, app_port=self.app_port, forwarding=forwarding)
        )
        # -db keeps HAProxy in the foreground, as one process, so its pid is the one to measure.
        await self._spawn(self.name, "haproxy", "-db", "-f", str(config))


@dataclass
class ReferenceServer(LocalServer):
    """One of the servers in bench/reference.py, run as its own process so its CPU time can be read."""

    kind: str = ""
    app_port: int | None = None

    async def start(self) -> None:
        self.port = free_port()
        arguments = [self.kind, str(self.port)] + ([str(self.app_port)] if self.app_port is not None else [])
        await self._spawn(self.kind, sys.executable, "-m", "bench.reference", *arguments)

"""The Docker side of a job: one container per job, through aiodocker.

Every call that should return promptly runs under `docker.call_timeout_s`,
so a hung engine turns into a `RuntimeFailure` instead of a hung job; the
calls that last as long as the container (wait, log follow) have none.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
import structlog
from aiodocker.exceptions import DockerError

from floydd.config import DockerSettings
from floydd.errors import RuntimeFailure
from floydd.jobs import Job, JobMode
from floydd.kernellog import oom_kill_logged

log = structlog.get_logger(__name__)

T = TypeVar("T")

LABEL_MANAGED = "org.floydd.managed"
LABEL_JOB = "org.floydd.job"
LABEL_MODE = "org.floydd.mode"
# Which daemon owns a container: several floydd instances (or test runs) may
# share one engine, and each reconciles only its own containers.
LABEL_INSTANCE = "org.floydd.instance"
# Docker's bridge driver option that, set to "false", drops traffic between
# containers on the same network.
ICC_OPTION = "com.docker.network.bridge.enable_icc"
APP_PORT = 5000
# 128 + SIGKILL: the exit code of an OOM kill, and of any other SIGKILL.
SIGKILL_EXIT_CODE = 137
# NOTE: one second in all is an estimate of how late dockerd may set OOMKilled.
OOM_FLAG_POLLS = 5
OOM_FLAG_POLL_INTERVAL_S = 0.2
# Maximum pause between two tries of a wait or log stream that the engine broke off.
MAX_RETRY_DELAY_S = 30.0

# The line that SERVE_SCRIPT prints, followed by pip's exit code, when installing the requirements failed.
INSTALL_FAILED_MARKER = "floydd: installing floyd_requirements.txt failed with exit code"
# Serve mode: install the project's requirements when present, then hand the
# process over to the app so it receives the container's signals directly.
SERVE_SCRIPT = f"""\
set -e
if [ -f floyd_requirements.txt ]; then
    echo "floydd: installing floyd_requirements.txt"
    python -m pip install --disable-pip-version-check --no-input -r floyd_requirements.txt || {{
        status=$?
        echo "{INSTALL_FAILED_MARKER} $status"
        exit $status
    }}
fi
echo "floydd: starting python app.py"
exec python app.py
"""


@dataclass(frozen=True)
class ContainerExit:
    exit_code: int
    oom_killed: bool
    error: str = ""
    # When the container stopped, as Docker recorded it; None when unknown.
    finished_at: datetime | None = None


@dataclass(frozen=True)
class LogMessage:
    # Nanoseconds since the epoch, as Docker stamped the message.
    timestamp_ns: int
    text: str


def parse_log_message(chunk: str) -> LogMessage:
    """Split `2026-01-02T03:04:05.123456789Z text` into its timestamp and text."""
    stamp, _, text = chunk.partition(" ")
    try:
        return LogMessage(parse_rfc3339_ns(stamp), text)
    except ValueError:
        # Not stamped: keep the text, and resume from the last stamped message.
        return LogMessage(0, chunk)


def _finished_at(state: dict[str, Any]) -> datetime | None:
    """Return the container's stop time from its inspect state, or None if Docker has none."""
    try:
        finished_ns = parse_rfc3339_ns(str(state.get("FinishedAt") or ""))
    except ValueError:
        return None
    # Docker reports 0001-01-01T00:00:00Z for a container that has not stopped.
    if finished_ns <= 0:
        return None
    return datetime.fromtimestamp(finished_ns / 1e9, UTC)


def parse_rfc3339_ns(stamp: str) -> int:
    """Return nanoseconds since the epoch for a UTC RFC 3339 time with up to 9 fraction digits."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((fraction + "000000000")[:9])


@dataclass(frozen=True)
class ManagedContainer:
    id: str
    job_id: str
    running: bool
    # Docker's state name: created, running, exited, ...
    state: str = ""


def container_name(job_id: str) -> str:
    return f"floydd-{job_id}"


# Capabilities a job's container keeps; every other one is dropped. Jobs run
# as root inside the container because `pip install` and the env images expect
# it, and these are what that needs:
#   CHOWN, FOWNER: pip and tar set owners and modes on the files they unpack;
#   DAC_OVERRIDE: root writes to /code and /output, owned by floydd's user;
#   SETUID, SETGID: apt and similar tools switch to an unprivileged user;
#   KILL: the init process forwards signals to the app's processes.
KEPT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL")


@dataclass(frozen=True)
class Mount:
    """A host folder bound into a job's container."""

    source: Path
    target: str
    read_only: bool = True

    def bind(self) -> str:
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a job's container gets from the host: folders, limits and devices."""

    code_dir: Path
    output_dir: Path
    memory_bytes: int
    nano_cpus: int
    pids_limit: int
    # Read-only datasets and outputs of earlier jobs.
    data_mounts: tuple[Mount, ...] = ()
    # GPU UUIDs (or indexes) handed to the container, exclusively this job's.
    gpu_device_ids: tuple[str, ...] = ()


def container_config(job: Job, spec: ContainerSpec, instance_id: str, network: str = "") -> dict[str, Any]:
    """Build the Docker create body for a job's container."""
    if job.mode is JobMode.SERVE:
        command = ["sh", "-c", SERVE_SCRIPT]
    else:
        command = ["sh", "-c", job.command or "true"]
    mounts = (Mount(spec.code_dir, "/code", read_only=False), Mount(spec.output_dir, "/output", read_only=False))
    host_config: dict[str, Any] = {
        "Binds": [mount.bind() for mount in (*mounts, *spec.data_mounts)],
        # docker-init (tini) as PID 1 reaps the app's children and forwards SIGTERM.
        "Init": True,
        "RestartPolicy": {"Name": "no"},
        **confinement(spec),
    }
    if network:
        host_config["NetworkMode"] = network
    if spec.gpu_device_ids:
        host_config["DeviceRequests"] = [
            {"Driver": "nvidia", "DeviceIDs": list(spec.gpu_device_ids), "Capabilities": [["gpu"]]}
        ]
    config: dict[str, Any] = {
        "Image": job.image,
        "Cmd": command,
        "WorkingDir": "/code",
        "Env": [
            "PYTHONUNBUFFERED=1",
            # Debian's Python refuses pip installs outside a venv; a job's
            # container is disposable, so installing into it is intended.
            "PIP_BREAK_SYSTEM_PACKAGES=1",
            "PIP_ROOT_USER_ACTION=ignore",
            f"FLOYDD_JOB_ID={job.id}",
        ],
        "Labels": {
            LABEL_MANAGED: "true",
            LABEL_INSTANCE: instance_id,
            LABEL_JOB: job.id,
            LABEL_MODE: job.mode.value,
        },
        "HostConfig": host_config,
    }
    if job.mode is JobMode.SERVE:
        config["ExposedPorts"] = {f"{APP_PORT}/tcp": {}}
        # An empty HostPort lets Docker pick a free port, on loopback only.
        host_config["PortBindings"] = {f"{APP_PORT}/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    return config


def confinement(spec: ContainerSpec) -> dict[str, Any]:
    """Return the HostConfig keys that confine a job, set on every container floydd creates."""
    return {
        "Privileged": False,
        "CapDrop": ["ALL"],
        "CapAdd": list(KEPT_CAPABILITIES),
        # setuid binaries inside the image cannot raise privileges.
        "SecurityOpt": ["no-new-privileges:true"],
        "PidsLimit": spec.pids_limit,
        "Memory": spec.memory_bytes,
        # Equal to Memory: no swap, so a job over its limit is OOM-killed instead of thrashing.
        "MemorySwap": spec.memory_bytes,
        "NanoCpus": spec.nano_cpus,
    }


def describe_command(job: Job) -> str:
    return "python app.py" if job.mode is JobMode.SERVE else shlex.quote(job.command or "")


class DockerRuntime:
    def __init__(self, settings: DockerSettings, instance_id: str) -> None:
        self._settings = settings
        self.instance_id = instance_id
        self._docker: aiodocker.Docker | None = None
        # The CPUs the engine can give a container; Docker rejects a larger NanoCpus. Set by open().
        self.host_cpus = os.cpu_count() or 1

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("DockerRuntime.open() was not called")
        return self._docker

    async def open(self) -> None:
        self._docker = _connect(self._settings.url)
        version = await self._call(self.docker.version(), "version")
        try:
            info = await self._call(self.docker.system.info(), "info")
            self.host_cpus = int(info.get("NCPU") or self.host_cpus)
        except RuntimeFailure as exc:
            # A socket proxy may allow the calls floydd needs but not this one; this host's count is the next best.
            log.warning("docker_info_failed", error=exc.detail, host_cpus=self.host_cpus)
        log.info(
            "docker_connected",
            version=version.get("Version"),
            api_version=version.get("ApiVersion"),
            host_cpus=self.host_cpus,
        )
        if self._settings.network:
            await self._ensure_network(self._settings.network)

    async def _ensure_network(self, name: str) -> None:
        """Create the job network with inter-container traffic disabled, unless it exists."""
        info = await self._network_info(name)
        if info is None:
            config = {
                "Name": name,
                "Driver": "bridge",
                "CheckDuplicate": True,
                "Options": {ICC_OPTION: "false"},
                "Labels": {LABEL_MANAGED: "true"},
            }
            try:
                await self._call(self.docker.networks.create(config), "network create")
                log.info("job_network_created", network=name)
            except RuntimeFailure as exc:
                # Another daemon on the same engine may have created it first.
                if not (isinstance(exc.__cause__, DockerError) and exc.__cause__.status == 409):
                    raise
            info = await self._network_info(name)
        options = (info or {}).get("Options") or {}
        if options.get(ICC_OPTION) != "false":
            log.warning("job_network_allows_icc", network=name, detail="jobs on it can reach each other")

    async def _network_info(self, name: str) -> dict[str, Any] | None:
        try:
            network = await self._call(self.docker.networks.get(name), "network inspect")
            info: dict[str, Any] = await self._call(network.show(), "network inspect")
        except RuntimeFailure as exc:
            if isinstance(exc.__cause__, DockerError) and exc.__cause__.status == 404:
                return None
            raise
        return info

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            # aiodocker leaves a connector it was given open.
            await self._docker.connector.close()
            self._docker = None

    async def _call(self, call: Awaitable[T], what: str) -> T:
        try:
            async with asyncio.timeout(self._settings.call_timeout_s):
                return await call
        except TimeoutError as exc:
            raise RuntimeFailure(
                f"Docker engine did not respond to {what} within {self._settings.call_timeout_s:g} s"
            ) from exc
        except DockerError as exc:
            raise RuntimeFailure(f"Docker {what} failed: {exc.message}") from exc
        except OSError as exc:
            raise RuntimeFailure(f"Docker engine unreachable during {what}: {exc}") from exc

    async def image_exists(self, image: str) -> bool:
        try:
            await self._call(self.docker.images.inspect(image), "image inspect")
        except RuntimeFailure as exc:
            if isinstance(exc.__cause__, DockerError) and exc.__cause__.status == 404:
                return False
            raise
        return True

    async def create_container(self, job: Job, spec: ContainerSpec) -> str:
        config = container_config(job, spec, self.instance_id, self._settings.network)
        container = await self._call(
            self.docker.containers.create(config, name=container_name(job.id)), "container create"
        )
        return str(container.id)

    async def start_container(self, container_id: str) -> None:
        await self._call(self.docker.containers.container(container_id).start(), "container start")

    async def inspect(self, container_id: str) -> dict[str, Any] | None:
        """Return the container's inspect data, or None when it does not exist."""
        try:
            info: dict[str, Any] = await self._call(
                self.docker.containers.container(container_id).show(), "container inspect"
            )
        except RuntimeFailure as exc:
            if isinstance(exc.__cause__, DockerError) and exc.__cause__.status == 404:
                return None
            raise
        return info

    async def published_port(self, container_id: str) -> int:
        info = await self.inspect(container_id)
        if info is None:
            raise RuntimeFailure(f"container {container_id[:12]} vanished before its port was published")
        bindings = (info.get("NetworkSettings", {}).get("Ports") or {}).get(f"{APP_PORT}/tcp") or []
        for binding in bindings:
            if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
                return int(binding["HostPort"])
        raise RuntimeFailure(f"container {container_id[:12]} has no published port for {APP_PORT}/tcp")

    async def wait(self, container_id: str) -> ContainerExit:
        """Wait for the container to exit or vanish, however long the job runs.

        A broken connection or an engine that does not respond (dockerd
        restarting or hung) is retried with backoff instead of ending the job.
        """
        delay_s = 1.0
        while True:
            try:
                return await self._wait_once(container_id)
            except (RuntimeFailure, aiohttp.ClientError, OSError) as exc:
                log.warning("container_wait_retried", container_id=container_id[:12], error=str(exc), delay_s=delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)

    async def _wait_once(self, container_id: str) -> ContainerExit:
        container = self.docker.containers.container(container_id)
        try:
            result = await container.wait()
        except DockerError as exc:
            if exc.status == 404:
                return ContainerExit(exit_code=-1, oom_killed=False, error="container vanished")
            raise RuntimeFailure(f"Docker container wait failed: {exc.message}") from exc
        info = await self.inspect(container_id)
        state = (info or {}).get("State", {})
        # `docker rm -f` marks the container "removing" before it kills it, so a
        # removal is distinguished from an app killed by a signal (also 137).
        if info is None or state.get("Status") in ("removing", "dead"):
            return ContainerExit(exit_code=-1, oom_killed=False, error="container vanished")
        exit_code = int(result.get("StatusCode", state.get("ExitCode", -1)))
        oom_killed = bool(state.get("OOMKilled", False))
        if exit_code == SIGKILL_EXIT_CODE and not oom_killed:
            oom_killed = await self._late_oom_flag(container_id)
        return ContainerExit(
            exit_code=exit_code,
            oom_killed=oom_killed,
            error=str(state.get("Error") or ""),
            finished_at=_finished_at(state),
        )

    async def _late_oom_flag(self, container_id: str) -> bool:
        """Tell whether a container that exited with 137 was OOM-killed, when OOMKilled was false at first.

        dockerd handles the kernel's OOM event and the exit event separately,
        so OOMKilled can turn true shortly after the wait has returned, and on
        a busy engine it was seen to stay false. The `oom` event that dockerd
        publishes for the container is the second source, and the kernel log,
        where readable, the third.
        """
        started_at = ""
        for _ in range(OOM_FLAG_POLLS):
            await asyncio.sleep(OOM_FLAG_POLL_INTERVAL_S)
            info = await self.inspect(container_id)
            if info is None:
                return False
            if info.get("State", {}).get("OOMKilled"):
                return True
            started_at = str(info.get("State", {}).get("StartedAt") or "")
        if await self._call(self._oom_event_seen(container_id, started_at), "events"):
            return True
        in_kernel_log = await asyncio.to_thread(oom_kill_logged, container_id)
        if in_kernel_log:
            log.info("oom_kill_found_in_kernel_log", container_id=container_id[:12])
        return bool(in_kernel_log)

    async def _oom_event_seen(self, container_id: str, started_at: str) -> bool:
        try:
            since_s = parse_rfc3339_ns(started_at) // 1_000_000_000
        except ValueError:
            since_s = int(time.time()) - 24 * 3600
        params = {
            "since": str(since_s),
            # One second ahead, so an event from this very second is included.
            "until": str(int(time.time()) + 1),
            "filters": json.dumps({"container": [container_id], "event": ["oom"]}),
        }
        # NOTE: aiodocker has no call for a bounded event query, so this uses its request helper.
        async with self.docker._query("events", method="GET", params=params) as response:
            body = await response.read()
        return any(line.strip() for line in body.splitlines())

    async def stop(self, container_id: str, grace_s: int) -> None:
        container = self.docker.containers.container(container_id)
        try:
            # The stop call itself lasts up to grace_s while Docker waits for the exit.
            async with asyncio.timeout(grace_s + self._settings.call_timeout_s):
                await container.stop(t=grace_s)
        except DockerError as exc:
            # 304: already stopped; 404: already gone. Both are the outcome we want.
            if exc.status not in (304, 404):
                raise RuntimeFailure(f"Docker container stop failed: {exc.message}") from exc
        except TimeoutError as exc:
            raise RuntimeFailure(f"Docker engine did not stop container {container_id[:12]} in time") from exc

    async def remove(self, container_id: str) -> None:
        container = self.docker.containers.container(container_id)
        try:
            await self._call(container.delete(force=True, v=True), "container remove")
        except RuntimeFailure as exc:
            if isinstance(exc.__cause__, DockerError) and exc.__cause__.status in (404, 409):
                # 409: removal already in progress.
                return
            raise

    async def follow_logs(self, container_id: str, since_ns: int = 0) -> AsyncIterator[LogMessage]:
        """Yield the container's stdout and stderr messages from `since_ns` (inclusive) until it exits.

        Docker stamps every message with its arrival time in nanoseconds, so a
        reader that resumes after a restart can skip exactly the messages it stored.
        """
        container = self.docker.containers.container(container_id)
        since = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        stream = container.log(stdout=True, stderr=True, follow=True, since=since, timestamps=True)
        async for chunk in stream:
            yield parse_log_message(chunk)

    async def list_managed(self) -> list[ManagedContainer]:
        containers = await self._call(
            self.docker.containers.list(
                all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance_id}"]}
            ),
            "container list",
        )
        managed = []
        for container in containers:
            labels = container._container.get("Labels") or {}
            managed.append(
                ManagedContainer(
                    id=str(container.id),
                    job_id=str(labels.get(LABEL_JOB, "")),
                    running=container._container.get("State") == "running",
                    state=str(container._container.get("State") or ""),
                )
            )
        return managed


def _connect(url: str) -> aiodocker.Docker:
    """Return a Docker client whose connection pool has no size limit.

    Each job keeps two requests open for its whole life (container wait and
    log follow), so aiohttp's default pool of 100 connections would stall
    every other Docker call once about 50 jobs run.
    """
    target = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not target.startswith("unix://"):
        # NOTE: TCP and TLS engines keep aiodocker's own pool of 100 connections.
        return aiodocker.Docker(url=target)
    connector = aiohttp.UnixConnector(path=target[len("unix://") :], limit=0)
    docker = aiodocker.Docker(url=target, connector=connector)
    # aiodocker builds request URLs from docker_host; with a Unix socket the
    # host part is a placeholder, as it sets itself when it makes the connector.
    docker.docker_host = "unix://localhost"
    return docker

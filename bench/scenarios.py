"""The measurements besides the request-rate comparison: large bodies, many waiting clients, cold start, idle jobs."""

from __future__ import annotations

import asyncio
import collections
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from bench.procstat import RssSampler, cpu_seconds, memory_kib, open_fds
from bench.profiling import ProfileSummary, record
from bench.services import LOOPBACK, BenchError, Floydd, bench_app_archive, write_bench_app

MIB = 1024 * 1024
GIB = 1024 * MIB
UPLOAD_CHUNK_BYTES = MIB
SUBMIT_ATTEMPTS = 2


# Large bodies


@dataclass(frozen=True)
class Transfer:
    path: str
    direction: str
    bytes: int
    seconds: float
    # Growth of floydd's RSS over the transfer, sampled every 50 ms; None for the direct path.
    daemon_rss_growth_kib: int | None
    daemon_hwm_growth_kib: int | None

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MIB / self.seconds


async def _zeros(size: int) -> AsyncIterator[bytes]:
    chunk = bytes(UPLOAD_CHUNK_BYTES)
    remaining = size
    while remaining > 0:
        piece = chunk if remaining >= len(chunk) else chunk[:remaining]
        remaining -= len(piece)
        yield piece


async def _upload(session: aiohttp.ClientSession, url: str, size: int) -> None:
    # An explicit Content-Length makes aiohttp send the generator's bytes as they are, not chunked.
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    async with session.post(url, data=_zeros(size), headers=headers) as response:
        body = await response.json()
        if response.status != 200 or body.get("received") != size:
            raise BenchError(f"upload of {size} bytes to {url} failed: {response.status} {body}")


async def _download(session: aiohttp.ClientSession, url: str, size: int) -> None:
    received = 0
    async with session.get(url) as response:
        if response.status != 200:
            raise BenchError(f"download from {url} failed with {response.status}")
        async for chunk in response.content.iter_chunked(UPLOAD_CHUNK_BYTES):
            received += len(chunk)
    if received != size:
        raise BenchError(f"download from {url} returned {received} bytes, expected {size}")


async def measure_large_bodies(floydd: Floydd, job_id: str, direct_port: int, size: int = GIB) -> list[Transfer]:
    """Send `size` bytes up to the app and back down, directly and through floydd."""
    bases = {"direct": f"http://{LOOPBACK}:{direct_port}", "floydd": floydd.expose_url(job_id, "")}
    transfers: list[Transfer] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for direction in ("upload", "download"):
            for path, base in bases.items():
                if direction == "upload":
                    call = _upload(session, f"{base}/sink", size)
                else:
                    call = _download(session, f"{base}/source?bytes={size}", size)
                transfers.append(await _timed_transfer(floydd, path, direction, size, call))
    return transfers


async def _timed_transfer(floydd: Floydd, path: str, direction: str, size: int, call: Any) -> Transfer:
    hwm_before = memory_kib(floydd.pid)["VmHWM"]
    started = time.monotonic()
    async with RssSampler(floydd.pid) as sampler:
        await call
    seconds = time.monotonic() - started
    through_floydd = path == "floydd"
    return Transfer(
        path=path,
        direction=direction,
        bytes=size,
        seconds=seconds,
        daemon_rss_growth_kib=sampler.growth_kib if through_floydd else None,
        daemon_hwm_growth_kib=memory_kib(floydd.pid)["VmHWM"] - hwm_before if through_floydd else None,
    )


# Many waiting clients


@dataclass
class Crowd:
    clients: int
    queue_depth: int
    statuses: collections.Counter[str]
    max_waiting: int
    seconds: float
    daemon_rss_before_kib: int
    daemon_rss_max_kib: int
    daemon_fds_max: int
    daemon_cpu_s: float
    # Seconds from the start until the last client's connection was accepted.
    last_connect_s: float
    # Seconds from the start until 99 % of the clients had finished, served or not.
    p99_finish_s: float
    profile: ProfileSummary | None = None

    @property
    def unanswered(self) -> int:
        return sum(count for status, count in self.statuses.items() if status not in ("200", "503"))


async def measure_crowd(
    floydd: Floydd, job_id: str, clients: int, queue_depth: int, timeout_s: float, profile_output: Path | None = None
) -> Crowd:
    """Open `clients` connections at once, each sending one GET /hello, and count how each ends.

    Raw sockets show the status line exactly as sent. Each client is counted
    under its status code, or under the name of the error that ended it.
    With `profile_output`, py-spy records the daemon for 10 s once the clients
    have had 3 s to connect.
    """
    port = int(floydd.url.rsplit(":", 1)[1])
    request = (f"GET /expose/{job_id}/hello HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n").encode()
    statuses: collections.Counter[str] = collections.Counter()
    waiting = 0
    max_waiting = 0
    fds_max = 0
    last_connect_s = 0.0
    finish_times: list[float] = []

    async def one_client() -> None:
        nonlocal waiting, max_waiting, last_connect_s
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
        except OSError as exc:
            statuses[f"connect {type(exc).__name__}"] += 1
            return
        last_connect_s = max(last_connect_s, time.monotonic() - started)
        try:
            writer.write(request)
            await writer.drain()
            waiting += 1
            max_waiting = max(max_waiting, waiting)
            try:
                status_line = await reader.readline()
                await reader.read()
            finally:
                waiting -= 1
            parts = status_line.split()
            statuses[parts[1].decode() if len(parts) > 1 else "empty response"] += 1
        except OSError as exc:
            statuses[type(exc).__name__] += 1
        finally:
            finish_times.append(time.monotonic() - started)
            writer.close()

    async def sample_fds() -> None:
        nonlocal fds_max
        while True:
            fds_max = max(fds_max, open_fds(floydd.pid))
            await asyncio.sleep(0.2)

    rss_before = memory_kib(floydd.pid)["VmRSS"]
    cpu_before = cpu_seconds(floydd.pid)
    started = time.monotonic()
    fd_task = asyncio.create_task(sample_fds())
    profiler = asyncio.create_task(_profile_later(floydd.pid, profile_output)) if profile_output else None
    async with RssSampler(floydd.pid, interval_s=0.2) as sampler:
        tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        statuses["unfinished at deadline"] += len(pending)
        seconds = time.monotonic() - started
    fd_task.cancel()
    await asyncio.gather(fd_task, return_exceptions=True)
    if profiler is not None:
        await profiler
    if not statuses["unfinished at deadline"]:
        del statuses["unfinished at deadline"]
    return Crowd(
        clients=clients,
        queue_depth=queue_depth,
        statuses=statuses,
        max_waiting=max_waiting,
        seconds=seconds,
        daemon_rss_before_kib=rss_before,
        daemon_rss_max_kib=sampler.max_kib,
        daemon_fds_max=fds_max,
        daemon_cpu_s=cpu_seconds(floydd.pid) - cpu_before,
        last_connect_s=last_connect_s,
        p99_finish_s=sorted(finish_times)[int(0.99 * (len(finish_times) - 1))] if finish_times else float("nan"),
    )


async def _profile_later(pid: int, output: Path) -> None:
    await asyncio.sleep(3)
    await record(pid, 10, output, "raw", native=False)


# Cold start


@dataclass(frozen=True)
class ColdStart:
    floydd_s: list[float]
    docker_run_s: list[float]


async def _poll_until_ok(session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                await response.read()
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.02)
    raise BenchError(f"{url} did not respond with 200 within {timeout_s:g} s")


async def _floydd_cold_start(floydd: Floydd, session: aiohttp.ClientSession, archive: bytes) -> float:
    """Time from the upload to the first 200 from /hello through floydd."""
    started = time.monotonic()
    job_id = await floydd.submit_serve_job(archive)
    # The job's queue keeps this request waiting until the app listens, so one request usually suffices.
    await _poll_until_ok(session, floydd.expose_url(job_id, "/hello"), timeout_s=120)
    elapsed = time.monotonic() - started
    async with session.post(f"{floydd.url}/api/v1/jobs/{job_id}/stop") as response:
        await response.read()
    return elapsed


async def _command_output(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    output, errors = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"{' '.join(command)} failed with {process.returncode}: {errors.decode(errors='replace')}")
    return output.decode().strip()


async def _docker_run_cold_start(session: aiohttp.ClientSession, code_dir: Path, image: str, label: str) -> float:
    """Time `docker run` of the same app on the same image, then polling its published port by hand."""
    started = time.monotonic()
    container_id = await _command_output(
        "docker", "run", "-d", "--init", "--label", label, "-p", f"{LOOPBACK}::5000",
        "-v", f"{code_dir}:/code", "-w", "/code", "-e", "PYTHONUNBUFFERED=1", image, "python", "app.py",
    )  # fmt: skip
    try:
        mapping = await _command_output("docker", "port", container_id, "5000/tcp")
        port = int(mapping.splitlines()[0].rsplit(":", 1)[1])
        await _poll_until_ok(session, f"http://{LOOPBACK}:{port}/hello", timeout_s=120)
        return time.monotonic() - started
    finally:
        await _command_output("docker", "rm", "-f", container_id)


async def measure_cold_start(floydd: Floydd, image: str, runs: int, label: str) -> ColdStart:
    """Alternate floydd uploads and hand-run containers of the same app, `runs` of each."""
    archive = bench_app_archive()
    floydd_s: list[float] = []
    docker_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="floydd-bench-app-") as folder:
        code_dir = write_bench_app(Path(folder))
        async with aiohttp.ClientSession() as session:
            for _ in range(runs):
                floydd_s.append(await _floydd_cold_start(floydd, session, archive))
                docker_s.append(await _docker_run_cold_start(session, code_dir, image, label))
    return ColdStart(floydd_s=floydd_s, docker_run_s=docker_s)


# Idle jobs


@dataclass(frozen=True)
class IdleJobs:
    requested: int
    started: int
    limited_by: str
    container_mib: float
    seconds_to_serving: float
    window_s: float
    daemon_cpu_percent: float
    daemon_rss_kib: int
    daemon_rss_before_kib: int
    daemon_fds: int
    # Jobs that did not reach serving, and the error after which no more were submitted.
    failed: int
    stopped_by: str
    # Uploads sent again after floydd rejected them with 503.
    submissions_retried: int


def memory_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise BenchError("/proc/meminfo has no MemAvailable line")


async def container_memory_mib(container_name: str) -> float:
    """Return the container's memory use less its page cache, from the Docker stats API.

    Some engines return empty memory_stats for some containers; then the RSS
    of the container's process tree, read from /proc, stands in.
    """
    async with aiodocker.Docker() as docker:
        container = docker.containers.container(container_name)
        for _ in range(3):
            stats = await container.stats(stream=False)
            entry = stats[0] if isinstance(stats, list) else stats
            memory = entry.get("memory_stats") or {}
            if memory.get("usage"):
                cache = memory.get("stats", {}).get("inactive_file", 0)
                return float(memory["usage"] - cache) / MIB
            await asyncio.sleep(1)
        info = await container.show()
    return process_tree_rss_kib(int(info["State"]["Pid"])) / 1024


def process_tree_rss_kib(pid: int) -> int:
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += memory_kib(current).get("VmRSS", 0)
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def affordable_jobs(requested: int, container_mib: float, reserve_mib: float) -> tuple[int, str]:
    """Return how many more containers fit in available memory, keeping `reserve_mib` for everything else."""
    available_mib = memory_available_kib() / 1024 - reserve_mib
    # Twice the measured size leaves room for a container that allocates more at start-up than at rest.
    fits = int(available_mib // (2 * container_mib)) if container_mib > 0 else requested
    if fits >= requested:
        return requested, "requested count"
    return max(fits, 0), f"memory: {available_mib:.0f} MiB available after a {reserve_mib:.0f} MiB reserve"


async def measure_idle_jobs(
    floydd: Floydd, requested: int, container_mib: float, window_s: float, reserve_mib: float = 4096
) -> IdleJobs:
    """Start serve jobs until `requested` are serving (or memory runs short), then watch floydd idle."""
    count, limited_by = affordable_jobs(requested, container_mib, reserve_mib)
    archive = bench_app_archive()
    rss_before = memory_kib(floydd.pid)["VmRSS"]
    started = time.monotonic()
    # Four uploads at a time: at ten, the shared Docker engine once took over 30 s to answer
    # an image inspect, and floydd rejected the upload with 503.
    gate = asyncio.Semaphore(4)
    retried = 0
    stopped_by = ""

    async def start_one() -> str | None:
        nonlocal retried, stopped_by
        async with gate:
            # After one job fails for good, the rest would fail the same way, one timeout at a time.
            if stopped_by:
                return None
            for attempt in range(SUBMIT_ATTEMPTS):
                try:
                    job_id = await floydd.submit_serve_job(archive)
                    await floydd.wait_serving(job_id, timeout_s=600)
                    return job_id
                except BenchError as exc:
                    if exc.status != 503 or attempt == SUBMIT_ATTEMPTS - 1:
                        stopped_by = stopped_by or str(exc)
                        raise
                    retried += 1
                    await asyncio.sleep(5)
            return None

    outcomes = await asyncio.gather(*(start_one() for _ in range(count)), return_exceptions=True)
    job_ids = [outcome for outcome in outcomes if isinstance(outcome, str)]
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if stopped_by:
        limited_by = "a job that failed to start, after which no more were submitted"
    seconds_to_serving = time.monotonic() - started

    # Let start-up work (readiness polls, log pumps catching up) settle before the idle window.
    await asyncio.sleep(5)
    cpu_before = cpu_seconds(floydd.pid)
    window_started = time.monotonic()
    await asyncio.sleep(window_s)
    cpu_used = cpu_seconds(floydd.pid) - cpu_before
    window = time.monotonic() - window_started
    return IdleJobs(
        requested=requested,
        started=len(job_ids),
        limited_by=limited_by,
        container_mib=container_mib,
        seconds_to_serving=seconds_to_serving,
        window_s=window,
        daemon_cpu_percent=100 * cpu_used / window,
        daemon_rss_kib=memory_kib(floydd.pid)["VmRSS"],
        daemon_rss_before_kib=rss_before,
        daemon_fds=open_fds(floydd.pid),
        failed=len(failures),
        stopped_by=stopped_by,
        submissions_retried=retried,
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

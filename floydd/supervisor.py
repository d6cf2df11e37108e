"""The job supervisor: one asyncio task per job drives its container from start to end.

All state changes of a job go through `Supervisor._save`, which checks the
transition, writes the record to SQLite and logs `job_state_changed`, so the
database, the logs and the proxy's queues never disagree about a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from floydd.config import Settings
from floydd.errors import Conflict, FloyddError, JobNotFound, JobNotServing, RuntimeFailure
from floydd.jobs import Job, JobMode, JobState, utcnow
from floydd.queue import QueueRegistry, Upstream
from floydd.readiness import wait_until_listening
from floydd.runtime import APP_PORT, ContainerExit, DockerRuntime
from floydd.store import JobStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class JobFiles:
    """Where a job's files live under the state directory."""

    root: Path

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def logs(self) -> Path:
        return self.root / "logs.txt"


@dataclass
class _Handle:
    """The live side of a job that is not final: its task and the requests to end it."""

    task: asyncio.Task[None] | None = None
    # STOPPED or TIMED_OUT once an end has been requested.
    end_request: JobState | None = None
    end_requested: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def request_end(self, state: JobState) -> None:
        if self.end_request is None:
            self.end_request = state
        self.end_requested.set()


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, runtime: DockerRuntime, queues: QueueRegistry) -> None:
        self._settings = settings
        self._store = store
        self._runtime = runtime
        self._queues = queues
        self._handles: dict[str, _Handle] = {}

    # Paths

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self._settings.state_path / "jobs" / job_id)

    def spool_path(self, job_id: str) -> Path:
        return self._settings.state_path / "uploads" / f"{job_id}.part"

    # Lifecycle of the supervisor itself

    async def start(self) -> None:
        """Clean up after the previous run, then adopt or end the jobs it left."""
        shutil.rmtree(self._settings.state_path / "uploads", ignore_errors=True)
        unfinished = await self._store.list(states=[s for s in JobState if not s.is_final], limit=1_000_000)
        containers = {container.job_id: container for container in await self._runtime.list_managed()}
        known = {job.id for job in unfinished}
        for job_id, container in containers.items():
            if job_id not in known:
                log.warning("orphan_container_removed", job_id=job_id, container_id=container.id[:12])
                await self._runtime.remove(container.id)
        for job in sorted(unfinished, key=lambda job: job.created_at):
            found = containers.get(job.id)
            if found is not None and found.running and job.container_id == found.id:
                self._spawn(job, adopt=True)
            elif job.state is JobState.QUEUED:
                self._spawn(job, adopt=False)
            else:
                if found is not None:
                    await self._runtime.remove(found.id)
                await self._save(job, JobState.FAILED, reason="container vanished while floydd was down")

    async def close(self) -> None:
        """Stop supervising; containers keep running and are adopted at the next start."""
        tasks = [handle.task for handle in self._handles.values() if handle.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Requests from the API

    async def submit(self, job: Job) -> Job:
        """Record a new job whose code is already unpacked, and start it."""
        await self._store.insert(job)
        log.info("job_submitted", job_id=job.id, mode=job.mode.value, env=job.env, deadline=job.deadline.isoformat())
        self._spawn(job, adopt=False)
        return job

    async def get(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        return job

    async def list(self, states: list[JobState] | None = None) -> list[Job]:
        return await self._store.list(states)

    async def stop(self, job_id: str) -> Job:
        """Stop a job and return it once it has ended and its container is gone."""
        job = await self.get(job_id)
        handle = self._handles.get(job_id)
        if job.state.is_final or handle is None:
            if job.state.is_final:
                raise Conflict(f"job {job_id} has already ended ({job.state.value})", state=job.state.value)
            raise JobNotServing(f"job {job_id} is not supervised by this daemon", state=job.state.value)
        handle.request_end(JobState.STOPPED)
        limit = self._settings.jobs.stop_grace_s + 3 * self._settings.docker.call_timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await handle.done.wait()
        return await self.get(job_id)

    # One task per job

    def _spawn(self, job: Job, *, adopt: bool) -> None:
        handle = _Handle()
        self._handles[job.id] = handle
        if job.mode is JobMode.SERVE and self._queues.get(job.id) is None:
            queue = self._queues.create(job.id, concurrency=int(job.options.get("concurrency", 1)))
            if adopt and job.host_port is not None and job.state is JobState.SERVING:
                queue.open(Upstream("127.0.0.1", job.host_port))
        handle.task = asyncio.create_task(self._supervise(job, handle, adopt), name=f"job-{job.id}")

    async def _supervise(self, job: Job, handle: _Handle, adopt: bool) -> None:
        bound = log.bind(job_id=job.id)
        deadline_task = asyncio.create_task(self._enforce_deadline(job, handle))
        try:
            job = await self._run(job, handle, adopt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            bound.exception("job_supervision_failed")
            job = await self._end_after_error(job, exc)
        finally:
            deadline_task.cancel()
            self._handles.pop(job.id, None)
            handle.done.set()

    async def _enforce_deadline(self, job: Job, handle: _Handle) -> None:
        remaining = (job.deadline - utcnow()).total_seconds()
        await asyncio.sleep(max(remaining, 0))
        log.info("job_deadline_reached", job_id=job.id, deadline=job.deadline.isoformat())
        handle.request_end(JobState.TIMED_OUT)

    async def _run(self, job: Job, handle: _Handle, adopt: bool) -> Job:
        if not adopt:
            if handle.end_requested.is_set():
                return await self._save(job, handle.end_request or JobState.STOPPED, reason=_end_reason(handle))
            job = await self._launch(job)
        container_id = job.container_id
        assert container_id is not None
        exit_waiter = asyncio.create_task(self._runtime.wait(container_id))
        logs = asyncio.create_task(self._pump_logs(job, since=int(utcnow().timestamp()) if adopt else 0))
        try:
            if job.state is JobState.STARTING:
                job = await self._become_ready(job, handle, exit_waiter)
            if not exit_waiter.done():
                await _first_of(exit_waiter, handle.end_requested.wait())
            if not exit_waiter.done():
                await self._runtime.stop(container_id, self._settings.jobs.stop_grace_s)
            exit_info = await exit_waiter
        finally:
            exit_waiter.cancel()
            # Give the log stream a moment to deliver the container's last lines.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                async with asyncio.timeout(5):
                    await asyncio.shield(logs)
            logs.cancel()
        return await self._finish(job, handle, exit_info)

    async def _launch(self, job: Job) -> Job:
        files = self.files(job.id)
        files.output.mkdir(parents=True, exist_ok=True)
        job = await self._save(job, JobState.STARTING, started_at=utcnow())
        container_id = await self._runtime.create_container(job, files.code, files.output)
        job = await self._save(job, job.state, container_id=container_id)
        await self._runtime.start_container(container_id)
        if job.mode is JobMode.SERVE:
            port = await self._runtime.published_port(container_id)
            job = await self._save(job, job.state, host_port=port)
        else:
            job = await self._save(job, JobState.RUNNING)
        log.info("container_started", job_id=job.id, container_id=container_id[:12], host_port=job.host_port)
        return job

    async def _become_ready(self, job: Job, handle: _Handle, exit_waiter: asyncio.Task[ContainerExit]) -> Job:
        """Wait until the app listens on its port, then open the job's queue."""
        host_port = job.host_port
        assert job.container_id is not None and host_port is not None
        info = await self._runtime.inspect(job.container_id)
        pid = int((info or {}).get("State", {}).get("Pid") or 0)
        listening = asyncio.create_task(wait_until_listening(pid, APP_PORT, "127.0.0.1", host_port))
        timeout_s = self._settings.jobs.start_timeout_s
        try:
            winner = await _first_of(listening, exit_waiter, handle.end_requested.wait(), timeout_s=timeout_s)
        finally:
            listening.cancel()
        if winner is not listening:
            if winner is None:
                handle.request_end(JobState.FAILED)
                log.warning("job_start_timed_out", job_id=job.id, start_timeout_s=timeout_s)
            return job
        job = await self._save(job, JobState.SERVING)
        queue = self._queues.get(job.id)
        if queue is not None:
            queue.open(Upstream("127.0.0.1", host_port))
        return job

    async def _finish(self, job: Job, handle: _Handle, exit_info: ContainerExit) -> Job:
        state, reason = _outcome(job, handle, exit_info, self._settings.jobs.start_timeout_s)
        job = await self._save(job, state, reason=reason, exit_code=exit_info.exit_code)
        if job.container_id is not None:
            try:
                await self._runtime.remove(job.container_id)
            except RuntimeFailure as exc:
                log.warning("container_remove_failed", job_id=job.id, error=exc.detail)
        return job

    async def _end_after_error(self, job: Job, exc: Exception) -> Job:
        current = await self._store.get(job.id) or job
        if current.state.is_final:
            return current
        detail = exc.detail if isinstance(exc, FloyddError) else f"internal error: {exc!r}"
        if current.container_id is not None:
            with contextlib.suppress(FloyddError):
                await self._runtime.remove(current.container_id)
        return await self._save(current, JobState.FAILED, reason=detail)

    async def _pump_logs(self, job: Job, since: int) -> None:
        """Append the container's output to the job's log file as it arrives."""
        assert job.container_id is not None
        path = self.files(job.id).logs
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with path.open("a", encoding="utf-8", errors="replace") as output:
                async for chunk in self._runtime.follow_logs(job.container_id, since=since):
                    output.write(chunk)
                    output.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job_logs_interrupted", job_id=job.id, error=str(exc))

    async def _save(self, job: Job, state: JobState, **changes: object) -> Job:
        updated = job.transition(state, **changes) if state is not job.state else _replace(job, **changes)
        await self._store.update(updated)
        if state is not job.state:
            log.info(
                "job_state_changed",
                job_id=job.id,
                previous=job.state.value,
                state=state.value,
                reason=updated.reason,
                exit_code=updated.exit_code,
            )
        if state.is_final:
            reason = f" ({updated.reason})" if updated.reason else ""
            ended = JobNotServing(
                f"job {job.id} is {state.value}{reason}, not serving", state=state.value, reason=updated.reason
            )
            self._queues.remove(job.id, ended)
        return updated


def _replace(job: Job, **changes: object) -> Job:
    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]


def _end_reason(handle: _Handle) -> str:
    if handle.end_request is JobState.TIMED_OUT:
        return "max uptime reached"
    return "stopped on request"


def _outcome(
    job: Job, handle: _Handle, exit_info: ContainerExit, start_timeout_s: float
) -> tuple[JobState, str | None]:
    if handle.end_request is JobState.FAILED:
        return JobState.FAILED, f"the app did not accept connections on port {APP_PORT} within {start_timeout_s:g} s"
    if handle.end_request in (JobState.STOPPED, JobState.TIMED_OUT):
        return handle.end_request, _end_reason(handle)
    if exit_info.error == "container vanished":
        return JobState.FAILED, "container vanished"
    if exit_info.oom_killed:
        return JobState.FAILED, "out of memory"
    if exit_info.exit_code == 0:
        if job.mode is JobMode.SERVE:
            return JobState.FAILED, "the app exited with code 0 while it should serve"
        return JobState.SUCCEEDED, None
    return JobState.FAILED, f"exited with code {exit_info.exit_code}"


async def _first_of(*awaitables: Awaitable[object], timeout_s: float | None = None) -> asyncio.Future[object] | None:
    """Wait for the first of several awaitables; return its future, or None on timeout.

    Futures passed in are left running; coroutines passed in are wrapped and
    cancelled when they did not finish first.
    """
    futures: list[asyncio.Future[object]] = []
    created: list[asyncio.Future[object]] = []
    for item in awaitables:
        if isinstance(item, asyncio.Future):
            futures.append(item)
        else:
            wrapped = asyncio.ensure_future(item)
            futures.append(wrapped)
            created.append(wrapped)
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in created:
            if not future.done():
                future.cancel()
    if not done:
        return None
    return next(future for future in futures if future in done)

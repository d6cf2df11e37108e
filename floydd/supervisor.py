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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from floydd.auth import User, is_private
from floydd.config import Settings
from floydd.datasets import DatasetStore, may_use_dataset
from floydd.errors import Conflict, FloyddError, InvalidRequest, JobNotFound, JobNotServing, RuntimeFailure
from floydd.gpus import GpuInventory, GpuPool, NoGpus, NvidiaSmi
from floydd.joblogs import JobLogWriter
from floydd.jobrequests import RequestContext
from floydd.jobs import FINAL_STATES, Job, JobMode, JobState, utcnow
from floydd.queue import JobQueue, QueueRegistry, Upstream
from floydd.readiness import LoopbackOnly, wait_until_listening
from floydd.runtime import (
    APP_PORT,
    INSTALL_FAILED_MARKER,
    MAX_RETRY_DELAY_S,
    ContainerExit,
    ContainerSpec,
    DockerRuntime,
    Mount,
)
from floydd.store import JobStore

log = structlog.get_logger(__name__)

# How long a cancelled job task waits for the response to a container create it has sent, so it can remove the
# container. Kept short because a shutdown spends it, and the next start removes a container the wait missed.
CREATE_SETTLE_S = 5.0
# How much of the end of a failed serve job's log is searched for the requirements' install failure.
LOG_TAIL_BYTES = 4096


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
    # STOPPED, TIMED_OUT or FAILED once an end has been requested.
    end_request: JobState | None = None
    # Why the supervisor itself fails the job, when it does.
    failure: str | None = None
    end_requested: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # A serve job's queue, held once an end is requested so that no request
    # reaches an app that is being stopped.
    queue: JobQueue | None = None

    def request_end(self, state: JobState) -> None:
        if self.end_request is None:
            self.end_request = state
        if self.queue is not None:
            self.queue.hold()
        self.end_requested.set()


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        runtime: DockerRuntime,
        queues: QueueRegistry,
        gpu_inventory: GpuInventory | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._runtime = runtime
        self._queues = queues
        self._handles: dict[str, _Handle] = {}
        self.datasets = DatasetStore(settings.state_path / "datasets")
        if gpu_inventory is None:
            gpu_inventory = NvidiaSmi() if settings.gpus.discovery == "auto" else NoGpus()
        self._gpu_inventory = gpu_inventory
        # Filled by start(), once the GPUs are discovered.
        self.gpus = GpuPool([])
        self._pruner: asyncio.Task[None] | None = None

    # Paths

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self._settings.state_path / "jobs" / job_id)

    def spool_path(self, job_id: str) -> Path:
        return self._settings.state_path / "uploads" / f"{job_id}.part"

    # Lifecycle of the supervisor itself

    async def start(self) -> None:
        """Clean up after the previous run, then adopt or end the jobs it left, then start queued ones."""
        self.gpus = GpuPool(await asyncio.to_thread(self._gpu_inventory.discover))
        log.info("gpus_discovered", count=self.gpus.total, devices=[gpu.uuid for gpu in self.gpus.gpus])
        unfinished = await self._store.list(states=[s for s in JobState if not s.is_final], limit=1_000_000)
        await self._remove_leftover_files()
        containers = {container.job_id: container for container in await self._runtime.list_managed()}
        known = {job.id for job in unfinished}
        for job_id, container in containers.items():
            if job_id not in known:
                log.warning("orphan_container_removed", job_id=job_id, container_id=container.id[:12])
                await self._runtime.remove(container.id)
        queued = []
        for job in sorted(unfinished, key=lambda job: job.created_at):
            found = containers.get(job.id)
            if job.state is JobState.QUEUED:
                queued.append(job)
            elif found is not None and job.container_id == found.id and found.state != "created":
                self._adopt(job, found.running)
            elif job.container_id is None or (found is not None and found.state == "created"):
                # Killed before the container started: nothing of the job ran, so start it afresh.
                if found is not None:
                    await self._runtime.remove(found.id)
                log.info("job_relaunched", job_id=job.id)
                queued.append(_replace(job, container_id=None, host_port=None))
            else:
                await self._save(job, JobState.FAILED, reason="container vanished while floydd was down")
        # Adopted jobs have their GPUs back before queued jobs ask for any.
        for job in queued:
            self._spawn(job, adopt=False)
        self._pruner = asyncio.create_task(self._prune_forever(), name="pruner")

    def _adopt(self, job: Job, running: bool) -> None:
        devices = tuple(job.options.get("gpu_devices", ()))
        missing = self.gpus.claim(job.id, devices)
        if missing:
            log.warning("adopted_job_gpus_missing", job_id=job.id, devices=list(missing))
        log.info(
            "job_adopted",
            job_id=job.id,
            state=job.state.value,
            container_id=(job.container_id or "")[:12],
            container_running=running,
        )
        # A container that exited while floydd was down gets no requests. They wait until its exit is recorded.
        self._spawn(job, adopt=True, serving=running)

    async def _remove_leftover_files(self) -> None:
        """Remove half-received uploads and the folders of jobs that were never recorded."""
        await asyncio.to_thread(shutil.rmtree, self._settings.state_path / "uploads", True)
        await asyncio.to_thread(self.datasets.clean_staging)
        jobs_root = self._settings.state_path / "jobs"
        folders = [entry for entry in jobs_root.iterdir() if entry.is_dir()] if jobs_root.is_dir() else []
        for folder in folders:
            await asyncio.to_thread(shutil.rmtree, folder / "code.unpacking", True)
            if await self._store.get(folder.name) is None:
                log.warning("unrecorded_job_files_removed", job_id=folder.name)
                await asyncio.to_thread(shutil.rmtree, folder, True)

    async def close(self) -> None:
        """Stop supervising jobs.

        Containers keep running and are adopted at the next start, unless
        `lifecycle.stop_containers_on_shutdown` is set. Then they are stopped
        and their jobs end `stopped`.
        """
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
        if self._settings.lifecycle.stop_containers_on_shutdown:
            await self._stop_all()
        tasks = [handle.task for handle in self._handles.values() if handle.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_all(self) -> None:
        handles = list(self._handles.values())
        for handle in handles:
            handle.request_end(JobState.STOPPED)
        limit = self._settings.jobs.stop_grace_s + 3 * self._settings.docker.call_timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                await asyncio.gather(*(handle.done.wait() for handle in handles))

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

    def request_context(self, user: User) -> RequestContext:
        """Return what checking `user`'s new job's requests needs: caps, datasets, GPUs, other jobs."""
        return RequestContext(
            resources=self._settings.resources,
            datasets=self.datasets,
            gpu_count=self.gpus.total,
            host_cpus=self._runtime.host_cpus,
            find_job=self._store.get,
            has_output=lambda job_id: self.files(job_id).output.is_dir(),
            may_use_job=lambda job: user.is_admin or job.owner == user.name,
            may_use_dataset=lambda dataset: may_use_dataset(user, dataset),
        )

    async def delete(self, job_id: str) -> None:
        """Remove a finished job: its container if any is left, its files, output, logs and record."""
        job = await self.get(job_id)
        if not job.state.is_final:
            raise Conflict(f"job {job_id} is {job.state.value}; stop it before deleting it", state=job.state.value)
        await self._check_output_unused(job_id)
        if job.container_id is not None:
            await self._runtime.remove(job.container_id)
        await asyncio.to_thread(shutil.rmtree, self.files(job_id).root, True)
        await self._store.delete(job_id)
        log.info("job_deleted", job_id=job_id)

    async def _check_output_unused(self, job_id: str) -> None:
        for other in await self.jobs_using(lambda entry: entry.get("job_output") == job_id):
            raise Conflict(f"job {other.id} mounts the output of job {job_id}", job_id=other.id)

    async def jobs_using(self, matches: Callable[[dict[str, Any]], bool]) -> Sequence[Job]:
        """Return the unfinished jobs with a data mount for which `matches` is true."""
        unfinished = await self._store.list(states=[s for s in JobState if not s.is_final], limit=1_000_000)
        return [job for job in unfinished if any(matches(entry) for entry in job.options.get("data", []))]

    # Retention

    async def _prune_forever(self) -> None:
        while True:
            try:
                await self.prune()
            except Exception:
                log.exception("job_prune_failed")
            await asyncio.sleep(self._settings.lifecycle.prune_interval_s)

    async def prune(self) -> int:
        """Delete the files of jobs that ended more than `lifecycle.retention_s` ago; keep their records."""
        cutoff = utcnow() - timedelta(seconds=self._settings.lifecycle.retention_s)
        ended = await self._store.list(states=FINAL_STATES, limit=1_000_000)
        mounting = await self.jobs_using(lambda _: True)
        in_use = {entry.get("job_output") for job in mounting for entry in job.options["data"]}
        pruned = 0
        for job in ended:
            if job.ended_at is None or job.ended_at > cutoff or "pruned_at" in job.options or job.id in in_use:
                continue
            await asyncio.to_thread(shutil.rmtree, self.files(job.id).root, True)
            await self._save(job, job.state, options={**job.options, "pruned_at": utcnow().isoformat()})
            log.info("job_files_pruned", job_id=job.id, ended_at=job.ended_at.isoformat())
            pruned += 1
        return pruned

    # One task per job

    def _spawn(self, job: Job, *, adopt: bool, serving: bool = True) -> None:
        handle = _Handle()
        self._handles[job.id] = handle
        if job.mode is JobMode.SERVE and self._queues.get(job.id) is None:
            queue = self._queues.create(
                job.id, concurrency=int(job.options.get("concurrency", 1)), public=not is_private(job)
            )
            if adopt and serving and job.host_port is not None and job.state is JobState.SERVING:
                queue.open(Upstream("127.0.0.1", job.host_port))
            handle.queue = queue
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
            self.gpus.release(job.id)
            self._handles.pop(job.id, None)
            handle.done.set()

    async def _enforce_deadline(self, job: Job, handle: _Handle) -> None:
        remaining = (job.deadline - utcnow()).total_seconds()
        await asyncio.sleep(max(remaining, 0))
        log.info("job_deadline_reached", job_id=job.id, deadline=job.deadline.isoformat())
        handle.request_end(JobState.TIMED_OUT)

    async def _run(self, job: Job, handle: _Handle, adopt: bool) -> Job:
        if not adopt:
            job = await self._wait_for_gpus(job, handle)
            if handle.end_requested.is_set():
                return await self._save(job, handle.end_request or JobState.STOPPED, reason=_end_reason(handle))
            job = await self._launch(job)
        elif job.mode is JobMode.SERVE and job.host_port is None and job.container_id is not None:
            # Killed between the container's start and the record of its port.
            job = await self._save(job, job.state, host_port=await self._runtime.published_port(job.container_id))
        container_id = job.container_id
        assert container_id is not None
        exit_waiter = asyncio.create_task(self._runtime.wait(container_id))
        logs = asyncio.create_task(self._pump_logs(job, adopt, exit_waiter))
        try:
            if job.state is JobState.STARTING:
                job = await self._become_ready(job, handle, exit_waiter)
            if not exit_waiter.done():
                await _first_of(exit_waiter, handle.end_requested.wait())
            if not exit_waiter.done():
                await self._runtime.stop(container_id, self._settings.jobs.stop_grace_s)
            exit_info = await exit_waiter
        finally:
            exited = exit_waiter.done() and not exit_waiter.cancelled()
            exit_waiter.cancel()
            # Give the log stream a moment to deliver the container's last lines.
            # On daemon shutdown the container keeps running, so there is nothing to wait for.
            if exited:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                    async with asyncio.timeout(5):
                        await asyncio.shield(logs)
            logs.cancel()
        return await self._finish(job, handle, exit_info)

    async def _wait_for_gpus(self, job: Job, handle: _Handle) -> Job:
        """Hold the job in `queued` until its GPUs are free; return at once when it wants none."""
        count = int(job.options.get("gpus", 0))
        if count == 0:
            return job
        log.info("job_waiting_for_gpus", job_id=job.id, gpus=count, free=len(self.gpus.free()))
        if count > self.gpus.total:
            # Possible only when GPUs disappeared between the job's submission and a restart.
            raise InvalidRequest(f"job requests {count} GPUs, but this host now has {self.gpus.total}")
        acquire = asyncio.create_task(self.gpus.acquire(job.id, count))
        winner = await _first_of(acquire, handle.end_requested.wait())
        if winner is not acquire:
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
            return job
        devices = acquire.result()
        # Recorded before the container exists, so a restart gives the same devices back to it.
        return await self._save(job, job.state, options={**job.options, "gpu_devices": list(devices)})

    def _container_spec(self, job: Job) -> ContainerSpec:
        files = self.files(job.id)
        resources = self._settings.resources
        memory_bytes = int(job.options.get("memory_bytes") or resources.default_memory_mib * 1024**2)
        # A job's own request was checked against the host at submission. The default may exceed a small host.
        cpus = float(job.options.get("cpus") or min(resources.default_cpus, self._runtime.host_cpus))
        return ContainerSpec(
            code_dir=files.code,
            output_dir=files.output,
            memory_bytes=memory_bytes,
            nano_cpus=int(cpus * 1e9),
            pids_limit=resources.pids_limit,
            data_mounts=tuple(self._data_mount(entry) for entry in job.options.get("data", [])),
            gpu_device_ids=tuple(job.options.get("gpu_devices", ())),
        )

    def _data_mount(self, entry: dict[str, Any]) -> Mount:
        if "job_output" in entry:
            source = self.files(entry["job_output"]).output
            if not source.is_dir():
                raise RuntimeFailure(f"the output of job {entry['job_output']} to mount at {entry['mount']} is gone")
            return Mount(source, entry["mount"])
        name, _, version = str(entry["dataset"]).partition("/")
        return Mount(self.datasets.get(name, int(version)).data, entry["mount"])

    async def _launch(self, job: Job) -> Job:
        files = self.files(job.id)
        files.output.mkdir(parents=True, exist_ok=True)
        job = await self._save(job, JobState.STARTING, started_at=utcnow())
        container_id = await self._create_container(job)
        job = await self._save(job, job.state, container_id=container_id)
        await self._runtime.start_container(container_id)
        if job.mode is JobMode.SERVE:
            port = await self._runtime.published_port(container_id)
            job = await self._save(job, job.state, host_port=port)
        else:
            job = await self._save(job, JobState.RUNNING)
        log.info("container_started", job_id=job.id, container_id=container_id[:12], host_port=job.host_port)
        return job

    async def _create_container(self, job: Job) -> str:
        """Create the job's container; if the task is cancelled meanwhile, remove the container the engine makes.

        Cancelling the call does not cancel the create in the engine, which
        makes the container all the same. With no record of its id, a
        stopped daemon would leave it in the Created state.
        """
        create = asyncio.ensure_future(self._runtime.create_container(job, self._container_spec(job)))
        try:
            return await asyncio.shield(create)
        except asyncio.CancelledError:
            log.info("container_create_settling", job_id=job.id, wait_s=CREATE_SETTLE_S)
            await self._remove_when_created(job, create)
            raise

    async def _remove_when_created(self, job: Job, create: asyncio.Future[str]) -> None:
        try:
            async with asyncio.timeout(CREATE_SETTLE_S):
                try:
                    container_id = await create
                except RuntimeFailure:
                    # The create failed, so there is no container to remove.
                    return
                await self._runtime.remove(container_id)
        except (TimeoutError, RuntimeFailure) as exc:
            # The job is still starting, so the next start relaunches it and removes what the engine left.
            log.warning("container_create_abandoned", job_id=job.id, error=str(exc) or "timed out")
            return
        log.info("container_create_undone", job_id=job.id, container_id=container_id[:12])

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
        if isinstance(listening.exception(), LoopbackOnly):
            handle.failure = str(listening.exception())
            handle.request_end(JobState.FAILED)
            log.warning("job_app_unreachable", job_id=job.id, reason=handle.failure)
            return job
        job = await self._save(job, JobState.SERVING)
        queue = self._queues.get(job.id)
        if queue is not None:
            queue.open(Upstream("127.0.0.1", host_port))
        return job

    async def _finish(self, job: Job, handle: _Handle, exit_info: ContainerExit) -> Job:
        install_failure = None
        if job.mode is JobMode.SERVE and job.state is JobState.STARTING and exit_info.exit_code != 0:
            install_failure = await asyncio.to_thread(_install_failure, self.files(job.id).logs)
        state, reason = _outcome(job, handle, exit_info, self._settings.jobs.start_timeout_s, install_failure)
        # The container goes first, so that a client that sees the final state
        # never finds the container still there.
        if job.container_id is not None:
            try:
                await self._runtime.remove(job.container_id)
            except RuntimeFailure as exc:
                log.warning("container_remove_failed", job_id=job.id, error=exc.detail)
        # Docker's stop time rather than now: for a container that exited while floydd was down, now is much later.
        ended_at = min(exit_info.finished_at or utcnow(), utcnow())
        return await self._save(job, state, reason=reason, exit_code=exit_info.exit_code, ended_at=ended_at)

    async def _end_after_error(self, job: Job, exc: Exception) -> Job:
        current = await self._store.get(job.id) or job
        if current.state.is_final:
            return current
        detail = exc.detail if isinstance(exc, FloyddError) else f"internal error: {exc!r}"
        if current.container_id is not None:
            with contextlib.suppress(FloyddError):
                await self._runtime.remove(current.container_id)
        return await self._save(current, JobState.FAILED, reason=detail)

    async def _pump_logs(self, job: Job, resume: bool, exit_waiter: asyncio.Task[ContainerExit]) -> None:
        """Append the container's output to the job's log file as it arrives.

        An adopted job resumes after the last message on disk, and so does a
        stream that the engine broke off, so neither repeats nor drops a line.
        """
        assert job.container_id is not None
        writer = JobLogWriter(self.files(job.id).logs)
        since_ns = writer.open(resume)
        delay_s = 1.0
        tried_after_exit = False
        while True:
            try:
                async for message in self._runtime.follow_logs(job.container_id, since_ns=since_ns):
                    writer.write(message)
                complete = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job_logs_interrupted", job_id=job.id, error=str(exc), delay_s=delay_s)
                complete = False
            if complete:
                # Docker ends the stream when the container exits, but also when dockerd restarts.
                done, _ = await asyncio.wait({exit_waiter}, timeout=2)
                if done:
                    return
            elif exit_waiter.done():
                # One more pass collects what the exited container wrote after the break.
                if tried_after_exit:
                    return
                tried_after_exit = True
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, MAX_RETRY_DELAY_S)
            since_ns = writer.resume_point()

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
    job: Job, handle: _Handle, exit_info: ContainerExit, start_timeout_s: float, install_failure: str | None = None
) -> tuple[JobState, str | None]:
    """Return a job's final state and reason. `install_failure` replaces only the plain exit code as the reason."""
    if handle.end_request is JobState.FAILED and handle.failure:
        return JobState.FAILED, handle.failure
    if handle.end_request is JobState.FAILED:
        return JobState.FAILED, f"the app did not accept connections on port {APP_PORT} within {start_timeout_s:g} s"
    if handle.end_request in (JobState.STOPPED, JobState.TIMED_OUT):
        return handle.end_request, _end_reason(handle)
    if exit_info.error == "container vanished":
        return JobState.FAILED, "container vanished: it was removed outside floydd"
    if exit_info.oom_killed:
        return JobState.FAILED, "out of memory"
    if exit_info.exit_code == 0:
        if job.mode is JobMode.SERVE:
            return JobState.FAILED, "the app exited with code 0 while it should serve"
        return JobState.SUCCEEDED, None
    return JobState.FAILED, install_failure or f"exited with code {exit_info.exit_code}"


def _install_failure(logs: Path) -> str | None:
    """Return the reason for a serve job whose requirements failed to install, from the end of its log."""
    try:
        with logs.open("rb") as file:
            file.seek(max(0, logs.stat().st_size - LOG_TAIL_BYTES))
            tail = file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        if line.startswith(INSTALL_FAILED_MARKER):
            code = line.removeprefix(INSTALL_FAILED_MARKER).strip()
            return f"installing floyd_requirements.txt failed: pip exited with code {code}; see the job's logs"
    return None


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

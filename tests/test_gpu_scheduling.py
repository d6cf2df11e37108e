"""GPU jobs through the real supervisor and Docker engine, with a fake inventory of four GPUs.

This host has no GPU, so the runtime records each container's device
request and creates the container without it; everything else (queued
jobs, FIFO order, stop, restart and adoption) runs for real. No test here
proves that the NVIDIA runtime exposes the requested devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from floydd.app import instance_id
from floydd.config import Settings, load_settings
from floydd.gpus import Gpu
from floydd.jobs import Job, JobMode, JobState, new_job_id, utcnow
from floydd.queue import QueueRegistry
from floydd.runtime import ContainerSpec, DockerRuntime
from floydd.store import JobStore
from floydd.supervisor import Supervisor

pytestmark = pytest.mark.docker


class FakeInventory:
    def discover(self) -> list[Gpu]:
        return [Gpu(index, f"GPU-{index:04d}", "Fake A100") for index in range(4)]


class GpulessRuntime(DockerRuntime):
    """The real runtime, minus the device request that this GPU-less engine would reject."""

    requested: dict[str, tuple[str, ...]] = {}

    async def create_container(self, job: Job, spec: ContainerSpec) -> str:
        GpulessRuntime.requested[job.id] = spec.gpu_device_ids
        return await super().create_container(job, dataclasses.replace(spec, gpu_device_ids=()))


@dataclasses.dataclass
class Running:
    settings: Settings
    store: JobStore
    runtime: GpulessRuntime
    supervisor: Supervisor

    async def close(self) -> None:
        await self.supervisor.close()
        await self.runtime.close()
        await self.store.close()


async def open_supervisor(settings: Settings) -> Running:
    store = JobStore(settings.state_path / "floydd.sqlite3")
    await store.open()
    runtime = GpulessRuntime(settings.docker, instance_id(settings.state_path))
    await runtime.open()
    supervisor = Supervisor(settings, store, runtime, QueueRegistry(10), gpu_inventory=FakeInventory())
    await supervisor.start()
    return Running(settings, store, runtime, supervisor)


@pytest.fixture
async def settings(tmp_path: Path, docker_engine: None) -> AsyncIterator[Settings]:
    loaded = load_settings(None, environ={}, **{"server.state_dir": str(tmp_path / "state"), "jobs.stop_grace_s": 1})
    yield loaded
    runtime = DockerRuntime(loaded.docker, instance_id(loaded.state_path))
    await runtime.open()
    for container in await runtime.list_managed():
        with contextlib.suppress(Exception):
            await runtime.remove(container.id)
    await runtime.close()


async def submit_gpu_job(running: Running, default_image: str, gpus: int) -> str:
    job_id = new_job_id()
    (running.supervisor.files(job_id).code).mkdir(parents=True)
    now = utcnow()
    job = Job(
        id=job_id,
        mode=JobMode.COMMAND,
        env="flask",
        image=default_image,
        state=JobState.QUEUED,
        created_at=now,
        deadline=now + timedelta(hours=1),
        command="sleep 300",
        options={"gpus": gpus},
    )
    await running.supervisor.submit(job)
    return job_id


async def state_of(running: Running, job_id: str) -> JobState:
    return (await running.supervisor.get(job_id)).state


async def wait_state(running: Running, job_id: str, state: JobState) -> Job:
    for _ in range(150):
        job = await running.supervisor.get(job_id)
        if job.state is state:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} is {job.state.value}, expected {state.value}")


async def test_gpu_jobs_wait_in_order(settings: Settings, default_image: str) -> None:
    running = await open_supervisor(settings)
    try:
        first = await submit_gpu_job(running, default_image, 3)
        await wait_state(running, first, JobState.RUNNING)
        big = await submit_gpu_job(running, default_image, 2)
        await asyncio.sleep(0.05)
        small = await submit_gpu_job(running, default_image, 1)
        await asyncio.sleep(1)
        waiting = [await state_of(running, big), await state_of(running, small)]

        await running.supervisor.stop(first)
        big_job = await wait_state(running, big, JobState.RUNNING)
        small_job = await wait_state(running, small, JobState.RUNNING)
    finally:
        await running.close()

    assert waiting == [JobState.QUEUED, JobState.QUEUED]
    assert len(GpulessRuntime.requested[first]) == 3
    assert len(big_job.options["gpu_devices"]) == 2
    assert len(small_job.options["gpu_devices"]) == 1
    assert not set(big_job.options["gpu_devices"]) & set(small_job.options["gpu_devices"])
    assert GpulessRuntime.requested[big] == tuple(big_job.options["gpu_devices"])


async def test_gpus_kept_across_restart(settings: Settings, default_image: str) -> None:
    first_run = await open_supervisor(settings)
    try:
        holder = await submit_gpu_job(first_run, default_image, 3)
        held = (await wait_state(first_run, holder, JobState.RUNNING)).options["gpu_devices"]
        waiter = await submit_gpu_job(first_run, default_image, 2)
    finally:
        await first_run.close()

    second_run = await open_supervisor(settings)
    try:
        adopted = second_run.supervisor.gpus.held_by(holder)
        await asyncio.sleep(1)
        waiting = await state_of(second_run, waiter)
        await second_run.supervisor.stop(holder)
        granted = (await wait_state(second_run, waiter, JobState.RUNNING)).options["gpu_devices"]
    finally:
        await second_run.close()

    assert sorted(adopted) == sorted(held)
    assert waiting is JobState.QUEUED
    assert len(granted) == 2

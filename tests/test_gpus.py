"""GPU assignment against a fake inventory of four GPUs; no real GPU is involved.

These tests check the logic: exclusivity, FIFO waiting, hand-back after a
restart and the Docker device request. Whether the NVIDIA container runtime
then exposes exactly those devices can only be checked on a GPU host.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from floydd.gpus import Gpu, GpuPool, parse_nvidia_smi
from floydd.jobs import Job, JobMode, JobState, utcnow
from floydd.runtime import ContainerSpec, container_config


class FakeInventory:
    """Four GPUs, as `nvidia-smi` would list them on a four-GPU host."""

    def discover(self) -> list[Gpu]:
        return [Gpu(index, f"GPU-{index:04d}", "Fake A100") for index in range(4)]


def pool() -> GpuPool:
    return GpuPool(FakeInventory().discover())


async def test_assigned_devices_are_exclusive() -> None:
    gpus = pool()
    first = await gpus.acquire("a", 2)
    second = await gpus.acquire("b", 2)

    assert len(first) == 2
    assert len(second) == 2
    assert not set(first) & set(second)
    assert gpus.free() == []


async def test_waiting_jobs_start_in_order() -> None:
    gpus = pool()
    await gpus.acquire("running", 3)
    # "big" requests 2 GPUs first. "small" requests 1 later, which would fit
    # now, but it must not overtake the job ahead of it.
    big = asyncio.create_task(gpus.acquire("big", 2))
    await asyncio.sleep(0)
    small = asyncio.create_task(gpus.acquire("small", 1))
    await asyncio.sleep(0)

    assert not big.done()
    assert not small.done()
    assert gpus.waiting() == ["big", "small"]

    gpus.release("running")
    await asyncio.sleep(0)

    assert len(big.result()) == 2
    assert len(small.result()) == 1
    assert len(gpus.free()) == 1


async def test_cancelled_waiter_leaves_queue() -> None:
    gpus = pool()
    await gpus.acquire("running", 4)
    waiter = asyncio.create_task(gpus.acquire("stopped", 1))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    gpus.release("running")

    assert gpus.waiting() == []
    assert len(gpus.free()) == 4


async def test_more_than_host_rejected() -> None:
    with pytest.raises(ValueError, match="host has 4"):
        await pool().acquire("greedy", 5)


async def test_claim_after_restart_keeps_devices() -> None:
    gpus = pool()
    missing = gpus.claim("adopted", ("GPU-0002", "GPU-0003"))
    granted = await gpus.acquire("queued", 2)

    assert missing == ()
    assert gpus.held_by("adopted") == ("GPU-0002", "GPU-0003")
    assert set(granted) == {"GPU-0000", "GPU-0001"}


def test_claim_reports_missing_device() -> None:
    gpus = pool()
    assert gpus.claim("adopted", ("GPU-0009",)) == ("GPU-0009",)


def test_nvidia_smi_output_parsed() -> None:
    output = "0, GPU-8f6c2a1e-aaaa, NVIDIA H100 80GB HBM3\n1, GPU-1b2c3d4e-bbbb, NVIDIA H100 80GB HBM3\n"
    gpus = parse_nvidia_smi(output)

    assert [gpu.index for gpu in gpus] == [0, 1]
    assert gpus[0].uuid == "GPU-8f6c2a1e-aaaa"
    assert gpus[1].name == "NVIDIA H100 80GB HBM3"


def test_device_request_names_devices(tmp_path: Path) -> None:
    now = utcnow()
    job = Job("j" * 32, JobMode.COMMAND, "flask", "floydd/flask:latest", JobState.STARTING, now, now, command="true")
    spec = ContainerSpec(tmp_path / "code", tmp_path / "output", 2**30, 10**9, 100, (), ("GPU-0001", "GPU-0003"))
    host = container_config(job, spec, "instance")["HostConfig"]

    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-0001", "GPU-0003"], "Capabilities": [["gpu"]]}
    ]


def test_no_device_request_without_gpus(tmp_path: Path) -> None:
    now = utcnow()
    job = Job("j" * 32, JobMode.COMMAND, "flask", "floydd/flask:latest", JobState.STARTING, now, now, command="true")
    spec = ContainerSpec(tmp_path / "code", tmp_path / "output", 2**30, 10**9, 100)
    assert "DeviceRequests" not in container_config(job, spec, "instance")["HostConfig"]

"""GPUs: find them at start-up and hand them to jobs whole and exclusively, first come first served.

A job that requests `gpu=N` gets N devices that no other job has, named
by UUID in a Docker device request, so the container sees exactly those.
Jobs that cannot get their GPUs yet wait in a FIFO: a later job never takes
GPUs ahead of an earlier waiting one, even when it asks for fewer, so a job
that needs all GPUs is not starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

NVIDIA_SMI_TIMEOUT_S = 30


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str


class GpuInventory(Protocol):
    """Source of the host's GPU list; tests pass a fixed list."""

    def discover(self) -> list[Gpu]: ...


class NoGpus:
    def discover(self) -> list[Gpu]:
        return []


class NvidiaSmi:
    """Lists GPUs with `nvidia-smi`, which ships with the NVIDIA driver on every GPU host."""

    def discover(self) -> list[Gpu]:
        command = ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True)
        except FileNotFoundError:
            return []
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("gpu_discovery_failed", error=str(exc))
            return []
        return parse_nvidia_smi(result.stdout)


def parse_nvidia_smi(output: str) -> list[Gpu]:
    """Parse `index, uuid, name` lines from `nvidia-smi --format=csv,noheader`."""
    gpus = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",", 2)]
        if len(fields) == 3 and fields[0].isdigit():
            gpus.append(Gpu(int(fields[0]), fields[1], fields[2]))
    return gpus


@dataclass
class _Waiter:
    job_id: str
    count: int
    granted: asyncio.Future[tuple[str, ...]]


class GpuPool:
    """The host's GPUs and the job each one is assigned to."""

    def __init__(self, gpus: list[Gpu]) -> None:
        self.gpus = list(gpus)
        self._holder: dict[str, str | None] = {gpu.uuid: None for gpu in gpus}
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def total(self) -> int:
        return len(self.gpus)

    def free(self) -> list[str]:
        return [uuid for uuid, holder in self._holder.items() if holder is None]

    def held_by(self, job_id: str) -> tuple[str, ...]:
        return tuple(uuid for uuid, holder in self._holder.items() if holder == job_id)

    def waiting(self) -> list[str]:
        return [waiter.job_id for waiter in self._waiters]

    def claim(self, job_id: str, device_ids: tuple[str, ...]) -> tuple[str, ...]:
        """Give an adopted job back the devices it held before a restart; return those that are gone."""
        missing = []
        for uuid in device_ids:
            if uuid in self._holder and self._holder[uuid] in (None, job_id):
                self._holder[uuid] = job_id
            else:
                missing.append(uuid)
        return tuple(missing)

    async def acquire(self, job_id: str, count: int) -> tuple[str, ...]:
        """Wait until `count` GPUs are free for this job, in arrival order, and hold them."""
        if count > self.total:
            raise ValueError(f"{count} GPUs requested, this host has {self.total}")
        waiter = _Waiter(job_id, count, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._grant()
        try:
            return await waiter.granted
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.granted.done() and not waiter.granted.cancelled():
                self.release(job_id)
            self._grant()
            raise

    def release(self, job_id: str) -> None:
        for uuid, holder in self._holder.items():
            if holder == job_id:
                self._holder[uuid] = None
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            free = self.free()
            if len(free) < head.count:
                return
            self._waiters.popleft()
            devices = tuple(free[: head.count])
            for uuid in devices:
                self._holder[uuid] = head.job_id
            head.granted.set_result(devices)
            log.info("gpus_assigned", job_id=head.job_id, devices=list(devices))

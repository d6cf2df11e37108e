"""Per-job requests at submission: data mounts, GPUs, memory and CPUs.

They are checked against the config's caps and the host, resolved (a
dataset name becomes the version it means today) and stored in
`Job.options`, so a restarted daemon starts a queued job with exactly what
was accepted.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from floydd.config import ResourceSettings
from floydd.datasets import DatasetNotFound, DatasetStore, DatasetVersion
from floydd.errors import InvalidRequest
from floydd.jobs import Job

REQUEST_FIELDS = frozenset({"data", "gpu", "memory", "cpus"})
MAX_DATA_MOUNTS = 5
DEFAULT_MOUNT = "input"
_MOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Folders a data mount may not hide: the job's own and the image's system folders.
RESERVED_MOUNTS = frozenset(
    {"code", "output", "bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "run",
     "sbin", "sys", "tmp", "usr", "var"}
)  # fmt: skip
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class RequestContext:
    resources: ResourceSettings
    datasets: DatasetStore
    gpu_count: int
    # The CPUs the Docker engine can give one container.
    host_cpus: int
    # Returns the job with that id, or None.
    find_job: Callable[[str], Awaitable[Job | None]]
    # Whether a finished job's output folder still exists (not pruned).
    has_output: Callable[[str], bool]
    # Whether the submitting user may mount this job's output or this dataset.
    may_use_job: Callable[[Job], bool]
    may_use_dataset: Callable[[DatasetVersion], bool]


async def resolve_requests(fields: dict[str, str], data: list[str], context: RequestContext) -> dict[str, Any]:
    """Check and resolve the request fields; return the options to store with the job."""
    options: dict[str, Any] = {}
    if data:
        options["data"] = await _resolve_data(data, context)
    if "gpu" in fields:
        gpus = _parse_gpu(fields["gpu"], context.gpu_count)
        if gpus:
            options["gpus"] = gpus
    if "memory" in fields:
        options["memory_bytes"] = _parse_memory(fields["memory"], context.resources)
    if "cpus" in fields:
        options["cpus"] = _parse_cpus(fields["cpus"], context.resources, context.host_cpus)
    return options


async def _resolve_data(values: list[str], context: RequestContext) -> list[dict[str, Any]]:
    if len(values) > MAX_DATA_MOUNTS:
        raise InvalidRequest(f"too many data fields: {len(values)}, at most {MAX_DATA_MOUNTS}")
    mounts: list[dict[str, Any]] = []
    for value in values:
        source, _, mount = value.rpartition(":") if ":" in value else (value, "", DEFAULT_MOUNT)
        mount = _check_mount(mount, value)
        if any(existing["mount"] == mount for existing in mounts):
            raise InvalidRequest(f"data mount {mount} is used twice")
        mounts.append({**await _resolve_source(source.strip(), context), "mount": mount})
    return mounts


def _check_mount(mount: str, value: str) -> str:
    name = mount.strip().strip("/")
    if not _MOUNT.match(name) or name in RESERVED_MOUNTS:
        reserved = ", ".join(sorted(RESERVED_MOUNTS))
        raise InvalidRequest(f"invalid mount in data={value!r}: use one folder name such as input, not {reserved}")
    return f"/{name}"


async def _resolve_source(source: str, context: RequestContext) -> dict[str, Any]:
    name, _, version_text = source.partition("/")
    if name == "jobs":
        return await _resolve_job_output(version_text, context)
    version = None
    if version_text:
        if not version_text.isdigit():
            raise InvalidRequest(f"invalid dataset version in {source!r}: use NAME or NAME/NUMBER")
        version = int(version_text)
    dataset = context.datasets.get(name, version)
    if not context.may_use_dataset(dataset):
        # Another user's dataset looks the same as a missing one.
        raise DatasetNotFound(f"no dataset named {name!r}; upload one with POST /api/v1/datasets")
    return {"dataset": dataset.id}


async def _resolve_job_output(job_id: str, context: RequestContext) -> dict[str, Any]:
    job = await context.find_job(job_id) if job_id else None
    if job is None or not context.may_use_job(job):
        raise InvalidRequest(f"no job {job_id!r} whose output could be mounted")
    if not job.state.is_final:
        raise InvalidRequest(f"job {job_id} is {job.state.value}; only a finished job's output can be mounted")
    if not context.has_output(job_id):
        raise InvalidRequest(f"the output of job {job_id} is gone (deleted or pruned)")
    return {"job_output": job_id}


def _parse_gpu(text: str, available: int) -> int:
    if not text.strip().isdigit():
        raise InvalidRequest(f"invalid gpu {text!r}: use a whole number of GPUs")
    count = int(text)
    if count > 0 and available == 0:
        raise InvalidRequest(f"gpu={count} requested, but this host has no GPUs")
    if count > available:
        raise InvalidRequest(f"gpu={count} requested, but this host has only {available} GPUs")
    return count


def _parse_memory(text: str, resources: ResourceSettings) -> int:
    match = _MEMORY.match(text)
    if match is None:
        raise InvalidRequest(f"invalid memory {text!r}: use a size such as 512m or 8g")
    size = int(float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()])
    cap = resources.max_memory_mib * 1024**2
    if size < 6 * 1024**2:
        raise InvalidRequest(f"invalid memory {text!r}: Docker needs at least 6 MiB")
    if size > cap:
        raise InvalidRequest(f"memory {text!r} exceeds the limit of {resources.max_memory_mib} MiB")
    return size


def _parse_cpus(text: str, resources: ResourceSettings, host_cpus: int) -> float:
    try:
        cpus = float(text)
    except ValueError:
        raise InvalidRequest(f"invalid cpus {text!r}: use a number such as 1.5") from None
    if not 0.01 <= cpus <= resources.max_cpus:
        raise InvalidRequest(f"cpus {text!r} must be between 0.01 and {resources.max_cpus:g}")
    if cpus > host_cpus:
        raise InvalidRequest(f"cpus {text!r} is more than this host's {host_cpus} CPUs")
    return cpus

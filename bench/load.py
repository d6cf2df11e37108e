"""Closed-loop HTTP load with wrk, and the per-path rounds of the comparison."""

from __future__ import annotations

import asyncio
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.procstat import cpu_seconds, cpu_times, tree_cpu_seconds

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
WRK_MARKER = "WRK_JSON "


@dataclass(frozen=True)
class Round:
    """One wrk run against one path at one concurrency."""

    path: str
    connections: int
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    # CPU time of the process in front of the app (floydd, HAProxy or a
    # reference server) per request, in µs, if one was measured: in all, in
    # user space, and in the kernel.
    proxy_cpu_us_per_request: float | None = None
    proxy_user_us_per_request: float | None = None
    proxy_system_us_per_request: float | None = None
    # CPU time per request, in µs, of the app's container and of the
    # docker-proxy process that relays its published port, if measured.
    app_cpu_us_per_request: float | None = None
    docker_proxy_cpu_us_per_request: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


@dataclass
class Summary:
    """Medians over the rounds of one path at one concurrency."""

    path: str
    connections: int
    rounds: list[Round] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        values = [getattr(item, attribute) for item in self.rounds]
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else float("nan")

    @property
    def errors(self) -> int:
        return sum(item.errors for item in self.rounds)


async def run_wrk(
    url: str,
    connections: int,
    duration_s: float,
    path: str,
    cpu_pid: int | None = None,
    app_pid: int | None = None,
    docker_proxy_pid: int | None = None,
) -> Round:
    """Run wrk for `duration_s` seconds with `connections` keep-alive connections against `url`.

    The Round gets the CPU per request of three processes, if given: the
    proxy (`cpu_pid`), the app's container (`app_pid`, its first process, with
    the app below it) and the docker-proxy behind the app's published port.
    """
    # Two threads at most: the machine this was written for has two cores, shared with the servers.
    threads = min(connections, 2)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "30s",
        "-s", str(WRK_SCRIPT), url,
    ]  # fmt: skip
    cpu_before = cpu_times(cpu_pid) if cpu_pid else (0.0, 0.0)
    app_before = tree_cpu_seconds(app_pid) if app_pid else 0.0
    docker_proxy_before = cpu_seconds(docker_proxy_pid) if docker_proxy_pid else 0.0
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(duration_s + 60):
        output, _ = await process.communicate()
    cpu_after = cpu_times(cpu_pid) if cpu_pid else None
    app_used = tree_cpu_seconds(app_pid) - app_before if app_pid else None
    docker_proxy_used = cpu_seconds(docker_proxy_pid) - docker_proxy_before if docker_proxy_pid else None
    text = output.decode(errors="replace")
    report = _parse_report(text, command)

    requests = int(report["requests"])
    errors = sum(int(count) for count in report["errors"].values())
    user_us = system_us = None
    if cpu_after is not None:
        user_us = _per_request_us(cpu_after[0] - cpu_before[0], requests)
        system_us = _per_request_us(cpu_after[1] - cpu_before[1], requests)
    return Round(
        path=path,
        connections=connections,
        requests=requests,
        duration_s=report["duration_us"] / 1e6,
        p50_ms=report["latency_us"]["p50"] / 1000,
        p99_ms=report["latency_us"]["p99"] / 1000,
        errors=errors,
        proxy_cpu_us_per_request=user_us + system_us if user_us is not None and system_us is not None else None,
        proxy_user_us_per_request=user_us,
        proxy_system_us_per_request=system_us,
        app_cpu_us_per_request=_per_request_us(app_used, requests),
        docker_proxy_cpu_us_per_request=_per_request_us(docker_proxy_used, requests),
    )


def _per_request_us(seconds: float | None, requests: int) -> float | None:
    return seconds / requests * 1e6 if seconds is not None and requests else None


def _parse_report(text: str, command: list[str]) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith(WRK_MARKER):
            report: dict[str, Any] = json.loads(line[len(WRK_MARKER) :])
            return report
    raise RuntimeError(f"wrk printed no report ({' '.join(command)}):\n{text[-2000:]}")

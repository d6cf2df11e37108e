"""Memory and CPU readings of one process from /proc (Linux only)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS since the process started) in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def _stat_fields(pid: int) -> list[str]:
    """Read /proc/<pid>/stat from field 3 (the state) on, so field N of proc(5) is at index N - 3."""
    # The command name in field 2 may contain spaces, so split after its closing bracket.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_times(pid: int) -> tuple[float, float]:
    """Return the user and the system CPU seconds of the process, threads included."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """Return user plus system CPU time of the process, threads included."""
    user, system = cpu_times(pid)
    return user + system


# The exceptions that reading /proc/<pid>/... raises once the process has exited.
GONE = (FileNotFoundError, ProcessLookupError)


def process_tree(pid: int) -> list[int]:
    """Return `pid` and the pids of its descendants alive now."""
    pids: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except GONE:
            continue
        for task in tasks:
            try:
                stack += [int(child) for child in (task / "children").read_text().split()]
            except GONE:
                continue
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time of a process and its descendants, threads included.

    A process's figures keep the time of its threads that have ended, so the
    threads a threaded server starts per connection are counted. The time of
    the children it has reaped counts too, so a descendant that exits between
    two readings does not make the second one smaller.
    """
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except GONE:
            # It ended between the listing and the reading, and its parent now counts its time.
            continue
        # utime, stime, cutime and cstime: fields 14 to 17 in proc(5).
        total += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
    return total


def find_process(name: str, options: dict[str, str]) -> int | None:
    """Return the pid of a process whose program is `name` and whose arguments set each of `options`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except GONE:
            continue
        if not argv or Path(argv[0]).name != name:
            continue
        values = dict(zip(argv, argv[1:], strict=False))
        if all(values.get(option) == value for option, value in options.items()):
            return int(entry.name)
    return None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class RssSampler:
    """Samples a process's VmRSS in the background and keeps the maximum."""

    pid: int
    interval_s: float = 0.05
    baseline_kib: int = 0
    max_kib: int = 0
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self.baseline_kib = memory_kib(self.pid)["VmRSS"]
        self.max_kib = self.baseline_kib
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sample()

    @property
    def growth_kib(self) -> int:
        return self.max_kib - self.baseline_kib

    def _sample(self) -> None:
        self.max_kib = max(self.max_kib, memory_kib(self.pid)["VmRSS"])

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

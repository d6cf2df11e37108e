"""Sampling profiles of floydd under load with py-spy, and a summary of where its CPU time goes.

py-spy (PyPI) reads the daemon's memory from outside, so floydd runs
unmodified; it needs ptrace rights over the daemon, which root has.
"""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Round, run_wrk

SAMPLE_RATE_HZ = 250
# "function (path/to/file.py:123)" as py-spy writes a frame; native frames carry a library name instead.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<location>[^()]*?)(?::\d+)?\)$")


def py_spy_path() -> str:
    venv_bin = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
    found = str(venv_bin) if venv_bin.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed; run bench/run.sh, which installs it from PyPI")
    return found


async def record(pid: int, seconds: float, output: Path, file_format: str, native: bool) -> None:
    command = [
        py_spy_path(), "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", str(SAMPLE_RATE_HZ), "--format", file_format, "--output", str(output),
    ]  # fmt: skip
    if native:
        # Native frames show time inside uvloop, libc and C parsers under their own names
        # instead of under the Python frame that called them.
        command.append("--native")
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output_text, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"py-spy failed with {process.returncode}: {output_text.decode(errors='replace')[-2000:]}")


async def profiled_round(
    pid: int, url: str, connections: int, seconds: float, output: Path, file_format: str, native: bool = False
) -> Round:
    """Run one wrk round against floydd while py-spy records the daemon."""
    recorder = asyncio.create_task(record(pid, seconds, output, file_format, native))
    # py-spy attaches in well under a second; starting the load just after keeps the profile on the load.
    await asyncio.sleep(0.3)
    result = await run_wrk(url, connections, seconds, path="floydd (profiled)", cpu_pid=pid)
    await recorder
    return result


@dataclass
class FloyddProfile:
    """Findings of the profiled rounds at one concurrency."""

    connections: int
    python: ProfileSummary
    native: ProfileSummary
    syscalls_per_request: dict[str, float]
    profiled_requests_per_s: float


@dataclass
class ProfileSummary:
    """Sample counts from py-spy's collapsed stacks ("raw" format)."""

    samples: int = 0
    # Samples of idle worker threads and of the loop waiting in epoll, left out of every share.
    background_samples: int = 0
    self_by_function: collections.Counter[str] = field(default_factory=collections.Counter)
    total_by_function: collections.Counter[str] = field(default_factory=collections.Counter)
    self_by_package: collections.Counter[str] = field(default_factory=collections.Counter)

    def share(self, count: int) -> float:
        return 100 * count / self.samples if self.samples else 0.0


def summarize_collapsed(path: Path) -> ProfileSummary:
    summary = ProfileSummary()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(text) for text in stack.split(";")]
        if not frames:
            continue
        # py-spy counts the executor's and aiosqlite's worker threads as active while they
        # block on their queues; every such sample sits under threading.py's _bootstrap.
        if any("threading.py:" in frame for frame in frames):
            summary.background_samples += count
            continue
        # With --native the loop's wait in epoll shows as a sample; it is waiting, not work.
        if frames[-1].endswith((":epoll_wait", ":epoll_pwait")):
            summary.background_samples += count
            continue
        summary.samples += count
        summary.self_by_function[frames[-1]] += count
        summary.self_by_package[_package(frames[-1])] += count
        for name in set(frames):
            summary.total_by_function[name] += count
    return summary


def _frame_name(text: str) -> str:
    """Return "location:function" for a frame, without the line number so samples of one function add up."""
    match = FRAME.match(text.strip())
    if match is None:
        return text.strip()
    location = match.group("location")
    if match.group("function").startswith("0x"):
        return f"{location}:(unresolved symbol)"
    for marker in ("site-packages/", "lib/python3", "/floydd/"):
        if marker in location:
            location = location.split(marker, 1)[1]
            if marker == "/floydd/":
                location = "floydd/" + location
            break
    return f"{location}:{match.group('function')}"


def _package(frame: str) -> str:
    location = frame.split(":", 1)[0]
    if location.startswith("floydd/"):
        return "floydd"
    top = re.split(r"[/.]", location.lstrip("0123456789."), maxsplit=1)[0]
    return top or "other"


async def count_syscalls(pid: int, url: str, connections: int, seconds: float, output: Path) -> dict[str, float]:
    """Run one wrk round under `strace -c` and return the daemon's system calls per request, by name.

    strace slows every system call a lot, so the round's speed means nothing;
    the counts per request are exact.
    """
    strace = await asyncio.create_subprocess_exec(
        "strace", "-c", "-f", "-q", "-p", str(pid), "-o", str(output),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(0.5)
    try:
        result = await run_wrk(url, connections, seconds, path="floydd (strace)")
    finally:
        # SIGINT detaches strace, which then writes its summary table.
        strace.send_signal(signal.SIGINT)
        await strace.wait()
    calls = _parse_strace_summary(output)
    return {name: count / result.requests for name, count in calls.items()} if result.requests else {}


def _parse_strace_summary(path: Path) -> dict[str, int]:
    """Return the call count per system call from strace -c's table."""
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        # Rows: % time, seconds, usecs/call, calls, [errors,] syscall.
        if len(fields) < 5 or not fields[3].isdigit() or fields[-1] == "total":
            continue
        try:
            float(fields[0])
        except ValueError:
            continue
        calls[fields[-1]] = int(fields[3])
    return calls

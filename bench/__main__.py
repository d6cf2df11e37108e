"""Run the floydd benchmark: `python -m bench` (or `bash bench/run.sh`, which installs the tools first).

See docs/benchmarks.md for the method and the latest results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import uvloop

from bench.load import Round, Summary, run_wrk
from bench.procstat import find_process
from bench.profiling import FloyddProfile, count_syscalls, profiled_round, summarize_collapsed
from bench.report import PLAIN_HAPROXY, Results, environment, render
from bench.scenarios import (
    GIB,
    ColdStart,
    Crowd,
    IdleJobs,
    Transfer,
    container_memory_mib,
    measure_cold_start,
    measure_crowd,
    measure_idle_jobs,
    measure_large_bodies,
)
from bench.services import (
    LOOPBACK,
    REPO,
    Floydd,
    HAProxy,
    ReferenceServer,
    bench_app_archive,
    container_pid,
    published_port,
)
from floydd.config import Settings

T = TypeVar("T")
SCENARIOS = ("bodies", "crowd", "cold-start", "idle-jobs", "profile")
DOCKER_RUN_LABEL = "org.floydd.bench=cold-start"
OPEN_FILES = 65536


class Target(NamedTuple):
    """One path of the comparison: its URL, the pid of the proxy to measure, and whether the app serves it."""

    url: str
    proxy_pid: int | None
    reaches_app: bool = True


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path and concurrency (default 5)")
    parser.add_argument("--round-seconds", type=float, default=5, help="length of one wrk round in seconds")
    parser.add_argument("--clients", default="1,8,64", help="comma-separated concurrent client counts (default 1,8,64)")
    parser.add_argument("--body-mib", type=int, default=1024, help="size of the large body each way, in MiB")
    parser.add_argument("--crowd-clients", type=int, default=10_000, help="clients waiting at once on one job")
    parser.add_argument("--crowd-timeout", type=float, default=240, help="seconds before waiting clients give up")
    parser.add_argument("--cold-start-runs", type=int, default=3, help="cold starts of each kind")
    parser.add_argument("--idle-jobs", type=int, default=100, help="serve jobs running for the idle measurement")
    parser.add_argument("--idle-window", type=float, default=30, help="seconds over which idle CPU is measured")
    parser.add_argument("--skip", default="", help=f"comma-separated measurements to skip: {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes and short rounds to check the harness; no docs page"
    )
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--output", type=Path, default=REPO / "docs" / "benchmarks.md", help="page to write the results to"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.round_seconds, args.body_mib = 1, 1, 64
        args.crowd_clients, args.cold_start_runs, args.idle_jobs, args.idle_window = 300, 1, 3, 5
        args.output = args.results_dir / "benchmarks-quick.md"
    unknown = set(filter(None, args.skip.split(","))) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown measurement in --skip: {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    args.skip = set(filter(None, args.skip.split(",")))
    args.clients = [int(text) for text in args.clients.split(",")]
    return args


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit, which the daemon inherits, for the waiting-clients run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, OPEN_FILES)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args = args
        self.command = command
        self.results_dir: Path = args.results_dir
        self.notes: list[str] = []
        self.floydd = Floydd(self.results_dir, env={"FLOYDD_PROXY_MAX_QUEUE_DEPTH": str(max(100, args.crowd_clients))})
        self.haproxy: HAProxy | None = None
        # HAProxy without the headers that floydd adds, measured beside the other at one client.
        self.plain_haproxy: HAProxy | None = None
        self.references: dict[str, ReferenceServer] = {}
        self.job_id = ""
        self.app_port = 0
        self.app_pid: int | None = None
        self.docker_proxy_pid: int | None = None

    async def attempt(self, name: str, step: Callable[[], Awaitable[T]]) -> T | None:
        """Run one measurement; a failure becomes a note on the page instead of ending the run."""
        if name in self.args.skip:
            return None
        say(f"{name}: starting")
        try:
            return await step()
        except Exception as exc:
            traceback.print_exc()
            self.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            return None

    async def run(self) -> Results:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        open_files = raise_open_file_limit()
        env = environment()
        await self.floydd.start()
        say(f"floydd {self.floydd.url} (pid {self.floydd.pid}), state in {self.floydd.state_dir}")
        try:
            self.job_id = await self.floydd.submit_serve_job(bench_app_archive())
            await self.floydd.wait_serving(self.job_id)
            self.app_port = await published_port(f"floydd-{self.job_id}")
            self.app_pid = await container_pid(f"floydd-{self.job_id}")
            # Docker runs no docker-proxy when its userland proxy is switched off, and its column then shows n/a.
            self.docker_proxy_pid = find_process(
                "docker-proxy", {"-proto": "tcp", "-host-ip": LOOPBACK, "-host-port": str(self.app_port)}
            )
            self.haproxy = HAProxy(self.results_dir, app_port=self.app_port, forwarded_prefix=f"/expose/{self.job_id}")
            await self.haproxy.start()
            self.plain_haproxy = HAProxy(self.results_dir, app_port=self.app_port, name="haproxy-plain")
            await self.plain_haproxy.start()
            say(f"job {self.job_id} on 127.0.0.1:{self.app_port}, HAProxy on 127.0.0.1:{self.haproxy.port}")
            self.references = {
                "lean proxy": ReferenceServer(self.results_dir, kind="lean-proxy", app_port=self.app_port),
                "bare proxy": ReferenceServer(self.results_dir, kind="bare-proxy", app_port=self.app_port),
                "aiohttp alone": ReferenceServer(self.results_dir, kind="aiohttp-hello"),
            }
            for reference in self.references.values():
                await reference.start()

            summaries = await self.compare_paths()
            profiles = await self.attempt("profile", self.profile) or {}
            transfers = await self.attempt("bodies", self.large_bodies) or []
            crowd = await self.attempt("crowd", self.crowd)
            cold_start = await self.attempt("cold-start", self.cold_start)
            idle_jobs = await self.attempt("idle-jobs", self.idle_jobs)
        finally:
            await self.close()

        settings = {
            "rounds": f"{self.args.rounds} × {self.args.round_seconds:g} s per path and concurrency",
            "open-file limit": str(open_files),
        }
        return Results(
            command=self.command,
            settings=settings,
            environment=env,
            summaries=summaries,
            transfers=transfers,
            crowd=crowd,
            cold_start=cold_start,
            idle_jobs=idle_jobs,
            profiles=profiles,
            notes=self.notes,
        )

    def paths(self, connections: int) -> dict[str, Target]:
        """Return each path to measure. The reference servers run at one client only."""
        assert self.haproxy is not None
        paths = {
            "direct": Target(f"http://{LOOPBACK}:{self.app_port}/hello", None),
            "HAProxy": Target(f"http://{LOOPBACK}:{self.haproxy.port}/hello", self.haproxy.pid),
            "floydd": Target(self.floydd.expose_url(self.job_id, "/hello"), self.floydd.pid),
        }
        if connections == 1:
            if self.plain_haproxy is not None:
                paths[PLAIN_HAPROXY] = Target(
                    f"http://{LOOPBACK}:{self.plain_haproxy.port}/hello", self.plain_haproxy.pid
                )
            for name, reference in self.references.items():
                reaches_app = reference.app_port is not None
                paths[name] = Target(f"http://{LOOPBACK}:{reference.port}/hello", reference.pid, reaches_app)
        return paths

    async def compare_paths(self) -> list[Summary]:
        # One short unmeasured pass warms up every path: connections, imports, caches.
        for name, target in self.paths(1).items():
            await run_wrk(target.url, 8, 1, path=name)
        summaries: list[Summary] = []
        for connections in self.args.clients:
            paths = self.paths(connections)
            names = list(paths)
            by_path = {name: Summary(name, connections) for name in names}
            for round_index in range(self.args.rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    target = paths[name]
                    result = await run_wrk(
                        target.url,
                        connections,
                        self.args.round_seconds,
                        path=name,
                        cpu_pid=target.proxy_pid,
                        app_pid=self.app_pid if target.reaches_app else None,
                        docker_proxy_pid=self.docker_proxy_pid if target.reaches_app else None,
                    )
                    by_path[name].rounds.append(result)
                    say(_describe(result))
            summaries += by_path.values()
        return summaries

    async def profile(self) -> dict[int, FloyddProfile]:
        url = self.floydd.expose_url(self.job_id, "/hello")
        profiles: dict[int, FloyddProfile] = {}
        seconds = max(self.args.round_seconds, 3)
        pid = self.floydd.pid
        for connections in (1, 64):
            stem = self.results_dir / f"floydd-{connections}-clients"
            svg, raw, native = (stem.with_suffix(suffix) for suffix in (".svg", ".collapsed.txt", ".native.txt"))
            result = await profiled_round(pid, url, connections, seconds, svg, "flamegraph")
            say(f"profiled: {_describe(result)} -> {svg.name}")
            result = await profiled_round(pid, url, connections, seconds, raw, "raw")
            say(f"profiled: {_describe(result)} -> {raw.name}")
            native_result = await profiled_round(pid, url, connections, seconds, native, "raw", native=True)
            say(f"profiled: {_describe(native_result)} -> {native.name}")
            strace_output = stem.with_suffix(".strace.txt")
            syscalls = await count_syscalls(pid, url, connections, seconds, strace_output)
            say(f"strace -c -> {strace_output.name}")
            profiles[connections] = FloyddProfile(
                connections=connections,
                python=summarize_collapsed(raw),
                native=summarize_collapsed(native),
                syscalls_per_request=syscalls,
                profiled_requests_per_s=result.requests_per_s,
            )
        return profiles

    async def large_bodies(self) -> list[Transfer]:
        transfers = await measure_large_bodies(
            self.floydd, self.job_id, self.app_port, size=self.args.body_mib * 1024 * 1024
        )
        for item in transfers:
            say(f"{item.direction} {item.bytes / GIB:.2f} GiB {item.path}: {item.mib_per_s:.0f} MiB/s, "
                f"daemon RSS growth {item.daemon_rss_growth_kib} KiB")  # fmt: skip
        return transfers

    async def crowd(self) -> Crowd:
        profile_output = None if "profile" in self.args.skip else self.results_dir / "floydd-crowd.collapsed.txt"
        crowd = await measure_crowd(
            self.floydd, self.job_id, self.args.crowd_clients, max(100, self.args.crowd_clients),
            self.args.crowd_timeout, profile_output,
        )  # fmt: skip
        if profile_output is not None:
            crowd.profile = summarize_collapsed(profile_output)
        say(f"crowd: {dict(crowd.statuses)}, max waiting {crowd.max_waiting}, RSS max {crowd.daemon_rss_max_kib} KiB")
        return crowd

    async def cold_start(self) -> ColdStart:
        # The daemon runs without a config file, so jobs use the embedded default env.
        settings = Settings()
        image = settings.envs[settings.jobs.default_env].image
        cold = await measure_cold_start(self.floydd, image, self.args.cold_start_runs, DOCKER_RUN_LABEL)
        say(f"cold start floydd {cold.floydd_s}, docker run {cold.docker_run_s}")
        return cold

    async def idle_jobs(self) -> IdleJobs:
        container_mib = await container_memory_mib(f"floydd-{self.job_id}")
        # The load job is idle by now and counts as one of the serving jobs.
        idle = await measure_idle_jobs(
            self.floydd, self.args.idle_jobs - 1, container_mib, window_s=self.args.idle_window
        )
        idle = dataclasses.replace(idle, requested=self.args.idle_jobs)
        say(f"idle jobs: {idle}")
        return idle

    async def close(self) -> None:
        for reference in self.references.values():
            await reference.stop()
        for haproxy in (self.haproxy, self.plain_haproxy):
            if haproxy is not None:
                await haproxy.stop()
        await self.floydd.stop()
        removed = await self.floydd.remove_containers()
        self.floydd.remove_state()
        say(f"stopped floydd and HAProxy, removed {removed} job containers")


def _describe(result: Round) -> str:
    cpu = result.proxy_cpu_us_per_request
    return (
        f"{result.path:>13} c={result.connections:<3} {result.requests_per_s:8.0f} req/s "
        f"p50 {result.p50_ms:7.2f} ms p99 {result.p99_ms:7.2f} ms errors {result.errors}"
        + (f" proxy CPU {cpu:.0f} µs/req" if cpu is not None else "")
    )


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: _to_json(item) for key, item in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(key): _to_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set):
        return [_to_json(item) for item in value]
    return value


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    args = parse_args(arguments)
    command = " ".join(["bash bench/run.sh", *map(shlex.quote, arguments)])
    results = uvloop.run(Bench(args, command).run())

    page = render(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    (args.results_dir / "results.json").write_text(json.dumps(_to_json(results), indent=2, default=str))
    print(page)
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

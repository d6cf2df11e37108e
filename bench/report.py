"""The machine and versions behind a run, and the docs/benchmarks.md page written from the results."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.load import Summary
from bench.profiling import FloyddProfile, ProfileSummary
from bench.scenarios import ColdStart, Crowd, IdleJobs, Transfer, median


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical CPUs (nproc {_first_line(['nproc'])})",
        "memory": f"{_memory_gib():.1f} GiB",
        "kernel": platform.release(),
        "net.core.somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
        "floydd": _package_version("floydd"),
        "Python": platform.python_version(),
        "aiohttp": _package_version("aiohttp"),
        "uvloop": _package_version("uvloop"),
        "httptools": _package_version("httptools"),
        "HAProxy": _first_line(["haproxy", "-v"]),
        "Docker": _first_line(["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"]),
        "wrk": _first_line(["wrk", "-v"]),
        "py-spy": _first_line([_py_spy_or_name(), "--version"]),
    }


def _py_spy_or_name() -> str:
    from bench.profiling import py_spy_path

    try:
        return py_spy_path()
    except RuntimeError:
        return "py-spy"


@dataclass
class Results:
    command: str
    settings: dict[str, str]
    environment: dict[str, str]
    summaries: list[Summary]
    transfers: list[Transfer]
    crowd: Crowd | None
    cold_start: ColdStart | None
    idle_jobs: IdleJobs | None
    profiles: dict[int, FloyddProfile]
    notes: list[str]


METHOD = """\
## Method

One `floydd serve --port 0` daemon with a temporary state directory runs one
serve job of the benchmark app. That app is the style-transfer example from
`examples/style-transfer` plus the routes in `bench/app/app.py`: `/hello`
returns 6 bytes, `/sink` reads an upload in 1 MiB chunks, and `/source`
streams zeros. Werkzeug's per-request log lines are switched off in the app, so the
app's stdout does not add log-pump work to the daemon during the rounds. The
same container is then reached three ways:

- **direct**: its port published by Docker on 127.0.0.1 (through docker-proxy,
  like the other two paths);
- **HAProxy**: HAProxy from Debian's packages on 127.0.0.1 with
  `server app 127.0.0.1:PORT maxconn 1` and `timeout queue 300s`, the classic
  way to send one request at a time to a backend. It adds the forwarding and
  request-id headers that floydd adds (`HAPROXY_FORWARDING` in
  `bench/services.py`), so the app parses the same request head on both paths;
- **floydd**: `/expose/<job id>/hello`, through floydd's per-job queue.

Load comes from wrk (closed loop, keep-alive connections, at most two
threads). For each concurrency, every round runs each path once, and the
order of the paths rotates from round to round, so drift on a shared machine
falls on every path alike. Tables show the median over the rounds. "Proxy CPU"
is the CPU time that floydd or HAProxy spent during the round, divided by the
requests served, with its user and system parts (from `/proc/<pid>/stat`,
so in steps of 10 ms per round). The same readings of the app's container
processes and of the docker-proxy process behind its published port give
their CPU per request on each path. A process's figures keep the time of
its ended threads, so the threads Werkzeug starts per connection count.
With one client nothing waits in a queue,
so the floydd/direct ratio at one client is the cost of the proxy alone.

At one client the rotation also includes three reference servers from
`bench/reference.py`, each its own process. **lean proxy** is the smallest
proxy built from floydd's parts: an asyncio Protocol with httptools in front
of floydd's upstream client, with a task per request and no other feature.
**bare proxy** does the least a Python proxy can: callbacks only, no task,
no parsing beyond the end of the head and the Content-Length, and one
connection to the app opened ahead. **aiohttp alone** is aiohttp serving
`/hello` itself. The bare proxy bounds what a Python proxy reaches on this
machine, and aiohttp alone is aiohttp's own cost per request.

The other measurements use the same daemon and job:

- **Large bodies**: 1 GiB of zeros up to `/sink` and down from `/source`,
  directly and through floydd; the daemon's VmRSS is sampled every 50 ms
  from `/proc/<pid>/status`, and its VmHWM (peak RSS) is read before and after.
- **Waiting clients**: that many raw TCP clients connect at once and each
  sends one `GET /hello` with `Connection: close`; each client ends with its
  status code or the error that ended it. The queue depth is raised with
  `FLOYDD_PROXY_MAX_QUEUE_DEPTH`, and the open-file limit of the harness and
  the daemon is raised with `setrlimit`. All clients connect in the same
  instant, so the daemon's listen backlog (`listen(65535)` in floydd/cli.py,
  capped by `net.core.somaxconn`) overflows: the kernel drops the handshakes
  it has no room for and TCP retransmits them seconds later. This causes the
  gap between the 99 % and the last finish time, and any connection resets.
- **Cold start**: from the upload (`POST /api/v1/jobs`) to the first 200 from
  `/hello` through floydd, against `docker run --init -p 127.0.0.1::5000 -v
  CODE:/code` of the same files on the same image followed by polling the
  published port every 20 ms. The two alternate.
- **Idle jobs**: serve jobs of the same app are started four uploads at a time;
  once all serve, floydd's CPU use over a quiet window and its RSS are read.
  The number of jobs is capped by available memory (twice each container's
  measured size, keeping a reserve), and the table shows when the cap applied.
- **Profile**: py-spy samples the daemon (native frames off, idle samples
  dropped) during extra floydd rounds at 1 and 64 clients, which are not
  part of the medians above. Flame graphs go to `bench/results/`.
"""


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def render(results: Results) -> str:
    lines = [
        "# Benchmarks",
        "",
        "This page is written by the benchmark harness; rerun it to refresh the numbers:",
        "",
        "```",
        results.command,
        "```",
        "",
        "Numbers come from a single run on a machine shared with other work, so",
        "differences of a few percent are noise. They describe this machine only.",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in results.environment.items()],
        *[f"| {name} | {value} |" for name, value in results.settings.items()],
        "",
    ]
    lines += _render_paths(results.summaries)
    lines += _render_transfers(results.transfers)
    if results.crowd is not None:
        lines += _render_crowd(results.crowd)
    if results.cold_start is not None:
        lines += _render_cold_start(results.cold_start)
    if results.idle_jobs is not None:
        lines += _render_idle(results.idle_jobs)
    if results.profiles:
        lines += _render_profiles(results.profiles)
    if results.notes:
        lines += ["## Notes from this run", "", *[f"- {note}" for note in results.notes], ""]
    lines.append(METHOD)
    return "\n".join(lines)


MEASURED_PATHS = ("direct", "HAProxy", "floydd")
PLAIN_HAPROXY = "HAProxy, no added headers"
REFERENCE_PATHS = ("lean proxy", "bare proxy", "aiohttp alone")


def _render_paths(summaries: list[Summary]) -> list[str]:
    lines = [
        "## Requests through each path (`GET /hello`)",
        "",
        "| clients | path | requests/s | p50 ms | p99 ms | proxy CPU µs/request | user | system | errors | rounds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for summary in summaries:
        if summary.path in MEASURED_PATHS:
            lines.append(_path_row(summary))
    lines += [
        "",
        "| clients | floydd/HAProxy requests/s | floydd/direct requests/s | floydd/HAProxy p99 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    by_key = {(summary.connections, summary.path): summary for summary in summaries}
    for connections in sorted({summary.connections for summary in summaries}):
        floydd, haproxy, direct = (by_key.get((connections, path)) for path in MEASURED_PATHS[::-1])
        if floydd is None or haproxy is None or direct is None:
            continue
        lines.append(
            f"| {connections} | {_ratio(floydd, haproxy, 'requests_per_s')} "
            f"| {_ratio(floydd, direct, 'requests_per_s')} | {_ratio(floydd, haproxy, 'p99_ms')} |"
        )
    lines.append("")
    lines += _render_targets(by_key)
    lines += _render_path_cpu(summaries, by_key)
    lines += _render_plain_haproxy(by_key)
    lines += _render_references(by_key)
    return lines


def _known(value: float) -> bool:
    return value == value


def _more_or_less(difference_us: float) -> str:
    """Describe a difference of CPU per request as `N µs more` or `N µs less`."""
    return f"{_fmt(abs(difference_us), 0)} µs {'more' if difference_us >= 0 else 'less'}"


def _path_cpu_us(summary: Summary) -> float:
    """Return the CPU per request of the measured processes on a path: proxy, app and docker-proxy."""
    parts = [summary.median("app_cpu_us_per_request"), summary.median("docker_proxy_cpu_us_per_request")]
    if summary.path != "direct":
        parts.append(summary.median("proxy_cpu_us_per_request"))
    return sum(part for part in parts if _known(part))


def _render_path_cpu(summaries: list[Summary], by_key: dict[tuple[int, str], Summary]) -> list[str]:
    """Render the CPU that the proxy, the app and docker-proxy spend per request on each path."""
    rows = [summary for summary in summaries if summary.path in MEASURED_PATHS]
    if not any(_known(summary.median("app_cpu_us_per_request")) for summary in rows):
        return []
    lines = [
        "## CPU per request along each path",
        "",
        "The same rounds, with the CPU time per request of each process a request passes",
        "through: the proxy, the app's container (the app and the thread it starts for each",
        "connection) and the docker-proxy process behind the app's published port. The sum",
        "leaves out what was not measured (n/a). wrk is not counted. All of them and wrk",
        "share the CPUs listed above.",
        "",
        "| clients | path | proxy µs/request | app µs/request | docker-proxy µs/request | sum µs/request |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for summary in rows:
        proxy = "–" if summary.path == "direct" else _fmt(summary.median("proxy_cpu_us_per_request"), 0)
        lines.append(
            f"| {summary.connections} | {summary.path} | {proxy} "
            f"| {_fmt(summary.median('app_cpu_us_per_request'), 0)} "
            f"| {_fmt(summary.median('docker_proxy_cpu_us_per_request'), 0)} | {_fmt(_path_cpu_us(summary), 0)} |"
        )
    lines.append("")
    for connections in sorted({connections for connections, _ in by_key}):
        floydd, haproxy = by_key.get((connections, "floydd")), by_key.get((connections, "HAProxy"))
        if floydd is not None and haproxy is not None:
            lines += [*_app_side_difference(floydd, haproxy), ""]
    return lines


def _render_plain_haproxy(by_key: dict[tuple[int, str], Summary]) -> list[str]:
    """Render HAProxy with and without floydd's request headers at one client."""
    haproxy, plain = by_key.get((1, "HAProxy")), by_key.get((1, PLAIN_HAPROXY))
    if haproxy is None or plain is None:
        return []

    lines = [
        "## HAProxy with and without floydd's headers",
        "",
        "HAProxy above adds the headers floydd adds to every request for the app: X-Forwarded-For,",
        "-Proto, -Host and -Prefix, and X-Request-ID. The same rounds at one client also",
        "reached a second HAProxy that adds none, as a plain `maxconn 1` configuration does.",
        "",
        "| path | requests/s | p50 ms | p99 ms | proxy CPU µs/request | app µs/request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for summary in (haproxy, plain):
        lines.append(
            f"| {summary.path} | {_fmt(summary.median('requests_per_s'), 0)} | {_fmt(summary.median('p50_ms'), 2)} "
            f"| {_fmt(summary.median('p99_ms'), 2)} | {_fmt(summary.median('proxy_cpu_us_per_request'), 0)} "
            f"| {_fmt(summary.median('app_cpu_us_per_request'), 0)} |"
        )

    lines += [
        "",
        f"Without the headers HAProxy served {_ratio(plain, haproxy, 'requests_per_s')} times the requests/s "
        f"with {_ratio(plain, haproxy, 'p99_ms')} times the p99 ({_round_ratios(plain, haproxy)}).",
    ]
    headers_us = haproxy.median("app_cpu_us_per_request") - plain.median("app_cpu_us_per_request")
    if _known(headers_us):
        lines.append(f"With the headers the app spent {_more_or_less(headers_us)} CPU per request.")

    bare = by_key.get((1, "bare proxy"))
    if bare is not None:
        lines += _connecting_ahead(bare, plain)
    lines.append("")
    return lines


def _connecting_ahead(bare: Summary, plain: Summary) -> list[str]:
    """Compare the app's and docker-proxy's CPU behind the bare proxy and behind HAProxy, both without added headers."""
    app_us = bare.median("app_cpu_us_per_request") - plain.median("app_cpu_us_per_request")
    docker_proxy_us = bare.median("docker_proxy_cpu_us_per_request") - plain.median("docker_proxy_cpu_us_per_request")
    if not _known(app_us):
        return []
    line = (
        "The bare proxy below adds no header either, but it connects ahead as floydd does. Behind it the app "
        f"spent {_more_or_less(app_us)} CPU per request than behind HAProxy without the headers"
    )
    if _known(docker_proxy_us):
        line += f", and docker-proxy {_more_or_less(docker_proxy_us)}"
    return [line + "."]


def _app_side_difference(floydd: Summary, haproxy: Summary) -> list[str]:
    """Compare what the proxy, the app and docker-proxy spend per request behind floydd and behind HAProxy."""
    proxy = floydd.median("proxy_cpu_us_per_request") - haproxy.median("proxy_cpu_us_per_request")
    app = floydd.median("app_cpu_us_per_request") - haproxy.median("app_cpu_us_per_request")
    docker_proxy = floydd.median("docker_proxy_cpu_us_per_request") - haproxy.median("docker_proxy_cpu_us_per_request")
    parts = [f"The proxy spent {_more_or_less(proxy)}", f"the app {_more_or_less(app)}"]
    if _known(docker_proxy):
        parts.append(f"docker-proxy {_more_or_less(docker_proxy)}")
    clients = "one client" if floydd.connections == 1 else f"{floydd.connections} clients"
    lines = [
        f"At {clients} the measured processes spent {_more_or_less(_path_cpu_us(floydd) - _path_cpu_us(haproxy))} "
        f"CPU per request through floydd than through HAProxy. {', '.join(parts[:-1])} and {parts[-1]}."
    ]
    if app > 0 and floydd.connections == 1:
        # The harness measures CPU, not the switches between the app's threads, so the page calls the cause likely.
        lines.append(
            "The likely cause of the app's extra CPU is how the connection reaches it. HAProxy connects "
            "when a request arrives and sends it at once, so the thread that the app starts for the "
            "connection finds its request waiting. floydd connects ahead (docs/proxy.md), so the app "
            "starts that thread while it still serves the request before, and the thread then waits for "
            "its own request."
        )
    return lines


# floydd's speed targets: requests/s at least HAProxy's with a p99 no worse at every
# concurrency, and at one client, where nothing waits in a queue, 95 % of direct access.
DIRECT_TARGET = 0.95


def _render_targets(by_key: dict[tuple[int, str], Summary]) -> list[str]:
    """Render which speed targets floydd met in this run, and how near HAProxy and the bare proxy come to direct."""
    lines = ["Against the targets in this run:", ""]
    for connections in sorted({connections for connections, _ in by_key}):
        floydd, haproxy, direct = (by_key.get((connections, path)) for path in MEASURED_PATHS[::-1])
        if floydd is None or haproxy is None or direct is None:
            continue
        throughput = floydd.median("requests_per_s") / haproxy.median("requests_per_s")
        tail = floydd.median("p99_ms") / haproxy.median("p99_ms")
        verdict = "met" if throughput >= 1 and tail <= 1 else "not met"
        # Three decimals, so that a verdict never sits beside a ratio that rounds to 1.00.
        line = (
            f"- {connections} client{'s' if connections > 1 else ''}: {verdict}, "
            f"{throughput:.3f} of HAProxy's requests/s ({_round_ratios(floydd, haproxy)}) "
            f"with {tail:.3f} of its p99"
        )
        if connections == 1:
            to_direct = floydd.median("requests_per_s") / direct.median("requests_per_s")
            line += f"; {to_direct:.3f} of direct access, against {DIRECT_TARGET:.2f}"
        lines.append(line + ".")
    haproxy, direct, bare = (by_key.get((1, path)) for path in ("HAProxy", "direct", "bare proxy"))
    if haproxy is not None and direct is not None and bare is not None:
        haproxy_to_direct = haproxy.median("requests_per_s") / direct.median("requests_per_s")
        bare_to_direct = bare.median("requests_per_s") / direct.median("requests_per_s")
        best = max(haproxy_to_direct, bare_to_direct)
        # Three decimals here too, since the next sentence compares these ratios with DIRECT_TARGET.
        lines += [
            "",
            f"At one client HAProxy reaches {haproxy_to_direct:.3f} of direct access "
            f"and the bare proxy {bare_to_direct:.3f}. Each puts one more hop between "
            "wrk and docker-proxy, on a machine whose two CPUs also run wrk, docker-proxy and the app.",
        ]
        if best < DIRECT_TARGET:
            lines.append(f"Neither reaches the {DIRECT_TARGET:.2f} of direct access that floydd's target asks for.")
    floydd = by_key.get((1, "floydd"))
    if haproxy is not None and floydd is not None:
        lines += ["", _one_client_gap(floydd, haproxy)]
        if bare is not None:
            lines.append(_bare_proxy_gap(floydd, haproxy, bare))
    lines.append("")
    return lines


def _round_ratios(floydd: Summary, haproxy: Summary) -> str:
    """Describe the spread of floydd/HAProxy requests/s over rounds, each ratio taken within one round."""
    ratios = sorted(
        mine.requests_per_s / theirs.requests_per_s
        for mine, theirs in zip(floydd.rounds, haproxy.rounds, strict=False)
        if theirs.requests_per_s
    )
    if not ratios:
        return "no round to compare"
    return f"{ratios[0]:.2f} to {ratios[-1]:.2f} within single rounds"


def _one_client_gap(floydd: Summary, haproxy: Summary) -> str:
    """Compare how much longer a one-client request takes through floydd with the extra CPU floydd spends on it."""
    longer_us = 1e6 / floydd.median("requests_per_s") - 1e6 / haproxy.median("requests_per_s")
    extra_cpu_us = floydd.median("proxy_cpu_us_per_request") - haproxy.median("proxy_cpu_us_per_request")
    return (
        f"At one client a request took {_fmt(longer_us, 0)} µs longer through floydd than through HAProxy "
        f"(from the median requests/s), and floydd spent {_fmt(extra_cpu_us, 0)} µs more CPU on it than "
        "HAProxy did. With one client nothing else is in flight, so floydd's work on a request either "
        "delays it or runs beside the app, docker-proxy and wrk on the machine's other CPU."
    )


def _bare_proxy_gap(floydd: Summary, haproxy: Summary, bare: Summary) -> str:
    """Place floydd between HAProxy and the bare proxy at one client, by requests/s and proxy CPU per request."""
    bare_to_haproxy = bare.median("requests_per_s") / haproxy.median("requests_per_s")
    floydd_to_bare = floydd.median("requests_per_s") / bare.median("requests_per_s")
    bare_cpu_us = bare.median("proxy_cpu_us_per_request") - haproxy.median("proxy_cpu_us_per_request")
    floydd_cpu_us = floydd.median("proxy_cpu_us_per_request") - bare.median("proxy_cpu_us_per_request")
    sentence = (
        f"The bare proxy, which only relays, reached {bare_to_haproxy:.3f} of HAProxy's requests/s "
        f"and spent {_more_or_less(bare_cpu_us)} CPU per request than HAProxy. floydd reached "
        f"{floydd_to_bare:.3f} of the bare proxy's requests/s and spent {_more_or_less(floydd_cpu_us)}."
    )
    if bare_to_haproxy >= 1 > floydd_to_bare * bare_to_haproxy:
        sentence += (
            " So a proxy in Python can keep up with HAProxy on this machine, and what keeps floydd behind is "
            "the per-request work of its features (see what one proxied request costs in Python, below)."
        )
    return sentence


def _path_row(summary: Summary) -> str:
    return (
        f"| {summary.connections} | {summary.path} | {_fmt(summary.median('requests_per_s'), 0)} "
        f"| {_fmt(summary.median('p50_ms'), 2)} | {_fmt(summary.median('p99_ms'), 2)} "
        f"| {_fmt(summary.median('proxy_cpu_us_per_request'), 0)} "
        f"| {_fmt(summary.median('proxy_user_us_per_request'), 0)} "
        f"| {_fmt(summary.median('proxy_system_us_per_request'), 0)} | {summary.errors} | {len(summary.rounds)} |"
    )


def _render_references(by_key: dict[tuple[int, str], Summary]) -> list[str]:
    """Render the one-client rounds of the reference servers beside HAProxy and floydd."""
    rows = [by_key.get((1, path)) for path in ("HAProxy", "floydd", *REFERENCE_PATHS)]
    present = [row for row in rows if row is not None]
    references = [path for path in REFERENCE_PATHS[:2] if (1, path) in by_key]
    if not references:
        return []
    lines = [
        "## What one proxied request costs in Python",
        "",
        "The reference servers of `bench/reference.py` ran in the same rounds at one client.",
        "**lean proxy** is the smallest proxy built from floydd's parts: an asyncio Protocol",
        "with httptools in front of floydd's own upstream client, with a task per request and",
        "none of floydd's features. **bare proxy** is the least a Python proxy can do: callbacks",
        "only, no task, no parsing beyond the end of the head and the Content-Length, and one",
        "connection opened ahead; it serves one client and small responses only. **aiohttp",
        "alone** is aiohttp serving `/hello` itself, without an app behind it.",
        "",
        "| clients | path | requests/s | p50 ms | p99 ms | proxy CPU µs/request | user | system | errors | rounds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[_path_row(summary) for summary in present],
        "",
    ]
    haproxy, floydd, direct = (by_key.get((1, path)) for path in ("HAProxy", "floydd", "direct"))
    if haproxy is None or floydd is None or direct is None:
        return lines
    lines += ["| at one client | requests/s ratio |", "| --- | ---: |"]
    for path in references:
        reference = by_key[(1, path)]
        lines += [
            f"| {path} / HAProxy | {_ratio(reference, haproxy, 'requests_per_s')} |",
            f"| {path} / direct | {_ratio(reference, direct, 'requests_per_s')} |",
            f"| floydd / {path} | {_ratio(floydd, reference, 'requests_per_s')} |",
        ]
    lines.append("")
    bare = by_key.get((1, "bare proxy"))
    if bare is not None:
        lines += [_cpu_difference(floydd, bare), ""]
    return lines


def _cpu_difference(floydd: Summary, bare: Summary) -> str:
    """Say how much more CPU floydd spends per request than the bare proxy, user and system apart."""
    parts = [
        floydd.median(attribute) - bare.median(attribute)
        for attribute in ("proxy_cpu_us_per_request", "proxy_user_us_per_request", "proxy_system_us_per_request")
    ]
    total, user, system = (_fmt(part, 0) for part in parts)
    return (
        f"At one client floydd spends {total} µs more CPU per request than the bare proxy "
        f"({user} µs user, {system} µs system). That is the cost of what the bare proxy leaves out: "
        "parsing and checking every header, the forwarded and request-id headers, the queue, "
        "timeouts, metrics, and the errors and fallbacks of a real proxy."
    )


def _ratio(numerator: Summary, denominator: Summary, attribute: str) -> str:
    bottom = denominator.median(attribute)
    return _fmt(numerator.median(attribute) / bottom, 2) if bottom else "n/a"


def _render_transfers(transfers: list[Transfer]) -> list[str]:
    if not transfers:
        return []
    size = transfers[0].bytes
    label = f"{size / 1024**3:g} GiB" if size >= 1024**3 else f"{size / 1024**2:g} MiB"
    lines = [
        f"## {label} bodies",
        "",
        "| direction | path | MiB/s | seconds | daemon RSS growth MiB | daemon VmHWM growth MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for item in transfers:
        rss = "–" if item.daemon_rss_growth_kib is None else _fmt(item.daemon_rss_growth_kib / 1024)
        hwm = "–" if item.daemon_hwm_growth_kib is None else _fmt(item.daemon_hwm_growth_kib / 1024)
        lines.append(
            f"| {item.direction} | {item.path} | {_fmt(item.mib_per_s, 0)} | {_fmt(item.seconds, 1)} | {rss} | {hwm} |"
        )
    return [*lines, ""]


def _render_crowd(crowd: Crowd) -> list[str]:
    outcomes = ", ".join(f"{status}: {count}" for status, count in sorted(crowd.statuses.items()))
    lines = [
        f"## {crowd.clients:,} clients waiting on one job",
        "",
        "| | |",
        "| --- | --- |",
        f"| queue depth (FLOYDD_PROXY_MAX_QUEUE_DEPTH) | {crowd.queue_depth:,} |",
        f"| outcomes | {outcomes} |",
        f"| clients neither served nor rejected with 503 | {crowd.unanswered} |",
        f"| most requests sent and unanswered at once | {crowd.max_waiting:,} |",
        f"| time until the last connection was accepted | {_fmt(crowd.last_connect_s)} s |",
        f"| time until 99 % of the clients finished | {_fmt(crowd.p99_finish_s)} s |",
        f"| time until the last client finished | {_fmt(crowd.seconds)} s |",
        f"| daemon CPU time over the run | {_fmt(crowd.daemon_cpu_s)} s |",
        f"| daemon RSS before / max | {_fmt(crowd.daemon_rss_before_kib / 1024)} / "
        f"{_fmt(crowd.daemon_rss_max_kib / 1024)} MiB |",
        f"| daemon RSS per waiting client | "
        f"{_fmt((crowd.daemon_rss_max_kib - crowd.daemon_rss_before_kib) / max(crowd.max_waiting, 1), 1)} KiB |",
        f"| daemon open files, max | {crowd.daemon_fds_max:,} |",
        "",
    ]
    if crowd.profile is not None:
        lines += [
            f"py-spy over 10 s while the clients wait ({crowd.profile.samples} event-loop samples):",
            "",
            *_profile_table(crowd.profile, "Python function", 8),
        ]
    return lines


def _render_cold_start(cold: ColdStart) -> list[str]:
    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    return [
        "## Cold start: upload to first 200",
        "",
        "| path | median s | runs s |",
        "| --- | ---: | --- |",
        f"| floydd (upload, unpack, create, start, readiness, proxy) | {_fmt(median(cold.floydd_s), 2)} "
        f"| {runs(cold.floydd_s)} |",
        f"| `docker run` and polling by hand | {_fmt(median(cold.docker_run_s), 2)} | {runs(cold.docker_run_s)} |",
        "",
    ]


def _render_idle(idle: IdleJobs) -> list[str]:
    return [
        "## Idle serve jobs",
        "",
        "| | |",
        "| --- | --- |",
        f"| serve jobs serving (requested) | {idle.started + 1} ({idle.requested}) |",
        f"| count limited by | {idle.limited_by} |",
        f"| jobs that did not reach serving | {idle.failed} |",
        f"| submissions stopped after | {idle.stopped_by or 'none stopped'} |",
        f"| uploads retried after a 503 | {idle.submissions_retried} |",
        f"| one container's memory | {_fmt(idle.container_mib)} MiB |",
        f"| time until all served | {_fmt(idle.seconds_to_serving)} s |",
        f"| daemon CPU while idle | {_fmt(idle.daemon_cpu_percent, 2)} % of one core over {_fmt(idle.window_s)} s |",
        f"| daemon RSS before / after | {_fmt(idle.daemon_rss_before_kib / 1024)} / "
        f"{_fmt(idle.daemon_rss_kib / 1024)} MiB |",
        f"| daemon open files | {idle.daemon_fds} |",
        "",
    ]


def _render_profiles(profiles: dict[int, FloyddProfile]) -> list[str]:
    lines = [
        "## Where floydd spends its time",
        "",
        "Python frames from py-spy without native frames, so time inside C code",
        "(uvloop's event loop, system calls) counts as self time of the nearest",
        "Python frame, `asyncio/runners.py:Runner.run` for the loop itself. The",
        "native profile names those C frames. System calls per request come from",
        "`strace -c -f` on the daemon during one more round.",
        "",
    ]
    for connections, profile in sorted(profiles.items()):
        python, native = profile.python, profile.native
        lines += [
            f"### {connections} client{'s' if connections != 1 else ''}",
            "",
            f"{python.samples} event-loop samples at {_fmt(profile.profiled_requests_per_s, 0)} requests/s "
            f"under the profiler ({python.background_samples} samples of idle worker threads left out). "
            "Self time by package: "
            + ", ".join(f"{name} {python.share(count):.0f} %" for name, count in python.self_by_package.most_common(6)),
            "",
        ]
        lines += _profile_table(python, "Python function", 12)
        lines += _profile_table(native, "native or Python function (py-spy --native)", 8)
        calls = sorted(profile.syscalls_per_request.items(), key=lambda item: -item[1])[:10]
        lines += [
            f"System calls per request: {_fmt(sum(profile.syscalls_per_request.values()), 1)} in all; "
            + ", ".join(f"{name} {count:.1f}" for name, count in calls),
            "",
        ]
    return lines


def _profile_table(profile: ProfileSummary, heading: str, top: int) -> list[str]:
    lines = [f"| {heading} | self % | total % |", "| --- | ---: | ---: |"]
    for name, count in profile.self_by_function.most_common(top):
        lines.append(
            f"| `{name}` | {profile.share(count):.1f} | {profile.share(profile.total_by_function[name]):.1f} |"
        )
    return [*lines, ""]

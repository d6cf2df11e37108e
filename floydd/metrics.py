"""Prometheus metrics of the proxy and the jobs, served at `GET /metrics`.

prometheus-client provides the text format and the collector interface.
The counts taken on every proxied request (responses by status class, the
queue-wait and app-time histograms, fast-path requests) are plain integers
and floats in `_JobSeries`, turned into metric families only when
`/metrics` is scraped: prometheus-client's own Counter and Histogram take a
lock and check their state on every update, which cost a measurable share
of the proxy's CPU per request. floydd updates them from the event loop
only, so they need no lock.

Series are labelled by job id only for jobs that have a queue (serve jobs
that have not ended), so requests for made-up ids cannot grow the number of
series. The scrape that first finds a job ended marks its series, and the
scrape after it drops them, so a scraper reads the job's final counts.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from floydd.auth import request_user
from floydd.errors import FloyddError, Forbidden
from floydd.jobs import JobState
from floydd.queue import QueueRegistry
from floydd.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from 1 ms to 5 min, since a request may wait or run up to the 300 s default timeouts.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# The `le` label of each bucket, written as prometheus-client writes it.
BUCKET_LABELS = (*(repr(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")


class _QueueCollector(Collector):
    """Reads queue depth and requests in flight from the live queues at scrape time."""

    def __init__(self, queues: QueueRegistry) -> None:
        self._queues = queues

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("floydd_proxy_queue_depth", "Requests waiting for a slot.", labels=["job_id"])
        in_flight = GaugeMetricFamily("floydd_proxy_requests_in_flight", "Requests holding a slot.", labels=["job_id"])
        for queue in self._queues.values():
            depth.add_metric([queue.job_id], queue.depth)
            in_flight.add_metric([queue.job_id], queue.in_flight)
        yield depth
        yield in_flight


class ProxyMetrics:
    def __init__(self, queues: QueueRegistry, store: JobStore) -> None:
        self._queues = queues
        self._store = store
        self.registry = CollectorRegistry(auto_describe=True)
        self._rejections = Counter(
            "floydd_proxy_rejections",
            "Requests floydd answered itself with an error, by reason (queue_full, queue_timeout, ...).",
            ["job_id", "reason"],
            registry=self.registry,
        )
        self._unrouted = Counter(
            "floydd_proxy_unrouted_requests",
            "Requests for a job id that is unknown or not serving, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._jobs = _JobStateGauge()
        self._per_request = _PerRequestCollector()
        self.registry.register(_QueueCollector(queues))
        self.registry.register(self._jobs)
        self.registry.register(self._per_request)
        self._series = self._per_request.series
        self._ended: set[str] = set()

    def answered(self, job_id: str, status: int) -> None:
        series = self._job_series(job_id)
        status_class = status // 100
        count = series.requests.get(status_class)
        if count is None:
            series.requests_created[status_class] = time.time()
            count = 0
        series.requests[status_class] = count + 1

    def rejected(self, job_id: str, error: FloyddError) -> None:
        self._job_series(job_id)
        self._rejections.labels(job_id, str(error.extra.get("limit") or error.code)).inc()

    def fast_path(self) -> None:
        self._per_request.fast_path += 1

    def unrouted(self, error: FloyddError) -> None:
        self._unrouted.labels(error.code).inc()

    def admitted(self, job_id: str, queued_s: float) -> None:
        self._job_series(job_id).queue_wait.observe(queued_s)

    def app_started(self, job_id: str, app_s: float) -> None:
        self._job_series(job_id).app_time.observe(app_s)

    def _job_series(self, job_id: str) -> _JobSeries:
        series = self._series.get(job_id)
        if series is None:
            series = self._series[job_id] = _JobSeries()
        return series

    async def handle(self, request: web.Request) -> web.Response:
        # The series name every serve job, other users' and private ones included.
        if not request_user(request).is_admin:
            raise Forbidden("/metrics lists every job; scrape it with an admin token")
        self._jobs.counts = await self._store.count_by_state()
        body = generate_latest(self.registry)
        self._forget_ended_jobs()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _forget_ended_jobs(self) -> None:
        live = {queue.job_id for queue in self._queues.values()}
        for job_id in self._ended:
            _remove_job(self._rejections, job_id)
            self._series.pop(job_id, None)
        self._ended = set(self._series) - live


class _Buckets:
    """A histogram's count per bucket and sum. A value goes into the first bucket whose bound is at least the value."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        # One count per bound of LATENCY_BUCKETS, and a last one for +Inf.
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(BUCKET_LABELS, self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


@dataclass
class _JobSeries:
    """One job's per-request counts."""

    queue_wait: _Buckets = field(default_factory=_Buckets)
    app_time: _Buckets = field(default_factory=_Buckets)
    # Responses of `floydd_proxy_requests` by status class (2 for 2xx).
    requests: dict[int, int] = field(default_factory=dict)
    # Unix times for the `_created` samples that prometheus-client's own metrics carry.
    created: float = field(default_factory=time.time)
    requests_created: dict[int, float] = field(default_factory=dict)


class _PerRequestCollector(Collector):
    """Turns the per-request counts into metric families when /metrics is scraped."""

    def __init__(self) -> None:
        self.series: dict[str, _JobSeries] = {}
        self.fast_path = 0
        self.created = time.time()

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "floydd_proxy_requests",
            "Responses sent for requests to a job, by status class (2xx to 5xx).",
            labels=["job_id", "status_class"],
        )
        queue_wait = HistogramMetricFamily(
            "floydd_proxy_queue_wait_seconds",
            "Time a request waited in the queue before it was admitted.",
            labels=["job_id"],
        )
        app_time = HistogramMetricFamily(
            "floydd_proxy_app_seconds",
            "Time from sending a request to the app to the start of its response.",
            labels=["job_id"],
        )
        for job_id, series in self.series.items():
            for status_class, count in sorted(series.requests.items()):
                created = series.requests_created[status_class]
                requests.add_metric([job_id, f"{status_class}xx"], count, created=created)
            for family, buckets in ((queue_wait, series.queue_wait), (app_time, series.app_time)):
                family.add_metric([job_id], buckets.cumulative(), buckets.sum)
                # HistogramMetricFamily.add_metric has no `created` argument (prometheus-client 0.26).
                family.samples.append(Sample(f"{family.name}_created", {"job_id": job_id}, series.created))
        yield requests
        yield queue_wait
        yield app_time
        yield CounterMetricFamily(
            "floydd_proxy_fast_path_requests",
            "Requests to a job served by floydd's own HTTP/1.1 parser instead of aiohttp's "
            "(bodyless requests to public jobs).",
            value=self.fast_path,
            created=self.created,
        )


class _JobStateGauge(Collector):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("floydd_jobs", "Jobs known to floydd, by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], self.counts.get(state.value, 0))
        yield jobs


def _remove_job(metric: Counter, job_id: str) -> None:
    # prometheus-client removes a series only by its full label values, so find them first.
    for labels in list(metric._metrics):  # noqa: SLF001
        if labels[0] == job_id:
            metric.remove(*labels)

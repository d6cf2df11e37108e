"""Prometheus metrics of the proxy and the jobs, served at `GET /metrics`.

prometheus-client provides the text format, the histogram buckets and
thread-safe counters. Series are labelled by job id only for jobs that have
a queue (serve jobs that have not ended), so requests for made-up ids cannot
grow the number of series. A job's series are dropped after the first scrape
that follows its end, so that scrape still sees its final counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from floydd.auth import request_user
from floydd.errors import FloyddError, Forbidden
from floydd.jobs import JobState
from floydd.queue import QueueRegistry
from floydd.store import JobStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from 1 ms to 5 min, since a request may wait or run up to the 300 s default timeouts.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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
        self._requests = Counter(
            "floydd_proxy_requests",
            "Responses sent for requests to a job, by status class (2xx to 5xx).",
            ["job_id", "status_class"],
            registry=self.registry,
        )
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
        self._queue_wait = Histogram(
            "floydd_proxy_queue_wait_seconds",
            "Time a request waited in the queue before it was admitted.",
            ["job_id"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._app_time = Histogram(
            "floydd_proxy_app_seconds",
            "Time from sending a request to the app to the start of its response.",
            ["job_id"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._fast_path = Counter(
            "floydd_proxy_fast_path_requests",
            "Requests to a job served by floydd's own HTTP/1.1 parser instead of aiohttp's "
            "(bodyless requests to public jobs).",
            registry=self.registry,
        )
        self._jobs = _JobStateGauge()
        self.registry.register(_QueueCollector(queues))
        self.registry.register(self._jobs)
        # The labelled series of each job, looked up once per job instead of on
        # every request, because `labels()` costs a lock and a tuple per call.
        self._series: dict[str, _JobSeries] = {}
        self._ended: set[str] = set()

    def answered(self, job_id: str, status: int) -> None:
        series = self._job_series(job_id)
        status_class = status // 100
        counter = series.requests.get(status_class)
        if counter is None:
            counter = series.requests[status_class] = self._requests.labels(job_id, f"{status_class}xx")
        counter.inc()

    def rejected(self, job_id: str, error: FloyddError) -> None:
        self._job_series(job_id)
        self._rejections.labels(job_id, str(error.extra.get("limit") or error.code)).inc()

    def fast_path(self) -> None:
        self._fast_path.inc()

    def unrouted(self, error: FloyddError) -> None:
        self._unrouted.labels(error.code).inc()

    def admitted(self, job_id: str, queued_s: float) -> None:
        self._job_series(job_id).queue_wait.observe(queued_s)

    def app_started(self, job_id: str, app_s: float) -> None:
        self._job_series(job_id).app_time.observe(app_s)

    def _job_series(self, job_id: str) -> _JobSeries:
        series = self._series.get(job_id)
        if series is None:
            series = _JobSeries(self._queue_wait.labels(job_id), self._app_time.labels(job_id))
            self._series[job_id] = series
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
            for metric in (self._requests, self._rejections, self._queue_wait, self._app_time):
                _remove_job(metric, job_id)
            self._series.pop(job_id, None)
        self._ended = set(self._series) - live


@dataclass
class _JobSeries:
    """One job's labelled series of the per-request metrics."""

    queue_wait: Histogram
    app_time: Histogram
    # Counters of `floydd_proxy_requests` by status class (2 for 2xx).
    requests: dict[int, Counter] = field(default_factory=dict)


class _JobStateGauge(Collector):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("floydd_jobs", "Jobs known to floydd, by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], self.counts.get(state.value, 0))
        yield jobs


def _remove_job(metric: Counter | Histogram, job_id: str) -> None:
    # prometheus-client removes a series only by its full label values, so find them first.
    for labels in list(metric._metrics):  # noqa: SLF001
        if labels[0] == job_id:
            metric.remove(*labels)

"""The per-request counts of floydd.metrics, read back through prometheus-client's text format."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from floydd.errors import QueueFull
from floydd.metrics import LATENCY_BUCKETS, ProxyMetrics
from floydd.queue import QueueRegistry
from floydd.store import JobStore

JOB = "a" * 32


def scrape(metrics: ProxyMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the metrics' registry by name and sorted labels, as a scraper would parse them."""
    return scrape_registry(metrics.registry)


def scrape_registry(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def new_metrics(tmp_path: Path) -> tuple[ProxyMetrics, QueueRegistry]:
    queues = QueueRegistry()
    queues.create(JOB, public=True)
    return ProxyMetrics(queues, JobStore(tmp_path / "floydd.sqlite3")), queues


def test_histogram_bucket_bounds(tmp_path: Path) -> None:
    metrics, _ = new_metrics(tmp_path)
    # A value equal to a bound belongs to that bound's bucket, as in prometheus-client's Histogram.
    for queued_s in (0.0, 0.001, 0.0011, 7.5, 1000.0):
        metrics.admitted(JOB, queued_s)
    metrics.app_started(JOB, 0.02)

    samples = scrape(metrics)

    def bucket(name: str, le: str) -> float:
        return samples[(f"{name}_bucket", (("job_id", JOB), ("le", le)))]

    wait = "floydd_proxy_queue_wait_seconds"
    assert bucket(wait, "0.001") == 2
    assert bucket(wait, "0.005") == 3
    assert bucket(wait, "5.0") == 3
    assert bucket(wait, "10.0") == 4
    assert bucket(wait, "300.0") == 4
    assert bucket(wait, "+Inf") == 5
    assert samples[(f"{wait}_count", (("job_id", JOB),))] == 5
    assert samples[(f"{wait}_sum", (("job_id", JOB),))] == 0.0 + 0.001 + 0.0011 + 7.5 + 1000.0
    app = "floydd_proxy_app_seconds"
    assert bucket(app, "0.01") == 0
    assert bucket(app, "0.025") == 1
    assert len([key for key in samples if key[0] == f"{app}_bucket"]) == len(LATENCY_BUCKETS) + 1


def test_responses_by_status_class(tmp_path: Path) -> None:
    metrics, _ = new_metrics(tmp_path)
    for status in (200, 201, 204, 404, 503, 503):
        metrics.answered(JOB, status)
    metrics.fast_path()
    metrics.fast_path()

    samples = scrape(metrics)

    def responses(status_class: str) -> float:
        return samples[("floydd_proxy_requests_total", (("job_id", JOB), ("status_class", status_class)))]

    assert (responses("2xx"), responses("4xx"), responses("5xx")) == (3, 1, 2)
    assert ("floydd_proxy_requests_total", (("job_id", JOB), ("status_class", "3xx"))) not in samples
    assert samples[("floydd_proxy_fast_path_requests_total", ())] == 2


def test_ended_job_series_dropped(tmp_path: Path) -> None:
    metrics, queues = new_metrics(tmp_path)
    metrics.answered(JOB, 200)
    metrics.admitted(JOB, 0.0)
    metrics.rejected(JOB, QueueFull("the queue is full"))
    queues.remove(JOB, QueueFull("the job ended"))

    def job_samples() -> set[str]:
        return {name for name, labels in scrape(metrics) if ("job_id", JOB) in labels}

    # The scrape that first finds the job ended marks it, and its series go after the next scrape.
    # Requests still finishing count in the same series, and a scraper reads the final values.
    first = job_samples()
    metrics._forget_ended_jobs()  # noqa: SLF001 - what GET /metrics runs after each scrape
    second = job_samples()
    metrics._forget_ended_jobs()  # noqa: SLF001
    third = job_samples()

    assert {"floydd_proxy_requests_total", "floydd_proxy_queue_wait_seconds_count"} <= first
    assert "floydd_proxy_rejections_total" in first
    assert first == second
    assert third == set()


def test_same_samples_as_prometheus_client(tmp_path: Path) -> None:
    """The per-request families print the samples prometheus-client's Counter and Histogram print, `_created` too."""
    metrics, _ = new_metrics(tmp_path)
    metrics.answered(JOB, 200)
    metrics.admitted(JOB, 0.01)
    metrics.app_started(JOB, 0.02)
    metrics.fast_path()

    reference = CollectorRegistry()
    labels = ["job_id"]
    requests = Counter("floydd_proxy_requests", "help", [*labels, "status_class"], registry=reference)
    wait = Histogram("floydd_proxy_queue_wait_seconds", "help", labels, buckets=LATENCY_BUCKETS, registry=reference)
    app = Histogram("floydd_proxy_app_seconds", "help", labels, buckets=LATENCY_BUCKETS, registry=reference)
    fast_path = Counter("floydd_proxy_fast_path_requests", "help", registry=reference)
    requests.labels(JOB, "2xx").inc()
    wait.labels(JOB).observe(0.01)
    app.labels(JOB).observe(0.02)
    fast_path.inc()

    ours = scrape(metrics)
    theirs = scrape_registry(reference)
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        if key[0].endswith("_created"):
            assert abs(ours[key] - value) < 60
        else:
            assert ours[key] == value, key

"""Prometheus metrics of the web tier, including what the workers measured (carried back in each result).

With several gunicorn processes, values must live in per-process files so that /metrics adds up every
process: prometheus_client decides that when it is imported, so run_web_server.py sets
PROMETHEUS_MULTIPROC_DIR before anything imports this module.
"""

import os

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "imgclf_requests_total", "Answers to classification requests by HTTP status and endpoint", ["status", "endpoint"]
)  # endpoint: predict | jobs (POST /jobs) | v2_infer
LATENCY = Histogram(
    "imgclf_request_latency_seconds", "End-to-end /predict latency in the web server", buckets=LATENCY_BUCKETS
)
QUEUE_WAIT = Histogram(
    "imgclf_queue_wait_seconds",
    "Time a job waited in Redis before its batch began, as the worker saw it",
    buckets=LATENCY_BUCKETS,
)
INFERENCE = Histogram(
    "imgclf_inference_seconds",
    "Model time of the batch that held the job, as the worker saw it",
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "imgclf_batch_size", "Size of the batch that held each job", buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128)
)
WAKEUPS = Counter(
    "imgclf_result_wakeups_total", "How waiting requests learnt of their result", ["via"]
)  # notification | fallback_poll | poll
TIMEOUTS = Counter("imgclf_timeouts_total", "Requests answered 504: their deadline came before their answer")
ADMITTED = Counter("imgclf_admitted_total", "Requests whose job was put on the queue")
REJECTED = Counter(
    "imgclf_rejected_total", "Requests refused with 503 before queueing, by reason", ["reason"]
)  # queue_full | expected_wait | redis_unavailable | shed (by a worker: its deadline out of reach) | uploads_full
CANCELLED = Counter("imgclf_cancelled_total", "Queued jobs marked cancelled because their client went away")
EXPIRED = Counter("imgclf_expired_total", "Queued jobs marked cancelled because their request's deadline passed")
READ_TIMEOUTS = Counter(
    "imgclf_read_timeouts_total", "Connections cut off because the request did not arrive in time", ["answer"]
)  # 408 | closed


def observe_result(result, seconds):
    LATENCY.observe(seconds)
    QUEUE_WAIT.observe(result["queue_ms"] / 1000)
    INFERENCE.observe(result["inference_ms"] / 1000)
    BATCH_SIZE.observe(result["batch_size"])


class _QueueCollector:
    """Read at scrape time from Redis, so every web process reports the same, current numbers."""

    def __init__(self, job_queue, registry):
        self.job_queue, self.registry = job_queue, registry

    def collect(self):
        depth = GaugeMetricFamily("imgclf_queue_depth", "Jobs waiting in the Redis queue")
        workers = GaugeMetricFamily("imgclf_workers_alive", "Workers with a fresh heartbeat")
        throughput = GaugeMetricFamily(
            "imgclf_workers_throughput_images_per_second", "Sum of the live workers' moving-average throughput"
        )
        skipped = GaugeMetricFamily(
            "imgclf_workers_skipped_jobs",
            "Jobs the live workers skipped without computing them, since they started",
            labels=["reason"],
        )
        try:
            depth.add_metric([], self.job_queue.length())
            alive = self.registry.workers()
        except Exception:  # noqa: BLE001 - a scrape during a Redis outage still reports the rest
            return
        workers.add_metric([], len(alive))
        throughput.add_metric([], sum(_number(w.get("images_per_s")) for w in alive))
        for reason in ("cancelled", "expired"):
            skipped.add_metric([reason], sum(_number(w.get(reason)) for w in alive))
        yield from (depth, workers, throughput, skipped)


def _number(value):
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def exposition(job_queue, registry):
    """The text /metrics serves."""
    scraped = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(scraped)
    else:
        scraped.register(_DefaultCollectors())
    scraped.register(_QueueCollector(job_queue, registry))
    return prometheus_client.generate_latest(scraped)


class _DefaultCollectors:
    def collect(self):
        return prometheus_client.REGISTRY.collect()


CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

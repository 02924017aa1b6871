"""Admission by expected wait: refuse a request at once (503 + Retry-After) when its job could not be served
within the time it has left, instead of queueing it to time out later.

expected wait = (jobs queued + 1) / throughput, where throughput is the sum of the live workers' moving
average of images per second of busy time (each worker publishes it in its heartbeat hash). A request is
admitted when the expected wait is at most ADMISSION_WAIT_FRACTION of its remaining time. MAX_QUEUE_LENGTH
stays a hard cap (job_queue.JobQueue.enqueue enforces it atomically too). With no throughput measured yet
(no worker has finished a batch), the rule admits, up to the cap.
"""

import math
import threading
import time
from dataclasses import dataclass

from job_queue import JobQueue
from worker_registration import WorkerRegistry


@dataclass(frozen=True)
class Refusal(Exception):
    reason: str  # queue_full | expected_wait
    retry_after: int  # seconds
    message: str

    def __str__(self):
        return self.message


class Admission:
    # The throughput changes at most once per heartbeat; reading every worker's hash per request would not pay.
    THROUGHPUT_MAX_AGE = 1.0

    def __init__(
        self, job_queue: JobQueue, registry: WorkerRegistry, wait_fraction: float, clock=time.monotonic
    ) -> None:
        self.queue, self.registry, self.wait_fraction, self.clock = job_queue, registry, wait_fraction, clock
        self._throughput, self._read_at = 0.0, -math.inf
        self._lock = threading.Lock()

    def throughput(self) -> float:
        """Images/s of all live workers together (0.0 when none has measured any), cached for a second."""
        now = self.clock()
        if now - self._read_at >= self.THROUGHPUT_MAX_AGE:
            total = 0.0
            for worker in self.registry.workers():
                try:
                    total += max(0.0, float(worker.get("images_per_s") or 0))
                except ValueError:
                    pass
            with self._lock:
                self._throughput, self._read_at = total, now
        return self._throughput

    def check(self, remaining: float) -> tuple[int, float]:
        """Raise Refusal when a job with `remaining` seconds to live should not be queued.

        Returns (jobs queued, throughput) as seen. Raises redis.RedisError when Redis cannot be asked.
        """
        queued = self.queue.length()
        throughput = self.throughput()
        drain = (queued + 1) / throughput if throughput > 0 else None
        if queued >= self.queue.max_length:
            retry = drain if drain is not None else 1
            raise Refusal("queue_full", _seconds(retry), f"{queued} jobs are already waiting")
        if drain is not None and drain > remaining * self.wait_fraction:
            # Back when enough of the queue has drained for a new request's expected wait to fit its budget.
            retry = drain - remaining * self.wait_fraction
            raise Refusal(
                "expected_wait",
                _seconds(retry),
                f"{queued} jobs are waiting, about {drain:.1f} s of work at {throughput:.1f} images/s, "
                f"more than this request's {remaining:.1f} s allow",
            )
        return queued, throughput


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))

"""Admission by expected wait: refuse a request at once (503 + Retry-After) when its job could not be served
within the time it has left, instead of queueing it to time out later.

expected wait = max(local wait, (jobs in flight + jobs queued + images here + images elsewhere) / throughput)
                + (the request's images + batch-mates after it) / throughput

- throughput: the sum of the live workers' images per second over about their last second of busy time (each
  worker publishes it in its heartbeat hash; worker.Throughput);
- jobs in flight: those the workers have claimed and not finished (their processing lists): the batch in
  progress has to end before the new job's can start;
- images here: those this web process has admitted and not yet prepared (decode and resize: CPU work done by a
  few threads per process, which start the images in the order they were handed over, so all of those come
  first); their jobs are queued before the request's;
- images elsewhere: those the other web processes have admitted and not yet prepared, as each recorded it in
  Redis within the last BACKLOG_MAX_AGE (JobQueue.share_backlog): they too reach the queue while the request's
  images are prepared, most of them first;
- local wait: the images here and the request's own, times the moving average of one image's turn in a decoding
  lane, divided by the lanes. The two stages run in series, so they overlap: the request's jobs are queued once
  its images are prepared, and the workers reach them once through everything ahead;
- batch-mates after it: a job is answered when its whole batch is; with jobs queued ahead, the batch it lands in
  fills up with jobs that came after it, up to the workers' BATCH_SIZE (min(BATCH_SIZE - 1, jobs queued)).

A request is admitted when the expected wait is at most ADMISSION_WAIT_FRACTION of its remaining time, or when
nothing is ahead of it at all (no retry would find less ahead; its deadline still bounds it); refused outright
when none is left. A refused request is never measured, so a request that finds nothing being prepared and a
preparation measure older than PREPARATION_MAX_AGE ignores it, and the next sample replaces it. The queue's
length and the images elsewhere are read (and this process's backlog recorded) in one round trip when the last
read is QUEUE_MAX_AGE old (and, while this process has a backlog, that often even when no request comes); an
enqueue's reply updates the length between reads. MAX_QUEUE_LENGTH stays a hard
cap, on the jobs queued and the images here and elsewhere (job_queue.JobQueue.enqueue enforces it atomically on
the queue too). With no throughput measured yet (no worker has finished a batch), the queue's
part counts as nothing.
"""

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from job_queue import JobQueue
from keys import process_name
from worker_registration import WorkerRegistry, models_served


@dataclass
class Refusal(Exception):  # not frozen: raising sets __traceback__
    reason: str  # queue_full | expected_wait; deadline: the request's time ran out before it was looked at
    retry_after: int  # seconds (0 for deadline: retrying would not help)
    message: str

    def __str__(self):
        return self.message


class Admission:
    # The throughput changes at most once per heartbeat; reading every worker's hash per request would not pay.
    THROUGHPUT_MAX_AGE = 1.0
    # While one request reads them, the others go on with values at most this old, then read for themselves: a
    # read stuck on a hung connection (up to its pool and socket timeouts, tens of seconds) must not keep them on
    # workers long gone.
    READING_MAX_AGE = 3.0
    # The queue's length and the other web processes' backlogs are read, and this one's recorded, in a round trip
    # when the last read is older than this: under load ten a second. Every enqueue also reports the length
    # (`queue_length`). A tenth of a second of drift is nothing against a budget of seconds, and the cap itself is
    # enforced by the enqueue in any case.
    QUEUE_MAX_AGE = 0.1
    # A web process's recorded backlog counts for this long: one that stopped recording it (no requests since, or
    # gone) counts nothing after it; its record is deleted after BACKLOG_FORGET_AFTER.
    BACKLOG_MAX_AGE = 1.0
    BACKLOG_FORGET_AFTER = 60.0
    PREPARATION_MAX_AGE = 2.0  # seconds an image's measured preparation stands for, once nothing is being prepared

    def __init__(
        self,
        job_queue: JobQueue,
        registry: WorkerRegistry,
        wait_fraction: float,
        decoders: int = 1,
        clock=time.monotonic,
        background=None,
    ) -> None:
        self.queue, self.registry, self.wait_fraction, self.clock = job_queue, registry, wait_fraction, clock
        # background(function) runs it on its own (a greenlet in the web process): the recorder of a backlog that
        # no request comes to record. None: only requests record it.
        self._background, self._recording = background, False
        self.decoders = decoders  # preparations that run at once in this process
        self._throughput, self._batch, self._in_flight = 0.0, 1, 0
        self._models = frozenset()
        self._workers_read = _Refresh(self.THROUGHPUT_MAX_AGE, self.READING_MAX_AGE)
        self._queued, self._elsewhere, self._recorded = 0, 0, 0
        self._backlogs_read = _Refresh(self.QUEUE_MAX_AGE, self.READING_MAX_AGE)
        self._pid = self._name = None
        self._lock = threading.Lock()
        self.preparing = 0  # requests admitted and not yet prepared, in this process
        self.preparing_images = 0  # their images not yet prepared
        # Moving average of one image's turn in a decoding lane: from its hand-over to a thread until the lane has
        # its outcome back (the decode and resize, and on a busy process the delay in handing it back, during
        # which that lane takes no other image).
        self.preparation_seconds = 0.0
        self._prepared_at = -math.inf  # when the last image was (clock)
        self._remeasure = False  # the measure is too old: the next sample replaces it

    @contextmanager
    def preparation(self, images: int):
        """Wrap the preparation of a request `check` admitted with `images`; yields its `BacklogImages`, told as a
        thread starts each image and is done with it. When this ends, the images no thread has started leave the
        local backlog; those being prepared stay until their thread is done with them.

        An admitted request is counted from the admission on, not from here: under gevent it waits for its
        turn on the CPU after the admission's Redis round trip, and that wait is the backlog."""
        counted = BacklogImages(self, images)
        try:
            yield counted
        finally:
            self.preparing -= 1
            counted.end()

    def prepared(self, seconds: float) -> None:
        """Record how long one image held its lane, from its hand-over to a thread, not from its admission: the
        time spent waiting behind others is what `preparing` counts, and must not be counted twice."""
        average = self.preparation_seconds
        fresh = not average or self._remeasure
        self.preparation_seconds = seconds if fresh else average + 0.2 * (seconds - average)
        self._prepared_at, self._remeasure = self.clock(), False

    def queue_length(self, length: int) -> None:
        """Record the queue's length as an enqueue just saw it."""
        self._queued = length

    @property
    def name(self) -> str:
        """This web process's name in the shared backlogs: its own in each process that gunicorn forks."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._name = process_name()
        return self._name

    def _shared(self):
        """The jobs queued and the images elsewhere, read (with this process's backlog recorded) when the last
        read is QUEUE_MAX_AGE old, by one request at a time (without that, every request arriving during the
        round trip read too: 32 reads for 32 requests)."""
        with self._backlogs_read.due(self.clock()) as due:
            if due:
                recorded = self.preparing_images
                self._queued, self._elsewhere = self.queue.share_backlog(
                    self.name, recorded, self.BACKLOG_MAX_AGE, self.BACKLOG_FORGET_AFTER
                )
                self._recorded = recorded
        return self._queued, self._elsewhere

    def _keep_recording(self):
        """Record this process's backlog every QUEUE_MAX_AGE (unless a request just did) until it is gone and
        recorded gone. The others count a record for BACKLOG_MAX_AGE only, and a process busy with its backlog may
        take in no request, the only other time it records, for longer than that: found by review, it then vanished
        from the others' count, and they admitted requests to wait behind its images unweighed. A Redis error
        does not end it (the busy process may admit nothing to start it again): it tries again."""
        try:
            while True:
                time.sleep(self.QUEUE_MAX_AGE)  # first: it is started before the request's images are counted
                if not (self.preparing_images or self._recorded):
                    return
                try:
                    self._shared()
                except redis.RedisError:
                    pass  # the requests meet it too, and log it
        finally:
            self._recording = False
            if self.preparing_images:  # counted by a request that found this one still running, about to end
                self._start_recorder()

    def _start_recorder(self):
        """Start the recorder unless it runs. Before a request's images are counted: starting a thread may switch
        greenlets, and a request cut short there (the server's safety net) would leave them counted for good."""
        if not self._background or self._recording:
            return
        self._recording = True
        try:
            self._background(self._keep_recording)
        except BaseException:
            self._recording = False
            raise

    def throughput(self) -> float:
        """Images/s of all live workers together (0.0 when none has measured any), cached for a second."""
        self._read_workers()
        return self._throughput

    def models(self) -> frozenset:
        """The models that live workers with a loaded model serve, as seen at most a second ago: the Open
        Inference Protocol's infer refuses a model nobody serves without three round trips of its own."""
        self._read_workers()
        return self._models

    def _read_workers(self):
        """Throughput, the largest batch size, the jobs in flight and the models of the live workers, read once
        a second, by one request at a time (three round trips: under load, every request arriving during them read
        them again, ten times a second in all instead of once).
        """
        with self._workers_read.due(self.clock()) as due:
            if not due:
                return
            workers = self.registry.workers()
            total, batch = 0.0, 1
            for worker in workers:
                total += _number(worker.get("images_per_s"))
                batch = max(batch, int(_number(worker.get("batch_size"))) or 1)
            models = models_served(workers)
            pipe = self.queue.redis.pipeline(transaction=False)
            for worker in workers:
                pipe.llen(self.queue.keys.processing(worker.get("name", "")))
            in_flight = sum(pipe.execute()) if workers else 0
            with self._lock:
                self._throughput, self._batch, self._in_flight, self._models = total, batch, in_flight, models

    def check(self, remaining: float, images: int = 1, prepare_within: float | None = None) -> tuple[int, float]:
        """Raise Refusal when a request of `images` jobs with `remaining` seconds to live should not be queued.
        `prepare_within`: the seconds the request's own HTTP exchange has left, when its jobs may take longer (an
        async job's): its images are prepared within that exchange, so the local part must fit in it as well.

        Returns (jobs queued, throughput) as seen. Raises redis.RedisError when Redis cannot be asked. An
        admitted request counts in the local backlog until its `preparation(images)` ends: use both, one after
        the other.
        """
        refusal, queued, throughput = self._weigh(remaining, images, prepare_within)
        if refusal:
            raise refusal
        self._start_recorder()
        self.preparing += 1
        self.preparing_images += images
        return queued, throughput

    def refuses(self, remaining: float) -> Refusal | None:
        """The Refusal that `check` would raise for the smallest request (one image) with `remaining` seconds, or
        None; counts nothing. A request with more images, or less time, would be refused as well. Raises
        redis.RedisError when Redis cannot be asked."""
        return self._weigh(remaining, 1, None)[0]

    def _weigh(self, remaining, images, prepare_within) -> tuple[Refusal | None, int, float]:
        if remaining <= 0 or (prepare_within is not None and prepare_within <= 0):
            return Refusal("deadline", 0, "the request's time ran out before it could be looked at"), 0, 0.0
        queued, elsewhere = self._shared()
        throughput = self.throughput()
        here = self.preparing_images  # admitted here, still to be decoded and queued: all of them before these
        per_image = 1 / throughput if throughput > 0 else 0.0
        per_turn = self.preparation_seconds
        if not here and self.clock() - self._prepared_at > self.PREPARATION_MAX_AGE:
            # Nothing being prepared will refresh it: an old measure (one stall, one huge image) would otherwise
            # refuse the requests that could refresh it, for as long as others keep the queue busy. Ignored for
            # this request, and replaced by the next sample; not erased meanwhile: the burst after a lull,
            # admitted behind this request before any image is prepared, is weighed with it.
            per_turn, self._remeasure = 0.0, True
        local = (here + images) * per_turn / self.decoders
        ahead = self._in_flight + queued + here + elsewhere
        # Two stages in series: the jobs reach the queue once their images are prepared, and the workers reach
        # them once they are through the jobs in flight, the queued ones and the ones prepared here first;
        # whichever comes later, then their own batch.
        expected = max(local, ahead * per_image)
        expected += (images + min(self._batch - 1, queued)) * per_image
        if queued + here + elsewhere + images > self.queue.max_length:
            full = Refusal(
                "queue_full",
                _seconds(expected or 1),
                f"{queued + here + elsewhere} jobs are already waiting ({here} of them being prepared here, "
                f"{elsewhere} by other web processes)",
            )
            return full, queued, throughput
        if prepare_within is not None and local > prepare_within * self.wait_fraction:
            remaining, expected = prepare_within, local  # what is refused, and said, is the preparation
        # With nothing ahead, the request is tried whatever its estimate: no retry would find less ahead of it (a
        # 503 told it to retry, again and again), and its deadline still bounds it. It also measures afresh.
        if ahead and expected > remaining * self.wait_fraction:
            # Back when enough of the backlog has drained for a new request's expected wait to fit its budget.
            too_long = Refusal(
                "expected_wait",
                _seconds(expected - remaining * self.wait_fraction),
                f"about {expected:.1f} s of work ahead ({queued} jobs queued, {self._in_flight} in flight, at "
                f"{throughput:.1f} images/s, "
                f"{self.preparing_images} images of {self.preparing} requests being prepared here, {elsewhere} by "
                f"other web processes), more than this request's {remaining:.1f} s allow",
            )
            return too_long, queued, throughput
        return None, queued, throughput


class _Refresh:
    """When values read from Redis are read again: once they are `max_age` old, by one request at a time. While one
    reads, the requests that arrive meanwhile go on with the values of the read before; before the first read has
    come back, or once the last is `stuck_after` old (a read stuck on a hung connection, up to its pool and socket
    timeouts), each request reads for itself."""

    def __init__(self, max_age: float, stuck_after: float) -> None:
        self.max_age, self.stuck_after = max_age, stuck_after
        self._read_at, self._reading = -math.inf, False

    @contextmanager
    def due(self, now: float):
        """Yields whether this request is to read; its read counts from `now` once the block ends without error."""
        age = now - self._read_at
        if age < self.max_age or (self._reading and age < self.stuck_after):
            yield False
            return
        self._reading = True
        try:
            yield True
            self._read_at = now
        finally:
            self._reading = False


class BacklogImages:
    """One admitted request's images in its admission's local backlog: each leaves it when a decoding thread is done
    with it, in whatever order; at the request's end, those no thread has started leave with it."""

    def __init__(self, admission: Admission, images: int) -> None:
        self._admission, self._left, self._started = admission, images, 0

    def started(self) -> None:
        self._started += 1

    def prepared(self, seconds: float) -> None:
        """A thread is done with one of the images, which held its lane `seconds`."""
        self._started -= 1
        self._left -= 1
        self._admission.preparing_images -= 1
        self._admission.prepared(seconds)

    def end(self) -> None:
        self._admission.preparing_images -= self._left - self._started
        self._left = self._started


def _number(text) -> float:
    """A heartbeat field as a non-negative number; anything else counts as 0."""
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if value > 0 and math.isfinite(value) else 0.0


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))

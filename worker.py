"""The model worker: claims batches of jobs from Redis, classifies them, stores and announces the results."""

import dataclasses
import itertools
import math
import os
import signal
import socket
import threading
import time
import uuid

import numpy as np
import redis

import jobs
import redis_client
from catalog import load_labels
from clock import RedisClock
from job_queue import LEFT_TTL, JobQueue, result_grace
from jobs import Reply
from keys import process_name
from logger import bind, log
from settings import Settings
from worker_registration import WorkerRegistry


class NameTaken(RuntimeError):
    """A worker of this name left within job_queue.LEFT_TTL: its beats would not register this one."""


class _Interrupted(Exception):
    """Raised by the signal handler to leave a blocking wait for work; never while a batch is running."""


class Throughput:
    """Images per second of busy time (claim to acknowledgement) over about the last TAU seconds of it.

    Each batch weighs by how long it took, and at most a fifth. With a fifth for every batch, batches of one image
    (15 ms each) made the rate follow the last few images, which swung between 30 and 100 images/s within a second
    as the web tier took the CPU and gave it back; admission swung with it between admitting every request and
    refusing every one, and the requests admitted on a high reading got 504 (up to 111 of 1172 at twice the
    capacity). A batch of 32 of EfficientNet-Lite0 (0.3 s) weighs about a quarter; one of ResNet50 (1.2 s) a fifth,
    as before: weighed by its duration alone, it would be most of the rate, and as jumpy as one image was.
    """

    TAU = 1.0  # seconds of busy time after which a batch weighs 1/e of what it weighed when it ended
    KEPT_AT_LEAST = 0.8  # of the batches before, whatever the newest one's duration

    def __init__(self):
        # Sums, each older batch discounted by the busy time since; batch_weight: of the batches themselves, for
        # the average batch's duration.
        self.images = self.seconds = self.batch_weight = 0.0

    def add(self, images: int, seconds: float) -> None:
        kept = max(math.exp(-seconds / self.TAU), self.KEPT_AT_LEAST)
        self.images = self.images * kept + images
        self.seconds = self.seconds * kept + seconds
        self.batch_weight = self.batch_weight * kept + 1

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def seconds_for(self, images: int) -> float:
        """How long a batch of `images` would take: at the measured rate, but never longer than the average batch
        has taken (a batch costs far less per image than a single one, and a rate measured on single images
        would make a burst of 32 look 32 times as long). 0.0 before anything was measured."""
        return min(images / self.rate, self.seconds / self.batch_weight) if self.rate > 0 else 0.0


# Every model of the catalog answers ImageNet's classes; an answer of another width would be labelled wrongly.
CLASSES = len(load_labels())
EXIT_HUNG = 3  # the exit status of a worker whose model hung (Worker._give_up_hung_batch)
# Seconds a heartbeat may come after its interval before the worker takes it that Redis or the worker stalled (a
# beat, a clock sync and a sweep take milliseconds). Each late beat holds sweeps off for HEARTBEAT_TTL, logged.
LATE_BEAT = 1.0


def _end_process(status):
    os._exit(status)  # not sys.exit: the main thread is stuck in the model, and would never unwind


class Worker:
    def __init__(self, classifier, config: Settings, name: str | None = None):
        self.classifier = classifier
        self.name = name or process_name()
        self.batch_size = config.batch_size
        self.block_timeout = config.block_timeout
        self.heartbeat_interval = config.heartbeat_interval
        self.max_batch_seconds = config.max_batch_seconds
        self._in_model = None  # (the batch, when the model was given it): the heartbeat watches it
        self.max_attempts = config.max_attempts
        self.result_grace = result_grace(config)
        self.redis = redis_client.connect(config.redis_url, config.redis_socket_timeout)
        # BLMOVE blocks for BLOCK_TIMEOUT; its connection must wait longer than that before giving up.
        self.blocking_redis = redis_client.connect(config.redis_url, config.block_timeout + 5)
        self.queue = JobQueue(self.redis, config)
        self.registry = WorkerRegistry(self.redis, self.queue, config.heartbeat_ttl)
        self.clock = RedisClock(self.redis)
        self.counts = {"batches": 0, "jobs": 0, "errors": 0, "expired": 0, "cancelled": 0}
        # Batch ids '<token>:<n>', numbered: finish.lua tells a late copy of an earlier batch's call by its number.
        self._batch_ids = (f"{uuid.uuid4().hex[:12]}:{n}" for n in itertools.count(1))
        self.throughput = Throughput()  # images/s while busy, published in the heartbeat for admission
        self.stopping = threading.Event()  # asked to stop: take no new batch
        self.finished = threading.Event()  # the last batch is done: stop beating
        self.stop_signal = None
        self._idle = False
        self._sweep_from = math.inf  # monotonic time from which this worker may sweep others: set as it registers
        self._published = (0.0, -math.inf)  # the images/s the last beat carried, and when (monotonic)
        # Seconds spent on tries that failed for want of Redis, and on the waits between them (main thread only):
        # not work, so not part of a batch's busy time.
        self._redis_away = 0.0
        self._beat_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------
    def heartbeat_info(self):
        self._published = (self.throughput.rate, time.monotonic())
        return {
            "name": self.name,
            "model": self.classifier.name,
            "batch_size": self.batch_size,
            "ready": 1,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "beat_at": round(self.clock.now(), 3),
            "images_per_s": round(self.throughput.rate, 3),
            **self.counts,
        }

    def _beat(self):
        # One at a time: the heartbeat thread and, when the throughput moved, the main thread both beat, and a
        # beat built before another must not be written after it (its older rate would stand until the next).
        with self._beat_lock:
            return self.registry.beat(self.name, self.heartbeat_info())

    def _hold_off_sweeps(self):
        """Redis was away or stalled, or may have been just before this worker came: the others' heartbeats may have
        lapsed meanwhile, their next beat still on its way. Give them a full TTL (the heartbeat's own, as Redis holds
        it) to beat again before taking any of them for dead."""
        self._sweep_from = time.monotonic() + self.registry.heartbeat_ttl

    def _heartbeat_loop(self):
        # Beats go on while a stopping worker finishes its batch, however long it takes: a worker that fell
        # silent would be swept, and its batch computed twice. Up to MAX_BATCH_SECONDS: then the model is hung.
        beaten = time.monotonic()  # when the last beat went through: the registration, just before this thread
        while not self.finished.wait(self.heartbeat_interval):
            # Only the model's time counts: waiting out a Redis outage, before or after it, is no hang.
            in_model = self._in_model
            if in_model and time.monotonic() - in_model[1] > self.max_batch_seconds:
                self._give_up_hung_batch(in_model[0])
                return
            try:
                self.clock.sync()
                self._beat()
            except Exception as exc:  # noqa: BLE001 - see below
                # Redis away, or anything else (a bug of ours or a library's): this thread goes on beating. Ended,
                # it would leave the worker serving unseen, its batches swept by its peers and computed twice.
                self._hold_off_sweeps()
                away = isinstance(exc, redis.RedisError)
                log("heartbeat_failed", level="WARNING" if away else "ERROR", worker=self.name, error=repr(exc))
                continue
            # A beat that came late, after a failed one or through a stall that raised nothing (Redis frozen for
            # less than redis-py's try and retry, in this beat or in the sweep before it; this process paused):
            # the others' beats may have timed out meanwhile, and a review's case swept a live peer then.
            now = time.monotonic()
            late, beaten = now - beaten - self.heartbeat_interval, now
            if late > LATE_BEAT:
                self._hold_off_sweeps()
                log("sweeps_held_off", level="WARNING", worker=self.name, beat_late_s=round(late, 1))
            try:
                if now >= self._sweep_from:
                    self.registry.sweep()
            except Exception as exc:  # noqa: BLE001 - whatever the sweep met, this thread must go on beating
                if isinstance(exc, redis.RedisError):  # Redis away or stalled: the others' beats may be too
                    self._hold_off_sweeps()
                log("sweep_failed", level="ERROR", worker=self.name, error=repr(exc))

    def _on_signal(self, signum, _frame):
        # No logging here: the signal may land while this thread holds the log's lock.
        self.stop_signal = self.stop_signal or signal.Signals(signum).name
        self.stopping.set()
        if self._idle:
            self._idle = False  # a second signal must not interrupt the clean-up of the first
            raise _Interrupted()

    def run(self):
        """Serve until SIGTERM or SIGINT, which let the batch in hand finish first."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.serve()

    def serve(self):
        """Register, beat, and process batches until `stopping` is set; then hand back what is left."""
        clean = False  # only a stop leaves (hands back its jobs unattempted and unregisters)
        try:
            # Inside: a stop while Redis is down at start-up ends the wait to register, and leaves as any stop does.
            if not self._connect_with_backoff(self._beat):
                raise NameTaken(f"a worker named {self.name!r} left less than {LEFT_TTL} s ago; give each its own name")
            # Redis may have been away just before: while the model loaded, say, or while this worker waited to
            # register. A newcomer cannot tell.
            self._hold_off_sweeps()
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
            log(
                "worker_ready",
                worker=self.name,
                model=self.classifier.name,
                batch_size=self.batch_size,
                queue=self.queue.keys.queue,
            )
            while not self.stopping.is_set():
                try:
                    self.run_once()
                except redis.RedisError as exc:
                    # Redis refused a command (not a lost connection: those are retried where they happen).
                    # The batch stays claimed and comes back with the next claim; the worker lives on.
                    log("batch_not_finished", level="ERROR", worker=self.name, error=str(exc))
                    self.stopping.wait(1.0)
            clean = True
        except _Interrupted:
            clean = True
        finally:
            self._idle = False
            self.stopping.set()
            self.finished.set()
            try:
                # Anything else (a name taken, an exception out of a batch) is no stop: leaving would hand its
                # batch back with no attempt counted, and a job that crashes every worker would never be
                # dead-lettered. Its heartbeat lapses instead and a sweep counts the attempt, as after a kill -9.
                if clean:
                    self.registry.unregister(self.name)
            except redis.RedisError as exc:
                log("unregister_failed", level="WARNING", worker=self.name, error=str(exc))
            log("worker_stopped", worker=self.name, signal=self.stop_signal, **self.counts)

    def _connect_with_backoff(self, action, until_stopped=True):
        """action() once Redis answers it, retried with backoff; a stop ends the wait (raising _Interrupted) unless
        `until_stopped` is False: a batch's finish or failure must land, or the stop's leave would hand the batch
        back as if it had never run (a failure's attempt lost)."""
        backoff, first_try = redis_client.Backoff(), time.monotonic()
        while True:
            try:
                this_try = time.monotonic()
                outcome = action()
                self._redis_away += this_try - first_try
                return outcome
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                delay = backoff.next()
                log("redis_unavailable", level="ERROR", worker=self.name, error=str(exc), retry_in_s=delay)
                if not until_stopped:
                    time.sleep(delay)
                elif self.stopping.wait(delay):
                    raise _Interrupted() from None

    # -- work ------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Wait for one batch and process it. Returns the number of jobs claimed."""
        tries = itertools.count()

        def claim():
            # After a failed try, collect what we may already hold without waiting for more.
            timeout = self.block_timeout if next(tries) == 0 else 0
            return self.queue.claim(self.name, self.batch_size, timeout, self.blocking_redis)

        self._idle = True
        try:
            raws = self._connect_with_backoff(claim)
        finally:
            self._idle = False
        if raws:
            self.process(raws)
        return len(raws)

    def _give_up_hung_batch(self, raws):
        """The model has not come back from the batch in MAX_BATCH_SECONDS. Beating on, the worker would hold the
        batch for ever, and be counted as ready by readiness and admission while requests wait out their deadlines.
        The batch goes back with an attempt counted (a batch that hangs every worker ends dead-lettered), the
        worker unregisters, and its process ends: a thread stuck in the model cannot be stopped, and a supervisor
        (Kubernetes, compose's restart policy) starts a fresh one."""
        log("batch_hung", level="ERROR", worker=self.name, claimed=len(raws), limit_s=self.max_batch_seconds)
        try:
            self.queue.fail(self.name, raws, f"the batch ran past MAX_BATCH_SECONDS ({self.max_batch_seconds:g} s)")
            self.registry.unregister(self.name)
        except redis.RedisError as exc:  # then its heartbeat lapses, and a sweep hands the batch back
            log("hung_batch_not_handed_back", level="ERROR", worker=self.name, error=str(exc))
        _end_process(EXIT_HUNG)

    def process(self, raws):
        """Classify the claimed jobs and finish the batch; no job, however malformed, ends the worker."""
        batch_id, busy_since, away_before = next(self._batch_ids), time.monotonic(), self._redis_away
        try:
            replies, retry, dead, done, gone, ran = self._work(raws)
        except _Interrupted:
            raise  # a stop while Redis was away, before the model ran: serve() hands the batch back unattempted
        except Exception as exc:  # noqa: BLE001 - a fault of ours, not of one job: see below
            # Hand the batch back with an attempt counted: if a job causes it, that job ends in the
            # dead-letter list after MAX_ATTEMPTS instead of taking every worker down in turn.
            self.counts["errors"] += len(raws)
            error = repr(exc)
            log("batch_failed", level="ERROR", worker=self.name, claimed=len(raws), error=error)
            self._connect_with_backoff(lambda: self.queue.fail(self.name, raws, error), until_stopped=False)
            return
        finally:
            bind()
        outcome = self._connect_with_backoff(
            lambda: self.queue.finish(self.name, batch_id, raws, replies, retry, dead, gone), until_stopped=False
        )
        if outcome == "swept":
            log("batch_swept", level="WARNING", worker=self.name, claimed=len(raws))
        if ran:
            # Until the batch is acknowledged, not only until the model is done: with batches of one image, the
            # answers and the acknowledgement took 2 ms of every 15, and a rate measured without them promised
            # admission 15 % more than the worker served (the 0.8 of ADMISSION_WAIT_FRACTION left little for
            # anything else, and requests admitted on it got 504). Not the time Redis was away meanwhile, while the
            # pixels were read or the batch finished: a minute's outage taken for work made the rate 0.016 images/s
            # when Redis came back, and admission refused nearly everything until it was measured away.
            away = self._redis_away - away_before
            self.throughput.add(ran, time.monotonic() - busy_since - away)
        self.counts["batches"] += 1
        self.counts["jobs"] += len(done)
        for job in done:
            log("result_published", id=job.id, rid=job.request_id, worker=self.name)
        self._beat_if_throughput_moved()

    # Admission reads the throughput from the heartbeat. At the onset of an overload the web tier takes CPU from
    # the model, and the rate fell by a fifth to a half within a batch or two; a heartbeat up to HEARTBEAT_INTERVAL
    # later left it admitting on the old rate for seconds, and requests with deadlines of a few seconds missed them.
    RATE_MOVED = 0.1  # beat at once when the rate moved by more than this share since the last beat
    RATE_BEAT_MIN_INTERVAL = 0.5  # seconds; at most this often: small batches make the rate jitter

    def _beat_if_throughput_moved(self):
        rate, (published, at) = self.throughput.rate, self._published
        if abs(rate - published) <= self.RATE_MOVED * published or time.monotonic() - at < self.RATE_BEAT_MIN_INTERVAL:
            return
        try:
            self._beat()
        except redis.RedisError as exc:  # the heartbeat thread beats in any case
            log("heartbeat_failed", level="WARNING", worker=self.name, error=str(exc))

    def _work(self, raws):
        """(replies, jobs to retry, (job, reason) pairs to dead-letter, jobs answered, ids of the jobs whose
        pixels can go, images the model ran) for a claimed batch."""
        started = self.clock.now()
        valid, replies, dead, claimed_ids = self._triage(raws, started)
        valid = self._load(valid, replies, dead)
        bind(rids=",".join(job.request_id for job in valid))  # every line about this batch names its requests
        log("batch_claimed", worker=self.name, claimed=len(raws), batch_size=len(valid))
        retry, done = [], []
        if not valid:
            return replies, retry, dead, done, claimed_ids, 0
        rechecked_before = self.classifier.rechecked
        self._in_model = (raws, time.monotonic())  # the whole claimed batch is what goes back if the model hangs
        try:
            outcomes = self._classify(valid)
        finally:
            self._in_model = None
        inference_ms = (self.clock.now() - started) * 1000
        # Images a bf16 model answered in f32: its near ties, or whole batches while near ties are common.
        rechecked = self.classifier.rechecked - rechecked_before
        more = {"rechecked": rechecked} if rechecked else {}
        log("inference_done", worker=self.name, batch_size=len(valid), ms=inference_ms, **more)
        for job, outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._retry_or_give_up(job, outcome, replies, retry, dead)
                continue
            top = self.classifier.top_k(outcome, job.top_k)
            queue_ms = (started - job.enqueued_at) * 1000
            result = jobs.success_result(job, outcome, top, self.classifier.name, len(valid), inference_ms, queue_ms)
            replies.append(self._reply(job, result))
            done.append(job)
        # Retried jobs keep their pixels for the next try; every other claimed job is done with them.
        retried = {job.id for job in retry}
        gone = [job_id for job_id in claimed_ids if job_id not in retried]
        return replies, [jobs.encode_header(job) for job in retry], dead, done, gone, len(valid)

    def _load(self, valid, replies, dead):
        """The jobs to run, with their pixels: one round trip reads the cancellation marks (the web server
        marks a job nobody waits for any more) and the pixels. A job whose pixels are gone (expired, or
        evicted by a Redis short of memory) is answered 410 and dead-lettered; one whose pixels are not an
        image, 422."""
        if not valid:
            return valid
        keys = self.queue.keys
        cancel_keys = [keys.cancelled(job.id) for job in valid]
        pixel_keys = [keys.pixels(job.id) for job in valid]
        values = self._connect_with_backoff(lambda: self.redis.mget([*cancel_keys, *pixel_keys]))
        loaded, missing = [], []
        for job, mark, pixels in zip(valid, values[: len(valid)], values[len(valid) :], strict=True):
            if mark is not None:
                self.counts["cancelled"] += 1
                log("job_cancelled", id=job.id, rid=job.request_id, worker=self.name)
            elif pixels is None:
                missing.append(job)
            else:
                try:
                    loaded.append(jobs.with_pixels(job, pixels))
                except jobs.JobError as exc:
                    self._refuse(job, f"invalid job: {exc}", 422, replies, dead)
        for job in self._unanswered(missing):
            self._refuse(job, "the job's pixels are gone from Redis (expired or evicted)", 410, replies, dead)
        return loaded

    def _unanswered(self, missing):
        """The jobs without pixels that have no result either. A job with a result is a second copy of one
        already answered (its push was repeated after a lost reply, and the first copy was claimed and
        finished meanwhile, its pixels deleted): it is dropped, not answered again with an error."""
        if not missing:
            return missing
        result_keys = [self.queue.keys.result(job.id) for job in missing]
        results = self._connect_with_backoff(lambda: self.redis.mget(result_keys))
        for job, result in zip(missing, results, strict=True):
            if result is not None:
                log("job_already_answered", level="WARNING", id=job.id, rid=job.request_id, worker=self.name)
        return [job for job, result in zip(missing, results, strict=True) if result is None]

    def _refuse(self, job, error, status, replies, dead):
        """Answer a job that cannot be run with `error` and dead-letter it with that reason."""
        self.counts["errors"] += 1
        log("job_rejected", level="ERROR", id=job.id, rid=job.request_id, worker=self.name, error=error)
        dead.append((jobs.encode_header(job), error))
        replies.append(self._reply(job, jobs.error_result(job.id, error, status)))

    def _reply(self, job, result):
        """What to store and announce for `job`. A result that a request waits for on a reply channel is kept
        until the request's deadline and a grace for a retried read: nobody reads it later, and a request that took
        it from its notification never reads it at all. Not capped at RESULT_TTL: with REQUEST_TIMEOUT above it, a
        request of several images reading its results in order found a later image's expired (found by review).
        An async job's keeps its own result_ttl. Any other (a polling request's, a dead letter an operator
        requeued) is kept RESULT_TTL, and until its deadline and the grace when that is later: a polling request
        reads its results in order too (found by review: in WAIT_MODE=poll with RESULT_TTL under REQUEST_TIMEOUT,
        a request whose images were all answered got 504)."""
        ttl = job.result_ttl
        if not ttl:
            ttl = max(1, math.ceil(job.deadline - self.clock.now() + self.result_grace))
            if not job.reply_to:
                ttl = max(ttl, self.queue.result_ttl)
        return Reply.of(job.id, job.reply_to, result, ttl, with_result=job.notify_result)

    def _triage(self, raws, now):
        """Split claimed jobs into those to run, replies for malformed ones and for jobs that cannot be done by
        their deadline, and jobs to dead-letter; with the ids of every claimed job that has one."""
        valid, late, replies, dead, ids = [], [], [], [], []
        # When the batch would end, at the throughput measured so far (a batch of them all, the longest case):
        # a job due before then would be answered too late to be of use, and computing it would make its
        # batch-mates, and every job queued behind them, later still.
        finish_by = now + self.throughput.seconds_for(len(raws))
        for raw in raws:
            try:
                job = jobs.decode_job(raw)
            except jobs.JobError as exc:
                self.counts["errors"] += 1
                log("job_rejected", level="ERROR", id=exc.job_id, worker=self.name, error=str(exc))
                dead.append((raw, f"invalid job: {exc}"))
                if exc.job_id:
                    ids.append(exc.job_id)
                    error = jobs.error_result(exc.job_id, f"invalid job: {exc}", 422)
                    replies.append(Reply.of(exc.job_id, exc.reply_to, error))
                continue
            ids.append(job.id)
            (valid if job.deadline >= finish_by else late).append(job)
        hopeful = [job for job in late if job.deadline >= now]
        if not valid and hopeful:
            # Never shed a whole batch on a prediction alone: the prediction is only measured on batches that
            # run, and one slow batch (a stall, a pause) would otherwise shed every batch after it, for good.
            # The job with the most time left runs.
            keep = max(hopeful, key=lambda job: job.deadline)
            late.remove(keep)
            valid.append(keep)
        for job in late:
            self._expire(job, now, replies)
        return valid, replies, dead, ids

    def _expire(self, job, now, replies):
        self.counts["expired"] += 1
        if job.result_ttl:  # an async job's requester learns its fate from the result key alone
            error = jobs.error_result(job.id, jobs.LATE, 504)
            replies.append(self._reply(job, error))
        elif job.deadline >= now:
            # Its request still waits: shed it now (the web answers 503 with Retry-After, as for a request it
            # refuses itself) rather than let it run into a 504 at its deadline.
            error = jobs.error_result(job.id, jobs.LATE, 503)
            replies.append(self._reply(job, error))
        # Else the web server has already answered 504.
        log(
            "job_expired",
            level="WARNING",
            id=job.id,
            rid=job.request_id,
            worker=self.name,
            late_ms=(now - job.deadline) * 1000,
        )

    def _classify(self, batch):
        """The model's probabilities for each job or, for a job the model fails on by itself, the exception.

        A batch that fails is split in halves until the failure is pinned on the jobs that cause it, so
        that their batch-mates are answered and only they use up attempts.
        """
        try:
            probabilities = np.asarray(self.classifier.predict(np.stack([job.pixels for job in batch])))
            if probabilities.shape != (len(batch), CLASSES):
                raise ValueError(
                    f"the model answered shape {probabilities.shape} for {len(batch)} images of {CLASSES} classes"
                )
        except Exception as exc:  # noqa: BLE001 - any model failure is pinned on its jobs, then retried
            log("inference_failed", level="ERROR", worker=self.name, batch_size=len(batch), error=repr(exc))
            if len(batch) == 1:
                return [exc]
            middle = len(batch) // 2
            return self._classify(batch[:middle]) + self._classify(batch[middle:])
        # A row with NaN or infinity (bf16 gone wrong, say) is no answer: it was sent as success, in a body that
        # is not JSON. It fails its own job alone, which is retried and in the end dead-lettered.
        finite = np.isfinite(probabilities).all(axis=1)
        if not finite.all():
            log("inference_not_finite", level="ERROR", worker=self.name, images=int((~finite).sum()))
        return [
            row if ok else ValueError("the model answered NaN or infinity")
            for row, ok in zip(probabilities, finite, strict=True)
        ]

    def _retry_or_give_up(self, job, error, replies, retry, dead):
        self.counts["errors"] += 1
        job = dataclasses.replace(job, attempts=job.attempts + 1)
        if job.attempts < self.max_attempts:
            retry.append(job)
            return
        log("job_dead_lettered", level="ERROR", id=job.id, worker=self.name, attempts=job.attempts)
        message = f"job failed {job.attempts} times and was given up: the model raised {error!r}"
        reason = f"out of attempts ({job.attempts}); the last: the model raised {error!r} on worker {self.name}"
        dead.append((jobs.encode_header(job), reason))
        replies.append(self._reply(job, jobs.error_result(job.id, message, 500)))

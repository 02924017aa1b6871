"""From uploads to answers: the one path that /predict, the Open Inference Protocol and /jobs all take.

Admission (refuse at once what cannot be served in time), decoding the uploads, queueing their jobs side by
side, and waiting for the results within the request's deadline, or handing back the ids of async jobs.
Every refusal is a `Refused` carrying its HTTP status; each protocol words it in its own error format.
Runs inside a Flask request of an app built by web.create_app.
"""

import math
import os
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.queue
import gevent.threadpool
import numpy as np
import redis
from flask import current_app, g, request
from gevent import monkey

import helpers
import jobs
import metrics
from admission import Admission, BacklogImages, Refusal
from clock import RedisClock
from job_queue import JobQueue, QueueFull
from logger import log
from notifications import ResultWaiter
from settings import Settings
from worker_registration import WorkerRegistry

# Set by the server (run_web_server.py) in the WSGI environ; absent under other hosts and Flask's test client.
ARRIVED = "imgclf.arrived"  # time.monotonic() when the request's connection was accepted or its first byte came
WATCH_DISCONNECT = "imgclf.watch_disconnect"  # watch(callback) -> stop(): callback() once the client hangs up
# The Redis error the admission met while web._RefuseEarly weighed the request: the route answers it without asking
# Redis again (a hung Redis would make it wait out its socket timeout twice).
REDIS_FAILED = "imgclf.redis_failed"
MOVE_DEADLINE = "imgclf.move_deadline"  # move(seconds): the server's own 504 comes that long after ARRIVED instead


@dataclass(frozen=True)
class Service:
    """What the routes share in one app: its settings and its handles on Redis."""

    config: Settings
    queue: JobQueue
    registry: WorkerRegistry
    waiter: ResultWaiter
    clock: RedisClock
    admission: Admission


def service() -> Service:
    return current_app.extensions["image_classifier"]


@dataclass
class Refused(Exception):
    """The request cannot be answered with results: `status` is the HTTP status to answer with."""

    status: int
    message: str
    reason: str | None = None  # why a 503 refused it: queue_full | expected_wait | redis_unavailable | shed
    retry_after: int | None = None  # seconds, for the Retry-After header
    job_ids: list = field(default_factory=list)  # the jobs it had queued, when it got that far

    def __str__(self):
        return self.message


def started() -> float:
    """time.monotonic() when the request's clock started: when the server first saw it, not when we got to it
    (under another WSGI host, which does not say: when this was first asked)."""
    return request.environ.setdefault(ARRIVED, time.monotonic())


def limit_time(seconds: float | None) -> None:
    """Give the request a deadline of its own, `seconds` after it arrived, when that is sooner than
    REQUEST_TIMEOUT's (None: REQUEST_TIMEOUT's). Before `admit`: admission weighs the work ahead against it, and
    the server's safety net answers by it as it would by REQUEST_TIMEOUT."""
    g.time_limit = seconds
    move = request.environ.get(MOVE_DEADLINE)
    if seconds and move:
        move(_timeout(service()))


def _timeout(svc) -> float:
    """Seconds from the request's arrival to its deadline."""
    asked = g.get("time_limit")
    return min(asked, svc.config.request_timeout) if asked else svc.config.request_timeout


def admit(images: int, budget: float | None = None) -> None:
    """Refuse a request of `images` images that is empty (400), has more than a request may carry (413), or
    whose jobs could not be served within its remaining time (503; or within `budget` seconds: an async job's).
    Call it once the body is read and its images counted, before any is decoded, so that refusing costs next to
    nothing; then `prepare` them."""
    svc = service()
    if images < 1:
        raise Refused(400, "no image was sent")
    if images > svc.config.max_images_per_request:
        raise Refused(413, f"{images} images sent, at most {svc.config.max_images_per_request} per request")
    exchange = started() + _timeout(svc) - time.monotonic()  # the images are prepared within it
    try:
        with redis_or_busy():
            if REDIS_FAILED in request.environ:
                raise request.environ[REDIS_FAILED]
            if budget:
                svc.admission.check(budget, images, prepare_within=exchange)
            else:
                svc.admission.check(exchange, images)
    except Refusal as refusal:
        if refusal.reason == "deadline":  # no retry would meet it: the request's time is what it lacks
            raise _timed_out(_timeout(svc), str(refusal)) from None
        raise busy(refusal) from None


def prepare(uploads: list[bytes]) -> list[np.ndarray]:
    """Decode and resize each upload, after `admit(len(uploads))`: each image leaves the admission's local backlog
    once it is prepared, the rest when this ends, however it ends. Refused 400/413 names the first bad image; 499
    if the client hangs up meanwhile, 504 if the request's deadline comes first (its images not yet started are
    then skipped)."""
    svc = service()
    pixels = []
    timeout = _timeout(svc)
    with svc.admission.preparation(len(uploads)) as counted:
        batch = _decoder().submit(uploads, svc.config.max_image_pixels, counted)
        watch = request.environ.get(WATCH_DISCONNECT)
        stop_watching = watch(batch.abandon) if watch else None
        try:
            for number, outcome in enumerate(batch.outcomes(started() + timeout), 1):
                if outcome is _GONE:
                    log("client_gone", level="WARNING", ms=(time.monotonic() - started()) * 1000, images=len(uploads))
                    raise Refused(499, "the client went away")  # nginx's code; nobody reads it
                if outcome is _LATE:
                    raise _timed_out(timeout, f"{len(pixels)} of its {len(uploads)} images prepared by then")
                if isinstance(outcome, helpers.ImageError):
                    which = f"image {number} of {len(uploads)}: " if len(uploads) > 1 else ""
                    log("image_rejected", level="WARNING", error=str(outcome), status=outcome.status)
                    raise Refused(outcome.status, which + str(outcome))
                if isinstance(outcome, BaseException):
                    raise outcome  # in this greenlet, where the caller handles it
                pixels.append(outcome)
        finally:
            batch.abandon()  # whatever is not started yet is skipped
            if stop_watching:
                stop_watching()
    return pixels


def classify(pixels: list[np.ndarray], top_k: int, probabilities: bool = False) -> list[dict]:
    """Queue one job per image and wait for all of them: the workers' results, in order (each a dict of
    jobs.success_result or jobs.error_result). Raises Refused: 503 (busy), 504 (no result within
    REQUEST_TIMEOUT) or 499 (the client hung up). Unanswered jobs are then marked cancelled, so that no
    worker computes them for nobody."""
    svc = service()
    begun, timeout = started(), _timeout(svc)
    with redis_or_busy():
        reply_to = svc.waiter.start()
        # The jobs' times are Redis's, which every worker reads too; this host's wall clock plays no part.
        now = svc.clock.now()
    deadline = now + timeout - (time.monotonic() - begun)
    if deadline <= now:  # spent before its jobs could be queued: nothing for a worker to do
        raise _timed_out(timeout, "its time ran out before its jobs could be queued")
    batch = [_job(p, deadline, top_k, reply_to, now, probabilities=probabilities) for p in pixels]
    ids = [job.id for job in batch]
    with ExitStack() as stack:
        waiting = [stack.enter_context(svc.waiter.expect(job.id, job.notify_result)) for job in batch]
        _enqueue(svc, batch)
        pushed = time.monotonic()
        watch = request.environ.get(WATCH_DISCONNECT)
        stop_watching = watch(lambda: [pending.abandon() for pending in waiting]) if watch else None
        try:
            results = []
            for pending in waiting:
                result = svc.waiter.wait(pending, begun + timeout, since=pushed)
                if result is None:
                    break
                results.append(result)
        finally:
            if stop_watching:
                stop_watching()
    if len(results) == len(batch):
        shed = [result for result in results if not result["success"] and result.get("status") == 503]
        if shed:
            raise _busy("shed", f"{len(shed)} of its jobs could not be done before the deadline", 1)
        return results
    abandoned = waiting[0].abandoned
    (metrics.CANCELLED if abandoned else metrics.EXPIRED).inc()
    unanswered = ids[len(results) :]
    _cancel(svc, unanswered)
    elapsed_ms = (time.monotonic() - begun) * 1000
    if abandoned:
        log("client_gone", level="WARNING", ids=",".join(unanswered), ms=elapsed_ms)
        raise Refused(499, "the client went away", job_ids=ids)  # nginx's code; nobody reads it
    log("request_timeout", level="WARNING", ids=",".join(unanswered), ms=elapsed_ms)
    raise Refused(504, f"no result within {timeout:g} s", job_ids=ids)


def detach(pixels: list[np.ndarray], top_k: int) -> list[str]:
    """Queue async jobs and return their ids at once; their results are kept JOB_RESULT_TTL seconds."""
    svc = service()
    keep = svc.config.job_result_ttl
    with redis_or_busy():
        now = svc.clock.now()
    # A job not even started within JOB_RESULT_TTL is answered 504 by the worker that finally claims it.
    batch = [_job(p, now + keep, top_k, None, now, result_ttl=keep) for p in pixels]
    _enqueue(svc, batch, track_ttl=2 * keep)  # its status must outlive the wait and then the result
    return [job.id for job in batch]


def _job(pixels, deadline, top_k, reply_to, now, **options):
    # The request's first job takes the id its log lines already carry (its request id, unless the client
    # sent one); the others get their own.
    job_id = g.pop("job_id", None) or uuid.uuid4().hex
    # The result rides on the notification unless it carries probabilities (4 KB, and checked nowhere on the
    # way: the Open Inference Protocol reads them from the key the worker wrote).
    notify_result = bool(reply_to) and not options.get("probabilities")
    return jobs.Job(
        pixels,
        deadline,
        top_k,
        reply_to,
        g.request_id,
        job_id,
        enqueued_at=now,
        notify_result=notify_result,
        **options,
    )


@contextmanager
def redis_or_busy():
    """Refused 503 (redis_unavailable) for a Redis error inside."""
    try:
        yield
    except redis.RedisError as exc:
        log("redis_unavailable", level="ERROR", error=str(exc))
        raise _busy("redis_unavailable", "the job queue is unavailable", 1) from None


def _enqueue(svc, batch, track_ttl=0):
    try:
        with redis_or_busy():
            length = svc.queue.enqueue(*(jobs.encode_job(job) for job in batch), track_ttl=track_ttl)
    except QueueFull as exc:
        svc.admission.queue_length(exc.length)  # the next requests are refused before they are decoded
        raise _busy("queue_full", str(exc), 1) from None
    except Refused:
        # The push may have happened and only its reply been lost: nobody will wait for these jobs, so they are
        # marked cancelled (if Redis lets us) rather than computed for nobody.
        _cancel(svc, [job.id for job in batch], ttl=track_ttl or None)
        raise
    except BaseException:
        # The server's safety net (a gevent.Timeout) cut the push short, and it may have happened: the answer is a
        # 504 without the jobs' ids, so they are cancelled as well, beside it rather than before it (Redis may be
        # what hangs). Found by review: a /jobs answered 504 had its job run, the result kept under an id nobody had.
        gevent.spawn(_cancel, svc, [job.id for job in batch], track_ttl or None)
        raise
    svc.admission.queue_length(length)
    metrics.ADMITTED.inc(len(batch))
    for job in batch:
        log("job_queued", id=job.id, top_k=job.top_k)


def answer(result: dict) -> dict:
    """The public body of one worker result, as /predict has always answered it (status aside)."""
    if not result["success"]:
        return {"success": False, "error": result["error"], "id": result["id"]}
    return {
        "success": True,
        "id": result["id"],
        "request_id": result.get("request_id", result["id"]),
        "model": result["model"],
        "predictions": result["predictions"],
    }


def _timed_out(timeout, why):
    """A 504 for a request whose deadline came before anything was queued for it; logged and counted as every
    504 is (the waiter counts those that came while it waited)."""
    metrics.TIMEOUTS.inc()
    log("request_timeout", level="WARNING", ms=(time.monotonic() - started()) * 1000, error=why)
    return Refused(504, f"no result within {timeout:g} s: {why}")


def busy(refusal: Refusal) -> Refused:
    """The 503 for an admission's refusal, logged and counted."""
    return _busy(refusal.reason, str(refusal), refusal.retry_after)


def _busy(reason, message, retry_after):
    metrics.REJECTED.labels(reason).inc()
    log("request_refused", level="WARNING", reason=reason, error=message, retry_after=retry_after)
    return Refused(503, f"the service is busy ({message}); retry later", reason, retry_after)


def _cancel(svc, job_ids, ttl=None):
    """Mark the jobs so that a worker claiming one skips it; the mark outlives the jobs' deadline (`ttl`: an
    async job's, which is further off than any request's). An async job's status goes: its requester was told it
    was not queued (found by review: it said queued for twice JOB_RESULT_TTL)."""
    ttl = ttl or math.ceil(svc.config.request_timeout) + 60
    pipe = svc.queue.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.set(svc.queue.keys.cancelled(job_id), "1", ex=ttl)
        pipe.delete(svc.queue.keys.status(job_id), svc.queue.keys.job_deadline(job_id))
    try:
        pipe.execute()
    except redis.RedisError as exc:  # the worker's own deadline check still drops them once they are late
        log("cancel_failed", level="WARNING", ids=",".join(job_ids), error=str(exc))


# Decoding threads per web process: few, as each may hold a large image's pixels, and never more than the
# cores this process may run on.
DECODING_THREADS = min(2, len(os.sched_getaffinity(0)))


class _PerProcess:
    """What `make()` makes, once in each process that asks for it: gevent's thread pools are made after gunicorn's
    fork, in the process that uses them."""

    def __init__(self, make):
        self._make, self._made = make, None  # (pid, what make() made there)

    def __call__(self):
        if self._made is None or self._made[0] != os.getpid():
            self._made = (os.getpid(), self._make())
        return self._made[1]


class _Decoder:
    """Decodes and resizes uploads in a small pool of native threads of its own, in the order they came.

    Threads: Pillow lets go of the GIL while it decodes, so one expensive image (a 40-megapixel PNG costs most of a
    CPU second) cannot stall every other request of the process, and their deadlines, while it is decoded. (Not
    the hub's pool: gevent resolves host names there, and a Redis reconnect must not wait behind decodes.)
    In order: a request hands over all its images at once and they are started after every image handed over
    before them, so a request admitted later never delays one admitted earlier, and the images ahead of a new
    request are those the admission's local backlog counts. (gevent's pool alone takes whoever asks first when a
    thread comes free: a request that handed over one image at a time fell behind every request after it.)"""

    def __init__(self, threads):
        self._pool = gevent.threadpool.ThreadPool(threads)
        self._queue = gevent.queue.Queue()
        for _ in range(threads):
            gevent.spawn(self._serve)

    def _serve(self):
        while True:
            batch, data, result = self._queue.get()
            if batch.abandoned:
                continue  # nobody waits for it
            # Timed here, not in the thread: a lane takes its next image only once this greenlet has the outcome
            # back, and on a busy process the hub's delay in handing it back took longer than the decoding (4 s of
            # local wait at the onset of an overload, admitted on an estimate of under 1 s). Should the pool itself
            # fail, _turn hands that to the request too, and this lane goes on.
            task = (_caught, (helpers.prepare_image, data, batch.max_pixels))
            result.set(_turn(batch.counted, self._pool.apply, *task))

    def submit(self, uploads, max_pixels, counted):
        batch = _Batch(max_pixels, counted, [gevent.event.AsyncResult() for _ in uploads])
        for data, result in zip(uploads, batch.results, strict=True):
            self._queue.put((batch, data, result))
        return batch


_GONE = object()  # what an image of a request whose client hung up reads as
_LATE = object()  # what an image not prepared by the request's deadline reads as


@dataclass
class _Batch:
    """One request's images in the decoder."""

    max_pixels: int
    counted: BacklogImages  # the admission's count of its images
    results: list
    abandoned: bool = False

    def outcomes(self, until):
        """Each image's pixels, or the exception it raised, in order (_GONE once abandoned); _LATE, and no more,
        when one is not ready by `until` (monotonic)."""
        for result in self.results:
            # wait(), not get(timeout=): a timeout raised here could not be told from the server's safety net's
            result.wait(max(0.0, until - time.monotonic()))
            if not result.ready():
                yield _LATE
                return
            yield result.get()

    def abandon(self):
        """Skip the images not started yet; a reader waiting for one reads _GONE."""
        self.abandoned = True
        for result in self.results:
            if not result.ready():
                result.set(_GONE)


@dataclass
class _Inline:
    """Without gevent (Flask's test client, tests): each image in the caller's thread, when it reads it."""

    uploads: list
    max_pixels: int
    counted: BacklogImages

    @classmethod
    def submit(cls, uploads, max_pixels, counted):
        return cls(uploads, max_pixels, counted)

    def outcomes(self, until):
        for data in self.uploads:
            if time.monotonic() >= until:
                yield _LATE
                return
            yield _turn(self.counted, helpers.prepare_image, data, self.max_pixels)

    def abandon(self):
        pass


def off_the_hub(function, *args):
    """function(*args) in the process's thread for work in C that lets go of the GIL, its exception raised here:
    in the request's greenlet it would stall every other request of the process (inflating a 10 KB gzip body to
    10 MiB takes 30 ms). A thread apart from the decoding threads, whose queue admission counts image by image: a
    stream of such work delays only itself. In the caller's thread where gevent is not running the app."""
    if not monkey.is_module_patched("threading"):
        return function(*args)
    # Caught in the thread: gevent's pool prints the traceback of whatever a task raises, and any client can make
    # an inflate fail.
    outcome = _off_hub_thread().apply(_caught, (function, *args))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


_off_hub_thread = _PerProcess(lambda: gevent.threadpool.ThreadPool(1))
_decoders = _PerProcess(lambda: _Decoder(DECODING_THREADS))


def _decoder():
    return _decoders() if monkey.is_module_patched("threading") else _Inline


def _turn(counted, function, *args):
    """One image's turn in a decoding lane: counted as started, then out of the backlog once done (whatever order,
    even if its request has ended) with its time. Returns function(*args), or the exception it raised."""
    counted.started()
    began = time.monotonic()
    outcome = _caught(function, *args)
    counted.prepared(time.monotonic() - began)
    return outcome


def _caught(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - handed back to the request's greenlet, see prepare and _Decoder
        return exc

"""The web app: an application factory, the routes as one blueprint, and JSON errors for everything.

POST /predict turns an upload into a job on the Redis queue and answers with the worker's result; the
other routes are the upload page, the probes and /metrics. `create_app(config)` builds it, as Flask's
tutorial does; run_web_server.py serves it with gunicorn.
"""

import math
import os
import re
import time
import uuid
from dataclasses import dataclass

import gevent
import gevent.threadpool
import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request
from gevent import monkey
from werkzeug.exceptions import HTTPException

import forms
import helpers
import jobs
import metrics
import redis_client
from admission import Admission, Refusal
from clock import RedisClock
from job_queue import JobQueue, QueueFull
from logger import bind, log
from notifications import ResultWaiter
from settings import Settings
from worker_registration import WorkerRegistry

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Set by the server (run_web_server.py) in the WSGI environ; absent under other hosts and Flask's test client.
ARRIVED = "imgclf.arrived"  # time.monotonic() when the request's connection was accepted or its first byte came
WATCH_DISCONNECT = "imgclf.watch_disconnect"  # watch(callback) -> stop(): callback() once the client hangs up

bp = Blueprint("classifier", __name__)


@dataclass(frozen=True)
class _Service:
    """What the routes share in one app: its settings and its handles on Redis."""

    config: Settings
    queue: JobQueue
    registry: WorkerRegistry
    waiter: ResultWaiter
    clock: RedisClock
    admission: Admission


def create_app(config: Settings, connection: redis.Redis | None = None, waiter: ResultWaiter | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = forms.Request  # multipart uploads split without Werkzeug's per-request regexes, see forms.py
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    connection = connection or redis_client.connect(
        config.redis_url, config.redis_socket_timeout, max_connections=config.web_redis_connections
    )
    queue = JobQueue(connection, config)
    registry = WorkerRegistry(connection, queue, config.heartbeat_ttl)
    app.extensions["image_classifier"] = _Service(
        config,
        queue,
        registry,
        waiter or ResultWaiter(connection, config),
        RedisClock(connection),
        Admission(queue, registry, config.admission_wait_fraction),
    )
    app.register_blueprint(bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _service() -> _Service:
    return current_app.extensions["image_classifier"]


def _error(message, status, **extra):
    return jsonify({"success": False, "error": message, **extra}), status


@bp.before_app_request
def _identify_request():
    g.job_id = uuid.uuid4().hex
    offered = request.headers.get("X-Request-Id")
    g.request_id = offered if offered and _REQUEST_ID.match(offered) else g.job_id
    bind(rid=g.request_id)
    if offered and offered != g.request_id:
        return _error("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", 400)
    return None


@bp.after_app_request
def _return_request_id(response):
    response.headers["X-Request-Id"] = g.get("request_id", "")
    if request.path == "/predict":
        metrics.REQUESTS.labels(str(response.status_code)).inc()
    return response


@bp.get("/")
def upload_page():
    return current_app.send_static_file("index.html")


@bp.get("/health/live")
def live():
    return jsonify({"status": "alive"})


@bp.get("/health/ready")
def ready():
    """Ready when Redis answers, our notification channel holds, and a warmed-up worker beats.

    Anyone may ask, so the answer says only whether, and why not in one line; details go to the log.
    """
    service = _service()
    try:
        service.queue.redis.ping()
        workers = service.registry.workers()
    except redis.RedisError as exc:
        return _not_ready("Redis is unreachable", exc)
    try:
        service.waiter.start(timeout=2.0)
    except redis.RedisError as exc:
        return _not_ready("the result notification channel is not subscribed", exc)
    if not service.waiter.listening():
        return _not_ready("the result notification channel is reconnecting")
    # A heartbeat hash exists only while it is fresh: it expires HEARTBEAT_TTL after the last beat.
    if not any(w.get("ready") == "1" for w in workers):
        return _not_ready("no worker with a loaded model and a fresh heartbeat")
    return jsonify({"status": "ready"})


def _not_ready(reason, exc=None):
    log("not_ready", level="WARNING", reason=reason, error=str(exc) if exc else None)
    return jsonify({"status": "not ready", "reason": reason}), 503


@bp.get("/metrics")
def prometheus_metrics():
    service = _service()
    return metrics.exposition(service.queue, service.registry), 200, {"Content-Type": metrics.CONTENT_TYPE}


def _parse_top_k(raw):
    if raw is None:
        return 5
    if not raw.isdigit() or not 1 <= int(raw) <= jobs.MAX_TOP_K:
        raise ValueError(f"top_k must be an integer from 1 to {jobs.MAX_TOP_K}, got {raw!r}")
    return int(raw)


def _busy(reason, message, retry_after):
    metrics.REJECTED.labels(reason).inc()
    log("request_refused", level="WARNING", reason=reason, error=message, retry_after=retry_after)
    response = _error(f"the service is busy ({message}); retry later", 503, reason=reason)
    response[0].headers["Retry-After"] = str(retry_after)
    return response


@bp.post("/predict")
def predict():
    service = _service()
    config = service.config
    # The request's clock starts when the server first saw it (its connection accepted), not when we got to it.
    started = request.environ.get(ARRIVED) or time.monotonic()
    log("request_received", bytes=request.content_length, top_k=request.args.get("top_k"))
    try:
        top_k = _parse_top_k(request.args.get("top_k"))
    except ValueError as exc:
        return _error(str(exc), 400)
    try:  # before the form is parsed and the image decoded: refusing must cost next to nothing
        service.admission.check(started + config.request_timeout - time.monotonic())
    except Refusal as refusal:
        return _busy(refusal.reason, str(refusal), refusal.retry_after)
    except redis.RedisError as exc:
        log("redis_unavailable", level="ERROR", error=str(exc))
        return _busy("redis_unavailable", "the job queue is unavailable", 1)
    with service.admission.preparation():
        upload = request.files.get("image")
        if upload is None:
            return _error("send the image as a multipart/form-data file field named 'image'", 400)
        try:
            pixels = _prepare(upload.read(), config.max_image_pixels)
        except helpers.ImageError as exc:
            log("image_rejected", level="WARNING", error=str(exc), status=exc.status)
            return _error(str(exc), exc.status)
    try:
        job, result = _queue_and_wait(pixels, top_k, started)
    except QueueFull as exc:
        return _busy("queue_full", str(exc), 1)
    except redis.RedisError as exc:
        log("redis_unavailable", level="ERROR", error=str(exc))
        return _busy("redis_unavailable", "the job queue is unavailable", 1)
    elapsed_ms = (time.monotonic() - started) * 1000
    if result is _GONE:
        log("client_gone", level="WARNING", id=job.id, ms=elapsed_ms)
        return _error("the client went away", 499, id=job.id)  # nginx's code; nobody reads it
    if result is None:
        log("request_timeout", level="WARNING", id=job.id, ms=elapsed_ms)
        return _error(f"no result within {config.request_timeout:g} s", 504, id=job.id)
    if not result["success"]:
        log("job_failed", level="ERROR", id=job.id, error=result["error"], ms=elapsed_ms)
        return _error(result["error"], result.get("status", 500), id=job.id)
    metrics.observe_result(result, elapsed_ms / 1000)
    log("request_done", id=job.id, ms=elapsed_ms, batch_size=result["batch_size"])
    return jsonify(
        {
            "success": True,
            "id": job.id,
            "request_id": job.request_id,
            "model": result["model"],
            "predictions": result["predictions"],
        }
    )


_GONE = object()


# Decoding threads per web process: few, as each may hold a large image's pixels, and never more than the
# cores this process may run on.
_DECODING_THREADS = min(2, len(os.sched_getaffinity(0)))
_decoding_pool = None  # (pid, pool): made in the process that uses it, after gunicorn's fork


def _prepare(data, max_pixels):
    """Decode and resize the upload. Under gevent this runs in a small thread pool of its own: Pillow lets go
    of the GIL while it decodes, so one expensive image (a 40-megapixel PNG costs most of a CPU second) cannot
    stall every other request of the process, and their deadlines, while it is decoded. (Not the hub's pool:
    gevent resolves host names there, and a Redis reconnect must not wait behind decodes.)"""
    global _decoding_pool
    if not monkey.is_module_patched("threading"):
        return helpers.prepare_image(data, max_pixels)
    if _decoding_pool is None or _decoding_pool[0] != os.getpid():
        _decoding_pool = (os.getpid(), gevent.threadpool.ThreadPool(_DECODING_THREADS))
    outcome = _decoding_pool[1].apply(_caught, (helpers.prepare_image, data, max_pixels))
    if isinstance(outcome, BaseException):
        raise outcome  # in this greenlet, where the caller handles it; raised in the pool, gevent prints it
    return outcome


def _caught(function, *args):
    try:
        return function(*args)
    except Exception as exc:  # noqa: BLE001 - handed back to the request's greenlet, see _prepare
        return exc


def _queue_and_wait(pixels, top_k, started):
    """Push the job and wait for its result: (job, result); result None when the deadline passed, _GONE when
    the client hung up. Either way the job is marked cancelled, so that no worker computes it for nobody."""
    service = _service()
    timeout = service.config.request_timeout
    reply_to = service.waiter.start()
    # The job's times are Redis's, which every worker reads too; this host's wall clock plays no part.
    now = service.clock.now()
    deadline = now + timeout - (time.monotonic() - started)
    job = jobs.Job(pixels, deadline, top_k, reply_to, g.request_id, g.job_id, enqueued_at=now)
    with service.waiter.expect(job.id) as pending:
        service.queue.enqueue(jobs.encode_job(job))
        metrics.ADMITTED.inc()
        log("job_queued", id=job.id, top_k=top_k)
        watch = request.environ.get(WATCH_DISCONNECT)
        stop_watching = watch(pending.abandon) if watch else None
        try:
            result = service.waiter.wait(pending, started + timeout)
        finally:
            if stop_watching:
                stop_watching()
        if result is None:
            (metrics.CANCELLED if pending.abandoned else metrics.EXPIRED).inc()
            _cancel(service, job.id)
        return job, (_GONE if result is None and pending.abandoned else result)


def _cancel(service, job_id):
    """Mark the job so that a worker claiming it skips it; the mark outlives any deadline the job could have."""
    try:
        service.queue.redis.set(
            service.queue.keys.cancelled(job_id), "1", ex=math.ceil(service.config.request_timeout) + 60
        )
    except redis.RedisError as exc:  # the worker's own deadline check still drops it once it is late
        log("cancel_failed", level="WARNING", id=job_id, error=str(exc))


def _http_error(exc):
    return _error(exc.description, exc.code)


def _unexpected_error(exc):
    log("unexpected_error", level="ERROR", error=repr(exc))
    return _error("internal server error", 500)

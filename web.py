"""The web app: an application factory, the routes as one blueprint, and JSON errors for everything.

POST /predict turns uploads into jobs on the Redis queue and answers with the workers' results; POST /jobs
queues them and answers at once, GET /jobs/<id> collects; the other routes are the upload page, the probes
and /metrics. The Open Inference Protocol's /v2 routes are v2.py's blueprint, registered here.
`create_app(config)` builds it, as Flask's tutorial does; run_web_server.py serves it with gunicorn.
"""

import math
import re
import threading
import time
import uuid
from urllib.parse import parse_qs

import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

import forms
import jobs
import metrics
import readiness
import redis_client
import submission
import v2
from admission import Admission
from clock import RedisClock
from job_queue import JobQueue
from logger import bind, log
from notifications import ResultWaiter
from settings import Settings
from submission import Refused
from worker_registration import WorkerRegistry

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # with fullmatch: "$" lets a trailing newline through
# ASCII digits only: int() and float() also take "٣", "1_0" and " 5 ", and str.isdigit() takes "²", which int() refuses.
# A client may send its remaining time as a float's full text ("2.4999871253967285").
_TOP_K = re.compile(r"[0-9]{1,9}")
_SECONDS = re.compile(r"[0-9]{1,20}(\.[0-9]{0,40})?|\.[0-9]{1,40}")

bp = Blueprint("classifier", __name__)


def create_app(config: Settings, connection: redis.Redis | None = None, waiter: ResultWaiter | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = forms.Request  # multipart uploads split without Werkzeug's per-request regexes, see forms.py
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    connection = connection or redis_client.connect(
        config.redis_url, config.redis_socket_timeout, max_connections=config.web_redis_connections
    )
    queue = JobQueue(connection, config)
    registry = WorkerRegistry(connection, queue, config.heartbeat_ttl)
    app.extensions["image_classifier"] = submission.Service(
        config,
        queue,
        registry,
        waiter or ResultWaiter(connection, config),
        RedisClock(connection),
        Admission(
            queue, registry, config.admission_wait_fraction, submission.DECODING_THREADS, background=_in_background
        ),
    )
    app.register_blueprint(bp)
    app.register_blueprint(v2.bp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.wsgi_app = _RefuseEarly(app, app.wsgi_app)
    return app


def _in_background(function):
    # A greenlet under gunicorn's gevent worker, which patches threading, as notifications.py's listener is.
    threading.Thread(target=function, name="backlog-recorder", daemon=True).start()


class _RefuseEarly:
    """WSGI middleware: while admission would refuse even the smallest request (one image) with the longest
    deadline (REQUEST_TIMEOUT), a POST /predict gets that 503 before Flask, its form parser and the route run.

    Under overload most requests are refusals. Through the whole stack each cost the web process 1.1-1.2 ms of
    CPU (castle uploads, one process on the Intel Xeon); at three times the capacity that was about half of what
    the process got of the two cores, so the images already admitted were prepared 2-3x slower than while
    nothing was refused, which is when the admission had measured them, and some of them missed their deadline.

    For a one-image upload the answer is the route's own: same status, body, Retry-After, X-Request-Id, log lines
    and counts. A request of several images would be refused too, but the route would say so with its own count
    (a longer Retry-After, or queue_full where this says expected_wait); a malformed one, or one with more images
    than a request may carry, gets the 503 first and its 400 or 413 once it is admitted. A request the route may
    answer otherwise goes to it: one with a `timeout` of its own (its deadline may be spent: 504), a declared body
    over MAX_UPLOAD_BYTES (413), a bad X-Request-Id (400), and any request while the admission cannot tell (a
    Redis error, which the route then answers without asking Redis again)."""

    def __init__(self, app: Flask, wsgi_app) -> None:
        self.app, self.wsgi_app = app, wsgi_app

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") != "/predict":
            return self.wsgi_app(environ, start_response)
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        declared = environ.get("CONTENT_LENGTH", "")
        length = int(declared) if declared.isdigit() else None
        refusal = self._refusal(environ, query, length)
        rid = refusal and _request_id(environ.get("HTTP_X_REQUEST_ID"))  # None for a bad one: the route's 400
        if not rid:
            return self.wsgi_app(environ, start_response)
        bind(rid=rid)
        log("request_received", bytes=length, top_k=query.get("top_k", [None])[0])
        refused = submission.busy(refusal)
        count_answer("classifier.predict", "POST", refused.status)
        response = self.app.json.response(_error_body(refused.message, reason=refused.reason))
        response.status_code = refused.status
        response.headers["Retry-After"] = str(refused.retry_after)
        response.headers["X-Request-Id"] = rid
        return response(environ, start_response)

    def _refusal(self, environ, query, length):
        """The admission's refusal of this /predict when it is one this answers, else None."""
        svc = self.app.extensions["image_classifier"]
        if "timeout" in query or (length is not None and length > svc.config.max_upload_bytes):
            return None
        arrived = environ.setdefault(submission.ARRIVED, time.monotonic())
        try:
            refusal = svc.admission.refuses(svc.config.request_timeout - (time.monotonic() - arrived))
        except redis.RedisError as exc:
            environ[submission.REDIS_FAILED] = exc
            return None
        except Exception:  # noqa: BLE001 - the route meets it again, and answers it as it answers any error
            return None
        return refusal if refusal and refusal.reason != "deadline" else None


def _error(message, status, **extra):
    return jsonify(_error_body(message, **extra)), status


def _error_body(message, **extra):
    return {"success": False, "error": message, **extra}


def _request_id(offered, job_id=None):
    """The request's id: the client's X-Request-Id, or `job_id` (a new one by default) when it sent none; None when
    the one it sent is not a valid id."""
    if not offered:
        return job_id or uuid.uuid4().hex
    return offered if _REQUEST_ID.fullmatch(offered) else None


@bp.before_app_request
def _identify_request():
    g.job_id = uuid.uuid4().hex
    valid = _request_id(request.headers.get("X-Request-Id"), g.job_id)
    g.request_id = valid or g.job_id
    bind(rid=g.request_id)
    if valid is None:
        return _error("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", 400)
    return None


# The routes that classify, as imgclf_requests_total names them. Only their POSTs are counted: not probes,
# metadata, a job's status polls, OPTIONS, nor a GET that is answered 405.
_COUNTED = {"classifier.predict": "predict", "classifier.submit_jobs": "jobs", "open_inference.infer": "v2_infer"}


def count_answer(endpoint, method, status):
    """Count one answer in imgclf_requests_total if it answers a classification request."""
    if method == "POST" and endpoint in _COUNTED:
        metrics.REQUESTS.labels(str(status), _COUNTED[endpoint]).inc()


def count_server_answer(app, environ, status):
    """count_answer for an answer the server gives without the app (run_web_server's 408 and 504)."""
    try:
        endpoint, _ = app.url_map.bind("").match(environ.get("PATH_INFO", ""), method="POST")
    except HTTPException:
        return
    count_answer(endpoint, environ.get("REQUEST_METHOD"), status)


@bp.after_app_request
def _return_request_id(response):
    response.headers["X-Request-Id"] = g.get("request_id", "")
    count_answer(request.endpoint, request.method, response.status_code)
    return response


@bp.get("/")
def upload_page():
    return current_app.send_static_file("index.html")


@bp.get("/health/live")
def live():
    return jsonify({"status": "alive"})


@bp.get("/health/ready")
def ready():
    """Anyone may ask, so the answer says only whether, and why not in one line; details go to the log."""
    reason = readiness.problem(submission.service())
    if reason:
        return jsonify({"status": "not ready", "reason": reason}), 503
    return jsonify({"status": "ready"})


@bp.get("/metrics")
def prometheus_metrics():
    service = submission.service()
    return metrics.exposition(service.queue, service.registry), 200, {"Content-Type": metrics.CONTENT_TYPE}


def _parse_top_k(raw):
    if raw is None:
        return 5
    if not _TOP_K.fullmatch(raw) or not 1 <= int(raw) <= jobs.MAX_TOP_K:
        raise ValueError(f"top_k must be an integer from 1 to {jobs.MAX_TOP_K}, got {raw!r}")
    return int(raw)


def _parse_timeout(raw):
    """/predict's `timeout`: seconds, a number above 0; None when not given."""
    if raw is None:
        return None
    seconds = float(raw) if _SECONDS.fullmatch(raw) else math.nan
    if not seconds > 0:
        raise ValueError(f"timeout must be a number of seconds above 0, got {raw!r}")
    return seconds


def _refused(refused: Refused):
    extra = {"reason": refused.reason} if refused.reason else {}
    if len(refused.job_ids) == 1:
        extra["id"] = refused.job_ids[0]
    elif refused.job_ids:
        extra["ids"] = refused.job_ids
    response = _error(refused.message, refused.status, **extra)
    if refused.retry_after:
        response[0].headers["Retry-After"] = str(refused.retry_after)
    return response


def _uploads(budget=None):
    """The request's images, decoded, and its top_k (the checks that need no Redis come first). A waited-for
    request (no `budget`) may have a `timeout` of its own; an async one may not."""
    log("request_received", bytes=request.content_length, top_k=request.args.get("top_k"))
    try:
        top_k = _parse_top_k(request.args.get("top_k"))
        timeout = _parse_timeout(request.args.get("timeout"))
    except ValueError as exc:
        raise Refused(400, str(exc)) from None
    if budget is not None and timeout is not None:
        raise Refused(400, "timeout is for a request that waits for its answer; an async job's is JOB_RESULT_TTL")
    submission.limit_time(timeout)
    # The form is split before admission (the body is in memory already, and splitting it costs little), so that
    # admission counts the images it holds; decoding them is what costs, and comes after.
    images = _form_images()
    submission.admit(len(images), budget=budget)
    pixels = submission.prepare(images)
    request.release_body()
    return pixels, top_k


def _form_images():
    files = request.files.getlist("image")
    if not files:
        raise Refused(400, "send the image as a multipart/form-data file field named 'image'")
    return [upload.read() for upload in files]


@bp.post("/predict")
def predict():
    """One image: the original answer. Several `image` fields: {"success", "results": [one answer each]}."""
    try:
        pixels, top_k = _uploads()
        results = submission.classify(pixels, top_k)
    except Refused as refused:
        return _refused(refused)
    elapsed = time.monotonic() - submission.started()
    for result in results:
        if result["success"]:
            metrics.observe_result(result, elapsed)
    log("request_done", ids=",".join(r["id"] for r in results), ms=elapsed * 1000, images=len(results))
    if len(results) > 1:
        answers = [submission.answer(result) for result in results]
        return jsonify({"success": all(a["success"] for a in answers), "request_id": g.request_id, "results": answers})
    if not results[0]["success"]:
        log("job_failed", level="ERROR", id=results[0]["id"], error=results[0]["error"])
    return _answer(results[0])


def _answer(result):
    """One worker result as /predict has always answered it: its body, or its error with the error's status."""
    if not result["success"]:
        return _error(result["error"], result.get("status", 500), id=result["id"])
    return jsonify(submission.answer(result))


@bp.post("/jobs")
def submit_jobs():
    """/predict's form, answered at once: 202 {"id", "status_url"} and a Location header; with several images,
    {"jobs": [{"id", "status_url"}, ...]} in their order. Admitted when the expected wait fits within
    JOB_RESULT_TTL (a job not started by then is answered 504)."""
    try:
        pixels, top_k = _uploads(budget=submission.service().config.job_result_ttl)
        ids = submission.detach(pixels, top_k)
    except Refused as refused:
        return _refused(refused)
    described = [{"id": job_id, "status_url": url_for("classifier.job_status", job_id=job_id)} for job_id in ids]
    log("jobs_submitted", ids=",".join(ids))
    body = described[0] if len(described) == 1 else {"jobs": described}
    return jsonify(body), 202, {"Location": described[0]["status_url"]}


@bp.get("/jobs/<job_id>")
def job_status(job_id):
    """202 {"id", "status": "queued" | "running"} while pending; once done, /predict's body, or its error with
    the error's status; 404 for an id that is unknown or whose result expired. A job still queued past its
    deadline is answered 504 here, as the worker that claims it later would (found by review: with no worker,
    it said queued past its deadline, then 404 once its status expired).

    Nothing about a job lives in a web process: any web process answers for it, after a restart too."""
    svc = submission.service()
    if not jobs.is_job_id(job_id):
        return _error("no such job", 404)
    late = jobs.encode_result(jobs.error_result(job_id, jobs.LATE, 504))
    try:
        raw_result, state = svc.queue.job_status(job_id, late, svc.config.job_result_ttl)
    except redis.RedisError as exc:
        log("redis_unavailable", level="ERROR", error=str(exc))
        return _refused(Refused(503, "the job store is unavailable; retry later", "redis_unavailable", 1))
    if raw_result is not None:
        return _answer(jobs.decode_result(raw_result))
    if state is None:
        return _error("no such job (unknown, or its result expired)", 404)
    return jsonify({"id": job_id, "status": state}), 202


def _http_error(exc):
    return _error(exc.description, exc.code)


def _unexpected_error(exc):
    log("unexpected_error", level="ERROR", error=repr(exc))
    return _error("internal server error", 500)

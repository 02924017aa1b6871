"""The web server: accepts an image on POST /predict, queues a job in Redis and answers with its result.

`python run_web_server.py` serves with gunicorn (threads) on HOST:PORT; `run_web_server:app` is the WSGI
app for any other host.
"""
import os
import re
import time
import uuid

import redis
from flask import Flask, g, jsonify, request
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import HTTPException

import helpers
import jobs
import metrics
import redis_client
import settings
from job_queue import JobQueue, QueueFull
from keys import Keys
from logger import bind, log
from notifications import ResultWaiter
from worker_registration import WorkerRegistry


def _error(message, status, **extra):
    return jsonify({"success": False, "error": message, **extra}), status


def _parse_top_k(raw):
    if raw is None:
        return 5
    if not raw.isdigit() or not 1 <= int(raw) <= jobs.MAX_TOP_K:
        raise ValueError(f"top_k must be an integer from 1 to {jobs.MAX_TOP_K}, got {raw!r}")
    return int(raw)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(connection=None, keys=None, waiter=None):
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    connection = connection or redis_client.connect(max_connections=settings.WEB_REDIS_CONNECTIONS)
    keys = keys or Keys()
    queue = JobQueue(connection, keys)
    registry = WorkerRegistry(connection, queue)
    waiter = waiter or ResultWaiter(connection, keys)

    @app.before_request
    def identify_request():
        g.job_id = uuid.uuid4().hex
        offered = request.headers.get("X-Request-Id")
        g.request_id = offered if offered and _REQUEST_ID.match(offered) else g.job_id
        bind(rid=g.request_id)
        if offered and offered != g.request_id:
            return _error("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", 400)
        return None

    @app.after_request
    def return_request_id(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if request.path == "/predict":
            metrics.REQUESTS.labels(str(response.status_code)).inc()
        return response

    @app.get("/")
    def upload_page():
        return app.send_static_file("index.html")

    @app.get("/health/live")
    def live():
        return jsonify({"status": "alive"})

    @app.get("/health/ready")
    def ready():
        """Ready when Redis answers, our notification channel holds, and a warmed-up worker beats."""
        try:
            connection.ping()
            waiter.start(timeout=2.0)
            workers = registry.workers()
        except redis.RedisError as exc:
            return jsonify({"status": "not ready", "reason": f"Redis: {exc}"}), 503
        # A heartbeat hash exists only while it is fresh: it expires HEARTBEAT_TTL after the last beat.
        fresh = [w for w in workers if w.get("ready") == "1"]
        if not fresh:
            return jsonify({"status": "not ready", "reason": "no worker with a loaded model and a fresh heartbeat",
                            "workers": workers}), 503
        return jsonify({"status": "ready", "workers": fresh, "queue_depth": queue.length()})

    @app.get("/metrics")
    def prometheus_metrics():
        return metrics.exposition(queue, registry), 200, {"Content-Type": metrics.CONTENT_TYPE}

    @app.post("/predict")
    def predict():
        received = time.time()
        log("request_received", bytes=request.content_length, top_k=request.args.get("top_k"))
        try:
            top_k = _parse_top_k(request.args.get("top_k"))
        except ValueError as exc:
            return _error(str(exc), 400)
        upload = request.files.get("image")
        if upload is None:
            return _error("send the image as a multipart/form-data file field named 'image'", 400)
        try:
            pixels = helpers.prepare_image(upload.read(), settings.MAX_IMAGE_PIXELS)
        except helpers.ImageError as exc:
            log("image_rejected", level="WARNING", error=str(exc), status=exc.status)
            return _error(str(exc), exc.status)
        try:
            reply_to = waiter.start()
            job = jobs.Job(pixels, received + settings.REQUEST_TIMEOUT, top_k, reply_to, g.request_id, g.job_id)
            with waiter.expect(job.id) as pending:
                queue.enqueue(jobs.encode_job(job), settings.MAX_QUEUE_LENGTH)
                log("job_queued", id=job.id, top_k=top_k)
                result = waiter.wait(pending, job.deadline)
        except QueueFull as exc:
            log("queue_full", level="WARNING", error=str(exc))
            response = _error(f"the service is busy ({exc}); retry later", 503)
            response[0].headers["Retry-After"] = "1"
            return response
        except redis.RedisError as exc:
            log("redis_unavailable", level="ERROR", error=str(exc))
            return _error("the job queue is unavailable; retry later", 503)
        elapsed_ms = (time.time() - received) * 1000
        if result is None:
            log("request_timeout", level="WARNING", id=job.id, ms=elapsed_ms)
            return _error(f"no result within {settings.REQUEST_TIMEOUT:g} s", 504, id=job.id)
        if not result["success"]:
            log("job_failed", level="ERROR", id=job.id, error=result["error"], ms=elapsed_ms)
            return _error(result["error"], result.get("status", 500), id=job.id)
        metrics.observe_result(result, elapsed_ms / 1000)
        log("request_done", id=job.id, ms=elapsed_ms, batch_size=result["batch_size"])
        return jsonify({"success": True, "id": job.id, "request_id": job.request_id, "model": result["model"],
                        "predictions": result["predictions"]})

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return _error(exc.description, exc.code)

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log("unexpected_error", level="ERROR", error=repr(exc))
        return _error("internal server error", 500)

    return app


app = create_app()


class _GracefulThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, but once it is stopping, new connections are refused at once.

    The stock worker only stops accepting: its copy of the listening socket stays open until the last
    waiting request is answered, so a new client would hang in the backlog instead of going elsewhere.
    """

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()


def main():
    class _Server(BaseApplication):
        def load_config(self):
            for key, value in {
                "bind": f"{settings.HOST}:{settings.PORT}",
                "workers": settings.WEB_PROCESSES,
                "worker_class": _GracefulThreadWorker,
                "threads": settings.WEB_THREADS,
                # A stopping worker lets its waiting requests finish: they end by REQUEST_TIMEOUT at the latest.
                "graceful_timeout": int(settings.REQUEST_TIMEOUT) + 5,
                "timeout": max(60, int(settings.REQUEST_TIMEOUT) * 2),
                "accesslog": None,
            }.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    if settings.WEB_NICE:
        os.nice(settings.WEB_NICE)
    log("web_starting", bind=f"{settings.HOST}:{settings.PORT}", processes=settings.WEB_PROCESSES,
        threads=settings.WEB_THREADS, wait_mode=settings.WAIT_MODE, nice=settings.WEB_NICE,
        redis=redis_client.describe())
    _Server().run()


if __name__ == "__main__":
    main()

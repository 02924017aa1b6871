"""The Open Inference Protocol (KServe V2) over REST, beside /predict: the same queue, workers, limits and errors.

GET /v2 (server metadata), /v2/health/live, /v2/health/ready, /v2/models/<name> (model metadata),
/v2/models/<name>/ready, POST /v2/models/<name>/infer; each model route also as
/v2/models/<name>/versions/1/... . The wire format is open_inference.py's; admission, decoding, queueing and
waiting are submission.py's, as for every protocol. Errors are the protocol's {"error": "..."}.
"""

import dataclasses
import math

import numpy as np
from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, NotFound

import catalog
import open_inference
import readiness
import submission
from open_inference import HEADER_LENGTH, ProtocolError
from submission import Refused

VERSION = "1"  # each model has one version: the weights its workers loaded
SERVER = {
    "name": "image-classifier",
    "version": "1",
    "extensions": ["binary_tensor_data", "classification", "schedule_policy"],
}
LABELS = catalog.load_labels()

bp = Blueprint("open_inference", __name__, url_prefix="/v2")


def _model_route(suffix, **options):
    """Register a model route with and without the protocol's optional /versions/<version> segment."""

    def register(view):
        bp.add_url_rule(f"/models/<name>{suffix}", view_func=view, **options)
        bp.add_url_rule(f"/models/<name>/versions/<version>{suffix}", view_func=view, **options)
        return view

    return register


def _error(message, status, retry_after=None):
    response = jsonify({"error": message})
    response.status_code = status
    if retry_after:
        response.headers["Retry-After"] = str(retry_after)
    return response


@bp.errorhandler(HTTPException)
def _http_error(exc):
    return _error(exc.description, exc.code)


def _known(name, version):
    if name not in catalog.MODELS:
        raise NotFound(f"unknown model {name!r}; this server has {', '.join(catalog.MODELS)}")
    if version not in (None, VERSION):
        raise NotFound(f"model {name!r} has no version {version!r}; its one version is {VERSION!r}")


@bp.get("")
def server_metadata():
    return jsonify(SERVER)


@bp.get("/health/live")
def live():
    return jsonify({"live": True})


@bp.get("/health/ready")
def ready():
    return _probe(readiness.problem(submission.service()))


@_model_route("")
def model_metadata(name, version=None):
    _known(name, version)
    return jsonify(open_inference.model_metadata(name, len(LABELS)))


@_model_route("/ready")
def model_ready(name, version=None):
    _known(name, version)
    return _probe(readiness.problem(submission.service(), name), name=name)


def _probe(reason, **body):
    """A readiness answer: 200, or 503 saying why not."""
    return jsonify({**body, "ready": reason is None, **({"reason": reason} if reason else {})}), 503 if reason else 200


@_model_route("/infer", methods=["POST"])
def infer(name, version=None):
    _known(name, version)
    try:
        config = submission.service().config
        encoding = request.headers.get("Content-Encoding")
        body = request.get_data()
        if encoding:
            body = submission.off_the_hub(open_inference.inflate, body, encoding, config.max_upload_bytes)
        inference = open_inference.parse_request(
            body,
            request.headers.get(HEADER_LENGTH),
            len(LABELS),
            config.max_images_per_request,
        )
    except ProtocolError as exc:
        return _error(str(exc), exc.status)
    try:
        submission.limit_time(inference.timeout)  # first: the server's safety net keeps it from here on
        _check_ready(name)
        # The body is read and parsed already (that costs little); admission counts its images before any
        # is decoded, which is what costs.
        submission.admit(len(inference.images))
        pixels = submission.prepare(inference.images)
        # The answer may take the whole deadline, and nothing of the request's bytes is needed for it: a 10 KB gzip
        # body inflates to up to MAX_UPLOAD_BYTES, 20 MiB held with its images' copies until the answer came.
        del body
        inference = dataclasses.replace(inference, images=[])
        request.release_body()
        # The classification is made here, from all the probabilities: it needs the classes' indices, which
        # the worker's labelled top k does not give (ImageNet has two "crane"s). So top_k is the least.
        results = submission.classify(pixels, top_k=1, probabilities=True)
    except Refused as refused:
        return _error(refused.message, refused.status, refused.retry_after)
    failed = next((result for result in results if not result["success"]), None)
    if failed:
        return _error(failed["error"], failed.get("status", 500))
    served = {result["model"] for result in results}
    if served != {name}:
        # The queue does not route by model: with workers of several models on one IMAGE_QUEUE, any may answer.
        return _error(f"{name} was asked for but {', '.join(sorted(served))} answered: run one model per queue", 500)
    body, headers = open_inference.encode_response(
        name,
        inference.id if inference.id is not None else g.request_id,
        inference.output,
        np.stack([result["probabilities"] for result in results]),
        LABELS,
    )
    return Response(body, headers=headers)


def _check_ready(name):
    """Refuse at once (503) a request for a model that no live worker serves: nothing would answer it. The
    workers are those admission read at most a second ago (the probes read them afresh, with readiness)."""
    service = submission.service()
    with submission.redis_or_busy():
        served = service.admission.models()
    if name not in served:
        # A worker that comes up is seen at its first heartbeat.
        reason = f"no worker with {name} loaded and a fresh heartbeat"
        raise Refused(
            503, f"model {name} is not ready: {reason}", retry_after=math.ceil(service.config.heartbeat_interval)
        )

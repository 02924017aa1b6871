"""The shapes that travel through Redis: a job (web -> worker) and a result (worker -> web), as JSON.

Pixels travel as base64 of raw uint8 RGB (147 KiB of pixels, 196 KiB of base64 per job, a quarter of the
original float32 payload);
the model-specific normalisation happens on the worker.
"""

import base64
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

IMAGE_SHAPE = (224, 224, 3)
MAX_TOP_K = 20
# Far above any MAX_ATTEMPTS; a larger count in a job is corruption, not history.
MAX_ATTEMPTS_RECORDED = 1000
_IMAGE_BYTES = math.prod(IMAGE_SHAPE)
_IMAGE_B64_LENGTH = 4 * math.ceil(_IMAGE_BYTES / 3)
_ID = re.compile(r"^[0-9a-f]{32}$")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")  # request ids, reply channels, worker names: safe in logs and keys


class JobError(ValueError):
    """A job on the queue that cannot be processed; `job_id` is set when the requester can be told."""

    def __init__(self, message, job_id=None, reply_to=None):
        super().__init__(message)
        self.job_id, self.reply_to = job_id, reply_to


@dataclass
class Job:
    pixels: np.ndarray
    deadline: float
    top_k: int = 5
    reply_to: str | None = None
    request_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)
    attempts: int = 0

    def __post_init__(self):
        self.request_id = self.request_id or self.id


class Reply(NamedTuple):
    """What a worker stores for one job and where it announces it."""

    job_id: str
    reply_to: str | None  # the web process's notification channel, None when nobody listens
    payload: str  # the result JSON

    @classmethod
    def of(cls, job_id: str, reply_to: str | None, result: dict) -> "Reply":
        return cls(job_id, reply_to, encode_result(result))


def encode_job(job: Job) -> str:
    return json.dumps(
        {
            "id": job.id,
            "request_id": job.request_id,
            "image": base64.b64encode(np.ascontiguousarray(job.pixels, dtype=np.uint8)).decode("ascii"),
            "shape": list(job.pixels.shape),
            "dtype": "uint8",
            "top_k": job.top_k,
            "deadline": job.deadline,
            "enqueued_at": job.enqueued_at,
            "reply_to": job.reply_to,
            "attempts": job.attempts,
        }
    )


def decode_job(raw: bytes | str) -> Job:
    """Parse and validate a job from the queue; raises JobError (and nothing else) saying what is wrong.

    Anything may have been written into the queue, so every field is checked for type and range, and the
    image's size before it is decoded.
    """
    try:
        data = json.loads(raw)
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise JobError(f"job is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise JobError("job is not a JSON object")
    job_id, reply_to = data.get("id"), data.get("reply_to")
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise JobError("job has no valid id")
    if not isinstance(reply_to, str) or not SAFE_NAME.match(reply_to):
        reply_to = None  # nowhere safe to announce it; the requester still finds the result by polling

    def fail(message):
        return JobError(message, job_id, reply_to)

    if data.get("shape") != list(IMAGE_SHAPE):
        raise fail(f"job image shape must be {list(IMAGE_SHAPE)}")
    if data.get("dtype") != "uint8":
        raise fail("job image dtype must be uint8")
    image = data.get("image")
    if not isinstance(image, str) or len(image) != _IMAGE_B64_LENGTH:
        raise fail(f"job image must be {_IMAGE_B64_LENGTH} characters of base64")
    try:
        pixels = np.frombuffer(base64.b64decode(image, validate=True), dtype=np.uint8)
    except ValueError:
        raise fail("job image is not valid base64") from None
    if pixels.size != _IMAGE_BYTES:
        raise fail(f"job image has {pixels.size} bytes, expected {_IMAGE_BYTES}")
    top_k, attempts = data.get("top_k"), data.get("attempts", 0)
    if not _is_int(top_k) or not 1 <= top_k <= MAX_TOP_K:
        raise fail(f"job top_k must be an integer from 1 to {MAX_TOP_K}")
    if not _is_int(attempts) or not 0 <= attempts <= MAX_ATTEMPTS_RECORDED:
        raise fail(f"job attempts must be an integer from 0 to {MAX_ATTEMPTS_RECORDED}")
    for name in ("deadline", "enqueued_at"):
        value = data.get(name)
        if not _is_number(value):
            raise fail(f"job {name} must be a finite number of seconds")
    request_id = data.get("request_id", job_id)
    if not isinstance(request_id, str) or not SAFE_NAME.match(request_id):
        raise fail("job request_id must be 1-200 characters of A-Z a-z 0-9 . _ : -")
    return Job(
        pixels=pixels.reshape(IMAGE_SHAPE),
        deadline=float(data["deadline"]),
        top_k=top_k,
        reply_to=reply_to,
        request_id=request_id,
        id=job_id,
        enqueued_at=float(data["enqueued_at"]),
        attempts=attempts,
    )


def _is_int(value):
    return type(value) is int  # not bool, not float


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


def success_result(
    job: Job, predictions: list, model: str, batch_size: int, inference_ms: float, queue_ms: float
) -> dict:
    return {
        "id": job.id,
        "success": True,
        "model": model,
        "predictions": predictions,
        "batch_size": batch_size,
        "inference_ms": round(inference_ms, 2),
        "queue_ms": round(queue_ms, 2),
    }


def error_result(job_id: str, error: str, status: int) -> dict:
    """`status` is the HTTP status the web server answers with."""
    return {"id": job_id, "success": False, "error": error, "status": status}


def encode_result(result: dict) -> str:
    return json.dumps(result)


def decode_result(raw: bytes | str) -> dict:
    return json.loads(raw)


def address(raw: bytes | str) -> tuple[str | None, str | None]:
    """(job id, reply channel) of a raw job, or (None, None) when it has no valid id."""
    try:
        job = decode_job(raw)
    except JobError as exc:
        return exc.job_id, exc.reply_to
    return job.id, job.reply_to


class DeadLetter(NamedTuple):
    """One entry of the dead-letter list (`Keys.dead`), read back.

    The writers, job_queue's finish.lua (jobs the worker found malformed) and requeue.lua (jobs out of
    attempts), RPUSH the JSON envelope {"reason": why it was given up, "dead_at": Redis's clock, unix seconds,
    "job": the raw job string exactly as it was claimed}. Entries written before the envelope existed (the bare
    raw job) and garbage still read back, with `reason` None.
    """

    raw: str  # the raw job (the whole entry when it is not an envelope), undecodable bytes kept as surrogates
    reason: str | None
    dead_at: float | None
    job: dict | None  # the raw job parsed, None when it is not a JSON object

    @property
    def id(self) -> str | None:
        job_id = (self.job or {}).get("id")
        return job_id if isinstance(job_id, str) and _ID.match(job_id) else None

    def raw_bytes(self) -> bytes:
        return self.raw.encode("utf-8", "surrogateescape")


def decode_dead_letter(entry: bytes | str) -> DeadLetter:
    """Never raises: whatever the dead-letter list holds is listed."""
    text = entry.decode("utf-8", "surrogateescape") if isinstance(entry, bytes) else entry
    envelope = _json_object(text)
    if envelope is not None and isinstance(envelope.get("job"), str):
        reason, dead_at = envelope.get("reason"), envelope.get("dead_at")
        raw = envelope["job"]
        return DeadLetter(
            raw,
            reason if isinstance(reason, str) else None,
            float(dead_at) if isinstance(dead_at, (int, float)) else None,
            _json_object(raw),
        )
    return DeadLetter(text, None, None, envelope)


def _json_object(text):
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None

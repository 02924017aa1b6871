"""The shapes that travel through Redis: a job (web -> worker) and a result (worker -> web).

A job is two values. Its header, a small JSON object (id, deadline, attempts, ...), is what the queue, the
processing lists and the dead letters hold, and all the Lua scripts ever read or rewrite. Its pixels, raw
uint8 RGB, 224x224x3 = 147 KiB, sit in a key of their own (Keys.pixels), written by the web server beside
the push and read by the worker that runs the job: a Lua script costs Redis time for every byte of its
arguments and replies, so the pixels never pass through one on the way to an answer. The model-specific
normalisation happens on the worker. A result is JSON.
"""

import base64
import dataclasses
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
MAX_RESULT_TTL = 10**7  # seconds; settings.py keeps RESULT_TTL and JOB_RESULT_TTL below it
_IMAGE_BYTES = math.prod(IMAGE_SHAPE)
# Used with fullmatch: "$" would let a trailing newline through.
_ID = re.compile(r"[0-9a-f]{32}")
SAFE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,200}")  # request ids, reply channels, worker names: safe in logs and keys


class JobError(ValueError):
    """A job on the queue that cannot be processed; `job_id` is set when the requester can be told."""

    def __init__(self, message, job_id=None, reply_to=None):
        super().__init__(message)
        self.job_id, self.reply_to = job_id, reply_to


@dataclass
class Job:
    pixels: np.ndarray | None  # None in a job read from the queue until the worker has loaded its pixels
    deadline: float
    top_k: int = 5
    reply_to: str | None = None
    request_id: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued_at: float = field(default_factory=time.time)
    attempts: int = 0
    # The result also carries all class probabilities (the Open Inference Protocol's FP32 output).
    probabilities: bool = False
    # Seconds the result is kept; 0: with a reply_to, until the request's deadline and a grace
    # (job_queue.result_grace), at most RESULT_TTL; without, RESULT_TTL. Set for async jobs (/jobs), whose
    # requester reads the result whenever it likes and learns the job's fate from the result key alone.
    result_ttl: int = 0
    # The web process that waits can take the result from its notification (jobs.parse_notification); a job
    # without it gets the bare id, which web processes of earlier versions expect.
    notify_result: bool = False

    def __post_init__(self):
        self.request_id = self.request_id or self.id


class Reply(NamedTuple):
    """What a worker stores for one job and where it announces it."""

    job_id: str
    reply_to: str | None  # the web process's notification channel, None when nobody listens
    payload: str  # the result JSON
    ttl: int = 0  # seconds the result is kept; 0: the queue's RESULT_TTL
    with_result: bool = False  # the notification carries the result (the job's notify_result)

    @classmethod
    def of(cls, job_id: str, reply_to: str | None, result: dict, ttl: int = 0, with_result: bool = False) -> "Reply":
        # Capped: a TTL Redis refuses ("invalid expire time": a deadline of 1e16 in a job that was put on the queue
        # by hand) failed finish.lua after it had acknowledged the batch, and every later reply of it was lost.
        return cls(job_id, reply_to, encode_result(result), min(ttl, MAX_RESULT_TTL), with_result)


class EncodedJob(NamedTuple):
    """A job as the web server writes it: the queue's value, and the value of its pixels' key."""

    id: str
    deadline: float  # Redis's clock: the pixels' key expires a grace period after it (JobQueue.enqueue)
    header: bytes
    pixels: bytes


def encode_job(job: Job) -> EncodedJob:
    pixels = np.ascontiguousarray(job.pixels, dtype=np.uint8).tobytes()
    return EncodedJob(job.id, job.deadline, encode_header(job), pixels)


def encode_header(job: Job) -> bytes:
    """The job as the queue holds it (a retried job goes back as this, its pixels left in their key)."""
    header = {
        "id": job.id,
        "request_id": job.request_id,
        "shape": list(IMAGE_SHAPE),
        "dtype": "uint8",
        "top_k": job.top_k,
        "deadline": job.deadline,
        "enqueued_at": job.enqueued_at,
        "reply_to": job.reply_to,
        "attempts": job.attempts,
    }
    if job.probabilities:
        header["probabilities"] = True
    if job.result_ttl:
        header["result_ttl"] = job.result_ttl
    if job.notify_result:
        header["notify_result"] = True
    return json.dumps(header).encode()


def header_of(raw: bytes | str) -> dict | None:
    """The JSON object a raw job holds, or None when it holds none; never raises."""
    try:
        # strict=False: raw control characters inside strings, which the Lua scripts' cjson reads too; otherwise a
        # header the scripts claimed, counted and buried would be nameless here (no id to answer or requeue by).
        header = json.loads(raw, strict=False)
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return header if isinstance(header, dict) else None


def _scripts_read(raw: bytes | str, header: dict) -> bool:
    """Whether the Lua scripts' cjson reads `raw` as json.loads read it into `header`: cjson takes UTF-8 alone,
    without a byte order mark (json.loads also takes UTF-16 and UTF-32, and one, by the same rule as
    json.detect_encoding), and refuses a lone surrogate escape."""
    if isinstance(raw, bytes) and json.detect_encoding(raw) != "utf-8":
        return False
    try:
        json.dumps(header, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def decode_job(raw: bytes | str) -> Job:
    """Parse and validate a job's header from the queue, pixels not yet loaded (`with_pixels`); raises
    JobError (and nothing else) saying what is wrong.

    Anything may have been written into the queue, so every field is checked for type and range.
    """
    data = header_of(raw)
    if data is None:
        raise JobError("job is not a JSON object")
    job_id, reply_to = data.get("id"), data.get("reply_to")
    if not isinstance(job_id, str) or not is_job_id(job_id):
        raise JobError("job has no valid id")
    if not isinstance(reply_to, str) or not SAFE_NAME.fullmatch(reply_to):
        reply_to = None  # nowhere safe to announce it; the requester still finds the result by polling

    def fail(message):
        return JobError(message, job_id, reply_to)

    if not _scripts_read(raw, data):
        # Such a job went back to the queue uncounted after every crash on it, forever (found by review).
        raise fail("job header is JSON the queue's scripts cannot read (not UTF-8, or a lone surrogate)")

    if data.get("shape") != list(IMAGE_SHAPE):
        raise fail(f"job image shape must be {list(IMAGE_SHAPE)}")
    if data.get("dtype") != "uint8":
        raise fail("job image dtype must be uint8")
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
    if not isinstance(request_id, str) or not SAFE_NAME.fullmatch(request_id):
        raise fail("job request_id must be 1-200 characters of A-Z a-z 0-9 . _ : -")
    probabilities, result_ttl = data.get("probabilities", False), data.get("result_ttl", 0)
    if not isinstance(probabilities, bool):
        raise fail("job probabilities must be true or false")
    if not _is_int(result_ttl) or not 0 <= result_ttl <= MAX_RESULT_TTL:
        raise fail(f"job result_ttl must be an integer from 0 to {MAX_RESULT_TTL}")
    notify_result = data.get("notify_result", False)
    if not isinstance(notify_result, bool):
        raise fail("job notify_result must be true or false")
    return Job(
        pixels=None,
        deadline=float(data["deadline"]),
        top_k=top_k,
        reply_to=reply_to,
        request_id=request_id,
        id=job_id,
        enqueued_at=float(data["enqueued_at"]),
        attempts=attempts,
        probabilities=probabilities,
        result_ttl=result_ttl,
        notify_result=notify_result,
    )


def with_pixels(job: Job, pixels: bytes) -> Job:
    """The job with the value of its pixels' key, read in place; JobError (with the job's address) when the
    size is wrong, checked before the bytes are used."""
    if len(pixels) != _IMAGE_BYTES:
        raise JobError(f"job has {len(pixels)} bytes of pixels, expected {_IMAGE_BYTES}", job.id, job.reply_to)
    return dataclasses.replace(job, pixels=np.frombuffer(pixels, dtype=np.uint8).reshape(IMAGE_SHAPE))


def is_job_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))


def _is_int(value):
    return type(value) is int  # not bool, not float


def _is_number(value):
    # An int beyond a float's range (10**400) is not a time either: math.isfinite would raise on it.
    if type(value) is int:
        return abs(value) < 2**53
    return type(value) is float and math.isfinite(value)


def success_result(
    job: Job,
    probabilities: np.ndarray,
    predictions: list,
    model: str,
    batch_size: int,
    inference_ms: float,
    queue_ms: float,
) -> dict:
    """`probabilities` (the model's output row) travels only when the job asked for it: 4 KB as base64."""
    result = {
        "id": job.id,
        "request_id": job.request_id,
        "success": True,
        "model": model,
        "predictions": predictions,
        "batch_size": batch_size,
        "inference_ms": round(inference_ms, 2),
        "queue_ms": round(queue_ms, 2),
    }
    if job.probabilities:
        row = np.ascontiguousarray(probabilities, dtype="<f4")
        result["probabilities"] = base64.b64encode(row.tobytes()).decode("ascii")
    return result


# The error of a job not done by its deadline: 503 when its request still waits (shed), 504 for an async job.
LATE = "the job could not be done before its deadline"


def error_result(job_id: str, error: str, status: int) -> dict:
    """`status` is the HTTP status the web server answers with; 503 from a worker means it shed the job (it could
    not be done by its deadline), and the request is refused as if admission had refused it."""
    return {"id": job_id, "success": False, "error": error, "status": status}


def encode_result(result: dict) -> str:
    return json.dumps(result)


def parse_notification(message: bytes) -> tuple[str, bytes | None]:
    """(job id, result JSON or None) of a message on a web process's reply channel. For a job with notify_result,
    finish.lua publishes the job id, a newline and the result as stored, so that the waiting request reads
    nothing more; a bare job id (for other jobs, from requeue.lua's give-up, and from workers of earlier
    versions) says only that the result is stored. The parts are not checked here: see `delivered_result`."""
    job_id, _, result = message.partition(b"\n")
    return job_id.decode(errors="replace"), result or None


def delivered_result(raw: bytes, job_id: str) -> dict | None:
    """The result a notification carried when it is one of job `job_id` and has every field the web server reads,
    in its type; else None (then the result key, stored in the same step, is read). Anyone who may PUBLISH can
    send anything on a reply channel. Such a result never has probabilities: a job that asks for them is not
    sent its result in the notification (submission._job), and its request takes none from one."""
    try:
        result = json.loads(raw)
    except (ValueError, TypeError, RecursionError):  # not JSON (or nested too deep), not UTF-8
        return None
    if not isinstance(result, dict) or result.get("id") != job_id or "probabilities" in result:
        return None
    if result.get("success") is True:
        # The numbers the metrics take as floats: an int like 10**400 is JSON, and would raise there.
        numbers = [result.get(name) for name in ("batch_size", "inference_ms", "queue_ms")]
        whole = isinstance(result.get("model"), str) and isinstance(result.get("predictions"), list)
        whole = whole and _is_int(numbers[0]) and all(_is_number(n) for n in numbers)
    elif result.get("success") is False:
        status = result.get("status", 500)
        whole = isinstance(result.get("error"), str) and _is_int(status) and 400 <= status <= 599
    else:
        whole = False
    return result if whole else None


def decode_result(raw: bytes | str) -> dict:
    """The result as a dict; its probabilities, when it carries them, as a float32 array."""
    result = json.loads(raw)
    if "probabilities" in result:
        result["probabilities"] = np.frombuffer(base64.b64decode(result["probabilities"]), dtype="<f4")
    return result


def address(raw: bytes | str) -> tuple[str | None, str | None]:
    """(job id, reply channel) of a raw job, or (None, None) when it has no valid id; never raises (it names
    jobs in the log lines of failures, which must not fail in turn)."""
    try:
        job = decode_job(raw)
    except JobError as exc:
        return exc.job_id, exc.reply_to
    except Exception:  # noqa: BLE001 - see above
        return None, None
    return job.id, job.reply_to


class DeadLetter(NamedTuple):
    """One entry of the dead-letter list (`Keys.dead`), read back.

    The writers, job_queue's finish.lua (jobs the worker found malformed, failed on, or found without
    pixels) and requeue.lua (jobs out of attempts), RPUSH the JSON envelope {"reason": why it was given up,
    "dead_at": Redis's clock, unix seconds, "job": the job's header exactly as it was claimed} followed, when the
    job's pixels were still there, by a newline and the raw pixels, moved here from their key so that the job can
    be requeued with its image (jobs.lua's bury and read_dead; JSON holds no raw newline, so the first one ends
    it). An older entry holds its pixels in the envelope's "pixels". Anything else in the list (garbage, or an
    entry of another format) still reads back, as an entry without a job.
    """

    raw: str  # the job's header (the whole entry when it is not an envelope), undecodable bytes kept as surrogates
    reason: str | None
    dead_at: float | None
    job: dict | None  # the header decoded, None when it holds no JSON object
    has_pixels: bool  # whether it can be requeued with its image

    @property
    def id(self) -> str | None:
        job_id = (self.job or {}).get("id")
        return job_id if isinstance(job_id, str) and is_job_id(job_id) else None

    def raw_bytes(self) -> bytes:
        return self.raw.encode("utf-8", "surrogateescape")


def decode_dead_letter(entry: bytes | str) -> DeadLetter:
    """Never raises: whatever the dead-letter list holds is listed."""
    data = entry.encode("utf-8", "surrogateescape") if isinstance(entry, str) else entry
    head, newline, _ = data.partition(b"\n")
    envelope = header_of(head.decode("utf-8", "surrogateescape"))
    if envelope is None or not isinstance(envelope.get("job"), str):
        return DeadLetter(data.decode("utf-8", "surrogateescape"), None, None, None, False)
    reason, dead_at, raw = envelope.get("reason"), envelope.get("dead_at"), envelope["job"]
    return DeadLetter(
        raw,
        reason if isinstance(reason, str) else None,
        float(dead_at) if isinstance(dead_at, (int, float)) else None,
        header_of(raw),
        bool(newline) or isinstance(envelope.get("pixels"), str),
    )

"""The job and result shapes that cross Redis: what a worker accepts and what it refuses, with a reason."""

import base64
import json
import time

import numpy as np
import pytest

import jobs


def make_job(**overrides):
    pixels = np.random.default_rng(0).integers(0, 256, jobs.IMAGE_SHAPE, dtype=np.uint8)
    return jobs.Job(pixels, time.time() + 30, **overrides)


def test_job_round_trips_with_exact_pixels():
    job = make_job(top_k=3, reply_to="chan", request_id="req-1")
    back = jobs.decode_job(jobs.encode_job(job))
    assert np.array_equal(back.pixels, job.pixels)
    assert (back.id, back.top_k, back.reply_to, back.request_id) == (job.id, 3, "chan", "req-1")


def test_job_payload_is_uint8_sized():
    raw = jobs.encode_job(make_job())
    image = json.loads(raw)["image"]
    assert len(base64.b64decode(image)) == 224 * 224 * 3  # a quarter of the original float32 payload


def test_request_id_defaults_to_job_id():
    job = make_job()
    assert job.request_id == job.id


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(shape=[10, 10, 3]), "shape"),
        (lambda d: d.update(dtype="float32"), "uint8"),
        (lambda d: d.update(image="!" * len(d["image"])), "not valid base64"),
        (lambda d: d.update(image=base64.b64encode(b"abc").decode()), "characters of base64"),
        (lambda d: d.update(image=d["image"] * 50), "characters of base64"),  # huge: refused before decoding
        (lambda d: d.update(image=12345), "characters of base64"),
        (lambda d: d.pop("image"), "characters of base64"),
        (lambda d: d.update(top_k=0), "top_k"),
        (lambda d: d.update(top_k=21), "top_k"),
        (lambda d: d.update(top_k="5"), "top_k"),
        (lambda d: d.update(top_k=True), "top_k"),
        (lambda d: d.pop("top_k"), "top_k"),
        (lambda d: d.update(attempts="2"), "attempts"),
        (lambda d: d.update(attempts=-1), "attempts"),
        (lambda d: d.update(attempts=10**12), "attempts"),
        (lambda d: d.update(attempts=1.5), "attempts"),
        (lambda d: d.pop("deadline"), "deadline"),
        (lambda d: d.update(deadline="soon"), "deadline"),
        (lambda d: d.update(deadline=float("nan")), "deadline"),
        (lambda d: d.update(enqueued_at="yesterday"), "enqueued_at"),
        (lambda d: d.pop("enqueued_at"), "enqueued_at"),
        (lambda d: d.update(request_id=5), "request_id"),
        (lambda d: d.update(request_id="x" * 500), "request_id"),
        (lambda d: d.update(request_id="line\nbreak"), "request_id"),
    ],
)
def test_malformed_job_names_the_problem_and_keeps_the_address(mutate, message):
    job = make_job(reply_to="chan")
    data = json.loads(jobs.encode_job(job))
    mutate(data)
    with pytest.raises(jobs.JobError, match=message) as err:
        jobs.decode_job(json.dumps(data))
    assert (err.value.job_id, err.value.reply_to) == (job.id, "chan")
    assert jobs.address(json.dumps(data)) == (job.id, "chan")


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"id": "../etc"}', b"{}", b"\xff\xfe", b'"a string"'])
def test_job_without_identity_is_refused_without_address(raw):
    with pytest.raises(jobs.JobError) as err:
        jobs.decode_job(raw)
    assert err.value.job_id is None
    assert jobs.address(raw) == (None, None)


def test_an_unsafe_reply_channel_is_ignored_not_used():
    data = json.loads(jobs.encode_job(make_job()))
    data["reply_to"] = "chan\r\nPUBLISH other"
    assert jobs.decode_job(json.dumps(data)).reply_to is None

"""The job and result shapes that cross Redis: what a worker accepts and what it refuses, with a reason."""

import json
import time

import numpy as np
import pytest

import jobs


def make_job(**overrides):
    pixels = np.random.default_rng(0).integers(0, 256, jobs.IMAGE_SHAPE, dtype=np.uint8)
    return jobs.Job(pixels, time.time() + 30, **overrides)


def decoded(encoded):
    """The job as a worker gets it: its header from the queue, then its pixels from their key."""
    return jobs.with_pixels(jobs.decode_job(encoded.header), encoded.pixels)


def test_job_round_trips_with_exact_pixels():
    job = make_job(top_k=3, reply_to="chan", request_id="req-1")
    back = decoded(jobs.encode_job(job))
    assert np.array_equal(back.pixels, job.pixels)
    assert (back.id, back.top_k, back.reply_to, back.request_id) == (job.id, 3, "chan", "req-1")


def test_the_queue_holds_a_small_json_header_and_the_pixels_travel_apart():
    job = make_job()
    encoded = jobs.encode_job(job)
    assert (encoded.id, encoded.deadline) == (job.id, job.deadline)
    assert json.loads(encoded.header)["id"] == job.id and len(encoded.header) < 400
    assert encoded.pixels == job.pixels.tobytes()  # 147 KiB raw: no base64, a quarter of the original float32
    assert jobs.decode_job(encoded.header).pixels is None  # the worker loads them from their key


def test_options_round_trip_and_only_travel_when_set():
    job = make_job(probabilities=True, result_ttl=3600)
    back = jobs.decode_job(jobs.encode_job(job).header)
    assert (back.probabilities, back.result_ttl) == (True, 3600)
    assert set(jobs.header_of(jobs.encode_header(make_job()))).isdisjoint({"probabilities", "result_ttl"})


def test_probabilities_travel_in_the_result_only_when_asked():
    row = np.random.default_rng(1).random(1000).astype(np.float32)
    for asked in (True, False):
        job = make_job(probabilities=asked)
        result = jobs.decode_result(jobs.encode_result(jobs.success_result(job, row, [], "m", 1, 1.0, 1.0)))
        assert ("probabilities" in result) is asked
        if asked:
            assert np.array_equal(result["probabilities"], row)


def _with_header(mutate):
    def change(header):
        data = json.loads(header)
        mutate(data)
        return json.dumps(data).encode()

    return change


def test_request_id_defaults_to_job_id():
    job = make_job()
    assert job.request_id == job.id


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_with_header(mutate), message)
        for mutate, message in [
            (lambda d: d.update(shape=[10, 10, 3]), "shape"),
            (lambda d: d.update(dtype="float32"), "uint8"),
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
            (lambda d: d.update(enqueued_at=10**400), "enqueued_at"),  # beyond a float: raised OverflowError
            (lambda d: d.pop("enqueued_at"), "enqueued_at"),
            (lambda d: d.update(request_id=5), "request_id"),
            (lambda d: d.update(request_id="x" * 500), "request_id"),
            (lambda d: d.update(request_id="line\nbreak"), "request_id"),
            (lambda d: d.update(request_id="trailing\n"), "request_id"),  # "$" matches before a final newline
            (lambda d: d.update(probabilities="yes"), "probabilities"),
            (lambda d: d.update(result_ttl=-1), "result_ttl"),
            (lambda d: d.update(result_ttl=10**8), "result_ttl"),
            (lambda d: d.update(result_ttl=1.5), "result_ttl"),
        ]
    ]
    + [
        # JSON that Python reads and the Lua scripts' cjson does not (found by review: such a job never had an
        # attempt counted, and one that crashed its worker came back forever).
        (lambda raw: b"\xef\xbb\xbf" + raw, "scripts cannot read"),  # a UTF-8 byte order mark
        (lambda raw: raw.decode().encode("utf-16"), "scripts cannot read"),
        (lambda raw: raw.decode().encode("utf-32-le"), "scripts cannot read"),
        (lambda raw: raw[:-1] + b', "trace": "\\ud800"}', "scripts cannot read"),  # a lone surrogate
    ],
)
def test_malformed_job_names_the_problem_and_keeps_the_address(mutate, message):
    job = make_job(reply_to="chan")
    raw = mutate(jobs.encode_header(job))
    with pytest.raises(jobs.JobError, match=message) as err:
        jobs.decode_job(raw)
    assert (err.value.job_id, err.value.reply_to) == (job.id, "chan")
    assert jobs.address(raw) == (job.id, "chan")


@pytest.mark.parametrize(
    "pixels, message",
    [
        (b"abc", "has 3 bytes of pixels, expected 150528"),
        (b"\0" * 150528 * 50, "expected 150528"),  # huge: refused before it is used
        (b"", "has 0 bytes of pixels"),
        (b"\n" * 150529, "has 150529 bytes of pixels"),
    ],
)
def test_pixels_of_the_wrong_size_name_the_problem_and_keep_the_address(pixels, message):
    job = jobs.decode_job(jobs.encode_header(make_job(reply_to="chan")))
    with pytest.raises(jobs.JobError, match=message) as err:
        jobs.with_pixels(job, pixels)
    assert (err.value.job_id, err.value.reply_to) == (job.id, "chan")


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "../etc"}',
        json.dumps({"id": "a" * 32 + "\n"}).encode(),  # an id with a final newline
        b"{}",
        b"\xff\xfe",
        b'"a string"',
        b'{"id": "' + b"a" * 5000 + b'"}',
        # the old binary job, a header line and the pixels: refused, not misread
        jobs.encode_header(make_job()) + b"\n" + b"\0" * 150528,
    ],
)
def test_job_without_identity_is_refused_without_address(raw):
    with pytest.raises(jobs.JobError) as err:
        jobs.decode_job(raw)
    assert err.value.job_id is None
    assert jobs.address(raw) == (None, None)


def test_an_unsafe_reply_channel_is_ignored_not_used():
    for unsafe in ("chan\r\nPUBLISH other", "chan\n"):
        raw = _with_header(lambda d, unsafe=unsafe: d.update(reply_to=unsafe))(jobs.encode_header(make_job()))
        assert jobs.decode_job(raw).reply_to is None


def test_a_header_with_raw_control_characters_is_read_as_the_scripts_read_it(real_redis):
    # A producer of our own escapes them (json.dumps), a foreign one may not; cjson in Redis accepts them raw.
    raw = jobs.encode_header(make_job()).replace(b'"top_k"', b'"note": "tab\there\x01", "top_k"')
    in_lua = real_redis.eval("local h = cjson.decode(ARGV[1]) return {h.id, h.note}", 0, raw)
    header = jobs.header_of(raw)
    assert [header["id"].encode(), header["note"].encode()] == in_lua
    assert jobs.decode_job(raw).id == header["id"]

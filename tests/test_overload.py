"""Overload: admission by expected wait (fast 503s), deadlines kept whatever the load, jobs nobody waits for
skipped, and slow or stalled clients that cannot starve the others."""

import io
import json
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus

import numpy as np
import pytest
import redis
import requests
from prometheus_client import REGISTRY
from test_open_inference import triton_request

import helpers
import jobs
import stress_test
import submission
import web
from admission import Admission, Refusal
from job_queue import JobQueue
from keys import Keys
from notifications import ResultWaiter
from settings import Settings
from support import CASTLE, ROOT, CountingClassifier, post, sample, wait_for
from worker import Throughput, Worker
from worker_registration import WorkerRegistry

KEYS = Keys("image_queue")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def admission_on(r, backlog, rates, clock=time.monotonic, background=None, **settings):
    config = Settings(**settings)
    queue = JobQueue(r, config)
    registry = WorkerRegistry(r, queue, heartbeat_ttl=60)
    if backlog:
        r.rpush(KEYS.queue, *["job"] * backlog)
    for i, rate in enumerate(rates):
        registry.beat(f"w{i}", {"ready": 1, **({} if rate is None else {"images_per_s": rate})})
    return Admission(queue, registry, config.admission_wait_fraction, clock=clock, background=background)


# -- the admission rule, on fakeredis ---------------------------------------------------------------------------
def test_no_throughput_measured_yet_admits_up_to_the_cap(fake_redis):
    clock = Clock()
    admission = admission_on(fake_redis, 99, [None], clock, max_queue_length=100)  # no batch finished yet
    assert admission.check(remaining=0.5) == (99, 0.0)  # however long the backlog, nothing says it is too long
    fake_redis.rpush(KEYS.queue, "job")
    clock.now += Admission.QUEUE_MAX_AGE
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=30)
    assert refused.value.reason == "queue_full" and refused.value.retry_after == 1


def test_the_queue_length_an_enqueue_reports_stands_until_the_next_read(fake_redis):
    clock = Clock()
    admission = admission_on(fake_redis, 0, [None], clock, max_queue_length=100)
    assert admission.check(remaining=30) == (0, 0.0)  # read
    admission.queue_length(100)  # as an enqueue of this process just saw it; Redis's queue is empty by now
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=30)
    assert refused.value.reason == "queue_full"
    clock.now += Admission.QUEUE_MAX_AGE  # too old to go on: the queue is asked again
    assert admission.check(remaining=30) == (0, 0.0)


def test_the_images_other_web_processes_admitted_and_have_not_yet_queued_count_as_jobs_ahead(fake_redis):
    """Each web process prepares what it admitted; their jobs reach the queue ahead of a request admitted now by
    any of them. Counting only its own, each of two web processes at three times the capacity admitted on a short
    queue, and 86 requests got 504 after waiting 4 s in the other's backlog (tests below, on real processes)."""
    clocks = Clock(), Clock()
    busy, other = (admission_on(fake_redis, 0, [10.0], clock, max_queue_length=100) for clock in clocks)
    busy.check(remaining=30, images=20)  # admitted, being prepared: 2 s of the workers' time once queued
    clocks[0].now += Admission.QUEUE_MAX_AGE
    busy.check(remaining=30, images=1)  # its next request records them (not its own image: that is admitted after)
    assert busy.preparing_images == 21
    with pytest.raises(Refusal) as refused:
        other.check(remaining=2.5)  # 2.1 s ahead of it > 0.8 x 2.5 s
    assert refused.value.reason == "expected_wait" and "20 by other web processes" in str(refused.value)
    fake_redis.rpush(KEYS.queue, *["job"] * 75)  # and against the cap: 75 queued + 20 + 6 > 100
    clocks[1].now += Admission.QUEUE_MAX_AGE
    with pytest.raises(Refusal) as refused:
        other.check(remaining=300, images=6)
    assert refused.value.reason == "queue_full" and "20 by other web processes" in str(refused.value)
    # Nothing of it counts once the busy process has not recorded its backlog for BACKLOG_MAX_AGE (it stopped,
    # or gets no requests); nor does a record from the future (Redis's clock stepped back), which goes at once.
    fake_redis.delete(KEYS.queue)
    seconds, microseconds = fake_redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    fake_redis.hset(KEYS.web_backlogs, busy.name, f"20:{now_ms - round(Admission.BACKLOG_MAX_AGE * 1000) - 100}")
    fake_redis.hset(KEYS.web_backlogs, "gone-before-the-clock-stepped-back", f"600:{now_ms + 3_600_000}")
    clocks[1].now += Admission.QUEUE_MAX_AGE
    assert other.check(remaining=2.5) == (0, 10.0)
    assert not fake_redis.hexists(KEYS.web_backlogs, "gone-before-the-clock-stepped-back")


def test_a_process_busy_with_its_backlog_keeps_recording_it_while_no_request_comes(fake_redis):
    """Found by review: a process recorded its backlog only when a request came. One busy preparing what it had
    admitted may take in none for longer than BACKLOG_MAX_AGE (the other processes accept first), and it then
    vanished from their count while its images were still to be queued ahead of theirs."""

    def in_background(function):
        threading.Thread(target=function, daemon=True).start()

    busy, other = (admission_on(fake_redis, 0, [10.0], background=in_background) for _ in range(2))
    other.BACKLOG_MAX_AGE = 0.3  # how long the others count a record, shortened for the test
    busy.check(remaining=30, images=20)  # admitted, being prepared: 2 s of the workers' time once queued
    time.sleep(3 * other.BACKLOG_MAX_AGE)  # and no request since
    with pytest.raises(Refusal) as refused:
        other.check(remaining=2.5)  # 2.1 s ahead of it > 0.8 x 2.5 s
    assert "20 by other web processes" in str(refused.value)
    share, failures = busy.queue.share_backlog, iter([redis.TimeoutError("Redis did not answer")])

    def share_after_a_failure(*args):
        for failure in failures:
            raise failure
        return share(*args)

    busy.queue.share_backlog = share_after_a_failure  # one failed record does not end the recording (review)
    time.sleep(3 * other.BACKLOG_MAX_AGE)
    assert next(failures, None) is None
    with pytest.raises(Refusal) as refused:
        other.check(remaining=2.5)
    assert "20 by other web processes" in str(refused.value)
    with busy.preparation(20):
        pass  # done with them: recorded as gone without a request either, and the recorder stops
    wait_for(lambda: not busy._recording, 5, "the recorder to record the empty backlog and stop")
    time.sleep(Admission.QUEUE_MAX_AGE)
    assert other.check(remaining=2.5) == (0, 10.0)


def test_a_request_cut_short_while_the_recorder_starts_leaves_nothing_counted(fake_redis):
    """Found by review: under gevent, starting the recorder's thread switches greenlets, and the server's safety net
    (a gevent.Timeout) could fire there, after the request's images were counted: nothing ever uncounted them, and
    the recorder published them to every web process for good."""

    class CutShort(BaseException):
        pass

    def cut_short(function):
        raise CutShort

    admission = admission_on(fake_redis, 0, [10.0], background=cut_short)
    with pytest.raises(CutShort):
        admission.check(remaining=30, images=16)
    assert (admission.preparing, admission.preparing_images, admission._recording) == (0, 0, False)


def test_while_one_request_shares_the_backlogs_the_others_use_the_last_read(fake_redis):
    """Found by review: without it, all 32 requests that arrived during the round trip read (and wrote) too."""
    clock = Clock()
    admission = admission_on(fake_redis, 0, [None], clock)
    admission.check(remaining=30)
    reads, reading, go_on = [], threading.Event(), threading.Event()
    share = admission.queue.share_backlog

    def slow_share(*args):
        reads.append(1)
        reading.set()
        go_on.wait(10)
        return share(*args)

    admission.queue.share_backlog = slow_share
    clock.now += Admission.QUEUE_MAX_AGE
    first = threading.Thread(target=admission.check, kwargs={"remaining": 30})
    first.start()
    assert reading.wait(10)
    for _ in range(5):
        admission.check(remaining=30)
    assert len(reads) == 1
    go_on.set()
    first.join(10)


def test_the_models_of_live_ready_workers_are_read_at_most_once_a_second(fake_redis):
    clock = Clock()
    admission = admission_on(fake_redis, 0, [], clock)
    registry = WorkerRegistry(fake_redis, JobQueue(fake_redis, Settings()), heartbeat_ttl=60)
    registry.beat("lite", {"model": "efficientnet_lite0", "ready": 1})
    registry.beat("loading", {"model": "resnet50", "ready": 0})
    assert admission.models() == {"efficientnet_lite0"}
    registry.beat("loading", {"model": "resnet50", "ready": 1})
    assert admission.models() == {"efficientnet_lite0"}  # no round trips for this one
    clock.now += Admission.THROUGHPUT_MAX_AGE
    assert admission.models() == {"efficientnet_lite0", "resnet50"}


def test_while_one_request_reads_the_workers_the_others_use_the_last_read_instead_of_reading_too(fake_redis):
    """Under load the once-a-second read was made by every request arriving during its round trips: ten reads a
    second from one web process at 110 requests/s. Values older than READING_MAX_AGE are read afresh all the same."""
    clock = Clock()
    admission = admission_on(fake_redis, 0, [4.0], clock)
    assert admission.throughput() == 4.0
    reads, reading, go_on = [], threading.Event(), threading.Event()
    workers = admission.registry.workers

    def slow_workers():
        reads.append(1)
        if len(reads) == 1:
            reading.set()
            go_on.wait(10)
        return workers()

    admission.registry.workers = slow_workers
    WorkerRegistry(fake_redis, admission.queue, heartbeat_ttl=60).beat("w0", {"ready": 1, "images_per_s": 8.0})
    clock.now += Admission.THROUGHPUT_MAX_AGE
    first = threading.Thread(target=admission.throughput)
    first.start()
    assert reading.wait(10)
    others = [admission.throughput() for _ in range(5)]  # they do not wait for the read in progress either
    assert len(reads) == 1 and others == [4.0] * 5
    # A read that hangs (a connection stuck up to its timeouts) does not keep the others on old values for long.
    clock.now += Admission.READING_MAX_AGE - Admission.THROUGHPUT_MAX_AGE
    assert admission.throughput() == 8.0 and len(reads) == 2
    go_on.set()
    first.join(10)


def test_before_the_first_read_of_the_workers_has_come_back_each_request_reads_them(fake_redis):
    """There is nothing older to go on with: a request that took 0 images/s or no models for the truth would be
    admitted blindly or told its model is not served."""
    admission = admission_on(fake_redis, 0, [4.0])
    reading, go_on = threading.Event(), threading.Event()
    workers = admission.registry.workers

    def slow_once():
        if not reading.is_set():
            reading.set()
            go_on.wait(10)
        return workers()

    admission.registry.workers = slow_once
    first = threading.Thread(target=admission.throughput)
    first.start()
    assert reading.wait(10)
    assert admission.throughput() == 4.0
    go_on.set()
    first.join(10)


def test_once_an_enqueue_finds_the_queue_full_the_next_request_is_refused_before_its_decode(fake_redis):
    """The length a refused enqueue saw replaces the one cached from the last success (found by the hostile
    review: requests went on being admitted and decoded, to be refused at their enqueue)."""
    config = Settings(wait_mode="poll", max_queue_length=3)
    app = web.create_app(config, fake_redis, ResultWaiter(fake_redis, config))
    service = app.extensions["image_classifier"]
    service.admission.clock = Clock()  # no time passes: a cached length would stay fresh
    job = jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)
    with app.test_request_context("/predict", method="POST"):
        service.admission.queue_length(0)  # as this process's last enqueue saw it
        fake_redis.rpush(KEYS.queue, "a", "b", "c")  # other web processes fill the queue since
        with pytest.raises(submission.Refused) as refused:
            submission._enqueue(service, [job])
        assert refused.value.reason == "queue_full"
        with pytest.raises(Refusal) as next_one:
            service.admission.check(remaining=30)
    assert next_one.value.reason == "queue_full"


def test_a_backlog_the_workers_cannot_clear_in_time_is_refused_with_retry_after(fake_redis):
    # 39 queued + this one = 40 jobs at 5 + 5 images/s: 4 s of work.
    admission = admission_on(fake_redis, 39, [5.0, 5.0], admission_wait_fraction=0.8)
    assert admission.check(remaining=10) == (39, 10.0)  # 4 s <= 0.8 * 10 s
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=3)  # 4 s > 0.8 * 3 s = 2.4 s
    assert refused.value.reason == "expected_wait"
    assert refused.value.retry_after == 2  # the 1.6 s until enough of the backlog is gone, rounded up


def test_the_batch_in_progress_and_the_new_jobs_own_batch_count(fake_redis):
    # One worker with batches of 32 at 16 images/s, a full batch in hand, and 10 jobs queued. A job queued now
    # is done when its batch is: the 32 in hand, the 10 ahead, itself and the 10 that will fill its batch,
    # 53 images, 3.3 s. Counting only the queue would say 11 images, 0.7 s.
    admission = admission_on(fake_redis, 10, [None])
    fake_redis.hset(KEYS.heartbeat("w0"), mapping={"name": "w0", "images_per_s": 16.0, "batch_size": 32})
    fake_redis.rpush(KEYS.processing("w0"), *["claimed"] * 32)
    assert admission.check(remaining=5) == (10, 16.0)  # 3.3 s <= 0.8 * 5 s
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=4)  # 3.3 s > 0.8 * 4 s = 3.2 s
    assert refused.value.reason == "expected_wait" and "32 in flight" in str(refused.value)


def test_the_web_process_own_backlog_counts_and_a_spent_budget_is_refused(fake_redis):
    admission = admission_on(fake_redis, 0, [None])  # no throughput: only the local backlog can refuse
    admission.prepared(0.1)
    for _ in range(20):  # 20 admitted requests, none prepared yet: 2 s of CPU work ahead of the next one
        admission.check(remaining=30)
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=2)  # 2 s > 0.8 * 2 s
    assert refused.value.reason == "expected_wait"
    for _ in range(20):
        with admission.preparation(1):
            pass
    assert admission.preparing == 0 and admission.check(remaining=2) == (0, 0.0)
    with pytest.raises(Refusal):
        admission.check(remaining=0)


def test_the_local_backlog_counts_every_image_ahead_and_the_request_s_own(fake_redis):
    # The decoding threads take images in the order they were handed over: two requests of 8 images, none
    # prepared yet, 0.1 s an image, one thread: a new request of 1 image waits 1.7 s, of 8 images 2.4 s.
    admission = admission_on(fake_redis, 0, [None])
    admission.prepared(0.1)
    admission.check(remaining=30, images=8)
    admission.check(remaining=30, images=8)
    assert (admission.preparing, admission.preparing_images) == (2, 16)
    admission.check(remaining=2.2)  # 1.7 s <= 0.8 * 2.2 s
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=2.9, images=8)  # 1 more ahead now: 2.5 s > 0.8 * 2.9 s
    assert "17 images of 3 requests being prepared here" in str(refused.value)
    with admission.preparation(8) as counted:
        for _ in range(3):
            counted.started()
            counted.prepared(0.1)
        counted.started()  # a thread is on the fourth when the request ends
        assert admission.preparing_images == 14  # an image leaves the backlog as soon as it is prepared
    assert (admission.preparing, admission.preparing_images) == (2, 10)  # the one being prepared stays counted
    counted.prepared(0.1)  # until its thread is done with it
    assert (admission.preparing, admission.preparing_images) == (2, 9)


def _client_with_a_worker(fake_redis, **settings):
    config = Settings(wait_mode="poll", **settings)
    client = web.create_app(config, fake_redis, ResultWaiter(fake_redis, config)).test_client()
    WorkerRegistry(fake_redis, JobQueue(fake_redis, config), config.heartbeat_ttl).beat(
        "w", {"model": "efficientnet_lite0", "ready": 1}
    )
    return client, client.application.extensions["image_classifier"].admission


def _send(client, route, images):
    arrived = {submission.ARRIVED: time.monotonic()}  # as run_web_server sets it: the clock starts at arrival
    if route == "/predict":
        form = {"image": [(io.BytesIO(i), f"{k}.jpg") for k, i in enumerate(images)]}
        return client.post(route, data=form, environ_base=arrived)
    body, length = triton_request(images)
    headers = {"Inference-Header-Content-Length": str(length)}
    return client.post(route, data=body, headers=headers, environ_base=arrived)


@pytest.mark.parametrize("route", ["/predict", "/v2/models/efficientnet_lite0/infer"])
def test_admission_counts_every_image_of_a_request_whatever_its_protocol(fake_redis, monkeypatch, route):
    # 8 images are being prepared, 0.05 s each, 2 threads: a request of 16 more would wait 0.6 s, more than 0.8
    # of its 0.6 s (taken for one image, 0.225 s; alone, 0.4 s). A form is counted once it is split, before any
    # image is decoded.
    client, admission = _client_with_a_worker(fake_redis, request_timeout=0.6)
    admission.decoders = 2
    admission.prepared(0.05)
    admission.check(remaining=30, images=8)
    monkeypatch.setattr(helpers, "prepare_image", lambda data, max_pixels: pytest.fail("decoded, so admitted"))
    response = _send(client, route, [b"img"] * 16)
    assert response.status_code == 503 and "of work ahead" in response.get_json()["error"]  # V2 says no reason
    assert (admission.preparing, admission.preparing_images) == (1, 8)


def _count(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0


def _refusing_client(fake_redis, **settings):
    """A web app on fakeredis whose admission refuses every request: 10 s of work ahead of a 10 s deadline."""
    client, admission = _client_with_a_worker(fake_redis, request_timeout=10, **settings)
    fake_redis.hset(KEYS.heartbeat("w"), "images_per_s", 10.0)
    fake_redis.rpush(KEYS.queue, *["job"] * 100)
    return client, admission


def test_while_refusing_a_predict_gets_the_route_s_own_503_before_its_form_is_read(fake_redis, monkeypatch, capfd):
    """Under overload most requests are refused, and through the whole stack each refusal cost the web process
    1.1-1.2 ms of CPU: at three times the capacity, half of what it had for the admitted requests, whose images were
    then prepared 2-3x slower than the admission had measured before the refusals began (504s). While even a
    one-image request with REQUEST_TIMEOUT to live would be refused, a /predict is answered before Flask, its form
    and the route: with the answer the route gives."""
    client, admission = _refusing_client(fake_redis)
    refused_before, answered_before = (
        _count("imgclf_rejected_total", reason="expected_wait"),
        _count("imgclf_requests_total", status="503", endpoint="predict"),
    )

    def post_castle():
        form = {"image": [(io.BytesIO(CASTLE.read_bytes()), "castle.jpg")]}
        return client.post("/predict?top_k=3", data=form, headers={"X-Request-Id": "client-1"})

    with monkeypatch.context() as patched:
        patched.setattr(web, "_form_images", lambda: pytest.fail("the form was read"))
        early = post_castle()
    assert early.status_code == 503 and early.headers["X-Request-Id"] == "client-1"
    assert early.get_json()["reason"] == "expected_wait" and early.headers["Retry-After"] == "3"
    log = capfd.readouterr().err
    assert "request_received rid=client-1 bytes=" in log and "top_k=3" in log
    assert "request_refused rid=client-1 reason=expected_wait" in log
    app = client.application
    app.wsgi_app = app.wsgi_app.wsgi_app  # without it: what the route answers
    routed = post_castle()
    assert routed.status_code == early.status_code and routed.get_data() == early.get_data()
    assert {k: v for k, v in routed.headers.items()} == {k: v for k, v in early.headers.items()}
    assert _count("imgclf_rejected_total", reason="expected_wait") == refused_before + 2
    assert _count("imgclf_requests_total", status="503", endpoint="predict") == answered_before + 2
    assert (admission.preparing, admission.preparing_images) == (0, 0)


@pytest.mark.parametrize(
    "query, headers, status, said",
    [
        ("", {"X-Request-Id": "a b"}, 400, "X-Request-Id must be"),  # not an id, whatever the load
        ("?timeout=0.000001", {}, 504, "time ran out"),  # its own deadline is spent: no retry would meet it
        ("?timeout=2", {}, 503, "this request's 2.0 s allow"),  # the route weighs its own deadline
    ],
)
def test_a_request_the_route_would_answer_otherwise_goes_to_it(fake_redis, query, headers, status, said):
    """Found by the twelfth session's review: a spent `timeout` got 503 and Retry-After instead of its 504, and a
    `timeout` of its own the Retry-After of REQUEST_TIMEOUT's."""
    client, _ = _refusing_client(fake_redis)
    form = {"image": [(io.BytesIO(b"x"), "x.jpg")]}
    response = client.post("/predict" + query, data=form, headers=headers)
    assert response.status_code == status and said in response.get_json()["error"], response.get_json()


def test_an_upload_over_the_limit_is_still_413_while_refusing(fake_redis):
    client, _ = _refusing_client(fake_redis, max_upload_bytes=50_000)
    form = {"image": [(io.BytesIO(CASTLE.read_bytes()), "castle.jpg")]}  # 77 KB
    assert client.post("/predict", data=form).status_code == 413


def test_an_admitted_request_goes_to_the_route(fake_redis):
    client, _ = _client_with_a_worker(fake_redis, request_timeout=10)
    response = client.post("/predict", data={"image": [(io.BytesIO(b"x"), "x.jpg")]})
    assert response.status_code == 400 and "image" in response.get_json()["error"]  # the route read b"x": no image


def test_a_redis_error_while_weighing_early_is_answered_by_the_route_without_asking_redis_again(fake_redis):
    """Found by the twelfth session's review: the route asked again, and a hung Redis made the 503 wait out its
    socket timeout (and retry) twice."""
    client, admission = _refusing_client(fake_redis)
    calls = []

    def hung(*args):
        calls.append(args)
        raise redis.TimeoutError("Timeout reading from socket")

    admission.queue.share_backlog = hung
    response = client.post("/predict", data={"image": [(io.BytesIO(b"x"), "x.jpg")]})
    assert response.status_code == 503 and response.get_json()["reason"] == "redis_unavailable"
    assert len(calls) == 1


def test_an_unexpected_error_while_weighing_early_is_the_route_s_500(fake_redis, monkeypatch):
    client, admission = _refusing_client(fake_redis)
    monkeypatch.setattr(admission, "refuses", lambda remaining: 1 / 0)
    monkeypatch.setattr(admission, "check", lambda *args, **kwargs: 1 / 0)
    response = client.post("/predict", data={"image": [(io.BytesIO(b"x"), "x.jpg")]}, headers={"X-Request-Id": "r1"})
    assert response.status_code == 500 and response.headers["X-Request-Id"] == "r1"


def test_refuses_is_check_s_refusal_of_one_image_and_counts_nothing(fake_redis):
    admission = admission_on(fake_redis, 39, [5.0])  # 8 s of work ahead
    assert admission.refuses(remaining=10.5) is None  # 8 s <= 0.8 x 10.5 s
    assert admission.refuses(remaining=9.9).reason == "expected_wait"  # 8 s > 0.8 x 9.9 s
    assert admission.refuses(remaining=0).reason == "deadline"
    assert (admission.preparing, admission.preparing_images) == (0, 0)
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=9.9)
    assert refused.value == admission.refuses(remaining=9.9)


def test_a_request_with_nothing_ahead_is_tried_whatever_its_estimate_and_is_504_at_its_deadline(
    fake_redis, monkeypatch
):
    """Found by the fifth and sixth hostile reviews: refused on its own estimate with nothing ahead, a request was
    told to retry (503) and refused again, for ever; and an estimate inflated by one stall or one huge image
    refused every later request of an idle process, which then never measured afresh. Now it is tried: an idle
    process, 0.1 s an image, 16 images (1.6 s, estimated 0.8 s on 2 threads) and 0.45 s to live."""
    client, admission = _client_with_a_worker(fake_redis, request_timeout=0.45)
    admission.decoders = 2
    admission.prepared(0.1)
    decoded = []

    def slow(data, max_pixels):
        decoded.append(data)
        time.sleep(0.1)
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(helpers, "prepare_image", slow)
    response = _send(client, "/v2/models/efficientnet_lite0/infer", [b"img"] * 16)
    assert response.status_code == 504 and "images prepared by then" in response.get_json()["error"]
    assert "Retry-After" not in response.headers and not admission.queue.length()
    assert 1 <= len(decoded) < 16 and (admission.preparing, admission.preparing_images) == (0, 0)


def _timeouts():
    return REGISTRY.get_sample_value("imgclf_timeouts_total") or 0


def test_every_504_is_counted_in_imgclf_timeouts_total(fake_redis, monkeypatch):
    """Found by the sixth hostile review: the 504s answered before anything was queued counted nowhere."""
    client, admission = _client_with_a_worker(fake_redis, request_timeout=30)
    before = _timeouts()
    body, length = triton_request([b"img"], timeout=1)  # 1 us: its time ran out before it was looked at
    v2 = "/v2/models/efficientnet_lite0/infer"
    assert client.post(v2, data=body, headers={"Inference-Header-Content-Length": str(length)}).status_code == 504

    def slow(data, max_pixels):
        time.sleep(0.4)
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(helpers, "prepare_image", slow)
    arrived = {submission.ARRIVED: time.monotonic()}
    two = {"image": [(io.BytesIO(b"%d" % i), "x.jpg") for i in range(2)]}  # its deadline comes between them
    assert client.post("/predict?timeout=0.3", data=two, environ_base=arrived).status_code == 504
    arrived = {submission.ARRIVED: time.monotonic()}
    one = {"image": [(io.BytesIO(b"1"), "x.jpg")]}  # its deadline comes once it is decoded, before it is queued
    assert client.post("/predict?timeout=0.3", data=one, environ_base=arrived).status_code == 504
    assert _timeouts() == before + 3 and not admission.queue.length()


@pytest.mark.parametrize("route", ["/predict", "/v2/models/efficientnet_lite0/infer"])
def test_a_request_s_images_are_in_the_backlog_until_each_is_prepared(fake_redis, monkeypatch, route):
    config = Settings(wait_mode="poll")
    client = web.create_app(config, fake_redis, ResultWaiter(fake_redis, config)).test_client()
    WorkerRegistry(fake_redis, JobQueue(fake_redis, config), config.heartbeat_ttl).beat(
        "w", {"model": "efficientnet_lite0", "ready": 1}
    )
    seen = []

    def refuse(data, max_pixels):  # the backlog as each image is decoded; the third one's 400 ends the request
        seen.append(submission.service().admission.preparing_images)
        if len(seen) == 3:
            raise helpers.ImageError("not today")
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(helpers, "prepare_image", refuse)
    images = [CASTLE.read_bytes()] * 3
    if route == "/predict":
        response = client.post(route, data={"image": [(io.BytesIO(i), "x.jpg") for i in images]})
    else:
        body, length = triton_request(images)
        response = client.post(route, data=body, headers={"Inference-Header-Content-Length": str(length)})
    assert response.status_code == 400 and "not today" in response.get_data(as_text=True)
    assert seen == [3, 2, 1]  # all of them from the start (the form's once it is read), then one fewer each
    admission = client.application.extensions["image_classifier"].admission
    assert (admission.preparing, admission.preparing_images) == (0, 0)


def test_the_local_backlog_is_shared_by_the_decoding_threads_and_timed_per_image(fake_redis):
    admission = admission_on(fake_redis, 0, [None])
    admission.decoders = 2
    admission.prepared(0.1)  # one image took 0.1 s from its own start: the time it waited is not in it
    for _ in range(20):  # 20 images ahead and its own, two decoded at a time: 1.05 s
        admission.check(remaining=30)
    admission.check(remaining=1.35)  # 1.05 s <= 0.8 * 1.35 s
    with pytest.raises(Refusal):
        admission.check(remaining=1.3)  # 1.1 s (one more ahead now) > 0.8 * 1.3 s


@pytest.mark.parametrize(
    "queued, seconds, here, remaining",
    [
        # One worker at 10 images/s, nothing queued; 40 images admitted here, to be decoded at 1 ms each on two
        # threads. Their jobs reach the queue before a new request's does, so it waits for the workers to get
        # through them all: 4.1 s (4.2 s with one more ahead). Counted as decoding only, it was 0.02 s + its own
        # 0.1 s, and it was admitted.
        pytest.param(0, 0.001, 40, 5.2, id="as_jobs_ahead_in_the_queue"),
        # 10 jobs queued, 20 images here at 0.4 s each on two threads. The new job is queued once its image and the
        # 20 are decoded, 4.2 s; by then the workers have long been through the 10 and are at most through the 20
        # as they come: it is done 0.1 s later, 4.3 s (4.5 s with one more ahead), not after 4.2 s + 1.1 s.
        pytest.param(10, 0.4, 20, 5.4, id="overlapping_the_queue_ahead_rather_than_added_to_it"),
    ],
)
def test_images_admitted_here_and_not_yet_queued_count_in_both_stages(fake_redis, queued, seconds, here, remaining):
    admission = admission_on(fake_redis, queued, [10.0])
    admission.decoders = 2
    admission.prepared(seconds)
    admission.check(remaining=30, images=here)
    admission.check(remaining=remaining)  # fits 0.8 x remaining
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=remaining)  # one more image ahead now: no longer
    assert refused.value.reason == "expected_wait"


def test_the_queue_cap_counts_the_jobs_this_process_is_still_preparing(fake_redis):
    admission = admission_on(fake_redis, 5, [None], max_queue_length=10)  # no throughput: only the cap refuses
    admission.check(remaining=30, images=4)  # 5 queued + 4 <= 10
    admission.check(remaining=30)  # 5 + 4 being prepared + 1 <= 10
    with pytest.raises(Refusal) as refused:
        admission.check(remaining=30)  # 5 + 5 + 1 > 10: they will all be in the queue before this one
    assert refused.value.reason == "queue_full" and "5 of them being prepared here" in str(refused.value)


def test_a_job_a_worker_sheds_is_refused_503_with_retry_after_not_left_to_time_out(real_redis, config):
    """The worker measured that it could not finish the request's two jobs by their deadline: it runs one (a
    batch is never shed whole, see below) and sheds the other, and the request is refused like one admission
    refused, at once."""
    config = config.replace(wait_mode="poll", poll_interval=0.05, block_timeout=0.2, request_timeout=20)
    client = web.create_app(config, real_redis, ResultWaiter(real_redis, config)).test_client()
    worker = Worker(CountingClassifier(), config, name="swamped")
    worker.throughput.add(1, 60.0)  # a minute an image: nothing due within 20 s can be done in time
    shedder = threading.Thread(target=lambda: wait_for(lambda: worker.run_once(), 10, "a job to shed"))
    shedder.start()
    images = [(io.BytesIO(CASTLE.read_bytes()), "a.jpg"), (io.BytesIO(CASTLE.read_bytes()), "b.jpg")]
    response = client.post("/predict", data={"image": images})
    shedder.join()
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.get_json()["reason"] == "shed" and "deadline" in response.get_json()["error"]
    assert len(worker.classifier.seen) == 1 and worker.counts["expired"] == 1


def test_one_slow_batch_does_not_make_a_worker_shed_everything_after_it(real_redis, config):
    """A batch took 40 s once (a stall). Requests with 30 s to live keep coming: the worker runs at least one
    job of each batch, so its measurement recovers, and it soon runs them all again."""
    config = config.replace(block_timeout=0.2)
    queue = JobQueue(real_redis, config)
    worker = Worker(CountingClassifier(), config, name="stalled-once")
    worker.throughput.add(4, 40.0)
    ran = []
    for _ in range(6):
        before = len(worker.classifier.seen)
        batch = [jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30) for _ in range(4)]
        queue.enqueue(*(jobs.encode_job(job) for job in batch))
        assert worker.run_once() == 4
        ran.append(len(worker.classifier.seen) - before)
    assert min(ran) >= 1 and ran[-1] == 4, ran


def test_predict_refuses_a_hopeless_request_at_once_and_queues_nothing(fake_redis):
    admission_on(fake_redis, 39, [10.0])
    config = Settings(wait_mode="poll", request_timeout=3)
    client = web.create_app(config, fake_redis, ResultWaiter(fake_redis, config)).test_client()
    refused_before = REGISTRY.get_sample_value("imgclf_rejected_total", {"reason": "expected_wait"}) or 0
    response = client.post(
        "/predict", data={"image": (io.BytesIO(CASTLE.read_bytes()), "c.jpg")}, content_type="multipart/form-data"
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "2"
    assert response.get_json()["reason"] == "expected_wait"
    assert fake_redis.llen(KEYS.queue) == 39
    assert REGISTRY.get_sample_value("imgclf_rejected_total", {"reason": "expected_wait"}) == refused_before + 1


# -- the worker's side: throughput it publishes, jobs it skips ---------------------------------------------------
def test_throughput_is_a_moving_average_of_busy_time():
    throughput = Throughput()
    assert throughput.rate == 0.0
    throughput.add(4, 0.5)
    assert throughput.rate == pytest.approx(8.0)
    for _ in range(50):
        throughput.add(1, 0.5)
    assert throughput.rate == pytest.approx(2.0, rel=0.01)


def test_a_throughput_measured_one_image_at_a_time_follows_the_second_not_the_last_few_images():
    """Single-image batches (BATCH_SIZE=1) alternate 0.15 s at 100 images/s and 0.15 s at 33, as when the web tier
    takes the CPU and gives it back: the rate admission reads stays near the mean of the two instead of swinging
    with them (with a fifth per batch it swung between 0.64x and 1.43x of it, and admission with it). A real
    change is still followed within about a second of busy time."""
    throughput, busy, seen = Throughput(), 0.0, []
    while busy < 4:
        for batches, seconds in ((15, 0.010), (5, 0.030)):
            for _ in range(batches):
                throughput.add(1, seconds)
                busy += seconds
                if busy > 2:
                    seen.append(throughput.rate)
    mean = 20 / 0.3
    assert 0.9 * mean < min(seen) and max(seen) < 1.1 * mean, (min(seen), max(seen))
    for _ in range(50):  # a second at half the speed
        throughput.add(1, 0.03)
    assert throughput.rate < 0.8 * mean


def test_worker_skips_jobs_marked_cancelled_and_counts_them(real_redis, config):
    config = config.replace(block_timeout=0.2)
    queue = JobQueue(real_redis, config)
    gone = jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)
    wanted = jobs.Job(np.ones(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)
    for job in (gone, wanted):
        queue.enqueue(jobs.encode_job(job))
    real_redis.set(KEYS.cancelled(gone.id), "1", ex=60)
    classifier = CountingClassifier()
    worker = Worker(classifier, config, name="thrifty")
    assert worker.run_once() == 2
    assert classifier.seen == [1 + 256]  # only the wanted job reached the model
    assert not real_redis.exists(KEYS.result(gone.id)) and real_redis.exists(KEYS.result(wanted.id))
    assert worker.counts["cancelled"] == 1 and not real_redis.exists(KEYS.processing("thrifty"))
    assert float(worker.heartbeat_info()["images_per_s"]) > 0


class _SlowClassifier(CountingClassifier):
    delay = 0.002

    def predict(self, pixels):
        time.sleep(self.delay)
        return super().predict(pixels)


def test_a_worker_measures_its_throughput_until_the_batch_is_acknowledged_not_until_the_model_is_done(
    real_redis, config
):
    """Admission divides the work queued by this rate: the answers and the acknowledgement are part of what each
    job costs the worker, and a rate measured without them promises more than the worker serves."""
    queue = JobQueue(real_redis, config)
    worker = Worker(_SlowClassifier(), config.replace(block_timeout=0.2), name="acknowledging")
    worker.classifier.delay = 0.05
    finish = worker.queue.finish

    def slow_finish(*args):
        time.sleep(0.05)  # as long as the model took
        return finish(*args)

    worker.queue.finish = slow_finish
    queue.enqueue(jobs.encode_job(jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)))
    assert worker.run_once() == 1
    assert worker.throughput.rate < 1 / 0.1  # one image in the model's 0.05 s and the finish's 0.05 s, at least


@pytest.mark.parametrize("step", ["finish", "load"])
def test_a_worker_does_not_take_the_time_redis_was_away_during_a_batch_for_work(real_redis, config, step):
    """Found by review: a minute's outage during a finish made the rate 0.016 images/s when Redis came back, and
    admission refused nearly everything until it was measured away. The same held for the read of the batch's
    pixels (`_load`'s MGET)."""
    queue = JobQueue(real_redis, config)
    worker = Worker(_SlowClassifier(), config.replace(block_timeout=0.2), name="outlasting")
    worker.classifier.delay = 0.05
    owner = worker.queue if step == "finish" else worker.redis
    name = "finish" if step == "finish" else "mget"
    call, failures = getattr(owner, name), iter([redis.ConnectionError("Redis is away")])

    def after_an_outage(*args):
        for failure in failures:
            raise failure  # then the worker backs off 0.1 s and tries again
        return call(*args)

    setattr(owner, name, after_an_outage)
    queue.enqueue(jobs.encode_job(jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)))
    assert worker.run_once() == 1
    assert next(failures, None) is None  # the outage happened
    assert worker.throughput.rate > 1 / 0.1  # the model's 0.05 s and the tries that landed, not the 0.1 s away


def test_a_long_batch_weighs_a_fifth_as_before_not_by_its_duration_alone():
    """Batches of ResNet50 (1.2 s): weighed by its duration alone, one 6 s batch would make the rate 0.22x."""
    throughput = Throughput()
    for _ in range(50):
        throughput.add(32, 1.0)
    throughput.add(32, 6.0)
    assert throughput.rate == pytest.approx(0.5 * 32, rel=0.01)  # (4 x 32 + 32) / (4 x 1 + 6), the fifth of before
    assert throughput.seconds_for(32) == pytest.approx((0.8 * 5 + 6) / (0.8 * 5 + 1), rel=0.01)  # the average batch


def test_a_worker_publishes_a_throughput_that_moved_at_once_not_at_its_next_heartbeat(real_redis, config):
    """Admission reads the workers' images/s from their heartbeats (the heartbeat thread does not run here)."""
    queue = JobQueue(real_redis, config)
    worker = Worker(_SlowClassifier(), config.replace(block_timeout=0.2), name="moving")
    worker.RATE_BEAT_MIN_INTERVAL = 0  # the at-most-twice-a-second bound is not what this test is about

    def published():
        return float(real_redis.hget(KEYS.heartbeat("moving"), "images_per_s") or 0)

    def one_batch():
        queue.enqueue(jobs.encode_job(jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30)))
        assert worker.run_once() == 1

    one_batch()
    first = published()
    assert first == round(worker.throughput.rate, 3) > 0  # the first rate measured, at once
    worker.classifier.delay = 0.1  # the model slows down, as it does when the web tier takes its CPU
    one_batch()
    assert published() == round(worker.throughput.rate, 3) < first / 2
    worker.throughput.add(1, 1 / (1.05 * worker.throughput.rate))  # a batch 5 % faster: not worth a beat
    worker._beat_if_throughput_moved()
    assert published() != round(worker.throughput.rate, 3)


# -- real processes ----------------------------------------------------------------------------------------------
def raw_request(url, path=CASTLE):
    prepared = requests.Request("POST", f"{url}/predict", files={"image": ("c.jpg", path.read_bytes())}).prepare()
    head = "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items())
    return f"POST /predict HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + prepared.body


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def metric(url, name):
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.mark.slow
def test_a_job_whose_client_hung_up_is_skipped_by_the_worker(service, real_redis, config):
    service.start_web()  # no worker yet: the job waits in the queue
    client = connect(service.port)
    client.sendall(raw_request(service.url))
    wait_for(lambda: real_redis.llen(KEYS.queue) == 1, 10, "the job to be queued")
    client.close()  # the client gives up
    wait_for(lambda: real_redis.keys(KEYS.cancelled("*")), 10, "the web server to mark the job cancelled")
    assert metric(service.url, "imgclf_cancelled_total") == 1
    classifier = CountingClassifier()
    worker = Worker(classifier, config.replace(block_timeout=0.2), name="late-comer")
    assert worker.run_once() == 1
    assert classifier.seen == [] and worker.counts["cancelled"] == 1
    assert not real_redis.keys(KEYS.result("*"))


def run_stress_tool(*args):
    done = subprocess.run(
        [sys.executable, "stress_test.py", "--no-progress", "--image", str(CASTLE), "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
def test_at_twice_its_capacity_every_request_is_answered_in_time(service):
    deadline = 3.0
    service.start_worker(BATCH_SIZE="1")  # one image at a time: a capacity this machine can flood
    service.start_web(REQUEST_TIMEOUT=str(deadline))
    url = f"{service.url}/predict"
    # Capacity, measured closed loop; it also gives the worker's published throughput something to go on.
    closed = stress_test.summarize(stress_test.run(url, CASTLE.read_bytes(), 64, concurrency=8))
    assert closed["succeeded"] == 64
    capacity = closed["throughput_rps"]
    code, summary = run_stress_tool(
        "--url", url, "--rate", f"{2 * capacity:.2f}", "--duration", "8", "--deadline", str(deadline)
    )
    overload = summary["overload"]
    print(json.dumps({"capacity_rps": capacity, **overload}))
    assert overload["client_timeouts"] == 0 and overload["client_errors"] == 0
    # Every request answered, or refused. A 504 means an admitted job missed its deadline after all (the
    # throughput the rule relies on is measured on the past, on a shared machine): a rare miss, still on time.
    # With the rate over a second of busy time until the acknowledgement: none in 7 of 8 runs, 11 of 1053 in the
    # other, after a second of stall. Before, with a fifth per batch until the model was done: 504s in 6 of 15
    # runs, over 5 % in 3.
    statuses = summary["by_status"]
    assert set(statuses) <= {"200", "503", "504"}, statuses
    assert statuses.get("504", 0) <= 0.05 * summary["requests"], statuses
    assert overload["late"] == 0  # none after REQUEST_TIMEOUT + 1 s
    assert overload["rejected_503"] > 0 and overload["rejected_with_retry_after"] == overload["rejected_503"]
    assert overload["on_time_200"] >= 0.25 * capacity * 8  # goodput held (a loose bound: the machine is shared)
    assert code == 0


_OVERLOAD_SECONDS = 20


def _at_three_times_the_capacity(service, **web_settings):
    """A worker with batches of 32 and a web server with a 10 s deadline, its capacity measured closed loop, then
    _OVERLOAD_SECONDS of arrivals at three times it: (the web server, capacity, the load tool's exit status, its
    summary)."""
    deadline, seconds = 10.0, _OVERLOAD_SECONDS
    service.start_worker()
    web = service.start_web(REQUEST_TIMEOUT=str(deadline), **web_settings)
    url = f"{service.url}/predict"
    closed = stress_test.summarize(stress_test.run(url, CASTLE.read_bytes(), 256, concurrency=32))
    assert closed["succeeded"] == 256
    capacity = closed["throughput_rps"]
    code, summary = run_stress_tool(
        "--url", url, "--rate", f"{3 * capacity:.2f}", "--duration", str(seconds), "--deadline", str(deadline)
    )
    print(json.dumps({"capacity_rps": capacity, **summary["overload"]}))
    return web, capacity, code, summary


@pytest.mark.slow
def test_when_one_web_process_is_what_falls_behind_no_admitted_request_misses_its_deadline(service):
    """Batches of 32 on EfficientNet-Lite0: the model outpaces one web process's decoding, so at three times the
    capacity the images admitted and still to be decoded pile up in the web process, not in the queue. The
    admission used to count them as local work only, not as jobs that would be queued ahead of the new one: it
    kept admitting, and 1562 of 6030 requests ended in 504 at their deadline (goodput 0.69x capacity).
    Later it failed 2 of about 15 runs on an Intel Xeon (20 and 85 504s): each refusal cost the process 1.1-1.2 ms
    of CPU, and once it refused 250 a second its backlog drained 2-3x slower than at the onset, when the admission
    had measured it. Refused before Flask reads the form (web._RefuseEarly): no 504 in 5 runs, against 70 in 1
    of 5 interleaved with the code before."""
    web, capacity, code, summary = _at_three_times_the_capacity(service)
    overload, statuses, seconds = summary["overload"], summary["by_status"], _OVERLOAD_SECONDS
    assert set(statuses) <= {"200", "503"}, statuses  # no 504: every admitted request answered in its time
    assert metric(service.url, 'imgclf_rejected_total{reason="shed"}') in (None, 0.0)  # nor shed at the worker
    assert overload["late"] == 0 and overload["client_timeouts"] == 0 and overload["client_errors"] == 0
    assert overload["rejected_503"] > 0 and overload["on_time_200"] >= 0.25 * capacity * seconds
    assert code == 0 and web.poll() is None


@pytest.mark.slow
def test_two_web_processes_count_each_others_backlog_and_few_admitted_requests_miss_their_deadline(service):
    """As above, with two web processes (WEB_PROCESSES=2, as the Kubernetes manifests run two web replicas): each
    one's images admitted and not yet queued are ahead of a request the other admits. Counting only its own, each
    admitted on a short queue: 86, 24 and 133 504s of about 4700 requests in three runs; counting both, 3, 7 and 9
    (1 and 0 in two later runs).
    Not none, as with one process: two web processes and a worker on two cores fall seconds behind in taking
    requests in (refusals p95 0.9-2.1 s in those runs), and the records they share are up to 0.1 s old."""
    _, capacity, code, summary = _at_three_times_the_capacity(service, WEB_PROCESSES="2")
    overload, statuses, seconds = summary["overload"], summary["by_status"], _OVERLOAD_SECONDS
    assert set(statuses) <= {"200", "503", "504"}, statuses
    assert statuses.get("504", 0) <= 0.01 * summary["requests"], statuses
    assert overload["client_timeouts"] == 0 and overload["client_errors"] == 0
    assert overload["rejected_503"] > 0 and overload["on_time_200"] >= 0.25 * capacity * seconds


@pytest.mark.slow
def test_stalled_clients_do_not_starve_the_others_and_are_cut_off(service):
    read_timeout = 5
    service.start_worker()
    service.start_web(CLIENT_READ_TIMEOUT=str(read_timeout))
    assert post(service.url).status_code == 200
    request = raw_request(service.url)
    stalls = {"nothing": b"", "half a request line": request[:20], "headers, then part of the body": request[:400]}
    stalled = []
    for i in range(300):
        kind = list(stalls)[i % 3]
        sock = connect(service.port)
        sock.sendall(stalls[kind])
        stalled.append((kind, sock))
    opened = time.monotonic()
    # The others are served as usual; the client timeouts are the bound, and it is a generous one.
    assert requests.get(f"{service.url}/health/live", timeout=3).status_code == 200
    assert post(service.url, timeout=5).status_code == 200
    assert time.monotonic() - opened < read_timeout  # the stalled connections were all still there meanwhile
    answers = {}
    for kind, sock in stalled:
        data = sock.recv(200)
        answers.setdefault(kind, set()).add(data.split(b"\r\n")[0].decode())
        sock.close()
    assert answers == {
        "nothing": {""},  # closed: no request ever began
        "half a request line": {"HTTP/1.1 408 Request Timeout"},
        "headers, then part of the body": {"HTTP/1.1 408 Request Timeout"},
    }
    assert requests.get(f"{service.url}/health/live", timeout=3).status_code == 200
    # A 408 to a POST /predict whose body never came is one of its answers; one before the request line is not.
    text = requests.get(f"{service.url}/metrics", timeout=10).text
    assert sample(text, "imgclf_requests_total", '{endpoint="predict",status="408"}') == 100
    assert sample(text, "imgclf_read_timeouts_total", '{answer="408"}') == 200


@pytest.mark.slow
def test_a_chunked_body_is_counted_as_it_comes_so_the_limit_not_the_budget_decides(service):
    """MAX_BUFFERED_BYTES may equal MAX_UPLOAD_BYTES. Found by review: a chunked body was counted a whole read ahead
    (up to 3.4 times what it held), so one of the largest size, alone on the process, was refused 503 `uploads_full`
    instead of being read (and answered 400 here: it is no form), and one past the limit instead of 413."""
    service.start_web(MAX_BUFFERED_BYTES="150000", MAX_UPLOAD_BYTES="150000")

    def chunked(size):
        client = connect(service.port)
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, size, 65536):
            piece = b"x" * min(65536, size - start)
            client.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        client.sendall(b"0\r\n\r\n")
        status = client.recv(65536).split(b"\r\n")[0]
        client.close()
        return status

    assert chunked(150000).upper() == b"HTTP/1.1 400 BAD REQUEST"
    assert chunked(150001).upper() == b"HTTP/1.1 413 REQUEST ENTITY TOO LARGE"


@pytest.mark.slow
def test_a_body_of_one_byte_chunks_does_not_freeze_the_web_process(service):
    """Found by review: gunicorn parses a chunked body in Python, a few microseconds a chunk, and a read that finds
    its data waiting never yields to the other greenlets. One upload of a million one-byte chunks, sent at once,
    held every other request of the process (and its deadline timers) for the seconds it took to parse."""
    service.start_web()  # no worker: the upload's own answer is a 400 at best, what counts is everyone else's
    chunks = 1_000_000
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    answered = {}

    def upload():
        client = connect(service.port)
        client.sendall(head + b"1\r\nx\r\n" * chunks + b"0\r\n\r\n")
        client.settimeout(120)
        client.recv(65536)
        answered["upload"] = time.monotonic()
        client.close()

    sender = threading.Thread(target=upload)
    sender.start()
    pings = 0
    while sender.is_alive():
        assert requests.get(f"{service.url}/health/live", timeout=120).status_code == 200
        if "upload" not in answered:
            pings += 1
    sender.join()
    # Read in one call, 8 pings were answered while the body was parsed, about one a second; yielding with
    # gevent.sleep(0) between slices, 17; now hundreds.
    assert pings >= 50, pings


@pytest.mark.slow
def test_the_bodies_a_process_holds_are_bounded_and_a_waiting_request_holds_none(service, real_redis):
    """Found by review: uploads stopped short of their announced length each held their body until their 408, and
    nothing bounded the sum short of WEB_CONNECTIONS x MAX_UPLOAD_BYTES (20 GB). Room here for two castle uploads and
    40 KB: two stalled just short of their end fill it, and a third is refused 503 `uploads_full`; one that asks
    before it sends (Expect: 100-continue) is refused before it is invited. Once the two have arrived and wait for
    their answers (no worker), they hold their pixels, not their bodies, and another upload is let in; so it is
    beside clients that sent only headers announcing bodies of 90 KB: they hold what their first read may take
    (16 KiB), not what they announced (the first fix counted that, and 26 such connections filled 256 MiB)."""
    request = raw_request("http://127.0.0.1")
    head, _, body = request.partition(b"\r\n\r\n")
    service.start_web(MAX_BUFFERED_BYTES=str(2 * len(body) + 40_000), MAX_UPLOAD_BYTES="150000", REQUEST_TIMEOUT="20")

    def upload():
        with CASTLE.open("rb") as image:
            return requests.post(f"{service.url}/predict?timeout=1", files={"image": image}, timeout=10)

    for _ in range(4):  # answered without reaching the images' preparation: each gives its room back all the same
        bad = requests.post(f"{service.url}/predict", files={"image": ("c.jpg", b"x" * len(body))}, timeout=10)
        assert bad.status_code == 400, bad.text
    stalled = [connect(service.port) for _ in range(2)]
    for sock in stalled:
        sock.sendall(request[:-100])
    answers = []
    wait_for(lambda: answers.append(upload()) or answers[-1].status_code == 503, 10, "the stalled ones to hold room")
    assert answers[-1].json()["reason"] == "uploads_full" and answers[-1].headers["Retry-After"] == "1"
    asking = connect(service.port)
    asking.sendall(head.replace(b"\r\nHost: x", b"\r\nHost: x\r\nExpect: 100-continue") + b"\r\n\r\n")
    assert asking.recv(65536).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")  # not "100 Continue"
    asking.close()
    for sock in stalled:
        sock.sendall(request[-100:])
    wait_for(lambda: real_redis.llen(KEYS.queue) == 2, 10, "the two to be queued")
    assert upload().status_code == 504  # let in: no worker to answer it within its second
    announcing = [connect(service.port) for _ in range(3)]
    for sock in announcing:
        sock.sendall(head.replace(str(len(body)).encode(), b"90000") + b"\r\n\r\n")
    time.sleep(0.5)  # their first reads are waiting
    assert upload().status_code == 504
    for sock in (*stalled, *announcing):
        sock.close()


@pytest.mark.slow
def test_a_request_gunicorn_cannot_read_is_answered_in_json_like_every_other_error(service):
    service.start_web()
    framing = {
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n": (400, "chunk"),  # a chunk size that is not hex
        b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n": (400, "CONTENT-LENGTH"),
        b"Transfer-Encoding: xchunked\r\n\r\n": (501, "xchunked"),  # gunicorn's own page said "501 Bad Request"
    }
    for headers, (status, text) in framing.items():
        client = connect(service.port)
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n" + headers)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        client.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", answer
        assert "Content-Type: application/json" in lines
        assert json.loads(body)["success"] is False and text in json.loads(body)["error"], body


@pytest.mark.slow
def test_a_client_still_sending_a_request_gunicorn_cannot_read_is_not_reset_before_it_reads_the_answer(service):
    """gunicorn closes such a connection with the rest of the request unread: the client's next send was reset,
    and a TCP that receives a reset may drop the answer it had not read yet. Now the server half-closes and lets
    the client stop (at most LINGER_SECONDS)."""
    service.start_web()
    client = connect(service.port)
    client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    client.settimeout(0.1)
    answer, ended = b"", None
    for _ in range(40):  # the client goes on sending, 8 KB every 50 ms, reading what comes
        try:
            client.sendall(b"x" * 8192)
            time.sleep(0.05)
            data = client.recv(65536)
        except TimeoutError:
            continue
        except OSError as exc:
            ended = type(exc).__name__
            break
        if not data:
            ended = "end of stream"
            break
        answer += data
    client.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request") and ended == "end of stream", (answer[:40], ended)


@pytest.mark.slow
def test_the_deadline_counts_from_the_connection_not_from_when_the_app_sees_the_request(service):
    deadline = 3.0
    service.start_web(REQUEST_TIMEOUT=str(deadline))  # no worker: nothing will answer but the deadline
    request = raw_request(service.url)
    client = connect(service.port)
    connected = time.monotonic()
    client.sendall(request[:400])
    for i in range(400, len(request), len(request) // 8):  # the body trickles in over about 2 s
        time.sleep(0.25)
        client.sendall(request[i : i + len(request) // 8])
    status = client.recv(200).split(b"\r\n")[0]
    answered_after = time.monotonic() - connected
    client.close()
    assert status.split()[1] == b"504", status
    # Counted from when the app got the body, the answer would come about 2 s + 3 s after connecting.
    assert answered_after < deadline + 1, answered_after


# The scenarios below run under gevent's patching, as gunicorn's worker does (the decoding threads are used only
# then), each in a process of its own after this preamble: an app on fakeredis with a live worker's heartbeat,
# REQUEST_TIMEOUT from the command line, and `infer` (V2) and `predict` posting images with a WSGI environ.
_UNDER_GEVENT = r"""
from gevent import monkey
monkey.patch_all()
import io, json, sys, time
sys.path[:0] = [sys.argv[1] + "/tests", sys.argv[1]]
import fakeredis, gevent, numpy as np
import helpers, submission, web
from job_queue import JobQueue
from notifications import ResultWaiter
from settings import Settings
from test_open_inference import triton_request
from worker_registration import WorkerRegistry

sleep = monkey.get_original("time", "sleep")
r = fakeredis.FakeRedis()
config = Settings(wait_mode="poll", request_timeout=float(sys.argv[2]))
app = web.create_app(config, r, ResultWaiter(r, config))
WorkerRegistry(r, JobQueue(r, config), config.heartbeat_ttl).beat("w", {"model": "efficientnet_lite0", "ready": 1})
admission = app.extensions["image_classifier"].admission

def infer(images, **environ):
    body, length = triton_request(images)
    return app.test_client().post("/v2/models/efficientnet_lite0/infer", data=body, environ_base=environ,
                                  headers={"Inference-Header-Content-Length": str(length)})

def predict(image, **environ):
    return app.test_client().post("/predict", data={"image": [(io.BytesIO(image), "x.jpg")]}, environ_base=environ)
"""


def _under_gevent(scenario, request_timeout, *args, stderr=False):
    """What `scenario` printed last, as JSON, run after _UNDER_GEVENT in a process of its own (and what it wrote to
    stderr, when asked)."""
    run = subprocess.run(
        [sys.executable, "-c", _UNDER_GEVENT + scenario, str(ROOT), str(request_timeout), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    return (seen, run.stderr) if stderr else seen


# A V2 batch of 16 images, 50 ms each, is admitted with 1.5 s to live; then 48 one-image /predict requests come in.
_BATCH_THEN_NEWCOMERS = r"""
prepared = {}
def prepare_image(data, max_pixels):  # 50 ms in a decoding thread, the GIL let go as Pillow does
    sleep(0.05)
    prepared[data] = time.monotonic()
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.prepared(0.05)  # measured already
began = time.monotonic()
batch = gevent.spawn(infer, [b"A%02d" % i for i in range(16)], **{submission.ARRIVED: began})
gevent.sleep(0.1)
def newcomer(i):
    arrived = time.monotonic()
    status = predict(b"n%02d" % i, **{submission.ARRIVED: arrived}).status_code
    return status, prepared.get(b"n%02d" % i, arrived) - arrived
newcomers = [gevent.spawn(newcomer, i) for i in range(48)]
gevent.joinall(newcomers + [batch])
print(json.dumps({"batch": max(v for k, v in prepared.items() if k.startswith(b"A")) - began,
                  "threads": admission.decoders, "newcomers": [g.value for g in newcomers],
                  "counts": [admission.preparing, admission.preparing_images]}))
"""


def test_requests_admitted_later_never_push_an_admitted_one_past_its_deadline():
    seen = _under_gevent(_BATCH_THEN_NEWCOMERS, 1.5)
    assert seen["threads"] == 2 and seen["counts"] == [0, 0], seen
    # Its 16 images on two threads take 0.4 s; when one newcomer's image could jump ahead of each of the
    # batch's, 47 were admitted and the batch's images were prepared after 2.0 s of its 1.5.
    assert seen["batch"] < 1.0, seen
    admitted = [waited for status, waited in seen["newcomers"] if status != 503]
    assert admitted and all(waited < 1.5 for waited in admitted), seen  # each admitted one prepared in its time
    assert any(status == 503 for status, _ in seen["newcomers"]), seen  # and those that would not be, refused


# One image, decoded in 20 ms; meanwhile a greenlet keeps the process busy for 0.5 s without yielding.
_BUSY_PROCESS = r"""
handed = []
def prepare_image(data, max_pixels):  # 20 ms in a decoding thread, the GIL let go as Pillow does
    handed.append(time.monotonic())
    sleep(0.02)
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.preparation_seconds = 0.0  # nothing measured yet: the first image's time is taken as it is
request = gevent.spawn(predict, b"x", **{submission.ARRIVED: time.monotonic()})
while not handed:
    gevent.sleep(0.001)
end = time.monotonic() + 0.5
while time.monotonic() < end:  # the process's other requests, say: its hub runs nothing else meanwhile
    pass
gevent.sleep(0.1)
print(json.dumps({"timed": admission.preparation_seconds}))
request.kill()
"""


def test_an_image_s_time_counts_until_its_request_has_it_back_not_only_its_decoding():
    """The lanes take their next image once the last one's outcome is back in the process: on a busy process
    that took longer than the decoding itself. Timed in the thread (20 ms here), the local backlog looked 4 s
    shorter than it was at the onset of an overload."""
    seen = _under_gevent(_BUSY_PROCESS, 5.0)
    assert seen["timed"] >= 0.4, seen


# Three gzip V2 requests whose inflating holds its OS thread for 0.3 s each, as zlib's C code does without the GIL;
# then a /predict whose image takes 20 ms. A ticker greenlet stands for the process's other requests.
_SLOW_INFLATES = r"""
import gzip, open_inference
inflated, ticks, prepared = [], [], []
real_inflate = open_inference.inflate
def inflate(body, encoding, limit):
    began = time.monotonic()
    sleep(0.3)
    inflated.append((began, time.monotonic()))
    return real_inflate(body, encoding, limit)
open_inference.inflate = inflate
real_prepare = helpers.prepare_image
def prepare_image(data, max_pixels):
    if data != b"y":
        return real_prepare(data, max_pixels)
    sleep(0.02)
    prepared.append(time.monotonic())
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)
gevent.spawn(ticker)
body, length = triton_request([b"x"])
def compressed(data):
    return app.test_client().post("/v2/models/efficientnet_lite0/infer", data=data,
                                  headers={"Inference-Header-Content-Length": str(length), "Content-Encoding": "gzip"},
                                  environ_base={submission.ARRIVED: time.monotonic()})
requests = [gevent.spawn(compressed, gzip.compress(body)) for _ in range(3)]
gevent.sleep(0.05)
image = gevent.spawn(predict, b"y", **{submission.ARRIVED: time.monotonic()})
gevent.joinall(requests, timeout=5)
corrupt = compressed(gzip.compress(body)[:-9])
image.kill()
first_began, first_ended = inflated[0]
print(json.dumps({"ticks": len([t for t in ticks if first_began <= t <= first_ended]),
                  "image_before_first_inflate_ended": prepared[0] < first_ended,
                  "statuses": [r.value.status_code for r in requests],
                  "corrupt": [corrupt.status_code, corrupt.json["error"]]}))
"""


def test_compressed_v2_bodies_are_inflated_without_stalling_the_process_or_its_decoding():
    """Inflated in the request's greenlet, a 10 KB gzip body that inflates to 10 MiB held the whole process for
    30 ms, and a stream of them held it for good. In the decoding threads, they held up images that admission had
    counted as next (review): they have a thread of their own."""
    seen, stderr = _under_gevent(_SLOW_INFLATES, 5.0, stderr=True)
    assert seen["ticks"] >= 5, seen  # ~30 when the hub runs meanwhile, none when the inflating holds it
    assert seen["image_before_first_inflate_ended"], seen
    assert seen["statuses"] == [400] * 3, seen  # inflated and read: b"x" is no image
    assert seen["corrupt"] == [400, "the gzip body ends before its compressed data does"], seen
    assert "Traceback" not in stderr  # a client's bad body is its 400, not a traceback in the server's log


# One stall of the process's hub while an image is in a thread; then the process is idle (reviewer's scenario).
_ONE_STALL_THEN_IDLE = r"""
handed = []
def prepare_image(data, max_pixels):  # 20 ms in a decoding thread
    handed.append(time.monotonic())
    sleep(0.02)
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
first = gevent.spawn(predict, b"x", **{submission.ARRIVED: time.monotonic()})
while not handed:
    gevent.sleep(0.001)
end = time.monotonic() + 3.0
while time.monotonic() < end:  # one 3 s stall of the hub (a burst of other requests' CPU, say)
    pass
gevent.sleep(0.1)
first.kill()  # its job stays queued (no worker here): there is something ahead of every later request
stalled = admission.preparation_seconds
seen = []
for _ in range(4):  # idle from here on; each retry waits the Retry-After it was given
    r = app.test_client().post("/predict" + sys.argv[3], data={"image": [(io.BytesIO(b"y"), "y.jpg")]},
                               environ_base={submission.ARRIVED: time.monotonic()})
    seen.append(r.status_code)
    gevent.sleep(int(r.headers.get("Retry-After") or 0))
print(json.dumps({"stalled": stalled, "seen": seen, "decoded": len(handed) - 1,
                  "counts": [admission.preparing, admission.preparing_images]}))
"""


@pytest.mark.parametrize("request_timeout, query", [(30.0, "?timeout=1.5"), (1.5, "")])
def test_one_stall_measured_into_the_lanes_turns_does_not_lock_out_an_idle_process(request_timeout, query):
    """Found by the fifth hostile review: one 3 s stall became the process's measure of an image, and every later
    request of 1.5 s was refused 503 for good: refused, none was prepared, so nothing measured afresh. A measure
    stands for PREPARATION_MAX_AGE (2 s) once nothing is being prepared."""
    seen = _under_gevent(_ONE_STALL_THEN_IDLE, request_timeout, query)
    assert seen["stalled"] >= 1.0 and seen["counts"] == [0, 0], seen
    # Refused for 2 s at most, then admitted (and, with no worker, answered 504 at its deadline).
    assert seen["decoded"] >= 2 and seen["seen"][-1] == 504, seen


# A request with 1 s of its own: six images of 0.6 s each on the two threads.
_PAST_ITS_DEADLINE_WHILE_DECODING = r"""
started = []
def prepare_image(data, max_pixels):
    started.append(data)
    sleep(0.6)
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
arrived = time.monotonic()
form = {"image": [(io.BytesIO(b"%d" % i), "x.jpg") for i in range(6)]}
response = app.test_client().post("/predict?timeout=1", data=form, environ_base={submission.ARRIVED: arrived})
answered = time.monotonic() - arrived
gevent.sleep(1.0)  # the threads finish what they started
print(json.dumps({"status": response.status_code, "answered": answered, "started": len(started),
                  "queued": r.llen("image_queue"), "counts": [admission.preparing, admission.preparing_images]}))
"""


def test_a_request_whose_deadline_comes_while_its_images_are_decoded_is_504_then_and_queues_nothing():
    """Found by the fifth hostile review: preparation waited for every image whatever the request's deadline."""
    seen = _under_gevent(_PAST_ITS_DEADLINE_WHILE_DECODING, 30.0)
    assert seen["status"] == 504 and seen["queued"] == 0 and seen["counts"] == [0, 0], seen
    assert seen["started"] == 4, seen  # two a thread by the deadline; the last two were skipped
    assert seen["answered"] < 5, seen  # at its 1 s (all six would take 1.8 s; REQUEST_TIMEOUT is 30 s)


# The process measured 0.1 s an image, then had 2.1 s of quiet. Then 48 one-image /predict requests come in
# together, 1.5 s to live each; two threads at 0.1 s an image prepare about 0.8 x 1.5 x 2 / 0.1 = 24 in time.
_BURST_AFTER_A_LULL = r"""
def prepare_image(data, max_pixels):  # 0.1 s in a decoding thread, the GIL let go as Pillow does
    sleep(0.1)
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.prepared(0.1)  # what the process measured before the lull
gevent.sleep(2.1)  # the lull: longer than PREPARATION_MAX_AGE, nothing being prepared
def request(i):
    response = predict(b"n%02d" % i, **{submission.ARRIVED: time.monotonic()})
    # No worker here: an admitted request whose image was prepared is 504 at its deadline in any case; what counts
    # is whether its image was prepared in time, which its 504 says
    return response.status_code, response.status_code == 504 and "prepared by then" in response.get_json()["error"]
burst = [gevent.spawn(request, i) for i in range(48)]
gevent.joinall(burst)
gevent.sleep(0.3)  # the threads finish what they started
print(json.dumps({"seen": [g.value for g in burst], "counts": [admission.preparing, admission.preparing_images]}))
"""


def test_a_burst_after_a_lull_is_weighed_with_the_measure_from_before_it():
    """Found by the seventh hostile review: the measure older than 2 s was erased, so the whole burst after a lull
    was admitted on 0 s of local work before its first image was prepared, and about 20 of 48 got 504 while being
    decoded. Only the request that finds nothing here ignores it (and its sample replaces it)."""
    seen = _under_gevent(_BURST_AFTER_A_LULL, 1.5)
    assert seen["counts"] == [0, 0], seen
    assert not any(late for _, late in seen["seen"]), seen  # none admitted and then not prepared in time
    assert any(status == 503 for status, _ in seen["seen"]), seen  # the rest refused at once


_SLOW_FIRST_IMAGE = r"""
prepared = set()
def prepare_image(data, max_pixels):  # the batch's first image is slow, the rest ordinary
    sleep(3.0 if data == b"A00" else 0.06)
    prepared.add(data)
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.prepared(0.01)  # measured on small images: the batch is admitted
batch = gevent.spawn(infer, [b"A%02d" % i for i in range(16)], **{submission.ARRIVED: time.monotonic()})
gevent.sleep(2.0)  # the other thread has prepared A01..A15 by ~0.9 s; A00 is still being decoded
admission.preparation_seconds, admission.prepared = 0.1, lambda seconds: None  # pinned from here on
counted, done = admission.preparing_images, len(prepared)
newcomer = predict(b"n", **{submission.ARRIVED: time.monotonic()})
print(json.dumps({"done": done, "counted": counted, "newcomer": newcomer.status_code}))
batch.kill()
"""


def test_an_image_prepared_before_those_ahead_of_it_in_its_request_leaves_the_backlog_at_once():
    """Found by the third hostile review: images left the count in the order their request read them."""
    seen = _under_gevent(_SLOW_FIRST_IMAGE, 1.0)
    assert seen["done"] == 15 and seen["counted"] == 1, seen
    # So a newcomer is not refused on (16 + 1) x 0.1 s / 2 = 0.85 s "ahead" against 0.8 x 1 s.
    assert seen["newcomer"] != 503, seen


_CLIENT_GONE = r"""
prepared = {}
def prepare_image(data, max_pixels):
    sleep(0.2)
    prepared[data] = time.monotonic()
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.prepared(0.2)

def hung_up(callback):  # as run_web_server's watch does for a client whose socket already reads end-of-file
    watcher = gevent.spawn(callback)
    return lambda: watcher.kill(block=True)

environ = {submission.ARRIVED: time.monotonic(), submission.WATCH_DISCONNECT: hung_up}
batch = gevent.spawn(infer, [b"A%02d" % i for i in range(16)], **environ)
gevent.sleep(0.05)
arrived = time.monotonic()
later = predict(b"n", **{submission.ARRIVED: arrived})
batch.join()
print(json.dumps({"for_nobody": sum(d.startswith(b"A") for d in prepared), "status": batch.value.status_code,
                  "later_waited": prepared[b"n"] - arrived,
                  "counts": [admission.preparing, admission.preparing_images]}))
"""


def test_the_images_of_a_client_that_hung_up_are_skipped():
    """Found by the third hostile review: the hang-up was watched only once the images were prepared."""
    seen = _under_gevent(_CLIENT_GONE, 3.0)
    assert seen["status"] == 499 and seen["counts"] == [0, 0], seen
    assert seen["for_nobody"] <= 2, seen  # at most one per decoding thread was under way
    assert seen["later_waited"] < 1.0, seen  # not behind 16 images decoded for nobody (1.6 s)


def test_a_job_submission_whose_exchange_is_spent_is_504_like_predict_not_told_to_retry(fake_redis):
    """Found by the seventh hostile review: /jobs, weighed against JOB_RESULT_TTL, never saw its spent exchange as
    a spent deadline and was told to retry (503 expected_wait) whenever anything was ahead. The body can take
    longer than a short REQUEST_TIMEOUT to arrive: CLIENT_READ_TIMEOUT is 10 s."""
    client, admission = _client_with_a_worker(fake_redis, request_timeout=1.0)
    fake_redis.rpush(KEYS.queue, "job")  # something ahead
    for route in ("/predict", "/jobs"):
        spent = {submission.ARRIVED: time.monotonic() - 1.5}  # its 1 s went by while its body came in
        response = client.post(route, data={"image": [(io.BytesIO(b"x"), "x.jpg")]}, environ_base=spent)
        assert response.status_code == 504 and "Retry-After" not in response.headers, (route, response.get_json())
    assert (admission.preparing, admission.preparing_images) == (0, 0)


def test_an_async_request_whose_images_cannot_be_prepared_before_its_own_deadline_is_refused(fake_redis, monkeypatch):
    """Found by the third hostile review: /jobs weighed its preparation against JOB_RESULT_TTL, but its images are
    prepared within its HTTP exchange (REQUEST_TIMEOUT)."""
    client, admission = _client_with_a_worker(fake_redis, request_timeout=3.0)
    admission.decoders = 2
    admission.prepared(1.0)
    admission.check(remaining=30)  # one image ahead: with its own 16, 8.5 s on 2 threads
    monkeypatch.setattr(helpers, "prepare_image", lambda data, max_pixels: pytest.fail("decoded, so admitted"))
    form = {"image": [(io.BytesIO(b"img%d" % i), "x.jpg") for i in range(16)]}
    response = client.post("/jobs", data=form, environ_base={submission.ARRIVED: time.monotonic()})
    assert response.status_code == 503 and response.get_json()["reason"] == "expected_wait"
    assert (admission.preparing, admission.preparing_images) == (1, 1)


_EARLY_END = r"""
how = sys.argv[3]
prepared, started = {}, set()
def prepare_image(data, max_pixels):
    started.add(data)
    if data == b"BAD":
        raise helpers.ImageError("not an image")
    sleep(0.05 if data == b"n" else 1.5)  # the batch's images are large ones
    prepared[data] = time.monotonic()
    return np.zeros((224, 224, 3), np.uint8)
helpers.prepare_image = prepare_image
admission.prepared(0.3)
admission.prepared = lambda seconds: None  # pinned: the batch is admitted

def hangs_up_soon(callback):  # the client hangs up 0.1 s in, while its first two images are being decoded
    def later():
        gevent.sleep(0.1)
        callback()
    watcher = gevent.spawn(later)
    return lambda: watcher.kill(block=True)

images = [b"A00", b"A01", b"A02"] if how == "hangup" else [b"BAD", b"A01", b"A02"]
environ = {submission.ARRIVED: time.monotonic()}
if how == "hangup":
    environ[submission.WATCH_DISCONNECT] = hangs_up_soon
first = gevent.spawn(infer, images, **environ)
first.join(timeout=0.5)  # answered (499 / 400) while both threads are still decoding its images
busy = len(started - {b"BAD"} - set(prepared))  # its images still in a decoding thread
counted = admission.preparing_images
admission.preparation_seconds = 0.6  # measured on its large images by now
arrived = time.monotonic()
newcomer = gevent.spawn(predict, b"n", **{submission.ARRIVED: arrived})
newcomer.join()
print(json.dumps({"first": first.value.status_code if first.ready() else None, "busy": busy, "counted": counted,
                  "newcomer": newcomer.value.status_code,
                  "newcomer_waited": prepared.get(b"n", arrived) - arrived}))
"""


@pytest.mark.parametrize("how", ["hangup", "bad_image"])
def test_images_still_being_decoded_stay_in_the_backlog_after_their_request_ended(how):
    """Found by the fourth hostile review: a request that ended early took its images in a thread off at once."""
    seen = _under_gevent(_EARLY_END, 1.0, how)
    assert seen["first"] == (499 if how == "hangup" else 400), seen
    # Counted: (2 busy + 1) x 0.6 s / 2 threads = 0.9 s > 0.8 x 1 s, so the newcomer would be refused 503 at once.
    # Not counted: it is admitted and its image is prepared ~1.4 s after it arrived, past its 1 s deadline.
    # Every image in a thread is counted (one a dispatcher has handed to a thread that has not begun it yet, too).
    assert seen["busy"] <= seen["counted"] <= 2, seen
    assert seen["newcomer"] == 503 or seen["newcomer_waited"] < 1.0, seen

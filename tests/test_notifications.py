"""Waiting for results: a notification wakes exactly its request; a lost one is covered by polling."""

import threading
import time

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY
from test_open_inference import triton_request

import jobs
import launcher
import redis_client
import web
from job_queue import JobQueue
from keys import Keys
from notifications import ResultWaiter
from open_inference import HEADER_LENGTH
from settings import Settings
from support import CASTLE, free_port, wait_for
from worker_registration import WorkerRegistry

KEYS = Keys("image_queue")


def counted(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0


def store(r, keys, job_id, channel=None):
    r.set(keys.result(job_id), jobs.encode_result({"id": job_id, "success": True}), ex=60)
    if channel:
        r.publish(channel, job_id)


@pytest.fixture
def waiter_for(config):
    made = []

    def make(**settings):
        settings = config.replace(**settings)
        made.append(ResultWaiter(redis_client.connect(settings.redis_url, 5), settings))
        return made[-1]

    yield make
    for waiter in made:
        waiter.close()


def wait_in_thread(waiter, job_id, timeout, out):
    with waiter.expect(job_id) as pending:
        out[job_id] = waiter.wait(pending, time.monotonic() + timeout)


def start_waiting(waiter, job_ids, timeout, out):
    """Threads waiting for `job_ids`, returned once every one of them is registered with the waiter."""
    threads = [threading.Thread(target=wait_in_thread, args=(waiter, job_id, timeout, out)) for job_id in job_ids]
    for t in threads:
        t.start()
    wait_for(lambda: all(job_id in waiter._pending for job_id in job_ids), 5, "the requests to wait")
    return threads


def test_notification_wakes_exactly_the_right_request(real_redis, waiter_for):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=30)  # so that only a notification can wake them
    channel = waiter.start()
    notified, timeouts = counted("imgclf_result_wakeups_total", via="notification"), counted("imgclf_timeouts_total")
    out = {}
    threads = start_waiting(waiter, ["a" * 32, "b" * 32], 3, out)
    store(real_redis, KEYS, "a" * 32, channel)
    threads[0].join(5)
    assert out["a" * 32]["id"] == "a" * 32  # within the join: only the notification could have woken it
    assert "b" * 32 not in out  # the other request is still waiting
    threads[1].join(5)
    assert out["b" * 32] is None  # and times out, as nothing was published for it
    assert counted("imgclf_result_wakeups_total", via="notification") == notified + 1
    assert counted("imgclf_timeouts_total") == timeouts + 1


def test_the_result_comes_with_its_notification_without_a_read(real_redis, waiter_for):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=30)
    channel = waiter.start()
    out = {}
    [thread] = start_waiting(waiter, ["9" * 32], 5, out)
    # As finish.lua publishes it; no result key exists, so nothing but the message can have answered.
    answer = {"id": "9" * 32, "success": True, "model": "m", "predictions": [{"label": "castle", "probability": 0.9}]}
    answer.update(batch_size=1, inference_ms=5.0, queue_ms=1.0)
    real_redis.publish(channel, b"9" * 32 + b"\n" + jobs.encode_result(answer).encode())
    thread.join(5)
    assert out["9" * 32] == answer


@pytest.mark.parametrize(
    "carried",
    [
        b"not json",
        b'{"id": "another job", "success": true, "model": "m", "predictions": []}',
        b"[1, 2]",
        b"[" * 100_000,  # json raises RecursionError
        b'{"id": "' + b"8" * 32 + b'", "success": true}',  # its id, but no answer in it
        b'{"id": "' + b"8" * 32 + b'", "success": false}',
        b'{"id": "' + b"8" * 32 + b'", "success": false, "error": "x", "status": "503 oops"}',
        b'{"id": "' + b"8" * 32 + b'", "success": false, "error": "x", "status": 1000}',
        b'{"id": "' + b"8" * 32 + b'", "success": true, "model": "m", "predictions": [], "batch_size": 1, '
        b'"inference_ms": 1, "queue_ms": 1, "probabilities": "AAAA"}',  # its kind is never sent one
        b'{"id": "' + b"8" * 32 + b'", "success": true, "model": "m", "predictions": [], "batch_size": 1, '
        b'"inference_ms": 1' + b"0" * 400 + b', "queue_ms": 1}',  # an int no float holds: metrics would raise
    ],
    ids=[
        "garbage",
        "another-job",
        "a-list",
        "deep",
        "no-predictions",
        "no-error",
        "status-text",
        "status-1000",
        "probs",
        "huge",
    ],
)
def test_a_notification_carrying_no_valid_result_of_its_job_reads_the_key(real_redis, waiter_for, carried):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=30)
    channel = waiter.start()
    out = {}
    [thread] = start_waiting(waiter, ["8" * 32], 5, out)
    real_redis.set(KEYS.result("8" * 32), jobs.encode_result({"id": "8" * 32, "success": True}), ex=60)
    real_redis.publish(channel, b"8" * 32 + b"\n" + carried)
    thread.join(5)
    assert out["8" * 32] == {"id": "8" * 32, "success": True}


def test_lost_notification_is_covered_by_the_fallback_poll(real_redis, waiter_for):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=0.3)
    waiter.start()
    polled = counted("imgclf_result_wakeups_total", via="fallback_poll")
    out = {}
    [thread] = start_waiting(waiter, ["c" * 32], 5, out)
    store(real_redis, KEYS, "c" * 32)  # stored, but the PUBLISH never happened
    thread.join(5)
    assert out["c" * 32]["id"] == "c" * 32
    assert counted("imgclf_result_wakeups_total", via="fallback_poll") == polled + 1
    # Read, then left to expire soon (not deleted: a read retried after a lost reply must find it again).
    assert 0 < real_redis.pttl(KEYS.result("c" * 32)) <= 10_000


def test_poll_mode_finds_results_without_subscribing(real_redis, waiter_for):
    waiter = waiter_for(wait_mode="poll")
    subscribed_before = set(real_redis.pubsub_channels(KEYS.channel_prefix + "*"))  # other tests' listeners
    assert waiter.start() is None
    out = {}
    [thread] = start_waiting(waiter, ["d" * 32], 5, out)
    store(real_redis, KEYS, "d" * 32)
    thread.join(5)
    assert out["d" * 32]["id"] == "d" * 32
    assert set(real_redis.pubsub_channels(KEYS.channel_prefix + "*")) <= subscribed_before  # no new subscription


def test_notify_mode_subscribes_its_own_channel(real_redis, waiter_for):
    channel = waiter_for(wait_mode="notify").start()
    assert channel.encode() in real_redis.pubsub_channels(KEYS.channel_prefix + "*")


def test_listener_resubscribes_after_redis_restart_and_rechecks_waiting_keys(real_redis, redis_server, waiter_for):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=60)  # polling cannot be what finds the result
    channel = waiter.start()
    out = {}
    [thread] = start_waiting(waiter, ["e" * 32], 20, out)
    redis_server.stop()
    redis_server.start()
    # The result lands while the listener is still reconnecting: its notification reaches nobody.
    store(redis_server.client(), KEYS, "e" * 32, channel)
    thread.join(15)
    assert out["e" * 32]["id"] == "e" * 32  # found long before the 60 s fallback poll


def test_listener_rechecks_waiting_keys_when_redis_py_resubscribes_a_reset_connection(real_redis, waiter_for):
    """A reset of the notification connection alone (CLIENT KILL, Redis's idle `timeout`, a pub/sub output buffer
    over its limit, a NAT): redis-py reconnects and subscribes again inside get_message, raising nothing, and
    what was published meanwhile is gone. Found by review: nothing re-checked the keys, so each waiting request
    sat until its fallback poll."""
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=60)  # polling cannot be what finds the result
    waiter.start()
    out = {}
    [thread] = start_waiting(waiter, ["a" * 32], 20, out)
    store(real_redis, KEYS, "a" * 32)  # its notification lost
    assert real_redis.client_kill_filter(_type="pubsub") >= 1  # earlier tests' listeners may still be closing
    thread.join(15)
    assert out["a" * 32]["id"] == "a" * 32


def test_a_request_s_jobs_are_looked_for_together_when_their_notifications_are_lost(real_redis, config):
    """Four images whose results are all stored while every notification is lost: the request polls for the
    first after FALLBACK_POLL_AFTER and finds the others at once. Found by review: each job's wait began its own
    interval, so the waits added up (2 + 2 + 2 s here, against a 5 s deadline) and the request got 504 with all
    four results in Redis."""
    settings = config.replace(wait_mode="notify", fallback_poll_after=2, fallback_poll_max=2)
    client = web.create_app(settings, redis_client.connect(settings.redis_url, 5)).test_client()
    out = {}
    images = [(CASTLE.open("rb"), f"{n}.jpg") for n in range(4)]
    request = threading.Thread(
        target=lambda: out.update(response=client.post("/predict?timeout=5", data={"image": images}))
    )
    request.start()
    wait_for(lambda: real_redis.llen(KEYS.queue) == 4, 5, "the jobs to be queued")
    for raw in real_redis.lrange(KEYS.queue, 0, -1):
        job = jobs.decode_job(raw)
        answer = jobs.success_result(job, None, [{"label": "castle", "probability": 0.9}], "m", 4, 5.0, 1.0)
        real_redis.set(KEYS.result(job.id), jobs.encode_result(answer), ex=60)  # and no PUBLISH
    request.join(10)
    assert out["response"].status_code == 200, out["response"].get_data(as_text=True)
    assert [r["success"] for r in out["response"].get_json()["results"]] == [True] * 4


def test_an_early_look_that_finds_nothing_does_not_push_the_next_look_further(real_redis, waiter_for):
    """Three jobs of one request, every notification lost: the first result is stored at 0.5 s and found by the poll
    at 1 s; the other two are stored at 1.3 s. The second job's look is due at once (1 s after the push) and finds
    nothing: its next look is one interval later (2 s), not a doubled one (3 s, past the 2.9 s deadline, after which
    the third job was not looked for at all). Found by review of the first fix."""
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=1, fallback_poll_max=4)
    ids = [c * 32 for c in "uvw"]
    pushed = time.monotonic()
    for job_id, at in zip(ids, (0.5, 1.3, 1.3), strict=True):
        threading.Timer(at, store, args=(real_redis, KEYS, job_id)).start()
    with waiter.expect(ids[0]) as first, waiter.expect(ids[1]) as second, waiter.expect(ids[2]) as third:
        found = [waiter.wait(pending, pushed + 2.9, since=pushed) for pending in (first, second, third)]
    assert [result and result["id"] for result in found] == ids


def test_a_stray_binary_message_does_not_end_the_listener(real_redis, waiter_for):
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=60)
    channel = waiter.start()
    real_redis.publish(channel, b"\xff\xfe not utf-8")
    out = {}
    [thread] = start_waiting(waiter, ["f" * 32], 10, out)
    store(real_redis, KEYS, "f" * 32, channel)
    thread.join(10)
    assert out["f" * 32]["id"] == "f" * 32  # woken by its notification, not the 60 s poll


@pytest.mark.parametrize("stray", [b"[" * 100_000, b'{"id": "%s", "success": true}'], ids=["deep", "no-answer"])
def test_a_stray_message_before_the_answer_does_not_spoil_a_predict(real_redis, config, stray):
    """Anyone who can read the queue and PUBLISH can send a request's job id with anything after it; the
    request still gets the worker's answer (found by the hostile review: a RecursionError or a KeyError
    escaped and the request was answered 500)."""
    settings = config.replace(wait_mode="notify", fallback_poll_after=30, request_timeout=10)
    client = web.create_app(settings, redis_client.connect(settings.redis_url, 5)).test_client()
    out = {}
    request = threading.Thread(
        target=lambda: out.update(response=client.post("/predict", data={"image": (CASTLE.open("rb"), "c.jpg")}))
    )
    request.start()
    wait_for(lambda: real_redis.llen(KEYS.queue), 5, "the job to be queued")
    job = jobs.decode_job(real_redis.lindex(KEYS.queue, 0))
    assert job.notify_result and job.reply_to  # a web process of this version takes results from notifications
    real_redis.publish(job.reply_to, job.id.encode() + b"\n" + stray.replace(b"%s", job.id.encode()))
    predictions = [{"label": "castle", "probability": 0.9}]
    answer = jobs.success_result(job, None, predictions, "m", batch_size=1, inference_ms=5.0, queue_ms=1.0)
    reply = jobs.Reply.of(job.id, job.reply_to, answer, with_result=True)
    JobQueue(real_redis, settings).finish("w", "batch-1", [], [reply])
    request.join(10)
    assert out["response"].status_code == 200, out["response"].get_data(as_text=True)
    assert out["response"].get_json()["predictions"] == answer["predictions"]


def test_a_job_that_did_not_ask_for_its_result_in_the_notification_takes_none_from_one(real_redis, waiter_for):
    """The Open Inference Protocol's jobs ask for probabilities and read them from the key: a result without
    them on the channel, whole as a /predict result (found by the second review: the infer answered 500)."""
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=30)
    channel = waiter.start()
    stored = {"id": "7" * 32, "success": True, "model": "m", "predictions": [], "probabilities": "AACAPw=="}
    stray = {**stored, "batch_size": 1, "inference_ms": 1.0, "queue_ms": 1.0}
    del stray["probabilities"]
    out = {}

    def wait():
        with waiter.expect("7" * 32, notify_result=False) as pending:
            out["result"] = waiter.wait(pending, time.monotonic() + 5)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: "7" * 32 in waiter._pending, 5, "the request to wait")
    real_redis.set(KEYS.result("7" * 32), jobs.encode_result(stored), ex=60)
    real_redis.publish(channel, b"7" * 32 + b"\n" + jobs.encode_result(stray).encode())
    thread.join(5)
    assert out["result"]["probabilities"].tolist() == [1.0]  # what the worker stored, from the key


def test_a_stray_result_without_probabilities_does_not_spoil_an_open_inference_request(real_redis, config):
    """End to end through the V2 route: its job does not ask for its result in the notification, so a stray
    message with a /predict-shaped result is not taken, and the worker's stored answer is."""

    settings = config.replace(wait_mode="notify", fallback_poll_after=30, request_timeout=10)
    WorkerRegistry(real_redis, JobQueue(real_redis, settings), 60).beat(
        "w", {"model": "efficientnet_lite0", "ready": 1}
    )
    client = web.create_app(settings, redis_client.connect(settings.redis_url, 5)).test_client()
    body, length = triton_request(images=[CASTLE.read_bytes()])
    out = {}
    request = threading.Thread(
        target=lambda: out.update(
            response=client.post("/v2/models/efficientnet_lite0/infer", data=body, headers={HEADER_LENGTH: str(length)})
        )
    )
    request.start()
    wait_for(lambda: real_redis.llen(KEYS.queue), 5, "the job to be queued")
    job = jobs.decode_job(real_redis.lindex(KEYS.queue, 0))
    assert job.probabilities and not job.notify_result
    stray = jobs.success_result(job, None, [], "efficientnet_lite0", batch_size=1, inference_ms=1.0, queue_ms=1.0)
    del stray["probabilities"]
    real_redis.publish(job.reply_to, job.id.encode() + b"\n" + jobs.encode_result(stray).encode())
    answer = jobs.success_result(job, np.full(1000, 1e-3, np.float32), [], "efficientnet_lite0", 1, 5.0, 1.0)
    JobQueue(real_redis, settings).finish("w", "batch-1", [], [jobs.Reply.of(job.id, job.reply_to, answer)])
    request.join(10)
    assert out["response"].status_code == 200, out["response"].get_data(as_text=True)


@pytest.mark.parametrize("second", [b"", b"\ngarbage"], ids=["bare-id", "garbage"])
def test_a_later_message_for_the_job_does_not_take_the_place_of_its_delivered_result(real_redis, waiter_for, second):
    """A bare id (an earlier version's worker finishing a swept copy) or a stray message after the worker's
    whole result: the request keeps the result, and needs no read, which could fail (found by the third
    review: the request waited for Redis until its deadline with the answer in memory)."""
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=0.5)
    channel = waiter.start()
    woken, wake = [], waiter._wake
    waiter._wake = lambda *args: (wake(*args), woken.append(args))

    def fetch(job_id):
        raise redis.ConnectionError("the data connection is down")

    waiter.fetch = fetch
    answer = {"id": "6" * 32, "success": True, "model": "m", "predictions": []}
    answer.update(batch_size=1, inference_ms=1.0, queue_ms=1.0)
    with waiter.expect("6" * 32) as pending:
        real_redis.publish(channel, b"6" * 32 + b"\n" + jobs.encode_result(answer).encode())
        real_redis.publish(channel, b"6" * 32 + second)
        wait_for(lambda: len(woken) == 2, 5, "both messages to reach the listener")
        assert waiter.wait(pending, time.monotonic() + 2) == answer


def test_a_result_delivered_just_as_the_wait_timed_out_is_taken_while_redis_cannot_be_read(config, waiter_for):
    # The listener sets the event between the waiter's timeout and its clear(): the clear swallows the wake-up,
    # and the result must be taken from the notification, since every read of the key fails.
    waiter = waiter_for(wait_mode="notify", fallback_poll_after=0.05, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    job_id = "7" * 32
    answer = {"id": job_id, "success": True, "model": "m", "predictions": []}
    answer.update(batch_size=1, inference_ms=5.0, queue_ms=1.0)
    with waiter.expect(job_id) as pending:
        timed_out = pending.event.wait

        def wait_then_deliver(timeout):
            notified = timed_out(timeout)
            waiter._wake(job_id, jobs.encode_result(answer).encode())
            return notified

        pending.event.wait = wait_then_deliver
        assert waiter.wait(pending, time.monotonic() + 1.5) == answer


def test_the_listener_subscribes_over_a_unix_socket(tmp_path):
    # A unix socket's connection has no port: reading one, the listener failed at every subscription and each
    # request waited 5 s for it, then got 503 (found by review).
    server, path = launcher.RedisServer(tmp_path), tmp_path / "redis.sock"
    server.start("--unixsocket", str(path))
    try:
        config = Settings(redis_url=f"unix://{path}")
        waiter = ResultWaiter(redis_client.connect(config.redis_url, 5), config)
        assert waiter.start() == waiter.channel and waiter.listening()
        waiter.close()
    finally:
        server.stop()

"""Waiting for results: a notification wakes exactly its request; a lost one is covered by polling."""
import threading
import time

import pytest
from prometheus_client import REGISTRY

import jobs
import redis_client
from keys import Keys
from notifications import ResultWaiter


def counted(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0


def store(r, keys, job_id, channel=None):
    r.set(keys.result(job_id), jobs.encode_result({"id": job_id, "success": True}), ex=60)
    if channel:
        r.publish(channel, job_id)


@pytest.fixture
def waiter_for(redis_server):
    made = []

    def make(mode):
        made.append(ResultWaiter(redis_client.connect(redis_server.url), Keys(), mode=mode, url=redis_server.url))
        return made[-1]

    yield make
    for waiter in made:
        waiter.close()


def wait_in_thread(waiter, job_id, timeout, out):
    with waiter.expect(job_id) as pending:
        started = time.monotonic()
        out[job_id] = (waiter.wait(pending, time.time() + timeout), time.monotonic() - started)


def test_notification_wakes_exactly_the_right_request(real_redis, redis_server, waiter_for, monkeypatch):
    monkeypatch.setattr("settings.FALLBACK_POLL_AFTER", 30)  # so that only a notification can wake them
    waiter = waiter_for(mode="notify")
    channel = waiter.start()
    notified, timeouts = counted("imgclf_result_wakeups_total", via="notification"), counted("imgclf_timeouts_total")
    out = {}
    threads = [threading.Thread(target=wait_in_thread, args=(waiter, job_id, 3, out)) for job_id in ("a" * 32, "b" * 32)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    store(real_redis, Keys(), "a" * 32, channel)
    threads[0].join(5)
    assert out["a" * 32][0]["id"] == "a" * 32  # within the join: only the notification could have woken it
    assert "b" * 32 not in out  # the other request is still waiting
    threads[1].join(5)
    assert out["b" * 32][0] is None  # and times out, as nothing was published for it
    assert counted("imgclf_result_wakeups_total", via="notification") == notified + 1
    assert counted("imgclf_timeouts_total") == timeouts + 1


def test_lost_notification_is_covered_by_the_fallback_poll(real_redis, redis_server, waiter_for, monkeypatch):
    monkeypatch.setattr("settings.FALLBACK_POLL_AFTER", 0.3)
    waiter = waiter_for(mode="notify")
    waiter.start()
    polled = counted("imgclf_result_wakeups_total", via="fallback_poll")
    out = {}
    thread = threading.Thread(target=wait_in_thread, args=(waiter, "c" * 32, 5, out))
    thread.start()
    time.sleep(0.1)
    store(real_redis, Keys(), "c" * 32)  # stored, but the PUBLISH never happened
    thread.join(5)
    assert out["c" * 32][0]["id"] == "c" * 32
    assert counted("imgclf_result_wakeups_total", via="fallback_poll") == polled + 1
    assert not real_redis.exists(Keys().result("c" * 32))  # read and deleted


def test_poll_mode_finds_results_without_subscribing(real_redis, waiter_for):
    waiter = waiter_for(mode="poll")
    assert waiter.start() is None
    out = {}
    thread = threading.Thread(target=wait_in_thread, args=(waiter, "d" * 32, 5, out))
    thread.start()
    time.sleep(0.1)
    store(real_redis, Keys(), "d" * 32)
    thread.join(5)
    assert out["d" * 32][0]["id"] == "d" * 32
    assert real_redis.pubsub_numsub(Keys().channel_prefix + "x") == [(b"image_queue:notify:x", 0)]


def test_listener_resubscribes_after_redis_restart_and_rechecks_waiting_keys(real_redis, redis_server, waiter_for, monkeypatch):
    monkeypatch.setattr("settings.FALLBACK_POLL_AFTER", 60)  # polling cannot be what finds the result
    waiter = waiter_for(mode="notify")
    channel = waiter.start()
    out = {}
    thread = threading.Thread(target=wait_in_thread, args=(waiter, "e" * 32, 20, out))
    thread.start()
    redis_server.stop()
    time.sleep(0.5)
    redis_server.start()
    # The result lands while the listener is still reconnecting: its notification reaches nobody.
    store(redis_server.client(), Keys(), "e" * 32, channel)
    thread.join(15)
    assert out["e" * 32][0]["id"] == "e" * 32  # found long before the 60 s fallback poll

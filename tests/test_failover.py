"""Redis Sentinel: the service follows a failover to the promoted replica, with no restart and nothing hung.

Real parts throughout: a master, its replica and three sentinels (redis-server --sentinel), a real worker and a
real web server given the group's redis+sentinel:// URL, and the master killed with SIGKILL under load.
"""

import threading
import time

import pytest
import redis
import requests

import launcher
import redis_client
from keys import Keys
from support import post, wait_for

KEYS = Keys("image_queue")


@pytest.fixture
def sentinels(tmp_path):
    group = launcher.SentinelGroup(tmp_path / "sentinels")
    group.start()
    yield group
    group.stop()


@pytest.fixture
def failover_service(sentinels, model_cache_dir, tmp_path):
    svc = launcher.Processes(
        sentinels.url,
        tmp_path,
        MODEL="efficientnet_lite0",
        MODEL_CACHE_DIR=model_cache_dir,
        HEARTBEAT_INTERVAL="0.5",
        HEARTBEAT_TTL="2",
        REQUEST_TIMEOUT="5",
    )
    yield svc
    svc.stop_all()


@pytest.mark.slow
def test_a_failover_under_load_is_followed_without_restarts_and_no_request_hangs(failover_service, sentinels):
    service = failover_service
    worker, web = service.start_worker(), service.start_web()
    assert post(service.url).status_code == 200
    outcomes, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = post(service.url, timeout=20).status_code
            except requests.RequestException as exc:
                status = repr(exc)
            outcomes.append((status, started, time.monotonic() - started))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(outcomes) >= 8, 30, "the load to be served")
        sentinels.master.process.kill()  # no goodbye: its last writes may not have reached the replica
        killed = time.monotonic()
        wait_for(lambda: sentinels.master_port() == sentinels.replica.port, 30, "the sentinels to promote the replica")
        promoted = time.monotonic()
        # Requests sent once the replica is master are served by it.
        wait_for(lambda: sum(s == 200 and t > promoted for s, t, _ in outcomes) >= 8, 60, "service on the new master")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    statuses = [status for status, _, _ in outcomes]
    # Requests whose jobs were lost with the master's unreplicated writes end in 504 at REQUEST_TIMEOUT, those sent
    # while no master was known in 503 at once, a job claimed before the kill and found without its pixels in 410.
    assert set(statuses) <= {200, 410, 503, 504}, statuses
    assert max(duration for _, _, duration in outcomes) < 8, "a request outlived REQUEST_TIMEOUT"
    assert any(t < killed and s == 200 for s, t, _ in outcomes)
    after = [post(service.url, timeout=20) for _ in range(5)]
    assert [r.status_code for r in after] == [200] * 5
    assert worker.poll() is None and web.poll() is None  # nothing was restarted
    new_master = redis.Redis(port=sentinels.replica.port)
    assert new_master.info("replication")["role"] == "master"
    assert new_master.scard(KEYS.workers) == 1  # the worker beats on the new master
    web_log = service.log_text(web)
    assert "listener_subscribed" in web_log.split("listener_disconnected")[-1]  # the web listens on it again


def test_a_bounded_pool_through_sentinel_waits_for_a_free_connection(sentinels):
    # The web's pool (REDIS_MAX_CONNECTIONS): a request past the bound waits for a connection, as with a plain
    # REDIS_URL; Sentinel's own pool refused it at once ("Too many connections").
    client = redis_client.connect(sentinels.url, 5, max_connections=1)
    held = client.connection_pool.get_connection()
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.ping()))
    waiting.start()
    time.sleep(0.5)
    assert answers == []  # still waiting
    client.connection_pool.release(held)
    waiting.join(5)
    assert answers == [True]
    assert held.port == sentinels.master.port  # the sentinels' master

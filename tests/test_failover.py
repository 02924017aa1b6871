"""Redis Sentinel: the service follows a failover to the promoted replica, with no restart and nothing hung.

Real parts throughout: a master, its replica and three sentinels (redis-server --sentinel), real workers and web
servers given the group's redis+sentinel:// URL; the master killed with SIGKILL under load or demoted by hand, the
sentinels killed, a sentinel that accepts and never answers.
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis

import launcher
import redis_client
from keys import Keys
from notifications import ResultWaiter
from settings import Settings
from support import CountingClassifier, Load, lite0_service, post, wait_for, worker_name
from worker import Worker

KEYS = Keys("image_queue")


@pytest.fixture
def sentinels(tmp_path):
    group = launcher.SentinelGroup(tmp_path / "sentinels")
    group.start()
    yield group
    group.stop()


@pytest.fixture
def failover_service(sentinels, model_cache_dir, tmp_path):
    svc = lite0_service(
        sentinels.url,
        tmp_path,
        model_cache_dir,
        REQUEST_TIMEOUT="5",
        BLOCK_TIMEOUT="1",  # a worker's wait for work holds its connection this long at most
    )
    yield svc
    svc.stop_all()


@pytest.mark.slow
def test_a_failover_under_load_is_followed_without_restarts_and_no_request_hangs(failover_service, sentinels):
    service = failover_service
    worker, web = service.start_worker(), service.start_web()
    assert post(service.url).status_code == 200
    load = Load(service.url)
    outcomes = load.outcomes
    try:
        wait_for(lambda: len(outcomes) >= 8, 30, "the load to be served")
        sentinels.master.process.kill()  # no goodbye: its last writes may not have reached the replica
        killed = time.monotonic()
        # Before the sentinels even take it for down (down-after-milliseconds 1000), a new request is refused at once.
        refused = post(service.url, timeout=20)
        wait_for(lambda: sentinels.master_port() == sentinels.replica.port, 30, "the sentinels to promote the replica")
        promoted = time.monotonic()
        # Requests sent once the replica is master are served by it.
        wait_for(lambda: sum(s == 200 and t > promoted for s, t, _ in outcomes) >= 8, 60, "service on the new master")
    finally:
        load.stop()
    statuses = load.statuses()
    # Requests whose jobs were lost with the master's unreplicated writes end in 504 at REQUEST_TIMEOUT, those sent
    # while no master was known in 503 at once, a job claimed before the kill and found without its pixels in 410.
    assert set(statuses) <= {200, 410, 503, 504}, statuses
    assert refused.status_code == 503 and refused.json()["reason"] == "redis_unavailable"
    assert load.longest() < 8, "a request outlived REQUEST_TIMEOUT"
    assert any(t < killed and s == 200 for s, t, _ in outcomes)
    after = [post(service.url, timeout=20) for _ in range(5)]
    assert [r.status_code for r in after] == [200] * 5
    assert worker.poll() is None and web.poll() is None  # nothing was restarted
    new_master = redis.Redis(port=sentinels.replica.port)
    assert new_master.info("replication")["role"] == "master"
    assert new_master.exists(KEYS.heartbeat(worker_name(service, worker)))  # the worker beats on the new master
    web_log = service.log_text(web)
    assert "listener_subscribed" in web_log.split("listener_disconnected")[-1]  # the web listens on it again


def service_clients(server):
    """The connections a Redis server holds other than the sentinels', its replicas' and the caller's."""
    return [
        client
        for client in server.client_list()
        if not client["name"].startswith("sentinel-") and "S" not in client["flags"] and client["cmd"] != "client|list"
    ]


@pytest.mark.slow
def test_a_master_demoted_while_it_lives_is_left_before_the_sentinels_demote_it(failover_service, sentinels):
    # A failover by hand, or across a partition, leaves the old master running and taking writes for about 10 s
    # more (the sentinels read a replica's INFO every 10 s): a web enqueueing there while the worker claims on the
    # new master answers nothing but 504s, and every write there is lost when it becomes a replica.
    service = failover_service
    worker, web = service.start_worker(), service.start_web()
    assert post(service.url).status_code == 200
    old_master = redis.Redis(port=sentinels.master.port, decode_responses=True)
    assert service_clients(old_master)
    sentinels.failover()
    wait_for(lambda: sentinels.master_port() == sentinels.replica.port, 30, "the sentinels to promote the replica")
    wait_for(lambda: not service_clients(old_master), 6, "the service to leave the old master")
    assert old_master.info("replication")["role"] == "master"  # still: the service left it first
    answers = [post(service.url, timeout=20) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200] * 3
    assert redis.Redis(port=sentinels.replica.port).exists(KEYS.heartbeat(worker_name(service, worker)))
    assert worker.poll() is None and web.poll() is None


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


def test_a_sentinel_that_does_not_answer_is_asked_once_then_passed_over(sentinels):
    # redis-py's default retry asked it eleven times, with backoff: 15 s for one lookup (found by review).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        first = f"redis+sentinel://127.0.0.1:{silent.getsockname()[1]},"
        assert redis_client.connect(sentinels.url.replace("redis+sentinel://", first), 5).ping()
        assert len(accepted) == 1
    finally:
        silent.close()
        for connection in accepted:
            connection.close()


def test_a_bounded_pool_keeps_no_connection_whose_lookup_found_no_master():
    # The blocking pool freed such a connection's slot but kept the connection: 5.4 KB a refused request, for as
    # long as no master was known (found by review).
    nobody = ",".join(f"127.0.0.1:{launcher.free_port()}" for _ in range(3))
    client = redis_client.connect(f"redis+sentinel://{nobody}/imgclf/0", 5, max_connections=4)
    for _ in range(50):
        with pytest.raises(redis.ConnectionError):
            client.ping()
    assert len(client.connection_pool._connections) <= 4


def test_the_sentinels_away_change_nothing_while_the_master_answers(sentinels):
    # Found by review: a worker that asked the sentinels before each beat stopped beating, readiness then counted no
    # worker on every web process, and a listener that asked them before reading dropped its subscription.
    config = Settings(redis_url=sentinels.url, heartbeat_interval=0.2, heartbeat_ttl=1, block_timeout=0.2)
    worker = Worker(CountingClassifier(), config, name="calm")
    waiter = ResultWaiter(redis_client.connect(sentinels.url, 5), config)
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        waiter.start()
        master = redis.Redis(port=sentinels.master.port)
        wait_for(lambda: master.exists(KEYS.heartbeat("calm")), 10, "the worker's first beat")
        for sentinel in sentinels.sentinels:
            sentinel.kill()
            sentinel.wait(10)
        time.sleep(3 * config.heartbeat_ttl)  # beats and follows a few times over
        assert master.exists(KEYS.heartbeat("calm")) and waiter.listening()
    finally:
        worker.stopping.set()
        serving.join(10)
        waiter.close()


def test_queue_admin_info_names_the_master_the_sentinels_gave(sentinels):
    result = subprocess.run(
        [sys.executable, str(launcher.ROOT / "queue_admin.py"), "info"],
        cwd=launcher.ROOT,
        env={**os.environ, "REDIS_URL": sentinels.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.endswith(f"/imgclf/0 (master 127.0.0.1:{sentinels.master.port})"), first

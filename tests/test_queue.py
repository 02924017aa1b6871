"""The queue protocol: backpressure, claims that are atomic and recorded, acknowledgement, requeue, dead letters.

Protocol tests run on fakeredis and on a real redis-server; the race between workers runs on the real one.
"""

import dataclasses
import itertools
import json
import math
import threading
import time

import numpy as np
import pytest
import redis

import jobs
import redis_client
import worker as worker_module
from job_queue import JobQueue, QueueFull
from job_queue.dead_letters import DeadLetters
from jobs import Reply
from settings import Settings
from support import CountingClassifier
from worker import NameTaken, Worker
from worker_registration import WorkerRegistry


@pytest.fixture(params=["fakeredis", "redis-server"])
def r(request):
    return request.getfixturevalue("fake_redis" if request.param == "fakeredis" else "real_redis")


def raw_job(**kwargs):
    return jobs.encode_job(jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 30, **kwargs))


def queue_and_registry(r, **settings):
    q = JobQueue(r, Settings(**settings))
    return q, WorkerRegistry(r, q, heartbeat_ttl=60)


def test_enqueue_refuses_when_full(r):
    q = JobQueue(r, Settings(max_queue_length=3))
    assert [q.enqueue(raw_job()) for _ in range(3)] == [1, 2, 3]  # the length each push left, for admission
    with pytest.raises(QueueFull) as full:
        q.enqueue(raw_job())
    assert full.value.length == 3
    assert q.length() == 3


def test_claim_moves_jobs_into_the_processing_list_in_order(r):
    q = JobQueue(r, Settings())
    raws = [raw_job() for _ in range(5)]
    for raw in raws:
        q.enqueue(raw)
    claimed = q.claim("w1", max_jobs=3, timeout=1)
    assert claimed == [raw.header for raw in raws[:3]]
    assert r.lrange(q.keys.processing("w1"), 0, -1) == claimed
    assert q.length() == 2


def test_claim_returns_nothing_after_timeout(r):
    assert JobQueue(r, Settings()).claim("w1", max_jobs=4, timeout=0.1) == []


def test_finish_stores_results_with_ttl_publishes_and_acknowledges(r):
    q = JobQueue(r, Settings())
    q.enqueue(raw_job())
    [raw] = q.claim("w1", 4, 1)
    job = jobs.decode_job(raw)
    pubsub = r.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    dead_jobs = [(b"garbage", "invalid job: job is not JSON")]
    replies = [Reply(job.id, "chan", '{"ok": 1}', with_result=True)]
    assert q.finish("w1", "batch-1", [raw], replies, dead_jobs=dead_jobs) == "done"
    assert r.get(q.keys.result(job.id)) == b'{"ok": 1}'
    assert 0 < r.ttl(q.keys.result(job.id)) <= 60
    assert r.exists(q.keys.processing("w1")) == 0
    [dead] = [jobs.decode_dead_letter(entry) for entry in r.lrange(q.keys.dead, 0, -1)]
    assert (dead.raw, dead.reason) == ("garbage", "invalid job: job is not JSON")
    message = pubsub.get_message(timeout=1)
    # The result travels with the notification: the waiting request reads nothing more.
    assert message["type"] == "message" and message["data"] == job.id.encode() + b'\n{"ok": 1}'


def test_a_job_without_notify_result_is_announced_by_its_bare_id(r):
    """What web processes of earlier versions understand: they send no notify_result and read the key."""
    q = JobQueue(r, Settings())
    job = jobs.decode_job(raw_job().header)
    assert not job.notify_result
    pubsub = r.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    q.finish("w1", "batch-1", [], [Reply(job.id, "chan", '{"ok": 1}')])
    assert pubsub.get_message(timeout=1)["data"] == job.id.encode()


def test_requeue_of_a_dead_worker_counts_attempts_then_dead_letters(r):
    q, registry = queue_and_registry(r, max_attempts=3)
    first, second = raw_job(), raw_job()
    q.enqueue(first)
    q.enqueue(second)

    def die_holding():
        registry.beat("doomed", {"ready": 1})
        claimed = [jobs.decode_job(raw).id for raw in q.claim("doomed", 10, 1)]
        r.delete(q.keys.heartbeat("doomed"))  # the heartbeat expired: the worker died holding its batch
        assert registry.sweep() == ["doomed"]
        return claimed

    assert die_holding() == [first.id, second.id]
    queued = [jobs.decode_job(raw) for raw in r.lrange(q.keys.queue, 0, -1)]
    assert [(j.id, j.attempts) for j in queued] == [(first.id, 1), (second.id, 1)]
    assert r.get(q.keys.pixels(first.id)) == first.pixels  # a requeued job keeps its pixels
    # Handed back, each is claimed alone: a job that kills its worker uses up its own attempts, not its batch-mates'.
    assert [die_holding() for _ in range(4)] == [[first.id], [first.id], [second.id], [second.id]]
    assert q.length() == 0
    assert r.llen(q.keys.dead) == 2
    result = jobs.decode_result(r.get(q.keys.result(first.id)))
    assert result["success"] is False and "3 times" in result["error"]
    assert r.smembers(q.keys.workers) == set()
    # A given-up job's pixels leave their key for its dead letter, from which it can be requeued.
    assert not r.exists(q.keys.pixels(first.id), q.keys.pixels(second.id))
    assert all(jobs.decode_dead_letter(entry).has_pixels for entry in r.lrange(q.keys.dead, 0, -1))


def worker_holding_a_job(r, name):
    q, registry = queue_and_registry(r)
    q.enqueue(raw_job())
    registry.beat(name, {"ready": 1})
    q.claim(name, 10, 1)
    return q, registry


def listening(r, channel):
    pubsub = r.pubsub()
    pubsub.subscribe(channel)
    pubsub.get_message(timeout=1)  # the subscription's confirmation
    return pubsub


def dies_holding_its_claim(r, q, registry, name):
    """`name` registers and claims, then its heartbeat lapses and a sweep hands its claim back (or gives it up);
    returns what it held."""
    registry.beat(name, {"ready": 1})
    held = q.claim(name, 4, 1)
    r.delete(q.keys.heartbeat(name))
    assert registry.sweep() == [name]
    return held


def test_sweep_leaves_live_workers_alone(r):
    q, registry = worker_holding_a_job(r, "alive")
    assert registry.sweep() == []
    assert r.llen(q.keys.processing("alive")) == 1


def test_graceful_unregister_returns_jobs_without_counting_an_attempt(r):
    q, registry = worker_holding_a_job(r, "leaving")
    registry.unregister("leaving")
    [back] = r.lrange(q.keys.queue, 0, -1)
    assert jobs.decode_job(back).attempts == 0
    assert not r.exists(q.keys.heartbeat("leaving")) and r.smembers(q.keys.workers) == set()


def test_two_workers_racing_process_every_job_exactly_once(real_redis, config):
    config = config.replace(block_timeout=0.2, batch_size=7, max_queue_length=600)
    q = JobQueue(real_redis, config)
    total = 600
    ids = []
    for n in range(total):
        pixels = np.zeros(jobs.IMAGE_SHAPE, np.uint8)
        pixels[0, 0, 0], pixels[0, 0, 1] = n % 256, n // 256
        job = jobs.Job(pixels, time.time() + 60)
        ids.append(job.id)
        q.enqueue(jobs.encode_job(job))
    classifiers = [CountingClassifier(), CountingClassifier()]
    workers = [Worker(c, config, name=f"racer{i}") for i, c in enumerate(classifiers)]

    def drain(worker):
        while worker.run_once():
            pass

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    seen = classifiers[0].seen + classifiers[1].seen
    assert sorted(seen) == list(range(total))  # none twice, none dropped
    assert all(c.seen for c in classifiers)  # both really took part
    assert all(real_redis.exists(q.keys.result(job_id)) for job_id in ids)
    assert q.length() == 0 and not real_redis.keys(q.keys.processing_prefix + "*")


def test_sweep_of_a_worker_that_beats_again_does_nothing(r):
    q, registry = worker_holding_a_job(r, "back")
    # The sweeper saw no heartbeat a moment ago; by the time the requeue runs, the worker has beaten again.
    assert q.sweep("back") is None
    assert r.llen(q.keys.processing("back")) == 1 and q.length() == 0
    assert r.smembers(q.keys.workers) == {b"back"}


def test_claim_returns_jobs_a_lost_reply_left_in_the_processing_list(r):
    q = JobQueue(r, Settings())
    lost, second = raw_job(), raw_job()
    q.enqueue(lost)
    q.enqueue(second)
    # A BLMOVE ran but its reply never arrived: the job sits in the processing list unknown to the worker.
    r.lmove(q.keys.queue, q.keys.processing("w1"), "LEFT", "RIGHT")
    # Returned, and no more than a batch with it: the blocking move comes only when the worker holds nothing (it
    # came first, and took the second job too, a batch of 2; found by review).
    assert q.claim("w1", max_jobs=1, timeout=1) == [lost.header] and q.length() == 1


def test_a_retried_finish_changes_nothing(r):
    q = JobQueue(r, Settings())
    q.enqueue(raw_job())
    [raw] = q.claim("w1", 4, 1)
    job = jobs.decode_job(raw)
    reply = Reply(job.id, None, '{"ok": 1}')
    assert q.finish("w1", "batch-1", [raw], [reply], dead_jobs=[(b"garbage", "not JSON")]) == "done"
    r.delete(q.keys.result(job.id))  # the web server has taken the result
    q.enqueue(raw_job())
    q.claim("w1", 4, 1)  # the next batch is already claimed when the retry arrives
    assert q.finish("w1", "batch-1", [raw], [reply], dead_jobs=[(b"garbage", "not JSON")]) == "duplicate"
    assert not r.exists(q.keys.result(job.id)) and r.llen(q.keys.dead) == 1
    assert r.llen(q.keys.processing("w1")) == 1  # the new claim is untouched


def test_finish_of_a_swept_batch_stores_results_but_queues_nothing_twice(r):
    q, registry = worker_holding_a_job(r, "slow")
    [raw] = r.lrange(q.keys.processing("slow"), 0, -1)
    job = jobs.decode_job(raw)
    r.delete(q.keys.heartbeat("slow"))
    assert registry.sweep() == ["slow"]  # the batch is back in the queue, with an attempt counted
    retry = jobs.encode_header(dataclasses.replace(job, attempts=5))
    replies, dead_jobs = [Reply(job.id, None, '{"ok": 1}')], [(raw, "a reason")]
    outcome = q.finish("slow", "batch-1", [raw], replies, retry=[retry], dead_jobs=dead_jobs)
    assert outcome == "swept"
    assert r.get(q.keys.result(job.id)) == b'{"ok": 1}'  # the requester is answered all the same
    assert q.length() == 1 and r.llen(q.keys.dead) == 0


def retried(raw):
    return jobs.encode_header(dataclasses.replace(jobs.decode_job(raw), attempts=1))


def test_a_job_that_kills_its_worker_is_given_up_alone_and_its_batch_mates_are_answered(r):
    """Found by review: a whole batch goes back when its worker dies (or hangs), each job with an attempt counted,
    and it was claimed whole again: with one image that killed the worker, 5 of its 7 batch-mates were given up
    (500) beside it. Handed back, each job is now claimed alone."""
    q, registry = queue_and_registry(r, max_attempts=3)
    batch = [raw_job() for _ in range(8)]
    poison = batch[3].id
    q.enqueue(*batch)
    for restart in range(20):  # each round a worker (a fresh pod) claims, and dies if it holds the poison
        name = f"worker-{restart}"
        registry.beat(name, {"ready": 1})
        claimed = q.claim(name, 10, 1)
        if not claimed:
            break
        ids = [jobs.decode_job(raw).id for raw in claimed]
        if poison in ids:
            r.delete(q.keys.heartbeat(name))
            assert registry.sweep() == [name]
        else:
            replies = [Reply(job_id, None, '{"ok": 1}') for job_id in ids]
            assert q.finish(name, f"{name}:1", claimed, replies, gone=ids) == "done"
    answers = {job.id: json.loads(r.get(q.keys.result(job.id))) for job in batch}
    assert answers.pop(poison)["status"] == 500
    assert answers == {job.id: {"ok": 1} for job in batch if job.id != poison}
    assert [jobs.decode_dead_letter(entry).id for entry in r.lrange(q.keys.dead, 0, -1)] == [poison]


def test_a_late_copy_of_an_earlier_batchs_finish_changes_nothing(r):
    """The worker gave up on the reply of a finish whose bytes were still on the way, retried it and went on; the
    first copy reaches Redis when a later batch is in hand. Counting alone trimmed that batch away unanswered (and
    queued the old batch's retries a second time); and once the old answer had expired, it was stored again."""
    q = JobQueue(r, Settings())
    for _ in range(3):
        q.enqueue(raw_job())
    first = q.claim("w1", 2, 1)
    answered = Reply(jobs.decode_job(first[0]).id, "chan", '{"ok": 1}')
    late_copy = ("w1", "t:1", first, [answered], [retried(first[1])])  # the worker numbers its batches
    assert q.finish(*late_copy) == "done"
    second = q.claim("w1", 2, 0)  # the retried job, alone
    assert q.finish("w1", "t:2", second, [], retry=second) == "done"  # the model failed: again
    third = q.claim("w1", 2, 0)
    waiting = r.lrange(q.keys.queue, 0, -1)  # the third job
    r.delete(q.keys.result(answered.job_id))  # the answer was read, and has expired
    pubsub = r.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    assert q.finish(*late_copy) == "duplicate"
    assert r.lrange(q.keys.processing("w1"), 0, -1) == third and r.lrange(q.keys.queue, 0, -1) == waiting
    assert not r.exists(q.keys.result(answered.job_id)) and pubsub.get_message(timeout=0.2) is None
    assert q.finish("w1", "t:3", third, [], retry=third) == "done"
    assert r.lrange(q.keys.queue, 0, -1) == third + waiting  # nothing lost, nothing queued twice
    other = JobQueue(r, Settings())  # another Worker's numbers are its own
    q.enqueue(raw_job())
    assert other.finish("w1", "u:1", q.claim("w1", 1, 0), []) == "done"


def test_a_late_claim_into_a_swept_workers_list_is_not_taken_for_its_batch(r):
    """A is swept while it computes and B takes the job; then a claim of A's delivered late moves the next job into
    A's emptied list. A's finish found the list as long as its batch, called it done and trimmed that job away."""
    q, registry = worker_holding_a_job(r, "A")
    [held] = r.lrange(q.keys.processing("A"), 0, -1)
    q.enqueue(raw_job())
    r.delete(q.keys.heartbeat("A"))
    assert registry.sweep() == ["A"]
    assert len(q.claim("B", 1, 0)) == 1  # B runs the swept job
    late = r.lmove(q.keys.queue, q.keys.processing("A"), "LEFT", "RIGHT")  # A's BLMOVE, its reply timed out
    assert q.finish("A", "batch-1", [held], [Reply(jobs.decode_job(held).id, None, "{}")]) == "swept"
    assert q.claim("A", 1, 0) == [late]  # A still holds it, and runs it next


def test_a_job_given_up_by_a_sweep_keeps_that_answer_when_its_worker_finishes_late(r):
    """Its requester was told 500 (the sweep's answer, published); a later 200 overwrote the stored one, so an
    async job's GET changed its answer, and a waiting request could read either."""
    q, registry = queue_and_registry(r, max_attempts=1)
    job = raw_job(reply_to="chan")
    q.enqueue(job)
    pubsub = listening(r, "chan")
    [held] = dies_holding_its_claim(r, q, registry, "slow")
    given_up = r.get(q.keys.result(job.id))
    assert jobs.decode_result(given_up)["success"] is False
    assert pubsub.get_message(timeout=1)["data"] == job.id.encode()
    late = Reply(job.id, "chan", '{"success": true}', with_result=True)
    assert q.finish("slow", "batch-1", [held], [late], gone=[job.id]) == "swept"
    assert r.get(q.keys.result(job.id)) == given_up and pubsub.get_message(timeout=0.2) is None


def test_the_first_answer_stands_when_a_swept_batch_finishes_before_its_rerun(r):
    """The slow worker was swept; its finish lands first and answers. The job's rerun on another worker then
    overwrote that answer and announced a second one."""
    q, registry = queue_and_registry(r)
    job = raw_job(reply_to="chan")
    q.enqueue(job)
    [held] = dies_holding_its_claim(r, q, registry, "slow")
    pubsub = listening(r, "chan")
    first = Reply(job.id, "chan", '{"answer": "first"}')
    assert q.finish("slow", "s:1", [held], [first]) == "swept"
    assert pubsub.get_message(timeout=1)["data"] == job.id.encode()
    rerun = q.claim("other", 1, 0)
    assert q.finish("other", "o:1", rerun, [Reply(job.id, "chan", '{"answer": "second"}')], gone=[job.id]) == "done"
    assert r.get(q.keys.result(job.id)) == b'{"answer": "first"}' and pubsub.get_message(timeout=0.2) is None


def test_a_sweep_that_gives_up_a_job_answered_meanwhile_keeps_that_answer(r):
    """Swept once, the job was answered by its first worker's late finish; its second worker dies too, and the
    sweep gives it up: its 500 replaced the answer already given, and was announced as a second one."""
    q, registry = queue_and_registry(r, max_attempts=2)
    job = raw_job(reply_to="chan")
    q.enqueue(job)
    [held] = dies_holding_its_claim(r, q, registry, "first")
    assert q.finish("first", "f:1", [held], [Reply(job.id, "chan", '{"ok": 1}')]) == "swept"
    pubsub = listening(r, "chan")
    dies_holding_its_claim(r, q, registry, "second")
    assert r.llen(q.keys.dead) == 1  # given up all the same: the operator sees it
    assert r.get(q.keys.result(job.id)) == b'{"ok": 1}' and pubsub.get_message(timeout=0.2) is None


def test_a_requeued_dead_letter_is_answered_again_and_an_async_one_says_queued(r):
    """A job's first answer stands; the operator's requeue is what replaces the one it died with."""
    q = JobQueue(r, Settings())
    job = raw_job(result_ttl=600)
    dead_letter_one(q, job)
    assert r.get(q.keys.result(job.id)) == b"{}"
    assert DeadLetters(r, Settings()).requeue([job.id]).done == [job.id]
    assert not r.exists(q.keys.result(job.id))
    queued = jobs.header_of(r.lindex(q.keys.queue, 0))
    assert r.get(q.keys.status(job.id)) == b"queued"
    assert float(r.get(q.keys.job_deadline(job.id))) == pytest.approx(queued["deadline"], abs=1e-3)
    assert 1100 < r.ttl(q.keys.status(job.id)) <= 1200
    claimed = q.claim("w2", 1, 0)
    assert q.finish("w2", "w:1", claimed, [Reply(job.id, None, '{"ok": 1}')], gone=[job.id]) == "done"
    assert r.get(q.keys.result(job.id)) == b'{"ok": 1}'


def test_a_requeued_dead_letter_is_run_even_if_its_request_had_cancelled_it(real_redis, config):
    """Found by review: a job whose request timed out (marked cancelled) and which then died was requeued, reported
    done, and skipped by the worker as cancelled: no run, no answer."""
    q = JobQueue(real_redis, config)
    job = marked_job(7)
    dead_letter_one(q, job)
    real_redis.set(q.keys.cancelled(job.id), "1", ex=90)  # its client went away before it died
    assert DeadLetters(real_redis, config).requeue([job.id]).done == [job.id]
    classifier = CountingClassifier()
    assert Worker(classifier, config.replace(block_timeout=0.2), name="w").run_once() == 1
    assert classifier.seen == [7] and jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]


def test_a_batch_that_ends_while_the_clock_cannot_reach_redis_keeps_its_answers(real_redis, config):
    """Found by review: the worker's clock reads Redis's TIME again once its last reading is 30 s old (its heartbeat
    thread keeps it fresh, unless Redis is away); that read failing after the model ran threw the batch's results
    away as a model failure, an attempt counted. The clock now counts on from its last reading."""
    q = JobQueue(real_redis, config)
    worker = Worker(CountingClassifier(), config.replace(block_timeout=0.2), name="w")
    worker.clock.now()  # a reading, as the worker's start makes

    class Away:
        def time(self):
            raise redis.ConnectionError("Redis is away")

    real_clock_redis = worker.clock.redis

    class OutageDuringTheModel(CountingClassifier):
        def predict(self, pixels):
            read, at = worker.clock._anchor  # as if read 31 s ago, and not since: 30 s of failed syncs
            worker.clock._anchor, worker.clock._tried_at, worker.clock.redis = (read - 31, at - 31), at - 31, Away()
            return super().predict(pixels)

    worker.classifier = OutageDuringTheModel()
    job = marked_job(5)
    q.enqueue(job)
    assert worker.run_once() == 1
    worker.clock.redis = real_clock_redis
    assert worker.counts["errors"] == 0 and q.length() == 0  # not failed, not handed back
    assert jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_a_dead_letter_command_repeated_after_a_lost_reply_answers_as_the_first(
    redis_server, real_redis, config, monkeypatch, action
):
    """Found by review: redis-py sends a command again when its reply is lost; the repeat of a requeue or purge
    that had run found the job gone from the list and said there was no dead job with that id (exit status 1)."""
    q = JobQueue(real_redis, config)
    job = marked_job(3)
    dead_letter_one(q, job)
    dead = DeadLetters(redis_client.connect(redis_server.url, 5), config)
    connection_class = redis.connection.Connection
    send, read, state = connection_class.send_command, connection_class.read_response, {"last": None, "lost": 0}

    def send_command(self, *args, **kwargs):
        state["last"] = args[0]
        return send(self, *args, **kwargs)

    def read_response(self, *args, **kwargs):
        reply = read(self, *args, **kwargs)  # an error reply (no script loaded yet) raises here: not this one
        if state["last"] == "EVALSHA" and not state["lost"]:
            state["lost"] += 1
            self.disconnect()
            raise redis.ConnectionError("the connection dropped after the script ran")
        return reply

    monkeypatch.setattr(connection_class, "send_command", send_command)
    monkeypatch.setattr(connection_class, "read_response", read_response)
    outcome = getattr(dead, action)([job.id])
    monkeypatch.undo()
    assert state["lost"] == 1 and outcome.done == [job.id]
    assert real_redis.llen(q.keys.dead) == 0 and q.length() == (1 if action == "requeue" else 0)


def test_a_forced_requeue_gives_an_async_job_its_own_time_again(r):
    """Found by review: a dead async job requeued with --force got REQUEST_TIMEOUT (30 s) to be done in, not the
    JOB_RESULT_TTL it was submitted with, while its status said queued for twice that."""
    q = JobQueue(r, Settings())
    job = jobs.encode_job(jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() - 60, result_ttl=600))
    dead_letter_one(q, job)
    assert DeadLetters(r, Settings()).requeue([job.id]).expired == [job.id]
    before = time.time()
    assert DeadLetters(r, Settings()).requeue([job.id], force=True).done == [job.id]
    deadline = jobs.header_of(r.lindex(q.keys.queue, 0))["deadline"]
    assert before + 590 < deadline <= time.time() + 600
    assert r.get(q.keys.status(job.id)) == b"queued"
    assert float(r.get(q.keys.job_deadline(job.id))) == pytest.approx(deadline, abs=1e-3)


def test_a_late_copy_of_a_failure_leaves_the_batch_in_hand_alone(r):
    """It requeued whatever the list held by then, with an attempt counted for a run that never failed."""
    q = JobQueue(r, Settings(max_attempts=3))
    q.enqueue(raw_job())
    first = q.claim("w1", 1, 1)
    assert q.fail("w1", first, "boom") == []
    second = q.claim("w1", 1, 0)  # the same job, one attempt counted
    assert q.fail("w1", first, "boom") == []  # the first call's late copy
    assert r.lrange(q.keys.processing("w1"), 0, -1) == second and q.length() == 0
    assert jobs.decode_job(second[0]).attempts == 1


def test_finish_retries_only_the_jobs_it_is_given_and_acknowledges_exactly_its_batch(r):
    q = JobQueue(r, Settings())
    for _ in range(3):
        q.enqueue(raw_job())
    good, poison, other = q.claim("w1", 2, 1) + [None]
    assert other is None and r.llen(q.keys.processing("w1")) == 2
    retry = jobs.encode_header(dataclasses.replace(jobs.decode_job(poison), attempts=1))
    replies = [Reply(jobs.decode_job(good).id, None, "{}")]
    assert q.finish("w1", "b", [good, poison], replies, retry=[retry]) == "done"
    assert r.llen(q.keys.processing("w1")) == 0
    assert jobs.decode_job(r.lindex(q.keys.queue, 0)).attempts == 1 and q.length() == 2


def test_the_dead_letter_list_keeps_the_newest(r):
    q = JobQueue(r, Settings(dead_letter_max=2))
    q.enqueue(raw_job())
    claimed = q.claim("w1", 4, 1)
    q.finish("w1", "b", claimed, [], dead_jobs=[(b"first", "1"), (b"second", "2"), (b"third", "3")])
    assert [jobs.decode_dead_letter(entry).raw for entry in r.lrange(q.keys.dead, 0, -1)] == ["second", "third"]


def test_a_swept_worker_that_claims_again_is_registered_again_so_a_later_sweep_finds_it(r):
    q, registry = worker_holding_a_job(r, "stalled")
    r.delete(q.keys.heartbeat("stalled"))
    assert registry.sweep() == ["stalled"]  # it stalled past its TTL
    assert q.claim("stalled", 4, 1)  # it wakes up and claims the requeued job, then dies before it beats
    assert registry.sweep() == ["stalled"]  # its new claim is not orphaned
    assert q.length() == 1 and r.llen(q.keys.processing("stalled")) == 0


def test_a_claim_retried_again_and_again_never_holds_more_than_a_batch(r):
    q = JobQueue(r, Settings())
    for _ in range(10):
        q.enqueue(raw_job())
    for _ in range(5):  # each try's reply lost: the worker tries again, without blocking
        held = q.claim("w1", max_jobs=3, timeout=0)
    assert len(held) == 3 and q.length() == 7


def test_a_job_redis_cannot_write_back_does_not_break_the_sweep(real_redis):
    q, registry = worker_holding_a_job(real_redis, "doomed")
    poison = json.loads(raw_job().header)
    poison["deadline"] = 1e999  # cjson reads inf, and cannot encode it again
    real_redis.rpush(q.keys.processing("doomed"), json.dumps(poison).replace("Infinity", "1e999"))
    real_redis.delete(q.keys.heartbeat("doomed"))
    assert registry.sweep() == ["doomed"]
    assert q.length() == 1 and not real_redis.exists(q.keys.processing("doomed"))
    assert real_redis.smembers(q.keys.workers) == set()
    [dead] = [jobs.decode_dead_letter(entry) for entry in real_redis.lrange(q.keys.dead, 0, -1)]
    assert dead.id == poison["id"] and "cannot be written back" in dead.reason  # given up, not requeued forever


def test_an_enqueue_repeated_after_a_lost_reply_queues_the_job_once_and_is_not_refused(r):
    q = JobQueue(r, Settings(max_queue_length=2))
    q.enqueue(raw_job())
    job = raw_job()
    q.enqueue(job)  # this push filled the queue; its reply was lost, and redis-py sends it again
    q.enqueue(job)
    assert q.length() == 2
    with pytest.raises(QueueFull):
        q.enqueue(raw_job())


def test_a_repeat_after_a_worker_claimed_the_job_neither_pushes_it_again_nor_takes_its_pixels(r):
    """The first push ran, its reply was lost, a worker claimed the job and the queue filled up before redis-py
    sent the pipeline again: the repeat must not push a second copy, nor be refused and delete the pixels of
    the copy the worker holds. After the job was answered, a repeat must not bring it back either."""
    q, registry = queue_and_registry(r, max_queue_length=1)
    job = raw_job()
    q.enqueue(job)
    [claimed] = q.claim("w1", max_jobs=1, timeout=1)
    q.enqueue(raw_job())  # other traffic fills the queue
    q.enqueue(job)  # the repeat: answered as the push was, and nothing changes
    assert q.length() == 1 and r.exists(q.keys.pixels(job.id))
    assert q.finish("w1", "batch", [claimed], [Reply(job.id, None, '{"ok": 1}')], gone=[job.id]) == "done"
    assert not r.exists(q.keys.pixels(job.id))
    q.enqueue(job)  # a repeat after the answer: still not pushed again, and its pixels, SET again, not kept
    assert q.length() == 1 and not r.exists(q.keys.pixels(job.id))


def test_a_given_up_job_is_answered_by_the_same_step_that_dead_letters_it(r):
    q, registry = queue_and_registry(r, max_attempts=1)
    q.enqueue(raw_job(reply_to="image_queue:notify:web-1"))
    pubsub = listening(r, "image_queue:notify:web-1")
    [raw] = dies_holding_its_claim(r, q, registry, "doomed")
    assert q.sweep("doomed") == []  # redis-py's retry after a lost reply: nothing left, and nothing lost
    answer = jobs.decode_result(r.get(q.keys.result(jobs.decode_job(raw).id)))
    assert (answer["success"], answer["status"], answer["id"]) == (False, 500, jobs.decode_job(raw).id)
    assert "failed 1 times" in answer["error"]
    assert pubsub.get_message(timeout=1)["data"] == jobs.decode_job(raw).id.encode()


def test_the_sweep_finds_a_processing_list_whose_worker_is_nowhere_registered(r):
    q, registry = queue_and_registry(r)
    q.enqueue(raw_job())
    r.lmove(q.keys.queue, q.keys.processing("ghost"), "LEFT", "RIGHT")  # no heartbeat, in no set
    assert registry.sweep() == ["ghost"]
    assert q.length() == 1 and not r.exists(q.keys.processing("ghost"))


def test_stray_keys_under_the_processing_prefix_do_not_stop_the_sweep(real_redis):
    q, registry = worker_holding_a_job(real_redis, "zz")
    real_redis.rpush(q.keys.processing_prefix.encode() + b"\xff", b"x")  # a name that is not text
    real_redis.set(q.keys.processing("aa"), "not a list")
    real_redis.sadd(q.keys.workers, "aa")
    real_redis.delete(q.keys.heartbeat("zz"))
    assert "zz" in registry.sweep()
    assert q.length() == 1


# -- the pixels' keys: written beside the push, read once by the worker, deleted when the job is done ---------
def marked_job(marker, deadline_in=30.0, **kwargs):
    pixels = np.zeros(jobs.IMAGE_SHAPE, np.uint8)
    pixels[0, 0, 0] = marker  # CountingClassifier's record of which images it saw
    return jobs.encode_job(jobs.Job(pixels, time.time() + deadline_in, **kwargs))


def test_a_job_with_a_deadline_ages_away_does_not_cost_its_batch_mates_their_answers(real_redis, config):
    """Found by review: a job put on the queue by hand with a deadline of 1e16 gave its result a TTL Redis refuses;
    finish.lua failed after acknowledging the batch, and its batch-mates' answers were never stored."""
    q = JobQueue(real_redis, config.replace(block_timeout=0.2))
    before, after = marked_job(1), marked_job(3)
    far = jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), 1e16)
    q.enqueue(before)
    real_redis.set(q.keys.pixels(far.id), far.pixels.tobytes(), ex=600)  # as an injected job's would be
    real_redis.rpush(q.keys.queue, jobs.encode_header(far))
    q.enqueue(after)
    assert Worker(CountingClassifier(), config.replace(block_timeout=0.2), name="w").run_once() == 3
    for job in (before, far, after):
        assert jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]
    assert 0 < real_redis.ttl(q.keys.result(far.id)) <= jobs.MAX_RESULT_TTL
    assert not real_redis.lrange(q.keys.processing("w"), 0, -1) and q.length() == 0


def pixel_keys(r, q):
    return sorted(r.scan_iter(match=q.keys.pixels_prefix + "*"))


def test_the_pixels_wait_in_their_own_key_until_the_deadline_and_a_grace(r):
    q = JobQueue(r, Settings(heartbeat_ttl=15))
    job = raw_job()
    q.enqueue(job)
    assert r.lrange(q.keys.queue, 0, -1) == [job.header]  # the queue holds the small header alone
    assert r.get(q.keys.pixels(job.id)) == job.pixels
    # Exactly at the deadline (30 s ahead) and a grace of 15 + 60 s, on Redis's clock. (A bound on PTTL, read
    # against this host's clock, failed once by the millisecond the instant is rounded up by.)
    assert r.pexpiretime(q.keys.pixels(job.id)) == math.ceil((job.deadline + 75) * 1000)


def test_a_refused_enqueue_leaves_no_pixels_behind(r):
    q = JobQueue(r, Settings(max_queue_length=2))
    kept = raw_job()
    q.enqueue(kept)
    with pytest.raises(QueueFull):
        q.enqueue(raw_job(), raw_job())  # one too many: neither is queued, neither's pixels stay
    assert pixel_keys(r, q) == [q.keys.pixels(kept.id).encode()] and q.length() == 1


def test_an_enqueue_reloads_its_script_after_redis_forgot_it(r):
    q = JobQueue(r, Settings())
    q.enqueue(raw_job())
    r.script_flush()  # a Redis restarted without its scripts
    q.enqueue(raw_job())
    assert q.length() == 2 and len(pixel_keys(r, q)) == 2


def test_finish_deletes_the_pixels_of_jobs_done_for_good_and_keeps_those_retried(r):
    q = JobQueue(r, Settings())
    answered, retried, malformed = raw_job(), raw_job(), raw_job()
    q.enqueue(answered, retried, malformed)
    claimed = q.claim("w1", 3, 1)
    again = jobs.encode_header(dataclasses.replace(jobs.decode_job(retried.header), attempts=1))
    replies = [Reply(answered.id, None, "{}"), Reply(malformed.id, None, "{}")]
    dead_jobs = [(malformed.header, "invalid job: a test")]
    gone = [answered.id, malformed.id]
    assert q.finish("w1", "b", claimed, replies, retry=[again], dead_jobs=dead_jobs, gone=gone) == "done"
    assert pixel_keys(r, q) == [q.keys.pixels(retried.id).encode()]
    [letter] = [jobs.decode_dead_letter(entry) for entry in r.lrange(q.keys.dead, 0, -1)]
    assert letter.id == malformed.id and letter.has_pixels  # moved into the dead letter, not lost


def dead_letter_one(q, job, reason="invalid job: a test"):
    q.enqueue(job)
    claimed = q.claim("w1", 1, 1)
    replies = [Reply(job.id, None, "{}")]
    assert q.finish("w1", "b", claimed, replies, retry=[], dead_jobs=[(job.header, reason)], gone=[job.id]) == "done"


def test_a_dead_letter_holds_its_pixels_as_they_are_and_gives_them_back_on_requeue(r):
    # Escaped inside the JSON envelope, a black image's 147 KiB took 903 KB of Redis (cjson writes \u0000).
    q = JobQueue(r, Settings())
    black = raw_job()
    dead_letter_one(q, black)
    [entry] = r.lrange(q.keys.dead, 0, -1)
    assert len(black.pixels) < len(entry) < len(black.pixels) + 1024
    letter = jobs.decode_dead_letter(entry)
    assert (letter.id, letter.reason, letter.has_pixels) == (black.id, "invalid job: a test", True)
    assert DeadLetters(r, Settings()).requeue([black.id]).done == [black.id]
    assert r.get(q.keys.pixels(black.id)) == black.pixels


def test_a_dead_letter_written_with_its_pixels_inside_the_json_is_still_requeued_with_them(real_redis):
    # As dead letters were written before the pixels followed the JSON: cjson escapes them inside the envelope.
    q = JobQueue(real_redis, Settings())
    job = raw_job()
    noisy = np.random.default_rng(3).integers(0, 256, len(job.pixels), dtype=np.uint8).tobytes()
    real_redis.eval(
        "return redis.call('RPUSH', KEYS[1], cjson.encode({reason='old', dead_at=1, job=ARGV[1], pixels=ARGV[2]}))",
        1,
        q.keys.dead,
        job.header,
        noisy,
    )
    letter = jobs.decode_dead_letter(real_redis.lindex(q.keys.dead, 0))
    assert (letter.id, letter.reason, letter.has_pixels) == (job.id, "old", True)
    assert DeadLetters(real_redis, Settings()).requeue([job.id]).done == [job.id]
    assert real_redis.get(q.keys.pixels(job.id)) == noisy


def test_a_swept_batch_keeps_its_pixels_for_the_jobs_next_run(r):
    q, registry = worker_holding_a_job(r, "slow")
    [raw] = r.lrange(q.keys.processing("slow"), 0, -1)
    job = jobs.decode_job(raw)
    r.delete(q.keys.heartbeat("slow"))
    assert registry.sweep() == ["slow"]
    assert q.finish("slow", "b", [raw], [Reply(job.id, None, "{}")], gone=[job.id]) == "swept"
    assert r.exists(q.keys.pixels(job.id))


def test_every_job_the_worker_is_done_with_leaves_no_pixels_behind(real_redis, config):
    config = config.replace(block_timeout=0.2)
    q = JobQueue(real_redis, config)
    answered, cancelled, late = marked_job(1), marked_job(2), marked_job(3, deadline_in=-5)
    malformed = json.loads(marked_job(4).header)
    malformed["top_k"] = 0
    q.enqueue(answered, cancelled, late)
    real_redis.rpush(q.keys.queue, json.dumps(malformed))
    real_redis.set(q.keys.pixels(malformed["id"]), b"\0" * 150528, ex=60)
    real_redis.set(q.keys.cancelled(cancelled.id), "1", ex=60)
    classifier = CountingClassifier()
    assert Worker(classifier, config, name="tidy").run_once() == 4
    assert classifier.seen == [1]
    assert jobs.decode_result(real_redis.get(q.keys.result(answered.id)))["success"]
    assert pixel_keys(real_redis, q) == []  # 147 KiB each would otherwise wait out deadline + grace


class FailsOnce(CountingClassifier):
    def __init__(self):
        super().__init__()
        self.failed = False

    def predict(self, pixels):
        if not self.failed:
            self.failed = True
            raise RuntimeError("a passing fault")
        return super().predict(pixels)


def test_a_retried_job_keeps_its_pixels_and_is_classified_with_them(real_redis, config):
    config = config.replace(block_timeout=0.2, max_attempts=3)
    q = JobQueue(real_redis, config)
    job = marked_job(7)
    q.enqueue(job)
    classifier = FailsOnce()
    worker = Worker(classifier, config, name="again")
    assert worker.run_once() == 1  # the model fails: the job goes back with an attempt counted
    assert jobs.decode_job(real_redis.lindex(q.keys.queue, 0)).attempts == 1
    assert real_redis.get(q.keys.pixels(job.id)) == job.pixels
    assert worker.run_once() == 1
    assert classifier.seen == [7]  # its own image, the second time
    assert jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]
    assert pixel_keys(real_redis, q) == []


class OddRows(CountingClassifier):
    """NaN or infinity for the images marked 13 or 14; with `width`, answers of that many classes."""

    def __init__(self, width=1000):
        super().__init__()
        self.width = width

    def predict(self, pixels):
        rows = np.resize(super().predict(pixels), (len(pixels), self.width))
        rows[[int(p[0, 0, 0]) == 13 for p in pixels]] = np.nan
        rows[[int(p[0, 0, 0]) == 14 for p in pixels]] = np.inf
        return rows


def test_an_answer_of_nan_or_infinity_fails_its_own_job_and_its_batch_mates_are_answered(real_redis, config):
    # It was sent as success: {"probability": NaN}, which is not JSON.
    config = config.replace(block_timeout=0.2, max_attempts=1)
    q = JobQueue(real_redis, config)
    nan, inf, fine = marked_job(13), marked_job(14), marked_job(15)
    q.enqueue(nan, inf, fine)
    assert Worker(OddRows(), config, name="odd").run_once() == 3
    assert jobs.decode_result(real_redis.get(q.keys.result(fine.id)))["success"]
    for job in (nan, inf):
        answer = jobs.decode_result(real_redis.get(q.keys.result(job.id)))
        assert (answer["success"], answer["status"]) == (False, 500) and "NaN or infinity" in answer["error"]
    assert sorted(jobs.decode_dead_letter(e).id for e in real_redis.lrange(q.keys.dead, 0, -1)) == sorted(
        [nan.id, inf.id]
    )


def test_an_answer_of_the_wrong_number_of_classes_is_no_answer(real_redis, config):
    config = config.replace(block_timeout=0.2, max_attempts=1)
    q = JobQueue(real_redis, config)
    job = marked_job(1)
    q.enqueue(job)
    assert Worker(OddRows(width=1001), config, name="wide").run_once() == 1
    answer = jobs.decode_result(real_redis.get(q.keys.result(job.id)))
    assert answer["success"] is False and "shape (1, 1001) for 1 images of 1000 classes" in answer["error"]


def test_a_stop_while_redis_is_away_mid_batch_hands_the_batch_back_unattempted(real_redis, config, monkeypatch):
    # The stop ended the wait for Redis as a fault of the batch: an attempt counted for a job the model never saw.
    config = config.replace(block_timeout=0.2, max_attempts=1)
    q = JobQueue(real_redis, config)
    q.enqueue(marked_job(3))
    classifier = CountingClassifier()
    worker = Worker(classifier, config, name="blip")
    mget = worker.redis.mget

    def blip(*args, **kwargs):  # the batch's read of its pixels, as SIGTERM arrives
        worker.stopping.set()
        monkeypatch.setattr(worker.redis, "mget", mget)
        raise redis.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(worker.redis, "mget", blip)
    worker.serve()
    assert classifier.seen == [] and real_redis.llen(q.keys.dead) == 0
    [raw] = real_redis.lrange(q.keys.queue, 0, -1)
    assert jobs.decode_job(raw).attempts == 0


def test_a_model_that_hangs_has_its_batch_handed_back_and_its_worker_ends(real_redis, config, monkeypatch, capfd):
    """It beat on while stuck, so no sweep took its batch, and readiness and admission counted it as serving:
    every request after it waited out its deadline."""
    config = config.replace(block_timeout=0.2, heartbeat_interval=0.2, heartbeat_ttl=1, max_batch_seconds=0.6)
    q = JobQueue(real_redis, config)
    job = marked_job(5)
    q.enqueue(job)
    release, ended = threading.Event(), []

    class Hangs(CountingClassifier):
        def predict(self, pixels):
            release.wait(30)
            return super().predict(pixels)

    worker = Worker(Hangs(), config, name="stuck")
    monkeypatch.setattr(worker_module, "_end_process", lambda status: ended.append(status) or release.set())
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        assert release.wait(10), "the hung batch was never given up"
        assert ended == [worker_module.EXIT_HUNG]
        [raw] = real_redis.lrange(q.keys.queue, 0, -1)
        assert jobs.decode_job(raw).id == job.id and jobs.decode_job(raw).attempts == 1  # a hang counts
        assert not real_redis.sismember(q.keys.workers, "stuck") and not real_redis.exists(q.keys.heartbeat("stuck"))
    finally:
        worker.stopping.set()
        release.set()
        serving.join(10)
    assert "batch_hung worker=stuck" in capfd.readouterr().err


def test_a_batch_waiting_out_a_redis_outage_is_not_taken_for_a_hung_model(real_redis, config, monkeypatch):
    # Only the model's time counts: the guard fired on a finish that waited for Redis, and the answer was lost.
    config = config.replace(block_timeout=0.2, heartbeat_interval=0.2, heartbeat_ttl=1, max_batch_seconds=0.6)
    q = JobQueue(real_redis, config)
    job = marked_job(6)
    q.enqueue(job)
    worker, ended = Worker(CountingClassifier(), config, name="patient"), []
    monkeypatch.setattr(worker_module, "_end_process", ended.append)
    finish, back_at = worker.queue.finish, time.monotonic() + 1.5

    def finish_once_redis_is_back(*args, **kwargs):
        if time.monotonic() < back_at:
            raise redis.ConnectionError("Connection refused")
        worker.stopping.set()
        return finish(*args, **kwargs)

    monkeypatch.setattr(worker.queue, "finish", finish_once_redis_is_back)
    worker.serve()
    assert ended == []
    assert jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]


@pytest.mark.parametrize(
    ("refused", "stalled", "sweep_stalls"),
    [
        pytest.param(set(), None, None, id="redis up"),
        pytest.param({1, 2, 3, 4, 5}, None, None, id="redis away at its start, for longer than the TTL"),
        pytest.param({5}, None, None, id="redis away at a later beat"),
        pytest.param(set(), 5, None, id="a beat stalled"),
        pytest.param(set(), None, 0.0, id="a sweep failed"),
        pytest.param(set(), None, 1.5, id="a sweep timed out"),
    ],
)
def test_a_worker_sweeps_no_one_for_a_heartbeat_ttl_after_it_came_or_met_an_outage(
    real_redis, config, monkeypatch, refused, stalled, sweep_stalls
):
    # The peer's heartbeat lapsed in an outage (perhaps one that ended before the newcomer came, while its model
    # loaded) and its next beat may still be on its way: swept now, its batch would be computed twice and each job
    # charged an attempt (with MAX_ATTEMPTS=2, a second such sweep gives it up).
    config = config.replace(block_timeout=0.2, heartbeat_interval=0.2, heartbeat_ttl=2)
    q = JobQueue(real_redis, config)
    q.enqueue(marked_job(1))
    WorkerRegistry(real_redis, q, config.heartbeat_ttl).beat("peer", {"ready": 1})
    q.claim("peer", 10, 1)
    real_redis.delete(q.keys.heartbeat("peer"))
    worker = Worker(CountingClassifier(), config, name="newcomer")
    beat, sweep, beats, seen = worker.registry.beat, worker.registry.sweep, itertools.count(1), {"trouble": 0.0}

    def beat_as_redis_lets_it(*args):  # 1: the registration (retried after 0.1, 0.2, 0.4 s...); then every interval
        number = next(beats)
        if number in refused:
            seen["trouble"] = time.monotonic()
            raise redis.ConnectionError("Connection refused")
        seen.setdefault("registered", time.monotonic())
        if number == stalled:
            time.sleep(1.5)  # Redis frozen, and thawed before the client's timeout: the beat raises nothing
        outcome = beat(*args)
        if number == stalled:
            seen["trouble"] = time.monotonic()
        return outcome

    def timed_sweep():
        if sweep_stalls is not None and "sweep_failed" not in seen:  # Redis went, or froze as the sweep was sent
            time.sleep(sweep_stalls)
            seen["trouble"] = seen["sweep_failed"] = time.monotonic()
            raise redis.TimeoutError("Timeout reading from socket") if sweep_stalls else redis.ConnectionError()
        swept = sweep()
        if "peer" in swept:
            seen["swept"] = time.monotonic()
        return swept

    monkeypatch.setattr(worker.registry, "beat", beat_as_redis_lets_it)
    monkeypatch.setattr(worker.registry, "sweep", timed_sweep)
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        deadline = time.monotonic() + 15
        while "swept" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stopping.set()
        serving.join(10)
    assert "swept" in seen and not real_redis.exists(q.keys.processing("peer"))  # a lapsed peer is swept in the end
    assert seen["swept"] >= max(seen["registered"], seen["trouble"]) + config.heartbeat_ttl


def test_a_heartbeat_that_raises_something_other_than_a_redis_error_goes_on_beating(
    real_redis, config, monkeypatch, capfd
):
    # Ended by it, the heartbeat thread left the worker serving unseen: its heartbeat lapsed, readiness and admission
    # no longer counted it, and its peers would sweep each batch it claimed while it computed it.
    config = config.replace(block_timeout=0.2, heartbeat_interval=0.2, heartbeat_ttl=1)
    q = JobQueue(real_redis, config)
    worker = Worker(CountingClassifier(), config, name="steady")
    sync, faults = worker.clock.sync, []

    def sync_with_a_bug():
        if threading.current_thread().name == "heartbeat" and not faults:
            faults.append(time.monotonic())
            raise ValueError("a reply the client could not read")
        sync()

    monkeypatch.setattr(worker.clock, "sync", sync_with_a_bug)
    serving = threading.Thread(target=worker.serve)
    serving.start()
    try:
        deadline = time.monotonic() + 10
        while (not faults or time.monotonic() < faults[0] + 3 * config.heartbeat_ttl) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert faults, "the heartbeat thread never beat"
        assert real_redis.exists(q.keys.heartbeat("steady")), "the worker's heartbeat lapsed after the fault"
        assert real_redis.sismember(q.keys.workers, "steady")
    finally:
        worker.stopping.set()
        serving.join(10)
    assert "ValueError('a reply the client could not read')" in capfd.readouterr().err


def test_a_job_whose_pixels_are_gone_is_answered_410_and_dead_lettered(real_redis, config):
    config = config.replace(block_timeout=0.2)
    q = JobQueue(real_redis, config)
    lost, mate = marked_job(1, reply_to="image_queue:notify:web-1"), marked_job(2)
    q.enqueue(lost, mate)
    real_redis.delete(q.keys.pixels(lost.id))  # expired, or evicted by a Redis short of memory
    pubsub = real_redis.pubsub()
    pubsub.subscribe("image_queue:notify:web-1")
    pubsub.get_message(timeout=1)
    classifier = CountingClassifier()
    worker = Worker(classifier, config, name="survivor")
    assert worker.run_once() == 2
    assert classifier.seen == [2]  # its batch-mate is answered
    answer = jobs.decode_result(real_redis.get(q.keys.result(lost.id)))
    assert (answer["success"], answer["status"]) == (False, 410) and "pixels are gone" in answer["error"]
    assert jobs.parse_notification(pubsub.get_message(timeout=1)["data"])[0] == lost.id  # told at once
    [letter] = [jobs.decode_dead_letter(entry) for entry in real_redis.lrange(q.keys.dead, 0, -1)]
    assert letter.id == lost.id and "pixels are gone" in letter.reason and not letter.has_pixels
    assert not real_redis.exists(q.keys.processing("survivor"))
    assert worker.run_once() == 0  # and the worker lives on


def test_a_waited_for_result_is_kept_until_its_deadline_and_announced_as_its_job_asks(real_redis, config):
    """A request waits until its deadline at most: its result is kept that long and a grace for a retried read
    (job_queue.result_grace), not RESULT_TTL; an async job's, its own result_ttl. A job with notify_result gets
    its result in the notification, one without (from a web process of an earlier version) its bare id."""
    config = config.replace(block_timeout=0.2, result_ttl=600)
    q = JobQueue(real_redis, config)
    pixels = np.zeros(jobs.IMAGE_SHAPE, np.uint8)
    waited = jobs.Job(pixels, time.time() + 20, reply_to="chan", notify_result=True)
    older_web = jobs.Job(pixels, time.time() + 20, reply_to="chan")
    detached = jobs.Job(pixels, time.time() + 900, result_ttl=900)
    polled = jobs.Job(pixels, time.time() + 20)  # WAIT_MODE=poll, or a dead letter an operator requeued
    q.enqueue(*(jobs.encode_job(job) for job in (waited, older_web, detached, polled)))
    pubsub = real_redis.pubsub()
    pubsub.subscribe("chan")
    pubsub.get_message(timeout=1)
    assert Worker(CountingClassifier(), config, name="keeper").run_once() == 4
    grace = config.redis_socket_timeout + 5
    for job in (waited, older_web):
        assert 15_000 < real_redis.pttl(q.keys.result(job.id)) <= (20 + grace + 1) * 1000
    assert 890_000 < real_redis.pttl(q.keys.result(detached.id)) <= 900_000
    assert 590_000 < real_redis.pttl(q.keys.result(polled.id)) <= 600_000  # RESULT_TTL
    first, second = (pubsub.get_message(timeout=1)["data"] for _ in range(2))
    assert jobs.parse_notification(first) == (waited.id, real_redis.get(q.keys.result(waited.id)))
    assert second == older_web.id.encode()


@pytest.mark.parametrize("reply_to", ["chan", None], ids=["notified", "polling"])
def test_a_waited_for_result_outlives_a_shorter_result_ttl_until_its_deadline(real_redis, config, reply_to):
    """With REQUEST_TIMEOUT above RESULT_TTL, a request of several images reads its results in order: a later
    image's, stored first, must still be there when it gets to it (found by review: it was capped at RESULT_TTL;
    then, by a later review, still for a polling request, WAIT_MODE=poll, whose jobs have no reply channel)."""
    config = config.replace(block_timeout=0.2, result_ttl=5)
    q = JobQueue(real_redis, config)
    job = jobs.Job(np.zeros(jobs.IMAGE_SHAPE, np.uint8), time.time() + 60, reply_to=reply_to)
    q.enqueue(jobs.encode_job(job))
    assert Worker(CountingClassifier(), config, name="keeper").run_once() == 1
    assert real_redis.pttl(q.keys.result(job.id)) > 50_000


def test_a_second_copy_of_an_answered_job_is_dropped_not_answered_410(real_redis, config):
    """A push repeated after a lost reply, when a worker had claimed and finished the first copy meanwhile
    (deleting its pixels), queues a second copy: it must not overwrite the answer with an error."""
    config = config.replace(block_timeout=0.2)
    q = JobQueue(real_redis, config)
    job = marked_job(1)
    q.enqueue(job)
    worker = Worker(CountingClassifier(), config, name="first")
    assert worker.run_once() == 1
    real_redis.rpush(q.keys.queue, job.header)  # the repeated push: its pixels were deleted with the answer
    assert worker.run_once() == 1
    assert jobs.decode_result(real_redis.get(q.keys.result(job.id)))["success"]
    assert real_redis.llen(q.keys.dead) == 0 and pixel_keys(real_redis, q) == []


def test_a_beat_that_reaches_redis_after_the_unregister_registers_nothing(r, config):
    # A beat whose reply timed out may still be on its way when its worker unregisters; applied after that, it
    # kept a stopped worker registered, ready and counted by admission for HEARTBEAT_TTL.
    q = JobQueue(r, config)
    registry = WorkerRegistry(r, q, config.heartbeat_ttl)
    info = {"name": "leaving", "model": "resnet50", "ready": 1, "images_per_s": 30.5}
    assert registry.beat("leaving", info)
    assert registry.workers() == [{**info, "ready": "1", "images_per_s": "30.5"}]
    registry.unregister("leaving")
    assert not registry.beat("leaving", info)  # the late one
    assert registry.workers() == []
    assert not r.sismember(q.keys.workers, "leaving")
    assert registry.beat("arriving", {**info, "name": "arriving"})  # the mark is the leaver's alone
    assert [worker["name"] for worker in registry.workers()] == ["arriving"]


def test_a_beat_that_lands_after_the_worker_stopped_does_not_register_it_again(real_redis, config):
    config = config.replace(block_timeout=0.2)
    q = JobQueue(real_redis, config)
    registry = WorkerRegistry(real_redis, q, config.heartbeat_ttl)
    worker = Worker(CountingClassifier(), config, name="stopped")
    worker.stopping.set()
    worker.serve()  # registers, beats, takes no batch, unregisters
    assert registry.workers() == []
    worker._beat()  # the heartbeat thread's beat, past its last wait when the worker stopped
    assert registry.workers() == []
    assert not real_redis.sismember(q.keys.workers, "stopped")


def test_a_worker_under_the_name_of_one_that_just_left_refuses_to_start(real_redis, config):
    # Its beats would register nothing (the left mark bars the name): it would serve unseen by readiness and
    # admission. Names are one per process (run_model_server's carry the pid and a random part).
    config = config.replace(block_timeout=0.2)
    registry = WorkerRegistry(real_redis, JobQueue(real_redis, config), config.heartbeat_ttl)
    first = Worker(CountingClassifier(), config, name="gpu-box-1")
    first.stopping.set()
    first.serve()
    left = JobQueue(real_redis, config).keys.left("gpu-box-1")
    real_redis.expire(left, 100)  # it left some time ago
    second = Worker(CountingClassifier(), config, name="gpu-box-1")
    second.stopping.set()  # it registers (or not) first: should it start, it stops at once
    with pytest.raises(NameTaken, match="a worker named 'gpu-box-1' left less than 3600 s ago"):
        second.serve()
    assert registry.workers() == []
    assert 0 < real_redis.ttl(left) <= 100  # the refused one did not leave in its turn, renewing the bar


@pytest.mark.parametrize("late", ["claim.lua", "BLMOVE"])
def test_jobs_a_late_claim_put_in_a_left_worker_s_list_are_requeued_without_an_attempt(r, config, late):
    # A claim whose reply timed out (then SIGTERM during the backoff) may reach Redis after the unregister: the
    # jobs it moved never ran, and the sweep that finds them must not spend an attempt (with MAX_ATTEMPTS=1,
    # a dead letter and a 500 for an image no model saw).
    config = config.replace(max_attempts=1)
    q = JobQueue(r, config)
    registry = WorkerRegistry(r, q, config.heartbeat_ttl)
    registry.beat("leaving", {"ready": 1})
    registry.unregister("leaving")
    job = marked_job(5)
    q.enqueue(job)
    if late == "claim.lua":
        q.claim("leaving", 32, 0)
    else:
        r.blmove(q.keys.queue, q.keys.processing("leaving"), 1, "LEFT", "RIGHT")
    assert q.length() == 0
    assert registry.sweep() == ["leaving"]  # a registry's first sweep also looks for unregistered lists
    assert [jobs.decode_job(raw).attempts for raw in r.lrange(q.keys.queue, 0, -1)] == [0]
    assert r.llen(q.keys.dead) == 0 and r.get(q.keys.result(job.id)) is None
    assert not r.sismember(q.keys.workers, "leaving")


class _Crash(BaseException):
    """What no `except Exception` stops: SystemExit from a native library's fatal path, say."""


class CrashingClassifier(CountingClassifier):
    def predict(self, pixels):
        raise _Crash()


def test_a_worker_that_dies_in_a_batch_does_not_leave_so_its_batch_costs_an_attempt(real_redis, config):
    # Its stop path used to leave, handing the batch back unattempted: a job that kills every worker looped for ever.
    config = config.replace(max_attempts=1, block_timeout=0.2)
    q = JobQueue(real_redis, config)
    registry = WorkerRegistry(real_redis, q, config.heartbeat_ttl)
    q.enqueue(marked_job(9))
    worker = Worker(CrashingClassifier(), config, name="dies")
    with pytest.raises(_Crash):
        worker.serve()
    assert q.length() == 0 and real_redis.llen(q.keys.processing("dies")) == 1  # held, as by a kill -9
    assert not real_redis.exists(q.keys.left("dies"))
    real_redis.delete(q.keys.heartbeat("dies"))  # its heartbeat lapses
    assert registry.sweep() == ["dies"]
    assert real_redis.llen(q.keys.dead) == 1  # MAX_ATTEMPTS=1: given up, its requester answered


class BrokenTopK(CountingClassifier):
    def top_k(self, probabilities, k):
        raise ValueError("a fault of ours: the whole batch fails")


def test_a_batch_that_fails_while_the_worker_stops_keeps_its_attempt_through_a_redis_blip(
    real_redis, config, monkeypatch
):
    # A stop during the batch, then one reset connection as its failure is recorded: the retry was cut short by
    # the stop, and the leave handed the batch back unattempted.
    config = config.replace(max_attempts=1, block_timeout=0.2)
    q = JobQueue(real_redis, config)
    q.enqueue(marked_job(5))
    worker = Worker(BrokenTopK(), config, name="stopping")
    fail, calls = worker.queue.fail, []

    def flaky_fail(name, claimed, error=""):
        calls.append(name)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection reset by peer")
        return fail(name, claimed, error)

    monkeypatch.setattr(worker.queue, "fail", flaky_fail)
    classify = worker._classify

    def classify_then_stop(batch):
        worker.stopping.set()  # as SIGTERM does while a batch runs
        return classify(batch)

    worker._classify = classify_then_stop
    worker.serve()
    assert len(calls) == 2 and real_redis.llen(q.keys.dead) == 1 and q.length() == 0

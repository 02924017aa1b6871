"""queue_admin.py as an operator runs it: a real process against the private redis-server, through REDIS_URL.

The dead letters are made by the service's own writers (the worker's triage through finish.lua, the sweep and
the model-failure path through requeue.lua), so these tests also hold the writers to jobs.DeadLetter's envelope.
"""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import jobs
from job_queue import JobQueue
from keys import Keys
from settings import Settings
from support import ROOT, CountingClassifier, free_port
from worker import Worker
from worker_registration import WorkerRegistry

KEYS = Keys("image_queue")
_SETTINGS_VARIABLES = {field.name.upper() for field in dataclasses.fields(Settings)}


def admin(redis_url, *args, **env):
    """Run queue_admin.py with only REDIS_URL (and `env`) of the service's settings in its environment."""
    environ = {k: v for k, v in os.environ.items() if k not in _SETTINGS_VARIABLES}
    return subprocess.run(
        [sys.executable, str(ROOT / "queue_admin.py"), *args],
        cwd=ROOT,
        env={**environ, "REDIS_URL": redis_url, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def table(text, header_start):
    """The rows of a table printed by queue_admin.py, as dicts; columns are cut where the header's words begin."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = lines[at]
    starts = [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 2 : i] == "  ")]
    names = [header[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
    rows = []
    for line in lines[at + 1 :]:
        if not line.strip():
            break
        rows.append({n: line[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None], strict=True)})
    return rows


def make_job(deadline_in=30.0, marker=0, **kwargs):
    pixels = np.zeros(jobs.IMAGE_SHAPE, np.uint8)
    pixels[0, 0, 0] = marker  # CountingClassifier's record of which images it saw
    return jobs.Job(pixels, time.time() + deadline_in, **kwargs)


def dead_letter_by_sweep(connection, config, *job_list):
    """A worker claims the jobs and dies holding them; with MAX_ATTEMPTS 1 the sweep dead-letters them."""
    queue = JobQueue(connection, config.replace(max_attempts=1))
    registry = WorkerRegistry(connection, queue, heartbeat_ttl=60)
    registry.beat("doomed", {"ready": 1})
    for job in job_list:
        queue.enqueue(jobs.encode_job(job))
    assert len(queue.claim("doomed", 100, 1)) == len(job_list)
    connection.delete(KEYS.heartbeat("doomed"))
    assert "doomed" in registry.sweep()  # (with any worker a test ran without heartbeats)


class FailingClassifier(CountingClassifier):
    def predict(self, pixels):
        raise RuntimeError("the model is broken")


@pytest.fixture
def admin_config(config):
    return config.replace(block_timeout=0.2)


def test_info_shows_depth_workers_in_flight_orphans_and_dead(real_redis, redis_server, admin_config):
    queue = JobQueue(real_redis, admin_config)
    registry = WorkerRegistry(real_redis, queue, heartbeat_ttl=60)
    for _ in range(4):
        queue.enqueue(jobs.encode_job(make_job()))
    beat = {"name": "w-alive", "model": "counting", "batch_size": 8, "ready": 1, "pid": 4242, "host": "h1"}
    registry.beat("w-alive", {**beat, "beat_at": time.time() - 3, "batches": 5, "jobs": 40, "errors": 1, "expired": 2})
    real_redis.rpush(KEYS.processing("w-alive"), "job-a", "job-b")
    real_redis.sadd(KEYS.workers, "w-silent")  # registered, heartbeat expired, not swept yet
    real_redis.rpush(KEYS.processing("w-silent"), "job-c")
    real_redis.rpush(KEYS.processing("ghost"), "job-d", "job-e", "job-f")  # nobody's: an orphan
    real_redis.rpush(KEYS.dead, "x", "y")

    result = admin(redis_server.url, "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["queue"], info["queue_depth"], info["dead"]) == ("image_queue", 4, 2)
    alive, silent = info["workers"]
    assert alive["name"] == "w-alive" and alive["alive"] and alive["ready"]
    assert (alive["model"], alive["batch_size"], alive["pid"], alive["host"]) == ("counting", 8, 4242, "h1")
    assert (alive["batches"], alive["jobs"], alive["errors"], alive["expired"], alive["in_flight"]) == (5, 40, 1, 2, 2)
    assert 3 <= alive["heartbeat_age_s"] < 600  # beat_at was 3 s before the tool's clock read
    assert silent["name"] == "w-silent" and not silent["alive"] and silent["heartbeat_age_s"] is None
    assert silent["in_flight"] == 1
    assert info["orphans"] == [{"key": "image_queue:processing:ghost", "worker": "ghost", "jobs": 3}]

    result = admin(redis_server.url, "info")
    assert result.returncode == 0, result.stderr
    assert "waiting jobs  4" in result.stdout and "dead letters  2" in result.stdout
    rows = {row["NAME"]: row for row in table(result.stdout, "NAME ")}
    assert rows["w-alive"]["MODEL"] == "counting" and rows["w-alive"]["BATCH"] == "8"
    assert rows["w-alive"]["HEARTBEAT"].endswith(" s ago") and float(rows["w-alive"]["HEARTBEAT"].split()[0]) >= 3
    counts = [rows["w-alive"][c] for c in ("BATCHES", "JOBS", "ERRORS", "EXPIRED", "IN FLIGHT")]
    assert counts == ["5", "40", "1", "2", "2"]
    assert rows["w-silent"]["HEARTBEAT"].startswith("none") and rows["w-silent"]["IN FLIGHT"] == "1"
    assert table(result.stdout, "KEY ") == [{"KEY": "image_queue:processing:ghost", "JOBS": "3"}]


def test_info_holds_against_a_skewed_host_clock_and_a_stray_key(real_redis, redis_server, admin_config):
    """Found by review: heartbeat ages were counted on the admin host's own clock against Redis's (a host 90 s
    behind showed a beat of 0.5 s ago as -89 s), and one key of another type under the processing prefix made the
    whole of `info` fail with WRONGTYPE."""
    registry = WorkerRegistry(real_redis, JobQueue(real_redis, admin_config), heartbeat_ttl=60)
    seconds, microseconds = real_redis.time()
    registry.beat("w-alive", {"name": "w-alive", "ready": 1, "beat_at": seconds + microseconds / 1e6 - 3})
    real_redis.set(KEYS.processing("stray"), "not a list")
    [libfaketime] = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")  # Debian's faketime package
    result = admin(redis_server.url, "info", "--json", LD_PRELOAD=libfaketime, FAKETIME="-90s")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    [alive] = info["workers"]
    assert 3 <= alive["heartbeat_age_s"] < 60
    assert info["orphans"] == []


def test_info_reads_the_image_queue_namespace_it_is_given(real_redis, redis_server, admin_config):
    JobQueue(real_redis, admin_config).enqueue(jobs.encode_job(make_job()))
    other = json.loads(admin(redis_server.url, "info", "--json", IMAGE_QUEUE="other").stdout)
    assert (other["queue"], other["queue_depth"]) == ("other", 0)
    assert json.loads(admin(redis_server.url, "info", "--json").stdout)["queue_depth"] == 1


def test_dead_list_shows_every_writers_reason_and_lists_garbage_raw(real_redis, redis_server, admin_config):
    queue = JobQueue(real_redis, admin_config)
    malformed = json.loads(jobs.encode_header(make_job(request_id="req-malformed")))
    malformed["shape"] = [2, 2, 3]
    real_redis.rpush(KEYS.queue, b"\x00 not json", json.dumps(malformed))
    real_redis.set(KEYS.pixels(malformed["id"]), b"\0" * 150528)
    assert Worker(CountingClassifier(), admin_config, name="triager").run_once() == 2  # finish.lua
    swept = make_job(request_id="req-swept")
    dead_letter_by_sweep(real_redis, admin_config, swept)  # requeue.lua, sweep
    broken = make_job()
    queue.enqueue(jobs.encode_job(broken))
    assert Worker(FailingClassifier(), admin_config.replace(max_attempts=1), name="w-broken").run_once() == 1
    lost = make_job()
    queue.enqueue(jobs.encode_job(lost))
    real_redis.delete(KEYS.pixels(lost.id))  # expired or evicted before a worker got to it
    assert Worker(CountingClassifier(), admin_config, name="w-lost").run_once() == 1
    legacy = make_job()  # an entry of the old format, the bare binary job (a header line, then the pixels)
    real_redis.rpush(KEYS.dead, jobs.encode_header(legacy) + b"\n" + b"\0" * 150528, b"\xff\xfe garbage " * 20)

    result = admin(redis_server.url, "dead", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dead letters: 7\n")
    rows = table(result.stdout, "ID ")
    assert len(rows) == 7
    by_id = {row["ID"]: row for row in rows}
    assert by_id[malformed["id"]]["REASON"] == "invalid job: job image shape must be [224, 224, 3]"
    assert by_id[malformed["id"]]["REQUEST ID"] == "req-malformed"
    assert by_id[swept.id]["REASON"] == "out of attempts (1); the last: worker doomed stopped beating while holding it"
    assert (by_id[swept.id]["REQUEST ID"], by_id[swept.id]["ATTEMPTS"]) == ("req-swept", "1")
    assert by_id[swept.id]["ENQUEUED"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(swept.enqueued_at))
    assert by_id[broken.id]["REASON"] == (
        "out of attempts (1); the last: the model raised RuntimeError('the model is broken') on worker w-broken"
    )
    assert by_id[lost.id]["REASON"] == (
        "the job's pixels are gone from Redis (expired or evicted); no pixels: cannot be requeued"
    )
    no_id = [row for row in rows if row["ID"] == "-"]
    assert no_id[0]["REASON"].startswith("invalid job: job is not a JSON object")
    assert "raw b'\\x00 not json'" in no_id[0]["REASON"]
    assert no_id[0]["DEAD SINCE"] != "-"
    assert no_id[1]["REASON"].startswith('unknown; raw b\'{"id": "' + legacy.id) and "(150" in no_id[1]["REASON"]
    assert no_id[2]["REASON"].startswith("unknown; raw b'\\xff\\xfe garbage") and "(220 bytes)" in no_id[2]["REASON"]

    result = admin(redis_server.url, "dead", "requeue", lost.id)  # without its image it cannot run again
    assert result.returncode == 1
    assert result.stderr == (
        f"queue_admin: left dead, their pixels were gone when they died (send the images again): {lost.id}\n"
    )
    assert real_redis.llen(KEYS.queue) == 0 and lost.id in dead_ids(real_redis)

    listing = json.loads(admin(redis_server.url, "dead", "list", "--json", "--limit", "3").stdout)
    assert listing["dead"] == 7 and [e["id"] for e in listing["entries"]] == [lost.id, None, None]
    assert [e["pixels"] for e in listing["entries"]] == [False, False, False]
    assert listing["entries"][2]["raw"].startswith("b'\\xff\\xfe garbage")
    assert all(
        e["pixels"]
        for e in json.loads(admin(redis_server.url, "dead", "list", "--json").stdout)["entries"]
        if e["id"] in (malformed["id"], swept.id, broken.id)
    )


@pytest.fixture
def three_dead(real_redis, admin_config):
    """Jobs A and B dead with their deadline ahead, C dead with its deadline passed; two entries with no job id."""
    fresh_a, fresh_b = (
        make_job(marker=1, reply_to="image_queue:notify:gone"),
        make_job(reply_to="image_queue:notify:gone"),
    )
    late = make_job(deadline_in=-60, reply_to="image_queue:notify:gone")
    dead_letter_by_sweep(real_redis, admin_config, fresh_a, fresh_b, late)
    real_redis.rpush(KEYS.dead, b"\x00 garbage", json.dumps({"no": "id"}))
    real_redis.rpush(KEYS.queue, "waiting")
    return fresh_a, fresh_b, late


def dead_ids(connection):
    return [jobs.decode_dead_letter(entry).id for entry in connection.lrange(KEYS.dead, 0, -1)]


def queued_after_the_waiting_one(connection):
    waiting, *requeued = connection.lrange(KEYS.queue, 0, -1)
    assert waiting == b"waiting"
    return [jobs.decode_job(raw) for raw in requeued]


def test_requeue_one_puts_it_at_the_tail_with_attempts_0_and_nobody_waiting(
    real_redis, redis_server, admin_config, three_dead
):
    fresh_a, fresh_b, late = three_dead
    result = admin(redis_server.url, "dead", "requeue", fresh_a.id)
    assert result.returncode == 0, result.stderr
    assert f"requeued 1 job(s) at the tail of the queue, attempts 0: {fresh_a.id}" in result.stdout
    [job] = queued_after_the_waiting_one(real_redis)
    assert (job.id, job.attempts, job.reply_to) == (fresh_a.id, 0, None)
    assert job.deadline == pytest.approx(fresh_a.deadline, abs=0.001)  # kept (Lua's cjson: 14 digits)
    assert dead_ids(real_redis) == [late.id, fresh_b.id, None, None]
    # Its pixels are back in their key, to expire a grace period after its deadline like a new job's.
    grace = admin_config.heartbeat_ttl + 60
    assert real_redis.pttl(KEYS.pixels(fresh_a.id)) / 1000 == pytest.approx(
        fresh_a.deadline + grace - time.time(), abs=5
    )
    # Requeued to be re-run: a worker computes it, with its own image, and stores its result.
    real_redis.lpop(KEYS.queue)
    classifier = CountingClassifier()
    assert Worker(classifier, admin_config, name="rerun").run_once() == 1
    assert classifier.seen == [1]
    assert jobs.decode_result(real_redis.get(KEYS.result(fresh_a.id)))["success"] is True
    # For the operator, RESULT_TTL: nobody waits on a reply channel, so its request's deadline does not bound it.
    assert real_redis.pttl(KEYS.result(fresh_a.id)) > (admin_config.result_ttl - 5) * 1000
    assert not real_redis.exists(KEYS.pixels(fresh_a.id))


def test_requeue_refuses_a_job_whose_deadline_passed_unless_forced(real_redis, redis_server, three_dead):
    _, _, late = three_dead
    result = admin(redis_server.url, "dead", "requeue", late.id)
    assert result.returncode == 1
    assert f"left dead, their deadline passed (a worker would drop them unprocessed): {late.id}" in result.stderr
    assert "--force" in result.stderr
    assert queued_after_the_waiting_one(real_redis) == [] and late.id in dead_ids(real_redis)

    before = time.time()
    result = admin(redis_server.url, "dead", "requeue", "--force", late.id)
    assert result.returncode == 0, result.stderr
    [job] = queued_after_the_waiting_one(real_redis)
    assert job.id == late.id and job.attempts == 0 and job.deadline > before + 29  # REQUEST_TIMEOUT 30 s from now
    assert real_redis.pttl(KEYS.pixels(late.id)) / 1000 > 29 + 60  # by the new deadline, not the old one
    assert late.id not in dead_ids(real_redis)


def test_requeue_all_moves_every_job_and_reports_what_it_left(real_redis, redis_server, three_dead):
    fresh_a, fresh_b, late = three_dead
    result = admin(redis_server.url, "dead", "requeue", "--all")
    assert result.returncode == 1  # C was left dead
    assert "requeued 2 job(s)" in result.stdout
    assert "left 2 entries that hold no job with an id" in result.stdout
    assert late.id in result.stderr
    requeued = queued_after_the_waiting_one(real_redis)
    assert sorted(j.id for j in requeued) == sorted([fresh_a.id, fresh_b.id])
    assert all(j.attempts == 0 and j.reply_to is None for j in requeued)
    assert dead_ids(real_redis) == [late.id, None, None]

    result = admin(redis_server.url, "dead", "requeue", "--all", "--force")
    assert result.returncode == 0, result.stderr
    assert [j.id for j in queued_after_the_waiting_one(real_redis)][2:] == [late.id]
    assert dead_ids(real_redis) == [None, None]  # an entry without a job id is never requeued


def test_requeue_and_purge_of_an_unknown_id_fail_clearly(real_redis, redis_server, three_dead):
    for action, known in zip(("requeue", "purge"), three_dead, strict=False):
        result = admin(redis_server.url, "dead", action, known.id, "0" * 32)
        assert result.returncode == 1
        assert result.stderr == f"queue_admin: no dead job with id {'0' * 32}\n"
        assert known.id in result.stdout and known.id not in dead_ids(real_redis)  # done all the same
    assert admin(redis_server.url, "dead", "purge").returncode == 2  # neither ids nor --all


def test_purge_one_then_all(real_redis, redis_server, three_dead):
    fresh_a, fresh_b, late = three_dead
    result = admin(redis_server.url, "dead", "purge", fresh_b.id)
    assert result.returncode == 0, result.stderr
    assert dead_ids(real_redis) == [late.id, fresh_a.id, None, None]  # the sweep dead-lettered them last first
    result = admin(redis_server.url, "dead", "purge", "--all")
    assert result.returncode == 0, result.stderr
    assert "purged 4 dead letter(s)" in result.stdout
    assert real_redis.llen(KEYS.dead) == 0 and queued_after_the_waiting_one(real_redis) == []


def test_unreachable_redis_exits_1_with_a_clear_message_and_no_password():
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    for args in (["info"], ["dead", "list"], ["dead", "purge", "--all"]):
        result = admin(url, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(f"queue_admin: cannot reach Redis at {url.replace(':s3cret@', '')}")
        assert "s3cret" not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_a_malformed_setting_exits_1_naming_it(redis_server):
    result = admin(redis_server.url, "info", REDIS_SOCKET_TIMEOUT="soon")
    assert result.returncode == 1
    assert result.stderr == "queue_admin: REDIS_SOCKET_TIMEOUT must be a number, not 'soon'\n"
    result = admin("redis://:s3cret@127.0.0.1:99999/0", "info")  # was redis-py's traceback, password and all
    assert result.returncode == 1
    assert (
        result.stderr.startswith("queue_admin: REDIS_URL is not a Redis URL: redis://")
        and "s3cret" not in result.stderr
    )


def test_a_count_past_what_redis_takes_is_a_usage_error(redis_server):
    result = admin(redis_server.url, "dead", "list", "--limit", str(2**63))
    assert result.returncode == 2 and f"must be from 1 to {2**63 - 1}" in result.stderr


def test_dead_list_escapes_control_characters(real_redis, redis_server):
    hostile = json.loads(jobs.encode_header(make_job()))
    hostile["request_id"] = "\x1b]0;owned\x07\x1b[2J"
    real_redis.rpush(KEYS.dead, json.dumps({"reason": "bad\x1b[31m", "dead_at": 1.0, "job": json.dumps(hostile)}))
    result = admin(redis_server.url, "dead", "list")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\\x1b" in result.stdout


def test_a_dead_letter_with_a_deadline_redis_cannot_expire_is_left_dead_not_half_requeued(
    real_redis, redis_server, admin_config
):
    """A script is not rolled back: an entry whose expiry Redis refuses must be skipped before any write, or
    the entries before it are requeued while they stay in the list, again at every attempt."""
    hostile, good = make_job(), make_job()
    dead_letter_by_sweep(real_redis, admin_config, hostile, good)
    for index, entry in enumerate(real_redis.lrange(KEYS.dead, 0, -1)):
        head, newline, pixels = entry.partition(b"\n")  # the envelope, then its pixels (jobs.DeadLetter)
        envelope = json.loads(head)
        header = json.loads(envelope["job"])
        if header["id"] == hostile.id:
            envelope["job"] = json.dumps({**header, "deadline": 1e300})
            real_redis.lset(KEYS.dead, index, json.dumps(envelope).encode() + newline + pixels)
    for _ in range(2):
        result = admin(redis_server.url, "dead", "requeue", "--all")
        assert "Error" not in result.stderr, result.stderr
    assert dead_ids(real_redis) == [hostile.id]
    assert [job.id for job in map(jobs.decode_job, real_redis.lrange(KEYS.queue, 0, -1))] == [good.id]

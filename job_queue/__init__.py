"""The job queue in Redis: enqueue with backpressure, crash-safe batch claims, acknowledgement, and what
happens to jobs that fail: retry with an attempt counted, dead-letter, and the error answer to the requester.

Claim -> process -> acknowledge, as in RQ or Celery with acks_late: a claimed job sits in the worker's
processing list until its result is stored, so a worker that dies loses nothing (worker_registration sweeps
it back). The Lua scripts beside this file each document their KEYS and ARGV.

The queue holds jobs' small JSON headers; each job's pixels are in a key of their own (Keys.pixels), written
beside the push and deleted when the job leaves for good, so that no Lua script carries them on the way to
an answer (a script costs Redis time for every byte it is given or returns). Only dead-lettering moves them,
into the dead letter's envelope, so that a dead job can be requeued with its image.
"""

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import redis

import jobs
from jobs import Reply
from keys import Keys
from logger import log
from settings import Settings

_SCRIPTS = Path(__file__).resolve().parent


_SHARED = (_SCRIPTS / "jobs.lua").read_text()


def script(connection: redis.Redis, name: str):
    """The Lua script `name`.lua beside this file, registered; with jobs.lua in front when it calls one of
    its functions (Redis scripts cannot import one another)."""
    text = (_SCRIPTS / f"{name}.lua").read_text()
    if any(f"{function}(" in text for function in re.findall(r"^local function (\w+)", _SHARED, re.M)):
        text = _SHARED + text
    return connection.register_script(text)


# Seconds a worker's left mark is kept: longer than any command of it could take to reach Redis after the worker
# gave up on its reply (TCP gives up on unacknowledged bytes within about 15 minutes by default).
LEFT_TTL = 3600


def pixels_grace(config: Settings) -> int:
    """Seconds a job's pixels outlive its deadline. A worker that claims a job after its deadline drops it
    unread, so only dead-lettering reads them later: a job given up by a batch that ran past its deadline (a
    minute is a long batch), or by a sweep up to HEARTBEAT_TTL after its worker died."""
    return math.ceil(config.heartbeat_ttl) + 60


def result_grace(config: Settings) -> float:
    """Seconds a result outlives the last moment its reader could ask for it: redis-py retries a read after a
    socket timeout at the latest."""
    return config.redis_socket_timeout + 5


class QueueFull(Exception):
    def __init__(self, message: str, length: int):
        super().__init__(message)
        self.length = length  # the queue's length as the refusing enqueue saw it


class JobQueue:
    def __init__(self, connection: redis.Redis, config: Settings):
        self.redis = connection
        self.keys = Keys(config.image_queue)
        self.max_length = config.max_queue_length
        self.max_attempts = config.max_attempts
        self.dead_letter_max = config.dead_letter_max
        self.result_ttl = config.result_ttl
        self.pixels_grace = pixels_grace(config)
        self._scripts = {
            name: script(connection, name)
            for name in ("enqueue", "claim", "finish", "requeue", "backlogs", "job_status")
        }

    def enqueue(self, *batch: jobs.EncodedJob, track_ttl: int = 0) -> int:
        """Queue the jobs side by side, or none of them when `max_queue_length` leaves no room for them all
        (then raise QueueFull); returns the queue's length as the push left it. `track_ttl`: the jobs are async
        ones, whose status keys say 'queued', their deadlines beside them, for `track_ttl` seconds from now on (a
        worker that claims one says 'running').

        One round trip: each job's pixels are SET (a pipeline keeps the order), then enqueue.lua pushes the
        headers, or deletes the pixels when it refuses them. The pixels expire `pixels_grace` after the
        job's deadline, on Redis's clock like the deadline itself, so that no host's clock plays a part.
        """
        ids = [job.id for job in batch]
        pixel_keys = [self.keys.pixels(job_id) for job_id in ids]
        token = self.keys.enqueued(ids[0])
        result_keys = [self.keys.result(job_id) for job_id in ids]
        tracked = [*map(self.keys.status, ids), *map(self.keys.job_deadline, ids)] if track_ttl else []
        keys = [self.keys.queue, token, *pixel_keys, *result_keys, *tracked]
        expires = [math.ceil((job.deadline + self.pixels_grace) * 1000) for job in batch]
        args = [self.max_length, track_ttl, max(expires), *(job.header for job in batch)]

        def set_pixels(pipe):
            for key, job, at in zip(pixel_keys, batch, expires, strict=True):
                pipe.set(key, job.pixels, pxat=at)

        queued, length = self._pipelined(set_pixels, "enqueue", keys, args)
        if not queued:
            raise QueueFull(f"the queue has no room for {len(batch)} more job(s) (at most {self.max_length})", length)
        return length

    def _pipelined(self, before, name, keys, args):
        """The answer of script `name`, run in one round trip after the commands `before(pipeline)` adds.

        By its SHA alone: redis-py's scripts in a pipeline would cost a SCRIPT EXISTS round trip each time.
        """
        script = self._scripts[name]
        for reloaded in (False, True):
            pipe = self.redis.pipeline(transaction=False)
            before(pipe)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return pipe.execute()[-1]
            except redis.exceptions.NoScriptError:  # not loaded yet, or Redis restarted: the commands are repeatable
                if reloaded:
                    raise
                self.redis.script_load(script.script)

    def job_status(self, job_id: str, late: str, ttl: int) -> tuple[bytes | None, str | None]:
        """An async job's (answer, status) as GET /jobs/<id> reports it, in one step (job_status.lua): the stored
        answer, or `late` (stored for `ttl` seconds) when the job still waits in the queue past its deadline, or
        the status ('queued', 'running'; None for a job unknown or expired)."""
        keys = [self.keys.result(job_id), self.keys.status(job_id), self.keys.job_deadline(job_id)]
        answer, status = self._scripts["job_status"](keys=keys, args=[late, ttl])
        return answer or None, status.decode() if status else None

    def length(self) -> int:
        return self.redis.llen(self.keys.queue)

    def share_backlog(self, process: str, count: int, max_age: float, forget_after: float) -> tuple[int, int]:
        """Record web process `process`'s backlog (images admitted, not yet prepared); returns the queue's length and
        the other processes' backlogs recorded within `max_age` seconds, together (backlogs.lua)."""
        keys = [self.keys.queue, self.keys.web_backlogs]
        args = [process, count, round(max_age * 1000), round(forget_after * 1000)]
        length, others = self._scripts["backlogs"](keys, args)
        return int(length), int(others)

    def claim(self, worker: str, max_jobs: int, timeout: float, blocking_redis: redis.Redis | None = None) -> list:
        """Fill the batch up to `max_jobs`, or when there was nothing to take, block up to `timeout` s for one job
        and then fill it; returns every job the worker holds, oldest first (an empty list when none came).
        `timeout` 0: do not block or wait.

        Every job taken is moved into the worker's processing list in the same step as it leaves the
        queue. The answer is read back from that list, so a retried command whose first reply was lost
        leaves no job unknown to its worker. The blocking move comes only when the worker holds nothing: after
        it, a list that still held a batch (its finish failed) held one job more, and a job handed back after a
        failure was no longer claimed alone (found by review). `blocking_redis` is a client whose socket timeout
        outlasts `timeout`.
        """
        processing = self.keys.processing(worker)
        keys = [self.keys.queue, processing, self.keys.workers]
        args = [max_jobs, worker, self.keys.status_prefix]
        held = self._scripts["claim"](keys=keys, args=args)
        if held or not timeout:
            return held
        if (blocking_redis or self.redis).blmove(self.keys.queue, processing, timeout, "LEFT", "RIGHT") is None:
            return []  # none came (one moved by a call whose reply was lost is the next claim's)
        return self._scripts["claim"](keys=keys, args=args)

    def finish(
        self,
        worker: str,
        batch_id: str,
        claimed: Sequence[bytes],
        replies: Sequence[Reply],
        retry: Sequence[bytes] = (),
        dead_jobs: Iterable[tuple[bytes, str]] = (),
        gone: Sequence[str] = (),
    ) -> str:
        """Store the batch's replies, put `retry` jobs back at the head of the queue, dead-letter `dead_jobs`
        ((job as claimed, reason) pairs; their pixels move into the dead letters), delete the pixels of the
        `gone` job ids (done for good: answered, or skipped) and acknowledge the `claimed` jobs (as `claim`
        returned them), in one step that is safe to repeat with the same `batch_id`. A worker numbers its batches,
        `<token>:<n>` (token: unique per Worker), so that a late copy of an earlier batch's call is told as well.

        Returns "done", "duplicate" (this batch was finished before) or "swept" (a sweep took the batch
        back meanwhile: the replies of jobs not answered yet were stored, nothing else changed).
        """
        keys = [
            self.keys.processing(worker),
            self.keys.queue,
            self.keys.dead,
            self.keys.finished(worker),
            *(self.keys.result(r.job_id) for r in replies),
            *(self.keys.pixels(job_id) for job_id in gone),
        ]
        args = [
            self.result_ttl,
            batch_id,
            len(claimed),
            self.dead_letter_max,
            len(replies),
            len(retry),
            self.keys.pixels_prefix,
            self.keys.status_prefix,
            LEFT_TTL,
            *claimed,
        ]
        for reply in replies:
            args += [reply.reply_to or "", reply.job_id, reply.payload, reply.ttl, int(reply.with_result)]
        args += [*retry]
        for raw, reason in dead_jobs:
            args += [raw, reason]
        outcome, dropped = self._scripts["finish"](keys=keys, args=args)
        self._log_dropped(dropped)
        return outcome.decode() if isinstance(outcome, bytes) else outcome

    def leave(self, worker: str) -> None:
        """A graceful exit, in one step: the worker's unfinished jobs go back to the queue without counting an
        attempt, and it is unregistered for good (keys.Keys.left)."""
        self._requeue(worker, "leave", "")

    def fail(self, worker: str, claimed: Sequence[bytes], error: str = "") -> list:
        """The worker failed on its whole batch, the `claimed` jobs (as `claim` returned them): retry it with an
        attempt counted, or give up on the jobs out of attempts and answer their requesters. Returns the jobs
        given up. Nothing is done when the batch is no longer the worker's (swept, or handed back already)."""
        cause = f"worker {worker} failed on its batch" + (f": {error}" if error else "")
        return self._requeue(worker, "fail", f"out of attempts ({self.max_attempts}); the last: {cause}", claimed)

    def sweep(self, worker: str) -> list | None:
        """Like `fail`, for a worker whose heartbeat expired (no attempt counted if it left: what a late claim put in
        its list never ran); None (and nothing done) if it beats again."""
        cause = f"worker {worker} stopped beating while holding it"
        return self._requeue(worker, "sweep", f"out of attempts ({self.max_attempts}); the last: {cause}")

    def _requeue(self, worker, mode, reason, claimed=()):
        keys = [
            self.keys.processing(worker),
            self.keys.queue,
            self.keys.dead,
            self.keys.heartbeat(worker),
            self.keys.workers,
            self.keys.left(worker),
        ]
        answer = jobs.encode_result(
            jobs.error_result("", f"job failed {self.max_attempts} times and was given up", 500)
        )
        args = [
            mode,
            self.max_attempts,
            worker,
            self.dead_letter_max,
            reason,
            answer,
            self.keys.result_prefix,
            self.result_ttl,
            self.keys.pixels_prefix,
            self.keys.status_prefix,
            LEFT_TTL,
            *claimed,
        ]
        outcome = self._scripts["requeue"](keys=keys, args=args)
        if outcome is None:
            return None
        given_up, dropped = outcome
        self._log_dropped(dropped)
        for raw in given_up:
            job_id, _ = jobs.address(raw)
            log("job_dead_lettered", level="ERROR", id=job_id, worker=worker, attempts=self.max_attempts)
        return given_up

    def _log_dropped(self, dropped):
        if dropped:
            log("dead_letters_dropped", level="WARNING", dropped=dropped, kept=self.dead_letter_max)

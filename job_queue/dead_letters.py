"""The dead-letter list, administered: list, requeue, purge (`queue_admin.py dead ...`), like RQ's failed-job
registry. The entries are jobs.DeadLetter envelopes, written by finish.lua and requeue.lua, each holding its
job's pixels; requeue and purge are one atomic script, dead_letters.lua, beside this file.

A requeued job goes to the tail of the queue with attempts 0 and no reply channel: its requester was answered
(500 or 422) when it died, so nobody waits for it. It is re-run for the operator, whose outcome is in the
worker's log and, for RESULT_TTL seconds, in its result key. A job whose deadline has passed would be dropped
unprocessed by the worker, so it stays dead unless `force`, which gives it a new deadline of REQUEST_TIMEOUT (an
async job: of its own result_ttl).
A requeued job's pixels go back into their key (Keys.pixels), to expire like a new job's; a dead job whose
pixels were gone before it died (the worker answered 410) cannot be requeued.
"""

import uuid
from typing import NamedTuple

import redis

import jobs
from job_queue import pixels_grace, script
from keys import Keys
from settings import Settings


class Outcome(NamedTuple):
    done: list[str]  # ids requeued or purged ('' for a purged entry that held no job id)
    expired: list[str]  # ids left dead because their deadline passed (requeue without force)
    no_pixels: list[str]  # ids left dead because their pixels were gone when they died (requeue)
    no_job: int  # entries left dead because they hold no job with an id (requeue of every entry)


# Seconds a requeue's or purge's outcome is kept for a repeat of the call: redis-py repeats it at once.
OPERATION_TTL = 300


class DeadLetters:
    def __init__(self, connection: redis.Redis, config: Settings):
        self.redis = connection
        self.keys = Keys(config.image_queue)
        self.request_timeout = config.request_timeout
        self.pixels_grace = pixels_grace(config)
        self._script = script(connection, "dead_letters")

    def count(self) -> int:
        return self.redis.llen(self.keys.dead)

    def newest(self, limit: int) -> list[jobs.DeadLetter]:
        """The last `limit` entries, oldest first."""
        return [jobs.decode_dead_letter(entry) for entry in self.redis.lrange(self.keys.dead, -limit, -1)]

    def requeue(self, ids: list[str] | None, force: bool = False) -> Outcome:
        """Requeue the dead jobs with these ids, or every one when `ids` is None."""
        return self._run("requeue", ids, force)

    def purge(self, ids: list[str] | None) -> Outcome:
        """Delete the entries of these job ids, or every entry when `ids` is None."""
        return self._run("purge", ids, False)

    def _run(self, mode, ids, force):
        if ids is not None and not ids:
            return Outcome([], [], [], 0)
        force_flag = "1" if force else "0"
        args = [mode, force_flag, self.request_timeout, self.pixels_grace, self.keys.pixels_prefix]
        args += [self.keys.result_prefix, self.keys.status_prefix, self.keys.cancelled_prefix, OPERATION_TTL]
        keys = [self.keys.dead, self.keys.queue, self.keys.dead_operation(uuid.uuid4().hex)]
        done, expired, no_pixels, no_job = self._script(keys=keys, args=[*args, *(ids or [])])
        return Outcome(
            [_text(i) for i in done], [_text(i) for i in expired], [_text(i) for i in no_pixels], int(no_job)
        )


def _text(value):
    return value.decode() if isinstance(value, bytes) else value

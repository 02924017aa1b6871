"""The job queue in Redis: enqueue with backpressure, crash-safe batch claims, acknowledgement, requeue.

Claim -> process -> acknowledge, as in RQ or Celery with acks_late: a claimed job sits in the worker's
processing list until its result is stored, so a worker that dies loses nothing (see worker_registration).
"""
from pathlib import Path

from keys import Keys

SCRIPTS = Path(__file__).resolve().parent / "scripts"


class QueueFull(Exception):
    pass


class JobQueue:
    def __init__(self, redis, keys=None):
        self.redis = redis
        self.keys = keys or Keys()
        self._scripts = {
            name: redis.register_script((SCRIPTS / f"{name}.lua").read_text())
            for name in ("claim", "finish", "requeue")
        }

    def enqueue(self, raw_job, max_length):
        """RPUSH the job unless `max_length` jobs were already waiting (then raise QueueFull).

        Push first and take the job back out when the queue turns out to be full: one command on the happy
        path instead of a script's three. If a worker claimed the job in between, LREM finds nothing and
        the job is simply served.
        """
        if self.redis.rpush(self.keys.queue, raw_job) > max_length and self.redis.lrem(self.keys.queue, -1, raw_job):
            raise QueueFull(f"{max_length} jobs are already waiting")

    def length(self):
        return self.redis.llen(self.keys.queue)

    def claim(self, worker, max_jobs, timeout, blocking_redis=None):
        """Block up to `timeout` s for one job, then take up to `max_jobs`-1 more that are already waiting.

        Every job taken is moved into the worker's processing list in the same step as it leaves the
        queue. `blocking_redis` is a client whose socket timeout outlasts `timeout`.
        """
        processing = self.keys.processing(worker)
        first = (blocking_redis or self.redis).blmove(self.keys.queue, processing, timeout, "LEFT", "RIGHT")
        if first is None:
            return []
        if max_jobs <= 1:
            return [first]
        return [first, *self._scripts["claim"](keys=[self.keys.queue, processing], args=[max_jobs - 1])]

    def finish(self, worker, results, ttl, dead_jobs=()):
        """Store results and acknowledge the worker's claim in one step.

        `results` holds (job id, reply channel or None, result JSON); `dead_jobs` are raw jobs that can
        never succeed and go to the dead-letter list.
        """
        keys = [self.keys.processing(worker), self.keys.dead, *(self.keys.result(job_id) for job_id, _, _ in results)]
        args = [ttl, len(results)]
        for job_id, reply_to, payload in results:
            args += [reply_to or "", job_id, payload]
        self._scripts["finish"](keys=keys, args=[*args, *dead_jobs])

    def requeue(self, worker, failed, max_attempts):
        """Return a worker's claimed jobs to the head of the queue; `failed` counts an attempt.

        Returns the raw jobs that used up their attempts and went to the dead-letter list instead.
        """
        keys = [self.keys.processing(worker), self.keys.queue, self.keys.dead]
        return self._scripts["requeue"](keys=keys, args=["1" if failed else "0", max_attempts])

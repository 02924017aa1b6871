"""Worker heartbeats, and the sweep that gives a dead worker's claimed jobs back to the queue.

A worker is alive while its heartbeat hash exists; it refreshes the hash (with a TTL) every
HEARTBEAT_INTERVAL. Any live worker sweeps: a registered worker whose heartbeat expired has its processing
list requeued with one more attempt counted, and jobs out of attempts are dead-lettered and answered.
"""
import jobs
import settings
from logger import log


class WorkerRegistry:
    def __init__(self, redis, job_queue):
        self.redis = redis
        self.queue = job_queue
        self.keys = job_queue.keys

    def beat(self, worker, info, ttl=settings.HEARTBEAT_TTL):
        """Register (again, if a sweep dropped us while we stalled) and refresh the heartbeat."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.sadd(self.keys.workers, worker)
        pipe.hset(self.keys.heartbeat(worker), mapping=info)
        pipe.expire(self.keys.heartbeat(worker), max(1, round(ttl)))
        pipe.execute()

    def unregister(self, worker, max_attempts=settings.MAX_ATTEMPTS):
        """Graceful exit: unfinished jobs go back to the queue without counting an attempt."""
        self.queue.requeue(worker, failed=False, max_attempts=max_attempts)
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(self.keys.workers, worker)
        pipe.delete(self.keys.heartbeat(worker))
        pipe.execute()

    def fail_batch(self, worker, max_attempts=settings.MAX_ATTEMPTS, ttl=settings.RESULT_TTL):
        """The model failed on the claimed batch: retry it, or give up on jobs out of attempts."""
        dead = self.queue.requeue(worker, failed=True, max_attempts=max_attempts)
        self._answer_dead(worker, dead, max_attempts, ttl)
        return dead

    def sweep(self, max_attempts=settings.MAX_ATTEMPTS, ttl=settings.RESULT_TTL):
        """Requeue the claimed jobs of every worker whose heartbeat expired. Returns their names."""
        names = [_text(n) for n in self.redis.smembers(self.keys.workers)]
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.heartbeat(name))
        dead_workers = [name for name, alive in zip(names, pipe.execute()) if not alive]
        for name in dead_workers:
            dead = self.queue.requeue(name, failed=True, max_attempts=max_attempts)
            self.redis.srem(self.keys.workers, name)
            log("worker_dead", level="WARNING", worker=name, dead_lettered=len(dead))
            self._answer_dead(name, dead, max_attempts, ttl)
        return dead_workers

    def _answer_dead(self, worker, dead, max_attempts, ttl):
        results = []
        for raw in dead:
            job_id, reply_to = jobs.address(raw)
            log("job_dead_lettered", level="ERROR", id=job_id, worker=worker, attempts=max_attempts)
            if job_id:
                error = jobs.error_result(job_id, f"job failed {max_attempts} times and was given up", 500)
                results.append((job_id, reply_to, jobs.encode_result(error)))
        if results:
            self.queue.finish(worker, results, ttl)

    def workers(self):
        """The heartbeat hashes of the registered workers that are alive, as dicts of str."""
        names = sorted(_text(n) for n in self.redis.smembers(self.keys.workers))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.heartbeat(name))
        alive = []
        for info in pipe.execute():
            if info:
                alive.append({_text(k): _text(v) for k, v in info.items()})
        return alive


def _text(value):
    return value.decode() if isinstance(value, bytes) else value

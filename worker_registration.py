"""Worker heartbeats, and the sweep that gives a dead worker's claimed jobs back to the queue.

A worker is alive while its heartbeat hash exists; it refreshes the hash (with a TTL of HEARTBEAT_TTL)
every HEARTBEAT_INTERVAL. Any live worker sweeps: a registered worker whose heartbeat expired has its
claimed jobs handed to the queue's failure handling (requeue with an attempt counted, or dead-letter; no attempt for a
worker that left, whose list only a claim reaching Redis after it left can have filled).
"""

import re

import redis

import jobs
from job_queue import JobQueue, script
from logger import log


def models_served(workers: list[dict]) -> frozenset:
    """The models of the workers (heartbeat hashes, as WorkerRegistry.workers gives them) that have loaded
    theirs and warmed it up: what the readiness probes and the Open Inference Protocol's infer count."""
    return frozenset(worker.get("model") for worker in workers if worker.get("ready") == "1")


class WorkerRegistry:
    def __init__(self, connection: redis.Redis, job_queue: JobQueue, heartbeat_ttl: float):
        self.redis = connection
        self.queue = job_queue
        self.keys = job_queue.keys
        self.heartbeat_ttl = max(1, round(heartbeat_ttl))
        self._sweeps = 0
        self._beat = script(connection, "beat")

    def beat(self, worker: str, info: dict) -> bool:
        """Register (again, if a sweep dropped us while we stalled) and refresh the heartbeat; False, and nothing
        done, once a worker of that name has left (within job_queue.LEFT_TTL)."""
        fields = [item for pair in info.items() for item in pair]
        keys = [self.keys.workers, self.keys.heartbeat(worker), self.keys.left(worker)]
        return bool(self._beat(keys=keys, args=[worker, self.heartbeat_ttl, *fields]))

    def unregister(self, worker: str) -> None:
        """Graceful exit, in one step: unfinished jobs go back to the queue without counting an attempt, and no
        beat of the worker registers it again, even one already on its way (nor does a sweep count an attempt
        for jobs a claim as late put in its list)."""
        self.queue.leave(worker)

    def sweep(self) -> list[str]:
        """Requeue the claimed jobs of every worker whose heartbeat expired, registered or not (a processing
        list whose worker is in no set is found by its key). Returns their names."""
        self._sweeps += 1
        # Claims register their worker, so a list nobody registered is rare (an older version, a hand): look
        # for one by its key every tenth sweep only, since SCAN walks the whole keyspace.
        orphans = self._holding_jobs() if self._sweeps % 10 == 1 else []
        names = sorted({*self._registered(), *orphans})
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.heartbeat(name))
        swept = []
        for name in [name for name, alive in zip(names, pipe.execute(), strict=True) if not alive]:
            # The queue checks the heartbeat again in the same step as the requeue: it may have come back.
            try:
                given_up = self.queue.sweep(name)
            except redis.ResponseError as exc:  # a key of the wrong type under our prefix: skip it, sweep the rest
                log("sweep_failed", level="ERROR", worker=name, error=str(exc))
                continue
            if given_up is not None:
                log("worker_dead", level="WARNING", worker=name, dead_lettered=len(given_up))
                swept.append(name)
        return swept

    def workers(self) -> list[dict]:
        """The heartbeat hashes of the registered workers that are alive, as dicts of str."""
        names = self._registered()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.heartbeat(name))
        return [{_text(k): _text(v) for k, v in info.items()} for info in pipe.execute() if info]

    def _holding_jobs(self):
        prefix = self.keys.processing_prefix
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"  # IMAGE_QUEUE may hold glob characters
        names = (_text(key)[len(prefix) :] for key in self.redis.scan_iter(match=pattern, count=1000, _type="list"))
        return [name for name in names if jobs.SAFE_NAME.fullmatch(name)]

    def _registered(self):
        return sorted(_text(n) for n in self.redis.smembers(self.keys.workers))


def _text(value):
    # Keys and fields can hold anything someone wrote: never fail on them.
    return value.decode(errors="replace") if isinstance(value, bytes) else value

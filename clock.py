"""One clock for every host: Redis's. Job timestamps and deadlines are Redis time, so a web host and a
worker host whose clocks disagree still agree on when a job expires.

The clock reads Redis's TIME now and then and counts on from it with this host's monotonic clock, so
neither a wrong nor a stepped wall clock on this host moves it.
"""

import time

import redis


class RedisClock:
    def __init__(self, connection: redis.Redis, resync_after: float = 30.0):
        self.redis = connection
        self.resync_after = resync_after
        self._anchor = None  # (Redis time, monotonic time) of the last reading
        self._tried_at = None  # monotonic time of the last attempt to read it

    def sync(self) -> None:
        """Read Redis's time; the round trip's midpoint is taken as the moment it was read."""
        sent = self._tried_at = time.monotonic()
        seconds, microseconds = self.redis.time()
        received = time.monotonic()
        self._anchor = (seconds + microseconds / 1e6, (sent + received) / 2)

    def now(self) -> float:
        """Seconds since the epoch by Redis's clock; reads it again when the last attempt is old. Once it has a
        reading it never raises: when Redis cannot be read, it counts on from the last reading and tries again a
        `resync_after` later (found by review: a worker whose model ended during an outage threw its batch's
        results away, an attempt counted, for want of the time). Raises redis.RedisError before the first."""
        if self._anchor is None or time.monotonic() - self._tried_at > self.resync_after:
            try:
                self.sync()
            except redis.RedisError:
                if self._anchor is None:
                    raise
        redis_time, at = self._anchor
        return redis_time + (time.monotonic() - at)

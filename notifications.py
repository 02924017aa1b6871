"""How a web process waits for its jobs' results: one pub/sub subscription per process, polling as fallback.

Every web process subscribes to its own channel before it pushes any job; workers PUBLISH a finished job's
id there, with its result for a job that asked (notify_result: /predict's), and the listener thread hands
the result to the request waiting for it, which then needs no Redis round trip of its own (without one, it
reads the result key). Pub/sub is at-most-once (a message sent while the listener is
reconnecting is gone), so a waiting request also polls its result key with backoff, and after every
(re)subscribe the listener wakes all waiting requests to re-check their keys.
"""

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

import jobs
import metrics
import redis_client
from job_queue import result_grace
from keys import Keys
from logger import log
from settings import Settings


class _Pending:
    def __init__(self, job_id, notify_result):
        self.job_id = job_id
        self.notify_result = notify_result  # the job asked for its result in the notification
        self.event = threading.Event()
        self.abandoned = False
        self.delivered = None  # the whole result a notification carried (jobs.delivered_result), until taken

    def take_delivered(self):
        """The whole result a notification carried (checked by the listener, see ResultWaiter._wake), once."""
        result, self.delivered = self.delivered, None
        return result

    def abandon(self):
        """Nobody waits for this result any more (the client went away): wake the request, which gives up."""
        self.abandoned = True
        self.event.set()


def _address(pubsub):
    """(host, port) of the Redis a subscription lives on; a unix socket has no port."""
    return getattr(pubsub.connection, "host", None), getattr(pubsub.connection, "port", None)


class ResultWaiter:
    def __init__(self, connection: redis.Redis, config: Settings):
        self.redis, self.keys, self.mode = connection, Keys(config.image_queue), config.wait_mode
        self._url = config.redis_url
        self._ping_every = config.listener_ping_interval
        self._keep_read_results_ms = int(result_grace(config) * 1000)
        if self.mode == "poll":
            self._first_wait, self._growth, self._longest_wait = config.poll_interval, 1.0, config.poll_interval
        else:
            self._first_wait, self._growth = config.fallback_poll_after, 2.0
            self._longest_wait = config.fallback_poll_max
        self._closed = threading.Event()
        self._pending = {}
        self._lock = threading.Lock()
        self._pid = None
        self._subscribed = self._established = None
        self.channel = None

    # -- listener ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> str | None:
        """Subscribe (once per process: gunicorn forks after import); returns the reply channel for new jobs,
        or None in poll mode.

        The first call waits up to `timeout` for the first subscription and raises redis.ConnectionError
        when it cannot be made. Later calls never wait: a job pushed while the listener is reconnecting is
        not lost, since every (re)subscribe wakes all waiting requests to look for their results.
        """
        if self.mode == "poll":
            return None
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._start_listener()
        if not self._established.is_set() and not self._subscribed.wait(timeout):
            raise redis.ConnectionError("the result notification channel is not subscribed")
        return self.channel

    def _start_listener(self):
        self._subscribed, self._established = threading.Event(), threading.Event()
        self.channel = self.keys.channel(f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        # A read may wait this long (connecting, subscribing, a PING's answer) before the connection is given up;
        # between messages the listener waits in get_message, which this does not bound.
        connection = redis_client.connect(self._url, socket_timeout=3 * self._ping_every)
        threading.Thread(
            target=self._listen,
            args=(connection, self._subscribed, self._established),
            name="result-listener",
            daemon=True,
        ).start()

    def listening(self) -> bool:
        """Whether the notification subscription holds right now (always True in poll mode)."""
        return self.mode == "poll" or (self._subscribed is not None and self._subscribed.is_set())

    def _listen(self, connection, subscribed, established):
        backoff = redis_client.Backoff()
        while not self._closed.is_set():
            pubsub = connection.pubsub()
            try:
                pubsub.subscribe(self.channel)
                # Wait for Redis to confirm, so that a job pushed after start() cannot miss its message.
                confirm_by = time.monotonic() + 3 * self._ping_every
                while (pubsub.get_message(timeout=1.0) or {}).get("type") != "subscribe":
                    if time.monotonic() > confirm_by:
                        raise redis.ConnectionError("Redis did not confirm the subscription")
                self._wake_all()  # results published while we were away: re-check their keys
                here = _address(pubsub)  # the Redis this subscription lives on
                subscribed.set()
                established.set()
                log("listener_subscribed", channel=self.channel)
                backoff.reset()
                # A connection dropped without a word (a dead peer, a NAT that forgot us) delivers nothing and
                # raises nothing: after a quiet spell, PING; if even that goes unanswered, connect again.
                heard = pinged = time.monotonic()
                while not self._closed.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    now = time.monotonic()
                    if message:
                        heard = now
                        if message["type"] == "message":
                            # A stray message from anyone with PUBLISH rights must not end the listener.
                            self._wake(*jobs.parse_notification(message["data"]))
                        elif message["type"] == "subscribe":
                            # redis-py reconnected a reset connection and subscribed again on its own, without
                            # raising: what was published meanwhile is gone (found by review: a multi-image
                            # request waited its fallback polls out, one after the other, into a 504).
                            log("listener_resubscribed", level="WARNING", channel=self.channel)
                            self._wake_all()
                            here = _address(pubsub)
                    elif now - heard > 3 * self._ping_every:
                        raise redis.ConnectionError(f"no answer on the notification connection for {now - heard:.0f} s")
                    elif now - heard > self._ping_every and now - pinged > self._ping_every:
                        pubsub.ping()
                        pinged = now
                    master = getattr(connection.connection_pool, "master_address", None)  # Sentinel's, followed
                    if master is not None and master != here:
                        # (Sentinel) The master moved: subscribe on the new one, waking every waiting request to read
                        # its result there. First what is already here: results the old master announced live
                        # nowhere else.
                        while (message := pubsub.get_message(timeout=0)) is not None:
                            if message["type"] == "message":
                                self._wake(*jobs.parse_notification(message["data"]))
                        raise redis.ConnectionError("the master moved: subscribing on the new one")
            except Exception as exc:  # noqa: BLE001 - whatever it was, listen again rather than die quietly
                subscribed.clear()
                delay = backoff.next()
                log("listener_disconnected", level="WARNING", channel=self.channel, error=str(exc), retry_in_s=delay)
                self._closed.wait(delay)
            finally:
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - the connection is already gone
                    pass

    def close(self):
        """Stop listening (the listener thread ends within a second)."""
        self._closed.set()

    def _wake(self, job_id, result=None):
        with self._lock:
            pending = self._pending.get(job_id)
        if pending:
            # Checked here, so that a later message for the job (a bare id, a stray one) cannot take the place
            # of a whole result already delivered; the first one is kept.
            if result is not None and pending.notify_result and pending.delivered is None:
                pending.delivered = jobs.delivered_result(result, job_id)
            pending.event.set()

    def _wake_all(self):
        with self._lock:
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.event.set()

    # -- waiting -----------------------------------------------------------------------------------------
    @contextmanager
    def expect(self, job_id: str, notify_result: bool = True) -> Iterator[_Pending]:
        """Register interest in a job before it is pushed; the notification may come at once. Without
        `notify_result` (the job's), a result in a notification is not taken: the key is read."""
        pending = _Pending(job_id, notify_result)
        with self._lock:
            self._pending[job_id] = pending
        try:
            yield pending
        finally:
            with self._lock:
                self._pending.pop(job_id, None)

    def fetch(self, job_id: str) -> dict | None:
        """The job's result, or None while there is none. The key is left to expire shortly after, not
        deleted: a read retried after its reply was lost must find the result again."""
        raw = self.redis.getex(self.keys.result(job_id), px=self._keep_read_results_ms)
        return None if raw is None else jobs.decode_result(raw)

    def wait(self, pending: _Pending, deadline: float, since: float | None = None) -> dict | None:
        """The result of the pending job, or None once `deadline` (time.monotonic()) has passed.

        `since` (time.monotonic(), default now): when the job was pushed. The first read of its key is due the
        first poll interval after it, not after this call: a request waits for its jobs one after another, and
        when their notifications were lost together, each restarting the interval made the waits add up (5 s an
        image) and a request whose results were all stored got 504."""
        interval = self._first_wait
        look_at = (time.monotonic() if since is None else since) + interval
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                metrics.TIMEOUTS.inc()
                return None
            due = look_at <= now  # a look at once: its interval has passed since the push, not since this call
            notified = pending.event.wait(max(0.0, min(look_at - now, remaining)))
            pending.event.clear()
            # Taken even when the wait timed out: a notification may land between the timeout and the clear, and
            # with Redis unreachable for the read below, its result would otherwise be left until the deadline.
            result = pending.take_delivered()
            notified = notified or result is not None
            if result is None:
                try:
                    result = self.fetch(pending.job_id)
                except redis.RedisError as exc:
                    # The job is queued: Redis may come back before the deadline, and the listener's resubscribe
                    # wakes us to look again. Giving up now could abandon an answer that is on its way.
                    log("result_check_failed", level="WARNING", id=pending.job_id, error=str(exc))
            if result is not None:
                via = "notification" if notified else "fallback_poll" if self.mode == "notify" else "poll"
                metrics.WAKEUPS.labels(via).inc()
                if via == "fallback_poll":
                    log("fallback_poll_hit", level="WARNING", id=pending.job_id)
                return result
            if pending.abandoned:
                return None
            if not notified and not due:  # an early look that found nothing is no reason to look less often
                interval = min(interval * self._growth, self._longest_wait)
                if self.mode == "notify":
                    log("fallback_poll", level="DEBUG", id=pending.job_id, next_in_s=interval)
            look_at = time.monotonic() + interval

"""Redis connections with the service's timeouts and retry policy (redis-py's default retries for ~10 s),
and the backoff every reconnecting loop uses.

REDIS_URL names one Redis (redis://, rediss://, unix://) or, with redis+sentinel://, a master that Redis Sentinel
watches: `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`, the sentinels' addresses, the
name they monitor the master by and its database. Every new connection asks the sentinels where the master is, so
after a failover the next try (a retry, a reconnecting loop, a request) reaches the promoted replica. Connections
already open to a master that was demoted while it lives are closed within a second by each process's follower
(`_follow_masters`), or at their first write the demoted master refuses. The password is the
master's; the sentinels are reached without one.
"""

# Imported before any thread starts: the first lookup of the "idna" codec is not thread-safe. Every Redis
# connection looks it up (getaddrinfo), and a web request thread (Werkzeug encodes the host name) racing the
# notification listener's first connection failed with "LookupError: unknown encoding: idna".
import contextlib
import encodings.idna  # noqa: F401
import os
import re
import threading
import time
import urllib.parse
import weakref

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

SENTINEL_SCHEME = "redis+sentinel"
# Asking a sentinel where the master is: a sentinel that does not answer within this is passed over for the next.
SENTINEL_TIMEOUT = 0.5
# Seconds between asking the sentinels where the master is (_follow_masters): how long a master demoted while it lives
# keeps a process's idle connections at most, besides the sentinels' own delay.
FOLLOW_MASTER_EVERY = 1.0


def connect(
    url: str, socket_timeout: float | None, *, max_connections: int | None = None, decode: bool = False
) -> redis.Redis:
    """A client whose pool holds at most `max_connections` (threads wait for a free one, they never open more).

    One quick retry covers a connection that went stale while Redis restarted; anything longer is the
    caller's to handle, so that a request fails fast with 503 instead of hanging while Redis is down.
    `socket_timeout` None waits forever (`logger.py tail` may rightly hear nothing for a long time). TCP
    keepalive lets the kernel notice a peer that vanished without a word.
    """
    kwargs = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 1),
        decode_responses=decode,
    )
    if not url.startswith("unix:"):  # a unix socket's connection refuses the option (found by a test of one)
        kwargs["socket_keepalive"] = True
    if _is_sentinel(url):
        return _master_of(SentinelURL.parse(url), max_connections, kwargs)
    if max_connections:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **kwargs)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)


def _is_sentinel(url):
    return url.startswith(f"{SENTINEL_SCHEME}://")


def check_url(url: str) -> None:
    """Raises ValueError, saying what a REDIS_URL looks like, for one our clients cannot use. Not redis-py's
    message: it may quote part of the URL, and a password with an unencoded "/" or "#" in it is read as the port
    ("Port could not be cast to integer value as 'hunter2'")."""
    try:
        if not _is_sentinel(url):
            redis.connection.parse_url(url)  # what connect() does with it, later
            return
    except ValueError:
        raise ValueError(
            "REDIS_URL is not a Redis URL: redis://[[user]:password@]host[:port][/db], rediss://..., unix://path "
            f"or {SENTINEL_SCHEME}://..., with / ? # @ in a password percent-encoded"
        ) from None
    try:
        SentinelURL.parse(url)
    except ValueError as exc:
        raise ValueError(
            f"REDIS_URL is not a Sentinel URL ({exc}): "
            f"{SENTINEL_SCHEME}://[[user]:password@]host:port[,host:port...]/service[/db]"
        ) from None


class _FollowedPool(redis.sentinel.SentinelConnectionPool):
    """Sentinel's pool, which finds the master for each new connection, followed by this process's follower
    (`_follow_masters`) from its first connection in the process on."""

    _followed_in = None  # the process that follows it

    def get_connection(self, *args, **kwargs):
        if self._followed_in != os.getpid():
            _follow(self)
        return super().get_connection(*args, **kwargs)


class _BlockingSentinelPool(_FollowedPool, redis.BlockingConnectionPool):
    """With the blocking pool's bound: a thread past `max_connections` waits for a free connection, as with a plain
    REDIS_URL, rather than failing."""

    def release(self, connection):
        self._checkpid()
        if self.owns_connection(connection):
            return super().release(connection)
        # One to a master that moved, or whose lookup found none: the blocking pool would free its slot but keep it
        # in its list of connections (a review counted 5.4 KB kept per request refused while no master was known).
        connection.disconnect()
        with contextlib.suppress(ValueError):
            self._connections.remove(connection)
        self.pool.put_nowait(None)  # the free slot
        return None


# This process's follower: its pid and the pools it follows (weakly: a client dropped is not kept for it).
_follower = {"pid": None, "pools": weakref.WeakSet()}
_follower_lock = threading.Lock()


def _follow(pool):
    with _follower_lock:
        if _follower["pid"] != os.getpid():  # the first here: a process forked from one that followed has no thread
            pools = weakref.WeakSet()
            thread = threading.Thread(target=_follow_masters, args=(os.getpid(), pools), daemon=True)
            thread.name = "master-follower"
            thread.start()
            _follower.update(pid=os.getpid(), pools=pools)
        _follower["pools"].add(pool)
        pool._followed_in = os.getpid()


def _follow_masters(pid, pools):
    """Ask the sentinels where the master is every FOLLOW_MASTER_EVERY seconds, for each pool through Sentinel this
    process has used, in a thread of its own (slow sentinels must hold up neither a heartbeat nor a notification).
    When it moved, the pool closes its idle connections, and each busy one as it is returned, so that the next command
    reaches the new master; the notification listener sees `master_address` change and subscribes there.

    Without this, a master demoted while it lives (a failover by hand, or across a partition) keeps a process's
    pooled connections, and takes their writes, until the sentinels make it a replica: 11 s in a review's run, the
    web enqueueing there while the workers claimed on the new master. Sentinels that do not answer change nothing:
    the connections carry on with the master they have (found by review: a beat that asked them first stopped)."""
    while True:
        time.sleep(FOLLOW_MASTER_EVERY)
        if os.getpid() != pid:  # a copy in a forked child (gevent keeps a parent's greenlets): the child has its own
            return
        try:
            with _follower_lock:  # (_follow adds to the set from other threads)
                followed = list(pools)
            for pool in followed:
                with contextlib.suppress(redis.RedisError):
                    pool.get_master_address()
        except Exception as exc:  # noqa: BLE001 - this thread must go on following
            from logger import log  # (logger's Redis sink connects through this module)

            log("master_follow_failed", level="ERROR", error=repr(exc))


class _Sentinel(redis.sentinel.Sentinel):
    """One lookup of the master at a time. redis-py moves the sentinel that answered to the front of its list by
    the index it had when the lookup began: two lookups at once (the follower's and a new connection's) that both
    passed over a silent sentinel could swap against stale indexes and drop a sentinel from the list for good."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lookup = threading.Lock()

    def discover_master(self, service_name):
        with self._lookup:
            return super().discover_master(service_name)


class SentinelURL:
    """The parts of a redis+sentinel:// URL; `parse` raises ValueError, naming the part, for anything else. Split
    by hand, not by urllib: Python's stricter parsers refuse a bracketed IPv6 address after the first host."""

    def __init__(self, sentinels, service, db, username, password):
        self.sentinels, self.service, self.db = sentinels, service, db
        self.username, self.password = username, password

    @classmethod
    def parse(cls, url):
        scheme, _, rest = url.partition("://")
        if scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        if "?" in rest or "#" in rest:
            raise ValueError("it takes no options (?...); a ? or # in the password must be percent-encoded")
        netloc, _, path = rest.partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = [_host_port(item) for item in hosts.split(",")]
        path = path.removesuffix("/").split("/")
        if len(path) > 2 or not _SERVICE.fullmatch(path[0]) or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                "the path must be /service or /service/db, the name the sentinels monitor the master by (letters, "
                "digits, . _ -); a / or @ in the password must be percent-encoded"
            )
        unquote = urllib.parse.unquote
        db = int(path[1]) if len(path) == 2 else 0
        return cls(sentinels, path[0], db, unquote(username) or None, unquote(password) or None)


_SERVICE = re.compile(r"[\w.-]+")


def _host_port(item):
    host, _, port = item.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("each sentinel must be host:port")
    return host, int(port)


def _master_of(place, max_connections, kwargs):
    """A client of the master the sentinels name, found again for every new connection."""
    sentinel_kwargs = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "socket_keepalive": True,
        # No retry: redis-py's default, ten with backoff, held a lookup 15 s on one sentinel that did not answer
        # (found by review), where the next sentinel would have.
        "retry": Retry(NoBackoff(), 0),
    }
    sentinel = _Sentinel(place.sentinels, sentinel_kwargs=sentinel_kwargs)
    master = {"db": place.db, "username": place.username, "password": place.password, **kwargs}
    if max_connections:
        master.update(max_connections=max_connections, timeout=5)
        return sentinel.master_for(place.service, connection_pool_class=_BlockingSentinelPool, **master)
    return sentinel.master_for(place.service, connection_pool_class=_FollowedPool, **master)


def master_address(client: redis.Redis) -> str | None:
    """host:port of the master a client through Sentinel last found (after a command); None for any other client."""
    address = getattr(client.connection_pool, "master_address", None)
    return None if address is None else f"{address[0]}:{address[1]}"


def describe(url: str) -> str:
    """The Redis URL without its password, for logs."""
    if _is_sentinel(url):
        netloc, _, path = url.partition("://")[2].partition("/")
        return f"{SENTINEL_SCHEME}://{netloc.rpartition('@')[2]}/{path.partition('?')[0].partition('#')[0]}"
    parsed = urllib.parse.urlsplit(url)
    netloc = parsed.hostname or ""
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


class Backoff:
    """Delays between attempts to reach Redis again: 0.1 s, doubling up to 5 s, and 0.1 s after a success."""

    FIRST, CAP = 0.1, 5.0

    def __init__(self):
        self._delay = self.FIRST

    def next(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, self.CAP)
        return delay

    def reset(self) -> None:
        self._delay = self.FIRST

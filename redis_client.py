"""Redis connections with the service's timeouts and retry policy (redis-py's default retries for ~10 s),
and the backoff every reconnecting loop uses.

REDIS_URL names one Redis (redis://, rediss://, unix://) or, with redis+sentinel://, a master that Redis Sentinel
watches: `redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`, the sentinels' addresses, the
name they monitor the master by and its database. Every new connection asks the sentinels where the master is, so
after a failover the next try (a retry, a reconnecting loop, a request) reaches the promoted replica; a connection
still open to a master demoted to a replica is dropped at its first refused write. The password is the master's;
the sentinels are reached without one.
"""

# Imported before any thread starts: the first lookup of the "idna" codec is not thread-safe. Every Redis
# connection looks it up (getaddrinfo), and a web request thread (Werkzeug encodes the host name) racing the
# notification listener's first connection failed with "LookupError: unknown encoding: idna".
import encodings.idna  # noqa: F401
import urllib.parse

import redis
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

SENTINEL_SCHEME = "redis+sentinel"
# Asking a sentinel where the master is: a sentinel that does not answer within this is passed over for the next.
SENTINEL_TIMEOUT = 1.0


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
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 1),
        decode_responses=decode,
    )
    if urllib.parse.urlsplit(url).scheme == SENTINEL_SCHEME:
        return _master_of(SentinelURL.parse(url), max_connections, kwargs)
    if max_connections:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **kwargs)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)


def check_url(url: str) -> None:
    """Raises ValueError, saying what a REDIS_URL looks like, for one our clients cannot use. Not redis-py's
    message: it may quote part of the URL, and a password with an unencoded "/" or "#" in it is read as the port
    ("Port could not be cast to integer value as 'hunter2'")."""
    try:
        if urllib.parse.urlsplit(url).scheme != SENTINEL_SCHEME:
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


class _BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool, which finds the master for each new connection, with the blocking pool's bound: a thread
    past `max_connections` waits for a free connection, as with a plain REDIS_URL, rather than failing."""


class SentinelURL:
    """The parts of a redis+sentinel:// URL; `parse` raises ValueError, naming the part, for anything else."""

    def __init__(self, sentinels, service, db, username, password):
        self.sentinels, self.service, self.db = sentinels, service, db
        self.username, self.password = username, password

    @classmethod
    def parse(cls, url):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != SENTINEL_SCHEME:
            raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
        userinfo, _, hosts = parsed.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        sentinels = [_host_port(item) for item in hosts.split(",")]
        path = [part for part in parsed.path.split("/") if part]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("the path must be /service or /service/db, the name the sentinels monitor the master by")
        unquote = urllib.parse.unquote
        return cls(
            sentinels,
            unquote(path[0]),
            int(path[1]) if len(path) == 2 else 0,
            unquote(username) or None,
            unquote(password) or None,
        )


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
    }
    sentinel = redis.sentinel.Sentinel(place.sentinels, sentinel_kwargs=sentinel_kwargs)
    master = {"db": place.db, "username": place.username, "password": place.password, **kwargs}
    if max_connections:
        master.update(max_connections=max_connections, timeout=5)
        return sentinel.master_for(place.service, connection_pool_class=_BlockingSentinelPool, **master)
    return sentinel.master_for(place.service, **master)


def describe(url: str) -> str:
    """The Redis URL without its password, for logs."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == SENTINEL_SCHEME:
        return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc.rpartition("@")[2], parsed.path, "", ""))
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

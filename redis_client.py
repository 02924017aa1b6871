"""Redis connections with the service's timeouts and retry policy (redis-py's default retries for ~10 s),
and the backoff every reconnecting loop uses."""

# Imported before any thread starts: the first lookup of the "idna" codec is not thread-safe. Every Redis
# connection looks it up (getaddrinfo), and a web request thread (Werkzeug encodes the host name) racing the
# notification listener's first connection failed with "LookupError: unknown encoding: idna".
import encodings.idna  # noqa: F401
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


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
    if max_connections:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **kwargs)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)


def describe(url: str) -> str:
    """The Redis URL without its password, for logs."""
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

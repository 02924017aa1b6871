"""Redis connections with the service's timeouts and retry policy (redis-py's default retries for ~10 s)."""
# Imported before any thread starts: the first lookup of the "idna" codec is not thread-safe. Every Redis
# connection looks it up (getaddrinfo), and a web request thread (Werkzeug encodes the host name) racing the
# notification listener's first connection failed with "LookupError: unknown encoding: idna".
import encodings.idna  # noqa: F401
import urllib.parse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import settings


def connect(url=None, max_connections=None, socket_timeout=settings.REDIS_SOCKET_TIMEOUT, decode=False):
    """A client whose pool holds at most `max_connections` (threads wait for a free one, they never open more).

    One quick retry covers a connection that went stale while Redis restarted; anything longer is the
    caller's to handle, so that a request fails fast with 503 instead of hanging while Redis is down.
    """
    kwargs = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 1),
        decode_responses=decode,
    )
    url = url or settings.REDIS_URL
    if max_connections:
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5, **kwargs)
        return redis.Redis(connection_pool=pool)
    return redis.Redis.from_url(url, **kwargs)


def describe(url=None):
    """The Redis URL without its password, for logs."""
    parsed = urllib.parse.urlsplit(url or settings.REDIS_URL)
    netloc = parsed.hostname or ""
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))

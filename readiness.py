"""Whether this web process can serve: the one readiness rule that /health/ready and the V2 probes answer."""

import redis

from logger import log
from submission import Service
from worker_registration import models_served


def problem(service: Service, model: str | None = None) -> str | None:
    """Why this process cannot serve (`model`, when named), in one line fit for anyone to read; None when it can.

    Ready when Redis answers, our notification channel holds, and a warmed-up worker (of `model`) beats.
    Details go to the log.
    """
    try:
        service.queue.redis.ping()
        workers = service.registry.workers()
    except redis.RedisError as exc:
        return _logged("Redis is unreachable", exc)
    try:
        service.waiter.start(timeout=2.0)
    except redis.RedisError as exc:
        return _logged("the result notification channel is not subscribed", exc)
    if not service.waiter.listening():
        return _logged("the result notification channel is reconnecting")
    # A heartbeat hash exists only while it is fresh: it expires HEARTBEAT_TTL after the last beat.
    served = models_served(workers)
    if not (served if model is None else served & {model}):
        return _logged(f"no worker with {f'{model} loaded' if model else 'a loaded model'} and a fresh heartbeat")
    return None


def _logged(reason, exc=None):
    log("not_ready", level="WARNING", reason=reason, error=str(exc) if exc else None)
    return reason

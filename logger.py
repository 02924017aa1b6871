"""One log format for every process: `log(action, **details)` from anywhere.

Each line: ISO-8601 UTC time with milliseconds, level, server name, the script that was started, the
action, then key=value details. LOG_FORMAT=json writes the same fields as JSON lines. LOG_TO_REDIS=1 also
copies every line into a capped Redis stream, which `python logger.py tail` follows for all servers at once.
"""

import contextvars
import datetime
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass

from settings import Settings

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_context = contextvars.ContextVar("log_context", default=None)
# Re-entrant so that a line logged from a signal handler could not deadlock its own thread; our handlers
# still log nothing, since such a line could land in the middle of another.
_write_lock = threading.RLock()
_sink = None


def _script_name():
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "python")
    return os.path.basename(path)


SCRIPT = _script_name()
_ROLES = {"run_web_server.py": "web", "run_model_server.py": "worker"}


@dataclass(frozen=True)
class _Config:
    settings: Settings
    server: str
    min_level: int


_config = None


def configure(config: Settings) -> None:
    """Take the log settings of this process; an entry point calls it once, before its first line."""
    global _config
    server = config.server_name or f"{socket.gethostname()}-{_ROLES.get(SCRIPT, 'client')}"
    _config = _Config(config, server, LEVELS[config.log_level])


def _current():
    if _config is None:  # a tool that never called configure() logs with the environment's settings
        configure(Settings.from_env())
    return _config


def bind(**details):
    """Set the details that every later line from this thread carries (e.g. the request id), replacing any
    set before: a server thread calls it at the start of each request."""
    _context.set(details)


def _format_value(value):
    text = f"{value:.1f}" if isinstance(value, float) else str(value)
    # Quoted and escaped unless plainly safe: no client value can start a line or carry control characters.
    return json.dumps(text) if (not text or not text.isprintable() or any(c in text for c in ' "=')) else text


def format_line(record, log_format="text"):
    if log_format == "json":
        return json.dumps(record, default=str)
    fixed = ("ts", "level", "server", "script", "action")
    details = " ".join(f"{k}={_format_value(v)}" for k, v in record.items() if k not in fixed)
    return f"{record['ts']} {record['level']:<7} {record['server']} {record['script']} {record['action']}" + (
        f" {details}" if details else ""
    )


def log(action, level="INFO", **details):
    config = _current()
    if LEVELS[level] < config.min_level:
        return
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "ts": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "level": level,
        "server": config.server,
        "script": SCRIPT,
        "action": action,
        **(_context.get() or {}),
        **details,
    }
    line = format_line(record, config.settings.log_format)
    with _write_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if config.settings.log_to_redis:
        _redis_sink(config.settings).put(record)


class _RedisSink:
    """Ships records to the log stream from a background thread, so a slow Redis never slows a request."""

    def __init__(self, config):
        import redis_client
        from keys import Keys

        self._redis = redis_client.connect(config.redis_url, config.redis_socket_timeout)
        self._stream = Keys(config.image_queue).log_stream
        self._maxlen = config.log_stream_maxlen
        self._queue = queue.Queue(maxsize=10_000)
        threading.Thread(target=self._run, name="log-sink", daemon=True).start()

    def put(self, record):
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            pass  # dropping log lines beats blocking the service; the console still has them

    def _run(self):
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                pipe = self._redis.pipeline(transaction=False)
                for record in batch:
                    fields = {k: json.dumps(v, default=str) if not isinstance(v, str) else v for k, v in record.items()}
                    pipe.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
                pipe.execute()
            except Exception as exc:  # noqa: BLE001 - the sink must outlive any Redis trouble
                sys.stderr.write(f"log stream unavailable: {exc}\n")


def _redis_sink(config):
    global _sink
    if _sink is None or _sink[0] != os.getpid():  # a forked process needs its own thread
        _sink = (os.getpid(), _RedisSink(config))
    return _sink[1]


def tail(config, from_start=False, follow=True, out=sys.stdout):
    """Print the merged log of every server from the Redis stream."""
    import redis

    import redis_client
    from keys import Keys

    r = redis_client.connect(config.redis_url, None, decode=True)
    stream = Keys(config.image_queue).log_stream
    last = "0" if from_start else "$"
    backoff = redis_client.Backoff()
    while True:
        try:
            if last == "$":  # from the newest entry's id on, so that a reconnect misses nothing logged meanwhile
                newest = r.xrevrange(stream, count=1)
                last = newest[0][0] if newest else "0"
            entries = r.xread({stream: last}, block=0 if follow else None, count=1000)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not follow:
                raise
            # Following, it outlives a Redis restart (it died with a traceback) and goes on where it was.
            delay = backoff.next()
            sys.stderr.write(f"logger: Redis unavailable ({exc}); again in {delay:g} s\n")
            time.sleep(delay)
            continue
        backoff.reset()
        if not entries:
            return
        for _, fields in entries[0][1]:
            record = {k: _decode_field(v) for k, v in fields.items()}
            out.write(format_line(record, config.log_format) + "\n")
        out.flush()
        last = entries[0][1][-1][0]


def _decode_field(value):
    try:
        return json.loads(value)
    except ValueError:
        return value


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Follow the merged log of every web server and worker.")
    parser.add_argument("command", choices=["tail"])
    parser.add_argument("--from-start", action="store_true", help="print the whole retained log first")
    parser.add_argument("--no-follow", action="store_true", help="exit after printing what is there")
    args = parser.parse_args()
    import redis

    import redis_client

    config = Settings.for_program("logger")
    try:
        tail(config, from_start=args.from_start, follow=not args.no_follow)
    except KeyboardInterrupt:
        pass
    except redis.RedisError as exc:  # --no-follow: one read, and Redis did not answer it
        sys.exit(f"logger: cannot read the log from Redis at {redis_client.describe(config.redis_url)}: {exc}")

"""Start the web server: `python run_web_server.py` serves the app with gunicorn (threads) on HOST:PORT.

`run_web_server:app` is the same WSGI app for any other host. Configuration comes from the environment
(see settings.py), read once here.
"""

import os
import tempfile

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

import logger
import redis_client
from logger import log
from settings import Settings

config = Settings.from_env()
logger.configure(config)
# prometheus_client picks per-process value files at import; web imports it, so this comes first.
if config.web_processes > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-classifier-metrics-")

import web  # noqa: E402

app = web.create_app(config)


class _GracefulThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, but once it is stopping, new connections are refused at once.

    The stock worker only stops accepting: its copy of the listening socket stays open until the last
    waiting request is answered, so a new client would hang in the backlog instead of going elsewhere.
    """

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()


class _Server(BaseApplication):
    def load_config(self):
        for key, value in {
            "bind": f"{config.host}:{config.port}",
            "workers": config.web_processes,
            "worker_class": _GracefulThreadWorker,
            "threads": config.web_threads,
            # A stopping worker lets its waiting requests finish: they end by REQUEST_TIMEOUT at the latest.
            "graceful_timeout": int(config.request_timeout) + 5,
            "timeout": max(60, int(config.request_timeout) * 2),
            "accesslog": None,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        return app


def main():
    if config.web_nice:
        os.nice(config.web_nice)
    log(
        "web_starting",
        bind=f"{config.host}:{config.port}",
        processes=config.web_processes,
        threads=config.web_threads,
        wait_mode=config.wait_mode,
        nice=config.web_nice,
        redis=redis_client.describe(config.redis_url),
    )
    _Server().run()


if __name__ == "__main__":
    main()

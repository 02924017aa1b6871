"""Shared fixtures: a private redis-server on a free port, fakeredis, and real service processes."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ASSETS = ROOT.parent / "shared" / "assets"
CASTLE = ROOT / "castle_image.jpg"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A real redis-server of our own, never a developer's 6379; it can be stopped and started again."""

    def __init__(self, workdir):
        if not shutil.which("redis-server"):
            pytest.exit("redis-server is not installed: run `make test`, which installs it", returncode=1)
        self.port = free_port()
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, "redis-server to start")

    def _answers(self):
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def stop(self):
        self.process.terminate()
        self.process.wait(10)

    def client(self, **kwargs):
        return redis.Redis.from_url(self.url, **kwargs)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture
def real_redis(redis_server):
    if redis_server.process.poll() is not None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture
def fake_redis():
    import fakeredis

    return fakeredis.FakeRedis()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model-cache"))


class Service:
    """Real processes of the service (workers, web servers) against one Redis; stopped after the test."""

    def __init__(self, redis_server, model_cache, tmp_path):
        self.redis_server = redis_server
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "MODEL": "efficientnet_lite0",
            "MODEL_CACHE_DIR": model_cache,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "HEARTBEAT_INTERVAL": "0.5",
            "HEARTBEAT_TTL": "2",
            "PYTHONUNBUFFERED": "1",
        }
        self.processes = []
        self.port = None

    def _spawn(self, script, name, env):
        log = open(self.tmp_path / f"{name}.log", "w")
        process = subprocess.Popen([sys.executable, str(ROOT / script)], cwd=ROOT, env={**self.env, **env},
                                   stdout=log, stderr=subprocess.STDOUT)
        process.log_path = self.tmp_path / f"{name}.log"
        self.processes.append(process)
        return process

    def log_text(self, process):
        return process.log_path.read_text()

    def start_worker(self, **env):
        process = self._spawn("run_model_server.py", f"worker{len(self.processes)}", env)
        wait_for(lambda: "worker_ready" in self.log_text(process) or process.poll() is not None, 120, "a worker")
        assert process.poll() is None, self.log_text(process)
        return process

    def start_web(self, **env):
        self.port = free_port()
        process = self._spawn("run_web_server.py", f"web{len(self.processes)}", {"PORT": str(self.port), **env})
        wait_for(lambda: _listening(self.port) or process.poll() is not None, 30, "the web server")
        assert process.poll() is None, self.log_text(process)
        return process

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop_all(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def service(real_redis, redis_server, model_cache, tmp_path):
    svc = Service(redis_server, model_cache, tmp_path)
    yield svc
    svc.stop_all()

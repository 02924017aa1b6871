"""Shared fixtures: a private redis-server on a free port, fakeredis, settings, and real service processes."""

import shutil

import pytest

import launcher
import support
from settings import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not shutil.which("redis-server"):
        pytest.exit("redis-server is not installed: run `make test`, which installs it", returncode=1)
    server = launcher.RedisServer(tmp_path_factory.mktemp("redis"))
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


@pytest.fixture
def config(redis_server):
    """Settings for components a test builds itself against the private redis-server."""
    return Settings(redis_url=redis_server.url)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture
def service(real_redis, redis_server, model_cache_dir, tmp_path):
    """Real workers and web servers; EfficientNet-Lite0 with its real weights, fast heartbeats for the sweeps."""
    svc = support.lite0_service(redis_server.url, tmp_path, model_cache_dir)
    yield svc
    svc.stop_all()

"""Shared fixtures: a private redis-server on a free port, fakeredis, and real service processes."""
import shutil
import sys
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import launcher  # noqa: E402 - after the path is set
from launcher import free_port, wait_for  # noqa: E402,F401 - re-exported for the tests

JEMMA = ROOT / "tests" / "data" / "jemma.png"  # the stress test's beagle, from ../shared/assets
CASTLE = ROOT / "castle_image.jpg"


def post(url, path=CASTLE, timeout=60, **kwargs):
    """POST an image file to a running service's /predict, the way a client does."""
    with open(path, "rb") as f:
        return requests.post(f"{url}/predict", files={"image": f}, timeout=timeout, **kwargs)


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


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture
def service(real_redis, redis_server, model_cache, tmp_path):
    """Real workers and web servers; EfficientNet-Lite0 with its real weights, fast heartbeats for the sweeps."""
    svc = launcher.Processes(redis_server.url, tmp_path, MODEL="efficientnet_lite0", MODEL_CACHE_DIR=model_cache,
                             HEARTBEAT_INTERVAL="0.5", HEARTBEAT_TTL="2")
    yield svc
    svc.stop_all()

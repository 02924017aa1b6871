"""Redis with a password and over TLS works end to end; secrets stay out of logs; safe defaults."""

import io
import subprocess
import sys
import threading

import pytest
from prometheus_client import REGISTRY

import launcher
import redis_client
import web
from notifications import ResultWaiter
from settings import Settings
from support import CASTLE, ROOT, CountingClassifier, free_port, wait_for
from worker import Worker


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """redis-server speaking only TLS, with a password, and a self-signed certificate for 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            tmp / "key.pem",
            "-out",
            tmp / "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        launcher.redis_server_command(
            0,
            tmp,
            "--tls-port",
            str(port),
            "--tls-cert-file",
            tmp / "cert.pem",
            "--tls-key-file",
            tmp / "key.pem",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
        ),
        stdout=subprocess.DEVNULL,
    )
    url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={tmp / 'cert.pem'}"

    def answers():
        try:
            return redis_client.connect(url, 5).ping()
        except Exception:  # noqa: BLE001 - still starting
            return False

    wait_for(answers, 10, "redis-server with TLS")
    yield url
    server.terminate()
    server.wait(10)


def test_whole_round_trip_over_tls_with_a_password(tls_redis):
    config = Settings(redis_url=tls_redis, block_timeout=0.5, wait_mode="notify")
    connection = redis_client.connect(tls_redis, 5, max_connections=4)
    waiter = ResultWaiter(connection, config)
    client = web.create_app(config, connection, waiter).test_client()
    notified = REGISTRY.get_sample_value("imgclf_result_wakeups_total", {"via": "notification"}) or 0
    worker = Worker(CountingClassifier(), config, name="tls-worker")
    thread = threading.Thread(target=lambda: [worker.run_once() for _ in range(10)])
    thread.start()
    response = client.post(
        "/predict", data={"image": (io.BytesIO(CASTLE.read_bytes()), "c.jpg")}, content_type="multipart/form-data"
    )
    thread.join(20)
    waiter.close()
    assert response.status_code == 200 and response.get_json()["model"] == "counting"
    # The pub/sub notification came over TLS too.
    assert REGISTRY.get_sample_value("imgclf_result_wakeups_total", {"via": "notification"}) == notified + 1


def test_wrong_password_is_a_clear_503(tls_redis):
    wrong = tls_redis.replace(":s3cret@", ":nope@")
    config = Settings(redis_url=wrong, wait_mode="poll")
    connection = redis_client.connect(wrong, 5, max_connections=2)
    client = web.create_app(config, connection, ResultWaiter(connection, config)).test_client()
    response = client.post(
        "/predict", data={"image": (io.BytesIO(CASTLE.read_bytes()), "c.jpg")}, content_type="multipart/form-data"
    )
    assert response.status_code == 503 and "s3cret" not in response.get_data(as_text=True)


def test_password_never_reaches_the_log():
    assert redis_client.describe("rediss://:s3cret@db.internal:6380/2?ssl_ca_certs=/x") == "rediss://db.internal:6380/2"


def test_defaults_bind_loopback_and_name_no_host():
    code = "from settings import Settings; s = Settings.from_env(); print(s.host, s.redis_url)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout.split()
    assert out == ["127.0.0.1", "redis://127.0.0.1:6379/0"]

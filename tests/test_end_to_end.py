"""The whole service as real processes: redis-server, model workers (real EfficientNet-Lite0 weights), gunicorn."""

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from job_queue import result_grace
from keys import Keys
from launcher import listening
from settings import Settings
from support import CASTLE, JEMMA, ROOT, free_port, post, wait_for

pytestmark = pytest.mark.slow
KEYS = Keys("image_queue")


def test_castle_through_the_whole_service(service, real_redis):
    service.start_worker()
    service.start_web()
    response = post(service.url)
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["model"] == "efficientnet_lite0"
    assert len(body["predictions"]) == 5
    assert body["predictions"][0]["label"] == "castle"
    assert body["predictions"][0]["probability"] > 0.9
    assert len(body["id"]) == 32
    # The result came with its notification; its key, there for a request whose notification is lost, is kept
    # until the request's deadline and a grace for a retried read (job_queue.result_grace), not RESULT_TTL.
    [result_key] = real_redis.keys(KEYS.result_prefix + "*")
    defaults = Settings()
    assert 0 < real_redis.pttl(result_key) <= (defaults.request_timeout + result_grace(defaults)) * 1000
    assert defaults.request_timeout + result_grace(defaults) < defaults.result_ttl
    assert real_redis.llen(KEYS.queue) == 0

    printed = subprocess.run(
        [sys.executable, "simple_request.py", "--url", f"{service.url}/predict"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert re.fullmatch(r"1\. castle: 0\.9\d{3}", lines[0])
    assert all(re.fullmatch(rf"{i}\. \w+: 0\.\d{{4}}", line) for i, line in enumerate(lines[1:5], 2))

    curl = subprocess.run(
        ["curl", "-s", "-X", "POST", "-F", f"image=@{JEMMA}", f"{service.url}/predict?top_k=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '"label":"beagle"' in curl.stdout.replace(" ", "")

    # A body sent in chunks (no Content-Length) is read whole as well.
    chunked = subprocess.run(
        ["curl", "-s", "-H", "Transfer-Encoding: chunked", "-F", f"image=@{CASTLE}", f"{service.url}/predict?top_k=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert '"label":"castle"' in chunked.stdout.replace(" ", ""), chunked.stdout


def test_simple_request_says_clearly_when_the_server_is_down():
    printed = subprocess.run(
        [sys.executable, "simple_request.py", "--url", f"http://127.0.0.1:{free_port()}/predict"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode != 0 and "cannot reach the service" in printed.stderr


def test_two_workers_under_concurrent_load_answer_every_request_once(service, real_redis):
    workers = [service.start_worker(BATCH_SIZE="8"), service.start_worker(BATCH_SIZE="8")]
    service.start_web()
    images = [CASTLE, JEMMA]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda i: post(service.url, images[i % 2]), range(128)))
        clients = real_redis.client_list()
    assert [r.status_code for r in responses] == [200] * 128
    for i, response in enumerate(responses):
        assert response.json()["predictions"][0]["label"] == ("castle" if i % 2 == 0 else "beagle")
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 128
    published = [re.findall(r"result_published\b.*? id=(\w+)", service.log_text(w)) for w in workers]
    assert sorted(published[0] + published[1]) == sorted(ids)  # each job classified once, by one worker
    assert all(published), "both workers should have taken part"
    # 64 requests waited at once over a bounded pool, not a connection each.
    assert len(clients) < 30, len(clients)


def test_run_script_serves_and_stops_everything_on_ctrl_c(redis_server, real_redis, model_cache_dir):
    """`make run`'s script: one worker and the web server against REDIS_URL; Ctrl-C (SIGINT) stops them all."""
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PORT": str(port),
        "MODEL": "efficientnet_lite0",
        "MODEL_CACHE_DIR": model_cache_dir,
        "VENV": os.path.dirname(os.path.dirname(sys.executable)),
    }
    script = subprocess.Popen(
        ["bash", "scripts/run.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: listening(port) and real_redis.scard(KEYS.workers) == 1, 120, "make run to serve")
        assert post(f"http://127.0.0.1:{port}").json()["predictions"][0]["label"] == "castle"
        os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        script.wait(60)  # raises if the script is still running a minute later
        assert not listening(port)  # the script waits for its services before it exits
        assert real_redis.scard(KEYS.workers) == 0 and not real_redis.keys(KEYS.processing_prefix + "*")
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)


def test_an_upload_over_the_limit_is_413_with_or_without_a_length(service):
    service.start_web(MAX_UPLOAD_BYTES="20000")  # the castle is 77 KB; no worker: nothing gets that far
    assert post(service.url).status_code == 413
    # In chunks there is no length to refuse by: the web counts what it reads (up to the limit) as the length.
    assert curl_upload(service.url, "Transfer-Encoding: chunked", "%{http_code}") == "413"


def curl_upload(url, header, write_out):
    """What curl's --write-out says of its upload of the castle to /predict, sent with one header of ours."""
    command = ["curl", "-s", "-o", "/dev/null", "-w", write_out, "-H", header, "-F", f"image=@{CASTLE}"]
    command.append(f"{url}/predict")
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.slow
def test_an_upload_over_the_limit_gets_one_answer_and_the_connection_closes(service):
    """The 413 left the body unread, and gunicorn drained it as the start of the next request: a client still
    sending it after CLIENT_READ_TIMEOUT got a second answer to its one request (408), which a kept-alive client
    would have taken for the answer to its next one. Now the 413 says `Connection: close`, and the server stops
    sending, lets the client stop too, then closes."""
    service.start_web(MAX_UPLOAD_BYTES="20000", CLIENT_READ_TIMEOUT="2")
    client = socket.create_connection(("127.0.0.1", service.port))
    client.sendall(
        b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    client.settimeout(0.2)
    received, until = b"", time.monotonic() + 6
    while time.monotonic() < until:
        try:
            client.sendall(b"x" * 4096)  # a slow upload: 80 KB/s
            time.sleep(0.05)
            data = client.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # the server closed: nothing more can come
            break
        if not data:
            break
        received += data
    client.close()
    head = received.partition(b"\r\n\r\n")[0]
    assert received.count(b"HTTP/1.1 ") == 1 and head.startswith(b"HTTP/1.1 413"), received
    assert b"Connection: close" in head.split(b"\r\n")


@pytest.mark.slow
def test_an_upload_announced_over_the_limit_is_refused_before_it_is_sent(service):
    """gunicorn answered `Expect: 100-continue` with 100 Continue before the app saw the request, so curl uploaded
    all of a file that was then refused unread (curl asks before sending more than 1 MB)."""
    service.start_web(MAX_UPLOAD_BYTES="20000")  # the castle is 77 KB
    sent = curl_upload(service.url, "Expect: 100-continue", "%{http_code} %{size_upload}")
    assert sent == "413 0"  # refused, and not a byte of the body sent

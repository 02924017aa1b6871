"""The HTTP contract of /predict, on Flask's test client: clear JSON errors, nothing queued for bad input."""

import io
import time

import numpy as np
import pytest
from PIL import Image

import helpers
import jobs
import redis_client
import web
from keys import Keys
from notifications import ResultWaiter
from settings import Settings
from support import CASTLE, free_port, png_bomb

QUEUE = Keys(Settings().image_queue).queue


@pytest.fixture
def make_client(fake_redis):
    def make(connection=fake_redis, **settings):
        config = Settings(wait_mode="poll", **settings)
        return web.create_app(config, connection, ResultWaiter(connection, config)).test_client()

    return make


def post_image(client, data, filename="x.jpg", query=""):
    return client.post(
        f"/predict{query}", data={"image": (io.BytesIO(data), filename)}, content_type="multipart/form-data"
    )


def assert_error(response, status, text):
    assert response.status_code == status
    body = response.get_json()
    assert body["success"] is False and text in body["error"]
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize("timeout", ["2.5", "30", "0.5", "10.", ".5", "2.4999871253967285", "1234567890"])
def test_a_timeout_as_clients_write_it_is_read(timeout):
    # e.g. requests.post(..., params={"timeout": deadline - time.time()}): a float's whole repr
    assert web._parse_timeout(timeout) == float(timeout)
    assert web._parse_top_k("0005") == 5


@pytest.mark.parametrize(
    "send, status, text",
    [
        (lambda c: c.post("/predict", data={"other": "x"}), 400, "field named 'image'"),
        (lambda c: c.post("/predict", data=b"\xff\xd8raw jpeg bytes", content_type="image/jpeg"), 400, "multipart"),
        (lambda c: c.post("/predict", json={"image": "abc"}), 400, "multipart"),
        (lambda c: post_image(c, b""), 400, "empty"),
        (lambda c: post_image(c, b"just some text"), 400, "not an image"),
        (
            lambda c: post_image(c, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "doc.pdf"),
            400,
            "not an image",
        ),
        (lambda c: post_image(c, CASTLE.read_bytes()[:20000]), 400, "could not be decoded"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?top_k=0"), 400, "top_k"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?top_k=21"), 400, "top_k"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?top_k=five"), 400, "top_k"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=0"), 400, "timeout"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=-1"), 400, "timeout"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=nan"), 400, "timeout"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=inf"), 400, "timeout"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=soon"), 400, "timeout"),
        # Python's int() and float() read these; a client that sends them made a mistake.
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?top_k=%C2%B2"), 400, "top_k must be an integer"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?top_k=%D9%A3"), 400, "top_k must be an integer"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=1_0"), 400, "timeout must be a number"),
        (lambda c: post_image(c, CASTLE.read_bytes(), query="?timeout=1e1"), 400, "timeout must be a number"),
        (lambda c: c.post("/jobs?timeout=5", data={"image": (io.BytesIO(CASTLE.read_bytes()), "c.jpg")}), 400, "async"),
        (lambda c: c.get("/predict"), 405, "method"),
    ],
)
def test_bad_requests_get_a_clear_error_and_queue_nothing(make_client, fake_redis, send, status, text):
    response = send(make_client())
    assert_error(response, status, text)
    assert fake_redis.llen(QUEUE) == 0


def test_decompression_bomb_is_refused(make_client, fake_redis):
    assert_error(post_image(make_client(), png_bomb(), "bomb.png"), 413, "too large")
    assert fake_redis.llen(QUEUE) == 0


def test_upload_over_the_limit_is_413(make_client, fake_redis):
    assert_error(post_image(make_client(max_upload_bytes=50_000), CASTLE.read_bytes()), 413, "exceeds the capacity")
    assert fake_redis.llen(QUEUE) == 0


def test_full_queue_answers_503_with_retry_after_at_once(make_client, fake_redis):
    fake_redis.rpush(QUEUE, "a", "b")
    response = post_image(make_client(max_queue_length=2), CASTLE.read_bytes())
    assert_error(response, 503, "busy")
    assert response.headers["Retry-After"] == "1"
    assert fake_redis.llen(QUEUE) == 2


def test_no_result_in_time_answers_504_with_the_job_id(make_client, fake_redis):
    response = post_image(make_client(request_timeout=0.5), CASTLE.read_bytes())
    assert_error(response, 504, "no result within 0.5 s")
    job_id = response.get_json()["id"]
    assert len(job_id) == 32 and jobs.header_of(fake_redis.lindex(QUEUE, 0))["id"] == job_id
    assert len(fake_redis.get(f"{QUEUE}:pixels:{job_id}")) == 224 * 224 * 3  # written beside the push


@pytest.mark.parametrize("timeout, within", [("0.3", 0.3), ("60", 0.5)])
def test_a_request_s_own_timeout_is_its_deadline_up_to_request_timeout(make_client, fake_redis, timeout, within):
    response = post_image(make_client(request_timeout=0.5), CASTLE.read_bytes(), query=f"?timeout={timeout}")
    assert_error(response, 504, f"no result within {within:g} s")
    job = jobs.header_of(fake_redis.lindex(QUEUE, 0))
    assert job["deadline"] - job["enqueued_at"] == pytest.approx(within, abs=0.1)  # the worker's deadline too


def test_a_request_whose_deadline_passed_while_its_image_was_decoded_queues_nothing(
    make_client, fake_redis, monkeypatch
):
    """Found by the fifth hostile review: its job was queued with a deadline already past, for a worker to skip."""

    def slow(data, max_pixels):  # the process's decoding backlog, say
        time.sleep(0.5)
        return np.zeros((224, 224, 3), np.uint8)

    monkeypatch.setattr(helpers, "prepare_image", slow)
    response = post_image(make_client(request_timeout=30), CASTLE.read_bytes(), query="?timeout=0.3")
    assert_error(response, 504, "no result within 0.3 s")
    assert fake_redis.llen(QUEUE) == 0 and not fake_redis.keys(f"{QUEUE}:pixels:*")


def test_redis_down_answers_503_quickly(make_client):
    nowhere = redis_client.connect(f"redis://127.0.0.1:{free_port()}/0", 5, max_connections=4)
    started = time.monotonic()
    response = post_image(make_client(nowhere), CASTLE.read_bytes())
    assert time.monotonic() - started < 3
    assert_error(response, 503, "unavailable")


def test_request_id_is_taken_from_the_header_and_returned(make_client):
    client = make_client(request_timeout=0.2)
    response = post_image(client, CASTLE.read_bytes())
    assert response.headers["X-Request-Id"] == response.get_json()["id"]  # made up: the job id
    response = client.post(
        "/predict", data={"image": (io.BytesIO(CASTLE.read_bytes()), "c.jpg")}, headers={"X-Request-Id": "trace-42"}
    )
    assert response.headers["X-Request-Id"] == "trace-42"


def test_malformed_request_id_is_refused(make_client):
    response = make_client().post("/predict", headers={"X-Request-Id": "bad id\twith spaces"})
    assert_error(response, 400, "X-Request-Id")


def test_unusual_images_are_queued(make_client, fake_redis):
    buffer = io.BytesIO()
    Image.new("LA", (5, 7)).save(buffer, "PNG")
    client = make_client(request_timeout=0.1)
    assert post_image(client, buffer.getvalue(), "g.png").status_code == 504  # queued, nobody answered
    assert fake_redis.llen(QUEUE) == 1

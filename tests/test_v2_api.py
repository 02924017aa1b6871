"""The Open Inference Protocol's routes on Flask's test client: metadata, probes, and every refusal of infer."""

import gc
import gzip
import io
import json
import tracemalloc

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from test_open_inference import triton_request

import submission
import web
from job_queue import JobQueue
from keys import Keys
from notifications import ResultWaiter
from open_inference import HEADER_LENGTH
from settings import Settings
from support import CASTLE, JEMMA
from worker_registration import WorkerRegistry

QUEUE = Keys(Settings().image_queue).queue
MODEL = "efficientnet_lite0"


@pytest.fixture
def make_client(fake_redis):
    def make(**settings):
        config = Settings(wait_mode="poll", **settings)
        return web.create_app(config, fake_redis, ResultWaiter(fake_redis, config)).test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def serve(fake_redis, model=MODEL):
    """A live, warmed-up worker of `model`, as far as its heartbeat says."""
    config = Settings()
    WorkerRegistry(fake_redis, JobQueue(fake_redis, config), config.heartbeat_ttl).beat(
        f"worker-{model}", {"model": model, "ready": 1}
    )


def infer(client, body_and_length, model=MODEL, headers=()):
    body, header_length = body_and_length
    headers = dict(headers, **({HEADER_LENGTH: str(header_length)} if header_length is not None else {}))
    return client.post(f"/v2/models/{model}/infer", data=body, headers=headers)


def assert_error(response, status, text):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["error"] and text in body["error"]


def test_server_metadata_names_the_extensions(client):
    body = client.get("/v2").get_json()
    assert body["name"] == "image-classifier" and body["version"]
    assert set(body["extensions"]) == {"binary_tensor_data", "classification", "schedule_policy"}


def test_model_metadata_with_and_without_a_version(client):
    for path in ("/v2/models/resnet50", "/v2/models/resnet50/versions/1"):
        body = client.get(path).get_json()
        assert body["name"] == "resnet50" and body["versions"] == ["1"]
        assert body["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert_error(client.get("/v2/models/resnet50/versions/2"), 404, "no version '2'")
    assert_error(client.get("/v2/models/mobilenet"), 404, "unknown model 'mobilenet'")


def test_liveness_and_readiness_follow_the_workers_models(client, fake_redis):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 503
    serve(fake_redis)
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get(f"/v2/models/{MODEL}/ready").get_json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/1/ready").status_code == 200
    not_served = client.get("/v2/models/resnet50/ready")
    assert not_served.status_code == 503 and "no worker with resnet50 loaded" in not_served.get_json()["reason"]
    assert_error(client.get("/v2/models/mobilenet/ready"), 404, "unknown model")


def test_unknown_model_is_404_before_anything_is_read(client, fake_redis):
    serve(fake_redis)
    assert_error(infer(client, triton_request(), model="mobilenet"), 404, "unknown model 'mobilenet'")
    assert_error(infer(client, triton_request(), model=f"{MODEL}/versions/3"), 404, "no version '3'")
    assert fake_redis.llen(QUEUE) == 0


@pytest.mark.parametrize(
    "body_and_length, text",
    [
        ((b'{"inputs": []}xxxx', "abc"), HEADER_LENGTH),
        ((triton_request()[0], None), "not JSON"),
        ((triton_request()[0][:-10], triton_request()[1]), "bytes follow the JSON object"),
        (
            (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1]}]}).encode(), None),
            "BYTES",
        ),
    ],
)
def test_malformed_requests_are_400_and_queue_nothing(client, fake_redis, body_and_length, text):
    serve(fake_redis)
    assert_error(infer(client, body_and_length), 400, text)
    assert fake_redis.llen(QUEUE) == 0


def test_a_bad_image_is_400_naming_it_and_queues_nothing(client, fake_redis):
    serve(fake_redis)
    assert_error(infer(client, triton_request([CASTLE.read_bytes(), b"just text"])), 400, "image 2 of 2")
    assert fake_redis.llen(QUEUE) == 0


def test_a_compressed_request_is_inflated_before_it_is_read(make_client, fake_redis):
    serve(fake_redis)
    body, length = triton_request([CASTLE.read_bytes(), b"just text"])
    packed = gzip.compress(body)
    # Read whole: it gets as far as the images, the second of which is not one.
    assert_error(infer(make_client(), (packed, length), headers={"Content-Encoding": "gzip"}), 400, "image 2 of 2")
    # The limit holds for what it inflates to, not for what came.
    small = make_client(max_upload_bytes=len(body) - 1)
    assert_error(infer(small, (packed, length), headers={"Content-Encoding": "gzip"}), 413, "inflates to more")
    assert_error(infer(make_client(), (packed, length), headers={"Content-Encoding": "br"}), 415, "gzip, deflate")
    assert fake_redis.llen(QUEUE) == 0


def test_a_compressed_request_lets_go_of_what_it_inflated_to_while_it_waits(make_client, fake_redis, monkeypatch):
    """A 10 KB gzip body that inflates to MAX_UPLOAD_BYTES held that, and its image's copy, until its answer came:
    20 MiB a request, which admission lets hundreds of wait at once."""
    serve(fake_redis)
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    body, length = triton_request([tiny.getvalue() + bytes(8 << 20)])  # a PNG ends at its IEND: the rest is ignored
    packed = gzip.compress(body)
    assert len(packed) < 20_000
    held = []

    def classify(pixels, top_k, probabilities=False):
        gc.collect()
        held.append(tracemalloc.get_traced_memory()[0])
        return [_success(MODEL, 483)]

    monkeypatch.setattr(submission, "classify", classify)
    tracemalloc.start()
    try:
        response = infer(make_client(), (packed, length), headers={"Content-Encoding": "gzip"})
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.get_data(as_text=True)
    assert held[0] < 2 << 20, f"{held[0] >> 20} MiB held while waiting"


def test_a_request_in_two_gzip_members_is_read_whole_and_trailing_bytes_are_refused_first(make_client, fake_redis):
    body, length = triton_request([CASTLE.read_bytes(), b"just text"])
    half = len(body) // 2
    two_members = gzip.compress(body[:half]) + gzip.compress(body[half:])
    garbage = gzip.compress(body) + b"\x00neither gzip nor part of the request"
    # No worker serves the model: a request read as valid would be answered 503 "not ready".
    assert_error(infer(make_client(), (garbage, length), headers={"Content-Encoding": "gzip"}), 400, "not valid gzip")
    serve(fake_redis)
    assert_error(infer(make_client(), (two_members, length), headers={"Content-Encoding": "gzip"}), 400, "image 2 of 2")
    assert fake_redis.llen(QUEUE) == 0


def test_a_model_no_worker_serves_is_503_at_once(client, fake_redis):
    serve(fake_redis, "resnet50")
    response = infer(client, triton_request())
    assert_error(response, 503, f"model {MODEL} is not ready")
    assert int(response.headers["Retry-After"]) >= 1
    assert fake_redis.llen(QUEUE) == 0


def test_limits_and_busy_are_the_same_as_predicts(make_client, fake_redis):
    serve(fake_redis)
    assert_error(infer(make_client(max_upload_bytes=50_000), triton_request()), 413, "")
    fake_redis.rpush(QUEUE, "a")
    busy = infer(make_client(max_queue_length=2), triton_request())
    assert_error(busy, 503, "busy")
    assert busy.headers["Retry-After"]
    assert fake_redis.llen(QUEUE) == 1


def test_no_answer_in_time_is_504(make_client, fake_redis):
    serve(fake_redis)
    assert_error(infer(make_client(request_timeout=0.5), triton_request()), 504, "no result within 0.5 s")


def test_a_request_s_own_timeout_is_its_deadline(make_client, fake_redis):
    serve(fake_redis)
    response = infer(make_client(request_timeout=30), triton_request(timeout=300_000))  # 0.3 s, in microseconds
    assert_error(response, 504, "no result within 0.3 s")
    job = json.loads(fake_redis.lindex(QUEUE, 0))
    assert job["deadline"] - job["enqueued_at"] == pytest.approx(0.3, abs=0.1)


def test_a_timeout_the_work_ahead_cannot_meet_is_refused_at_once(make_client, fake_redis):
    WorkerRegistry(fake_redis, JobQueue(fake_redis, Settings()), 60).beat(
        "w", {"model": MODEL, "ready": 1, "images_per_s": 10.0}
    )
    fake_redis.rpush(QUEUE, *["queued"] * 20)  # 21 images at 10 a second: 2.1 s
    # REQUEST_TIMEOUT's 30 s would admit it; the 2 s it asked for cannot: 2.1 s > 0.8 x 2 s.
    refused = infer(make_client(request_timeout=30), triton_request(images=[CASTLE.read_bytes()], timeout=2_000_000))
    assert_error(refused, 503, "more than this request's 2.0 s allow")
    assert refused.headers["Retry-After"] and fake_redis.llen(QUEUE) == 20


def test_a_timeout_only_its_own_images_would_miss_is_tried_not_told_to_retry(make_client, fake_redis):
    """Found by the fifth hostile review: 503 with Retry-After: 1 and nothing ahead, refused again on every retry.
    With nothing ahead it is tried (the estimate may be wrong; no retry would find less ahead), and its deadline
    bounds it."""
    WorkerRegistry(fake_redis, JobQueue(fake_redis, Settings()), 60).beat(
        "w", {"model": MODEL, "ready": 1, "images_per_s": 10.0}
    )
    sixteen = triton_request(images=[JEMMA.read_bytes()] * 16, timeout=1_000_000)  # 1.6 s of work, 1 s to live
    response = infer(make_client(), sixteen)
    assert_error(response, 504, "no result within 1 s")
    assert "Retry-After" not in response.headers and fake_redis.llen(QUEUE) == 16  # tried


def _answer(monkeypatch, results):
    """Stand in for the workers: classify answers `results` (and the images it was given are kept)."""
    given = []

    def classify(pixels, top_k, probabilities=False):
        given.append((len(pixels), probabilities))
        return results

    monkeypatch.setattr(submission, "classify", classify)
    return given


def _success(model, hot):
    row = np.full(1000, 0.5 / 999, dtype=np.float32)
    row[hot] = 0.5
    return {"id": "0" * 32, "success": True, "model": model, "predictions": [], "probabilities": row}


def test_results_become_the_requested_output(client, fake_redis, monkeypatch):
    serve(fake_redis)
    given = _answer(monkeypatch, [_success(MODEL, 483), _success(MODEL, 162)])
    outputs = [triton.InferRequestedOutput("probabilities", class_count=2)]
    response = infer(client, triton_request(outputs=outputs, request_id="mine"))
    assert response.status_code == 200 and given == [(2, True)]
    result = triton.InferenceServerClient.parse_response_body(
        response.get_data(), header_length=int(response.headers[HEADER_LENGTH])
    )
    assert result.get_response()["id"] == "mine" and result.get_response()["model_name"] == MODEL
    assert [row[0].decode() for row in result.as_numpy("probabilities")] == ["0.5:483:castle", "0.5:162:beagle"]
    # Without an id of its own the request's id is the service's, as X-Request-Id says.
    plain = infer(client, triton_request(binary_input=False, as_base64=True), headers={"X-Request-Id": "r-1"})
    assert json.loads(plain.get_data()[: int(plain.headers[HEADER_LENGTH])])["id"] == "r-1"


@pytest.mark.parametrize(
    "results, status, text",
    [
        ([{"id": "1" * 32, "success": False, "error": "job failed 3 times", "status": 500}], 500, "job failed 3 times"),
        ([{"id": "1" * 32, "success": False, "error": "malformed", "status": 422}], 422, "malformed"),
        ([_success("resnet50", 1)], 500, "efficientnet_lite0 was asked for but resnet50 answered"),
    ],
)
def test_a_failed_job_keeps_its_status(client, fake_redis, monkeypatch, results, status, text):
    serve(fake_redis)
    _answer(monkeypatch, results)
    assert_error(infer(client, triton_request([JEMMA.read_bytes()])), status, text)


def test_every_classification_answer_is_counted_by_status_and_endpoint(client, fake_redis):
    import metrics

    def counts():
        return {
            (sample.labels["status"], sample.labels["endpoint"]): sample.value
            for sample in metrics.REQUESTS.collect()[0].samples
            if sample.name.endswith("_total")
        }

    before = counts()
    infer(client, triton_request(), model="mobilenet")  # 404: unknown model
    infer(client, triton_request())  # 503: no worker serves it
    client.post("/predict")  # 400: no image
    client.post("/jobs")  # 400: no image
    client.get("/v2")  # metadata, a probe and a job's status poll are not classification requests
    client.get("/health/ready")
    client.get("/jobs/0123456789abcdef0123456789abcdef")
    client.options("/predict")  # neither OPTIONS nor a GET answered 405 asks for a classification
    client.options(f"/v2/models/{MODEL}/versions/1/infer")
    client.get("/predict")
    after = counts()
    changed = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert changed == {("404", "v2_infer"): 1, ("503", "v2_infer"): 1, ("400", "predict"): 1, ("400", "jobs"): 1}

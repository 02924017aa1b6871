"""The Open Inference Protocol through real processes, spoken by NVIDIA's own client (tritonclient[http])."""

import base64

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from support import CASTLE, JEMMA, wait_for

pytestmark = pytest.mark.slow
MODEL = "efficientnet_lite0"
CASTLE_INDEX, BEAGLE_INDEX = 483, 162


@pytest.fixture
def client(service):
    service.start_worker()
    service.start_web()
    client = triton.InferenceServerClient(service.url.removeprefix("http://"))
    yield client
    client.close()


def images(*paths, binary=True):
    """The BYTES input: encoded files, raw with the binary extension and base64 strings inside JSON."""
    files = [path.read_bytes() for path in paths]
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    elements = files if binary else [base64.b64encode(f) for f in files]
    return tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary)


def classifications(result):
    """[[(score, index, label), ...] per image] from a classification output."""
    rows = result.as_numpy("probabilities")
    return [[_triple(e.decode() if isinstance(e, bytes) else e) for e in row] for row in rows]


def _triple(element):
    score, index, label = element.split(":", 2)
    return np.float32(score), int(index), label


def test_probes_and_metadata(client):
    assert client.is_server_live()
    wait_for(client.is_server_ready, 10, "readiness")
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("resnet50")  # known, but no worker serves it
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification", "schedule_policy"} <= set(server["extensions"])
    model = client.get_model_metadata(MODEL, "1")
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("mobilenet")
    assert unknown.value.status() == "404"


def test_a_batch_of_two_classified_in_binary_and_in_json(client):
    batch = images(CASTLE, JEMMA)
    classified = client.infer(
        MODEL, [batch], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)], request_id="two"
    )
    assert classified.get_response()["id"] == "two" and classified.get_response()["model_name"] == MODEL
    (castle, beagle) = classifications(classified)
    assert [len(castle), len(beagle)] == [3, 3]
    assert castle[0][1:] == (CASTLE_INDEX, "castle") and castle[0][0] > 0.9
    assert beagle[0][1:] == (BEAGLE_INDEX, "beagle") and beagle[0][0] > 0.9
    assert all(row[i][0] >= row[i + 1][0] for row in (castle, beagle) for i in range(2))  # best first

    # No outputs named: tritonclient asks for all of them in binary, which is the FP32 probabilities.
    probabilities = client.infer(MODEL, [batch]).as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-3)
    assert list(probabilities.argmax(axis=1)) == [CASTLE_INDEX, BEAGLE_INDEX]
    # The classification strings agree with the probabilities.
    for row, top in zip(probabilities, (castle, beagle), strict=True):
        assert [index for _, index, _ in top] == list(np.argsort(-row)[:3])
        np.testing.assert_allclose([score for score, _, _ in top], row[[index for _, index, _ in top]], atol=1e-5)

    # Plain JSON both ways: images as base64 strings, outputs as JSON data.
    as_json = client.infer(
        MODEL,
        [images(CASTLE, JEMMA, binary=False)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
    )
    [output] = as_json.get_response()["outputs"]
    assert "data" in output and "parameters" not in output
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), probabilities, atol=1e-5)
    json_classified = client.infer(
        MODEL,
        [images(JEMMA, binary=False)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=False, class_count=1)],
    )
    assert [[(i, label) for _, i, label in row] for row in classifications(json_classified)] == [[(162, "beagle")]]


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_s_compressed_requests_are_answered(client, compression):
    wait_for(client.is_server_ready, 10, "readiness")
    result = client.infer(
        MODEL,
        [images(CASTLE, JEMMA)],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,  # asked for, not given: the answer comes uncompressed
    )
    assert [[(i, label) for _, i, label in row] for row in classifications(result)] == [
        [(CASTLE_INDEX, "castle")],
        [(BEAGLE_INDEX, "beagle")],
    ]


def test_refusals_reach_tritonclient_with_their_status(client):
    wait_for(client.is_server_ready, 10, "readiness")
    for model, inputs, status, text in [
        ("mobilenet", images(CASTLE), "404", "unknown model"),
        ("resnet50", images(CASTLE), "503", "not ready"),
        (MODEL, _bad_image(), "400", "image 2 of 2"),
    ]:
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [inputs])
        assert refused.value.status() == status and text in refused.value.message()


def test_tritonclient_s_schedule_policy_timeout_is_the_request_s_deadline(client):
    """Triton's schedule policy extension as tritonclient sends it: `timeout`, in microseconds, is the request's
    deadline; `priority` is accepted, at the one level there is."""
    wait_for(client.is_server_ready, 10, "readiness")
    outputs = [triton.InferRequestedOutput("probabilities", class_count=1)]
    result = client.infer(MODEL, [images(CASTLE)], outputs=outputs, priority=1, timeout=20_000_000)
    assert [[(i, label) for _, i, label in row] for row in classifications(result)] == [[(CASTLE_INDEX, "castle")]]
    with pytest.raises(InferenceServerException) as late:
        client.infer(MODEL, [images(CASTLE)], timeout=1)  # 1 us: over before the server could look at it
    assert late.value.status() == "504" and "time ran out" in late.value.message()  # no retry would do better


def _bad_image():
    tensor = triton.InferInput("image", [2], "BYTES")
    return tensor.set_data_from_numpy(np.array([CASTLE.read_bytes(), b"not an image"], dtype=object))

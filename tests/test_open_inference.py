"""The Open Inference Protocol's wire format, read and written against NVIDIA's own client (tritonclient)."""

import base64
import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import tritonclient.http as triton

import catalog
import open_inference
from open_inference import HEADER_LENGTH, MAX_ID_LENGTH, ProtocolError, RequestedOutput
from support import CASTLE, JEMMA

LABELS = catalog.load_labels()
IMAGES = [CASTLE.read_bytes(), JEMMA.read_bytes()]
MAX_IMAGES = 32


def parse(body, header_length):
    return open_inference.parse_request(
        body, None if header_length is None else str(header_length), len(LABELS), MAX_IMAGES
    )


def triton_request(images=IMAGES, binary_input=True, outputs=None, request_id="", as_base64=False, **options):
    """A request body as tritonclient builds it: (body, Inference-Header-Content-Length or None). `options`:
    generate_request_body's own (priority, timeout, parameters)."""
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    elements = [base64.b64encode(i) for i in images] if as_base64 else images
    tensor.set_data_from_numpy(np.array(elements, dtype=object), binary_data=binary_input)
    return triton.InferenceServerClient.generate_request_body([tensor], outputs, request_id=request_id, **options)


def test_binary_images_from_tritonclient_are_read_whole_and_in_order():
    body, header_length = triton_request(
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)], request_id="abc"
    )
    request = parse(body, header_length)
    assert request.images == IMAGES
    assert request.id == "abc"
    assert request.output == RequestedOutput(binary=True, classification=3)


def test_the_schedule_policy_s_timeout_is_read_in_seconds_and_its_priority_checked():
    assert parse(*triton_request(timeout=250_000, priority=2)).timeout == 0.25
    assert parse(*triton_request()).timeout is None  # the server's own
    assert parse(*triton_request(timeout=0)).timeout is None  # 0 is no timeout of its own, as in Triton


@pytest.mark.parametrize(
    "parameters",
    [
        {"timeout": -1},
        {"timeout": 1.5},
        {"timeout": "1000"},
        {"timeout": True},
        {"timeout": 2**63},  # past int64 (10**400 is refused before, for its digits: see the next test)
        {"priority": -1},
        {"priority": 0.5},
    ],
)
def test_schedule_policy_parameters_that_are_not_counts_are_400(parameters):
    name = next(iter(parameters))
    body, _ = triton_request(binary_input=False, as_base64=True)  # tritonclient itself sends only integers
    request = dict(json.loads(body), parameters=parameters)
    with pytest.raises(ProtocolError, match=f"{name} must be an integer from 0 to {2**63 - 1}"):
        parse(json.dumps(request).encode(), None)


def test_json_images_travel_as_base64():
    body, header_length = triton_request(
        binary_input=False, as_base64=True, outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)]
    )
    assert header_length is None
    request = parse(body, header_length)
    assert request.images == IMAGES and request.id is None
    assert request.output == RequestedOutput(binary=False, classification=0)


def test_without_outputs_the_request_parameter_decides_binary():
    # tritonclient asks for binary_data_output when it names no output.
    assert parse(*triton_request()).output == RequestedOutput(binary=True, classification=0)
    plain = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"x").decode()]}]
    }
    assert parse(json.dumps(plain).encode(), None).output == RequestedOutput(binary=False, classification=0)


def _json(request=None, **tensor_fields):
    """A JSON request for one image, with fields of the request and of its input replaced."""
    tensor = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b"img").decode()]}
    return json.dumps({"inputs": [{**tensor, **tensor_fields}], **(request or {})}).encode(), None


def _binary(elements, size=None, count=None, header_length=None):
    """A binary request whose input declares `count` elements and `size` bytes (defaults: the truth)."""
    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    tensor = {"name": "image", "shape": [len(elements) if count is None else count], "datatype": "BYTES"}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, len(header) if header_length is None else header_length


@pytest.mark.parametrize(
    "request_body, text",
    [
        ((b"not json", None), "not JSON"),
        ((b"[1, 2]", None), "JSON object"),
        (_binary([b"abc"], header_length="12x"), HEADER_LENGTH),
        (_binary([b"abc"], header_length="0"), HEADER_LENGTH),
        (_binary([b"abc"], header_length="100000"), HEADER_LENGTH),
        (_binary([b"abc"], header_length="-5"), HEADER_LENGTH),
        (_binary([b"abc"], header_length="\u00b2"), HEADER_LENGTH),  # a digit to str.isdigit, not to int()
        (_binary([b"abc"], header_length="1" * 5000), HEADER_LENGTH),  # more digits than int() reads
        (_binary([b"abc"], header_length=20), "not JSON"),  # cuts the JSON short
        (_binary([b"abc"], size=6), "binary_data_size is 6, but 7 bytes follow"),
        (_binary([b"abc"], size="7"), "binary_data_size is '7'"),
        (_binary([b"abc", b"de"], count=3), "declares 3 elements, but its binary data ends after 2"),
        (_binary([b"abc", b"de"], count=1), "end 6 bytes before"),
        ((_binary([b"abc"])[0][:-1], _binary([b"abc"])[1]), "binary_data_size is 7, but 6 bytes follow"),
        ((_binary([b"abc"])[0], None), "not JSON"),  # binary after the JSON without the header
        ((b'{"inputs": []}' + b"\0" * 4, 14), "list of one tensor"),
        ((_json(parameters={"binary_data_size": 0})[0].replace(b'"data"', b'"unused"'), None), f"no {HEADER_LENGTH}"),
        (_json(parameters={"binary_data_size": 3}), "both data and a binary_data_size"),
        (_json(datatype="FP32"), "must be BYTES"),
        (_json(datatype="UINT8"), "must be BYTES"),
        (_json(name="input0"), "one input is 'image'"),
        (_json(shape=[1, 1]), "shape [n]"),
        (_json(shape=[0], data=[]), "shape [n]"),
        (_json(shape=[True]), "shape [n]"),
        (_json(shape="1"), "shape [n]"),
        (_json(shape=[2]), "list of 2 base64 strings"),
        (_json(data=["not base64!"]), "image[0] is not a base64 string"),
        (_json(data=[3]), "image[0] is not a base64 string"),
        (_json(data=["\u00e9"]), "image[0] is not a base64 string"),  # b64decode raises ValueError, was a 500
        (_json({"x": [[]] * 2000}), "holds 4009 JSON values or more, at most 1032"),  # see the next test
        (_json({"parameters": {"timeout": 10**400}}), "has 401 digits, more than an int64 has"),  # int() is slow
        (_json({"parameters": {"timeout": -(2**63) + 1, "priority": 2**63 - 1}}), "timeout must be an integer from 0"),
        (_json(data="aW1n"), "list of 1 base64 strings"),
        (_json({"id": 42}), "id must be a string"),
        # Held while the request waits: 10 MB of id (a 10 KB gzip body) held 47 MB each (found by review).
        (_json({"id": "a" * (MAX_ID_LENGTH + 1)}), f"257 characters, at most {MAX_ID_LENGTH}"),
        (_json({"parameters": {"shared_memory_region": "r"}}), "shared memory"),
        (_json({"outputs": [{"name": "output0"}]}), "one output is 'probabilities'"),
        (_json({"outputs": [{"name": "probabilities"}, {"name": "probabilities"}]}), "list of one tensor"),
        (_json({"outputs": [{"name": "probabilities", "parameters": {"classification": 0.5}}]}), "classification must"),
        (_json({"outputs": [{"name": "probabilities", "parameters": {"classification": 1001}}]}), "from 1 to 1000"),
        (_json({"outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]}), "true or false"),
    ],
)
def test_malformed_requests_are_refused_saying_why(request_body, text):
    with pytest.raises(ProtocolError) as refused:
        parse(*request_body)
    assert text in str(refused.value)


def test_a_body_of_countless_tiny_values_is_refused_before_it_is_parsed(monkeypatch):
    """json.loads holds the GIL: 10 MiB of "[]," (a 10 KB gzip body) held up the whole web process for 0.2-0.6 s."""
    parsed = []
    monkeypatch.setattr(open_inference.json, "loads", lambda text: parsed.append(text) or {})
    body = b'{"x": [' + b"[]," * 3_000_000 + b'[]], "inputs": []}'
    with pytest.raises(ProtocolError, match="JSON values or more"):
        parse(body, None)
    assert parsed == []
    # A request of MAX_IMAGES base64 strings and every option is well within the bound.
    images = [b"\x89PNG" * 100] * MAX_IMAGES
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False, class_count=5)]
    options = {"priority": 1, "timeout": 5, "parameters": {"tag": "x,y"}}
    body, header_length = triton_request(
        images, False, outputs, request_id="a," * (MAX_ID_LENGTH // 2), as_base64=True, **options
    )
    monkeypatch.undo()
    assert len(parse(body, header_length).images) == MAX_IMAGES


def _probabilities():
    rng = np.random.default_rng(7)
    rows = rng.random((2, len(LABELS)), dtype=np.float32) ** 8
    rows[0, 483] = rows[1, 162] = 5  # castle, beagle
    return rows / rows.sum(axis=1, keepdims=True)


def _parsed(body, headers):
    assert headers["Content-Type"] == ("application/octet-stream" if HEADER_LENGTH in headers else "application/json")
    header_length = headers.get(HEADER_LENGTH)
    if header_length is not None:
        assert json.loads(body[: int(header_length)])  # the header is exactly the JSON object
    return triton.InferenceServerClient.parse_response_body(
        body, header_length=None if header_length is None else int(header_length)
    )


@pytest.mark.parametrize("binary", [True, False])
def test_probabilities_reach_tritonclient_exactly(binary):
    probabilities = _probabilities()
    body, headers = open_inference.encode_response(
        "efficientnet_lite0", "req-1", RequestedOutput(binary, 0), probabilities, LABELS
    )
    assert (HEADER_LENGTH in headers) is binary
    result = _parsed(body, headers)
    assert result.get_response()["model_name"] == "efficientnet_lite0" and result.get_response()["id"] == "req-1"
    received = result.as_numpy("probabilities")
    assert received.dtype == np.float32 and received.shape == (2, 1000)
    np.testing.assert_array_equal(received, probabilities)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_is_best_first_as_score_index_label(binary):
    probabilities = _probabilities()
    body, headers = open_inference.encode_response(
        "efficientnet_lite0", "req-2", RequestedOutput(binary, 4), probabilities, LABELS
    )
    received = _parsed(body, headers).as_numpy("probabilities")
    assert received.shape == (2, 4)
    for row, elements in zip(probabilities, received, strict=True):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in elements]
        indices = [int(index) for _, index, _ in parsed]
        assert indices == list(np.argsort(-row)[:4])
        assert [label for *_, label in parsed] == [LABELS[i] for i in indices]
        # Each score is the float32 probability itself, not a rounding of it, in its shortest form.
        assert [np.float32(score) for score, *_ in parsed] == [row[i] for i in indices]
        assert [score for score, *_ in parsed] == [str(row[i]) for i in indices]
    assert [e.split(b":")[2] if isinstance(e, bytes) else e.split(":")[2] for e in received[:, 0]] == [
        b"castle" if binary else "castle",
        b"beagle" if binary else "beagle",
    ]


def test_model_metadata_names_the_tensors_with_a_variable_batch():
    metadata = open_inference.model_metadata("resnet50", 1000)
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]


def test_more_images_than_a_request_may_carry_is_413_before_any_is_read():
    body, _ = _json()
    huge = body.replace(b'"shape": [1]', b'"shape": [1000000]')
    assert huge != body
    with pytest.raises(ProtocolError) as refused:
        parse(huge, None)  # the data holds one element: the count is refused before the elements are read
    assert refused.value.status == 413 and "at most 32" in str(refused.value)


@pytest.mark.parametrize(
    "encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress), (" GZip ", gzip.compress)]
)
def test_a_compressed_body_is_read_as_sent_before_compression(encoding, compress):
    body, header_length = triton_request()
    inflated = open_inference.inflate(compress(body), encoding, 10 << 20)
    assert inflated == body and parse(inflated, header_length).images == IMAGES


def test_no_encoding_or_identity_is_the_body_itself():
    body, _ = triton_request()
    assert open_inference.inflate(body, None, 10) is body and open_inference.inflate(body, "identity", 10) is body


def test_an_encoding_we_do_not_speak_is_415():
    with pytest.raises(ProtocolError) as refused:
        open_inference.inflate(b"...", "br", 10 << 20)
    assert refused.value.status == 415 and "'br'" in str(refused.value) and "gzip" in str(refused.value)


def test_a_body_that_would_inflate_past_the_limit_is_413_without_inflating_it_all():
    bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KB
    inflated = []
    real = zlib.decompressobj

    class Counting:  # how much inflating was asked for
        def __init__(self, wbits):
            self._inflater = real(wbits)
            self.eof = False

        def decompress(self, data, max_length):
            out = self._inflater.decompress(data, max_length)
            inflated.append(len(out))
            self.eof = self._inflater.eof
            return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(open_inference.zlib, "decompressobj", Counting)
        with pytest.raises(ProtocolError) as refused:
            open_inference.inflate(bomb, "gzip", 1 << 20)
    assert refused.value.status == 413 and sum(inflated) == (1 << 20) + 1


@pytest.mark.parametrize(
    "data, text", [(b"not gzip at all", "not valid gzip"), (gzip.compress(b"x" * 1000)[:-12], "ends before")]
)
def test_a_body_that_is_not_what_its_encoding_says_is_400(data, text):
    with pytest.raises(ProtocolError) as refused:
        open_inference.inflate(data, "gzip", 10 << 20)
    assert refused.value.status == 400 and text in str(refused.value)


def test_every_gzip_member_is_read_and_the_limit_counts_them_all():
    # RFC 1952: a gzip body is a series of members, and what it holds is all of them in order.
    first, second = b'{"inputs": [', b"]}"
    assert open_inference.inflate(gzip.compress(first) + gzip.compress(second), "gzip", 10 << 20) == first + second
    halves = gzip.compress(bytes(600_000)) * 2
    with pytest.raises(ProtocolError) as refused:
        open_inference.inflate(halves, "gzip", 1_000_000)
    assert refused.value.status == 413
    with pytest.raises(ProtocolError) as refused:  # a loop turn for each is what the bound spares
        open_inference.inflate(gzip.compress(b"") * 65, "gzip", 10 << 20)
    assert refused.value.status == 400 and "more than 64 members" in str(refused.value)


@pytest.mark.parametrize("encoding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_bytes_after_the_compressed_data_are_400_not_dropped(encoding, compress):
    with pytest.raises(ProtocolError) as refused:
        open_inference.inflate(compress(b'{"inputs": []}') + b"trailing garbage", encoding, 10 << 20)
    assert refused.value.status == 400


def test_x_gzip_is_gzip():  # RFC 9110 8.4.1.3
    assert open_inference.inflate(gzip.compress(b"{}"), "x-gzip", 10 << 20) == b"{}"

"""The Open Inference Protocol's (KServe V2) REST infer call on the wire: request bodies in, response bodies out.

Pure functions over bytes, so that every malformed request can be tested without a server; v2.py serves them.
The model takes one input, `image`: a BYTES tensor of shape [n] whose elements are encoded image files, and
gives one output, `probabilities`: FP32 [n, classes]. Tensors travel either in the JSON object or, with the
binary tensor data extension, as raw bytes after it (Inference-Header-Content-Length gives the JSON's length
and each tensor's `binary_data_size` its share of the rest; a BYTES element is a 4-byte little-endian length
and then its bytes). JSON has no bytes type, so an image inside the JSON is a base64 string. The
classification extension turns an output into BYTES [n, k] of "score:index:label", best first. A request body
may come compressed (Content-Encoding gzip or deflate), as tritonclient sends it when asked
(`request_compression_algorithm`) and Triton accepts it; Inference-Header-Content-Length counts the inflated body.
"""

import base64
import json
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

INPUT = "image"
OUTPUT = "probabilities"
HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = re.compile(r"[0-9]{1,12}")
# Parameters that ask for memory shared with the client, which a server on another host cannot have.
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_ELEMENT_LENGTH = struct.Struct("<I")
# zlib's window bits for each Content-Encoding: gzip's header and trailer (x-gzip is its old name, RFC 9110
# 8.4.1.3), or HTTP's "deflate" (the zlib format).
_GZIP = 16 + zlib.MAX_WBITS
_ENCODINGS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": zlib.MAX_WBITS}
# A gzip body may be several members one after another (RFC 1952); clients send one. The bound keeps a body of
# thousands of empty members from costing a loop turn each.
_MAX_GZIP_MEMBERS = 64
# JSON values a request may hold beside one per image (its data's strings).
_JSON_VALUES = 1000
_INT64_MAX = 2**63 - 1  # the schedule policy's parameters are int64
# Characters a request's id may have: it is held while the request waits and echoed in the answer. Found by review:
# unbounded, a 10 KB gzip body's 10 MB id held 47 MB of the web process for the whole wait, outside any budget.
MAX_ID_LENGTH = 256


class ProtocolError(ValueError):
    """A request that breaks the protocol or asks for what this model does not have: `status` 400, or 413 for
    more images than a request may carry."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    binary: bool
    classification: int  # the k of a classification; 0 for the probabilities themselves


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    output: RequestedOutput
    timeout: float | None = None  # seconds the client gives it (the schedule policy's `timeout`); None: the server's


def model_metadata(name: str, classes: int) -> dict:
    """The model metadata object: -1 is the batch, whose size the client chooses."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": "keras",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


def inflate(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The request body as sent before its Content-Encoding (none, identity, gzip, x-gzip or deflate). Inflates at
    most `limit` + 1 bytes, all gzip members together, so a small body that would inflate to gigabytes is refused
    (413) having cost that much and no more; any other encoding is refused with 415, a body that is not what it
    says (corrupt, cut short, or followed by bytes that are not another gzip member) with 400."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _ENCODINGS:
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity", 415)
    parts, size, rest = [], 0, body
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(_ENCODINGS[encoding])
        try:
            part = inflater.decompress(rest, limit + 1 - size)  # size <= limit here, so never 0 (no limit)
        except zlib.error as exc:
            raise ProtocolError(f"the body is not valid {encoding}: {exc}") from None
        parts.append(part)
        size += len(part)
        if size > limit:
            raise ProtocolError(f"the body inflates to more than the {limit} bytes a request may carry", 413)
        if not inflater.eof:
            raise ProtocolError(f"the {encoding} body ends before its compressed data does")
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if _ENCODINGS[encoding] != _GZIP:
            raise ProtocolError(f"{len(rest)} bytes follow the end of the {encoding} data")
    raise ProtocolError(f"the gzip body has more than {_MAX_GZIP_MEMBERS} members")


def parse_request(body: bytes, header_length: str | None, classes: int, max_images: int) -> InferRequest:
    """Read an inference request body; raises ProtocolError saying what is wrong. More than `max_images`
    images are refused (413) before any element is read."""
    header, binary = _split_body(body, header_length)
    request = _json_object(header, _JSON_VALUES + max_images)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("the request's id must be a string")
    if request_id is not None and len(request_id) > MAX_ID_LENGTH:
        raise ProtocolError(f"the request's id has {len(request_id)} characters, at most {MAX_ID_LENGTH} accepted")
    parameters = _parameters(request, "the request")
    binary_by_default = _flag(parameters, "binary_data_output", "the request")
    timeout = _schedule_policy(parameters)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"inputs must be a list of one tensor, {INPUT!r}")
    images = _images(inputs[0], binary, header_length is not None, max_images)
    outputs = request.get("outputs")
    if outputs is None:
        return InferRequest(request_id, images, RequestedOutput(binary_by_default, 0), timeout)
    if not isinstance(outputs, list) or len(outputs) != 1 or not isinstance(outputs[0], dict):
        raise ProtocolError(f"outputs must be a list of one tensor, {OUTPUT!r}, or left out")
    return InferRequest(request_id, images, _requested_output(outputs[0], binary_by_default, classes), timeout)


def _split_body(body, header_length):
    if header_length is None:
        return body, b""
    # Not str.isdigit(), which takes digits int() refuses ("²") and numbers of any length.
    if not _LENGTH.fullmatch(header_length) or not 0 < int(header_length) <= len(body):
        raise ProtocolError(
            f"{HEADER_LENGTH} must be the length of the JSON object at the start of the body, "
            f"from 1 to {len(body)}, got {header_length!r}"
        )
    return body[: int(header_length)], body[int(header_length) :]


def _json_object(text, most):
    not_json = "the inference request is not JSON (binary tensors need " + HEADER_LENGTH + ")"
    # json.loads holds the GIL, so the whole web process, for as long as it parses: 10 MiB of "[]," (a 10 KB gzip
    # body) took 0.2-0.6 s and ~300 MB, and requests of others missed their deadlines. A request has a few dozen
    # values and one string per image; counting the characters that start or separate values is ~1 ms a MiB.
    values = sum(text.count(char) for char in (b"[", b"{", b","))
    if values > most:
        try:
            text.decode()
        except UnicodeDecodeError:  # binary tensors sent without the header: say so, as json.loads would have
            raise ProtocolError(not_json) from None
        raise ProtocolError(f"the inference request holds {values} JSON values or more, at most {most}")
    try:
        request = json.loads(text, parse_int=_json_int)
    except ProtocolError:
        raise
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ProtocolError(not_json) from None
    if not isinstance(request, dict):
        raise ProtocolError("the inference request must be a JSON object")
    return request


def _json_int(digits):
    # int() of a long run of digits is slow (a thousand of 4299 digits: 80 ms holding the GIL), and no number a request
    # holds is past int64.
    if len(digits) > len(str(-_INT64_MAX)):
        raise ProtocolError(f"a number in the inference request has {len(digits)} digits, more than an int64 has")
    return int(digits)


def _parameters(holder, what):
    parameters = holder.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(f"the parameters of {what} must be an object")
    if any(name in parameters for name in _SHARED_MEMORY):
        raise ProtocolError("shared memory is not supported: send tensors in the body")
    return parameters


def _schedule_policy(parameters):
    """The request's timeout in seconds (None: the server's own) from Triton's schedule policy extension: `timeout`
    in microseconds, 0 meaning none. `priority` is checked and has no effect: there is one priority level, as in a
    Triton model whose dynamic batcher has no `priority_levels`."""
    for name in ("priority", "timeout"):
        value = parameters.get(name, 0)
        if type(value) is not int or not 0 <= value <= _INT64_MAX:
            raise ProtocolError(f"{name} must be an integer from 0 to {_INT64_MAX}, got {str(value)[:40]}")
    return parameters.get("timeout", 0) / 1e6 or None


def _flag(parameters, name, what):
    value = parameters.get(name, False)
    if type(value) is not bool:
        raise ProtocolError(f"{name} of {what} must be true or false")
    return value


def _images(tensor, binary, has_binary_part, max_images):
    if tensor.get("name") != INPUT:
        raise ProtocolError(f"the model's one input is {INPUT!r}, not {tensor.get('name')!r}")
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(f"{INPUT} must be BYTES (encoded image files), not {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 1:
        raise ProtocolError(f"{INPUT} must have shape [n], n >= 1 images, not {shape!r}")
    count = shape[0]
    if count > max_images:
        raise ProtocolError(f"{count} images sent, at most {max_images} per request", 413)
    size = _parameters(tensor, INPUT).get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(f"{len(binary)} bytes follow the JSON object, but no tensor has a binary_data_size")
        return _json_images(tensor.get("data"), count)
    if "data" in tensor:
        raise ProtocolError(f"{INPUT} has both data and a binary_data_size: send one")
    if not has_binary_part:
        raise ProtocolError(f"{INPUT} has a binary_data_size, but there is no {HEADER_LENGTH} header")
    if type(size) is not int or size != len(binary):
        raise ProtocolError(f"{INPUT}'s binary_data_size is {size!r}, but {len(binary)} bytes follow the JSON object")
    return _binary_images(binary, count)


def _json_images(data, count):
    if not isinstance(data, list) or len(data) != count:
        raise ProtocolError(f"{INPUT}'s data must be a list of {count} base64 strings, one per image")
    images = []
    for i, element in enumerate(data):
        try:
            images.append(base64.b64decode(element, validate=True))
        except (TypeError, ValueError):  # binascii.Error is a ValueError; so is a str with non-ASCII characters
            raise ProtocolError(f"{INPUT}[{i}] is not a base64 string (JSON carries images as base64)") from None
    return images


def _binary_images(raw, count):
    images, offset = [], 0
    for i in range(count):
        if offset + _ELEMENT_LENGTH.size > len(raw):
            raise ProtocolError(f"{INPUT} declares {count} elements, but its binary data ends after {i}")
        (length,) = _ELEMENT_LENGTH.unpack_from(raw, offset)
        offset += _ELEMENT_LENGTH.size
        if offset + length > len(raw):
            raise ProtocolError(f"{INPUT}[{i}] declares {length} bytes, but only {len(raw) - offset} are left")
        images.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ProtocolError(f"{INPUT}'s {count} elements end {len(raw) - offset} bytes before its binary data does")
    return images


def _requested_output(tensor, binary_by_default, classes):
    if tensor.get("name") != OUTPUT:
        raise ProtocolError(f"the model's one output is {OUTPUT!r}, not {tensor.get('name')!r}")
    parameters = _parameters(tensor, OUTPUT)
    binary = _flag(parameters, "binary_data", OUTPUT) if "binary_data" in parameters else binary_by_default
    k = parameters.get("classification", 0)
    if type(k) is not int or not 0 <= k <= classes:
        raise ProtocolError(f"classification must be an integer from 1 to {classes}, got {k!r}")
    return RequestedOutput(binary, k)


def encode_response(
    model: str, request_id: str, output: RequestedOutput, probabilities: np.ndarray, labels: list[str]
) -> tuple[bytes, dict]:
    """The response body and its headers for a batch's probabilities ([n, classes]), shaped as `output` asked."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if output.classification:
        tensor, values = _classification(probabilities, output.classification, labels)
    else:
        tensor, values = {"datatype": "FP32", "shape": list(probabilities.shape)}, probabilities
    tensor = {"name": OUTPUT, **tensor}
    if output.binary:
        raw = _binary(tensor["datatype"], values)
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = np.ravel(values).tolist()
    header = json.dumps({"model_name": model, "id": request_id, "outputs": [tensor]}).encode()
    if not output.binary:
        return header, {"Content-Type": "application/json"}
    return header + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _classification(probabilities, k, labels):
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    # str() of a float32 is its shortest exact form: the score parses back to the very probability.
    values = [[f"{row[i]!s}:{i}:{labels[i]}" for i in top] for row, top in zip(probabilities, best, strict=True)]
    return {"datatype": "BYTES", "shape": [len(probabilities), k]}, np.array(values, dtype=object)


def _binary(datatype, values):
    if datatype == "BYTES":
        return b"".join(_ELEMENT_LENGTH.pack(len(e)) + e for e in (s.encode() for s in np.ravel(values)))
    return np.ascontiguousarray(values, dtype="<f4").tobytes()

"""Inference runtimes for the worker's Keras models: TensorFlow as is, or the same model converted to OpenVINO.

Each runtime is a Predictor: it takes a preprocessed float32 NHWC batch and returns float32 probabilities of shape
(n, classes), whole or a slice at a time.
"""

import collections
import contextlib
import functools
import hashlib
import importlib
import tempfile
from pathlib import Path

import numpy as np

import model_cache
from logger import log

RUNTIMES = ("openvino", "tensorflow")
PRECISIONS = ("f32", "bf16")
# f32 differs from TensorFlow by ~1e-6 (summation order only). bf16 keeps 8 bits of mantissa: it moved probabilities
# by 0.018 on the fixed input and by up to 0.031 on 20 photos (measure_precision.py); 0.05 still refuses a 5% error
# in one layer's weights (0.07) or scrambled classes (0.16), though not a 1% error (0.015), which is as big as bf16's
# own rounding.
TOLERANCES = {"f32": 1e-4, "bf16": 0.05}
# One request with every core (LATENCY, one stream) runs each call; THROUGHPUT's streams get a core each, and
# ResNet50's batch 1 took 63 against 32 ms on one. With `side_by_side`, a batch of several slices runs them on
# THROUGHPUT's streams instead, a slice each (two here): in the service EfficientNet-Lite0's worker then cost a
# steady 9.8-10.0 ms of CPU a request where one stream of two threads cost 10.1-13.1, with the machine's speed of the
# moment.
# ResNet50 served 4 % less that way: each stream reads all of its 100 MB of weights for its own slice. The
# measurements: README, "In slices". The second compiled model costs Lite0 about 100 MB. Its streams' threads are
# not pinned to a core: pinned, they kept the web process waiting for a core under overload (Lite0 at 220 requests/s,
# four interleaved pairs: refusals p95 86-119 ms pinned against 33-52 ms, the same throughput).
OPENVINO_LATENCY = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
OPENVINO_THROUGHPUT = {"PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False}
# Images per runtime call, unless INFERENCE_BATCH_SIZE says (0: the whole batch). TensorFlow gains from whole
# batches. On OpenVINO one stream ran EfficientNet-Lite0 beside the web process best in slices of 4, though alone it
# ran faster at batch 32; two streams, in slices of 2. README, "In slices".
OPENVINO_SLICE, OPENVINO_STREAMS_SLICE = 4, 2
_SELF_CHECK_SEED = 20240607


class UnsupportedPrecision(RuntimeError):
    pass


def available():
    """The runtimes whose packages import here."""
    found = []
    for name in RUNTIMES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append(name)
    return found


@functools.cache
def _core():
    import openvino

    return openvino.Core()


def bf16_supported():
    """Whether OpenVINO's CPU plugin can run bf16 here (AVX512-BF16 or AMX); False without openvino."""
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except ImportError:
        return False


class Predictor:
    """A runtime's predict: `predict(batch)` runs a preprocessed float32 NHWC batch in one call and returns float32
    probabilities of shape (n, classes); `predict.in_slices(batch, step)` runs it `step` images a call (0: whole).
    `slice` is the step the runtime runs best at, `streams` how many slices it runs at once."""

    slice, streams = 0, 1

    def __init__(self, run):
        self._run = run

    def __call__(self, batch):
        return self._run(batch)

    def in_slices(self, batch, step):
        if not step or len(batch) <= step:
            return self(batch)
        return np.concatenate([self(batch[i : i + step]) for i in range(0, len(batch), step)])


class _OpenVINOPredictor(Predictor):
    """Each call on the LATENCY model; with a THROUGHPUT model, several slices side by side on its streams."""

    def __init__(self, latency, throughput=None):
        super().__init__(self._infer)
        self.compiled_model, self.throughput_model = latency, throughput
        self._request = latency.create_infer_request()
        self._streams = []
        if throughput is not None:
            requests = throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            self._streams = [throughput.create_infer_request() for _ in range(requests)]
        self.streams = max(1, len(self._streams))
        self.slice = OPENVINO_STREAMS_SLICE if self.streams > 1 else OPENVINO_SLICE

    def _infer(self, batch):
        self._request.infer([np.ascontiguousarray(batch, dtype=np.float32)])
        # The output tensor's memory is reused by the next call.
        return self._request.get_output_tensor(0).data.copy()

    def in_slices(self, batch, step):
        if not step or len(batch) <= step or self.streams < 2:
            return super().in_slices(batch, step)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        starts = range(0, len(batch), step)
        answers, running, idle = [None] * len(starts), collections.deque(), list(self._streams)
        try:
            for index, start in enumerate(starts):
                if not idle:  # the oldest is the first to finish: the slices are the same size but the last
                    idle.append(self._collect(running.popleft(), answers))
                request = idle.pop()
                request.start_async([batch[start : start + step]])  # copies the slice into the request's tensor
                running.append((index, request))
            while running:
                self._collect(running.popleft(), answers)
        finally:
            for _, request in running:  # after a failure: a request still running would refuse the next batch
                with contextlib.suppress(RuntimeError):
                    request.wait()
        return np.concatenate(answers)

    @staticmethod
    def _collect(started, answers):
        index, request = started
        request.wait()
        answers[index] = request.get_output_tensor(0).data.copy()
        return request


def compile_model(keras_model, runtime, precision="f32", cache_dir=None, side_by_side=False):
    """A Predictor for `keras_model` on `runtime` ("openvino" or "tensorflow") at `precision`; on OpenVINO with
    `side_by_side`, one that runs a batch's slices side by side (OPENVINO_THROUGHPUT).

    With `cache_dir`, the OpenVINO IR is kept there as <model>-<key>.xml/.bin, the key hashing the architecture,
    the weights and the library versions, so a restart skips the conversion.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if runtime == "tensorflow":
        if precision != "f32":
            raise UnsupportedPrecision(f"the tensorflow runtime runs f32 only, not {precision}")
        return Predictor(lambda batch: np.asarray(keras_model.predict_on_batch(batch), dtype=np.float32))
    if runtime != "openvino":
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if precision == "bf16" and not bf16_supported():
        raise UnsupportedPrecision(
            "bf16 was asked for but OpenVINO's CPU plugin does not list BF16 among its OPTIMIZATION_CAPABILITIES "
            "on this processor (it needs AVX512-BF16 or AMX); use precision f32"
        )
    # Always set the precision: OpenVINO's own default is bf16 wherever the CPU has it, f32 elsewhere.
    precision_hint = {"INFERENCE_PRECISION_HINT": precision}

    def build(model):
        latency = _core().compile_model(model, "CPU", {**OPENVINO_LATENCY, **precision_hint})
        return _OpenVINOPredictor(latency, _throughput_model(model, precision_hint) if side_by_side else None)

    return _compile(keras_model, build) if cache_dir is None else _compile_cached(keras_model, build, cache_dir)


def _throughput_model(model, config):
    """The model compiled for THROUGHPUT, or None where it would run one stream (a single core) or fails to compile:
    the LATENCY model serves alone then, one slice after the other, rather than OpenVINO not at all."""
    try:
        compiled = _core().compile_model(model, "CPU", {**OPENVINO_THROUGHPUT, **config})
    except RuntimeError as exc:
        # OpenVINO's message opens with lines of source locations; the cause (a property it refuses, say) is last.
        log("openvino_streams_unavailable", level="WARNING", error=str(exc).strip().splitlines()[-1][:300])
        return None
    return compiled if compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") >= 2 else None


def _compile(keras_model, build, xml=None):
    """`build` (a function of the OpenVINO model) of the IR `xml`, or of one converted into a directory of its own
    for the while."""
    if xml is not None:
        return build(_core().read_model(xml))
    with tempfile.TemporaryDirectory(prefix="openvino-ir-") as scratch:
        return _compile(keras_model, build, convert(keras_model, scratch))


def _compile_cached(keras_model, build, cache_dir):
    """As `_compile`, through the IR cache in `cache_dir`, which only saves the conversion's time: one that cannot
    be written (read-only, full) is done without, and a cached IR OpenVINO cannot read (cut short by a full disk or
    a kill) is converted again. Each stopped the worker at every start."""
    xml = _cached_ir(keras_model, cache_dir)
    if xml is not None:
        try:
            return _compile(keras_model, build, xml)
        except RuntimeError as exc:  # OpenVINO's error for a bad IR ("Incorrect weights in bin file!")
            log("model_cache_unreadable", level="WARNING", path=str(xml), error=str(exc)[:200])
            xml = _cached_ir(keras_model, cache_dir, stale=xml)
    return _compile(keras_model, build, xml)


def _cached_ir(keras_model, cache_dir, stale=None):
    """The IR's .xml in `cache_dir` (converted there unless it is there, after removing a `stale` one), or None,
    logged, when the cache cannot be written."""
    try:
        if stale is not None:
            _remove_ir(stale)
        return convert(keras_model, cache_dir)
    except (OSError, RuntimeError) as exc:  # OpenVINO's writer says RuntimeError of a full disk ("iostream error")
        log("model_cache_not_written", level="WARNING", path=str(cache_dir), error=str(exc))
        return None


def forget(keras_model, cache_dir):
    """Remove the model's cached IR from `cache_dir`, its answers having failed the self-check; False when there
    was none, or it cannot be removed (a read-only cache)."""
    xml = _ir_path(keras_model, cache_dir)
    if not xml.is_file():
        return False
    try:
        _remove_ir(xml)
    except OSError as exc:
        log("model_cache_not_written", level="WARNING", path=str(xml), error=str(exc))
        return False
    log("model_cache_refused", level="WARNING", path=str(xml), reason="its answers failed the self-check")
    return True


def _remove_ir(xml):
    for path in (xml, xml.with_suffix(".bin")):  # the .xml first: no reader finds it naming a missing .bin
        path.unlink(missing_ok=True)


def _ir_path(keras_model, cache_dir):
    """Where the model's IR is cached: <model>-<key>.xml, its weights in the .bin beside it."""
    return Path(cache_dir) / f"{cache_key(keras_model)}.xml"


def cache_key(keras_model):
    """Changes whenever the architecture, the weights or a library that shapes the IR does."""
    digest = hashlib.sha256(keras_model.to_json().encode())
    for package in ("keras", "tensorflow", "openvino"):
        digest.update(f"{package}={importlib.import_module(package).__version__}".encode())
    for weight in keras_model.get_weights():
        digest.update(str(weight.shape).encode() + str(weight.dtype).encode())
        digest.update(np.ascontiguousarray(weight).tobytes())
    return f"{keras_model.name}-{digest.hexdigest()[:16]}"


def convert(keras_model, cache_dir):
    """Path of the model's OpenVINO IR (.xml beside its .bin) in `cache_dir`, converted from its TensorFlow graph
    unless already there.

    Keras's OpenVINO exporter is used with the TensorFlow backend: it hands a traced tf.function to OpenVINO's
    TensorFlow frontend, which folds batch normalisation into the convolutions. (Building the IR with the Keras
    OpenVINO backend instead gave a graph 1.6-2.6x slower, with a transpose around every convolution: REPORT.md.)
    The exporter writes the weights as they are; ov.save_model would halve them to fp16 by default.
    """
    cache_dir = Path(cache_dir)
    xml = _ir_path(keras_model, cache_dir)
    if xml.is_file():
        return xml
    with model_cache.writing_aside(cache_dir) as scratch:
        keras_model.export(str(scratch / "model.xml"), format="openvino", verbose=False)
        model_cache.publish(scratch / "model.bin", xml.with_suffix(".bin"))  # before the .xml that names it
        model_cache.publish(scratch / "model.xml", xml)
    return xml


def self_check_input(preprocess=None, batch=2, size=224):
    """A fixed, seeded batch of uint8 noise images, preprocessed for the model."""
    pixels = np.random.default_rng(_SELF_CHECK_SEED).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    pixels = pixels.astype(np.float32)
    return preprocess(pixels) if preprocess else pixels


def self_check(reference, candidate, atol, preprocess=None):
    """Max abs difference of two Predictors' probabilities on the fixed input, the candidate's run whole and a
    slice at a time (OpenVINO's two compiled models); RuntimeError when above `atol`.

    (Within `atol` everywhere, the top-1 class can only change where the reference's two best are within 2*atol:
    the probability bound is the whole check.)
    """
    batch = self_check_input(preprocess)
    expected = np.asarray(reference(batch), dtype=np.float64)
    difference = 0.0
    for got in (candidate(batch), candidate.in_slices(batch, 1)):
        got = np.asarray(got, dtype=np.float64)
        if got.shape != expected.shape:
            raise RuntimeError(f"runtime self-check failed: output shape {got.shape}, expected {expected.shape}")
        if not np.all(np.isfinite(got)):
            raise RuntimeError("runtime self-check failed: the candidate returned NaN or infinite probabilities")
        difference = max(difference, float(np.max(np.abs(got - expected))))
    if not difference <= atol:
        raise RuntimeError(
            f"runtime self-check failed: probabilities differ from the reference by up to {difference:.3g} "
            f"(tolerance {atol:g}) on the fixed input; do not serve with this runtime"
        )
    return difference

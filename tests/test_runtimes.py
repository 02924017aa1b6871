"""The runtimes: OpenVINO gives Keras-on-TensorFlow's answers, the self-check and the precision guard refuse,
and MODEL/RUNTIME/PRECISION pick what the worker serves."""

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
import model_cache
import models
import runtimes
from settings import Settings
from support import CASTLE, JEMMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def efficientnet(model_cache_dir):
    """EfficientNet-Lite0 with its real weights, on Keras-on-TensorFlow."""
    return models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir, runtime="tensorflow"))


@pytest.fixture(scope="module")
def ir_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-ir")


@pytest.fixture(scope="module")
def photos():
    return np.stack([helpers.prepare_image(path.read_bytes(), 40_000_000) for path in (CASTLE, JEMMA)])


def reference(classifier):
    return runtimes.compile_model(classifier.model, "tensorflow", "f32")


def test_openvino_f32_gives_tensorflows_top5_and_probabilities(efficientnet, ir_cache, photos):
    openvino = runtimes.compile_model(efficientnet.model, "openvino", "f32", cache_dir=ir_cache)
    assert hasattr(openvino, "compiled_model")  # really OpenVINO, not a fall-back to Keras
    batch = efficientnet._preprocess(photos.astype(np.float32))
    expected, got = reference(efficientnet)(batch), openvino(batch)
    assert got.dtype == np.float32 and got.shape == (2, 1000)
    assert [efficientnet.labels[i] for i in np.argmax(got, axis=1)] == ["castle", "beagle"]
    for row in range(2):
        assert list(np.argsort(got[row])[::-1][:5]) == list(np.argsort(expected[row])[::-1][:5])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    # One image at a time (a batch size this compiled model has not seen) gives the same answer.
    np.testing.assert_allclose(openvino(batch[1:]), expected[1:], rtol=0, atol=1e-4)


def test_self_check_passes_openvino_at_the_default_tolerances(efficientnet, ir_cache):
    precisions = ["f32", "bf16"] if runtimes.bf16_supported() else ["f32"]
    for precision in precisions:
        openvino = runtimes.compile_model(efficientnet.model, "openvino", precision, cache_dir=ir_cache)
        difference = runtimes.self_check(
            reference(efficientnet), openvino, runtimes.TOLERANCES[precision], efficientnet._preprocess
        )
        assert 0 <= difference <= runtimes.TOLERANCES[precision]


def test_self_check_refuses_a_runtime_whose_probabilities_moved(efficientnet):
    expected = reference(efficientnet)

    def nudged(batch):
        probabilities = expected(batch).copy()
        probabilities[:, 0] += 2e-4  # just over the f32 tolerance, on one class only
        return probabilities

    with pytest.raises(RuntimeError, match="self-check failed.*differ"):
        runtimes.self_check(expected, runtimes.Predictor(nudged), runtimes.TOLERANCES["f32"], efficientnet._preprocess)
    with pytest.raises(RuntimeError, match="self-check failed.*NaN"):
        nan = runtimes.Predictor(lambda batch: expected(batch) * np.nan)
        runtimes.self_check(expected, nan, 1.0, efficientnet._preprocess)


def test_self_check_refuses_a_runtime_wrong_only_when_it_runs_slices(efficientnet):
    """OpenVINO runs one slice on one compiled model and several on another: both answer the self-check."""
    expected = reference(efficientnet)

    class WrongInSlices(runtimes.Predictor):
        def in_slices(self, batch, step):
            return super().in_slices(batch, step)[:, ::-1].copy()

    with pytest.raises(RuntimeError, match="self-check failed.*differ"):
        runtimes.self_check(expected, WrongInSlices(expected), runtimes.TOLERANCES["f32"], efficientnet._preprocess)


def test_self_check_refuses_an_openvino_model_with_altered_weights(efficientnet, ir_cache):
    import keras

    altered = keras.models.clone_model(efficientnet.model)
    altered.set_weights(efficientnet.model.get_weights())
    stem = altered.get_layer("stem_conv")
    stem.set_weights([stem.get_weights()[0] * 1.01])  # a 1% error in one layer
    candidate = runtimes.compile_model(altered, "openvino", "f32", cache_dir=ir_cache)
    assert len(list(Path(ir_cache).glob("*.xml"))) == 2  # its own cache entry, not the unaltered model's IR
    with pytest.raises(RuntimeError, match="self-check failed"):
        runtimes.self_check(reference(efficientnet), candidate, runtimes.TOLERANCES["f32"], efficientnet._preprocess)


def test_bf16_is_refused_where_the_cpu_lacks_it(efficientnet, monkeypatch, tmp_path):
    monkeypatch.setattr(runtimes, "bf16_supported", lambda: False)
    with pytest.raises(runtimes.UnsupportedPrecision, match="bf16.*BF16.*use precision f32"):
        runtimes.compile_model(efficientnet.model, "openvino", "bf16", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any conversion work


def test_without_openvino_only_tensorflow_is_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    runtimes._core.cache_clear()
    try:
        assert runtimes.available() == ["tensorflow"]
        assert runtimes.bf16_supported() is False
    finally:
        runtimes._core.cache_clear()


def test_unknown_runtime_and_precision_are_refused(efficientnet):
    with pytest.raises(ValueError, match="unknown runtime"):
        runtimes.compile_model(efficientnet.model, "onnxruntime", "f32")
    with pytest.raises(ValueError, match="unknown precision"):
        runtimes.compile_model(efficientnet.model, "openvino", "fp16")
    with pytest.raises(runtimes.UnsupportedPrecision, match="tensorflow runtime runs f32 only"):
        runtimes.compile_model(efficientnet.model, "tensorflow", "bf16")


class _Recorded:
    """An OpenVINO infer request that notes the slices it is started on, and how many requests were running then."""

    def __init__(self, request, started, running):
        self._request, self.started, self.running = request, started, running

    def start_async(self, inputs):
        self.running.append(self)
        self.started.append((len(inputs[0]), len(self.running)))
        self._request.start_async(inputs)

    def wait(self):
        self._request.wait()
        self.running.remove(self)

    def get_output_tensor(self, index):
        return self._request.get_output_tensor(index)


def test_the_served_lite0_runs_the_slices_of_a_batch_side_by_side_with_the_answers_of_the_whole_batch(
    model_cache_dir, photos
):
    served = models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir))
    keras = models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir, runtime="tensorflow"))
    assert (served.runtime, served.slice, keras.slice) == ("openvino", 2, 0)
    predictor = served._run
    # One slice runs on one stream with every core; several run on the throughput model's streams, a core each.
    assert predictor.compiled_model.get_property("NUM_STREAMS") == 1
    streams = predictor.throughput_model.get_property("NUM_STREAMS")
    assert len(predictor._streams) == streams >= min(os.cpu_count(), 2)
    assert predictor.throughput_model.get_property("ENABLE_CPU_PINNING") is False  # the web process needs a core too
    served.warm_up(32)  # every stream has run a slice before the first job: its first call of a shape costs double
    assert [request.get_input_tensor().shape[0] for request in predictor._streams] == [served.slice] * streams
    started, running = [], []
    predictor._streams = [_Recorded(request, started, running) for request in predictor._streams]
    noise = np.random.default_rng(7).integers(0, 256, (3, *photos.shape[1:]), dtype=np.uint8)
    batch = np.concatenate([photos, noise])  # 5 images: slices of 2, 2 and 1

    got, expected = served.predict(batch), keras.predict(batch)

    assert [size for size, _ in started] == [2, 2, 1] and not running
    assert max(at_once for _, at_once in started) == min(streams, 3)  # side by side, not one after the other
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # each row is its own image's, in order
    started.clear()
    np.testing.assert_allclose(served.predict(batch[:2]), expected[:2], rtol=0, atol=1e-4)
    assert started == []  # one slice: the latency model's request
    custom = models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir, inference_batch_size=3))
    np.testing.assert_allclose(custom.predict(batch), expected, rtol=0, atol=1e-4)
    assert custom.slice == 3
    keras.use_runtime("openvino", "f32", model_cache_dir)  # as bench.py and measure_precision.py switch runtimes
    assert keras.slice == 2


def test_a_model_without_streams_runs_its_slices_one_after_the_other_on_every_core(efficientnet, ir_cache, photos):
    """ResNet50's way (Classifier.side_by_side False): each stream would read all its weights for its own slice."""
    predictor = runtimes.compile_model(efficientnet.model, "openvino", "f32", cache_dir=ir_cache)
    assert predictor.throughput_model is None and predictor._streams == [] and predictor.slice == 4
    batch = efficientnet.preprocess(np.concatenate([photos] * 3))
    np.testing.assert_allclose(predictor.in_slices(batch, 4), predictor(batch), rtol=0, atol=1e-5)


class _CoreWhoseThroughputModel:
    """OpenVINO's Core, but a THROUGHPUT compile fails, or runs one stream as on a one-core host."""

    def __init__(self, core, fails):
        self._core, self._fails = core, fails

    def compile_model(self, model, device, config):
        if config.get("PERFORMANCE_HINT") != "THROUGHPUT":
            return self._core.compile_model(model, device, config)
        if self._fails:
            raise RuntimeError(  # as OpenVINO words it: source locations first, the cause last
                "Exception from src/inference/src/cpp/core.cpp:117:\n"
                "Exception from src/inference/src/dev/plugin.cpp:54:\n"
                "Exception from src/plugins/intel_cpu/src/config.cpp:505:\n"
                "NotFound: Unsupported property ENABLE_CPU_PINNING by CPU plugin. (injected)\n\n\n"
            )
        return self._core.compile_model(model, device, {**config, "NUM_STREAMS": "1"})

    def __getattr__(self, name):
        return getattr(self._core, name)


@pytest.mark.parametrize("fails", [True, False], ids=["throughput-fails", "one-stream"])
def test_without_two_streams_openvino_still_serves_one_slice_after_the_other(
    efficientnet, photos, tmp_path, monkeypatch, capfd, fails
):
    """A THROUGHPUT model that fails to compile was taken for a damaged IR: the cache converted again, then
    TensorFlow served (RUNTIME=auto) or nothing (RUNTIME=openvino), at every start."""
    batch = efficientnet.preprocess(np.concatenate([photos] * 3))
    expected = runtimes.compile_model(efficientnet.model, "openvino", "f32", cache_dir=tmp_path)(batch)
    [ir] = tmp_path.glob("*.bin")
    written = ir.stat().st_mtime_ns
    core = _CoreWhoseThroughputModel(runtimes._core(), fails)
    monkeypatch.setattr(runtimes, "_core", lambda: core)
    capfd.readouterr()

    predictor = runtimes.compile_model(efficientnet.model, "openvino", "f32", cache_dir=tmp_path, side_by_side=True)

    assert (predictor.streams, predictor.slice, predictor.throughput_model) == (1, 4, None)
    np.testing.assert_allclose(predictor.in_slices(batch, predictor.slice), expected, rtol=0, atol=1e-5)
    assert ir.stat().st_mtime_ns == written  # the cached IR was not taken for a damaged one
    err = capfd.readouterr().err
    assert "model_cache_unreadable" not in err and ("openvino_streams_unavailable" in err) == fails
    assert ("Unsupported property ENABLE_CPU_PINNING" in err) == fails  # the cause, where the log cut it off


def test_a_slice_that_fails_leaves_no_stream_busy_for_the_next_batch(efficientnet, ir_cache):
    predictor = runtimes.compile_model(efficientnet.model, "openvino", "f32", cache_dir=ir_cache, side_by_side=True)
    good = efficientnet.preprocess(np.zeros((4, 224, 224, 3), np.uint8))
    expected = predictor.in_slices(good, 1)
    requests, calls = predictor._streams, []

    class FailingThird:
        def __init__(self, request):
            self._request = request

        def start_async(self, inputs):
            calls.append(len(calls))
            if len(calls) == 2:  # while the first still runs
                raise RuntimeError("injected")
            self._request.start_async(inputs)

        def __getattr__(self, name):
            return getattr(self._request, name)

    predictor._streams = [FailingThird(request) for request in requests]
    with pytest.raises(RuntimeError, match="injected"):
        predictor.in_slices(good, 1)
    predictor._streams = requests
    np.testing.assert_allclose(predictor.in_slices(good, 1), expected, rtol=0, atol=1e-6)


def test_the_worker_serves_openvino_by_default_and_tensorflow_when_asked(model_cache_dir, photos, capfd):
    served = models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir))
    # The start-up log says how many slices run at once: losing the streams shows there.
    logged = re.search(r"runtime_selected runtime=openvino .*streams=(\d+)", capfd.readouterr().err)
    assert logged and int(logged[1]) == served._run.streams >= min(os.cpu_count(), 2)
    keras = models.load(Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir, runtime="tensorflow"))
    assert (served.runtime, served.precision) == ("openvino", "f32") and keras.runtime == "tensorflow"
    for got, expected in zip(served.predict(photos), keras.predict(photos), strict=True):
        assert [p["label"] for p in served.top_k(got, 5)] == [p["label"] for p in keras.top_k(expected, 5)]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_runtime_that_fails_its_self_check_is_refused_or_replaced(model_cache_dir, monkeypatch):
    broken = runtimes.Predictor(lambda batch: np.full((len(batch), 1000), 1e-3, dtype=np.float32))

    real_compile = runtimes.compile_model
    monkeypatch.setattr(
        runtimes,
        "compile_model",
        lambda model, runtime, *a, **k: broken if runtime == "openvino" else real_compile(model, runtime),
    )
    lite0 = Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir)
    with pytest.raises(models.ModelUnavailable, match="RUNTIME=openvino cannot serve.*self-check failed"):
        models.load(lite0.replace(runtime="openvino"))
    assert models.load(lite0).runtime == "tensorflow"  # auto falls back, and says so in the log


def test_a_cached_ir_damaged_in_place_is_converted_again_when_its_answers_fail_the_self_check(tmp_path, photos, capfd):
    """Its size intact, OpenVINO reads it and answers wrong: RUNTIME=auto served TensorFlow at every start, and
    RUNTIME=openvino did not start, until someone emptied the cache."""
    lite0 = Settings(model="efficientnet_lite0", model_cache_dir=str(tmp_path), runtime="openvino")
    expected = models.load(lite0.replace(runtime="tensorflow")).predict(photos)
    models.load(lite0)  # converts the IR into the cache
    [binary] = (tmp_path / "openvino").glob("*.bin")
    damaged = bytearray(binary.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 4_000_000] = bytes(4_000_000)  # 4 MB of weights zeroed, the size unchanged
    binary.write_bytes(damaged)
    capfd.readouterr()

    served = models.load(lite0)

    assert served.runtime == "openvino" and "model_cache_refused" in capfd.readouterr().err
    np.testing.assert_allclose(served.predict(photos), expected, rtol=0, atol=1e-4)
    assert binary.read_bytes() != damaged


def test_a_recheck_whose_f32_copy_fails_its_self_check_is_refused_saying_so(model_cache_dir, monkeypatch):
    real_compile = runtimes.compile_model

    def compile_model(model, runtime, precision="f32", *args, **kwargs):
        if runtime == "openvino" and precision == "f32":  # the recheck's copy answers nonsense
            return runtimes.Predictor(lambda batch: np.full((len(batch), 1000), 1e-3, dtype=np.float32))
        return real_compile(model, "tensorflow")  # bf16 and the reference: TensorFlow's answers

    monkeypatch.setattr(runtimes, "compile_model", compile_model)
    lite0 = Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir, precision="bf16", recheck_margin=0.02)
    for runtime in ("openvino", "auto"):
        with pytest.raises(models.ModelUnavailable, match="the f32 copy RECHECK_MARGIN needs: runtime self-check"):
            models.load(lite0.replace(runtime=runtime))
    assert models.load(lite0.replace(recheck_margin=0.0)).precision == "bf16"  # bf16 alone passes


@pytest.mark.skipif(not runtimes.bf16_supported(), reason="this CPU runs no bf16")
def test_bf16_with_a_recheck_margin_answers_near_ties_in_f32_and_keeps_tensorflows_top1(model_cache_dir):
    import measure_precision

    pixels = measure_precision.prepared(measure_precision.photos())  # the castle, jemma, scikit-image's photos
    batch = np.stack(list(pixels.values()))
    lite0 = Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir)
    keras = models.load(lite0.replace(runtime="tensorflow")).predict(batch)
    bf16 = models.load(lite0.replace(precision="bf16")).predict(batch)
    served = models.load(lite0.replace(precision="bf16", recheck_margin=0.02))
    assert (served.runtime, served.precision, served.recheck_margin) == ("openvino", "bf16", 0.02)

    got = served.predict(batch)

    near = models.near_ties(bf16, 0.02)
    assert 0 < len(near) < len(batch)
    assert (np.argmax(bf16, axis=1) != np.argmax(keras, axis=1)).any()  # plain bf16 reorders some near ties here
    np.testing.assert_array_equal(np.argmax(got, axis=1), np.argmax(keras, axis=1))
    np.testing.assert_allclose(got[near], keras[near], rtol=0, atol=1e-4)  # the near ties: f32's answers
    sure = np.setdiff1d(np.arange(len(batch)), near)
    np.testing.assert_array_equal(got[sure], bf16[sure])  # the others: bf16's, untouched


@pytest.fixture(scope="module")
def tiny():
    """A small Keras model and an input: what is under test is the IR cache, not the network."""
    import keras

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5, activation="softmax")], name="tiny")
    return model, np.random.default_rng(3).random((2, 8), dtype=np.float32)


def test_a_cached_ir_openvino_cannot_read_is_converted_again(tiny, tmp_path, capfd):
    # A .bin cut short (a full disk, a kill) stopped the worker at every start: "Incorrect weights in bin file!".
    model, x = tiny
    expected = runtimes.compile_model(model, "openvino", "f32", cache_dir=tmp_path)(x)
    [binary] = tmp_path.glob("*.bin")
    size = binary.stat().st_size
    binary.write_bytes(binary.read_bytes()[: size // 2])
    np.testing.assert_allclose(runtimes.compile_model(model, "openvino", "f32", cache_dir=tmp_path)(x), expected)
    assert binary.stat().st_size == size and "model_cache_unreadable" in capfd.readouterr().err


def test_a_cache_directory_that_cannot_be_written_is_done_without(tiny, tmp_path, capfd):
    # Read-only or full, it stopped the worker, though the cache only saves the conversion's time.
    model, x = tiny
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "cache"  # mkdir under a file fails as on a read-only file system
    expected = runtimes.compile_model(model, "openvino", "f32")(x)
    np.testing.assert_allclose(runtimes.compile_model(model, "openvino", "f32", cache_dir=unwritable)(x), expected)
    assert "model_cache_not_written" in capfd.readouterr().err


def test_a_cache_on_a_full_disk_is_done_without(tiny, tmp_path, monkeypatch, capfd):
    # OpenVINO's writer reports a full disk as RuntimeError ("basic_ios::clear: iostream error"), not OSError.
    model, x = tiny
    expected = runtimes.compile_model(model, "openvino", "f32")(x)
    export = type(model).export

    def export_but_not_into_the_cache(self, path, **kwargs):
        if Path(path).is_relative_to(tmp_path):
            raise RuntimeError("basic_ios::clear: iostream error")
        return export(self, path, **kwargs)

    monkeypatch.setattr(type(model), "export", export_but_not_into_the_cache)
    np.testing.assert_allclose(runtimes.compile_model(model, "openvino", "f32", cache_dir=tmp_path)(x), expected)
    assert "model_cache_not_written" in capfd.readouterr().err


def test_a_conversion_removes_what_killed_converters_left(tiny, tmp_path):
    model, x = tiny
    stale = tmp_path / f"{model_cache.SCRATCH_PREFIX}killed"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"\0" * 1000)
    old = time.time() - model_cache.STALE_AFTER - 60
    os.utime(stale, (old, old))
    runtimes.compile_model(model, "openvino", "f32", cache_dir=tmp_path)(x)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".xml"]  # the IR, and nothing else


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_cached_ir_is_readable_by_other_users_workers_whatever_the_umask(tiny, tmp_path, umask):
    model, x = tiny
    before = os.umask(umask)
    try:
        runtimes.compile_model(model, "openvino", "f32", cache_dir=tmp_path)(x)
    finally:
        os.umask(before)
    assert sorted(p.stat().st_mode & 0o777 for p in tmp_path.iterdir()) == [0o644, 0o644]

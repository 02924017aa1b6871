"""The models: the EfficientNet-Lite0 port gives its published answers; ResNet50 matches the seed's table."""

from pathlib import Path

import numpy as np
import pytest

import helpers
import models
import runtimes
from settings import Settings
from support import CASTLE, JEMMA

pytestmark = pytest.mark.slow

RESNET50_CACHE = Path.home() / ".keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


@pytest.fixture(scope="module")
def lite0_settings(model_cache_dir):
    return Settings(model="efficientnet_lite0", model_cache_dir=model_cache_dir)


@pytest.fixture(scope="module")
def efficientnet(lite0_settings):
    return models.load(lite0_settings)


def classify(classifier, path, k=5):
    pixels = helpers.prepare_image(Path(path).read_bytes(), 40_000_000)
    return classifier.top_k(classifier.predict(pixels[None])[0], k)


def test_efficientnet_lite0_sees_the_castle(efficientnet):
    top = classify(efficientnet, CASTLE)
    assert top[0]["label"] == "castle" and top[0]["probability"] == pytest.approx(0.93, abs=0.01)


def test_efficientnet_lite0_sees_the_beagle(efficientnet):
    top = classify(efficientnet, JEMMA)
    assert top[0]["label"] == "beagle" and top[0]["probability"] == pytest.approx(0.95, abs=0.01)


def test_cached_model_gives_the_same_probabilities(efficientnet, lite0_settings, model_cache_dir):
    assert list(Path(model_cache_dir).glob("efficientnet_lite0-*.keras"))
    again = models.load(lite0_settings)  # now read from the cache
    pixels = helpers.prepare_image(CASTLE.read_bytes(), 40_000_000)[None]
    np.testing.assert_allclose(again.predict(pixels), efficientnet.predict(pixels), atol=1e-6)


def test_batches_give_the_same_answer_as_single_images(efficientnet):
    pixels = np.stack(
        [helpers.prepare_image(CASTLE.read_bytes(), 40_000_000), helpers.prepare_image(JEMMA.read_bytes(), 40_000_000)]
    )
    together = efficientnet.predict(pixels)
    np.testing.assert_allclose(together[0], efficientnet.predict(pixels[:1])[0], atol=1e-5)


def test_unknown_model_is_refused():
    with pytest.raises(models.ModelUnavailable, match="unknown MODEL"):
        models.load(Settings(model="vgg16"))


def test_missing_weights_file_is_reported():
    with pytest.raises(models.ModelUnavailable, match="does not exist"):
        models.load(Settings(model="resnet50", model_weights="/nonexistent/weights.h5"))


@pytest.mark.skipif(
    not RESNET50_CACHE.is_file(),
    reason=f"ResNet50 ImageNet weights are not present ({RESNET50_CACHE}); this machine cannot download them",
)
def test_resnet50_reproduces_the_seed_table_for_the_castle(monkeypatch):
    # The seed's table came from the original preparation: the castle decoded in full, not at half scale.
    monkeypatch.setattr(helpers, "_DRAFT_GAP", None)
    classifier = models.load(Settings(model="resnet50", model_weights=str(RESNET50_CACHE)))
    top = classify(classifier, CASTLE)
    assert [(p["label"], round(p["probability"], 4)) for p in top] == [
        ("church", 0.4136),
        ("castle", 0.3930),
        ("monastery", 0.1733),
        ("palace", 0.0041),
        ("vault", 0.0034),
    ]


@pytest.mark.parametrize(
    ("inference_batch_size", "batch_size", "streams", "shapes"),
    [
        (0, 32, 1, [1, 2, 32]),
        (4, 32, 1, [1, 2, 4]),
        (4, 32, 2, [1, 2, 4, 4, 4]),  # and a slice on each of OpenVINO's two streams
        (2, 32, 3, [1, 2, 2, 2, 2]),
        (31, 32, 2, [1, 2, 31, 31, 1]),
        (64, 32, 2, [1, 2, 32]),
        (0, 1, 1, [1]),
    ],
)
def test_warm_up_runs_batch_1_2_the_largest_call_and_a_slice_on_each_stream(
    inference_batch_size, batch_size, streams, shapes
):
    classifier = models.Classifier("fake", model=None, preprocess=lambda x: x, weights="none")
    seen = []
    classifier._run = runtimes.Predictor(
        lambda batch: seen.append(len(batch)) or np.zeros((len(batch), 1000), np.float32)
    )
    classifier._run.streams = streams
    classifier.inference_batch_size = inference_batch_size
    classifier.warm_up(batch_size)
    assert seen == shapes


def test_near_ties_are_the_rows_whose_two_best_are_less_than_the_margin_apart():
    probabilities = np.array(
        [
            [0.50, 0.49, 0.01, 0.00],  # 0.01 apart: a near tie
            [0.10, 0.60, 0.05, 0.25],  # 0.35 apart
            [0.30, 0.30, 0.20, 0.20],  # an exact tie
            [0.02, 0.26, 0.24, 0.48],  # the best two are not the first two columns: 0.22 apart
        ],
        np.float32,
    )
    assert list(models.near_ties(probabilities, 0.02)) == [0, 2]
    assert list(models.near_ties(probabilities, 0.3)) == [0, 2, 3]
    assert list(models.near_ties(probabilities, 0.0)) == []  # margin 0: nothing, not even an exact tie


def test_near_ties_are_classified_again_by_the_recheck_runtime_and_only_they():
    classifier = models.Classifier("fake", model=None, preprocess=lambda x: x, weights="none")
    answers = np.array([[0.50, 0.49, 0.01], [0.90, 0.05, 0.05], [0.40, 0.39, 0.21], [0.3, 0.3, 0.4], [np.nan] * 3])
    second = np.array([[0.1, 0.8, 0.1], [0.0, 0.0, 1.0], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    calls = []

    def rows(batch):
        return batch[:, 0, 0, 0].astype(int)

    classifier._run = runtimes.Predictor(lambda batch: answers[rows(batch)].astype(np.float32))
    classifier._recheck = runtimes.Predictor(
        lambda batch: calls.append(list(rows(batch))) or second[rows(batch)].astype(np.float32)
    )
    classifier.recheck_margin, classifier.inference_batch_size = 0.02, 2  # slices of 2, the recheck's too
    pixels = np.zeros((5, 224, 224, 3), np.uint8)
    pixels[:, 0, 0, 0] = range(5)  # each image says which row it is

    got = classifier.predict(pixels)

    # Rows 0 and 2 are near ties, row 4 is NaN; rows 1 and 3 (0.1 apart) keep their first answer.
    np.testing.assert_array_equal(got, np.array([second[0], answers[1], second[2], answers[3], second[4]], np.float32))
    assert calls == [[0, 2], [4]] and classifier.rechecked == 3


def test_while_near_ties_are_common_batches_run_in_f32_alone_and_bf16_comes_back_after():
    """bf16 for all and f32 again for most would cost more than f32 alone (cell.png, every image a near tie: the
    worker's CPU 19.5 ms a request against f32's 13)."""
    classifier = models.Classifier("fake", model=None, preprocess=lambda x: x, weights="none")
    tie, sure = np.array([0.5, 0.495, 0.005], np.float32), np.array([0.9, 0.05, 0.05], np.float32)
    calls = []

    def runtime(name):
        def run(batch):
            calls.append((name, len(batch)))
            rows = np.array([tie if image[0, 0, 0] else sure for image in batch]).reshape(-1, 3)
            return rows + (0.0 if name == "bf16" else 1.0)  # f32's answers are told apart by +1

        return runtimes.Predictor(run)

    classifier._run, classifier._recheck, classifier.recheck_margin = runtime("bf16"), runtime("f32"), 0.02
    classifier.inference_batch_size = 16  # batches of 32 in two slices, whichever runtime
    modes, answers = [], []
    for unsure in [1, 1, 1, 1, 0, 0, 0]:  # four batches of near ties, then three of sure answers
        calls.clear()
        answers.append(classifier.predict(np.full((32, 224, 224, 3), unsure, np.uint8)))
        modes.append(list(calls))
    bf16, f32 = [("bf16", 16)] * 2, [("f32", 16)] * 2
    # The share of near ties, weighted over the last ~128 images: 0.25, 0.44, 0.58 (f32 alone from here), 0.68,
    # 0.51, 0.38 (bf16 again).
    assert modes == [bf16 + f32] * 3 + [f32] * 3 + [bf16]
    assert all((answers[i] >= 1).all() for i in range(6))  # near ties rechecked, or f32 alone: f32's answers
    assert (answers[6] < 1).all() and classifier.rechecked == 6 * 32
    assert classifier.predict(np.zeros((0, 224, 224, 3), np.uint8)).shape[0] == 0
    classifier.warm_up(32)  # warming up with blank images leaves no share behind
    assert classifier._near_tie_share == 0.0


def test_use_runtime_compiles_and_checks_the_f32_recheck_and_drops_it_when_the_margin_goes(monkeypatch):
    """A recheck runtime is self-checked like any runtime; switching again without a margin leaves none behind."""
    reference = np.array([[0.7, 0.2, 0.1]] * 2, np.float32)
    answers = {"tensorflow": reference, "f32": reference, "bf16": reference + [[-0.01, 0.01, 0.0]]}

    def compile_model(model, runtime, precision="f32", cache_dir=None, side_by_side=False):
        key = "tensorflow" if runtime == "tensorflow" else precision
        return runtimes.Predictor(lambda batch: answers[key][: len(batch)].copy())  # the rows are all alike

    monkeypatch.setattr(models.runtimes, "compile_model", compile_model)
    classifier = models.Classifier("fake", model=None, preprocess=lambda x: x, weights="none")
    with pytest.raises(ValueError, match="recheck margin is for precision bf16"):
        classifier.use_runtime("openvino", "f32", None, recheck_margin=0.02)
    classifier.use_runtime("openvino", "bf16", None, recheck_margin=0.02)
    assert classifier._recheck is not None and classifier.recheck_margin == 0.02
    classifier._near_tie_share = 0.9  # the last runtime's traffic says nothing of the next one's
    classifier.use_runtime("openvino", "bf16", None, recheck_margin=0.02)
    assert classifier._near_tie_share == 0.0
    classifier.use_runtime("openvino", "bf16", None)
    assert classifier._recheck is None and classifier.recheck_margin == 0.0
    answers["f32"] = reference[:, ::-1].copy()  # an f32 model that answers wrong: refused, nothing switched
    with pytest.raises(RuntimeError, match="self-check failed"):
        classifier.use_runtime("openvino", "bf16", None, recheck_margin=0.02)
    assert classifier._recheck is None and classifier.recheck_margin == 0.0

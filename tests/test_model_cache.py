"""The converted-model cache is keyed by the checkpoint's content, so a replaced checkpoint is converted again.

Keras and the network are replaced by fakes: what is under test is which file is read or written, not the model.
"""

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import models


class FakeModel:
    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.checkpoint)


@pytest.fixture
def conversions(monkeypatch, tmp_path):
    """Checkpoints converted from scratch, in order; loading a cached model returns the checkpoint it came from."""
    converted = []

    def load_weights(_model, checkpoint):
        converted.append(checkpoint)
        return FakeModel(checkpoint.read_text())

    keras = ModuleType("keras")
    keras.saving = SimpleNamespace(load_model=lambda path: FakeModel(Path(path).read_text()))
    network = ModuleType("efficientnet_lite")
    network.build, network.load_weights = lambda: None, load_weights
    monkeypatch.setitem(sys.modules, "keras", keras)
    monkeypatch.setitem(sys.modules, "efficientnet_lite", network)
    return converted


def served(checkpoint):
    cache_dir = checkpoint.parent.parent / "cache"
    return models._efficientnet_lite0(str(checkpoint), str(cache_dir)).model.checkpoint


def test_a_checkpoint_is_converted_once_then_read_from_the_cache(tmp_path, conversions):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_text("first weights")
    assert served(checkpoint) == served(checkpoint) == "first weights"
    assert conversions == [checkpoint]


def test_a_different_checkpoint_with_the_same_name_is_not_served_from_the_cache(tmp_path, conversions):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "weights.pth", tmp_path / "b" / "weights.pth"
    first.write_text("first weights")
    second.write_text("second weights")
    assert served(first) == "first weights"
    assert served(second) == "second weights"
    first.write_text("replaced in place")
    assert served(first) == "replaced in place"
    assert conversions == [first, second, first]
    assert len(list((tmp_path / "cache").glob("efficientnet_lite0-*.keras"))) == 3

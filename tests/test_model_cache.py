"""The converted-model cache is keyed by the checkpoint's content, so a replaced checkpoint is converted again.

Keras and the network are replaced by fakes: what is under test is which file is read or written, not the model.
"""

import fcntl
import os
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import model_cache
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

    def load_model(path):
        text = Path(path).read_text()
        if text.startswith("damaged"):
            raise ValueError(f"File not found: filepath={path}")  # what Keras said of a truncated archive
        return FakeModel(text)

    def load_weights(_model, checkpoint):
        converted.append(checkpoint)
        return FakeModel(checkpoint.read_text())

    keras = ModuleType("keras")
    keras.saving = SimpleNamespace(load_model=load_model)
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


def test_a_cached_model_keras_cannot_read_is_converted_again(tmp_path, conversions, capfd):
    # Cut short by a full disk or a kill, it stopped the worker at every start with Keras's "File not found".
    (tmp_path / "a").mkdir()
    checkpoint = tmp_path / "a" / "weights.pth"
    checkpoint.write_text("first weights")
    assert served(checkpoint) == "first weights"
    [cached] = (tmp_path / "cache").glob("efficientnet_lite0-*.keras")
    cached.write_text("damaged: half an archive")
    assert served(checkpoint) == "first weights"
    assert conversions == [checkpoint, checkpoint] and cached.read_text() == "first weights"
    assert cached.stat().st_mode & 0o777 == 0o644  # readable by another user's worker, as the IR beside it
    assert "model_cache_unreadable" in capfd.readouterr().err


def test_a_cache_directory_that_cannot_be_written_is_done_without(tmp_path, conversions, capfd):
    checkpoint = tmp_path / "weights.pth"
    checkpoint.write_text("first weights")
    (tmp_path / "a-file").write_text("")
    unwritable = tmp_path / "a-file" / "cache"  # mkdir under a file fails as on a read-only file system
    assert models._efficientnet_lite0(str(checkpoint), str(unwritable)).model.checkpoint == "first weights"
    assert "model_cache_not_written" in capfd.readouterr().err


def _leftover(cache_dir, name, age, locked=False):
    """A scratch directory (or an older version's temporary file) as a writer left it `age` seconds ago; `locked`:
    its writer is still at work."""
    path = cache_dir / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    if name.endswith(".keras"):
        path.write_bytes(b"half a model")
    else:
        path.mkdir()
        (path / "model.keras").write_bytes(b"half a model")
    os.utime(path, (time.time() - age, time.time() - age))
    if locked:
        held = os.open(path, os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX)
        return held
    return None


def test_a_conversion_removes_what_killed_writers_left_and_leaves_nothing_of_its_own(tmp_path, conversions):
    # Each kill -9, OOM kill or early SIGTERM mid-conversion left a model's worth behind, for good.
    (tmp_path / "a").mkdir()
    checkpoint = tmp_path / "a" / "weights.pth"
    checkpoint.write_text("first weights")
    cache_dir = tmp_path / "cache"
    old = model_cache.STALE_AFTER + 60
    for name in (".partial-killed", ".converting-killed", "tmpq1w2e3r4.keras"):  # the last two: older versions'
        _leftover(cache_dir, name, old)
    recent = ".partial-converting-now"  # another worker's, just made: not locked yet
    _leftover(cache_dir, recent, 60)
    held = _leftover(cache_dir, ".partial-converting-for-hours", old, locked=True)
    try:
        assert served(checkpoint) == "first weights"
    finally:
        os.close(held)
    [cached] = cache_dir.glob("efficientnet_lite0-*.keras")
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([cached.name, recent, ".partial-converting-for-hours"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_cached_model_is_readable_by_other_users_workers_whatever_the_umask(tmp_path, conversions, umask):
    (tmp_path / "a").mkdir()
    checkpoint = tmp_path / "a" / "weights.pth"
    checkpoint.write_text("first weights")
    before = os.umask(umask)
    try:
        served(checkpoint)
    finally:
        os.umask(before)
    [cached] = (tmp_path / "cache").glob("efficientnet_lite0-*.keras")
    assert cached.stat().st_mode & 0o777 == 0o644


def test_a_conversion_that_fails_leaves_no_scratch_behind(tmp_path, conversions, monkeypatch, capfd):
    (tmp_path / "a").mkdir()
    checkpoint = tmp_path / "a" / "weights.pth"
    checkpoint.write_text("first weights")

    def save_until_the_disk_is_full(self, path):
        Path(path).write_text("half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FakeModel, "save", save_until_the_disk_is_full)
    assert served(checkpoint) == "first weights"
    assert list((tmp_path / "cache").iterdir()) == []
    assert "model_cache_not_written" in capfd.readouterr().err

"""Writing into the model cache (MODEL_CACHE_DIR), which workers may share: aside, then renamed into place.

Several workers may convert the same model at once, and none may read half a file: each writes into a scratch
directory of its own inside the cache and renames the finished files out of it. A writer killed mid-way (kill -9,
the OOM killer, a SIGTERM before the worker's handler is set) leaves its scratch directory behind, a model's worth
each time (ResNet50's IR: 100 MB); the next writer removes those old enough that no live conversion owns them.
"""

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

SCRATCH_PREFIX = ".partial-"
# A conversion takes a minute or two; a scratch directory untouched for this long has no live writer.
STALE_AFTER = 3600.0


@contextlib.contextmanager
def writing_aside(cache_dir):
    """A fresh scratch directory inside `cache_dir` (made if need be), removed at the end with whatever is left
    in it; the stale ones of killed writers are removed first. Raises OSError when the cache cannot be written."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=SCRATCH_PREFIX))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale(cache_dir):
    cutoff = time.time() - STALE_AFTER
    for leftover in cache_dir.glob(SCRATCH_PREFIX + "*"):
        # Another writer may be removing it too; a symlink or a file of that name is not ours: left alone.
        with contextlib.suppress(OSError):
            if leftover.lstat().st_mtime < cutoff:
                shutil.rmtree(leftover)

"""Writing into the model cache (MODEL_CACHE_DIR), which workers may share: aside, then renamed into place.

Several workers may convert the same model at once, and none may read half a file: each writes into a scratch
directory of its own inside the cache, locked while it writes, and renames the finished files out of it. A writer
killed mid-way (kill -9, the OOM killer, a SIGTERM before the worker's handler is set) leaves its scratch directory
behind, a model's worth each time (ResNet50's IR: 100 MB); the next writer removes those that are old and that no
live writer holds locked.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

SCRATCH_PREFIX = ".partial-"
# Also removed when old and unlocked: what versions before 2026-11-29 left (a scratch directory of the IR's, a
# temporary file of the .keras model's).
_LEFTOVERS = (SCRATCH_PREFIX + "*", ".converting-*", "tmp*.keras")
# A leftover is removed only once its lock is free and it is this old: a directory just made is not locked yet.
STALE_AFTER = 3600.0


@contextlib.contextmanager
def writing_aside(cache_dir):
    """A fresh scratch directory inside `cache_dir` (made if need be), locked until the end and then removed with
    whatever is left in it; the leftovers of killed writers are removed first. Raises OSError when the cache cannot
    be written."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache_dir)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=SCRATCH_PREFIX))
    lock = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # before the lock goes, so nobody else takes it for a leftover
        os.close(lock)


def publish(written, destination):
    """Rename a file written in a scratch directory into place, readable by every user's workers whatever the
    umask (a temporary directory's files were 0600 under umask 077: other users' workers converted again)."""
    os.chmod(written, 0o644)
    os.replace(written, destination)


def _remove_leftovers(cache_dir):
    cutoff = time.time() - STALE_AFTER
    for pattern in _LEFTOVERS:
        for leftover in cache_dir.glob(pattern):
            # Not a symlink (O_NOFOLLOW fails); locked by a live writer (BlockingIOError); removed by another
            # writer meanwhile (FileNotFoundError): each left alone.
            with contextlib.suppress(OSError):
                if leftover.lstat().st_mtime < cutoff:
                    _remove_unless_held(leftover)


def _remove_unless_held(path):
    held = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    finally:
        os.close(held)

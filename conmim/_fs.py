"""Shared files that several processes may write at once (sample folders, scan indexes, exports).

Every such file is written under a unique temporary name in its folder and renamed over the target, so a reader
sees the old file or the new one, never a truncated one; ``exclusive`` lets one process build what the others
then read (ranks of one run, or independent runs sharing the cache).
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """conmim's cache folder: ``$XDG_CACHE_HOME/conmim``, by default ``~/.cache/conmim``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "conmim"


def unique_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A name beside ``path`` that no other process or thread picks: hidden, with the pid and a random tag."""
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}"


def write_atomic(path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a unique temporary file, flushed to disk and renamed over ``path``.

    The file gets the permissions of any new file (0666 less the umask, so 0644 by default), not a temporary
    file's 0600.
    """
    path = Path(path)
    tmp = unique_sibling(path)
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def exclusive(lock_path):
    """Hold an exclusive lock on ``lock_path`` (created if needed) across processes; others wait for it."""
    with FileLock(str(lock_path)):
        yield

"""Writing a file whole or not at all: checkpoints, plots, the downloaded data set, starter files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(dest: str | os.PathLike, payload: bytes) -> None:
    """Write dest whole or not at all: a temp file in the same directory, fsync, then os.replace.

    A crash at any point leaves either the old file or the new one, never a half-written one; the
    directory is fsynced after the rename, so the new one survives a power cut once this returns.
    """
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(dest.parent)


def fsync_directory(path: Path) -> None:
    """Make a rename in `path` durable: the directory entry itself is on disk (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

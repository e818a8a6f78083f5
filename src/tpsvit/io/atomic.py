"""Atomic file writes: a temporary file in the same folder, then ``os.replace`` (never a half-written file)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from tpsvit.errors import InvalidArgumentError


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; the file gets the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(path: str | os.PathLike, example: str = "results.json") -> Path:
    """``path`` as a Path; :class:`InvalidArgumentError` when it is a folder or its folder cannot be written.

    Missing folders count as writable when the first existing folder above them is (writers create them).
    ``example`` is the file name suggested when ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"{str(path)!r} is a directory; give a file name such as {example}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"cannot write {str(path)!r}: folder {str(parent)!r} is not writable")
    return path

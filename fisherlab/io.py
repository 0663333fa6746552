"""Atomic file writes: every file fisherlab writes appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None] | str | bytes, *, text: bool = False) -> Path:
    """Write ``path`` through a temporary file in its directory and a rename.

    A killed or failing writer leaves the previous file (or none) and no temporary file;
    concurrent writers each replace the file whole. The directory is created if missing and
    the file gets mode 0644 (``mkstemp`` creates 0600; caches and results may be shared).

    Args:
        path: the file to write.
        write: the content (``str`` is written as UTF-8), or a function that writes it to
            the open file handle (binary, or text with ``newline=""`` when ``text``).
        text: open the handle in text mode (for :mod:`csv` and :mod:`json` writers).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(write, str):
        write = write.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") if text else os.fdopen(fd, "wb") as handle:
            if isinstance(write, bytes):
                handle.write(write)
            else:
                write(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

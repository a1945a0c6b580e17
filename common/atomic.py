"""Atomic file writes: a temp file beside the target, fsync, then rename into place.

A crash or a full disk never leaves a half-written checkpoint, summary, ledger or cache entry.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, write: Any, mode: int | None = None) -> None:
    """Call ``write(file_obj)`` on a temp file beside ``path``, then rename it into place.

    ``mode`` sets the file's permissions before any byte is written (private keys: 0o600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda fh: fh.write(text.encode("utf-8")))

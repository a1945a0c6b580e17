"""Exclusive inter-process locks on a lock file: the one mechanism a site uses to serialise its state.

``fcntl.flock`` on a separate lock file: the kernel releases it when the holder closes it or
dies, so a crashed process never leaves a site locked. Used for the privacy ledger, the one
DP training task per site, and the evaluation counts.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medfed.common.errors import MedfedError

_POLL_S = 0.05


class LockBusy(MedfedError):
    """Another process holds the lock and did not release it within the wait."""


@contextmanager
def hold_lock(path: str | Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    ``wait_s=None`` waits as long as it takes; otherwise :class:`LockBusy` after ``wait_s`` seconds.
    The lock is released when the block ends, and by the kernel if the process dies.
    """
    if wait_s is not None and wait_s < 0:
        raise ValueError(f"wait_s={wait_s} must be >= 0 seconds (or None to wait as long as it takes)")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        if wait_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockBusy(f"{p} is held by another process (waited {wait_s:g}s)") from None
                    time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock

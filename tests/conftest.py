"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only shared data folder (``../shared/data``, or ``$MEDFED_SHARED_DATA``).

    Tests that use it are skipped where it is absent (e.g. a fresh clone on CI).
    """
    path = Path(os.environ.get("MEDFED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = path.expanduser().resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} not found (set MEDFED_SHARED_DATA)")
    return path

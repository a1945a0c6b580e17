"""Seconds read from an environment variable: one parser, one message, for every daemon setting."""

from __future__ import annotations

import os
from collections.abc import Mapping


def env_seconds(name: str, default: float | None, *, maximum: float | None = None,
                env: Mapping[str, str] | None = None) -> float | None:
    """``name`` in seconds (``default`` when unset or empty); ValueError naming it when not in (0, maximum]."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum:g}" if maximum is not None else ""
        raise ValueError(f"{name}={raw!r} must be more than 0{bound} seconds")
    return value

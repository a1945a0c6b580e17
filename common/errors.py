"""Domain exceptions shared by every medfed component.

The CLI catches :class:`MedfedError`, prints ``str(e)`` on one line and exits 1
(2 for :class:`ConfigError`). Messages say what went wrong, why, and how to fix it.
"""

from __future__ import annotations


class MedfedError(Exception):
    """Base; CLI prints str(e) on one line and exits 1."""


class ConfigError(MedfedError, ValueError):
    """Bad user config/usage; CLI exits 2."""


class DataError(MedfedError, ValueError):
    """Missing/corrupt/unsupported data file."""

"""The one logging setup: medfed's logger prints INFO progress lines to stderr."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s medfed %(levelname)s %(message)s"


def emit(text: str) -> None:
    """One line of command output for the user (stdout), as opposed to log lines (stderr)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach a single stderr handler to the ``medfed`` logger (idempotent)."""
    logger = logging.getLogger("medfed")
    if not any(getattr(h, "_medfed", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._medfed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger

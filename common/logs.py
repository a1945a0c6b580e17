"""The one logging setup: medfed's logger prints INFO progress lines to stderr.

In a deployed ServerApp the same lines also go to the run's console file, which
``medfed server start`` prints (:mod:`medfed.common.run_console`).
"""

from __future__ import annotations

import logging
import sys

from medfed.common.run_console import attach_run_console

_FORMAT = "%(asctime)s medfed %(levelname)s %(message)s"


def _formatter() -> logging.Formatter:
    return logging.Formatter(_FORMAT, datefmt="%H:%M:%S")


def emit(text: str) -> None:
    """One line of command output for the user (stdout), as opposed to log lines (stderr)."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach a single stderr handler to the ``medfed`` logger (idempotent).

    In a deployed ServerApp the run's console file gets the same lines (:mod:`medfed.common.run_console`).
    """
    logger = logging.getLogger("medfed")
    if not any(getattr(h, "_medfed", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_formatter())
        handler._medfed = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    attach_run_console(logger, _formatter())
    logger.setLevel(level)
    logger.propagate = False
    return logger

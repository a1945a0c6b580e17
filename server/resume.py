"""``resume=latest``: continue a study from the newest round checkpoint of its out-dir.

``medfed run --resume`` sends ``resume='latest'`` and the ServerApp resolves it here, on
the server, where the run directory (relative to the SuperLink's working directory)
actually lives; the submitting machine need not see it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError
from medfed.server.recorder import CHECKPOINT_DIR

log = logging.getLogger(__name__)

LATEST = "latest"
_ROUND_FILE = re.compile(r"round-(\d{4,})\.pt")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The ``checkpoints/round-NNNN.pt`` with the highest round under ``run_dir``, if any."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ROUND_FILE.fullmatch(p.name)) and p.is_file()]
    return max(found)[1] if found else None


def resolve_resume(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` with ``resume=latest`` replaced by the newest checkpoint of ``out-dir``."""
    if cfg.resume != LATEST:
        return cfg
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        raise ConfigError(
            f"resume=latest: no {CHECKPOINT_DIR}/round-NNNN.pt under out-dir {Path(cfg.out_dir).resolve()}, "
            "so there is nothing to continue: check out-dir (relative paths are under the SuperLink's "
            "state dir), or run without --resume to start the study afresh"
        )
    log.info("resume=latest: continuing from %s", ckpt)
    return cfg.replace(resume=str(ckpt))

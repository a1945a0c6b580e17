"""The run directory: metrics.jsonl, checkpoints, summary.json, the final model, the report.

Every file is written atomically (temp file + rename) or appended one whole line at a
time, so a crash never leaves a half-written checkpoint or summary.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from medfed.common.atomic import atomic_write_text
from medfed.common.checkpoint import Checkpoint, save_checkpoint

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
CHECKPOINT_DIR = "checkpoints"


def clean_json(value: Any) -> Any:
    """Replace NaN/Inf by None (JSON has no NaN) and numpy scalars by Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """Writes one run's outputs under ``run_dir``."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def checkpoint_path(self, server_round: int) -> Path:
        return self.run_dir / CHECKPOINT_DIR / f"round-{server_round:04d}.pt"

    def truncate_after(self, server_round: int) -> None:
        """On resume: keep metric lines up to ``server_round`` only."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("round", 0) <= server_round:
                    kept.append(line)
            except json.JSONDecodeError:
                log.warning("dropping a truncated line from %s", self.metrics_path)
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in kept))

    def reset(self) -> None:
        self.metrics_path.unlink(missing_ok=True)

    def append_round(self, record: dict[str, Any]) -> None:
        line = json.dumps(clean_json(record), sort_keys=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()

    def save_round_checkpoint(self, ckpt: Checkpoint) -> Path:
        return save_checkpoint(ckpt, self.checkpoint_path(ckpt.round))

    def save_model(self, ckpt: Checkpoint) -> Path:
        return save_checkpoint(ckpt, self.run_dir / MODEL_FILE)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.run_dir / SUMMARY_FILE
        atomic_write_text(path, json.dumps(clean_json(summary), indent=2) + "\n")
        return path

    def write_report(self) -> Path | None:
        from medfed.server.report import write_report

        try:
            return write_report(self.run_dir)
        except Exception as exc:  # noqa: BLE001 - a plot problem must not lose the run
            log.warning("could not write report.md: %s", exc)
            return None

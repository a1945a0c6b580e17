"""Self-describing checkpoints, written atomically and read without executing code.

A checkpoint holds the model spec, the study config, the round, metrics, the strategy's
state and the model-selection state, so ``--resume`` needs nothing else. Files are read
with ``torch.load(weights_only=True)``: only tensors and plain containers, never pickled
objects, so a file from elsewhere cannot run code at a site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from medfed.common.atomic import atomic_write_bytes
from medfed.common.errors import DataError
from medfed.common.models import ModelSpec, strip_wrapper_prefix

FORMAT = "medfed-checkpoint/1"


@dataclass
class Checkpoint:
    model: ModelSpec
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    strategy_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    best_state_dict: dict[str, torch.Tensor] | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model.to_dict(),
            "state_dict": strip_wrapper_prefix(self.state_dict),
            "config": self.config,
            "round": self.round,
            "metrics": self.metrics,
            "strategy_state": self.strategy_state,
            "selection": self.selection,
            "best_state_dict": self.best_state_dict,
        }


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    p = Path(path)
    atomic_write_bytes(p, lambda fh: torch.save(ckpt.to_payload(), fh))
    return p


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a medfed checkpoint; a plain state_dict file is accepted too (no spec)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"checkpoint not found: {p}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or carries pickled objects
        raise DataError(
            f"{p}: not a readable medfed checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(
            f"{p}: not a medfed checkpoint (expected format {FORMAT!r}); "
            "a plain state_dict file is a starting point for a study: --init FILE (medfed.common.transfer)"
        )
    try:
        return Checkpoint(
            model=ModelSpec(**payload["model"]),
            state_dict=dict(payload["state_dict"]),
            config=dict(payload.get("config", {})),
            round=int(payload.get("round", 0)),
            metrics=dict(payload.get("metrics", {})),
            strategy_state=dict(payload.get("strategy_state", {})),
            selection=dict(payload.get("selection", {})),
            best_state_dict=payload.get("best_state_dict"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{p}: checkpoint is missing or has a bad field ({exc})") from exc

"""Transfer learning at the server: the starting weights, and the frozen layers that stay put.

With ``initial-weights`` the global model starts from a checkpoint (a medfed one or a plain
state_dict; a head of another size, or ``new-head``, starts fresh). With ``freeze``, the
matching parameters are split off: the strategy sees and aggregates only the trainable
arrays, so every Flower strategy's state stays consistent, and the frozen arrays, which
never change, are attached to every message to the sites. A site trains with those layers
frozen and sends back only the trainable arrays (:func:`medfed.client.task.train_round`).
Checkpoints and the reported model always hold the whole model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.models import ModelSpec, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenPart:
    """The frozen arrays of the global model (empty without ``freeze``)."""

    arrays: ArrayRecord = field(default_factory=ArrayRecord)

    def full(self, trainable: ArrayRecord) -> ArrayRecord:
        """The whole model: the trainable arrays plus the frozen ones."""
        if not len(self.arrays):
            return trainable
        return ArrayRecord({**dict(trainable.items()), **dict(self.arrays.items())})

    def trainable(self, full: ArrayRecord) -> ArrayRecord:
        """The arrays the strategy aggregates: all but the frozen ones."""
        return ArrayRecord({k: v for k, v in full.items() if k not in self.arrays})

    def attach(self, messages: Iterable[Message]) -> list[Message]:
        """Messages whose arrays also carry the frozen layers, so that sites need no weights file."""
        out = list(messages)
        if len(self.arrays):
            for msg in out:
                msg.content["arrays"] = self.full(msg.content["arrays"])
        return out


def initial_arrays(cfg: StudyConfig, spec: ModelSpec) -> tuple[ArrayRecord, FrozenPart]:
    """The starting global model, split into (trainable arrays, frozen part)."""
    import torch

    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.initial_weights:
        from medfed.common.transfer import apply_initial_weights, load_initial_weights

        state, source = load_initial_weights(cfg.initial_weights)
        log.info("initial weights from %s (%s)", cfg.initial_weights,
                 f"a medfed {source.name} checkpoint" if source else "a plain state_dict")
        apply_initial_weights(model, state, new_head=cfg.new_head)  # logs what was loaded and what starts fresh
    return split(cfg, model_to_arrays(model), spec)


def split(cfg: StudyConfig, full: ArrayRecord, spec: ModelSpec) -> tuple[ArrayRecord, FrozenPart]:
    """Split a whole model's arrays by the study's ``freeze`` patterns."""
    if not cfg.freeze_patterns:
        return full, FrozenPart()
    from medfed.common.transfer import freeze, frozen_state_names

    probe = build_model(spec)
    freeze(probe, cfg.freeze_patterns)
    names = frozen_state_names(probe)
    part = FrozenPart(ArrayRecord({k: v for k, v in full.items() if k in names}))
    log.info("%d of %d arrays frozen (%s): not trained, not sent back by the sites",
             len(part.arrays), len(full), cfg.freeze)
    return part.trainable(full), part

"""A site's robustness evaluation in a study: the final global model attacked on the site's own test split.

Only metrics per attack and radius leave the site (:mod:`medfed.common.robustness.keys`), and
only for a test split of at least ``MIN_GROUP_SAMPLES`` images; the adversarial images stay
in memory and are dropped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from medfed.common.constants import MIN_GROUP_SAMPLES
from medfed.common.robustness.evaluate import robustness_metrics
from medfed.common.robustness.keys import ROBUST_METRICS, ROBUST_N, robust_key

if TYPE_CHECKING:
    import torch
    from medfed.common.config import StudyConfig
    from medfed.common.data.splits import ImageSplit
    from torch import nn


def robustness_reply(model: nn.Module, split: ImageSplit, device: torch.device, cfg: StudyConfig,
                     threshold: float | None) -> dict[str, float]:
    """The reply keys of ``robustness-eval`` for ``split`` ({} when the split is too small)."""
    if len(split) < MIN_GROUP_SAMPLES:
        return {}
    radii = cfg.robustness_radii
    result = robustness_metrics(model, split, device, cfg.robustness_attacks, radii, steps=cfg.robustness_steps,
                                seed=cfg.seed, threshold=threshold)
    out = {ROBUST_N: float(len(split))}
    for attack in cfg.robustness_attacks:
        for i, (label, _) in enumerate(radii):
            for metric in ROBUST_METRICS:
                value = result[attack][label].get(metric)
                if value is not None and math.isfinite(float(value)):
                    out[robust_key(attack, i, metric)] = float(value)
    return out

"""Robust accuracy, AUC and sensitivity of a classifier under each attack and strength, per group too.

Every batch is attacked once per (attack, eps) with the true labels (standard robust accuracy),
and all metrics of that (attack, eps) come from the same adversarial probabilities, on the
concatenated predictions of the split. PGD's random start is drawn from a generator seeded
with ``seed`` for each (attack, eps), so a result does not depend on which other strengths
were asked for. Groups smaller than ``MIN_GROUP_SAMPLES`` images are left out (k-anonymity).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from medfed.common.constants import MIN_GROUP_SAMPLES
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import DataError
from medfed.common.metrics import ACCURACY, AUC, NUM_EXAMPLES, SENSITIVITY, classification_metrics
from medfed.common.robustness.attacks import attack, check_attack
from torch import nn

log = logging.getLogger(__name__)

CLEAN = "clean"
GROUPS = "groups"
REPORTED = (ACCURACY, AUC, SENSITIVITY)


def robustness_metrics(
    model: nn.Module,
    split: ImageSplit,
    device: torch.device,
    attacks: Sequence[str],
    eps: Sequence[tuple[str, float]],
    steps: int = 10,
    seed: int = 0,
    threshold: float | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """``{"clean": {...}, "<attack>": {"<eps label>": {...}}, "groups": {"<code>": {same shape}}}``.

    ``eps`` holds (label, value) pairs: the label as the user gave it, the value on the [0, 1]
    scale. ``threshold`` is the binary decision threshold (None: 0.5; multi-class uses argmax).
    ``groups`` is present only when the split has group codes. The model is put in eval mode.
    """
    for name in attacks:
        check_attack(name)
    if len(split) == 0:
        raise DataError("the split has no images: robustness needs at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    labels = [label for label, _ in eps]
    if len(set(labels)) != len(labels):
        raise ValueError(f"eps labels {labels} repeat: give each strength once")
    probs = _all_probabilities(model, split, device, attacks, eps, steps, seed, batch_size)
    result = _summarise(probs, split.labels, threshold)
    if split.groups is not None:
        codes, counts = np.unique(split.groups, return_counts=True)
        result[GROUPS] = {
            str(int(code)): _summarise({k: p[split.groups == code] for k, p in probs.items()},
                                       split.labels[split.groups == code], threshold)
            for code, count in zip(codes, counts) if count >= MIN_GROUP_SAMPLES
        }
    return result


def _all_probabilities(model, split, device, attacks, eps, steps, seed, batch_size) -> dict[Any, np.ndarray]:
    """Class probabilities (N, C) keyed ``"clean"`` and ``(attack, eps label)``, on concatenated batches."""
    model.to(device).eval()
    keys = [(name, label, value) for name in attacks for label, value in eps]
    generators = {(name, label): torch.Generator().manual_seed(seed) for name, label, _ in keys}
    out: dict[Any, list[np.ndarray]] = {CLEAN: [], **{(name, label): [] for name, label, _ in keys}}
    images, targets = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    for start in range(0, len(split), batch_size):
        x = images[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        out[CLEAN].append(_probabilities(model, x))
        for name, label, value in keys:
            x_adv = attack(model, x, y, name, value, steps=steps, generator=generators[(name, label)])
            out[(name, label)].append(_probabilities(model, x_adv))
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.no_grad()
def _probabilities(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    return torch.softmax(model(x).float(), dim=1).cpu().numpy()


def _summarise(probs: dict[Any, np.ndarray], labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    clean = classification_metrics(labels, probs[CLEAN], threshold=threshold)
    result: dict[str, Any] = {CLEAN: {**{k: clean[k] for k in REPORTED}, NUM_EXAMPLES: int(labels.shape[0])}}
    for key, p in probs.items():
        if key == CLEAN:
            continue
        name, label = key
        metrics = classification_metrics(labels, p, threshold=threshold)
        result.setdefault(name, {})[label] = {k: metrics[k] for k in REPORTED}
    return result

"""Adversarial training (Madry et al. 2018, PGD-AT) inside medfed's one training loop.

With ``adv-train: pgd`` every batch has ``adv-ratio`` of its examples, chosen at random,
replaced by their PGD adversarial examples (radius ``adv-eps``, ``adv-steps`` steps) against
the current model before the forward pass that trains on it.

**Why DP-SGD's guarantee is unchanged.** Each adversarial example is a function of its own
record and the current model only: the attack's loss is summed over the batch and medfed's
classifiers have no layer that mixes examples (GroupNorm, no BatchNorm), so the gradient that
moves example ``i`` is example ``i``'s alone (tests/test_robustness.py checks that a batch
attacked at once equals its examples attacked one by one). Replacing ``x_i`` by ``a(x_i, w)``
is therefore a per-record preprocessing step that depends on the released model state: the
per-sample gradient DP-SGD clips is that of ``loss(w; a(x_i, w), y_i)``, so one record still
moves the summed gradient by at most the clipping norm, Poisson sampling and Gaussian noise
are untouched, and the accountant's (sampling rate, noise multiplier, steps) are the same.
The attack's own forward and backward passes run with Opacus's hooks paused, so they leave
no activations or ``grad_sample`` behind, and use :func:`torch.autograd.grad`, so parameter
gradients are untouched. The random start comes from the site's training generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from medfed.common.robustness.attacks import pgd
from torch import nn

@dataclass(frozen=True)
class AdvSettings:
    eps: float  # on the [0, 1] scale
    steps: int
    ratio: float  # share of each batch replaced

    def count(self, batch: int) -> int:
        return min(batch, max(1, math.ceil(self.ratio * batch))) if batch else 0


def adversarial_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: AdvSettings,
                      gen: torch.Generator) -> torch.Tensor:
    """``x`` with ``adv.count(len(x))`` random examples replaced by PGD examples against ``model``."""
    k = adv.count(len(x))
    if k == 0:
        return x
    chosen = torch.randperm(len(x), generator=gen)[:k].to(x.device)
    out = x.clone()
    out[chosen] = pgd(model, x[chosen], y[chosen], adv.eps, adv.steps, generator=gen)
    return out

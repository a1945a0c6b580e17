"""DP-SGD for the discriminator: medfed's private plan, with each real image paired with a fake.

The discriminator is the only network that reads private images, so it alone is trained with
DP-SGD; the generator learns only from the discriminator's outputs (post-processing).

A DP step's unit is the *pair* (real image ``x_i`` of class ``y_i``, fake image of class
``y_i``): the fake exists only because ``x_i`` was sampled, so removing record ``i`` removes
both. One forward pass runs on ``[reals; fakes]`` (``2b`` rows); Opacus's per-sample gradients
of the two rows of a pair are then summed (:func:`fold_paired_grad_samples`) before the
optimizer clips each pair's gradient to ``max_grad_norm``. Clipping real and fake rows
separately, as two backward passes would, lets one record move the sum by twice
``max_grad_norm`` and halves the effective noise.

Poisson sampling, physical chunks and the DPOptimizer come from
:func:`medfed.common.dp.engine.private_plan`, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from medfed.common.dp.engine import DPSettings, PrivatePlan, private_plan
from medfed.common.dp.model_check import DPModelError, prepare_dp_model
from torch import nn


@dataclass
class NoisyStepCounter:
    """Counts the DPOptimizer's noisy steps (Opacus's step hook, as its accountants use it)."""

    steps: int = 0
    sample_rates: list[float] = field(default_factory=list)

    def __call__(self, optimizer) -> None:
        # Opacus's accountants multiply the sample rate by accumulated_iterations: it must be 1.
        if optimizer.accumulated_iterations != 1:
            raise RuntimeError(
                f"{optimizer.accumulated_iterations} backward passes were accumulated into one DP "
                "step: the sample rate the accountant assumes would be wrong"
            )
        self.steps += 1


@dataclass
class PrivateDiscriminator:
    """The wrapped discriminator, its DPOptimizer, Poisson chunks and the noisy-step counter."""

    plan: PrivatePlan
    counter: NoisyStepCounter

    @property
    def module(self) -> nn.Module:
        return self.plan.model

    @property
    def optimizer(self):
        return self.plan.optimizer

    @property
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.plan.batches

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample state: the discriminator is plain again."""
        self.plan.close()


def require_dp_ready(disc: nn.Module) -> None:
    """Raise DPModelError unless ``disc`` needs no fix for DP-SGD (it is trained in place)."""
    fixed = prepare_dp_model(disc)  # a fixed copy, or DPModelError with the reason
    before = [type(m) for m in disc.modules()]
    after = [type(m) for m in fixed.modules()]
    inplace = [n for n, m in disc.named_modules() if getattr(m, "inplace", False) is True]
    if before != after or inplace:
        raise DPModelError(
            "the discriminator needs fixing for DP-SGD (BatchNorm or in-place activations): "
            "pass prepare_dp_model(disc), or build it with build_gan"
        )


def private_discriminator(disc: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                          dp: DPSettings, lr: float, betas: tuple[float, float]) -> PrivateDiscriminator:
    """Wrap ``disc`` for DP-SGD with Adam(``lr``, ``betas``) and ``steps`` Poisson batches."""
    require_dp_ready(disc)
    plan = private_plan(disc, images, labels, steps, dp, "adam", lr, 0.0, 0.0)
    for group in plan.optimizer.param_groups:
        group["betas"] = betas
    counter = NoisyStepCounter()
    plan.optimizer.attach_step_hook(counter)
    return PrivateDiscriminator(plan, counter)


def fold_paired_grad_samples(module: nn.Module, pairs: int) -> None:
    """Sum the per-sample gradients of rows ``i`` and ``pairs + i``: one gradient per pair.

    Call after the backward pass of a forward on ``[reals; fakes]`` and before the optimizer
    step. With Opacus's ``loss_reduction="mean"`` the loss must be the mean over all ``2b``
    rows: Opacus rescales by the rows it saw, so each row's gradient is its own loss's.
    """
    for p in module.parameters():
        if not p.requires_grad:
            continue
        gs = p.grad_sample
        if not isinstance(gs, torch.Tensor) or (pairs and gs.shape[0] != 2 * pairs):
            shape = tuple(gs.shape) if isinstance(gs, torch.Tensor) else type(gs).__name__
            raise RuntimeError(
                f"expected per-sample gradients for {2 * pairs} rows (reals then fakes), got {shape}: "
                "run exactly one forward and backward on the paired batch per optimizer step"
            )
        p.grad_sample = gs[:pairs] + gs[pairs : 2 * pairs]

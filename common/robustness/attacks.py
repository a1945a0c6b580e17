"""White-box L-infinity attacks on a classifier's input: FGSM and PGD.

Images are on the [0, 1] scale (medfed's preprocessing guarantees it) and every adversarial
image stays there. The loss is cross-entropy summed over the batch, so each example's gradient,
and hence its adversarial image, depends only on that example and the model: a batch attacked
at once equals its examples attacked one by one, which is what DP-SGD needs when it trains on
adversarial examples (each one must depend only on its own record).

The attacks take input gradients with :func:`torch.autograd.grad` only: the parameters' ``.grad``
and Opacus's ``grad_sample`` are left as they were (Opacus's hooks are paused meanwhile), and the
model's train/eval mode is not changed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from medfed.common.errors import ConfigError
from medfed.common.robustness.keys import ROBUST_ATTACKS
from torch import nn

log = logging.getLogger(__name__)

ATTACKS = ROBUST_ATTACKS  # one list: the CLI, the study keys and the reply allowlist
PGD_STEP_FACTOR = 2.5  # Madry et al.: step size 2.5 * eps / steps, so the walk can cross the ball


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): ``clamp(x + eps * sign(grad), 0, 1)``."""
    _check_eps(eps)
    x = x.detach()
    if eps == 0:
        return x.clone()
    grad = _input_gradient(model, x, y)
    return torch.clamp(x + eps * torch.sign(grad), 0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent on the loss (Madry et al. 2018) in the L-infinity ball of radius ``eps``.

    ``step_size`` defaults to ``2.5 * eps / steps``. With ``random_start`` the walk starts at a
    uniform point of the ball, drawn on the CPU from ``generator`` (so the result does not depend
    on the device); each step ascends ``sign(grad)``, projects back onto the ball around ``x`` and
    clamps to [0, 1].
    """
    _check_eps(eps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: PGD needs an integer number of steps >= 1")
    if step_size is None:
        step_size = PGD_STEP_FACTOR * eps / steps
    elif not step_size > 0:
        raise ValueError(f"step_size={step_size!r} must be > 0 (or None: 2.5 * eps / steps)")
    x = x.detach()
    if eps == 0:
        return x.clone()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32) * (2 * eps) - eps
        x_adv = torch.clamp(x + noise.to(device=x.device, dtype=x.dtype), 0.0, 1.0)
    for _ in range(steps):
        x_adv = x_adv + step_size * torch.sign(_input_gradient(model, x_adv, y))
        x_adv = torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0.0, 1.0).detach()
    return x_adv


def attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    name: str,
    eps: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The attack called ``name`` (one of :data:`ATTACKS`) at strength ``eps``; ``eps == 0`` returns ``x``."""
    check_attack(name)
    _check_eps(eps)
    if eps == 0:
        return x.detach()
    if name == "fgsm":
        return fgsm(model, x, y, eps)
    return pgd(model, x, y, eps, steps, generator=generator)


def check_attack(name: str) -> None:
    """ConfigError unless ``name`` is one of :data:`ATTACKS`."""
    if name not in ATTACKS:
        raise ConfigError(f"attack {name!r} is not known: choose from {', '.join(ATTACKS)}")


def _check_eps(eps: float) -> None:
    if not 0 <= eps <= 1:  # also refuses NaN
        raise ValueError(f"eps={eps!r} must be in [0, 1]: images are on the [0, 1] scale")


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy with respect to the input ``x`` only."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), _opacus_hooks_paused(model):
        loss = nn.functional.cross_entropy(model(x), y.to(x.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


@contextmanager
def _opacus_hooks_paused(model: nn.Module) -> Iterator[None]:
    """Pause an Opacus GradSampleModule's hooks, so an attack adds no activations or ``grad_sample``."""
    paused = bool(getattr(model, "hooks_enabled", False)) and hasattr(model, "disable_hooks")
    if paused:
        model.disable_hooks()
    try:
        yield
    finally:
        if paused:
            model.enable_hooks()

"""DP-SGD plumbing from Opacus for the shared training loop.

:func:`private_plan` returns what :func:`medfed.common.training.train` needs to run its
one loop privately: the model wrapped for per-sample gradients (hooks mode, the fastest
reliable mode on CPU), Opacus's ``DPOptimizer`` (flat clipping to ``max_grad_norm``,
Gaussian noise ``noise_multiplier * max_grad_norm``), and batches drawn by Poisson
sampling (each record joins each step independently with probability ``sample_rate``,
as the accountant assumes), split into physical batches of at most
``max_physical_batch`` by Opacus's ``BatchMemoryManager`` to bound memory.

The noise and the Poisson draws come from the site's own secret randomness
(:func:`secret_generator`: fresh ``os.urandom`` seeds, held only in this process's memory),
never from the study's seed. The coordinator knows the seed, the round and the site id;
if those determined the batches and the noise, it could replay them, subtract the noise
and read the clipped gradient sum, and the site's ε would protect nothing. Opacus's
``secure_mode`` noise (four Gaussian draws per coordinate) also defends against the
floating-point attacks on the Gaussian sampler. A DP round is therefore not reproducible:
its weights differ run to run, its accounting does not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from medfed.common.errors import ConfigError
from torch import nn


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float = 1.0
    sample_rate: float = 0.01
    max_physical_batch: int = 128

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and self.max_grad_norm > 0 and 0 < self.sample_rate <= 1
                and self.max_physical_batch >= 1):
            raise ConfigError(
                f"invalid DP settings {self}: noise_multiplier >= 0, max_grad_norm > 0, "
                "0 < sample_rate <= 1 and max_physical_batch >= 1 are required"
            )


@dataclass
class PrivatePlan:
    model: nn.Module  # the GradSampleModule to call forward on
    optimizer: object  # opacus DPOptimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample gradients: the model is a plain module again."""
        self.model.cleanup()
        for p in self.model.parameters():  # DPOptimizer's un-noised sum of clipped per-sample gradients
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def noise_only_step(optimizer) -> None:
    """The step of an empty Poisson batch: no image, so no forward pass, but the noise is added.

    Poisson sampling draws an empty batch now and then (often at small expected batches);
    DP-SGD must still take that step, as Opacus does: the sum of clipped per-sample gradients
    is zero and the update is pure noise. Running the model on zero images instead fails in
    some layers (InstanceNorm), so the empty per-sample gradients are set directly.
    """
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


def _torch_optimizer(params, optimizer: str, lr: float, momentum: float, weight_decay: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``os.urandom``: nothing the server sends or receives determines it.

    The seed is drawn from the operating system's CSPRNG and kept nowhere but in this
    generator, which lives for one round in the site's own process.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)  # a 63-bit seed
    return generator


def private_plan(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, dp: DPSettings,
                 optimizer: str, lr: float, momentum: float, weight_decay: float) -> PrivatePlan:
    """Wrap ``model`` and draw ``steps`` Poisson batches (physical chunks yielded in order).

    Sampling and noise use fresh secret generators (:func:`secret_generator`), the noise one
    on the model's device.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    n = int(labels.shape[0])
    expected = max(1, round(dp.sample_rate * n))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    opt = DPOptimizer(
        _torch_optimizer(gsm.parameters(), optimizer, lr, momentum, weight_decay),
        noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected, loss_reduction="mean",
        generator=secret_generator(device), secure_mode=True,
    )
    return PrivatePlan(gsm, opt, _batches(images, labels, steps, dp, opt, secret_generator()))


def _batches(images, labels, steps, dp, opt, generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Poisson logical batches (Opacus's sampler), each split into physical chunks as Opacus's
    BatchMemoryManager does: the optimizer accumulates and skips all but the last chunk."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=int(labels.shape[0]), sample_rate=dp.sample_rate, generator=generator, steps=steps
    )
    for batch in sampler:
        idx = torch.as_tensor(batch, dtype=torch.long)
        chunks = list(idx.split(dp.max_physical_batch)) or [idx]
        for i, chunk in enumerate(chunks):
            opt.signal_skip_step(do_skip=i < len(chunks) - 1)
            yield images[chunk], labels[chunk]

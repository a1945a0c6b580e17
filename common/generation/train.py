"""One site's local round of conditional-GAN training, optionally with DP-SGD on the discriminator.

Each of the round's ``steps`` iterations is

1. a discriminator step on a batch of real images and, for the same labels, as many fakes
   (non-saturating BCE: ``softplus(-D(x, y)) + softplus(D(G(z, y), y))`` per pair). With
   ``dp`` the batch is a Poisson sample and the step is DP-SGD on pairs (see
   :mod:`.private`): exactly one noisy optimizer step per iteration, however many physical
   chunks the batch is split into;
2. a generator step, ``softplus(-D(G(z, y'), y'))`` with labels ``y'`` drawn uniformly
   (never the site's labels, which only the DP step may read). The discriminator's
   per-sample hooks are off and its parameters frozen during this step.

So a round's privacy cost is ``steps`` steps of the Gaussian mechanism with the DP settings'
``noise_multiplier`` and ``sample_rate``: an accountant history entry
``(noise_multiplier, sample_rate, result.dp_steps)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from medfed.common.data.splits import ImageSplit
from medfed.common.dp.engine import DPSettings
from medfed.common.errors import ConfigError, DataError
from medfed.common.generation.models import Discriminator, Generator
from medfed.common.optim import Adam
from medfed.common.training import _batches
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GanSettings:
    """Local GAN training settings for one round at one site (DCGAN's Adam defaults).

    Without DP, ``batch_size`` is the real batch; with DP the real batch is a Poisson sample
    of expected size ``sample_rate * N`` and ``batch_size`` sizes the generator's batch only.
    The latent size is the generator's own (:class:`~.models.GanSpec`).
    """

    steps: int = 200
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        for name in ("lr_g", "lr_d"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas} must be two numbers in [0, 1), e.g. (0.5, 0.999)")
        if problems:
            raise ConfigError("invalid GAN settings: " + "; ".join(problems))


@dataclass(frozen=True)
class GanResult:
    d_loss: float  # mean discriminator loss per pair (real term + fake term); 0 if no pair was drawn
    g_loss: float  # mean generator loss over the round's steps
    steps: int
    num_examples: int  # real training images at the site (the FedAvg weight)
    seconds: float
    dp_steps: int = 0  # noisy discriminator steps taken (0 without DP): the accountant's count


def discriminator_losses(disc: nn.Module, gen: Generator, x: torch.Tensor, y: torch.Tensor,
                         z: torch.Tensor) -> torch.Tensor:
    """Per-row losses ``[softplus(-D(x, y)); softplus(D(G(z, y), y))]``, shape ``(2b,)``.

    One forward on the reals then the fakes, so that row ``i`` and row ``b + i`` form pair ``i``.
    """
    with torch.no_grad():
        fake = gen(z, y)
    logits = disc(torch.cat([x, fake]), torch.cat([y, y]))
    b = x.shape[0]
    return torch.cat([F.softplus(-logits[:b]), F.softplus(logits[b:])])


@contextmanager
def frozen_discriminator(disc: nn.Module) -> Iterator[None]:
    """Discriminator parameters frozen and, if Opacus wraps it, per-sample hooks off."""
    params = [p for p in disc.parameters() if p.requires_grad]
    hooks = getattr(disc, "disable_hooks", None) is not None
    for p in params:
        p.requires_grad_(False)
    if hooks:
        disc.disable_hooks()
    try:
        yield
    finally:
        if hooks:
            disc.enable_hooks()
        for p in params:
            p.requires_grad_(True)


def generator_step(gen: Generator, disc: nn.Module, opt: Adam, y: torch.Tensor, z: torch.Tensor) -> float:
    """One non-saturating generator step on labels ``y``; returns the loss."""
    opt.zero_grad()
    with frozen_discriminator(disc):
        loss = F.softplus(-disc(gen(z, y), y)).mean()
        loss.backward()
    opt.step()
    return float(loss.detach())


def gan_round(gen: Generator, disc: Discriminator, data: ImageSplit, settings: GanSettings,
              device: torch.device, dp: DPSettings | None = None, seed: int = 0) -> GanResult:
    """Train ``gen`` and ``disc`` in place on ``data`` for one local round.

    Both are plain modules afterwards (Opacus's hooks and per-sample state removed, no
    ``_module.`` prefix in their state_dicts), on ``device``.
    """
    _check_data(gen, disc, data)
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # DP noise (Opacus draws from the global generator)
    rng = torch.Generator().manual_seed(seed)
    gen.to(device).train()
    disc.to(device).train()
    loop = _Loop(gen, settings, device, rng)
    if dp is None:
        dp_steps = _plain_steps(loop, disc, data)
    else:
        dp_steps = _private_steps(loop, disc, data, dp)
    d_loss, g_loss = loop.d_sum / max(loop.pairs, 1), loop.g_sum / settings.steps
    if not (math.isfinite(d_loss) and math.isfinite(g_loss)):
        raise FloatingPointError("GAN losses are not finite: lower the learning rates (lr_d, lr_g)")
    return GanResult(d_loss=d_loss, g_loss=g_loss, steps=settings.steps, num_examples=len(data),
                     seconds=time.perf_counter() - t0, dp_steps=dp_steps)


class _Loop:
    """What the plain and the private loops share: the generator's optimizer, noise and loss sums."""

    def __init__(self, gen: Generator, settings: GanSettings, device: torch.device, rng: torch.Generator):
        self.gen, self.settings, self.device, self.rng = gen, settings, device, rng
        self.g_opt = Adam(gen.parameters(), lr=settings.lr_g, betas=settings.betas)
        self.d_sum = self.g_sum = 0.0
        self.pairs = 0

    def latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.gen.latent_dim, generator=self.rng).to(self.device)

    def d_losses(self, disc: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)
        rows = discriminator_losses(disc, self.gen, x, y, self.latent(len(y)))
        self.d_sum += float(rows.detach().sum())
        self.pairs += len(y)
        return rows

    def g_step(self, disc: nn.Module) -> None:
        """A generator step on uniformly drawn labels (public: never the site's)."""
        n = self.settings.batch_size
        y = torch.randint(self.gen.num_classes, (n,), generator=self.rng).to(self.device)
        self.g_sum += generator_step(self.gen, disc, self.g_opt, y, self.latent(n))


def _plain_steps(loop: _Loop, disc: Discriminator, data: ImageSplit) -> int:
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    s = loop.settings
    d_opt = Adam(disc.parameters(), lr=s.lr_d, betas=s.betas)
    for idx in _batches(len(data), s.batch_size, s.steps, loop.rng):
        d_opt.zero_grad()
        rows = loop.d_losses(disc, images[idx], labels[idx])
        (rows.sum() / len(idx)).backward()  # the mean pair loss
        d_opt.step()
        loop.g_step(disc)
    return 0


def _private_steps(loop: _Loop, disc: Discriminator, data: ImageSplit, dp: DPSettings) -> int:
    """DP-SGD discriminator steps on Poisson batches; returns the noisy steps taken (= steps)."""
    from medfed.common.dp.engine import noise_only_step
    from medfed.common.generation.private import (
        fold_paired_grad_samples,
        private_discriminator,
    )

    s = loop.settings
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    private = private_discriminator(disc, images, labels, s.steps, dp, s.lr_d, s.betas)
    try:
        for x, y in private.batches:  # physical chunks of Poisson batches
            private.optimizer.zero_grad(set_to_none=True)
            before = private.counter.steps
            if len(y) == 0:  # an empty Poisson batch: a noise-only discriminator step
                noise_only_step(private.optimizer)
            else:
                rows = loop.d_losses(private.module, x, y)
                rows.mean().backward()  # Opacus rescales by the 2b rows: each row keeps its own gradient
                fold_paired_grad_samples(private.module, len(y))
                private.optimizer.step()  # noisy only after a Poisson batch's last chunk
            if private.counter.steps > before:
                private.optimizer.zero_grad(set_to_none=True)  # no per-sample state into the G step
                loop.g_step(private.module)
    finally:
        private.close()
    if private.counter.steps != s.steps:
        raise RuntimeError(
            f"the discriminator took {private.counter.steps} noisy steps for {s.steps} planned: "
            "the privacy accounting would not match the training"
        )
    return private.counter.steps


def _check_data(gen: Generator, disc: Discriminator, data: ImageSplit) -> None:
    if len(data) == 0:
        raise DataError("this site has no training images: check its data file and split")
    want = (gen.channels, gen.image_size, gen.image_size)
    if data.image_shape != want or (disc.channels, disc.image_size, disc.image_size) != want:
        raise DataError(
            f"images of shape {data.image_shape} do not fit the GAN built for {want}: "
            "build the GAN from the dataset's channels and image size"
        )
    if int(data.labels.max()) >= min(gen.num_classes, disc.num_classes):
        raise DataError(
            f"label {int(data.labels.max())} is out of range for a GAN with "
            f"{min(gen.num_classes, disc.num_classes)} classes: build it with the dataset's num_classes"
        )

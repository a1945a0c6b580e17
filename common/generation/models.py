"""A small conditional DCGAN for 28, 32 and 64 px images, safe for DP-SGD on the discriminator.

The generator maps a latent vector ``z`` concatenated with a class embedding to an image in
``[0, 1]`` (sigmoid output), by a linear projection and 2 (28, 32 px) or 3 (64 px)
transposed-convolution upsamplings. The discriminator is a strided CNN whose flattened
features ``h`` give a logit ``w·h + b + e_y·h``: the class enters by projection (Miyato &
Koyama, "cGANs with projection discriminator", ICLR 2018) through an ``nn.Embedding``, a
layer Opacus computes exact per-sample gradients for.

Both networks use GroupNorm (never BatchNorm, whose running statistics would be computed
from private batches) and activations with ``inplace=False`` (Opacus's hooks break on
in-place operations). With the default widths a 28 px, 10-class GAN has about 145k
generator and 70k discriminator parameters: a few seconds per hundred steps on a CPU core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from medfed.common.errors import ConfigError
from torch import nn

IMAGE_SIZES = (28, 32, 64)
CHANNELS = (1, 3)
GROUPS = 8
LEAKY_SLOPE = 0.2


@dataclass(frozen=True, kw_only=True)
class GanSpec:
    """Everything needed to rebuild a GAN: stored with its weights and its samples."""

    latent_dim: int = 64
    num_classes: int
    channels: int
    image_size: int

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{f.name} must be an integer, got {value!r}")
        if problems:
            raise ConfigError("invalid GanSpec: " + "; ".join(problems))
        if self.latent_dim < 1:
            problems.append(f"latent_dim={self.latent_dim} must be >= 1")
        if self.num_classes < 2:
            problems.append(
                f"num_classes={self.num_classes} must be >= 2 (a conditional GAN generates per class)"
            )
        if self.channels not in CHANNELS:
            problems.append(
                f"channels={self.channels} is not supported: use 1 (grey) or 3 (RGB) images"
            )
        if self.image_size not in IMAGE_SIZES:
            problems.append(
                f"image_size={self.image_size} is not supported: use one of "
                f"{', '.join(map(str, IMAGE_SIZES))} (resize the images first)"
            )
        if problems:
            raise ConfigError("invalid GanSpec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GanSpec:
        """Rebuild a spec from :meth:`to_dict`'s output; unknown or missing keys are refused."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a GanSpec must be a mapping of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = known - {"latent_dim"}
        problems = []
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(f"unknown keys {unknown} (known: {sorted(known)})")
        missing = sorted(required - set(data))
        if missing:
            problems.append(f"missing keys {missing}")
        if problems:
            raise ConfigError("invalid GanSpec: " + "; ".join(problems))
        return cls(**dict(data))


def _upsamplings(image_size: int) -> int:
    """2 doublings from 7 (28 px) or 8 (32 px), 3 from 8 (64 px)."""
    return 3 if image_size == 64 else 2


class Generator(nn.Module):
    """``(z, y) -> image`` in ``[0, 1]``; ``z`` is ``(N, latent_dim)``, ``y`` int64 ``(N,)``."""

    def __init__(self, latent_dim: int = 64, num_classes: int = 2, channels: int = 1,
                 image_size: int = 28, width: int = 32, embed_dim: int = 16):
        super().__init__()
        GanSpec(latent_dim=latent_dim, num_classes=num_classes, channels=channels, image_size=image_size)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        ups = _upsamplings(image_size)
        base = image_size // 2**ups
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Sequential(
            nn.Linear(latent_dim + embed_dim, width * base * base),
            nn.Unflatten(1, (width, base, base)),
            nn.GroupNorm(GROUPS, width),
            nn.ReLU(inplace=False),
        )
        blocks: list[nn.Module] = []
        for _ in range(ups - 1):
            blocks += [
                nn.ConvTranspose2d(width, width, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(GROUPS, width),
                nn.ReLU(inplace=False),
            ]
        self.upsample = nn.Sequential(*blocks)
        # DCGAN's last layer: the final doubling straight to image channels (a full-resolution
        # convolution after it costs 3x the time of the whole generator on a CPU).
        self.out = nn.Sequential(
            nn.ConvTranspose2d(width, channels, kernel_size=4, stride=2, padding=1), nn.Sigmoid()
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(y)], dim=1))
        return self.out(self.upsample(h))


class Discriminator(nn.Module):
    """``(image, y) -> logit`` ``(N,)``: high for real images of class ``y``."""

    def __init__(self, num_classes: int = 2, channels: int = 1, image_size: int = 28, width: int = 32):
        super().__init__()
        GanSpec(num_classes=num_classes, channels=channels, image_size=image_size)
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        ups = _upsamplings(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=False),
        ]
        c_in = width
        for _ in range(ups - 1):
            layers += [
                nn.Conv2d(c_in, 2 * width, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(GROUPS, 2 * width),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=False),
            ]
            c_in = 2 * width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        size = image_size // 2**ups
        feat = c_in * size * size
        self.head = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat)
        # Small class embeddings: the projection term starts near 0 instead of saturating the logit.
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)


def build_gan(spec: GanSpec) -> tuple[Generator, Discriminator]:
    """A fresh generator and discriminator for ``spec`` (seed torch first for reproducible weights)."""
    gen = Generator(spec.latent_dim, spec.num_classes, spec.channels, spec.image_size)
    disc = Discriminator(spec.num_classes, spec.channels, spec.image_size)
    return gen, disc


def check_matches(spec: GanSpec, gen: nn.Module) -> None:
    """Raise ConfigError unless ``gen`` is a :class:`Generator` built for ``spec``."""
    if not isinstance(gen, Generator):
        raise ConfigError(f"expected a medfed Generator, got {type(gen).__name__}: build it with build_gan(spec)")
    got = GanSpec(latent_dim=gen.latent_dim, num_classes=gen.num_classes, channels=gen.channels,
                  image_size=gen.image_size)
    if got != spec:
        raise ConfigError(
            f"the generator was built for {got.to_dict()} but the spec says {spec.to_dict()}: "
            "use the spec stored with the generator's weights"
        )


class ConditionalGAN(nn.Module):
    """Generator and discriminator in one module, so that one state_dict travels and is aggregated.

    Federated GAN training averages both networks every round (``generator.*`` and
    ``discriminator.*`` keys); the site trains them with :func:`~.train.gan_round`.
    """

    def __init__(self, spec: GanSpec):
        super().__init__()
        self.spec = spec
        self.generator, self.discriminator = build_gan(spec)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Generated images for latent codes ``z`` and labels ``y``."""
        return self.generator(z, y)

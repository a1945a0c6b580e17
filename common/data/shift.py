"""Acquisition shift: each simulated site gets its own "scanner", built from MONAI transforms.

A scanner is a fixed chain applied once to every image of the site (train, val and test)
when the site's data is built:

1. resolution: ``Resize`` down by ``resolution`` (area) and back up (bilinear),
2. blur: ``GaussianSmooth`` with ``blur_sigma`` pixels (relative to a 28-px image),
3. gamma: ``AdjustContrast(gamma)`` over each image's own intensity range,
4. window: ``ScaleIntensityRange`` mapping [0, 1] to [``low``, ``high``] (contrast/offset),
5. noise: ``RandGaussianNoise`` with std ``noise_std``, seeded per site and split,

then clipped to [0, 1]. :func:`scanner_profiles` draws site ``k``'s parameters from
``(seed, k)`` alone (the same for any number of sites); ``strength`` scales every
deviation from the identity (0: no shift, 1: default, 2: strong). Labels and groups are
never touched.

MONAI is imported inside the functions: the ClientApp module must stay importable
without it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
from medfed.common.data.splits import ImageSplit, SiteData
from medfed.common.errors import ConfigError

__all__ = ["SHIFTS", "ScannerProfile", "apply_scanner", "scanner_profiles", "shift_sites"]

log = logging.getLogger(__name__)

SHIFTS = ("none", "scanner")
_TAG = 0x5CA4  # separates the scanner random streams from the partition ones


@dataclass(frozen=True)
class ScannerProfile:
    """One site's acquisition parameters (identity: 1, 0, 1, 0, 1, 0)."""

    resolution: float  # fraction of the side kept before upsampling, 0.25..1
    blur_sigma: float  # Gaussian blur in pixels at 28 px (scaled with the image side)
    gamma: float  # AdjustContrast exponent
    low: float  # intensity window: 0 maps to low ...
    high: float  # ... and 1 to high
    noise_std: float  # additive Gaussian noise

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


def scanner_profiles(num_sites: int, seed: int, strength: float = 1.0) -> list[ScannerProfile]:
    """Seeded scanner parameters for sites ``0..num_sites-1`` (see module docstring)."""
    if not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ConfigError(f"num-sites={num_sites!r} is out of range: allowed integers >= 1")
    _check_strength(strength)
    s = float(strength)
    out = []
    for k in range(num_sites):
        u = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG], spawn_key=(k,))).random(6)
        out.append(ScannerProfile(
            resolution=float(max(0.25, 1.0 - 0.5 * s * u[0])),
            blur_sigma=float(0.8 * s * u[1]),
            gamma=float(np.exp(0.4 * s * (2.0 * u[2] - 1.0))),
            low=float(min(0.4, 0.12 * s * u[3])),
            high=float(max(0.6, 1.0 - 0.12 * s * u[4])),
            noise_std=float(0.04 * s * u[5]),
        ))
    return out


def apply_scanner(split: ImageSplit, profile: ScannerProfile, seed: int) -> ImageSplit:
    """``split`` as ``profile``'s scanner would record it (new arrays; labels, groups kept)."""
    from monai.transforms import (
        AdjustContrast,
        GaussianSmooth,
        RandGaussianNoise,
        Resize,
        ScaleIntensityRange,
    )

    n, c, h, w = split.images.shape
    if n == 0:
        return split
    x = split.images.reshape(n * c, h, w)  # channel-first: every image channel is one "channel"
    small = (max(2, int(round(h * profile.resolution))), max(2, int(round(w * profile.resolution))))
    if small != (h, w):
        x = Resize(small, mode="area")(x)
        x = Resize((h, w), mode="bilinear", align_corners=False)(x)
    sigma = profile.blur_sigma * h / 28.0
    if sigma >= 0.05:
        x = GaussianSmooth(sigma=sigma)(x)
    x = np.asarray(x, dtype=np.float32)
    if abs(profile.gamma - 1.0) > 1e-6:
        gamma = AdjustContrast(gamma=profile.gamma)
        x = np.stack([np.asarray(gamma(img[None]), dtype=np.float32)[0] for img in x])
    x = ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=profile.low, b_max=profile.high)(x)
    if profile.noise_std > 0:
        noise = RandGaussianNoise(prob=1.0, std=profile.noise_std, sample_std=False)
        noise.set_random_state(seed=int(seed) % 2**32)
        x = noise(x)
    images = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0).reshape(n, c, h, w)
    return ImageSplit(images, split.labels, split.groups)


def shift_sites(sites: tuple[SiteData, ...] | list[SiteData], seed: int,
                strength: float = 1.0) -> tuple[SiteData, ...]:
    """Every site's train/val/test through its own scanner (site ``k``: profile ``k``)."""
    profiles = scanner_profiles(len(sites), seed, strength)
    out = []
    for k, (site, profile) in enumerate(zip(sites, profiles)):
        seeds = np.random.SeedSequence([int(seed), _TAG + 1], spawn_key=(k,)).generate_state(3)
        out.append(SiteData(
            site.site_id,
            *(apply_scanner(split, profile, int(s))
              for split, s in zip((site.train, site.val, site.test), seeds)),
        ))
        log.debug("site %s scanner: %s", site.site_id, profile.as_dict())
    return tuple(out)


def _check_strength(strength: float) -> None:
    if not np.isfinite(strength) or not 0.0 <= strength <= 3.0:
        raise ConfigError(
            f"shift-strength={strength} is out of range: allowed 0..3 "
            "(0 = identical scanners, 1 = default, 2 = strong)"
        )

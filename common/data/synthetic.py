"""Seeded synthetic chest-like images for offline runs and tests, with known ground truth.

Each image is a smooth background with two dark "lung" ellipses and low-frequency
anatomical texture. Label 1 (disease) adds a blurred bright opacity of amplitude
``disease_signal`` (times a per-image factor in 0.6..1.0) at a random place in one lung.

Sites differ the way hospitals do: acquisition ``site_contrast`` and ``site_noise``,
disease prevalence (``0.5 ± label_skew``, spread over the sites), size (decreasing:
600, 400, 267, 178, ... never below 100) and the fraction of group 1 (``group_fraction``).
Every image has a demographic group (``sex``: 0 = female, 1 = male), independent of the
label within a site; ``group_contrast[g]`` scales the lesion amplitude of group ``g``, so
a bias study knows which subgroup is truly harder. Each site is split 70/10/20 into
train/val/test, stratified by label. ``central_val`` / ``central_test`` are the
concatenated site val / test splits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medfed.common.data.partition import stratified_split
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError

__all__ = ["SYNTHETIC_INFO_NAME", "default_site_sizes", "make_synthetic"]

SYNTHETIC_INFO_NAME = "synthetic"
_SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
_MIN_SITE_SIZE = 20


def default_site_sizes(num_sites: int) -> list[int]:
    """Decreasing site sizes: 600 * (2/3)**k, at least 100 (600, 400, 267, 178, 119, ...)."""
    return [max(100, int(round(600 * (2 / 3) ** k))) for k in range(num_sites)]


def make_synthetic(
    num_sites: int = 4,
    seed: int = 0,
    image_size: int = 28,
    samples_per_site: Sequence[int] | None = None,
    disease_signal: float = 1.0,
    label_skew: float = 0.3,
    site_contrast: Sequence[float] | None = None,
    site_noise: Sequence[float] | None = None,
    group_contrast: Sequence[float] = (1.0, 1.0),
    group_fraction: Sequence[float] | None = None,
) -> FederatedData:
    """Generate a seeded federated dataset of ``num_sites`` synthetic sites (see module doc)."""
    sizes, contrast, noise, gfrac, gcon = _check_args(
        num_sites, image_size, samples_per_site, disease_signal, label_skew,
        site_contrast, site_noise, group_contrast, group_fraction,
    )
    prevalence = 0.5 + label_skew * _spread(num_sites)
    site_seeds = np.random.SeedSequence(seed).spawn(num_sites)
    sites = []
    for k in range(num_sites):
        rng = np.random.default_rng(site_seeds[k])
        labels, groups = _labels_and_groups(sizes[k], prevalence[k], gfrac[k], rng)
        images = _render(labels, groups, image_size, disease_signal, gcon, rng)
        images = _acquire(images, contrast[k], noise[k], rng)
        split = ImageSplit(images, labels, groups)
        tr, va, te = stratified_split(labels, _SPLIT_FRACTIONS, int(rng.integers(2**31)))
        sites.append(SiteData(f"site-{k}", split.subset(tr), split.subset(va), split.subset(te)))
    info = DatasetInfo(
        name=SYNTHETIC_INFO_NAME,
        num_classes=2,
        in_channels=1,
        image_size=image_size,
        label_names=("normal", "disease"),
        group_name="sex",
        group_values=("female", "male"),
    )
    return FederatedData(
        info=info,
        sites=tuple(sites),
        central_test=ImageSplit.concat([s.test for s in sites]),
        central_val=ImageSplit.concat([s.val for s in sites]),
    )


# ---------------------------------------------------------------------------- generation


def _spread(k: int) -> np.ndarray:
    """``k`` values from -1 to 1 (0 for a single site)."""
    return np.linspace(-1.0, 1.0, k) if k > 1 else np.zeros(1)


def _labels_and_groups(
    n: int, prevalence: float, male_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts (not Bernoulli draws) so every site holds both labels and both groups."""
    n_pos = int(np.clip(round(n * prevalence), 5, n - 5))
    labels = np.zeros(n, np.int64)
    labels[:n_pos] = 1
    groups = np.zeros(n, np.int64)
    for idx in (np.arange(n_pos), np.arange(n_pos, n)):  # same group mix in both labels
        n_male = int(np.clip(round(len(idx) * male_fraction), 1, len(idx) - 1))
        groups[rng.permutation(idx)[:n_male]] = 1
    perm = rng.permutation(n)
    return labels[perm], groups[perm]


def _render(
    labels: np.ndarray,
    groups: np.ndarray,
    size: int,
    signal: float,
    group_contrast: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Noise-free images (N, 1, S, S) before the site's acquisition model."""
    n = len(labels)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = axis[None, :, None], axis[None, None, :]

    # background: brightness, a vertical gradient, and low-frequency texture
    img = 0.62 + 0.04 * rng.standard_normal((n, 1, 1)) + 0.06 * yy
    img = img + 0.06 * _smooth_field(n, size, rng)
    # two dark lungs, jittered per image
    lung_masks = []
    for side in (-1.0, 1.0):
        cx = side * 0.42 + 0.04 * rng.standard_normal((n, 1, 1))
        cy = -0.05 + 0.05 * rng.standard_normal((n, 1, 1))
        rx = 0.30 * (1 + 0.08 * rng.standard_normal((n, 1, 1)))
        ry = 0.62 * (1 + 0.08 * rng.standard_normal((n, 1, 1)))
        d2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        lung_masks.append((cx, cy, rx, ry))
        img = img - 0.32 * _soft_step(d2)

    # disease: a blurred opacity at a random place inside one lung
    sick = labels == 1
    side = rng.integers(0, 2, n)
    cx = np.where(side == 0, lung_masks[0][0][:, 0, 0], lung_masks[1][0][:, 0, 0])
    cy = np.where(side == 0, lung_masks[0][1][:, 0, 0], lung_masks[1][1][:, 0, 0])
    rx = np.where(side == 0, lung_masks[0][2][:, 0, 0], lung_masks[1][2][:, 0, 0])
    ry = np.where(side == 0, lung_masks[0][3][:, 0, 0], lung_masks[1][3][:, 0, 0])
    r = 0.6 * np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * np.pi, n)
    lx, ly = cx + r * rx * np.cos(t), cy + r * ry * np.sin(t)
    sigma = rng.uniform(0.10, 0.20, n)
    amp = 0.40 * signal * group_contrast[groups] * rng.uniform(0.6, 1.0, n) * sick
    blob = np.exp(
        -((xx - lx[:, None, None]) ** 2 + (yy - ly[:, None, None]) ** 2)
        / (2 * sigma[:, None, None] ** 2)
    )
    img = img + amp[:, None, None] * blob
    return img.astype(np.float32)[:, None]


def _acquire(images: np.ndarray, contrast: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Site acquisition: contrast around mid-grey, additive Gaussian noise, clip to [0, 1]."""
    out = 0.5 + contrast * (images - 0.5)
    out += noise * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _soft_step(d2: np.ndarray) -> np.ndarray:
    """1 inside an ellipse (d2 < 1), 0 outside, with a smooth edge."""
    return 1.0 / (1.0 + np.exp((d2 - 1.0) * 8.0))


def _smooth_field(n: int, size: int, rng: np.random.Generator, coarse: int = 5) -> np.ndarray:
    """Per-image low-frequency texture (N, S, S): coarse Gaussian noise, bilinearly upsampled."""
    grid = rng.standard_normal((n, coarse, coarse)).astype(np.float32)
    pos = np.linspace(0, coarse - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    w = (pos - lo).astype(np.float32)
    up = np.zeros((size, coarse), np.float32)  # interpolation matrix
    up[np.arange(size), lo] = 1 - w
    up[np.arange(size), lo + 1] = w
    return np.einsum("ia,nab,jb->nij", up, grid, up, optimize=True)


# ---------------------------------------------------------------------------- validation


def _check_args(
    num_sites: int,
    image_size: int,
    samples_per_site: Sequence[int] | None,
    disease_signal: float,
    label_skew: float,
    site_contrast: Sequence[float] | None,
    site_noise: Sequence[float] | None,
    group_contrast: Sequence[float],
    group_fraction: Sequence[float] | None,
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    problems: list[str] = []
    if not isinstance(num_sites, (int, np.integer)) or not 1 <= num_sites <= 1000:
        raise ConfigError(f"num_sites={num_sites!r} is out of range: allowed 1..1000")
    if not 8 <= image_size <= 512:
        problems.append(f"image_size={image_size} is out of range: allowed 8..512")
    if samples_per_site is None:
        sizes = default_site_sizes(num_sites)
    else:
        sizes = [int(s) for s in samples_per_site]
        if len(sizes) != num_sites or min(sizes, default=0) < _MIN_SITE_SIZE:
            problems.append(
                f"samples_per_site={list(samples_per_site)} must give {num_sites} sizes, "
                f"each >= {_MIN_SITE_SIZE} (so every split holds both labels)"
            )
    if not 0.0 <= disease_signal <= 10.0:
        problems.append(f"disease_signal={disease_signal} is out of range: allowed 0..10")
    if not 0.0 <= label_skew <= 0.45:
        problems.append(
            f"label_skew={label_skew} is out of range: allowed 0..0.45 (prevalence 0.5 ± skew)"
        )
    contrast = _per_site("site_contrast", site_contrast, np.linspace(0.7, 1.2, num_sites),
                         num_sites, 0.05, 5.0, problems)
    noise = _per_site("site_noise", site_noise, np.linspace(0.03, 0.12, num_sites),
                      num_sites, 0.0, 1.0, problems)
    gfrac = _per_site("group_fraction", group_fraction, 0.5 + 0.2 * _spread(num_sites)[::-1],
                      num_sites, 0.05, 0.95, problems)
    gcon = np.asarray(group_contrast, dtype=np.float64)
    if gcon.shape != (2,) or (gcon < 0).any() or (gcon > 10).any():
        problems.append(
            f"group_contrast={list(group_contrast)} must be 2 numbers in 0..10 "
            "(lesion contrast multiplier for female, male)"
        )
    if problems:
        raise ConfigError("make_synthetic: " + "; ".join(problems))
    if num_sites == 1 and site_contrast is None:
        contrast = np.ones(1)
    return sizes, contrast, noise, gfrac, gcon


def _per_site(
    name: str,
    given: Sequence[float] | None,
    default: np.ndarray,
    num_sites: int,
    low: float,
    high: float,
    problems: list[str],
) -> np.ndarray:
    values = default if given is None else np.asarray(given, dtype=np.float64)
    if values.shape != (num_sites,) or (values < low).any() or (values > high).any():
        problems.append(f"{name}={list(values)} must give {num_sites} values in {low}..{high}")
    return values

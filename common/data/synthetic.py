"""Seeded synthetic chest-like images for offline runs and tests, with known ground truth.

Each image is a smooth background with two dark "lung" ellipses and low-frequency
anatomical texture. Label 1 (disease) adds a blurred bright opacity (Gaussian, sigma 2-3.5 px
at 28 px) of amplitude ``0.7 * disease_signal`` (times a per-image factor in 0.6..1.0) at a
random place in one lung. With the defaults a small CNN reaches a pooled test AUC of about
0.9-0.98 within 2 epochs; lower ``disease_signal`` makes the task harder.

Sites differ the way hospitals do: acquisition contrast around mid-grey (default 0.7..1.2,
in the order low, high, 2nd lowest, ... so it is not monotone in the site index), additive
noise (default std 0.03..0.12, increasing with the site index), disease prevalence
(``0.5 + label_skew * linspace(-1, 1)``: 0.2, 0.4, 0.6, 0.8 for 4 sites), size (decreasing:
600, 400, 267, 178, ... never below 100) and the fraction of group 1 (``group_fraction``,
default 0.7 down to 0.3).
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

__all__ = ["default_site_sizes", "make_synthetic"]

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
        name="synthetic",
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


def _zigzag(low: float, high: float, k: int) -> np.ndarray:
    """``k`` evenly spaced values from ``low`` to ``high``, ordered low, high, 2nd, 2nd-last, ...

    Used for the default site contrast so that it is not monotone in the site index like
    prevalence and noise are (which would confound label and acquisition across sites).
    """
    values = np.linspace(low, high, k)
    order = [i // 2 if i % 2 == 0 else k - 1 - i // 2 for i in range(k)]
    return values[order]


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
    """Noise-free images (N, 1, S, S) before the site's acquisition model (float32)."""
    n = len(labels)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)

    def normal(scale: float, loc: float = 0.0) -> np.ndarray:  # per-image (N, 1, 1) float32
        return (loc + scale * rng.standard_normal((n, 1, 1))).astype(np.float32)

    # background: brightness, a vertical gradient, and low-frequency texture
    img = normal(0.04, 0.62) + np.float32(0.06) * axis[None, :, None]
    img = img + np.float32(0.04) * _smooth_field(n, size, rng)
    # two dark lungs (ellipses), jittered per image; lungs[side] = (cx, cy, rx, ry)
    lungs = []
    for side in (-1.0, 1.0):
        cx, cy = normal(0.04, side * 0.42), normal(0.05, -0.05)
        rx, ry = normal(0.024, 0.30), normal(0.05, 0.62)
        d2 = ((axis[None, None, :] - cx) / rx) ** 2 + ((axis[None, :, None] - cy) / ry) ** 2
        img -= np.float32(0.32) * _soft_step(d2)
        lungs.append(np.stack([a[:, 0, 0] for a in (cx, cy, rx, ry)]))

    # disease: a blurred opacity at a random place inside one lung
    side = rng.integers(0, 2, n)
    cx, cy, rx, ry = np.where(side == 0, lungs[0], lungs[1])
    r = 0.6 * np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * np.pi, n)
    lx, ly = cx + r * rx * np.cos(t), cy + r * ry * np.sin(t)
    sigma = rng.uniform(0.15, 0.25, n)
    amp = 0.7 * signal * group_contrast[groups] * rng.uniform(0.6, 1.0, n) * (labels == 1)
    gx = np.exp(-((axis[None, :] - lx[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    gy = np.exp(-((axis[None, :] - ly[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    blob = (amp[:, None] * gy)[:, :, None] * gx[:, None, :]  # separable Gaussian
    img += blob.astype(np.float32)
    return img[:, None]


def _acquire(
    images: np.ndarray, contrast: float, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Site acquisition: contrast around mid-grey, additive Gaussian noise, clip to [0, 1]."""
    out = images - np.float32(0.5)
    out *= np.float32(contrast)
    out += np.float32(0.5)
    out += np.float32(noise) * rng.standard_normal(images.shape, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def _soft_step(d2: np.ndarray) -> np.ndarray:
    """1 inside an ellipse (d2 < 1), 0 outside, with a smooth edge."""
    z = np.minimum((d2 - np.float32(1.0)) * np.float32(8.0), np.float32(60.0))  # no overflow
    return np.float32(1.0) / (np.float32(1.0) + np.exp(z))


def _smooth_field(n: int, size: int, rng: np.random.Generator, coarse: int = 5) -> np.ndarray:
    """Per-image low-frequency texture (N, S, S): coarse Gaussian noise, bilinearly upsampled."""
    grid = rng.standard_normal((n, coarse, coarse)).astype(np.float32)
    pos = np.linspace(0, coarse - 1, size)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    w = (pos - lo).astype(np.float32)
    up = np.zeros((size, coarse), np.float32)  # interpolation matrix
    up[np.arange(size), lo] = 1 - w
    up[np.arange(size), lo + 1] = w
    return np.matmul(np.matmul(up, grid), up.T)


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
    default_contrast = _zigzag(0.7, 1.2, num_sites) if num_sites > 1 else np.ones(1)
    contrast = _per_site("site_contrast", site_contrast, default_contrast,
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

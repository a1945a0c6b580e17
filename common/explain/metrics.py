"""Interpretability aggregates a site may share: where the model's saliency mass lies, never a map of an image.

For each image the saliency map (:mod:`medfed.common.explain.saliency`, Grad-CAM by default)
is turned into a distribution of mass over its pixels (a map without mass, e.g. Grad-CAM of
a saturated score, is left out and not counted). From those a site computes, per split:

- **border share** (``explain-border``): the mean share of mass in the outer band of the
  image, ``band`` of the side on each side (default 10 %: 3 px of 28), where burned-in
  text, rulers and laterality markers sit (DeGrave et al., Nat. Mach. Intell. 2021);
  its standard deviation over the images (``explain-border-sd``) lets the server judge
  how far a site's mean may wander by sampling alone;
- **mask share** (``explain-mask``): when the images have masks, the mean share of mass
  inside the mask (the energy-based pointing game of Wang et al., Score-CAM, 2020);
- **per class** ``k`` (``c{k}-explain-*``): the border share of the class's own images and
  their coarse map, the mean over them of the mass in each cell of an 8x8 grid (4x4x4 for
  volumes): 64 shares adding up to 1. A shortcut goes with a label and sits in one place, so
  the server's flag (``server/explain.py``) reads the border cells of the per-class maps.

k-anonymity: nothing is sent for a split, a class or a group with fewer than
:data:`~medfed.common.constants.MIN_GROUP_SAMPLES` images, the rule the fairness counts follow.
"""

from __future__ import annotations

import math

import numpy as np
from medfed.common.constants import (
    EXPLAIN_BORDER,
    EXPLAIN_BORDER_SD,
    EXPLAIN_CELLS,
    EXPLAIN_GRID,
    EXPLAIN_MAP,
    EXPLAIN_MASK,
    EXPLAIN_MASK_N,
    EXPLAIN_N,
    MAX_EXPLAIN_CLASSES,
    MAX_GROUPS,
    MIN_GROUP_SAMPLES,
    explain_class_key,
    group_metric_key,
)
from medfed.common.errors import ConfigError

DEFAULT_BAND = 0.1


def check_band(band: float) -> float:
    if not 0.0 < band < 0.5:
        raise ConfigError(f"explain-band={band} is out of range: give the border band's share of the side "
                          "per side, in (0, 0.5) (default 0.1)")
    return float(band)


def band_width(side: int, band: float) -> int:
    """Pixels of the border band on each side: at least 1, at most just under half the side."""
    return max(1, min(int(math.ceil(check_band(band) * side)), (side - 1) // 2))


def border_region(shape: tuple[int, ...], band: float = DEFAULT_BAND) -> np.ndarray:
    """Boolean mask of the outer band of an image (or volume) of spatial ``shape``."""
    inner = np.zeros(shape, dtype=bool)
    inner[tuple(slice(band_width(s, band), s - band_width(s, band)) for s in shape)] = True
    return ~inner


def mass(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps scaled to total mass 1 per image, which images had any mass) for maps (N, *spatial) >= 0."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.size and float(maps.min()) < 0:
        raise ValueError("saliency maps must be non-negative")
    totals = maps.reshape(len(maps), -1).sum(1)
    ok = np.isfinite(totals) & (totals > 0)
    shaped = totals.reshape(-1, *([1] * (maps.ndim - 1)))
    return np.where(ok.reshape(shaped.shape), maps / np.where(shaped > 0, shaped, 1.0), 0.0), ok


def region_shares(dist: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per image: the share of its mass inside ``region`` (one region for all, or one per image)."""
    region = np.broadcast_to(np.asarray(region, dtype=bool), dist.shape)
    return (dist * region).reshape(len(dist), -1).sum(1)


def coarse_maps(dist: np.ndarray) -> np.ndarray:
    """Mass per cell of an 8x8 grid (4x4x4 for volumes): (N, 64), each row adding up to its mass."""
    spatial = dist.shape[1:]
    grid = EXPLAIN_GRID if len(spatial) == 2 else round(EXPLAIN_CELLS ** (1 / 3))
    out = np.zeros((len(dist), grid ** len(spatial)))
    edges = [np.linspace(0, s, grid + 1).round().astype(int) for s in spatial]
    cells = np.stack(np.meshgrid(*[np.arange(grid)] * len(spatial), indexing="ij"), -1).reshape(-1, len(spatial))
    for j, cell in enumerate(cells):
        sl = tuple(slice(int(e[c]), max(int(e[c + 1]), int(e[c]) + 1)) for e, c in zip(edges, cell))
        out[:, j] = dist[(slice(None), *sl)].reshape(len(dist), -1).sum(1)
    return out


def _border_stats(border: np.ndarray) -> tuple[float, float]:
    return float(border.mean()), float(border.std())


def explain_aggregates(maps: np.ndarray, labels: np.ndarray, split: str, band: float = DEFAULT_BAND,
                       groups: np.ndarray | None = None, masks: np.ndarray | None = None,
                       min_samples: int = MIN_GROUP_SAMPLES) -> dict[str, float | list[float]]:
    """The aggregates a site sends for one split (module doc); {} when fewer than ``min_samples`` images count."""
    dist, ok = mass(maps)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(dist):
        raise ValueError(f"{len(dist)} saliency maps for {len(labels)} labels")
    n = int(ok.sum())
    if n < min_samples:
        return {}
    border = region_shares(dist, border_region(dist.shape[1:], band))
    mean, sd = _border_stats(border[ok])
    out: dict[str, float | list[float]] = {f"{split}-{EXPLAIN_N}": float(n), f"{split}-{EXPLAIN_BORDER}": mean,
                                           f"{split}-{EXPLAIN_BORDER_SD}": sd}
    if masks is not None:
        masks = np.asarray(masks).reshape(dist.shape) > 0
        has = ok & masks.reshape(len(masks), -1).any(1)
        if int(has.sum()) >= min_samples:
            out[f"{split}-{EXPLAIN_MASK}"] = float(region_shares(dist[has], masks[has]).mean())
            out[f"{split}-{EXPLAIN_MASK_N}"] = float(has.sum())
    cells = coarse_maps(dist)
    for c in range(min(int(labels.max()) + 1 if len(labels) else 0, MAX_EXPLAIN_CLASSES)):
        sel = ok & (labels == c)
        if int(sel.sum()) < min_samples:
            continue
        mean, sd = _border_stats(border[sel])
        cell_mean = cells[sel].mean(0)
        out.update({explain_class_key(split, c, EXPLAIN_N): float(sel.sum()),
                    explain_class_key(split, c, EXPLAIN_BORDER): mean,
                    explain_class_key(split, c, EXPLAIN_BORDER_SD): sd,
                    explain_class_key(split, c, EXPLAIN_MAP): [float(v) for v in cell_mean / cell_mean.sum()]})
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        for g in range(MAX_GROUPS):
            sel = ok & (groups == g)
            if int(sel.sum()) >= min_samples:
                out[group_metric_key(split, g, EXPLAIN_BORDER)] = float(border[sel].mean())
                out[group_metric_key(split, g, EXPLAIN_N)] = float(sel.sum())
    return out


def explain_problem(metrics: dict) -> str | None:
    """Why the explain aggregates in ``metrics`` are malformed (checked at both ends), or None."""
    from medfed.common.constants import EXPLAIN_COUNT_KEYS, EXPLAIN_MAP_KEYS, EXPLAIN_SHARE_KEYS

    for name, value in metrics.items():
        if name in EXPLAIN_MAP_KEYS:
            if not isinstance(value, list) or len(value) != EXPLAIN_CELLS:
                return f"coarse saliency map {name} must be a list of {EXPLAIN_CELLS} shares"
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in value):
                return f"coarse saliency map {name} holds a value outside 0..1"
            if abs(sum(value) - 1.0) > 1e-3:
                return f"coarse saliency map {name} does not add up to 1"
            count = metrics.get(name.removesuffix(EXPLAIN_MAP) + EXPLAIN_N)
            if count is None or count < MIN_GROUP_SAMPLES:
                return f"coarse saliency map {name} comes without a count of at least {MIN_GROUP_SAMPLES} images"
        elif name in EXPLAIN_SHARE_KEYS and not 0.0 <= value <= 1.0:
            return f"saliency share {name} is outside 0..1"
        elif name in EXPLAIN_COUNT_KEYS and value < MIN_GROUP_SAMPLES:
            return f"explain count {name} is below the k-anonymity floor of {MIN_GROUP_SAMPLES} images"
    return None

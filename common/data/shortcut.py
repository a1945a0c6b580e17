"""A planted shortcut: a bright bar near the border of one simulated site's positive images.

The classic failure of chest X-ray models trained on data pooled from several hospitals is
a shortcut: a laterality token, a text marker or a border artefact that one hospital burns
into its images and that happens to go with the label (DeGrave et al., Nat. Mach. Intell.
2021). :func:`plant_shortcut` reproduces it at one simulated site so the interpretability
aggregates (:mod:`medfed.common.explain.metrics`) can be checked on a known answer: every
image of class 1 at site ``K`` (train, val and test alike) gets a text-like bar in its top-left
corner (3 x 10 px at 28 px, 1 px from the edges: two of its three rows in the default 10 %
border band), blended into the image with ``strength`` (1: white).
Other sites and other classes are untouched.
"""

from __future__ import annotations

import numpy as np
from medfed.common.data.splits import ImageSplit, SiteData

MARKER_CLASS = 1


def marker_region(side: int) -> tuple[slice, slice]:
    """(rows, columns) of the bar: 1 px from the top-left edges, ~10 % of the side high, ~36 % wide."""
    offset = max(1, round(side / 28))
    height = max(1, round(side * 0.1))
    return slice(offset, offset + height), slice(offset, offset + max(2, round(side * 0.36)))


def planted(split: ImageSplit, strength: float) -> ImageSplit:
    """``split`` with the bar burned into its class-1 images (a copy; the rest unchanged)."""
    images = split.images.copy()
    rows, cols = marker_region(images.shape[-1])
    positive = split.labels == MARKER_CLASS
    patch = images[positive][:, :, rows, cols]
    images[np.nonzero(positive)[0][:, None, None, None], np.arange(images.shape[1])[None, :, None, None],
           np.arange(rows.start, rows.stop)[None, None, :, None],
           np.arange(cols.start, cols.stop)[None, None, None, :]] = (1.0 - strength) * patch + strength
    return ImageSplit(images, split.labels, split.groups)


def plant_shortcut(sites: tuple[SiteData, ...], site_index: int, strength: float) -> tuple[SiteData, ...]:
    """``sites`` with the marker burned into site ``site_index``'s class-1 images (every split)."""
    out = list(sites)
    s = sites[site_index]
    out[site_index] = SiteData(s.site_id, planted(s.train, strength), planted(s.val, strength),
                               planted(s.test, strength))
    return tuple(out)

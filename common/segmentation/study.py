"""The sites of a segmentation study: synthetic sites with scanner shift, or an ``.npz`` split iid.

- ``dataset="synthetic"``: :func:`make_synthetic_segmentation` with ``num_sites``, ``seed`` and
  ``image-size`` (default 64); each site is its own scanner (see that module).
- ``dataset="npz"``: :func:`load_segmentation_npz` on ``data-path``; its train/val/test
  splits are each divided among ``num_sites`` sites uniformly at random (seeded), and the
  whole val/test splits stay with the server for central evaluation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from medfed.common.errors import ConfigError
from medfed.common.segmentation.data import FederatedSegData, SegSiteData, SegSplit

DEFAULT_IMAGE_SIZE = 64


def load_segmentation_study(dataset: str, data_path: str, num_sites: int, seed: int,
                            image_size: int = 0) -> FederatedSegData:
    """Memoised per process (the ClientApp asks on every message); do not modify the arrays."""
    mtime_ns = 0
    if dataset == "npz":
        resolved = Path(data_path).expanduser().resolve()
        mtime_ns = resolved.stat().st_mtime_ns if resolved.is_file() else 0
        data_path = str(resolved)
    return _cached(dataset, data_path, mtime_ns, num_sites, seed, image_size)


@functools.lru_cache(maxsize=4)
def _cached(dataset: str, data_path: str, mtime_ns: int, num_sites: int, seed: int,
            image_size: int) -> FederatedSegData:
    del mtime_ns  # cache key only
    if dataset == "synthetic":
        from medfed.common.segmentation.synthetic import make_synthetic_segmentation

        return make_synthetic_segmentation(num_sites, seed, image_size or DEFAULT_IMAGE_SIZE)
    if dataset != "npz":
        raise ConfigError(f"dataset={dataset!r} has no segmentation masks: use synthetic or npz")
    from medfed.common.segmentation.npz import load_segmentation_npz

    info, train, val, test = load_segmentation_npz(Path(data_path))
    rng = np.random.default_rng(seed)
    parts = [_split_iid(s, num_sites, rng) for s in (train, val, test)]
    sites = tuple(SegSiteData(f"site-{k}", parts[0][k], parts[1][k], parts[2][k]) for k in range(num_sites))
    return FederatedSegData(info=info, sites=sites, central_val=val, central_test=test)


def _split_iid(split: SegSplit, num_sites: int, rng: np.random.Generator) -> list[SegSplit]:
    if len(split) < num_sites:
        raise ConfigError(f"{len(split)} images cannot be shared among num-sites={num_sites}: use fewer sites")
    order = rng.permutation(len(split))
    return [split.subset(np.sort(idx)) for idx in np.array_split(order, num_sites)]

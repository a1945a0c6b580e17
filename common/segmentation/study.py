"""The sites of a segmentation study: synthetic sites with scanner shift, or an ``.npz`` split iid.

- ``dataset="synthetic"``: :func:`make_synthetic_segmentation` with ``num_sites``, ``seed``,
  ``image-size`` (default 64 px, or 32 voxels for volumes) and ``spatial-dims`` (2 images,
  3 volumes); each site is its own scanner (see that module).
- ``dataset="npz"``: :func:`load_segmentation_npz` on ``data-path`` (images or volumes); its train/val/test
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
DEFAULT_VOLUME_SIZE = 32


def load_segmentation_study(dataset: str, data_path: str, num_sites: int, seed: int,
                            image_size: int = 0, spatial_dims: int = 0) -> FederatedSegData:
    """Memoised per process (the ClientApp asks on every message); do not modify the arrays.

    ``spatial_dims`` 0 means: whatever the data holds (2 for the synthetic default).
    """
    mtime_ns = 0
    if dataset == "npz":
        resolved = Path(data_path).expanduser().resolve()
        mtime_ns = resolved.stat().st_mtime_ns if resolved.is_file() else 0
        data_path = str(resolved)
    return _cached(dataset, data_path, mtime_ns, num_sites, seed, image_size, spatial_dims)


@functools.lru_cache(maxsize=4)
def _cached(dataset: str, data_path: str, mtime_ns: int, num_sites: int, seed: int,
            image_size: int, spatial_dims: int) -> FederatedSegData:
    del mtime_ns  # cache key only
    if dataset == "synthetic":
        from medfed.common.segmentation.synthetic import make_synthetic_segmentation

        dims = spatial_dims or 2
        size = image_size or (DEFAULT_VOLUME_SIZE if dims == 3 else DEFAULT_IMAGE_SIZE)
        return make_synthetic_segmentation(num_sites, seed, size, spatial_dims=dims)
    if dataset != "npz":
        raise ConfigError(f"dataset={dataset!r} has no segmentation masks: use synthetic or npz")
    from medfed.common.segmentation.npz import load_segmentation_npz

    info, train, val, test = load_segmentation_npz(Path(data_path))
    if spatial_dims and spatial_dims != info.spatial_dims:
        what = {2: "2D images", 3: "3D volumes"}
        raise ConfigError(
            f"spatial-dims={spatial_dims} but {Path(data_path).name} holds {what[info.spatial_dims]} "
            f"(masks of shape {train.masks.shape}): leave spatial-dims at 0 or set it to {info.spatial_dims}"
        )
    rng = np.random.default_rng(seed)
    parts = [_split_iid(s, num_sites, rng) for s in (train, val, test)]
    sites = tuple(SegSiteData(f"site-{k}", parts[0][k], parts[1][k], parts[2][k]) for k in range(num_sites))
    return FederatedSegData(info=info, sites=sites, central_val=val, central_test=test)


def _split_iid(split: SegSplit, num_sites: int, rng: np.random.Generator) -> list[SegSplit]:
    if len(split) < num_sites:
        raise ConfigError(f"{len(split)} images cannot be shared among num-sites={num_sites}: use fewer sites")
    order = rng.permutation(len(split))
    return [split.subset(np.sort(idx)) for idx in np.array_split(order, num_sites)]

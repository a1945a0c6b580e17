"""Seeded synthetic segmentation sites: bright discs (or balls) on a dark background, binary masks.

Each image holds 1-5 random discs drawn by MONAI's
:func:`monai.data.synthetic.create_test_image_2d` (one foreground class: mask 1 = disc,
0 = background; disc intensities 0.5-1 before the site's acquisition model). Radii scale
with ``image_size`` (at 64 px: 4-10 px). With ``spatial_dims=3`` each sample is a volume of
side ``image_size`` holding 1-5 balls from :func:`monai.data.synthetic.create_test_image_3d`
(images ``(N, 1, D, H, W)``, masks ``(N, D, H, W)``), and blur acts along all three axes.

Sites differ the way scanners do (``shift=True``), from site 0 to the last site evenly:
gamma 0.7 -> 1.5 (contrast curve), gain 1.0 -> 0.65 and intensity bias 0.0 -> 0.2 (so
``bias + gain <= 1``), Gaussian noise std 0.03 -> 0.09 and Gaussian blur sigma
0 -> 1.2 px (at 64 px; scaled with ``image_size``). With ``shift=False`` every site gets
the middle profile. Sites have unequal sizes: ``sizes`` gives the training images per site
(default 160, 110, 80, 50, 40, 40, ...); each site also gets ``max(2, train // 4)``
validation and as many test images. ``central_val`` / ``central_test`` are the
concatenated site val / test splits. The same ``seed`` gives the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from medfed.common.data.splits import DatasetInfo
from medfed.common.errors import ConfigError
from medfed.common.segmentation.data import FederatedSegData, SegSiteData, SegSplit

__all__ = ["default_seg_site_sizes", "make_synthetic_segmentation"]

MIN_IMAGE_SIZE = 16
_MAX_OBJECTS = 5


@dataclass(frozen=True)
class _Acquisition:
    """One site's scanner: ``bias + gain * image**gamma``, then blur and noise, clip to [0, 1]."""

    gamma: float
    gain: float
    bias: float
    noise: float
    blur: float  # Gaussian sigma in pixels at 64 px

    @classmethod
    def at(cls, t: float) -> _Acquisition:
        """The profile at position ``t`` in ``[0, 1]`` along the site range."""
        return cls(gamma=0.7 + 0.8 * t, gain=1.0 - 0.35 * t, bias=0.2 * t, noise=0.03 + 0.06 * t,
                   blur=1.2 * t)


def default_seg_site_sizes(num_sites: int) -> list[int]:
    """Decreasing training sizes: 160 * 0.7**k rounded to tens, at least 40 (160, 110, 80, 50, 40)."""
    return [max(40, round(160 * 0.7**k / 10) * 10) for k in range(num_sites)]


def make_synthetic_segmentation(
    num_sites: int = 3,
    seed: int = 0,
    image_size: int = 64,
    sizes: Sequence[int] | None = None,
    shift: bool = True,
    spatial_dims: int = 2,
) -> FederatedSegData:
    """Generate a seeded federated binary-segmentation dataset (see the module doc)."""
    train_sizes = _check_args(num_sites, image_size, sizes)
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims={spatial_dims!r} must be 2 (images) or 3 (volumes)")
    image_size = int(image_size)
    site_seeds = np.random.SeedSequence(seed).spawn(num_sites)
    sites = []
    for k in range(num_sites):
        t = k / (num_sites - 1) if shift and num_sites > 1 else 0.5
        rs = np.random.RandomState(site_seeds[k].generate_state(1)[0])
        n_eval = max(2, train_sizes[k] // 4)
        parts = [_site_split(n, image_size, _Acquisition.at(t), rs, spatial_dims)
                 for n in (train_sizes[k], n_eval, n_eval)]
        sites.append(SegSiteData(f"site-{k}", *parts))
    info = DatasetInfo(
        name="synthetic-seg" if spatial_dims == 2 else "synthetic-seg-3d", num_classes=2, in_channels=1,
        image_size=image_size, label_names=("background", "object"), spatial_dims=spatial_dims,
    )
    return FederatedSegData(
        info=info,
        sites=tuple(sites),
        central_val=SegSplit.concat([s.val for s in sites]),
        central_test=SegSplit.concat([s.test for s in sites]),
    )


def _site_split(n: int, size: int, acq: _Acquisition, rs: np.random.RandomState,
                spatial_dims: int = 2) -> SegSplit:
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    rad_max = max(3, size // 6)
    rad_min = max(2, size // 16)
    shape = (size,) * spatial_dims
    images = np.empty((n, *shape), np.float32)
    masks = np.empty((n, *shape), np.int64)
    for i in range(n):
        kwargs = dict(num_objs=int(rs.randint(1, _MAX_OBJECTS + 1)), rad_max=rad_max, rad_min=rad_min,
                      num_seg_classes=1, random_state=rs)
        if spatial_dims == 3:
            image, mask = create_test_image_3d(size, size, size, **kwargs)
        else:
            image, mask = create_test_image_2d(size, size, **kwargs)
        images[i], masks[i] = image, mask
    images = _acquire(images, acq, size, rs)
    return SegSplit(images[:, None], masks)


def _acquire(images: np.ndarray, acq: _Acquisition, size: int, rs: np.random.RandomState) -> np.ndarray:
    out = np.float32(acq.bias) + np.float32(acq.gain) * np.power(images, np.float32(acq.gamma))
    out = _gaussian_blur(out, acq.blur * size / 64)
    out += np.float32(acq.noise) * rs.standard_normal(out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(N, H, W)`` images or ``(N, D, H, W)`` volumes along every
    spatial axis, edges replicated; identity for sigma < 0.1."""
    if sigma < 0.1:
        return images
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2)).astype(np.float32)
    kernel /= kernel.sum()
    out = images
    for axis in range(1, images.ndim):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(k * np.take(padded, np.arange(j, j + n), axis=axis) for j, k in enumerate(kernel))
    return out.astype(np.float32)


def _check_args(num_sites: int, image_size: int, sizes: Sequence[int] | None) -> list[int]:
    problems = []
    if not _whole(num_sites) or num_sites < 1:
        raise ConfigError(f"num_sites={num_sites!r} must be a whole number >= 1")
    if not _whole(image_size) or image_size < MIN_IMAGE_SIZE:
        problems.append(f"image_size={image_size!r} must be a whole number >= {MIN_IMAGE_SIZE}")
    train = list(default_seg_site_sizes(num_sites) if sizes is None else sizes)
    if len(train) != num_sites:
        problems.append(f"sizes has {len(train)} entries for {num_sites} sites; give one per site")
    if any(not _whole(n) or n < 1 for n in train):
        problems.append(f"sizes={train} must be whole numbers >= 1 (training images per site)")
    if problems:
        raise ConfigError("invalid synthetic segmentation settings: " + "; ".join(problems))
    return [int(n) for n in train]


def _whole(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

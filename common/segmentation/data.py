"""The segmentation data contract: images with per-pixel label masks, per site and pooled.

The segmentation twin of :mod:`medfed.common.data.splits`. Arrays are validated once, at
construction (every problem collected, then one :class:`DataError`):

- ``images``: float32 ``(N, C, H, W)`` with values in ``[0, 1]``
- ``masks``: int64 ``(N, H, W)``, ``0`` = background, ``1..K-1`` the foreground classes
- ``groups``: int64 ``(N,)`` demographic attribute code per image, or ``None``

The dataset's :class:`~medfed.common.data.splits.DatasetInfo` reuses the classification
fields: ``num_classes`` counts the mask classes *including* background (2 for binary
segmentation) and ``label_names`` names them. Arrays are not copied on construction: treat
them as read-only; :meth:`SegSplit.subset` returns copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from medfed.common.data.splits import FederatedData, SiteData
from medfed.common.errors import DataError

__all__ = ["FederatedSegData", "SegSiteData", "SegSplit", "to_label_mask"]


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise DataError(f"invalid {what}: " + "; ".join(problems))


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def to_label_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """``mask`` as int64 labels: integer or bool arrays, or floats holding whole numbers >= 0.

    A float mask with fractional values (an interpolated or probability map) is refused:
    its labels are ambiguous.
    """
    arr = np.asarray(mask)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        out = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise DataError(
                f"{what} holds non-integer values (dtype {arr.dtype}): a label mask needs whole "
                "class numbers (0 = background); save it as an integer array, resized with "
                "nearest-neighbour interpolation"
            )
        out = arr.astype(np.int64)
    else:
        raise DataError(f"{what} has dtype {arr.dtype}: save label masks as integer arrays")
    if out.size and int(out.min()) < 0:
        raise DataError(f"{what} has negative labels (min {int(out.min())}): labels are 0..K-1")
    return out


@dataclass(frozen=True, eq=False)
class SegSplit:
    """A set of images with their label masks (and optional group codes)."""

    images: np.ndarray
    masks: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        x, m, g = self.images, self.masks, self.groups
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim not in (4, 5):
            problems.append(
                f"images must be a float32 array of shape (N, C, H, W) or, for volumes, "
                f"(N, C, D, H, W), got {_describe(x)}; convert with images.astype(np.float32) "
                "and add a channel axis"
            )
        if not isinstance(m, np.ndarray) or m.dtype != np.int64 or m.ndim not in (3, 4):
            problems.append(
                f"masks must be an int64 array of shape (N, H, W) or, for volumes, (N, D, H, W), "
                f"got {_describe(m)}; convert with to_label_mask(masks) and drop any channel axis"
            )
        elif isinstance(x, np.ndarray) and x.ndim in (4, 5) and m.ndim != x.ndim - 1:
            problems.append(
                f"images {x.shape} and masks {m.shape} disagree on the number of spatial axes: "
                "2D images (N, C, H, W) take masks (N, H, W), volumes (N, C, D, H, W) take (N, D, H, W)"
            )
        if g is not None and (not isinstance(g, np.ndarray) or g.dtype != np.int64 or g.ndim != 1):
            problems.append(f"groups must be None or an int64 array of shape (N,), got {_describe(g)}")
        _raise_if(problems, "SegSplit")

        n = x.shape[0]
        if m.shape[0] != n:
            problems.append(f"{n} images but {m.shape[0]} masks")
        elif m.shape[1:] != x.shape[2:]:
            problems.append(
                f"mask size {m.shape[1:]} differs from image size {x.shape[2:]}; resize masks "
                "with nearest-neighbour interpolation to the image size"
            )
        if g is not None and g.shape[0] != n:
            problems.append(f"{n} images but {g.shape[0]} group codes")
        if x.size and not (float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
            problems.append(
                f"image values must lie in [0, 1], got {float(x.min()):.3g}..{float(x.max()):.3g}; "
                "scale uint8 images by 1/255"
            )
        if m.size and int(m.min()) < 0:
            problems.append(f"mask labels must be >= 0 (0 = background), got {int(m.min())}")
        if g is not None and g.size and int(g.min()) < 0:
            problems.append(f"group codes must be >= 0, got {int(g.min())}")
        _raise_if(problems, "SegSplit")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def targets(self) -> np.ndarray:
        """What the training loss compares the model's output with: the masks."""
        return self.masks

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one image, or ``(C, D, H, W)`` of one volume."""
        return tuple(self.images.shape[1:])

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return int(self.images.ndim - 2)

    def subset(self, idx: np.ndarray) -> SegSplit:
        """The images and masks at ``idx`` (integer indices or a boolean mask), copied."""
        idx = np.asarray(idx)
        if idx.dtype != bool and not np.issubdtype(idx.dtype, np.integer):
            if idx.size:
                raise DataError(f"subset index must be integers or a boolean mask, got {idx.dtype}")
            idx = idx.astype(np.int64)
        groups = None if self.groups is None else self.groups[idx].copy()
        return SegSplit(self.images[idx].copy(), self.masks[idx].copy(), groups)

    @staticmethod
    def concat(splits: Sequence[SegSplit]) -> SegSplit:
        """Concatenate splits in order; groups stay ``None`` only if they are ``None`` in all."""
        splits = list(splits)
        if not splits:
            raise DataError("SegSplit.concat needs at least one split, got an empty list")
        shapes = {s.image_shape for s in splits}
        if len(shapes) > 1:
            raise DataError(
                f"cannot concatenate splits with different image shapes {sorted(shapes)}; "
                "resize the images to one (C, H, W) first"
            )
        if len({s.groups is None for s in splits}) > 1:
            raise DataError(
                "cannot concatenate splits with and without group codes: give every split "
                "groups (or none) so subgroup metrics stay well defined"
            )
        groups = None if splits[0].groups is None else np.concatenate([s.groups for s in splits])
        return SegSplit(
            np.concatenate([s.images for s in splits]),
            np.concatenate([s.masks for s in splits]),
            groups,  # type: ignore[arg-type]
        )


# A segmentation site and study are the same containers as a classification one: their splits
# are SegSplits (masks as the targets), checked against the DatasetInfo the same way.
SegSiteData = SiteData
FederatedSegData = FederatedData

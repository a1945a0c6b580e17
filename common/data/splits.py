"""The data contract: images, labels and optional demographic groups, per site and pooled.

Every loader (synthetic, MedMNIST, ...) returns a :class:`FederatedData`; training and
evaluation code only ever sees these classes. Arrays are validated once, at construction:

- ``images``: float32 ``(N, C, H, W)`` with values in ``[0, 1]``
- ``labels``: int64 ``(N,)``, ``0 <= label < num_classes``
- ``groups``: int64 ``(N,)`` demographic attribute code per image, or ``None``

Arrays are not copied on construction and may be shared (e.g. by the loader caches):
treat them as read-only; :meth:`ImageSplit.subset` returns copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from medfed.common.errors import DataError

__all__ = ["DatasetInfo", "FederatedData", "ImageSplit", "SiteData"]


def _raise_if(problems: list[str], what: str) -> None:
    """Raise one DataError listing every problem found (validators collect, then raise once)."""
    if problems:
        raise DataError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """A set of images with their labels (and optional group codes)."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        x, y, g = self.images, self.labels, self.groups
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4:
            problems.append(
                f"images must be a float32 array of shape (N, C, H, W), got "
                f"{_describe(x)}; convert with images.astype(np.float32) and add a channel axis"
            )
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
            problems.append(
                f"labels must be an int64 array of shape (N,), got {_describe(y)}; "
                "convert with labels.reshape(-1).astype(np.int64)"
            )
        if g is not None and (not isinstance(g, np.ndarray) or g.dtype != np.int64 or g.ndim != 1):
            problems.append(
                f"groups must be None or an int64 array of shape (N,), got {_describe(g)}"
            )
        _raise_if(problems, "ImageSplit")

        n = x.shape[0]
        if y.shape[0] != n:
            problems.append(f"{n} images but {y.shape[0]} labels")
        if g is not None and g.shape[0] != n:
            problems.append(f"{n} images but {g.shape[0]} group codes")
        if n and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            problems.append(
                f"image values must lie in [0, 1], got {float(x.min()):.3g}..{float(x.max()):.3g}; "
                "scale uint8 images by 1/255"
            )
        if y.size and int(y.min()) < 0:
            problems.append(f"labels must be >= 0, got {int(y.min())}")
        if g is not None and g.size and int(g.min()) < 0:
            problems.append(f"group codes must be >= 0, got {int(g.min())}")
        _raise_if(problems, "ImageSplit")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def targets(self) -> np.ndarray:
        """What the training loss compares the model's output with: the class labels."""
        return self.labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: np.ndarray) -> ImageSplit:
        """Return the images at ``idx`` (integer indices or a boolean mask), copied."""
        idx = np.asarray(idx)
        if idx.dtype != bool and not np.issubdtype(idx.dtype, np.integer):
            if idx.size:
                raise DataError(f"subset index must be integers or a boolean mask, got {idx.dtype}")
            idx = idx.astype(np.int64)
        groups = None if self.groups is None else self.groups[idx]
        return ImageSplit(self.images[idx], self.labels[idx], groups)

    @staticmethod
    def concat(splits: Sequence[ImageSplit]) -> ImageSplit:
        """Concatenate splits in order; groups stay ``None`` only if they are ``None`` in all."""
        splits = list(splits)
        if not splits:
            raise DataError("ImageSplit.concat needs at least one split, got an empty list")
        shapes = {s.image_shape for s in splits}
        if len(shapes) > 1:
            raise DataError(
                f"cannot concatenate splits with different image shapes {sorted(shapes)}; "
                "resize the images to one (C, H, W) first"
            )
        has_groups = {s.groups is not None for s in splits}
        if len(has_groups) > 1:
            raise DataError(
                "cannot concatenate splits with and without group codes: give every split "
                "groups (or none) so subgroup metrics stay well defined"
            )
        groups = None
        if has_groups == {True}:
            groups = np.concatenate([s.groups for s in splits])  # type: ignore[misc]
        return ImageSplit(
            np.concatenate([s.images for s in splits]),
            np.concatenate([s.labels for s in splits]),
            groups,
        )


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    label_names: tuple[str, ...]
    group_name: str | None = None
    group_values: tuple[str, ...] = ()
    spatial_dims: int = 2  # 3: volumes (N, C, D, H, W) of side image_size (segmentation only)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.spatial_dims not in (2, 3):
            problems.append(f"spatial_dims must be 2 (images) or 3 (volumes), got {self.spatial_dims}")
        if not self.name:
            problems.append("name must not be empty")
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2, got {self.num_classes}")
        if self.in_channels < 1:
            problems.append(f"in_channels must be >= 1, got {self.in_channels}")
        if self.image_size < 1:
            problems.append(f"image_size must be >= 1, got {self.image_size}")
        if len(self.label_names) != self.num_classes:
            problems.append(
                f"label_names has {len(self.label_names)} names for {self.num_classes} classes"
            )
        if (self.group_name is None) != (len(self.group_values) == 0):
            problems.append(
                "group_name and group_values go together: give both (e.g. 'sex', "
                "('female', 'male')) or neither"
            )
        _raise_if(problems, f"DatasetInfo {self.name!r}")


@dataclass(frozen=True)
class SiteData:
    """One site's (hospital's) train/val/test splits (ImageSplit, or SegSplit for segmentation)."""

    site_id: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit

    def __post_init__(self) -> None:
        if not self.site_id:
            raise DataError("invalid SiteData: site_id must not be empty")
        shapes = {s.image_shape for s in (self.train, self.val, self.test)}
        if len(shapes) > 1:
            raise DataError(
                f"invalid SiteData {self.site_id!r}: train/val/test image shapes differ "
                f"{sorted(shapes)}"
            )


@dataclass(frozen=True)
class FederatedData:
    """All sites of a study plus the pooled official val/test splits for server-side evaluation."""

    info: DatasetInfo
    sites: tuple[SiteData, ...]
    central_test: ImageSplit | None
    central_val: ImageSplit | None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.sites:
            problems.append("at least one site is needed")
        ids = [s.site_id for s in self.sites]
        if len(set(ids)) != len(ids):
            problems.append(f"site ids must be unique, got {ids}")
        named = [
            (f"{s.site_id}/{part}", getattr(s, part))
            for s in self.sites
            for part in ("train", "val", "test")
        ]
        for name in ("central_test", "central_val"):
            if getattr(self, name) is not None:
                named.append((name, getattr(self, name)))
        for name, split in named:
            problems.extend(f"{name}: {p}" for p in _check_against_info(split, self.info))
        _raise_if(problems, f"FederatedData {self.info.name!r}")

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(s.site_id for s in self.sites)

    def site(self, site_id: str) -> SiteData:
        """Return the site called ``site_id`` (DataError listing the known ids otherwise)."""
        for s in self.sites:
            if s.site_id == site_id:
                return s
        raise DataError(
            f"unknown site {site_id!r}: this dataset has sites {', '.join(self.site_ids)}"
        )


def _check_against_info(split: ImageSplit, info: DatasetInfo) -> list[str]:
    """Problems of ``split`` (an ImageSplit, or a segmentation SegSplit: same fields) against ``info``."""
    problems = []
    expected = (info.in_channels,) + (info.image_size,) * info.spatial_dims
    if tuple(split.image_shape) != expected:
        problems.append(f"image shape {tuple(split.image_shape)} does not match the dataset {expected}")
    if len(split) and int(split.targets.max()) >= info.num_classes:  # class labels, or mask values
        problems.append(f"label {int(split.targets.max())} out of range 0..{info.num_classes - 1}")
    if info.group_name is None and split.groups is not None:
        problems.append("has group codes but the dataset declares no group_name")
    if info.group_name is not None:
        if split.groups is None:
            problems.append(f"group codes ({info.group_name}) are missing")
        elif len(split) and int(split.groups.max()) >= len(info.group_values):
            problems.append(
                f"group code {int(split.groups.max())} out of range 0..{len(info.group_values) - 1}"
            )
    return problems


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__

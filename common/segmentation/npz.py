"""Load a segmentation dataset saved as one ``.npz`` archive (no pickled objects).

Keys: ``train_images, train_masks, val_images, val_masks, test_images, test_masks``.
Images are ``(N, H, W)`` or ``(N, C, H, W)``, uint8 (scaled by 1/255) or float in
``[0, 1]``; masks are ``(N, H, W)`` integer labels (floats holding whole numbers are
accepted). Volumes: masks ``(N, D, H, W)`` with images ``(N, D, H, W)`` or
``(N, C, D, H, W)`` (the masks' shape tells images from volumes). Images must be square
(volumes cubic) and the same size in every split. The
:class:`~medfed.common.data.splits.DatasetInfo` is derived from the arrays: ``num_classes``
is the largest label + 1 (at least 2), and the name is the file's stem.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from medfed.common.data.splits import DatasetInfo
from medfed.common.errors import DataError
from medfed.common.segmentation.data import SegSplit, to_label_mask

__all__ = ["NPZ_KEYS", "load_segmentation_npz"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "masks"))


def load_segmentation_npz(path: Path) -> tuple[DatasetInfo, SegSplit, SegSplit, SegSplit]:
    """``(info, train, val, test)`` from the archive at ``path`` (see the module doc)."""
    path = Path(path)
    arrays = _read(path)
    splits = []
    for split in SPLITS:
        try:
            masks = to_label_mask(arrays[f"{split}_masks"], f"{split}_masks")
            images = _images(arrays[f"{split}_images"], f"{split}_images", spatial_dims=masks.ndim - 1)
            splits.append(SegSplit(images, masks))
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
    shapes = {s.image_shape for s in splits}
    if len(shapes) > 1:
        raise DataError(f"{path}: image shapes differ between splits {sorted(shapes)}; resize them to one size")
    channels, *sides = splits[0].image_shape
    if len(set(sides)) != 1:
        raise DataError(f"{path}: images are {'x'.join(map(str, sides))}; medfed needs square images "
                        "(cubic volumes): resize or crop them")
    height = sides[0]
    top = max((int(s.masks.max()) for s in splits if len(s)), default=0)
    num_classes = max(2, top + 1)
    info = DatasetInfo(
        name=path.name.removesuffix(".npz") or "segmentation", num_classes=num_classes,
        in_channels=channels, image_size=height,
        label_names=("background",) + tuple(f"class-{k}" for k in range(1, num_classes)),
        spatial_dims=len(sides),
    )
    log.info("%s: %d/%d/%d train/val/test images, %d classes",
             path.name, *(len(s) for s in splits), num_classes)
    return info, splits[0], splits[1], splits[2]


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} not found: check the data path (an .npz archive is expected)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {missing} (it has {sorted(archive.files)}); save it "
                    f"with numpy.savez using the keys {list(NPZ_KEYS)}"
                )
            return {k: archive[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError) as exc:  # not a zip / pickled object arrays / corrupt member
        raise DataError(
            f"{path} cannot be read as an .npz archive of numeric arrays ({exc}); save it with "
            "numpy.savez (object arrays need pickle and are refused)"
        ) from exc


def _images(arr: np.ndarray, what: str, spatial_dims: int = 2) -> np.ndarray:
    if spatial_dims not in (2, 3):
        raise DataError(f"{what.replace('images', 'masks')} must be (N, H, W) or, for volumes, (N, D, H, W)")
    if arr.ndim == spatial_dims + 1:
        arr = arr[:, None]
    if arr.ndim != spatial_dims + 2:
        want = "(N, H, W) or (N, C, H, W)" if spatial_dims == 2 else "(N, D, H, W) or (N, C, D, H, W)"
        raise DataError(f"{what} has shape {arr.shape}: expected {want} to match its masks")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what} has dtype {arr.dtype}: save images as uint8 (0..255) or float in [0, 1]")
    return arr.astype(np.float32)

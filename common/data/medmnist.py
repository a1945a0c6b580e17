"""Load any MedMNIST v2 2D ``.npz`` file (official train/val/test split) into the data contract.

A MedMNIST file holds ``{train,val,test}_images`` (uint8 ``(N, H, W)`` grayscale or
``(N, H, W, 3)`` RGB) and ``{train,val,test}_labels`` (``(N, 1)``). Images become float32
``(N, C, H, W)`` in ``[0, 1]``. Multi-label subsets (ChestMNIST) and 3D subsets are
rejected with a :class:`DataError`. The subset is recognised from the file name
(``pneumoniamnist.npz``, ``pneumoniamnist_64.npz``) only to name the labels.
"""

from __future__ import annotations

import functools
import logging
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from medfed.common.data.splits import DatasetInfo, ImageSplit
from medfed.common.errors import DataError

__all__ = ["LABEL_NAMES", "load_medmnist", "load_medmnist_cached", "subset_name"]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test")

# Label names per subset, from the official ``medmnist.INFO[...]["label"]`` (v3.0.2),
# shortened where the official name is long or holds a comma (reports write CSV).
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "pneumoniamnist": ("normal", "pneumonia"),
    "breastmnist": ("malignant", "normal-benign"),
    "retinamnist": ("grade-0", "grade-1", "grade-2", "grade-3", "grade-4"),
    "octmnist": ("choroidal-neovascularization", "diabetic-macular-edema", "drusen", "normal"),
    "dermamnist": (
        "actinic-keratoses", "basal-cell-carcinoma", "benign-keratosis", "dermatofibroma",
        "melanoma", "melanocytic-nevi", "vascular-lesions",
    ),
    "bloodmnist": (
        "basophil", "eosinophil", "erythroblast", "immature-granulocytes", "lymphocyte",
        "monocyte", "neutrophil", "platelet",
    ),
}
_ORGANS = (
    "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
    "lung-left", "lung-right", "pancreas", "spleen",
)
LABEL_NAMES.update({name: _ORGANS for name in ("organamnist", "organcmnist", "organsmnist")})

_MULTI_LABEL = ("chestmnist",)

_Loaded = tuple[DatasetInfo, ImageSplit, ImageSplit, ImageSplit]  # info, train, val, test


def subset_name(path: str | Path) -> str:
    """MedMNIST subset name from a file name: ``.../breastmnist_128.npz`` -> ``breastmnist``."""
    return re.sub(r"_(64|128|224)$", "", Path(path).stem.lower())


def load_medmnist(path: str | Path) -> _Loaded:
    """Read a MedMNIST 2D ``.npz`` and return ``(info, train, val, test)`` (official split)."""
    path = Path(path)
    name = subset_name(path)
    arrays = _read_npz(path)
    splits, channels, size = {}, None, None
    for split in _SPLITS:
        images = _to_chw(arrays[f"{split}_images"], path, split)
        labels = _to_labels(arrays[f"{split}_labels"], path, split, name)
        if len(images) != len(labels):
            raise DataError(
                f"{path}: {split}_images has {len(images)} images but {split}_labels has "
                f"{len(labels)} labels; the file is corrupt, download it again"
            )
        if channels is None:
            channels, size = images.shape[1], images.shape[2]
        elif images.shape[1:] != (channels, size, size):
            raise DataError(
                f"{path}: {split} images have shape {images.shape[1:]} but train images have "
                f"{(channels, size, size)}; all splits of one file must agree"
            )
        splits[split] = ImageSplit(images, labels)

    num_classes = int(max(s.labels.max(initial=0) for s in splits.values())) + 1
    label_names = LABEL_NAMES.get(name)
    if label_names is not None:
        if num_classes > len(label_names):
            raise DataError(
                f"{path}: labels go up to {num_classes - 1} but {name} has only "
                f"{len(label_names)} classes; the file is not an official {name} file"
            )
        num_classes = len(label_names)
    else:
        num_classes = max(num_classes, 2)
        label_names = tuple(f"class-{i}" for i in range(num_classes))
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        in_channels=int(channels),  # type: ignore[arg-type]
        image_size=int(size),  # type: ignore[arg-type]
        label_names=label_names,
    )
    logger.debug(
        "loaded %s: %s train / %s val / %s test, %d classes, %d channel(s), %d px",
        path, len(splits["train"]), len(splits["val"]), len(splits["test"]),
        info.num_classes, info.in_channels, info.image_size,
    )
    return info, splits["train"], splits["val"], splits["test"]


@functools.lru_cache(maxsize=4)
def _load_cached(resolved: str, mtime_ns: int) -> _Loaded:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    return load_medmnist(resolved)


def load_medmnist_cached(path: str | Path) -> _Loaded:
    """:func:`load_medmnist`, memoised per process on (resolved path, modification time).

    For Flower ClientApps / Ray actors that are called every round. The returned arrays
    are shared between callers: do not modify them in place.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        mtime_ns = resolved.stat().st_mtime_ns
    except OSError:
        return load_medmnist(resolved)  # raises the DataError explaining what is missing
    return _load_cached(str(resolved), mtime_ns)


load_medmnist_cached.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]
load_medmnist_cached.cache_info = _load_cached.cache_info  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- helpers


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"MedMNIST file not found: {path}: give the path of an existing .npz, or download the "
            "official file with `medfed data fetch <subset>` (needs internet) and copy it there"
        )
    keys = [f"{split}_{kind}" for split in _SPLITS for kind in ("images", "labels")]
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise _corrupt(path, e) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single .npy array, not a MedMNIST .npz archive")
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise DataError(
                f"{path} is not a MedMNIST file: missing key(s) {', '.join(missing)} "
                f"(found {', '.join(npz.files) or 'none'}); expected {', '.join(keys)}"
            )
        try:
            return {k: npz[k] for k in keys}
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise _corrupt(path, e) from e


def _corrupt(path: Path, e: Exception) -> DataError:
    return DataError(
        f"{path} cannot be read as a .npz (zip) archive ({type(e).__name__}: {e}); the file "
        "is truncated or corrupt: download it again and compare its md5"
    )


def _to_chw(images: np.ndarray, path: Path, split: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: {split}_images has dtype {images.dtype}, expected uint8 as in official "
            "MedMNIST files"
        )
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4 and images.shape[-1] == 3:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: {split}_images has shape {images.shape}; only 2D MedMNIST is supported, "
            "(N, H, W) grayscale or (N, H, W, 3) RGB (3D volumes are not)"
        )
    if images.shape[2] != images.shape[3]:
        raise DataError(f"{path}: {split} images are not square ({images.shape[2:]})")
    out = np.ascontiguousarray(images, dtype=np.float32)
    out *= np.float32(1.0 / 255.0)
    return out


def _to_labels(labels: np.ndarray, path: Path, split: str, name: str) -> np.ndarray:
    if (labels.ndim == 2 and labels.shape[1] > 1) or name in _MULTI_LABEL:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}: '{name}' is a multi-label "
            "subset, which is not supported (one class per image is needed); use a binary "
            "or multi-class subset such as pneumoniamnist"
        )
    if labels.ndim not in (1, 2) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {split}_labels has {labels.dtype} shape {labels.shape}, "
            "expected integer (N, 1)"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: {split}_labels holds negative label {int(labels.min())}")
    return labels

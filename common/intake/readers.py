"""Read one site image file (DICOM, PNG, JPEG, NIfTI or ``.npy``) into a float32 array.

:func:`read_image` returns a 2D image, ``(H, W)`` for grayscale or ``(H, W, 3)`` RGB, with
finite float32 values in the file's own units (the caller normalises), plus an
:class:`ImageMeta`. :func:`read_header` returns the same metadata without decoding pixels.
Files are only ever opened for reading.

This module is the front door: it detects the file kind and dispatches to one backend per
format: :mod:`.dicom_image` (pydicom: LUTs, VOI windows, frames, codecs), :mod:`.raster_image`
(Pillow: PNG/JPEG), :mod:`.nifti_image` (nibabel) and :mod:`.npy_image`. The shared types
live in :mod:`.image_types` and are re-exported here.

Every problem with a file is a :class:`ReadError` whose message is one line with the reason
and the fix, *without* the file path (the caller adds it). :func:`read_image` refuses a file
whose header declares more than ``ReadSettings.max_pixels`` pixels (site.yaml
``max-image-pixels``) before decoding it (:class:`TooManyPixels`, a ReadError). Paths are
not confined here: callers that take paths from a manifest or a folder scan check them
with :func:`medfed.common.intake.paths.confined` first. Heavy libraries (pydicom,
Pillow, nibabel) are imported inside the functions that need them, so importing this module
is cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
from medfed.common.intake.dicom_image import (
    DICOM_TAG_KEYWORDS,
    read_dicom,
    read_dicom_header,
)
from medfed.common.intake.image_types import (
    DICOM_CODECS_HINT,
    NIFTI_HINT,
    ImageMeta,
    ReadError,
    ReadSettings,
    TooManyPixels,
    pixel_digest,
)
from medfed.common.intake.nifti_image import read_nifti, read_nifti_header
from medfed.common.intake.npy_image import read_npy, read_npy_header
from medfed.common.intake.raster_image import read_raster, read_raster_header

__all__ = [
    "DICOM_CODECS_HINT",
    "DICOM_TAG_KEYWORDS",
    "KINDS",
    "NIFTI_HINT",
    "ImageMeta",
    "ReadError",
    "ReadSettings",
    "TooManyPixels",
    "detect_kind",
    "read_header",
    "read_image",
]

KINDS = ("dicom", "png", "jpeg", "nifti", "npy")

_SUFFIX_KINDS = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".nii": "nifti",
    ".npy": "npy",
}
_DEFAULT_SETTINGS = ReadSettings()
_UNSUPPORTED_HINT = "use DICOM, PNG, JPEG, NIfTI (.nii/.nii.gz) or .npy"
_DICOM_PREAMBLE = 128
_DICOM_MAGIC = b"DICM"

_HEADER_READERS: dict[str, Callable[[Path], ImageMeta]] = {
    "dicom": read_dicom_header,
    "png": lambda path: read_raster_header(path, "png"),
    "jpeg": lambda path: read_raster_header(path, "jpeg"),
    "nifti": read_nifti_header,
    "npy": read_npy_header,
}

_IMAGE_READERS: dict[str, Callable[[Path, ReadSettings], tuple[np.ndarray, ImageMeta]]] = {
    "dicom": read_dicom,
    "png": lambda path, settings: read_raster(path, "png", settings.max_pixels),
    "jpeg": lambda path, settings: read_raster(path, "jpeg", settings.max_pixels),
    "nifti": read_nifti,
    "npy": read_npy,
}


def detect_kind(path: Path) -> str:
    """The file kind from its suffix; files with another or no suffix are sniffed for DICOM.

    DICOM files are often named without a suffix (DICOMDIR trees: ``.../CR1/6154``) or with
    a UID-like one (``1.2.840...3.1``), so any unknown suffix is checked for the 128-byte
    preamble followed by ``DICM``.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in _SUFFIX_KINDS:
        return _SUFFIX_KINDS[suffix]
    if _has_dicom_magic(path):
        return "dicom"
    if suffix:
        raise ReadError(f"unsupported file type '{suffix}': {_UNSUPPORTED_HINT}")
    raise ReadError(
        "unsupported file type (no suffix and no DICOM 'DICM' marker at byte 128): "
        f"{_UNSUPPORTED_HINT}"
    )


def read_header(path: Path) -> ImageMeta:
    """Metadata of an image file without decoding its pixels (fast)."""
    path = Path(path)
    _check_file(path)
    return _HEADER_READERS[detect_kind(path)](path)


def read_image(path: Path, settings: ReadSettings = _DEFAULT_SETTINGS) -> tuple[np.ndarray, ImageMeta]:
    """Read an image file into a finite float32 ``(H, W)`` or ``(H, W, 3)`` array and its metadata."""
    path = Path(path)
    _check_file(path)
    image, meta = _IMAGE_READERS[detect_kind(path)](path, settings)
    image = np.ascontiguousarray(image, dtype=np.float32)
    _check_image(image)
    return image, dataclasses.replace(
        meta, shape=tuple(image.shape), pixel_sha256=meta.pixel_sha256 or pixel_digest(image)
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ReadError("file not found: check the path (was the file moved or deleted?)")
    if not path.is_file():
        raise ReadError("not a regular file (a directory?): point to an image file")


def _check_image(image: np.ndarray) -> None:
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ReadError(
            f"unsupported image layout {image.shape}: expected a 2D grayscale or RGB image"
        )
    if image.size == 0:
        raise ReadError(f"empty image (shape {image.shape}): the file holds no pixels")
    if not np.isfinite(image).all():
        raise ReadError(
            "image contains NaN or infinite values: its pixel data (or rescale values) are "
            "invalid; re-export the file or exclude it"
        )


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(_DICOM_PREAMBLE + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_PREAMBLE:] == _DICOM_MAGIC

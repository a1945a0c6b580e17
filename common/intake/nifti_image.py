"""NIfTI (``.nii``, ``.nii.gz``) reading with nibabel.

A 2D image is read as is; for 3D and 4D images one slice along the third axis
(``ReadSettings.frame``, the middle one by default) of the first volume is read. nibabel is
an optional dependency, imported inside the functions that need it.

nibabel reads the header first and the voxels only when sliced, so :func:`read_nifti` checks
the declared shape (rows x columns x slices of one volume) against ``ReadSettings.max_pixels``
before any voxel is read or decompressed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.intake.image_types import (
    NIFTI_HINT,
    ImageMeta,
    ReadError,
    ReadSettings,
    check_pixels,
    frame_index,
    plain_meta,
    positive_spacing,
    short_reason,
)

__all__ = ["read_nifti", "read_nifti_header"]

logger = logging.getLogger(__name__)


def _nib_load(path: Path) -> Any:
    try:
        import nibabel
    except ImportError as exc:
        raise ReadError(f"reading NIfTI needs nibabel, which is not installed: {NIFTI_HINT}") from exc
    try:
        return nibabel.load(str(path))
    except Exception as exc:  # nibabel/gzip raise many types on corrupt input
        raise _nifti_unreadable(exc, path) from exc


def _nifti_unreadable(exc: BaseException, path: Path) -> ReadError:
    return ReadError(f"unreadable NIfTI: {short_reason(exc, path)}; re-export or replace the file")


def _nifti_layout(img: Any) -> tuple[tuple[int, int], int]:
    """((H, W), number of slices) of a 2D, 3D or 4D NIfTI image; ReadError otherwise."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) not in (2, 3, 4):
        raise ReadError(
            f"unsupported NIfTI shape {shape}: only 2D, 3D and 4D (first volume is used) "
            "images are supported"
        )
    if img.get_data_dtype().fields is not None:
        raise ReadError(
            "unsupported NIfTI data type (RGB/structured voxels): save the image as scalar "
            "(grayscale) voxels"
        )
    return (shape[0], shape[1]), (shape[2] if len(shape) >= 3 else 1)


def _nifti_meta(img: Any, shape: tuple[int, int], num_frames: int) -> ImageMeta:
    spacing = positive_spacing(img.header.get_zooms()[:2])
    return plain_meta("nifti", shape, num_frames, spacing)


def read_nifti_header(path: Path) -> ImageMeta:
    """Metadata of a NIfTI file (shape of one slice, number of slices, spacing)."""
    img = _nib_load(path)
    shape, num_frames = _nifti_layout(img)
    return _nifti_meta(img, shape, num_frames)


def read_nifti(path: Path, settings: ReadSettings) -> tuple[np.ndarray, ImageMeta]:
    """The selected slice (``settings.frame``) of the first volume, and the metadata."""
    img = _nib_load(path)
    shape, num_frames = _nifti_layout(img)
    check_pixels((*shape, num_frames) if len(img.shape) >= 3 else shape, settings.max_pixels)
    index = frame_index(settings.frame, num_frames)
    ndim = len(img.shape)
    slicer: tuple[Any, ...] = (slice(None), slice(None))
    if ndim >= 3:
        slicer += (index,)
    if ndim == 4:
        if img.shape[3] > 1:
            logger.debug("4D NIfTI with %d volumes: using the first", img.shape[3])
        slicer += (0,)
    try:
        image = np.asarray(img.dataobj[slicer], dtype=np.float32)
    except Exception as exc:  # truncated/corrupt voxel data
        raise _nifti_unreadable(exc, path) from exc
    return image, _nifti_meta(img, shape, num_frames)

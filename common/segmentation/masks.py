"""Read a label mask file as integer labels, and resize masks without inventing labels.

:func:`read_mask` returns an int64 ``(H, W)`` array from a PNG (gray or palette: the
palette *indices* are the labels), a NIfTI file (the same slice
:func:`~medfed.common.intake.readers.read_image` reads from the image), a ``.npy`` array or
a single-frame DICOM file's stored pixel values (no LUT or rescale). JPEG is refused: lossy
compression changes labels at object edges. Problems are
:class:`~medfed.common.intake.readers.ReadError` with a one-line reason without the path.

:func:`resize_mask` uses nearest-neighbour sampling, so a resized mask holds only labels of
the original. Files are only ever opened for reading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from medfed.common.errors import DataError
from medfed.common.intake.image_types import TooManyPixels, check_pixels, short_reason
from medfed.common.intake.readers import ReadError, ReadSettings, detect_kind
from medfed.common.segmentation.data import to_label_mask

__all__ = ["MaskLabelError", "read_mask", "resize_mask"]

_MASK_HINT = "save masks as PNG (gray or palette), NIfTI, .npy or DICOM"


class MaskLabelError(ReadError):
    """A readable mask whose values are not labels (fractional or negative values)."""


def read_mask(path: Path, settings: ReadSettings | None = None) -> np.ndarray:
    """The mask at ``path`` as int64 ``(H, W)`` labels (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise ReadError("mask file not found: check the mask path (was the file moved or deleted?)")
    kind = detect_kind(path)
    if kind == "jpeg":
        raise ReadError(f"JPEG masks are refused: lossy compression changes labels; {_MASK_HINT}")
    mask = {"png": _png, "nifti": _nifti, "npy": _npy, "dicom": _dicom}[kind](path, settings)
    if mask.ndim != 2 or mask.size == 0:
        raise ReadError(f"mask has shape {mask.shape}: expected one 2D (H, W) label image")
    try:
        return to_label_mask(mask)
    except DataError as exc:
        raise MaskLabelError(str(exc)) from exc


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W)`` label mask to ``(size, size)`` (pixel centres)."""
    height, width = mask.shape
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return np.ascontiguousarray(mask[np.ix_(rows, cols)])


def _png(path: Path, settings: ReadSettings | None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        img = Image.open(path, formats=("PNG",))  # lazy: only the header is read
    except Exception as exc:  # Pillow raises many types on corrupt input (and its own bomb check)
        raise ReadError(f"unreadable PNG mask: {short_reason(exc, path)}; re-export it") from exc
    with img:
        check_pixels(img.size, (settings or ReadSettings()).max_pixels)  # before anything is decoded
        try:
            img.load()
            img = ImageOps.exif_transpose(img)  # the same orientation read_image gives the image
            if img.mode in ("LA", "PA"):
                img = img.getchannel(0)
            arr = np.asarray(img)
        except Exception as exc:  # Pillow raises many types on corrupt input
            raise ReadError(f"unreadable PNG mask: {short_reason(exc, path)}; re-export it") from exc
    if arr.ndim == 3:  # RGB(A): usable only when it is gray in disguise
        if not (arr[..., :3] == arr[..., :1]).all():
            raise ReadError(
                "colour PNG mask: labels must be gray values or palette indices, not RGB "
                "colours; save the mask as a gray or palette PNG"
            )
        arr = arr[..., 0]
    return arr


def _nifti(path: Path, settings: ReadSettings | None) -> np.ndarray:
    from medfed.common.intake.nifti_image import read_nifti

    return read_nifti(path, settings or ReadSettings())[0]


def _npy(path: Path, settings: ReadSettings | None) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")  # mapped: only the header is read
        if isinstance(arr, np.ndarray):
            spatial = arr.shape[1:3] if arr.ndim == 3 and arr.shape[0] == 1 else arr.shape[:2]
            check_pixels(spatial, (settings or ReadSettings()).max_pixels)
            arr = np.array(arr)
    except TooManyPixels:
        raise
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError on bad files
        raise ReadError(f"unreadable .npy mask: {short_reason(exc, path)}; save it with numpy.save") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
        raise ReadError("a .npy mask must hold one bool, integer or float array (saved with numpy.save)")
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[2]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    return arr


def _dicom(path: Path, settings: ReadSettings | None) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames") or 1)
        check_pixels((int(ds.Rows), int(ds.Columns), frames), (settings or ReadSettings()).max_pixels)
        arr = np.asarray(ds.pixel_array)  # decoded only after the header check
    except TooManyPixels:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt or undecodable data
        raise ReadError(f"unreadable DICOM mask: {short_reason(exc, path)}; re-export it") from exc
    return arr

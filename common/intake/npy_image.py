"""NumPy ``.npy`` reading: one numeric image per file, never pickled objects.

Accepted layouts are ``(H, W)``, ``(H, W, 1|3)`` and ``(1|3, H, W)``; the image is returned
as ``(H, W)`` or ``(H, W, 3)``. :func:`read_npy` parses the header (``numpy.lib.format``)
and checks the declared layout and ``H x W`` against ``ReadSettings.max_pixels`` before the
array is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from medfed.common.intake.image_types import (
    ImageMeta,
    ReadError,
    ReadSettings,
    check_pixels,
    plain_meta,
    short_reason,
)

__all__ = ["read_npy", "read_npy_header"]


def _load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError on bad files
        raise ReadError(
            f"unreadable .npy: {short_reason(exc, path)}; save a numeric array with numpy.save "
            "(no pickled objects)"
        ) from exc
    if not isinstance(arr, np.ndarray):
        raise ReadError("not a .npy array (an .npz archive?): save one image per file with numpy.save")
    _check_dtype(arr.dtype)
    return arr


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        raise ReadError(
            f"unsupported .npy dtype {dtype}: save the image as a bool, integer or float array"
        )


def _npy_channel_last(shape: tuple[int, ...]) -> bool | None:
    """For a 3D array: True if channels are last, False if first; ReadError for other shapes."""
    if len(shape) == 3 and shape[2] in (1, 3):
        return True
    if len(shape) == 3 and shape[0] in (1, 3):
        return False
    if len(shape) == 2:
        return None
    raise ReadError(
        f"unsupported .npy array shape {shape}: expected (H, W), (H, W, 3), (1, H, W) or (3, H, W)"
    )


def _npy_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    last = _npy_channel_last(shape)
    if last is None:
        return shape
    height, width, channels = shape if last else (shape[1], shape[2], shape[0])
    return (height, width) if channels == 1 else (height, width, 3)


def read_npy_header(path: Path) -> ImageMeta:
    """Metadata of a ``.npy`` file (memory-mapped: the array is not loaded)."""
    arr = _load_npy(path, mmap=True)
    return plain_meta("npy", _npy_shape(tuple(arr.shape)))


def _declared_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from a version 1.0/2.0 ``.npy`` header, without reading the data.

    None (not a .npy header, or another version) leaves the diagnosis to :func:`_load_npy`,
    which never unpickles and maps rather than loads to learn the shape.
    """
    from numpy.lib import format as npy_format

    try:
        with path.open("rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = npy_format.read_array_header_2_0(fh)
            else:
                return None
    except (ValueError, OSError, EOFError, SyntaxError):  # not a .npy header: _load_npy says why
        return None
    return tuple(int(n) for n in shape), dtype


def read_npy(path: Path, settings: ReadSettings) -> tuple[np.ndarray, ImageMeta]:
    """The array as a float image, channels moved last and a single channel dropped.

    The header's dtype, layout and ``H x W`` (against ``settings.max_pixels``) are checked
    before the array is loaded.
    """
    header = _declared_header(path)
    if header is None:  # another header version: map it (nothing loaded) to learn the shape
        header = (tuple(_load_npy(path, mmap=True).shape), np.dtype(np.float32))
    shape, dtype = header
    if not dtype.hasobject:  # object arrays: _load_npy refuses them without reading them
        _check_dtype(dtype)
        check_pixels(_npy_shape(shape)[:2], settings.max_pixels)
    arr = _load_npy(path, mmap=False)
    last = _npy_channel_last(tuple(arr.shape))
    if last is False:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    image = arr.astype(np.float32)
    return image, plain_meta("npy", tuple(image.shape))

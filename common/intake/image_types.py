"""Types and small helpers shared by the image readers (:mod:`.readers` and its backends).

The backends (``dicom_image``, ``raster_image``, ``nifti_image``, ``npy_image``) import
from here and :mod:`.readers` re-exports the public names, so there are no import cycles.
Only numpy (and the default limit from ``site_config``) is imported: no heavy libraries.
:func:`check_pixels` is the one pixel cap (``max-image-pixels``) that every backend applies
to the dimensions a file's header declares, before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.errors import ConfigError, DataError
from medfed.common.site_config import DEFAULT_MAX_IMAGE_PIXELS

DICOM_CODECS_HINT = "pip install 'medfed[dicom-codecs]'"
NIFTI_HINT = "pip install 'medfed[nifti]'"

_MAX_REASON = 200


class ReadError(DataError):
    """A file that cannot be used; ``str(e)`` is a one-line reason WITHOUT the file path."""


class TooManyPixels(ReadError):
    """A file whose header declares more pixels than ``max-image-pixels`` allows (refused, not decoded)."""


@dataclass(frozen=True)
class ReadSettings:
    """How to turn a file into an image.

    ``window_center``/``window_width``: a configured VOI window (both or neither) in modality
    units (e.g. HU); it overrides the window stored in a DICOM file. ``frame``: which frame
    of a multi-frame DICOM (or slice along the last axis of a 3D NIfTI) to read; ``-1`` is
    the middle one (index ``num_frames // 2``). ``max_pixels``: the site's
    ``max-image-pixels``; a file whose header declares more pixels (rows x columns, times
    frames or slices) is refused before decoding (:class:`TooManyPixels`). Invalid values
    raise ConfigError (a ValueError).
    """

    window_center: float | None = None
    window_width: float | None = None
    frame: int = -1
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if (self.window_center is None) != (self.window_width is None):
            raise ConfigError(
                "window_center and window_width must be given together: a VOI window needs "
                "both; set both or neither"
            )
        if self.window_width is not None:
            _check_window(self.window_center, self.window_width)
        frame = self.frame
        if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or frame < -1:
            raise ConfigError(
                f"invalid frame {self.frame!r}: it must be a frame index >= 0, or -1 for the "
                "middle frame"
            )
        limit = self.max_pixels
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ConfigError(
                f"invalid max_pixels {self.max_pixels!r}: it must be a whole number of pixels >= 1 "
                "(site.yaml max-image-pixels)"
            )

    @property
    def window(self) -> tuple[float, float] | None:
        """The configured ``(center, width)``, or None."""
        if self.window_center is None or self.window_width is None:
            return None
        return float(self.window_center), float(self.window_width)


def _check_window(center: Any, width: Any) -> None:
    try:
        valid = math.isfinite(float(center)) and math.isfinite(float(width)) and float(width) > 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(
            f"invalid window center={center!r} width={width!r}: both must be finite numbers "
            "and the width > 0; fix the window setting"
        )


@dataclass(frozen=True)
class ImageMeta:
    """Metadata of an image file; ``shape`` is that of the 2D array ``read_image`` returns."""

    kind: str
    shape: tuple[int, ...]
    num_frames: int
    spacing: tuple[float, float] | None
    modality: str | None
    sop_instance_uid: str | None
    photometric: str | None
    transfer_syntax: str | None
    tags: Mapping[str, str] = field(default_factory=dict)
    # sha256 of the stored pixel values, before any LUT or window (duplicate detection):
    # two different scans that window to the same saturated image are not duplicates.
    pixel_sha256: str = ""


def pixel_digest(values: np.ndarray) -> str:
    """sha256 of an array's values, shape and dtype."""
    arr = np.ascontiguousarray(values)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def short_reason(exc: BaseException, path: Path) -> str:
    """A short one-line reason from a library exception, without the file path."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    for form in sorted({str(path), str(path.absolute())}, key=len, reverse=True):
        text = text.replace(form, "<file>")
    text = " ".join(text.split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return text


def check_pixels(dims: tuple[int, ...], max_pixels: int) -> None:
    """TooManyPixels if the pixel count of ``dims`` (from a header) exceeds ``max_pixels``.

    Call it with the dimensions the header declares, before decoding: a tiny compressed
    file can declare an image that takes gigabytes once decoded.
    """
    count = math.prod(int(n) for n in dims)
    if count > max_pixels:
        raise too_many_pixels(count, max_pixels, "x".join(str(int(n)) for n in dims))


def too_many_pixels(count: int | str, max_pixels: int, dims: str = "") -> TooManyPixels:
    """The refusal of a file declaring ``count`` pixels (``dims``: as declared, e.g. '12000x12000')."""
    declared = f"the header declares {dims}" if dims else "refused from the header"
    return TooManyPixels(
        f"{count} pixels exceeds max-image-pixels={max_pixels} (site.yaml): {declared} and the "
        "file was not decoded; downsample the image, or raise max-image-pixels if such images "
        "are expected"
    )


def frame_index(frame: int, num_frames: int) -> int:
    """The frame to read: ``frame``, or the middle one for -1; ReadError if out of range."""
    if frame == -1:
        return num_frames // 2
    if not 0 <= frame < num_frames:
        raise ReadError(
            f"frame {frame} is out of range: the file has {num_frames} frame(s) "
            f"(valid 0..{num_frames - 1}, or -1 for the middle one); fix the frame setting"
        )
    return frame


def positive_spacing(values: Any) -> tuple[float, float] | None:
    """``(row, col)`` spacing from 2+ numbers if both are finite and > 0, else None."""
    try:
        row, col = float(values[0]), float(values[1])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(row) and math.isfinite(col)) or row <= 0 or col <= 0:
        return None
    return row, col


def plain_meta(kind: str, shape: tuple[int, ...], num_frames: int = 1,
               spacing: tuple[float, float] | None = None) -> ImageMeta:
    """Metadata of a non-DICOM file: no modality, UID, photometric, transfer syntax or tags."""
    return ImageMeta(
        kind=kind, shape=shape, num_frames=num_frames, spacing=spacing, modality=None,
        sop_instance_uid=None, photometric=None, transfer_syntax=None, tags={},
    )

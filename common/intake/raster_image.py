"""PNG and JPEG reading with Pillow.

Either suffix may hold either format (mislabelled exports): the kind in the metadata is the
file's content. The EXIF orientation is applied. Grayscale modes give ``(H, W)`` and keep
their 16/32-bit range; every other mode (palette, RGBA, CMYK, ...) becomes RGB. Pillow is
imported inside the functions that need it.

Pillow opens files lazily: :func:`read_raster` checks the width x height the header declares
against ``max_pixels`` (site.yaml ``max-image-pixels``) before ``load()`` decodes anything,
and sets ``PIL.Image.MAX_IMAGE_PIXELS`` to the same limit so that Pillow's own
decompression-bomb check agrees with the site's.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from medfed.common.intake.image_types import (
    ImageMeta,
    ReadError,
    TooManyPixels,
    check_pixels,
    plain_meta,
    short_reason,
    too_many_pixels,
)
from medfed.common.site_config import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["read_raster", "read_raster_header"]

_PIL_FORMATS = ("PNG", "JPEG")  # either suffix may hold either format (mislabelled exports)
_PIL_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_EXIF_ORIENTATION = 0x0112
_EXIF_SWAPS_AXES = (5, 6, 7, 8)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _pil_label(kind: str) -> str:
    return "PNG" if kind == "png" else "JPEG"


def _pil_unreadable(kind: str, exc: BaseException, path: Path) -> ReadError:
    return ReadError(
        f"unreadable {_pil_label(kind)}: {short_reason(exc, path)}; re-export or replace the file"
    )


def _pil_kind(img: Image.Image) -> str:
    """The kind of the opened image by its content (MPO, a multi-picture JPEG, is JPEG)."""
    return "png" if img.format == "PNG" else "jpeg"


def read_raster_header(path: Path, kind: str) -> ImageMeta:
    """Metadata of a PNG/JPEG file (``kind`` is the suffix's guess) without decoding pixels."""
    from PIL import Image

    try:
        with Image.open(path, formats=_PIL_FORMATS) as img:
            kind = _pil_kind(img)
            width, height = img.size
            mode = img.mode
            frames = int(getattr(img, "n_frames", 1))
            orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception as exc:  # Pillow raises many types on corrupt input
        raise _pil_unreadable(kind, exc, path) from exc
    if orientation in _EXIF_SWAPS_AXES:
        width, height = height, width
    shape = (height, width) if mode in _PIL_GRAY_MODES else (height, width, 3)
    return plain_meta(kind, shape, frames)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Gray modes -> (H, W) keeping 16/32-bit range; others (P, RGBA, CMYK, ...) -> RGB."""
    mode = img.mode
    if mode in ("LA", "La"):
        img = img.getchannel("L")
    elif mode == "1":
        img = img.convert("L")
    elif mode not in _PIL_GRAY_MODES and mode != "RGB":
        if mode in ("P", "PA"):
            img = img.convert("RGBA")  # keeps palette transparency info without a warning
        img = img.convert("RGB")
    return np.asarray(img).astype(np.float32)


def read_raster(path: Path, kind: str,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[np.ndarray, ImageMeta]:
    """Decode a PNG/JPEG file (EXIF orientation applied) to a float image and its metadata.

    TooManyPixels, before decoding, if the header declares more than ``max_pixels`` pixels.
    """
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's bomb check: a warning above, an error above twice
    try:
        with warnings.catch_warnings():
            # Pillow only warns between max_pixels and twice that; check_pixels refuses those below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, max_pixels) from exc
    except Exception as exc:  # Pillow raises many types on corrupt input
        raise _pil_unreadable(kind, exc, path) from exc
    with img:
        width, height = img.size
        check_pixels((width, height), max_pixels)  # from the header: nothing decoded yet
        try:
            img.load()
            kind = _pil_kind(img)
            frames = int(getattr(img, "n_frames", 1))
            image = _pil_to_array(ImageOps.exif_transpose(img))
        except Exception as exc:  # Pillow raises many types on corrupt input
            raise _pil_unreadable(kind, exc, path) from exc
    return image, plain_meta(kind, tuple(image.shape), frames)


def _bomb(exc: BaseException, max_pixels: int) -> TooManyPixels:
    """Pillow's own refusal (above twice ``max_pixels``), worded like :func:`check_pixels`."""
    found = _BOMB_PIXELS.search(str(exc))
    return too_many_pixels(found.group(1) if found else f"more than {2 * max_pixels}", max_pixels)

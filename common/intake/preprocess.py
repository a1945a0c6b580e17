"""Turn a reader image into a model input: float32 ``(channels, size, size)`` in ``[0, 1]``.

Input is what :func:`medfed.common.intake.readers.read_image` returns: ``(H, W)`` grayscale
or ``(H, W, 3)`` RGB float values in the file's own units. Steps:

1. channels: RGB -> gray with the ITU-R BT.601 luma weights (0.299, 0.587, 0.114) when
   ``channels == 1``; gray stays one channel and is repeated to 3 at the end when
   ``channels == 3`` (resizing one channel is cheaper than three).
2. resize straight to the square ``image_size x image_size`` with MONAI ``Resize``: the
   aspect ratio is NOT kept (no crop, no padding), the same convention as MedMNIST. When
   both sides shrink (the usual case: DICOMs are 512-3000 px) mode ``"area"`` averages
   every source pixel (anti-aliased, cheap); otherwise ``"bilinear"`` with anti-aliasing
   for any shrinking side.
3. MONAI ``ScaleIntensity(minv=0, maxv=1)`` over all channels together (keeps colour
   balance); a constant image becomes zeros.

MONAI (and with it torch) is imported only when a pipeline is first built, so importing
this module is cheap. The composed transforms are cached per settings.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from medfed.common.errors import ConfigError, DataError

__all__ = ["LUMA_WEIGHTS", "MIN_IMAGE_SIZE", "PreprocessSettings", "preprocess"]

logger = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 8
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 R, G, B


@dataclass(frozen=True)
class PreprocessSettings:
    """Output geometry: a square ``image_size`` side (>= 8) and 1 or 3 ``channels``."""

    image_size: int = 64
    channels: int = 1

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"invalid image_size {size!r}: it must be a whole number >= {MIN_IMAGE_SIZE} "
                "(the side of the square model input); fix the image-size setting"
            )
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ConfigError(
                f"invalid channels {self.channels!r}: the model input has 1 (grayscale) or 3 "
                "(RGB) channels; set 1 or 3"
            )


def preprocess(image: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """A reader image -> float32 ``(channels, image_size, image_size)`` in ``[0, 1]``."""
    chw = _channels_first(_validated(image), settings.channels)
    height, width = chw.shape[1:]
    shrink = height >= settings.image_size and width >= settings.image_size
    out = np.asarray(_pipeline(settings.image_size, shrink)(chw), dtype=np.float32)
    if settings.channels == 3 and out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


def _validated(image: Any) -> np.ndarray:
    """The image as float32 ``(H, W)`` or ``(H, W, 3)``; DataError (a ValueError) otherwise."""
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"cannot preprocess an array of dtype {arr.dtype}: pass a numeric image from "
            "read_image"
        )
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise DataError(
            f"cannot preprocess an array of shape {arr.shape}: expected (H, W) grayscale or "
            "(H, W, 3) RGB, as read_image returns"
        )
    if arr.size == 0:
        raise DataError(f"cannot preprocess an empty image (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError(
            "cannot preprocess an image with NaN or infinite values: read it with read_image, "
            "which rejects such files"
        )
    return arr


def _channels_first(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) / (H, W, 1) -> (1, H, W); (H, W, 3) -> (3, H, W), or (1, H, W) luma if channels == 1."""
    if arr.ndim == 2:
        return arr[np.newaxis]
    if arr.shape[2] == 1:
        return np.moveaxis(arr, -1, 0)
    if channels == 1:
        luma = arr @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
        return luma[np.newaxis]
    return np.moveaxis(arr, -1, 0)


@functools.lru_cache(maxsize=32)
def _pipeline(image_size: int, shrink: bool) -> Any:
    """The composed MONAI transform: Resize -> ScaleIntensity -> numpy float32."""
    from monai.transforms import Compose, EnsureType, Resize, ScaleIntensity

    size = (image_size, image_size)
    resize = (
        Resize(spatial_size=size, mode="area")
        if shrink
        else Resize(spatial_size=size, mode="bilinear", align_corners=False, anti_aliasing=True)
    )
    logger.debug("built preprocess pipeline: size %d, %s", image_size, resize.mode)
    return Compose([
        resize,
        ScaleIntensity(minv=0.0, maxv=1.0),
        EnsureType(data_type="numpy", dtype=np.float32, track_meta=False),
    ])

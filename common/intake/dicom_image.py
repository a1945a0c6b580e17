"""DICOM image reading with pydicom: header checks, frame decoding, codecs, LUTs and windows.

Pipeline (PS3.3 C.11 order): decode the selected frame -> Modality LUT (Rescale
Slope/Intercept, or a Modality LUT Sequence) -> VOI window (configured window, else the
file's first Window Center/Width, else none) as a linear clip to ``[c - w/2, c + w/2]`` ->
MONOCHROME1 inverted so that higher is brighter. Enhanced (multi-frame) objects are
supported: rescale, window and pixel spacing are also looked up in the per-frame and shared
functional groups. Colour DICOM (RGB, YBR converted to RGB by pydicom, PALETTE COLOR) is
returned as RGB without Modality/VOI LUT.

Files that are truncated, have no pixel data (structured reports, DICOMDIR) or need a
missing decoder plugin raise :class:`ReadError` with a one-line reason and fix. A file whose
header declares more than ``ReadSettings.max_pixels`` pixels (Rows x Columns x
NumberOfFrames) is refused (:class:`~.image_types.TooManyPixels`) before its pixel data is
decoded. pydicom is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from medfed.common.intake.image_types import (
    DICOM_CODECS_HINT,
    ImageMeta,
    ReadError,
    ReadSettings,
    check_pixels,
    frame_index,
    pixel_digest,
    positive_spacing,
    short_reason,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["DICOM_TAG_KEYWORDS", "read_dicom", "read_dicom_header"]

logger = logging.getLogger(__name__)

# DICOM tags kept in ImageMeta.tags (site-local use only: QC report, manifests).
DICOM_TAG_KEYWORDS = (
    "PatientID",
    "PatientSex",
    "PatientAge",
    "Manufacturer",
    "Modality",
    "AccessionNumber",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "BodyPartExamined",
)

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NO_PIXELS = (
    "DICOM has no pixel data (e.g. a structured report or DICOMDIR): "
    "list only image files (the DICOMDIR's referenced files) in the manifest"
)


def _dcmread(path: Path, *, header_only: bool) -> Dataset:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise ReadError(
            "not a DICOM file (no DICM preamble): the 128-byte preamble and 'DICM' marker of "
            "a DICOM Part 10 file are missing; export the image from PACS as DICOM Part 10"
        ) from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise ReadError(
            f"truncated or corrupt DICOM: {short_reason(exc, path)}; re-export the file"
        ) from exc


def _is_dicomdir(ds: Dataset) -> bool:
    file_meta = getattr(ds, "file_meta", None)
    sop_class = None if file_meta is None else file_meta.get("MediaStorageSOPClassUID")
    return str(sop_class) == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _looks_truncated(ds: Dataset) -> bool:
    """True if the dataset is empty or its last element's value is shorter than declared.

    pydicom silently stops at end of file, so a file cut in its header reads as a dataset
    whose last element is short (or that has no elements at all).
    """
    tags = list(ds.keys())
    if not tags:
        return True
    raw = ds.get_item(tags[-1])
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    return (
        isinstance(value, bytes)
        and isinstance(length, int)
        and length != _UNDEFINED_LENGTH
        and len(value) < length
    )


def _check_has_pixels(ds: Dataset, *, header_only: bool) -> None:
    if _is_dicomdir(ds):
        raise ReadError(_NO_PIXELS)
    has_pixels = "Rows" in ds and "Columns" in ds
    if not header_only:
        has_pixels = has_pixels and any(kw in ds for kw in _PIXEL_DATA_KEYWORDS)
    if has_pixels:
        return
    if _looks_truncated(ds):
        raise ReadError(
            "truncated or corrupt DICOM: the file ends inside its header, before the pixel "
            "data; re-export or re-copy the file"
        )
    if "Rows" in ds and not header_only:
        raise ReadError(
            "truncated or corrupt DICOM: the image attributes (Rows/Columns) are present but "
            "the Pixel Data element is missing (the file probably ends early); re-export it"
        )
    raise ReadError(_NO_PIXELS)


def _frame_attr(ds: Dataset, frame: int, group: str, keyword: str) -> Any:
    """An attribute for one frame: per-frame functional group, shared group, then top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and 0 <= frame < len(per_frame):
        value = _group_value(per_frame[frame], group, keyword)
        if value is not None:
            return value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        value = _group_value(shared[0], group, keyword)
        if value is not None:
            return value
    return ds.get(keyword)


def _group_value(item: Dataset, group: str, keyword: str) -> Any:
    seq = item.get(group)
    if not seq:
        return None
    return seq[0].get(keyword)


def _first_float(value: Any) -> float | None:
    """First value of a (possibly multi-valued) numeric element as a finite float, or None."""
    if value is None:
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _tag_str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        return ""  # an invalid value that pydicom cannot convert
    return "" if value is None else str(value).strip()


def _num_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return max(int(value), 1)
    except (TypeError, ValueError) as exc:
        raise ReadError(
            f"invalid NumberOfFrames {value!r}: it must be a whole number; fix or re-export the file"
        ) from exc


def _rows_columns(ds: Dataset) -> tuple[int, int]:
    """Rows and Columns as declared; ReadError when they are not whole numbers."""
    try:
        return int(ds.Rows), int(ds.Columns)
    except (TypeError, ValueError) as exc:
        raise ReadError(
            f"invalid Rows/Columns {ds.get('Rows')!r}/{ds.get('Columns')!r}: they must be whole "
            "numbers; fix or re-export the file"
        ) from exc


def _photometric(ds: Dataset) -> str:
    return _tag_str(ds, "PhotometricInterpretation").upper()


def _dicom_spacing(ds: Dataset, frame: int) -> tuple[float, float] | None:
    spacing = positive_spacing(_frame_attr(ds, frame, "PixelMeasuresSequence", "PixelSpacing"))
    if spacing is None:
        spacing = positive_spacing(ds.get("ImagerPixelSpacing"))
    return spacing


def _transfer_syntax(ds: Dataset) -> Any:
    file_meta = getattr(ds, "file_meta", None)
    return None if file_meta is None else file_meta.get("TransferSyntaxUID")


def _dicom_shape(ds: Dataset) -> tuple[int, ...]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel") or 1)
    colour = samples == 3 or _photometric(ds) == "PALETTE COLOR"
    return (rows, cols, 3) if colour else (rows, cols)


def _dicom_meta(ds: Dataset, frame: int) -> ImageMeta:
    ts = _transfer_syntax(ds)
    return ImageMeta(
        kind="dicom",
        shape=_dicom_shape(ds),
        num_frames=_num_frames(ds),
        spacing=_dicom_spacing(ds, frame),
        modality=_tag_str(ds, "Modality") or None,
        sop_instance_uid=_tag_str(ds, "SOPInstanceUID") or None,
        photometric=_photometric(ds) or None,
        transfer_syntax=None if ts is None else ts.name,
        tags={kw: _tag_str(ds, kw) for kw in DICOM_TAG_KEYWORDS},
    )


def read_dicom_header(path: Path) -> ImageMeta:
    """Metadata of a DICOM file (of its middle frame) without decoding its pixels."""
    ds = _dcmread(path, header_only=True)
    _check_has_pixels(ds, header_only=True)
    return _dicom_meta(ds, _num_frames(ds) // 2)


def read_dicom(path: Path, settings: ReadSettings) -> tuple[np.ndarray, ImageMeta]:
    """Decode the selected frame to a float image (see the module docstring) and its metadata."""
    ds = _dcmread(path, header_only=False)
    _check_has_pixels(ds, header_only=False)
    num_frames = _num_frames(ds)
    frames = (num_frames,) if num_frames > 1 else ()
    check_pixels((*_rows_columns(ds), *frames), settings.max_pixels)  # from the header: nothing decoded
    frame = frame_index(settings.frame, num_frames)
    raw = _decode_dicom(ds, frame if num_frames > 1 else None, path)
    image = _dicom_values(raw, ds, frame, settings)
    return image, dataclasses.replace(_dicom_meta(ds, frame), pixel_sha256=pixel_digest(raw))


def _ts_label(ts: Any) -> str:
    name = getattr(ts, "name", "") or ""
    return f"{name} ({ts})" if name and name != str(ts) else str(ts)


def _decode_dicom(ds: Dataset, index: int | None, path: Path) -> np.ndarray:
    """Decode one frame (``index``) or the only frame (None) of the pixel data."""
    from pydicom import pixels

    ts = _transfer_syntax(ds)
    if ts is None:
        raise ReadError(
            "truncated or corrupt DICOM: the file meta header has no Transfer Syntax UID; "
            "re-export the file"
        )
    label = _ts_label(ts)
    try:
        decoder = pixels.get_decoder(ts)
    except NotImplementedError as exc:
        raise ReadError(
            f"no pixel data decoder exists for transfer syntax {label}: convert the file to "
            "an uncompressed or JPEG/JPEG 2000 transfer syntax (e.g. with gdcmconv)"
        ) from exc
    if not decoder.is_available:
        raise ReadError(_missing_codec(label))
    try:
        return pixels.pixel_array(ds, index=index)
    except (RuntimeError, NotImplementedError) as exc:
        if "missing dependencies" in str(exc) or "no pixel data decoder" in str(exc).lower():
            raise ReadError(_missing_codec(label)) from exc
        raise ReadError(_corrupt_pixels(label, exc, path)) from exc
    except Exception as exc:  # decoders raise many types on corrupt data
        raise ReadError(_corrupt_pixels(label, exc, path)) from exc


def _missing_codec(label: str) -> str:
    return (
        f"compressed DICOM pixel data ({label}) cannot be decoded: no decoder plugin is "
        f"installed; install one with {DICOM_CODECS_HINT}"
    )


def _corrupt_pixels(label: str, exc: BaseException, path: Path) -> str:
    return (
        f"truncated or corrupt DICOM pixel data ({label}): {short_reason(exc, path)}; "
        "re-export or re-copy the file"
    )


def _dicom_values(raw: np.ndarray, ds: Dataset, frame: int, settings: ReadSettings) -> np.ndarray:
    """Decoded pixels -> float image: colour as RGB; grayscale through Modality LUT, VOI, MONOCHROME1."""
    photometric = _photometric(ds)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return apply_color_lut(raw, ds).astype(np.float32)
    if raw.ndim == 3:  # RGB; pydicom converts YBR_* to RGB while decoding
        return raw.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results: ReadError later
        values = _apply_modality_lut(raw, ds, frame)
        window = settings.window or _file_window(ds, frame)
        if window is not None:
            center, width = window
            low, high = center - width / 2.0, center + width / 2.0
            values = np.clip(values, low, high)
        else:
            low, high = float(values.min()), float(values.max())
        if photometric == "MONOCHROME1":
            values = (high + low) - values
        return values.astype(np.float32)


def _apply_modality_lut(raw: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    slope = _first_float(_frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first_float(
        _frame_attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    )
    values = raw.astype(np.float64)
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def _file_window(ds: Dataset, frame: int) -> tuple[float, float] | None:
    center = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first_float(_frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is None or width is None:
        return None
    if width <= 0:
        logger.warning("ignoring the DICOM file's window width %s (must be > 0)", width)
        return None
    return center, width

"""Read image + mask pairs listed in a manifest CSV into one :class:`SegSplit` per split.

The manifest has the columns ``path`` (image) and ``mask``, both relative to the site's
data root, and optionally ``patient_id`` and ``split`` (``train``/``val``/``test``; rows
without one are returned under :data:`UNASSIGNED` for the caller to split by patient).
Each image is read with :func:`~medfed.common.intake.readers.read_image` and turned into a
float32 ``(channels, image_size, image_size)`` array in ``[0, 1]`` by
:func:`~medfed.common.intake.preprocess.preprocess` (area or bilinear resize); its mask is
read with :func:`~medfed.common.segmentation.masks.read_mask` and resized with
nearest-neighbour sampling, so it keeps integer labels.

A row is dropped, with a :class:`~medfed.common.intake.manifest.RowProblem` saying why,
when a path is absolute or leaves the data root (also through a symbolic link), a file
cannot be read, the mask is not integer labels, or image and mask sizes differ (compared
before resizing). The data root is only read, never written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from medfed.common.intake.manifest import (
    PATH,
    PATIENT_ID,
    SPLIT,
    SPLIT_NAMES,
    RowProblem,
    _relative_path,
    bad_split,
    clean,
    normalise_split,
    read_table,
    require_columns,
)
from medfed.common.intake.paths import OutsideDataRoot, confined
from medfed.common.intake.preprocess import PreprocessSettings, preprocess
from medfed.common.intake.readers import ReadError, ReadSettings, read_image
from medfed.common.segmentation.data import SegSplit
from medfed.common.segmentation.masks import MaskLabelError, read_mask, resize_mask

__all__ = ["MASK", "UNASSIGNED", "SegPairs", "read_segmentation_pairs"]

log = logging.getLogger(__name__)

MASK = "mask"
UNASSIGNED = "unassigned"  # rows without a split value


@dataclass(frozen=True)
class SegPairs:
    """The usable pairs per split, their patient ids (``""`` = unknown), and every dropped row."""

    splits: dict[str, SegSplit]
    patient_ids: dict[str, tuple[str, ...]]
    problems: tuple[RowProblem, ...]


@dataclass(frozen=True)
class _Pair:
    image: np.ndarray
    mask: np.ndarray
    patient_id: str
    split: str


def read_segmentation_pairs(
    manifest_csv: Path,
    data_root: Path,
    image_size: int = 64,
    channels: int = 1,
    settings: ReadSettings | None = None,
) -> SegPairs:
    """Read every usable pair of ``manifest_csv`` (paths relative to ``data_root``).

    Raises :class:`~medfed.common.intake.manifest.ManifestError` when the CSV is unusable or
    lacks the ``path``/``mask`` columns; row-level problems are returned, not raised.
    """
    manifest_csv, root = Path(manifest_csv), Path(data_root)
    target = PreprocessSettings(image_size=image_size, channels=channels)
    table = read_table(manifest_csv, "segmentation manifest")
    require_columns(table, (PATH, MASK), manifest_csv, "segmentation manifest")
    problems = list(table.problems)
    pairs: list[_Pair] = []
    for line, record in table.records:
        result = _read_pair(line, record, root, target, settings or ReadSettings())
        (problems if isinstance(result, RowProblem) else pairs).append(result)
    problems.sort(key=lambda p: p.line)
    log.info("segmentation manifest %s: %d usable pairs, %d problems",
             manifest_csv.name, len(pairs), len(problems))
    for problem in problems:
        log.debug("%s: %s (%s)", manifest_csv.name, problem.kind, problem.detail)
    return _assemble(pairs, problems, target)


def _read_pair(line: int, record: dict[str, str], root: Path, target: PreprocessSettings,
               settings: ReadSettings) -> _Pair | RowProblem:
    files = []
    for column in (PATH, MASK):
        rel = _relative_path(record[column], line)
        if isinstance(rel, RowProblem):
            return rel
        full = root / rel
        try:
            confined(full, root)
        except OutsideDataRoot as exc:
            return RowProblem(line, "path-escapes-root", f"line {line} {column} '{rel}' {exc}")
        files.append((rel, full))
    split = normalise_split(record.get(SPLIT, ""))
    if split is None:
        return bad_split(line, record[SPLIT])
    (image_rel, image_path), (mask_rel, mask_path) = files
    try:
        image, _meta = read_image(image_path, settings)
    except ReadError as exc:
        return RowProblem(line, "unreadable-image", f"line {line} image '{image_rel}': {exc}")
    try:
        mask = read_mask(mask_path, settings)
    except MaskLabelError as exc:
        return RowProblem(line, "not-a-label-mask", f"line {line} mask '{mask_rel}': {exc}")
    except ReadError as exc:
        return RowProblem(line, "unreadable-mask", f"line {line} mask '{mask_rel}': {exc}")
    if image.shape[:2] != mask.shape:
        return RowProblem(
            line, "shape-mismatch",
            f"line {line}: image '{image_rel}' is {image.shape[0]}x{image.shape[1]} but mask "
            f"'{mask_rel}' is {mask.shape[0]}x{mask.shape[1]}; a mask must label every pixel of its image",
        )
    return _Pair(preprocess(image, target), resize_mask(mask, target.image_size),
                 clean(record.get(PATIENT_ID, "")), split or UNASSIGNED)


def _assemble(pairs: Sequence[_Pair], problems: list[RowProblem], target: PreprocessSettings) -> SegPairs:
    splits: dict[str, SegSplit] = {}
    patient_ids: dict[str, tuple[str, ...]] = {}
    for name in (*SPLIT_NAMES, UNASSIGNED):
        chosen = [p for p in pairs if p.split == name]
        if not chosen and name == UNASSIGNED:
            continue
        size = (target.channels, target.image_size, target.image_size)
        images = np.stack([p.image for p in chosen]) if chosen else np.zeros((0, *size), np.float32)
        masks = np.stack([p.mask for p in chosen]) if chosen else np.zeros((0, *size[1:]), np.int64)
        splits[name] = SegSplit(images, masks)
        patient_ids[name] = tuple(p.patient_id for p in chosen)
    return SegPairs(splits, patient_ids, tuple(problems))

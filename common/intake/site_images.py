"""Read a site's images once, with one policy shared by ``medfed site check`` and training.

:func:`iter_site_images` walks the site's manifest (or scanned DICOM folder), assigns
patient-level splits where the manifest has none, and yields one :class:`ImageRecord`
per row: the preprocessed image, or the reason it cannot be used. A bad file is a record
with an ``error``, never an exception, so a QC run lists it and a training round skips
it. Two kinds of file are *refused* rather than read: one whose real location (symbolic
links followed) is outside ``data-root`` (:func:`~medfed.common.intake.paths.confined`),
and one whose header declares more pixels than ``max-image-pixels``. Refusals are logged
at the site with the path relative to the data root, never the absolute path or a link's
target. Files are opened read-only; the preprocessing cache is written to the site's
state directory only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.intake.ages import AgeBands, bin_ages
from medfed.common.intake.cache import PreprocessCache
from medfed.common.intake.dicom_scan import scan_dicom_folder
from medfed.common.intake.manifest import Manifest, ManifestRow, read_manifest
from medfed.common.intake.paths import OutsideDataRoot, confined
from medfed.common.intake.patient_split import assign_splits
from medfed.common.intake.preprocess import PreprocessSettings
from medfed.common.intake.readers import ReadSettings
from medfed.common.site_config import SiteConfig

log = logging.getLogger(__name__)

MISSING_FILE = "missing-file"
UNREADABLE = "unreadable"
OUTSIDE_DATA_ROOT = "outside-data-root"  # refused: the file (a link's target) is outside data-root
TOO_MANY_PIXELS = "too-many-pixels"  # refused: the header declares more than max-image-pixels
REFUSALS = (OUTSIDE_DATA_ROOT, TOO_MANY_PIXELS)


@dataclass(frozen=True)
class ImageRecord:
    """One manifest row after reading: ``image`` is None exactly when ``error`` is set."""

    row: ManifestRow
    split: str
    image: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # "" or "<code>: <reason>"


def load_site_manifest(site: SiteConfig) -> Manifest:
    """The site's manifest (CSV or DICOM folder scan), with age bands when configured."""
    if site.dataset == "manifest":
        manifest = read_manifest(site.data_path(site.manifest), Path(site.data_root))
    elif site.dataset == "dicom":
        manifest = scan_dicom_folder(
            site.data_path(site.dicom_dir),
            Path(site.data_root),
            site.data_path(site.labels_csv),
            join_key=site.label_join,
            label_column=site.label_column,
            attribute_tags=site.attribute_tags,
        )
    else:
        raise ValueError(f"site dataset {site.dataset!r} has no manifest")
    if site.age_bands:
        manifest = bin_ages(manifest, AgeBands(tuple(site.age_bands)))
    return manifest


def target_settings(site: SiteConfig, image_size: int = 0, channels: int = 0) -> PreprocessSettings:
    """The model input: the study's run config wins, else the site's own defaults."""
    return PreprocessSettings(image_size=image_size or site.image_size, channels=channels or site.channels)


def read_settings(site: SiteConfig) -> ReadSettings:
    return ReadSettings(window_center=site.window_center, window_width=site.window_width, frame=site.frame,
                        max_pixels=site.max_image_pixels)


def site_cache(site: SiteConfig, target: PreprocessSettings) -> PreprocessCache:
    rs = read_settings(site)
    # max_pixels is in the token so that entries cached under a higher (or no) limit are not reused
    token = (f"{rs.window_center}|{rs.window_width}|{rs.frame}|{target.image_size}|{target.channels}"
             f"|{rs.max_pixels}")
    return PreprocessCache(
        Path(site.state_dir) / "cache" / "preprocessed", int(site.cache_max_mb * 1e6), token
    )


def row_splits(site: SiteConfig, manifest: Manifest) -> tuple[str, ...]:
    """Each row's split: the manifest's own, else seeded patient-level assignment."""
    return assign_splits(manifest.rows, tuple(site.split_fractions), site.split_seed)


def iter_site_images(
    site: SiteConfig,
    manifest: Manifest,
    splits: tuple[str, ...],
    target: PreprocessSettings,
    cache: PreprocessCache | None = None,
) -> Iterator[ImageRecord]:
    """Yield one :class:`ImageRecord` per manifest row, in manifest order."""
    root = Path(site.data_root)
    settings = read_settings(site)
    for row, split in zip(manifest.rows, splits):
        yield _read_row(root, row, split, settings, target, cache)


def _refused(row: ManifestRow, split: str, code: str, reason: str) -> ImageRecord:
    log.warning("refused %s: %s", row.path, reason)  # relative to data-root; stays at the site
    return ImageRecord(row, split, None, error=f"{code}: {reason}")


def _read_row(root: Path, row: ManifestRow, split: str, settings: ReadSettings,
              target: PreprocessSettings, cache: PreprocessCache | None) -> ImageRecord:
    from medfed.common.intake.readers import ReadError, TooManyPixels, read_image

    path = root / row.path
    try:
        confined(path, root)
    except OutsideDataRoot as exc:
        return _refused(row, split, OUTSIDE_DATA_ROOT, str(exc))
    if not path.is_file():
        return ImageRecord(row, split, None, error=f"{MISSING_FILE}: no such file")
    if cache is not None:
        hit = cache.get(path)
        if hit is not None:
            return ImageRecord(row, split, hit.image, hit.info)
    try:
        raw, meta = read_image(path, settings)
        image = _preprocess(raw, target)
    except TooManyPixels as exc:
        return _refused(row, split, TOO_MANY_PIXELS, str(exc))
    except ReadError as exc:
        return ImageRecord(row, split, None, error=f"{UNREADABLE}: {exc}")
    except (ValueError, OSError, MemoryError) as exc:  # a reader edge case must not stop the site
        return ImageRecord(row, split, None, error=f"{UNREADABLE}: {type(exc).__name__}: {exc}")
    info = {
        "kind": meta.kind,
        "shape": list(meta.shape),
        "num-frames": meta.num_frames,
        "spacing": None if meta.spacing is None else [round(float(s), 4) for s in meta.spacing],
        "modality": meta.modality or "",
        "sop-instance-uid": meta.sop_instance_uid or "",
        "pixel-sha256": meta.pixel_sha256,
    }
    if cache is not None:
        cache.put(path, image, info)
    return ImageRecord(row, split, image, info)


def _preprocess(raw: np.ndarray, target: PreprocessSettings) -> np.ndarray:
    from medfed.common.intake.preprocess import preprocess

    return preprocess(raw, target)


@dataclass(frozen=True)
class SiteRead:
    """One pass over a site: its manifest, each row's split, the cache, and the records."""

    manifest: Manifest
    splits: tuple[str, ...]
    target: PreprocessSettings
    cache: PreprocessCache
    records: Iterator[ImageRecord]


def read_site(site: SiteConfig, image_size: int = 0, channels: int = 0) -> SiteRead:
    """Start reading a site (manifest, splits, cache); records are read lazily, in manifest order."""
    manifest = load_site_manifest(site)
    target = target_settings(site, image_size, channels)
    cache = site_cache(site, target)
    splits = row_splits(site, manifest)
    return SiteRead(manifest, splits, target, cache, iter_site_images(site, manifest, splits, target, cache))

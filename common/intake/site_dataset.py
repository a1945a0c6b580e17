"""Turn a site's manifest into the training data contract (:class:`SiteData`).

The same rows, readers and policy as ``medfed site check``: a row is used unless its file
is missing or unreadable, its label is outside the declared set, or it duplicates an
earlier image (same SOPInstanceUID or identical pixels, which would otherwise put one
image in two splits). Every skipped row is counted by reason and logged at the site;
nothing about individual rows leaves it.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from medfed.common.data.splits import DatasetInfo, ImageSplit, SiteData
from medfed.common.errors import DataError
from medfed.common.intake.preprocess import PreprocessSettings
from medfed.common.intake.site_images import ImageRecord, read_site
from medfed.common.site_config import SiteConfig

log = logging.getLogger(__name__)

LABEL_OUTSIDE_SET = "label-outside-set"
DUPLICATE_SOP = "duplicate-sop-instance-uid"
DUPLICATE_PIXELS = "duplicate-pixels"
MISSING_GROUP = "unknown"  # group name for rows whose group attribute is empty


@dataclass(frozen=True)
class IntakeSummary:
    """What a site used and skipped (counts only; stays at the site)."""

    used: dict[str, int]  # per split
    skipped: dict[str, int]  # per reason code
    cache_hits: int
    cache_misses: int


def duplicate_reason(rec: ImageRecord, seen_uids: set[str], seen_pixels: set[str]) -> str:
    """``""`` for a first occurrence, else why ``rec`` repeats an earlier image (updates the sets)."""
    uid, sha = rec.info.get("sop-instance-uid", ""), rec.info.get("pixel-sha256", "")
    if uid and uid in seen_uids:
        return DUPLICATE_SOP
    if sha and sha in seen_pixels:
        return DUPLICATE_PIXELS
    if uid:
        seen_uids.add(uid)
    if sha:
        seen_pixels.add(sha)
    return ""


def build_site_data(site: SiteConfig, image_size: int = 0, channels: int = 0) -> tuple[DatasetInfo, SiteData, IntakeSummary]:
    """Read the site's images (through the cache) into train/val/test splits."""
    read = read_site(site, image_size, channels)
    manifest, target, cache = read.manifest, read.target, read.cache
    label_index = {name: i for i, name in enumerate(site.labels)}
    skipped: Counter[str] = Counter(p.kind for p in manifest.problems)
    seen_uids: set[str] = set()
    seen_pixels: set[str] = set()
    kept: list[ImageRecord] = []
    for rec in read.records:
        if rec.error:
            skipped[rec.error.split(":", 1)[0]] += 1
        elif rec.row.label not in label_index:
            skipped[LABEL_OUTSIDE_SET] += 1
        elif reason := duplicate_reason(rec, seen_uids, seen_pixels):
            skipped[reason] += 1
        else:
            kept.append(rec)
    if not kept:
        raise DataError(
            f"site {site.site_id}: none of the {len(manifest.rows)} manifest rows gave a usable "
            f"image (skipped: {dict(skipped)}); run 'medfed site check --config site.yaml' to see why"
        )
    info = _dataset_info(site, kept, target.channels, target.image_size)
    group_index = {v: i for i, v in enumerate(info.group_values)}
    parts = {}
    for split in ("train", "val", "test"):
        recs = [r for r in kept if r.split == split]
        parts[split] = _image_split(recs, label_index, group_index, site.group_attribute, target)
    summary = IntakeSummary(
        used={k: len(v) for k, v in parts.items()},
        skipped=dict(skipped),
        cache_hits=cache.hits,
        cache_misses=cache.misses,
    )
    log.info(
        "site %s intake: used %s, skipped %s, cache hits %d", site.site_id, summary.used,
        summary.skipped or "nothing", summary.cache_hits,
    )
    if not len(parts["train"]):
        raise DataError(
            f"site {site.site_id}: no usable training image (used {summary.used}); check the "
            "manifest's split column or split-fractions"
        )
    return info, SiteData(site.site_id, parts["train"], parts["val"], parts["test"]), summary


def _dataset_info(site: SiteConfig, kept: list[ImageRecord], channels: int, size: int) -> DatasetInfo:
    group_name, group_values = None, ()
    if site.group_attribute:
        values = {r.row.attributes.get(site.group_attribute, "") for r in kept}
        if values == {""}:
            log.warning(
                "site %s: group-attribute %r is empty in every row: no subgroup metrics",
                site.site_id, site.group_attribute,
            )
        else:
            group_name = site.group_attribute
            group_values = tuple(sorted(v or MISSING_GROUP for v in values))
    return DatasetInfo(
        name=f"site-{site.site_id}",
        num_classes=len(site.labels),
        in_channels=channels,
        image_size=size,
        label_names=tuple(site.labels),
        group_name=group_name,
        group_values=group_values,
    )


def _image_split(recs: list[ImageRecord], label_index: dict[str, int], group_index: dict[str, int],
                 group_attribute: str, target: PreprocessSettings) -> ImageSplit:
    if recs:
        images = np.stack([r.image for r in recs]).astype(np.float32, copy=False)
    else:
        images = np.zeros((0, target.channels, target.image_size, target.image_size), np.float32)
    labels = np.array([label_index[r.row.label] for r in recs], dtype=np.int64)
    groups = None
    if group_index:
        groups = np.array(
            [group_index[r.row.attributes.get(group_attribute, "") or MISSING_GROUP] for r in recs],
            dtype=np.int64,
        )
    return ImageSplit(images, labels, groups)

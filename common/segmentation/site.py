"""A hospital site's own segmentation data: image + mask pairs listed in its manifest.

``site.yaml`` says ``task: segmentation``, names a manifest with the columns ``path`` and
``mask`` (optionally ``patient_id`` and ``split``), and declares the mask classes in
``labels``, background first (``labels: [background, lesion]``: mask value 0 and 1). Rows
without a split are split by patient exactly as classification manifests are
(:func:`~medfed.common.intake.patient_split.assign_splits`: seeded, no patient in two
splits). A mask value outside the declared classes stops the site with an error that says
which value; row-level problems (unreadable files, size mismatches, paths leaving the data
root) drop the row and are logged at the site only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from medfed.common.data.splits import DatasetInfo
from medfed.common.errors import DataError
from medfed.common.intake.manifest import SPLIT_NAMES, ManifestRow
from medfed.common.intake.patient_split import assign_splits
from medfed.common.intake.site_images import read_settings
from medfed.common.segmentation.data import SegSiteData, SegSplit
from medfed.common.segmentation.pairs import (
    UNASSIGNED,
    SegPairs,
    read_segmentation_pairs,
)
from medfed.common.site_config import SiteConfig

log = logging.getLogger(__name__)


def build_seg_site_data(site: SiteConfig, image_size: int = 0, channels: int = 0) -> tuple[DatasetInfo, SegSiteData]:
    """The site's train/val/test segmentation splits at the study's input size."""
    size, chans = image_size or site.image_size, channels or site.channels
    pairs = read_segmentation_pairs(site.data_path(site.manifest), Path(site.data_root), size, chans,
                                    read_settings(site))
    for problem in pairs.problems:
        log.warning("site %s: manifest line %d dropped: %s", site.site_id, problem.line, problem.kind)
    splits = {name: pairs.splits[name] for name in SPLIT_NAMES}
    if UNASSIGNED in pairs.splits:
        splits = _assign_by_patient(splits, pairs, site)
    info = DatasetInfo(name=f"{site.site_id}-segmentation", num_classes=len(site.labels), in_channels=chans,
                       image_size=size, label_names=tuple(site.labels))
    for name, split in splits.items():
        top = int(split.masks.max()) if len(split) else 0
        if top >= info.num_classes:
            raise DataError(
                f"site {site.site_id}: a {name} mask has value {top} but labels declares "
                f"{info.num_classes} classes ({', '.join(site.labels)}): declare every mask class, background first"
            )
    if not len(splits["train"]):
        raise DataError(f"site {site.site_id}: no usable training image+mask pair in its manifest "
                        "(run 'medfed site check' for the reasons)")
    return info, SegSiteData(site.site_id, splits["train"], splits["val"], splits["test"])


def _assign_by_patient(splits: dict[str, SegSplit], pairs: SegPairs, site: SiteConfig) -> dict[str, SegSplit]:
    """Rows without a split go where their patient's other rows are, else by the seeded split."""
    # A row without a patient id is its own patient (assign_splits keys it by its path).
    rows = [ManifestRow(line=0, path=f"{name}/{i}", label="", patient_id=pid, split=name)
            for name in SPLIT_NAMES for i, pid in enumerate(pairs.patient_ids[name])]
    free_ids = pairs.patient_ids[UNASSIGNED]
    rows += [ManifestRow(line=0, path=f"free/{i}", label="", patient_id=pid) for i, pid in enumerate(free_ids)]
    names = np.asarray(assign_splits(rows, tuple(site.split_fractions), site.split_seed)[-len(free_ids):])
    free = pairs.splits[UNASSIGNED]
    return {name: SegSplit.concat([splits[name], free.subset(np.flatnonzero(names == name))])
            for name in SPLIT_NAMES}

"""``medfed site check`` for a segmentation site: read every image + mask pair once and report.

The same readers and the same row policy as training
(:func:`~medfed.common.segmentation.pairs.read_segmentation_pairs`), so what the check
counts is what a round will use. The report is a :class:`~medfed.common.intake.qc.QCReport`
(printed with :func:`~medfed.common.intake.qc.format_qc`): pairs per split and, per mask
class, how many images contain it and the share of pixels it covers; every dropped row
with its reason; patients in more than one split. *Fatal* (training would not start): the
manifest is unusable, no usable pair, no training pair, or a mask value outside the
declared ``labels``. It stays at the site; nothing is sent anywhere.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from medfed.common.intake.manifest import SPLIT_NAMES, ManifestError
from medfed.common.intake.qc import QCReport
from medfed.common.intake.site_images import read_settings
from medfed.common.segmentation.pairs import UNASSIGNED, read_segmentation_pairs
from medfed.common.site_config import SiteConfig

__all__ = ["check_seg_site"]


def check_seg_site(site: SiteConfig) -> QCReport:
    """QC of the site's image + mask pairs (read-only); never raises on bad data."""
    t0 = time.perf_counter()
    report = QCReport(site.site_id)
    manifest = site.data_path(site.manifest)
    report.source = f"segmentation manifest {Path(manifest).name}"
    try:
        pairs = read_segmentation_pairs(manifest, Path(site.data_root), site.image_size, site.channels,
                                        read_settings(site))
    except ManifestError as exc:
        report.fatal.append(f"manifest unusable: {exc}")
        report.seconds = time.perf_counter() - t0
        return report
    labels = list(site.labels)
    report.usable = sum(len(s) for s in pairs.splits.values())
    report.rows = report.usable + len(pairs.problems)
    per_split: dict[str, dict[str, int]] = {}
    pixels: Counter[int] = Counter()
    out_of_range: set[int] = set()
    for name, split in pairs.splits.items():
        present = Counter()
        for mask in split.masks:
            values, counts = np.unique(mask, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist()):
                pixels[value] += count
                if value >= len(labels):
                    out_of_range.add(value)
                else:
                    present[labels[value]] += 1
        per_split[name] = {label: present.get(label, 0) for label in labels}
    total_pixels = sum(pixels.values()) or 1
    report.counts = {
        "label": labels,  # images containing each class, per split
        "split-label": per_split,
        "attributes": {},
        "pairs": {name: len(split) for name, split in pairs.splits.items()},
        "pixel-share": {(labels[v] if v < len(labels) else f"undeclared value {v}"): round(n / total_pixels, 6)
                        for v, n in sorted(pixels.items())},
    }
    report.images = {"input size": {f"{site.channels}x{site.image_size}x{site.image_size}": report.usable}}
    report.problems["manifest"] = [{"line": p.line, "kind": p.kind, "detail": p.detail} for p in pairs.problems]
    kinds = Counter(p.kind for p in pairs.problems)
    if kinds:
        report.warnings.append("rows dropped: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    leaks = _patients_in_several_splits(pairs.patient_ids)
    report.problems["patients-in-several-splits"] = [{"patient_id": p, "splits": s} for p, s in leaks.items()]
    if leaks:
        report.warnings.append(f"{len(leaks)} patient(s) appear in more than one split: their images "
                               "would be in training and in evaluation")
    if UNASSIGNED in pairs.splits:
        report.warnings.append(f"{len(pairs.splits[UNASSIGNED])} pair(s) without a split value are split "
                               f"by patient at training time (fractions {list(site.split_fractions)})")
    if not report.usable:
        report.fatal.append("no usable image + mask pair (see the dropped rows)")
    elif not len(pairs.splits["train"]) and UNASSIGNED not in pairs.splits:
        report.fatal.append("no training pair: give some rows split=train, or leave split empty")
    if out_of_range:
        report.fatal.append(
            f"mask value(s) {sorted(out_of_range)} outside the declared labels {labels} "
            "(value k names labels[k], background first): declare every mask class"
        )
    report.seconds = time.perf_counter() - t0
    return report


def _patients_in_several_splits(patient_ids: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    seen: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        for pid in patient_ids.get(name, ()):
            if pid:
                seen.setdefault(pid, set()).add(name)
    return {pid: sorted(s) for pid, s in sorted(seen.items()) if len(s) > 1}

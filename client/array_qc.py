"""``medfed site check`` for sites whose data is arrays: a MedMNIST ``.npz`` or a synthetic demo shard.

The data is built exactly as a training round builds it
(:func:`medfed.client.site_data.site_runtime`: the ``.npz`` read by the MedMNIST loader,
which checks its arrays, dtypes, shapes and labels; ``shard-index`` of ``shard-count``
taken as training takes it), then counted: examples per split and label (this site's
shard, and the whole file), image size and channels, labels against the classes, subgroup
attributes. The result is a :class:`~medfed.common.intake.qc.QCReport`, printed with
:func:`~medfed.common.intake.qc.format_qc` like any other site's. *Fatal* (training would not
start): a data file that is missing, unreadable or not a usable MedMNIST file, a shard that
cannot be taken, no training example, or a label outside the classes.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from medfed.common.data.splits import DatasetInfo, ImageSplit, SiteData
from medfed.common.errors import MedfedError
from medfed.common.intake.qc import QCReport
from medfed.common.site_config import SiteConfig
from medfed.common.site_files import SiteDataError, check_site_files, loader_problem

__all__ = ["check_array_site"]


def check_array_site(site: SiteConfig, source: str | Path | None = None) -> QCReport:
    """QC of a ``medmnist`` or ``synthetic`` site (read-only; ``source``: its site.yaml); never raises on bad data."""
    from medfed.client.site_data import site_runtime
    from medfed.common.config import StudyConfig

    t0 = time.perf_counter()
    report = QCReport(site.site_id, source=_source(site),
                      rows_kind="examples in the file" if site.dataset == "medmnist" else "examples in the shard")
    try:
        check_site_files(site, source)
        runtime = site_runtime(site, StudyConfig(task=site.task))
    except SiteDataError as exc:
        report.fatal.append(exc.detail)
    except MedfedError as exc:  # the loader's own reason: wrong arrays, dtypes, labels; a shard too small
        report.fatal.append(loader_problem(site, exc))
    else:
        _count(site, runtime.info, runtime.data, report)
    report.seconds = time.perf_counter() - t0
    return report


def _source(site: SiteConfig) -> str:
    shard = f", shard {site.shard_index} of {site.shard_count}" if site.shard_count > 1 else ""
    if site.dataset == "medmnist":
        return f"MedMNIST file {site.data_file_path}{shard}"
    return f"synthetic demo data{shard}"


def _count(site: SiteConfig, info: DatasetInfo, data: SiteData, report: QCReport) -> None:
    splits = {"train": data.train, "val": data.val, "test": data.test}
    names = list(info.label_names)
    per_split = {s: _label_counts(split, names) for s, split in splits.items()}
    report.usable = sum(len(split) for split in splits.values())
    report.rows = _file_total(site, report.usable)
    report.counts = {
        "split": {s: len(split) for s, split in splits.items()},
        "label": dict(sum((Counter(c) for c in per_split.values()), Counter())),
        "split-label": per_split,
        "attributes": _attributes(info, splits),
        "shard": {"index": site.shard_index, "count": site.shard_count},
    }
    shape = f"{info.in_channels}x{info.image_size}x{info.image_size}"
    report.images = {"kind": {site.dataset: report.usable}, "size": {shape: report.usable},
                     "channels": {str(info.in_channels): report.usable}}
    _judge(site, info, splits, report)


def _label_counts(split: ImageSplit, names: list[str]) -> dict[str, int]:
    counts = np.bincount(split.labels, minlength=len(names)) if len(split) else np.zeros(len(names), int)
    return {(names[i] if i < len(names) else f"label {i} (undeclared)"): int(n) for i, n in enumerate(counts)}


def _attributes(info: DatasetInfo, splits: dict[str, ImageSplit]) -> dict[str, dict[str, int]]:
    if not info.group_name:
        return {}
    counts: Counter[str] = Counter()
    for split in splits.values():
        if split.groups is not None:
            for code, n in zip(*np.unique(split.groups, return_counts=True)):
                value = info.group_values[code] if code < len(info.group_values) else f"code {code}"
                counts[str(value)] += int(n)
    return {info.group_name: dict(counts.most_common())}


def _file_total(site: SiteConfig, usable: int) -> int:
    """Examples in the whole file (a shard uses part of it); the shard's own count otherwise."""
    if site.dataset != "medmnist":
        return usable
    from medfed.common.data.medmnist import load_medmnist_cached

    _, *parts = load_medmnist_cached(site.data_file_path)  # already read (cached) by site_runtime
    return sum(len(p) for p in parts)


def _judge(site: SiteConfig, info: DatasetInfo, splits: dict[str, ImageSplit], report: QCReport) -> None:
    for name, split in splits.items():
        outside = int(np.count_nonzero(split.labels >= info.num_classes)) if len(split) else 0
        if outside:
            report.fatal.append(f"{outside} {name} label(s) outside the {info.num_classes} classes "
                                f"{list(info.label_names)}: the file's labels and its classes disagree")
    if not len(splits["train"]):
        report.fatal.append(f"no training example at this site (shard {site.shard_index} of "
                            f"{site.shard_count}): use fewer shards or a larger file")
    for label, n in report.counts["split-label"]["train"].items():
        if not n and len(splits["train"]):
            report.warnings.append(f"label {label!r} has no training example at this site")
    for name in ("val", "test"):
        n = len(splits[name])
        if n < site.min_eval_n:
            report.warnings.append(f"{name} has {n} examples, fewer than min-eval-n={site.min_eval_n}: "
                                   f"this site sends no {name} metrics")
    if site.labels and tuple(site.labels) != tuple(info.label_names):
        report.warnings.append(f"labels {list(site.labels)} in site.yaml differ from the file's classes "
                               f"{list(info.label_names)}, which training uses")

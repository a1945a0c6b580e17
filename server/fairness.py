"""Fairness records of a run, from the sites' per-group aggregates (and the server's own test data).

The federated loop and the baselines call these with the sites' evaluation replies:

* :func:`round_fairness` each round: the pooled record of every split (``metrics.jsonl``
  ``"fairness"``) and each site's test record (under the site's row);
* :func:`summary_fairness` once for the reported model: the pooled and per-site test records
  with bootstrap intervals from the counts, and, when the server holds a test split with group
  codes (simulation), the same record computed per sample with its own bootstrap intervals.

The maths is in :mod:`medfed.common.fairness`; nothing here moves per-sample data off a site.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from medfed.common import fairness as fx
from medfed.common.constants import MIN_GROUP_SAMPLES, SPLITS
from medfed.common.metrics import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from medfed.common.data.splits import DatasetInfo, ImageSplit
    from medfed.common.models import ModelSpec

log = logging.getLogger(__name__)

# Keys of the fairness sections in metrics.jsonl and summary.json.
FAIRNESS = "fairness"
ATTRIBUTE = "attribute"
THRESHOLD = "threshold"
SPLIT = "split"
SOURCE = "source"
SITES = "sites"
CENTRAL = "central"
BOOTSTRAP = "bootstrap"
MIN_SAMPLES = "min-group-samples"
REPORTED_SPLIT = "test"

SITES_SOURCE = "pooled per-group counts and score histograms sent by the sites (no per-sample data moved)"
CENTRAL_SOURCE = "per sample, on the server's own test split (simulation only)"


GroupNames = tuple[str, tuple[str, ...]]


def group_names(info: DatasetInfo | None, override: GroupNames | None = None) -> GroupNames:
    """(attribute name, group names by code): the run config's names (``group-attribute`` and
    ``group-names``, for a deployed server that holds no data), else the dataset's; generic
    (``group``, codes) when neither says."""
    if override is not None and override[1]:
        return override
    if info is None or info.group_name is None:
        return "group", ()
    return info.group_name, tuple(info.group_values)


def config_group_names(attribute: str, names: str) -> GroupNames | None:
    """The run config's group naming, or None when it names none."""
    values = tuple(n.strip() for n in names.split(",") if n.strip())
    return (attribute, values) if attribute and values else None


def _threshold(threshold: float | None) -> float:
    return DEFAULT_THRESHOLD if threshold is None else float(threshold)


def round_fairness(per_site: dict[str, dict], threshold: float | None, info: DatasetInfo | None,
                   override: GroupNames | None = None,
                   ) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(pooled record of each split, or None without group aggregates; each site's test record)."""
    attribute, names = group_names(info, override)
    record: dict[str, Any] = {ATTRIBUTE: attribute, THRESHOLD: _threshold(threshold)}
    sites: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        agg = fx.aggregate_fairness(per_site, split, names)
        if agg is None:
            continue
        record[split] = agg.pooled
        if split == REPORTED_SPLIT:
            sites = {site: {split: rec} for site, rec in agg.sites.items()}
    return (record if any(s in record for s in SPLITS) else None), sites


def summary_fairness(per_site: dict[str, dict], threshold: float | None, info: DatasetInfo | None, seed: int,
                     central: tuple[ImageSplit, Any] | None = None,
                     replicates: int = fx.DEFAULT_REPLICATES, override: GroupNames | None = None,
                     ) -> dict[str, Any] | None:
    """The summary's fairness section for the reported model (see module doc).

    ``central``: (the server's test split, the model's class-1 scores on it), or None.
    """
    attribute, names = group_names(info, override)
    agg = fx.aggregate_fairness(per_site, REPORTED_SPLIT, names)
    central_record = None
    if central is not None and central[0].groups is not None and len(central[0]):
        split, scores = central
        central_record = fx.sample_fairness(scores, split.labels, split.groups, _threshold(threshold), names)
        fx.attach_intervals(central_record, fx.bootstrap_samples(
            scores, split.labels, split.groups, _threshold(threshold), names, replicates, seed))
        central_record[SOURCE] = CENTRAL_SOURCE
    if agg is None and central_record is None:
        return None
    out: dict[str, Any] = {ATTRIBUTE: attribute, SPLIT: REPORTED_SPLIT, THRESHOLD: _threshold(threshold),
                           MIN_SAMPLES: MIN_GROUP_SAMPLES}
    if agg is not None:
        agg.add_intervals(names, replicates, seed)
        out.update({**agg.pooled, SOURCE: SITES_SOURCE, SITES: agg.sites})
    if central_record is not None:
        out[CENTRAL] = central_record
        if out.get(fx.DISADVANTAGED) is None:
            out[fx.DISADVANTAGED] = central_record[fx.DISADVANTAGED]
    out[BOOTSTRAP] = {"replicates": replicates, "level": fx.DEFAULT_LEVEL, "seed": seed,
                      "method": "percentile; resampled within each group's positives and negatives "
                                "(from the pooled counts: binomial counts, multinomial histograms)"}
    if out.get(fx.DISADVANTAGED):
        log.info("fairness: the disadvantaged %s group (highest underdiagnosis rate) is %s",
                 attribute, out[fx.DISADVANTAGED])
    return out


def central_scores(spec: ModelSpec, arrays: ArrayRecord, split: ImageSplit | None, device_name: str,
                   task_name: str) -> tuple[ImageSplit, Any] | None:
    """(split, class-1 scores of the model in ``arrays``) for binary classification with group codes."""
    if task_name != "classification" or split is None or split.groups is None or not len(split):
        return None
    from medfed.common.arrays import load_arrays
    from medfed.common.models import build_model
    from medfed.common.tasks import task_of_model
    from medfed.common.training import resolve_device

    model = build_model(spec)
    load_arrays(model, arrays)
    _, probs = task_of_model(spec.name).evaluate(model, split, resolve_device(device_name))
    if probs is None or probs.ndim != 2 or probs.shape[1] != 2:
        return None
    return split, probs[:, 1]

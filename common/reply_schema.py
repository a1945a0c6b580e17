"""What a site's reply may hold: checked twice, at the site before it leaves and at the server when it arrives.

The site's privacy boundary (:mod:`medfed.client.boundary`) and the server's screening
(:mod:`medfed.server.replies`) apply the same rules, so an honest site never sends what the
server would drop, and a modified or malicious site gains nothing by skipping its boundary:

- metric names come from a fixed allowlist (:data:`ALLOWED_METRICS`);
- every value is a finite number (never a bool, a string or NaN);
- lists are only the score histograms, each exactly :data:`NUM_HIST_BINS` non-negative whole
  counts, always in (positives, negatives) pairs;
- counts (``num-examples``, per-group ``tp/fp/tn/fn``) are non-negative whole numbers, the
  validation histograms add up to an evaluation's ``num-examples``, and a group's histograms
  agree with its counts (:func:`medfed.common.fairness.read_group_counts`).

Problems are described without echoing a rejected name: a name outside the allowlist may
itself be what a bug or an attacker tried to smuggle out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from medfed.common.constants import (
    EXPLAIN_CELLS,
    EXPLAIN_COUNT_KEYS,
    EXPLAIN_MAP_KEYS,
    EXPLAIN_SCALAR_KEYS,
    GROUP_COUNT_NAMES,
    GROUP_HIST_NEG,
    GROUP_HIST_POS,
    GROUP_HISTOGRAM_KEYS,
    GROUP_SCALAR_KEYS,
    GROUP_SUPPRESSED,
    MAX_GROUPS,
    NUM_HIST_BINS,
    SPLITS,
    MetricKey,
    group_metric_key,
)
from medfed.common.explain.metrics import explain_problem
from medfed.common.robustness.keys import ROBUSTNESS_COUNT_KEYS, ROBUSTNESS_KEYS

EVAL_METRICS = (
    MetricKey.LOSS, MetricKey.AUC, MetricKey.ACCURACY, MetricKey.BALANCED_ACCURACY,
    MetricKey.SENSITIVITY, MetricKey.SPECIFICITY, MetricKey.NUM_EXAMPLES,
    MetricKey.DICE, MetricKey.HD95, MetricKey.HD95_COUNT, MetricKey.D_LOSS, MetricKey.D_ACCURACY,
)
SPLIT_HISTOGRAMS = {
    "val": (MetricKey.VAL_HIST_POS.value, MetricKey.VAL_HIST_NEG.value, MetricKey.NUM_EXAMPLES.value),
    "test": (MetricKey.TEST_HIST_POS.value, MetricKey.TEST_HIST_NEG.value, MetricKey.TEST_EXAMPLES.value),
}
"""Each split's (positives histogram, negatives histogram, the count they add up to)."""
HISTOGRAM_KEYS = frozenset(k for pos, neg, _ in SPLIT_HISTOGRAMS.values() for k in (pos, neg)) | GROUP_HISTOGRAM_KEYS
ALLOWED_METRICS = frozenset(
    {k.value for k in MetricKey} | {f"{s}-{m.value}" for s in SPLITS for m in EVAL_METRICS}
    | GROUP_SCALAR_KEYS | GROUP_HISTOGRAM_KEYS  # per-group counts (medfed.common.fairness), k-anonymous
    | EXPLAIN_SCALAR_KEYS | EXPLAIN_MAP_KEYS  # saliency shares per split, class and group (common.explain.metrics)
    | ROBUSTNESS_KEYS  # accuracy/AUC/sensitivity under attack per epsilon (medfed.common.robustness.study)
)
COUNT_KEYS = frozenset(
    {MetricKey.NUM_EXAMPLES.value, MetricKey.TRAIN_STEPS.value}
    | {f"{s}-{m.value}" for s in SPLITS for m in (MetricKey.NUM_EXAMPLES, MetricKey.HD95_COUNT)}
    | {group_metric_key(s, k, n) for s in SPLITS for k in range(MAX_GROUPS) for n in GROUP_COUNT_NAMES}
    | EXPLAIN_COUNT_KEYS | ROBUSTNESS_COUNT_KEYS
)
"""Metrics that count something: non-negative whole numbers."""
_PAIRS = (
    *((pos, neg) for pos, neg, _ in SPLIT_HISTOGRAMS.values()),
    *((group_metric_key(s, k, GROUP_HIST_POS), group_metric_key(s, k, GROUP_HIST_NEG))
      for s in SPLITS for k in range(MAX_GROUPS)),
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value >= 0 and value == round(value)


def metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why ``metrics`` may not leave a site / be used by the server, or None when it is sound."""
    unknown = sum(1 for name in metrics if name not in ALLOWED_METRICS)
    if unknown:
        return f"{unknown} metric name(s) outside the allowlist of aggregate metrics"
    for name, value in metrics.items():
        if isinstance(value, list) and name in EXPLAIN_MAP_KEYS:
            continue  # a coarse saliency map: checked by explain_problem below
        if isinstance(value, list):
            if name not in HISTOGRAM_KEYS:
                return f"metric {name} may not be a list (per-sample values stay at the site)"
            if len(value) != NUM_HIST_BINS:
                return f"histogram {name} has {len(value)} bins, not {NUM_HIST_BINS}"
            if not all(_is_count(v) for v in value):
                return f"histogram {name} holds a value that is not a non-negative whole count"
        elif name in HISTOGRAM_KEYS or name in EXPLAIN_MAP_KEYS:
            return f"{name} must be a list (of {NUM_HIST_BINS} counts, or {EXPLAIN_CELLS} shares for a saliency map)"
        elif not _is_number(value) or not math.isfinite(value):
            return f"metric {name} is not a finite number"
        elif name in COUNT_KEYS and not _is_count(value):
            return f"metric {name} is not a non-negative whole count"
        elif name.endswith(f"-{GROUP_SUPPRESSED}") and value != 1:
            return f"metric {name} must be 1 (a suppressed group)"
    for pos, neg in _PAIRS:
        if (pos in metrics) != (neg in metrics):
            return f"histograms {pos} and {neg} must come together"
    for split, (pos, neg, n) in SPLIT_HISTOGRAMS.items():
        if pos in metrics and n not in metrics:
            return f"{split} histograms come without {n}"
        if pos in metrics and n in metrics and sum(metrics[pos]) + sum(metrics[neg]) != metrics[n]:
            return f"{split} histograms do not add up to {n}"
    return explain_problem(metrics) or _groups_problem(metrics)


def _groups_problem(metrics: Mapping[str, Any]) -> str | None:
    from medfed.common.fairness import read_group_counts

    for split in SPLITS:
        try:
            read_group_counts(metrics, split)
        except ValueError as exc:
            return f"{split} per-group aggregates are inconsistent ({exc})"
    return None

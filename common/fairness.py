"""Subgroup fairness of a binary classifier from aggregates a site may share, in pure numpy.

Three parts:

* at the site, :func:`group_counts` turns per-image scores, labels and group codes into
  per-group confusion counts at the decision threshold and per-group score histograms,
  under fixed reply keys (``test-g1-tp``, ``test-g1-hist-pos``, ...); nothing per image;
* at the server, :func:`read_group_counts` checks one site's aggregates,
  :func:`aggregate_fairness` pools them over sites and computes per-group metrics
  (:func:`group_metrics`) and the gaps between groups (:func:`fairness_gaps`);
* in simulation, where the data is local, :func:`sample_fairness` computes the same record
  exactly from per-sample scores, and :func:`bootstrap_samples` / :func:`bootstrap_counts`
  give seeded percentile confidence intervals from samples or from the pooled counts.

Definitions (class 1 is the disease; predicted positive when ``score >= threshold``):

* ``tpr`` = TP / (TP + FN), ``fpr`` = FP / (FP + TN), ``accuracy`` = (TP + TN) / n;
* ``underdiagnosis-rate`` = FN / (TP + FN), the false-negative rate for disease: diseased
  patients the model calls healthy (Seyyed-Kalantari et al., Nature Medicine 2021);
* ``predicted-positive-rate`` = (TP + FP) / n; ``auc`` from the pooled per-group histograms
  (exact per-sample AUC in :func:`sample_fairness`);
* for each metric, the worst group (lowest AUC, accuracy or TPR; highest FPR or
  underdiagnosis rate), its value, and the gap = max - min over the groups where it is defined
  (at least two groups, else undefined);
* ``equalized-odds-difference`` = max(TPR gap, FPR gap); ``demographic-parity-difference``
  = gap in predicted-positive rate (the definitions of Fairlearn);
* the disadvantaged group is the worst group by underdiagnosis rate.

k-anonymity: a site sends no aggregates for a group with fewer than ``min_samples``
(:data:`~medfed.common.constants.MIN_GROUP_SAMPLES`) samples in a split, only a
``suppressed`` flag. Because the site's overall metrics are sent too, the suppressed groups
together must also hold at least ``min_samples`` samples (else the difference would reveal
them), so the next-smallest groups are suppressed with them (complementary suppression).
The server reports a suppressed group as unavailable at that site and pools the others.

Bootstrap: resampling is stratified by group and label (each group's positives and negatives
are resampled separately, so group sizes and prevalence stay fixed), ``replicates`` times from
a seeded generator; intervals are the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles.
From counts, the counts are redrawn as binomials and the histograms as multinomials, which
is the same resampling, up to score binning, done on aggregates. An undefined value is NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from medfed.common.constants import (
    GROUP_COUNT_NAMES,
    GROUP_HIST_NEG,
    GROUP_HIST_POS,
    GROUP_SUPPRESSED,
    MAX_GROUPS,
    MIN_GROUP_SAMPLES,
    NUM_HIST_BINS,
    group_metric_key,
)
from medfed.common.metrics import (
    DEFAULT_THRESHOLD,
    _as_binary_labels,
    _as_scores,
    _check_threshold,
    auc_from_histograms,
    is_defined,
    roc_auc,
    score_histograms,
)

logger = logging.getLogger(__name__)

# Per-group metric names (kebab-case, as in run outputs).
N = "n"
POSITIVES = "positives"
AUC = "auc"
ACCURACY = "accuracy"
TPR = "tpr"
FPR = "fpr"
UNDERDIAGNOSIS = "underdiagnosis-rate"
PREDICTED_POSITIVE = "predicted-positive-rate"
GROUP_METRICS = (AUC, ACCURACY, TPR, FPR, UNDERDIAGNOSIS, PREDICTED_POSITIVE)
GAP_METRICS = (AUC, ACCURACY, TPR, FPR, UNDERDIAGNOSIS)
HIGHER_IS_WORSE = frozenset({FPR, UNDERDIAGNOSIS})
EQUALIZED_ODDS = "equalized-odds-difference"
DEMOGRAPHIC_PARITY = "demographic-parity-difference"
DISADVANTAGED_BY = UNDERDIAGNOSIS

# Keys of a fairness record.
GROUPS = "groups"
GAPS = "gaps"
CODE = "code"
WORST_GROUP = "worst-group"
WORST = "worst"
BEST = "best"
GAP = "gap"
CI = "ci"
DISADVANTAGED = "disadvantaged-group"
SUPPRESSED_AT = "suppressed-at"

DEFAULT_REPLICATES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class GroupCounts:
    """One group's aggregates: confusion counts at the threshold and score histograms."""

    tp: int
    fp: int
    tn: int
    fn: int
    hist_pos: np.ndarray
    hist_neg: np.ndarray

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def __add__(self, other: GroupCounts) -> GroupCounts:
        if other.hist_pos.shape != self.hist_pos.shape:
            raise ValueError(
                f"cannot pool histograms of {self.hist_pos.shape[0]} and {other.hist_pos.shape[0]} bins; "
                "every site must use the same bins"
            )
        return GroupCounts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn,
                           self.hist_pos + other.hist_pos, self.hist_neg + other.hist_neg)

    def metrics(self) -> dict[str, float]:
        """Per-group metrics (see module doc); AUC from the histograms."""
        return group_metrics(self.tp, self.fp, self.tn, self.fn, auc_from_histograms(self.hist_pos, self.hist_neg))


def group_label(code: int, names: Sequence[str] = ()) -> str:
    """The name of group ``code`` (``names[code]``), or ``group-<code>`` when unnamed."""
    return str(names[code]) if 0 <= code < len(names) else f"group-{code}"


# ---------------------------------------------------------------------------
# Site side
# ---------------------------------------------------------------------------
def _as_groups(groups: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"groups must be a 1-D array with one code per label ({n}); got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise ValueError("groups must hold non-negative integer group codes (ImageSplit.groups).")
    return arr.astype(np.int64)


def suppressed_groups(sizes: Mapping[int, int], min_samples: int = MIN_GROUP_SAMPLES,
                      hidden: set[int] | frozenset[int] = frozenset()) -> set[int]:
    """Codes whose aggregates a site must not send: fewer than ``min_samples`` samples, plus the
    smallest others until the suppressed (and ``hidden``) groups hold ``min_samples`` together."""
    out = {k for k, size in sizes.items() if 0 < size < min_samples} | set(hidden)
    visible = sorted((size, k) for k, size in sizes.items() if k not in out and size > 0)
    while visible and 0 < sum(sizes.get(k, 0) for k in out) < min_samples:
        out.add(visible.pop(0)[1])
    return {k for k in out if sizes.get(k, 0) > 0}


def _counts(labels: np.ndarray, scores: np.ndarray, threshold: float, bins: int) -> GroupCounts:
    positive, predicted = labels == 1, scores >= threshold
    pos, neg = score_histograms(labels, scores, bins=bins)
    return GroupCounts(int(np.sum(predicted & positive)), int(np.sum(predicted & ~positive)),
                       int(np.sum(~predicted & ~positive)), int(np.sum(~predicted & positive)), pos, neg)


def group_counts(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                 threshold: float = DEFAULT_THRESHOLD, num_groups: int | None = None,
                 bins: int = NUM_HIST_BINS, split: str = "test",
                 min_samples: int = MIN_GROUP_SAMPLES) -> dict[str, float | list[float]]:
    """Per-group aggregates a site sends: ``<split>-g<k>-tp/fp/tn/fn`` and ``-hist-pos/-hist-neg``.

    Args:
        scores: (N,) probability of class 1. labels: (N,) 0/1. groups: (N,) group codes.
        threshold: predicted positive when ``score >= threshold`` (the server's, else 0.5).
        num_groups: the dataset's number of groups (``len(DatasetInfo.group_values)``); codes
            at or above :data:`MAX_GROUPS` are never sent (and count as suppressed).
        min_samples: k-anonymity (see module doc); a suppressed group sends only
            ``<split>-g<k>-suppressed = 1``.

    Returns a flat dict of floats and (histograms) lists of ``bins`` floats; empty without data.
    """
    y = _as_binary_labels(labels, "labels")
    s = _as_scores(scores, "scores", y.shape[0], unit_interval=True)
    g = _as_groups(groups, y.shape[0])
    cut = _check_threshold(threshold)
    codes, sizes = np.unique(g, return_counts=True)
    if num_groups is not None and codes.size and codes.max() >= num_groups:
        raise ValueError(f"group code {int(codes.max())} is out of range for {num_groups} groups.")
    size_of = {int(k): int(c) for k, c in zip(codes, sizes)}
    too_many = {k for k in size_of if k >= MAX_GROUPS}
    if too_many:
        logger.warning("group codes %s are >= %d and are not reported per group", sorted(too_many), MAX_GROUPS)
    hidden = suppressed_groups(size_of, min_samples, too_many)
    out: dict[str, float | list[float]] = {}
    for k in sorted(size_of):
        if k >= MAX_GROUPS:
            continue
        if k in hidden:
            out[group_metric_key(split, k, GROUP_SUPPRESSED)] = 1.0
            continue
        mask = g == k
        c = _counts(y[mask], s[mask], cut, bins)
        for name, value in zip(GROUP_COUNT_NAMES, (c.tp, c.fp, c.tn, c.fn)):
            out[group_metric_key(split, k, name)] = float(value)
        out[group_metric_key(split, k, GROUP_HIST_POS)] = [float(v) for v in c.hist_pos]
        out[group_metric_key(split, k, GROUP_HIST_NEG)] = [float(v) for v in c.hist_neg]
    return out


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------
def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) \
            or value < 0 or value != round(value):
        raise ValueError(f"{key}={value!r} is not a non-negative whole count")
    return int(round(value))


def _histogram(value: Any, key: str) -> np.ndarray:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) < 2:
        raise ValueError(f"{key} must be a list of bin counts")
    return np.array([_count(v, key) for v in value], dtype=np.int64)


def read_group_counts(metrics: Mapping[str, Any], split: str) -> dict[int, GroupCounts | None]:
    """One site's per-group aggregates for ``split`` (None: suppressed at the site).

    Raises ValueError naming the key when a count is missing, not a whole number, or the
    histograms disagree with the counts (the server then leaves this site's groups out).
    """
    out: dict[int, GroupCounts | None] = {}
    for k in range(MAX_GROUPS):
        def key(name: str, k: int = k) -> str:
            return group_metric_key(split, k, name)

        if metrics.get(key(GROUP_SUPPRESSED)):
            out[k] = None
            continue
        names = (*GROUP_COUNT_NAMES, GROUP_HIST_POS, GROUP_HIST_NEG)
        if not any(key(name) in metrics for name in names):
            continue
        missing = [key(name) for name in names if key(name) not in metrics]
        if missing:
            raise ValueError(f"group {k}: {', '.join(missing)} missing")
        tp, fp, tn, fn = (_count(metrics[key(name)], key(name)) for name in GROUP_COUNT_NAMES)
        pos, neg = _histogram(metrics[key(GROUP_HIST_POS)], key(GROUP_HIST_POS)), \
            _histogram(metrics[key(GROUP_HIST_NEG)], key(GROUP_HIST_NEG))
        if pos.shape != neg.shape or pos.sum() != tp + fn or neg.sum() != fp + tn:
            raise ValueError(f"group {k}: histograms ({pos.sum()} positives, {neg.sum()} negatives) disagree "
                             f"with the counts ({tp + fn}, {fp + tn})")
        out[k] = GroupCounts(tp, fp, tn, fn, pos, neg)
    return out


def pool_counts(per_site: Mapping[str, Mapping[int, GroupCounts | None]]
                ) -> tuple[dict[int, GroupCounts], dict[int, list[str]]]:
    """Sum each group's aggregates over sites; also which sites suppressed each group."""
    pooled: dict[int, GroupCounts] = {}
    suppressed: dict[int, list[str]] = {}
    for site, groups in per_site.items():
        for k, counts in groups.items():
            if counts is None:
                suppressed.setdefault(k, []).append(site)
            else:
                pooled[k] = counts if k not in pooled else pooled[k] + counts
    return dict(sorted(pooled.items())), dict(sorted(suppressed.items()))


def _rate(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def group_metrics(tp: int, fp: int, tn: int, fn: int, auc: float = float("nan")) -> dict[str, float]:
    """``n``, ``positives`` and the rates of the module doc from one group's counts."""
    n, pos = tp + fp + tn + fn, tp + fn
    return {
        N: float(n), POSITIVES: float(pos), AUC: float(auc), ACCURACY: _rate(tp + tn, n),
        TPR: _rate(tp, pos), FPR: _rate(fp, fp + tn), UNDERDIAGNOSIS: _rate(fn, pos),
        PREDICTED_POSITIVE: _rate(tp + fp, n),
    }


def fairness_gaps(per_group: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Worst group, worst/best value and max-min gap per metric; equalized-odds and
    demographic-parity differences. A metric defined for fewer than two groups has no gap."""
    out: dict[str, Any] = {}
    spread: dict[str, float] = {}
    for metric in (*GAP_METRICS, PREDICTED_POSITIVE):
        values = {name: float(m[metric]) for name, m in per_group.items() if is_defined(m.get(metric))}
        if len(values) < 2:
            spread[metric] = float("nan")
            out[metric] = {WORST_GROUP: None, WORST: float("nan"), BEST: float("nan"), GAP: float("nan")}
            continue
        worse_high = metric in HIGHER_IS_WORSE
        worst = max(values, key=values.get) if worse_high else min(values, key=values.get)
        best = min(values.values()) if worse_high else max(values.values())
        spread[metric] = max(values.values()) - min(values.values())
        out[metric] = {WORST_GROUP: worst, WORST: values[worst], BEST: best, GAP: spread[metric]}
    del out[PREDICTED_POSITIVE]
    out[EQUALIZED_ODDS] = _nanmax([spread[TPR], spread[FPR]])
    out[DEMOGRAPHIC_PARITY] = spread[PREDICTED_POSITIVE]
    return out


def _nanmax(values: Sequence[float]) -> float:
    defined = [v for v in values if is_defined(v)]
    return max(defined) if defined else float("nan")


def fairness_record(per_group: Mapping[int, Mapping[str, Any]], names: Sequence[str] = (),
                    suppressed_at: Mapping[int, Sequence[str]] | None = None) -> dict[str, Any]:
    """``{"groups": {name: metrics}, "gaps": ..., "disadvantaged-group": name or None}``.

    ``per_group`` maps a group code to its metrics; a code only in ``suppressed_at`` is listed
    with ``n = 0`` (unavailable) and the sites that suppressed it.
    """
    suppressed_at = suppressed_at or {}
    groups: dict[str, dict[str, Any]] = {}
    for k in sorted(set(per_group) | set(suppressed_at)):
        entry: dict[str, Any] = {CODE: k, N: 0.0}
        entry.update(per_group.get(k, {}))
        if suppressed_at.get(k):
            entry[SUPPRESSED_AT] = list(suppressed_at[k])
        groups[group_label(k, names)] = entry
    gaps = fairness_gaps({name: m for name, m in groups.items() if m[N] > 0})
    return {GROUPS: groups, GAPS: gaps, DISADVANTAGED: gaps[DISADVANTAGED_BY][WORST_GROUP]}


def counts_fairness(counts: Mapping[int, GroupCounts], names: Sequence[str] = (),
                    suppressed_at: Mapping[int, Sequence[str]] | None = None) -> dict[str, Any]:
    """The fairness record of one site's or the pooled aggregates (AUC from the histograms)."""
    return fairness_record({k: c.metrics() for k, c in counts.items()}, names, suppressed_at)


@dataclass
class SplitFairness:
    """One split's fairness from the sites' replies: pooled and per-site records, and their counts."""

    pooled: dict[str, Any]
    sites: dict[str, dict[str, Any]]
    counts: dict[int, GroupCounts]
    site_counts: dict[str, dict[int, GroupCounts]]

    def add_intervals(self, names: Sequence[str] = (), replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> SplitFairness:
        """Attach :func:`bootstrap_counts` intervals to the pooled and every site's record."""
        attach_intervals(self.pooled, bootstrap_counts(self.counts, names, replicates, [seed, 0], level))
        for i, (site, counts) in enumerate(sorted(self.site_counts.items()), start=1):
            attach_intervals(self.sites[site], bootstrap_counts(counts, names, replicates, [seed, i], level))
        return self


def aggregate_fairness(per_site: Mapping[str, Mapping[str, Any]], split: str,
                       names: Sequence[str] = ()) -> SplitFairness | None:
    """Fairness of ``split`` from the sites' evaluation replies (None when no site sent any).

    A group a site suppressed is listed as unavailable there (``suppressed-at``). A site whose
    aggregates do not add up is logged and left out, like any invalid reply.
    """
    read: dict[str, dict[int, GroupCounts | None]] = {}
    for site, metrics in per_site.items():
        try:
            counts = read_group_counts(metrics, split)
        except ValueError as exc:
            logger.warning("site %s: per-group %s aggregates left out: %s", site, split, exc)
            continue
        if counts:
            read[site] = counts
    if not read:
        return None
    pooled, suppressed = pool_counts(read)
    site_counts = {site: {k: c for k, c in counts.items() if c is not None} for site, counts in read.items()}
    sites = {
        site: counts_fairness(site_counts[site], names, {k: [site] for k, c in counts.items() if c is None})
        for site, counts in read.items()
    }
    return SplitFairness(counts_fairness(pooled, names, suppressed), sites, pooled, site_counts)


# ---------------------------------------------------------------------------
# Where the data is local (simulation): exact metrics and bootstrap intervals
# ---------------------------------------------------------------------------
def _cells(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = _as_binary_labels(labels, "labels")
    s = _as_scores(scores, "scores", y.shape[0], unit_interval=True)
    return s, y, _as_groups(groups, y.shape[0])


def sample_fairness(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                    threshold: float = DEFAULT_THRESHOLD, names: Sequence[str] = ()) -> dict[str, Any]:
    """The fairness record computed exactly from per-sample scores (AUC by ranks, not bins)."""
    s, y, g = _cells(scores, labels, groups)
    cut = _check_threshold(threshold)
    per_group = {}
    for k in np.unique(g):
        mask = g == k
        c = _counts(y[mask], s[mask], cut, NUM_HIST_BINS)
        per_group[int(k)] = group_metrics(c.tp, c.fp, c.tn, c.fn, roc_auc(y[mask], s[mask]))
    return fairness_record(per_group, names)


def _replicate_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Exact AUC of each replicate row of positive and negative scores."""
    if pos.shape[1] == 0 or neg.shape[1] == 0:
        return np.full(pos.shape[0], np.nan)
    out = np.empty(pos.shape[0])
    for r in range(pos.shape[0]):
        sorted_neg = np.sort(neg[r])
        below = np.searchsorted(sorted_neg, pos[r], side="left")
        ties = np.searchsorted(sorted_neg, pos[r], side="right") - below
        out[r] = (below.sum() + 0.5 * ties.sum()) / (pos.shape[1] * neg.shape[1])
    return out


def _replicate_metrics(tp, fp, tn, fn, auc) -> dict[str, np.ndarray]:
    tp, fp, tn, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, tn, fn))

    def rate(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    n, pos = tp + fp + tn + fn, tp + fn
    return {AUC: np.asarray(auc, dtype=np.float64), ACCURACY: rate(tp + tn, n), TPR: rate(tp, pos),
            FPR: rate(fp, fp + tn), UNDERDIAGNOSIS: rate(fn, pos), PREDICTED_POSITIVE: rate(tp + fp, n)}


def _spread(stack: np.ndarray) -> np.ndarray:
    """Per replicate (column), max - min over the groups (rows) where defined; NaN under two."""
    finite = np.isfinite(stack)
    high = np.max(np.where(finite, stack, -np.inf), axis=0)
    low = np.min(np.where(finite, stack, np.inf), axis=0)
    return np.where(finite.sum(axis=0) >= 2, high - low, np.nan)


def _intervals(replicates: Mapping[str, Mapping[str, np.ndarray]], level: float) -> dict[str, Any]:
    """Percentile intervals of each group's metrics and of the gaps, from replicate arrays."""
    tail = 50.0 * (1.0 - level)

    def interval(values: np.ndarray) -> list[float] | None:
        finite = values[np.isfinite(values)]
        if finite.size == 0 or finite.size < 0.5 * values.size:  # mostly undefined: no honest interval
            return None
        return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100.0 - tail))]

    groups = {name: {m: interval(v) for m, v in metrics.items()} for name, metrics in replicates.items()}
    if len(replicates) < 2:
        return {GROUPS: groups, GAPS: {}}
    spreads = {m: _spread(np.stack([r[m] for r in replicates.values()])) for m in (*GAP_METRICS, PREDICTED_POSITIVE)}
    gaps: dict[str, Any] = {m: interval(spreads[m]) for m in GAP_METRICS}
    gaps[EQUALIZED_ODDS] = interval(np.fmax(spreads[TPR], spreads[FPR]))
    gaps[DEMOGRAPHIC_PARITY] = interval(spreads[PREDICTED_POSITIVE])
    return {GROUPS: groups, GAPS: gaps}


def _check_bootstrap(replicates: int, level: float) -> None:
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 10:
        raise ValueError(f"replicates must be an integer >= 10; got {replicates!r}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}.")


def bootstrap_samples(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                      threshold: float = DEFAULT_THRESHOLD, names: Sequence[str] = (),
                      replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """Seeded percentile intervals of per-group metrics and gaps, resampling per (group, label).

    Returns ``{"groups": {name: {metric: [low, high] or None}}, "gaps": {...}}``; attach it to
    a record with :func:`attach_intervals`.
    """
    _check_bootstrap(replicates, level)
    s, y, g = _cells(scores, labels, groups)
    cut = _check_threshold(threshold)
    rng = np.random.default_rng(seed)
    out = {}
    for k in np.unique(g):
        pos, neg = s[(g == k) & (y == 1)], s[(g == k) & (y == 0)]
        boot_pos = pos[rng.integers(0, pos.size, (replicates, pos.size))] if pos.size else np.empty((replicates, 0))
        boot_neg = neg[rng.integers(0, neg.size, (replicates, neg.size))] if neg.size else np.empty((replicates, 0))
        tp, fp = (boot_pos >= cut).sum(axis=1), (boot_neg >= cut).sum(axis=1)
        out[group_label(int(k), names)] = _replicate_metrics(
            tp, fp, neg.size - fp, pos.size - tp, _replicate_auc(boot_pos, boot_neg))
    return _intervals(out, level)


def bootstrap_counts(counts: Mapping[int, GroupCounts], names: Sequence[str] = (),
                     replicates: int = DEFAULT_REPLICATES, seed: int | Sequence[int] = 0,
                     level: float = DEFAULT_LEVEL) -> dict[str, Any]:
    """:func:`bootstrap_samples` on aggregates: counts redrawn as binomials, histograms as multinomials.

    ``seed`` may be a sequence (e.g. ``[run_seed, site_index]``) for independent streams.
    """
    _check_bootstrap(replicates, level)
    rng = np.random.default_rng(seed)
    out = {}
    for k in sorted(counts):
        c = counts[k]
        n_pos, n_neg = c.tp + c.fn, c.fp + c.tn
        tp = rng.binomial(n_pos, _rate(c.tp, n_pos) if n_pos else 0.0, replicates)
        fp = rng.binomial(n_neg, _rate(c.fp, n_neg) if n_neg else 0.0, replicates)
        auc = np.full(replicates, np.nan)
        if n_pos and n_neg:
            hp = rng.multinomial(n_pos, c.hist_pos / n_pos, replicates).astype(np.float64)
            hn = rng.multinomial(n_neg, c.hist_neg / n_neg, replicates).astype(np.float64)
            below = np.cumsum(hn, axis=1) - hn
            auc = np.sum(hp * (below + 0.5 * hn), axis=1) / (n_pos * n_neg)
        out[group_label(k, names)] = _replicate_metrics(tp, fp, n_neg - fp, n_pos - tp, auc)
    return _intervals(out, level)


def attach_intervals(record: dict[str, Any], intervals: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with ``ci`` added to each group and to the gaps (``{metric: [low, high]}``)."""
    for name, ci in intervals.get(GROUPS, {}).items():
        if name in record[GROUPS]:
            record[GROUPS][name][CI] = dict(ci)
    record[GAPS][CI] = dict(intervals.get(GAPS, {}))
    return record

"""Classification metrics on concatenated predictions, in pure numpy.

Two families live here:

* exact metrics computed where the predictions are (a site, or the server's central test set):
  :func:`classification_metrics` and :func:`roc_auc`;
* histogram metrics, so that a site shares only per-bin counts of its binary scores, never a
  per-image value: :func:`score_histograms` at the site, then :func:`pool_histograms`,
  :func:`auc_from_histograms`, :func:`best_threshold_from_histograms` and
  :func:`metrics_at_threshold_from_histograms` at the server.

Conventions shared by both families, so that they agree on the same data:

* an example is predicted positive when its score is ``>= threshold``;
* bin ``i`` of ``bins`` covers ``[i / bins, (i + 1) / bins)``; the last bin also holds 1.0;
* a metric that is undefined on the data (AUC with a single class present, sensitivity without
  positives) is ``float("nan")``; test it with :func:`is_defined` before aggregating;
* balanced accuracy is the mean recall over the classes present in ``labels``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Metric keys (kebab-case, as in Flower MetricRecords). Use these names, not string literals.
LOSS = "loss"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced-accuracy"
AUC = "auc"
SENSITIVITY = "sensitivity"
SPECIFICITY = "specificity"
NUM_EXAMPLES = "num-examples"

DEFAULT_THRESHOLD = 0.5
DEFAULT_BINS = 100
THRESHOLD_CRITERIA = ("youden", "balanced-accuracy")

# Tolerance for recognising a threshold as a bin edge, in units of bins.
_EDGE_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------
def _as_int_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array; raise if it is not 1-D or not integer-valued."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices; got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one example.")
    if arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric class indices; got dtype {arr.dtype}.")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(
            f"{name} must hold integer class indices (0, 1, ...); found non-integer values. "
            "Pass the true class index, not a probability or one-hot row."
        )
    return arr.astype(np.int64)


def _as_binary_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Return 0/1 ``labels`` as int64; raise on any other value."""
    arr = _as_int_labels(labels, name)
    bad = np.setdiff1d(np.unique(arr), [0, 1])
    if bad.size:
        raise ValueError(
            f"{name} must be 0 (negative) or 1 (positive); found {bad[:5].tolist()}. "
            "For multi-class labels, binarise one class against the rest first."
        )
    return arr


def _as_scores(scores: np.ndarray, name: str, n: int, unit_interval: bool) -> np.ndarray:
    """Return ``scores`` as a 1-D float64 array of length ``n``; raise on bad shape or values."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one score per example); got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the labels have {n}; pass one score per label.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; check the model output.")
    if unit_interval and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(
            f"{name} must be probabilities in [0, 1]; got min {arr.min():.4g}, max {arr.max():.4g}. "
            "Apply softmax (or sigmoid) to logits first."
        )
    return arr


def _as_probs(probs: np.ndarray, n: int) -> np.ndarray:
    """Return ``probs`` as an (n, C) float64 array with C >= 2; raise on bad shape or values."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"probs must be a 2-D array of shape (N, C); got shape {arr.shape}. "
            "For a single positive-class score s, pass np.stack([1 - s, s], axis=1)."
        )
    if arr.shape[0] != n:
        raise ValueError(f"probs has {arr.shape[0]} rows but labels has {n} entries; pass one row per label.")
    if arr.shape[1] < 2:
        raise ValueError(f"probs must have at least 2 columns (classes); got {arr.shape[1]}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs contains NaN or infinite values; check the model output.")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ValueError(
            f"probs must be probabilities in [0, 1]; got min {arr.min():.4g}, max {arr.max():.4g}. "
            "Apply softmax to logits first."
        )
    return arr


def _check_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float in [0, 1]; raise otherwise."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}.")
    return value


def _check_bins(bins: int) -> int:
    """Return ``bins`` as an int >= 2; raise otherwise."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)):
        raise ValueError(f"bins must be an integer >= 2; got {bins!r}.")
    if bins < 2:
        raise ValueError(f"bins must be >= 2 (equal-width bins over [0, 1]); got {bins}.")
    return int(bins)


def _check_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return positive/negative bin counts as float64 arrays; raise on mismatched or bad counts."""
    p = np.asarray(pos, dtype=np.float64)
    n = np.asarray(neg, dtype=np.float64)
    for name, arr in (("pos", p), ("neg", n)):
        if arr.ndim != 1 or arr.shape[0] < 2:
            raise ValueError(f"{name} must be a 1-D array of at least 2 bin counts; got shape {arr.shape}.")
        if not np.all(np.isfinite(arr)) or arr.min() < 0:
            raise ValueError(f"{name} must hold non-negative, finite counts; check what the site sent.")
    if p.shape != n.shape:
        raise ValueError(
            f"pos has {p.shape[0]} bins but neg has {n.shape[0]}; both must come from score_histograms "
            "with the same bins."
        )
    return p, n


def is_defined(value: float | None) -> bool:
    """True when a metric value exists and is not NaN (e.g. AUC on a single-class set is NaN)."""
    return value is not None and not math.isnan(float(value))


# ---------------------------------------------------------------------------
# Exact metrics
# ---------------------------------------------------------------------------
def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores``, ties sharing the average of the ranks they span."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _auc_unchecked(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC for a boolean ``positive`` mask; NaN when a class is missing."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(scores)[positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_auc(labels01: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC: P(score of a positive > score of a negative), ties counting one half.

    Computed with average ranks (Mann-Whitney U). ``scores`` may be any finite reals; only
    their order matters. Returns ``float("nan")`` when only one class is present.
    """
    labels = _as_binary_labels(labels01, "labels01")
    values = _as_scores(scores, "scores", labels.shape[0], unit_interval=False)
    return _auc_unchecked(labels == 1, values)


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the defined values; NaN when none is defined."""
    defined = [v for v in values if is_defined(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN for an empty denominator."""
    return float(numerator) / float(denominator) if denominator > 0 else float("nan")


def _binary_metrics(labels: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy and AUC for class 1 at ``threshold``."""
    positive = labels == 1
    predicted = score >= threshold
    sensitivity = _ratio(np.sum(predicted & positive), np.sum(positive))
    specificity = _ratio(np.sum(~predicted & ~positive), np.sum(~positive))
    return {
        ACCURACY: float(np.mean(predicted == positive)),
        BALANCED_ACCURACY: _nanmean([sensitivity, specificity]),
        AUC: _auc_unchecked(positive, score),
        SENSITIVITY: sensitivity,
        SPECIFICITY: specificity,
    }


def _multiclass_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Macro one-vs-rest AUC, recall (sensitivity) and specificity with argmax predictions."""
    predicted = np.argmax(probs, axis=1)
    aucs, recalls, specificities = [], [], []
    for k in range(probs.shape[1]):
        positive = labels == k
        aucs.append(_auc_unchecked(positive, probs[:, k]))
        recalls.append(_ratio(np.sum(predicted[positive] == k), np.sum(positive)))
        specificities.append(_ratio(np.sum(predicted[~positive] != k), np.sum(~positive)))
    macro_recall = _nanmean(recalls)
    return {
        ACCURACY: float(np.mean(predicted == labels)),
        BALANCED_ACCURACY: macro_recall,
        AUC: _nanmean(aucs),
        SENSITIVITY: macro_recall,
        SPECIFICITY: _nanmean(specificities),
    }


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """Metrics of one model on concatenated predictions (one site's set, or the central test set).

    Args:
        labels: (N,) integer class indices in ``[0, C)``.
        probs: (N, C) class probabilities (softmax output).
        threshold: binary only; class 1 is predicted when ``probs[:, 1] >= threshold``.
            Defaults to 0.5. Choose it on validation data
            (:func:`best_threshold_from_histograms`), never on test data.

    Returns:
        ``accuracy``, ``balanced-accuracy``, ``auc``, ``sensitivity``, ``specificity`` and
        ``num-examples`` as floats; ``loss`` is added by the caller. Binary (C == 2):
        sensitivity/specificity of class 1 at ``threshold``, AUC of ``probs[:, 1]``.
        Multi-class: argmax predictions, sensitivity = macro recall, specificity = macro
        one-vs-rest specificity, AUC = macro one-vs-rest AUC over the classes that have both
        positives and negatives. A metric undefined on the data is NaN (see :func:`is_defined`).
    """
    y = _as_int_labels(labels, "labels")
    p = _as_probs(probs, y.shape[0])
    num_classes = p.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes - 1}] for probs with {num_classes} "
            f"columns; found values from {y.min()} to {y.max()}."
        )
    if num_classes == 2:
        cut = DEFAULT_THRESHOLD if threshold is None else _check_threshold(threshold)
        metrics = _binary_metrics(y, p[:, 1], cut)
    elif threshold is not None:
        raise ValueError(
            f"threshold applies to binary tasks only; probs has {num_classes} classes "
            "(multi-class predictions use argmax). Pass threshold=None."
        )
    else:
        metrics = _multiclass_metrics(y, p)
    metrics[NUM_EXAMPLES] = float(y.shape[0])
    return metrics


# ---------------------------------------------------------------------------
# Histogram metrics (privacy: sites share only bin counts)
# ---------------------------------------------------------------------------
def bin_edges(bins: int = DEFAULT_BINS) -> np.ndarray:
    """The ``bins + 1`` equal-width bin edges over [0, 1], exactly ``k / bins``."""
    count = _check_bins(bins)
    return np.arange(count + 1, dtype=np.float64) / count


def score_histograms(
    labels: np.ndarray, scores: np.ndarray, bins: int = DEFAULT_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positive and negative examples' binary scores in equal-width bins over [0, 1].

    Bin ``i`` holds scores in ``[i / bins, (i + 1) / bins)``; a score of exactly 1.0 goes into
    the last bin. A site sends these two int64 arrays instead of its per-image scores.
    """
    edges = bin_edges(bins)
    y = _as_binary_labels(labels, "labels")
    s = _as_scores(scores, "scores", y.shape[0], unit_interval=True)
    index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, edges.shape[0] - 2)
    count = edges.shape[0] - 1
    pos = np.bincount(index[y == 1], minlength=count).astype(np.int64)
    neg = np.bincount(index[y == 0], minlength=count).astype(np.int64)
    return pos, neg


def pool_histograms(histograms: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum (pos, neg) histograms from several sites; all must have the same number of bins."""
    if len(histograms) == 0:
        raise ValueError("histograms is empty; pass at least one (pos, neg) pair.")
    pooled_pos, pooled_neg = _check_histograms(*histograms[0])
    for i, (pos, neg) in enumerate(histograms[1:], start=1):
        p, n = _check_histograms(pos, neg)
        if p.shape != pooled_pos.shape:
            raise ValueError(
                f"histograms[{i}] has {p.shape[0]} bins but histograms[0] has {pooled_pos.shape[0]}; "
                "every site must use the same bins."
            )
        pooled_pos = pooled_pos + p
        pooled_neg = pooled_neg + n
    return _as_counts(pooled_pos), _as_counts(pooled_neg)


def _as_counts(arr: np.ndarray) -> np.ndarray:
    """Integer counts stay int64; anything else stays float64."""
    return arr.astype(np.int64) if np.all(arr == np.round(arr)) else arr


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC from binned scores (trapezoid over bin edges); NaN when a class is missing.

    A positive in a higher bin than a negative counts 1, in the same bin 1/2. With 100 bins this
    is within about 0.01 of the exact AUC, and equal to it when all scores within a bin tie.
    """
    p, n = _check_histograms(pos, neg)
    n_pos, n_neg = p.sum(), n.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(n) - n
    return float(np.sum(p * (negatives_below + 0.5 * n)) / (n_pos * n_neg))


def _rates_by_edge(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity when predicting positive at each edge k = 0..bins."""
    positives_at_or_above = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])
    negatives_below = np.concatenate([[0.0], np.cumsum(n)])
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = positives_at_or_above / p.sum()
        specificity = negatives_below / n.sum()
    return sensitivity, specificity


def _edge_index(threshold: float, bins: int) -> int:
    """Index of the bin edge at ``threshold``, rounding up to the next edge when between edges."""
    scaled = threshold * bins
    index = int(math.ceil(scaled - _EDGE_TOLERANCE))
    if abs(scaled - round(scaled)) > _EDGE_TOLERANCE:
        logger.warning(
            "threshold %.6g is not a bin edge of %d bins; using the next edge %.6g (histogram metrics "
            "cannot split a bin).", threshold, bins, index / bins,
        )
    return index


def best_threshold_from_histograms(pos: np.ndarray, neg: np.ndarray, criterion: str = "youden") -> float:
    """Bin edge maximising Youden's J = sensitivity + specificity - 1 on (pooled) validation counts.

    Maximising J is maximising balanced accuracy, so ``criterion`` may be either name. Ties
    (a range of empty bins between the classes) are broken by the middle of the first run of
    best edges. Use validation data only: a threshold chosen on test data biases the test result.
    """
    if criterion not in THRESHOLD_CRITERIA:
        raise ValueError(f"criterion must be one of {THRESHOLD_CRITERIA}; got {criterion!r}.")
    p, n = _check_histograms(pos, neg)
    if p.sum() == 0 or n.sum() == 0:
        raise ValueError(
            f"choosing a threshold needs both positive and negative validation examples; got "
            f"{p.sum():g} positive and {n.sum():g} negative. Keep the previous threshold instead."
        )
    sensitivity, specificity = _rates_by_edge(p, n)
    youden = sensitivity + specificity - 1.0
    best = np.flatnonzero(np.isclose(youden, youden.max(), rtol=0.0, atol=1e-12))
    gaps = np.flatnonzero(np.diff(best) > 1)
    run_end = best[gaps[0]] if gaps.size else best[-1]
    middle = (int(best[0]) + int(run_end)) // 2
    return float(middle) / p.shape[0]


def metrics_at_threshold_from_histograms(pos: np.ndarray, neg: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, balanced accuracy and accuracy predicting positive at ``threshold``.

    Bins whose lower edge is ``>= threshold`` count as predicted positive, which matches
    :func:`classification_metrics` exactly when ``threshold`` is a bin edge. A threshold of 1.0
    predicts nothing positive (scores of exactly 1.0 share the last bin).
    """
    p, n = _check_histograms(pos, neg)
    index = _edge_index(_check_threshold(threshold), p.shape[0])
    true_pos = float(p[index:].sum())
    true_neg = float(n[:index].sum())
    sensitivity = _ratio(true_pos, p.sum())
    specificity = _ratio(true_neg, n.sum())
    return {
        SENSITIVITY: sensitivity,
        SPECIFICITY: specificity,
        BALANCED_ACCURACY: _nanmean([sensitivity, specificity]),
        ACCURACY: _ratio(true_pos + true_neg, p.sum() + n.sum()),
    }

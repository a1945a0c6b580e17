"""Metrics checked against hand-computed numbers and brute-force reference computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from medfed.common import metrics as m


# ---------------------------------------------------------------------------
# Reference implementations (deliberately naive)
# ---------------------------------------------------------------------------
def brute_force_auc(labels01: np.ndarray, scores: np.ndarray) -> float:
    """P(positive scores higher than negative) over all pairs, ties counting 1/2."""
    pos = scores[labels01 == 1]
    neg = scores[labels01 == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def binary_probs(scores: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - scores, scores], axis=1)


def random_binary(seed: int, n: int = 300, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0.0, 1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores


# ---------------------------------------------------------------------------
# roc_auc
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9], 0.875),  # one tied pair counts 1/2
        ([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3], 0.5),  # all tied
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # inverted
        ([1, 0, 0], [0.5, 0.5, 0.1], 0.75),
    ],
)
def test_roc_auc_hand_cases(labels, scores, expected):
    assert m.roc_auc(np.array(labels), np.array(scores)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_roc_auc_equals_pairwise_probability(seed, decimals):
    labels, scores = random_binary(seed, n=120, decimals=decimals)
    assert m.roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_roc_auc_depends_only_on_order():
    labels, scores = random_binary(7, decimals=2)
    base = m.roc_auc(labels, scores)
    assert m.roc_auc(labels, np.exp(5 * scores) - 3) == pytest.approx(base, abs=1e-12)
    assert m.roc_auc(labels, 1.0 - scores) == pytest.approx(1.0 - base, abs=1e-12)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_roc_auc_single_class_is_nan(labels):
    value = m.roc_auc(np.array(labels), np.array([0.2, 0.5, 0.9]))
    assert math.isnan(value)
    assert not m.is_defined(value)


def test_is_defined():
    assert m.is_defined(0.0)
    assert m.is_defined(np.float64(0.7))
    assert not m.is_defined(None)
    assert not m.is_defined(float("nan"))


def test_roc_auc_accepts_bool_labels():
    assert m.roc_auc(np.array([False, True]), np.array([0.2, 0.7])) == 1.0


# ---------------------------------------------------------------------------
# classification_metrics: binary
# ---------------------------------------------------------------------------
LABELS5 = np.array([0, 0, 0, 1, 1])
SCORES5 = np.array([0.2, 0.6, 0.4, 0.7, 0.3])


def test_binary_metrics_hand_computed_default_threshold():
    # threshold 0.5 -> predictions [0, 1, 0, 1, 0]: TP 1, FN 1, TN 2, FP 1
    out = m.classification_metrics(LABELS5, binary_probs(SCORES5))
    assert out[m.SENSITIVITY] == pytest.approx(1 / 2)
    assert out[m.SPECIFICITY] == pytest.approx(2 / 3)
    assert out[m.BALANCED_ACCURACY] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out[m.ACCURACY] == pytest.approx(3 / 5)
    assert out[m.AUC] == pytest.approx(brute_force_auc(LABELS5, SCORES5))
    assert out[m.NUM_EXAMPLES] == 5.0
    assert m.LOSS not in out
    assert set(out) == {m.ACCURACY, m.BALANCED_ACCURACY, m.AUC, m.SENSITIVITY, m.SPECIFICITY, m.NUM_EXAMPLES}
    assert all(isinstance(v, float) for v in out.values())


def test_binary_metrics_custom_threshold_and_ties_at_threshold():
    # threshold 0.25 -> predictions [0, 1, 1, 1, 1]
    out = m.classification_metrics(LABELS5, binary_probs(SCORES5), threshold=0.25)
    assert out[m.SENSITIVITY] == pytest.approx(1.0)
    assert out[m.SPECIFICITY] == pytest.approx(1 / 3)
    assert out[m.ACCURACY] == pytest.approx(3 / 5)
    # a score equal to the threshold is predicted positive
    out = m.classification_metrics(np.array([1, 0]), binary_probs(np.array([0.6, 0.2])), threshold=0.6)
    assert out[m.SENSITIVITY] == 1.0 and out[m.SPECIFICITY] == 1.0


def test_binary_metrics_single_class_present():
    out = m.classification_metrics(np.array([0, 0, 0]), binary_probs(np.array([0.1, 0.7, 0.2])))
    assert math.isnan(out[m.AUC])
    assert math.isnan(out[m.SENSITIVITY])
    assert out[m.SPECIFICITY] == pytest.approx(2 / 3)
    assert out[m.BALANCED_ACCURACY] == pytest.approx(2 / 3)  # mean recall over classes present


# ---------------------------------------------------------------------------
# classification_metrics: multi-class against a per-class brute force
# ---------------------------------------------------------------------------
def reference_multiclass(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    predicted = probs.argmax(axis=1)
    aucs, recalls, specs = [], [], []
    for k in range(probs.shape[1]):
        is_k = labels == k
        if is_k.any() and (~is_k).any():
            aucs.append(brute_force_auc(is_k.astype(int), probs[:, k]))
        if is_k.any():
            recalls.append(np.mean(predicted[is_k] == k))
        if (~is_k).any():
            specs.append(np.mean(predicted[~is_k] != k))
    return {
        m.AUC: float(np.mean(aucs)),
        m.SENSITIVITY: float(np.mean(recalls)),
        m.BALANCED_ACCURACY: float(np.mean(recalls)),
        m.SPECIFICITY: float(np.mean(specs)),
        m.ACCURACY: float(np.mean(predicted == labels)),
    }


def random_multiclass(seed: int, n: int, num_classes: int, present: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, present or num_classes, size=n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += 1.0
    logits = np.round(logits, 1)  # create ties
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("num_classes", "present"), [(3, None), (4, None), (4, 3)])
def test_multiclass_matches_brute_force(seed, num_classes, present):
    labels, probs = random_multiclass(seed, 90, num_classes, present)
    out = m.classification_metrics(labels, probs)
    ref = reference_multiclass(labels, probs)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out[m.NUM_EXAMPLES] == 90.0


def test_multiclass_hand_computed():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    # argmax [0, 0, 2, 1]; recalls 1, 0, 1/2; specificities 2/3, 2/3, 1
    out = m.classification_metrics(labels, probs)
    assert out[m.ACCURACY] == pytest.approx(2 / 4)
    assert out[m.BALANCED_ACCURACY] == pytest.approx(1.5 / 3)
    assert out[m.SENSITIVITY] == pytest.approx(1.5 / 3)
    assert out[m.SPECIFICITY] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_binary_two_column_equals_multiclass_auc_of_class_one():
    labels, scores = random_binary(3, decimals=2)
    out = m.classification_metrics(labels, binary_probs(scores))
    assert out[m.AUC] == pytest.approx(m.roc_auc(labels, scores))


# ---------------------------------------------------------------------------
# Histograms
# ---------------------------------------------------------------------------
def test_score_histograms_bins_and_edges():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.0, 0.1, 0.25, 0.5, 0.99, 1.0])
    pos, neg = m.score_histograms(labels, scores, bins=4)
    # edges 0, .25, .5, .75, 1; a score on an edge goes to the bin starting there; 1.0 to the last bin
    assert pos.tolist() == [1, 1, 0, 1]
    assert neg.tolist() == [1, 0, 1, 1]
    assert pos.dtype == np.int64 and neg.dtype == np.int64


@pytest.mark.parametrize("bins", [2, 10, 100, 1000])
def test_score_histograms_counts_sum(bins):
    labels, scores = random_binary(11)
    pos, neg = m.score_histograms(labels, scores, bins=bins)
    assert pos.shape == neg.shape == (bins,)
    assert pos.sum() == labels.sum() and neg.sum() == (labels == 0).sum()


@pytest.mark.parametrize("seed", range(10))
def test_auc_from_histograms_close_to_exact(seed):
    labels, scores = random_binary(seed, n=500)
    pos, neg = m.score_histograms(labels, scores, bins=100)
    assert abs(m.auc_from_histograms(pos, neg) - m.roc_auc(labels, scores)) < 0.01


def test_auc_from_histograms_exact_when_scores_are_bin_centres():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=200)
    scores = (rng.integers(0, 20, size=200) + 0.5) / 20
    pos, neg = m.score_histograms(labels, scores, bins=20)
    assert m.auc_from_histograms(pos, neg) == pytest.approx(m.roc_auc(labels, scores), abs=1e-12)


def test_auc_from_histograms_single_class_is_nan():
    assert math.isnan(m.auc_from_histograms(np.array([0, 0, 0]), np.array([1, 2, 3])))


def test_pool_histograms_equals_histogram_of_concatenated_data():
    sites = [random_binary(seed, n=n) for seed, n in [(1, 50), (2, 130), (3, 17)]]
    hists = [m.score_histograms(y, s, bins=50) for y, s in sites]
    pos, neg = m.pool_histograms(hists)
    all_labels = np.concatenate([y for y, _ in sites])
    all_scores = np.concatenate([s for _, s in sites])
    ref_pos, ref_neg = m.score_histograms(all_labels, all_scores, bins=50)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(neg, ref_neg)
    assert pos.dtype == np.int64


@pytest.mark.parametrize("seed", range(6))
def test_metrics_at_threshold_from_histograms_match_exact(seed):
    labels, scores = random_binary(seed, n=200)
    bins = 50
    pos, neg = m.score_histograms(labels, scores, bins=bins)
    for k in range(bins):  # every edge below 1.0
        threshold = k / bins
        hist = m.metrics_at_threshold_from_histograms(pos, neg, threshold)
        exact = m.classification_metrics(labels, binary_probs(scores), threshold=threshold)
        for key in (m.SENSITIVITY, m.SPECIFICITY, m.BALANCED_ACCURACY, m.ACCURACY):
            assert hist[key] == pytest.approx(exact[key], abs=1e-12), (key, threshold)


def test_metrics_at_threshold_between_edges_rounds_up(caplog):
    pos, neg = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])
    with caplog.at_level("WARNING", logger="medfed.common.metrics"):
        between = m.metrics_at_threshold_from_histograms(pos, neg, 0.3)
    assert "not a bin edge" in caplog.text
    assert between == m.metrics_at_threshold_from_histograms(pos, neg, 0.5)


def test_best_threshold_separated_classes_picks_middle_of_gap():
    bins = 10
    # negatives in bins 0-2, positives in bins 7-9: every edge 3..7 separates perfectly
    pos = np.array([0, 0, 0, 0, 0, 0, 0, 4, 5, 6])
    neg = np.array([6, 5, 4, 0, 0, 0, 0, 0, 0, 0])
    threshold = m.best_threshold_from_histograms(pos, neg)
    assert threshold == pytest.approx(5 / bins)
    out = m.metrics_at_threshold_from_histograms(pos, neg, threshold)
    assert out[m.SENSITIVITY] == 1.0 and out[m.SPECIFICITY] == 1.0 and out[m.BALANCED_ACCURACY] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_maximises_balanced_accuracy_by_brute_force(seed):
    labels, scores = random_binary(seed, n=300)
    bins = 40
    pos, neg = m.score_histograms(labels, scores, bins=bins)
    threshold = m.best_threshold_from_histograms(pos, neg)
    assert threshold in set(np.arange(bins + 1) / bins)
    best_exact = max(
        m.classification_metrics(labels, binary_probs(scores), threshold=k / bins)[m.BALANCED_ACCURACY]
        for k in range(bins)
    )
    chosen = m.classification_metrics(labels, binary_probs(scores), threshold=threshold)
    assert chosen[m.BALANCED_ACCURACY] == pytest.approx(best_exact, abs=1e-12)
    assert m.best_threshold_from_histograms(pos, neg, criterion="balanced-accuracy") == threshold


def test_best_threshold_uninformative_scores_defaults_to_middle():
    pos = np.array([0, 0, 5, 0])
    neg = np.array([0, 0, 5, 0])
    assert m.best_threshold_from_histograms(pos, neg) == 0.5


# ---------------------------------------------------------------------------
# Ill cases that must raise
# ---------------------------------------------------------------------------
GOOD_LABELS = np.array([0, 1, 1, 0])
GOOD_PROBS = binary_probs(np.array([0.1, 0.8, 0.6, 0.3]))


@pytest.mark.parametrize(
    ("labels", "probs", "kwargs", "match"),
    [
        (GOOD_LABELS[:3], GOOD_PROBS, {}, "rows"),  # shape mismatch
        (GOOD_LABELS, GOOD_PROBS[:, 1], {}, "2-D"),  # probs not 2-D
        (GOOD_LABELS, GOOD_PROBS[None], {}, "2-D"),
        (GOOD_LABELS, GOOD_PROBS[:, :1], {}, "at least 2 columns"),
        (GOOD_LABELS.reshape(2, 2), GOOD_PROBS, {}, "1-D"),
        (np.array([0, 1, 2, 0]), GOOD_PROBS, {}, "class indices in"),  # label out of range
        (np.array([0, -1, 1, 0]), GOOD_PROBS, {}, "class indices in"),
        (np.array([0.0, 0.5, 1.0, 0.0]), GOOD_PROBS, {}, "integer"),
        (np.array([], dtype=int), np.zeros((0, 2)), {}, "empty"),
        (GOOD_LABELS, GOOD_PROBS * 3 - 1, {}, r"\[0, 1\]"),  # logits passed as probs
        (GOOD_LABELS, np.where(GOOD_PROBS > 0.5, np.nan, GOOD_PROBS), {}, "NaN"),
        (GOOD_LABELS, GOOD_PROBS, {"threshold": 1.5}, "threshold"),
        (np.array([0, 1, 2]), np.full((3, 3), 1 / 3), {"threshold": 0.5}, "binary tasks only"),
    ],
)
def test_classification_metrics_ill_cases(labels, probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        m.classification_metrics(labels, probs, **kwargs)


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        (np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]), "0 \\(negative\\) or 1"),
        (np.array([0, 1]), np.array([0.1, 0.2, 0.3]), "entries"),
        (np.array([0, 1]), np.array([[0.1, 0.2]]), "1-D"),
        (np.array([0, 1]), np.array([0.1, np.inf]), "NaN or infinite"),
    ],
)
def test_roc_auc_ill_cases(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        m.roc_auc(labels, scores)


@pytest.mark.parametrize("bins", [1, 0, -3, 2.5, True])
def test_score_histograms_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        m.score_histograms(np.array([0, 1]), np.array([0.2, 0.8]), bins=bins)


def test_score_histograms_scores_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.score_histograms(np.array([0, 1]), np.array([-0.1, 0.8]))


@pytest.mark.parametrize(
    ("pos", "neg", "match"),
    [
        (np.array([1, 2, 3]), np.array([1, 2]), "bins"),
        (np.array([1]), np.array([1]), "at least 2"),
        (np.array([1, -1]), np.array([1, 1]), "non-negative"),
        (np.array([[1, 2]]), np.array([[1, 2]]), "1-D"),
    ],
)
def test_histogram_ill_cases(pos, neg, match):
    with pytest.raises(ValueError, match=match):
        m.auc_from_histograms(pos, neg)
    with pytest.raises(ValueError, match=match):
        m.metrics_at_threshold_from_histograms(pos, neg, 0.5)


def test_pool_histograms_ill_cases():
    with pytest.raises(ValueError, match="empty"):
        m.pool_histograms([])
    with pytest.raises(ValueError, match=r"histograms\[1\] has 3 bins"):
        m.pool_histograms([(np.zeros(4), np.zeros(4)), (np.zeros(3), np.zeros(3))])


def test_best_threshold_ill_cases():
    with pytest.raises(ValueError, match="criterion"):
        m.best_threshold_from_histograms(np.array([1, 2]), np.array([2, 1]), criterion="f1")
    with pytest.raises(ValueError, match="both positive and negative"):
        m.best_threshold_from_histograms(np.array([0, 0]), np.array([2, 1]))

"""Choice of the reported model and its decision threshold, on validation data only.

Sites send validation score histograms (counts, no per-image values); the server pools
them into a validation AUC per round and a threshold that maximises balanced accuracy
(Youden's J). Tasks without scores (segmentation) are chosen on the validation metric their
task names (``Task.score``, e.g. Dice), averaged over sites weighted by validation images.
The test split is never used to choose anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from medfed.common.constants import GROUP_SCALAR_KEYS, MetricKey


@dataclass
class PooledValidation:
    score: float  # the task's selection metric (AUC for classification, Dice for segmentation)
    threshold: float | None
    metrics: dict[str, float] = field(default_factory=dict)


def pool_validation(per_site: dict[str, dict], score: str = "auc") -> PooledValidation:
    """Pooled validation metrics of one round from per-site evaluation replies.

    ``score`` names the metric that chooses the round when no histograms came (the task's).
    """
    from medfed.common.metrics import (
        auc_from_histograms,
        best_threshold_from_histograms,
        metrics_at_threshold_from_histograms,
        pool_histograms,
    )

    hists = [
        (np.asarray(m[MetricKey.VAL_HIST_POS.value]), np.asarray(m[MetricKey.VAL_HIST_NEG.value]))
        for m in per_site.values()
        if MetricKey.VAL_HIST_POS.value in m
    ]
    weights = {s: float(m.get(MetricKey.NUM_EXAMPLES.value, 0.0)) for s, m in per_site.items()}
    averaged = _weighted_means(per_site, weights, prefix="val-")
    if hists:
        pos, neg = pool_histograms(hists)
        if pos.sum() > 0 and neg.sum() > 0:
            auc = float(auc_from_histograms(pos, neg))
            threshold = float(best_threshold_from_histograms(pos, neg))
            metrics = {"auc": auc, "threshold": threshold}
            metrics.update(metrics_at_threshold_from_histograms(pos, neg, threshold))
            metrics["loss"] = averaged.get("loss", float("nan"))
            return PooledValidation(auc, threshold, metrics)
    return PooledValidation(averaged.get(score, float("nan")), None, averaged)


@dataclass
class PooledTest:
    """The sites' test metrics pooled: what a deployed study reports, since its server holds no test data."""

    metrics: dict[str, float]
    counts: dict[str, int]  # site -> test samples it evaluated (0: too few to report, see min-eval-n)
    note: str


def pool_test(per_site: dict[str, dict], threshold: float | None) -> PooledTest:
    """Pooled test metrics of the sites' test splits, from their counts and score histograms.

    Binary classification pools the test score histograms: the AUC of all sites' test images
    together and the metrics at ``threshold`` (the one chosen on validation; 0.5 when none),
    exactly as if the test splits were one. Other tasks average each site's test metrics,
    weighted by its number of test samples. Nothing per image is used.
    """
    from medfed.common.metrics import (
        DEFAULT_THRESHOLD,
        auc_from_histograms,
        metrics_at_threshold_from_histograms,
        pool_histograms,
    )

    n_key = MetricKey.TEST_EXAMPLES.value
    counts = {s: int(m.get(n_key, 0)) for s, m in per_site.items()}
    reporting = [s for s, n in counts.items() if n > 0]
    weights = {s: float(counts[s]) for s in reporting}
    metrics = _weighted_means({s: per_site[s] for s in reporting}, weights, prefix="test-")
    metrics.pop("num-examples", None)
    hists = [(np.asarray(per_site[s][MetricKey.TEST_HIST_POS.value]), np.asarray(per_site[s][MetricKey.TEST_HIST_NEG.value]))
             for s in reporting if MetricKey.TEST_HIST_POS.value in per_site[s]]
    how = f"weighted by each site's test samples, n={sum(weights.values()):g}"
    if hists and len(hists) == len(reporting):
        pos, neg = pool_histograms(hists)
        if pos.sum() > 0 and neg.sum() > 0:
            cut = DEFAULT_THRESHOLD if threshold is None else float(threshold)
            metrics.update(metrics_at_threshold_from_histograms(pos, neg, cut))
            metrics["auc"] = float(auc_from_histograms(pos, neg))
            how = (f"score histograms and counts pooled, n={int(pos.sum() + neg.sum())}, threshold {cut:g}; "
                   "no per-image value moved")
    note = (f"pooled over {len(reporting)} site(s)' test splits ({how})" if reporting
            else "no site reported test metrics")
    return PooledTest(metrics if reporting else {}, dict(sorted(counts.items())), note)


def _weighted_means(per_site: dict[str, dict], weights: dict[str, float], prefix: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for site, metrics in per_site.items():
        w = weights.get(site, 0.0)
        for key, value in metrics.items():
            if (not key.startswith(prefix) or key in GROUP_SCALAR_KEYS or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue  # per-group counts are pooled by the fairness record, not averaged
            name = key[len(prefix):]
            sums[name] = sums.get(name, 0.0) + w * float(value)
            totals[name] = totals.get(name, 0.0) + w
    return {k: sums[k] / totals[k] for k in sums if totals[k] > 0}


@dataclass
class Selection:
    """Best round so far by the pooled validation score, AUC or Dice (or simply the last round)."""

    rule: str = "val-auc"
    best_round: int = 0
    best_score: float = -math.inf
    threshold: float | None = None

    def consider(self, server_round: int, pooled: PooledValidation) -> bool:
        """Take this round if it is better; returns True when it was taken."""
        score = pooled.score if math.isfinite(pooled.score) else -math.inf
        unscored = score == -math.inf and self.best_score == -math.inf  # no score at all: the latest round
        if self.rule == "last" or self.best_round == 0 or unscored or score > self.best_score:
            self.best_round, self.best_score, self.threshold = server_round, score, pooled.threshold
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "best-round": self.best_round,
            "best-score": self.best_score if math.isfinite(self.best_score) else None,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        score = d.get("best-score")
        return cls(
            rule=str(d.get("rule", "val-auc")),
            best_round=int(d.get("best-round", 0)),
            best_score=-math.inf if score is None else float(score),
            threshold=None if d.get("threshold") is None else float(d["threshold"]),
        )

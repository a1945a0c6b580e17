"""Reply keys of a site's robustness evaluation in a study: metrics under attack per epsilon, test split only.

``test-robust-{attack}-e{i}-{metric}``: ``i`` indexes the study's ``robustness-eps`` list
(at most :data:`MAX_EPS` values), ``metric`` is accuracy, AUC or sensitivity of the final
global model on the site's own test images after the attack. ``test-robust-n`` counts those
images. The server maps ``i`` back to the epsilon (``server/robustness.py``).
"""

from __future__ import annotations

ROBUST_ATTACKS = ("fgsm", "pgd")
MAX_EPS = 8
ROBUST_METRICS = ("accuracy", "auc", "sensitivity")
ROBUST_N = "test-robust-n"


def robust_key(attack: str, eps_index: int, metric: str) -> str:
    """e.g. ``test-robust-pgd-e2-accuracy``."""
    return f"test-robust-{attack}-e{eps_index}-{metric}"


ROBUSTNESS_KEYS = frozenset(robust_key(a, i, m) for a in ROBUST_ATTACKS for i in range(MAX_EPS)
                            for m in ROBUST_METRICS) | {ROBUST_N}
ROBUSTNESS_COUNT_KEYS = frozenset({ROBUST_N})

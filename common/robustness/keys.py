"""Reply keys of a site's robustness evaluation in a study: metrics under attack per epsilon, test split only.

``test-robust-{attack}-e{i}-{metric}``: ``i`` indexes the study's ``robustness-eps`` list
(at most :data:`MAX_EPS` values), ``metric`` is accuracy, AUC or sensitivity of the final
global model on the site's own test images after the attack. ``test-robust-n`` counts those
images. The server maps ``i`` back to the epsilon (``server/robustness.py``).
"""

from __future__ import annotations

from medfed.common.errors import ConfigError

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


def parse_radii(text: str, scale: float, what: str) -> list[tuple[str, float]]:
    """(the text given, the radius on the [0, 1] scale) per comma-separated radius, in units of 1/``scale``.

    One parser for the ``robustness-eps`` study key and ``medfed robustness --eps``; ``what``
    names the key or flag in the error. Repeats are dropped; each radius must be in (0, 1].
    """
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{what} {text!r}: give a comma-separated list of radii without empty entries")
    out: list[tuple[str, float]] = []
    for label in dict.fromkeys(items):
        try:
            value = float(label) / scale
        except ValueError:
            raise ConfigError(f"{what} {label!r} is not a number: give radii such as 0.5,1,2,4,8") from None
        if not 0 < value <= 1:  # also refuses NaN
            raise ConfigError(f"{what} {label} is {value:g} on the [0, 1] intensity scale (units of 1/{scale:g}): "
                              f"give radii > 0 and <= {scale:g}")
        out.append((label, value))
    return out

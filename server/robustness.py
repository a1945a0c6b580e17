"""The summary's ``robustness`` section: each site's metrics under attack, per radius, from its aggregates.

With ``robustness-eval`` every site attacks the final global model on its own test split
(white-box FGSM/PGD, :mod:`medfed.common.robustness`) and sends accuracy, AUC and sensitivity
per attack and radius (:mod:`medfed.common.robustness.keys`); this maps the radius index back
to the study's ``robustness-eps`` and pools the sites weighted by their attacked test images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.common.robustness.keys import ROBUST_METRICS, ROBUST_N, robust_key

ROBUSTNESS = "robustness"
CLEAN_KEYS = {m: f"test-{m}" for m in ROBUST_METRICS}


def _site(metrics: Mapping[str, Any], attacks: tuple[str, ...], radii: tuple[tuple[str, float], ...]) -> dict | None:
    if ROBUST_N not in metrics:
        return None
    rec: dict[str, Any] = {"n": int(metrics[ROBUST_N]),
                           "clean": {m: metrics.get(k) for m, k in CLEAN_KEYS.items()}}
    for attack in attacks:
        rec[attack] = {label: {m: metrics.get(robust_key(attack, i, m)) for m in ROBUST_METRICS}
                       for i, (label, _) in enumerate(radii)}
    return rec


def _pooled(sites: Mapping[str, dict], attacks: tuple[str, ...], labels: list[str]) -> dict[str, Any]:
    def mean(get) -> float | None:
        pairs = [(v, s["n"]) for s in sites.values() if (v := get(s)) is not None]
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if total else None

    out: dict[str, Any] = {"clean": {m: mean(lambda s, m=m: s["clean"].get(m)) for m in ROBUST_METRICS}}
    for attack in attacks:
        out[attack] = {lab: {m: mean(lambda s, a=attack, lab=lab, m=m: s[a][lab].get(m)) for m in ROBUST_METRICS}
                       for lab in labels}
    return out


def summary_robustness(per_site: Mapping[str, Mapping[str, Any]], attacks: tuple[str, ...],
                       radii: tuple[tuple[str, float], ...], steps: int) -> dict[str, Any] | None:
    """The ``robustness`` section of summary.json, or None when no site sent results under attack."""
    sites = {s: rec for s, m in per_site.items() if (rec := _site(m, attacks, radii)) is not None}
    if not attacks or not sites:
        return None
    labels = [label for label, _ in radii]
    return {"split": "test", "attacks": list(attacks), "eps": labels, "eps-unit": "1/255", "pgd-steps": steps,
            "norm": "Linf", "sites": sites, "pooled": _pooled(sites, attacks, labels),
            "weights": "each site's attacked test images (test-robust-n)"}

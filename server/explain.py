"""The summary's ``explain`` section: where each site's saliency mass lies, and which site stands out.

Built from the sites' final-evaluation aggregates (:mod:`medfed.common.explain.metrics`) on
their test splits: border share overall and per class (with its spread over the images and
its count), mask share, the coarse per-class maps and per-group border shares. No image or
per-image map ever reached the server.

**The flag rule** (:func:`flag_sites`) reads the coarse maps' border ring (the 28 outer
cells of the 8x8 grid), cell by cell: a burned-in marker is local, it adds mass to one corner,
which the band-wide border share dilutes over the whole band (PneumoniaMNIST with a marker at
the site holding most positives: band share 0.41 there and 0.41-0.44 at the others, because the
model then looks at that corner everywhere; the top-left cells held 0.08-0.12 of the mass there
and 0.02-0.05 elsewhere). A shortcut also goes with a label, so it is read per class. For class
``c`` and site ``i`` the *hot spot* is

    e_i = max over ring cells of (m_i(cell) - median over the other sites of m_j(cell)),

the largest excess of mass the site puts in one border cell over what the other sites put there
(leave-one-out, so the tested site cannot mask itself). A site is flagged when, for some class,

    z = (e_i - median(e_others)) / sqrt((1.4826 * MAD(e_others))^2 + floor^2) > 3.5

(Iglewicz & Hoaglin's cut-off for the modified z-score) and ``e_i`` is at least one uniform
cell's share (1/64): the hot spot stands out from the hot spots every site shows by chance
(``1.4826 * MAD`` estimates their spread without being pulled by the outlier; ``floor``,
:data:`SPREAD_FLOOR`, is that spread measured without a marker, which three or four other sites
estimate poorly). It needs at least three sites with the class (two others to compare with);
only an excess is flagged. Measured with ``bench/trust_shortcut.sh``: see the README.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from medfed.common.constants import (
    EXPLAIN_GRID,
    EXPLAIN_BORDER,
    EXPLAIN_CELLS,
    EXPLAIN_BORDER_SD,
    EXPLAIN_MASK,
    EXPLAIN_MASK_N,
    EXPLAIN_N,
    EXPLAIN_MAP,
    MAX_EXPLAIN_CLASSES,
    MAX_GROUPS,
    MIN_GROUP_SAMPLES,
    explain_class_key,
    group_metric_key,
)

EXPLAIN = "explain"
SPLIT = "test"
Z_CUTOFF = 3.5
MIN_EXCESS = 1.0 / EXPLAIN_CELLS  # one uniform cell's share of the saliency mass
SPREAD_FLOOR = 0.005  # the hot spots' between-site spread without a marker, at REFERENCE_N images of a class
REFERENCE_N = 30  # (synthetic and PneumoniaMNIST test splits); a class of n images wanders sqrt(30 / n) as much
MIN_SITES = 3
GRID = EXPLAIN_GRID
RING = tuple(i * GRID + j for i in range(GRID) for j in range(GRID) if i in (0, GRID - 1) or j in (0, GRID - 1))
RULE = (f"per class, each site's hot spot e = max over the coarse map's border cells of (its share - the other sites' "
        f"median share); flagged when z = (e - median(hot spots of the other sites, all classes)) / "
        f"sqrt((1.4826 MAD)^2 + ({SPREAD_FLOOR} sqrt({REFERENCE_N}/n))^2) > {Z_CUTOFF} and e >= 1/64, n the class's "
        f"images at the site (at least {MIN_SITES} sites with the class)")


def _site_record(metrics: Mapping[str, Any], group_labels: tuple[str, ...]) -> dict[str, Any] | None:
    border = metrics.get(f"{SPLIT}-{EXPLAIN_BORDER}")
    if border is None:
        return None
    rec: dict[str, Any] = {"border-share": float(border),
                           "border-sd": float(metrics.get(f"{SPLIT}-{EXPLAIN_BORDER_SD}", 0.0)),
                           "n": int(metrics.get(f"{SPLIT}-{EXPLAIN_N}", 0))}
    if f"{SPLIT}-{EXPLAIN_MASK}" in metrics:
        rec["mask-share"] = float(metrics[f"{SPLIT}-{EXPLAIN_MASK}"])
        rec["mask-n"] = int(metrics.get(f"{SPLIT}-{EXPLAIN_MASK_N}", 0))
    classes = {}
    for c in range(MAX_EXPLAIN_CLASSES):
        key = explain_class_key(SPLIT, c, EXPLAIN_BORDER)
        if key in metrics:
            classes[str(c)] = {"border-share": float(metrics[key]),
                               "border-sd": float(metrics.get(explain_class_key(SPLIT, c, EXPLAIN_BORDER_SD), 0.0)),
                               "n": int(metrics.get(explain_class_key(SPLIT, c, EXPLAIN_N), 0)),
                               "map": [float(v) for v in metrics.get(explain_class_key(SPLIT, c, EXPLAIN_MAP), [])]}
    if classes:
        rec["classes"] = classes
    groups = {}
    for g in range(MAX_GROUPS):
        key = group_metric_key(SPLIT, g, EXPLAIN_BORDER)
        if key in metrics:
            name = group_labels[g] if g < len(group_labels) else str(g)
            groups[name] = {"border-share": float(metrics[key]),
                            "n": int(metrics.get(group_metric_key(SPLIT, g, EXPLAIN_N), 0))}
    if groups:
        rec["groups"] = groups
    return rec


def robust_z(value: float, others: list[float], floor: float) -> float:
    """The modified z-score of ``value`` against ``others`` (median, MAD), the spread at least ``floor``."""
    arr = np.asarray(others, dtype=float)
    med = float(np.median(arr))
    mad = 1.4826 * float(np.median(np.abs(arr - med)))
    return (value - med) / math.sqrt(mad ** 2 + floor ** 2)


def hot_spots(maps: Mapping[str, np.ndarray]) -> dict[str, tuple[float, int]]:
    """Each site's (largest border-cell excess over the other sites' median, that cell's index 0..63)."""
    out = {}
    for site, m in maps.items():
        median = np.median([o for s, o in maps.items() if s != site], axis=0)
        excess = (m - median)[list(RING)]
        k = int(np.argmax(excess))
        out[site] = (float(excess[k]), RING[k])
    return out


def flag_sites(records: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """(flagged site ids, per site and class its hot spot, cell and z) under the module's rule."""
    labels = sorted({c for r in records.values() for c in r.get("classes", {})}, key=int)
    spots: dict[str, dict[str, tuple[float, int]]] = {}  # class -> site -> (hot spot, cell)
    for c in labels:
        maps = {s: np.asarray(r["classes"][c]["map"], dtype=float) for s, r in records.items()
                if len(r.get("classes", {}).get(c, {}).get("map", [])) == GRID * GRID}
        if len(maps) >= MIN_SITES:
            spots[c] = hot_spots(maps)
    flagged: set[str] = set()
    found: dict[str, dict[str, dict]] = {}
    for c, by_site in spots.items():
        for site, (excess, cell) in by_site.items():
            reference = [e for k in spots.values() for s, (e, _) in k.items() if s != site]
            n = max(int(records[site]["classes"][c].get("n", 1)), 1)
            z = robust_z(excess, reference, SPREAD_FLOOR * math.sqrt(REFERENCE_N / n))
            found.setdefault(site, {})[c] = {"hot-spot": excess, "cell": [cell // GRID, cell % GRID], "z": z}
            if z > Z_CUTOFF and excess >= MIN_EXCESS:
                flagged.add(site)
    return sorted(flagged), found


def summary_explain(per_site: Mapping[str, Mapping[str, Any]], band: float, method: str,
                    group_labels: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The ``explain`` section of summary.json, or None when no site sent saliency aggregates."""
    records = {site: rec for site, metrics in per_site.items()
               if (rec := _site_record(metrics, group_labels)) is not None}
    if not records:
        return None
    flagged, found = flag_sites(records)
    for site, by_class in found.items():
        for c, spot in by_class.items():
            records[site]["classes"][c].update(spot)
    n = sum(r["n"] for r in records.values())
    pooled = sum(r["border-share"] * r["n"] for r in records.values()) / n if n else None
    return {"split": SPLIT, "method": method, "band": band, "min-samples": MIN_GROUP_SAMPLES,
            "pooled": {"border-share": pooled, "n": n}, "sites": dict(sorted(records.items())),
            "flagged": flagged, "rule": RULE}

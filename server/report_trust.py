"""The trust sections of ``report.md``: interpretability per site (``explain``) and robustness under attack.

Read from ``summary.json`` (:mod:`medfed.server.explain`, :mod:`medfed.server.robustness`):
what the sites measured on their own test splits, nothing per image. A run without either
gets neither section. matplotlib is imported inside the plotting functions only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.constants import EXPLAIN_CELLS, EXPLAIN_GRID
from medfed.server.explain import EXPLAIN
from medfed.server.report_format import fmt as _fmt, md_table as _md_table, natural_key as _natural_key
from medfed.server.robustness import ROBUSTNESS

logger = logging.getLogger(__name__)

MAPS_PLOT = "explain_maps.png"
ROBUST_PLOT = "robustness_sites.png"


def trust_sections(run_dir: Path, summary: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if isinstance(summary.get(EXPLAIN), dict):
        lines += explain_section(run_dir, summary[EXPLAIN])
    if isinstance(summary.get(ROBUSTNESS), dict):
        lines += robustness_section(run_dir, summary[ROBUSTNESS])
    return lines


def _classes(explain: Mapping[str, Any]) -> list[str]:
    return sorted({c for s in explain["sites"].values() for c in s.get("classes", {})}, key=int)


def explain_section(run_dir: Path, explain: Mapping[str, Any]) -> list[str]:
    sites = dict(sorted(explain["sites"].items(), key=lambda kv: _natural_key(kv[0])))
    classes = _classes(explain)
    flagged = explain.get("flagged") or []
    band = float(explain.get("band", 0.1))
    lines = ["## Interpretability (saliency aggregates)", "",
             f"Each site computed {explain.get('method')} saliency of its test images for their own class and sent "
             f"only aggregates: the share of saliency mass in the outer {band:.0%} band of the image per side "
             "(where burned-in text, rulers and markers sit), per class and group, and a coarse 8x8 mean map per "
             f"class; classes and groups with fewer than {explain.get('min-samples')} images are suppressed. "
             "No image or per-image map left a site.", ""]
    if flagged:
        lines += [f"**Flagged: {', '.join(flagged)}**: the border share of a class stands out above the other "
                  "sites'. Look at the saliency at that site with `medfed explain` (it stays there): a marker, "
                  "text or border artefact that goes with the label is a shortcut.", ""]
    else:
        lines += ["No site's border share stands out from the others.", ""]
    masks = any("mask-share" in rec for rec in sites.values())
    header = ["site", "images", "border share", *(f"class {c} border (z)" for c in classes),
              *(["mask share"] if masks else []), ""]
    rows = []
    for site, rec in sites.items():
        cells = [site, str(rec.get("n", "n/a")), _fmt(rec.get("border-share"), 3)]
        for c in classes:
            cr = rec.get("classes", {}).get(c)
            cells.append("suppressed" if cr is None else f"{_fmt(cr.get('border-share'), 3)} ({_fmt(cr.get('z'), 1)})")
        cells += [*([_fmt(rec.get("mask-share"), 3)] if masks else []), "**flagged**" if site in flagged else ""]
        rows.append(cells)
    lines += _md_table(header, rows) + [""]
    lines += [f"Rule: {explain.get('rule')}.", ""]
    groups = sorted({g for rec in sites.values() for g in rec.get("groups", {})})
    if groups:
        rows = [[site, *(_fmt(rec.get("groups", {}).get(g, {}).get("border-share"), 3) for g in groups)]
                for site, rec in sites.items()]
        lines += ["Border share per group:", "", *_md_table(["site", *groups], rows), ""]
    if classes and _plot_maps(sites, classes, run_dir / MAPS_PLOT):
        lines += [f"![Coarse mean saliency per site and class]({MAPS_PLOT})", ""]
    return lines


def _plot_maps(sites: Mapping[str, Any], classes: list[str], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(classes), len(sites), figsize=(1.6 * len(sites) + 0.8, 1.7 * len(classes) + 0.4),
                             squeeze=False)
    drawn = False
    for j, (site, rec) in enumerate(sites.items()):
        for i, c in enumerate(classes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            cells = rec.get("classes", {}).get(c, {}).get("map") or []
            if len(cells) == EXPLAIN_CELLS:
                ax.imshow(np.asarray(cells).reshape(EXPLAIN_GRID, EXPLAIN_GRID), cmap="magma", vmin=0.0)
                drawn = True
            else:
                ax.text(0.5, 0.5, "suppressed", ha="center", va="center", fontsize=7)
            if i == 0:
                ax.set_title(site, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"class {c}", fontsize=8)
    fig.suptitle("Coarse mean saliency (8x8 shares of mass) per site and class", fontsize=9)
    fig.tight_layout()
    if drawn:
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def robustness_section(run_dir: Path, robust: Mapping[str, Any]) -> list[str]:
    sites = dict(sorted(robust["sites"].items(), key=lambda kv: _natural_key(kv[0])))
    attacks, eps = list(robust["attacks"]), list(robust["eps"])
    lines = ["## Robustness under attack", "",
             f"Each site attacked the final global model on its own test images (white-box L-infinity "
             f"{', '.join(a.upper() for a in attacks)}; PGD with {robust.get('pgd-steps')} steps; radii in "
             f"{robust.get('eps-unit')} of the [0, 1] intensity scale) and sent accuracy, AUC and sensitivity per "
             "radius. Pooled: weighted by each site's attacked images.", ""]
    header = ["site", "attack", "clean", *(f"eps {e}" for e in eps)]
    rows = []
    for site, rec in [*sites.items(), ("pooled", robust.get("pooled", {}))]:
        for attack in attacks:
            per = rec.get(attack, {})
            rows.append([site, attack, _fmt(rec.get("clean", {}).get("accuracy"), 3),
                         *(_fmt(per.get(e, {}).get("accuracy"), 3) for e in eps)])
    lines += ["Accuracy:", "", *_md_table(header, rows), ""]
    if _plot_robustness(sites, attacks, eps, run_dir / ROBUST_PLOT):
        lines += [f"![Accuracy under attack per site]({ROBUST_PLOT})", ""]
    return lines


def _plot_robustness(sites: Mapping[str, Any], attacks: list[str], eps: list[str], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(e) for e in eps]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False)
    drawn = False
    for ax, attack in zip(axes[0], attacks):
        for site, rec in sites.items():
            ys = [rec.get(attack, {}).get(e, {}).get("accuracy") for e in eps]
            clean = rec.get("clean", {}).get("accuracy")
            pts = [(0.0, clean)] if clean is not None else []
            pts += [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=site)
                drawn = True
        ax.set_title(f"{attack.upper()}", fontsize=9)
        ax.set_xlabel("eps (1/255)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn

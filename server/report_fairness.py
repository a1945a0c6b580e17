"""The fairness sections of ``report.md``: per-group metrics, gaps, per-site groups, plots over rounds.

Reads the ``"fairness"`` section of ``summary.json`` (the reported model; see
:mod:`medfed.server.fairness`) and of each ``metrics.jsonl`` record (per round, at the
threshold the sites used then). A run without group codes has neither, and gets no section.
matplotlib is imported inside the plotting function only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.common import fairness as fx
from medfed.server.fairness import (
    ATTRIBUTE,
    CENTRAL,
    FAIRNESS,
    MIN_SAMPLES,
    REPORTED_SPLIT,
    SITES,
    SOURCE,
    THRESHOLD,
)
from medfed.server.report_format import (
    PLOT_SIZE_IN as _PLOT_SIZE_IN,
    finish_round_plot,
    fmt as _fmt,
    fmt_count as _fmt_count,
    md_table as _md_table,
    natural_key as _natural_key,
    number as _number,
)

logger = logging.getLogger(__name__)

# Group table columns: (header, metric key).
GROUP_COLUMNS = (
    ("AUC", fx.AUC), ("accuracy", fx.ACCURACY), ("TPR (sensitivity)", fx.TPR), ("FPR", fx.FPR),
    ("underdiagnosis rate (FNR)", fx.UNDERDIAGNOSIS), ("predicted positive rate", fx.PREDICTED_POSITIVE),
)
SITE_COLUMNS = (("AUC", fx.AUC), ("TPR", fx.TPR), ("FPR", fx.FPR), ("underdiagnosis rate", fx.UNDERDIAGNOSIS))
GAP_ROWS = (
    ("AUC", fx.AUC), ("accuracy", fx.ACCURACY), ("TPR", fx.TPR), ("FPR", fx.FPR),
    ("underdiagnosis rate", fx.UNDERDIAGNOSIS),
)
# Plots: (file name, title).
TPR_PLOT = ("fairness_group_tpr.png", "Test TPR (sensitivity) per group by round")
AUC_PLOT = ("fairness_group_auc.png", "Test AUC per group by round")
GAPS_PLOT = ("fairness_gaps.png", "Fairness gaps (test) by round")
GAP_SERIES = (("TPR gap (= underdiagnosis gap)", fx.TPR), ("AUC gap", fx.AUC))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _with_ci(value: Any, ci: Any, digits: int = 3) -> str:
    text = _fmt(value, digits)
    if text != "n/a" and isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        text += f" [{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"
    return text


def _threshold_text(threshold: Any) -> str:
    if isinstance(threshold, Mapping):  # local baselines: one model and threshold per site
        return ", ".join(f"{site} {_fmt(t, 3)}" for site, t in threshold.items())
    return _fmt(threshold, 3)


def _group_table(record: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, entry in (record.get(fx.GROUPS) or {}).items():
        ci = entry.get(fx.CI) or {}
        if not _number(entry.get(fx.N)):
            rows.append([name, "0", "0", *(["unavailable"] * len(GROUP_COLUMNS))])
            continue
        rows.append([name, _fmt_count(entry.get(fx.N)), _fmt_count(entry.get(fx.POSITIVES)),
                     *(_with_ci(entry.get(key), ci.get(key)) for _, key in GROUP_COLUMNS)])
    return _md_table(["group", "n", "positives", *(h for h, _ in GROUP_COLUMNS)], rows)


def _gap_table(record: Mapping[str, Any]) -> list[str]:
    gaps = record.get(fx.GAPS) or {}
    ci = gaps.get(fx.CI) or {}
    rows = []
    for label, key in GAP_ROWS:
        g = gaps.get(key) or {}
        rows.append([label, g.get(fx.WORST_GROUP) or "n/a", _fmt(g.get(fx.WORST), 3), _fmt(g.get(fx.BEST), 3),
                     _with_ci(g.get(fx.GAP), ci.get(key))])
    for label, key in (("equalized-odds difference", fx.EQUALIZED_ODDS),
                       ("demographic-parity difference", fx.DEMOGRAPHIC_PARITY)):
        rows.append([label, "", "", "", _with_ci(gaps.get(key), ci.get(key))])
    return _md_table(["metric", "worst group", "worst", "best", "gap (max - min)"], rows)


def _suppressed_note(record: Mapping[str, Any]) -> list[str]:
    notes = [f"{name} at {', '.join(entry[fx.SUPPRESSED_AT])}" for name, entry in (record.get(fx.GROUPS) or {}).items()
             if entry.get(fx.SUPPRESSED_AT)]
    return [f"Suppressed (too few samples, not pooled): {'; '.join(notes)}.", ""] if notes else []


def _headline(record: Mapping[str, Any], attribute: str) -> list[str]:
    worst = record.get(fx.DISADVANTAGED)
    if not worst:
        return ["No disadvantaged group can be named: fewer than two groups have diseased patients.", ""]
    g = (record.get(fx.GAPS) or {}).get(fx.UNDERDIAGNOSIS) or {}
    return [f"**Disadvantaged {attribute} group: {worst}**: the highest underdiagnosis rate (diseased patients "
            f"called healthy), {_fmt(g.get(fx.WORST), 3)} against {_fmt(g.get(fx.BEST), 3)} for the best group "
            f"(gap {_fmt(g.get(fx.GAP), 3)}).", ""]


def _summary_sections(fair: Mapping[str, Any]) -> list[str]:
    attribute = str(fair.get(ATTRIBUTE, "group"))
    lines = ["## Fairness by group", ""]
    local = isinstance(fair.get(THRESHOLD), Mapping)  # local baselines: one model per site
    model = "each site's own model, pooled" if local else "the reported model"
    intro = (f"Groups by {attribute}, on the {fair.get('split', REPORTED_SPLIT)} split of {model}, "
             f"decision threshold {_threshold_text(fair.get(THRESHOLD))}. Values in brackets are "
             f"{round(100 * float((fair.get('bootstrap') or {}).get('level', fx.DEFAULT_LEVEL)))}% bootstrap "
             "intervals. The underdiagnosis rate is the false-negative rate for disease "
             "(Seyyed-Kalantari et al., Nature Medicine 2021).")
    lines += [intro, ""]
    if fx.GROUPS in fair:
        lines += [f"Source: {fair.get(SOURCE, 'the sites')}. A site sends nothing for a group with fewer than "
                  f"{fair.get(MIN_SAMPLES, '?')} samples (k-anonymity); such a group is unavailable there. "
                  "AUC here comes from equal-width score bins (ties within a bin count one half), so it reads "
                  "lower than the exact AUC when the scores crowd into a few bins.", ""]
        lines += [*_headline(fair, attribute), *_group_table(fair), "", *_suppressed_note(fair)]
    central = fair.get(CENTRAL)
    if central:
        if fx.GROUPS not in fair:
            lines += _headline(central, attribute)
        lines += [f"The same, {central.get(SOURCE, 'per sample')}:", "", *_group_table(central), ""]
    lines += ["## Fairness gaps", "", "Worst group per metric (lowest AUC, accuracy or TPR; highest FPR or "
              "underdiagnosis rate) and the gap between the best and worst group; equalized-odds difference = "
              "max(TPR gap, FPR gap); demographic-parity difference = gap in predicted-positive rate.", ""]
    if fx.GROUPS in fair:
        lines += [*_gap_table(fair), ""]
    if central:
        lines += [f"The same, {central.get(SOURCE, 'per sample')}:", "", *_gap_table(central), ""]
    lines += _site_section(fair.get(SITES) or {})
    return lines


def _site_section(sites: Mapping[str, Any]) -> list[str]:
    if not sites:
        return []
    rows = []
    for site in sorted(sites, key=_natural_key):
        for name, entry in (sites[site].get(fx.GROUPS) or {}).items():
            if entry.get(fx.SUPPRESSED_AT):
                rows.append([site, name, "suppressed", *(["n/a"] * len(SITE_COLUMNS))])
                continue
            ci = entry.get(fx.CI) or {}
            rows.append([site, name, _fmt_count(entry.get(fx.N)),
                         *(_with_ci(entry.get(key), ci.get(key)) for _, key in SITE_COLUMNS)])
    return ["## Fairness by site and group", "", *_md_table(["site", "group", "n", *(h for h, _ in SITE_COLUMNS)],
                                                            rows), ""]


# ---------------------------------------------------------------------------
# Over rounds
# ---------------------------------------------------------------------------
def _round_record(record: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((record.get(FAIRNESS) or {}).get(REPORTED_SPLIT)) or {}


def group_series(rounds: Sequence[Mapping[str, Any]], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per group, (rounds, values) of ``metric`` in the pooled test fairness record of each round."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, record in enumerate(rounds):
        for name, entry in (_round_record(record).get(fx.GROUPS) or {}).items():
            value = _number(entry.get(metric))
            if value is not None:
                xs, ys = out.setdefault(name, ([], []))
                xs.append(record.get("round", i + 1))
                ys.append(value)
    return out


def gap_series(rounds: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """(rounds, values) of the TPR and AUC gaps and the equalized-odds and demographic-parity differences."""
    getters = [(label, lambda g, k=key: (g.get(k) or {}).get(fx.GAP)) for label, key in GAP_SERIES]
    getters += [("equalized-odds difference", lambda g: g.get(fx.EQUALIZED_ODDS)),
                ("demographic-parity difference", lambda g: g.get(fx.DEMOGRAPHIC_PARITY))]
    out: dict[str, tuple[list[int], list[float]]] = {}
    for label, get in getters:
        points = [(r.get("round", i + 1), _number(get(_round_record(r).get(fx.GAPS) or {})))
                  for i, r in enumerate(rounds)]
        kept = [(x, y) for x, y in points if y is not None]
        if kept:
            out[label] = ([x for x, _ in kept], [y for _, y in kept])
    return out


def plot_lines(series: Mapping[str, tuple[Sequence[int], Sequence[float]]], out_png: Path, title: str,
               ylabel: str) -> Path:
    """One line per series over rounds, in the report's plot style (110 dpi PNG)."""
    if not series:
        raise ValueError(f"nothing to plot for {title!r}: every series is empty.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_PLOT_SIZE_IN)
    try:
        for i, (label, (xs, ys)) in enumerate(series.items()):  # lines that coincide stay visible
            ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], linestyle="-" if i % 2 == 0 else "--",
                    linewidth=1.5, label=label)
        finish_round_plot(fig, ax, out_png, ylabel, title)
    finally:
        plt.close(fig)
    return out_png


def _round_plots(run_dir: Path, rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    plots = [(TPR_PLOT, group_series(rounds, fx.TPR), "TPR"), (AUC_PLOT, group_series(rounds, fx.AUC), "AUC"),
             (GAPS_PLOT, gap_series(rounds), "gap")]
    lines = []
    for (file_name, title), series, ylabel in plots:
        if series:
            plot_lines(series, run_dir / file_name, title, ylabel)
            lines += [f"![{title}]({file_name})", ""]
    if not lines:
        return []
    thresholds = sorted({_fmt((r.get(FAIRNESS) or {}).get(THRESHOLD), 3) for r in rounds if r.get(FAIRNESS)})
    return ["## Fairness over rounds", "",
            f"Pooled test metrics per group after each round, at the threshold the sites applied then "
            f"({', '.join(thresholds)}).", "", *lines]


def fairness_sections(run_dir: Path, summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's fairness sections; empty when the run has no per-group metrics."""
    fair = summary.get(FAIRNESS)
    lines = _summary_sections(fair) if isinstance(fair, Mapping) else []
    return [*lines, *_round_plots(Path(run_dir), rounds)]

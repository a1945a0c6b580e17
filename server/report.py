"""Human-readable report of a finished run directory (``report.md`` plus PNG plots).

Reads what the server writes into ``RUN_DIR``:

* ``metrics.jsonl``: one JSON object per round (time, bytes, aggregated train metrics, pooled
  validation metrics, central test metrics, per-site metrics, failures);
* ``summary.json``: mode, strategy, the selected round and threshold, final test metrics,
  per-site metrics, config, dataset and wall time; per-group fairness when the data has groups
  (its sections are written by :mod:`medfed.server.report_fairness`).

matplotlib is imported inside the plotting function only, so importing this module stays fast.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.common import metrics as mk
from medfed.common.constants import MetricKey
from medfed.common.report_html import write_report_html
from medfed.server.report_format import (
    PLOT_SIZE_IN as _PLOT_SIZE_IN,
    finish_round_plot,
    fmt as _fmt,
    fmt_bytes as _fmt_bytes,
    fmt_count as _fmt_count,
    md_table as _md_table,
    natural_key as _natural_key,
    number as _number,
)

logger = logging.getLogger(__name__)

# Files in a run directory.
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"

# Plots written beside report.md: (per-site metric key, file name, title).
PLOTS = (
    ("val-auc", "site_val_auc.png", "Validation AUC by round"),
    ("test-auc", "site_test_auc.png", "Test AUC by round"),
    ("val-dice", "site_val_dice.png", "Validation Dice by round"),
    ("test-dice", "site_test_dice.png", "Test Dice by round"),
    ("train-loss", "train_loss.png", "Training loss by round"),
    ("epsilon", "site_epsilon.png", "Privacy spent (epsilon) per site by round"),
)

# Sections of a metrics.jsonl record that hold the pooled/global value of "<section>-<metric>".
_GLOBAL_SECTIONS = {"train": "aggregated train", "val": "pooled validation", "test": "global model, central test"}

# Final test metrics shown in the report, in this order, by task.
TEST_METRICS = (mk.AUC, mk.ACCURACY, mk.BALANCED_ACCURACY, mk.SENSITIVITY, mk.SPECIFICITY)
TASK_TEST_METRICS = {
    "classification": TEST_METRICS,
    "segmentation": ("dice", "hd95", "hd95-count", "loss"),
    "generation": ("tstr_auc", "trtr_auc", "fid", "d-loss", "d-accuracy"),
}

# Per-site columns: (header, candidate keys in a site's metrics, first found wins, is a count).
SITE_COLUMNS = (
    ("n train", ("train-num-examples", mk.NUM_EXAMPLES), True),
    ("val-auc", ("val-auc",), False),
    ("test-auc", ("test-auc",), False),
    ("test-accuracy", ("test-accuracy",), False),
)
TASK_SITE_COLUMNS = {
    "classification": SITE_COLUMNS,
    "segmentation": (
        ("n train", ("train-num-examples", mk.NUM_EXAMPLES), True),
        ("val-dice", ("val-dice",), False),
        ("test-dice", ("test-dice",), False),
        ("test-hd95", ("test-hd95",), False),
    ),
    "generation": (
        ("n train", ("train-num-examples", mk.NUM_EXAMPLES), True),
        ("val-d-loss", ("val-d-loss",), False),
        ("val-d-accuracy", ("val-d-accuracy",), False),
    ),
}


def _site_columns(summary: Mapping[str, Any]) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    return TASK_SITE_COLUMNS.get(str(summary.get("task", "classification")), SITE_COLUMNS)



# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def _required_file(run_dir: Path | str, name: str, written_by: str) -> Path:
    """Path of ``name`` in ``run_dir``; FileNotFoundError saying what writes it when missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. {name} is {written_by}; check that run_dir points at a run directory "
            "and that the run got that far."
        )
    return path


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Per-round records from ``RUN_DIR/metrics.jsonl``, in file order.

    A truncated last line (the server was stopped while writing) is skipped with a warning; an
    unreadable line before the last one raises ValueError, since the file is then corrupt.
    """
    path = _required_file(run_dir, METRICS_FILE, "written by the server after every round")
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                logger.warning("Skipping truncated last line %d of %s (%s).", number, path, error)
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({error}); the file is corrupt.") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} must be a JSON object (one round); got {type(record).__name__}.")
        records.append(record)
    return records


def read_summary(run_dir: Path | str) -> dict[str, Any]:
    """The run summary from ``RUN_DIR/summary.json``."""
    path = _required_file(run_dir, SUMMARY_FILE, "written by the server when the run finishes")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run or restore the file.") from error
    if not isinstance(summary, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(summary).__name__}.")
    return summary


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------
def _first(metrics: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The value of the first key present in ``metrics``, else None."""
    return next((metrics[key] for key in keys if key in metrics), None)


# ---------------------------------------------------------------------------
# Series and plots
# ---------------------------------------------------------------------------
def _site_ids(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    ids = {site for record in rounds for site in (record.get("sites") or {})}
    return sorted(ids, key=_natural_key)


def _site_series(rounds: Sequence[Mapping[str, Any]], site: str, metric: str) -> tuple[list[int], list[float]]:
    points = [
        (record.get("round", i + 1), _number((record.get("sites") or {}).get(site, {}).get(metric)))
        for i, record in enumerate(rounds)
    ]
    kept = [(r, v) for r, v in points if v is not None]
    return [r for r, _ in kept], [v for _, v in kept]


def _global_series(rounds: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[int], list[float], str]:
    """Pooled/global values of ``<section>-<key>`` (e.g. val-auc -> record["val"]["auc"])."""
    section, _, key = metric.partition("-")
    if section not in _GLOBAL_SECTIONS or not key:
        return [], [], ""
    points = [(record.get("round", i + 1), _number((record.get(section) or {}).get(key))) for i, record in enumerate(rounds)]
    kept = [(r, v) for r, v in points if v is not None]
    return [r for r, _ in kept], [v for _, v in kept], _GLOBAL_SECTIONS[section]


def has_metric(rounds: Sequence[Mapping[str, Any]], metric: str) -> bool:
    """True when any site or the pooled/global record has a value of ``metric`` in some round."""
    if _global_series(rounds, metric)[1]:
        return True
    return any(_site_series(rounds, site, metric)[1] for site in _site_ids(rounds))


def plot_site_metrics(rounds: list[dict[str, Any]], metric: str, out_png: Path, title: str | None = None) -> Path:
    """Plot ``metric`` (a per-site key such as ``val-auc``) by round: one line per site, plus the
    pooled/global value dashed; write it to ``out_png`` (110 dpi) and return the path."""
    if not has_metric(rounds, metric):
        raise ValueError(
            f"no values of metric {metric!r} in the {len(rounds)} round records; "
            "use a per-site key such as 'val-auc', 'test-auc' or 'train-loss'."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=_PLOT_SIZE_IN)
    try:
        for site in _site_ids(rounds):
            xs, ys = _site_series(rounds, site, metric)
            if ys:
                ax.plot(xs, ys, marker="o", linewidth=1.5, label=site)
        xs, ys, label = _global_series(rounds, metric)
        if ys:
            ax.plot(xs, ys, linestyle="--", marker="s", color="black", linewidth=2.0, label=label)
        finish_round_plot(fig, ax, out_png, metric, title or f"{metric} by round")
    finally:
        plt.close(fig)
    logger.debug("Wrote %s", out_png)
    return out_png


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def _round_sites(rounds: Sequence[Mapping[str, Any]], selected: Any) -> Mapping[str, Any]:
    """Per-site metrics of the selected round's record, else of the last record."""
    chosen = next((record for record in rounds if record.get("round") == selected), rounds[-1] if rounds else {})
    return chosen.get("sites") or {}


def _site_rows(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]] = ()) -> list[list[str]]:
    """One row per site: the summary's site metrics, completed by the selected round's record."""
    from_round = _round_sites(rounds, summary.get("selected-round"))
    from_summary = summary.get("sites") or {}
    rows = []
    for site in sorted({*from_round, *from_summary}, key=_natural_key):
        merged = {**from_round.get(site, {}), **from_summary.get(site, {})}
        cells = [_fmt_count(_first(merged, keys)) if count else _fmt(_first(merged, keys))
                 for _, keys, count in _site_columns(summary)]
        rows.append([site, *cells])
    return rows


def format_site_table(summary: Mapping[str, Any]) -> str:
    """Per-site metrics of a summary as a plain-text table with aligned columns (for the CLI)."""
    rows = _site_rows(summary)
    if not rows:
        return "(no per-site metrics in the summary)"
    header = ["site"] + [name for name, _, _ in _site_columns(summary)]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


# ---------------------------------------------------------------------------
# Report sections
# ---------------------------------------------------------------------------
def _dataset_text(dataset: Any) -> str:
    if isinstance(dataset, Mapping):
        return ", ".join(f"{key}={value}" for key, value in dataset.items()) or "n/a"
    return str(dataset) if dataset else "n/a"


def _overview(run_dir: Path, summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"# Run report: {run_dir.name}",
        "",
        f"- Task: {summary.get('task', 'classification')}",
        f"- Mode: {summary.get('mode', 'n/a')}",
        f"- Strategy: {summary.get('strategy', 'n/a')}",
        f"- Rounds: {summary.get('rounds', len(rounds))} configured, {len(rounds)} recorded",
        f"- Dataset: {_dataset_text(summary.get('dataset'))}",
        f"- Sites: {', '.join(_site_ids(rounds)) or 'n/a'}",
        "",
    ]


def _selection(summary: Mapping[str, Any]) -> list[str]:
    criterion = summary.get("selection", "val-auc")
    threshold = _number(summary.get("threshold"))
    decision = (
        f"- Decision threshold: **{threshold:.3f}**, chosen on the pooled validation score histograms of "
        "that round (maximising sensitivity + specificity - 1, i.e. balanced accuracy)."
        if threshold is not None
        else "- Decision: the most probable class (argmax); no threshold was chosen."
    )
    return [
        "## Model selection",
        "",
        f"- Selected round: **{_fmt(summary.get('selected-round'))}**, the round with the best `{criterion}` "
        "on the pooled validation data.",
        decision,
        "- Both choices use validation data only, never test data; the test metrics below are measured "
        "once, on the selected model at that threshold.",
        "",
    ]


def _test_table(summary: Mapping[str, Any]) -> list[str]:
    selected = summary.get("test") or {}
    final = summary.get("final-round-test") or {}
    header = ["metric", f"selected round ({_fmt(summary.get('selected-round'))})"]
    if final:
        header.append("final round")
    keys = TASK_TEST_METRICS.get(str(summary.get("task", "classification")), TEST_METRICS)
    rows = [[key, _fmt(selected.get(key))] + ([_fmt(final.get(key))] if final else []) for key in keys]
    source = summary.get("test-source") or {}
    lines = ["## Test metrics", ""]
    if source.get("note"):
        counts = ", ".join(f"{site} n={n}" for site, n in (source.get("sites") or {}).items())
        lines += [f"Measured on {source['note']}" + (f"; each site's test samples: {counts}" if counts else "") + ".",
                  ""]
    if not selected:
        return lines + ["No test metrics: " + str((summary.get("outcome") or {}).get("reason") or
                                                  "no site reported any") + ".", ""]
    return lines + [*_md_table(header, rows), ""]


def _site_table(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = _site_rows(summary, rounds)
    if not rows:
        return ["## Sites", "", "No per-site metrics were recorded.", ""]
    header = ["site"] + [name for name, _, _ in _site_columns(summary)]
    return ["## Sites", "", *_md_table(header, rows), ""]


def _totals(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    def total(section: str, key: str) -> float:
        return sum(_number((record.get(section) or {}).get(key)) or 0.0 for record in rounds)

    rows = [
        ["wall time (run)", f"{_fmt(summary.get('wall-s'), 1)} s"],
        ["rounds (sum)", f"{total('time', 'round-s'):.1f} s"],
        ["training (sum)", f"{total('time', 'train-s'):.1f} s"],
        ["evaluation (sum)", f"{total('time', 'evaluate-s'):.1f} s"],
        ["bytes sent", _fmt_bytes(total("bytes", "sent"))],
        ["bytes received", _fmt_bytes(total("bytes", "received"))],
    ]
    return ["## Time and traffic", "", *_md_table(["total", "value"], rows), ""]


def _failures(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = [
        [record.get("round", "?"), failure.get("site") or "unknown", failure.get("node", "?"), failure.get("reason", "")]
        for record in rounds
        for failure in record.get("failures") or []
    ]
    if not rows:
        return ["## Failures", "", "No site failures.", ""]
    return ["## Failures", "", *_md_table(["round", "site", "node", "reason"], rows), ""]


def _privacy(summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    """ε spent per site per round (record-level DP at the sites), when the study used it."""
    if not has_metric(rounds, MetricKey.EPSILON.value):
        return []
    sites = _site_ids(rounds)
    final = summary.get("sites") or {}
    budgets = [_fmt(final.get(s, {}).get(MetricKey.EPSILON_BUDGET.value), 3) for s in sites]
    deltas = {final.get(s, {}).get(MetricKey.DELTA.value) for s in sites} - {None}
    lines = ["## Privacy (record-level DP-SGD at each site)", "",
             f"Epsilon spent by each site after each round it trained (delta {', '.join(map(str, sorted(deltas))) or '?'}); "
             "the sites' own ledgers hold the authoritative values.", ""]
    table = [[str(r.get("round")), *(_fmt((r.get("sites") or {}).get(s, {}).get(MetricKey.EPSILON.value), 3) for s in sites)]
             for r in rounds]
    table.append(["budget", *budgets])
    return [*lines, *_md_table(["round", *sites], table), ""]


def _plots(run_dir: Path, rounds: list[dict[str, Any]]) -> list[str]:
    lines = ["## Plots", ""]
    for metric, file_name, title in PLOTS:
        if not has_metric(rounds, metric):
            logger.info("No %s values recorded; skipping %s.", metric, file_name)
            continue
        plot_site_metrics(rounds, metric, run_dir / file_name, title=title)
        lines += [f"![{title}]({file_name})", ""]
    return lines


def write_report(run_dir: Path | str) -> Path:
    """Write ``RUN_DIR/report.md`` and its PNG plots, then ``report.html`` from it; return the ``.md`` path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the directory the server wrote.")
    from medfed.server.report_fairness import fairness_sections
    from medfed.server.report_trust import trust_sections

    summary = read_summary(run_dir)
    rounds = read_metrics(run_dir)
    lines = [
        *_overview(run_dir, summary, rounds),
        *_selection(summary),
        *_test_table(summary),
        *_site_table(summary, rounds),
        *fairness_sections(run_dir, summary, rounds),  # per-group metrics and gaps, when groups exist
        *trust_sections(run_dir, summary),  # saliency aggregates and robustness, when the study asked
        *_totals(summary, rounds),
        *_failures(rounds),
        *_privacy(summary, rounds),
        *_plots(run_dir, rounds),
    ]
    out = run_dir / REPORT_FILE
    out.write_text("\n".join(lines))
    logger.info("Wrote %s", out)
    write_report_html(out)  # report.html beside it: the same content, self-contained
    return out

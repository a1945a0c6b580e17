"""The comparison tables of a bias study: one row per cell, and the mean ± std over seeds.

Read from the study folder only (``study.json`` and each cell's ``summary.json`` or
``failed.json``), so ``medfed study table OUT`` rebuilds them at any time, also while a study
runs. Writes ``comparison.csv`` (one row per cell), ``comparison-seeds.csv`` (mean and std
over the ``seed`` values of otherwise equal cells) and ``comparison.md`` (both tables).

Fairness columns come from the summary's ``fairness`` section when the run has one (data with
group codes): the worst group's TPR on the test split and the max-min TPR gap, from the sites'
pooled per-group counts, or else from the server's own test split.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from medfed.common.atomic import atomic_write_text
from medfed.common.constants import MetricKey
from medfed.common.errors import MedfedError
from medfed.common.fairness import DISADVANTAGED, GAP, GAPS, GROUPS, TPR, WORST
from medfed.server.fairness import CENTRAL, FAIRNESS
from medfed.server.recorder import METRICS_FILE, SUMMARY_FILE
from medfed.simulations.study import CELLS_DIR, FAILED_FILE, PLAN_FILE

log = logging.getLogger(__name__)

CSV_FILE, SEEDS_CSV_FILE, MD_FILE = "comparison.csv", "comparison-seeds.csv", "comparison.md"
SEED_KEY = "seed"

TEST_METRICS = (MetricKey.AUC.value, MetricKey.ACCURACY.value, MetricKey.BALANCED_ACCURACY.value)
EPSILON_COL = "epsilon-max"  # largest epsilon spent over the sites
FAIR_COLS = ("worst-group-tpr", "tpr-gap")
NUMERIC = (*TEST_METRICS, EPSILON_COL, *FAIR_COLS)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def fairness_columns(summary: dict[str, Any]) -> dict[str, Any]:
    """Worst-group TPR, the max-min TPR gap and the disadvantaged group, when the summary has them."""
    section = summary.get(FAIRNESS)
    if not isinstance(section, dict):
        return {}
    for record in (section, section.get(CENTRAL)):
        if not isinstance(record, dict):
            continue
        tpr = (record.get(GAPS) or {}).get(TPR) if isinstance(record.get(GAPS), dict) else None
        worst, gap = (_finite(tpr.get(WORST)), _finite(tpr.get(GAP))) if isinstance(tpr, dict) else (None, None)
        if worst is None and isinstance(record.get(GROUPS), dict):  # no gaps given: from the groups
            values = [v for g in record[GROUPS].values() if isinstance(g, dict)
                      for v in [_finite(g.get(TPR))] if v is not None]
            if values:
                worst, gap = min(values), (max(values) - min(values) if len(values) > 1 else None)
        if worst is not None:
            group = record.get(DISADVANTAGED)
            return {"worst-group-tpr": worst, "tpr-gap": gap,
                    "disadvantaged-group": group if isinstance(group, str) else ""}
    return {}


def _epsilon(summary: dict[str, Any]) -> float | None:
    sites = summary.get("sites")
    values = [v for row in sites.values() if isinstance(row, dict)
              for v in [_finite(row.get(MetricKey.EPSILON.value))] if v is not None] if isinstance(sites, dict) else []
    return max(values) if values else None


def _grid_value(value: Any) -> Any:
    """A grid value as the study file writes it (true/false, null)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return value


def round_failures(run_dir: Path) -> tuple[int, int, str]:
    """(rounds in which some site trained, failed site replies over all rounds, the first reason)."""
    trained, failed, first = 0, 0, ""
    path = run_dir / METRICS_FILE
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        sites = record.get("sites") if isinstance(record, dict) else None
        if isinstance(sites, dict) and any(isinstance(r, dict) and MetricKey.NUM_EXAMPLES.value in r
                                           for r in sites.values()):
            trained += 1
        failures = record.get("failures") if isinstance(record, dict) else None
        if isinstance(failures, list):
            failed += len(failures)
            if failures and not first and isinstance(failures[0], dict):
                first = str(failures[0].get("reason", ""))
    return trained, failed, first


def cell_row(out: Path, cell: dict[str, Any], grid_keys: list[str]) -> dict[str, Any]:
    """One table row: grid values, mode, status, test metrics, epsilon, fairness, reason."""
    values = cell.get("values", {})
    row: dict[str, Any] = {"cell": cell["id"], "mode": cell["mode"]}
    row.update({k: _grid_value(values[k]) if k in values else "" for k in grid_keys})
    run_dir = out / CELLS_DIR / cell["id"]
    failed, summary_path = run_dir / FAILED_FILE, run_dir / SUMMARY_FILE
    if failed.is_file():
        try:
            reason = str(json.loads(failed.read_text(encoding="utf-8")).get("reason", ""))
        except (OSError, ValueError, AttributeError):
            reason = "unreadable failed.json"
        return {**row, "status": "failed", "reason": reason}
    if not summary_path.is_file():
        return {**row, "status": "not run", "reason": ""}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        test = summary.get("test") or {}
    except (OSError, ValueError, AttributeError) as exc:
        return {**row, "status": "failed", "reason": f"unreadable summary.json ({exc})"}
    row.update({"status": "ok", **{m: _finite(test.get(m)) for m in TEST_METRICS}, EPSILON_COL: _epsilon(summary)})
    row.update(fairness_columns(summary))
    trained, failed_replies, first = round_failures(run_dir)
    row["reason"] = f"{failed_replies} failed site replies (first: {first})" if failed_replies else ""
    if cell["mode"] == "federated" and not trained:
        row.update({"status": "failed", "reason": f"no site trained in any round: {first}"})
    row["wall-s"] = _finite(summary.get("wall-s"))
    return row


def read_rows(out: Path) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(study name, grid keys, one row per planned cell) from a study folder."""
    plan_path = out / PLAN_FILE
    if not plan_path.is_file():
        raise MedfedError(f"{out} is not a study folder: no {PLAN_FILE} (written by medfed study run)")
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        name, grid_keys, cells = str(plan["name"]), list(plan["grid-keys"]), list(plan["cells"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MedfedError(f"{plan_path} is not a valid study plan ({exc}): rerun medfed study run") from exc
    return name, grid_keys, [cell_row(out, c, grid_keys) for c in cells]


def seed_rows(grid_keys: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (n-1) over seeds of the finished cells that differ only in ``seed``."""
    keys = ["mode", *(k for k in grid_keys if k != SEED_KEY)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        ok = [r for r in members if r["status"] == "ok"]
        agg: dict[str, Any] = {k: members[0].get(k, "") for k in keys}
        agg["seeds-ok"] = f"{len(ok)}/{len(members)}"
        for metric in NUMERIC:
            vals = [r[metric] for r in ok if isinstance(r.get(metric), float)]
            agg[f"{metric}-mean"] = statistics.fmean(vals) if vals else None
            agg[f"{metric}-std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if r.get(c) is None else r.get(c)) for c in columns} for r in rows)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _columns(grid_keys: list[str], rows: list[dict[str, Any]]) -> list[str]:
    fair = [c for c in (*FAIR_COLS, "disadvantaged-group") if any(r.get(c) not in (None, "") for r in rows)]
    return ["cell", "mode", *grid_keys, "status", *TEST_METRICS, EPSILON_COL, *fair, "wall-s", "reason"]


def write_tables(out: str | Path) -> tuple[Path, Path, Path]:
    """Write comparison.csv, comparison-seeds.csv and comparison.md for the study folder ``out``."""
    out = Path(out)
    name, grid_keys, rows = read_rows(out)
    columns = _columns(grid_keys, rows)
    seeds = seed_rows(grid_keys, rows)
    seed_keys = ["mode", *(k for k in grid_keys if k != SEED_KEY)]
    metrics = [m for m in NUMERIC if m in columns]
    seed_columns = [*seed_keys, "seeds-ok", *(f"{m}-{s}" for m in metrics for s in ("mean", "std"))]
    csv_path, seeds_path, md_path = out / CSV_FILE, out / SEEDS_CSV_FILE, out / MD_FILE
    atomic_write_text(csv_path, _csv(rows, columns))
    atomic_write_text(seeds_path, _csv(seeds, seed_columns))

    def mean_std(row: dict[str, Any], m: str) -> str:
        mean, std = row.get(f"{m}-mean"), row.get(f"{m}-std")
        return _fmt(mean) if std is None or mean is None else f"{mean:.3f} ± {std:.3f}"

    md = [f"# Study {name}\n", f"{len(rows)} cells; test metrics of the model chosen on validation; "
          f"{EPSILON_COL}: the largest ε spent by a site (– without DP; baselines have no DP). Local: the "
          "mean over the sites' own models.\n", "## Cells\n",
          _markdown(columns, [[_fmt(r.get(c)) for c in columns] for r in rows]),
          "\n## Mean ± std over seeds\n",
          _markdown([*seed_keys, "seeds ok", *metrics],
                    [[_fmt(r.get(k)) for k in seed_keys] + [r["seeds-ok"]] + [mean_std(r, m) for m in metrics]
                     for r in seeds])]
    atomic_write_text(md_path, "\n".join(md))
    return csv_path, seeds_path, md_path

"""What each simulated site holds: counts per site x split x label x group, as JSON, markdown, PNG.

- :func:`summarize_partition` is pure: a :class:`FederatedData` (plus optional settings)
  to a JSON-able dict.
- :func:`format_partition_markdown` and :func:`plot_partition` render that dict.
- :func:`write_partition_summary` writes ``partition.json``, ``partition.md`` and
  ``partition.png`` into a run directory; :func:`write_study_partition` does so for a
  study config (called once when a simulation starts; a deployed server has no data).

Summary layout (counts are lists aligned with ``label_names`` / ``group_values``)::

    {"dataset": ..., "label_names": [...], "group_name": ... | None, "group_values": [...],
     "settings": {...},
     "sites": [{"site": "site-0", "splits": {"train": SPLIT, "val": SPLIT, "test": SPLIT}}],
     "totals": {"train": SPLIT, ...}}
    SPLIT = {"n": int, "labels": [int], "groups": [int] | None,
             "label_by_group": [[int]] | None, "mean": float, "std": float}

``mean`` / ``std`` are of the input values (pixel intensities), so acquisition shift shows.
matplotlib is imported inside :func:`plot_partition` only.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.atomic import atomic_write_bytes, atomic_write_text
from medfed.common.data.splits import FederatedData

__all__ = [
    "PARTITION_JSON",
    "PARTITION_MD",
    "PARTITION_PNG",
    "format_partition_markdown",
    "partition_settings",
    "plot_partition",
    "summarize_partition",
    "write_partition_summary",
    "write_study_partition",
]

log = logging.getLogger(__name__)

PARTITION_JSON = "partition.json"
PARTITION_MD = "partition.md"
PARTITION_PNG = "partition.png"
SPLITS = ("train", "val", "test")
_PLOT_DPI = 110


def summarize_partition(fed: FederatedData, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Counts per site x split x label x group (see module docstring); raises ValueError
    for data without class labels (segmentation masks)."""
    info = fed.info
    num_groups = len(info.group_values)
    sites = []
    for site in fed.sites:
        splits = {name: _split_counts(getattr(site, name), info.num_classes, num_groups) for name in SPLITS}
        sites.append({"site": site.site_id, "splits": splits})
    totals = {name: _sum_counts([s["splits"][name] for s in sites]) for name in SPLITS}
    return {
        "dataset": info.name,
        "label_names": list(info.label_names),
        "group_name": info.group_name,
        "group_values": list(info.group_values),
        "settings": _plain(dict(settings or {})),
        "sites": sites,
        "totals": totals,
    }


def format_partition_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown page: one row per site and split, then label x group per site."""
    labels, groups = summary["label_names"], summary["group_values"]
    lines = [f"# Partition: {summary['dataset']}, {len(summary['sites'])} sites", ""]
    if summary.get("settings"):
        lines += [", ".join(f"{k}={_fmt(v)}" for k, v in summary["settings"].items()
                            if k != "scanners"), ""]
    head = ["site", "split", "n", *labels, *(f"{summary['group_name']}={g}" for g in groups), "mean", "std"]
    lines += [_row(head), _row(["---"] * len(head))]
    rows = [(s["site"], s["splits"]) for s in summary["sites"]] + [("all", summary["totals"])]
    for site, splits in rows:
        for name in SPLITS:
            c = splits[name]
            lines.append(_row([site, name, c["n"], *c["labels"], *(c["groups"] or []),
                               f"{c['mean']:.3f}", f"{c['std']:.3f}"]))
    if groups:
        cells = [f"{lab}/{g}" for lab in labels for g in groups]
        lines += ["", f"## label x {summary['group_name']} (train + val + test)", "",
                  _row(["site", *cells]), _row(["---"] * (len(cells) + 1))]
        for site, splits in rows:
            total = np.sum([splits[name]["label_by_group"] for name in SPLITS], axis=0)
            lines.append(_row([site, *total.reshape(-1).tolist()]))
    scanners = (summary.get("settings") or {}).get("scanners")
    if scanners:
        keys = list(scanners[0])
        lines += ["", "## scanners (acquisition shift)", "", _row(["site", *keys]),
                  _row(["---"] * (len(keys) + 1))]
        for s, prof in zip(summary["sites"], scanners):
            lines.append(_row([s["site"], *(prof[k] for k in keys)]))
    return "\n".join(lines) + "\n"


def plot_partition(summary: Mapping[str, Any]) -> bytes:
    """PNG bytes: stacked counts per site, by label (top row) and by group (bottom row, when
    the data has groups), one column per split."""
    from matplotlib.figure import Figure

    sites = [s["site"] for s in summary["sites"]]
    rows = [("labels", summary["label_names"], "label")]
    if summary["group_values"]:
        rows.append(("groups", summary["group_values"], summary["group_name"]))
    fig = Figure(figsize=(4.2 * len(SPLITS) + 1.2, 3.2 * len(rows)))
    axes = fig.subplots(len(rows), len(SPLITS), squeeze=False)
    x = np.arange(len(sites))
    for r, (key, names, what) in enumerate(rows):
        for c, split in enumerate(SPLITS):
            ax = axes[r][c]
            counts = np.array([s["splits"][split][key] for s in summary["sites"]]).reshape(len(sites), -1)
            bottom = np.zeros(len(sites))
            for j, name in enumerate(names):
                ax.bar(x, counts[:, j], bottom=bottom, label=str(name), color=f"C{j % 10}")
                bottom += counts[:, j]
            ax.set_title(f"{split}: by {what}", fontsize="medium")
            step = max(1, len(sites) // 12)
            ax.set_xticks(x[::step], [sites[i] for i in x[::step]], rotation=45, ha="right", fontsize="small")
            ax.set_ylabel("samples")
            ax.grid(axis="y", alpha=0.3)
            if c == len(SPLITS) - 1:
                ax.legend(fontsize="small", title=what, title_fontsize="small",
                          loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{summary['dataset']}: samples per site")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PLOT_DPI)
    return buf.getvalue()


def write_partition_summary(fed: FederatedData, run_dir: Path | str,
                            settings: Mapping[str, Any] | None = None) -> list[Path]:
    """Write partition.json, partition.md and partition.png into ``run_dir``; return the paths."""
    run_dir = Path(run_dir)
    summary = summarize_partition(fed, settings)
    paths = [run_dir / PARTITION_JSON, run_dir / PARTITION_MD, run_dir / PARTITION_PNG]
    atomic_write_text(paths[0], json.dumps(summary, indent=1) + "\n")
    atomic_write_text(paths[1], format_partition_markdown(summary))
    try:
        png = plot_partition(summary)
    except Exception as exc:  # noqa: BLE001 - a plot problem must not stop the study
        log.warning("partition plot not written (%s: %s); partition.json and .md are", type(exc).__name__, exc)
        return paths[:2]
    atomic_write_bytes(paths[2], lambda fh: fh.write(png))
    log.info("partition summary: %s", paths[1])
    return paths


def partition_settings(cfg: Any) -> dict[str, Any]:
    """The partition keys of a StudyConfig that matter for its scheme (and the scanners)."""
    out: dict[str, Any] = {"dataset": cfg.dataset, "num-sites": cfg.num_sites, "partition": cfg.partition,
                           "seed": cfg.seed}
    if cfg.partition == "dirichlet":
        out["alpha"] = cfg.alpha
    if cfg.partition == "quantity":
        out["quantity-exponent"] = cfg.quantity_exponent
    if cfg.partition == "demographic":
        out["group-proportions"] = cfg.group_proportions or "default spread"
    if cfg.min_site_size != 2:
        out["min-site-size"] = cfg.min_site_size
    if cfg.shift != "none":
        from medfed.common.data.shift import scanner_profiles

        out.update({"shift": cfg.shift, "shift-strength": cfg.shift_strength})
        out["scanners"] = [p.as_dict() for p in scanner_profiles(cfg.num_sites, cfg.seed, cfg.shift_strength)]
    return out


def write_study_partition(cfg: Any, fed: FederatedData | None = None) -> list[Path]:
    """Write the partition summary of study ``cfg`` into its run directory (``cfg.out_dir``).

    Segmentation studies (masks, not labels) write nothing. ``fed`` defaults to the
    study's (cached) data.
    """
    if cfg.task == "segmentation":
        return []
    if fed is None:
        from medfed.common.data.federated import load_study_data

        fed = load_study_data(cfg)
    return write_partition_summary(fed, cfg.out_dir, partition_settings(cfg))


# ---------------------------------------------------------------------------- helpers


def _split_counts(split: Any, num_classes: int, num_groups: int) -> dict[str, Any]:
    labels = getattr(split, "labels", None)
    if labels is None:
        raise ValueError(f"{type(split).__name__} has no class labels: a partition summary counts labels")
    labels = np.asarray(labels, dtype=np.int64)
    groups = getattr(split, "groups", None)
    out: dict[str, Any] = {"n": int(len(labels)), "labels": np.bincount(labels, minlength=num_classes).tolist()}
    if groups is not None and num_groups:
        groups = np.asarray(groups, dtype=np.int64)
        out["groups"] = np.bincount(groups, minlength=num_groups).tolist()
        cross = np.bincount(labels * num_groups + groups, minlength=num_classes * num_groups)
        out["label_by_group"] = cross.reshape(num_classes, num_groups).tolist()
    else:
        out["groups"] = None
        out["label_by_group"] = None
    x = np.asarray(getattr(split, "images", np.zeros(0)), dtype=np.float64)
    out["mean"] = round(float(x.mean()), 5) if x.size else 0.0
    out["std"] = round(float(x.std()), 5) if x.size else 0.0
    return out


def _sum_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(p["n"] for p in parts)
    out: dict[str, Any] = {"n": n}
    for key in ("labels", "groups", "label_by_group"):
        vals = [p[key] for p in parts]
        out[key] = None if any(v is None for v in vals) else np.sum(vals, axis=0).tolist()
    weights = [p["n"] for p in parts]
    if n:  # pooled mean and std from per-part moments
        mean = sum(w * p["mean"] for w, p in zip(weights, parts)) / n
        second = sum(w * (p["std"] ** 2 + p["mean"] ** 2) for w, p in zip(weights, parts)) / n
        out["mean"], out["std"] = round(mean, 5), round(float(np.sqrt(max(second - mean**2, 0.0))), 5)
    else:
        out["mean"] = out["std"] = 0.0
    return out


def _plain(value: Any) -> Any:
    """JSON-able copy: tuples to lists, numpy scalars to Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"

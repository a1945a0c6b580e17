"""``medfed robustness``: how a trained classifier holds up under white-box adversarial attacks, at a site.

It reads one site's data (a ``site.yaml``, a MedMNIST ``.npz`` partitioned as a simulation does,
or by default the study data named in the checkpoint's config), attacks the val or test images
with FGSM and PGD (:mod:`medfed.common.robustness`) at each L-infinity strength, prints accuracy,
AUC and sensitivity (per group too, for groups of at least ``MIN_GROUP_SAMPLES`` images) and, with
``--out DIR``, writes ``robustness.json`` (aggregates only) and ``robustness.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from medfed.client.checkpoint_site import (
    add_site_source_arguments,
    check_fits,
    clean_json,
    decision_threshold,
    site_data,
    study_config,
)
from medfed.common.constants import MIN_GROUP_SAMPLES, SPLITS
from medfed.common.errors import ConfigError, DataError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

REPORT_NAME = "robustness.json"
PLOT_NAME = "robustness.png"
DEFAULT_ATTACKS = "fgsm,pgd"
DEFAULT_EPS = "0.5,1,2,4,8"
ATTACK_SEED = 0


def add_robustness_arguments(subparsers: Any) -> None:
    """``medfed robustness`` on the top-level command's subparsers."""
    p = subparsers.add_parser(
        "robustness", help="adversarial robustness of a trained classifier on one site's data",
        description="Attack a trained image classifier with white-box L-infinity attacks (FGSM, Goodfellow et "
        "al. 2015; PGD, Madry et al. 2018) on one site's val or test images, using their true labels, and "
        "report accuracy, AUC and sensitivity at each strength, per group too (groups of at least "
        f"{MIN_GROUP_SAMPLES} images). A white-box attack is a worst case, not a model of real noise.",
    )
    add_site_source_arguments(p)
    p.add_argument("--attack", default=DEFAULT_ATTACKS,
                   help=f"comma-separated attacks: fgsm, pgd (default {DEFAULT_ATTACKS})")
    p.add_argument("--eps", default=DEFAULT_EPS,
                   help=f"comma-separated L-infinity strengths, in units of 1/EPS_SCALE (default {DEFAULT_EPS})")
    p.add_argument("--eps-scale", type=float, default=255.0,
                   help="the unit of --eps: 255 (default) reads 2 as 2/255 of the [0, 1] pixel range; "
                   "1 reads --eps on the [0, 1] scale")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (default 10; step size 2.5 * eps / steps)")
    p.add_argument("--split", choices=SPLITS, default="test", help="the split to attack (default test)")
    p.add_argument("--threshold", type=float, default=None,
                   help="binary decision threshold (default: the checkpoint's chosen threshold, else 0.5)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"folder for {REPORT_NAME} and {PLOT_NAME} (default: print only)")
    p.set_defaults(func=cmd_robustness)


def cmd_robustness(args: argparse.Namespace) -> int:
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.privacy_audit import model_from_state
    from medfed.common.robustness.evaluate import robustness_metrics
    from medfed.common.training import resolve_device

    attacks = parse_attacks(args.attack)
    scale = parse_scale(args.eps_scale)
    eps = parse_eps(args.eps, scale)
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: PGD needs at least 1 step (default 10)")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold:g} must be in [0, 1] (a probability of the positive class)")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file: give a folder for {REPORT_NAME} and {PLOT_NAME}")
    try:
        ckpt = load_checkpoint(args.model)
    except DataError as exc:
        raise ConfigError(f"--model: {exc}") from exc
    check_classifier(ckpt.model.name)
    threshold = decision_threshold(args.threshold, ckpt.metrics, ckpt.model.num_classes)
    cfg = study_config(ckpt.config)
    model = model_from_state(ckpt.model, ckpt.state_dict)
    site, described = site_data(args, cfg, ckpt.model)
    split = getattr(site, args.split)
    check_fits(ckpt.model, split, site.site_id, args.split)
    log.info("attacking %s on %d %s images of %s (%s)", args.model, len(split), args.split, site.site_id, described)
    result = robustness_metrics(model, split, resolve_device(args.device), attacks, eps, steps=args.steps,
                                seed=ATTACK_SEED, threshold=threshold)
    report = {**result, "meta": {
        "model": str(args.model), "site": site.site_id, "split": args.split, "eps-scale": _number(scale),
        "steps": args.steps, "threshold": threshold, "data": described,
    }}
    unit = _unit(scale)
    table = format_table(report, attacks, [label for label, _ in eps], unit)
    if args.out is not None:
        png = plot_png(report, attacks, eps, scale, unit)  # everything computed before anything is written
        text = json.dumps(clean_json(report), indent=2) + "\n"
        write_outputs(args.out, text, png)
    emit(table)
    if args.out is not None:
        emit(f"report: {args.out / REPORT_NAME}, plot: {args.out / PLOT_NAME}")
    return 0


# --------------------------------------------------------------------------- arguments
def parse_attacks(text: str) -> list[str]:
    from medfed.common.robustness.attacks import ATTACKS

    names = _items(text, "--attack")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"--attack {', '.join(unknown)}: unknown attack; choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def parse_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"--eps-scale {scale:g} must be > 0: 255 (eps in 1/255 units) or 1 (the [0, 1] scale)")
    return float(scale)


def parse_eps(text: str, scale: float) -> list[tuple[str, float]]:
    """(label as typed, value on the [0, 1] scale) for each strength; ConfigError naming the bad one."""
    from medfed.common.robustness.keys import parse_radii

    return parse_radii(text, scale, "--eps")


def _items(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{flag} {text!r}: give a comma-separated list without empty entries")
    return items


def check_classifier(name: str) -> None:
    """ConfigError unless ``name`` is an image classifier (robustness needs image inputs and class scores)."""
    from medfed.common.tasks import check_image_classifier

    check_image_classifier(name, "medfed robustness")


# --------------------------------------------------------------------------- output
def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _unit(scale: float) -> str:
    return "[0, 1] scale" if scale == 1 else f"1/{_number(scale)}"


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _row(name: str, label: str, metrics: dict[str, Any]) -> str:
    return f"{name:<8}{label:>8}" + "".join(f"{_fmt(metrics[k]):>13}" for k in ("accuracy", "auc", "sensitivity"))


def _rows(result: dict[str, Any], attacks: list[str], labels: list[str]) -> list[str]:
    return [_row("clean", "", result["clean"])] + [_row(n, e, result[n][e]) for n in attacks for e in labels]


def format_table(report: dict[str, Any], attacks: list[str], labels: list[str], unit: str) -> str:
    meta = report["meta"]
    head = f"{'attack':<8}{'eps':>8}{'accuracy':>13}{'auc':>13}{'sensitivity':>13}"
    lines = [f"robustness of {meta['model']} on {meta['site']} ({meta['split']}, "
             f"{report['clean']['num-examples']} images; eps in {unit}, PGD {meta['steps']} steps)", head,
             *_rows(report, attacks, labels)]
    for code, group in report.get("groups", {}).items():
        lines += ["", f"group {code} ({group['clean']['num-examples']} images)", head, *_rows(group, attacks, labels)]
    if "groups" in report:
        lines.append(f"(groups with fewer than {MIN_GROUP_SAMPLES} images are not shown)")
    return "\n".join(lines)


def plot_png(report: dict[str, Any], attacks: list[str], eps: list[tuple[str, float]], scale: float,
             unit: str) -> bytes:
    """Accuracy against eps, one line per attack, clean accuracy dashed; PNG bytes (nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    ax = fig.subplots()
    xs = [value * scale for _, value in eps]
    for name in attacks:
        ys = [report[name][label]["accuracy"] for label, _ in eps]
        ax.plot(xs, ys, marker="o", label=name.upper())
    ax.axhline(report["clean"]["accuracy"], linestyle="--", color="grey", label="clean")
    ax.set_xlabel(f"eps (L-infinity, {unit})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"{report['meta']['site']} {report['meta']['split']}: accuracy under attack")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_outputs(out: Path, text: str, png: bytes) -> None:
    from medfed.common.atomic import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(out / PLOT_NAME, lambda fh: fh.write(png))
    atomic_write_text(out / REPORT_NAME, text)

"""Robust aggregation against one poisoned site of five, on PneumoniaMNIST. Prints a table.

Every cell is a full ``medfed simulate`` run on Flower's simulation engine (iid sites, cnn,
fixed local steps); site-0 attacks (:mod:`medfed.simulations.attacks`):

- attacks: none, sign-flip (``global - scale * (local - global)``), label-flip (1 - y);
- aggregators: fedavg, fedmedian, fedtrimmedavg (beta 0.2), krum (f=1), fedavg + update norm
  screening (``max-update-norm-ratio``; the other rows run with it off, 0, to show each
  aggregator alone), and bulyan (f=1) only when the sites are enough for it (Flower needs
  n >= 4f + 3 replies, 7 for f=1; with fewer it skips every aggregation).

Columns: test AUC of the round chosen on pooled validation and of the last round, the
difference to clean FedAvg (points), sites excluded by norm screening, and the largest
update-norm ratio (max / median) seen in any round (how far honest sites spread).

Usage:
    python bench/robust.py [--data PNEUMONIAMNIST.npz] [--rounds 6] [--local-steps 20]
        [--attacks none,sign-flip,label-flip] [--aggregators fedavg,...] [--out runs/robust/bench]

Cells of earlier calls with the same --out stay in the table (a call reruns only the cells it names).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data")) / (
    "pneumoniamnist/pneumoniamnist.npz"
)
AGGREGATORS = {  # row name -> study config keys
    "fedavg": {"strategy": "fedavg", "max-update-norm-ratio": 0.0},
    "fedmedian": {"strategy": "fedmedian", "max-update-norm-ratio": 0.0},
    "fedtrimmedavg": {"strategy": "fedtrimmedavg", "trimmed-beta": 0.2, "max-update-norm-ratio": 0.0},
    "krum": {"strategy": "krum", "num-malicious": 1, "max-update-norm-ratio": 0.0},
    "bulyan": {"strategy": "bulyan", "num-malicious": 1, "max-update-norm-ratio": 0.0},
    "fedavg+screen": {"strategy": "fedavg", "max-update-norm-ratio": 10.0},
    "fedavg+screen3": {"strategy": "fedavg", "max-update-norm-ratio": 3.0},
}
ATTACKS = ("none", "sign-flip", "label-flip")


class _NormLog(logging.Handler):
    """Collects the per-round 'update norms' lines of medfed.server.replies (ServerApp in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ratios: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("update norms:") and isinstance(record.args, tuple):
            self.ratios.append(float(record.args[2]))


def run_cell(data: Path, out: Path, attack: str, aggregator: str, args: argparse.Namespace) -> dict:
    from medfed.common.config import parse_study_config
    from medfed.simulations.attacks import parse_attack
    from medfed.simulations.engine import run_on_simulation_engine

    run_dir = out / f"{attack}__{aggregator}"
    summary_path = run_dir / "summary.json"
    keys = {"dataset": "medmnist", "data-path": str(data), "num-sites": args.sites, "min-sites": args.min_sites,
            "partition": "iid", "model": "cnn", "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "batch-size": args.batch_size, "lr": args.lr, "seed": args.seed, "out-dir": str(run_dir),
            **AGGREGATORS[aggregator]}
    cfg = parse_study_config(keys)
    spec = parse_attack({} if attack == "none" else {"attack": attack, "attack-scale": args.scale})
    norms = _NormLog()
    replies_log = logging.getLogger("medfed.server.replies")
    replies_log.addHandler(norms)
    replies_log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        run_on_simulation_engine(cfg, spec)
    finally:
        replies_log.removeHandler(norms)
        _stop_ray()
    summary = json.loads(summary_path.read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    screened = sorted({f["site"] for r in rounds for f in r["failures"] if "max-update-norm-ratio" in f["reason"]})
    n_screened = sum("max-update-norm-ratio" in f["reason"] for r in rounds for f in r["failures"])
    return {"attack": attack, "aggregator": aggregator, "auc": summary["test"].get("auc"),
            "auc-last": summary["final-round-test"].get("auc"), "selected-round": summary["selected-round"],
            "screened": f"{','.join(screened)} x{n_screened}" if screened else "-",
            "max-norm-ratio": max(norms.ratios) if norms.ratios else None,
            "wall-s": time.perf_counter() - t0}


def _stop_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    clean = next((r["auc"] for r in rows if r["attack"] == "none" and r["aggregator"] == "fedavg"), None)
    head = ("attack", "aggregator", "AUC sel", "AUC last", "Δ clean fedavg", "round", "norm-screened",
            "max norm ratio", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['attack']} | {r['aggregator']} | {r['skipped']} |" + " |" * (len(head) - 3))
            continue
        delta = None if clean is None or r["auc"] is None else 100 * (r["auc"] - clean)
        lines.append("| " + " | ".join([
            r["attack"], r["aggregator"], _fmt(r["auc"]), _fmt(r["auc-last"]), _fmt(delta, "+.1f"),
            str(r["selected-round"]), r["screened"], _fmt(r["max-norm-ratio"], ".1f"), f"{r['wall-s']:.0f}",
        ]) + " |")
    if clean is not None:
        lines.append(f"\nclean FedAvg test AUC {clean:.3f}; Δ in AUC points (x100)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--min-sites", type=int, default=3, help="fewest sites whose update is kept for a round "
                   "to count (a norm-screened site is one fewer; default 3)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=10.0, help="sign-flip scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--aggregators", default=",".join(a for a in AGGREGATORS if a != "fedavg+screen3"))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "robust" / "bench")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"{args.data} not found: pass --data or set MEDFED_SHARED_DATA")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_json = args.out / "robust.json"
    rows = json.loads(out_json.read_text()) if out_json.is_file() else []  # cells of earlier calls are kept
    for attack in args.attacks.split(","):
        for aggregator in args.aggregators.split(","):
            rows = [r for r in rows if (r["attack"], r["aggregator"]) != (attack, aggregator)]
            if aggregator == "bulyan" and args.sites < 4 * 1 + 3:
                rows.append({"attack": attack, "aggregator": aggregator,
                             "skipped": f"not run: Flower's Bulyan needs n >= 4f+3 = 7 sites for f=1, "
                                        f"here {args.sites}"})
                continue
            rows.append(run_cell(args.data.resolve(), args.out.resolve(), attack, aggregator, args))
            r = rows[-1]
            print(f"{attack:10s} {aggregator:15s} AUC {_fmt(r['auc'])} last {_fmt(r['auc-last'])} "
                  f"screened {r['screened']} ({r['wall-s']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    order = {(a, g): i for i, (a, g) in enumerate((a, g) for a in ATTACKS for g in AGGREGATORS)}
    rows.sort(key=lambda r: order.get((r["attack"], r["aggregator"]), len(order)))
    out_json.write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (args.out / "robust.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

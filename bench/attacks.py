"""One malicious site of five on PneumoniaMNIST, with medfed's defaults: does the study survive? Prints a table.

Every cell is a full federated study on Flower's simulation engine (iid sites, cnn, FedAvg,
the default screening: ``max-update-norm-ratio`` 10, ``max-site-weight-ratio`` 10, every
reply held to the reply schema, site ids bound to nodes). site-0 attacks
(:mod:`medfed.simulations.attacks`): none, sign-flip, label-flip, weight-inflation,
impersonate, bad-metrics.

Columns: whether the study completed every round, whether the attacker was named (site-0
in a round's or the summary's ``failures``, or in the server audit trail's ``rejected``
entries) and how often, the test AUC of the selected round, and its difference to the
clean run in AUC points.

Usage:
    python bench/attacks.py [--data PNEUMONIAMNIST.npz] [--rounds 6] [--local-steps 20]
        [--attacks none,sign-flip,...] [--out runs/attacks/bench]
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
ATTACKER = "site-0"


def run_cell(data: Path, out: Path, attack: str, args: argparse.Namespace) -> dict:
    from medfed.common.audit_log import read_entries
    from medfed.common.config import parse_study_config
    from medfed.simulations.attacks import parse_attack
    from medfed.simulations.engine import run_on_simulation_engine

    run_dir = out / attack
    keys = {"dataset": "medmnist", "data-path": str(data), "num-sites": args.sites, "partition": "iid",
            "model": "cnn", "num-server-rounds": args.rounds, "local-steps": args.local_steps,
            "batch-size": args.batch_size, "lr": args.lr, "seed": args.seed, "out-dir": str(run_dir)}
    cfg = parse_study_config(keys)
    spec = parse_attack({} if attack == "none" else {"attack": attack})
    t0 = time.perf_counter()
    try:
        run_on_simulation_engine(cfg, spec)
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    failures = [f for r in rounds for f in r["failures"]] + summary["failures"]
    rejected = [e for e in read_entries(run_dir / "audit.jsonl") if e["event"] == "rejected"]
    named = sum(f["site"] == ATTACKER for f in failures) + sum(e["site"] == ATTACKER for e in rejected)
    others = sorted({f["site"] or str(f["node"]) for f in failures if f["site"] != ATTACKER}
                    | {e["site"] or str(e["node"]) for e in rejected if e["site"] != ATTACKER})
    return {"attack": attack, "completed": len(rounds) == args.rounds and "stopped" not in summary,
            "named": named, "others-named": others, "auc": summary["test"].get("auc"),
            "selected-round": summary["selected-round"], "wall-s": time.perf_counter() - t0}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    clean = next((r["auc"] for r in rows if r["attack"] == "none"), None)
    head = ("attack (site-0 of 5)", "completed", "site-0 named", "honest sites named", "test AUC",
            "Δ clean (points)", "round", "wall s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = None if clean is None or r["auc"] is None else 100 * (r["auc"] - clean)
        lines.append("| " + " | ".join([
            r["attack"], "yes" if r["completed"] else "NO", f"{r['named']}x" if r["named"] else "no",
            ", ".join(r["others-named"]) or "none", _fmt(r["auc"]), _fmt(delta, "+.1f"), str(r["selected-round"]),
            f"{r['wall-s']:.0f}",
        ]) + " |")
    if clean is not None:
        lines.append(f"\nclean FedAvg test AUC {clean:.3f}; Δ in AUC points (x100)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from medfed.simulations.attacks import ATTACKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "attacks" / "bench")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"{args.data} not found: pass --data or set MEDFED_SHARED_DATA")
    unknown = sorted(set(args.attacks.split(",")) - set(ATTACKS))
    if unknown:
        p.error(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out_json = args.out / "attacks.json"
    rows = json.loads(out_json.read_text()) if out_json.is_file() else []  # cells of earlier calls are kept
    for attack in args.attacks.split(","):
        rows = [r for r in rows if r["attack"] != attack]
        rows.append(run_cell(args.data.resolve(), args.out.resolve(), attack, args))
        r = rows[-1]
        print(f"{attack:17s} completed {r['completed']} named {r['named']} AUC {_fmt(r['auc'])} "
              f"({r['wall-s']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: ATTACKS.index(r["attack"]))
    out_json.write_text(json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    (args.out / "attacks.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

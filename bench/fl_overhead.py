"""Federated-learning overhead of medfed, measured on this machine. Prints its figures.

(a) simulation: a federated round on Flower's simulation engine ÷ the same local training
    (same model, data, sites and local steps) run directly in one process, after warm-up;
(b) ClientApp cold start: from process start to the first reply (a deployment ClientApp
    process handles exactly one message);
(c) deployment: round wall time minus local training time, with a real SuperLink and two
    SuperNodes on 127.0.0.1.

Usage:
    python bench/fl_overhead.py [--data PNEUMONIAMNIST.npz] [--rounds 4] [--parts a,b,c]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data")) / (
    "pneumoniamnist/pneumoniamnist.npz"
)


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def part_a(data: Path, rounds: int, sites: int, out: Path) -> dict:
    """Federated round in simulation vs the same training run directly."""
    import torch
    from flwr.app import ArrayRecord

    from medfed.client.site_data import SiteRuntime
    from medfed.client.task import evaluate_round, train_round
    from medfed.common.arrays import model_to_arrays
    from medfed.common.config import StudyConfig
    from medfed.common.data.federated import load_study_data
    from medfed.common.models import ModelSpec, build_model
    from medfed.server.central import evaluate_arrays
    from medfed.simulations.engine import run_on_simulation_engine

    cfg = StudyConfig(dataset="medmnist", data_path=str(data), num_sites=sites, partition="dirichlet",
                      alpha=0.5, num_server_rounds=rounds, local_epochs=1, out_dir=str(out / "sim"),
                      min_sites=sites)
    t0 = time.perf_counter()
    run_on_simulation_engine(cfg)
    sim_wall = time.perf_counter() - t0
    recs = _rounds(out / "sim")[1:]  # after warm-up (round 1 starts Ray actors, imports)
    fed_round = statistics.median(r["time"]["round-s"] for r in recs)
    fed_train = statistics.median(r["time"]["train-s"] for r in recs)

    # The same work directly in this process: same functions, same sites, same steps.
    fed = load_study_data(cfg)
    spec = ModelSpec("cnn", fed.info.in_channels, fed.info.num_classes, fed.info.image_size)
    torch.manual_seed(0)
    arrays: ArrayRecord = model_to_arrays(build_model(spec))
    sites_rt = [SiteRuntime(s.site_id, fed.info, s, out / "direct" / s.site_id) for s in fed.sites]
    direct_train, direct_round = [], []
    for rnd in range(1, rounds + 1):
        t_round = time.perf_counter()
        for site in sites_rt:
            train_round(cfg, site, arrays, {"server-round": rnd})
        t_train = time.perf_counter() - t_round
        for site in sites_rt:
            evaluate_round(cfg, site, arrays, {})
        evaluate_arrays(spec, arrays, fed.central_test, "cpu", 0.5)
        direct_train.append(t_train)
        direct_round.append(time.perf_counter() - t_round)
    d_train = statistics.median(direct_train[1:])
    d_round = statistics.median(direct_round[1:])
    return {
        "sites": sites, "rounds": rounds, "simulation-wall-s": round(sim_wall, 2),
        "fed-train-phase-s": round(fed_train, 3), "direct-train-s": round(d_train, 3),
        "ratio-train": round(fed_train / d_train, 3),
        "fed-round-s": round(fed_round, 3), "direct-round-s (train+same evaluation)": round(d_round, 3),
        "ratio-round": round(fed_round / d_round, 3),
        "test-auc-last-round": recs[-1]["test"].get("auc") if recs else None,
    }


COLD_START = textwrap.dedent(
    """
    import sys, time, json
    t_import0 = time.perf_counter()
    from flwr.app import Context, Message, RecordDict, ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    t_flwr = time.perf_counter()
    from medfed.client.app import app
    t_app = time.perf_counter()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    import torch
    from medfed.common.arrays import model_to_arrays
    from medfed.common.models import ModelSpec, build_model
    arrays = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    kind, site_yaml, run_config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=kind)
    ctx = Context(run_id=1, node_id=1, node_config={"site-config": site_yaml}, state=RecordDict(),
                  run_config=run_config)
    reply = app(msg, ctx)
    t_reply = time.perf_counter()
    assert not reply.has_error(), reply.error
    print(json.dumps({"import-flwr-s": t_flwr - t_import0, "import-app-s": t_app - t_flwr,
                      "handle-s": t_reply - t_app, "monai": "monai" in sys.modules,
                      "opacus": "opacus" in sys.modules}))
    """
)


def part_b(data: Path, out: Path) -> dict:
    """ClientApp cold start: process start to first reply, train and evaluate messages."""
    site_yaml = out / "site.yaml"
    site_yaml.write_text(
        f"site-id: bench-site\ndata-root: {data.parent}\ndataset: medmnist\ndata-file: {data.name}\n"
        f"state-dir: {out / 'state'}\nshard-index: 0\nshard-count: 2\n"
    )
    run_config = {"local-steps": 1, "dataset": "medmnist", "data-path": str(data)}
    result = {}
    for kind in ("train", "evaluate"):
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", COLD_START, kind, str(site_yaml), json.dumps(run_config)],
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            detail = json.loads(proc.stdout.strip().splitlines()[-1])
            detail["process-start-to-reply-s"] = wall
            samples.append(detail)
        best = min(samples, key=lambda d: d["process-start-to-reply-s"])
        result[kind] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in best.items()}
        result[kind]["median-start-to-reply-s"] = round(
            statistics.median(s["process-start-to-reply-s"] for s in samples), 3)
    return result


def part_c(data: Path, rounds: int, out: Path) -> dict:
    """Deployment on loopback: round wall time minus local training time.

    Run twice: federated evaluation every round (two messages per round), and every 5th
    round (``evaluate-every=5``, one message in most rounds).
    """
    from medfed.simulations.loopback import LocalDeployment

    result = {}
    for every in (1, 5):
        with LocalDeployment(out / f"every-{every}", data=data, sites=2, insecure=True) as dep:
            run_dir = dep.run_study(rounds=rounds, extra={"local-epochs": 1, "evaluate-every": every})
        rows = []
        for r in _rounds(run_dir):
            train = max(v.get("train-s", 0.0) for v in r["sites"].values())
            rows.append({"round": r["round"], "round-s": round(r["time"]["round-s"], 2),
                         "train-phase-s": round(r["time"]["train-s"], 2),
                         "evaluate-phase-s": round(r["time"]["evaluate-s"], 2),
                         "max-site-train-s": round(train, 2),
                         "overhead-s": round(r["time"]["round-s"] - train, 2)})
        steady = rows[1:] or rows
        result[f"evaluate-every-{every}"] = {
            "rounds": rows,
            "median-overhead-s": round(statistics.median(x["overhead-s"] for x in steady), 2),
            "mean-overhead-s": round(statistics.mean(x["overhead-s"] for x in steady), 2),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--parts", default="a,b,c")
    args = p.parse_args()
    if not args.data.is_file():
        sys.exit(f"bench: data file not found: {args.data} (set --data or MEDFED_SHARED_DATA)")
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        out = Path(tmp)
        report = {"machine": f"{os.cpu_count()} cores", "data": str(args.data)}
        if "b" in parts:
            report["b-clientapp-cold-start"] = part_b(args.data, out)
            print(json.dumps({"b": report["b-clientapp-cold-start"]}, indent=2), flush=True)
        if "a" in parts:
            report["a-simulation-round-vs-direct"] = part_a(args.data, args.rounds, args.sites, out)
            print(json.dumps({"a": report["a-simulation-round-vs-direct"]}, indent=2), flush=True)
        if "c" in parts:
            report["c-deployment-round-overhead"] = part_c(args.data, args.rounds, out / "deploy")
            print(json.dumps({"c": report["c-deployment-round-overhead"]}, indent=2), flush=True)
    print("SUMMARY " + json.dumps(report))


if __name__ == "__main__":
    main()

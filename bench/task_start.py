"""Task start to handler, and the round overhead, on a real loopback deployment. Prints its figures.

Each site's task process logs ``handler starts X s after the launcher acquired the task, Y s of
it pulling the MESSAGE`` (:mod:`medfed.client.app_runner`). Per message type this prints the
median of

* ``start-to-handler-s`` (X): from the launcher seeing the task to the ClientApp handler starting;
* ``pull-s`` (Y): of which pulling the message from the SuperNode. Flower offers the task before
  the SuperNode has the message's contents from the SuperLink, so this includes that transfer;
* ``start-to-handler-without-pull-s`` (X - Y): what the site's process start costs.

and, from RUN_DIR/metrics.jsonl, the round overhead: round wall time minus the slowest site's
``train-s`` (median over rounds). ``--modes warm,cold`` runs the study once with the warm
worker and once with one cold process per task (``MEDFED_WARM_WORKER=0``).

Usage:
    python bench/task_start.py [--rounds 3] [--sites 2] [--local-steps 2] [--modes warm,cold]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

from medfed.client.app_runner import HANDLER_STARTS
from medfed.client.worker_protocol import WARM_ENV

LINE = re.compile(HANDLER_STARTS + r" ([0-9.]+) s after the launcher acquired the task, ([0-9.]+) s of it pulling "
                  r"the (\w+) message")


def handler_starts(logs: list[Path]) -> dict[str, dict[str, float]]:
    """Per message type: median start-to-handler, pull and the difference, from the sites' logs."""
    samples: dict[str, list[tuple[float, float]]] = {}
    for log in logs:
        for match in LINE.finditer(log.read_text(errors="replace")):
            samples.setdefault(match[3], []).append((float(match[1]), float(match[2])))
    return {kind: {"tasks": len(rows),
                   "start-to-handler-s": round(statistics.median(x for x, _ in rows), 3),
                   "pull-s": round(statistics.median(y for _, y in rows), 3),
                   "start-to-handler-without-pull-s": round(statistics.median(x - y for x, y in rows), 3),
                   "max-start-to-handler-without-pull-s": round(max(x - y for x, y in rows), 3)}
            for kind, rows in sorted(samples.items())}


def round_overhead(run_dir: Path) -> dict[str, object]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        train = max((v.get("train-s", 0.0) for v in r["sites"].values()), default=0.0)
        rows.append({"round": r["round"], "round-s": round(r["time"]["round-s"], 2),
                     "train-phase-s": round(r["time"]["train-s"], 2), "evaluate-phase-s": round(r["time"]["evaluate-s"], 2),
                     "max-site-train-s": round(train, 2), "overhead-s": round(r["time"]["round-s"] - train, 2)})
    return {"rounds": rows, "median-overhead-s": round(statistics.median(x["overhead-s"] for x in rows), 2)}


def run(mode: str, base: Path, rounds: int, sites: int, local_steps: int) -> dict[str, object]:
    from medfed.simulations.loopback import LocalDeployment

    os.environ[WARM_ENV] = "1" if mode == "warm" else "0"  # the sites' processes inherit it
    with LocalDeployment(base, sites=sites, insecure=True) as dep:
        run_dir = dep.run_study(rounds=rounds, extra={"local-steps": local_steps})
        logs = [dep.base / f"{site}.log" for site in dep.site_ids]
    return {"mode": mode, "handler-start": handler_starts(logs), "round-overhead": round_overhead(run_dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--modes", default="warm", help="comma-separated: warm, cold")
    args = p.parse_args()
    report = {"machine": f"{os.cpu_count()} cores",
              "supernode-poll-s": os.environ.get("MEDFED_SUPERNODE_POLL_S", "0.2 (default)")}
    with tempfile.TemporaryDirectory(prefix="medfed-task-start-") as tmp:
        for mode in args.modes.split(","):
            report[mode] = run(mode, Path(tmp) / mode, args.rounds, args.sites, args.local_steps)
            print(json.dumps({mode: report[mode]}, indent=2), flush=True)
    print("SUMMARY " + json.dumps(report))


if __name__ == "__main__":
    main()

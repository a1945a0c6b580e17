"""The deployed study tells the truth, on the real topology: TLS, site authentication, 127.0.0.1.

One SuperLink and two SuperNodes, each site on its own shard of PneumoniaMNIST from
../shared/data; the server holds no data, as at a real coordinator. Three studies:

1. ``medfed run --wait``: the sites describe their data, the model is sized from them, and the
   reported test metrics are the pool of the sites' test splits (exit 0);
2. ``flwr run <checkout> <connection>``, Flower's own submission: the bundle holds only
   configuration, both sites accept it and train;
3. ``medfed run --wait`` while site-b is SIGKILLed after round 1: round 2 names site-b with
   its node id, ``max-failed-rounds=1`` stops the study, and ``medfed run`` exits 3 saying why.

Every process is stopped in a ``finally`` (the LocalDeployment context).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.simulations.loopback import LocalDeployment
from tests.medfed_procs import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
FAST = {"local-steps": 5, "batch-size": 32}


def _medfed_run(dep: LocalDeployment, run_config: str, **popen) -> subprocess.Popen[str]:
    cmd = [str(Path(sys.executable).parent / "medfed"), "run", "--server", dep.server, "--root-cert",
           str(dep.root_cert), "--run-config", run_config, "--wait", "--timeout", str(TIMEOUT_S)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def _train_messages(dep: LocalDeployment, site_id: str) -> int:
    """Train messages the site's SuperNode has received so far (its log)."""
    log = dep.base / f"{site_id}.log"
    return log.read_text(errors="replace").count("Receiving: train message") if log.is_file() else 0


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def test_a_deployed_study_reports_what_the_sites_measured_and_exits_as_it_ended(tmp_path: Path,
                                                                              shared_data: Path) -> None:
    from medfed.server.submit import flower_cli_home, run_flwr, run_info

    data = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    dep = LocalDeployment(tmp_path / "dep", data=data, sites=2)
    try:
        with dep:
            # 1. the obvious command: the sites' own data, pooled
            code1, out1 = _finish(_medfed_run(dep, dep.study_config(2, FAST, "runs/pooled")))
            # 2. Flower's own submission of this checkout
            flwr_config = dep.study_config(1, FAST, "runs/flwr-run")
            with flower_cli_home(dep.server, root_cert=dep.root_cert) as home:
                started = run_flwr(["run", str(REPO), "medfed", "--run-config", flwr_config, "--format", "json"],
                                   home, timeout=TIMEOUT_S)
                run_id = int(json.loads(started.stdout[started.stdout.index("{"):])["run-id"])
                wait_for("the flwr run to finish", lambda: run_info(run_id, home)[0].startswith("finished"),
                          timeout=TIMEOUT_S)
                flwr_status = run_info(run_id, home)
            # 3. a site dies after round 1: the study stops, by name
            stop_dir = dep.state_dir / "runs/stopped"
            before = _train_messages(dep, "site-b")
            proc = _medfed_run(dep, dep.study_config(3, {**FAST, "max-failed-rounds": 1, "round-timeout": 15.0},
                                                     "runs/stopped"))
            # round 1's line is written with round 2's replies (they carry its evaluation): kill site-b the
            # moment its SuperNode has round 2's message, before its app can answer
            wait_for("round 2 of the third study at site-b", lambda: _train_messages(dep, "site-b") >= before + 2,
                     timeout=300, poll=0.05)
            dep.kill_site("site-b")
            code3, out3 = _finish(proc)
            leftovers = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers

    # 1. completed, exit 0; the test metrics are the pool of the sites' test splits, nothing invented
    assert code1 == 0 and "finished:completed" in out1, out1
    summary = json.loads((dep.state_dir / "runs/pooled" / "summary.json").read_text())
    assert summary["outcome"]["status"] == "completed"
    source, sites = summary["test-source"], summary["sites"]
    assert source["kind"] == "sites" and set(source["sites"]) == {"site-a", "site-b"}
    assert sum(source["sites"].values()) == 624  # the two shards together: PneumoniaMNIST's whole test split
    pooled_accuracy = sum(n * sites[s]["test-accuracy"] for s, n in source["sites"].items()) / 624
    assert summary["test"]["accuracy"] == pytest.approx(pooled_accuracy, abs=1e-9)
    assert 0.5 < summary["test"]["auc"] <= 1.0
    assert summary["dataset"]["sources"] == {"site-a": "medmnist", "site-b": "medmnist"}
    assert summary["model"]["image_size"] == 28 and summary["model"]["num_classes"] == 2  # sized by the sites
    text = json.dumps({k: v for k, v in summary.items() if k != "config"})
    assert "synthetic" not in text and "simulation only" not in (dep.state_dir / "runs/pooled/report.md").read_text()

    # 2. `flwr run .`: a configuration-only bundle the sites accept
    assert flwr_status[0] == "finished:completed", flwr_status
    flwr_summary = json.loads((dep.state_dir / "runs/flwr-run" / "summary.json").read_text())
    assert flwr_summary["outcome"]["status"] == "completed" and flwr_summary["applied-rounds"] == [1]

    # 3. stopped: exit 3 with the reason; round 2's failure names site-b beside its real node id
    assert code3 == 3 and "study stopped" in out3 and "max-failed-rounds=1" in out3, out3
    stopped = json.loads((stop_dir / "summary.json").read_text())
    assert stopped["outcome"]["status"] == "stopped" and stopped["applied-rounds"] == [1]
    round2 = _rounds(stop_dir)[1]
    (failure,) = [f for f in round2["failures"] if f["site"] == "site-b"]  # round 2 was not applied: no evaluation
    assert failure["node"] > 1 and "site-unverified" not in failure and "round-timeout=15 s" in failure["reason"]
    assert not round2["applied"] and round2["val"] == {} and stopped["selected-round"] == 1
    assert stopped["test"]["auc"] > 0.5 and set(stopped["test-source"]["sites"]) == {"site-a"}  # b is gone
    audit = [json.loads(line) for line in (stop_dir / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "rejected" and e["site"] == "site-b" and e["round"] == 2 for e in audit)

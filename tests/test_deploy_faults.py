"""Faults in a real deployment on 127.0.0.1: sites that drop and return, a server that restarts.

Real SuperLink and SuperNode processes (insecure, for speed), synthetic data, a few local
steps. Every process is stopped in a ``finally`` (the LocalDeployment context).

* a site is SIGKILLed during round 2's training: the study goes on with the others and
  the restarted site trains again in a later round (rejoin);
* the SuperLink and ServerApp are SIGKILLed between rounds, the SuperLink restarted with the
  same state dir, and ``medfed run --resume`` finishes the study with the same final metrics
  as an uninterrupted run;
* too few sites connected: the study stops after node-wait-timeout with a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.server.submit import RUN_COMPLETED, flower_cli_home, run_status, submit_run
from medfed.simulations.loopback import LocalDeployment
from tests.medfed_procs import wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 600.0
FAST = {"local-steps": 2, "batch-size": 16, "seed": 7}


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(what: str, check, timeout: float = 300.0, poll: float = 0.2):
    return wait_for(what, check, timeout, poll)


def _wait_run(dep: LocalDeployment, run_id: int, timeout: float = RUN_TIMEOUT_S) -> str:
    with flower_cli_home(dep.server, insecure=True) as home:
        return _wait_for(f"run {run_id} to finish",
                         lambda: (s := run_status(run_id, home)).startswith("finished") and s, timeout, poll=1.0)


def _train_messages(dep: LocalDeployment, site_id: str) -> int:
    """How many train messages the site's SuperNode has received (its log; independent of how it runs apps)."""
    log = dep.base / f"{site_id}.log"
    return log.read_text(errors="replace").count("Receiving: train message") if log.is_file() else 0


def _trained(record: dict) -> set[str]:
    return {site for site, row in record["sites"].items() if "train-loss" in row}


ROUNDS_REJOIN = 8  # rounds take seconds: enough of them are left once the killed site is back


def test_site_killed_mid_round_then_rejoins(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path / "dep", sites=3, insecure=True)
    out = "runs/faults"
    extra = {**FAST, "min-sites": 2, "round-timeout": 90.0, "node-wait-timeout": 60.0}
    try:
        with dep:
            run_dir = dep.state_dir / out
            run_id = submit_run(dep.server, insecure=True, run_config=dep.study_config(ROUNDS_REJOIN, extra, out)).run_id
            _wait_for("site-c training in round 2", lambda: _train_messages(dep, "site-c") >= 2, timeout=180)
            time.sleep(1.0)  # its app is starting: the reply (round 1's evaluation, then training) needs seconds more
            dep.kill_site("site-c")
            # round 2's line is written with round 3's replies (they carry its evaluation): restart once round 3 began
            _wait_for("round 3", lambda: _train_messages(dep, "site-a") >= 3, timeout=240)
            dep.start_site("site-c")
            status = _wait_run(dep, run_id)
            leftovers = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers
    assert status == RUN_COMPLETED
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS_REJOIN + 1))
    assert _trained(rounds[0]) == {"site-a", "site-b", "site-c"}
    assert _trained(rounds[1]) == {"site-a", "site-b"} and rounds[1]["quorum"] is True  # k-of-n: 2 of 3
    assert any("site-c" in _trained(r) for r in rounds[2:])  # rejoined
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "stopped" not in summary and summary["test"]


def _resume_cli(dep: LocalDeployment, run_config: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "medfed"), "run", "--server", dep.server, "--insecure",
           "--run-config", run_config, "--resume", "--wait", "--timeout", str(RUN_TIMEOUT_S)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)


def test_server_killed_between_rounds_resumes_to_same_result(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path / "dep", sites=2, insecure=True)
    try:
        with dep:
            full = dep.run_study(rounds=3, extra=FAST, out_dir="runs/full")
            cut = dep.state_dir / "runs/cut"
            config = dep.study_config(3, FAST, "runs/cut")
            submit_run(dep.server, insecure=True, run_config=config)
            _wait_for("round 1 checkpoint", lambda: (cut / "checkpoints" / "round-0001.pt").is_file())
            dep.kill_superlink()  # SuperLink, SuperExec and ServerApp: SIGKILL
            assert not (cut / "summary.json").exists()
            dep.restart_superlink()  # same address, same state dir (superlink.db)
            proc = _resume_cli(dep, config)
            leftovers = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert RUN_COMPLETED in proc.stdout
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    rounds = _rounds(cut)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # seeds derive from (seed, round, site), the model and selection state from the checkpoint: exact equality
    assert b["test"] == a["test"] and b["final-round-test"] == a["final-round-test"]
    assert [r["test"] for r in rounds] == [r["test"] for r in _rounds(full)]


def test_too_few_sites_fail_the_study_after_node_wait_timeout(tmp_path: Path) -> None:
    from medfed.server.submit import run_exit

    dep = LocalDeployment(tmp_path / "dep", sites=2, insecure=True)
    extra = {**FAST, "num-sites": 3, "min-sites": 3, "node-wait-timeout": 5.0}
    try:
        with dep:
            start = time.monotonic()
            result = dep.submit_study(rounds=2, extra=extra, out_dir="runs/short", timeout=180)
            elapsed = time.monotonic() - start
            leftovers = dep.stop()
    finally:
        print(dep.log_tails())
    assert not leftovers
    code, line = run_exit(result)
    assert code == 4 and "study failed" in line  # `medfed run --wait` exits 4: nothing to report
    summary = json.loads((dep.state_dir / "runs/short" / "summary.json").read_text())
    outcome = summary["outcome"]
    assert outcome["status"] == "failed" and outcome["reason"] in line
    assert "only 2 site(s) connected" in outcome["reason"] and "min-sites=3" in outcome["reason"]
    assert "node-wait-timeout=5 s" in outcome["reason"] and "medfed site start" in outcome["reason"]
    assert _rounds(dep.state_dir / "runs/short") == [] and summary["test"] == {}  # no round: no test metrics
    assert elapsed < 120  # bounded: 5 s of waiting plus start-up, not Flower's endless wait

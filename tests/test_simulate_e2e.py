"""End to end: `medfed simulate` on Flower's simulation engine, outputs, resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = ["--sites", "3", "--local-steps", "3", "--batch-size", "32", "--seed", "3"]


def medfed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed.common.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _close(a: dict, b: dict, keys=("auc", "accuracy", "loss")) -> None:
    for k in keys:
        assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (k, a[k], b[k])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "full"
    res = medfed("simulate", *SMALL, "--rounds", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_simulate_writes_a_complete_run_directory(full_run: Path):
    summary = _summary(full_run)
    assert summary["mode"] == "federated" and summary["strategy"] == "fedavg"
    assert summary["rounds"] == 3 and 1 <= summary["selected-round"] <= 3
    assert 0.0 <= summary["test"]["auc"] <= 1.0 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert set(summary["sites"]) == {"site-0", "site-1", "site-2"}
    sizes = [summary["sites"][s]["num-examples"] for s in sorted(summary["sites"])]
    assert len(set(sizes)) == 3, "synthetic sites must have unequal sizes"
    lines = [json.loads(l) for l in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [1, 2, 3]
    for line in lines:
        assert set(line["sites"]) == {"site-0", "site-1", "site-2"}
        assert line["bytes"]["sent"] > 0 and line["bytes"]["received"] > 0
        assert line["time"]["round-s"] > 0
        assert "auc" in line["test"] and "auc" in line["val"]
        # per-site metrics are kept, not only the average
        assert all("val-auc" in row and "test-auc" in row for row in line["sites"].values())
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == [
        "round-0001.pt", "round-0002.pt", "round-0003.pt"]
    assert (full_run / "model.pt").is_file()
    report = (full_run / "report.md").read_text()
    assert "site-0" in report and (full_run / "site_val_auc.png").is_file()


def test_checkpoint_is_self_describing(full_run: Path):
    from medfed.common.checkpoint import load_checkpoint

    ckpt = load_checkpoint(full_run / "checkpoints" / "round-0002.pt")
    assert ckpt.round == 2 and ckpt.model.name == "cnn" and ckpt.model.num_classes == 2
    assert ckpt.config["num-sites"] == 3 and ckpt.config["strategy"] == "fedavg"
    assert set(ckpt.metrics["sites"]) == {"site-0", "site-1", "site-2"}
    assert ckpt.selection["best-round"] in (1, 2)
    assert ckpt.best_state_dict is not None and set(ckpt.best_state_dict) == set(ckpt.state_dict)


def test_resume_gives_the_same_final_metrics(full_run: Path, tmp_path: Path):
    part = tmp_path / "part"
    res = medfed("simulate", *SMALL, "--rounds", "2", "--out", str(part))
    assert res.returncode == 0, res.stderr[-3000:]
    res = medfed("simulate", *SMALL, "--rounds", "3", "--resume", str(part / "checkpoints" / "round-0002.pt"))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, full = _summary(part), _summary(full_run)
    assert resumed["selected-round"] == full["selected-round"]
    _close(resumed["test"], full["test"])
    _close(resumed["final-round-test"], full["final-round-test"])
    for site in full["sites"]:
        _close({k[5:]: v for k, v in resumed["sites"][site].items() if k.startswith("test-")},
               {k[5:]: v for k, v in full["sites"][site].items() if k.startswith("test-")})
    rounds = [json.loads(l)["round"] for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]


def test_centralized_and_local_use_the_same_data(tmp_path: Path):
    for mode in ("centralized", "local"):
        out = tmp_path / mode
        res = medfed("simulate", *SMALL, "--rounds", "2", "--mode", mode, "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        s = _summary(out)
        assert s["mode"] == mode and set(s["sites"]) == {"site-0", "site-1", "site-2"}
        assert 0.0 <= s["test"]["auc"] <= 1.0


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["--strategy", "fedsgd"], "strategy='fedsgd' is not allowed", 2),
        (["--rounds", "0"], "num-server-rounds=0 is out of range", 2),
        (["--data", "/nonexistent/pneumoniamnist.npz"], "not found", 1),
        (["--bogus"], "unrecognized arguments: --bogus", 2),
    ],
)
def test_bad_input_one_line_and_nothing_written(tmp_path: Path, args, needle, code):
    out = tmp_path / "run"
    res = medfed("simulate", *args, "--out", str(out), timeout=120)
    assert res.returncode == code
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_corrupt_data_file_and_unknown_yaml_key(tmp_path: Path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    res = medfed("simulate", "--data", str(bad), "--out", str(tmp_path / "r1"), timeout=120)
    assert res.returncode == 1 and str(bad) in res.stderr and not (tmp_path / "r1").exists()
    study = tmp_path / "study.yaml"
    study.write_text("num-server-rounds: 2\nlearning_rate: 0.1\n")
    res = medfed("simulate", "--config", str(study), "--out", str(tmp_path / "r2"), timeout=120)
    assert res.returncode == 2 and "learning_rate" in res.stderr and str(study) in res.stderr
    assert not (tmp_path / "r2").exists()


def test_evaluate_every_skips_federated_evaluation_between(tmp_path: Path):
    out = tmp_path / "ee"
    res = medfed("simulate", *SMALL, "--rounds", "3", "--evaluate-every", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [bool(l["val"]) for l in lines] == [False, True, True]  # round 2, and always the last
    assert _summary(out)["selected-round"] in (2, 3)
    assert "val-auc" not in lines[0]["sites"]["site-0"] and "val-auc" in lines[1]["sites"]["site-0"]

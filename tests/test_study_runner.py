"""medfed study: the study file, the plan of cells, resuming, failures and the comparison tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from medfed.common.cli import main
from medfed.common.errors import ConfigError
from medfed.simulations.study import (
    CELL_CONFIG,
    FAILED_FILE,
    cell_state,
    load_study_spec,
    parse_study_spec,
    plan_cells,
    run_cell,
    run_study,
)
from medfed.simulations.study_table import fairness_columns, write_tables

GRID_SPEC = {
    "name": "t",
    "base": {"num-sites": 2, "num-server-rounds": 1, "local-steps": 1},
    "grid": {"strategy": ["fedavg", "fedprox"], "epsilon": [None, 8], "seed": [0, 1]},
    "baselines": ["centralized", "local"],
}


def _spec(tmp_path: Path, **changes):
    return parse_study_spec({**GRID_SPEC, "out": str(tmp_path / "study"), **changes})


# --------------------------------------------------------------------------- the study file and plan
@pytest.mark.parametrize("data, match", [
    ({"grid": {"seed": [0]}, "runs": 3}, r"unknown study key\(s\): runs; allowed keys: name, base, grid"),
    ({"grid": {"seed": 0}}, "grid key 'seed' must be a non-empty list"),
    ({"grid": {"seed": []}}, "grid key 'seed' must be a non-empty list"),
    ({"base": {"mode": "local"}}, "'mode' is set by the study runner"),
    ({"grid": {"out-dir": ["a"]}}, "'out-dir' is set by the study runner"),
    ({"base": {"seed": 1}, "grid": {"seed": [0]}}, "in both base and grid"),
    ({"baselines": ["pooled"]}, "baselines=.*centralized, local"),
    ({"base": {"num-sites": {"a": 1}}}, "base key 'num-sites' must be a plain value"),
    ([1, 2], "a study file holds a mapping"),
])
def test_bad_study_files_are_refused_with_the_fix(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_study_spec(data)


def test_unknown_config_keys_and_bad_values_stop_the_plan(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown study config key\(s\): rounds; allowed keys: .*num-server-rounds"):
        plan_cells(_spec(tmp_path, base={"rounds": 3}))
    with pytest.raises(ConfigError, match="cell federated__strategy-fedsgd: strategy='fedsgd' is not allowed"):
        plan_cells(_spec(tmp_path, grid={"strategy": ["fedsgd"]}))


def test_plan_is_the_grid_plus_baselines_without_strategy_or_dp(tmp_path: Path):
    cells = plan_cells(_spec(tmp_path))
    federated = [c for c in cells if c.mode == "federated"]
    baselines = [c for c in cells if c.mode != "federated"]
    assert len(federated) == 2 * 2 * 2 and len(baselines) == 2 * 2  # baselines: once per seed and mode
    ids = [c.cell_id for c in cells]
    assert ids[0] == "federated__strategy-fedavg__epsilon-none__seed-0"
    assert "federated__strategy-fedprox__epsilon-8__seed-1" in ids
    assert "centralized__seed-0" in ids and "local__seed-1" in ids
    assert ids == [c.cell_id for c in plan_cells(_spec(tmp_path))]  # deterministic
    by_id = {c.cell_id: c.config for c in cells}
    assert by_id["federated__strategy-fedavg__epsilon-none__seed-0"].epsilon == 0.0  # null: no DP
    assert by_id["federated__strategy-fedprox__epsilon-8__seed-1"].epsilon == 8.0
    assert by_id["federated__strategy-fedprox__epsilon-8__seed-1"].seed == 1
    local = by_id["local__seed-1"]
    assert local.mode == "local" and local.epsilon == 0.0 and local.seed == 1 and local.num_sites == 2
    assert Path(local.out_dir) == tmp_path / "study" / "cells" / "local__seed-1"


def test_data_path_is_resolved_and_means_a_medmnist_file(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_study_spec({"base": {"data-path": "data/x.npz"}, "grid": {"seed": [0]}})
    (cell,) = plan_cells(spec)
    assert cell.config.dataset == "medmnist" and cell.config.data_path == str(tmp_path / "data" / "x.npz")
    assert spec.out == tmp_path / "runs" / "studies" / "study"  # default out: runs/studies/<name>


def test_example_studies_plan(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    for path in sorted((root / "examples" / "studies").glob("*.yaml")):
        cells = plan_cells(load_study_spec(path))
        assert cells and all(c.cell_id for c in cells), path


# --------------------------------------------------------------------------- running, resuming, failures
def _fake_summary(cfg, auc: float) -> dict:
    from medfed.common import fairness as fx

    groups = {0: fx.group_metrics(40, 5, 45, 10), 1: fx.group_metrics(6, 2, 20, 6)}  # TPR 0.8 and 0.5
    summary = {"mode": cfg.mode, "config": cfg.to_dict(), "wall-s": 1.0,
               "test": {"auc": auc, "accuracy": 0.75, "balanced-accuracy": 0.7},
               "sites": {"site-0": {"epsilon": cfg.epsilon / 2}, "site-1": {"epsilon": cfg.epsilon}},
               "fairness": fx.fairness_record(groups, ("female", "male"))}
    if cfg.epsilon == 0:
        summary["sites"] = {"site-0": {}, "site-1": {}}
    return summary


class FakeRunner:
    """Writes a summary like a real run; fails the cells named in ``fail``."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail, self.calls = fail, []

    def __call__(self, cfg) -> None:
        cell = Path(cfg.out_dir).name
        self.calls.append(cell)
        if cell in self.fail:
            raise RuntimeError("sites could not train\nsecond line")
        auc = 0.8 + 0.1 * cfg.seed
        (Path(cfg.out_dir) / "metrics.jsonl").write_text(_metrics_line(True, []))
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(_fake_summary(cfg, auc)))


def _rows(out: Path, name: str = "comparison.csv") -> list[dict]:
    with open(out / name, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_writes_tables_skips_finished_cells_and_records_failures(tmp_path: Path):
    spec = _spec(tmp_path, grid={"strategy": ["fedavg"], "epsilon": [0, 8], "seed": [0, 1]},
                 baselines=["centralized"])
    cells = plan_cells(spec)
    bad = "federated__strategy-fedavg__epsilon-8__seed-1"
    runner = FakeRunner(fail=(bad,))
    outcomes = run_study(spec, cells, runner)
    assert [o.status for o in outcomes].count("failed") == 1 and len(runner.calls) == 6
    assert (spec.out / "cells" / bad / FAILED_FILE).is_file()
    assert yaml.safe_load((spec.out / "cells" / bad / CELL_CONFIG).read_text())["epsilon"] == 8.0

    rows = {r["cell"]: r for r in _rows(spec.out)}
    assert len(rows) == 6
    assert rows[bad]["status"] == "failed" and rows[bad]["reason"] == "RuntimeError: sites could not train"
    ok = rows["federated__strategy-fedavg__epsilon-8__seed-0"]
    assert ok["status"] == "ok" and ok["mode"] == "federated" and ok["strategy"] == "fedavg"
    assert float(ok["auc"]) == pytest.approx(0.8) and float(ok["balanced-accuracy"]) == pytest.approx(0.7)
    assert float(ok["epsilon-max"]) == 8.0  # max over the sites
    assert float(ok["worst-group-tpr"]) == pytest.approx(0.5) and float(ok["tpr-gap"]) == pytest.approx(0.3)
    assert rows["federated__strategy-fedavg__epsilon-0__seed-0"]["epsilon-max"] == ""
    assert rows["federated__strategy-fedavg__epsilon-0__seed-0"]["epsilon"] == "0"
    base = rows["centralized__seed-1"]
    assert base["mode"] == "centralized" and base["strategy"] == "" and base["epsilon"] == ""

    seeds = {(r["mode"], r["strategy"], r["epsilon"]): r for r in _rows(spec.out, "comparison-seeds.csv")}
    no_dp = seeds[("federated", "fedavg", "0")]
    assert no_dp["seeds-ok"] == "2/2" and float(no_dp["auc-mean"]) == pytest.approx(0.85)
    assert float(no_dp["auc-std"]) == pytest.approx(0.0707107, rel=1e-5)  # stdev of 0.8, 0.9
    assert seeds[("federated", "fedavg", "8")]["seeds-ok"] == "1/2"
    md = (spec.out / "comparison.md").read_text()
    assert "0.850 ± 0.071" in md and "| failed |" in md and "worst-group-tpr" in md

    mtimes = {c.cell_id: (c.run_dir / "summary.json").stat().st_mtime_ns for c in cells if c.cell_id != bad}
    again = FakeRunner()
    outcomes = run_study(spec, plan_cells(spec), again)
    assert again.calls == [bad]  # only the failed cell reruns
    assert {o.cell_id: o.status for o in outcomes}[bad] == "ran"
    assert not (spec.out / "cells" / bad / FAILED_FILE).exists()
    assert mtimes == {c.cell_id: (c.run_dir / "summary.json").stat().st_mtime_ns for c in cells if c.cell_id != bad}
    assert {r["status"] for r in _rows(spec.out)} == {"ok"}


def test_booleans_and_nulls_show_as_in_the_study_file(tmp_path: Path):
    spec = _spec(tmp_path, grid={"group-reweight": [False, True], "epsilon": [None]}, baselines=[])
    run_study(spec, plan_cells(spec), FakeRunner())
    rows = _rows(spec.out)
    assert [(r["cell"], r["group-reweight"], r["epsilon"]) for r in rows] == [
        ("federated__group-reweight-false__epsilon-none", "false", "null"),
        ("federated__group-reweight-true__epsilon-none", "true", "null")]


def test_changed_or_partial_cells_rerun_from_scratch(tmp_path: Path):
    spec = _spec(tmp_path, grid={"seed": [0, 1]}, baselines=[])
    run_study(spec, plan_cells(spec), FakeRunner())
    partial = plan_cells(spec)[1].run_dir
    (partial / "summary.json").unlink()
    (partial / "stale.txt").write_text("from the interrupted run\n")
    runner = FakeRunner()
    run_study(spec, plan_cells(spec), runner)
    assert runner.calls == ["federated__seed-1"] and not (partial / "stale.txt").exists()

    changed = _spec(tmp_path, grid={"seed": [0, 1]}, baselines=[], base={**GRID_SPEC["base"], "lr": 0.01})
    runner = FakeRunner()
    run_study(changed, plan_cells(changed), runner)
    assert runner.calls == ["federated__seed-0", "federated__seed-1"]  # the config changed: both rerun


def test_a_config_error_at_run_time_is_a_failed_cell(tmp_path: Path, shared_data: Path):
    """group-reweight on data without group codes: refused before training, recorded, study continues."""
    path = shared_data / "breastmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    spec = _spec(tmp_path, base={"data-path": str(path), "num-sites": 2, "group-reweight": True},
                 grid={"seed": [0]}, baselines=[])
    (outcome,) = run_study(spec, plan_cells(spec), run_cell)
    assert outcome.status == "failed" and "ConfigError" in outcome.reason and "group codes" in outcome.reason
    assert _rows(spec.out)[0]["status"] == "failed"


def _metrics_line(trained: bool, failures: list[str]) -> str:
    row = {"num-examples": 10.0, "val-auc": 0.5} if trained else {"val-auc": 0.5}
    return json.dumps({"round": 1, "sites": {"site-0": row},
                       "failures": [{"site": None, "reason": r} for r in failures]}) + "\n"


def test_a_federated_run_in_which_no_site_trained_is_a_failed_cell(tmp_path: Path, monkeypatch):
    """The server finishes even when every site refuses to train: the runner must not call that a result."""
    from medfed.simulations import engine

    def refusing_sites(cfg, attack=None):
        run_dir = Path(cfg.out_dir)
        (run_dir / "metrics.jsonl").write_text(_metrics_line(False, ["site site-0: ConfigError"]) * 2)
        (run_dir / "summary.json").write_text(json.dumps(_fake_summary(cfg, 0.5)))

    monkeypatch.setattr(engine, "run_on_simulation_engine", refusing_sites)
    spec = _spec(tmp_path, grid={"seed": [0]}, baselines=[])
    (outcome,) = run_study(spec, plan_cells(spec), run_cell)
    assert outcome.status == "failed"
    assert outcome.reason == "MedfedError: no site trained in any round: site site-0: ConfigError"
    assert _rows(spec.out)[0]["status"] == "failed"

    # A run without training finished before the runner checked for it: shown failed, and rerun.
    run_dir = plan_cells(spec)[0].run_dir
    (run_dir / FAILED_FILE).unlink()
    write_tables(spec.out)
    row = _rows(spec.out)[0]
    assert row["status"] == "failed" and row["reason"] == "no site trained in any round: site site-0: ConfigError"
    assert cell_state(plan_cells(spec)[0]) == "failed"


def test_failed_site_replies_are_counted_in_the_reason(tmp_path: Path):
    def some_fail(cfg):
        FakeRunner()(cfg)
        lines = _metrics_line(True, ["site site-1: NameError"]) + _metrics_line(True, ["a", "b"])
        (Path(cfg.out_dir) / "metrics.jsonl").write_text(lines + "not json\n")

    spec = _spec(tmp_path, grid={"seed": [0]}, baselines=[])
    run_study(spec, plan_cells(spec), some_fail)
    (row,) = _rows(spec.out)
    assert row["status"] == "ok" and row["reason"] == "3 failed site replies (first: site site-1: NameError)"


def test_fairness_columns_are_read_defensively():
    from medfed.common import fairness as fx

    assert fairness_columns({}) == {} and fairness_columns({"fairness": "n/a"}) == {}
    assert fairness_columns({"fairness": {"groups": {"a": {"tpr": None}}}}) == {}
    central = fx.fairness_record({0: fx.group_metrics(9, 1, 9, 1), 1: fx.group_metrics(3, 1, 9, 7)}, ("f", "m"))
    cols = fairness_columns({"fairness": {"attribute": "sex", "central": central}})  # no site aggregates
    assert cols["worst-group-tpr"] == pytest.approx(0.3) and cols["tpr-gap"] == pytest.approx(0.6)
    assert cols["disadvantaged-group"] == "m"
    only_groups = {"fairness": {"groups": {"a": {"tpr": 0.9}, "b": {"tpr": 0.6}}}}
    assert fairness_columns(only_groups)["tpr-gap"] == pytest.approx(0.3)


# --------------------------------------------------------------------------- the command line
def test_cli_bad_yaml_exits_2_with_one_line(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {strategy: [fedavg]\n")
    assert main(["study", "run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed: config error: ") and "not valid YAML" in err
    bad.write_text("grid: {strategy: fedavg}\n")
    assert main(["study", "run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed: config error: ") and "grid key 'strategy' must be a non-empty list" in err
    assert main(["study", "table", str(tmp_path)]) == 1
    assert "not a study folder" in capsys.readouterr().err


def test_cli_dry_run_lists_cells_and_runs_nothing(tmp_path: Path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**GRID_SPEC, "out": str(tmp_path / "out")}, sort_keys=False))
    assert main(["study", "run", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["new", "federated__strategy-fedavg__epsilon-none__seed-0"]
    assert out[-1].startswith("12 cells") and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_study_end_to_end_on_the_simulation_engine(tmp_path: Path):
    """2 federated cells + 1 pooled baseline, with group reweighting; the second run reruns nothing."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "tiny",
        "base": {"num-sites": 2, "num-server-rounds": 1, "local-steps": 2, "batch-size": 16,
                 "group-reweight": True, "device": "cpu"},
        "grid": {"strategy": ["fedavg", "fedprox"]},
        "baselines": ["centralized"],
        "out": str(tmp_path / "out"),
    }))
    cmd = [sys.executable, "-m", "medfed.common.cli", "study", "run", str(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert [r["cell"] for r in rows] == ["federated__strategy-fedavg", "federated__strategy-fedprox", "centralized"]
    assert all(r["status"] == "ok" and 0.0 <= float(r["auc"]) <= 1.0 for r in rows), rows
    summaries = [tmp_path / "out" / "cells" / r["cell"] / "summary.json" for r in rows]
    assert all(json.loads(p.read_text())["config"]["group-reweight"] is True for p in summaries)
    mtimes = [p.stat().st_mtime_ns for p in summaries]

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 cells: 0 ran, 3 skipped, 0 failed" in res.stdout
    assert res.stderr.count("skipped: finished before with the same config") == 3
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes

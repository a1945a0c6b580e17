"""Real data: the COVID-19 chest X-rays (sex, age) as three sites split by patient, checked and trained."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from medfed.common.intake.recipes import covid_chestxray_rows, split_by_patient
from medfed.common.site_config import load_site_config

from tests.test_simulate_e2e import medfed


def _patients(site_yaml: Path) -> set[str]:
    with (site_yaml.parent / "manifest.csv").open() as f:
        return {r["patient_id"] for r in csv.DictReader(f)}


def test_split_by_patient_keeps_patients_whole(shared_data):
    rows = covid_chestxray_rows(shared_data / "covid_chestxray_demographics")
    assert len(rows) == 142 and len({r["patient_id"] for r in rows}) == 81
    assert sum(r["label"] == "covid" for r in rows) == 66  # PROVENANCE: 57 COVID-19 + 9 COVID-19, ARDS
    sites = split_by_patient(rows, 3, seed=0)
    assert sum(map(len, sites)) == 142 and min(map(len, sites)) >= 40
    owners = [{r["patient_id"] for r in s} for s in sites]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert split_by_patient(rows, 3, seed=0) == sites and split_by_patient(rows, 3, seed=1) != sites


def test_covid_sites_check_then_federated_study(shared_data, tmp_path):
    out = tmp_path / "sites"
    res = medfed("data", "covid-sites", "--data", str(shared_data / "covid_chestxray_demographics"),
                 "--num-sites", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    yamls = [Path(p) for p in res.stdout.strip().splitlines()[-1].split(",")]
    assert [y.parent.name for y in yamls] == ["site-1", "site-2", "site-3"]
    assert not (_patients(yamls[0]) & _patients(yamls[1]) or _patients(yamls[1]) & _patients(yamls[2]))

    usable = 0
    for y in yamls:
        res = medfed("site", "check", "--config", str(y))
        assert res.returncode == 0, res.stderr[-2000:]
        report = json.loads((y.parent / "state" / "qc-report.json").read_text())
        assert report["problems"]["unreadable"] == [] and report["problems"]["patients-in-several-splits"] == []
        assert set(report["counts"]["attributes"]["age_band"]) <= {"<=40", "41-60", ">60"}
        assert report["problems"]["labels-outside-set"].get("unlabelled", 0) >= 1 or report["usable"] > 0
        usable += report["usable"]
    assert usable == 142 - 28  # the 28 upstream 'todo' findings are outside the declared labels

    for y in yamls:  # 4-8 test images per site: below the default min-eval-n (20), a site sends no metrics
        y.write_text(y.read_text() + "min-eval-n: 2\n")
    run = tmp_path / "run"
    res = medfed("simulate", "--site-configs", ",".join(map(str, yamls)), "--rounds", "2",
                 "--image-size", "32", "--local-steps", "4", "--batch-size", "16", "--out", str(run), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["dataset"]["num-sites"] == 3
    assert set(summary["sites"]) == {"site-1", "site-2", "site-3"}
    assert all(row["test-num-examples"] > 0 for row in summary["sites"].values())
    assert 0.0 <= summary["test"]["auc"] <= 1.0
    site = load_site_config(yamls[0])
    assert any((Path(site.state_dir) / "cache").rglob("*.npy"))  # the check warmed the cache


@pytest.mark.parametrize("flags, needle", [
    (["--site-configs", "a.yaml", "--data", "x.npz"], "exclude each other"),
    (["--site-configs", "missing-a.yaml,missing-b.yaml"], "config file not found"),
    (["--site-configs", "missing-a.yaml"], "min-sites=2 is larger than num-sites=1"),
])
def test_simulate_site_configs_bad_input(tmp_path, flags, needle):
    res = medfed("simulate", *flags, "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and needle in res.stderr

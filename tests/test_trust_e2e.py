"""End to end (slow): a simulated study with a planted shortcut, saliency aggregates and robustness evaluation.

The report must name the planted site, ``medfed explain`` at that site must light the marker, and
every site's robustness under attack must reach the summary and the report; the same data without the
marker flags no site.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


def medfed(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medfed.common.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "planted"
    res = medfed("simulate", "--explain-metrics", "--shortcut-site", "0", "--seed", "1",
                 "--robustness-eval", "fgsm,pgd", "--robustness-eps", "1,8", "--robustness-steps", "3",
                 "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_the_report_names_the_planted_site(planted: Path):
    summary = json.loads((planted / "summary.json").read_text())
    assert summary["explain"]["flagged"] == ["site-0"]
    spot = summary["explain"]["sites"]["site-0"]["classes"]["1"]
    assert spot["cell"] == [0, 0] or spot["cell"][0] == 0  # the top border, where the bar is
    report = (planted / "report.md").read_text()
    assert "**Flagged: site-0**" in report and "explain_maps.png" in report
    assert "data:image/png;base64," in (planted / "report.html").read_text()


def test_explain_at_the_planted_site_lights_the_marker(planted: Path, tmp_path: Path):
    from medfed.client.checkpoint_site import study_config
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.data.federated import load_study_data
    from medfed.common.data.shortcut import marker_region
    from medfed.common.explain.metrics import mass, region_shares
    from medfed.common.explain.site import split_saliency
    from medfed.common.privacy_audit import model_from_state

    out = tmp_path / "explain"
    res = medfed("explain", "--model", str(planted / "model.pt"), "--site-index", "0", "--class", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "explain.html").is_file()
    ckpt = load_checkpoint(planted / "model.pt")
    model = model_from_state(ckpt.model, ckpt.state_dict)
    fed = load_study_data(study_config(ckpt.config))
    rows, cols = marker_region(28)
    bar = np.zeros((28, 28), bool)
    bar[rows, cols] = True
    shares = {}
    for k in (0, 1):
        test = fed.sites[k].test
        pos = test.subset(np.nonzero(test.labels == 1)[0])
        dist, _ = mass(split_saliency(model, "cnn", pos, torch.device("cpu")))
        shares[k] = float(region_shares(dist, bar).mean())
    assert shares[0] > 2 * bar.mean() and shares[0] > 2 * shares[1], shares  # lit at site 0, not at site 1


def test_robustness_reaches_the_summary_and_the_report(planted: Path):
    summary = json.loads((planted / "summary.json").read_text())
    robust = summary["robustness"]
    assert robust["attacks"] == ["fgsm", "pgd"] and robust["eps"] == ["1", "8"]
    for site, rec in robust["sites"].items():
        assert rec["pgd"]["8"]["accuracy"] <= rec["clean"]["accuracy"] + 1e-9, site
        assert rec["pgd"]["8"]["accuracy"] <= rec["pgd"]["1"]["accuracy"] + 1e-9, site
    assert robust["pooled"]["pgd"]["8"]["accuracy"] < robust["pooled"]["clean"]["accuracy"]
    report = (planted / "report.md").read_text()
    assert "## Robustness under attack" in report and (planted / "robustness_sites.png").is_file()


def test_the_same_data_without_the_marker_flags_no_site(tmp_path: Path):
    out = tmp_path / "plain"
    res = medfed("simulate", "--explain-metrics", "--seed", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["explain"]["flagged"] == []

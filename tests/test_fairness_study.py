"""End to end: a federated study on synthetic sites with a known injected bias names the disadvantaged group.

Three hospital sites are written as PNG files with a manifest (path, label, split, sex), from
the synthetic generator with the lesion contrast of women lowered to 0.3 and women 30% of
every site. ``medfed simulate --site-configs`` runs them on Flower's simulation engine; the
per-group metrics reach the server only as counts and histograms, and the report must name
women as the group the model underdiagnoses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from medfed.common.data.synthetic import make_synthetic

from tests.intake_factory import write_manifest, write_site_yaml
from tests.test_simulate_e2e import medfed

SEX = ("female", "male")
LABELS = ("normal", "disease")


def write_biased_sites(root: Path, seed: int = 0) -> list[Path]:
    """Synthetic sites as PNG manifests; women (group 0) have a fainter lesion and are fewer."""
    from PIL import Image

    fed = make_synthetic(num_sites=3, seed=seed, samples_per_site=[420, 360, 300], label_skew=0.0,
                         group_contrast=(0.3, 1.0), group_fraction=(0.7, 0.7, 0.7), disease_signal=1.5)
    yamls = []
    for site in fed.sites:
        data = root / site.site_id / "data"
        rows = []
        for split in ("train", "val", "test"):
            part = getattr(site, split)
            for i in range(len(part)):
                rel = f"img/{split}-{i:04d}.png"
                (data / "img").mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(part.images[i, 0] * 255).astype(np.uint8)).save(data / rel)
                rows.append({"path": rel, "label": LABELS[part.labels[i]], "split": split,
                             "patient_id": f"{site.site_id}-{split}-{i}", "sex": SEX[part.groups[i]]})
        write_manifest(data / "manifest.csv", rows)
        yamls.append(write_site_yaml(
            root / site.site_id / "site.yaml", **{"site-id": site.site_id, "data-root": "data",
                                                  "manifest": "manifest.csv", "labels": list(LABELS),
                                                  "state-dir": "state", "group-attribute": "sex",
                                                  "image-size": 28}))
    return yamls


@pytest.mark.slow
def test_report_names_the_group_with_the_injected_bias(tmp_path):
    yamls = write_biased_sites(tmp_path / "sites")
    run = tmp_path / "run"
    res = medfed("simulate", "--site-configs", ",".join(map(str, yamls)), "--rounds", "3", "--local-steps", "25",
                 "--batch-size", "32", "--lr", "0.003", "--seed", "1", "--out", str(run), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["auc"] > 0.75, "the model must learn the task for its errors to mean anything"
    fair = summary["fairness"]
    assert fair["attribute"] == "sex" and fair["threshold"] == summary["threshold"]
    assert fair["disadvantaged-group"] == "female"
    assert fair["gaps"]["tpr"]["worst-group"] == "female" and fair["gaps"]["tpr"]["gap"] > 0.15
    assert fair["gaps"]["auc"]["worst-group"] == "female"
    low, high = fair["gaps"]["ci"]["tpr"]
    assert 0.0 < low <= fair["gaps"]["tpr"]["gap"] <= high  # the gap is not a sampling accident
    assert set(fair["sites"]) == {"site-0", "site-1", "site-2"}
    assert fair["central"]["disadvantaged-group"] == "female"  # per sample on the server agrees
    # the sites' pooled counts are exact: the same TPR as the server's per-sample computation
    for name in SEX:
        assert fair["groups"][name]["tpr"] == pytest.approx(fair["central"]["groups"][name]["tpr"])
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["fairness"]["test"]["groups"]["female"]["n"] > 0 for r in rounds)
    assert all("fairness" in row and not any("-g0-" in k for k in row) for row in rounds[-1]["sites"].values())
    report = (run / "report.md").read_text()
    assert "**Disadvantaged sex group: female**" in report
    assert (run / "fairness_group_tpr.png").is_file() and (run / "fairness_gaps.png").is_file()

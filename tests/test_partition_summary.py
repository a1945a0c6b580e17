"""Partition summary: exact counts, markdown, PNG, and the files a simulation writes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.common.cli import main
from medfed.common.data.partition_summary import (
    PARTITION_JSON,
    PARTITION_MD,
    PARTITION_PNG,
    format_partition_markdown,
    plot_partition,
    summarize_partition,
    write_partition_summary,
)
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData


def split(labels: list[int], groups: list[int] | None, value: float = 0.5) -> ImageSplit:
    n = len(labels)
    return ImageSplit(np.full((n, 1, 2, 2), value, np.float32), np.array(labels, np.int64),
                      None if groups is None else np.array(groups, np.int64))


def small_fed(with_groups: bool = True) -> FederatedData:
    g = (lambda codes: codes) if with_groups else (lambda codes: None)
    info = DatasetInfo("toy", 2, 1, 2, ("normal", "disease"),
                       *(("sex", ("female", "male")) if with_groups else ()))
    sites = (
        SiteData("a", split([0, 0, 1], g([0, 1, 1]), 0.2), split([1], g([0])), split([0, 1], g([1, 1]))),
        SiteData("b", split([1, 1, 1, 0], g([0, 0, 0, 1]), 0.6), split([0], g([1])), split([1], g([0]))),
    )
    return FederatedData(info, sites, central_test=None, central_val=None)


def test_counts_are_exact():
    s = summarize_partition(small_fed(), {"partition": "toy", "alpha": np.float64(0.5)})
    json.dumps(s)  # JSON-able, numpy scalars included
    assert s["settings"] == {"partition": "toy", "alpha": 0.5}
    a, b = (site["splits"] for site in s["sites"])
    assert a["train"] == {"n": 3, "labels": [2, 1], "groups": [1, 2], "label_by_group": [[1, 1], [0, 1]],
                          "mean": 0.2, "std": 0.0}
    assert b["train"]["label_by_group"] == [[0, 1], [3, 0]]
    assert s["totals"]["train"]["labels"] == [3, 4] and s["totals"]["train"]["groups"] == [4, 3]
    assert s["totals"]["test"]["n"] == 3
    np.testing.assert_allclose(s["totals"]["train"]["mean"], (3 * 0.2 + 4 * 0.6) / 7, atol=1e-5)
    pooled = np.concatenate([np.full(12, 0.2), np.full(16, 0.6)])
    np.testing.assert_allclose(s["totals"]["train"]["std"], pooled.std(), atol=1e-4)


def test_markdown_lists_every_site_split_and_cell():
    md = format_partition_markdown(summarize_partition(small_fed(), {"partition": "toy"}))
    assert "# Partition: toy, 2 sites" in md and "partition=toy" in md
    assert "| site | split | n | normal | disease | sex=female | sex=male | mean | std |" in md
    assert "| a | train | 3 | 2 | 1 | 1 | 2 | 0.200 | 0.000 |" in md
    assert "| all | test | 3 | 1 | 2 | 1 | 2 |" in md
    assert "| site | normal/female | normal/male | disease/female | disease/male |" in md
    assert "| b | 0 | 2 | 4 | 0 |" in md  # train + val + test of site b


def test_without_groups():
    s = summarize_partition(small_fed(with_groups=False))
    assert s["group_name"] is None and s["sites"][0]["splits"]["train"]["groups"] is None
    md = format_partition_markdown(s)
    assert "sex" not in md and "label x" not in md
    one_row = Image.open(io.BytesIO(plot_partition(s)))
    two_rows = Image.open(io.BytesIO(plot_partition(summarize_partition(small_fed()))))
    assert two_rows.size[1] > 1.5 * one_row.size[1]  # a second row of panels (by group)


def test_write_partition_summary(tmp_path):
    paths = write_partition_summary(small_fed(), tmp_path / "run", {"partition": "toy"})
    assert [p.name for p in paths] == [PARTITION_JSON, PARTITION_MD, PARTITION_PNG]
    assert json.loads(paths[0].read_text())["sites"][1]["site"] == "b"
    img = Image.open(paths[2])
    assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 400
    pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank canvas


def test_data_partition_cli(tmp_path, capsys):
    rc = main(["data", "partition", "--sites", "3", "--partition", "demographic", "--group-proportions",
               "0.9,0.5,0.1", "--shift", "scanner", "--seed", "2", "--out", str(tmp_path)])
    assert rc == 0
    s = json.loads((tmp_path / PARTITION_JSON).read_text())
    fractions = [site["splits"]["train"]["groups"][1] / site["splits"]["train"]["n"] for site in s["sites"]]
    np.testing.assert_allclose(fractions, [0.9, 0.5, 0.1], atol=0.02)
    assert s["settings"]["shift"] == "scanner" and len(s["settings"]["scanners"]) == 3
    means = [site["splits"]["train"]["mean"] for site in s["sites"]]
    assert np.ptp(means) > 0.005  # the scanners differ
    assert (tmp_path / PARTITION_PNG).stat().st_size > 10_000
    assert main(["data", "partition", "--partition", "natural", "--out", str(tmp_path)]) == 2
    assert "has no such column" in capsys.readouterr().err


def test_simulate_local_writes_the_partition(tmp_path):
    out = tmp_path / "run"
    rc = main(["simulate", "--mode", "local", "--sites", "2", "--rounds", "1", "--local-steps", "1",
               "--batch-size", "16", "--partition", "quantity", "--quantity-exponent", "2", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / PARTITION_JSON).read_text())
    summary = json.loads((out / "summary.json").read_text())
    train = {site["site"]: site["splits"]["train"]["n"] for site in s["sites"]}
    assert train == {k: int(v["num-examples"]) for k, v in summary["sites"].items()}
    assert abs(train["site-0"] / train["site-1"] - 4.0) < 0.1  # exponent 2: 1 : 1/4
    assert s["settings"]["quantity-exponent"] == 2.0
    assert (out / PARTITION_PNG).is_file() and (out / PARTITION_MD).is_file()


@pytest.mark.slow
def test_simulate_federated_writes_the_partition(tmp_path):
    out = tmp_path / "fed"
    res = subprocess.run(
        [sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "2", "--rounds", "1",
         "--local-steps", "1", "--batch-size", "16", "--partition", "demographic", "--group-proportions",
         "0.8,0.2", "--shift", "scanner", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / PARTITION_JSON).read_text())
    assert [site["site"] for site in s["sites"]] == ["site-0", "site-1"]
    males = [site["splits"]["test"]["groups"][1] / site["splits"]["test"]["n"] for site in s["sites"]]
    assert males[0] > 0.7 and males[1] < 0.3
    assert Path(out / PARTITION_PNG).stat().st_size > 10_000

"""Report writing on a small fake run directory (3 rounds, 3 sites of unequal size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medfed.server import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = {"site-0": 120, "site-1": 45, "site-2": 300}


def make_round(number: int, with_test: bool = True) -> dict:
    sites = {
        site: {
            "train-loss": 0.9 - 0.1 * number - 0.01 * i,
            "num-examples": n,
            "val-auc": 0.6 + 0.05 * number + 0.01 * i,
            "val-accuracy": 0.55 + 0.05 * number,
            **({"test-auc": 0.58 + 0.05 * number + 0.01 * i, "test-accuracy": 0.6 + 0.04 * number} if with_test else {}),
        }
        for i, (site, n) in enumerate(SITES.items())
    }
    return {
        "round": number,
        "time": {"round-s": 10.0 + number, "train-s": 8.0, "evaluate-s": 1.5},
        "bytes": {"sent": 3 * 1024 * 1024, "received": 3 * 1024 * 1024 + 100},
        "train": {"loss": 0.85 - 0.1 * number, "num-examples": sum(SITES.values())},
        "val": {"auc": 0.62 + 0.05 * number, "accuracy": 0.6 + 0.04 * number},
        "test": {"auc": 0.6 + 0.05 * number, "accuracy": 0.6 + 0.04 * number} if with_test else {},
        "sites": sites,
        "failures": [{"site": "site-1", "node": 17, "reason": "timeout | no reply"}] if number == 2 else [],
    }


SUMMARY = {
    "mode": "federated",
    "strategy": "fedavg",
    "rounds": 3,
    "selected-round": 2,
    "selection": "val-auc",
    "threshold": 0.43,
    "test": {"auc": 0.8123, "accuracy": 0.7654, "balanced-accuracy": 0.7311, "sensitivity": 0.6987, "specificity": 0.7635},
    "final-round-test": {"auc": 0.8011, "accuracy": 0.75, "balanced-accuracy": 0.72, "sensitivity": 0.7, "specificity": 0.74},
    "sites": {
        "site-0": {"num-examples": 120.0, "val-auc": 0.7111, "test-auc": 0.7021, "test-accuracy": 0.6811},
        "site-1": {"num-examples": 45.0, "val-auc": 0.7222, "test-auc": 0.7032, "test-accuracy": 0.6822},
        "site-2": {"num-examples": 300.0, "val-auc": 0.7333, "test-auc": 0.7043, "test-accuracy": 0.6833},
    },
    "config": {"num-server-rounds": 3, "local-epochs": 1},
    "dataset": {"name": "synthetic", "classes": 2},
    "wall-s": 42.5,
}


def write_run(run_dir: Path, rounds: list[dict], summary: dict | None = SUMMARY, tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rounds)
    (run_dir / report.METRICS_FILE).write_text(lines + tail)
    if summary is not None:
        (run_dir / report.SUMMARY_FILE).write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run-1", [make_round(i) for i in (1, 2, 3)])


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


# ---------------------------------------------------------------------------
# write_report
# ---------------------------------------------------------------------------
def test_write_report_contents_and_plots(run_dir):
    out = report.write_report(run_dir)
    assert out == run_dir / "report.md"
    text = out.read_text()
    for expected in ("federated", "fedavg", "synthetic", "site-0", "site-1", "site-2"):
        assert expected in text
    # selection is explained as validation-only
    assert "**2**" in text and "0.430" in text and "never test data" in text
    # final test metrics (selected and final round)
    for key in ("auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity"):
        assert f"| {key} |" in text
    for number in ("0.8123", "0.7654", "0.7311", "0.6987", "0.7635", "0.8011"):
        assert number in text
    # per-site table: counts as integers, metrics from the summary
    assert "| site-1 | 45 | 0.7222 | 0.7032 | 0.6822 |" in text
    assert "| site-2 | 300 | 0.7333 | 0.7043 | 0.6833 |" in text
    # totals: 11 + 12 + 13 s of rounds, 3 x 3 MiB sent; wall time
    assert "36.0 s" in text and "9.00 MiB" in text and "42.5 s" in text
    # failures are listed, with the pipe escaped
    assert "timeout \\| no reply" in text
    for name in ("site_val_auc.png", "site_test_auc.png", "train_loss.png"):
        assert f"]({name})" in text
        assert_valid_png(run_dir / name)


def test_write_report_without_test_metrics_skips_test_plot(tmp_path):
    summary = {**SUMMARY, "test": {}, "final-round-test": {}, "sites": {}}
    run_dir = write_run(tmp_path / "run", [make_round(i, with_test=False) for i in (1, 2, 3)], summary)
    text = report.write_report(run_dir).read_text()
    assert not (run_dir / "site_test_auc.png").exists()
    assert "site_test_auc.png" not in text
    assert (run_dir / "site_val_auc.png").exists()
    # per-site rows fall back to the selected round's record
    assert "| site-1 | 45 | 0.7100 | n/a | n/a |" in text


def test_write_report_centralized_pseudo_site(tmp_path):
    rounds = []
    for i in (1, 2):
        record = make_round(i)
        record["sites"] = {"pooled": {"train-loss": 0.5 / i, "num-examples": 465, "val-auc": 0.7 + 0.05 * i}}
        rounds.append(record)
    summary = {**SUMMARY, "mode": "centralized", "rounds": 2, "selected-round": 2, "threshold": None,
               "sites": {"pooled": {"num-examples": 465, "val-auc": 0.8, "test-auc": 0.79, "test-accuracy": 0.75}}}
    run_dir = write_run(tmp_path / "central", rounds, summary)
    text = report.write_report(run_dir).read_text()
    assert "centralized" in text and "| pooled | 465 | 0.8000 | 0.7900 | 0.7500 |" in text
    assert "argmax" in text
    assert_valid_png(run_dir / "site_val_auc.png")


def test_write_report_missing_summary_raises(tmp_path):
    run_dir = write_run(tmp_path / "run", [make_round(1)], summary=None)
    with pytest.raises(FileNotFoundError, match="summary.json.*written by the server"):
        report.write_report(run_dir)


def test_write_report_missing_metrics_raises(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / report.SUMMARY_FILE).write_text(json.dumps(SUMMARY))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl.*written by the server"):
        report.write_report(run_dir)


def test_write_report_missing_run_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        report.write_report(tmp_path / "nope")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
def test_read_metrics_skips_truncated_last_line(tmp_path, caplog):
    run_dir = write_run(tmp_path / "run", [make_round(1), make_round(2)], tail='{"round": 3, "time": {"rou')
    with caplog.at_level("WARNING", logger="medfed.server.report"):
        rounds = report.read_metrics(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert "truncated" in caplog.text
    assert report.write_report(run_dir).is_file()


def test_read_metrics_corrupt_middle_line_raises(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / report.METRICS_FILE).write_text('{"round": 1}\n{"round": 2\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.read_metrics(run_dir)


def test_read_metrics_ignores_blank_lines(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / report.METRICS_FILE).write_text('{"round": 1}\n\n{"round": 2}\n\n')
    assert [r["round"] for r in report.read_metrics(run_dir)] == [1, 2]


def test_read_summary(run_dir):
    assert report.read_summary(run_dir)["strategy"] == "fedavg"


def test_read_summary_invalid_json_raises(tmp_path):
    run_dir = write_run(tmp_path / "run", [make_round(1)], summary=None)
    (run_dir / report.SUMMARY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="summary.json"):
        report.read_summary(run_dir)


# ---------------------------------------------------------------------------
# Plots and tables
# ---------------------------------------------------------------------------
def test_plot_site_metrics_writes_png(run_dir, tmp_path):
    rounds = report.read_metrics(run_dir)
    out = report.plot_site_metrics(rounds, "val-auc", tmp_path / "plots" / "v.png")
    assert_valid_png(out)
    with Image.open(out) as image:  # 7 x 4.5 in at 110 dpi
        assert image.size == (770, 495)


def test_plot_site_metrics_unknown_metric_raises(run_dir, tmp_path):
    with pytest.raises(ValueError, match="no values of metric 'val-f1'"):
        report.plot_site_metrics(report.read_metrics(run_dir), "val-f1", tmp_path / "x.png")


def test_plot_site_metrics_closes_figures(run_dir, tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    report.plot_site_metrics(report.read_metrics(run_dir), "train-loss", tmp_path / "t.png")
    assert len(plt.get_fignums()) == before


def test_format_site_table_aligned():
    table = report.format_site_table(SUMMARY)
    lines = table.splitlines()
    assert lines[0].split() == ["site", "n", "train", "val-auc", "test-auc", "test-accuracy"]
    assert len(lines) == 2 + len(SITES)
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert lines[3].split() == ["site-1", "45", "0.7222", "0.7032", "0.6822"]


def test_format_site_table_natural_order_and_empty():
    summary = {"sites": {"site-10": {"val-auc": 0.5}, "site-2": {"val-auc": float("nan")}}}
    lines = report.format_site_table(summary).splitlines()
    assert lines[2].startswith("site-2") and "n/a" in lines[2]
    assert lines[3].startswith("site-10")
    assert "no per-site metrics" in report.format_site_table({})


def test_import_does_not_load_matplotlib():
    code = "import sys, medfed.server.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

"""Subgroup fairness without moving data: site aggregates, server pooling, gaps, bootstrap, report."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from medfed.client.boundary import BoundaryError, check_reply
from medfed.common import fairness as fx
from medfed.common.constants import MAX_GROUPS, NUM_HIST_BINS, group_metric_key
from medfed.common.metrics import roc_auc

NAMES = ("female", "male")


def _data(n: int = 400, seed: int = 0, gap: float = 1.0):
    """Scores at bin centres (so binned and exact AUC agree); group 0 separated ``gap`` times less."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 2, n)
    y = rng.integers(0, 2, n)
    raw = 0.5 + 0.25 * (2 * y - 1) * np.where(g == 0, gap, 1.0) + 0.2 * rng.standard_normal(n)
    s = (np.floor(np.clip(raw, 0, 0.999) * NUM_HIST_BINS) + 0.5) / NUM_HIST_BINS
    return s, y, g


# ---------------------------------------------------------------------------
# Site side
# ---------------------------------------------------------------------------
def test_group_counts_exact_numbers():
    scores = np.array([0.9, 0.2, 0.6, 0.4, 0.7, 0.1, 0.8, 0.3, 0.55, 0.45, 0.65, 0.05])
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1])
    groups = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    out = fx.group_counts(scores, labels, groups, threshold=0.5, num_groups=2, bins=10)
    keys = [group_metric_key("test", k, n) for k in (0, 1) for n in ("tp", "fp", "tn", "fn")]
    got = {key: out[key] for key in keys}
    # group 0: pos 0.9 0.2 0.7 -> tp 2 fn 1; neg 0.6 0.4 0.1 -> fp 1 tn 2
    # group 1: pos 0.8 0.55 0.05 -> tp 2 fn 1; neg 0.3 0.45 0.65 -> fp 1 tn 2
    assert got == {"test-g0-tp": 2, "test-g0-fp": 1, "test-g0-tn": 2, "test-g0-fn": 1,
                   "test-g1-tp": 2, "test-g1-fp": 1, "test-g1-tn": 2, "test-g1-fn": 1}
    assert out["test-g0-hist-pos"] == [0, 0, 1, 0, 0, 0, 0, 1, 0, 1]
    assert out["test-g1-hist-neg"] == [0, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    # a lower threshold moves group 0's 0.4 negative and 0.2 positive to predicted positive
    low = fx.group_counts(scores, labels, groups, threshold=0.2, bins=10, split="val")
    assert (low["val-g0-tp"], low["val-g0-fp"], low["val-g0-fn"]) == (3, 2, 0)


@pytest.mark.parametrize("sizes, expected", [
    ({0: 10, 1: 10}, set()),
    ({0: 3, 1: 40}, {0, 1}),  # alone, the overall metrics minus group 1 would reveal group 0
    ({0: 3, 1: 4, 2: 40}, {0, 1}),  # 3 + 4 >= 5 together
    ({0: 3, 1: 40, 2: 2}, {0, 2}),  # 3 + 2 >= 5
    ({0: 2, 1: 2, 2: 10, 3: 12}, {0, 1, 2}),  # 2 + 2 < 5: the next smallest goes too
    ({0: 5, 1: 0}, set()),
])
def test_k_anonymity_with_complementary_suppression(sizes, expected):
    assert fx.suppressed_groups(sizes, min_samples=5) == expected


def test_small_group_sends_only_a_suppressed_flag():
    s, y, g = _data(60)
    g[:4] = 2  # four samples of a third group, and its complement must be large enough
    out = fx.group_counts(s, y, g, num_groups=3)
    assert out["test-g2-suppressed"] == 1.0
    assert not any(k.startswith("test-g2-") and k != "test-g2-suppressed" for k in out)
    # with the suppressed group, the next smallest is hidden too (4 < 5 samples together)
    sizes = {k: int(np.sum(g == k)) for k in range(3)}
    smallest = min((0, 1), key=sizes.get)
    assert out[f"test-g{smallest}-suppressed"] == 1.0


def test_group_codes_beyond_max_groups_are_never_sent():
    s, y, _ = _data(200)
    g = np.where(np.arange(200) < 100, 0, MAX_GROUPS)  # a group code the reply keys cannot hold
    out = fx.group_counts(s, y, g)
    assert all(k.startswith("test-g0-") for k in out) and "test-g0-tp" in out


@pytest.mark.parametrize("kwargs, needle", [
    ({"groups": np.array([0, 1])}, "one code per label"),
    ({"groups": np.array([0, -1, 0, 1])}, "non-negative integer"),
    ({"labels": np.array([0, 2, 1, 0])}, "must be 0 .negative. or 1"),
    ({"scores": np.array([0.1, 1.5, 0.2, 0.3])}, "probabilities"),
    ({"threshold": 1.2}, "threshold"),
    ({"num_groups": 1}, "out of range"),
])
def test_group_counts_refuses_bad_input(kwargs, needle):
    args = {"scores": np.array([0.1, 0.9, 0.2, 0.3]), "labels": np.array([0, 1, 1, 0]),
            "groups": np.array([0, 1, 0, 1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fx.group_counts(**args)


def test_the_privacy_boundary_allows_group_aggregates_and_nothing_else():
    s, y, g = _data(100)
    metrics = {**fx.group_counts(s, y, g), "num-examples": 10.0}

    def content(m):
        return RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
                           "metrics": MetricRecord(m), "site": ConfigRecord({"site-id": "a"})})

    check_reply(content(metrics), {"w": (2,)}, "a")
    for bad, needle in [({"test-g0-hist-pos": [1.0] * 7}, "7 bins"),
                        ({f"test-g{MAX_GROUPS}-tp": 3.0}, "outside the allowlist"),
                        ({"test-g0-tp": [1.0] * NUM_HIST_BINS}, "may not be a list"),
                        ({"test-g0-scores": 0.4}, "outside the allowlist"),
                        ({"test-g0-tp": 1e6}, "inconsistent")]:
        with pytest.raises(BoundaryError, match=needle):
            check_reply(content({**metrics, **bad}), {"w": (2,)}, "a")


# ---------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------
def test_group_metrics_and_gaps_exact_numbers():
    female = fx.group_metrics(tp=6, fp=2, tn=8, fn=4, auc=0.7)
    male = fx.group_metrics(tp=9, fp=1, tn=9, fn=1, auc=0.9)
    assert female == {"n": 20.0, "positives": 10.0, "auc": 0.7, "accuracy": 0.7, "tpr": 0.6, "fpr": 0.2,
                      "underdiagnosis-rate": 0.4, "predicted-positive-rate": 0.4}
    gaps = fx.fairness_gaps({"female": female, "male": male})
    assert gaps["tpr"] == {"worst-group": "female", "worst": 0.6, "best": 0.9, "gap": pytest.approx(0.3)}
    assert gaps["fpr"]["worst-group"] == "female" and gaps["fpr"]["gap"] == pytest.approx(0.1)  # higher is worse
    assert gaps["underdiagnosis-rate"]["worst-group"] == "female"
    assert gaps["underdiagnosis-rate"]["worst"] == 0.4
    assert gaps["equalized-odds-difference"] == pytest.approx(0.3)  # max(0.3, 0.1)
    assert gaps["demographic-parity-difference"] == pytest.approx(0.1)  # 0.5 - 0.4
    one = fx.fairness_gaps({"female": female})
    assert one["tpr"]["worst-group"] is None and math.isnan(one["equalized-odds-difference"])


def test_pooled_site_aggregates_equal_the_metrics_of_the_concatenated_data():
    s, y, g = _data(600, seed=1, gap=0.4)
    cut = [0, 150, 380, 600]  # three sites of unequal size
    per_site = {f"site-{i}": fx.group_counts(s[a:b], y[a:b], g[a:b], threshold=0.47)
                for i, (a, b) in enumerate(zip(cut, cut[1:]))}
    agg = fx.aggregate_fairness(per_site, "test", NAMES)
    reference = fx.sample_fairness(s, y, g, threshold=0.47, names=NAMES)
    for name in NAMES:
        for metric in fx.GROUP_METRICS:
            assert agg.pooled["groups"][name][metric] == pytest.approx(reference["groups"][name][metric]), metric
    assert agg.pooled["groups"]["female"]["auc"] == pytest.approx(roc_auc(y[g == 0], s[g == 0]))
    assert agg.pooled["disadvantaged-group"] == reference["disadvantaged-group"] == "female"
    assert set(agg.sites) == {"site-0", "site-1", "site-2"}
    site0 = fx.sample_fairness(s[:150], y[:150], g[:150], 0.47, NAMES)
    assert agg.sites["site-0"]["groups"]["male"]["tpr"] == pytest.approx(site0["groups"]["male"]["tpr"])


def test_suppressed_and_invalid_sites(caplog):
    s, y, g = _data(200, seed=2)
    small_g = g[:40].copy()
    small_g[:] = 1
    small_g[:3] = 0  # three women: suppressed, and men with them (complement)
    big = fx.group_counts(s[40:], y[40:], g[40:])
    small = fx.group_counts(s[:40], y[:40], small_g)
    assert small == {"test-g0-suppressed": 1.0, "test-g1-suppressed": 1.0}
    broken = dict(big)
    broken["test-g1-tp"] += 1  # counts no longer match the histograms
    with caplog.at_level(logging.WARNING):
        agg = fx.aggregate_fairness({"big": big, "small": small, "broken": broken}, "test", NAMES)
    assert "broken" in caplog.text and "disagree" in caplog.text and "broken" not in agg.sites
    assert agg.pooled["groups"]["female"]["suppressed-at"] == ["small"]
    assert agg.pooled["groups"]["female"]["n"] == float(np.sum(g[40:] == 0))  # only the big site pooled
    assert agg.sites["small"]["groups"]["female"] == {"code": 0, "n": 0.0, "suppressed-at": ["small"]}
    assert fx.aggregate_fairness({"a": {"test-auc": 0.7}}, "test") is None
    # a group suppressed everywhere is listed, unavailable, and names no worst group
    only_small = fx.aggregate_fairness({"small": small}, "test", NAMES)
    assert only_small.pooled["groups"]["male"]["n"] == 0.0 and only_small.pooled["disadvantaged-group"] is None


@pytest.mark.parametrize("bad, needle", [
    ({"test-g0-tp": -1.0}, "non-negative whole count"),
    ({"test-g0-fn": 1.5}, "non-negative whole count"),
    ({"test-g0-hist-pos": "x"}, "list of bin counts"),
])
def test_read_group_counts_refuses_malformed(bad, needle):
    s, y, g = _data(50)
    metrics = {**fx.group_counts(s, y, g), **bad}
    with pytest.raises(ValueError, match=needle):
        fx.read_group_counts(metrics, "test")
    partial = {k: v for k, v in fx.group_counts(s, y, g).items() if k != "test-g1-tn"}
    with pytest.raises(ValueError, match="test-g1-tn missing"):
        fx.read_group_counts(partial, "test")


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_brackets_the_estimate():
    s, y, g = _data(400, seed=3, gap=0.5)
    a = fx.bootstrap_samples(s, y, g, 0.5, NAMES, replicates=200, seed=7)
    assert a == fx.bootstrap_samples(s, y, g, 0.5, NAMES, replicates=200, seed=7)
    assert a != fx.bootstrap_samples(s, y, g, 0.5, NAMES, replicates=200, seed=8)
    point = fx.sample_fairness(s, y, g, 0.5, NAMES)
    for name in NAMES:
        for metric in fx.GROUP_METRICS:
            low, high = a["groups"][name][metric]
            assert low <= point["groups"][name][metric] <= high, (name, metric)
    low, high = a["gaps"]["tpr"]
    assert 0 <= low <= point["gaps"]["tpr"]["gap"] <= high
    # more data, narrower intervals
    s4, y4, g4 = _data(1600, seed=3, gap=0.5)
    b = fx.bootstrap_samples(s4, y4, g4, 0.5, NAMES, replicates=200, seed=7)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(b["groups"]["female"]["tpr"]) < 0.7 * width(a["groups"]["female"]["tpr"])


def test_bootstrap_from_counts_agrees_with_bootstrap_from_samples():
    s, y, g = _data(800, seed=4, gap=0.5)
    agg = fx.aggregate_fairness({"a": fx.group_counts(s, y, g)}, "test", NAMES)
    from_counts = fx.bootstrap_counts(agg.counts, NAMES, replicates=2000, seed=1)
    from_samples = fx.bootstrap_samples(s, y, g, 0.5, NAMES, replicates=2000, seed=1)
    for name in NAMES:
        for metric in fx.GROUP_METRICS:
            assert np.allclose(from_counts["groups"][name][metric], from_samples["groups"][name][metric],
                               atol=0.02), (name, metric)
    for key in ("tpr", "auc", "equalized-odds-difference", "demographic-parity-difference"):
        assert np.allclose(from_counts["gaps"][key], from_samples["gaps"][key], atol=0.025), key


def test_bootstrap_interval_covers_the_true_rate_about_95_percent():
    """Property: over many samples of a known population, the 95% TPR interval covers the truth."""
    rng = np.random.default_rng(0)
    true_tpr, covered, trials = 0.7, 0, 200
    for t in range(trials):
        n_pos = 80
        tp = rng.binomial(n_pos, true_tpr)
        counts = {0: fx.GroupCounts(tp, 5, 45, n_pos - tp, np.array([n_pos - tp, tp]), np.array([45, 5]))}
        low, high = fx.bootstrap_counts(counts, replicates=400, seed=t)["groups"]["group-0"]["tpr"]
        covered += low <= true_tpr <= high
    assert 0.88 <= covered / trials <= 0.99


def test_bootstrap_refuses_bad_settings():
    s, y, g = _data(40)
    with pytest.raises(ValueError, match="replicates"):
        fx.bootstrap_samples(s, y, g, replicates=3)
    with pytest.raises(ValueError, match="level"):
        fx.bootstrap_samples(s, y, g, level=95)


# ---------------------------------------------------------------------------
# Wiring: a site's evaluation reply, the server's rows and records, the report
# ---------------------------------------------------------------------------
def test_evaluate_round_sends_group_aggregates_at_the_servers_threshold(tmp_path):
    import torch
    from medfed.client.site_data import SiteRuntime
    from medfed.client.task import evaluate_round
    from medfed.common.arrays import model_to_arrays
    from medfed.common.config import StudyConfig
    from medfed.common.data.synthetic import make_synthetic
    from medfed.common.models import ModelSpec, build_model

    fed = make_synthetic(num_sites=2, seed=0, samples_per_site=[120, 100])
    site = SiteRuntime("site-0", fed.info, fed.sites[0], tmp_path / "state")
    cfg = StudyConfig(num_sites=2, out_dir=str(tmp_path), min_eval_n=5)  # splits of 18
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    out = evaluate_round(cfg, site, arrays, {})
    for split in ("val", "test"):
        data = getattr(fed.sites[0], split)
        counts = fx.read_group_counts(out, split)
        assert sum(c.n for c in counts.values() if c is not None) + sum(
            int(np.sum(data.groups == k)) for k, c in counts.items() if c is None) == len(data)
    test = fx.read_group_counts(out, "test")
    assert all(c is not None for c in test.values()) and set(test) == {0, 1}
    everyone = fx.read_group_counts(evaluate_round(cfg, site, arrays, {"threshold": 0.0}), "test")
    assert all(c.fn == 0 and c.tn == 0 for c in everyone.values())  # threshold 0: all predicted positive
    no_groups = SiteRuntime("site-0", fed.info, type(fed.sites[0])(
        "site-0", fed.sites[0].train, *(type(d)(d.images, d.labels) for d in (fed.sites[0].val, fed.sites[0].test))),
        tmp_path / "state")
    assert not any("-g0-" in k for k in evaluate_round(cfg, no_groups, arrays, {}))


def test_site_rows_keep_records_not_raw_counts():
    from medfed.server.federation import _site_rows
    from medfed.server.fairness import round_fairness

    s, y, g = _data(300, seed=5, gap=0.4)
    evals = {"site-0": {"test-auc": 0.8, "num-examples": 30.0, **fx.group_counts(s, y, g),
                        **fx.group_counts(s, y, g, split="val")}}
    record, per_site = round_fairness(evals, None, None)
    rows = _site_rows({}, evals, per_site)
    assert not any("-g0-" in k or "-g1-" in k for k in rows["site-0"])
    assert rows["site-0"]["test-auc"] == 0.8
    assert rows["site-0"]["fairness"]["test"]["disadvantaged-group"] == "group-0"  # unnamed in deployment
    assert record["threshold"] == 0.5 and set(record) == {"attribute", "threshold", "val", "test"}


def _run_dir(tmp_path, central: bool = True):
    from medfed.common.data.splits import DatasetInfo, ImageSplit
    from medfed.server.fairness import round_fairness, summary_fairness
    from medfed.server.recorder import RunRecorder

    info = DatasetInfo("synthetic", 2, 1, 28, ("normal", "disease"), "sex", NAMES)
    rec = RunRecorder(tmp_path / "run")
    s, y, g = _data(500, seed=6, gap=0.3)
    evals = {f"site-{i}": fx.group_counts(s[i::2], y[i::2], g[i::2]) for i in (0, 1)}
    for rnd in (1, 2, 3):
        record, sites = round_fairness(evals, None, info)
        rec.append_round({"round": rnd, "sites": {k: {"val-auc": 0.7, **v} for k, v in sites.items()},
                          "fairness": record, "val": {"auc": 0.7}})
    split = ImageSplit(np.zeros((len(y), 1, 2, 2), np.float32), y.astype(np.int64), g.astype(np.int64))
    fair = summary_fairness(evals, 0.5, info, seed=0, central=(split, s) if central else None, replicates=200)
    rec.write_summary({"mode": "federated", "rounds": 3, "selected-round": 3, "threshold": 0.5,
                       "test": {"auc": 0.8}, "sites": {}, "fairness": fair})
    return rec.run_dir, fair


def test_summary_and_report_name_the_disadvantaged_group(tmp_path):
    from medfed.server.report import write_report

    run_dir, fair = _run_dir(tmp_path)
    assert fair["disadvantaged-group"] == fair["central"]["disadvantaged-group"] == "female"
    assert fair["attribute"] == "sex" and fair["threshold"] == 0.5 and set(fair["sites"]) == {"site-0", "site-1"}
    assert len(fair["groups"]["female"]["ci"]["tpr"]) == 2 and len(fair["gaps"]["ci"]["tpr"]) == 2
    saved = json.loads((run_dir / "summary.json").read_text())["fairness"]
    assert saved["gaps"]["tpr"]["worst-group"] == "female"
    text = write_report(run_dir).read_text()
    for heading in ("## Fairness by group", "## Fairness gaps", "## Fairness by site and group",
                    "## Fairness over rounds"):
        assert heading in text
    assert "**Disadvantaged sex group: female**" in text
    assert "| equalized-odds difference |" in text and "| female | " in text
    for png in ("fairness_group_tpr.png", "fairness_group_auc.png", "fairness_gaps.png"):
        assert f"]({png})" in text
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_groups_has_no_fairness_section(tmp_path):
    from medfed.server.recorder import RunRecorder
    from medfed.server.report import write_report

    rec = RunRecorder(tmp_path / "plain")
    rec.append_round({"round": 1, "sites": {"site-0": {"val-auc": 0.7}}, "val": {"auc": 0.7}})
    rec.write_summary({"mode": "federated", "rounds": 1, "selected-round": 1, "test": {}, "sites": {}})
    text = write_report(rec.run_dir).read_text()
    assert "Fairness" not in text and not (rec.run_dir / "fairness_gaps.png").exists()


def test_a_deployed_server_names_the_groups_from_the_run_config():
    from medfed.common.config import parse_study_config
    from medfed.common.errors import ConfigError
    from medfed.server.fairness import config_group_names, round_fairness, summary_fairness

    s, y, g = _data(300, seed=5, gap=0.4)
    evals = {"site-0": {"num-examples": 30.0, **fx.group_counts(s, y, g)}}
    cfg = parse_study_config({"group-attribute": "sex", "group-names": "female, male"})
    names = config_group_names(cfg.group_attribute, cfg.group_names)
    assert names == ("sex", ("female", "male"))
    record, _ = round_fairness(evals, None, None, names)
    assert record["attribute"] == "sex" and set(record["test"]["groups"]) == {"female", "male"}
    fair = summary_fairness(evals, 0.5, None, seed=0, replicates=50, override=names)
    assert fair["disadvantaged-group"] in ("female", "male") and fair["attribute"] == "sex"
    assert config_group_names("", "") is None
    for bad in ({"group-names": "female,male"}, {"group-attribute": "sex", "group-names": "a,a"}):
        with pytest.raises(ConfigError, match="group-attribute"):
            parse_study_config(bad)

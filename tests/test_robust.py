"""Update norm screening, simulated attacks (sign flip, label flip) and one attacked simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medfed.common.config import StudyConfig, parse_study_config
from medfed.common.constants import MetricKey, RecordKey, SiteKey
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError
from medfed.server.replies import screen_train_replies, update_norm
from medfed.server.strategies import build_strategy, keep_dtypes
from medfed.simulations.attacks import (
    AttackSpec,
    attack_client_app,
    flip_labels,
    parse_attack,
    poison_study_data,
    sign_flip,
)

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _reply(site: str, arrays: dict[str, np.ndarray], n: float = 10.0, node: int = 0) -> Message:
    ins = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    content = RecordDict({
        RecordKey.ARRAYS.value: _record(arrays),
        RecordKey.METRICS.value: MetricRecord({MetricKey.NUM_EXAMPLES.value: n}),
        RecordKey.SITE.value: ConfigRecord({SiteKey.SITE_ID.value: site}),
    })
    return Message(content, reply_to=ins)


def _update(norm: float, seed: int) -> dict[str, np.ndarray]:
    """An update of exactly L2 norm ``norm`` away from GLOBAL (zeros)."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    total = np.sqrt((w**2).sum() + (b**2).sum())
    return {"w": (w * norm / total).astype(np.float32), "b": (b * norm / total).astype(np.float32)}


def _sites(norms: dict[str, float]) -> list[Message]:
    return [_reply(s, _update(n, i)) for i, (s, n) in enumerate(norms.items())]


# --------------------------------------------------------------------------- norm screening
def test_update_norm_is_the_l2_distance_to_the_global_model():
    ref = _record({"w": np.ones((2, 2), np.float32), "step": np.array([5], np.int64)})
    local = _record({"w": np.full((2, 2), 4.0, np.float32), "step": np.array([9], np.int64)})
    assert update_norm(local, ref) == pytest.approx(6.0)  # sqrt(4 * 3^2); integer counters ignored


def test_median_rule_excludes_the_outlier_and_names_its_site():
    replies = _sites({"site-0": 50.0, "site-1": 1.0, "site-2": 2.0, "site-3": 3.0, "site-4": 4.0})
    ok, failures = screen_train_replies(replies, _record(GLOBAL), max_norm_ratio=10.0)
    assert [f.site for f in failures] == ["site-0"]
    assert "max-update-norm-ratio=10" in failures[0].reason and "median 3" in failures[0].reason
    assert [m.content["site"][SiteKey.SITE_ID.value] for m in ok] == ["site-1", "site-2", "site-3", "site-4"]


def test_the_threshold_is_a_multiple_of_the_median():
    norms = {"site-0": 29.0, "site-1": 3.0, "site-2": 3.0, "site-3": 31.0}  # median 16: 29 < 160
    assert screen_train_replies(_sites(norms), _record(GLOBAL), max_norm_ratio=10.0)[1] == []
    ok, failures = screen_train_replies(_sites(norms), _record(GLOBAL), max_norm_ratio=1.9)  # 31 > 30.4
    assert [f.site for f in failures] == ["site-3"] and len(ok) == 3


def test_ratio_zero_turns_screening_off():
    replies = _sites({"site-0": 1e4, "site-1": 1.0, "site-2": 1.0})
    ok, failures = screen_train_replies(replies, _record(GLOBAL), max_norm_ratio=0.0)
    assert failures == [] and len(ok) == 3


def test_fewer_than_three_replies_are_not_norm_screened():
    replies = _sites({"site-0": 1e4, "site-1": 1.0})
    ok, failures = screen_train_replies(replies, _record(GLOBAL), max_norm_ratio=10.0)
    assert failures == [] and len(ok) == 2


def test_invalid_replies_do_not_count_toward_the_median():
    bad = _update(1.0, 9)
    bad["w"][0, 0] = np.nan
    replies = [*_sites({"site-0": 100.0, "site-1": 1.0, "site-2": 1.0}), _reply("site-3", bad)]
    ok, failures = screen_train_replies(replies, _record(GLOBAL), max_norm_ratio=10.0)
    assert sorted(f.site for f in failures) == ["site-0", "site-3"] and len(ok) == 2


def test_config_key_defaults_and_range():
    assert StudyConfig().max_update_norm_ratio == 10.0
    assert parse_study_config({"max-update-norm-ratio": 0}).max_update_norm_ratio == 0.0
    with pytest.raises(ConfigError, match="max-update-norm-ratio"):
        parse_study_config({"max-update-norm-ratio": 0.5})


# --------------------------------------------------------------------------- attacks
def test_sign_flip_sends_global_minus_scaled_update():
    g = _record({"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)})
    local = _record({"w": np.array([1.5, 1.0], np.float32), "n": np.array([4], np.int64)})
    out = sign_flip(local, g, scale=10.0)
    np.testing.assert_allclose(out["w"].numpy(), [1.0 - 10 * 0.5, 2.0 + 10 * 1.0])
    assert out["w"].numpy().dtype == np.float32 and out["n"].numpy().tolist() == [4]
    assert update_norm(out, g) == pytest.approx(10 * update_norm(local, g), rel=1e-6)


def test_flip_labels_binary_and_multiclass():
    assert flip_labels(np.array([0, 1, 1, 0]), 2).tolist() == [1, 0, 0, 1]
    y = np.array([0, 1, 2, 3], np.int64)
    assert flip_labels(y, 4).tolist() == [1, 2, 3, 0] and flip_labels(y, 4).dtype == np.int64


def _fed(num_sites: int = 3) -> FederatedData:
    rng = np.random.default_rng(0)

    def split(n):
        return ImageSplit(rng.random((n, 1, 4, 4), dtype=np.float32), rng.integers(0, 2, n))

    info = DatasetInfo("toy", 2, 1, 4, ("neg", "pos"))
    sites = tuple(SiteData(f"site-{i}", split(8 + i), split(4), split(4)) for i in range(num_sites))
    return FederatedData(info, sites, None, None)


def test_label_flip_poisons_only_the_malicious_sites_training_split():
    fed = _fed()
    poisoned = poison_study_data(fed, AttackSpec("label-flip", malicious_sites=1))
    assert (poisoned.sites[0].train.labels == 1 - fed.sites[0].train.labels).all()
    assert (poisoned.sites[0].val.labels == fed.sites[0].val.labels).all()
    assert all((p.train.labels == s.train.labels).all() for p, s in zip(poisoned.sites[1:], fed.sites[1:]))
    assert poisoned.sites[0].train.labels is not fed.sites[0].train.labels  # the original is untouched


def test_attack_spec_parsing_and_checks():
    assert not parse_attack({}).active
    spec = parse_attack({"attack": "sign-flip", "attack-scale": 5})
    assert spec.malicious_sites == 1 and spec.scale == 5.0 and spec.is_malicious(0) and not spec.is_malicious(1)
    for bad in ({"attack": "backdoor"}, {"attack": "sign-flip", "malicious-sites": 0}, {"attack-scale": -1},
                {"attacks": "sign-flip"}):
        with pytest.raises(ConfigError):
            parse_attack(bad)
    with pytest.raises(ConfigError, match="honest"):
        AttackSpec("sign-flip", 3).check(num_sites=3)


def test_attack_client_app_flips_only_malicious_partitions(monkeypatch):
    import medfed.client.app as client_app

    trained = {"w": np.array([2.0, 2.0], np.float32)}
    monkeypatch.setattr(client_app, "handle_train", lambda msg, ctx: Message(
        RecordDict({RecordKey.ARRAYS.value: _record(trained)}), reply_to=msg))
    app = attack_client_app(AttackSpec("sign-flip", malicious_sites=1, scale=3.0))
    out = {}
    for partition in (0, 1):
        ins = Message(RecordDict({RecordKey.ARRAYS.value: _record({"w": np.ones(2, np.float32)})}),
                      dst_node_id=1, message_type="train")
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": partition, "num-partitions": 2},
                      state=RecordDict(), run_config={})
        out[partition] = app(ins, ctx).content[RecordKey.ARRAYS.value]["w"].numpy().tolist()
    assert out == {0: [-2.0, -2.0], 1: [2.0, 2.0]}  # 1 - 3 * (2 - 1)


# --------------------------------------------------------------------------- robust strategies
@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_ignore_one_sign_flipped_site_and_keep_dtypes(name):
    rng = np.random.default_rng(1)
    honest = {"w": np.full(6, 1.0, np.float32)}
    replies = [_reply(f"site-{i}", {"w": (honest["w"] + rng.normal(0, 0.05, 6)).astype(np.float32),
                                    "c": np.array([7], np.int64)}) for i in range(1, 5)]
    attacker = {"w": np.full(6, -10.0, np.float32), "c": np.array([7], np.int64)}  # 0 - 10 * (1 - 0)
    cfg = StudyConfig(strategy=name, num_sites=5, min_sites=5, num_malicious=1, trimmed_beta=0.2)
    arrays, _ = build_strategy(cfg, 5).aggregate_train(1, [_reply("site-0", attacker), *replies])
    ref = _record({"w": np.zeros(6, np.float32), "c": np.array([0], np.int64)})
    kept = keep_dtypes(arrays, ref)
    assert kept["c"].numpy().dtype == np.int64 and kept["c"].numpy().tolist() == [7]
    assert np.allclose(kept["w"].numpy(), 1.0, atol=0.2)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow  # ~20 s alone (Ray start, 4 sites x 2 rounds), more on a loaded machine
def test_sign_flip_site_is_rejected_by_norm_screening_end_to_end(tmp_path: Path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "medfed.common.cli", "simulate", "--sites", "4", "--rounds", "2",
         "--local-steps", "3", "--batch-size", "32", "--seed", "3", "--attack", "sign-flip",
         "--attack-scale", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "attack.json").read_text())["attack"] == "sign-flip"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        rejected = [f for f in line["failures"] if "max-update-norm-ratio" in f["reason"]]
        assert [f["site"] for f in rejected] == ["site-0"]
        assert set(line["sites"]) == {"site-0", "site-1", "site-2", "site-3"}  # site-0 still evaluates
        trained = {s for s, row in line["sites"].items() if "train-loss" in row}
        assert trained == {"site-1", "site-2", "site-3"}


def test_a_study_files_attack_reaches_only_its_federated_cells(tmp_path: Path):
    from medfed.simulations.study import parse_study_spec, plan_cells, run_study

    spec = parse_study_spec({"base": {"num-sites": 3}, "grid": {"seed": [0]}, "baselines": ["local"],
                             "attack": {"attack": "label-flip"}, "out": str(tmp_path / "s")})
    calls = []
    run_study(spec, plan_cells(spec), lambda cfg, attack=None: calls.append((cfg.mode, attack)))
    assert calls == [("federated", AttackSpec("label-flip", 1)), ("local", None)]
    assert not any(k.startswith(("attack", "malicious")) for k in plan_cells(spec)[0].config.to_dict())
    with pytest.raises(ConfigError, match="honest"):
        plan_cells(parse_study_spec({"base": {"num-sites": 2}, "attack": {"attack": "sign-flip",
                                                                          "malicious-sites": 2}}))

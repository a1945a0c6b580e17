"""``medfed privacy audit``: ROC maths, leakage of an overfit model, LiRA pieces, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from medfed.client.audit_cli import add_privacy_arguments
from medfed.common import cli
from medfed.common.checkpoint import Checkpoint, save_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.data.splits import ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, build_model
from medfed.common.privacy_audit import (
    ShadowSettings,
    attack_metrics,
    audit_sets,
    balanced_keep,
    fit_out_gaussians,
    loss_threshold_attack,
    roc_points,
    tpr_at_fpr,
    true_class_scores,
)
from medfed.common.training import TrainSettings, train

CPU = torch.device("cpu")
SPEC = ModelSpec("cnn", 1, 2, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(n: int, rng: np.random.Generator) -> ImageSplit:
    images = rng.uniform(size=(n, 1, 28, 28)).astype(np.float32)
    return ImageSplit(images, rng.integers(0, 2, n).astype(np.int64))


# --------------------------------------------------------------------------- ROC maths
def test_separable_scores_give_auc_1_and_full_tpr():
    res = attack_metrics([0.9, 0.8, 0.7, 0.95], [0.1, 0.2, 0.3, 0.0])
    assert res["auc"] == 1.0
    assert res["tpr@fpr=1%"] == 1.0 and res["tpr@fpr=0.1%"] == 1.0


def test_identical_distributions_give_auc_one_half():
    scores = np.linspace(-3, 3, 500)
    res = attack_metrics(scores, scores.copy())
    assert res["auc"] == 0.5
    assert res["tpr@fpr=1%"] == pytest.approx(0.01, abs=0.003)  # the ROC is the diagonal
    rng = np.random.default_rng(1)
    res = attack_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(res["auc"] - 0.5) < 0.03


def test_reversed_scores_give_auc_0_and_no_tpr():
    res = attack_metrics([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    assert res["auc"] == 0.0
    assert res["tpr@fpr=1%"] == 0.0 and res["tpr@fpr=0.1%"] == 0.0


def test_roc_points_and_tpr_at_fpr_by_hand():
    # sorted: 3 (member), 2 (non), 1 (member), 0 (non)
    fpr, tpr = roc_points([3.0, 1.0], [2.0, 0.0])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert tpr_at_fpr(fpr, tpr, 0.0) == (0.5, 0.0)
    assert tpr_at_fpr(fpr, tpr, 0.49) == (0.5, 0.0)
    assert tpr_at_fpr(fpr, tpr, 0.5) == (1.0, 0.5)
    assert attack_metrics([3.0, 1.0], [2.0, 0.0])["auc"] == 0.75


def test_ties_move_together_and_trapezoid_matches_auc():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 300).astype(float), rng.integers(0, 4, 200).astype(float)
    fpr, tpr = roc_points(pos, neg)
    assert len(fpr) == len(np.unique(np.r_[pos, neg])) + 1
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert attack_metrics(pos, neg)["auc"] == pytest.approx(trapezoid)


def test_low_fpr_note_names_the_smallest_achievable_fpr():
    few = attack_metrics(np.arange(200.0), np.arange(200.0) - 50)
    assert "tpr@fpr=0.1% is the TPR at FPR 0" in few["note"] and "tpr@fpr=1%" not in few["note"]
    many = attack_metrics(np.arange(2000.0), np.arange(2000.0))
    assert many["note"] == "every FPR level is resolved by the non-member count"


def test_bad_scores_are_rejected():
    with pytest.raises(DataError):
        attack_metrics([0.1, float("nan")], [0.2])
    with pytest.raises(DataError):
        attack_metrics([], [0.2])


# --------------------------------------------------------------------------- leakage
def test_overfit_model_leaks_and_untrained_model_does_not():
    rng = np.random.default_rng(0)
    members, non_members = _noise(8, rng), _noise(200, rng)
    torch.manual_seed(0)
    model = build_model(SPEC)
    untrained = attack_metrics(
        true_class_scores(model, _noise(300, rng), CPU)[0], true_class_scores(model, _noise(300, rng), CPU)[0]
    )
    assert abs(untrained["auc"] - 0.5) < 0.15
    # 8 noise images with random labels, 200 full-batch epochs: memorised (kept tiny for CPU time).
    train(model, members, TrainSettings(steps=200, batch_size=8, lr=3e-3), CPU)
    res = loss_threshold_attack(true_class_scores(model, members, CPU)[0],
                                true_class_scores(model, non_members, CPU)[0])
    assert res["auc"] > 0.8, res


def test_true_class_scores_are_stable_when_p_rounds_to_1():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[60.0, 0.0], [0.0, 3.0]]).repeat(len(x) // 2, 1)

    data = ImageSplit(np.zeros((2, 1, 2, 2), np.float32), np.array([0, 0]))
    logp, phi = true_class_scores(Fixed(), data, CPU)
    assert np.all(np.isfinite(phi)) and phi[0] == pytest.approx(60.0) and phi[1] == pytest.approx(-3.0)
    assert logp[0] == pytest.approx(0.0, abs=1e-12) and logp[1] == pytest.approx(-3.0486, abs=1e-3)


def test_audit_sets_are_disjoint_and_balanced_per_class():
    rng = np.random.default_rng(0)
    images = np.arange(400, dtype=np.float32).reshape(400, 1, 1, 1) / 400
    labels = np.r_[np.zeros(250), np.ones(150)].astype(np.int64)
    whole = ImageSplit(images, labels)
    order = rng.permutation(400)
    site = SiteData("s", whole.subset(order[:300]), whole.subset(order[300:340]), whole.subset(order[340:]))
    data = audit_sets(site, seed=3)
    assert len(data.members) == len(data.non_members)
    assert np.bincount(data.members.labels).tolist() == np.bincount(data.non_members.labels).tolist()
    ids = [set(s.images.ravel().tolist()) for s in (data.members, data.non_members, data.reference)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == 400
    assert ids[0] <= set(site.train.images.ravel().tolist())
    assert audit_sets(site, seed=3).members.images.tolist() == data.members.images.tolist()


# --------------------------------------------------------------------------- LiRA pieces
def test_balanced_keep_puts_each_example_in_half_the_models():
    keep = balanced_keep(4, 50, np.random.default_rng(0))
    assert keep.shape == (4, 50) and np.all(keep.sum(axis=0) == 2)
    assert np.all(balanced_keep(5, 10, np.random.default_rng(0)).sum(axis=0) == 2)


def test_out_gaussians_pooled_and_per_example():
    phi = np.array([[1.0, 10.0], [3.0, 10.0], [99.0, 12.0]])
    out = np.array([[True, True], [True, True], [False, True]])
    mu, sigma, kind = fit_out_gaussians(phi, out)
    assert kind == "global" and mu.tolist() == [2.0, pytest.approx(32 / 3)]
    # residual squares: 1 + 1 + (4/9 + 4/9 + 16/9); dof = 5 - 2
    assert sigma[0] == pytest.approx(np.sqrt((2 + 24 / 9) / 3))
    many = np.random.default_rng(0).normal(loc=[[0.0, 5.0]], scale=[[1.0, 3.0]], size=(400, 2))
    mu, sigma, kind = fit_out_gaussians(many, np.ones_like(many, dtype=bool))
    assert kind == "per-example" and sigma[1] > 2 * sigma[0]
    with pytest.raises(DataError):
        fit_out_gaussians(phi, np.array([[True, False]] * 3))


def test_shadow_settings_need_two_models_or_none():
    with pytest.raises(ConfigError):
        ShadowSettings(num_models=1)
    assert ShadowSettings(num_models=0).num_models == 0


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def medfed(monkeypatch):
    """``medfed.common.cli.main`` with ``privacy`` registered (until common/cli.py registers it)."""
    original = cli.build_parser

    def build_parser():
        parser = original()
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        if "privacy" not in sub.choices:
            add_privacy_arguments(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    return cli.main


@pytest.fixture
def tiny_run(tmp_path):
    cfg = StudyConfig(dataset="synthetic", num_sites=2, partition="iid", num_server_rounds=1, min_sites=2)
    torch.manual_seed(0)
    model = build_model(SPEC)
    state = {f"_module.{k}": v for k, v in model.state_dict().items()}  # as an Opacus-wrapped model saves
    return save_checkpoint(Checkpoint(model=SPEC, state_dict=state, config=cfg.to_dict(), round=1),
                           tmp_path / "run" / "model.pt")


def test_cli_audit_end_to_end(medfed, tiny_run, tmp_path, capsys):
    out = tmp_path / "audit.json"
    code = medfed(["privacy", "audit", "--model", str(tiny_run), "--out", str(out), "--shadow-models", "2",
                   "--shadow-steps", "3", "--shadow-batch-size", "32", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["site"] == "site-0" and report["round"] == 1 and report["model"] == str(tiny_run)
    assert report["members"] == report["non-members"] > 50
    for name in ("loss-threshold", "lira-offline"):
        attack = report["attacks"][name]
        assert 0.0 <= attack["auc"] <= 1.0
        assert 0.0 <= attack["tpr@fpr=1%"] <= 1.0 and 0.0 <= attack["tpr@fpr=0.1%"] <= 1.0
        assert "FPR 0" in attack["note"]
    assert report["attacks"]["lira-offline"]["shadow-models"] == 2
    printed = capsys.readouterr().out
    assert "loss-threshold" in printed and "lira-offline" in printed and str(out) in printed
    # Default output next to the model; another site of the same study.
    assert medfed(["privacy", "audit", "--model", str(tiny_run), "--site-index", "1",
                   "--shadow-models", "0"]) == 0
    again = json.loads((tiny_run.parent / "privacy-audit.json").read_text())
    assert again["site"] == "site-1" and again["attacks"]["lira-offline"]["skipped"] is True


def test_cli_audit_of_a_site_config(medfed, tiny_run, tmp_path):
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text("site-id: hospital-b\ndata-root: .\nstate-dir: st\ndataset: synthetic\n"
                         "shard-count: 2\nshard-index: 1\n")
    out = tmp_path / "b.json"
    assert medfed(["privacy", "audit", "--model", str(tiny_run), "--site-config", str(site_yaml),
                   "--shadow-models", "0", "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["site"] == "hospital-b" and 0.0 <= report["attacks"]["loss-threshold"]["auc"] <= 1.0


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medfed:")]
    assert len(err) == 1, err
    return err[0]


def test_cli_missing_model_is_one_line(medfed, tmp_path, capsys):
    assert medfed(["privacy", "audit", "--model", str(tmp_path / "nope.pt")]) in (1, 2)
    assert "nope.pt" in _one_error_line(capsys)


def test_cli_bad_arguments_are_usage_errors(medfed, tiny_run, tmp_path, capsys):
    assert medfed(["privacy", "audit", "--model", str(tiny_run), "--site-index", "5"]) == 2
    assert "site-index" in _one_error_line(capsys)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text("site-id: a\ndata-root: .\nstate-dir: st\ndataset: synthetic\n")
    assert medfed(["privacy", "audit", "--model", str(tiny_run), "--site-config", str(site_yaml),
                   "--site-index", "1"]) == 2
    assert "--site-index" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        medfed(["privacy", "audit", "--model", str(tiny_run), "--data", "x.npz", "--site-config", "y.yaml"])
    assert exc.value.code == 2
    assert "not allowed with" in _one_error_line(capsys)
    assert medfed(["privacy", "audit", "--model", str(tiny_run), "--shadow-models", "1"]) == 2
    _one_error_line(capsys)


def test_cli_help(medfed, capsys):
    with pytest.raises(SystemExit) as exc:
        medfed(["privacy", "audit", "--help"])
    assert exc.value.code == 0 and "--shadow-models" in capsys.readouterr().out

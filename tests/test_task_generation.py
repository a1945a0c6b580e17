"""Generation as a task: a conditional GAN through the same ClientApp, DP ledger, server and outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from medfed.client.app import app
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.data.federated import load_federated_cached
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, build_model
from medfed.common.tasks import get_task

from tests.test_client_app import _context
from tests.test_simulate_e2e import medfed


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _gen_config(tmp_path, **kw) -> dict:
    base = dict(task="generation", num_sites=3, local_steps=3, batch_size=16, lr=5e-4, out_dir=str(tmp_path))
    return StudyConfig(**{**base, **kw}).to_dict()


def _gen_message(kind: str, config: dict | None = None) -> Message:
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("cgan", 1, 2, 28)))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})
    return Message(content, dst_node_id=1, message_type=kind)


def test_generation_defaults_to_the_conditional_gan_and_checks_its_image_size():
    assert StudyConfig(task="generation").model == "cgan"
    with pytest.raises(ConfigError, match="not a generation model"):
        StudyConfig(task="generation", model="cnn")
    with pytest.raises(ConfigError, match="image_size=48 is not supported"):
        build_model(ModelSpec("cgan", 1, 2, 48))
    gan = build_model(ModelSpec("cgan", 1, 2, 28))
    keys = set(gan.state_dict())
    assert any(k.startswith("generator.") for k in keys) and any(k.startswith("discriminator.") for k in keys)


def test_a_site_trains_both_networks_and_reports_discriminator_metrics(tmp_path):
    ctx = _context(_gen_config(tmp_path), {"partition-id": 0, "num-partitions": 3})
    sent = _gen_message("train").content["arrays"]
    reply = app(_gen_message("train"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    got = reply.content["arrays"]
    for net in ("generator.", "discriminator."):  # both are aggregated every round
        assert any(not np.array_equal(sent[k].numpy(), got[k].numpy()) for k in sent if k.startswith(net))
    site = load_federated_cached("synthetic", "", 3, "dirichlet", 1.0, 0).sites[0]
    assert reply.content["metrics"]["num-examples"] == len(site.train)

    m = app(_gen_message("evaluate"), ctx).content["metrics"]
    for split in ("val", "test"):
        assert m[f"{split}-d-loss"] > 0 and 0.0 <= m[f"{split}-d-accuracy"] <= 1.0
    assert not any(k.startswith("train-") for k in m)


def test_dp_on_the_discriminator_charges_the_site_ledger(tmp_path):
    ctx = _context(_gen_config(tmp_path, epsilon=10.0, num_server_rounds=2), {"partition-id": 1, "num-partitions": 3})
    replies = [app(_gen_message("train", {"server-round": r}), ctx) for r in (1, 2, 3)]
    assert not replies[0].has_error() and not replies[1].has_error()
    eps = [r.content["metrics"]["epsilon"] for r in replies[:2]]
    assert 0 < eps[0] < eps[1] <= 10.0
    assert replies[2].has_error() and "budget" in replies[2].error.reason  # planned schedule spent


def test_generator_report_measures_tstr_against_a_real_trained_reference():
    from medfed.common.generation.evaluate import generator_report

    fed = load_federated_cached("synthetic", "", 2, "iid", 1.0, 0)
    torch.manual_seed(0)
    gan = build_model(ModelSpec("cgan", 1, 2, 28))  # untrained: its samples carry no class
    def report():
        return generator_report(gan, fed.central_val, fed.central_test, torch.device("cpu"), seed=0,
                                n_per_class=20, steps=30)

    out = report()
    assert set(out) >= {"tstr_auc", "trtr_auc", "fid"}
    assert out["trtr_auc"] > 0.8  # the real data is learnable with this schedule
    assert 0.0 <= out["tstr_auc"] <= 1.0 and out["fid"] > 0
    assert report() == out  # seeded: the same model gives the same figures


def test_generate_refuses_a_classifier_and_writes_samples_with_provenance(tmp_path):
    from medfed.common.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    clf = tmp_path / "clf.pt"
    save_checkpoint(Checkpoint(model=ModelSpec("cnn", 1, 2, 28), state_dict=build_model(ModelSpec("cnn", 1, 2, 28)).state_dict()), clf)
    bad = medfed("generate", "--model", str(clf), "--n", "3", "--label", "0", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not a GAN" in bad.stderr and not (tmp_path / "x").exists()

    ckpt = tmp_path / "gan.pt"
    spec = ModelSpec("cgan", 1, 2, 28)
    privacy = {"site-0": {"epsilon": 7.5, "delta": 1e-5}, "site-1": {"epsilon": 8.0, "delta": 1e-5}}
    save_checkpoint(Checkpoint(model=spec, state_dict=build_model(spec).state_dict(), round=12,
                               config={"task": "generation"}, metrics={"privacy": privacy}), ckpt)
    out = tmp_path / "samples"
    res = medfed("generate", "--model", str(ckpt), "--n", "4", "--label", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(out.glob("sample-*.png"))) == 4
    with np.load(out / "samples.npz", allow_pickle=False) as npz:
        assert npz["images"].shape == (4, 28, 28) and list(npz["labels"]) == [1, 1, 1, 1]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["round"] == 12 and prov["epsilon-spent-max"] == 8.0 and prov["dp"] is True
    assert prov["label"] == 1 and len(prov["model-sha256"]) == 64
    again = medfed("generate", "--model", str(ckpt), "--n", "2", "--label", "3", "--out", str(tmp_path / "y"))
    assert again.returncode == 2 and "label=3" in again.stderr


def test_generation_task_has_no_validation_score_so_the_last_round_is_reported():
    from medfed.server.selection import Selection, pool_validation

    task = get_task("generation")
    sel = Selection()
    for rnd in (1, 2, 3):
        sel.consider(rnd, pool_validation({"s": {"val-d-loss": 1.0, "num-examples": 5.0}}, score=task.score))
    assert sel.best_round == 3


@pytest.mark.slow
def test_simulate_generation_reports_tstr_and_fid(tmp_path):
    out = tmp_path / "run"
    res = medfed("simulate", "--task", "generation", "--sites", "2", "--rounds", "2", "--local-steps", "10",
                 "--lr", "0.0005", "--out", str(out), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "generation" and summary["selected-round"] == 2
    assert {"tstr_auc", "fid", "trtr_auc"} <= set(summary["test"])
    assert "tstr_auc" in (out / "report.md").read_text()

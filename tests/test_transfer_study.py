"""Transfer learning through a study: start from a checkpoint, new head, frozen layers not sent."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from medfed.client.app import app
from medfed.common.arrays import model_to_arrays
from medfed.common.checkpoint import load_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, build_model

from tests.test_client_app import _context
from tests.test_simulate_e2e import medfed

FREEZE = "features.0.*,features.1.*"


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def test_freeze_and_new_head_need_initial_weights():
    with pytest.raises(ConfigError, match="without initial-weights would freeze random weights"):
        StudyConfig(freeze="features.*")
    with pytest.raises(ConfigError, match="new-head needs initial-weights"):
        StudyConfig(new_head=True)
    assert StudyConfig(initial_weights="w.pt", freeze=" a.* , b ").freeze_patterns == ("a.*", "b")


def test_a_site_trains_and_sends_only_the_unfrozen_layers(tmp_path):
    cfg = StudyConfig(num_sites=3, local_steps=2, out_dir=str(tmp_path), initial_weights="unused-at-the-site.pt",
                      freeze=FREEZE).to_dict()
    torch.manual_seed(0)
    full = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    msg = Message(RecordDict({"arrays": full, "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type="train")
    reply = app(msg, _context(cfg, {"partition-id": 0, "num-partitions": 3}))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent_back = set(reply.content["arrays"])
    frozen = {k for k in full if k.startswith(("features.0.", "features.1."))}
    assert frozen and sent_back == set(full) - frozen  # frozen layers never leave the site


def test_fine_tuning_starts_from_the_checkpoint_and_keeps_frozen_layers(tmp_path):
    base = tmp_path / "base"
    res = medfed("simulate", "--sites", "2", "--rounds", "1", "--local-steps", "5", "--out", str(base))
    assert res.returncode == 0, res.stderr[-2000:]
    ft = tmp_path / "ft"
    res = medfed("simulate", "--sites", "2", "--rounds", "2", "--local-steps", "5", "--init",
                 str(base / "model.pt"), "--new-head", "--freeze", FREEZE, "--out", str(ft))
    assert res.returncode == 0, res.stderr[-2000:]
    start = load_checkpoint(base / "model.pt").state_dict
    end = load_checkpoint(ft / "model.pt").state_dict
    assert set(end) == set(start)  # the reported model is whole, frozen layers included
    for key in start:
        same = torch.equal(start[key], end[key])
        assert same == key.startswith(("features.0.", "features.1.")), key  # frozen kept, the rest trained
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["config"]["initial-weights"].endswith("model.pt") and summary["config"]["freeze"] == FREEZE
    assert np.isfinite(summary["test"]["auc"])

"""The ClientApp's Message handlers, called as Flower calls them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from medfed.client.app import app
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.data.federated import load_federated_cached
from medfed.common.models import ModelSpec, build_model, norm_parameter_names


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _run_config(tmp_path, **kw) -> dict:
    return StudyConfig(num_sites=3, local_steps=2, out_dir=str(tmp_path), **kw).to_dict()


def _message(kind: str, config: dict | None = None) -> Message:
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})
    return Message(content, dst_node_id=1, message_type=kind)


def _context(run_config: dict, node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_train_reply_carries_update_samples_and_site(tmp_path):
    ctx = _context(_run_config(tmp_path), {"partition-id": 1, "num-partitions": 3})
    reply = app(_message("train"), ctx)
    assert not reply.has_error()
    site = load_federated_cached("synthetic", "", 3, "dirichlet", 1.0, 0).sites[1]
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(site.train)  # samples, never batches
    assert metrics["train-steps"] == 2
    assert reply.content["site"]["site-id"] == "site-1"
    sent = _message("train").content["arrays"]
    assert set(reply.content["arrays"]) == set(sent)
    changed = [k for k in sent if not np.array_equal(sent[k].numpy(), reply.content["arrays"][k].numpy())]
    assert changed, "training must change the weights"


def test_evaluate_reply_has_val_and_test_metrics_and_histograms(tmp_path):
    ctx = _context(_run_config(tmp_path), {"partition-id": 0, "num-partitions": 3})
    reply = app(_message("evaluate"), ctx)
    m = reply.content["metrics"]
    for split in ("val", "test"):
        assert 0.0 <= m[f"{split}-accuracy"] <= 1.0 and f"{split}-auc" in m
    site = load_federated_cached("synthetic", "", 3, "dirichlet", 1.0, 0).sites[0]
    assert sum(m["val-hist-pos"]) + sum(m["val-hist-neg"]) == len(site.val)
    assert m["num-examples"] == len(site.val)
    assert not any(k.startswith("train-") for k in m), "never metrics on training data"


def test_fedbn_keeps_norm_layers_at_the_site(tmp_path):
    ctx = _context(_run_config(tmp_path, strategy="fedbn"), {"partition-id": 2, "num-partitions": 3})
    reply = app(_message("train", {"fedbn": True}), ctx)
    norm = norm_parameter_names(build_model(ModelSpec("cnn", 1, 2, 28)))
    assert not set(reply.content["arrays"]) & norm, "norm layers never leave the site"
    assert (tmp_path / "sites" / "site-2" / "state" / "local_layers.pt").is_file()
    # evaluation without norm layers in the message uses the site's own
    msg = _message("evaluate", {"fedbn": True})
    for key in norm:
        del msg.content["arrays"][key]
    assert not app(msg, ctx).has_error()


def test_failure_is_an_error_reply_naming_the_site(tmp_path):
    ctx = _context(_run_config(tmp_path), {"site-id": "hosp-a"})
    reply = app(_message("train"), ctx)
    assert reply.has_error()
    # Site-side details (paths, config, data) stay in the site's log ...
    assert reply.error.reason == "site hosp-a: ConfigError (details in the site's log)"
    bad = _context({"strategy": "nope"}, {"partition-id": 0, "num-partitions": 3})
    # ... while a fault in the server's own run config is reported back to it.
    assert "strategy='nope'" in app(_message("evaluate"), bad).error.reason
    assert "partition 0" in app(_message("evaluate"), bad).error.reason


def test_client_side_does_not_import_monai_or_opacus(tmp_path):
    code = (
        "import sys\n"
        "from flwr.supercore.task_identity import TaskIdentity\n"
        "TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = 1\n"
        "import tests.test_client_app as t\n"
        "from pathlib import Path\n"
        f"ctx = t._context(t._run_config(Path({str(tmp_path)!r})), {{'partition-id': 0, 'num-partitions': 3}})\n"
        "assert not t.app(t._message('train'), ctx).has_error()\n"
        "assert not t.app(t._message('evaluate'), ctx).has_error()\n"
        "print(sorted(m for m in ('monai', 'opacus') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"

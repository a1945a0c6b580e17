"""What a site refuses: servers it cannot verify, malformed config, oversized models (and the server, oversized replies).

A site whose key the server never registered is turned away: covered end to end in
tests/test_deploy_e2e.py::test_probe_app_two_sites_two_rounds[tls-auth] ("Failed to
activate SuperNode"), not repeated here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from medfed.client.app import app
from medfed.client.boundary import PublicSiteError
from medfed.client.incoming import check_incoming, check_message_config, check_model_size
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.models import ModelSpec, build_model
from medfed.server.limits import bound_replies
from medfed.server.replies import screen_train_replies


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _message(config: dict | None = None, arrays: ArrayRecord | None = None, kind: str = "train") -> Message:
    torch.manual_seed(0)
    arrays = arrays or model_to_arrays(build_model(ModelSpec("cnn", 1, 2, 28)))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})
    return Message(content, dst_node_id=1, message_type=kind)


def _context(tmp_path, run_config: dict, node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                   node_config=node_config or {"partition-id": 0, "num-partitions": 2})


def _run_config(tmp_path) -> dict:
    return StudyConfig(num_sites=2, local_steps=1, out_dir=str(tmp_path)).to_dict()


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("lr", -1.0, "out of range"),
    ("local-steps", 10**9, "out of range"),
    ("strategy", "evil", "not allowed"),
    ("model", "os.system", "not allowed"),
    ("lr", "0.1; rm -rf /", "must be a number"),
    ("batch-size", 3.5, "must be an integer"),
    ("no-such-key", 1, "unknown study config key"),
])
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_bad_run_config_gets_an_error_reply_naming_the_key(tmp_path, key, value, expected, kind):
    run_config = {**_run_config(tmp_path), key: value}
    reply = app(_message(kind=kind), _context(tmp_path, run_config))
    assert reply.has_error()
    assert key in reply.error.reason and expected in reply.error.reason, reply.error.reason


@pytest.mark.parametrize(("key", "value"), [
    ("proximal-mu", "abc"), ("proximal-mu", 1e9), ("threshold", 2.0), ("threshold", float("nan")),
    ("server-round", -1), ("server-round", 1.5), ("fedbn", "yes"),
])
def test_bad_message_config_gets_an_error_reply_naming_the_key(tmp_path, key, value):
    reply = app(_message({key: value}), _context(tmp_path, _run_config(tmp_path)))
    assert reply.has_error() and f"{key}=" in reply.error.reason, reply.error.reason


def test_valid_message_config_passes():
    check_message_config({"server-round": 3, "proximal-mu": 0.01, "threshold": 0.4, "fedbn": True})


def _big_arrays(mb: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(int(mb * 1024 * 1024 / 4), dtype=np.float32))})


def test_site_refuses_a_model_above_max_message_mb(tmp_path):
    check_model_size(_big_arrays(1.5), 2.0)
    with pytest.raises(PublicSiteError, match=r"1\.5 MB, above this site's max-message-mb=1"):
        check_model_size(_big_arrays(1.5), 1.0)
    (tmp_path / "site.yaml").write_text("site-id: a\ndata-root: d\nstate-dir: s\ndataset: synthetic\nmax-message-mb: 1\n")
    with pytest.raises(PublicSiteError, match="max-message-mb=1"):
        check_incoming(_message(arrays=_big_arrays(1.5)), {"site-config": str(tmp_path / "site.yaml")})


def test_site_default_bound_is_512_mb_and_the_refusal_reaches_the_server(tmp_path, monkeypatch):
    from medfed.client import incoming
    from medfed.common import site_config

    assert incoming.max_message_mb({"partition-id": 0}) == 512.0
    monkeypatch.setattr(site_config, "DEFAULT_MAX_MESSAGE_MB", 1.0)
    reply = app(_message(arrays=_big_arrays(1.5)), _context(tmp_path, _run_config(tmp_path)))
    assert reply.has_error() and "max-message-mb" in reply.error.reason


def _reply_from(node: int, arrays: ArrayRecord) -> Message:
    sent = Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{node}"
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10}),
                          "site": ConfigRecord({"site-id": f"site-{node}"})})
    return Message(content, reply_to=sent)


def test_server_refuses_replies_above_max_reply_mb():
    reference = _big_arrays(1.5)
    small, large = _reply_from(1, reference), _reply_from(2, reference)
    kept = bound_replies([small, large], max_mb=2.0)
    assert [m.has_error() for m in kept] == [False, False]
    kept = bound_replies([small, large], max_mb=1.0)
    assert all(m.has_error() for m in kept)
    assert kept[1].metadata.src_node_id == 2 and "max-reply-mb=1" in kept[1].error.reason
    good, failures = screen_train_replies(kept, reference)
    assert not good and sorted(f.node for f in failures) == [1, 2]
    assert StudyConfig().max_reply_mb == 512.0


@pytest.mark.slow
def test_site_refuses_a_server_certificate_from_another_ca(tmp_path):
    """site.yaml's root-cert is not the CA that signed the SuperLink's certificate: no connection."""
    from medfed.client.daemon import load_site_yaml, start_supernode
    from medfed.common.certs import create_ca, create_site_keys
    from medfed.common.errors import MedfedError
    from medfed.common.process import stop_process_group
    from medfed.server.deploy import register_site
    from medfed.simulations.loopback import LocalDeployment

    create_ca(tmp_path / "other-ca")
    with LocalDeployment(tmp_path / "dep", sites=0) as dep:
        keys = create_site_keys(tmp_path / "keys", "site-x")  # registered: only the CA is wrong
        register_site(dep.server, keys.public_key, root_cert=dep.root_cert, name="site-x")
        yaml = tmp_path / "site-x.yaml"
        yaml.write_text("\n".join([
            "site-id: site-x", "state-dir: state", "data-root: data", "dataset: synthetic",
            f"server: '{dep.server}'", f"root-cert: {tmp_path / 'other-ca' / 'ca.crt'}",
            f"auth-key: {keys.private_key}",
        ]) + "\n")
        log_path = tmp_path / "site-x.log"
        try:  # it may fail before or after its local runtime port opens
            proc = start_supernode(load_site_yaml(yaml), log_path=log_path)
        except MedfedError as exc:
            assert "exited with code" in str(exc)
        else:
            try:
                assert proc.wait(timeout=60) != 0  # the daemon exits: `medfed site start` fails
            finally:
                stop_process_group(proc)
        superlink_log = (dep.base / "superlink.log").read_text(errors="replace")
    site_log = log_path.read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in site_log and "could not establish a connection" in site_log
    assert "ActivateNode" not in superlink_log

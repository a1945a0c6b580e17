"""One bad site cannot end or steer a study: the ServerApp loop end to end, with hostile replies.

Each study here runs the real ServerApp loop (:func:`run_federated`) and the real ClientApp
handlers in one process (:class:`tests.inprocess_grid.InProcessGrid`); one site's replies
are replaced by what an attacker sends (:func:`medfed.simulations.attacks.tamper_reply`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from medfed.common.audit_log import read_entries
from medfed.common.config import StudyConfig
from medfed.server.binding import BindingEvent, SiteBinding
from medfed.server.federation import run_federated
from medfed.simulations.attacks import INFLATED_WEIGHT, AttackSpec, sign_flip, tamper_reply

from tests.inprocess_grid import InProcessGrid


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _study(tmp_path: Path, tamper, rounds: int = 2, **overrides) -> tuple[dict, list[dict], list[dict]]:
    cfg = StudyConfig(num_sites=5, num_server_rounds=rounds, local_steps=2, batch_size=32, seed=3, min_eval_n=5,
                      out_dir=str(tmp_path / "run"), **overrides)
    summary = run_federated(InProcessGrid(5, cfg.to_dict(), tamper), cfg, simulation=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, records, list(read_entries(tmp_path / "run" / "audit.jsonl"))


def _attack(kind: str):
    spec = AttackSpec(kind, malicious_sites=1)
    return lambda partition, sent, reply: tamper_reply(spec, partition, sent, reply)


def test_malformed_evaluation_replies_are_dropped_and_the_study_completes(tmp_path):
    """A NaN in a histogram, 5 bins, positives without negatives, a group histogram of the wrong
    length, a NaN metric: each used to end the study in pooling (ValueError/KeyError)."""
    summary, records, audit = _study(tmp_path, _attack("bad-metrics"), rounds=5)
    assert summary["rounds"] == 5 and len(records) == 5
    reasons = []
    for record in records:
        bad = [f for f in record["failures"] if f["site"] == "site-0"]
        assert len(bad) == 2, record["failures"]  # its training reply (NaN loss) and its evaluation
        reasons += [f["reason"] for f in bad]
        assert "site-0" not in record["sites"], "nothing of the bad site is pooled or reported"
        assert set(record["sites"]) == {"site-1", "site-2", "site-3", "site-4"}
        assert np.isfinite(record["val"]["auc"])
    text = " | ".join(reasons)
    for needle in ("not a non-negative whole count", "has 5 bins", "must come together",
                   "val-g0-hist-pos has 50 bins", "not a finite number"):
        assert needle in text, (needle, text)
    assert any(f["site"] == "site-0" for f in summary["failures"]), "the final evaluation is screened too"
    assert "site-0" not in summary["sites"]
    rejected = [e for e in audit if e["event"] == "rejected" and e["site"] == "site-0"]
    assert {e["phase"] for e in rejected} == {"train", "evaluate", "final-evaluate"}


def test_a_site_claiming_another_sites_id_is_refused_and_cannot_replace_its_metrics(tmp_path):
    honest, honest_records, _ = _study(tmp_path / "clean", None)
    summary, records, audit = _study(tmp_path / "attacked", _attack("impersonate"))
    round2 = records[1]
    refused = [f for f in round2["failures"] if f["site"] == "site-0"]
    assert refused and all("claims site id site-1" in f["reason"] for f in refused), round2["failures"]
    assert "site-0" not in round2["sites"]
    # site-1's row is site-1's own: the impostor's evaluation did not replace it
    assert round2["sites"]["site-1"]["val-examples"] == honest_records[1]["sites"]["site-1"]["val-examples"]
    aggregated = [e for e in audit if e["event"] == "aggregated"]
    assert aggregated[1]["sites"] == ["site-1", "site-2", "site-3", "site-4"]
    joined = [(e["site"], e["node"]) for e in audit if e["event"] == "site-joined"]
    assert sorted(joined) == [(f"site-{k}", 100 + k) for k in range(5)], "each id bound once, to its own node"
    assert {e["site"] for e in audit if e["event"] == "rejected"} == {"site-0"}
    assert summary["sites"]["site-1"]["val-examples"] == honest["sites"]["site-1"]["val-examples"]


def test_duplicate_ids_at_first_contact_are_both_refused_and_do_not_steer_fedavg(tmp_path):
    """The review's case: a fifth site claims "site-0" with num-examples=1e12 and a sign-flipped update."""

    def impostor(partition: int, sent: Message, reply: Message) -> Message:
        if partition != 4 or "arrays" not in reply.content:
            return reply
        metrics = dict(reply.content["metrics"])
        metrics["num-examples"] = INFLATED_WEIGHT
        content = RecordDict({"arrays": sign_flip(reply.content["arrays"], sent.content["arrays"], 10.0),
                              "metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": "site-0"})})
        return Message(content=content, reply_to=sent)

    summary, records, audit = _study(tmp_path, impostor, rounds=1)
    failures = records[0]["failures"]
    assert sorted(f["node"] for f in failures if "duplicate ids" in f["reason"]) == [100, 104]
    assert [e["sites"] for e in audit if e["event"] == "aggregated"] == [["site-1", "site-2", "site-3"]]
    joined = {e["site"]: (e["node"], e["round"]) for e in audit if e["event"] == "site-joined"}
    assert joined["site-0"] == (100, 1) and joined["site-4"] == (104, 1), "bound in evaluation, each to its own node"
    assert summary["failures"] == [] and "site-4" in summary["sites"]


def test_an_inflated_weight_is_capped_at_the_ratio_times_the_median(tmp_path):
    summary, records, audit = _study(tmp_path, _attack("weight-inflation"))
    for record in records:
        (capped,) = record["capped"]
        assert capped["site"] == "site-0" and capped["claimed"] == INFLATED_WEIGHT
        honest = sorted(row["num-examples"] for site, row in record["sites"].items() if site != "site-0")
        weights = sorted([*honest, capped["weight"]])
        assert capped["weight"] == pytest.approx(10.0 * weights[(len(weights) - 1) // 2])
        assert record["sites"]["site-0"]["num-examples"] == capped["weight"], "the site is weighed as capped"
    claims = [e for e in audit if e["event"] == "update-received" and e["site"] == "site-0"]
    assert all(e["num-examples"] == INFLATED_WEIGHT for e in claims), "the trail keeps what was claimed"
    assert [e["weight"] for e in claims] == [c["weight"] for r in records for c in r["capped"]]
    rejected = [e for e in audit if e["event"] == "rejected"]
    assert len(rejected) == 2 and all("max-site-weight-ratio" in e["reason"] for e in rejected)
    assert summary["rounds"] == 2


def test_weight_cap_off_keeps_the_claim(tmp_path):
    _, records, _ = _study(tmp_path, _attack("weight-inflation"), rounds=1, max_site_weight_ratio=0.0)
    assert records[0]["capped"] == [] and records[0]["sites"]["site-0"]["num-examples"] == INFLATED_WEIGHT


# --------------------------------------------------------------------------- the binding's rules
def _reply(node: int, site: str | None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1.0})})
    if site is not None:
        content["site"] = ConfigRecord({"site-id": site})
    msg = Message(content=content, dst_node_id=node, message_type="evaluate")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_a_site_id_moves_only_when_its_node_has_left():
    binding = SiteBinding()
    kept, refused, events = binding.admit([_reply(1, "a"), _reply(2, "b")], lambda: [1, 2])
    assert len(kept) == 2 and not refused and events == [BindingEvent("a", 1), BindingEvent("b", 2)]
    kept, refused, _ = binding.admit([_reply(3, "a")], lambda: [1, 2, 3])
    assert not kept and "still connected" in refused[0].reason
    kept, refused, events = binding.admit([_reply(3, "a")], lambda: [2, 3])  # node 1 left: a restarted site
    assert len(kept) == 1 and events == [BindingEvent("a", 3, old_node=1)]
    assert binding.site(3) == "a" and binding.site(1) is None
    kept, refused, _ = binding.admit([_reply(2, "a")], lambda: [2, 3])  # bound to "b", claims "a"
    assert not kept and refused[0].site == "b" and "claims site id a" in refused[0].reason
    kept, refused, _ = binding.admit([_reply(5, None)], lambda: [5])  # no claim: screening reports it
    assert len(kept) == 1 and not refused


def test_a_resumed_run_restores_the_binding_from_the_audit_trail(tmp_path):
    from medfed.server.audit import ServerAudit

    trail = ServerAudit(tmp_path)
    trail.log.append("run-start")
    trail.bindings(1, [BindingEvent("a", 1), BindingEvent("b", 2), BindingEvent("a", 3, old_node=1)])
    resumed = ServerAudit(tmp_path)
    resumed.binding.restore(resumed._recorded_bindings())
    assert resumed.binding.node_of == {"a": 3, "b": 2}
    kept, refused, _ = resumed.binding.admit([_reply(1, "a")], lambda: [1, 2, 3])
    assert not kept and refused


def test_an_error_reply_is_named_by_the_site_bound_to_its_node():
    from flwr.app import Error

    binding = SiteBinding()
    binding.admit([_reply(7, "hosp-a")], lambda: [7])
    error = Message(Error(code=1, reason="site hosp-a: DataError"), reply_to=_reply(7, None))
    error.metadata.__dict__["_src_node_id"] = 7
    kept, refused, _ = binding.admit([error], lambda: [7])
    assert kept == [error] and not refused
    from medfed.server.replies import screen_evaluate_replies

    _, failures = screen_evaluate_replies(kept)
    assert [f.site for f in failures] == [None] and [f.site for f in binding.name(failures)] == ["hosp-a"]

"""A deployed study reports only what the sites measured, names every site, and ends with an outcome that means what it says.

The studies here run the real ServerApp loop (:func:`run_federated` with ``simulation=False``:
a coordinator that holds no data) and the real ClientApp handlers in one process
(:class:`InProcessGrid`). The loopback deployment with TLS shows the same in
``tests/test_deploy_truth_e2e.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from medfed.common.config import StudyConfig
from medfed.common.constants import FactKey, NodeConfigKey, RecordKey
from medfed.common.site_facts import SiteFacts, facts_problem
from medfed.server.describe import agreed_info
from medfed.server.federation import run_federated
from medfed.server.outcome import EXIT_CODES, Outcome, StudyEnded, StudyFailed, outcome_from_details
from tests.inprocess_grid import InProcessGrid

FAST = {"local_steps": 3, "batch_size": 16, "node_wait_timeout": 0.0}


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _cfg(tmp_path: Path, **kw) -> StudyConfig:
    base = {"dataset": "synthetic", "num_sites": 2, "min_sites": 2, "num_server_rounds": 2,
            "out_dir": str(tmp_path / "run"), **FAST}
    return StudyConfig(**{**base, **kw})


def _with_facts(reply: Message, **changes) -> Message:
    """The reply with its facts record changed as a site would send it (its own boundary passes)."""
    facts = dict(reply.content[RecordKey.FACTS.value])
    facts.update({k.replace("_", "-"): v for k, v in changes.items()})
    reply.content[RecordKey.FACTS.value] = ConfigRecord(facts)
    return reply


def test_the_deployed_server_reports_the_pool_of_the_sites_test_metrics(tmp_path, monkeypatch):
    import medfed.server.central as central

    def no_server_data(*_a, **_k):
        raise AssertionError("a deployed server evaluated on data of its own")

    monkeypatch.setattr(central, "evaluate_arrays", no_server_data)
    cfg = _cfg(tmp_path)
    summary = run_federated(InProcessGrid(2, cfg.to_dict()), cfg)
    assert summary["outcome"] == {"status": "completed", "reason": ""}
    source = summary["test-source"]
    assert source["kind"] == "sites" and source["note"].startswith("pooled over 2 site(s)' test splits")
    counts = source["sites"]
    assert set(counts) == {"site-0", "site-1"} and all(n > 0 for n in counts.values())
    sites, test = summary["sites"], summary["test"]
    # accuracy at the chosen threshold: the pool equals the sites' test accuracies weighted by their test n
    pooled = sum(counts[s] * sites[s]["test-accuracy"] for s in counts) / sum(counts.values())
    assert test["accuracy"] == pytest.approx(pooled, abs=1e-9)
    assert {"auc", "sensitivity", "specificity", "balanced-accuracy", "loss"} <= set(test)
    assert summary["dataset"] == {"name": "site-data", "num-sites": 2,
                                  "sources": {"site-0": "synthetic", "site-1": "synthetic"}}
    assert summary["final-round-test"] == {} and "site-test" not in summary
    # fairness comes only from the sites' group counts
    assert summary["fairness"]["source"].startswith("pooled per-group counts") and "central" not in summary["fairness"]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["applied"] and r["test"]["auc"] > 0 for r in rounds)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Measured on pooled over 2 site(s)' test splits" in report and "simulation only" not in report
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    described = [e for e in audit if e["event"] == "sites-described"]
    assert described and described[0]["sources"] == {"site-0": "synthetic", "site-1": "synthetic"}


def test_sites_that_disagree_on_the_data_stop_the_study_naming_the_site(tmp_path):
    def tamper(partition, sent, reply):
        if sent.metadata.message_type == MessageType.QUERY and partition == 1:
            return _with_facts(reply, image_size=64)
        return reply

    cfg = _cfg(tmp_path)
    summary = run_federated(InProcessGrid(2, cfg.to_dict(), tamper), cfg)
    outcome = summary["outcome"]
    assert outcome["status"] == "failed"
    assert outcome["reason"].startswith("site site-1 disagrees with site site-0 on image-size 64 (site site-0: 28)")
    assert "site.yaml" in outcome["reason"]
    assert summary["test"] == {} and not (tmp_path / "run" / "model.pt").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["outcome"] == outcome


def test_dataset_synthetic_is_refused_when_a_site_serves_its_own_data(tmp_path):
    def tamper(partition, sent, reply):
        if sent.metadata.message_type == MessageType.QUERY and partition == 0:
            return _with_facts(reply, source="dicom")
        return reply

    cfg = _cfg(tmp_path)
    summary = run_federated(InProcessGrid(2, cfg.to_dict(), tamper), cfg)
    reason = summary["outcome"]["reason"]
    assert summary["outcome"]["status"] == "failed"
    assert "dataset=synthetic but site site-0 serves its own dicom data" in reason and "dataset='site-data'" in reason


def _facts(**kw) -> SiteFacts:
    base = {"task": "classification", "source": "medmnist", "num_classes": 2, "in_channels": 1, "image_size": 28,
            "spatial_dims": 2, "label_names": ("normal", "pneumonia")}
    return SiteFacts(**{**base, **kw})


def test_the_model_shape_comes_from_the_sites_and_run_config_values_must_match():
    info = agreed_info({"a": _facts(), "b": _facts(source="dicom")}, StudyConfig(dataset="site-data"))
    assert (info.num_classes, info.in_channels, info.image_size, info.label_names) == (2, 1, 28, ("normal", "pneumonia"))
    with pytest.raises(StudyFailed, match=r"the run config sets num-classes=3 but site a's data has num-classes=2"):
        agreed_info({"a": _facts(), "b": _facts()}, StudyConfig(dataset="site-data", num_classes=3))
    # the majority is the reference: the odd site out is the one named
    with pytest.raises(StudyFailed, match=r"^site c disagrees with site a on label-names normal,covid"):
        agreed_info({"a": _facts(), "b": _facts(), "c": _facts(label_names=("normal", "covid"))},
                    StudyConfig(dataset="site-data"))
    with pytest.raises(StudyFailed, match="site b names its groups sex=f,m but site a age=young,old"):
        agreed_info({"a": _facts(group_attribute="age", group_names=("young", "old")),
                     "b": _facts(group_attribute="sex", group_names=("f", "m"))}, StudyConfig(dataset="site-data"))
    grouped = agreed_info({"a": _facts(group_attribute="sex", group_names=("f", "m")), "b": _facts()},
                          StudyConfig(dataset="site-data"))
    assert (grouped.group_name, grouped.group_values) == ("sex", ("f", "m"))


def test_facts_carry_no_free_text_and_travel_as_flower_records():
    from medfed.server.limits import reply_bytes

    good = _facts().to_record()
    assert facts_problem(good) is None and SiteFacts.from_record(good) == _facts()
    grouped = _facts(group_attribute="sex", group_names=("female", "male"))
    assert SiteFacts.from_record(grouped.to_record()) == grouped
    assert "label-names" in facts_problem({**good, FactKey.LABEL_NAMES.value: "normal,Jane Doe; MRN 1234567"})
    assert "label-names" in facts_problem({**good, FactKey.LABEL_NAMES.value: "normal"})  # one name per class
    assert "exactly" in facts_problem({**good, "patient-count": 3})
    assert "exactly" in facts_problem({**good, FactKey.GROUP_ATTRIBUTE.value: "sex"})  # names come with it
    assert "source" in facts_problem({**good, FactKey.SOURCE.value: "/data/hospital"})
    # Flower sizes every record of a reply (max-reply-mb): no empty string or list may be in one
    for facts in (_facts(), grouped):
        reply = Message(RecordDict({RecordKey.FACTS.value: ConfigRecord(facts.to_record())}), dst_node_id=1,
                        message_type=MessageType.QUERY, group_id="describe")
        assert reply_bytes(reply) > 0


def test_a_study_in_which_no_site_trained_fails_with_no_test_metrics(tmp_path):
    def tamper(partition, sent, reply):
        if sent.metadata.message_type == MessageType.TRAIN:
            return Message(Error(code=100, reason=f"site site-{partition}: DataError (details in the site's log)"),
                           reply_to=sent)
        return reply

    cfg = _cfg(tmp_path, max_failed_rounds=5)
    summary = run_federated(InProcessGrid(2, cfg.to_dict(), tamper), cfg)
    outcome = summary["outcome"]
    assert outcome["status"] == "failed" and outcome["reason"].startswith("no round was applied")
    assert summary["test"] == {} and summary["selected-round"] is None
    assert not (tmp_path / "run" / "model.pt").exists()
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["applied"] for r in rounds] == [False, False] and not any(r["selected"] for r in rounds)
    # every failure names its site, the node beside it
    assert {(f["site"], f["node"]) for r in rounds for f in r["failures"]} >= {("site-0", 100), ("site-1", 101)}


def test_selection_never_picks_a_round_no_site_trained(tmp_path):
    def fail(partition, sent):  # the site's training fails (so round 3's message evaluates nothing either)
        config = sent.content.get(RecordKey.CONFIG.value) or {}
        if sent.metadata.message_type == MessageType.TRAIN and config.get("server-round") == 3:
            return Message(Error(code=100, reason=f"site site-{partition}: RuntimeError"), reply_to=sent)
        return None

    cfg = _cfg(tmp_path, num_server_rounds=3, selection="last", max_failed_rounds=5)
    summary = run_federated(InProcessGrid(2, cfg.to_dict(), fail=fail), cfg)
    assert summary["applied-rounds"] == [1, 2]
    assert summary["selected-round"] == 2  # "last" means the last round that was applied, never round 3
    assert summary["outcome"]["status"] == "completed"
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["applied"] for r in rounds] == [True, True, False]
    assert rounds[2]["val"] == {} and rounds[2]["sites"] == {}  # an unchanged model is not evaluated again
    assert set(summary["sites"]) == {"site-0", "site-1"}  # the final evaluation of round 2's model still ran


def test_a_site_that_never_answers_is_named_in_the_round_failures(tmp_path):
    def tamper(partition, sent, reply):
        config = sent.content.get(RecordKey.CONFIG.value) or {}
        silent = sent.metadata.message_type == MessageType.TRAIN and config.get("server-round") == 2
        return None if silent and partition == 1 else reply

    cfg = _cfg(tmp_path, min_sites=1, round_timeout=1.0)
    run_federated(InProcessGrid(2, cfg.to_dict(), tamper), cfg)
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    silent = {"site": "site-1", "node": 101, "reason": "no reply within round-timeout=1 s"}
    assert rounds[0]["failures"] == [silent]  # round 1's model was evaluated inside round 2's train message
    assert rounds[0]["time"]["evaluated-with-round"] == 2 and "val-auc" not in rounds[0]["sites"]["site-1"]
    assert rounds[1]["failures"] == [silent]
    assert rounds[1]["applied"]  # min-sites=1: site-0 alone makes the round


def test_the_deployed_server_app_raises_the_outcome_and_the_simulated_one_does_not(tmp_path):
    from medfed.server.app import main

    def tamper(partition, sent, reply):
        if sent.metadata.message_type == MessageType.QUERY:
            return Message(Error(code=101, reason=f"site site-{partition}: UntrustedAppError: refused app"),
                           reply_to=sent)
        return reply

    cfg = _cfg(tmp_path)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_dict())
    with pytest.raises(StudyEnded) as raised:
        main(InProcessGrid(2, cfg.to_dict(), tamper), context)
    outcome = outcome_from_details(f"ServerApp failed with exception: {raised.value}")
    assert outcome.status == "failed" and outcome.exit_code == 4
    assert "only 0 site(s) described their data" in outcome.reason
    assert ("site site-0 (node 100; named by its error reply, not yet bound): site site-0: UntrustedAppError: "
            "refused app") in outcome.reason
    failed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted((f["site"], f["node"], f.get("site-unverified")) for f in failed["failures"]) == [
        ("site-0", 100, True), ("site-1", 101, True)]
    cfg2 = _cfg(tmp_path / "sim")
    sim = Context(run_id=1, node_id=0, node_config={NodeConfigKey.SIMULATION.value: True}, state=RecordDict(),
                  run_config=cfg2.to_dict())
    main(InProcessGrid(2, cfg2.to_dict()), sim)  # simulation: the server's own data, no describe, no raise
    summary = json.loads((tmp_path / "sim" / "run" / "summary.json").read_text())
    assert summary["test-source"]["kind"] == "server" and summary["outcome"]["status"] == "completed"


def test_medfed_run_exit_codes_say_how_the_study_ended():
    from medfed.server.submit import RunResult, run_exit

    assert run_exit(RunResult(7, "finished:completed")) == (0, "run 7: finished:completed")
    stopped = f"ServerApp failed with exception: {StudyEnded(Outcome('stopped', 'max-failed-rounds=2 reached'))}"
    assert run_exit(RunResult(7, "finished:failed", stopped)) == (3, "run 7: study stopped: max-failed-rounds=2 reached")
    failed = f"ServerApp failed with exception: {StudyEnded(Outcome('failed', 'no round was applied'))}"
    assert run_exit(RunResult(7, "finished:failed", failed))[0] == 4
    code, line = run_exit(RunResult(7, "finished:failed", "ServerApp failed with exception: boom"))
    assert code == 1 and "boom" in line
    assert run_exit(RunResult(7, "finished:stopped"))[0] == 1
    assert EXIT_CODES == {"completed": 0, "stopped": 3, "failed": 4}


def test_a_reply_the_superlink_wrote_is_reported_under_the_node_it_was_sent_to():
    from medfed.server.exchange import send_and_receive

    class Grid:
        def push_messages(self, messages):
            self.sent = list(messages)
            for i, m in enumerate(self.sent):
                m.metadata.__dict__["_message_id"] = f"m{i}"
            return [m.metadata.message_id for m in self.sent]

        def pull_messages(self, ids):
            reply = Message(Error(code=0, reason="node is offline"), reply_to=self.sent[0])
            reply.metadata.__dict__["_src_node_id"] = 1  # Flower's SUPERLINK_NODE_ID
            return [reply]

    msg = Message(RecordDict(), dst_node_id=11959600422165621278, message_type=MessageType.TRAIN, group_id="1")
    (reply,) = send_and_receive(Grid(), [msg], timeout=1.0)
    assert reply.metadata.src_node_id == 11959600422165621278 and reply.has_error()
    assert "node is offline" in reply.error.reason


def test_pooled_test_metrics_equal_the_metrics_of_all_test_images_together():
    from medfed.common.metrics import classification_metrics, score_histograms
    from medfed.server.selection import pool_test

    rng = np.random.default_rng(3)
    per_site, labels, scores = {}, [], []
    for site, n in (("a", 70), ("b", 130)):
        y = rng.integers(0, 2, n)
        s = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
        pos, neg = score_histograms(y, s, bins=100)
        per_site[site] = {"test-hist-pos": list(map(float, pos)), "test-hist-neg": list(map(float, neg)),
                          "test-num-examples": float(n), "test-loss": 0.5}
        labels.append(y)
        scores.append(s)
    y, s = np.concatenate(labels), np.concatenate(scores)
    exact = classification_metrics(y, np.stack([1 - s, s], axis=1), threshold=0.4)
    pooled = pool_test(per_site, 0.4)
    for key in ("accuracy", "sensitivity", "specificity", "balanced-accuracy"):
        assert pooled.metrics[key] == pytest.approx(exact[key], abs=1e-12)
    assert pooled.metrics["auc"] == pytest.approx(exact["auc"], abs=0.01)  # 100 bins
    assert pooled.counts == {"a": 70, "b": 130} and "n=200" in pooled.note


def test_a_site_answers_only_the_describe_query(tmp_path):
    from medfed.client.app import app

    cfg = _cfg(tmp_path)
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=cfg.to_dict())

    def query(kind: str) -> Message:
        return Message(RecordDict({"config": ConfigRecord({"query": kind})}), dst_node_id=5,
                       message_type=MessageType.QUERY)

    facts = SiteFacts.from_record(dict(app(query("describe"), ctx).content[RecordKey.FACTS.value]))
    assert (facts.source, facts.num_classes, facts.group_attribute) == ("synthetic", 2, "sex")
    refused = app(query("dump-data"), ctx)
    assert refused.has_error() and "unknown query 'dump-data'" in refused.error.reason


def test_medfed_run_exits_5_when_its_wait_times_out(monkeypatch, capsys):
    import argparse

    import medfed.server.submit as submit

    def slow(*_a, **_k):
        raise submit.WaitTimeout("run 9 did not finish within --timeout=1 s (status: running); it goes on")

    monkeypatch.setattr(submit, "submit_run", slow)
    parser = argparse.ArgumentParser()
    submit.add_run_arguments(parser)
    args = parser.parse_args(["--server", "127.0.0.1:9092", "--insecure", "--wait", "--timeout", "1"])
    assert submit.cmd_run(args) == 5
    assert "did not finish within --timeout=1 s" in capsys.readouterr().out


def test_a_dead_site_costs_the_straggler_deadline_not_the_round_timeout(tmp_path):
    import time

    def tamper(partition, sent, reply):
        return None if sent.metadata.message_type == MessageType.TRAIN and partition == 2 else reply

    cfg = _cfg(tmp_path, num_sites=3, min_sites=2, num_server_rounds=1, round_timeout=600.0, straggler_floor=1.0)
    start = time.monotonic()
    summary = run_federated(InProcessGrid(3, cfg.to_dict(), tamper), cfg)
    assert time.monotonic() - start < 60  # not the 600 s round-timeout
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (failure,) = record["failures"]
    assert failure["site"] == "site-2" and "straggler-factor=3 x the median" in failure["reason"]
    assert "at least straggler-floor=1 s" in failure["reason"] and record["applied"]
    assert summary["outcome"]["status"] == "completed"


def test_the_straggler_deadline_follows_the_sites_that_answered():
    from medfed.server.exchange import Deadline

    d = Deadline(600.0, factor=3.0, floor=10.0)
    assert d.seconds([], 4) == 600.0 and d.seconds([2.0], 4) == 600.0  # fewer than half answered: wait
    assert d.seconds([2.0, 4.0], 4) == 10.0  # 3 x 3 s is below the floor
    assert d.seconds([20.0, 40.0], 4) == 90.0  # 3 x the median
    assert d.seconds([300.0, 400.0], 4) == 600.0  # never past round-timeout
    assert Deadline(600.0).seconds([1.0, 1.0, 1.0], 4) == 600.0  # factor 0: off

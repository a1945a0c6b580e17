"""One message per round: the sites evaluate the model they receive inside the next train message.

The real ServerApp loop and the real ClientApp handlers run in one process
(:class:`tests.inprocess_grid.InProcessGrid`). A fused study must record exactly what the
same study records with a separate evaluate message per round, resume exactly from a
round whose evaluation is still on its way, and ask a site that refused training for its
privacy budget to evaluate by a separate message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Error, Message
from medfed.common.config import StudyConfig
from medfed.common.constants import BUDGET_EXHAUSTED, ConfigKey, RecordKey
from medfed.server.federation import run_federated
from tests.inprocess_grid import InProcessGrid

ROUNDS = 4


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


class Interrupted(RuntimeError):
    """The server 'dies' when it is about to send this round's train messages."""


class CountingGrid(InProcessGrid):
    """Records (message type, server round, node, evaluate-received) of every message sent."""

    def __init__(self, num_sites: int, run_config: dict, *, die_at: int | None = None,
                 refuse: tuple[int, int] | None = None):
        super().__init__(num_sites, run_config, fail=self._refuse)
        self.sent: list[tuple[str, int, int, bool]] = []
        self.die_at = die_at
        self.refuse = refuse  # (partition, first round): that site refuses training from then on

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            config = msg.content.get(RecordKey.CONFIG.value) or {}
            rnd = int(config.get(ConfigKey.SERVER_ROUND.value, 0))
            kind = msg.metadata.message_type
            if self.die_at is not None and kind == "train" and rnd == self.die_at:
                raise Interrupted(f"server stopped before round {rnd}")
            self.sent.append((kind, rnd, msg.metadata.dst_node_id,
                              bool(config.get(ConfigKey.EVALUATE_RECEIVED.value, False))))
            ids += super().push_messages([msg])
        return ids

    def _refuse(self, partition: int, sent: Message) -> Message | None:
        """The site refuses training before it runs, as a site at its privacy budget does."""
        config = sent.content.get(RecordKey.CONFIG.value) or {}
        rnd = int(config.get(ConfigKey.SERVER_ROUND.value, 0))
        if (self.refuse and sent.metadata.message_type == "train" and partition == self.refuse[0]
                and rnd >= self.refuse[1]):
            reason = f"site site-{partition}: PublicSiteError: {BUDGET_EXHAUSTED}: spent epsilon=8.0 of 8"
            return Message(Error(code=100, reason=reason), reply_to=sent)
        return None


def _cfg(out: Path, **overrides) -> StudyConfig:
    base = dict(num_sites=3, num_server_rounds=ROUNDS, local_steps=2, batch_size=16, seed=5, min_eval_n=5,
                out_dir=str(out))
    return StudyConfig(**{**base, **overrides})


def _run(cfg: StudyConfig, **grid) -> tuple[dict, list[dict], CountingGrid]:
    g = CountingGrid(cfg.num_sites, cfg.to_dict(), **grid)
    summary = run_federated(g, cfg, simulation=True)
    return summary, _records(Path(cfg.out_dir)), g


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(record):
    """A metrics line without what depends on the clock or on how the messages were split."""
    if isinstance(record, dict):
        return {k: _comparable(v) for k, v in record.items() if k not in ("time", "bytes", "train-s")}
    return record


def _evaluations(out: Path, site: str) -> dict:
    return json.loads((out / "sites" / site / "state" / "evaluations.json").read_text())["runs"]["1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, _task_identity):
    """The same study with fused and with separate evaluation."""
    root = tmp_path_factory.mktemp("fused")
    fused = _run(_cfg(root / "fused"))
    separate = _run(_cfg(root / "separate", fused_evaluation=False))
    return root, fused, separate


def test_fused_and_separate_evaluation_record_the_same_study(pair):
    _, (f_summary, f_records, _), (s_summary, s_records, _) = pair
    assert [r["round"] for r in f_records] == list(range(1, ROUNDS + 1))
    assert [_comparable(r) for r in f_records] == [_comparable(r) for r in s_records]
    assert f_summary["selected-round"] == s_summary["selected-round"]
    assert f_summary["test"] == s_summary["test"] and f_summary["sites"] == s_summary["sites"]
    for record in f_records[:-1]:  # evaluated by the next round's train message
        assert record["time"]["evaluated-with-round"] == record["round"] + 1
        assert record["time"]["evaluate-s"] == 0.0
        assert all("val-auc" in row for row in record["sites"].values())
    assert "evaluated-with-round" not in f_records[-1]["time"]


def test_a_fused_round_is_one_message_per_site(pair):
    _, (_, _, fused), (_, _, separate) = pair
    rounds, final = fused.sent[:-3], fused.sent[-3:]
    assert [k for k, *_ in final] == ["evaluate"] * 3  # the selected model, at every site
    per_round = {rnd: [(k, e) for k, r, _, e in rounds if r == rnd] for rnd in range(1, ROUNDS + 1)}
    assert per_round[1] == [("train", False)] * 3
    for rnd in range(2, ROUNDS):
        assert per_round[rnd] == [("train", True)] * 3, rnd  # the model of round rnd - 1 is evaluated
    assert sorted(per_round[ROUNDS]) == [("evaluate", False)] * 3 + [("train", True)] * 3
    assert len(fused.sent) == len(separate.sent) - 3 * (ROUNDS - 1)
    assert not any(e for _, _, _, e in separate.sent)


def test_the_site_counts_each_fused_evaluation_once(pair):
    root, _, _ = pair
    for site in ("site-0", "site-1", "site-2"):
        fused, separate = _evaluations(root / "fused", site), _evaluations(root / "separate", site)
        assert fused["total"] == separate["total"] == ROUNDS + 1  # each round, then the final model
        assert fused["models"] == separate["models"]


def test_resume_from_a_round_whose_evaluation_is_pending(pair, tmp_path):
    from medfed.common.checkpoint import load_checkpoint

    _, (full_summary, full_records, _), _ = pair
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(_cfg(out), die_at=3)
    assert [r["round"] for r in _records(out)] == [1], "round 2 waits for its evaluation"
    ckpt = load_checkpoint(out / "checkpoints" / "round-0002.pt")
    assert ckpt.metrics["pending-round"]["round"] == 2
    summary, records, grid = _run(_cfg(out, resume=str(out / "checkpoints" / "round-0002.pt")))
    assert [_comparable(r) for r in records] == [_comparable(r) for r in full_records]
    assert summary["test"] == full_summary["test"]
    assert summary["selected-round"] == full_summary["selected-round"]
    assert [(k, r, e) for k, r, _, e in grid.sent if r == 3] == [("train", 3, True)] * 3


def test_a_site_at_its_privacy_budget_evaluates_by_a_separate_message(pair, tmp_path):
    _, (_, full_records, _), _ = pair
    out = tmp_path / "run"
    _, records, grid = _run(_cfg(out), refuse=(0, 3))
    node0 = next(node for node, part in grid.nodes.items() if part == 0)
    assert ("evaluate", 2, node0, False) in grid.sent  # asked again, alone
    assert [s for s in grid.sent if s[0] == "evaluate" and s[1] == 2] == [("evaluate", 2, node0, False)]
    assert _comparable(records[1]) == _comparable(full_records[1]), "round 2 is recorded as without fusing"
    third = records[2]
    assert "site-0" not in third["sites"] or "num-examples" not in third["sites"]["site-0"]
    assert any(f["site"] == "site-0" and BUDGET_EXHAUSTED in f["reason"] for f in third["failures"])

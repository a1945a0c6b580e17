"""DP at a site through the ClientApp, and a study that stops when no site can train."""

from __future__ import annotations

import json

import pytest
from medfed.client.app import app
from medfed.common.constants import BUDGET_EXHAUSTED
from medfed.common.dp.ledger import LEDGER_FILE, PrivacyLedger

from tests.test_client_app import _context, _message, _run_config
from tests.test_simulate_e2e import medfed


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def test_dp_training_reply_reports_privacy_and_keeps_training_loss_home(tmp_path):
    cfg = _run_config(tmp_path, epsilon=2.0, num_server_rounds=2)
    ctx = _context(cfg, {"partition-id": 0, "num-partitions": 3})
    replies = [app(_message("train", {"server-round": r}), ctx) for r in (1, 2, 3)]
    first, second, third = replies
    assert not first.has_error() and not second.has_error()
    m1, m2 = first.content["metrics"], second.content["metrics"]
    assert "train-loss" not in m1  # not covered by the accountant
    assert 0 < m1["epsilon"] < m2["epsilon"] <= 2.0 and m1["epsilon-budget"] == 2.0
    assert m1["noise-multiplier"] == m2["noise-multiplier"] > 0  # calibrated once
    ledger = PrivacyLedger.load(tmp_path / "sites" / "site-0" / "state")
    assert ledger is not None and ledger.spent() == pytest.approx(m2["epsilon"])
    # the plan is spent: a third round is refused, and the reason reaches the server
    assert third.has_error() and BUDGET_EXHAUSTED in third.error.reason and "site-0" in third.error.reason
    # evaluation is on validation/test data only and costs no privacy
    evaluated = app(_message("evaluate"), ctx)
    assert not evaluated.has_error()
    assert PrivacyLedger.load(tmp_path / "sites" / "site-0" / "state").spent() == ledger.spent()


def test_a_study_stops_when_every_site_has_spent_its_budget(tmp_path):
    out = tmp_path / "run"
    small = ["--sites", "2", "--local-steps", "3", "--batch-size", "32", "--epsilon", "1.0"]
    res = medfed("simulate", *small, "--rounds", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    first = json.loads((out / "summary.json").read_text())
    spent = {s: row["epsilon"] for s, row in first["sites"].items()}
    assert set(spent) == {"site-0", "site-1"} and all(0.9 < e <= 1.0 for e in spent.values())
    # Resuming under a lower budget: the sites' ledgers are restored, nothing is left, the study stops.
    resume = [*small[:-1], "0.5", "--rounds", "4", "--resume", str(out / "checkpoints" / "round-0002.pt")]
    res = medfed("simulate", *resume)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "every site has exhausted its privacy budget" in res.stderr
    again = json.loads((out / "summary.json").read_text())
    assert {s: row["epsilon"] for s, row in again["sites"].items()} == spent
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]
    for site in ("site-0", "site-1"):
        assert (out / "sites" / site / "state" / LEDGER_FILE).is_file()
    report = (out / "report.md").read_text()
    assert "## Privacy (record-level DP-SGD at each site)" in report and (out / "site_epsilon.png").is_file()

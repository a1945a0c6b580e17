"""Central (client-level) DP through Flower's wrapper and accountant."""

from __future__ import annotations

import json

import pytest
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError
from medfed.server.central_dp import central_privacy, restore_central_privacy
from medfed.server.strategies import build_strategy

from tests.test_simulate_e2e import medfed


def _cfg(**kw) -> StudyConfig:
    base = {"num_sites": 3, "min_sites": 3, "central_dp": "server-fixed", "central_noise": 1.0}
    return StudyConfig(**{**base, **kw})


@pytest.mark.parametrize("kw, needle", [
    ({"strategy": "fedprox"}, "needs fedavg"),
    ({"fraction_train": 0.5}, "every site must train every round"),
    ({"min_sites": 2}, "every site must train every round"),
])
def test_central_dp_constraints_are_checked(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        build_strategy(_cfg(**kw), 3)


def test_wrapper_accounts_and_resumes():
    strategy = build_strategy(_cfg(), 3)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.strategy.weighted_by_key == "unit-weight"  # equal site weights, as accounting needs
    assert central_privacy(strategy)["releases"] == 0
    restore_central_privacy(strategy, 4)
    after_four = central_privacy(strategy)
    fresh = build_strategy(_cfg(), 3)
    restore_central_privacy(fresh, 2)
    assert after_four["releases"] == 4 and after_four["epsilon"] > central_privacy(fresh)["epsilon"] > 0
    assert central_privacy(build_strategy(StudyConfig(), 3)) is None


def test_central_dp_study_stops_at_its_epsilon_cap(tmp_path):
    one = build_strategy(_cfg(), 2)
    restore_central_privacy(one, 1)
    two = build_strategy(_cfg(), 2)
    restore_central_privacy(two, 2)
    cap = (central_privacy(one)["epsilon"] + central_privacy(two)["epsilon"]) / 2  # room for one release only
    out = tmp_path / "run"
    res = medfed("simulate", "--sites", "2", "--min-sites", "2", "--rounds", "3", "--local-steps", "2",
                 "--central-dp", "server-fixed", "--central-epsilon", str(cap), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "central DP budget reached" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["central-dp"]["releases"] == 1 and summary["central-dp"]["epsilon"] <= cap
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

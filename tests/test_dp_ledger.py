"""The site's privacy ledger: never over budget, ε equal to Opacus's, survives restarts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from medfed.client.boundary import PublicSiteError
from medfed.client.privacy import budget, start_round
from medfed.common.config import StudyConfig
from medfed.common.constants import BUDGET_EXHAUSTED
from medfed.common.dp.accounting import calibrate_noise, epsilon_of
from medfed.common.dp.ledger import LEDGER_FILE, PrivacyLedger
from medfed.common.errors import DataError
from opacus.accountants import PRVAccountant, RDPAccountant


def _site(tmp: Path, epsilon: float = 0.0, delta: float = 1e-5):
    return SimpleNamespace(site_id="a", state_dir=tmp, epsilon=epsilon, delta=delta)


def _opacus_epsilon(history, delta, accountant="rdp") -> float:
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for sigma, q, steps in history:  # step by step, as Opacus's engine records them
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


def test_property_ledger_never_exceeds_budget_and_matches_opacus(tmp_path):
    rng = np.random.default_rng(0)
    for case in range(10):
        state = tmp_path / f"case{case}"
        eps = float(rng.choice([0.5, 1.0, 3.0, 8.0]))
        n_train = int(rng.integers(40, 600))
        taken: list[tuple[float, float, int]] = []
        reports: list[tuple[float, list]] = []
        for study in range(int(rng.integers(1, 4))):  # several studies share one site ledger
            rounds = int(rng.integers(1, 6))
            cfg = StudyConfig(epsilon=eps, num_server_rounds=rounds, local_steps=int(rng.integers(1, 30)),
                              batch_size=int(rng.integers(8, 64)), seed=study)
            for rnd in range(1, rounds + 2):  # one round more than planned
                steps = cfg.local_steps
                before = (state / LEDGER_FILE).read_bytes() if (state / LEDGER_FILE).exists() else None
                try:
                    private = start_round(cfg, _site(state), rnd, steps, n_train)  # a restart: reloads from disk
                except PublicSiteError as exc:
                    assert BUDGET_EXHAUSTED in str(exc)
                    after = (state / LEDGER_FILE).read_bytes() if (state / LEDGER_FILE).exists() else None
                    assert after == before  # a refused round changes nothing
                    continue
                taken.append((private.dp.noise_multiplier, private.dp.sample_rate, steps))
                reported = private.metrics()["epsilon"]
                assert reported <= eps * (1 + 1e-9)
                reports.append((reported, list(taken)))
        for i in sorted({0, len(reports) // 2, len(reports) - 1}) if reports else ():  # Opacus itself is slow: three checks
            reported, history = reports[i]
            assert reported == pytest.approx(_opacus_epsilon(history, 1e-5), abs=1e-6)
        ledger = PrivacyLedger.load(state)
        if ledger is not None:
            assert ledger.spent() <= eps * (1 + 1e-9)
            assert [tuple(h) for h in ledger.history] == taken


def test_noise_is_calibrated_once_for_the_whole_schedule(tmp_path):
    cfg = StudyConfig(epsilon=3.0, num_server_rounds=5, local_steps=20, batch_size=32)
    sigmas, eps = set(), []
    for rnd in range(1, 6):
        private = start_round(cfg, _site(tmp_path), rnd, 20, 320)
        sigmas.add(private.dp.noise_multiplier)
        eps.append(private.metrics()["epsilon"])
    assert len(sigmas) == 1 and eps == sorted(eps)
    assert 0.97 * 3.0 <= eps[-1] <= 3.0  # the planned schedule spends the budget, no more
    # Recalibrating to epsilon=3 every round would have spent far more (the Flower/FLamby pitfall):
    per_round = calibrate_noise(3.0, 1e-5, 0.1, 20)
    assert epsilon_of([(per_round, 0.1, 20)] * 5, 1e-5) > 4.0
    with pytest.raises(PublicSiteError, match=BUDGET_EXHAUSTED):
        start_round(cfg, _site(tmp_path), 6, 20, 320)  # past the plan


def test_prv_accountant_is_recorded_and_used(tmp_path):
    cfg = StudyConfig(epsilon=2.0, num_server_rounds=2, local_steps=10, batch_size=16, dp_accountant="prv")
    private = start_round(cfg, _site(tmp_path), 1, 10, 160)
    assert private.metrics()["dp-accountant"] == 1.0
    assert private.metrics()["epsilon"] == pytest.approx(
        _opacus_epsilon([(private.dp.noise_multiplier, 0.1, 10)], 1e-5, "prv"), abs=1e-6)


def test_the_server_cannot_raise_a_site_budget(tmp_path):
    cfg = StudyConfig(epsilon=8.0, num_server_rounds=2, local_steps=5, batch_size=16)
    assert budget(cfg, _site(tmp_path, epsilon=1.0)) == (1.0, 1e-5)
    assert budget(StudyConfig(), _site(tmp_path, epsilon=1.0)) == (1.0, 1e-5)  # a study without DP
    assert budget(StudyConfig(), _site(tmp_path)) is None
    private = start_round(cfg, _site(tmp_path, epsilon=1.0), 1, 5, 160)
    assert private.ledger.epsilon_budget == 1.0
    # the site raises its own setting later: the ledger keeps the lower budget it started with
    private = start_round(cfg, _site(tmp_path, epsilon=3.0), 2, 5, 160)
    assert private.ledger.epsilon_budget == 1.0 and private.metrics()["epsilon"] <= 1.0


def test_a_corrupt_ledger_is_never_silently_reset(tmp_path):
    cfg = StudyConfig(epsilon=1.0, num_server_rounds=1, local_steps=5, batch_size=16)
    start_round(cfg, _site(tmp_path), 1, 5, 160)
    path = tmp_path / LEDGER_FILE
    data = json.loads(path.read_text())
    data["history"] = "lost"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="must not be guessed"):
        start_round(cfg, _site(tmp_path), 2, 5, 160)
    path.write_text("{ truncated")
    with pytest.raises(DataError):
        PrivacyLedger.load(tmp_path)

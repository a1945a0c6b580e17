"""A privacy ledger that cannot be spent twice or rolled back quietly (issue 14).

Concurrent processes charge one after another (ledger lock); one DP task runs at a site at a
time (training lock); the ledger is bound to the site's hash-chained audit trail, so deleting,
restoring or editing it refuses DP training until ``medfed site privacy reset`` retires it.
Worker processes come from a forkserver that has imported medfed once, so they start fast.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from medfed.client.audit import PRIVACY_CHARGE, PRIVACY_RESET, PrivacyTrail
from medfed.client.boundary import PublicSiteError
from medfed.client.privacy import (
    LEDGER_REFUSED,
    TRAINING_BUSY,
    TRAINING_LOCK,
    LedgerMismatch,
    private_round,
    start_round,
)
from medfed.client.privacy_reset import reset_ledger
from medfed.common.audit_log import AUDIT_FILE, read_entries, verify
from medfed.common.cli import main
from medfed.common.config import StudyConfig
from medfed.common.constants import BUDGET_EXHAUSTED
from medfed.common.dp.accounting import epsilon_of
from medfed.common.dp.ledger import LEDGER_FILE, PrivacyLedger
from medfed.common.errors import MedfedError
from medfed.common.locks import hold_lock

STEPS, N_TRAIN = 5, 160
STUDY = {"local_steps": STEPS, "batch_size": 16}


def _site(state: Path, site_id: str = "a"):
    return SimpleNamespace(site_id=site_id, state_dir=Path(state), epsilon=0.0, delta=1e-5)


def _cfg(epsilon: float = 8.0, rounds: int = 6) -> StudyConfig:
    return StudyConfig(epsilon=epsilon, num_server_rounds=rounds, **STUDY)


# ---------------------------------------------------------------------------- processes
def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "opacus.accountants"])
    return ctx


def _charge_worker(state: str, rounds: list[int], epsilon: float, planned: int, go, results) -> None:
    """Charge ``rounds`` against ``state`` once ``go`` is set; report (charged, refused) on ``results``."""
    go.wait(60)
    charged = refused = 0
    for rnd in rounds:
        try:
            start_round(_cfg(epsilon, planned), _site(Path(state)), rnd, STEPS, N_TRAIN)
            charged += 1
        except PublicSiteError as exc:
            if BUDGET_EXHAUSTED not in str(exc):
                raise
            refused += 1
    results.put((charged, refused))


def _training_holder(state: str, held, release) -> None:
    """Run one DP round inside :func:`private_round` and stay in it until ``release`` is set."""
    with private_round(_cfg(), _site(Path(state)), 1, STEPS, N_TRAIN):
        held.set()
        release.wait(60)


@pytest.fixture
def processes():
    """Processes a test starts; every one is stopped when the test ends, passed or failed."""
    started: list = []
    yield started
    for p in started:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _run_chargers(ctx, processes, state: Path, rounds_per_worker: list[list[int]], epsilon: float, planned: int):
    go, results = ctx.Event(), ctx.Queue()
    for rounds in rounds_per_worker:
        p = ctx.Process(target=_charge_worker, args=(str(state), rounds, epsilon, planned, go, results))
        processes.append(p)
        p.start()
    go.set()
    out = [results.get(timeout=60) for _ in rounds_per_worker]
    for p in processes:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


def _charges(state: Path) -> list[dict]:
    return [e for e in read_entries(state / AUDIT_FILE) if e["event"] == PRIVACY_CHARGE]


def test_property_concurrent_processes_lose_no_charge(tmp_path, processes):
    workers, k = 4, 4
    state = tmp_path / "state"
    rounds = [[w * k + i + 1 for i in range(k)] for w in range(workers)]
    out = _run_chargers(_context(), processes, state, rounds, epsilon=8.0, planned=workers * k)
    assert out == [(k, 0)] * workers
    ledger = PrivacyLedger.load(state)
    assert ledger.charges == len(ledger.history) == workers * k  # no load/save race dropped one
    assert sorted(r["round"] for r in ledger.rounds) == list(range(1, workers * k + 1))
    sigma, q = ledger.noise_multiplier, ledger.sample_rate
    assert ledger.history == ((sigma, q, STEPS),) * (workers * k)  # calibrated once, by whoever came first
    assert ledger.spent() == pytest.approx(epsilon_of([(sigma, q, STEPS)] * (workers * k), ledger.delta), abs=1e-9)
    trail = _charges(state)
    assert [e["charges"] for e in trail] == list(range(1, workers * k + 1))  # one charge after another
    assert [e["previous-charge-seq"] for e in trail] == [0] + [e["seq"] for e in trail[:-1]]
    assert (ledger.trail_seq, ledger.trail_hash, ledger.pending) == (trail[-1]["seq"], trail[-1]["hash"], False)
    assert verify(state / AUDIT_FILE).ok


def test_property_concurrent_attempts_never_exceed_the_budget(tmp_path, processes):
    budget, planned = 2.0, 6  # calibrated for exactly 6 charges
    state = tmp_path / "state"
    attempts = [[w * 3 + i + 1 for i in range(3)] for w in range(4)]  # 12 attempts at once
    out = _run_chargers(_context(), processes, state, attempts, epsilon=budget, planned=planned)
    assert sum(c for c, _ in out) == planned and sum(r for _, r in out) == 12 - planned
    ledger = PrivacyLedger.load(state)
    assert ledger.charges == planned and ledger.spent() <= budget * (1 + 1e-9)
    one_more = epsilon_of((*ledger.history, ledger.history[-1]), ledger.delta)
    assert one_more > budget  # the schedule is tight: exactly `planned` charges fit
    assert len(_charges(state)) == planned


def test_one_dp_task_at_a_time(tmp_path, processes):
    ctx = _context()
    state = tmp_path / "state"
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_training_holder, args=(str(state), held, release))
    processes.append(holder)
    holder.start()
    assert held.wait(60), "the first DP task never started"
    start = time.monotonic()
    with pytest.raises(PublicSiteError) as refused, private_round(_cfg(), _site(state), 2, STEPS, N_TRAIN, wait_s=0.3):
        pytest.fail("a second DP task ran while the first held the site")
    assert time.monotonic() - start >= 0.3  # it waited, boundedly
    assert str(refused.value) == TRAINING_BUSY and str(state) not in str(refused.value)
    assert PrivacyLedger.load(state).charges == 1  # the refused task charged nothing
    with private_round(StudyConfig(**STUDY), _site(state), 2, STEPS, N_TRAIN, wait_s=0) as private:
        assert private is None  # a round without DP neither waits nor charges
    release.set()
    holder.join(timeout=30)
    assert holder.exitcode == 0
    with private_round(_cfg(), _site(state), 2, STEPS, N_TRAIN, wait_s=0) as private:
        assert private.ledger.charges == 2


# ---------------------------------------------------------------------------- trail binding
@pytest.fixture(scope="module")
def charged_states(tmp_path_factory) -> dict[int, Path]:
    """State dirs after 1 and 2 DP rounds, charged once (calibration is slow) and copied by each test."""
    base = tmp_path_factory.mktemp("charged")
    states = {}
    for rnd in (1, 2):
        start_round(_cfg(), _site(base / "state"), rnd, STEPS, N_TRAIN)
        states[rnd] = shutil.copytree(base / "state", base / f"after-{rnd}")
    return states


@pytest.fixture
def charged(charged_states, tmp_path):
    """``charged(n)``: this test's state dir after ``n`` (1 or 2) DP rounds, and its ledger."""
    def make(rounds: int) -> tuple[Path, PrivacyLedger]:
        state = shutil.copytree(charged_states[rounds], tmp_path / "state")
        return state, PrivacyLedger.load(state)
    return make


def _refusal(state: Path, caplog) -> str:
    """The one-line local reason of a refused DP round; the public message carries none of it."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="medfed.client.privacy"), pytest.raises(PublicSiteError) as refused, \
            private_round(_cfg(), _site(state), 9, STEPS, N_TRAIN, wait_s=0):
        pytest.fail("a DP round ran on a ledger that does not match the audit trail")
    assert str(refused.value) == LEDGER_REFUSED and str(state) not in str(refused.value)
    cause = refused.value.__cause__
    assert isinstance(cause, LedgerMismatch)
    detail = str(cause)
    assert "\n" not in detail and str(state / LEDGER_FILE) in detail
    assert "medfed site privacy reset --config site.yaml --i-understand" in detail
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [detail]
    return detail


def test_a_deleted_ledger_is_refused(charged, caplog):
    state, _ = charged(2)
    (state / LEDGER_FILE).unlink()
    detail = _refusal(state, caplog)
    assert "is missing" in detail and str(state / AUDIT_FILE) in detail and "2 privacy charge(s)" in detail
    assert not (state / LEDGER_FILE).exists()  # refused before anything was written


def test_an_old_copy_of_the_ledger_is_refused(charged, tmp_path, caplog):
    state, _ = charged(1)
    shutil.copy(state / LEDGER_FILE, tmp_path / "backup.json")
    start_round(_cfg(), _site(state), 2, STEPS, N_TRAIN)
    shutil.copy(tmp_path / "backup.json", state / LEDGER_FILE)
    assert "is older than the audit trail" in _refusal(state, caplog)


@pytest.mark.parametrize("edit", ["seq", "hash", "history"])
def test_an_edited_ledger_is_refused(charged, caplog, edit):
    state, _ = charged(2)
    path = state / LEDGER_FILE
    data = json.loads(path.read_text())
    if edit == "seq":
        data["trail_seq"] += 7  # claims to be newer than the trail
    elif edit == "hash":
        data["trail_hash"] = "0" * 64
    else:  # forget a round but keep the binding
        data["history"], data["rounds"], data["charges"] = data["history"][:1], data["rounds"][:1], 1
    path.write_text(json.dumps(data))
    assert "does not match the latest privacy charge" in _refusal(state, caplog)


def _site_yaml(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(f"site-id: a\ndata-root: {tmp_path / 'data'}\nstate-dir: {state}\ndataset: synthetic\n")
    return path


def _cli(*argv: str) -> int:
    """``medfed ARGV`` in this process, leaving the ``medfed`` logger as it found it (for caplog)."""
    logger = logging.getLogger("medfed")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        return main(list(argv))
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


def _snapshot(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir())}


def test_reset_needs_i_understand_then_retires_the_ledger_and_allows_a_fresh_budget(charged, tmp_path, caplog,
                                                                                      capsys):
    state, old = charged(2)
    shutil.copy(state / LEDGER_FILE, tmp_path / "backup.json")
    start_round(_cfg(), _site(state), 3, STEPS, N_TRAIN)
    shutil.copy(tmp_path / "backup.json", state / LEDGER_FILE)  # rolled back: refused
    _refusal(state, caplog)
    config = _site_yaml(tmp_path, state)
    before = _snapshot(state)
    capsys.readouterr()
    assert _cli("site", "privacy", "reset", "--config", str(config)) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--i-understand" in err
    assert _snapshot(state) == before  # nothing changed
    assert _cli("site", "privacy", "reset", "--config", str(config), "--i-understand") == 0
    assert not (state / LEDGER_FILE).exists()
    retired = list(state.glob("privacy-ledger.retired-*.json"))
    assert len(retired) == 1 and retired[0].read_bytes() == before[LEDGER_FILE]  # retired, not deleted
    trail = PrivacyTrail.read(state)
    assert trail.charges == () and trail.reset["event"] == PRIVACY_RESET
    assert trail.reset["retired"] == retired[0].name and trail.reset["retired-charges"] == old.charges
    assert verify(state / AUDIT_FILE).ok
    with private_round(_cfg(), _site(state), 1, STEPS, N_TRAIN, wait_s=0) as private:
        assert private.ledger.charges == 1  # a fresh budget
        assert private.ledger.spent() == pytest.approx(old.rounds[0]["epsilon"])
    assert len(PrivacyTrail.read(state).charges) == 1  # only charges after the reset count
    (state / LEDGER_FILE).unlink()  # and the binding holds again after the reset
    assert "1 privacy charge(s)" in _refusal(state, caplog)


def test_reset_waits_for_a_running_dp_task(charged):
    state, _ = charged(1)
    with hold_lock(state / TRAINING_LOCK), pytest.raises(MedfedError, match="a DP training task is running"):
        reset_ledger("a", state, wait_s=0.2)
    assert (state / LEDGER_FILE).is_file() and PrivacyTrail.read(state).reset is None


@pytest.mark.parametrize("crash", ["before-trail-entry", "before-binding"])
def test_a_charge_interrupted_by_a_crash_stays_counted_and_is_bound_later(charged, monkeypatch, crash):
    state, _ = charged(1)

    def crashed(*args, **kwargs):
        raise OSError("power cut")

    target = ("medfed.common.audit_log.AuditLog.append" if crash == "before-trail-entry"
              else "medfed.common.dp.ledger.PrivacyLedger.bound")
    with monkeypatch.context() as m:
        m.setattr(target, crashed)
        with pytest.raises(OSError):
            start_round(_cfg(), _site(state), 2, STEPS, N_TRAIN)
    assert PrivacyLedger.load(state).pending and PrivacyLedger.load(state).charges == 2  # counted
    private = start_round(_cfg(), _site(state), 3, STEPS, N_TRAIN)
    assert private.ledger.charges == 3 and not private.ledger.pending
    assert [e["charges"] for e in _charges(state)] == [1, 2, 3]
    assert verify(state / AUDIT_FILE).ok


def test_a_ledger_from_before_the_binding_is_adopted(charged):
    state, ledger = charged(1)
    (state / AUDIT_FILE).unlink()  # a site upgraded from a version without privacy-charge entries
    data = json.loads((state / LEDGER_FILE).read_text())
    for key in ("trail_seq", "trail_hash", "pending", "charges"):
        data.pop(key)
    (state / LEDGER_FILE).write_text(json.dumps({**data, "version": 1}))
    private = start_round(_cfg(), _site(state), 2, STEPS, N_TRAIN)
    assert private.ledger.charges == 2 and private.ledger.history[0] == ledger.history[0]
    assert [e["charges"] for e in _charges(state)] == [2]

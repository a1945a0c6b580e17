"""The site's side of DP: its budget, its ledger, and the DP settings of this round.

The budget a round runs under is the site's own (``site.yaml``) and the study's
(``--epsilon``), whichever is lower; a server can lower it, never raise it, and a site with
its own budget trains with DP whatever the study says. The ledger in the site's state
directory is restored before and written after (in fact, before) every round.

Three things keep the ledger from being spent twice or rolled back quietly:

* :func:`start_round` loads, projects, charges and saves under an exclusive lock on
  ``<state-dir>/privacy-ledger.lock``, so concurrent processes charge one after another;
* :func:`private_round` lets one DP training task run at a site at a time
  (``<state-dir>/dp-training.lock``, a bounded wait, then a public refusal);
* every charge is also a ``privacy-charge`` entry of the site's hash-chained audit trail and
  the ledger records that entry: a ledger that is missing, older than the trail or does not
  match it is refused, until it is restored or retired with ``medfed site privacy reset``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

from medfed.client.audit import PRIVACY_CHARGE, PrivacyTrail, site_log
from medfed.client.boundary import PublicSiteError
from medfed.client.site_data import SiteRuntime
from medfed.common.config import StudyConfig
from medfed.common.constants import BUDGET_EXHAUSTED, MetricKey
from medfed.common.dp.accounting import ACCOUNTANTS, calibrate_noise
from medfed.common.dp.engine import DPSettings
from medfed.common.dp.ledger import (
    LEDGER_FILE,
    LEDGER_LOCK,
    BudgetExhausted,
    PrivacyLedger,
)
from medfed.common.errors import DataError
from medfed.common.locks import LockBusy, hold_lock

log = logging.getLogger(__name__)

TRAINING_LOCK = "dp-training.lock"
TRAINING_LOCK_WAIT_S = 60.0  # how long a DP task waits for the one before it at the site
TRAINING_BUSY = "another DP training task is running at this site; retry later"
LEDGER_REFUSED = ("the site's privacy ledger does not match its audit trail: DP training is refused until "
                  "the site's administrator restores the ledger (details in the site's log)")
RESET_HINT = ("restore the latest ledger, or for a genuinely new dataset run "
              "'medfed site privacy reset --config site.yaml --i-understand'")


class LedgerMismatch(DataError):
    """The ledger on disk is missing, older than, or other than the one the site's audit trail records."""


@dataclass(frozen=True)
class PrivateRound:
    dp: DPSettings
    ledger: PrivacyLedger

    def metrics(self) -> dict[str, float]:
        return {
            MetricKey.EPSILON.value: self.ledger.spent(),
            MetricKey.DELTA.value: self.ledger.delta,
            MetricKey.EPSILON_BUDGET.value: self.ledger.epsilon_budget,
            MetricKey.NOISE_MULTIPLIER.value: self.dp.noise_multiplier,
            MetricKey.DP_ACCOUNTANT.value: float(ACCOUNTANTS.index(self.ledger.accountant)),
        }


def budget(cfg: StudyConfig, site: SiteRuntime) -> tuple[float, float] | None:
    """(ε, δ) this site trains under, or None when neither the site nor the study asks for DP."""
    given = [(e, d) for e, d in ((site.epsilon, site.delta), (cfg.epsilon, cfg.delta)) if e > 0]
    if not given:
        return None
    return min(e for e, _ in given), min(d for _, d in given)


def study_key(cfg: StudyConfig) -> str:
    """Identifies one study's planned schedule: a new study (or more rounds) is calibrated anew."""
    keys = ("num-server-rounds", "local-epochs", "local-steps", "batch-size", "epsilon", "delta", "seed")
    plan = {k: cfg.to_dict()[k] for k in keys}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def private_round(cfg: StudyConfig, site: SiteRuntime, server_round: int, steps: int, n_train: int,
                  wait_s: float = TRAINING_LOCK_WAIT_S) -> Iterator[PrivateRound | None]:
    """:func:`start_round` for a round trained inside the ``with`` block, one DP task at a site at a time.

    Holds ``<state-dir>/dp-training.lock`` until the block ends; waits up to ``wait_s`` seconds for
    a task that holds it, then raises :class:`PublicSiteError` (:data:`TRAINING_BUSY`).
    Yields None (and locks nothing) when the round is not private.
    """
    with ExitStack() as stack:
        if budget(cfg, site) is not None:
            try:
                stack.enter_context(hold_lock(Path(site.state_dir) / TRAINING_LOCK, wait_s))
            except LockBusy as exc:
                log.error("site %s: DP round %d refused: %s", site.site_id, server_round, exc)
                raise PublicSiteError(TRAINING_BUSY) from exc
        yield start_round(cfg, site, server_round, steps, n_train)


def start_round(cfg: StudyConfig, site: SiteRuntime, server_round: int, steps: int, n_train: int) -> PrivateRound | None:
    """Restore the ledger, calibrate once per study, charge this round's steps (write-ahead).

    All of it under the ledger lock. Raises :class:`PublicSiteError` with :data:`BUDGET_EXHAUSTED`
    when the round would take the site past its budget (the ledger is then left unchanged), and
    with :data:`LEDGER_REFUSED` when the ledger does not match the site's audit trail.
    """
    eps_delta = budget(cfg, site)
    if eps_delta is None:
        return None
    eps, delta = eps_delta
    state = Path(site.state_dir)
    with hold_lock(state / LEDGER_LOCK):  # load -> project -> charge -> save: one process at a time
        ledger = _checked_against_trail(site, PrivacyLedger.load(state))
        ledger = (ledger or PrivacyLedger(eps, delta, cfg.dp_accountant)).with_budget(eps, delta)
        q = min(1.0, cfg.batch_size / n_train)
        ledger = _calibrated(cfg, site, ledger, q, steps)
        try:
            ledger = ledger.charge(server_round, steps, ledger.noise_multiplier, q)
        except BudgetExhausted as exc:
            raise PublicSiteError(str(exc)) from exc
        ledger = _record_charge(site, ledger)  # before training: a crash over-counts, never under-counts
    dp = DPSettings(ledger.noise_multiplier, cfg.max_grad_norm, q, cfg.max_physical_batch)
    return PrivateRound(dp, ledger)


def _calibrated(cfg: StudyConfig, site: SiteRuntime, ledger: PrivacyLedger, q: float, steps: int) -> PrivacyLedger:
    """The ledger with a noise multiplier for this study's planned schedule (calibrated once per study)."""
    key = study_key(cfg)
    if ledger.noise_multiplier is not None and ledger.study == key and ledger.sample_rate == q:
        return ledger
    planned = cfg.num_server_rounds * steps
    try:
        sigma = calibrate_noise(ledger.epsilon_budget, ledger.delta, q, planned, ledger.accountant, ledger.history)
    except ValueError as exc:
        raise PublicSiteError(f"{BUDGET_EXHAUSTED} before this study: {exc}") from exc
    log.info("site %s: DP noise multiplier %.4f calibrated once for %d planned steps at q=%.4f "
             "within epsilon=%g, delta=%g (%s)", site.site_id, sigma, planned, q,
             ledger.epsilon_budget, ledger.delta, ledger.accountant)
    return replace(ledger, noise_multiplier=sigma, sample_rate=q, planned_steps=planned, study=key)


def _record_charge(site: SiteRuntime, ledger: PrivacyLedger) -> PrivacyLedger:
    """Save the charged (pending) ledger, append its ``privacy-charge`` trail entry, save it bound to it."""
    state = Path(site.state_dir)
    ledger.save(state)  # first: a crash before the trail entry leaves a pending charge, counted
    last = ledger.rounds[-1]
    entry = site_log(site.site_id, state).append(
        PRIVACY_CHARGE, round=last["round"], steps=last["steps"], charges=ledger.charges,
        epsilon=ledger.spent(), delta=ledger.delta,
        **{"epsilon-budget": ledger.epsilon_budget, "previous-charge-seq": ledger.trail_seq},
    )
    ledger = ledger.bound(entry["seq"], entry["hash"])
    ledger.save(state)
    return ledger


def _matches(ledger: PrivacyLedger, entry: dict[str, Any]) -> bool:
    """Whether ``entry`` is the trail entry of the ledger's latest charge."""
    return (ledger.trail_seq == entry.get("seq") and ledger.trail_hash == entry.get("hash")
            and ledger.charges == entry.get("charges")
            and math.isclose(ledger.spent(), float(entry.get("epsilon", math.nan)), rel_tol=1e-9, abs_tol=1e-12))


def _checked_against_trail(site: SiteRuntime, ledger: PrivacyLedger | None) -> PrivacyLedger | None:
    """The ledger, if it is the one the site's audit trail records (charges after the latest reset)."""
    trail = PrivacyTrail.read(site.state_dir)
    last = trail.last
    if ledger is None:
        if last is not None:
            _refuse(site, f"is missing but the audit trail {trail.path} records {last.get('charges')} "
                    "privacy charge(s)")
        return None
    if ledger.pending:
        return _bind_pending(site, ledger, trail)
    if last is None:
        if ledger.trail_seq:
            log.warning("site %s: the audit trail %s records none of the privacy charges of %s since its start "
                        "or latest reset (a new trail?); the ledger's %d charge(s) stay counted", site.site_id,
                        trail.path, Path(site.state_dir) / LEDGER_FILE, ledger.charges)
        return ledger
    if _matches(ledger, last):
        return ledger
    counts = (f"trail has {last.get('charges')} charges, latest seq {last.get('seq')}; "
              f"ledger {ledger.charges}, seq {ledger.trail_seq}")
    if ledger.trail_seq < int(last.get("seq", 0)):
        _refuse(site, f"is older than the audit trail {trail.path} ({counts})")
    _refuse(site, f"does not match the latest privacy charge in the audit trail {trail.path} ({counts}): "
            "it was edited or replaced")


def _bind_pending(site: SiteRuntime, ledger: PrivacyLedger, trail: PrivacyTrail) -> PrivacyLedger:
    """Finish a charge a crash interrupted: bind the pending ledger to its trail entry, or write that entry."""
    last = trail.last
    if last is not None and last.get("previous-charge-seq") == ledger.trail_seq \
            and _matches(replace(ledger, trail_seq=last.get("seq"), trail_hash=last.get("hash")), last):
        bound = ledger.bound(last["seq"], last["hash"])  # the entry was written, the ledger not yet bound
        bound.save(site.state_dir)
    elif last is None or ((last.get("seq"), last.get("hash"), last.get("charges"))
                          == (ledger.trail_seq, ledger.trail_hash, ledger.charges - 1)):
        bound = _record_charge(site, ledger)  # the entry was never written
    else:
        _refuse(site, f"holds an unrecorded charge that does not follow the audit trail {trail.path} (trail "
                f"has {last.get('charges')} charges, latest seq {last.get('seq')}; ledger {ledger.charges}, "
                f"seq {ledger.trail_seq})")
    log.warning("site %s: the privacy charge of round %s was interrupted before it was bound to the audit "
                "trail; it is bound now (trail seq %d) and stays counted", site.site_id,
                ledger.rounds[-1]["round"] if ledger.rounds else "?", bound.trail_seq)
    return bound


def _refuse(site: SiteRuntime, what: str) -> NoReturn:
    """Log the one-line reason here and raise the public refusal (which carries no numbers or paths)."""
    detail = f"site {site.site_id}: privacy ledger {Path(site.state_dir) / LEDGER_FILE} {what}; {RESET_HINT}"
    log.error("%s", detail)
    raise PublicSiteError(LEDGER_REFUSED) from LedgerMismatch(detail)

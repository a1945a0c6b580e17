"""The site's side of DP: its budget, its ledger, and the DP settings of this round.

The budget a round runs under is the site's own (``site.yaml``) and the study's
(``--epsilon``), whichever is lower; a server can lower it, never raise it, and a site with
its own budget trains with DP whatever the study says. The ledger in the site's state
directory is restored before and written after (in fact, before) every round.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace

from medfed.client.boundary import PublicSiteError
from medfed.client.site_data import SiteRuntime
from medfed.common.config import StudyConfig
from medfed.common.constants import BUDGET_EXHAUSTED, MetricKey
from medfed.common.dp.accounting import ACCOUNTANTS, calibrate_noise
from medfed.common.dp.engine import DPSettings
from medfed.common.dp.ledger import BudgetExhausted, PrivacyLedger

log = logging.getLogger(__name__)


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


def start_round(cfg: StudyConfig, site: SiteRuntime, server_round: int, steps: int, n_train: int) -> PrivateRound | None:
    """Restore the ledger, calibrate once per study, charge this round's steps (write-ahead).

    Raises :class:`PublicSiteError` with :data:`BUDGET_EXHAUSTED` when the round would
    take the site past its budget; the ledger is then left unchanged.
    """
    eps_delta = budget(cfg, site)
    if eps_delta is None:
        return None
    eps, delta = eps_delta
    ledger = PrivacyLedger.load(site.state_dir) or PrivacyLedger(eps, delta, cfg.dp_accountant)
    ledger = ledger.with_budget(eps, delta)
    q = min(1.0, cfg.batch_size / n_train)
    key = study_key(cfg)
    if ledger.noise_multiplier is None or ledger.study != key or ledger.sample_rate != q:
        planned = cfg.num_server_rounds * steps
        try:
            sigma = calibrate_noise(ledger.epsilon_budget, ledger.delta, q, planned, ledger.accountant, ledger.history)
        except ValueError as exc:
            raise PublicSiteError(f"{BUDGET_EXHAUSTED} before this study: {exc}") from exc
        ledger = replace(ledger, noise_multiplier=sigma, sample_rate=q, planned_steps=planned, study=key)
        log.info("site %s: DP noise multiplier %.4f calibrated once for %d planned steps at q=%.4f "
                 "within epsilon=%g, delta=%g (%s)", site.site_id, sigma, planned, q,
                 ledger.epsilon_budget, ledger.delta, ledger.accountant)
    try:
        ledger = ledger.charge(server_round, steps, ledger.noise_multiplier, q)
    except BudgetExhausted as exc:
        raise PublicSiteError(str(exc)) from exc
    ledger.save(site.state_dir)  # before training: a crash over-counts, never under-counts
    dp = DPSettings(ledger.noise_multiplier, cfg.max_grad_norm, q, cfg.max_physical_batch)
    return PrivateRound(dp, ledger)

"""Central (client-level) DP with Flower's own wrapper and accountant.

``central-dp: server-fixed`` wraps FedAvg in Flower's
``DifferentialPrivacyServerSideFixedClipping``: each site's update is clipped to
``central-clip`` at the server and Gaussian noise (``central-noise`` × clip / sites) is
added to the average. Flower's ``RdpAccountant`` composes one release per round and stops
the study before ``central-epsilon`` would be exceeded.

What it protects, and what not: the unit is a *whole site*. With a handful of hospitals the
noise needed to hide one hospital's entire contribution ruins the model, and the server
still sees every site's raw update before clipping (it must be trusted). Record-level
DP-SGD at each site (``epsilon``) is the meaningful guarantee for patients; central DP
is offered for studies with many sites. Flower's accounting requires, and medfed checks:
FedAvg, every site in every round (no sampling amplification: ``fraction-train`` 1 and
``min-sites`` = ``num-sites``), and equal site weights (sites then send a unit weight
instead of their sample counts).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from medfed.common.config import StudyConfig
from medfed.common.constants import MetricKey
from medfed.common.errors import ConfigError


def check_central_dp(cfg: StudyConfig) -> None:
    problems = []
    if cfg.strategy != "fedavg":
        problems.append(f"strategy={cfg.strategy!r} (Flower's accounting needs fedavg)")
    if cfg.fraction_train != 1.0 or cfg.min_sites != cfg.num_sites:
        problems.append("every site must train every round: set fraction-train 1 and min-sites = num-sites")
    if problems:
        raise ConfigError("central-dp=server-fixed cannot be accounted here: " + "; ".join(problems))


def wrap_central_dp(cfg: StudyConfig, num_sites: int, fedavg_kwargs: dict) -> Strategy:
    """FedAvg with unit site weights inside Flower's server-side fixed-clipping DP wrapper."""
    from flwr.serverapp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    check_central_dp(cfg)
    inner = FedAvg(**{**fedavg_kwargs, "weighted_by_key": MetricKey.UNIT_WEIGHT.value})
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=cfg.central_delta, population_size=num_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=cfg.central_epsilon or None,
    ))
    return DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=cfg.central_noise, clipping_norm=cfg.central_clip,
        num_sampled_clients=num_sites, accountant=accountant,
    )


def restore_central_privacy(strategy: Strategy, rounds_done: int) -> None:
    """After a resume, compose the releases of the rounds already done."""
    if isinstance(strategy, DifferentialPrivacyServerSideFixedClipping) and rounds_done > 0:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        n = strategy.num_sampled_clients
        event = GaussianPrivacyEvent(noise_multiplier=strategy.noise_multiplier, sample_size=n, population_size=n)
        strategy.accountant.compose(event, count=rounds_done)


def central_privacy(strategy: Strategy) -> dict[str, float] | None:
    """ε, δ and releases so far, for the summary (None without central DP)."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is None:
        return None
    return {"epsilon": float(spent.epsilon), "delta": float(spent.delta), "releases": int(spent.num_releases),
            "noise-multiplier": float(strategy.noise_multiplier), "clipping-norm": float(strategy.clipping_norm)}

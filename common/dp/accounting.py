"""Privacy accounting with Opacus's accountants: ε of a history, and one-time noise calibration.

A history is Opacus's own format, a list of ``(noise_multiplier, sample_rate, steps)``
entries. ε is always recomputed from the whole history (the steps actually taken), never
estimated per round and summed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from medfed.common.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE_MULTIPLIER = 50.0
"""Above this, DP-SGD's noise drowns any signal: a budget that needs more is exhausted."""

History = Sequence[tuple[float, float, int]]


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise ConfigError(f"dp-accountant={name!r} is not allowed: choose one of {', '.join(ACCOUNTANTS)}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def epsilon_of(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε of ``history`` at ``delta`` (0 for an empty history)."""
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not steps:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(steps, float(delta))
    acc = _accountant(accountant)
    acc.history = list(steps)
    return float(acc.get_epsilon(delta))


def _rdp_epsilon(steps: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's RDPAccountant.get_epsilon, with each (σ, q) pair's RDP curve computed once.

    RDP composes additively, so a history's curve is Σ steps·curve(σ, q); Opacus recomputes
    every entry's curve on every call, which made planning and projection slow.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(n * _rdp_curve(q, s) for s, q, n in steps)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=np.asarray(rdp), delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _rdp_curve(sample_rate: float, noise_multiplier: float):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                       orders=RDPAccountant.DEFAULT_ALPHAS)


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    history: History = ()) -> float:
    """The smallest noise multiplier (to 0.5 %) with which ``history`` plus ``steps`` more steps at
    ``sample_rate`` stays within (ε, δ). With no history this is Opacus's ``get_noise_multiplier``."""
    if not (epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ConfigError(
            f"cannot calibrate DP noise for epsilon={epsilon}, delta={delta}, "
            f"sample rate={sample_rate}, steps={steps}: all must be positive (delta and the rate <= 1)"
        )
    if not history:
        from opacus.accountants.utils import get_noise_multiplier

        sigma = float(get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, epsilon_tolerance=0.005,
        ))
        if sigma > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"epsilon={epsilon} for {steps} steps at sample rate {sample_rate:.4f} needs a noise "
                f"multiplier of {sigma:.0f} (> {MAX_NOISE_MULTIPLIER:g}): plan fewer steps or a larger budget"
            )
        return sigma
    if epsilon_of(history, delta, accountant) >= epsilon:
        raise ConfigError(f"no privacy budget left: the history already spends epsilon >= {epsilon}")

    def fits(sigma: float) -> bool:
        return epsilon_of((*history, (sigma, sample_rate, steps)), delta, accountant) <= epsilon

    low, high = 0.1, 1.0
    while not fits(high):
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"the budget left (epsilon {epsilon - epsilon_of(history, delta, accountant):.4f} of {epsilon}) "
                f"would need a noise multiplier above {MAX_NOISE_MULTIPLIER:g} for {steps} more steps"
            )
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high

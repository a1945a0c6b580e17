"""The site's privacy ledger: its (ε, δ) budget and every DP step it has taken, on disk.

One JSON file in the site's state directory, written atomically. It holds the budget
(which can only ever be lowered), the accountant, the noise multiplier calibrated once for
the planned schedule, and the Opacus history of ``(σ, q, steps)``. Before a round the site
asks :meth:`PrivacyLedger.project` what ε the planned steps would reach and refuses the
round if that exceeds the budget; the steps are then recorded *before* training
(write-ahead), so a crash mid-round over-counts, never under-counts.

Load, project, charge and save happen under an exclusive ``fcntl.flock`` on
``privacy-ledger.lock`` (:func:`medfed.common.locks.hold_lock`), so two processes at one site cannot both
read the same ledger and each save one charge. Each charge is also an entry of the site's
hash-chained audit trail; the ledger records that entry's ``seq`` and ``hash``
(``trail_seq``, ``trail_hash``) and its count of charges, so a ledger that was deleted,
rolled back to an old copy or edited no longer matches the trail (``client/privacy.py``
checks this). ``pending`` marks a charge saved but not yet bound to its trail entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medfed.common.atomic import atomic_write_text
from medfed.common.constants import BUDGET_EXHAUSTED
from medfed.common.dp.accounting import epsilon_of
from medfed.common.errors import DataError, MedfedError

LEDGER_FILE = "privacy-ledger.json"
LEDGER_LOCK = "privacy-ledger.lock"
LEDGER_VERSION = 2  # 2: bound to the site's audit trail (trail_seq, trail_hash, pending, charges)
_READABLE_VERSIONS = (1, 2)


class BudgetExhausted(Exception):
    """The planned round would take the site past its privacy budget."""


@dataclass(frozen=True)
class PrivacyLedger:
    epsilon_budget: float
    delta: float
    accountant: str = "rdp"
    noise_multiplier: float | None = None  # calibrated once, for the whole planned schedule
    sample_rate: float | None = None
    planned_steps: int = 0
    study: str = ""  # the study the noise was calibrated for (client.privacy.study_key)
    history: tuple[tuple[float, float, int], ...] = ()
    rounds: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # {"round", "steps", "epsilon"}
    trail_seq: int = 0  # seq of the site audit trail's entry for the latest bound charge (0: none)
    trail_hash: str = ""  # that entry's hash
    pending: bool = False  # the latest charge is saved but not yet bound to its trail entry

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def charges(self) -> int:
        """How many rounds were charged to this ledger."""
        return len(self.rounds)

    def spent(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def project(self, steps: int, noise_multiplier: float, sample_rate: float) -> float:
        """ε after ``steps`` more steps at (σ, q)."""
        return epsilon_of((*self.history, (noise_multiplier, sample_rate, steps)), self.delta, self.accountant)

    def charge(self, server_round: int, steps: int, noise_multiplier: float, sample_rate: float) -> PrivacyLedger:
        """The ledger with ``steps`` more steps, or :class:`BudgetExhausted` if that is over budget."""
        after = self.project(steps, noise_multiplier, sample_rate)
        if after > self.epsilon_budget * (1 + 1e-9):
            raise BudgetExhausted(
                f"{BUDGET_EXHAUSTED}: spent epsilon={self.spent():.3f} of {self.epsilon_budget:g} "
                f"(delta={self.delta:g}); round {server_round} ({steps} steps) would reach {after:.3f}"
            )
        return replace(
            self,
            history=(*self.history, (float(noise_multiplier), float(sample_rate), int(steps))),
            rounds=(*self.rounds, {"round": int(server_round), "steps": int(steps), "epsilon": after}),
            pending=True,
        )

    def bound(self, trail_seq: int, trail_hash: str) -> PrivacyLedger:
        """The ledger whose latest charge is the trail entry ``trail_seq`` with hash ``trail_hash``."""
        if trail_seq < 1 or not trail_hash:
            raise ValueError(f"trail_seq={trail_seq} must be >= 1 and trail_hash non-empty")
        return replace(self, trail_seq=int(trail_seq), trail_hash=str(trail_hash), pending=False)

    def with_budget(self, epsilon: float, delta: float) -> PrivacyLedger:
        """The ledger with the lower of its budget and (ε, δ): a budget is never raised."""
        return replace(self, epsilon_budget=min(self.epsilon_budget, epsilon), delta=min(self.delta, delta))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [list(h) for h in self.history]
        d["rounds"] = list(self.rounds)
        return {"version": LEDGER_VERSION, **d, "charges": self.charges, "epsilon-spent": self.spent()}

    def save(self, state_dir: str | Path) -> Path:
        path = Path(state_dir) / LEDGER_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, state_dir: str | Path) -> PrivacyLedger | None:
        path = Path(state_dir) / LEDGER_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("version") not in _READABLE_VERSIONS:
                raise ValueError(f"version {d.get('version')} (expected one of {_READABLE_VERSIONS})")
            ledger = cls(
                epsilon_budget=float(d["epsilon_budget"]), delta=float(d["delta"]),
                accountant=str(d["accountant"]),
                noise_multiplier=None if d["noise_multiplier"] is None else float(d["noise_multiplier"]),
                sample_rate=None if d["sample_rate"] is None else float(d["sample_rate"]),
                planned_steps=int(d["planned_steps"]),
                study=str(d.get("study", "")),
                history=tuple((float(s), float(q), int(n)) for s, q, n in d["history"]),
                rounds=tuple(dict(r) for r in d["rounds"]),
                trail_seq=int(d.get("trail_seq", 0)),
                trail_hash=str(d.get("trail_hash", "")),
                pending=bool(d.get("pending", False)),
            )
            if "charges" in d and int(d["charges"]) != ledger.charges:
                raise ValueError(f"it counts {d['charges']} charges but lists {ledger.charges} rounds")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path} is unreadable ({exc}): the site's privacy ledger must not be guessed; "
                "restore it from backup, or for a genuinely new dataset retire it with "
                "'medfed site privacy reset --config site.yaml --i-understand'"
            ) from exc
        if not math.isfinite(ledger.spent()):
            raise DataError(f"{path}: the recorded history gives a non-finite epsilon")
        return ledger


def retire_ledger(state_dir: str | Path) -> Path | None:
    """Rename the ledger to ``privacy-ledger.retired-<UTC time>.json`` (never delete it); None if none.

    Call it under :func:`medfed.common.locks.hold_lock` on :data:`LEDGER_LOCK`; an existing retired file is never overwritten.
    """
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists():
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        target = path.with_name(f"privacy-ledger.retired-{stamp}{'' if n == 1 else f'-{n}'}.json")
        if not target.exists():
            os.rename(path, target)
            return target
    raise MedfedError(f"{path.parent} already holds 999 ledgers retired at {stamp}: move some aside")

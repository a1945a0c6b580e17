"""How a study ended, and how that reaches ``medfed run``: one line, one exit code.

A study *completes* when it ran all of ``num-server-rounds``. It *stops* when it ended
early but applied at least one round (too few sites, ``max-failed-rounds``, a privacy
budget reached): its results up to the stop are written. It *fails* when there is nothing
to report: the sites disagree on the data's shape, too few sites described their data,
or no round was applied.

A deployed ServerApp that stopped or failed raises :class:`StudyEnded` after writing
``summary.json``, so Flower marks the run ``finished:failed`` with the reason in its status
details; :func:`outcome_from_details` reads it back for ``medfed run --wait/--stream``, which
exits with the code of the outcome (documented in the README and deploy/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.common.errors import MedfedError

COMPLETED = "completed"
STOPPED = "stopped"
FAILED = "failed"

EXIT_CODES = {COMPLETED: 0, STOPPED: 3, FAILED: 4}
"""``medfed run --wait``: 0 completed, 3 stopped early (partial results), 4 failed (no result)."""
EXIT_RUN_ERROR = 1  # the run ended otherwise (the ServerApp crashed, `flwr stop`): see `flwr log RUN`
EXIT_TIMEOUT = 5  # --timeout passed before the run finished; the run goes on at the server

_MARK = "medfed study {}: "


@dataclass(frozen=True)
class Outcome:
    status: str  # COMPLETED, STOPPED or FAILED
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "reason": self.reason}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


class StudyEnded(MedfedError):
    """Raised by the deployed ServerApp when its study stopped or failed (after writing its results)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(_MARK.format(outcome.status) + outcome.reason)
        self.outcome = outcome


class StudyFailed(MedfedError):
    """A study that cannot go on and has nothing to report (sites disagree, none described its data)."""


def outcome_from_details(details: str) -> Outcome | None:
    """The outcome a :class:`StudyEnded` left in Flower's run status details, or None."""
    for status in (STOPPED, FAILED):
        mark = _MARK.format(status)
        if mark in details:
            return Outcome(status, details.split(mark, 1)[1].strip())
    return None

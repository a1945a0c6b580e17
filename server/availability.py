"""Sites that drop and return: bounded waits for nodes and k-of-n rounds.

Flower 1.41's ``sample_nodes`` (``flwr/serverapp/strategy/strategy_utils.py``) loops
``while len(grid.get_node_ids()) < min_available_nodes: sleep(1)`` with no bound, so a
study whose sites went away would wait forever inside ``configure_train``. Before each
phase the study loop therefore waits here, at most ``node-wait-timeout`` seconds, for
``min-sites`` connected nodes, and hands the strategy a :class:`NodeView` that shows
exactly that snapshot: Flower's own sampler then always finds enough nodes and returns.

A round counts only when at least ``min-sites`` sites trained successfully; otherwise
the global model stays unchanged. After ``max-failed-rounds`` such rounds in a row, or
when too few nodes are connected after the wait, the study stops after its last
completed round and still writes its summary and report. A site that comes back is
simply in the next snapshot and sampled again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.supercore.run import Run
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class NodeView(Grid):
    """A grid whose ``get_node_ids`` is a fixed snapshot; everything else goes to ``grid``."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = sorted(node_ids)

    @property
    def run(self) -> Run:
        return self._grid.run

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def] # deprecated upstream
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def wait_for_nodes(
    grid: Grid,
    minimum: int,
    timeout: float,
    *,
    poll_s: float = POLL_INTERVAL_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[int]:
    """Connected node ids once at least ``minimum`` are there, else those present after ``timeout``."""
    deadline = clock() + timeout
    nodes = sorted(grid.get_node_ids())
    logged = False
    while len(nodes) < minimum and clock() < deadline:
        if not logged:
            log.info("waiting up to %.0f s for sites: %d connected, min-sites=%d", timeout, len(nodes), minimum)
            logged = True
        sleep(min(poll_s, max(0.0, deadline - clock())))
        nodes = sorted(grid.get_node_ids())
    return nodes


@dataclass(frozen=True)
class StudyStop:
    """Why a study ended before ``num-server-rounds``: what, why and how to fix, in one message."""

    after_round: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"after-round": self.after_round, "reason": self.reason}


class Availability:
    """Per-study bookkeeping of connected sites and of rounds without a quorum."""

    def __init__(self, min_sites: int, node_wait_timeout: float, max_failed_rounds: int,
                 *, poll_s: float = POLL_INTERVAL_S, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_sites < 1 or node_wait_timeout < 0 or max_failed_rounds < 1:
            raise ValueError(
                f"min_sites={min_sites} and max_failed_rounds={max_failed_rounds} must be >= 1 and "
                f"node_wait_timeout={node_wait_timeout} >= 0"
            )
        self.min_sites = min_sites
        self.node_wait_timeout = node_wait_timeout
        self.max_failed_rounds = max_failed_rounds
        self._wait = {"poll_s": poll_s, "sleep": sleep, "clock": clock}
        self.failed_in_a_row = 0
        self.stop: StudyStop | None = None

    def view(self, grid: Grid, server_round: int, phase: str, *, wait: bool = True) -> NodeView | None:
        """Wait (bounded) for ``min-sites`` nodes; None, with :attr:`stop` set, when too few came."""
        timeout = self.node_wait_timeout if wait else 0.0
        nodes = wait_for_nodes(grid, self.min_sites, timeout, **self._wait)  # type: ignore[arg-type]
        if len(nodes) >= self.min_sites:
            return NodeView(grid, nodes)
        if self.stop is None and server_round == 0:  # before round 1: nothing to resume
            self.stop = StudyStop(0, (
                f"{phase}: only {len(nodes)} site(s) connected after waiting node-wait-timeout="
                f"{self.node_wait_timeout:g} s, fewer than min-sites={self.min_sites}: the study cannot start. "
                "Start the missing sites (`medfed site start`) or lower min-sites, then submit it again"
            ))
            log.error("%s", self.stop.reason)
        elif self.stop is None:
            last = server_round - 1 if phase == "train" else server_round
            self.stop = StudyStop(last, (
                f"round {server_round} ({phase}): only {len(nodes)} site(s) connected after waiting "
                f"node-wait-timeout={self.node_wait_timeout:g} s, fewer than min-sites={self.min_sites}; "
                f"the study stops after round {last} and reports the rounds completed. Start the missing "
                "sites (`medfed site start`) or lower min-sites, then continue with `medfed run --resume`"
            ))
            log.error("%s", self.stop.reason)
        return None

    def final_view(self, grid: Grid) -> NodeView | None:
        """Nodes for the final per-site evaluation; no wait when the study already stopped for lack of sites."""
        timeout = 0.0 if self.stop is not None else self.node_wait_timeout
        nodes = wait_for_nodes(grid, self.min_sites, timeout, **self._wait)  # type: ignore[arg-type]
        if len(nodes) >= self.min_sites:
            return NodeView(grid, nodes)
        log.warning("final evaluation: only %d site(s) connected, fewer than min-sites=%d: the sites do not "
                    "evaluate the selected model; the server's own test metrics are still reported",
                    len(nodes), self.min_sites)
        return None

    def quorum(self, server_round: int, trained: int) -> bool:
        """True when ``trained`` sites reach min-sites; counts rounds without, sets :attr:`stop` at the limit."""
        if trained >= self.min_sites:
            self.failed_in_a_row = 0
            return True
        self.failed_in_a_row += 1
        log.warning("round %d: only %d site(s) trained successfully, fewer than min-sites=%d: the global model "
                    "is unchanged (%d/%d failed rounds in a row)", server_round, trained, self.min_sites,
                    self.failed_in_a_row, self.max_failed_rounds)
        if self.failed_in_a_row >= self.max_failed_rounds and self.stop is None:
            self.stop = StudyStop(server_round, (
                f"{self.failed_in_a_row} rounds in a row (up to round {server_round}) had fewer than "
                f"min-sites={self.min_sites} sites training successfully (max-failed-rounds="
                f"{self.max_failed_rounds}); the study stops after round {server_round}. See each round's "
                "failures in metrics.jsonl, fix or restart those sites, or raise round-timeout, then continue "
                "with `medfed run --resume`"
            ))
            log.error("%s", self.stop.reason)
        return False

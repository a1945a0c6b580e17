"""One exchange of messages with the sites: push, then pull replies every 0.2 s until all came or time ran out.

Flower's deployment Grid polls for replies every 3 s; this uses the same public push/pull
calls every 0.2 s, which takes 1.4 s on average off every phase of a round. Sites that did
not answer in time are returned as failures (:class:`Deadline` says how long a phase waits).

A reply the SuperLink writes itself (a node that went offline, a message whose time ran out)
comes from Flower's ``SUPERLINK_NODE_ID`` (1), not from the site. Such a reply is re-addressed
here as an error reply from the node the message was sent to, so every failure is reported
under that node and, through :class:`~medfed.server.binding.SiteBinding`, its site id.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from medfed.server.replies import Failure

POLL_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Deadline:
    """How long one phase waits: ``round-timeout`` at most, and less once most sites have answered.

    A site that dies mid-round is noticed by Flower only after about 60 s without a heartbeat.
    With ``factor`` > 0, once half of the sites (at least one) have answered, the phase waits
    at most ``factor`` x the median time those sites took, and never less than ``floor``
    seconds: a dead or stalled site then costs seconds, not a minute. Deployment only: in
    simulation the sites of one Ray actor answer one after another, not side by side.
    """

    timeout: float
    factor: float = 0.0  # 0: wait the whole round-timeout
    floor: float = 0.0

    def seconds(self, answered_after: list[float], expected: int) -> float:
        """Seconds after the push at which this phase stops waiting, given when replies came so far."""
        if self.factor <= 0 or not answered_after or 2 * len(answered_after) < expected:
            return self.timeout
        return min(self.timeout, max(self.floor, self.factor * statistics.median(answered_after)))

    def why(self, answered_after: list[float], expected: int) -> str:
        waited = self.seconds(answered_after, expected)
        if waited >= self.timeout:
            return f"no reply within round-timeout={self.timeout:g} s"
        return (f"no reply within {waited:.1f} s: straggler-factor={self.factor:g} x the median "
                f"{statistics.median(answered_after):.1f} s of the {len(answered_after)} site(s) that answered "
                f"(at least straggler-floor={self.floor:g} s, at most round-timeout={self.timeout:g} s)")


@dataclass(frozen=True)
class Exchanged:
    replies: list[Message]
    missing: list[Failure]  # one per node that did not answer in time (site ids are named by the binding)


def exchange(grid: Grid, messages: list[Message], deadline: Deadline) -> Exchanged:
    """Push ``messages`` and collect replies until all arrived or the deadline passed."""
    if not messages:
        return Exchanged([], [])
    ids = list(grid.push_messages(messages))
    sent = dict(zip(ids, messages, strict=True))
    pending = set(ids)
    replies: list[Message] = []
    answered_after: list[float] = []
    start = time.monotonic()
    while pending:
        for reply in grid.pull_messages(pending):
            message_id = reply.metadata.reply_to_message_id
            replies.append(_from_destination(reply, sent.get(message_id)))
            pending.discard(message_id)
            answered_after.append(time.monotonic() - start)
        if not pending or time.monotonic() - start >= deadline.seconds(answered_after, len(ids)):
            break
        time.sleep(POLL_INTERVAL_S)
    why = deadline.why(answered_after, len(ids))
    return Exchanged(replies, [Failure(None, sent[i].metadata.dst_node_id, why) for i in ids if i in pending])


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """The replies of :func:`exchange` with a plain ``timeout``."""
    return exchange(grid, messages, Deadline(timeout)).replies


def _from_destination(reply: Message, original: Message | None) -> Message:
    """A SuperLink-made error reply, re-addressed as coming from the node the message went to."""
    if original is None or reply.metadata.src_node_id != SUPERLINK_NODE_ID or not reply.has_error():
        return reply
    error = reply.error
    return Message(Error(code=error.code, reason=f"the SuperLink answered for this node: {error.reason}"),
                   reply_to=original)

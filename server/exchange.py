"""One exchange of messages with the sites: push, then pull replies every 0.2 s until all came or time ran out.

Flower's deployment Grid polls for replies every 3 s; this uses the same public push/pull
calls every 0.2 s, which takes 1.4 s on average off every phase of a round. Sites that did
not answer in time are simply missing from the result.

A reply the SuperLink writes itself (a node that went offline, a message whose time ran out)
comes from Flower's ``SUPERLINK_NODE_ID`` (1), not from the site. Such a reply is re-addressed
here as an error reply from the node the message was sent to, so every failure is reported
under that node and, through :class:`~medfed.server.binding.SiteBinding`, its site id.
"""

from __future__ import annotations

import time

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from medfed.server.replies import Failure

POLL_INTERVAL_S = 0.2


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and collect replies until all arrived or ``timeout`` passed."""
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    sent = dict(zip(ids, messages, strict=True))
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(pending):
            message_id = reply.metadata.reply_to_message_id
            replies.append(_from_destination(reply, sent.get(message_id)))
            pending.discard(message_id)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    return replies  # the caller reports who did not answer, by site (:func:`unanswered`)


def unanswered(messages: list[Message], replies: list[Message], timeout: float) -> list[Failure]:
    """A failure for every node a message went to and no reply came from (site ids are named by the binding)."""
    answered = {r.metadata.src_node_id for r in replies}
    return [Failure(None, m.metadata.dst_node_id, f"no reply within round-timeout={timeout:g} s")
            for m in messages if m.metadata.dst_node_id not in answered]


def _from_destination(reply: Message, original: Message | None) -> Message:
    """A SuperLink-made error reply, re-addressed as coming from the node the message went to."""
    if original is None or reply.metadata.src_node_id != SUPERLINK_NODE_ID or not reply.has_error():
        return reply
    error = reply.error
    return Message(Error(code=error.code, reason=f"the SuperLink answered for this node: {error.reason}"),
                   reply_to=original)

"""Size bound on site replies: a reply larger than ``max-reply-mb`` is turned into an error reply.

Flower itself bounds a gRPC message at 2 GiB (``GRPC_MAX_MESSAGE_LENGTH``) but sends
arrays as separate objects, so a reply's total size has no limit of its own. The bound is
applied once the reply has arrived and before anything parses its arrays; the oversized
reply then shows up as a failure of its site in metrics.jsonl, like any error reply.
"""

from __future__ import annotations

import logging
from copy import copy

from flwr.app import Error, Message
from flwr.app.message.message import make_message

log = logging.getLogger(__name__)

ERROR_CODE_TOO_LARGE = 102  # medfed: the server refused a reply above max-reply-mb
MB = 1024 * 1024


def reply_bytes(msg: Message) -> int:
    """Bytes of a message's records (0 for an error reply)."""
    return sum(rec.count_bytes() for rec in msg.content.values()) if msg.has_content() else 0


def bound_replies(replies: list[Message], max_mb: float) -> list[Message]:
    """``replies`` with every one above ``max_mb`` replaced by an error reply from the same node."""
    out = []
    for msg in replies:
        size = reply_bytes(msg)
        if size <= max_mb * MB:
            out.append(msg)
            continue
        reason = (f"reply of {size / MB:.1f} MB exceeds max-reply-mb={max_mb:g}; raise max-reply-mb "
                  "in the run config if such replies are expected")
        log.warning("node %s: %s", msg.metadata.src_node_id, reason)
        out.append(make_message(copy(msg.metadata), error=Error(code=ERROR_CODE_TOO_LARGE, reason=reason)))
    return out

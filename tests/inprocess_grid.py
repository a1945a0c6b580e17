"""A Grid that runs the real ClientApp in-process: the ServerApp loop end to end without Ray."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

Tamper = Callable[[int, Message, Message], Message]
"""``tamper(partition_id, sent, reply) -> reply``: what a hostile site sends instead (None: no reply at all)."""
Fail = Callable[[int, Message], "Message | None"]
"""``fail(partition_id, sent) -> reply``: the site fails before its handler runs (None: it runs)."""


class InProcessGrid(Grid):
    """The real ServerApp loop and the real ClientApp handlers, in one process (no Ray)."""

    def __init__(self, num_sites: int, run_config: dict, tamper: Tamper | None = None, fail: Fail | None = None):
        self.nodes = {100 + k: k for k in range(num_sites)}  # node id -> partition id
        self.run_config = run_config
        self.replies: dict[str, Message] = {}
        self.tamper = tamper
        self.fail = fail

    def set_run(self, run_id):  # pragma: no cover - not used by the loop
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):
        from medfed.client.app import app

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config=self.run_config,
                          node_config={"partition-id": self.nodes[node], "num-partitions": len(self.nodes)})
            reply = self.fail(self.nodes[node], msg) if self.fail is not None else None
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
                ids.append(msg.metadata.message_id)
                continue
            reply = app(msg, ctx)
            if self.tamper is not None:
                reply = self.tamper(self.nodes[node], msg, reply)
            if reply is not None:  # None: the site never answers this message
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        return self.pull_messages(self.push_messages(messages))

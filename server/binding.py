"""Each site id belongs to one node: the first node that claims it, for the whole run.

A reply's site id is only what the reply says. Without a binding, one node could answer
as another site: its update would be aggregated twice under one name, and its evaluation
would replace the honest site's. :class:`SiteBinding` ties a site id to the node id that
first claimed it. The node id is the SuperLink's, not the site's: with site authentication
(``medfed server start --enable-site-auth``) a node id belongs to a registered public key,
so the binding ties a site id to that key.

- A node already bound to one site id that claims another is refused.
- A site id bound to a node is refused from any other node while that node is still
  connected (:meth:`Grid.get_node_ids`); once the bound node has left (a site restarted
  its SuperNode), the id moves to the new node, and the move is audited (``site-rebound``).
- Two unbound nodes claiming one unbound id in the same phase are both refused: the
  server cannot tell which is honest, so neither may speak for that site.

Error replies carry no claim and pass through; the screening that follows reports them.
A resumed run restores the binding from the audit trail (``site-joined``/``site-rebound``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import Message
from medfed.server.replies import Failure, claimed_site, site_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BindingEvent:
    """A change of the binding: ``old_node`` is None when the site joined for the first time."""

    site: str
    node: int
    old_node: int | None = None


class SiteBinding:
    """Site id <-> node id for one run; see the module docstring."""

    def __init__(self) -> None:
        self.node_of: dict[str, int] = {}
        self.site_of_node: dict[int, str] = {}

    def restore(self, events: Iterable[BindingEvent]) -> None:
        """Replay joins and rebinds recorded earlier in this run (a resumed study)."""
        for event in events:
            self._bind(event.site, event.node)

    def _bind(self, site: str, node: int) -> None:
        old = self.node_of.get(site)
        if old is not None:
            self.site_of_node.pop(old, None)
        self.node_of[site] = node
        self.site_of_node[node] = site

    def site(self, node: int) -> str | None:
        """The site id bound to ``node``, if any."""
        return self.site_of_node.get(node)

    def name(self, failures: Iterable[Failure]) -> list[Failure]:
        """``failures`` with a site id where a reply carried none (an error reply).

        The site id bound to the node when there is one; otherwise the id the error reply's
        reason names, marked unverified (it binds nothing).
        """
        named = []
        for f in failures:
            if f.site is None and f.node in self.site_of_node:
                f = Failure(self.site_of_node[f.node], f.node, f.reason)
            elif f.site is None and (claim := claimed_site(f.reason)):
                f = Failure(claim, f.node, f.reason, bound=False)
            named.append(f)
        return named

    def admit(self, replies: Iterable[Message], live_nodes: Callable[[], Iterable[int]]
              ) -> tuple[list[Message], list[Failure], list[BindingEvent]]:
        """The replies whose site claim is consistent with the binding, the refusals, the changes.

        ``live_nodes`` is called at most once, and only when a bound site id is claimed by
        another node (to see whether the bound node has left).
        """
        replies = list(replies)
        claims: dict[str, list[Message]] = {}
        kept: list[Message] = []
        failures: list[Failure] = []
        for msg in replies:
            site = None if msg.has_error() else site_of(msg)
            if site is None:
                kept.append(msg)  # no claim: screening reports an error or a missing site id
                continue
            claims.setdefault(site, []).append(msg)
        live: set[int] | None = None
        events: list[BindingEvent] = []
        for site, msgs in sorted(claims.items()):
            for msg in msgs:
                node = msg.metadata.src_node_id
                bound_site = self.site_of_node.get(node)
                if bound_site is not None and bound_site != site:
                    failures.append(Failure(bound_site, node, f"node is bound to site {bound_site} but the reply "
                                                              f"claims site id {site}: refused"))
            msgs = [m for m in msgs if self.site_of_node.get(m.metadata.src_node_id) in (None, site)]
            if not msgs:
                continue
            nodes = sorted({m.metadata.src_node_id for m in msgs})
            owner = self.node_of.get(site)
            if owner in nodes:
                kept += [m for m in msgs if m.metadata.src_node_id == owner]
                failures += [Failure(site, m.metadata.src_node_id,
                                     f"site id {site} is bound to node {owner}: a reply from another node "
                                     "claiming it is refused") for m in msgs if m.metadata.src_node_id != owner]
                continue
            if len(nodes) > 1:
                failures += [Failure(site, m.metadata.src_node_id,
                                     f"nodes {', '.join(map(str, nodes))} all claim site id {site}: "
                                     "duplicate ids are refused") for m in msgs]
                continue
            (node,) = nodes
            if owner is not None:
                live = set(live_nodes()) if live is None else live
                if owner in live:
                    failures += [Failure(site, m.metadata.src_node_id,
                                         f"site id {site} is bound to node {owner}, which is still connected: "
                                         "a reply from another node claiming it is refused") for m in msgs]
                    continue
            self._bind(site, node)
            events.append(BindingEvent(site, node, owner))
            if owner is None:
                log.info("site %s joined from node %s", site, node)
            else:
                log.warning("site %s moved from node %s (no longer connected) to node %s", site, owner, node)
            kept += msgs
        return kept, failures, events  # the caller logs the failures once they are named

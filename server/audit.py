"""The server's audit trail, RUN_DIR/audit.jsonl: what was sent to and received from each site.

The round loop calls :class:`ServerAudit` at five points: run start (config hash and the
full config), after screening a round's training replies (model sent to each node,
update received from each site with its hash, num-examples and epsilon spent, the
rejections and capped weights, sites bound to a node for the first time), after
aggregation (the new global model's hash), after each evaluation phase (its rejections and
bindings), and at the end (final model hash; the returned head hash goes into
summary.json as ``audit-head``). The trail also holds the run's :class:`SiteBinding`
(site id <-> node id), restored from it when a study resumes. Simulation and deployment
write the same trail. Events and field names are listed in :data:`EVENTS`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message
from medfed.common.audit_log import AUDIT_FILE, SITE_AUDIT_HEAD, AuditLog, read_entries
from medfed.common.config import StudyConfig
from medfed.common.constants import MetricKey, RecordKey, SiteKey
from medfed.common.hashing import arrays_hash, config_hash, study_config_hash
from medfed.server.binding import BindingEvent, SiteBinding
from medfed.server.replies import Capped, Failure, site_of

log = logging.getLogger(__name__)

SERVER_ACTOR = "server"
AUDIT_HEAD = "audit-head"  # the summary.json key holding the trail's head hash
EVENTS = {
    "run-start": "study-config-hash, config (in full), model (initial global model hash), rounds",
    "run-resumed": "study-config-hash, config, model, checkpoint, from-round",
    "site-joined": "round, site, node: a site id bound to the node that first claimed it in this run",
    "site-rebound": "round, site, node, old-node: a site id moved to a new node after its old node left",
    "model-sent": "round, node, site (when known), model, config-hash: one per training message",
    "update-received": "round, site, node, update, num-examples (as claimed), weight (when capped), "
                       "epsilon/delta (DP), accepted, "
                       "site-audit-head (the site trail's hash when it replied: an anchor for its log)",
    "rejected": "round, phase (train/evaluate/final-evaluate), site, node, reason; also a num-examples "
                "claim above max-site-weight-ratio x the median, with the weight used instead",
    "aggregated": "round, model (new global model hash), sites (whose updates were aggregated)",
    "sites-described": "round (0: before round 1), sources (site -> the kind of data it serves), and the "
                       "describe rejections as rejected entries of phase describe",
    "run-end": "selected-round, model (selected model hash), last-model",
    "run-failed": "reason: the study ended with nothing to report (see summary.json outcome)",
}


def _update_hash(msg: Message) -> str | None:
    arrays = msg.content.get(RecordKey.ARRAYS.value) if msg.has_content() else None
    return arrays_hash(arrays) if isinstance(arrays, ArrayRecord) else None


def _weights(metrics: Any, capped: Capped | None) -> dict[str, Any]:
    """What a site claimed as ``num-examples`` and, when it was capped, the ``weight`` used instead."""
    if capped is None:
        return {"num-examples": metrics.get(MetricKey.NUM_EXAMPLES.value)}
    return {"num-examples": capped.claimed, "weight": capped.weight}


class ServerAudit:
    """Writes one run's server audit trail; see :data:`EVENTS`."""

    def __init__(self, run_dir: str | Path):
        self.log = AuditLog(Path(run_dir) / AUDIT_FILE, SERVER_ACTOR)
        self.binding = SiteBinding()
        self.started = False  # run-start (or run-resumed) recorded

    @classmethod
    def open(cls, cfg: StudyConfig) -> ServerAudit:
        """Open RUN_DIR/audit.jsonl (appending: a log is never rewritten); a resumed run's bindings are restored."""
        trail = cls(cfg.out_dir)
        if cfg.resume:
            trail.binding.restore(trail._recorded_bindings())
        return trail

    def record_start(self, cfg: StudyConfig, arrays: ArrayRecord | None, start_round: int) -> None:
        """Record the run's start (or resumption): config, initial model (None: no model was built)."""
        config = cfg.to_dict()
        fields: dict[str, Any] = {"study-config-hash": study_config_hash(config), "config": config,
                                  "model": arrays_hash(arrays) if arrays is not None else None,
                                  "rounds": cfg.num_server_rounds}
        if cfg.resume:
            self.log.append("run-resumed", checkpoint=str(cfg.resume), **{"from-round": start_round}, **fields)
        else:
            self.log.append("run-start", **fields)
        self.started = True

    def described(self, rnd: int, sources: dict[str, str], failures: Iterable[Failure],
                  events: Iterable[BindingEvent]) -> None:
        """Record the describe exchange: the sites bound by it, what each serves, who failed it."""
        self.bindings(rnd, events)
        self.log.append("sites-described", round=rnd, sources=sources)
        self._rejected(rnd, "describe", failures)

    def run_failed(self, reason: str) -> str:
        """Record a study that ended with nothing to report; returns the head hash for summary.json."""
        return str(self.log.append("run-failed", reason=reason)["hash"])

    def _recorded_bindings(self) -> list[BindingEvent]:
        """Bindings recorded since the last run start (a resumed run continues them)."""
        events: list[BindingEvent] = []
        for entry in read_entries(self.log.path):
            if entry.get("event") == "run-start":
                events.clear()
            elif entry.get("event") in ("site-joined", "site-rebound"):
                events.append(BindingEvent(str(entry["site"]), int(entry["node"])))
        return events

    def bindings(self, rnd: int, events: Iterable[BindingEvent]) -> None:
        """Record the sites bound (joined) or moved to a new node (rebound) in a phase."""
        for e in events:
            if e.old_node is None:
                self.log.append("site-joined", round=rnd, site=e.site, node=e.node)
            else:
                self.log.append("site-rebound", round=rnd, site=e.site, node=e.node, **{"old-node": e.old_node})

    def train_round(self, rnd: int, sent: Iterable[Message], replies: Iterable[Message],
                    accepted: Iterable[Message], failures: Iterable[Failure],
                    events: Iterable[BindingEvent] = (), capped: Iterable[Capped] = ()) -> None:
        """Record the models sent, the updates received, the rejections and capped weights of one training phase."""
        replies = sorted(replies, key=lambda m: (site_of(m) or "", m.metadata.src_node_id))
        self.bindings(rnd, events)
        hashes: dict[int, str] = {}
        for msg in sorted(sent, key=lambda m: m.metadata.dst_node_id):
            arrays = msg.content[RecordKey.ARRAYS.value]
            if id(arrays) not in hashes:  # every message of a round usually carries the same record
                hashes[id(arrays)] = arrays_hash(arrays)
            model = hashes[id(arrays)]
            config = msg.content.get(RecordKey.CONFIG.value)
            node = msg.metadata.dst_node_id
            self.log.append("model-sent", round=rnd, node=node, site=self.binding.site(node), model=model,
                            **{"config-hash": config_hash(dict(config or {}))})
        ok = {id(m) for m in accepted}
        capped = list(capped)
        weight_of = {c.node: c for c in capped}
        for msg in replies:
            if msg.has_error():
                continue  # an error reply has no update: it appears among the rejections
            metrics = msg.content.get(RecordKey.METRICS.value) or {}
            dp = {k.value: metrics[k.value] for k in (MetricKey.EPSILON, MetricKey.DELTA) if k.value in metrics}
            site_rec = msg.content.get(RecordKey.SITE.value) or {}
            anchor = {SITE_AUDIT_HEAD: site_rec[SiteKey.AUDIT_HEAD.value]} \
                if isinstance(site_rec.get(SiteKey.AUDIT_HEAD.value), str) else {}
            self.log.append("update-received", round=rnd, site=site_of(msg), node=msg.metadata.src_node_id,
                            update=_update_hash(msg), accepted=id(msg) in ok,
                            **_weights(metrics, weight_of.get(msg.metadata.src_node_id) if id(msg) in ok else None),
                            **dp, **anchor)
        self._rejected(rnd, "train", failures)
        self._capped(rnd, "train", capped)

    def evaluation(self, rnd: int, phase: str, failures: Iterable[Failure],
                   events: Iterable[BindingEvent] = (), capped: Iterable[Capped] = ()) -> None:
        """Record an evaluation phase's bindings, rejections and capped weights."""
        self.bindings(rnd, events)
        self._rejected(rnd, phase, failures)
        self._capped(rnd, phase, capped)

    def _capped(self, rnd: int, phase: str, capped: Iterable[Capped]) -> None:
        for c in capped:
            self.log.append("rejected", round=rnd, phase=phase, site=c.site, node=c.node, reason=c.reason)

    def _rejected(self, rnd: int, phase: str, failures: Iterable[Failure]) -> None:
        for f in failures:
            extra = {} if f.bound else {"site-unverified": True}  # named only by its own error reply
            self.log.append("rejected", round=rnd, phase=phase, site=f.site or self.binding.site(f.node),
                            node=f.node, reason=f.reason, **extra)

    def round_end(self, rnd: int, arrays: ArrayRecord, accepted: Iterable[Message]) -> None:
        """Record the global model after aggregation."""
        self.log.append("aggregated", round=rnd, model=arrays_hash(arrays),
                        sites=sorted(s for s in (site_of(m) for m in accepted) if s))

    def run_end(self, selected_round: int, selected: ArrayRecord, last: ArrayRecord) -> str:
        """Record the final models; returns the trail's head hash for summary.json."""
        entry = self.log.append("run-end", model=arrays_hash(selected), **{"selected-round": selected_round,
                                                                          "last-model": arrays_hash(last)})
        log.info("audit trail %s: head %s", self.log.path, entry["hash"])
        return str(entry["hash"])

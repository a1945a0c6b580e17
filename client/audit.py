"""The site's audit trail, <state-dir>/audit.jsonl: what this site received and sent, per message.

Every ClientApp message (a fresh process in deployment) appends ``message-received``
(round, phase, hashes of the study config, of the message's config and of the model),
then either ``reply-sent`` (hash of the update or of the metrics, num-examples, epsilon
spent after the round when DP is on) or ``refused`` (the reason, e.g. the privacy budget
is exhausted). The hashes are those the server's trail records
(:mod:`medfed.server.audit`), so the two can be compared entry by entry. In simulation
the site's state dir is RUN_DIR/sites/<site>/state.

A trail that cannot be extended (damaged, unwritable) fails the message: the site
refuses to train rather than train unrecorded.

The privacy ledger writes into the same trail: ``privacy-charge`` for every DP round it
charges (round, steps, the ledger's count of charges and ε after it) and ``privacy-reset``
when an administrator retires the ledger; :class:`PrivacyTrail` reads the charges that
count, those after the latest reset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from medfed.client.site_data import SiteRuntime
from medfed.common.audit_log import (
    AUDIT_FILE,
    AuditError,
    AuditLog,
    entry_hash,
    read_entries,
)
from medfed.common.config import StudyConfig
from medfed.common.constants import ConfigKey, MetricKey, RecordKey
from medfed.common.hashing import arrays_hash, config_hash, study_config_hash

log = logging.getLogger(__name__)

_DP_KEYS = (MetricKey.EPSILON.value, MetricKey.DELTA.value, MetricKey.EPSILON_BUDGET.value)
PRIVACY_CHARGE = "privacy-charge"  # one DP round charged to the privacy ledger
PRIVACY_RESET = "privacy-reset"  # the ledger was retired: later charges start a fresh budget


def site_log(site_id: str, state_dir: str | Path) -> AuditLog:
    """The site's trail, <state-dir>/audit.jsonl, written as ``site_id``."""
    return AuditLog(Path(state_dir) / AUDIT_FILE, site_id)


@dataclass(frozen=True)
class PrivacyTrail:
    """The privacy entries of a site's trail that count: the charges after the latest reset."""

    path: Path
    charges: tuple[dict[str, Any], ...]
    reset: dict[str, Any] | None  # the latest privacy-reset entry (None: never reset)

    @property
    def last(self) -> dict[str, Any] | None:
        return self.charges[-1] if self.charges else None

    @classmethod
    def read(cls, state_dir: str | Path) -> PrivacyTrail:
        """Read <state-dir>/audit.jsonl; raises :class:`AuditError` when a privacy entry was edited."""
        path = Path(state_dir) / AUDIT_FILE
        charges: list[dict[str, Any]] = []
        reset = None
        try:
            for entry in read_entries(path):
                event = entry.get("event") if isinstance(entry, dict) else None
                if event not in (PRIVACY_CHARGE, PRIVACY_RESET):
                    continue
                if entry_hash(entry) != entry.get("hash"):
                    raise AuditError(f"{path}: the {event} entry seq {entry.get('seq')} was edited, its hash "
                                     f"does not match: run 'medfed audit verify {path}'")
                if event == PRIVACY_RESET:
                    charges, reset = [], entry
                else:
                    charges.append(entry)
        except ValueError as exc:  # a line that is not JSON
            raise AuditError(f"{path}: a line is not an audit entry ({exc}): run 'medfed audit verify {path}'") \
                from exc
        return cls(path, tuple(charges), reset)


class SiteAudit:
    """One message's entries in the site's trail."""

    def __init__(self, site: SiteRuntime, phase: str, server_round: int):
        self.log = AuditLog(site.state_dir / AUDIT_FILE, site.site_id)
        self.phase = phase
        self.round = server_round
        self.head = ""  # hash of this message's message-received entry, sent to the server with the reply

    @classmethod
    def received(cls, site: SiteRuntime, cfg: StudyConfig, msg: Message, phase: str) -> SiteAudit:
        """Record the message just received; raises :class:`AuditError` when the trail is damaged."""
        config = dict(msg.content.get(RecordKey.CONFIG.value, ConfigRecord()))
        trail = cls(site, phase, int(config.get(ConfigKey.SERVER_ROUND.value, 0)))
        arrays = msg.content.get(RecordKey.ARRAYS.value)
        trail.head = trail.log.append("message-received", round=trail.round, phase=phase, **{
            "run-id": msg.metadata.run_id,
            "study-config-hash": study_config_hash(cfg.to_dict()),
            "config-hash": config_hash(config),
            "model": arrays_hash(arrays) if isinstance(arrays, ArrayRecord) else None,
        })["hash"]
        return trail

    def sent(self, content: RecordDict) -> None:
        """Record the reply that passed the privacy boundary and is about to leave the site."""
        fields: dict[str, Any] = {}
        arrays = content.get(RecordKey.ARRAYS.value)
        if isinstance(arrays, ArrayRecord):
            fields["update"] = arrays_hash(arrays)
        metrics = dict(content.get(RecordKey.METRICS.value) or {})
        fields["metrics-hash"] = config_hash(metrics)
        if MetricKey.NUM_EXAMPLES.value in metrics:
            fields["num-examples"] = metrics[MetricKey.NUM_EXAMPLES.value]
        fields.update({k: metrics[k] for k in _DP_KEYS if k in metrics})
        if (evaluation := content.get(RecordKey.EVALUATION.value)) is not None:  # a fused round's evaluation
            fields["evaluation-hash"] = config_hash(dict(evaluation))
        self.log.append("reply-sent", round=self.round, phase=self.phase, **fields)

    def refused(self, exc: BaseException) -> None:
        """Record that this message was answered with an error; never raises (the error reply must go out)."""
        try:
            self.log.append("refused", round=self.round, phase=self.phase, reason=f"{type(exc).__name__}: {exc}")
        except Exception as audit_exc:  # noqa: BLE001 - the refusal itself is already logged by the handler
            log.error("could not record the refusal in %s: %s", self.log.path, audit_exc)

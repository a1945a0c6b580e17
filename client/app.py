"""The medfed ClientApp: thin Message handlers around :mod:`medfed.client.task`.

Each handler unpacks the arrays and config, calls a pure function, and packs the reply.
A site that cannot train or evaluate answers with an error reply naming the site and
the reason, so the server logs and excludes it instead of waiting.
Heavy optional libraries (MONAI, Opacus) are imported only by the code paths that need them.
"""

from __future__ import annotations

import functools
import logging

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from medfed.client.incoming import check_incoming
from medfed.common.config import StudyConfig, parse_study_config
from medfed.common.constants import ConfigKey, RecordKey, SiteKey
from medfed.common.errors import ConfigError

log = logging.getLogger(__name__)

ERROR_CODE_SITE = 100  # medfed: the site could not run the task (reason says why)

app = ClientApp()


@functools.lru_cache(maxsize=8)
def _study(items: tuple[tuple[str, object], ...]) -> StudyConfig:
    return parse_study_config(dict(items))


def _context_study(context: Context) -> StudyConfig:
    """The run config the server sent; its errors are the server's and may be sent back."""
    from medfed.client.boundary import PublicSiteError

    try:
        return _study(tuple(sorted(context.run_config.items())))
    except ConfigError as exc:
        raise PublicSiteError(f"the study's run config is invalid: {exc}") from exc


def _site_record(site_id: str) -> ConfigRecord:
    return ConfigRecord({SiteKey.SITE_ID.value: site_id})


def _error_reply(msg: Message, context: Context, exc: Exception, site_id: str | None = None) -> Message:
    """Log the full reason here; send only what :func:`public_reason` allows."""
    from medfed.client.boundary import public_reason

    node = context.node_config
    who = str(site_id or node.get("site-id") or f"partition {node.get('partition-id', '?')}")
    log.error("site %s: %s: %s", who, type(exc).__name__, exc)
    return Message(Error(code=ERROR_CODE_SITE, reason=public_reason(who, exc)), reply_to=msg)


def _refused(msg: Message, context: Context, exc: Exception, site=None, trail=None) -> Message:
    """The error reply for a task that failed, recorded in the site's audit trail when it was opened."""
    if trail is not None:
        trail.refused(exc)
    return _error_reply(msg, context, exc, site.site_id if site else None)


def _reply(msg: Message, content: RecordDict, site_id: str, trail=None) -> Message:
    """The reply, after the privacy boundary has checked every record in it; ``trail`` logs it."""
    from medfed.client.boundary import check_reply

    received = msg.content[RecordKey.ARRAYS.value] if RecordKey.ARRAYS.value in msg.content else {}
    sent = {name: tuple(arr.shape) for name, arr in received.items()}
    if trail is not None and RecordKey.SITE.value in content:  # the server logs it: a cut-off site log shows
        content[RecordKey.SITE.value][SiteKey.AUDIT_HEAD.value] = trail.head
    check_reply(content, sent, site_id)
    if trail is not None:
        trail.sent(content)
    return Message(content=content, reply_to=msg)


def _admit_evaluation(msg: Message, cfg: StudyConfig, site, arrays: ArrayRecord, config: dict) -> None:
    """Count this evaluation in the site's allowance (client/eval_guard.py), or refuse it."""
    from medfed.client.eval_guard import admit_evaluation
    from medfed.common.hashing import arrays_hash

    threshold = config.get(ConfigKey.THRESHOLD.value)
    admit_evaluation(site.state_dir, msg.metadata.run_id, arrays_hash(arrays),
                     None if threshold is None else float(threshold), cfg.num_server_rounds + 1)


@app.train()
def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training data.

    With ``evaluate-received`` set, first evaluate the received model on the validation and
    test splits (before training, so FedBN's local layers are those the separate evaluate
    message would use) and send both results in one reply. The evaluation is counted in the
    site's allowance only once training succeeded and the reply is about to leave: a round
    refused for its privacy budget releases nothing and the server asks for it separately.
    """
    from medfed.client.audit import SiteAudit
    from medfed.client.site_data import resolve_site
    from medfed.client.task import evaluate_round, train_round

    site = trail = None
    try:
        cfg = _context_study(context)
        check_incoming(msg, context.node_config)  # model size bound, message config ranges
        site = resolve_site(context.node_config, cfg)
        trail = SiteAudit.received(site, cfg, msg, "train")  # <state-dir>/audit.jsonl
        arrays = msg.content[RecordKey.ARRAYS.value]
        config = dict(msg.content.get(RecordKey.CONFIG.value, ConfigRecord()))
        fused = bool(config.get(ConfigKey.EVALUATE_RECEIVED.value, False))
        evaluation = evaluate_round(cfg, site, arrays, config) if fused else None
        reply = train_round(cfg, site, arrays, config)
        content = RecordDict(
            {
                RecordKey.ARRAYS.value: reply.arrays,
                RecordKey.METRICS.value: MetricRecord(reply.metrics),
                RecordKey.SITE.value: _site_record(site.site_id),
            }
        )
        if evaluation is not None:
            _admit_evaluation(msg, cfg, site, arrays, config)
            content[RecordKey.EVALUATION.value] = MetricRecord(evaluation)
        return _reply(msg, content, site.site_id, trail)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
        return _refused(msg, context, exc, site, trail)


@app.query()
def handle_query(msg: Message, context: Context) -> Message:
    """Answer the server's ``describe`` query with the shape of this site's data (never its content)."""
    from medfed.client.audit import SiteAudit
    from medfed.client.boundary import PublicSiteError
    from medfed.client.site_data import resolve_site, site_facts
    from medfed.common.constants import QueryKind

    site = trail = None
    try:
        cfg = _context_study(context)
        config = dict(msg.content.get(RecordKey.CONFIG.value, ConfigRecord()))
        kind = config.get(ConfigKey.QUERY.value)
        if kind != QueryKind.DESCRIBE.value:
            raise PublicSiteError(f"unknown query {kind!r}: this site answers only {QueryKind.DESCRIBE.value!r}")
        site = resolve_site(context.node_config, cfg)
        trail = SiteAudit.received(site, cfg, msg, QueryKind.DESCRIBE.value)
        content = RecordDict({
            RecordKey.FACTS.value: ConfigRecord(site_facts(site, cfg).to_record()),
            RecordKey.SITE.value: _site_record(site.site_id),
        })
        return _reply(msg, content, site.site_id, trail)
    except Exception as exc:  # noqa: BLE001
        return _refused(msg, context, exc, site, trail)


@app.evaluate()
def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation and test data."""
    from medfed.client.audit import SiteAudit
    from medfed.client.site_data import resolve_site
    from medfed.client.task import evaluate_round

    site = trail = None
    try:
        cfg = _context_study(context)
        check_incoming(msg, context.node_config)  # model size bound, message config ranges
        site = resolve_site(context.node_config, cfg)
        trail = SiteAudit.received(site, cfg, msg, "evaluate")
        arrays: ArrayRecord = msg.content[RecordKey.ARRAYS.value]
        config = dict(msg.content.get(RecordKey.CONFIG.value, ConfigRecord()))
        _admit_evaluation(msg, cfg, site, arrays, config)
        metrics = evaluate_round(cfg, site, arrays, config)
        content = RecordDict(
            {
                RecordKey.METRICS.value: MetricRecord(metrics),
                RecordKey.SITE.value: _site_record(site.site_id),
            }
        )
        return _reply(msg, content, site.site_id, trail)
    except Exception as exc:  # noqa: BLE001
        return _refused(msg, context, exc, site, trail)

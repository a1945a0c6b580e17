"""Poisoned sites, for simulation only: to measure what screening and robust aggregation buy.

A deployed hospital site must never be told by the server to attack, so nothing here is a
run-config key: the attack is an :class:`AttackSpec` that only the simulation driver reads
(``medfed simulate --malicious-sites 1 --attack sign-flip --attack-scale 10``). The first
``malicious-sites`` partitions (``site-0``, ...) are the attackers.

- ``sign-flip``: the site trains honestly, then sends ``global - scale * (local - global)``
  (a boosted update pointing the wrong way; Blanchard et al. 2017, Fang et al. 2020). It is a
  wrapper around the medfed ClientApp's train handler (:func:`attack_client_app`).
- ``label-flip``: the site's *training* labels are flipped before training (binary ``1 - y``,
  multiclass ``(y + 1) mod C``); its validation and test data stay true. The driver writes
  the poisoned shard (:func:`poison_study_data`); the ClientApp code is unchanged.
- ``weight-inflation``: the site trains honestly but claims ``num-examples`` of 10^12, to
  make its (non-IID) model the federation's. The server caps it (``max-site-weight-ratio``).
- ``impersonate``: from its second round on, the site answers as the first honest site
  (``site-<malicious-sites>``) with a sign-flipped, boosted update, and in evaluation with
  that site's id: a second vote, and the honest site's metrics replaced. The server binds
  each site id to the node that first claimed it, and refuses the claim.
- ``bad-metrics``: the site's evaluation replies (and the evaluation a fused train reply
  carries) hold malformed aggregates, a different one each round (a NaN in a histogram, 5
  bins, positives without negatives, per-group histograms of the wrong length, a NaN
  metric), and its training replies a NaN loss. The
  server drops them; pooling never sees them.

The reply transforms are pure functions of (spec, partition, the message sent, the honest
reply) in :func:`tamper_reply`, used by the ClientApp wrapper and by tests that run the
ServerApp loop in one process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from medfed.common.constants import (
    GROUP_HIST_NEG,
    GROUP_HIST_POS,
    NUM_HIST_BINS,
    ConfigKey,
    MetricKey,
    NodeConfigKey,
    RecordKey,
    SiteKey,
    group_metric_key,
)
from medfed.common.data.splits import FederatedData, ImageSplit
from medfed.common.errors import ConfigError

log = logging.getLogger(__name__)

ATTACKS = ("none", "sign-flip", "label-flip", "weight-inflation", "impersonate", "bad-metrics")
REPLY_ATTACKS = frozenset({"sign-flip", "weight-inflation", "impersonate", "bad-metrics"})
"""Attacks that change a site's replies (the others change its data)."""
DEFAULT_SCALE = 10.0
INFLATED_WEIGHT = 1e12  # weight-inflation: the num-examples claimed
ATTACK_FILE = "attack.json"  # in the run directory of an attacked simulation


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Which simulated sites attack, and how. ``AttackSpec()`` is no attack."""

    kind: str = "none"
    malicious_sites: int = 0
    scale: float = DEFAULT_SCALE  # sign-flip and impersonate

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"attack={self.kind!r} is not one of {', '.join(ATTACKS)}")
        if self.malicious_sites < 0:
            raise ConfigError(f"malicious-sites={self.malicious_sites} must be >= 0")
        if self.kind != "none" and self.malicious_sites == 0:
            raise ConfigError(f"attack={self.kind} needs malicious-sites >= 1 (how many sites attack)")
        if not 0.0 < self.scale <= 1e6:
            raise ConfigError(f"attack-scale={self.scale} must be in (0, 1e6]")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.malicious_sites > 0

    def is_malicious(self, partition_id: int) -> bool:
        return self.active and partition_id < self.malicious_sites

    def check(self, num_sites: int) -> None:
        if self.malicious_sites >= num_sites:
            raise ConfigError(f"malicious-sites={self.malicious_sites} must be below num-sites={num_sites}: "
                              "at least one site has to be honest")

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.kind, "malicious-sites": self.malicious_sites, "attack-scale": self.scale}


def parse_attack(mapping: Mapping[str, Any]) -> AttackSpec:
    """An :class:`AttackSpec` from kebab-case keys ``attack``, ``malicious-sites``, ``attack-scale``."""
    known = {"attack", "malicious-sites", "attack-scale"}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(f"unknown attack key(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    kind = str(mapping.get("attack", "none"))
    default_sites = 1 if kind != "none" else 0
    try:
        return AttackSpec(kind, int(mapping.get("malicious-sites", default_sites)),
                          float(mapping.get("attack-scale", DEFAULT_SCALE)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attack settings {dict(mapping)!r}: {exc}") from exc


# --------------------------------------------------------------------------- the transforms
def sign_flip(local: ArrayRecord, global_arrays: ArrayRecord, scale: float) -> ArrayRecord:
    """``global - scale * (local - global)`` for floating arrays; other arrays as trained."""
    out = {}
    for key, arr in local.items():
        value = arr.numpy()
        if np.issubdtype(value.dtype, np.floating) and key in global_arrays:
            g = global_arrays[key].numpy()
            value = (g - scale * (value - g)).astype(value.dtype)
        out[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(out)


def _round_of(msg: Message) -> int:
    config = msg.content.get(RecordKey.CONFIG.value) if msg.has_content() else None
    return int((config or {}).get(ConfigKey.SERVER_ROUND.value, 0))


def _bad_metrics(metrics: dict[str, Any], variant: int) -> dict[str, Any]:
    """One of five malformed evaluation aggregates (``variant`` mod 5)."""
    out = dict(metrics)
    pos, neg = MetricKey.VAL_HIST_POS.value, MetricKey.VAL_HIST_NEG.value
    hist = [1.0] * NUM_HIST_BINS
    kind = variant % 5
    if kind == 0:
        out[pos], out[neg] = [float("nan")] + hist[1:], hist
    elif kind == 1:
        out[pos], out[neg] = [1.0] * 5, [1.0] * 5
    elif kind == 2:
        out[pos] = hist
        out.pop(neg, None)
    elif kind == 3:
        out[group_metric_key("val", 0, GROUP_HIST_POS)] = [1.0] * (NUM_HIST_BINS // 2)
        out[group_metric_key("val", 0, GROUP_HIST_NEG)] = [1.0] * (NUM_HIST_BINS // 2)
    else:
        out[f"val-{MetricKey.AUC.value}"] = float("nan")
    return out


def _with(sent: Message, reply: Message, **records: Any) -> Message:
    """``reply`` with some records replaced, as a new reply to ``sent``."""
    content = RecordDict(dict(reply.content.items()))
    for key, value in records.items():
        content[key] = value
    return Message(content=content, reply_to=sent)


def tamper_reply(spec: AttackSpec, partition: int, sent: Message, reply: Message) -> Message:
    """What malicious partition ``partition`` sends instead of its honest ``reply`` to ``sent``."""
    if not spec.is_malicious(partition) or spec.kind not in REPLY_ATTACKS or reply.has_error():
        return reply
    train = RecordKey.ARRAYS.value in reply.content
    metrics = dict(reply.content.get(RecordKey.METRICS.value) or {})
    rnd = _round_of(sent)
    if spec.kind == "sign-flip" and train:
        log.warning("simulated attack: partition %s sends a sign-flipped update (scale %g)", partition, spec.scale)
        return _with(sent, reply, arrays=sign_flip(reply.content[RecordKey.ARRAYS.value],
                                             sent.content[RecordKey.ARRAYS.value], spec.scale))
    if spec.kind == "weight-inflation" and train:
        metrics[MetricKey.NUM_EXAMPLES.value] = INFLATED_WEIGHT
        log.warning("simulated attack: partition %s claims num-examples=%g", partition, INFLATED_WEIGHT)
        return _with(sent, reply, metrics=MetricRecord(metrics))
    if spec.kind == "impersonate" and rnd >= 2:
        victim = f"site-{spec.malicious_sites}"
        changed: dict[str, Any] = {RecordKey.SITE.value: ConfigRecord({SiteKey.SITE_ID.value: victim})}
        if train:
            changed[RecordKey.ARRAYS.value] = sign_flip(reply.content[RecordKey.ARRAYS.value],
                                                        sent.content[RecordKey.ARRAYS.value], spec.scale)
        log.warning("simulated attack: partition %s answers as %s", partition, victim)
        return _with(sent, reply, **changed)
    if spec.kind == "bad-metrics":
        changed = {}
        if train:
            metrics[MetricKey.TRAIN_LOSS.value] = float("nan")
            if (evaluation := reply.content.get(RecordKey.EVALUATION.value)) is not None:  # round rnd - 1's
                changed[RecordKey.EVALUATION.value] = MetricRecord(_bad_metrics(dict(evaluation), rnd - 1))
        else:
            metrics = _bad_metrics(metrics, rnd)
        log.warning("simulated attack: partition %s sends malformed metrics", partition)
        return _with(sent, reply, metrics=MetricRecord(metrics), **changed)
    return reply


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Binary: ``1 - y``; multiclass: ``(y + 1) mod C`` (every label changes)."""
    if num_classes < 2:
        raise ConfigError(f"label flipping needs at least 2 classes, the data has {num_classes}")
    labels = np.asarray(labels)
    return (1 - labels if num_classes == 2 else (labels + 1) % num_classes).astype(labels.dtype)


def poison_study_data(fed: FederatedData, spec: AttackSpec) -> FederatedData:
    """A copy of ``fed`` whose malicious sites' training labels are flipped (label-flip only).

    ``fed`` itself (memoised, and the server's central val/test data) is left untouched.
    """
    if spec.kind != "label-flip":
        return fed
    sites = list(fed.sites)
    for i in range(min(spec.malicious_sites, len(sites))):
        train = sites[i].train
        if type(train) is not ImageSplit:
            raise ConfigError(f"attack=label-flip needs class labels; site {sites[i].site_id} holds "
                              f"{type(train).__name__} (use sign-flip for this task)")
        flipped = dataclasses.replace(train, labels=flip_labels(train.labels, fed.info.num_classes))
        sites[i] = dataclasses.replace(sites[i], train=flipped)
        log.warning("simulated attack: site %s trains on flipped labels", sites[i].site_id)
    return dataclasses.replace(fed, sites=tuple(sites))


# --------------------------------------------------------------------------- the ClientApp
def attack_client_app(spec: AttackSpec) -> ClientApp:
    """The medfed ClientApp, except that malicious partitions tamper with their replies (:func:`tamper_reply`)."""
    from medfed.client.app import handle_evaluate, handle_train

    if spec.kind not in REPLY_ATTACKS:
        from medfed.client.app import app

        return app
    app = ClientApp()

    def _partition(context: Context) -> int | None:
        partition = context.node_config.get(NodeConfigKey.PARTITION_ID.value)
        return None if partition is None else int(partition)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context)
        partition = _partition(context)
        return reply if partition is None else tamper_reply(spec, partition, msg, reply)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = handle_evaluate(msg, context)
        partition = _partition(context)
        return reply if partition is None else tamper_reply(spec, partition, msg, reply)

    return app

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
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from medfed.common.constants import NodeConfigKey, RecordKey
from medfed.common.data.splits import FederatedData, ImageSplit
from medfed.common.errors import ConfigError

log = logging.getLogger(__name__)

ATTACKS = ("none", "sign-flip", "label-flip")
DEFAULT_SCALE = 10.0
ATTACK_FILE = "attack.json"  # in the run directory of an attacked simulation


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Which simulated sites attack, and how. ``AttackSpec()`` is no attack."""

    kind: str = "none"
    malicious_sites: int = 0
    scale: float = DEFAULT_SCALE  # sign-flip only

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
    """The medfed ClientApp, except that malicious partitions sign-flip their updates."""
    from medfed.client.app import handle_evaluate, handle_train

    if spec.kind != "sign-flip":
        from medfed.client.app import app

        return app
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = handle_train(msg, context)
        partition = context.node_config.get(NodeConfigKey.PARTITION_ID.value)
        if partition is None or not spec.is_malicious(int(partition)) or reply.has_error():
            return reply
        key = RecordKey.ARRAYS.value
        content = RecordDict(dict(reply.content.items()))
        content[key] = sign_flip(reply.content[key], msg.content[key], spec.scale)
        log.warning("simulated attack: partition %s sends a sign-flipped update (scale %g)", partition, spec.scale)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context)

    return app

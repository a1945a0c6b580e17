"""Checks on what the server sends a site, before the site acts on it.

The run config is checked by :func:`medfed.common.config.parse_study_config` (types,
ranges, choices; errors name the key). Here: the size of the model the message carries
(``max-message-mb`` in site.yaml) and the per-message config record (server round,
FedProx mu, FedBN flag, decision threshold, evaluate-received, final-evaluation). Errors are
:class:`PublicSiteError`s, so the server learns which key it got wrong.

The size is checked once the message has arrived: Flower's SuperNode pulls a message's
objects without a size limit of its own, so this bounds what the site *loads and trains
on*, not what crosses the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, Message
from medfed.client.boundary import PublicSiteError
from medfed.common.constants import ConfigKey, NodeConfigKey, RecordKey

MB = 1024 * 1024

# per-message config values the site uses: key -> (type, low, high)
_CONFIG_BOUNDS: dict[str, tuple[type, float, float]] = {
    ConfigKey.SERVER_ROUND.value: (int, 0, 10**6),
    ConfigKey.PROXIMAL_MU.value: (float, 0.0, 100.0),
    ConfigKey.THRESHOLD.value: (float, 0.0, 1.0),
    ConfigKey.FEDBN.value: (bool, 0, 1),
    ConfigKey.CENTRAL_DP.value: (bool, 0, 1),
    ConfigKey.EVALUATE_RECEIVED.value: (bool, 0, 1),
    ConfigKey.FINAL_EVALUATION.value: (bool, 0, 1),
}


def max_message_mb(node_config: Mapping[str, Any]) -> float:
    """The site's bound from its site.yaml (deployment), else the default (simulation)."""
    from medfed.common.site_config import DEFAULT_MAX_MESSAGE_MB, load_site_config

    path = node_config.get(NodeConfigKey.SITE_CONFIG.value)
    if not path:
        return DEFAULT_MAX_MESSAGE_MB

    return load_site_config(str(path)).max_message_mb


def check_model_size(arrays: ArrayRecord, limit_mb: float) -> None:
    size = arrays.count_bytes()
    if size > limit_mb * MB:
        raise PublicSiteError(
            f"the model sent is {size / MB:.1f} MB, above this site's max-message-mb={limit_mb:g}; "
            "the site operator can raise max-message-mb in site.yaml if this model is expected"
        )


def check_message_config(config: Mapping[str, Any]) -> None:
    """Every known per-message config value has the right type and range."""
    for key, (kind, low, high) in _CONFIG_BOUNDS.items():
        if key not in config:
            continue
        value = config[key]
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and low <= value <= high)
        if not ok:
            expected = "true or false" if kind is bool else f"a{'n integer' if kind is int else ' number'} in {low}..{high}"
            raise PublicSiteError(f"message config {key}={value!r} is invalid: expected {expected}")


def check_incoming(msg: Message, node_config: Mapping[str, Any]) -> None:
    """Refuse a message whose model is too large or whose config record is malformed."""
    arrays = msg.content.get(RecordKey.ARRAYS.value)
    if not isinstance(arrays, ArrayRecord):
        raise PublicSiteError("the message carries no model arrays")
    check_model_size(arrays, max_message_mb(node_config))
    config = msg.content.get(RecordKey.CONFIG.value)
    check_message_config(dict(config) if config is not None else {})

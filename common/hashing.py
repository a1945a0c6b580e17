"""SHA-256 fingerprints of what a federation exchanges: configs and model arrays.

Both sides compute the same digest from the same content, so the server's audit trail
and a site's can be compared entry by entry: the update a site logged as sent must have
the hash the server logged as received.

* :func:`config_hash`: canonical JSON (sorted keys, no whitespace) of a mapping;
  :func:`study_config_hash` the same for a study config, less process-local keys.
* :func:`arrays_hash`: for each key in sorted order, a JSON header (key, dtype, shape)
  followed by the array's C-order bytes, so two models differ in hash whenever a name,
  a dtype, a shape or a single byte differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

HASH_HEX_LEN = 64
_HEX = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    """True for a SHA-256 digest as written here: 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == HASH_HEX_LEN and set(value) <= _HEX


def plain(value: Any) -> Any:
    """``value`` as JSON data: numpy scalars become numbers, NaN/Inf None, bytes hex, tuples lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def canonical_json(value: Any) -> str:
    """The one JSON text of ``value`` that hashes are taken over (sorted keys, no spaces)."""
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of a config mapping's canonical JSON."""
    return sha256_text(canonical_json(dict(config)))


# Run-config keys that say where this process finds things, not what the study is: the
# simulation engine gives the sites a site-shards folder the server's config lacks.
PROCESS_LOCAL_KEYS = ("site-shards",)


def study_config_hash(config: Mapping[str, Any]) -> str:
    """:func:`config_hash` of a study config without :data:`PROCESS_LOCAL_KEYS`: equal at the server and every site."""
    return config_hash({k: v for k, v in config.items() if k not in PROCESS_LOCAL_KEYS})


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy view of a Flower ``Array``, a torch tensor or an array-like."""
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # flwr Array
        return value.numpy()
    return np.asarray(value)


def arrays_hash(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over keys, dtypes, shapes and bytes of an ArrayRecord or a state_dict, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(_as_numpy(arrays[key]))
        header = canonical_json({"key": key, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        digest.update(header.encode("utf-8") + b"\n")
        digest.update(arr.tobytes())
    return digest.hexdigest()

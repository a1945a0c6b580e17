"""Model parameters <-> Flower ArrayRecord, in one place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import Array, ArrayRecord
from medfed.common.models import strip_wrapper_prefix
from torch import nn


def model_to_arrays(model: nn.Module, exclude: Iterable[str] = ()) -> ArrayRecord:
    """The model's state_dict (wrapper prefixes stripped) as an ArrayRecord."""
    skip = set(exclude)
    state = strip_wrapper_prefix(model.state_dict())
    return ArrayRecord(
        {k: Array(v.detach().cpu().numpy()) for k, v in state.items() if k not in skip}
    )


def arrays_to_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> state_dict of CPU tensors (copies, so the record stays intact)."""
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


def load_arrays(model: nn.Module, arrays: ArrayRecord, allow_missing: Iterable[str] = ()) -> None:
    """Load ``arrays`` into ``model``; keys, shapes and dtypes must match exactly.

    ``allow_missing`` lists keys the sender may leave out (FedBN's local norm layers).
    """
    state = arrays_to_state_dict(arrays)
    expected = model.state_dict()
    missing = set(expected) - set(state) - set(allow_missing)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(
            "received arrays do not match the model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
            "the server and the site must use the same model (check 'model' in the run config)"
        )
    for key, tensor in state.items():
        ref = expected[key]
        if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != ref.dtype:
            raise ValueError(
                f"received array {key!r} has shape {tuple(tensor.shape)} {tensor.dtype}, "
                f"the model expects {tuple(ref.shape)} {ref.dtype}"
            )
    model.load_state_dict(state, strict=False)

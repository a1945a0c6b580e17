"""Site state that must outlive a ClientApp process: kept on disk in the site's state dir.

Flower starts a fresh ClientApp process per message in deployment and SuperNode
``Context.state`` lives in memory only, so anything a site keeps between rounds
(FedBN's local normalisation layers, later the privacy ledger) is a file here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from medfed.common.atomic import atomic_write_bytes

LOCAL_LAYERS_FILE = "local_layers.pt"


def save_local_layers(state_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(state_dir) / LOCAL_LAYERS_FILE
    payload = {k: v.detach().cpu().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    return path


def load_local_layers(state_dir: Path) -> dict[str, torch.Tensor] | None:
    path = Path(state_dir) / LOCAL_LAYERS_FILE
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a mapping of tensors; delete the file to reset it")
    return payload

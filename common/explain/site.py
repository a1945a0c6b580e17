"""A site's interpretability aggregates for one split: Grad-CAM maps in, shares out (nothing per image).

Called by the site's evaluation (``client/task.py``) in simulation and deployment alike.
"""

from __future__ import annotations

import numpy as np
import torch
from medfed.common.data.splits import ImageSplit
from medfed.common.explain.metrics import explain_aggregates
from medfed.common.explain.saliency import saliency_maps, target_layer
from torch import nn


def split_saliency(model: nn.Module, model_name: str, split: ImageSplit, device: torch.device,
                   method: str = "gradxinput", layer: str | None = None) -> np.ndarray:
    """Saliency maps (N, H, W) of every image of ``split`` for its own (true) class.

    The true class, not the predicted one: "where does the model look to recognise class c
    in images of class c", the question a shortcut tied to a label answers, and the target
    of the pointing game; a misclassified image still says where its class's evidence lies.
    """
    model.to(device)
    _, channels, side, _ = split.images.shape
    name = target_layer(model, model_name, channels, side, layer)
    return saliency_maps(model, torch.from_numpy(split.images), method, name, class_idx=split.labels)


def explain_split_metrics(model: nn.Module, model_name: str, split: ImageSplit, split_name: str,
                          device: torch.device, band: float, method: str = "gradxinput") -> dict[str, float | list[float]]:
    """The aggregates :func:`~medfed.common.explain.metrics.explain_aggregates` sends for ``split``."""
    maps = split_saliency(model, model_name, split, device, method)
    return explain_aggregates(maps, split.labels, split_name, band, groups=split.groups,
                              masks=getattr(split, "masks", None))

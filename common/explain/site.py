"""A site's interpretability aggregates for one split: saliency maps in, shares out (nothing per image).

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
    name = target_layer(model, model_name, channels, side, layer) if method in ("gradcam", "gradcampp") else ""
    return saliency_maps(model, torch.from_numpy(split.images), method, name, class_idx=split.labels)


def explain_split_metrics(model: nn.Module, model_name: str, split: ImageSplit, split_name: str,
                          device: torch.device, band: float, method: str = "gradxinput") -> dict[str, float | list[float]]:
    """The aggregates :func:`~medfed.common.explain.metrics.explain_aggregates` sends for ``split``."""
    maps = split_saliency(model, model_name, split, device, method)
    return explain_aggregates(maps, split.labels, split_name, band, groups=split.groups,
                              masks=getattr(split, "masks", None))


def evaluate_and_explain(model: nn.Module, model_name: str, split: ImageSplit, split_name: str,
                         device: torch.device, band: float, method: str = "gradxinput",
                         threshold: float | None = None, batch_size: int = 256,
                         ) -> tuple[dict[str, float], np.ndarray, dict[str, float | list[float]]]:
    """(the metrics and probabilities ``Task.evaluate`` gives, the explain aggregates) of ``split``.

    With gradient x input the logits of the evaluation and the saliency come from one forward
    pass, so explaining a split costs one backward pass more than evaluating it; other methods
    evaluate and explain separately.
    """
    from medfed.common.explain.saliency import logits_and_input_gradient, positive_gradient_x_input
    from medfed.common.metrics import classification_metrics
    from medfed.common.training import evaluate

    if method != "gradxinput" or len(split) == 0:
        metrics, probs = evaluate(model, split, device, threshold=threshold)
        return metrics, probs, explain_split_metrics(model, model_name, split, split_name, device, band, method)
    model.to(device)
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    logits, maps = [], []
    for start in range(0, len(split), batch_size):
        x = images[start:start + batch_size].to(device)
        out, grad = logits_and_input_gradient(model, x, labels[start:start + batch_size].to(device))
        logits.append(out.float().cpu())
        maps.append(positive_gradient_x_input(x, grad))
    all_logits = torch.cat(logits)
    probs = torch.softmax(all_logits, dim=1).numpy()
    metrics = classification_metrics(split.labels, probs, threshold=threshold)
    metrics["loss"] = float(nn.functional.cross_entropy(all_logits, labels))
    aggregates = explain_aggregates(np.concatenate(maps), split.labels, split_name, band, groups=split.groups,
                                    masks=getattr(split, "masks", None))
    return metrics, probs, aggregates

"""Segmentation metrics per image, as additive sums that pool exactly across sites.

- **Dice** of one image: ``2 |P ∩ T| / (|P| + |T|)`` per foreground class (labels
  ``1..K-1``), averaged over those classes; a class absent from both prediction and truth
  scores 1 (nothing to find, nothing found).
- **HD95** of one image: MONAI's symmetric 95th-percentile Hausdorff distance between the
  prediction's and the truth's edges (``compute_hausdorff_distance(percentile=95)``), in
  pixels, averaged over the foreground classes present in *both*. A class empty in either
  has no defined distance; an image with no such class is left out of HD95 (and counted:
  ``hd95-count`` says how many images entered it).

:class:`SegSums` holds the additive sums (Dice sum, image count, HD95 sum, HD95 count), so a
site sends four numbers and the server's pooled mean equals the metric on the concatenated
images. A metric with no image behind it is ``nan``. Inputs are logits ``(N, K, H, W)``
(argmax over ``K``) or integer predictions ``(N, H, W)``, with int masks ``(N, H, W)``;
``(N, K, D, H, W)`` volumes work the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from medfed.common.metrics import LOSS, NUM_EXAMPLES
from medfed.common.segmentation.data import SegSplit
from torch import nn

__all__ = [
    "DICE", "DICE_SUM", "HD95", "HD95_COUNT", "HD95_SUM", "SegSums", "evaluate_segmentation",
    "per_image_dice", "per_image_hd95", "segmentation_metrics",
]

log = logging.getLogger(__name__)

DICE = "dice"
HD95 = "hd95"
HD95_COUNT = "hd95-count"
DICE_SUM = "dice-sum"  # SegSums record keys (with NUM_EXAMPLES and HD95_COUNT)
HD95_SUM = "hd95-sum"


def _as_labels(logits_or_pred: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
               num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(predicted labels, true labels, K) as CPU int64 tensors of one shape."""
    out = torch.as_tensor(logits_or_pred).detach().cpu()
    truth = torch.as_tensor(masks).detach().cpu().long()
    if out.ndim == truth.ndim + 1 and out.is_floating_point():
        k = out.shape[1]
        if num_classes is not None and num_classes != k:
            raise ValueError(f"logits have {k} classes but num_classes={num_classes}; pass matching values")
        out = out.argmax(dim=1)
    elif out.ndim == truth.ndim and not out.is_floating_point():
        top = max(int(out.max()) if out.numel() else 0, int(truth.max()) if truth.numel() else 0)
        k = num_classes if num_classes is not None else max(2, top + 1)
    else:
        raise ValueError(
            f"got predictions {tuple(out.shape)} ({out.dtype}) for masks {tuple(truth.shape)}: pass float "
            "logits (N, K, H, W) or integer labels (N, H, W) with masks (N, H, W)"
        )
    if out.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(out.shape)} differs from mask shape {tuple(truth.shape)}")
    return out.long(), truth, k


def per_image_dice(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each image (float64 ``(N,)``), mean over foreground classes; both empty = 1."""
    dims = tuple(range(1, pred.ndim))
    scores = []
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        inter = (p & t).sum(dims).double()
        denom = (p.sum(dims) + t.sum(dims)).double()
        scores.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)))
    return torch.stack(scores, dim=1).mean(dim=1).numpy()


def per_image_hd95(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """HD95 of each image in pixels (float64 ``(N,)``); ``nan`` where no class is in both."""
    from monai.metrics import compute_hausdorff_distance

    dims = tuple(range(1, pred.ndim))
    per_class = torch.full((pred.shape[0], num_classes - 1), float("nan"), dtype=torch.float64)
    for k in range(1, num_classes):
        p, t = pred == k, truth == k
        both = (p.any(dim=dims) & t.any(dim=dims)).nonzero().flatten()
        if both.numel():
            onehot = [torch.stack([~m[both], m[both]], dim=1).float() for m in (p, t)]
            hd = compute_hausdorff_distance(onehot[0], onehot[1], include_background=False, percentile=95)
            per_class[both, k - 1] = hd[:, 0].double()
    present = (~per_class.isnan()).sum(dim=1)
    total = torch.nan_to_num(per_class, nan=0.0).sum(dim=1)
    return torch.where(present > 0, total / present.clamp_min(1), float("nan")).numpy()


@dataclass(frozen=True)
class SegSums:
    """Additive segmentation sums: merge any number of them, then :meth:`to_metrics`."""

    dice_sum: float = 0.0
    count: int = 0
    hd95_sum: float = 0.0
    hd95_count: int = 0

    @classmethod
    def from_batch(cls, logits_or_pred: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                   num_classes: int | None = None) -> SegSums:
        """Sums over one batch; ``num_classes`` defaults to the logits' K (or max label + 1, >= 2)."""
        pred, truth, k = _as_labels(logits_or_pred, masks, num_classes)
        if pred.shape[0] == 0:
            return cls()
        hd = per_image_hd95(pred, truth, k)
        finite = ~np.isnan(hd)
        return cls(float(per_image_dice(pred, truth, k).sum()), int(pred.shape[0]),
                   float(hd[finite].sum()), int(finite.sum()))

    def merge(self, other: SegSums) -> SegSums:
        return SegSums(self.dice_sum + other.dice_sum, self.count + other.count,
                       self.hd95_sum + other.hd95_sum, self.hd95_count + other.hd95_count)

    def to_metrics(self) -> dict[str, float]:
        """``dice``, ``hd95`` (``nan`` without images behind them), ``hd95-count``, ``num-examples``."""
        return {
            DICE: self.dice_sum / self.count if self.count else float("nan"),
            HD95: self.hd95_sum / self.hd95_count if self.hd95_count else float("nan"),
            HD95_COUNT: float(self.hd95_count),
            NUM_EXAMPLES: float(self.count),
        }

    def to_record(self) -> dict[str, float]:
        """The four sums under kebab-case keys, for a site's metric record."""
        return {DICE_SUM: self.dice_sum, NUM_EXAMPLES: float(self.count),
                HD95_SUM: self.hd95_sum, HD95_COUNT: float(self.hd95_count)}

    @classmethod
    def from_record(cls, record: dict[str, float]) -> SegSums:
        """Inverse of :meth:`to_record`; ValueError naming missing or invalid entries."""
        missing = [k for k in (DICE_SUM, NUM_EXAMPLES, HD95_SUM, HD95_COUNT) if k not in record]
        if missing:
            raise ValueError(f"segmentation sums lack {missing}: the site must send SegSums.to_record()")
        count, hd95_count = record[NUM_EXAMPLES], record[HD95_COUNT]
        if not (count >= hd95_count >= 0 and count == int(count) and hd95_count == int(hd95_count)):
            raise ValueError(f"invalid segmentation counts {NUM_EXAMPLES}={count}, {HD95_COUNT}={hd95_count}")
        return cls(float(record[DICE_SUM]), int(count), float(record[HD95_SUM]), int(hd95_count))


def segmentation_metrics(logits_or_pred: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                         num_classes: int | None = None) -> dict[str, float]:
    """``dice``, ``hd95``, ``hd95-count`` and ``num-examples`` of one set of images."""
    return SegSums.from_batch(logits_or_pred, masks, num_classes).to_metrics()


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, split: SegSplit, device: torch.device,
                          batch_size: int = 32) -> dict[str, float]:
    """The model's :func:`segmentation_metrics` on ``split`` plus the mean per-image ``loss``."""
    from medfed.common.segmentation.losses import seg_loss

    was_training = model.training
    model.to(device).eval()
    loss_fn = seg_loss("sum")
    sums, loss_sum = SegSums(), 0.0
    images, masks = torch.from_numpy(split.images), torch.from_numpy(split.masks)
    try:
        for start in range(0, len(split), batch_size):
            x = images[start : start + batch_size].to(device)
            y = masks[start : start + batch_size].to(device)
            logits = model(x)
            loss_sum += float(loss_fn(logits, y))
            sums = sums.merge(SegSums.from_batch(logits, y, num_classes=logits.shape[1]))
    finally:
        model.train(was_training)
    metrics = sums.to_metrics()
    metrics[LOSS] = loss_sum / len(split) if len(split) else float("nan")
    log.debug("segmentation evaluation on %d images: %s", len(split), metrics)
    return metrics

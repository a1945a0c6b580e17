"""The segmentation loss: Dice + cross-entropy, a mean (or sum) of *per-image* losses.

:func:`seg_loss` wraps MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=False)``
so that it takes logits ``(N, K, H, W)`` and int64 masks ``(N, H, W)`` (the channel axis
the MONAI loss wants is added inside). With ``batch=False`` the soft Dice is computed for
each image separately and averaged over classes, and the cross-entropy is a mean over the
image's pixels, so the loss of image ``i`` is ``l_i = dice_i + ce_i`` and depends on image
``i`` only. ``reduction="mean"`` returns ``mean_i l_i`` (the training loss);
``reduction="sum"`` returns ``sum_i l_i``. This matters for DP-SGD: Opacus clips each
image's gradient, which is only meaningful when no image's loss depends on the others
(``batch=True`` would pool Dice over the batch and couple them).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["REDUCTIONS", "SegLoss", "seg_loss"]

REDUCTIONS = ("mean", "sum")


class SegLoss(nn.Module):
    """Per-image Dice + cross-entropy of logits against int64 masks (see the module doc)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"reduction={reduction!r} is not allowed: use 'mean' (training) or 'sum' "
                "(per-sample gradient checks, which need sum semantics over the batch)"
            )
        from monai.losses import DiceCELoss

        self.reduction = reduction
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if logits.ndim != masks.ndim + 1 or logits.shape[0] != masks.shape[0] \
                or logits.shape[2:] != masks.shape[1:]:
            raise ValueError(
                f"logits {tuple(logits.shape)} and masks {tuple(masks.shape)} do not match: "
                "expected logits (N, K, H, W) and masks (N, H, W)"
            )
        if logits.shape[0] == 0:  # an empty Poisson batch (DP-SGD): no image, no loss, only the noise step
            return logits.sum() * 0.0
        # MONAI: Dice mean over images and classes, CE mean over all pixels: both are the mean
        # of per-image terms (all images have H*W pixels), so the sum is N times the mean.
        loss = self.dice_ce(logits, masks.unsqueeze(1).long())
        return loss * logits.shape[0] if self.reduction == "sum" else loss


def seg_loss(reduction: str = "mean") -> SegLoss:
    """Dice + CE over per-image losses: ``"mean"`` to train, ``"sum"`` for the DP gradient check."""
    return SegLoss(reduction)

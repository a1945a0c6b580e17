"""Tabular classifiers (logistic regression, a small MLP) and how a feature vector travels.

The data contract (:mod:`medfed.common.data.splits`) carries float32 images ``(N, C, H, W)``
with values in ``[0, 1]``. A tabular dataset fits it unchanged: its ``F`` features are the
``F`` channels of a 1×1 image, ``(N, F, 1, 1)`` (so ``DatasetInfo.in_channels = F`` and
``image_size = 1``), and each feature, already standardised (a z-score), is carried through
a fixed affine map: ``x = (clip(z, -Z_CLIP, Z_CLIP) + Z_CLIP) / (2 * Z_CLIP)``. The models'
first step, :class:`FeatureDecode`, undoes that map, so they see the z-scores. The map is a
constant, never data: nothing about a site's data travels in the model.

Both models are Linear layers only (no normalisation, no in-place ops), so Opacus DP-SGD,
FedAvg/FedProx/FedYogi and FedBN-free sharing apply unchanged, and the classification task's
metrics, validation histograms and selection work as for images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MLP", "Z_CLIP", "FeatureDecode", "LogisticRegression", "encode_features"]

Z_CLIP = 12.0  # z-scores beyond ±12 standard deviations are clipped (the loader logs how many)
MLP_HIDDEN = 16


def encode_features(z: np.ndarray) -> np.ndarray:
    """Standardised features ``(N, F)`` -> float32 images ``(N, F, 1, 1)`` in ``[0, 1]``."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, F), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("features contain NaN or infinite values: drop or impute them before encoding")
    x = (np.clip(z, -Z_CLIP, Z_CLIP) + Z_CLIP) / (2.0 * Z_CLIP)
    return x.astype(np.float32).reshape(z.shape[0], z.shape[1], 1, 1)


class FeatureDecode(nn.Module):
    """``(N, F, 1, 1)`` images in ``[0, 1]`` -> ``(N, F)`` z-scores; no parameters, no buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1) * (2.0 * Z_CLIP) - Z_CLIP


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one Linear layer on the z-scores (softmax in the loss)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        if num_features < 1 or num_classes < 2:
            raise ValueError(f"LogisticRegression needs num_features >= 1 and num_classes >= 2, "
                             f"got {num_features} and {num_classes}")
        self.decode = FeatureDecode()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.decode(x))


class MLP(nn.Module):
    """One hidden layer of ``hidden`` tanh units (bounded activations suit DP-SGD's clipping)."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = MLP_HIDDEN):
        super().__init__()
        if num_features < 1 or num_classes < 2 or hidden < 1:
            raise ValueError(f"MLP needs num_features >= 1, num_classes >= 2 and hidden >= 1, "
                             f"got {num_features}, {num_classes} and {hidden}")
        self.decode = FeatureDecode()
        self.hidden = nn.Linear(num_features, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.hidden(self.decode(x))))

"""Small MONAI segmentation networks that DP-SGD (Opacus) can train.

``unet``: MONAI ``UNet`` with channels (16, 32, 64, 128), strides (2, 2, 2) and residual
units; ``basicunet``: MONAI ``BasicUNet`` with features (16, 16, 32, 64, 128, 16). Both
output logits ``(N, num_classes, H, W)`` and fit a 2-core CPU at 32-64 px.

DP-safe by construction: normalisation is InstanceNorm with affine parameters and no
running statistics (``norm="instance"``) or GroupNorm (``norm="group"``: 8 groups; in
``unet`` with residual units ``gcd(8, num_classes)`` groups, since MONAI also normalises
its last ``num_classes``-channel feature map), never BatchNorm
(its running statistics would leak private batches), and activations are LeakyReLU
*not in place* (Opacus's hooks need the layer inputs intact). ``unet`` halves the image
three times, so its sides must be multiples of 8; ``basicunet`` halves four times (odd sizes
are padded) and needs sides >= 32 (InstanceNorm needs more than one pixel at the bottom).
``spatial_dims=3`` builds the volumetric networks (inputs ``(N, C, D, H, W)``).
"""

from __future__ import annotations

import math

from medfed.common.errors import ConfigError
from torch import nn

__all__ = ["NORMS", "SEG_MODELS", "build_seg_model"]

SEG_MODELS = ("unet", "basicunet")
NORMS = ("instance", "group")

_UNET_CHANNELS = (16, 32, 64, 128)
_UNET_STRIDES = (2, 2, 2)
_BASICUNET_FEATURES = (16, 16, 32, 64, 128, 16)
_GROUPS = 8  # divides every channel count above
_ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})


def build_seg_model(name: str, in_channels: int, num_classes: int, norm: str = "instance",
                    spatial_dims: int = 2, num_res_units: int = 1) -> nn.Module:
    """A segmentation network from :data:`SEG_MODELS` (see the module doc)."""
    _check(name, in_channels, num_classes, norm, spatial_dims, num_res_units)
    if name == "unet":
        from monai.networks.nets import UNet

        # MONAI's UNet normalises its last up-sampling output (num_classes channels) too.
        norm_arg = _norm(norm, math.gcd(_GROUPS, num_classes) if num_res_units else _GROUPS)
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                    channels=_UNET_CHANNELS, strides=_UNET_STRIDES, num_res_units=num_res_units,
                    act=_ACT, norm=norm_arg)
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                     features=_BASICUNET_FEATURES, act=_ACT, norm=_norm(norm, _GROUPS))


def _norm(norm: str, groups: int) -> tuple[str, dict[str, object]]:
    return ("instance", {"affine": True}) if norm == "instance" else ("group", {"num_groups": groups})


def _check(name: str, in_channels: int, num_classes: int, norm: str, spatial_dims: int,
           num_res_units: int) -> None:
    problems = []
    if name not in SEG_MODELS:
        problems.append(f"model {name!r} is not a segmentation model: choose one of {', '.join(SEG_MODELS)}")
    if norm not in NORMS:
        problems.append(
            f"norm={norm!r} is not allowed: choose one of {', '.join(NORMS)} (BatchNorm's running "
            "statistics would leak private batches under DP)"
        )
    if in_channels < 1:
        problems.append(f"in_channels={in_channels} must be >= 1")
    if num_classes < 2:
        problems.append(f"num_classes={num_classes} must be >= 2 (background counts as a class)")
    if spatial_dims not in (2, 3):
        problems.append(f"spatial_dims={spatial_dims} must be 2 (images) or 3 (volumes)")
    if num_res_units < 0:
        problems.append(f"num_res_units={num_res_units} must be >= 0")
    if problems:
        raise ConfigError("invalid segmentation model: " + "; ".join(problems))

"""Saliency maps of medfed's image classifiers with MONAI's ``monai.visualize``.

Four methods: ``gradcam`` (Selvaraju et al. 2017), ``gradcampp`` (Chattopadhyay et al.
2018) and ``occlusion`` (Zeiler & Fergus 2014) are MONAI's ``GradCAM``, ``GradCAMpp`` and
``OcclusionSensitivity``; ``gradxinput`` is the positive part of gradient x input (Shrikumar
et al. 2016): MONAI's ``VanillaGrad`` gradient of the class score, summed over channels after
multiplying by the image. A map has the image's spatial shape, is non-negative, and says how
much each pixel drove the score of one class (by default the predicted one).

``gradxinput`` is what the federated aggregates use (``explain-method``): it keeps the
input's resolution, so a thin marker in the 10 % border band shows where it is, while a CAM
of the small CNN's 7x7 or 14x14 maps smears it over the band's edge, and it costs one
backward pass per batch. On the planted-shortcut runs (``bench/trust_shortcut.sh``) its
class-1 border share at the marked site stood 0.11-0.16 above the other sites, against
0.04-0.09 for Grad-CAM++.

Which layer a CAM reads is resolved by :func:`target_layer`: the deepest of the model's
candidate layers (:data:`CANDIDATE_LAYERS`) whose feature map is still at least
:data:`MIN_CAM_SIDE` (8) pixels wide at the model's input size: a coarser map cannot put mass
in the 10 % border band of a 28 px image, nor fill the 8x8 coarse grid, and a 1x1 map locates
nothing (DenseNet-121 and ResNet-18 downsample 32x, MedMNIST images are 28 px). For the
small CNN at 28 px that is its second block (14x14), at 64 px and more its last. A DP-trained
checkpoint holds a plain module after training, so the same names resolve; a name with
Opacus's ``_module.`` prefix is accepted too.

MONAI's ``ModelWithHooks`` scores ``logits[:, class_idx]``: with a batch whose images have
different target classes that sums every image's score of every target class, so
:func:`saliency_maps` calls it once per class with an integer index (and shapes the score so
GradCAM++ stays exact on a batch, see ``_cam``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from medfed.common.errors import ConfigError
from medfed.common.tasks import check_image_classifier
from torch import nn

log = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcampp", "occlusion", "gradxinput")
MIN_CAM_SIDE = 8
# Deepest first: the feature maps a CAM may read, per model (names as in model.named_modules()).
CANDIDATE_LAYERS: dict[str, tuple[str, ...]] = {
    "cnn": ("features.10", "features.6", "features.2"),
    "cnn-dp": ("features.10", "features.6", "features.2"),
    "densenet121": ("class_layers.relu", "features.denseblock4", "features.denseblock3", "features.denseblock2",
                    "features.denseblock1"),
    "resnet18": ("layer4", "layer3", "layer2", "layer1"),
}


def check_explainable(model_name: str, what: str = "medfed explain") -> None:
    """ConfigError unless ``model_name`` is an image classifier (saliency needs image pixels and classes)."""
    check_image_classifier(model_name, what)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"saliency method {method!r} is not allowed: choose one of {', '.join(METHODS)}")
    return method


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def resolve_layer(model: nn.Module, name: str) -> str:
    """``name`` as it is in ``model`` (also through Opacus's ``_module.`` or a Sequential's ``1.``)."""
    modules = _named(model)
    for candidate in (name, f"_module.{name}", f"1.{name}", f"_module.1.{name}"):
        if candidate in modules and candidate:
            return candidate
    choices = [n for n, m in modules.items() if n and isinstance(m, (nn.Conv2d, nn.ReLU, nn.Tanh, nn.Sequential))]
    raise ConfigError(f"layer {name!r} does not exist in this model: give one of its layers, e.g. "
                      f"{', '.join(choices[-6:])} (the full list: model.named_modules())")


def _side(model: nn.Module, layer: str, probe: torch.Tensor) -> int:
    sizes: list[int] = []
    handle = _named(model)[layer].register_forward_hook(lambda _m, _i, out: sizes.append(int(out.shape[-1])))
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
    return sizes[0] if sizes else 0


def target_layer(model: nn.Module, model_name: str, in_channels: int, image_size: int,
                 layer: str | None = None) -> str:
    """The layer a CAM reads: ``layer`` if given (it must exist), else the deepest candidate >= 4 px wide."""
    if layer:
        return resolve_layer(model, layer)
    check_explainable(model_name)
    probe = torch.zeros(1, in_channels, image_size, image_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        names = [resolve_layer(model, n) for n in CANDIDATE_LAYERS[model_name]]
        for name in names:
            if _side(model, name, probe) >= min(MIN_CAM_SIDE, image_size):
                return name
        return names[-1]
    finally:
        model.train(was_training)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _cam(model: nn.Module, layer: str, method: str, normalise: bool):
    from monai.visualize import GradCAM, GradCAMpp
    from monai.visualize.class_activation_maps import ModelWithHooks, default_normalizer

    class BatchScores(ModelWithHooks):
        """MONAI's hooks with one score per image shaped (N, 1, ..., 1).

        MONAI squeezes ``logits[:, c]`` to (N,); GradCAM++ multiplies ``exp(score)`` with the
        (N, C, H, W) gradient, which then broadcasts along the last spatial axis (it only works
        for one image). With the score shaped to broadcast per image, a batch is exact.
        """

        spatial_dims = 2

        def class_score(self, logits: torch.Tensor, class_idx: int) -> torch.Tensor:
            return logits[:, class_idx].reshape(-1, *([1] * (self.spatial_dims + 1)))

    hooks = BatchScores(model, layer, register_forward=True, register_backward=True)
    cls = GradCAM if method == "gradcam" else GradCAMpp
    return cls(nn_module=hooks, target_layers=layer, postprocessing=default_normalizer if normalise else _identity)


def predicted_classes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class probabilities (N, C), predicted class (N,)) without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), dim=1)
    finally:
        model.train(was_training)
    return probs, probs.argmax(1)


def saliency_maps(model: nn.Module, images: torch.Tensor, method: str, layer: str,
                  class_idx: int | Sequence[int] | torch.Tensor | None = None, normalise: bool = False,
                  batch_size: int = 128, occlusion_mask: int | None = None) -> np.ndarray:
    """Saliency (N, H, W) of ``images`` (N, C, H, W), non-negative float32 (batches go to the model's device).

    ``class_idx``: one class for every image, one per image, or None (each image's predicted
    class). ``normalise``: each map scaled to [0, 1] (MONAI's default, for display); otherwise
    the raw non-negative map, whose mass :mod:`medfed.common.explain.metrics` shares out.
    """
    check_method(method)
    n = int(images.shape[0])
    if n == 0:
        return np.zeros((0, *images.shape[2:]), dtype=np.float32)
    device = next(model.parameters()).device
    if class_idx is None:
        targets = torch.cat([predicted_classes(model, images[s:s + batch_size].to(device))[1].cpu()
                             for s in range(0, n, batch_size)])
    elif isinstance(class_idx, int):
        targets = torch.full((n,), class_idx, dtype=torch.long)
    else:
        targets = torch.as_tensor(class_idx, dtype=torch.long).cpu()
    out = np.zeros((n, *images.shape[2:]), dtype=np.float32)
    if method == "gradxinput":
        for s in range(0, n, batch_size):
            x = images[s:s + batch_size].to(device)
            out[s:s + batch_size] = gradient_x_input(model, x, targets[s:s + batch_size].to(device))
        if normalise:
            out /= np.maximum(out.reshape(n, -1).max(1), 1e-12).reshape(-1, *([1] * (out.ndim - 1)))
    elif method == "occlusion":
        for i in range(n):
            out[i] = _occlusion(model, images[i:i + 1].to(device), int(targets[i]), occlusion_mask)
    else:
        cam = _cam(model, layer, method, normalise)
        was_training = model.training
        try:
            for c in torch.unique(targets).tolist():
                idx = torch.nonzero(targets == c).reshape(-1)
                for s in range(0, len(idx), batch_size):
                    part = idx[s:s + batch_size]
                    maps = cam(x=images[part.to(images.device)].to(device), class_idx=int(c))
                    out[part.numpy()] = maps[:, 0].detach().float().cpu().numpy()
        finally:
            model.zero_grad(set_to_none=True)  # the CAM's backward pass left parameter gradients
            model.train(was_training)
    np.maximum(out, 0.0, out=out)
    return out


def logits_and_input_gradient(model: nn.Module, x: torch.Tensor,
                              targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, gradient of each image's target-class logit with respect to the image), one forward pass.

    MONAI's ``VanillaGrad`` takes one image per call; medfed's classifiers have no layer that
    mixes images (GroupNorm, no BatchNorm), so the gradient of the summed scores is each image's
    own gradient (tests/test_explain.py checks it against ``VanillaGrad`` image by image).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            logits = model(x)
            (grad,) = torch.autograd.grad(logits.gather(1, targets.reshape(-1, 1).long()).sum(), x)
    finally:
        model.train(was_training)
    return logits.detach(), grad


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits_and_input_gradient(model, x, targets)[1]


def gradient_x_input(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """max(0, sum over channels of gradient x input): (N, *spatial) evidence for the target class."""
    return positive_gradient_x_input(x, input_gradient(model, x, targets))


def positive_gradient_x_input(x: torch.Tensor, grad: torch.Tensor) -> np.ndarray:
    return (grad * x).sum(1).clamp(min=0).detach().float().cpu().numpy()


def _occlusion(model: nn.Module, x: torch.Tensor, target: int, mask_size: int | None) -> np.ndarray:
    """How much occluding around each pixel lowers the target class's probability (MONAI OcclusionSensitivity)."""
    from monai.visualize import OcclusionSensitivity

    side = int(x.shape[-1])
    mask = mask_size or max(3, side // 7) | 1  # odd, about 1/7 of the side
    occ = OcclusionSensitivity(nn_module=model, mask_size=mask, n_batch=64, verbose=False, activate=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI 1.6's indexing warnings, one per call
            occ_map, _ = occ(x)
    finally:
        model.train(was_training)
    # the class probability with each region occluded: (1, classes, *spatial) in MONAI 1.6 (its docstring
    # still says (1, channels, *spatial, classes))
    prob = occ_map[0, target] if occ_map.ndim == x.ndim else occ_map[0, 0, ..., target]
    prob = prob.float().cpu().numpy()
    # the drop against the least important place (MONAI 1.6's map is offset from the unoccluded
    # probability everywhere, even far from anything the model reads; tests/test_explain.py)
    return (prob.max() - prob).astype(np.float32)

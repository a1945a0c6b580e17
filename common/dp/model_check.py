"""Is a model safe for DP-SGD? Fix what can be fixed, refuse the rest with the reason.

Opacus's ``ModuleValidator`` misses three failure modes measured with MONAI networks:

- normalisation with running statistics: a *non-affine* BatchNorm has no parameters, so it
  passes the validator, yet its running mean/variance are updated from private batches and
  shipped with the model. Every running-statistics buffer is refused (BatchNorm is first
  replaced by GroupNorm with ``ModuleValidator.fix``);
- in-place operations that break per-sample gradients: in-place activations are switched
  off (MONAI's DenseNet needs ``inplace=False``); an in-place residual add (MONAI's ResNet)
  cannot be switched off and is caught by the gradient check below;
- a module registered under two names: Opacus then accumulates its per-sample gradients
  twice, silently (MONAI's DynUNet). Refused.

Finally :func:`check_per_sample_gradients` compares Opacus's per-sample gradients with
gradients computed one sample at a time, which catches anything the rules above miss.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from medfed.common.errors import ConfigError
from torch import nn

log = logging.getLogger(__name__)

RUNNING_STATS = ("running_mean", "running_var")


class DPModelError(ConfigError):
    """A model that cannot be trained with DP-SGD as it is (the message says why)."""


def shared_modules(model: nn.Module) -> list[str]:
    first: dict[int, str] = {}
    problems = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not list(module.parameters(recurse=False)):
            continue
        if id(module) in first and first[id(module)] != name:
            problems.append(
                f"module {name!r} is the same object as {first[id(module)]!r}: Opacus would add its "
                "per-sample gradients twice (as with MONAI's DynUNet); give each layer its own module"
            )
        first.setdefault(id(module), name)
    return problems


def prepare_dp_model(model: nn.Module) -> nn.Module:
    """The model with BatchNorm → GroupNorm and in-place activations off; raises if still unsafe."""
    from opacus.validators import ModuleValidator

    problems = shared_modules(model)
    if problems:
        raise DPModelError("this model cannot be trained with DP-SGD: " + "; ".join(problems))
    model = ModuleValidator.fix(model)
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    problems = [
        f"{name} keeps running statistics ({', '.join(b for b in RUNNING_STATS if getattr(m, b, None) is not None)}): "
        "they would be computed from private data outside the DP guarantee; use GroupNorm, "
        "LayerNorm or InstanceNorm without track_running_stats"
        for name, m in model.named_modules()
        if any(getattr(m, b, None) is not None for b in RUNNING_STATS)
    ]
    problems += [str(e) for e in ModuleValidator.validate(model, strict=False)]
    if problems:
        raise DPModelError("this model cannot be trained with DP-SGD: " + "; ".join(problems))
    return model


def check_per_sample_gradients(model: nn.Module, sample: torch.Tensor, num_classes: int,
                               rtol: float = 1e-3, *, targets: torch.Tensor | None = None,
                               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                               ) -> None:
    """Raise :class:`DPModelError` unless Opacus's per-sample gradients are exact on ``sample``.

    By default the targets are ``arange % num_classes`` under ``CrossEntropyLoss(reduction="sum")``
    (a classifier). Other tasks pass their own ``targets`` (the first 3 are used, like the
    sample) and a ``loss_fn`` with *sum* semantics over the batch: ``loss_fn(out, y)`` must
    equal the sum of ``loss_fn(out[i:i+1], y[i:i+1])``, e.g.
    ``medfed.common.segmentation.losses.seg_loss("sum")`` with int64 masks.
    """
    from opacus import GradSampleModule

    probe = copy.deepcopy(model).cpu().train()
    x = sample[:3].detach().cpu().float()
    if targets is None:
        y = torch.arange(x.shape[0]) % num_classes
    else:
        y = targets[: x.shape[0]].detach().cpu()
        if y.shape[0] != x.shape[0]:
            raise ValueError(
                f"targets has {y.shape[0]} rows for {x.shape[0]} samples: give one target per sample"
            )
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
    gsm = GradSampleModule(probe, batch_first=True, loss_reduction="sum")
    try:
        loss_fn(gsm(x), y).backward()
    except RuntimeError as exc:  # its text stays in the site log: the error reply carries none of it
        log.warning("Opacus per-sample gradients failed on this model: %s", str(exc).splitlines()[0])
        raise DPModelError(
            "Opacus cannot compute per-sample gradients for this model; "
            "an in-place operation in forward (e.g. MONAI ResNet's residual 'out += x') is the usual cause: "
            "use model cnn-dp, cnn or densenet121 with DP"
        ) from exc
    params = [(n, p) for n, p in probe.named_parameters() if p.requires_grad]
    opacus_grads = {n: p.grad_sample.detach().clone() for n, p in params}
    gsm.cleanup()
    reference = copy.deepcopy(model).cpu().train()
    ref_params = dict(reference.named_parameters())
    for i in range(x.shape[0]):
        reference.zero_grad()
        loss_fn(reference(x[i : i + 1]), y[i : i + 1]).backward()
        # A parameter whose exact gradient is zero up to rounding (a conv bias right before a
        # one-channel-per-group GroupNorm) is compared on the scale of the whole gradient.
        floor = rtol * 1e-3 * float(torch.cat([ref_params[n].grad.flatten() for n, _ in params]).norm())
        for n, _ in params:
            want = ref_params[n].grad
            got = opacus_grads[n][i]
            # Norm-wise, not element-wise: float32 rounding differs elementwise (1e-5 relative on
            # DenseNet121) while a doubled or corrupted gradient is off by O(1) of its norm.
            if not float((got - want).norm()) <= rtol * float(want.norm()) + floor + 1e-8:
                # The ratio is computed on real training images: it stays in the site's log, the
                # error (which reaches the server) names only the parameter, a property of the model.
                log.warning("per-sample gradient of %r: norm ratio %.2f to the exact one", n,
                            float(got.norm() / want.norm().clamp_min(1e-12)))
                raise DPModelError(
                    f"Opacus's per-sample gradient of {n!r} differs from the exact one: the DP guarantee "
                    "would not hold. A module used twice in forward or an in-place operation is the usual cause"
                )

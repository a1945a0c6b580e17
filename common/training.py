"""The one local training loop and evaluation, shared by simulation, deployment and baselines.

Pure functions of (model, data, settings): no Flower, no files. The ClientApp, the
centralized/local baselines and the benchmarks all call exactly these.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from medfed.common.config import EPS_UNIT, StudyConfig
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError
from medfed.common.optim import SGD, Adam
from torch import nn

if TYPE_CHECKING:
    from medfed.common.dp.engine import DPSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings for one round at one site."""

    epochs: int = 1
    steps: int = 0  # > 0: a fixed number of optimizer steps instead of epochs
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: (mu/2)·||w - w_global||² added to the loss
    seed: int = 0
    group_reweight: bool = False  # weight each sample by 1 / frequency of its (group, label) cell
    adv_eps: float = 0.0  # > 0: PGD adversarial training with this radius on the [0, 1] scale
    adv_steps: int = 3
    adv_ratio: float = 0.5  # share of each batch replaced by adversarial examples

    @classmethod
    def from_study(cls, cfg: StudyConfig, seed: int, proximal_mu: float = 0.0) -> TrainSettings:
        return cls(
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            proximal_mu=proximal_mu,
            seed=seed,
            group_reweight=cfg.group_reweight,
            adv_eps=cfg.adv_eps / EPS_UNIT if cfg.adv_train == "pgd" else 0.0,  # config: 1/255 units
            adv_steps=cfg.adv_steps,
            adv_ratio=cfg.adv_ratio,
        )

    def num_steps(self, num_samples: int) -> int:
        """Optimizer steps this round takes on ``num_samples`` training samples."""
        if self.steps > 0:
            return self.steps
        return self.epochs * math.ceil(num_samples / self.batch_size)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the round's steps
    steps: int
    num_examples: int  # training samples at the site (the FedAvg weight)
    seconds: float


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but no CUDA device is available: use auto or cpu")
    return torch.device(name)


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from parts (run seed, round, site id), same in every process."""
    import hashlib

    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index batches, reshuffling at each pass over the data."""
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[start : start + batch_size]
            done += 1


def group_weights(groups: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample weights ``N / (K · n_cell)``: each of the ``K`` (group, label) cells present
    weighs as much as any other in total, and the weights have mean 1 (float32, shape (N,)).

    Group-balanced reweighting: a minority group (and its positives) counts as much in the
    loss as the majority, without moving or duplicating any image.
    """
    groups, labels = np.asarray(groups).reshape(-1), np.asarray(labels).reshape(-1)
    if groups.shape != labels.shape:
        raise DataError(f"{groups.shape[0]} group codes for {labels.shape[0]} labels: give one group code per image")
    if groups.size == 0:
        return np.zeros(0, dtype=np.float32)
    _, cell, counts = np.unique(np.stack([groups, labels]), axis=1, return_inverse=True, return_counts=True)
    cell = cell.reshape(-1)
    return (groups.size / (len(counts) * counts[cell])).astype(np.float32)


def training_weights(data: ImageSplit) -> np.ndarray:
    """:func:`group_weights` of a training split; ConfigError when it has no group codes."""
    if getattr(data, "groups", None) is None:
        raise ConfigError(
            "group-reweight needs group codes (e.g. sex) for the training images, and this data has none: "
            "use data with a group attribute (the synthetic default, or site manifests with group-attribute) "
            "or set group-reweight false"
        )
    return group_weights(data.groups, data.labels)


def check_group_reweight(cfg: StudyConfig, train_splits: Iterable[ImageSplit]) -> None:
    """Before a study starts: refuse ``group-reweight`` when a site's training split has no group codes."""
    if cfg.group_reweight:
        for split in train_splits:
            training_weights(split)


def _optimizer(model: nn.Module, s: TrainSettings) -> Adam | SGD:
    """torch.optim's update rules without its 2.9 s import of torch._dynamo (see common.optim)."""
    if s.optimizer == "sgd":
        return SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)


GROUP_REWEIGHT_WITH_DP = (
    "group-reweight is refused with DP-SGD: its weights are (group, label) frequencies over the whole site, "
    "which the accountant does not cover; train this site with group-reweight false"
)


def train(
    model: nn.Module,
    data: ImageSplit,
    settings: TrainSettings,
    device: torch.device,
    global_params: Mapping[str, torch.Tensor] | None = None,
    dp: DPSettings | None = None,
    loss_fn: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for one round; returns loss, steps and samples.

    ``data`` is any split with ``images`` and ``targets`` (class labels, or segmentation
    masks); ``loss_fn`` (default cross-entropy) is the task's loss, a mean over the batch's
    per-image losses, which is what DP-SGD's per-sample clipping assumes. With
    ``settings.group_reweight``, ``loss_fn`` must return per-image losses (``reduction='none'``):
    the batch loss is then their mean weighted by :func:`training_weights`, still a mean over
    the batch, so DP-SGD clips each image's weighted gradient.

    With ``dp``, the same loop runs DP-SGD (:mod:`medfed.common.dp.engine`): Poisson
    batches, per-sample clipping and noise; ``steps`` then counts logical (Poisson) steps.
    """
    n = len(data)
    if n == 0:
        raise DataError("this site has no training samples: check its data file and split")
    if dp is not None and settings.group_reweight:  # also a site's own budget under a study without epsilon
        raise ConfigError(GROUP_REWEIGHT_WITH_DP)
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.targets)
    model.to(device).train()
    weights = torch.from_numpy(training_weights(data)) if settings.group_reweight else None
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(reduction="none" if weights is not None else "mean")
    prox = None
    if settings.proximal_mu > 0 and global_params is not None:
        if dp is not None:
            raise ConfigError("FedProx's proximal term is not covered by DP-SGD here: use proximal-mu 0 with DP")
        named = dict(model.named_parameters())
        prox = [(named[k], global_params[k].to(device)) for k in named if k in global_params]
    steps = settings.num_steps(n)
    forward, opt, batches, close = _plan(model, images, labels, weights, steps, settings, gen, dp)
    adversary = None
    if settings.adv_eps > 0:
        from medfed.common.robustness.adversarial import AdvSettings

        adversary = (AdvSettings(settings.adv_eps, settings.adv_steps, settings.adv_ratio),
                     torch.Generator().manual_seed(derive_seed(settings.seed, "adv")))
    try:
        total = _run(forward, opt, batches, loss_fn, prox, settings.proximal_mu, device, adversary)
    finally:
        close()
    if not math.isfinite(total):
        raise FloatingPointError("training loss is not finite: lower the learning rate (lr)")
    return TrainResult(
        loss=total / max(steps, 1), steps=steps, num_examples=n, seconds=time.perf_counter() - t0
    )


def _run(forward, opt, batches, loss_fn, prox, mu: float, device: torch.device, adversary=None) -> float:
    """The loop body shared by plain and DP-SGD training; returns the summed batch losses.

    A batch is ``(x, y)``, or ``(x, y, w)`` with per-sample weights: the loss is then the
    batch mean of ``w_i · loss_i`` over the per-sample losses ``loss_fn`` returns.
    ``adversary``: (AdvSettings, generator): part of each batch becomes PGD examples against
    the current model first (:mod:`medfed.common.robustness.adversarial`).
    """
    total = 0.0
    if adversary is not None:
        from medfed.common.robustness import adversarial
    for x, y, *weight in batches:
        if len(y) == 0:  # only DP-SGD's Poisson batches can be empty
            from medfed.common.dp.engine import noise_only_step

            opt.zero_grad()
            noise_only_step(opt)
            continue
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if adversary is not None:
            x = adversarial.adversarial_batch(forward, x, y, *adversary)
        opt.zero_grad()
        loss = loss_fn(forward(x), y)
        if weight:
            if loss.dim() != 1:
                raise ValueError("per-sample weights need a loss_fn that returns one loss per sample "
                                 "(reduction='none'), e.g. Task.per_sample_loss()")
            loss = (loss * weight[0].to(device, non_blocking=True)).mean()
        if prox:
            penalty = sum(torch.sum((w - w0) ** 2) for w, w0 in prox)
            loss = loss + 0.5 * mu * penalty
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total


def _plan(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
          steps: int, s: TrainSettings, gen: torch.Generator, dp: DPSettings | None):
    """(module to call, optimizer, batches, cleanup) for the loop: plain shuffled batches, or DP-SGD's.

    With per-sample ``weights`` a batch also carries its samples' weights.
    """
    if dp is None:
        index_batches = _batches(len(labels), s.batch_size, steps, gen)
        if weights is None:
            batches = ((images[idx], labels[idx]) for idx in index_batches)
        else:
            batches = ((images[idx], labels[idx], weights[idx]) for idx in index_batches)
        return model, _optimizer(model, s), batches, lambda: None
    from medfed.common.dp.engine import private_plan

    # With weights, DP-SGD's sampler draws sample indices in place of labels, mapped back here.
    targets = labels if weights is None else torch.arange(len(labels))
    plan = private_plan(model, images, targets, steps, dp, s.optimizer, s.lr, s.momentum, s.weight_decay)
    batches = plan.batches if weights is None else ((x, labels[i], weights[i]) for x, i in plan.batches)
    return plan.model, plan.optimizer, batches, plan.close


@torch.no_grad()
def predict(
    model: nn.Module, data: ImageSplit, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, float]:
    """Class probabilities (N, C) on concatenated batches and the mean cross-entropy."""
    model.to(device).eval()
    probs, loss_sum = [], 0.0
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    for start in range(0, len(data), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if not probs:
        return np.zeros((0, 0), dtype=np.float32), float("nan")
    return np.concatenate(probs), loss_sum / len(data)


def evaluate(
    model: nn.Module,
    data: ImageSplit,
    device: torch.device,
    threshold: float | None = None,
    batch_size: int = 256,
) -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy, balanced accuracy, AUC, sensitivity, specificity, and the probabilities."""
    from medfed.common.metrics import classification_metrics

    probs, loss = predict(model, data, device, batch_size)
    if len(data) == 0:
        return {"loss": float("nan"), "num-examples": 0.0}, probs
    metrics = classification_metrics(data.labels, probs, threshold=threshold)
    metrics["loss"] = loss
    return metrics, probs

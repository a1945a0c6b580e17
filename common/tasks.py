"""Tasks: what classification, segmentation and generation add to the shared plumbing.

A task contributes only its models, its loss, its evaluation and the validation metric that
chooses the reported round; the training loop (:func:`medfed.common.training.train`, with or
without DP-SGD), the Flower apps, the privacy ledger and the run outputs are the same for all.

- ``classification``: images with class labels; cross-entropy; AUC, accuracy, sensitivity...;
  the round is chosen on pooled validation AUC (score histograms, see ``server.selection``).
- ``segmentation``: images with integer masks; Dice + cross-entropy computed per image, so
  DP-SGD's per-sample clipping applies to one image's loss; Dice and 95th-percentile
  Hausdorff distance; the round is chosen on mean validation Dice.
- ``generation``: a conditional GAN (generator and discriminator aggregated every round);
  its round (:func:`medfed.common.generation.train.gan_round`) is the GAN's two-player step
  on the same batches and DP settings, with DP-SGD on the discriminator only, the one network
  that reads private images. Sites report the discriminator's loss on validation images;
  the server judges the final generator by train-on-synthetic/test-on-real AUC and a
  classifier-feature FID (:meth:`Generation.final_evaluate`). The last round is reported.

Heavy modules (MONAI) are imported only inside the segmentation methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from medfed.common.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

TABULAR = ("logreg", "mlp")  # feature vectors carried as (N, F, 1, 1) images (medfed.common.tabular)
CLASSIFIERS = ("cnn", "cnn-dp", "densenet121", "resnet18") + TABULAR
SEGMENTERS = ("unet", "basicunet")
GENERATORS = ("cgan",)
IMAGE_CLASSIFIERS = tuple(m for m in CLASSIFIERS if m not in TABULAR)  # what saliency and attacks read


def check_image_classifier(model: str, what: str) -> None:
    """ConfigError unless ``model`` is an image classifier: saliency and attacks need pixels and class scores."""
    if model in IMAGE_CLASSIFIERS:
        return
    kind = ("a tabular model (feature vectors, no pixels)" if model in TABULAR
            else "a segmentation model" if model in SEGMENTERS
            else "a generation model" if model in GENERATORS else "not a medfed model")
    raise ConfigError(f"{what} reads image classifiers ({', '.join(IMAGE_CLASSIFIERS)}); model {model!r} is {kind}")


class Task:
    """The hooks a task overrides; everything else is shared."""

    name: str = ""
    models: tuple[str, ...] = ()
    score: str = ""  # validation metric that chooses the reported round (higher is better)
    final_evaluation: bool = False  # True: final_evaluate adds metrics of the reported model

    @property
    def monitor(self) -> str:
        """The metric the round log shows: the selection score, else the task's own."""
        return self.score

    @property
    def default_model(self) -> str:
        return self.models[0]

    def loss(self) -> nn.Module:
        """The training loss: a mean over the batch of per-image losses."""
        raise NotImplementedError

    def per_sample_loss(self) -> nn.Module:
        """The training loss per image (``reduction='none'``), for group reweighting."""
        raise ConfigError(f"group-reweight is not available for task {self.name!r}: use it with classification")

    def train(self, model: nn.Module, data: Any, settings: Any, device: torch.device,
              global_params: Mapping[str, torch.Tensor] | None = None, dp: Any = None) -> Any:
        """One local round (a :class:`~medfed.common.training.TrainResult`): the shared loop."""
        from medfed.common.training import train

        loss_fn = self.per_sample_loss() if settings.group_reweight else self.loss()
        return train(model, data, settings, device, global_params=global_params, dp=dp, loss_fn=loss_fn)

    def final_evaluate(self, model: nn.Module, central: Any, device: torch.device, seed: int) -> dict[str, float] | None:
        """Extra metrics of the reported model on the server's own data; None: ``evaluate`` on test."""
        return None

    def evaluate(self, model: nn.Module, split: Any, device: torch.device,
                 threshold: float | None = None) -> tuple[dict[str, float], np.ndarray | None]:
        """Metrics of ``model`` on ``split``, and class probabilities when the task has them."""
        raise NotImplementedError

    def check_dp(self, model: nn.Module, split: Any, num_classes: int) -> None:
        """Raise DPModelError unless Opacus's per-sample gradients of this task's loss are exact."""
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    models = CLASSIFIERS
    score = "auc"

    def loss(self) -> nn.Module:
        from torch import nn

        return nn.CrossEntropyLoss()

    def per_sample_loss(self) -> nn.Module:
        from torch import nn

        return nn.CrossEntropyLoss(reduction="none")

    def evaluate(self, model, split, device, threshold=None):
        from medfed.common.training import evaluate

        return evaluate(model, split, device, threshold=threshold)

    def check_dp(self, model, split, num_classes):
        import torch
        from medfed.common.dp.model_check import check_per_sample_gradients

        check_per_sample_gradients(model, torch.from_numpy(split.images[:3]), num_classes)


class Segmentation(Task):
    name = "segmentation"
    models = SEGMENTERS
    score = "dice"

    def loss(self) -> nn.Module:
        from medfed.common.segmentation.losses import seg_loss

        return seg_loss()

    def evaluate(self, model, split, device, threshold=None):
        from medfed.common.segmentation.metrics import evaluate_segmentation

        del threshold  # no decision threshold: the mask is the per-pixel argmax
        return evaluate_segmentation(model, split, device), None

    def check_dp(self, model, split, num_classes):
        import torch
        from medfed.common.dp.model_check import check_per_sample_gradients
        from medfed.common.segmentation.losses import seg_loss

        check_per_sample_gradients(model, torch.from_numpy(split.images[:3]), num_classes,
                                   targets=torch.from_numpy(split.masks[:3]),
                                   loss_fn=seg_loss(reduction="sum"))


class Generation(Task):
    name = "generation"
    models = GENERATORS
    score = ""  # no validation score: the last round is reported
    final_evaluation = True
    monitor = "d-loss"
    tstr_images_per_class = 500
    tstr_steps = 300

    def train(self, model, data, settings, device, global_params=None, dp=None):
        from medfed.common.errors import ConfigError
        from medfed.common.generation.train import GanSettings, gan_round
        from medfed.common.training import TrainResult

        if global_params is not None:
            raise ConfigError("FedProx's proximal term is not defined for GAN training: use another strategy")
        gan = GanSettings(steps=settings.num_steps(len(data)), batch_size=settings.batch_size,
                          lr_g=settings.lr, lr_d=settings.lr)
        res = gan_round(model.generator, model.discriminator, data, gan, device, dp=dp, seed=settings.seed)
        return TrainResult(loss=res.d_loss, steps=res.steps, num_examples=res.num_examples, seconds=res.seconds)

    def evaluate(self, model, split, device, threshold=None):
        from medfed.common.generation.evaluate import discriminator_metrics

        del threshold
        return discriminator_metrics(model, split, device), None

    def check_dp(self, model, split, num_classes):
        from medfed.common.generation.private import require_dp_ready

        require_dp_ready(model.discriminator)

    def final_evaluate(self, model, central, device, seed):
        from medfed.common.generation.evaluate import generator_report

        if central is None or central.test is None or central.val is None:
            return None
        return generator_report(model, central.val, central.test, device, seed,
                                self.tstr_images_per_class, self.tstr_steps)


TASKS: Mapping[str, Task] = {t.name: t for t in (Classification(), Segmentation(), Generation())}


def get_task(name: str) -> Task:
    """The task called ``name`` from the fixed registry."""
    if name not in TASKS:
        raise ConfigError(f"task={name!r} is not allowed: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of_model(model: str) -> Task:
    """The task whose registry holds ``model``."""
    for task in TASKS.values():
        if model in task.models:
            return task
    raise ConfigError(f"model={model!r} is not allowed: choose one of {', '.join(CLASSIFIERS + SEGMENTERS + GENERATORS)}")

"""Group-aware reweighting at sites: the weights, and that the shared loop really uses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfed.common.config import StudyConfig, parse_study_config
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError
from medfed.common.tasks import get_task
from medfed.common.training import TrainSettings, check_group_reweight, group_weights, training_weights
from torch import nn

CPU = torch.device("cpu")


def test_weights_are_inverse_cell_frequencies_with_mean_one():
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int64)
    labels = np.array([0, 0, 1, 0, 0, 0, 0, 1], dtype=np.int64)
    # cells (group, label): (0,0) x2, (0,1) x1, (1,0) x4, (1,1) x1 -> K = 4, N = 8, w = N / (K n_cell)
    expected = np.array([1.0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5, 2.0], dtype=np.float32)
    np.testing.assert_allclose(group_weights(groups, labels), expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_every_cell_weighs_the_same_in_total(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    groups = rng.choice(3, size=n, p=[0.8, 0.15, 0.05]).astype(np.int64)
    labels = rng.choice(2, size=n, p=[0.7, 0.3]).astype(np.int64)
    w = group_weights(groups, labels)
    assert w.shape == (n,) and w.dtype == np.float32
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    cells = {(g, y) for g, y in zip(groups, labels)}
    totals = [w[(groups == g) & (labels == y)].sum() for g, y in cells]
    np.testing.assert_allclose(totals, n / len(cells), rtol=1e-5)


def _split(n: int = 40, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 4, 4), dtype=np.float32)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    groups = (rng.random(n) < 0.2).astype(np.int64)  # group 1 is a minority
    images[labels == 1, 0, 0, :] = 1.0  # a learnable signal
    return ImageSplit(images, labels, groups)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def _reference_step(data: ImageSplit, weights: np.ndarray | None, lr: float) -> dict[str, torch.Tensor]:
    """One full-batch SGD step on mean(w_i · CE_i), computed by hand."""
    model = _model()
    per_sample = nn.functional.cross_entropy(model(torch.from_numpy(data.images)), torch.from_numpy(data.labels),
                                             reduction="none")
    w = torch.ones(len(data)) if weights is None else torch.from_numpy(weights)
    (per_sample * w).mean().backward()
    with torch.no_grad():
        return {k: p - lr * p.grad for k, p in model.named_parameters()}


def _one_step(data: ImageSplit, reweight: bool, dp=None):
    settings = TrainSettings(steps=1, batch_size=len(data), lr=0.5, optimizer="sgd", momentum=0.0, seed=1,
                             group_reweight=reweight)
    model = _model()
    result = get_task("classification").train(model, data, settings, CPU, dp=dp)
    return result, {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("reweight", [False, True])
def test_training_step_uses_the_weighted_mean_loss(reweight: bool):
    data = _split()
    _, params = _one_step(data, reweight)
    reference = _reference_step(data, training_weights(data) if reweight else None, lr=0.5)
    for k in reference:
        torch.testing.assert_close(params[k], reference[k], rtol=1e-5, atol=1e-6)


def test_reweighting_changes_the_loss_and_the_update():
    data = _split()
    plain_result, plain = _one_step(data, False)
    weighted_result, weighted = _one_step(data, True)
    assert abs(plain_result.loss - weighted_result.loss) > 1e-4
    assert not torch.allclose(plain["1.weight"], weighted["1.weight"])


def test_group_reweight_is_refused_with_dp_sgd():
    """Its weights are (group, label) frequencies over the whole site: the accountant does not cover them."""
    from medfed.common.dp.engine import DPSettings

    data = _split()
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, max_physical_batch=16)
    with pytest.raises(ConfigError, match="group-reweight is refused with DP-SGD"):
        _one_step(data, True, dp=dp)
    _one_step(data, False, dp=dp)  # DP without reweighting trains
    with pytest.raises(ConfigError, match="group-reweight"):
        StudyConfig(group_reweight=True, epsilon=8.0)


def test_data_without_groups_is_refused_before_and_during_training():
    data = _split()
    no_groups = ImageSplit(data.images, data.labels, None)
    with pytest.raises(ConfigError, match="group codes"):
        _one_step(no_groups, True)
    cfg = StudyConfig(group_reweight=True)
    with pytest.raises(ConfigError, match="group-reweight"):
        check_group_reweight(cfg, [data, no_groups])
    check_group_reweight(cfg, [data])  # fine with groups
    check_group_reweight(StudyConfig(), [no_groups])  # and off by default


def test_config_key_is_a_bool_for_classification_only():
    assert parse_study_config({"group-reweight": True}).group_reweight is True
    assert StudyConfig().group_reweight is False
    with pytest.raises(ConfigError, match="true or false"):
        parse_study_config({"group-reweight": "yes"})
    with pytest.raises(ConfigError, match="group-reweight.*classification"):
        StudyConfig(task="segmentation", group_reweight=True)
    with pytest.raises(ConfigError, match="classification"):
        get_task("segmentation").per_sample_loss()

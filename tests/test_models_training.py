"""Models, the shared training loop, checkpoints: real behaviour on small data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfed.common.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, build_model, norm_parameter_names, strip_wrapper_prefix
from medfed.common.training import TrainSettings, derive_seed, evaluate, train

CPU = torch.device("cpu")


def _toy(n=96, size=16, seed=0) -> ImageSplit:
    """Label 1 = a bright square in the centre; learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0, 0.3, (n, 1, size, size)).astype(np.float32)
    c = size // 2
    images[labels == 1, :, c - 3 : c + 3, c - 3 : c + 3] += 0.6
    return ImageSplit(np.clip(images, 0, 1), labels.astype(np.int64))


@pytest.mark.parametrize("name, channels, classes", [("cnn", 1, 2), ("cnn", 3, 5), ("cnn-dp", 1, 2), ("densenet121", 1, 3), ("resnet18", 3, 2)])
def test_models_build_forward_and_have_no_batchnorm(name, channels, classes):
    model = build_model(ModelSpec(name, channels, classes, 28))
    out = model(torch.rand(2, channels, 28, 28))
    assert out.shape == (2, classes)
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not bn, "models must be DP-ready: GroupNorm, never BatchNorm"
    assert norm_parameter_names(model), "norm layers are found for FedBN"
    assert set(norm_parameter_names(model)) <= set(model.state_dict())


def test_dp_classifier_is_small_and_tanh():
    dp_model, default = build_model(ModelSpec("cnn-dp", 1, 2, 28)), build_model(ModelSpec("cnn", 1, 2, 28))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(dp_model) * 8 < count(default)
    assert any(isinstance(m, nn.Tanh) for m in dp_model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in dp_model.modules())


@pytest.mark.parametrize("kwargs", [dict(name="vgg", in_channels=1, num_classes=2, image_size=28),
                                    dict(name="cnn", in_channels=0, num_classes=2, image_size=28),
                                    dict(name="cnn", in_channels=1, num_classes=1, image_size=28)])
def test_bad_model_spec(kwargs):
    with pytest.raises(ConfigError):
        ModelSpec(**kwargs)


def test_strip_wrapper_prefix():
    assert list(strip_wrapper_prefix({"_module.a.w": 1, "module.b": 2, "c": 3})) == ["a.w", "b", "c"]


def test_training_learns_and_counts_samples_not_batches():
    data, model = _toy(), build_model(ModelSpec("cnn", 1, 2, 16))
    before, _ = evaluate(model, data, CPU)
    res = train(model, data, TrainSettings(epochs=4, batch_size=16, lr=3e-3, seed=1), CPU)
    after, probs = evaluate(model, data, CPU)
    assert res.num_examples == 96 and res.steps == 4 * 6
    assert after["loss"] < before["loss"] and after["auc"] > 0.9
    assert probs.shape == (96, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_fixed_local_steps_and_determinism():
    data = _toy()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(ModelSpec("cnn", 1, 2, 16))
        res = train(model, data, TrainSettings(steps=5, batch_size=40, seed=7), CPU)
        runs.append((res, model.state_dict()))
    assert runs[0][0].steps == 5 and runs[0][0].loss == runs[1][0].loss
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k])


def test_fedprox_term_keeps_weights_near_the_global_model():
    data = _toy()
    torch.manual_seed(0)
    init = build_model(ModelSpec("cnn", 1, 2, 16))
    glob = {k: v.clone() for k, v in init.state_dict().items()}

    def drift(mu: float) -> float:
        model = build_model(ModelSpec("cnn", 1, 2, 16))
        model.load_state_dict(glob)
        train(model, data, TrainSettings(epochs=3, batch_size=16, lr=1e-2, proximal_mu=mu, seed=2), CPU, glob)
        return sum(float(((p.detach() - glob[n]) ** 2).sum()) for n, p in model.named_parameters())

    assert drift(10.0) < 0.5 * drift(0.0)


def test_empty_site_is_a_clear_error():
    empty = ImageSplit(np.zeros((0, 1, 16, 16), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match="no training samples"):
        train(build_model(ModelSpec("cnn", 1, 2, 16)), empty, TrainSettings(), CPU)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, "site-0") == derive_seed(0, 1, "site-0")
    assert len({derive_seed(0, r, s) for r in range(5) for s in ("a", "b")}) == 10


def test_checkpoint_round_trip_and_atomicity(tmp_path):
    spec = ModelSpec("cnn", 1, 2, 16)
    model = build_model(spec)
    ck = Checkpoint(model=spec, state_dict=model.state_dict(), config={"seed": 1}, round=3,
                    metrics={"auc": 0.9}, strategy_state={"m_t": {"w": torch.ones(2)}},
                    selection={"best-round": 2})
    path = save_checkpoint(ck, tmp_path / "ck.pt")
    back = load_checkpoint(path)
    assert back.model == spec and back.round == 3 and back.selection["best-round"] == 2
    assert torch.equal(back.strategy_state["m_t"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"], "no temp files left behind"


def test_checkpoint_refuses_pickled_objects_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "medfed-checkpoint/1", "x": Boom()}, evil)
    with pytest.raises(DataError, match="not a readable medfed checkpoint"):
        load_checkpoint(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(DataError):
        load_checkpoint(junk)
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")

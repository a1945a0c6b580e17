"""Transfer learning: initial weights, new heads, frozen layers, and what training does to them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfed.common.arrays import load_arrays, model_to_arrays
from medfed.common.checkpoint import Checkpoint, save_checkpoint
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, build_model
from medfed.common.training import TrainSettings, train
from medfed.common.transfer import (
    apply_initial_weights,
    freeze,
    frozen_state_names,
    head_parameter_names,
    load_initial_weights,
    state_digest,
    trainable_names,
)
from torch import nn

CPU = torch.device("cpu")
BODY = "features.*"


def _cnn(classes: int = 2, seed: int = 0, name: str = "cnn") -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelSpec(name, 1, classes, 16))


def _toy(n: int = 64, size: int = 16) -> ImageSplit:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = rng.uniform(0, 0.3, (n, 1, size, size)).astype(np.float32)
    images[labels == 1, :, 5:11, 5:11] += 0.6
    return ImageSplit(images, labels.astype(np.int64))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _pretrained(tmp_path, classes: int = 2):
    """A 'pretrained' SmallCNN saved as a medfed checkpoint; returns (spec, state, path)."""
    spec = ModelSpec("cnn", 1, classes, 16)
    state = _snapshot(_cnn(classes, seed=123))
    return spec, state, save_checkpoint(Checkpoint(model=spec, state_dict=state, round=4), tmp_path / "pre.pt")


# --- loading ---------------------------------------------------------------------------------

def test_medfed_checkpoint_round_trip(tmp_path):
    spec, state, path = _pretrained(tmp_path)
    loaded, got_spec = load_initial_weights(path)
    assert got_spec == spec and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {f"_module.{k}": v for k, v in sd.items()}])
def test_plain_state_dict_files(tmp_path, wrap):
    state = _snapshot(_cnn())
    torch.save(wrap(state), tmp_path / "plain.pt")
    loaded, spec = load_initial_weights(tmp_path / "plain.pt")
    assert spec is None and set(loaded) == set(state), "Opacus prefixes are stripped"
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_objects_are_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.ones(1), "x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="never pickled objects"):
        load_initial_weights(tmp_path / "evil.pt")


def test_bad_files_say_what_was_found(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_initial_weights(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(DataError, match=r"epoch \(int\)"):
        load_initial_weights(tmp_path / "mixed.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(DataError, match="holds a list"):
        load_initial_weights(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 16)
    with pytest.raises(DataError, match="not a readable weights file"):
        load_initial_weights(tmp_path / "junk.pt")


# --- applying --------------------------------------------------------------------------------

def test_new_number_of_classes_keeps_body_and_reinitialises_head(tmp_path):
    _, state, path = _pretrained(tmp_path, classes=2)
    model = _cnn(classes=5, seed=7)
    fresh = _snapshot(model)
    report = apply_initial_weights(model, load_initial_weights(path)[0])
    after = model.state_dict()
    assert report.reinitialised == ("head.bias", "head.weight")
    assert report.missing == () and report.unexpected == ()
    assert set(report.loaded) == {k for k in state if k.startswith("features.")}
    assert all(torch.equal(after[k], state[k]) for k in report.loaded)
    assert all(torch.equal(after[k], fresh[k]) for k in report.reinitialised)
    with pytest.raises(ConfigError, match="differ in shape.*head"):
        apply_initial_weights(_cnn(classes=5), state, strict_shapes=True)


def test_new_head_stays_fresh_even_when_shapes_match():
    state = _snapshot(_cnn(seed=123))
    model = _cnn(seed=7)
    fresh = _snapshot(model)
    report = apply_initial_weights(model, state, new_head=True)
    assert report.reinitialised == ("head.bias", "head.weight")
    assert torch.equal(model.head.weight, fresh["head.weight"])
    assert torch.equal(model.features[0].weight, state["features.0.weight"])


def test_wrong_architecture_is_a_config_error():
    densenet = build_model(ModelSpec("densenet121", 1, 2, 28))
    with pytest.raises(ConfigError, match=r"do not fit this model.*features\.0\.weight.*class_layers"):
        apply_initial_weights(_cnn(), densenet.state_dict())


def test_densenet_weights_fit_with_or_without_the_upsampling_wrapper():
    torch.manual_seed(0)
    big = build_model(ModelSpec("densenet121", 1, 2, 64))  # no wrapper
    small = build_model(ModelSpec("densenet121", 1, 3, 28))  # nn.Sequential(Upsample, net): keys "1.*"
    report = apply_initial_weights(small, big.state_dict())
    assert report.reinitialised == ("1.class_layers.out.bias", "1.class_layers.out.weight")
    assert len(report.loaded) == len(big.state_dict()) - 2 and not report.missing
    assert torch.equal(small.state_dict()["1.features.conv0.weight"], big.state_dict()["features.conv0.weight"])


@pytest.mark.parametrize("name, expected", [
    ("cnn", ("head.weight", "head.bias")),
    ("cnn-dp", ("head.weight", "head.bias")),
    ("densenet121", ("1.class_layers.out.weight", "1.class_layers.out.bias")),
    ("resnet18", ("fc.weight", "fc.bias")),
])
def test_head_parameter_names(name, expected):
    assert head_parameter_names(build_model(ModelSpec(name, 1, 3, 28))) == expected


def test_head_fallback_is_the_last_linear_layer():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert head_parameter_names(mlp) == ("2.weight", "2.bias")
    with pytest.raises(ConfigError, match="no linear classification head"):
        head_parameter_names(nn.Sequential(nn.Conv2d(1, 2, 3)))


# --- freezing --------------------------------------------------------------------------------

def test_freeze_patterns():
    model = _cnn()
    assert freeze(model, ["features.0"]) == ("features.0.bias", "features.0.weight"), "a module name"
    frozen = freeze(model, [BODY])
    assert frozen == tuple(sorted(k for k in model.state_dict() if k.startswith("features.")))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert frozen_state_names(model) == frozenset(frozen)
    assert trainable_names(model) == {"head.weight", "head.bias"}
    assert freeze(_cnn(), ["features.?.weight"]) == ("features.0.weight", "features.1.weight",
                                                      "features.4.weight", "features.5.weight",
                                                      "features.8.weight", "features.9.weight")


@pytest.mark.parametrize("patterns, message", [
    (["feature.*"], r"'feature\.\*' matches no parameter \(parameters: features"),
    (["*"], "would freeze every trainable parameter"),
    ([BODY, "head"], "would freeze every trainable parameter"),
    ("features.*", "give a list of patterns"),
    ([""], "non-empty string"),
])
def test_bad_freeze_patterns_change_nothing(patterns, message):
    model = _cnn()
    with pytest.raises(ConfigError, match=message):
        freeze(model, patterns)
    assert all(p.requires_grad for p in model.parameters())


def test_buffers_follow_their_module_but_running_statistics_are_exchanged():
    class Masked(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.register_buffer("mask", torch.ones(4))

    model = nn.Sequential(Masked(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    freeze(model, ["0", "1"])
    assert frozen_state_names(model) == {"0.weight", "0.bias", "0.mask", "1.weight", "1.bias"}
    assert trainable_names(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked",
                                      "2.weight", "2.bias"}
    assert trainable_names(model) | frozen_state_names(model) == set(model.state_dict())


def test_sites_exchange_only_trainable_keys(tmp_path):
    _, state, _ = _pretrained(tmp_path)
    server, site = _cnn(seed=1), _cnn(seed=2)
    for model in (server, site):
        apply_initial_weights(model, state, new_head=True)
        freeze(model, [BODY])
    arrays = model_to_arrays(server, exclude=frozen_state_names(server))
    assert set(arrays) == {"head.weight", "head.bias"}
    load_arrays(site, arrays, allow_missing=frozen_state_names(site))
    assert all(torch.equal(site.state_dict()[k], server.state_dict()[k]) for k in state)
    frozen = sorted(frozen_state_names(site))
    assert state_digest(site.state_dict(), frozen) == state_digest(server.state_dict(), frozen)
    with torch.no_grad():
        site.features[0].weight[0, 0, 0, 0] += 1e-6
    assert state_digest(site.state_dict(), frozen) != state_digest(server.state_dict(), frozen)


# --- training leaves frozen parameters alone -------------------------------------------------

def _assert_only_trainable_moved(model, before):
    after = model.state_dict()
    frozen = frozen_state_names(model)
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen), "frozen tensors bit-identical"
    assert all(not torch.equal(after[k], before[k]) for k in trainable_names(model)), "trainable ones moved"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_frozen_parameters_do_not_move_in_training(optimizer):
    model = _cnn()
    freeze(model, [BODY])
    before = _snapshot(model)
    settings = TrainSettings(steps=3, batch_size=16, lr=0.05, optimizer=optimizer, momentum=0.9,
                             weight_decay=0.1, seed=1)  # decay and momentum would move any param they saw
    train(model, _toy(), settings, CPU)
    _assert_only_trainable_moved(model, before)


def test_frozen_parameters_do_not_move_under_dp_sgd():
    from medfed.common.dp.engine import DPSettings
    from medfed.common.dp.model_check import (
        check_per_sample_gradients,
        prepare_dp_model,
    )

    model = _cnn(name="cnn-dp")
    freeze(model, ["features.0", "features.1"])
    model = prepare_dp_model(model)  # Opacus' fix clones the model: requires_grad survives
    assert frozen_state_names(model) == {"features.0.weight", "features.0.bias",
                                         "features.1.weight", "features.1.bias"}
    check_per_sample_gradients(model, torch.from_numpy(_toy().images[:3]), 2)
    before = _snapshot(model)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1)
    settings = TrainSettings(steps=3, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.1, seed=1)
    train(model, _toy(), settings, CPU, dp=dp)
    _assert_only_trainable_moved(model, before)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

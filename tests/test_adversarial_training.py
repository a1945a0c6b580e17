"""PGD adversarial training in the one training loop: it trains on adversarial inputs, composes with DP-SGD
(per-sample gradients are those of the adversarial inputs, the accountant is unchanged).

That it raises robust accuracy is a training outcome, measured by bench/trust.sh (README figures)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from medfed.common.data.splits import ImageSplit
from medfed.common.models import ModelSpec, build_model
from medfed.common.robustness import adversarial
from medfed.common.training import TrainSettings, train
from torch import nn


def _bright_square_split(n: int = 96, side: int = 16, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, side, side)) * 0.3 + 0.2).astype(np.float32)
    y = rng.integers(0, 2, n).astype(np.int64)
    x[y == 1, :, 5:11, 5:11] += 0.4
    return ImageSplit(np.clip(x, 0, 1), y)


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            out.setdefault(name, []).append(p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def test_dp_sgd_per_sample_gradients_are_those_of_the_adversarial_inputs(monkeypatch):
    from medfed.common.dp.engine import DPSettings

    split = _bright_square_split()
    spec = ModelSpec("cnn-dp", 1, 2, 16)
    torch.manual_seed(0)
    model = build_model(spec)
    seen: list[dict] = []
    original = adversarial.adversarial_batch

    def spy(forward, x, y, adv, gen):
        grads = {n.removeprefix("_module."): p.grad_sample.detach().clone()
                 for n, p in forward.named_parameters() if getattr(p, "grad_sample", None) is not None}
        assert forward.hooks_enabled  # the training forward pass keeps its per-sample hooks
        x_adv = original(forward, x, y, adv, gen)
        assert forward.hooks_enabled  # ... and the attack gave them back
        state = {k.removeprefix("_module."): v.detach().clone() for k, v in forward.state_dict().items()}
        seen.append({"x": x.clone(), "x_adv": x_adv.clone(), "y": y.clone(), "state": state,
                     "previous_grad_sample": grads})
        return x_adv

    monkeypatch.setattr(adversarial, "adversarial_batch", spy)
    settings = TrainSettings(steps=2, batch_size=32, lr=0.01, adv_eps=8 / 255, adv_steps=3, adv_ratio=0.5)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=32 / len(split), max_physical_batch=128)
    train(model, split, settings, torch.device("cpu"), dp=dp)
    assert len(seen) == 2
    first, second = seen
    changed = (first["x_adv"] != first["x"]).flatten(1).any(1)
    assert 0 < int(changed.sum()) < len(first["x"])  # about half of the batch is adversarial
    assert (first["x_adv"] - first["x"]).abs().max() <= 8 / 255 + 1e-6
    reference = copy.deepcopy(build_model(spec))
    reference.load_state_dict(first["state"])
    expected = _per_sample_grads(reference, first["x_adv"], first["y"])  # step 1's inputs, step 1's weights
    got = second["previous_grad_sample"]  # Opacus's grad_sample of step 1, still there when step 2 starts
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    clean = _per_sample_grads(reference, first["x"], first["y"])
    assert not all(torch.allclose(got[n], clean[n], atol=1e-5) for n in clean)  # not those of the clean inputs


def test_the_privacy_accounting_of_a_round_is_the_same_with_adversarial_training(tmp_path):
    from medfed.client.site_data import SiteRuntime
    from medfed.client.task import train_round
    from medfed.common.arrays import model_to_arrays
    from medfed.common.config import StudyConfig
    from medfed.common.data.synthetic import make_synthetic

    fed = make_synthetic(num_sites=1, seed=0, samples_per_site=[200])
    spent = {}
    for adv in ("none", "pgd"):
        site = SiteRuntime("site-0", fed.info, fed.sites[0], tmp_path / adv / "state")
        cfg = StudyConfig(num_sites=1, min_sites=1, out_dir=str(tmp_path / adv), model="cnn-dp", epsilon=8.0,
                          local_steps=3, batch_size=32, adv_train=adv, adv_steps=2)
        torch.manual_seed(0)
        arrays = model_to_arrays(build_model(ModelSpec("cnn-dp", 1, 2, 28)))
        reply = train_round(cfg, site, arrays, {"server-round": 1})
        spent[adv] = (reply.metrics["epsilon"], reply.metrics["noise-multiplier"])
    assert spent["none"] == spent["pgd"] and spent["none"][0] > 0


def test_adversarial_training_keys_are_checked():
    from medfed.common.config import parse_study_config
    from medfed.common.errors import ConfigError

    for bad, match in (({"adv-train": "fgsm"}, "adv-train"), ({"adv-train": "pgd", "adv-eps": 0}, "adv-eps"),
                       ({"adv-train": "pgd", "adv-ratio": 1.5}, "adv-ratio"),
                       ({"adv-train": "pgd", "task": "segmentation"}, "image classifier")):
        with pytest.raises(ConfigError, match=match):
            parse_study_config(bad)
    cfg = parse_study_config({"adv-train": "pgd", "adv-eps": 4, "adv-steps": 7})
    s = TrainSettings.from_study(cfg, seed=0)
    assert s.adv_eps == pytest.approx(4 / 255) and s.adv_steps == 7
    assert TrainSettings.from_study(parse_study_config({"adv-eps": 4}), seed=0).adv_eps == 0.0  # off by default

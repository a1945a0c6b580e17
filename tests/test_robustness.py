"""``medfed robustness``: FGSM/PGD against captum's reference, their invariants, the metrics and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from medfed.client.robustness_cli import add_robustness_arguments, cmd_robustness
from medfed.common.checkpoint import Checkpoint, save_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, build_model
from medfed.common.robustness.attacks import ATTACKS, attack, fgsm, pgd
from medfed.common.robustness.evaluate import robustness_metrics
from medfed.common.training import TrainSettings, evaluate, train
from torch import nn

SPEC = ModelSpec("cnn", 1, 2, 16)
CPU = torch.device("cpu")


def square_split(n: int, seed: int, groups: np.ndarray | None = None) -> ImageSplit:
    """Dim noise; class 1 also has a bright 6x6 square at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.4, size=(n, 1, 16, 16)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, 10, size=2)
        images[i, 0, r : r + 6, c : c + 6] = rng.uniform(0.7, 1.0)
    return ImageSplit(images, labels, groups)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_model(SPEC)
    train(model, square_split(128, 1), TrainSettings(steps=50, batch_size=32, lr=3e-3, seed=0), CPU)
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    split = square_split(32, 2)
    return torch.from_numpy(split.images), torch.from_numpy(split.labels)


def linear_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2)).eval()


def _ce_per_example(outputs, target):
    """captum sums the per-example losses it is given: medfed's summed cross-entropy."""
    return nn.functional.cross_entropy(outputs, target, reduction="none")


# --------------------------------------------------------------------------- against captum
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.parametrize("which", ["linear", "cnn"])
def test_fgsm_and_pgd_equal_captum(which, trained, batch):
    from captum.robust import FGSM, PGD

    model = linear_model() if which == "linear" else trained
    x, y = batch
    eps = 8 / 255
    ref = FGSM(model, loss_func=_ce_per_example, lower_bound=0.0, upper_bound=1.0)
    ref.zero_thresh = 0.0  # captum skips gradients below 1e-6; medfed steps on every nonzero one
    expected = ref.perturb(x.clone(), epsilon=eps, target=y)
    assert torch.allclose(fgsm(model, x, y, eps), expected, atol=1e-6)
    ref = PGD(model, loss_func=_ce_per_example, lower_bound=0.0, upper_bound=1.0)
    ref.fgsm.zero_thresh = 0.0
    expected = ref.perturb(x.clone(), radius=eps, step_size=eps / 4, step_num=7, target=y,
                           random_start=False, norm="Linf")
    got = pgd(model, x, y, eps, steps=7, step_size=eps / 4, random_start=False)
    assert torch.allclose(got, expected, atol=1e-6)


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", ATTACKS)
def test_perturbation_within_eps_and_images_in_unit_range(name, trained, batch):
    x, y = batch
    x = x.clone()
    x[0] = 1.0  # saturated pixels: the clamp, not the ball, binds
    x[1] = 0.0
    for eps in (1 / 255, 0.1, 0.5):
        adv = attack(trained, x, y, name, eps, steps=5, generator=torch.Generator().manual_seed(0))
        assert adv.shape == x.shape and not adv.requires_grad
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert attack(trained, x, y, name, 0.0) is not None
    assert torch.equal(attack(trained, x, y, name, 0.0), x)


def test_unknown_attack_names_the_choices(trained, batch):
    with pytest.raises(ConfigError, match="fgsm, pgd"):
        attack(trained, *batch, "cw", 0.1)


def test_pgd_weakens_the_model_monotonically_and_beats_fgsm(trained):
    split = square_split(96, 4)
    clean, _ = evaluate(trained, split, CPU)
    assert clean["accuracy"] >= 0.9  # the bright square is easy
    eps = [(f"{e}", e / 255) for e in (1, 4, 16, 48)]
    result = robustness_metrics(trained, split, CPU, ATTACKS, eps, steps=10)
    pgd_acc = [result["pgd"][label]["accuracy"] for label, _ in eps]
    assert all(b <= a for a, b in zip(pgd_acc, pgd_acc[1:])), pgd_acc
    assert pgd_acc[-1] < result["clean"]["accuracy"] == pytest.approx(clean["accuracy"])
    for label, _ in eps:
        assert result["pgd"][label]["accuracy"] <= result["fgsm"][label]["accuracy"]


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_leaves_gradients_and_mode_alone(name, batch):
    x, y = batch
    for training in (True, False):
        model = linear_model().train(training)
        attack(model, x, y, name, 0.05, steps=3)
        assert model.training is training
        assert all(p.grad is None for p in model.parameters())
    model = linear_model()
    model(x).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():  # the attack takes its own gradients even under no_grad
        attack(model, x, y, name, 0.05, steps=3)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_attack_adds_no_grad_sample_to_an_opacus_model(batch):
    from opacus import GradSampleModule

    x, y = batch
    gsm = GradSampleModule(linear_model().train(), batch_first=True, loss_reduction="mean")
    attack(gsm, x, y, "pgd", 0.05, steps=2)
    assert gsm.hooks_enabled
    assert all(getattr(p, "grad_sample", None) is None and p.grad is None for p in gsm.parameters())


@pytest.mark.parametrize("name", ATTACKS)
def test_each_adversarial_example_depends_only_on_itself(name, trained, batch):
    x, y = batch
    x, y = x[:6], y[:6]
    if name == "fgsm":
        together, alone = fgsm(trained, x, y, 0.05), [fgsm(trained, x[i:i + 1], y[i:i + 1], 0.05) for i in range(6)]
    else:
        together = pgd(trained, x, y, 0.05, steps=4, random_start=False)
        alone = [pgd(trained, x[i:i + 1], y[i:i + 1], 0.05, steps=4, random_start=False) for i in range(6)]
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


def test_pgd_random_start_is_reproducible(trained, batch):
    x, y = batch
    a = pgd(trained, x, y, 0.05, 3, generator=torch.Generator().manual_seed(7))
    b = pgd(trained, x, y, 0.05, 3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- robustness_metrics
def test_metrics_shape_and_group_k_anonymity(trained):
    groups = np.array([0] * 20 + [1] * 17 + [2] * 3, dtype=np.int64)
    split = square_split(40, 5, groups)
    eps = [("0.5", 0.5 / 255), ("8", 8 / 255)]
    result = robustness_metrics(trained, split, CPU, ["fgsm", "pgd"], eps, steps=3, batch_size=16)
    assert set(result) == {"clean", "fgsm", "pgd", "groups"}
    assert set(result["clean"]) == {"accuracy", "auc", "sensitivity", "num-examples"}
    assert result["clean"]["num-examples"] == 40
    for name in ("fgsm", "pgd"):
        assert list(result[name]) == ["0.5", "8"]
        assert all(set(m) == {"accuracy", "auc", "sensitivity"} for m in result[name].values())
    assert set(result["groups"]) == {"0", "1"}  # group 2 has 3 images < MIN_GROUP_SAMPLES
    assert result["groups"]["1"]["clean"]["num-examples"] == 17
    assert list(result["groups"]["0"]["pgd"]) == ["0.5", "8"]
    again = robustness_metrics(trained, split, CPU, ["pgd"], eps[1:], steps=3, batch_size=40)
    assert again["pgd"]["8"] == result["pgd"]["8"]  # same seed: batches and other strengths do not matter
    one_class = ImageSplit(split.images[:10], np.ones(10, dtype=np.int64))
    assert math.isnan(robustness_metrics(trained, one_class, CPU, ["fgsm"], eps[:1])["fgsm"]["0.5"]["auc"])
    assert "groups" not in robustness_metrics(trained, one_class, CPU, [], [])


# --------------------------------------------------------------------------- the CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ConfigError(message)


def robustness(argv: list[str]) -> int:
    """What ``medfed robustness ARGS`` runs, until common/cli.py registers the command."""
    parser = _Parser(prog="medfed")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    add_robustness_arguments(sub)
    args = parser.parse_args(["robustness", *argv])
    assert args.func is cmd_robustness
    return args.func(args)


def _save(path, spec: ModelSpec, state: dict, **extra):
    cfg = StudyConfig(dataset="medmnist", data_path=str(path.parent / "squaremnist.npz"), num_sites=2,
                      partition="iid", min_sites=2)
    return save_checkpoint(Checkpoint(model=spec, state_dict=state, config=cfg.to_dict(), **extra), path)


@pytest.fixture
def run(tmp_path, trained):
    arrays = {}
    for i, (split, n) in enumerate((("train", 40), ("val", 40), ("test", 48))):
        s = square_split(n, 10 + i)
        arrays[f"{split}_images"] = np.round(s.images[:, 0] * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = s.labels.reshape(-1, 1).astype(np.uint8)
    data = tmp_path / "squaremnist.npz"
    np.savez(data, **arrays)
    model = _save(tmp_path / "run" / "model.pt", SPEC, trained.state_dict(), metrics={"threshold": 0.4})
    return model, data


def test_cli_end_to_end(run, tmp_path, capsys):
    model, data = run
    out = tmp_path / "out"
    code = robustness(["--model", str(model), "--data", str(data), "--eps", "0.5,2,16", "--steps", "3",
                       "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    assert set(report) == {"clean", "fgsm", "pgd", "meta"}  # MedMNIST has no group codes
    assert set(report["clean"]) == {"accuracy", "auc", "sensitivity", "num-examples"}
    assert report["clean"]["num-examples"] == 24  # half the test split: site 0 of 2
    for name in ("fgsm", "pgd"):
        assert list(report[name]) == ["0.5", "2", "16"]
        assert all(0.0 <= m["accuracy"] <= 1.0 for m in report[name].values())
    meta = report["meta"]
    assert meta["eps-scale"] == 255 and meta["steps"] == 3 and meta["threshold"] == 0.4
    assert meta["split"] == "test" and meta["site"] == "site-0" and "squaremnist" in meta["data"]
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "pgd" in printed and "16" in printed and "robustness.json" in printed
    # the [0, 1] scale, one attack, the val split, print only
    assert robustness(["--model", str(model), "--data", str(data), "--attack", "fgsm", "--eps", "0.02",
                       "--eps-scale", "1", "--split", "val", "--device", "cpu"]) == 0
    assert "fgsm" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--attack", "fgsm,deepfool"], "deepfool"),
    (["--eps", "0"], "> 0"),
    (["--eps", "300"], "300"),
    (["--eps", "two"], "not a number"),
    (["--steps", "0"], "--steps"),
    (["--eps", "2", "--eps-scale", "0"], "--eps-scale"),
    (["--threshold", "1.5"], "--threshold"),
])
def test_cli_bad_arguments(run, tmp_path, argv, message):
    model, data = run
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        robustness(["--model", str(model), "--data", str(data), "--out", str(out), *argv])
    assert not out.exists()


@pytest.mark.parametrize("name, kind", [("cgan", "generation"), ("unet", "segmentation"), ("logreg", "tabular")])
def test_cli_refuses_models_that_are_not_image_classifiers(tmp_path, name, kind):
    model = _save(tmp_path / "model.pt", ModelSpec(name, 1, 2, 16), {})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"image classifiers .*; model '{name}' is a {kind} model"):
        robustness(["--model", str(model), "--out", str(out)])
    assert not out.exists()


def test_cli_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, bogus)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="not a medfed checkpoint"):
        robustness(["--model", str(bogus), "--out", str(out)])
    with pytest.raises(ConfigError, match="not found"):
        robustness(["--model", str(tmp_path / "missing.pt"), "--out", str(out)])
    assert not out.exists()


def test_cli_threshold_is_for_binary_models(tmp_path):
    three = ModelSpec("cnn", 1, 3, 16)
    model = _save(tmp_path / "model.pt", three, build_model(three).state_dict())
    with pytest.raises(ConfigError, match="binary"):
        robustness(["--model", str(model), "--threshold", "0.3"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_match_the_cpu(trained, batch):
    x, y = batch
    on_cpu = pgd(trained, x, y, 0.05, 3, generator=torch.Generator().manual_seed(1))
    cuda = torch.device("cuda")
    model = build_model(SPEC).to(cuda).eval()
    model.load_state_dict(trained.state_dict())
    on_gpu = pgd(model, x.to(cuda), y.to(cuda), 0.05, 3, generator=torch.Generator().manual_seed(1))
    assert on_gpu.device.type == "cuda"
    # the random start is drawn on the CPU; sign steps can differ only where a gradient is ~0
    assert float((on_gpu.cpu() - on_cpu).abs().gt(1e-4).float().mean()) < 0.01
    assert float((fgsm(model, x.to(cuda), y.to(cuda), 0.05).cpu() - x).abs().max()) <= 0.05 + 1e-6

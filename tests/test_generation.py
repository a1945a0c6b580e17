"""Conditional GAN building blocks: models, a site's round (plain and DP), evaluation, samples."""

from __future__ import annotations

import copy
import json
from datetime import datetime

import numpy as np
import pytest
import torch
from medfed.common.data.splits import ImageSplit
from medfed.common.dp.engine import DPSettings
from medfed.common.dp.model_check import DPModelError, prepare_dp_model
from medfed.common.errors import ConfigError, DataError
from medfed.common.generation.evaluate import classifier_features, fid, tstr_auc
from medfed.common.generation.models import (
    Discriminator,
    GanSpec,
    Generator,
    build_gan,
)
from medfed.common.generation.private import fold_paired_grad_samples, require_dp_ready
from medfed.common.generation.samples import augment, generate, write_samples
from medfed.common.generation.train import (
    GanSettings,
    discriminator_losses,
    gan_round,
    generator_step,
)
from medfed.common.models import ModelSpec, build_model
from medfed.common.optim import Adam
from medfed.common.training import TrainSettings
from PIL import Image
from torch import nn
from torch.nn import functional as F

torch.set_num_threads(1)
CPU = torch.device("cpu")
# Opacus's full backward hooks warn when the input does not require grad: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
DARK, BRIGHT = 0.2, 0.8


def _toy(n: int, seed: int, size: int = 28) -> ImageSplit:
    """Class 0: dark images, class 1: bright images (pixel noise 0.1), unequal class counts."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    base = np.where(labels == 1, BRIGHT, DARK).astype(np.float32)[:, None, None, None]
    noise = 0.1 * rng.standard_normal((n, 1, size, size)).astype(np.float32)
    return ImageSplit(np.clip(base + noise, 0.0, 1.0), labels)


SPEC = GanSpec(num_classes=2, channels=1, image_size=28)


@pytest.fixture(scope="module")
def trained():
    """A GAN trained 150 plain steps on the toy data (shared by the quality tests).

    lr 5e-4: at DCGAN's 2e-4, 150 steps left one seed in five with class-1 samples still at
    mean 0.47; at 5e-4 all five seeds gave 0.19-0.22 (dark) and 0.81-0.87 (bright).
    """
    torch.manual_seed(0)
    gen, disc = build_gan(SPEC)
    data = _toy(256, seed=0)
    settings = GanSettings(steps=150, batch_size=32, lr_g=5e-4, lr_d=5e-4)
    result = gan_round(gen, disc, data, settings, CPU, seed=0)
    return gen, disc, result


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_value_range_and_size(size, channels):
    torch.manual_seed(0)
    spec = GanSpec(latent_dim=16, num_classes=3, channels=channels, image_size=size)
    gen, disc = build_gan(spec)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        x = gen(torch.randn(4, 16) * 10, y)  # large z: the sigmoid still keeps images in [0, 1]
        assert x.shape == (4, channels, size, size)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert disc(x, y).shape == (4,)
    for net in (gen, disc):
        assert sum(p.numel() for p in net.parameters()) < 300_000
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert not any(getattr(m, "inplace", False) for m in net.modules())


def test_generator_is_conditional_on_the_label():
    torch.manual_seed(0)
    gen, _ = build_gan(SPEC)
    z = torch.randn(2, SPEC.latent_dim)
    same_z = torch.cat([z[:1], z[:1]])
    out = gen(same_z, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1])


def test_spec_round_trips_through_a_dict():
    spec = GanSpec(latent_dim=32, num_classes=9, channels=3, image_size=64)
    assert spec.to_dict() == {"latent_dim": 32, "num_classes": 9, "channels": 3, "image_size": 64}
    assert GanSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert GanSpec.from_dict({"num_classes": 2, "channels": 1, "image_size": 28}).latent_dim == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes=1 must be >= 2"),
        ({"channels": 2}, "channels=2 is not supported"),
        ({"image_size": 30}, "image_size=30 is not supported: use one of 28, 32, 64"),
        ({"latent_dim": 0}, "latent_dim=0 must be >= 1"),
        ({"latent_dim": True}, "latent_dim must be an integer"),
        ({"image_size": 28.0}, "image_size must be an integer"),
    ],
)
def test_spec_refuses_bad_values(kwargs, match):
    args = {"num_classes": 2, "channels": 1, "image_size": 28} | kwargs
    with pytest.raises(ConfigError, match=match):
        GanSpec(**args)


def test_spec_from_dict_refuses_unknown_and_missing_keys_at_once():
    with pytest.raises(ConfigError) as err:
        GanSpec.from_dict({"num_classes": 2, "channels": 1, "width": 32})
    assert "unknown keys ['width']" in str(err.value) and "missing keys ['image_size']" in str(err.value)
    with pytest.raises(ConfigError, match="must be a mapping"):
        GanSpec.from_dict([("num_classes", 2)])


def test_discriminator_is_ready_for_dp_and_batchnorm_is_refused():
    _, disc = build_gan(SPEC)
    prepared = prepare_dp_model(disc)
    assert prepared.state_dict().keys() == disc.state_dict().keys()
    require_dp_ready(disc)
    bad = copy.deepcopy(disc)
    bad.features[3] = nn.BatchNorm2d(64)
    with pytest.raises(DPModelError, match="needs fixing for DP-SGD"):
        require_dp_ready(bad)


@pytest.mark.parametrize("size", [28, 64])
def test_discriminator_per_sample_gradients_are_exact(size):
    """Opacus's per-sample gradients (embedding included) against one-sample autograd."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    disc = Discriminator(num_classes=3, channels=1, image_size=size)
    x, y = torch.rand(4, 1, size, size), torch.tensor([2, 0, 2, 1])
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    probe = copy.deepcopy(disc)
    gsm = GradSampleModule(probe, batch_first=True, loss_reduction="sum")
    F.binary_cross_entropy_with_logits(gsm(x, y), target, reduction="sum").backward()
    got = {n: p.grad_sample.clone() for n, p in probe.named_parameters()}
    gsm.cleanup()
    assert "embed.weight" in got
    for i in range(4):
        disc.zero_grad()
        F.binary_cross_entropy_with_logits(disc(x[i : i + 1], y[i : i + 1]), target[i : i + 1],
                                           reduction="sum").backward()
        for name, p in disc.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_paired_per_sample_gradient_is_the_pairs_gradient():
    """The DP unit: row i (real) and row b + i (fake for the same label) fold into one gradient."""
    from opacus import GradSampleModule

    torch.manual_seed(1)
    gen, disc = build_gan(SPEC)
    x, y, z = torch.rand(3, 1, 28, 28), torch.tensor([1, 0, 1]), torch.randn(3, SPEC.latent_dim)
    probe = copy.deepcopy(disc)
    gsm = GradSampleModule(probe, batch_first=True, loss_reduction="mean")  # as private_plan wraps
    discriminator_losses(gsm, gen, x, y, z).mean().backward()
    fold_paired_grad_samples(gsm, 3)
    got = {n: p.grad_sample.clone() for n, p in probe.named_parameters()}
    gsm.cleanup()
    for i in range(3):
        disc.zero_grad()
        fake = gen(z[i : i + 1], y[i : i + 1]).detach()
        pair = F.softplus(-disc(x[i : i + 1], y[i : i + 1])) + F.softplus(disc(fake, y[i : i + 1]))
        pair.sum().backward()
        for name, p in disc.named_parameters():
            assert got[name].shape[0] == 3
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_generator_step_runs_with_hooks_off_and_leaves_no_discriminator_state():
    from opacus import GradSampleModule

    torch.manual_seed(2)
    gen, disc = build_gan(SPEC)
    gsm = GradSampleModule(disc, batch_first=True, loss_reduction="mean")
    y, z = torch.tensor([0, 1, 1, 0]), torch.randn(4, SPEC.latent_dim)
    g_before = [p.detach().clone() for p in gen.parameters()]
    d_before = [p.detach().clone() for p in disc.parameters()]
    loss = generator_step(gen, gsm, Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999)), y, z)
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gen.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))
    for p in disc.parameters():
        assert p.grad_sample is None and p.grad is None and p.requires_grad
    assert gsm.hooks_enabled
    # The check is meaningful: the same forward with hooks on leaves per-sample gradients.
    gsm(gen(z, y).detach(), y).sum().backward()
    assert all(p.grad_sample is not None for p in disc.parameters())
    gsm.cleanup()


# --------------------------------------------------------------------------- one site's round


def test_plain_round_learns_class_conditional_brightness(trained):
    gen, _, result = trained
    assert result.steps == 150 and result.dp_steps == 0 and result.num_examples == 256
    assert np.isfinite(result.d_loss) and np.isfinite(result.g_loss) and result.seconds > 0
    dark = generate(gen, SPEC, 64, 0, seed=1).mean(axis=(1, 2, 3))
    bright = generate(gen, SPEC, 64, 1, seed=1).mean(axis=(1, 2, 3))
    # the real classes have mean intensity 0.2 and 0.8
    assert dark.mean() < 0.35 and bright.mean() > 0.65, (dark.mean(), bright.mean())
    assert (dark < 0.5).mean() >= 0.95 and (bright > 0.5).mean() >= 0.95  # per sample, not just on average


def test_plain_round_is_reproducible_for_a_seed():
    def run():
        torch.manual_seed(0)
        gen, disc = build_gan(SPEC)
        gan_round(gen, disc, _toy(64, seed=3), GanSettings(steps=3, batch_size=16), CPU, seed=7)
        return gen.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dp_round_takes_one_noisy_step_per_iteration_and_leaves_plain_modules(monkeypatch):
    from opacus.optimizers import DPOptimizer

    noised, chunks = [], []
    add_noise, pre_step = DPOptimizer.add_noise, DPOptimizer.pre_step
    monkeypatch.setattr(DPOptimizer, "add_noise", lambda self: (noised.append(1), add_noise(self))[1])
    monkeypatch.setattr(DPOptimizer, "pre_step", lambda self, *a: (chunks.append(1), pre_step(self, *a))[1])
    torch.manual_seed(0)
    gen, disc = build_gan(SPEC)
    keys = list(disc.state_dict())
    d_before = [p.detach().clone() for p in disc.parameters()]
    g_before = [p.detach().clone() for p in gen.parameters()]
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.2, max_physical_batch=8)
    result = gan_round(gen, disc, _toy(96, seed=4), GanSettings(steps=12, batch_size=16), CPU, dp=dp, seed=0)

    assert result.steps == 12 and result.dp_steps == 12
    assert len(noised) == 12  # the accountant's steps: exactly one Gaussian mechanism per iteration
    assert len(chunks) > 12  # ~19 pairs per Poisson batch in chunks of 8: skipped steps added no noise
    assert np.isfinite(result.d_loss) and np.isfinite(result.g_loss)
    assert list(disc.state_dict()) == keys and type(disc) is Discriminator
    for net in (gen, disc):
        for m in net.modules():
            assert not (m._forward_hooks or m._backward_hooks or m._forward_pre_hooks), m
        for p in net.parameters():
            for attr in ("grad_sample", "summed_grad", "_current_grad_sample"):
                assert getattr(p, attr, None) is None, attr
    assert any(not torch.equal(a, b) for a, b in zip(d_before, disc.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gen.parameters()))


def test_dp_round_survives_empty_poisson_batches():
    """8 images at sample rate 0.05: most Poisson batches are empty, yet each is one noisy step."""
    torch.manual_seed(0)
    gen, disc = build_gan(SPEC)
    dp = DPSettings(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=0.05)
    result = gan_round(gen, disc, _toy(8, seed=10), GanSettings(steps=6, batch_size=4), CPU, dp=dp)
    assert result.dp_steps == 6 and np.isfinite(result.g_loss)
    assert all(torch.isfinite(p).all() for p in disc.parameters())


def test_private_discriminator_uses_the_gan_adam_and_closes_to_a_plain_module():
    from medfed.common.generation.private import private_discriminator

    _, disc = build_gan(SPEC)
    data = _toy(16, seed=11)
    private = private_discriminator(disc, torch.from_numpy(data.images), torch.from_numpy(data.labels), 2,
                                    DPSettings(noise_multiplier=1.0), 3e-4, (0.5, 0.999))
    assert private.module._module is disc
    group = private.optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["betas"] == (0.5, 0.999)
    assert private.optimizer.step_hook is private.counter
    private.close()
    assert not any(m._forward_hooks or m._backward_hooks for m in disc.modules())


def test_round_refuses_data_that_does_not_fit_the_gan():
    gen, disc = build_gan(SPEC)
    small = _toy(8, seed=5, size=32)
    with pytest.raises(DataError, match="do not fit the GAN"):
        gan_round(gen, disc, small, GanSettings(steps=1), CPU)
    three = ImageSplit(np.zeros((2, 1, 28, 28), np.float32), np.array([0, 2], np.int64))
    with pytest.raises(DataError, match="label 2 is out of range"):
        gan_round(gen, disc, three, GanSettings(steps=1), CPU)
    with pytest.raises(ConfigError, match="steps=0 must be >= 1"):
        GanSettings(steps=0)


# --------------------------------------------------------------------------- evaluation


def test_fid_is_zero_for_identical_sets_and_the_squared_mean_shift_for_a_shift():
    x = np.random.default_rng(0).standard_normal((300, 5))
    assert abs(fid(x, x)) < 1e-8
    shift = np.array([1.0, 0.0, -2.0, 0.5, 0.0])
    assert fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    assert fid(x, x + 0.5 * shift) < fid(x, x + shift) < fid(x, x + 2 * shift)


def test_fid_matches_the_closed_form_for_1d_and_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, (200, 1)), rng.normal(-0.5, 0.5, (150, 1))
    s1, s2 = a.std(ddof=1), b.std(ddof=1)
    assert fid(a, b) == pytest.approx((a.mean() - b.mean()) ** 2 + (s1 - s2) ** 2, rel=1e-9)
    # Sylvester-Hadamard columns are orthogonal and zero-mean: sample covariances exactly diagonal.
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    cols = h[:, 1:4]  # (8, 3)
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    d1, d2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.0])
    real, fake = cols * d1 + m1, cols * d2 + m2
    var1, var2 = d1**2 * 8 / 7, d2**2 * 8 / 7
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert fid(real, fake) == pytest.approx(want, rel=1e-9)


def test_fid_matches_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 4)) @ rng.standard_normal((4, 4))
    b = rng.standard_normal((300, 4)) @ rng.standard_normal((4, 4)) + 0.3
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)


def test_fid_refuses_mismatched_or_too_few_features():
    x = np.zeros((5, 3))
    with pytest.raises(DataError, match="feature sizes differ"):
        fid(x, np.zeros((5, 4)))
    with pytest.raises(DataError, match="N >= 2"):
        fid(x, np.zeros((1, 3)))


def test_classifier_features_are_what_the_head_reads():
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 1, 2, 28))
    images = _toy(5, seed=6).images
    feats = classifier_features(model, images)
    assert feats.shape == (5, 64) and feats.dtype == np.float64
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
        via_head = model.head(torch.from_numpy(feats).float())
    torch.testing.assert_close(via_head, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="needs a medfed SmallCNN"):
        classifier_features(nn.Linear(2, 2), images)


class _MemorisingGenerator(Generator):
    """A 'perfect' generator: returns real training images of the asked class (chosen by z)."""

    def __init__(self, data: ImageSplit):
        super().__init__(SPEC.latent_dim, SPEC.num_classes, SPEC.channels, SPEC.image_size)
        self.bank = [torch.from_numpy(data.images[data.labels == c]) for c in range(SPEC.num_classes)]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pick = (z[:, 0].abs() * 1e4).long()
        return torch.stack([self.bank[c][i % len(self.bank[c])] for c, i in zip(y.tolist(), pick.tolist())])


TSTR = TrainSettings(steps=30, batch_size=32, lr=1e-3, seed=0)


def test_tstr_auc_of_a_perfect_generator_is_near_one():
    auc = tstr_auc(_MemorisingGenerator(_toy(200, seed=7)), SPEC, _toy(100, seed=8), 60, CPU, TSTR, seed=0)
    assert auc > 0.99


def test_tstr_auc_of_the_trained_gan_is_high(trained):
    gen, _, _ = trained
    auc = tstr_auc(gen, SPEC, _toy(100, seed=8), 60, CPU, TSTR, seed=0)
    assert auc > 0.9


# --------------------------------------------------------------------------- samples


def test_generate_is_seeded_shaped_and_checked(trained):
    gen, _, _ = trained
    a, b = generate(gen, SPEC, 5, 1, seed=3), generate(gen, SPEC, 5, 1, seed=3)
    assert a.shape == (5, 1, 28, 28) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, generate(gen, SPEC, 5, 1, seed=4))
    assert generate(gen, SPEC, 0, 0, seed=0).shape == (0, 1, 28, 28)
    with pytest.raises(ConfigError, match="label=2 must be a class index in 0..1"):
        generate(gen, SPEC, 1, 2, seed=0)
    with pytest.raises(ConfigError, match="was built for"):
        generate(gen, GanSpec(num_classes=3, channels=1, image_size=28), 1, 0, seed=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_write_samples_writes_pngs_npz_and_provenance(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.random((3, channels, 28, 28)).astype(np.float32)
    images[0, :, 0, 0] = [1.0] * channels
    labels = np.array([1, 1, 1])
    given = {"gan": SPEC.to_dict(), "round": 4, "site": "hospital-a"}
    out = write_samples(tmp_path / "s", images, labels, given, seed=9)

    with np.load(out / "samples.npz", allow_pickle=False) as npz:
        pixels, stored = npz["images"], npz["labels"]
    want_shape = (3, 28, 28) if channels == 1 else (3, 28, 28, 3)
    assert pixels.dtype == np.uint8 and pixels.shape == want_shape
    assert np.array_equal(stored, labels) and stored.dtype == np.int64
    assert int(pixels[0, 0, 0] if channels == 1 else pixels[0, 0, 0, 0]) == 255
    assert np.abs(pixels.astype(float) / 255 - np.moveaxis(images, 1, -1).squeeze()).max() <= 0.5 / 255 + 1e-6
    pngs = sorted(p.name for p in out.glob("sample-*.png"))
    assert pngs == ["sample-00000.png", "sample-00001.png", "sample-00002.png"]
    with Image.open(out / "sample-00002.png") as img:
        assert img.mode == ("L" if channels == 1 else "RGB")
        assert np.array_equal(np.asarray(img), pixels[2])
    record = json.loads((out / "provenance.json").read_text())
    assert {k: record[k] for k in given} == given
    assert record["count"] == 3 and record["label"] == 1 and record["seed"] == 9
    assert record["label-counts"] == {"1": 3}
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    assert not list(out.glob(".*.tmp"))


def test_write_samples_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    images = np.zeros((3, 1, 28, 28), np.float32)
    out = write_samples(tmp_path / "s", images, np.array([0, 1, 0]), {}, seed=0)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not empty.*overwrite=True"):
        write_samples(out, images[:1], np.array([0]), {}, seed=1)
    write_samples(out, images[:1], np.array([0]), {}, seed=1, overwrite=True)
    assert sorted(p.name for p in out.glob("sample-*.png")) == ["sample-00000.png"]  # no stale samples
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "provenance.json").read_text())["count"] == 1


def test_write_samples_refuses_bad_provenance_and_channels(tmp_path):
    images = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(ConfigError, match=r"\['seed'\] are filled in by write_samples"):
        write_samples(tmp_path / "a", images, np.array([0]), {"seed": 3}, seed=0)
    with pytest.raises(ConfigError, match="plain JSON values"):
        write_samples(tmp_path / "b", images, np.array([0]), {"spec": SPEC}, seed=0)
    with pytest.raises(DataError, match="need 1 \\(grey\\) or 3 \\(RGB\\)"):
        write_samples(tmp_path / "c", np.zeros((1, 2, 28, 28), np.float32), np.array([0]), {}, seed=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_augment_appends_generated_images_of_chosen_classes(trained):
    gen, _, _ = trained
    split = _toy(10, seed=9)
    out = augment(split, gen, SPEC, {1: 4, 0: 2}, seed=0)
    assert len(out) == 16 and out.groups is None
    assert np.array_equal(out.images[:10], split.images) and np.array_equal(out.labels[:10], split.labels)
    assert out.labels[10:].tolist() == [0, 0, 1, 1, 1, 1]
    assert out.images[12:].mean() > out.images[10:12].mean()  # generated bright class-1 images

    grouped = ImageSplit(split.images, split.labels, np.zeros(10, np.int64))
    out = augment(grouped, gen, SPEC, {0: 3}, seed=0, group=2)
    assert out.groups.tolist() == [0] * 10 + [2] * 3
    with pytest.raises(ConfigError, match="give group"):
        augment(grouped, gen, SPEC, {0: 3}, seed=0)
    with pytest.raises(ConfigError, match="give group"):
        augment(split, gen, SPEC, {0: 3}, seed=0, group=1)

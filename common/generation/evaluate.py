"""How good are generated images? Train-on-synthetic/test-on-real AUC and a Fréchet distance.

- :func:`tstr_auc`: train medfed's classifier on generated images only and measure its AUC on
  real test images: high when the generator renders each class recognisably and diversely.
- :func:`fid`: the Fréchet distance between Gaussians fitted to real and generated feature
  vectors (Heusel et al., NeurIPS 2017). The usual features are those of an ImageNet
  Inception-v3, whose pretrained weights cannot be downloaded here (no network at a site), so
  :func:`classifier_features` takes the pooled features of a medfed ``SmallCNN`` trained on
  real data instead. The numbers are therefore *not* comparable with published FIDs, and
  compare two generators only when computed with the same feature model (same weights).
"""

from __future__ import annotations

import numpy as np
import torch
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError
from medfed.common.generation.models import GanSpec, Generator
from medfed.common.generation.samples import generate
from medfed.common.metrics import AUC
from medfed.common.models import ModelSpec, SmallCNN, build_model
from medfed.common.training import TrainSettings, derive_seed, evaluate, train
from torch import nn
from torch.nn import functional as F


def tstr_auc(gen: Generator, spec: GanSpec, real_test: ImageSplit, n_per_class: int, device: torch.device,
             train_settings: TrainSettings, seed: int, model: str = "cnn") -> float:
    """AUC on ``real_test`` of classifier ``model`` trained on ``n_per_class`` generated images per class.

    Binary tasks: AUC of class 1; multi-class: macro one-vs-rest AUC (:mod:`medfed.common.metrics`).
    """
    if n_per_class < 1:
        raise ConfigError(f"n_per_class={n_per_class} must be >= 1")
    if len(real_test) == 0:
        raise DataError("the real test split is empty: TSTR needs real images to test on")
    parts = [
        ImageSplit(generate(gen, spec, n_per_class, c, derive_seed(seed, "tstr", c), device),
                   np.full(n_per_class, c, dtype=np.int64))
        for c in range(spec.num_classes)
    ]
    synthetic = ImageSplit.concat(parts)
    torch.manual_seed(seed)  # the classifier's initial weights
    clf = build_model(ModelSpec(model, spec.channels, spec.num_classes, spec.image_size))
    train(clf, synthetic, train_settings, device)
    metrics, _ = evaluate(clf, real_test, device)
    return float(metrics[AUC])


@torch.no_grad()
def classifier_features(model: SmallCNN, images: np.ndarray, device: torch.device | None = None,
                        batch_size: int = 256) -> np.ndarray:
    """Penultimate features of a medfed ``SmallCNN`` (global average pool, before the head).

    ``images`` is float32 ``(N, C, H, W)`` in ``[0, 1]``; returns float64 ``(N, F)``.
    """
    if not isinstance(model, SmallCNN):
        raise ConfigError(
            f"classifier_features needs a medfed SmallCNN (model 'cnn' or 'cnn-dp'), got {type(model).__name__}"
        )
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise DataError(f"images must be an (N, C, H, W) array, got {getattr(images, 'shape', type(images))}")
    device = next(model.parameters()).device if device is None else device
    was_training = model.training
    model.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    try:
        feats = [torch.flatten(model.pool(model.features(chunk.to(device))), 1).cpu()
                 for chunk in x.split(batch_size)]
    finally:
        model.train(was_training)
    if not feats:
        return np.zeros((0, model.head.in_features))
    return torch.cat(feats).double().numpy()


def fid(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Fréchet distance ``|m1 - m2|² + tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)`` of two feature sets.

    Means and (unbiased) covariances of the rows; matrix square roots by symmetric
    eigendecomposition (negative eigenvalues from rounding are set to 0). Numpy only.
    """
    a, b = _features(real_feats, "real_feats"), _features(fake_feats, "fake_feats")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature sizes differ: {a.shape[1]} (real) vs {b.shape[1]} (fake): use one feature model")
    m1, m2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(root1 @ s2 @ root1)
    value = float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(cross))
    return max(value, 0.0)


def _features(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise DataError(f"{name} must be an (N, F) array with N >= 2 (a covariance needs 2 rows), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} holds NaN or infinite values")
    return arr


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    vals, vecs = np.linalg.eigh((s + s.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


@torch.no_grad()
def discriminator_metrics(gan: nn.Module, split: ImageSplit, device: torch.device, seed: int = 0,
                          batch_size: int = 256) -> dict[str, float]:
    """The discriminator's loss and accuracy on ``split``'s real images and as many fakes.

    What a site can report every round about a GAN without sending images: ``d-loss`` (the
    training objective, per pair) and ``d-accuracy`` (mean of the real-as-real and
    fake-as-fake rates; 0.5 when the discriminator cannot tell them apart).
    """
    n = len(split)
    if n == 0:
        return {"num-examples": 0.0}
    gen, disc = gan.generator.to(device).eval(), gan.discriminator.to(device).eval()
    rng = torch.Generator().manual_seed(seed)
    loss_sum = real_ok = fake_ok = 0.0
    try:
        for start in range(0, n, batch_size):
            x = torch.from_numpy(split.images[start : start + batch_size]).to(device)
            y = torch.from_numpy(split.labels[start : start + batch_size]).to(device)
            z = torch.randn(len(y), gen.latent_dim, generator=rng).to(device)
            real, fake = disc(x, y), disc(gen(z, y), y)
            loss_sum += float((F.softplus(-real) + F.softplus(fake)).sum())
            real_ok += float((real > 0).sum())
            fake_ok += float((fake < 0).sum())
    finally:
        gen.train(), disc.train()
    return {"d-loss": loss_sum / n, "d-accuracy": 0.5 * (real_ok + fake_ok) / n, "num-examples": float(n)}


def generator_report(gan: nn.Module, real_val: ImageSplit, real_test: ImageSplit, device: torch.device, seed: int,
                     n_per_class: int = 500, steps: int = 300) -> dict[str, float]:
    """How useful and how realistic the generator is, judged on real data the server holds.

    - ``tstr_auc``: AUC on ``real_test`` of medfed's ``cnn`` trained only on ``n_per_class``
      generated images per class (train on synthetic, test on real);
    - ``trtr_auc``: the same classifier and schedule trained on the real ``real_val`` images,
      the reference for ``tstr_auc`` (train on real, test on real);
    - ``fid``: Fréchet distance between ``real_test`` and as many generated images with the
      same labels, in the feature space of that real-trained classifier (its global-average-
      pooled penultimate layer, 64 features). Inception weights cannot be downloaded here, so
      this FID is comparable only between runs that use the same feature model.
    """
    settings = TrainSettings(steps=steps, batch_size=64, lr=2e-3, optimizer="adam", seed=seed)
    spec = gan.spec
    out = {"tstr_auc": tstr_auc(gan.generator, spec, real_test, n_per_class, device, settings, seed)}
    torch.manual_seed(seed)
    real_clf = build_model(ModelSpec("cnn", spec.channels, spec.num_classes, spec.image_size))
    train(real_clf, real_val, settings, device)
    metrics, _ = evaluate(real_clf, real_test, device)
    out["trtr_auc"] = float(metrics[AUC])
    fakes = np.concatenate([
        generate(gan.generator, spec, int((real_test.labels == c).sum()), c, derive_seed(seed, "fid", c), device)
        for c in range(spec.num_classes)
    ])
    out["fid"] = fid(classifier_features(real_clf, real_test.images, device),
                     classifier_features(real_clf, fakes, device))
    out["num-examples"] = float(len(real_test))
    return out

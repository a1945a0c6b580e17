"""Membership-inference audit of a trained model at one site (``medfed privacy audit``).

The question: given the released (global) model and one example of the site's population,
can an attacker tell whether that example was in the site's training data? The audit runs
two standard attacks against the site's own data and reports how well they separate
*members* (the site's training split) from *non-members* (its held-out test split, plus its
validation split when test alone is smaller than train), balanced to equal counts per class
(so that neither attack can score by a difference in label mix between the splits).

Attacks
-------
``loss-threshold`` (Yeom et al., 2018, "Privacy risk in machine learning")
    score(x, y) = -cross-entropy(model(x), y) = log p_y; an example is called a member when
    its score is at least a threshold. Every threshold is swept (the ROC curve). No extra
    model is needed; it measures the generalisation gap as seen per example.

``lira-offline`` (Carlini et al., 2022, "Membership inference attacks from first
principles", offline variant)
    ``M`` shadow models of the target's architecture are trained from scratch with
    :func:`medfed.common.training.train` on random halves of a pool that holds the
    non-member targets and the site's training images *left out of the audit* (never an
    audited member). Each pool example is in exactly ``M // 2`` of the shadow models
    (Carlini et al.'s balanced design). For each target example, the logit-scaled confidence
    of its true class, phi = log(p / (1 - p)), is read from every shadow model that did
    *not* train on it (the OUT models; all ``M`` for a member, ``M - M // 2`` for a
    non-member) and a Gaussian N(mu_x, sigma^2) is fitted. The score is the one-sided
    statistic z = (phi_target(x) - mu_x) / sigma, in the same order as the one-sided
    p-value 1 - Pr[N(mu_x, sigma^2) > phi_target(x)]: an example whose confidence under the
    target is unusually high *for that example* is called a member. sigma is pooled over
    all examples ("fixed variance", recommended with few shadow models) unless every target
    has at least :data:`PER_EXAMPLE_VARIANCE_MIN_OUT` OUT models.

Both attacks report the AUC over all thresholds (reusing :func:`medfed.common.metrics.roc_auc`)
and the TPR at FPR 1 % and 0.1 % (the largest TPR over thresholds whose FPR does not exceed the
level). With ``n`` non-members the smallest non-zero FPR is ``1 / n``: when that exceeds a
level, the TPR reported for it is the TPR at FPR 0 (no non-member called a member), and the
``note`` field says so.

Limits (read before concluding "no leak")
-----------------------------------------
* An audit is an *empirical lower bound* on leakage for these two attacks on this data, not a
  privacy guarantee; only DP-SGD's epsilon is an upper bound. A low AUC does not prove the
  model is private, and stronger attacks (online LiRA with IN models, many more shadow
  models, augmentations, gradient or update access) can do better.
* Low-FPR numbers need many non-members: with a few hundred, TPR@0.1% FPR is the TPR at
  FPR 0 and is noisy; the AUC is the more stable figure at site scale.
* The shadow models mimic the target only roughly: they train locally, from scratch, on
  about half the pool, with a small fixed budget and without DP, while the target was trained
  federated over all sites (and possibly with DP-SGD). The mismatch weakens LiRA, i.e. it
  *under*-estimates leakage. Non-members were not trained on but the validation split may
  have chosen the round of the model (selection), a negligible leak.
* Members and non-members must come from the same distribution; the site's official splits
  are assumed to be random (a split by date or scanner would let the attacks detect the split
  rather than membership).

Everything here is a pure function of (model, data, settings); the CLI is
:mod:`medfed.client.audit_cli`. Only aggregates leave these functions, never per-example scores.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from medfed.common.data.splits import ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError
from medfed.common.metrics import roc_auc
from medfed.common.models import ModelSpec, build_model, strip_wrapper_prefix
from medfed.common.training import TrainSettings, derive_seed, train
from torch import nn

log = logging.getLogger(__name__)

FPR_LEVELS = (0.01, 0.001)
LOSS_ATTACK = "loss-threshold"
LIRA_ATTACK = "lira-offline"
PER_EXAMPLE_VARIANCE_MIN_OUT = 8
MIN_AUDIT_SIZE = 50  # fewer members/non-members than this: the figures are very noisy (warned)
_MIN_SIGMA = 1e-6


def fpr_key(level: float) -> str:
    """The output key of a TPR at an FPR level: 0.01 -> ``tpr@fpr=1%``, 0.001 -> ``tpr@fpr=0.1%``."""
    return f"tpr@fpr={level * 100:g}%"


# --------------------------------------------------------------------------- ROC maths
def _scores(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array of scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} holds NaN or infinite scores: check the model's outputs")
    return arr


def roc_points(member_scores: Any, non_member_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1).

    An example is called a member when its score is ``>=`` the threshold; tied scores move
    together, so each point is achievable by one threshold.
    """
    pos = _scores(member_scores, "member scores")
    neg = _scores(non_member_scores, "non-member scores")
    scores = np.concatenate([pos, neg])
    is_member = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_member = scores[order], is_member[order]
    tp = np.cumsum(is_member)
    fp = np.cumsum(1.0 - is_member)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tpr = np.r_[0.0, tp[last_of_tie] / pos.size]
    fpr = np.r_[0.0, fp[last_of_tie] / neg.size]
    return fpr, tpr


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> tuple[float, float]:
    """The largest TPR over ROC points with FPR <= ``max_fpr``, and the FPR where it is reached."""
    ok = fpr <= max_fpr * (1 + 1e-9)
    best = int(np.argmax(np.where(ok, tpr, -1.0)))
    return float(tpr[best]), float(fpr[best])


def attack_metrics(member_scores: Any, non_member_scores: Any) -> dict[str, Any]:
    """AUC, TPR at 1 % and 0.1 % FPR, best attack accuracy and a note on the low-FPR figures."""
    pos = _scores(member_scores, "member scores")
    neg = _scores(non_member_scores, "non-member scores")
    labels = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    auc = roc_auc(labels, np.concatenate([pos, neg]))
    fpr, tpr = roc_points(pos, neg)
    out: dict[str, Any] = {"auc": float(auc)}
    notes = []
    for level in FPR_LEVELS:
        value, reached = tpr_at_fpr(fpr, tpr, level)
        out[fpr_key(level)] = value
        if 1.0 / neg.size > level:
            notes.append(
                f"{fpr_key(level)} is the TPR at FPR {reached:g} (with {neg.size} non-members the "
                f"smallest non-zero FPR is {100.0 / neg.size:.2g}%)"
            )
    # Best accuracy of a threshold attack on the balanced set (0.5 = chance).
    out["best-accuracy"] = float(np.max((tpr + 1.0 - fpr) / 2.0)) if pos.size == neg.size else None
    out["note"] = "; ".join(notes) if notes else "every FPR level is resolved by the non-member count"
    return out


# --------------------------------------------------------------------------- data and model
@dataclass(frozen=True)
class AuditData:
    """A site's audit sets: members and non-members of equal size, and the rest for shadows."""

    site_id: str
    members: ImageSplit
    non_members: ImageSplit
    reference: ImageSplit  # neither audited nor scored: shadow-model training pool only

    def shadow_pool(self) -> ImageSplit:
        """Non-member targets first, then the reference images: what shadow models train on."""
        return ImageSplit.concat([self.non_members, self.reference])


def _matched(train_labels: np.ndarray, held_labels: np.ndarray, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks choosing, for every class, as many training as held-out images (the smaller count)."""
    take_train = np.zeros(train_labels.size, dtype=bool)
    take_held = np.zeros(held_labels.size, dtype=bool)
    for label in np.union1d(train_labels, held_labels):
        tr, he = np.flatnonzero(train_labels == label), np.flatnonzero(held_labels == label)
        k = min(tr.size, he.size)
        take_train[rng.choice(tr, size=k, replace=False)] = True
        take_held[rng.choice(he, size=k, replace=False)] = True
    return take_train, take_held


def audit_sets(site: SiteData, seed: int = 0) -> AuditData:
    """Members = the training split; non-members = test (+ val when test is smaller); balanced.

    Balanced per class: for every label, the larger side is subsampled (``default_rng(seed)``)
    to the smaller one's count, so members and non-members have the same size *and* the same
    label mix, and an attack cannot score by a difference in class prevalence between the
    splits. What is left over (training images not audited, held-out images not needed)
    becomes the shadow models' reference pool.
    """
    train_split = site.train
    held_out = site.test if len(site.test) >= len(train_split) else ImageSplit.concat([site.test, site.val])
    if len(train_split) == 0:
        raise DataError(f"site {site.site_id} has no training images: nothing to audit")
    if len(held_out) == 0:
        raise DataError(
            f"site {site.site_id} has no held-out (test or val) images: the audit needs non-members "
            "from the same site"
        )
    take_train, take_held = _matched(train_split.labels, held_out.labels, np.random.default_rng(seed))
    n = int(take_train.sum())
    if n == 0:
        raise DataError(f"site {site.site_id}: no class has both training and held-out images")
    if n < MIN_AUDIT_SIZE:
        log.warning("site %s: only %d members and %d non-members: the audit figures are very noisy",
                    site.site_id, n, n)
    rest = ImageSplit.concat([train_split.subset(~take_train), held_out.subset(~take_held)])
    return AuditData(site.site_id, train_split.subset(take_train), held_out.subset(take_held), rest)


def model_from_state(spec: ModelSpec, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``spec`` and load the weights (Opacus ``_module.`` prefixes dropped), in eval mode."""
    model = build_model(spec)
    try:
        model.load_state_dict(strip_wrapper_prefix(state_dict))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the checkpoint's weights do not fit its model {spec} ({first})") from exc
    return model.eval()


def check_fits(spec: ModelSpec, data: AuditData) -> None:
    """The model's input shape and classes must match the site's images and labels."""
    want = (spec.in_channels, spec.image_size, spec.image_size)
    if data.members.image_shape != want:
        raise DataError(
            f"site {data.site_id} images are {data.members.image_shape} (C, H, W) but the model expects "
            f"{want}: audit with the data the model was trained on"
        )
    top = max(int(s.labels.max()) for s in (data.members, data.non_members))
    if top >= spec.num_classes:
        raise DataError(f"site {data.site_id} has label {top} but the model has {spec.num_classes} classes")


@torch.no_grad()
def true_class_scores(
    model: nn.Module, data: ImageSplit, device: torch.device, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: log p_y (= -cross-entropy) and phi = log(p_y / (1 - p_y)), both from logits.

    phi is computed as ``logit_y - logsumexp(other logits)``, which stays finite where
    ``p_y`` rounds to 1 in floating point.
    """
    model.to(device).eval()
    logp, phi = [], []
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    for start in range(0, len(data), batch_size):
        logits = model(images[start : start + batch_size].to(device)).double().cpu()
        y = labels[start : start + batch_size].view(-1, 1)
        true = logits.gather(1, y).squeeze(1)
        others = logits.scatter(1, y, float("-inf"))
        logp.append((true - torch.logsumexp(logits, dim=1)).numpy())
        phi.append((true - torch.logsumexp(others, dim=1)).numpy())
    return np.concatenate(logp), np.concatenate(phi)


# --------------------------------------------------------------------------- attacks
def loss_threshold_attack(logp_members: np.ndarray, logp_non_members: np.ndarray) -> dict[str, Any]:
    """Yeom et al.: score = -cross-entropy of the true label (higher: more likely a member)."""
    return attack_metrics(logp_members, logp_non_members)


@dataclass(frozen=True)
class ShadowSettings:
    """How the offline-LiRA shadow models are trained (a small fixed budget by default)."""

    num_models: int = 4
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_models != 0 and self.num_models < 2:
            raise ConfigError(
                f"shadow models={self.num_models}: offline LiRA needs at least 2 (each non-member is "
                "left out of half of them), or 0 to skip it"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"shadow steps={self.steps} and batch size={self.batch_size} must be >= 1")


def balanced_keep(num_models: int, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """(models, pool) boolean: each pool example is IN exactly ``num_models // 2`` models."""
    order = rng.uniform(size=(num_models, pool_size)).argsort(axis=0)
    return order < num_models // 2


def fit_out_gaussians(phi: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Per target: mean of phi over its OUT models, and sigma (pooled, or per example when
    every target has >= PER_EXAMPLE_VARIANCE_MIN_OUT OUT models). ``phi``/``out``: (models, targets)."""
    counts = out.sum(axis=0)
    if np.any(counts == 0):
        raise DataError("some audit example has no OUT shadow model: use at least 2 shadow models")
    mu = np.where(out, phi, 0.0).sum(axis=0) / counts
    resid2 = np.where(out, (phi - mu) ** 2, 0.0)
    if counts.min() >= PER_EXAMPLE_VARIANCE_MIN_OUT:
        sigma = np.sqrt(resid2.sum(axis=0) / (counts - 1))
        return mu, np.maximum(sigma, _MIN_SIGMA), "per-example"
    dof = counts.sum() - counts.size
    pooled = math.sqrt(resid2.sum() / dof) if dof > 0 else 1.0
    return mu, np.full(mu.shape, max(pooled, _MIN_SIGMA)), "global"


def lira_offline(
    spec: ModelSpec,
    data: AuditData,
    phi_members: np.ndarray,
    phi_non_members: np.ndarray,
    shadow: ShadowSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Offline LiRA (see the module docstring); returns the attack metrics and the shadow setup."""
    n_mem, n_non = len(data.members), len(data.non_members)
    pool = data.shadow_pool()
    rng = np.random.default_rng(derive_seed(shadow.seed, "lira-keep"))
    keep = balanced_keep(shadow.num_models, len(pool), rng)
    if int(keep.sum(axis=1).min()) < 1:
        raise DataError(
            f"site {data.site_id}: {len(pool)} held-out/reference images are too few to train "
            f"{shadow.num_models} shadow models"
        )
    targets = ImageSplit.concat([data.members, data.non_members])
    phi = np.empty((shadow.num_models, n_mem + n_non))
    out = np.ones_like(phi, dtype=bool)
    out[:, n_mem:] = ~keep[:, :n_non]  # non-members are the first n_non pool examples
    t0 = time.perf_counter()
    for m in range(shadow.num_models):
        seed = derive_seed(shadow.seed, "shadow", m)
        torch.manual_seed(seed)
        model = build_model(spec)
        settings = TrainSettings(steps=shadow.steps, batch_size=shadow.batch_size, lr=shadow.lr,
                                 optimizer=shadow.optimizer, seed=seed)
        train(model, pool.subset(keep[m]), settings, device)
        phi[m] = true_class_scores(model, targets, device)[1]
        log.info("shadow model %d/%d trained on %d images (%.1fs so far)", m + 1, shadow.num_models,
                 int(keep[m].sum()), time.perf_counter() - t0)
    mu, sigma, variance = fit_out_gaussians(phi, out)
    target_phi = np.concatenate([phi_members, phi_non_members])
    z = (target_phi - mu) / sigma
    result = attack_metrics(z[:n_mem], z[n_mem:])
    result.update({
        "shadow-models": shadow.num_models,
        "shadow-steps": shadow.steps,
        "shadow-batch-size": shadow.batch_size,
        "shadow-train-size": round(float(keep.sum(axis=1).mean())),
        "variance": variance,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return result


# --------------------------------------------------------------------------- orchestration
def run_audit(
    model: nn.Module,
    spec: ModelSpec,
    site: SiteData,
    shadow: ShadowSettings,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """Run both attacks on one site against ``model``; aggregates only (no per-example value)."""
    data = audit_sets(site, seed)
    check_fits(spec, data)
    logp_m, phi_m = true_class_scores(model, data.members, device)
    logp_n, phi_n = true_class_scores(model, data.non_members, device)
    acc_m = _accuracy(model, data.members, device)
    acc_n = _accuracy(model, data.non_members, device)
    attacks: dict[str, Any] = {LOSS_ATTACK: loss_threshold_attack(logp_m, logp_n)}
    if shadow.num_models:
        attacks[LIRA_ATTACK] = lira_offline(spec, data, phi_m, phi_n, shadow, device)
    else:
        attacks[LIRA_ATTACK] = {"skipped": True, "note": "shadow models = 0: offline LiRA not run"}
    return {
        "site": data.site_id,
        "members": len(data.members),
        "non-members": len(data.non_members),
        "accuracy": {"members": acc_m, "non-members": acc_n},
        "attacks": attacks,
        "seed": seed,
    }


@torch.no_grad()
def _accuracy(model: nn.Module, data: ImageSplit, device: torch.device, batch_size: int = 256) -> float:
    model.to(device).eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        pred = model(x).argmax(dim=1).cpu().numpy()
        correct += int((pred == data.labels[start : start + batch_size]).sum())
    return correct / max(len(data), 1)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_audit(result: dict[str, Any]) -> str:
    """A small table of the attacks' figures, with their notes."""
    head = f"privacy audit of {result.get('model', 'the model')}"
    if result.get("round") is not None:
        head += f" (round {result['round']})"
    acc = result.get("accuracy", {})
    lines = [
        head,
        (f"site {result['site']}: {result['members']} members (train), {result['non-members']} non-members "
         f"(held out); accuracy (argmax) {_fmt(acc.get('members'))} / {_fmt(acc.get('non-members'))}"),
        "",
        f"{'attack':<16}{'AUC':>7}{'TPR@1%FPR':>12}{'TPR@0.1%FPR':>14}",
    ]
    notes = []
    for name, res in result["attacks"].items():
        if res.get("skipped"):
            lines.append(f"{name:<16}{'skipped':>7}")
            continue
        lines.append(f"{name:<16}{_fmt(res['auc']):>7}{_fmt(res[fpr_key(0.01)]):>12}"
                     f"{_fmt(res[fpr_key(0.001)]):>14}")
        if res.get("note") and name == LOSS_ATTACK:
            notes.append(res["note"])
    lines.append("")
    lines.append("AUC 0.5 = chance. An empirical lower bound on leakage, not a guarantee.")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)

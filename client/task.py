"""The site's side of a round, as pure functions the ClientApp handlers call.

``train_round`` and ``evaluate_round`` take the study config, the site runtime, the
global arrays and the server's config values, and return plain results; they know
nothing of Messages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from medfed.client.augment import training_split
from medfed.client.privacy import private_round
from medfed.client.site_data import SiteRuntime
from medfed.client.site_state import load_local_layers, save_local_layers
from medfed.common.arrays import arrays_to_state_dict, load_arrays, model_to_arrays
from medfed.common.config import StudyConfig
from medfed.common.constants import NUM_HIST_BINS, SPLITS, ConfigKey, MetricKey
from medfed.common.reply_schema import SPLIT_HISTOGRAMS
from medfed.common.models import build_model, model_spec, norm_parameter_names
from medfed.common.tasks import get_task
from medfed.common.training import (
    TrainSettings,
    derive_seed,
    resolve_device,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReply:
    arrays: ArrayRecord
    metrics: dict[str, float]


def _prepare_model(cfg: StudyConfig, site: SiteRuntime, arrays: ArrayRecord, fedbn: bool):
    """(model, FedBN's site-local norm keys, frozen keys): the last two never leave the site."""
    import torch

    spec = model_spec(cfg, site.info)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    local_keys = norm_parameter_names(model) if fedbn else frozenset()
    load_arrays(model, arrays, allow_missing=local_keys)
    if fedbn:
        local = load_local_layers(site.state_dir)
        if local is not None:
            model.load_state_dict(local, strict=False)
    if cfg.freeze_patterns:  # transfer learning: the server sent the frozen layers, they are not sent back
        from medfed.common.transfer import freeze, frozen_state_names

        freeze(model, cfg.freeze_patterns)
        return model, local_keys, frozen_state_names(model)
    return model, local_keys, frozenset()


def train_round(
    cfg: StudyConfig, site: SiteRuntime, arrays: ArrayRecord, config: Mapping[str, Any]
) -> TrainReply:
    """Load the global model, train locally for one round, return the update."""
    server_round = int(config.get(ConfigKey.SERVER_ROUND.value, 0))
    fedbn = bool(config.get(ConfigKey.FEDBN.value, False))
    mu = float(config.get(ConfigKey.PROXIMAL_MU.value, 0.0))
    model, local_keys, frozen = _prepare_model(cfg, site, arrays, fedbn)
    device = resolve_device(cfg.device)
    settings = TrainSettings.from_study(
        cfg, seed=derive_seed(cfg.seed, server_round, site.site_id), proximal_mu=mu
    )
    roots = None if site.data_root is None else (site.state_dir, site.data_root)
    train_data = training_split(cfg, site.site_id, site.data.train, roots)
    n_train = len(train_data)
    with private_round(cfg, site, server_round, settings.num_steps(n_train), n_train) as private:  # one DP task
        task = get_task(cfg.task)
        if private is not None:
            model = _dp_model(model, site, task)
        global_params = arrays_to_state_dict(arrays) if mu > 0 else None
        result = task.train(model, train_data, settings, device, global_params=global_params,
                            dp=None if private is None else private.dp)
    model.cpu()
    if fedbn:
        state = model.state_dict()
        save_local_layers(site.state_dir, {k: state[k] for k in local_keys})
    log.info(
        "site %s round %d: trained %d steps on %d samples, loss %.4f (%.1fs)",
        site.site_id, server_round, result.steps, result.num_examples, result.loss, result.seconds,
    )
    metrics = {
        MetricKey.NUM_EXAMPLES.value: float(result.num_examples),
        MetricKey.TRAIN_STEPS.value: float(result.steps),
        MetricKey.TRAIN_SECONDS.value: result.seconds,
    }
    if config.get(ConfigKey.CENTRAL_DP.value):
        metrics[MetricKey.UNIT_WEIGHT.value] = 1.0
    if private is None:
        metrics[MetricKey.TRAIN_LOSS.value] = result.loss
    else:  # the training loss is not covered by the accountant: it stays at the site
        metrics.update(private.metrics())
        log.info("site %s round %d: epsilon spent %.3f of %g", site.site_id, server_round,
                 private.ledger.spent(), private.ledger.epsilon_budget)
    return TrainReply(arrays=model_to_arrays(model, exclude=local_keys | frozen), metrics=metrics)


def _dp_model(model, site: SiteRuntime, task):
    """The model checked (and fixed) for DP-SGD; refused models raise with the reason."""
    from medfed.client.boundary import PublicSiteError
    from medfed.common.dp.model_check import DPModelError, prepare_dp_model

    try:
        model = prepare_dp_model(model)
        task.check_dp(model, site.data.train, site.info.num_classes)
    except DPModelError as exc:  # about the study's model, not the site's data: tell the server
        raise PublicSiteError(str(exc)) from exc
    return model


def evaluate_round(
    cfg: StudyConfig, site: SiteRuntime, arrays: ArrayRecord, config: Mapping[str, Any]
) -> dict[str, float | list[float]]:
    """Evaluate the global model on the site's validation and test data (never training data).

    Returns per-split metrics prefixed ``val-``/``test-``, each split's score histograms
    (binary classification; counts only, no per-image values), per-group
    confusion counts and score histograms when the site's data has group codes
    (:func:`medfed.common.fairness.group_counts`, small groups suppressed) and
    ``num-examples`` (validation samples, the weight for averaging) and ``test-num-examples``
    (the weight of the test metrics when the server pools them).

    A split with fewer than the site's ``min-eval-n`` samples sends nothing but its absence:
    with one patient, a loss or a 100-bin histogram is that patient's score. Metrics that are
    not finite (an AUC on a split of one class) are left out, as the boundary requires.
    """
    from medfed.common.fairness import group_counts
    from medfed.common.metrics import DEFAULT_THRESHOLD, score_histograms

    fedbn = bool(config.get(ConfigKey.FEDBN.value, False))
    threshold = config.get(ConfigKey.THRESHOLD.value)
    minimum = site.eval_minimum(cfg)
    model, _, _ = _prepare_model(cfg, site, arrays, fedbn)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task)
    out: dict[str, float | list[float]] = {}
    for split_name in SPLITS:
        split = getattr(site.data, split_name)
        if len(split) < minimum:
            log.info("site %s: %s split has %d sample(s), fewer than min-eval-n=%d: no %s metrics are sent",
                     site.site_id, split_name, len(split), minimum, split_name)
            continue
        explain: dict[str, float | list[float]] = {}
        if split_name == EXPLAIN_SPLIT and _explains(cfg, config):  # one forward pass for metrics and saliency
            from medfed.common.explain.site import evaluate_and_explain

            metrics, probs, explain = evaluate_and_explain(
                model, cfg.model, split, split_name, device, cfg.explain_band, cfg.explain_method,
                threshold=None if threshold is None else float(threshold))
        else:
            metrics, probs = task.evaluate(
                model, split, device, threshold=None if threshold is None else float(threshold)
            )
        out.update({f"{split_name}-{key}": float(value) for key, value in metrics.items()
                    if math.isfinite(float(value))})
        binary = probs is not None and probs.ndim == 2 and probs.shape[1] == 2  # binary classification
        if binary:
            pos_key, neg_key, _ = SPLIT_HISTOGRAMS[split_name]
            pos, neg = score_histograms(split.labels, probs[:, 1], bins=NUM_HIST_BINS)
            out[pos_key] = [float(v) for v in np.asarray(pos)]
            out[neg_key] = [float(v) for v in np.asarray(neg)]
        if binary and split.groups is not None:
            out.update(group_counts(
                probs[:, 1], split.labels, split.groups,
                threshold=DEFAULT_THRESHOLD if threshold is None else float(threshold),
                num_groups=len(site.info.group_values) or None, bins=NUM_HIST_BINS, split=split_name,
            ))
        out.update(explain)
        if split_name == "test" and cfg.robustness_attacks and config.get(ConfigKey.FINAL_EVALUATION.value, False):
            from medfed.common.robustness.study import robustness_reply

            out.update(robustness_reply(model, split, device, cfg, None if threshold is None else float(threshold)))
    out[MetricKey.NUM_EXAMPLES.value] = float(len(site.data.val) if len(site.data.val) >= minimum else 0)
    if len(site.data.test) >= minimum:  # the weight of this site's test metrics in the pooled test result
        out[MetricKey.TEST_EXAMPLES.value] = float(len(site.data.test))
    return out


EXPLAIN_SPLIT = "test"
"""The split whose saliency aggregates a site sends: the one the server reports (val chooses the round)."""


def _explains(cfg: StudyConfig, config: Mapping[str, Any]) -> bool:
    """Whether this evaluation carries explain-metrics' saliency aggregates (every one, or the final one)."""
    return cfg.explain_every or (cfg.explain_metrics and bool(config.get(ConfigKey.FINAL_EVALUATION.value, False)))

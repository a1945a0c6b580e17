"""Pooled (centralized) and site-alone (local) baselines on the same data and budget.

They call the very functions the federated run uses: the same training loop
(:func:`medfed.common.training.train`), the same site evaluation
(:func:`medfed.client.task.evaluate_round`), the same validation-only model selection
and the same run-directory writer. One "round" here is what a site does in a federated
round, so federated, centralized and local runs take the same number of sample-steps:
centralized trains on the pooled data for ``local-epochs`` per round (or ``local-steps``
× number of sites), local trains each site alone for ``local-epochs``/``local-steps``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord
from medfed.client.site_data import SiteRuntime, simulation_state_dir
from medfed.client.task import evaluate_round
from medfed.common.arrays import arrays_to_state_dict, load_arrays, model_to_arrays
from medfed.common.checkpoint import Checkpoint
from medfed.common.config import StudyConfig
from medfed.common.data.splits import FederatedData, ImageSplit
from medfed.common.models import build_model, model_spec
from medfed.common.tasks import get_task
from medfed.common.training import TrainSettings, derive_seed, resolve_device
from medfed.server.central import evaluate_arrays
from medfed.server.recorder import RunRecorder
from medfed.server.selection import Selection, pool_validation

log = logging.getLogger(__name__)


@dataclass
class _Track:
    """One model being trained: its weights, selection and best weights."""

    name: str
    train: ImageSplit
    sites: list[SiteRuntime]
    model: Any
    selection: Selection
    best: ArrayRecord | None = None
    per_site: dict[str, dict] | None = None


def _runtimes(cfg: StudyConfig, fed: FederatedData) -> list[SiteRuntime]:
    return [SiteRuntime(s.site_id, fed.info, s, simulation_state_dir(cfg, s.site_id)) for s in fed.sites]


def _eval_sites(cfg: StudyConfig, sites: list[SiteRuntime], arrays: ArrayRecord,
                threshold: float | None = None) -> dict[str, dict]:
    config = {} if threshold is None else {"threshold": threshold}
    return {s.site_id: evaluate_round(cfg, s, arrays, config) for s in sites}


def _rows(per_site: dict[str, dict], train_sizes: dict[str, int]) -> dict[str, dict]:
    rows = {}
    for site, metrics in per_site.items():
        row = {("val-examples" if k == "num-examples" else k): v for k, v in metrics.items()
               if not isinstance(v, list)}
        row["num-examples"] = float(train_sizes.get(site, 0))
        rows[site] = row
    return rows


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*dicts) if dicts else set()
    out = {}
    for k in keys:
        vals = [d[k] for d in dicts if isinstance(d.get(k), float) and math.isfinite(d[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def run_baseline(cfg: StudyConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` = centralized or local; writes the same run directory as federated."""
    from medfed.common.data.federated import load_study_data

    t_start = time.perf_counter()
    fed = load_study_data(cfg)
    spec = model_spec(cfg, fed.info)
    sites = _runtimes(cfg, fed)
    device = resolve_device(cfg.device)
    recorder = RunRecorder(cfg.out_dir)
    recorder.reset()

    def new_model():  # the federated run's starting point, frozen layers included
        from medfed.server.frozen import initial_arrays

        trainable, frozen = initial_arrays(cfg, spec)
        model = build_model(spec)
        load_arrays(model, frozen.full(trainable))
        if cfg.freeze_patterns:
            from medfed.common.transfer import freeze

            freeze(model, cfg.freeze_patterns)
        return model

    if cfg.mode == "centralized":
        pooled = type(sites[0].data.train).concat([s.data.train for s in sites])  # ImageSplit or SegSplit
        tracks = [_Track("pooled", pooled, sites, new_model(), Selection(cfg.selection))]
        steps = cfg.local_steps * len(sites)
    else:
        tracks = [_Track(s.site_id, s.data.train, [s], new_model(), Selection(cfg.selection)) for s in sites]
        steps = cfg.local_steps
    train_sizes = {s.site_id: len(s.data.train) for s in sites}

    for rnd in range(1, cfg.num_server_rounds + 1):
        t_round = time.perf_counter()
        losses, all_eval, tests = [], {}, []
        for tr in tracks:
            settings = dataclasses.replace(
                TrainSettings.from_study(cfg, seed=derive_seed(cfg.seed, rnd, tr.name)), steps=steps)
            res = get_task(cfg.task).train(tr.model, tr.train, settings, device)
            losses.append(res.loss)
            arrays = model_to_arrays(tr.model.cpu())
            per_site = _eval_sites(cfg, tr.sites, arrays)
            pooled_val = pool_validation(per_site, score=get_task(cfg.task).score)
            if tr.selection.consider(rnd, pooled_val):
                tr.best = arrays
            all_eval.update(per_site)
            if fed.central_test is not None:
                tests.append(evaluate_arrays(spec, arrays, fed.central_test, cfg.device, pooled_val.threshold))
        recorder.append_round({
            "round": rnd,
            "time": {"round-s": time.perf_counter() - t_round},
            "train": {"train-loss": sum(losses) / len(losses)},
            "val": pool_validation(all_eval, score=get_task(cfg.task).score).metrics,
            "test": _mean(tests),
            "sites": _rows(all_eval, train_sizes),
        })
        log.info("%s round %d/%d: train loss %.4f | test auc %s", cfg.mode, rnd, cfg.num_server_rounds,
                 sum(losses) / len(losses), _mean(tests).get("auc"))

    final_sites, final_tests = {}, []
    for tr in tracks:
        thr = tr.selection.threshold
        final_sites.update(_eval_sites(cfg, tr.sites, tr.best, thr))
        if fed.central_test is not None:
            final_tests.append(evaluate_arrays(spec, tr.best, fed.central_test, cfg.device, thr))
    summary = {
        "mode": cfg.mode,
        "task": cfg.task,
        "strategy": "none",
        "rounds": cfg.num_server_rounds,
        "selected-round": tracks[0].selection.best_round if len(tracks) == 1 else
        {t.name: t.selection.best_round for t in tracks},
        "selection": cfg.selection,
        "threshold": tracks[0].selection.threshold if len(tracks) == 1 else
        {t.name: t.selection.threshold for t in tracks},
        "test": _mean(final_tests),
        "test-note": "centralized: the pooled model; local: mean over the sites' own models",
        "sites": _rows(final_sites, train_sizes),
        "model": spec.to_dict(),
        "config": cfg.to_dict(),
        "dataset": {"name": fed.info.name, "num-sites": cfg.num_sites},
        "wall-s": time.perf_counter() - t_start,
    }
    if cfg.mode == "centralized":
        tr = tracks[0]
        recorder.save_model(Checkpoint(model=spec, state_dict=arrays_to_state_dict(tr.best), config=cfg.to_dict(),
                                       round=tr.selection.best_round, selection=tr.selection.to_dict()))
    recorder.write_summary(summary)
    recorder.write_report()
    return summary


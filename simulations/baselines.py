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
from medfed.common.checkpoint import Checkpoint, save_checkpoint
from medfed.common.config import StudyConfig
from medfed.common.constants import GROUP_SCALAR_KEYS, ConfigKey
from medfed.common.data.splits import FederatedData, ImageSplit
from medfed.common.models import build_model, model_spec
from medfed.common.tasks import get_task
from medfed.common.training import TrainSettings, derive_seed, resolve_device
from medfed.server.central import evaluate_arrays
from medfed.server.fairness import FAIRNESS, THRESHOLD, central_scores, round_fairness, summary_fairness
from medfed.server.recorder import MODEL_FILE, RunRecorder
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
    config = {} if threshold is None else {ConfigKey.THRESHOLD.value: threshold}
    return {s.site_id: evaluate_round(cfg, s, arrays, config) for s in sites}


def _rows(per_site: dict[str, dict], train_sizes: dict[str, int],
          fairness: dict[str, dict] | None = None) -> dict[str, dict]:
    rows = {}
    for site, metrics in per_site.items():
        row = {("val-examples" if k == "num-examples" else k): v for k, v in metrics.items()
               if not isinstance(v, list) and k not in GROUP_SCALAR_KEYS}
        row["num-examples"] = float(train_sizes.get(site, 0))
        if fairness and site in fairness:
            row[FAIRNESS] = fairness[site]
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
    from medfed.common.data.partition_summary import write_study_partition

    t_start = time.perf_counter()
    fed = load_study_data(cfg)
    spec = model_spec(cfg, fed.info)
    sites = _runtimes(cfg, fed)
    device = resolve_device(cfg.device)
    recorder = RunRecorder(cfg.out_dir)
    recorder.reset()
    write_study_partition(cfg, fed)  # partition.json/.md/.png: what each site holds

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
        fairness, site_fairness = round_fairness(all_eval, None, fed.info)
        record = {
            "round": rnd,
            "time": {"round-s": time.perf_counter() - t_round},
            "train": {"train-loss": sum(losses) / len(losses)},
            "val": pool_validation(all_eval, score=get_task(cfg.task).score).metrics,
            "test": _mean(tests),
            "sites": _rows(all_eval, train_sizes, site_fairness),
        }
        if fairness is not None:
            record[FAIRNESS] = fairness
        recorder.append_round(record)
        log.info("%s round %d/%d: train loss %.4f | test auc %s", cfg.mode, rnd, cfg.num_server_rounds,
                 sum(losses) / len(losses), _mean(tests).get("auc"))

    final_sites, final_tests = {}, []
    for tr in tracks:
        thr = tr.selection.threshold
        final_sites.update(_eval_sites(cfg, tr.sites, tr.best, thr))
        if fed.central_test is not None:
            final_tests.append(evaluate_arrays(spec, tr.best, fed.central_test, cfg.device, thr))
    if len(tracks) == 1:  # one model: its pooled and central per-group metrics at its threshold
        central = central_scores(spec, tracks[0].best, fed.central_test, cfg.device, cfg.task)
        fairness = summary_fairness(final_sites, tracks[0].selection.threshold, fed.info, cfg.seed, central)
    else:  # local: each site's own model at its own threshold; the per-site records are what count
        fairness = summary_fairness(final_sites, None, fed.info, cfg.seed)
        if fairness is not None:
            fairness[THRESHOLD] = {t.name: t.selection.threshold for t in tracks}
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
    if fairness is not None:
        summary[FAIRNESS] = fairness
    if cfg.mode == "centralized":
        tr = tracks[0]
        recorder.save_model(Checkpoint(model=spec, state_dict=arrays_to_state_dict(tr.best), config=cfg.to_dict(),
                                       round=tr.selection.best_round, selection=tr.selection.to_dict()))
    else:  # local: each site's own model in sites/<id>/model.pt (e.g. to test it at the other sites)
        for tr in tracks:
            save_checkpoint(Checkpoint(model=spec, state_dict=arrays_to_state_dict(tr.best), config=cfg.to_dict(),
                                       round=tr.selection.best_round, selection=tr.selection.to_dict()),
                            simulation_state_dir(cfg, tr.name).parent / MODEL_FILE)
    recorder.write_summary(summary)
    recorder.write_report()
    return summary


"""Server-side data for evaluating the global model on the official test split.

In simulation the server built the dataset it partitioned, so it has it. A deployed server
holds no data: it evaluates centrally only when the run config names a file (``data-path``)
that exists on the server machine. It never builds synthetic data, and without such a file
the study's test metrics are the pool of the sites' own (:func:`medfed.server.selection.pool_test`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord
from medfed.common.config import StudyConfig
from medfed.common.data.splits import DatasetInfo, ImageSplit
from medfed.common.models import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CentralData:
    info: DatasetInfo
    test: ImageSplit | None
    val: ImageSplit | None


SERVER_FILE_DATASETS = ("medmnist", "npz")
"""Datasets a deployed server may really hold: a file (or folder) the run config's data-path names."""


def load_central(cfg: StudyConfig, *, simulation: bool = True) -> CentralData | None:
    """The server's own val/test data: always in simulation; in deployment only a data-path it holds."""
    from medfed.common.data.federated import load_study_data

    if not simulation:
        if cfg.dataset not in SERVER_FILE_DATASETS:
            log.info("the server holds no data (dataset=%s): the test metrics are the pool of the sites' own",
                     cfg.dataset)
            return None
        if not Path(cfg.data_path).exists():
            log.info("data-path %s does not exist on the server: the test metrics are the pool of the sites' own",
                     cfg.data_path)
            return None
        log.info("the server evaluates centrally on its own copy of %s", cfg.data_path)
    elif cfg.dataset == "medmnist" and not Path(cfg.data_path).is_file():
        log.warning(
            "no central test data on the server (%s not found): only federated evaluation",
            cfg.data_path,
        )
        return None
    fed = load_study_data(cfg)
    return CentralData(fed.info, fed.central_test, fed.central_val)


def evaluate_arrays(
    spec: ModelSpec, arrays: ArrayRecord, split: ImageSplit, device_name: str, threshold: float | None
) -> dict[str, float]:
    """Metrics of the model held in ``arrays`` on ``split`` (the server's own data), by its task."""
    from medfed.common.arrays import load_arrays
    from medfed.common.models import build_model
    from medfed.common.tasks import task_of_model
    from medfed.common.training import resolve_device

    model = build_model(spec)
    load_arrays(model, arrays)
    metrics, _ = task_of_model(spec.name).evaluate(model, split, resolve_device(device_name), threshold=threshold)
    return metrics


def final_task_metrics(spec: ModelSpec, arrays: ArrayRecord, central: CentralData | None, device_name: str,
                       seed: int) -> dict[str, float]:
    """The task's extra metrics of the reported model (generation: TSTR AUC and FID), if any."""
    from medfed.common.arrays import load_arrays
    from medfed.common.models import build_model
    from medfed.common.tasks import task_of_model
    from medfed.common.training import resolve_device

    task = task_of_model(spec.name)
    if central is None or not task.final_evaluation:
        return {}
    model = build_model(spec)
    load_arrays(model, arrays)
    return task.final_evaluate(model, central, resolve_device(device_name), seed) or {}

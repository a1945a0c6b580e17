"""Server-side data for evaluating the global model on the official test split.

In simulation the server has the dataset; in deployment it has it only if the run
config's ``data-path`` exists on the server machine. Without it, the run relies on the
sites' federated evaluation alone (and says so).
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


def load_central(cfg: StudyConfig) -> CentralData | None:
    from medfed.common.data.federated import load_study_data

    if cfg.dataset == "medmnist" and not Path(cfg.data_path).is_file():
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

"""One entry point from the study config to a :class:`FederatedData`.

- ``dataset="synthetic"``: :func:`make_synthetic` with ``num_sites`` and ``seed``. The
  synthetic sites carry their own label skew, acquisition differences and sizes, so
  ``partition`` and ``alpha`` are checked but not used.
- ``dataset="medmnist"``: the ``.npz`` at ``data_path`` (official split) partitioned with
  :func:`partition_splits`; ``central_val`` / ``central_test`` are the whole official
  val / test splits.

Sites are named ``site-0`` .. ``site-{K-1}``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from medfed.common.config import StudyConfig
from medfed.common.data.medmnist import load_medmnist_cached
from medfed.common.data.partition import SCHEMES, partition_splits
from medfed.common.data.splits import FederatedData, SiteData
from medfed.common.data.synthetic import make_synthetic
from medfed.common.errors import ConfigError

_PARTITIONED = ("synthetic", "medmnist")  # datasets split into simulated sites

__all__ = ["build_federated_data", "load_federated_cached", "load_study_data"]


def load_study_data(cfg: StudyConfig) -> FederatedData:
    """The study's data: a partitioned dataset, or real sites described by site.yaml files."""
    if cfg.task == "segmentation":
        from medfed.common.segmentation.study import load_segmentation_study

        return load_segmentation_study(cfg.dataset, cfg.data_path, cfg.num_sites, cfg.seed, cfg.image_size)
    if cfg.dataset == "sites":
        from medfed.common.intake.federated_sites import load_sites_federated

        return load_sites_federated(cfg.data_path, cfg.image_size, cfg.in_channels)
    return load_federated_cached(cfg.dataset, cfg.data_path, cfg.num_sites, cfg.partition, cfg.alpha, cfg.seed)


def build_federated_data(
    dataset: str,
    data_path: str,
    num_sites: int,
    partition: str,
    alpha: float,
    seed: int,
) -> FederatedData:
    """Build the sites of a study (see module docstring); deterministic given the arguments."""
    if dataset not in _PARTITIONED:
        raise ConfigError(
            f"dataset={dataset!r} is not allowed here: choose one of {', '.join(_PARTITIONED)} "
            "(site files go through load_study_data)"
        )
    if partition not in SCHEMES:
        raise ConfigError(
            f"partition={partition!r} is not allowed: choose one of {', '.join(SCHEMES)}"
        )
    if dataset == "synthetic":
        return make_synthetic(num_sites=num_sites, seed=seed)
    if not data_path:
        raise ConfigError(
            "dataset 'medmnist' needs data-path: the path of a MedMNIST .npz file "
            "(e.g. ../shared/data/pneumoniamnist/pneumoniamnist.npz)"
        )
    info, train, val, test = load_medmnist_cached(data_path)
    triples = partition_splits(train, val, test, num_sites, partition, alpha, seed)
    sites = tuple(SiteData(f"site-{k}", tr, va, te) for k, (tr, va, te) in enumerate(triples))
    return FederatedData(info=info, sites=sites, central_test=test, central_val=val)


@functools.lru_cache(maxsize=4)
def _cached(
    dataset: str, data_path: str, mtime_ns: int, num_sites: int, partition: str,
    alpha: float, seed: int,
) -> FederatedData:
    del mtime_ns  # cache key only: a rewritten data file is read again
    return build_federated_data(dataset, data_path, num_sites, partition, alpha, seed)


def load_federated_cached(
    dataset: str,
    data_path: str,
    num_sites: int,
    partition: str,
    alpha: float,
    seed: int,
) -> FederatedData:
    """:func:`build_federated_data`, memoised per process (the ClientApp calls it every message).

    The key includes the resolved data path and its modification time. The returned
    arrays are shared between callers: do not modify them in place.
    """
    mtime_ns = 0
    if dataset == "medmnist" and data_path:
        resolved = Path(data_path).expanduser().resolve()
        try:
            mtime_ns = resolved.stat().st_mtime_ns
        except OSError:
            pass  # build_federated_data raises the DataError explaining what is missing
        data_path = str(resolved)
    elif dataset == "synthetic":
        data_path = ""  # unused: one cache entry whatever path the config holds
    return _cached(dataset, data_path, mtime_ns, int(num_sites), partition, float(alpha), int(seed))


load_federated_cached.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]
load_federated_cached.cache_info = _cached.cache_info  # type: ignore[attr-defined]

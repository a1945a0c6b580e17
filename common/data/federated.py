"""One entry point from a study's data settings to per-site splits."""

from __future__ import annotations

import functools

from medfed.common.config import DATASETS
from medfed.common.data.splits import FederatedData, SiteData
from medfed.common.errors import ConfigError


def build_federated_data(
    dataset: str, data_path: str, num_sites: int, partition: str, alpha: float, seed: int
) -> FederatedData:
    """Synthetic sites (own per-site skew and acquisition shift), or a partitioned MedMNIST file."""
    if dataset == "synthetic":
        from medfed.common.data.synthetic import make_synthetic

        return make_synthetic(num_sites=num_sites, seed=seed)
    if dataset == "medmnist":
        from medfed.common.data.medmnist import load_medmnist_cached
        from medfed.common.data.partition import partition_splits

        info, train, val, test = load_medmnist_cached(data_path)
        parts = partition_splits(train, val, test, num_sites, partition, alpha, seed)
        sites = tuple(SiteData(f"site-{i}", tr, va, te) for i, (tr, va, te) in enumerate(parts))
        return FederatedData(info=info, sites=sites, central_test=test, central_val=val)
    raise ConfigError(f"dataset={dataset!r} is not allowed: choose one of {', '.join(DATASETS)}")


load_federated_cached = functools.lru_cache(maxsize=4)(build_federated_data)

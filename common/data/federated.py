"""One entry point from the study config to a :class:`FederatedData`.

- ``dataset="synthetic"``: with ``partition`` iid or dirichlet, :func:`make_synthetic` with
  ``num_sites`` and ``seed``: the synthetic sites carry their own label skew, acquisition
  differences and sizes, so ``partition`` and ``alpha`` are checked but not used. With
  ``quantity`` or ``demographic``, one homogeneous synthetic pool of the same total size
  (prevalence 0.5, half of each group, one acquisition) is partitioned instead.
- ``dataset="medmnist"``: the ``.npz`` at ``data_path`` (official split) partitioned with
  :func:`partition_splits`; ``central_val`` / ``central_test`` are the whole official
  val / test splits.
- ``partition="natural"`` needs a dataset that records each sample's site (hospital,
  scanner); neither of the above does, so it is rejected here.
- ``dataset="uci-heart"``: the natural split of the UCI Heart Disease folder at ``data_path``
  (:mod:`medfed.common.data.uci_heart`): sites ``cleveland``, ``hungary``, ``switzerland``, ``va``.
- ``shortcut_site=K`` (>= 0): site K's class-1 images carry a bright bar near the border
  (:mod:`medfed.common.data.shortcut`), burned in after any scanner shift; central val/test
  are then the concatenated site splits, as with a shift.
- ``shift="scanner"``: every site's images go through its own scanner
  (:mod:`medfed.common.data.shift`) once, after partitioning; ``central_val`` /
  ``central_test`` are then the concatenated (shifted) site splits.

Sites are named ``site-0`` .. ``site-{K-1}``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from medfed.common.config import StudyConfig
from medfed.common.errors import ConfigError
from medfed.common.data.medmnist import load_medmnist_cached
from medfed.common.data.partition import SCHEMES, partition_splits
from medfed.common.data.shift import SHIFTS, shift_sites
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.data.synthetic import default_site_sizes, make_synthetic

_PARTITIONED = ("synthetic", "medmnist")  # datasets split into simulated sites

__all__ = ["build_federated_data", "load_federated_cached", "load_study_data"]


def load_study_data(cfg: StudyConfig) -> FederatedData:
    """The study's data: a partitioned dataset, or real sites described by site.yaml files."""
    if cfg.dataset == "site-data":
        raise ConfigError("dataset 'site-data' is each deployed site's own data, which only the sites hold: "
                          "submit the study to a deployment with `medfed run`, or simulate on data this "
                          "machine holds (dataset synthetic, medmnist with data-path, or sites with site.yaml files)")
    if cfg.task == "segmentation":
        from medfed.common.segmentation.study import load_segmentation_study

        return load_segmentation_study(cfg.dataset, cfg.data_path, cfg.num_sites, cfg.seed, cfg.image_size,
                                       cfg.spatial_dims)
    if cfg.dataset == "sites":
        from medfed.common.intake.federated_sites import load_sites_federated

        return load_sites_federated(cfg.data_path, cfg.image_size, cfg.in_channels)
    return load_federated_cached(cfg.dataset, cfg.data_path, cfg.num_sites, cfg.partition, cfg.alpha, cfg.seed,
                                 **partition_options(cfg))


def partition_options(cfg: StudyConfig) -> dict[str, object]:
    """The keyword arguments of :func:`build_federated_data` beyond the label partition."""
    return {
        "quantity_exponent": cfg.quantity_exponent,
        "min_site_size": cfg.min_site_size,
        "group_proportions": cfg.group_fractions,
        "shift": cfg.shift,
        "shift_strength": cfg.shift_strength,
        "group_contrast": cfg.group_contrasts,
        "feature_scaling": cfg.feature_scaling,
        "shortcut_site": cfg.shortcut_site,
        "shortcut_strength": cfg.shortcut_strength,
    }


def build_federated_data(
    dataset: str,
    data_path: str,
    num_sites: int,
    partition: str,
    alpha: float,
    seed: int,
    *,
    quantity_exponent: float = 1.0,
    min_site_size: int = 2,
    group_proportions: tuple[float, ...] = (),
    shift: str = "none",
    shift_strength: float = 1.0,
    group_contrast: tuple[float, ...] = (),
    feature_scaling: str = "federated",
    shortcut_site: int = -1,
    shortcut_strength: float = 1.0,
) -> FederatedData:
    """Build the sites of a study (see module docstring); deterministic given the arguments.

    ``group_contrast`` (synthetic only): the lesion contrast of each group code, an injected bias.
    """
    if dataset == "uci-heart":  # four real hospitals: the natural split (StudyConfig checks partition, sites)
        from medfed.common.data.uci_heart import load_uci_heart

        if shift != "none":
            raise ConfigError(f"shift={shift!r} transforms images; dataset 'uci-heart' holds feature vectors: "
                              "set shift none")
        return load_uci_heart(data_path, seed, scaling=feature_scaling)
    if dataset not in _PARTITIONED:
        raise ConfigError(
            f"dataset={dataset!r} is not allowed here: choose one of {', '.join(_PARTITIONED)} "
            "(site files go through load_study_data)"
        )
    if partition not in SCHEMES:
        raise ConfigError(
            f"partition={partition!r} is not allowed: choose one of {', '.join(SCHEMES)}"
        )
    if partition == "natural":
        raise ConfigError(
            f"partition 'natural' takes the sites from a column of the data (hospital, scanner), "
            f"and dataset {dataset!r} has no such column: choose iid, dirichlet, quantity or "
            "demographic, or a dataset that records each sample's site"
        )
    if shift not in SHIFTS:
        raise ConfigError(f"shift={shift!r} is not allowed: choose one of {', '.join(SHIFTS)}")
    split_args = {"min_train": min_site_size, "quantity_exponent": quantity_exponent,
                  "group_fractions": tuple(group_proportions)}
    if group_contrast and dataset != "synthetic":
        raise ConfigError(f"group_contrast injects a bias into generated images: dataset {dataset!r} is real data")
    gcon = {"group_contrast": tuple(group_contrast)} if group_contrast else {}
    if dataset == "synthetic" and partition in ("iid", "dirichlet"):
        fed = make_synthetic(num_sites=num_sites, seed=seed, **gcon)
    elif dataset == "synthetic":
        pool = make_synthetic(num_sites=1, seed=seed, samples_per_site=[sum(default_site_sizes(num_sites))],
                              **gcon)
        info, (train, val, test) = pool.info, (pool.sites[0].train, pool.sites[0].val, pool.sites[0].test)
        fed = _partitioned(info, train, val, test, num_sites, partition, alpha, seed, split_args)
    else:
        if not data_path:
            raise ConfigError(
                "dataset 'medmnist' needs data-path: the path of a MedMNIST .npz file "
                "(e.g. ../shared/data/pneumoniamnist/pneumoniamnist.npz)"
            )
        info, train, val, test = load_medmnist_cached(data_path)
        fed = _partitioned(info, train, val, test, num_sites, partition, alpha, seed, split_args)
    if shift == "none" and shortcut_site < 0:
        return fed
    sites = shift_sites(fed.sites, seed, shift_strength) if shift != "none" else fed.sites
    if shortcut_site >= 0:  # burned in after acquisition, as a hospital's marker is
        from medfed.common.data.shortcut import plant_shortcut

        sites = plant_shortcut(sites, shortcut_site, shortcut_strength)
    return FederatedData(info=fed.info, sites=sites,
                         central_test=ImageSplit.concat([s.test for s in sites]),
                         central_val=ImageSplit.concat([s.val for s in sites]))


def _partitioned(info: DatasetInfo, train: ImageSplit, val: ImageSplit, test: ImageSplit, num_sites: int,
                 partition: str, alpha: float, seed: int, split_args: dict[str, Any]) -> FederatedData:
    triples = partition_splits(train, val, test, num_sites, partition, alpha, seed, **split_args)
    sites = tuple(SiteData(f"site-{k}", tr, va, te) for k, (tr, va, te) in enumerate(triples))
    return FederatedData(info=info, sites=sites, central_test=test, central_val=val)


@functools.lru_cache(maxsize=4)
def _cached(
    dataset: str, data_path: str, mtime_ns: int, num_sites: int, partition: str,
    alpha: float, seed: int, options: tuple[tuple[str, object], ...],
) -> FederatedData:
    del mtime_ns  # cache key only: a rewritten data file is read again
    return build_federated_data(dataset, data_path, num_sites, partition, alpha, seed, **dict(options))


def load_federated_cached(
    dataset: str,
    data_path: str,
    num_sites: int,
    partition: str,
    alpha: float,
    seed: int,
    *,
    quantity_exponent: float = 1.0,
    min_site_size: int = 2,
    group_proportions: tuple[float, ...] = (),
    shift: str = "none",
    shift_strength: float = 1.0,
    group_contrast: tuple[float, ...] = (),
    feature_scaling: str = "federated",
    shortcut_site: int = -1,
    shortcut_strength: float = 1.0,
) -> FederatedData:
    """:func:`build_federated_data`, memoised per process (the ClientApp calls it every message).

    The key includes every argument, the resolved data path and its modification time.
    The returned arrays are shared between callers: do not modify them in place.
    """
    mtime_ns = 0
    if dataset in ("medmnist", "uci-heart") and data_path:
        resolved = Path(data_path).expanduser().resolve()
        try:
            mtime_ns = resolved.stat().st_mtime_ns
        except OSError:
            pass  # build_federated_data raises the DataError explaining what is missing
        data_path = str(resolved)
    elif dataset == "synthetic":
        data_path = ""  # unused: one cache entry whatever path the config holds
    options = (
        ("quantity_exponent", float(quantity_exponent)),
        ("min_site_size", int(min_site_size)),
        ("group_proportions", tuple(float(f) for f in group_proportions)),
        ("shift", str(shift)),
        ("shift_strength", float(shift_strength)),
        ("group_contrast", tuple(float(c) for c in group_contrast)),
        ("feature_scaling", str(feature_scaling)),
        ("shortcut_site", int(shortcut_site)),
        ("shortcut_strength", float(shortcut_strength)),
    )
    return _cached(dataset, data_path, mtime_ns, int(num_sites), partition, float(alpha), int(seed), options)


load_federated_cached.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]
load_federated_cached.cache_info = _cached.cache_info  # type: ignore[attr-defined]

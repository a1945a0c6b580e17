"""A trained model and one site's data, for the tools a site runs on a checkpoint.

``medfed privacy audit``, ``medfed explain`` and ``medfed robustness`` all take a medfed
checkpoint and one site's splits: a ``site.yaml`` (the site's own data), a MedMNIST
``.npz`` partitioned as a simulation does, or by default the study data named in the
checkpoint's config. Nothing here sends anything anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTITION_FLAGS = ("site_index", "num_sites", "partition", "alpha", "seed")


def add_site_source_arguments(p: argparse.ArgumentParser) -> None:
    """``--model`` and where the site's data comes from (``--site-config`` or ``--data`` + partition flags)."""
    p.add_argument("--model", required=True, type=Path, help="a medfed checkpoint (RUN_DIR/model.pt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--site-config", type=Path, help="the site's site.yaml (its own data)")
    src.add_argument("--data", type=Path, help="a MedMNIST .npz file, partitioned as a simulation does "
                     "(default: the study data named in the checkpoint's config)")
    p.add_argument("--site-index", type=int, help="which site of the partition (default 0)")
    p.add_argument("--num-sites", type=int, help="sites in the partition (default: the checkpoint's)")
    p.add_argument("--partition", choices=("iid", "dirichlet"), help="default: the checkpoint's")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="partition seed (default: the checkpoint's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default: CUDA when present), cpu or cuda")


def study_config(mapping: dict[str, Any]) -> Any:
    """The checkpoint's study config; keys this version does not know are dropped (logged)."""
    from medfed.common.config import StudyConfig, kebab, parse_study_config

    known = {kebab(f.name) for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        log.warning("ignoring checkpoint config keys this medfed does not know: %s", ", ".join(unknown))
    return parse_study_config({k: v for k, v in mapping.items() if k in known})


@dataclasses.dataclass(frozen=True)
class SiteSource:
    data: Any  # the site's SiteData (train, val, test)
    info: Any  # its DatasetInfo (label names, group names)
    described: str  # where the data came from, for logs and reports


def site_data(args: argparse.Namespace, cfg: Any, spec: Any) -> tuple[Any, str]:
    """The site's train/val/test splits, and a description of where they came from."""
    source = site_source(args, cfg, spec)
    return source.data, source.described


def site_source(args: argparse.Namespace, cfg: Any, spec: Any) -> SiteSource:
    """The site's splits, its dataset info and where they came from (``--site-config``, ``--data`` or the study's)."""
    from medfed.client.site_data import site_runtime

    sized = cfg.replace(image_size=spec.image_size, in_channels=spec.in_channels)
    if args.site_config:
        given = [f"--{f.replace('_', '-')}" for f in PARTITION_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --data or the checkpoint's study data, "
                              "not to --site-config (a site.yaml describes one site)")
        from medfed.common.site_config import load_site_config

        runtime = site_runtime(load_site_config(args.site_config), sized)
        return SiteSource(runtime.data, runtime.info, f"site config {args.site_config}")
    index = 0 if args.site_index is None else args.site_index
    num_sites = cfg.num_sites if args.num_sites is None else args.num_sites
    dataset, path = ("medmnist", str(args.data)) if args.data else (cfg.dataset, cfg.data_path)
    if dataset == "sites":
        from medfed.common.intake.federated_sites import load_site_configs

        sites = load_site_configs(path)
        check_index(index, len(sites))
        runtime = site_runtime(sites[index], sized)
        return SiteSource(runtime.data, runtime.info, f"site config {sites[index].site_id}")
    from medfed.common.data.federated import load_federated_cached

    if dataset == "medmnist" and not Path(path).is_file():
        if args.data:
            raise DataError(f"data file not found: {path}")
        raise DataError(f"the checkpoint's study data {path} is not on this machine: pass --data FILE.npz "
                        "or --site-config site.yaml")
    partition = args.partition or cfg.partition
    alpha = cfg.alpha if args.alpha is None else args.alpha
    seed = cfg.seed if args.seed is None else args.seed
    if num_sites < 1:
        raise ConfigError(f"--num-sites {num_sites} must be >= 1")
    check_index(index, num_sites)
    from medfed.common.data.federated import partition_options

    fed = load_federated_cached(dataset, path if dataset == "medmnist" else "", num_sites, partition, alpha, seed,
                                **partition_options(cfg))  # the study's skews, shift and planted shortcut
    what = f"{fed.info.name} ({num_sites} sites, {partition}"
    what += f", alpha {alpha:g}" if partition == "dirichlet" else ""
    return SiteSource(fed.sites[index], fed.info, what + f", seed {seed})")


def decision_threshold(given: float | None, metrics: dict[str, Any], num_classes: int) -> float | None:
    """--threshold, else the checkpoint's chosen one, else 0.5; None for multi-class (argmax)."""
    from medfed.common.metrics import DEFAULT_THRESHOLD

    if num_classes != 2:
        if given is not None:
            raise ConfigError(f"--threshold applies to binary classifiers; this model has {num_classes} classes "
                              "(predictions use argmax): leave --threshold out")
        return None
    if given is not None:
        return float(given)
    stored = metrics.get("threshold")
    return DEFAULT_THRESHOLD if stored is None else float(stored)


def check_fits(spec: Any, split: Any, site_id: str, name: str) -> None:
    want = (spec.in_channels, spec.image_size, spec.image_size)
    if split.image_shape != want:
        raise DataError(f"site {site_id} {name} images are {split.image_shape} (C, H, W) but the model expects "
                        f"{want}: attack with the data the model was trained on")
    if len(split) == 0:
        raise DataError(f"site {site_id} has no {name} images: choose the other --split")
    top = int(split.labels.max())
    if top >= spec.num_classes:
        raise DataError(f"site {site_id} has label {top} but the model has {spec.num_classes} classes")


def check_index(index: int, num_sites: int) -> None:
    if not 0 <= index < num_sites:
        raise ConfigError(f"--site-index {index} is out of range: the study has sites 0..{num_sites - 1}")


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

"""``medfed privacy audit``: a membership-inference audit of a trained model, run at a site.

It reads the site's own data (a ``site.yaml``, a MedMNIST ``.npz`` partition, or by default
the study data named in the checkpoint's config), runs the loss-threshold and offline-LiRA
attacks of :mod:`medfed.common.privacy_audit`, prints a small table and writes the
aggregates (never a per-example value) to ``--out`` (default ``privacy-audit.json`` next to
the model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError, DataError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

REPORT_NAME = "privacy-audit.json"
_PARTITION_FLAGS = ("site_index", "num_sites", "partition", "alpha", "seed")


def add_privacy_arguments(subparsers: Any) -> None:
    """``medfed privacy audit`` on the top-level command's subparsers."""
    group = subparsers.add_parser("privacy", help="privacy tools: membership-inference audit of a model")
    psub = group.add_subparsers(dest="privacy_cmd", required=True, parser_class=type(group))
    p = psub.add_parser(
        "audit", help="membership-inference audit of a trained model on one site's data",
        description="Attack a trained model with a loss-threshold attack (Yeom et al. 2018) and offline "
        "LiRA (Carlini et al. 2022) on one site's data: members are the site's training split, "
        "non-members its held-out split, balanced. Prints AUC and TPR at 1% and 0.1% FPR (aggregates "
        "only) and writes them as JSON. An empirical lower bound on leakage, not a guarantee.",
    )
    p.add_argument("--model", required=True, type=Path, help="a medfed checkpoint (RUN_DIR/model.pt)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--site-config", type=Path, help="the site's site.yaml (its own data)")
    src.add_argument("--data", type=Path, help="a MedMNIST .npz file, partitioned as a simulation does "
                     "(default: the study data named in the checkpoint's config)")
    p.add_argument("--site-index", type=int, help="which site of the partition to audit (default 0)")
    p.add_argument("--num-sites", type=int, help="sites in the partition (default: the checkpoint's)")
    p.add_argument("--partition", choices=("iid", "dirichlet"), help="default: the checkpoint's")
    p.add_argument("--alpha", type=float, help="Dirichlet concentration (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="partition seed (default: the checkpoint's)")
    p.add_argument("--shadow-models", type=int, default=4,
                   help="offline-LiRA shadow models, >= 2, or 0 to skip LiRA (default 4)")
    p.add_argument("--shadow-steps", type=int, default=200, help="optimizer steps per shadow model (default 200)")
    p.add_argument("--shadow-batch-size", type=int, default=64, help="shadow batch size (default 64)")
    p.add_argument("--audit-seed", type=int, default=0,
                   help="seed of the member/non-member balancing and the shadow models (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (default: CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch (default 0: PyTorch's choice; 1 is often faster on a busy "
                   "machine, as the shadow models train on small batches)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON report (default MODEL_DIR/{REPORT_NAME})")
    p.set_defaults(func=cmd_privacy_audit)


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    from medfed.common.atomic import atomic_write_text
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.privacy_audit import (
        ShadowSettings,
        format_audit,
        model_from_state,
        run_audit,
    )
    from medfed.common.training import resolve_device

    shadow_args = (args.shadow_models, args.shadow_steps, args.shadow_batch_size)
    if args.shadow_models < 0 or args.shadow_steps < 1 or args.shadow_batch_size < 1:
        raise ConfigError(f"--shadow-models/--shadow-steps/--shadow-batch-size {shadow_args}: "
                          "give shadow models >= 0 and steps, batch size >= 1")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0 (0: PyTorch's choice)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    cfg = _study_config(ckpt.config)
    shadow = ShadowSettings(num_models=args.shadow_models, steps=args.shadow_steps,
                            batch_size=args.shadow_batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                            seed=args.audit_seed)
    model = model_from_state(ckpt.model, ckpt.state_dict)
    site, dataset = _site_data(args, cfg, ckpt.model)
    log.info("auditing %s (round %d) on %s of %s", args.model, ckpt.round, site.site_id, dataset)
    result = run_audit(model, ckpt.model, site, shadow, resolve_device(args.device), args.audit_seed)
    report = {
        "site": result["site"],
        "members": result["members"],
        "non-members": result["non-members"],
        "attacks": result["attacks"],
        "model": str(args.model),
        "round": ckpt.round,
        "dataset": dataset,
        "accuracy": result["accuracy"],
        "study-epsilon": cfg.epsilon,
        "audit-seed": args.audit_seed,
    }
    out = args.out or args.model.parent / REPORT_NAME
    atomic_write_text(out, json.dumps(_clean(report), indent=2) + "\n")
    emit(format_audit(report))
    emit(f"report: {out}")
    return 0


def _study_config(mapping: dict[str, Any]) -> Any:
    """The checkpoint's study config; keys this version does not know are dropped (logged)."""
    from medfed.common.config import StudyConfig, kebab, parse_study_config

    known = {kebab(f.name) for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        log.warning("ignoring checkpoint config keys this medfed does not know: %s", ", ".join(unknown))
    return parse_study_config({k: v for k, v in mapping.items() if k in known})


def _site_data(args: argparse.Namespace, cfg: Any, spec: Any) -> tuple[Any, str]:
    """The audited site's train/val/test splits, and a description of where they came from."""
    from medfed.client.site_data import site_runtime

    sized = cfg.replace(image_size=spec.image_size, in_channels=spec.in_channels)
    if args.site_config:
        given = [f"--{f.replace('_', '-')}" for f in _PARTITION_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --data or the checkpoint's study data, "
                              "not to --site-config (a site.yaml describes one site)")
        from medfed.common.site_config import load_site_config

        runtime = site_runtime(load_site_config(args.site_config), sized)
        return runtime.data, f"site config {args.site_config}"
    index = 0 if args.site_index is None else args.site_index
    num_sites = cfg.num_sites if args.num_sites is None else args.num_sites
    dataset, path = ("medmnist", str(args.data)) if args.data else (cfg.dataset, cfg.data_path)
    if dataset == "sites":
        from medfed.common.intake.federated_sites import load_site_configs

        sites = load_site_configs(path)
        _check_index(index, len(sites))
        return site_runtime(sites[index], sized).data, f"site config {sites[index].site_id}"
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
    _check_index(index, num_sites)
    fed = load_federated_cached(dataset, path if dataset == "medmnist" else "", num_sites, partition, alpha, seed)
    what = f"{fed.info.name} ({num_sites} sites, {partition}"
    what += f", alpha {alpha:g}" if partition == "dirichlet" else ""
    return fed.sites[index], what + f", seed {seed})"


def _check_index(index: int, num_sites: int) -> None:
    if not 0 <= index < num_sites:
        raise ConfigError(f"--site-index {index} is out of range: the study has sites 0..{num_sites - 1}")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

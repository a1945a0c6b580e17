"""``medfed privacy audit``: a membership-inference audit of a trained model, run at a site.

It reads the site's own data (a ``site.yaml``, a MedMNIST ``.npz`` partition, or by default
the study data named in the checkpoint's config), runs the loss-threshold and offline-LiRA
attacks of :mod:`medfed.common.privacy_audit`, prints a small table and writes the
aggregates (never a per-example value) to ``--out`` (default ``privacy-audit.json`` next to
the model).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from medfed.client.checkpoint_site import add_site_source_arguments, clean_json, site_data, study_config
from medfed.common.errors import ConfigError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

REPORT_NAME = "privacy-audit.json"


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
    add_site_source_arguments(p)
    p.add_argument("--shadow-models", type=int, default=4,
                   help="offline-LiRA shadow models, >= 2, or 0 to skip LiRA (default 4)")
    p.add_argument("--shadow-steps", type=int, default=200, help="optimizer steps per shadow model (default 200)")
    p.add_argument("--shadow-batch-size", type=int, default=64, help="shadow batch size (default 64)")
    p.add_argument("--audit-seed", type=int, default=0,
                   help="seed of the member/non-member balancing and the shadow models (default 0)")
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
    cfg = study_config(ckpt.config)
    shadow = ShadowSettings(num_models=args.shadow_models, steps=args.shadow_steps,
                            batch_size=args.shadow_batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                            seed=args.audit_seed)
    model = model_from_state(ckpt.model, ckpt.state_dict)
    site, dataset = site_data(args, cfg, ckpt.model)
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
    atomic_write_text(out, json.dumps(clean_json(report), indent=2) + "\n")
    emit(format_audit(report))
    emit(f"report: {out}")
    return 0

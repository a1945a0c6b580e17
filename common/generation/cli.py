"""``medfed generate``: samples from a trained conditional GAN, with where they came from.

Writes ``N`` PNGs of class ``L``, one ``samples.npz`` (uint8 images and labels) and
``provenance.json``: the checkpoint file and its SHA-256, the round it was saved at, the
study's task and dataset, and the privacy spent (ε per site and the largest) by the sites
whose data trained it. The checkpoint is read with ``weights_only`` loading: no code runs.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_generate_arguments(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="write synthetic images from a trained conditional GAN (task generation)",
        description="Sample N images of one class from a medfed generation checkpoint (RUN_DIR/model.pt) and "
        "write them as PNGs, samples.npz and provenance.json (model, round, epsilon spent).",
    )
    p.add_argument("--model", required=True, type=Path, help="a medfed checkpoint of task generation")
    p.add_argument("--n", required=True, type=int, help="number of images")
    p.add_argument("--label", required=True, type=int, help="class index (0 .. num-classes - 1)")
    p.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty)")
    p.add_argument("--seed", type=int, default=0, help="latent noise seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous sample set in --out")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.errors import ConfigError
    from medfed.common.generation.samples import generate, write_samples
    from medfed.common.models import build_model, strip_wrapper_prefix
    from medfed.common.training import resolve_device

    ckpt = load_checkpoint(args.model)
    if ckpt.model.name != "cgan":
        raise ConfigError(f"{args.model} holds model {ckpt.model.name!r}, not a GAN: "
                          "give the model.pt of a study run with --task generation")
    gan = build_model(ckpt.model)
    gan.load_state_dict(strip_wrapper_prefix(ckpt.state_dict))
    images = generate(gan.generator, gan.spec, args.n, args.label, args.seed, resolve_device(args.device))
    privacy = ckpt.metrics.get("privacy") or {}
    spent = [float(v["epsilon"]) for v in privacy.values() if isinstance(v, dict) and "epsilon" in v]
    provenance = {
        "model": str(args.model.resolve()),
        "model-sha256": hashlib.sha256(args.model.read_bytes()).hexdigest(),
        "round": ckpt.round,
        "task": ckpt.config.get("task", "generation"),
        "dataset": ckpt.config.get("dataset"),
        "data-path": ckpt.config.get("data-path"),
        "gan": gan.spec.to_dict(),
        "epsilon-by-site": {site: float(v["epsilon"]) for site, v in privacy.items() if "epsilon" in v},
        "epsilon-spent-max": max(spent) if spent else None,
        "delta": next((float(v["delta"]) for v in privacy.values() if "delta" in v), None),
        "dp": bool(spent),
    }
    out = write_samples(args.out, images, [args.label] * args.n, provenance, seed=args.seed, overwrite=args.overwrite)
    eps = f"epsilon spent <= {max(spent):.3g} at every site" if spent else "no DP"
    log.info("wrote %d samples of class %d from round %d (%s) to %s", args.n, args.label, ckpt.round, eps, out)
    return 0

"""``medfed explain``: saliency maps of a trained classifier on one site's images, kept at the site.

It reads a medfed checkpoint and the site's own data (a ``site.yaml``, or for simulation
users a MedMNIST ``.npz`` partitioned as the study did, planted shortcut included), computes
MONAI saliency maps (:mod:`medfed.common.explain.saliency`) for ``--n`` images of one split,
and writes overlay PNGs, ``explain.json`` and a self-contained ``explain.html`` gallery
(:mod:`medfed.common.explain.gallery`) into ``--out``. Nothing is sent anywhere: the gallery
holds patient images and says so.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medfed.client.checkpoint_site import (
    add_site_source_arguments,
    check_fits,
    decision_threshold,
    site_source,
    study_config,
)
from medfed.common.errors import ConfigError, DataError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

DEFAULT_N = 16
SELECTION_SEED = 0


def add_explain_arguments(subparsers: Any) -> None:
    """``medfed explain`` on the top-level command's subparsers."""
    p = subparsers.add_parser(
        "explain", help="saliency maps of a trained classifier on a site's images (a gallery that stays at the site)",
        description="Grad-CAM, Grad-CAM++ or occlusion sensitivity (MONAI monai.visualize) of a medfed classifier on "
        "--n images of one split of a site's data; writes overlay PNGs, explain.json and a self-contained "
        "explain.html gallery grouped by true/false positives/negatives. It holds patient images: it is "
        "written for the site and never sent.")
    add_site_source_arguments(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split (default test)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"images to explain, a seeded sample (default {DEFAULT_N})")
    p.add_argument("--method", default="gradxinput", help="gradxinput (default: gradient x input, what the "
                   "federated explain-metrics measure), gradcam, gradcampp or occlusion")
    p.add_argument("--class", dest="target_class", type=int,
                   help="explain this class for every image (default: each image's predicted class)")
    p.add_argument("--layer", help="the layer a CAM reads, as in model.named_modules() (default: the deepest "
                   "at least 8 px wide, see medfed.common.explain.saliency)")
    p.add_argument("--threshold", type=float, help="binary decision threshold (default: the checkpoint's, else 0.5)")
    p.add_argument("--out", required=True, type=Path, help="folder for explain.html, explain.json and the PNGs")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from medfed.common.checkpoint import load_checkpoint
    from medfed.common.explain.gallery import Item, write_gallery
    from medfed.common.explain.saliency import (
        check_explainable,
        check_method,
        predicted_classes,
        saliency_maps,
        target_layer,
    )
    from medfed.common.privacy_audit import model_from_state
    from medfed.common.training import resolve_device

    method = check_method(args.method)
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: explain at least 1 image (default {DEFAULT_N})")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file: give a folder for explain.html and its images")
    try:
        ckpt = load_checkpoint(args.model)
    except DataError as exc:
        raise ConfigError(f"--model: {exc}") from exc
    spec = ckpt.model
    check_explainable(spec.name)
    if args.target_class is not None and not 0 <= args.target_class < spec.num_classes:
        raise ConfigError(f"--class {args.target_class}: the model has classes 0..{spec.num_classes - 1}")
    threshold = decision_threshold(args.threshold, ckpt.metrics, spec.num_classes)
    device = resolve_device(args.device)
    model = model_from_state(spec, ckpt.state_dict).to(device)
    if args.layer and method in ("gradxinput", "occlusion"):
        raise ConfigError(f"--layer applies to gradcam and gradcampp; {method} reads the input image: leave it out")
    layer = target_layer(model, spec.name, spec.in_channels, spec.image_size, args.layer)  # a bad --layer fails here
    shown_layer = layer if method in ("gradcam", "gradcampp") else "input"
    cfg = study_config(ckpt.config)
    source = site_source(args, cfg, spec)
    site, described = source.data, source.described
    split = getattr(site, args.split)
    check_fits(spec, split, site.site_id, args.split)
    rng = np.random.default_rng(SELECTION_SEED)
    chosen = np.sort(rng.permutation(len(split))[: args.n])
    images = torch.from_numpy(split.images[chosen])
    probs, argmax = predicted_classes(model, images.to(device))
    probs = probs.cpu().numpy()
    predicted = (probs[:, 1] >= threshold).astype(int) if threshold is not None else argmax.cpu().numpy()
    explained = np.full(len(chosen), args.target_class) if args.target_class is not None else predicted
    log.info("explaining %d %s images of %s with %s (%s)", len(chosen), args.split, site.site_id, method, shown_layer)
    maps = saliency_maps(model, images, method, layer, class_idx=torch.from_numpy(explained), normalise=True)
    if method == "occlusion":  # occlusion's drop in probability, scaled per image for display as the CAMs are
        maps = maps / np.maximum(maps.reshape(len(maps), -1).max(1), 1e-12)[:, None, None]
    items = [Item(index=int(i), label=int(split.labels[i]), predicted=int(predicted[j]),
                  score=float(probs[j, explained[j]]), explained=int(explained[j]), image=split.images[i],
                  saliency=maps[j]) for j, i in enumerate(chosen)]
    names = list(getattr(source.info, "label_names", ()) or ())
    label_names = names if len(names) == spec.num_classes else [str(c) for c in range(spec.num_classes)]
    meta = {"site": site.site_id, "model": str(args.model), "architecture": spec.name, "round": ckpt.round,
            "data": described, "split": args.split, "method": method, "layer": shown_layer,
            "explained": "predicted class" if args.target_class is None else f"class {args.target_class}",
            "decision": "argmax" if threshold is None else f"class 1 when p >= {threshold:.3f}"}
    page = write_gallery(args.out, items, label_names, meta)
    emit(f"{len(items)} image(s) explained ({method}, {shown_layer}); gallery: {page} (patient images: it stays "
         "at this site)")
    return 0

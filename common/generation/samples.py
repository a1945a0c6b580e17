"""Sampling a trained generator, writing sample sets with their provenance, and augmentation.

A written sample set is a folder with ``sample-00000.png``... (8-bit grey or RGB),
``samples.npz`` (``images`` uint8 ``(N, H, W)`` or ``(N, H, W, C)`` and ``labels`` int64;
loads with ``allow_pickle=False``) and ``provenance.json`` (the caller's description plus
count, labels, seed and creation time), each written atomically; provenance comes last, so a
folder without it is incomplete.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medfed.common.atomic import atomic_write_bytes, atomic_write_text
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError
from medfed.common.generation.models import CHANNELS, GanSpec, Generator, check_matches
from medfed.common.training import derive_seed

log = logging.getLogger(__name__)

NPZ_NAME = "samples.npz"
PROVENANCE_NAME = "provenance.json"
PNG_PATTERN = re.compile(r"sample-\d{5,}\.png")
RESERVED_KEYS = ("count", "label", "label-counts", "seed", "created")


@torch.no_grad()
def generate(gen: Generator, spec: GanSpec, n: int, label: int, seed: int,
             device: torch.device | None = None, batch_size: int = 256) -> np.ndarray:
    """``n`` images of class ``label``: float32 ``(n, C, H, W)`` in ``[0, 1]``, same for the same seed."""
    check_matches(spec, gen)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} must be an integer >= 0")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_classes:
        raise ConfigError(f"label={label!r} must be a class index in 0..{spec.num_classes - 1}")
    device = next(gen.parameters()).device if device is None else device
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, spec.latent_dim, generator=rng)
    was_training = gen.training
    gen.to(device).eval()
    try:
        out = [
            gen(chunk.to(device), torch.full((len(chunk),), label, dtype=torch.long, device=device)).cpu()
            for chunk in z.split(batch_size)
        ]
    finally:
        gen.train(was_training)
    shape = (0, spec.channels, spec.image_size, spec.image_size)
    images = torch.cat(out).numpy() if out else np.zeros(shape, dtype=np.float32)
    return np.clip(images.astype(np.float32, copy=False), 0.0, 1.0)


def augment(split: ImageSplit, gen: Generator, spec: GanSpec, per_class: Mapping[int, int], seed: int,
            group: int | None = None, device: torch.device | None = None) -> ImageSplit:
    """``split`` followed by ``per_class[c]`` generated images of each class ``c``.

    Generated images get group code ``group``; it is required when ``split`` has group codes
    and refused when it has none (a synthetic image has no patient: choose the code it counts
    under in subgroup metrics, e.g. a dedicated "synthetic" code).
    """
    check_matches(spec, gen)
    if split.image_shape != (spec.channels, spec.image_size, spec.image_size):
        raise DataError(
            f"the split's images {split.image_shape} do not match the generator's "
            f"{(spec.channels, spec.image_size, spec.image_size)}"
        )
    if (split.groups is None) != (group is None):
        raise ConfigError(
            "give group (the code for generated images) exactly when the split has group codes: "
            f"the split has {'none' if split.groups is None else 'group codes'}, group={group!r}"
        )
    parts = [split]
    for label, count in sorted(per_class.items()):
        images = generate(gen, spec, count, label, derive_seed(seed, "augment", label), device)
        labels = np.full(count, label, dtype=np.int64)
        groups = None if group is None else np.full(count, group, dtype=np.int64)
        parts.append(ImageSplit(images, labels, groups))
    return ImageSplit.concat(parts)


def write_samples(out_dir: str | Path, images: np.ndarray, labels: np.ndarray, provenance: Mapping[str, Any],
                  *, seed: int, overwrite: bool = False) -> Path:
    """Write ``images`` (float32 ``(N, C, H, W)`` in ``[0, 1]``, C 1 or 3) as a sample set.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``; then the previous set's
    files (``sample-*.png``, ``samples.npz``, ``provenance.json``) are removed first, and any
    other file is left alone.
    """
    out = Path(out_dir)
    split = ImageSplit(images, np.asarray(labels).reshape(-1).astype(np.int64))  # validates shape and range
    if split.image_shape[0] not in CHANNELS:
        raise DataError(f"images have {split.image_shape[0]} channels: PNG samples need 1 (grey) or 3 (RGB)")
    record = _provenance(provenance, split.labels, seed)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder: choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out} is not empty: refusing to mix two sample sets; choose a new folder or pass overwrite=True"
            )
        _remove_previous(out)
    pixels = np.rint(split.images * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, C)
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    for i, img in enumerate(pixels):
        atomic_write_bytes(out / f"sample-{i:05d}.png", lambda fh, img=img: fh.write(_png(img)))
    atomic_write_bytes(out / NPZ_NAME, lambda fh: np.savez(fh, images=pixels, labels=split.labels))
    atomic_write_text(out / PROVENANCE_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("wrote %d samples to %s", len(split), out)
    return out


def _provenance(provenance: Mapping[str, Any], labels: np.ndarray, seed: int) -> dict[str, Any]:
    if not isinstance(provenance, Mapping):
        raise ConfigError(f"provenance must be a mapping, got {type(provenance).__name__}")
    clash = sorted(set(provenance) & set(RESERVED_KEYS))
    if clash:
        raise ConfigError(f"provenance keys {clash} are filled in by write_samples: rename them")
    values, counts = np.unique(labels, return_counts=True)
    record = dict(provenance)
    record.update({
        "count": int(labels.shape[0]),
        "label": int(values[0]) if values.shape[0] == 1 else None,
        "label-counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "seed": int(seed),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"provenance must hold plain JSON values (str, numbers, lists, dicts): {exc}") from exc
    return record


def _remove_previous(out: Path) -> None:
    (out / PROVENANCE_NAME).unlink(missing_ok=True)  # first: the folder is marked incomplete
    (out / NPZ_NAME).unlink(missing_ok=True)
    for path in out.iterdir():
        if PNG_PATTERN.fullmatch(path.name):
            path.unlink()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()

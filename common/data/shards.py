"""One set of array files per simulated site, so that a ClientApp loads its own site only.

The simulation driver builds the study's :class:`FederatedData` once and writes every site
here (:func:`write_site_shards`); each ClientApp then memory-maps the arrays of the one site
it is running (:func:`load_site_shard`) instead of building the whole dataset in every Ray
actor. Layout (format 1)::

    SHARD_DIR/shards.json                      format, kind, DatasetInfo, site ids by partition id
    SHARD_DIR/<site-id>/<split>-<array>.npy    split: train, val, test
                                               array: images, labels (classification) or
                                               masks (segmentation), groups (when present)

Files are plain ``.npy`` arrays (no pickles: they are read with ``allow_pickle=False``) and
the manifest is JSON; the split classes check every array again when a site loads them.
Arrays are mapped copy-on-write: pages are read from the file on first use and shared with
the page cache, and a write stays in the reading process, never reaching the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError
from medfed.common.segmentation.data import SegSplit

log = logging.getLogger(__name__)

MANIFEST = "shards.json"
FORMAT = 1
SPLITS = ("train", "val", "test")
# kind -> (split class, the name of its target array)
KINDS: dict[str, tuple[type, str]] = {"image": (ImageSplit, "labels"), "segmentation": (SegSplit, "masks")}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

__all__ = ["MANIFEST", "ShardManifest", "load_site_shard", "read_manifest", "shard_kind", "write_site_shards"]


@dataclass(frozen=True)
class ShardManifest:
    """What ``shards.json`` records: the dataset, the split kind and the site ids by partition id."""

    info: DatasetInfo
    kind: str
    site_ids: tuple[str, ...]


def shard_kind(fed: FederatedData) -> str | None:
    """``"image"`` or ``"segmentation"`` when every site split is of that class; None otherwise."""
    classes = {type(getattr(s, split)) for s in fed.sites for split in SPLITS}
    for kind, (cls, _) in KINDS.items():
        if classes == {cls}:
            return kind
    return None


def write_site_shards(fed: FederatedData, shard_dir: Path) -> Path:
    """Write every site of ``fed`` under ``shard_dir`` (replacing what is there); return it.

    The files are written into a temporary folder beside ``shard_dir`` and renamed into place
    at the end, so a reader never sees half a set.
    """
    kind = shard_kind(fed)
    if kind is None:
        raise DataError(
            f"dataset {fed.info.name!r}: site shards hold ImageSplit or SegSplit sites only, got "
            f"{sorted({type(s.train).__name__ for s in fed.sites})}; load such sites with load_study_data"
        )
    for site_id in fed.site_ids:
        _check_site_id(site_id, "FederatedData")
    shard_dir = Path(shard_dir)
    shard_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard_dir.with_name(f".{shard_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    target = KINDS[kind][1]
    nbytes = 0
    try:
        for site in fed.sites:
            folder = tmp / site.site_id
            folder.mkdir(parents=True)
            for split_name in SPLITS:
                split = getattr(site, split_name)
                arrays = {"images": split.images, target: getattr(split, target), "groups": split.groups}
                for name, array in arrays.items():
                    if array is not None:
                        np.save(folder / f"{split_name}-{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
                        nbytes += array.nbytes
        manifest = {"format": FORMAT, "kind": kind, "info": asdict(fed.info), "sites": list(fed.site_ids)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        shutil.rmtree(shard_dir, ignore_errors=True)
        os.replace(tmp, shard_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d site shards (%.1f MB) to %s", len(fed.sites), nbytes / 1e6, shard_dir)
    return shard_dir


def read_manifest(shard_dir: Path) -> ShardManifest:
    """The manifest of the shards in ``shard_dir``; DataError naming the problem otherwise."""
    path = Path(shard_dir) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"no site shards at {shard_dir} ({MANIFEST} is missing): the simulation driver writes them "
            "before it starts the engine and removes them after the run; run the study with "
            "'medfed simulate', or leave site-shards empty to build the site from the dataset"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable site-shard manifest ({exc}); rerun the study to rewrite it") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: site-shard format {found!r}, expected {FORMAT}; rerun the study to rewrite it")
    kind, sites = data.get("kind"), data.get("sites")
    if kind not in KINDS:
        raise DataError(f"{path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
        raise DataError(f"{path}: 'sites' must be a non-empty list of site ids")
    for site_id in sites:
        _check_site_id(site_id, str(path))
    return ShardManifest(_info_from_dict(data.get("info"), path), kind, tuple(sites))


def load_site_shard(shard_dir: Path, partition_id: int, num_partitions: int) -> tuple[DatasetInfo, SiteData]:
    """The dataset info and the one site at ``partition_id``, its arrays memory-mapped."""
    manifest = read_manifest(shard_dir)
    if num_partitions != len(manifest.site_ids):
        raise ConfigError(
            f"the simulation has {num_partitions} nodes but the site shards at {shard_dir} hold "
            f"{len(manifest.site_ids)} sites: make num-sites equal to the shards' sites, or rerun the study"
        )
    if not 0 <= partition_id < len(manifest.site_ids):
        raise DataError(f"partition id {partition_id} is out of range 0..{len(manifest.site_ids) - 1}")
    site_id = manifest.site_ids[partition_id]
    cls, target = KINDS[manifest.kind]
    folder = Path(shard_dir) / site_id
    splits = {}
    for split_name in SPLITS:
        images = _load(folder / f"{split_name}-images.npy")
        targets = _load(folder / f"{split_name}-{target}.npy")
        groups_path = folder / f"{split_name}-groups.npy"
        groups = _load(groups_path) if groups_path.is_file() else None
        splits[split_name] = cls(images, targets, groups)
    return manifest.info, SiteData(site_id, splits["train"], splits["val"], splits["test"])


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"site shard file {path} is missing: rerun the study to rewrite the shards") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array without pickles ({exc})") from exc


def _info_from_dict(raw: Any, path: Path) -> DatasetInfo:
    names = {f.name for f in fields(DatasetInfo)}
    if not isinstance(raw, dict) or set(raw) - names:
        raise DataError(f"{path}: 'info' must be a mapping of DatasetInfo fields ({', '.join(sorted(names))})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return DatasetInfo(**values)
    except TypeError as exc:
        raise DataError(f"{path}: 'info' is not a valid DatasetInfo ({exc})") from exc


def _check_site_id(site_id: str, where: str) -> None:
    """Site ids name folders: letters, digits, '.', '_' and '-', not starting with a dot."""
    if not _SAFE_ID.match(site_id):
        raise DataError(
            f"{where}: site id {site_id!r} cannot name a shard folder: use letters, digits, '.', '_' "
            "and '-' only, starting with a letter or digit"
        )

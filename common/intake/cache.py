"""A disk cache of preprocessed images, so that DICOM is decoded once per site, not per round.

In deployment every Flower message starts a fresh ClientApp process, so an in-memory
cache (MONAI's ``CacheDataset``) would be lost after each round; MONAI's
``PersistentDataset`` pickles items with ``torch.save``. This cache keeps the same idea
(one entry per preprocessed image, keyed by a hash of its source and settings) with plain
``.npy`` files read with ``allow_pickle=False``, so reading it executes nothing, and the
cached path needs neither pydicom nor MONAI.

The key covers the file's absolute path, size and modification time plus every read and
preprocessing setting, so an edited file or a changed setting is a miss, never a stale
hit. The cache lives in the site's state directory (never in its data root) and is bounded
by ``max_bytes``: once full, further images are decoded every time and a warning says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from medfed.common.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

CACHE_VERSION = 2


@dataclass(frozen=True)
class CachedImage:
    image: np.ndarray  # preprocessed float32 (C, S, S)
    info: dict[str, Any]  # small JSON-able facts about the source (shape, modality, pixel hash)


class PreprocessCache:
    """Content-keyed ``.npy`` entries under ``root``, at most ``max_bytes`` in total."""

    def __init__(self, root: Path, max_bytes: int, settings_token: str) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._token = settings_token
        self._used: int | None = None
        self._full_warned = False
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def key(self, path: Path) -> str | None:
        """The entry key for ``path`` (None when the file cannot be stat'ed)."""
        try:
            st = path.stat()
        except OSError:
            return None
        raw = f"{CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self._token}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def get(self, path: Path) -> CachedImage | None:
        if not self.enabled:
            return None
        key = self.key(path)
        if key is None:
            return None
        npy, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
            image = np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return CachedImage(image, info)

    def put(self, path: Path, image: np.ndarray, info: dict[str, Any]) -> bool:
        """Store one entry; returns False when the cache is off or full."""
        if not self.enabled:
            return False
        key = self.key(path)
        if key is None:
            return False
        size = image.nbytes + 512
        if self.used_bytes() + size > self.max_bytes:
            if not self._full_warned:
                log.warning(
                    "preprocessing cache %s is full (%.0f MB): further images are decoded every "
                    "round; raise cache-max-mb in site.yaml to cache them",
                    self.root, self.max_bytes / 1e6,
                )
                self._full_warned = True
            return False
        npy, meta = self._paths(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(npy, lambda f: np.save(f, np.ascontiguousarray(image), allow_pickle=False))
        atomic_write_text(meta, json.dumps(info))
        self._used = self.used_bytes() + size
        return True

    def used_bytes(self) -> int:
        if self._used is None:
            self._used = sum(p.stat().st_size for p in self.root.rglob("*.npy")) if self.root.is_dir() else 0
        return self._used


"""One hospital site's configuration (``site.yaml``), parsed once into a frozen dataclass.

The daemon, the ClientApp and ``medfed site check`` all read ``site.yaml`` through
:func:`load_site_config`. Relative paths are resolved against the file's folder
(``data-root``, ``state-dir``, certificates); paths *of site data* (``manifest``,
``dicom-dir``, ``labels-csv``, ``data-file``) are relative to ``data-root``.

Where the images come from (``dataset``; inferred from the keys when omitted):

- ``manifest``: a CSV with ``path`` and ``label`` columns (plus optional ``patient_id``,
  ``split`` and attribute columns), images relative to ``data-root``;
- ``dicom``: a DICOM folder (``dicom-dir``) scanned recursively, labels joined from
  ``labels-csv`` on ``label-join`` (SOPInstanceUID, AccessionNumber or PatientID);
- ``medmnist``: a MedMNIST ``.npz`` (``data-file``), optionally one iid shard of it;
- ``synthetic``: a shard of the seeded synthetic dataset (demos and tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from medfed.common.config import (
    check_choice,
    check_range,
    kebab,
    load_yaml_mapping,
    parse_dataclass,
)
from medfed.common.errors import ConfigError
from medfed.common.intake.dicom_scan import DEFAULT_ATTRIBUTE_TAGS, JOIN_KEYS

SITE_DATASETS = ("manifest", "dicom", "medmnist", "synthetic")
LABEL_JOINS = tuple(JOIN_KEYS)
TASKS = ("classification", "segmentation")


DEFAULT_MAX_MESSAGE_MB = 512.0  # site.yaml max-message-mb; also the bound in simulation (no site.yaml)
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # site.yaml max-image-pixels: checked from each file's header before decoding
DEFAULT_MIN_EVAL_N = 20  # site.yaml min-eval-n: no metrics or histograms for a smaller split

@dataclass(frozen=True)
class SiteConfig:
    """One hospital site, from its ``site.yaml`` or the SuperNode's node config."""

    site_id: str
    data_root: str
    state_dir: str
    dataset: str = ""  # inferred from manifest / dicom-dir / data-file when empty
    task: str = "classification"
    # where the images are
    manifest: str = ""
    dicom_dir: str = ""
    labels_csv: str = ""
    label_join: str = "sop-instance-uid"
    label_column: str = "label"
    attribute_tags: tuple[str, ...] = DEFAULT_ATTRIBUTE_TAGS
    data_file: str = ""
    shard_index: int = 0
    shard_count: int = 1
    # what they mean
    labels: tuple[str, ...] = ()  # the declared label set; its order is the class index
    age_bands: tuple[float, ...] = ()  # upper edges, e.g. [40, 60] -> <=40, 41-60, >60
    group_attribute: str = ""  # attribute whose groups subgroup metrics use (e.g. sex)
    # how they are read and preprocessed
    window_center: float | None = None
    window_width: float | None = None
    frame: int = -1  # multi-frame / 3D: frame index, -1 = the middle one
    image_size: int = 64  # used when the study's run config leaves image-size at 0
    channels: int = 1  # used when the study's run config leaves in-channels at 0
    split_fractions: tuple[float, ...] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    cache_max_mb: float = 2048.0  # preprocessing cache bound on disk; 0 turns it off
    # the site's own privacy budget for everything it ever trains (0: none; a study's may be lower)
    epsilon: float = 0.0
    delta: float = 1e-5
    # how the site connects
    server: str = "127.0.0.1:9092"
    root_cert: str = ""
    auth_key: str = ""
    clientappio_port: int = 0
    # what the site runs and accepts (client/trusted_app.py, client/incoming.py)
    trusted_apps: tuple[str, ...] = ()  # sha256 of FABs the site runs; empty: config-only medfed apps
    run_app_code: bool = False  # True: Flower runs the ClientApp code the server ships (development only)
    max_message_mb: float = DEFAULT_MAX_MESSAGE_MB  # largest model (sum of its arrays) the site accepts
    # what the site lets out and reads in (issue 14)
    min_eval_n: int = DEFAULT_MIN_EVAL_N  # splits smaller than this send no metrics; wins over the study's
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # rows x columns (x frames / slices) of one file

    def __post_init__(self) -> None:
        if not self.site_id or not all(c.isalnum() or c in "-_." for c in self.site_id):
            raise ConfigError(
                f"site-id={self.site_id!r} is not allowed: use letters, digits, '-', '_' or '.'"
            )
        if not self.dataset:
            object.__setattr__(self, "dataset", self._infer_dataset())
        check_choice("dataset", self.dataset, SITE_DATASETS)
        check_choice("task", self.task, TASKS)
        check_choice("label-join", self.label_join, LABEL_JOINS)
        check_range("shard-count", self.shard_count, 1, 10000)
        check_range("shard-index", self.shard_index, 0, self.shard_count - 1)
        check_range("clientappio-port", self.clientappio_port, 0, 65535)
        check_range("max-message-mb", self.max_message_mb, 1.0, 65536.0)
        check_range("min-eval-n", self.min_eval_n, 1, 10**7)
        check_range("max-image-pixels", self.max_image_pixels, 64, 10**11)
        self._check_trusted_apps()
        check_range("image-size", self.image_size, 8, 4096)
        check_choice("channels", str(self.channels), ("1", "3"))
        check_range("frame", self.frame, -1, 100000)
        check_range("cache-max-mb", self.cache_max_mb, 0.0, 10.0**7)
        check_range("epsilon", self.epsilon, 0.0, 1000.0)
        check_range("delta", self.delta, 1e-12, 0.1)
        self._check_source()
        self._check_window()
        self._check_fractions()
        if list(self.age_bands) != sorted(set(self.age_bands)) or any(a < 0 for a in self.age_bands):
            raise ConfigError(
                f"age-bands={list(self.age_bands)} must be increasing, non-negative upper "
                "edges in years, e.g. [40, 60] for <=40, 41-60, >60"
            )

    def _infer_dataset(self) -> str:
        given = [name for name, key in (("manifest", self.manifest), ("dicom", self.dicom_dir),
                                        ("medmnist", self.data_file)) if key]
        if len(given) != 1:
            raise ConfigError(
                "site config must say where its images are: give exactly one of manifest "
                "(a CSV), dicom-dir (a DICOM folder) or data-file (a MedMNIST .npz), "
                "or dataset: synthetic for a demo site"
            )
        return given[0]

    def _check_source(self) -> None:
        needs = {"manifest": ("manifest",), "dicom": ("dicom-dir", "labels-csv"), "medmnist": ("data-file",)}
        missing = [k for k in needs.get(self.dataset, ()) if not getattr(self, k.replace("-", "_"))]
        if missing:
            raise ConfigError(
                f"site dataset {self.dataset!r} needs {' and '.join(missing)} "
                "(paths relative to data-root)"
            )
        if self.dataset in ("manifest", "dicom") and (
            len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)
        ):
            raise ConfigError(
                f"labels={list(self.labels)}: a {self.dataset} site must declare its label "
                "set, at least two distinct names, in the order the study uses "
                "(e.g. labels: [normal, pneumonia]); every site of a study declares the same list"
            )

    def _check_trusted_apps(self) -> None:
        from medfed.common.hashing import is_sha256_hex

        bad = [h for h in self.trusted_apps if not is_sha256_hex(h)]
        if bad:
            raise ConfigError(
                f"trusted-apps: {bad[0]!r} is not a sha256 hash (64 lowercase hex digits); "
                "print the installed app's hash with `medfed site app-hash`"
            )

    def _check_window(self) -> None:
        if (self.window_center is None) != (self.window_width is None):
            raise ConfigError("window-center and window-width go together: give both or neither")
        if self.window_width is not None and not (
            self.window_width > 0 and math.isfinite(self.window_width)
            and math.isfinite(self.window_center or 0.0)
        ):
            raise ConfigError(f"window-width={self.window_width} must be a positive finite number")

    def _check_fractions(self) -> None:
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
            raise ConfigError(
                f"split-fractions={list(fr)} must be three non-negative numbers "
                "(train, val, test) that sum to 1, with train > 0, e.g. [0.7, 0.15, 0.15]"
            )

    def resolve(self, base: Path) -> SiteConfig:
        """Return a copy whose relative paths are resolved against ``base``."""

        def _abs(p: str) -> str:
            return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

        return dataclasses.replace(
            self,
            data_root=_abs(self.data_root),
            state_dir=_abs(self.state_dir),
            root_cert=_abs(self.root_cert),
            auth_key=_abs(self.auth_key),
        )

    def data_path(self, relative: str) -> Path:
        """A site data path (manifest, DICOM folder, ...) resolved against ``data-root``."""
        p = Path(relative)
        return p if p.is_absolute() else Path(self.data_root) / p

    @property
    def data_file_path(self) -> Path:
        return self.data_path(self.data_file)

    def to_dict(self) -> dict[str, Any]:
        return {kebab(f.name): getattr(self, f.name) for f in fields(self) if f.init}


def parse_site_config(mapping: Mapping[str, Any]) -> SiteConfig:
    """Parse a site mapping (site.yaml or node config)."""
    for required in ("site-id", "data-root", "state-dir"):
        if required not in mapping:
            raise ConfigError(f"site config is missing required key {required!r}")
    return parse_dataclass(SiteConfig, mapping, "site config")


def load_site_config(path: str | Path) -> SiteConfig:
    """Load ``site.yaml``; relative paths are resolved against the file's folder."""
    try:
        cfg = parse_site_config(load_yaml_mapping(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg.resolve(Path(path).resolve().parent)

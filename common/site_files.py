"""Do the files a site's ``site.yaml`` names exist, and can this user read them?

The first check ``medfed site start``, ``medfed site check`` and every training round make
of a site described by ``site.yaml``: before any loader runs, each path the site's data
comes from (``data-root``, ``manifest``, ``dicom-dir``, ``labels-csv``, ``data-file``) is
checked, and a problem is one line naming the site, the ``site.yaml`` key, the file and
the fix. A loader deeper down then never has to guess which key its path came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medfed.common.config import kebab
from medfed.common.errors import ConfigError
from medfed.common.site_config import SiteConfig

# site.yaml keys (SiteConfig field names, kebab-case) and what an operator does when one is wrong
DATA_ROOT = kebab("data_root")
MANIFEST = kebab("manifest")
DICOM_DIR = kebab("dicom_dir")
LABELS_CSV = kebab("labels_csv")
DATA_FILE = kebab("data_file")
SHARD_INDEX = kebab("shard_index")
SHARD_COUNT = kebab("shard_count")

_FIXES = {
    DATA_ROOT: "mount or copy the site's data there, or set data-root to the folder that holds it",
    MANIFEST: "write the manifest CSV (path,label,...) there, or fix manifest (relative to data-root)",
    DICOM_DIR: "point dicom-dir (relative to data-root) at the folder of the site's DICOM files",
    LABELS_CSV: "point labels-csv (relative to data-root) at the CSV that labels the DICOM files",
    DATA_FILE: "copy the MedMNIST .npz there (`medfed data fetch <subset> --dest <folder>`), "
               "or fix data-file (relative to data-root)",
}
_READ_FIX = "let the user that runs medfed read it (owner, group or mode; for a mount, its options)"


class SiteDataError(ConfigError):
    """A site's data, as its ``site.yaml`` describes it, cannot be used (CLI exit 2).

    ``str()`` is ``site <id>: <detail>``; ``detail`` alone serves where the site is named already.
    """

    def __init__(self, site_id: str, detail: str) -> None:
        super().__init__(f"site {site_id}: {detail}")
        self.site_id = site_id
        self.detail = detail


@dataclass(frozen=True)
class SiteDataPath:
    """One path a site's data comes from, and the ``site.yaml`` key that names it."""

    key: str
    path: Path
    folder: bool


def site_data_paths(site: SiteConfig) -> tuple[SiteDataPath, ...]:
    """The paths the site's training data is read from, ``data-root`` first when it is used."""
    sources = {
        "manifest": ((MANIFEST, site.manifest, False),),
        "dicom": ((DICOM_DIR, site.dicom_dir, True), (LABELS_CSV, site.labels_csv, False)),
        "medmnist": ((DATA_FILE, site.data_file, False),),
    }.get(site.dataset, ())  # synthetic: generated, nothing is read
    paths = [SiteDataPath(key, site.data_path(value), folder) for key, value, folder in sources]
    # Images (manifest, DICOM) are always relative to data-root; a MedMNIST file only when its path is.
    if site.dataset in ("manifest", "dicom") or any(not Path(v).is_absolute() for _, v, _ in sources):
        paths.insert(0, SiteDataPath(DATA_ROOT, Path(site.data_root), True))
    return tuple(paths)


def primary_key(site: SiteConfig) -> tuple[str, str]:
    """The ``site.yaml`` key (and its value) that says where the site's examples come from."""
    return {
        "manifest": (MANIFEST, str(site.data_path(site.manifest))),
        "dicom": (DICOM_DIR, str(site.data_path(site.dicom_dir))),
        "medmnist": (DATA_FILE, str(site.data_file_path)),
    }.get(site.dataset, (SHARD_INDEX, f"{site.shard_index} of shard-count {site.shard_count}"))


def loader_problem(site: SiteConfig, exc: Exception) -> str:
    """A loader's reason as one line led by the site.yaml key it concerns (no ``site <id>:`` prefix).

    A config error while a shard is taken concerns ``shard-count``; anything else the key
    that names the site's data (:func:`primary_key`).
    """
    text = " ".join(str(exc).split())
    own = f"site {site.site_id}: "
    text = text.removeprefix(own)
    if isinstance(exc, ConfigError) and site.shard_count > 1:
        return f"{SHARD_COUNT} {site.shard_count} cannot be taken from the site's data: {text}"
    key, where = primary_key(site)
    return f"{key} {text}" if text.startswith(where) else f"{key} {where}: {text}"


def check_site_files(site: SiteConfig, source: str | Path | None = None) -> None:
    """Raise :class:`SiteDataError` at the first data path that is missing, of the wrong kind or unreadable.

    ``source`` is the site.yaml file, named in the fix when given.
    """
    where = str(source) if source else "site.yaml"
    for entry in site_data_paths(site):
        problem, fix = _problem(entry)
        if problem:
            raise SiteDataError(site.site_id, f"{entry.key} {entry.path} {problem}: {fix} (in {where})")


def _problem(entry: SiteDataPath) -> tuple[str, str]:
    """``("", "")`` when ``entry`` is usable, else what is wrong and the fix."""
    path, fix = entry.path, _FIXES[entry.key]
    if not path.exists():
        return "does not exist", fix
    if entry.folder and not path.is_dir():
        return "is not a folder", fix
    if not entry.folder and not path.is_file():
        return "is not a regular file", fix
    try:
        if entry.folder:
            with os.scandir(path) as it:
                next(it, None)
        else:
            with open(path, "rb") as fh:
                fh.read(1)
    except OSError as exc:
        return f"cannot be read by this user ({exc.strerror or type(exc).__name__})", _READ_FIX
    return "", ""

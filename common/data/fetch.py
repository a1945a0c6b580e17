"""Download an official MedMNIST v2 2D file from Zenodo, verified by md5.

URLs and md5 sums are those of ``medmnist.INFO`` (medmnist 3.0.2, Zenodo record
10519652). The file is streamed to a temporary file in ``dest_dir`` and moved into place
with an atomic :func:`os.replace` only after its md5 matched, so an interrupted or corrupt
download never leaves a file behind. Standard library only (``urllib``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from medfed.common.errors import ConfigError, DataError

__all__ = [
    "MEDMNIST_MD5",
    "SIZES",
    "ZENODO_RECORD",
    "fetch_medmnist",
    "file_md5",
    "medmnist_file_name",
    "medmnist_url",
]

logger = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
SIZES = (28, 64, 128, 224)

# (md5 at 28, 64, 128, 224 px) per 2D single-label subset, from medmnist.INFO (v3.0.2).
# ChestMNIST (multi-label) is left out: load_medmnist does not support it.
MEDMNIST_MD5: dict[str, dict[int, str]] = {
    name: dict(zip(SIZES, sums))
    for name, sums in {
        "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
                      "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"),
        "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
                       "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"),
        "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
                     "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"),
        "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
                           "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"),
        "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
                        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"),
        "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
                        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"),
        "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
                       "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"),
        "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
                        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"),
        "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
                        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"),
        "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
                        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"),
        "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
                        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"),
    }.items()
}

_CHUNK = 1 << 20


def medmnist_file_name(name: str, size: int = 28) -> str:
    """``pneumoniamnist.npz`` at 28 px, ``pneumoniamnist_64.npz`` at 64 px, ..."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def medmnist_url(name: str, size: int = 28) -> str:
    """The official Zenodo download URL of a MedMNIST file."""
    return f"{ZENODO_RECORD}/{medmnist_file_name(name, size)}?download=1"


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_medmnist(name: str, dest_dir: Path, size: int = 28, timeout: float = 30) -> Path:
    """Return ``dest_dir/<file>``, downloading and md5-checking it first if it is not there."""
    if name not in MEDMNIST_MD5:
        raise ConfigError(
            f"unknown MedMNIST subset {name!r}: choose one of {', '.join(sorted(MEDMNIST_MD5))}"
        )
    if size not in SIZES:
        raise ConfigError(f"size={size} is not available: MedMNIST files come in {SIZES} px")
    if timeout <= 0:
        raise ConfigError(f"timeout={timeout} is out of range: allowed > 0 seconds")
    dest_dir = Path(dest_dir)
    expected = MEDMNIST_MD5[name][size]
    target = dest_dir / medmnist_file_name(name, size)
    url = medmnist_url(name, size)
    by_hand = (
        f"Download {url} on a machine with internet and copy it by hand into {dest_dir} "
        f"(md5 {expected})"
    )
    if target.exists():
        actual = file_md5(target)
        if actual == expected:
            logger.info("%s already present with the official md5", target)
            return target
        raise DataError(
            f"{target} exists but its md5 is {actual}, not the official {expected}: it is "
            "modified or corrupt. Delete or move it, then fetch again"
        )
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest_dir} ({e}); choose a writable folder") from e
    logger.info("downloading %s to %s", url, target)
    _download(url, target, expected, timeout, by_hand)
    return target


def _download(url: str, target: Path, expected: str, timeout: float, by_hand: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        h.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as e:
                raise DataError(f"zenodo.org answered HTTP {e.code} ({e.reason}) for {url}. "
                                f"{by_hand}") from e
            except urllib.error.URLError as e:
                raise DataError(
                    f"no internet: could not reach zenodo.org ({e.reason}). {by_hand}"
                ) from e
            except TimeoutError as e:
                raise DataError(f"download from zenodo.org timed out after {timeout} s. "
                                f"Retry with a larger timeout, or: {by_hand}") from e
        actual = h.hexdigest()
        if actual != expected:
            raise DataError(
                f"downloaded file has md5 {actual}, not the official {expected}: the download "
                f"was truncated or altered; nothing was kept. Retry, or: {by_hand}"
            )
        os.replace(tmp, target)
    except OSError as e:  # disk full, permission denied, connection reset mid-stream
        raise DataError(f"could not download {url} to {target} ({e}). {by_hand}") from e
    finally:
        tmp.unlink(missing_ok=True)

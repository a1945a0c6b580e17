"""Which Flower app bundles (FABs) a site accepts: the site runs only the medfed it installed.

Flower's default ClientApp process unpacks the FAB the server sends, puts it first on
``sys.path`` and imports the component it names, so whoever can submit a run can run
code at every hospital. medfed's sites never do that (:mod:`medfed.client.app_runner`
imports the installed ``medfed.client.app`` and never the FAB); they still check the
FAB so that an app which expects other code is refused, visibly, instead of being run
with medfed's:

- its ``[tool.flwr.app.components] clientapp`` must be ``medfed.client.app:app``;
- when ``trusted-apps`` in site.yaml lists sha256 hashes, the FAB's hash must be one of
  them (``medfed site app-hash`` prints the hash of the app ``medfed run`` submits);
- otherwise the FAB may hold configuration only (``pyproject.toml``, text, YAML): any
  other file, e.g. a Python module, is refused.

Flower's own ``flower-supernode --trusted-entities`` does not help here: it accepts only
FABs whose verification the SuperLink marks ``valid_license``, which only Flower Hub
apps signed by a publisher get; every FAB submitted with ``flwr run`` to the open-source
SuperLink is refused.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from medfed.common.errors import MedfedError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; tomli comes with flwr
    import tomli as tomllib

TRUSTED_CLIENTAPP = "medfed.client.app:app"
ERROR_CODE_UNTRUSTED_APP = 101  # medfed: the site refuses the app the server sent
CONFIG_FILE = "pyproject.toml"
MANIFEST_FILE = ".info/CONTENT"  # written by Flower's FAB builder
CONFIG_SUFFIXES = frozenset({".toml", ".md", ".txt", ".yaml", ".yml"})
_MAX_CONFIG_BYTES = 1024 * 1024


class UntrustedAppError(MedfedError):
    """The FAB is not one the site runs; the message names its hash and the fix."""


def fab_sha256(content: bytes) -> str:
    """The FAB's sha256, computed here (the hash the server reports is not trusted)."""
    return hashlib.sha256(content).hexdigest()


def _refuse(digest: str, why: str) -> UntrustedAppError:
    return UntrustedAppError(
        f"refused app sha256={digest}: {why}. The site runs only its installed medfed; if this "
        "app is expected, compare it with `medfed site app-hash` and add the hash to trusted-apps "
        "in site.yaml"
    )


def _clientapp(zf: zipfile.ZipFile, digest: str) -> str:
    try:
        info = zf.getinfo(CONFIG_FILE)
    except KeyError:
        raise _refuse(digest, f"it has no {CONFIG_FILE}") from None
    if info.file_size > _MAX_CONFIG_BYTES:
        raise _refuse(digest, f"its {CONFIG_FILE} is larger than 1 MB")
    try:
        config = tomllib.loads(zf.read(info).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _refuse(digest, f"its {CONFIG_FILE} is not valid TOML ({exc})") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return str(components.get("clientapp", "")) if isinstance(components, dict) else ""


def code_files(names: Iterable[str]) -> list[str]:
    """FAB members that are not configuration (anything but ``CONFIG_SUFFIXES`` and the manifest)."""
    return sorted(
        n for n in names
        if not n.endswith("/") and n != MANIFEST_FILE and PurePosixPath(n).suffix not in CONFIG_SUFFIXES
    )


def check_fab(content: bytes, trusted: Iterable[str] = ()) -> str:
    """Return the FAB's sha256 when the site accepts it; raise :class:`UntrustedAppError` otherwise."""
    digest = fab_sha256(content)
    allowed = frozenset(trusted)
    if allowed and digest not in allowed:
        raise _refuse(digest, "its hash is not in the site's trusted-apps")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            clientapp = _clientapp(zf, digest)
            extra = code_files(zf.namelist())
    except zipfile.BadZipFile:
        raise _refuse(digest, "it is not a valid FAB (zip) file") from None
    if clientapp != TRUSTED_CLIENTAPP:
        raise _refuse(digest, f"its clientapp is {clientapp!r}, not {TRUSTED_CLIENTAPP!r}")
    if not allowed and extra:
        shown = ", ".join(extra[:3]) + (" ..." if len(extra) > 3 else "")
        raise _refuse(digest, f"it ships files other than configuration ({shown})")
    return digest


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB ``flwr run`` builds from an app folder (Flower's builder is deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def app_hash(app_dir: str | Path | None = None) -> str:
    """sha256 of the FAB ``medfed run`` submits: the installed medfed app, or the staged ``app_dir``."""
    from medfed.server.submit import default_app, stage_app

    with tempfile.TemporaryDirectory(prefix="medfed-app-") as tmp:
        dest = Path(tmp) / "app"
        staged = stage_app(app_dir, dest) if app_dir else default_app(dest)
        return fab_sha256(build_fab(staged))

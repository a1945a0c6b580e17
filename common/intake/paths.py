"""Keep every read inside the site's data root, symbolic links included.

A manifest row, a segmentation mask or a file found by a folder scan names a file under
``data-root``; :func:`confined` follows symbolic links (``Path.resolve``) and refuses a file
whose real location is outside the resolved data root, so a link planted in the data root
cannot make the site read (and train on) another file of the machine. Links that stay inside
the root are fine. :func:`root_relative` names a file for QC reports and logs: relative to the
data root, never absolute and never the target of a link.

Only :mod:`medfed.common.errors` is imported, so the manifest and scan modules (imported by
``site_config``) can use this without an import cycle.
"""

from __future__ import annotations

from pathlib import Path

from medfed.common.errors import DataError

__all__ = ["LINK_LOOP", "OUTSIDE_DATA_ROOT", "OutsideDataRoot", "confined", "root_relative"]

OUTSIDE_DATA_ROOT = (
    "resolves outside the data root (a symbolic link?): a site reads only files under its "
    "data-root; copy the file into the data root instead of linking to it"
)
LINK_LOOP = (
    "cannot be resolved (a symbolic link loop?): a site reads only files it can place under "
    "its data-root; replace the link with the file"
)


class OutsideDataRoot(DataError):
    """A path whose real location (symbolic links followed) is not, or cannot be shown, inside the data root.

    ``str(e)`` is one line without any path, like
    :class:`~medfed.common.intake.image_types.ReadError`: the caller names the file.
    """


def confined(path: Path, data_root: Path) -> Path:
    """The real location of ``path`` (symbolic links followed) if it lies inside ``data_root``.

    Raises :class:`OutsideDataRoot` otherwise. A path that does not exist is resolved as far
    as it exists (the caller reports it missing). Read the file through the path you were
    given, not the returned one: its name decides the file kind.
    """
    try:
        real = Path(path).resolve()
    except (RuntimeError, OSError):  # a link loop; the message would name absolute paths
        raise OutsideDataRoot(LINK_LOOP) from None
    if not real.is_relative_to(Path(data_root).resolve()):
        raise OutsideDataRoot(OUTSIDE_DATA_ROOT)
    return real


def root_relative(path: Path, data_root: Path) -> str:
    """``path`` as a POSIX path relative to ``data_root`` (lexically: links are not followed).

    For reports and logs. A path not under the data root (not even lexically) is named by
    its file name only, so no absolute path reaches a report.
    """
    path, root = Path(path), Path(data_root)
    for candidate, base in ((path, root), (path.absolute(), root.absolute()),
                            (path.absolute(), root.resolve())):
        try:
            return candidate.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.name

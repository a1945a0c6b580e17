"""Site manifests: the shared row types, and the reader for manifest CSVs.

:func:`read_manifest` reads ``path,label[,patient_id][,split][,attribute...]`` CSVs
(UTF-8 with or without Excel's BOM; comma, or ``;``/tab when the header has no comma)
into a :class:`Manifest`: the usable rows plus every row problem found (one
:class:`RowProblem` per dropped row), so QC can report them all at once instead of
failing on the first. The CSV helpers here (:func:`read_table` and friends) are shared
with :mod:`medfed.common.intake.dicom_scan`, which reads labels CSVs the same way.

Nothing here checks that listed files exist or decodes pixels: QC does that. Paths are
always relative to the site's data root (POSIX separators); a path that is absolute or
leaves the root is rejected, because the data root is the only place a site reads.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.common.errors import DataError

__all__ = [
    "LABEL",
    "PATH",
    "PATIENT_ID",
    "PROBLEM_KINDS",
    "REQUIRED_COLUMNS",
    "SPLIT",
    "SPLIT_NAMES",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "RowProblem",
    "read_manifest",
]

log = logging.getLogger(__name__)

PATH, LABEL, PATIENT_ID, SPLIT = "path", "label", "patient_id", "split"
REQUIRED_COLUMNS = (PATH, LABEL)
SPLIT_NAMES = ("train", "val", "test")

#: Every ``RowProblem.kind`` that :func:`read_manifest` and ``scan_dicom_folder`` produce.
PROBLEM_KINDS = (
    "empty-path",
    "empty-label",
    "empty-key",
    "bad-split",
    "duplicate-row",
    "extra-fields",
    "absolute-path",
    "path-escapes-root",
    "no-label-match",
    "unreadable-header",
    "no-pixel-data",
)

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_MISSING_VALUES = frozenset({"", "na", "n/a", "nan"})
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ManifestError(DataError):
    """A manifest or labels CSV that cannot be used at all (missing, not CSV, no required column)."""


@dataclass(frozen=True)
class RowProblem:
    """Why one CSV row or DICOM file was dropped.

    ``line`` is the 1-based CSV line (header = line 1). For problems found in DICOM files
    it is 0 (the relative path is in ``detail``); problems in a labels CSV row carry
    that CSV's line.
    """

    line: int
    kind: str
    detail: str


@dataclass(frozen=True)
class ManifestRow:
    """One usable image.

    ``line`` is the manifest line; for DICOM scans it is the labels CSV line that gave
    the label. ``attributes`` holds every other column (``""`` = missing).
    """

    line: int
    path: str
    label: str
    patient_id: str = ""
    split: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class Manifest:
    """Usable rows, the attribute columns they carry, and every problem found."""

    rows: tuple[ManifestRow, ...]
    attribute_names: tuple[str, ...]
    problems: tuple[RowProblem, ...]
    source: str
    has_split_column: bool


# ---------------------------------------------------------------------------
# CSV reading shared by manifests and labels CSVs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A CSV read into normalised column names and ``(line, record)`` pairs."""

    name: str
    header: tuple[str, ...]
    records: tuple[tuple[int, dict[str, str]], ...]
    problems: tuple[RowProblem, ...]


def _read_text(csv_path: Path, what: str) -> str:
    """The file's text (BOM removed), or ManifestError saying why it cannot be read."""
    if not csv_path.is_file():
        raise ManifestError(
            f"{what} {csv_path} not found: the file does not exist or is not a regular file; "
            "check the path in the site config"
        )
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{what} {csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as 'CSV UTF-8' (a binary or spreadsheet file is not a CSV)"
        ) from exc
    except OSError as exc:
        raise ManifestError(f"{what} {csv_path} cannot be read ({exc}); check its permissions") from exc
    if "\x00" in text:
        raise ManifestError(
            f"{what} {csv_path} contains NUL bytes, so it is not a text CSV; export it as CSV UTF-8"
        )
    if not text.strip():
        raise ManifestError(f"{what} {csv_path} is empty; it needs a header line and one row per image")
    return text


def _delimiter(text: str) -> str:
    """Comma, unless the header line has none but has ';' or tabs."""
    header_line = text.lstrip("\r\n").split("\n", 1)[0]
    if "," in header_line:
        return ","
    semicolons, tabs = header_line.count(";"), header_line.count("\t")
    if semicolons == 0 and tabs == 0:
        return ","
    return ";" if semicolons >= tabs else "\t"


def _canonical_column(name: str) -> str:
    """Header name stripped and lower-cased; 'PatientID'/'patient id' become 'patient_id'."""
    name = name.strip().lower()
    return PATIENT_ID if compact(name) == "patientid" else name


def compact(name: str) -> str:
    """Lower-case name without spaces, '_' and '-', for spelling-tolerant matching."""
    return re.sub(r"[\s_\-]", "", name.lower())


def _header(fields: list[str], csv_path: Path, what: str) -> tuple[str, ...]:
    """Normalised header; ManifestError on duplicate names."""
    header = tuple(_canonical_column(name) for name in fields)
    named = [name for name in header if name]
    duplicates = sorted({name for name in named if named.count(name) > 1})
    if duplicates:
        raise ManifestError(
            f"{what} {csv_path} has duplicate columns {duplicates} in its header {list(header)} "
            "(names are compared lower-cased); rename or remove the repeats"
        )
    return header


def read_table(csv_path: Path, what: str) -> Table:
    """Read a CSV into a :class:`Table`; rows with surplus fields become problems."""
    text = _read_text(csv_path, what)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
    header: tuple[str, ...] | None = None
    records: list[tuple[int, dict[str, str]]] = []
    problems: list[RowProblem] = []
    previous_end = 0
    try:
        for fields in reader:
            line, previous_end = previous_end + 1, reader.line_num
            if not any(value.strip() for value in fields):
                continue
            if header is None:
                header = _header(fields, csv_path, what)
                continue
            extra = [value for value in fields[len(header):] if value.strip()]
            if extra:
                problems.append(RowProblem(
                    line, "extra-fields",
                    f"line {line} has {len(fields)} fields but the header has {len(header)}; "
                    "quote values that contain the delimiter",
                ))
                continue
            padded = fields + [""] * (len(header) - len(fields))
            records.append((line, {name: padded[i] for i, name in enumerate(header) if name}))
    except csv.Error as exc:
        raise ManifestError(
            f"{what} {csv_path} is not a valid CSV near line {reader.line_num} ({exc}); "
            "check for unbalanced quotes"
        ) from exc
    if header is None:
        raise ManifestError(f"{what} {csv_path} has no header line; add one (e.g. 'path,label')")
    if "" in header:
        log.debug("%s %s: columns without a header name are ignored", what, csv_path.name)
    return Table(csv_path.name, header, tuple(records), tuple(problems))


def require_columns(table: Table, required: Sequence[str], csv_path: Path, what: str) -> None:
    """ManifestError naming the header found and the required columns, if any is missing."""
    missing = [name for name in required if name not in table.header]
    if missing:
        raise ManifestError(
            f"{what} {csv_path} lacks column(s) {missing}: its header is {list(table.header)}, "
            f"and the required columns are {list(required)} (names are case-insensitive); "
            "rename the columns or pass the right file"
        )


def clean(value: str) -> str:
    """Stripped value, with 'NA', 'N/A', 'nan' (any case) meaning missing ('')."""
    value = value.strip()
    return "" if value.lower() in _MISSING_VALUES else value


def normalise_split(value: str) -> str | None:
    """'' or one of SPLIT_NAMES; None when the value is not a known split name."""
    value = value.strip().lower()
    if not value:
        return ""
    return _SPLIT_ALIASES.get(value)


def bad_split(line: int, value: str) -> RowProblem:
    return RowProblem(
        line, "bad-split",
        f"line {line} has split '{value.strip()}', which is not one of {list(SPLIT_NAMES)}; "
        "fix it or leave it empty to have a split assigned",
    )


def _relative_path(raw: str, line: int) -> str | RowProblem:
    """Normalised POSIX path relative to the data root, or the problem with it."""
    text = raw.strip().replace("\\", "/")
    if not text:
        return RowProblem(line, "empty-path", f"line {line} has an empty path; fill it in or delete the row")
    if text.startswith("/") or _DRIVE_RE.match(text) or _URL_RE.match(text):
        return RowProblem(
            line, "absolute-path",
            f"line {line} path '{raw.strip()}' is absolute; write it relative to the site's data root",
        )
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            return RowProblem(
                line, "path-escapes-root",
                f"line {line} path '{raw.strip()}' leaves the data root through '..'; "
                "only files under the data root are read, so move the file there",
            )
    if not parts:
        return RowProblem(
            line, "empty-path", f"line {line} path '{raw.strip()}' names the data root itself, not a file"
        )
    return "/".join(parts)


def log_summary(manifest: Manifest) -> None:
    log.info(
        "%s: %d usable rows, %d problems", manifest.source, len(manifest.rows), len(manifest.problems)
    )
    for problem in manifest.problems:
        log.debug("%s: %s (%s)", manifest.source, problem.kind, problem.detail)


# ---------------------------------------------------------------------------
# Manifest CSV
# ---------------------------------------------------------------------------


def _manifest_row(
    line: int, record: dict[str, str], attribute_names: Sequence[str]
) -> ManifestRow | RowProblem:
    """One manifest record as a row, or the first problem that makes it unusable."""
    path = _relative_path(record[PATH], line)
    if isinstance(path, RowProblem):
        return path
    label = clean(record[LABEL])
    if not label:
        return RowProblem(
            line, "empty-label",
            f"line {line} ({path}) has no label (value '{record[LABEL].strip()}'); "
            "fill it in or delete the row",
        )
    split = normalise_split(record.get(SPLIT, ""))
    if split is None:
        return bad_split(line, record[SPLIT])
    return ManifestRow(
        line=line,
        path=path,
        label=label,
        patient_id=clean(record.get(PATIENT_ID, "")),
        split=split,
        attributes={name: clean(record[name]) for name in attribute_names},
    )


def _row_key(row: ManifestRow) -> tuple[Any, ...]:
    return (row.path, row.label, row.patient_id, row.split, tuple(sorted(row.attributes.items())))


def read_manifest(csv_path: Path, data_root: Path) -> Manifest:
    """Read a manifest CSV whose paths are relative to ``data_root``.

    Raises :class:`ManifestError` when the file is missing, not a text CSV, or lacks
    the ``path``/``label`` columns. Unusable rows are dropped and listed in
    ``problems``; file existence is not checked (QC does that).
    """
    csv_path = Path(csv_path)
    table = read_table(csv_path, "manifest")
    require_columns(table, REQUIRED_COLUMNS, csv_path, "manifest")
    reserved = {PATH, LABEL, PATIENT_ID, SPLIT}
    attribute_names = tuple(name for name in table.header if name and name not in reserved)
    rows: list[ManifestRow] = []
    problems = list(table.problems)
    first_line: dict[tuple[Any, ...], int] = {}
    for line, record in table.records:
        result = _manifest_row(line, record, attribute_names)
        if isinstance(result, RowProblem):
            problems.append(result)
            continue
        key = _row_key(result)
        if key in first_line:
            problems.append(RowProblem(
                line, "duplicate-row",
                f"line {line} repeats line {first_line[key]} exactly; the copy is ignored (delete it)",
            ))
            continue
        first_line[key] = line
        rows.append(result)
    problems.sort(key=lambda problem: problem.line)
    manifest = Manifest(
        rows=tuple(rows),
        attribute_names=attribute_names,
        problems=tuple(problems),
        source=f"manifest {csv_path.name}",
        has_split_column=SPLIT in table.header,
    )
    log.debug("manifest %s read against data root %s", csv_path, data_root)
    log_summary(manifest)
    return manifest

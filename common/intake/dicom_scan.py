"""DICOM folder scans: the images under a folder, labelled from a labels CSV.

:func:`scan_dicom_folder` walks a folder of DICOM files, reads each header (never the
pixels) and takes labels from a CSV keyed by SOPInstanceUID, AccessionNumber or
PatientID. Demographic attributes come from the tags unless the CSV has that column.
It returns a :class:`~medfed.common.intake.manifest.Manifest` whose ``problems`` list
every skipped file and dropped labels row.

Nothing here decodes pixels: QC does that. The folder must be inside the site's data
root, and links that leave the root are skipped (both checked with
:func:`~medfed.common.intake.paths.confined`). pydicom is imported lazily so that
importing this module stays fast.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.common.errors import ConfigError
from medfed.common.intake.ages import parse_age_years
from medfed.common.intake.manifest import (
    PATH,
    PATIENT_ID,
    SPLIT,
    Manifest,
    ManifestError,
    ManifestRow,
    RowProblem,
    Table,
    bad_split,
    clean,
    compact,
    log_summary,
    normalise_split,
    read_table,
    require_columns,
)
from medfed.common.intake.paths import OutsideDataRoot, confined, root_relative

__all__ = ["DEFAULT_ATTRIBUTE_TAGS", "JOIN_KEYS", "scan_dicom_folder"]

log = logging.getLogger(__name__)

JOIN_KEYS = {
    "sop-instance-uid": "SOPInstanceUID",
    "accession-number": "AccessionNumber",
    "patient-id": "PatientID",
}
DEFAULT_ATTRIBUTE_TAGS = ("PatientSex", "PatientAge", "Manufacturer", "Modality")
_SEX_CODES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_TAG_ATTRIBUTE_NAMES = {"PatientSex": "sex", "PatientAge": "age"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class _LabelRow:
    line: int
    label: str
    patient_id: str
    split: str
    attributes: dict[str, str]


@dataclass(frozen=True)
class _Labels:
    """A labels CSV indexed by join value."""

    by_key: dict[str, list[_LabelRow]]
    attribute_names: tuple[str, ...]
    has_split_column: bool
    problems: tuple[RowProblem, ...]


def _join_tag(join_key: str) -> str:
    """DICOM keyword for a join key; ConfigError listing the allowed keys."""
    if join_key not in JOIN_KEYS:
        raise ConfigError(
            f"unknown DICOM join key '{join_key}': labels can be joined on {sorted(JOIN_KEYS)}; "
            "pick one of those"
        )
    return JOIN_KEYS[join_key]


def _snake_case(keyword: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", keyword).lower()


def _tag_attributes(attribute_tags: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``(keyword, attribute name)`` pairs; ConfigError for keywords pydicom does not know."""
    from pydicom.datadict import tag_for_keyword

    unknown = [keyword for keyword in attribute_tags if tag_for_keyword(keyword) is None]
    if unknown:
        raise ConfigError(
            f"unknown DICOM attribute tag keyword(s) {unknown}: use standard keywords such as "
            f"{list(DEFAULT_ATTRIBUTE_TAGS)} (spelled as in the DICOM dictionary)"
        )
    return tuple(
        (keyword, _TAG_ATTRIBUTE_NAMES.get(keyword, _snake_case(keyword))) for keyword in attribute_tags
    )


def _join_column(table: Table, tag: str, csv_path: Path) -> str:
    """The labels CSV column holding the join values (spelling-tolerant)."""
    for name in table.header:
        if name and compact(name) == tag.lower():
            return name
    raise ManifestError(
        f"labels CSV {csv_path} has no {tag} column to join on: its header is {list(table.header)}; "
        f"name the column '{_snake_case(tag)}' or '{tag}', or choose another join key"
    )


def _label_row(
    line: int, record: dict[str, str], join_column: str, label_column: str, attribute_names: Sequence[str]
) -> tuple[str, _LabelRow] | RowProblem:
    """One labels CSV record keyed by its join value, or its problem."""
    key = record[join_column].strip()
    if not key:
        return RowProblem(
            line, "empty-key",
            f"labels line {line} has an empty '{join_column}'; fill it in or delete the row",
        )
    label = clean(record[label_column])
    if not label:
        return RowProblem(
            line, "empty-label", f"labels line {line} ({key}) has no label; fill it in or delete the row"
        )
    split = normalise_split(record.get(SPLIT, ""))
    if split is None:
        return bad_split(line, record[SPLIT])
    patient_id = key if join_column == PATIENT_ID else clean(record.get(PATIENT_ID, ""))
    attributes = {name: clean(record[name]) for name in attribute_names}
    return key, _LabelRow(line, label, patient_id, split, attributes)


def _read_labels(csv_path: Path, tag: str, label_column: str) -> _Labels:
    """Read and index a labels CSV for a DICOM folder."""
    table = read_table(csv_path, "labels CSV")
    join_column = _join_column(table, tag, csv_path)
    label_column = label_column.strip().lower()
    require_columns(table, (join_column, label_column), csv_path, "labels CSV")
    reserved = {join_column, label_column, SPLIT, PATIENT_ID, PATH}
    attribute_names = tuple(name for name in table.header if name and name not in reserved)
    by_key: dict[str, list[_LabelRow]] = {}
    problems = list(table.problems)
    first_line: dict[tuple[Any, ...], int] = {}
    for line, record in table.records:
        result = _label_row(line, record, join_column, label_column, attribute_names)
        if isinstance(result, RowProblem):
            problems.append(result)
            continue
        key, row = result
        identity = (key, row.label, row.patient_id, row.split, tuple(sorted(row.attributes.items())))
        if identity in first_line:
            problems.append(RowProblem(
                line, "duplicate-row",
                f"labels line {line} repeats line {first_line[identity]} exactly; "
                "the copy is ignored (delete it)",
            ))
            continue
        first_line[identity] = line
        by_key.setdefault(key, []).append(row)
    return _Labels(by_key, attribute_names, SPLIT in table.header, tuple(problems))


def _dicom_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` in sorted order, without hidden entries and DICOMDIR."""
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(directory) / name


def _unreadable(rel: str, reason: str) -> RowProblem:
    return RowProblem(
        0, "unreadable-header",
        f"{rel}: DICOM header cannot be read ({reason}); re-export the file or remove it from the folder",
    )


def _truncation(ds: Any, size: int) -> str | None:
    """Why the parsed header looks cut short, or None."""
    if len(ds) == 0:
        return "no data set after the file meta header; the file is probably truncated"
    last = ds.get_item(max(ds.keys()))
    value_tell = getattr(last, "value_tell", None)
    if value_tell is None or last.length == _UNDEFINED_LENGTH:
        return None
    if value_tell + last.length > size:
        needed = value_tell + last.length
        return f"file is truncated: element {last.tag} needs {needed} bytes, the file has {size}"
    return None


def _tag_text(ds: Any, keyword: str) -> str:
    """A tag's value as stripped text ('' when absent or malformed)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value in an untrusted file means 'unknown'
        return ""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "\\".join(str(item).strip() for item in value)
    return str(value).strip()


def _read_header(path: Path, rel: str, keywords: Sequence[str]) -> dict[str, str] | RowProblem:
    """The requested tag values of one file, or why the file is skipped.

    pydicom's warnings about odd values are logged at debug level, not shown to users.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _parse_header(path, rel, keywords)
    for warning in caught:
        log.debug("%s: pydicom warning: %s", rel, warning.message)
    return result


def _parse_header(path: Path, rel: str, keywords: Sequence[str]) -> dict[str, str] | RowProblem:
    """Read the header (pixel data deferred, never loaded) and check it is a complete image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
        size = path.stat().st_size
    except InvalidDicomError:
        return _unreadable(rel, "not a DICOM file: no 'DICM' marker after the 128-byte preamble")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed files
        return _unreadable(rel, f"{type(exc).__name__}: {exc}")
    reason = _truncation(ds, size)
    if reason:
        return _unreadable(rel, reason)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return RowProblem(
            0, "no-pixel-data",
            f"{rel}: DICOM file has no pixel data (not an image, e.g. a report or presentation state); "
            "remove it from the image folder",
        )
    return {keyword: _tag_text(ds, keyword) for keyword in keywords}


def _normalise_sex(value: str) -> str:
    return _SEX_CODES.get(value.strip().upper(), "")


def _format_years(years: float | None) -> str:
    """Age in years as text: integers plain ('45'), else up to 2 decimals ('0.5')."""
    if years is None:
        return ""
    text = f"{round(years, 2):.2f}".rstrip("0").rstrip(".")
    return text or "0"


def _tag_attribute_value(keyword: str, value: str) -> str:
    if keyword == "PatientSex":
        return _normalise_sex(value)
    if keyword == "PatientAge":
        return _format_years(parse_age_years(value))
    return value


def _no_match(rel: str, tag: str, value: str, labels: _Labels, csv_name: str) -> RowProblem:
    if not value:
        detail = (
            f"{rel}: has no {tag} tag, so it cannot be joined to labels CSV {csv_name}; "
            "use another join key"
        )
    else:
        detail = (
            f"{rel}: {tag} '{value}' is not in labels CSV {csv_name}; "
            "add a row for it or remove the file"
        )
        stripped = value.lstrip("0")
        if stripped != value and stripped in labels.by_key:
            detail += " (the CSV has it without leading zeros: re-save the CSV keeping the column as text)"
    return RowProblem(0, "no-label-match", detail)


def _dicom_rows(
    rel: str, values: dict[str, str], matches: list[_LabelRow], tag_attributes: Sequence[tuple[str, str]]
) -> list[ManifestRow]:
    """One row per matching labels CSV row (several rows with different labels = a QC conflict)."""
    rows = []
    for match in matches:
        attributes = dict(match.attributes)
        for keyword, name in tag_attributes:
            if name not in attributes:
                attributes[name] = _tag_attribute_value(keyword, values[keyword])
        rows.append(ManifestRow(
            line=match.line,
            path=rel,
            label=match.label,
            patient_id=match.patient_id or values["PatientID"],
            split=match.split,
            attributes=attributes,
            sop_instance_uid=values["SOPInstanceUID"],
        ))
    return rows


def _folder_inside_root(folder: Path, data_root: Path) -> tuple[Path, str]:
    """Resolved folder and its POSIX path relative to the data root."""
    if not folder.is_dir():
        raise ManifestError(
            f"DICOM folder {folder} not found or not a folder; check the path in the site config"
        )
    try:
        resolved = confined(folder, data_root)
    except OutsideDataRoot:
        raise ManifestError(
            f"DICOM folder {folder} is not inside the data root {Path(data_root).resolve()}: a site reads "
            "only its data root; move the folder there or change the data root"
        ) from None
    return resolved, root_relative(resolved, Path(data_root).resolve())


def _scan_file(
    path: Path, root: Path, rel: str, tag: str, keywords: Sequence[str]
) -> tuple[str, dict[str, str]] | RowProblem:
    """Header values of one file with its join value, or why it is skipped."""
    try:
        confined(path, root)
    except OutsideDataRoot as exc:
        return RowProblem(0, "path-escapes-root", f"{rel}: {exc}")
    if not path.is_file():
        return _unreadable(rel, "not a regular file (a broken link, a device or a pipe)")
    values = _read_header(path, rel, keywords)
    if isinstance(values, RowProblem):
        return values
    return values[tag], values


def scan_dicom_folder(
    folder: Path,
    data_root: Path,
    labels_csv: Path | None,
    join_key: str = "sop-instance-uid",
    label_column: str = "label",
    attribute_tags: Sequence[str] = DEFAULT_ATTRIBUTE_TAGS,
) -> Manifest:
    """Manifest of every DICOM image under ``folder``, labelled from ``labels_csv``.

    Files are visited in sorted order (hidden files and DICOMDIR skipped); only headers
    are read. Files that are not readable DICOM, have no pixel data, or whose join value
    is not in the labels CSV are skipped and listed in ``problems``. Labels CSV columns
    named like an attribute override the tag-derived value for every row.
    """
    tag = _join_tag(join_key)
    tag_attributes = _tag_attributes(attribute_tags)
    if labels_csv is None:
        raise ManifestError(
            f"a DICOM folder needs a labels CSV: DICOM headers carry no training labels; "
            f"pass labels-csv with a {tag} column ('{_snake_case(tag)}') and a '{label_column}' column"
        )
    resolved, folder_rel = _folder_inside_root(Path(folder), data_root)
    root = Path(data_root).resolve()
    labels = _read_labels(Path(labels_csv), tag, label_column)
    keywords = tuple(dict.fromkeys((tag, "PatientID", "SOPInstanceUID", *(k for k, _ in tag_attributes))))
    rows: list[ManifestRow] = []
    problems = list(labels.problems)
    used: set[str] = set()
    for path in _dicom_files(resolved):
        rel = root_relative(path, root)
        scanned = _scan_file(path, root, rel, tag, keywords)
        if isinstance(scanned, RowProblem):
            problems.append(scanned)
            continue
        value, values = scanned
        matches = labels.by_key.get(value) if value else None
        if not matches:
            problems.append(_no_match(rel, tag, value, labels, Path(labels_csv).name))
            continue
        used.add(value)
        rows.extend(_dicom_rows(rel, values, matches, tag_attributes))
    unused = len(labels.by_key) - len(used)
    if unused:
        log.info(
            "labels CSV %s: %d %s values match no file in the folder", Path(labels_csv).name, unused, tag
        )
    csv_names = set(labels.attribute_names)
    tag_names = tuple(name for _, name in tag_attributes if name not in csv_names)
    manifest = Manifest(
        rows=tuple(rows),
        attribute_names=labels.attribute_names + tag_names,
        problems=tuple(problems),
        source=f"DICOM folder {'' if folder_rel == '.' else folder_rel}/ joined on {tag}",
        has_split_column=labels.has_split_column,
    )
    log_summary(manifest)
    return manifest

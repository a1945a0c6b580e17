"""``medfed site check``: read every image once and report what training will use.

The report is plain JSON-able data (counts, distributions, and one entry per problem
with the file's path relative to the data root) plus :func:`format_qc`, a readable
table. It is written at the site for the site's staff; it is never sent anywhere.
Files the site *refuses* to read (``problems.refused``: a link out of the data root, or a
header declaring more than ``max-image-pixels``) are listed apart from unreadable ones.
Problems are *fatal* when training cannot start (no usable image, no label column, no
training image) and *warnings* otherwise. Reading goes through the same code and the same
preprocessing cache as training, so a check also warms the cache for the first round.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from medfed.common.intake.manifest import ManifestError
from medfed.common.intake.patient_split import patients_in_several_splits
from medfed.common.intake.site_dataset import duplicate_reason
from medfed.common.intake.site_images import (
    MISSING_FILE,
    REFUSALS,
    ImageRecord,
    read_site,
)
from medfed.common.site_config import SiteConfig


@dataclass
class QCReport:
    """The result of a site check; :meth:`to_dict` is the JSON report."""

    site_id: str
    source: str = ""
    rows: int = 0
    usable: int = 0
    counts: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, Any] = field(default_factory=dict)
    fatal: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rows_kind: str = "manifest rows"  # what ``rows`` counts (array sites: examples in the file)

    @property
    def ok(self) -> bool:
        return not self.fatal

    def to_dict(self) -> dict[str, Any]:
        return {
            "site-id": self.site_id, "source": self.source, "rows": self.rows,
            "usable": self.usable, "counts": self.counts, "images": self.images,
            "problems": self.problems, "fatal": self.fatal, "warnings": self.warnings,
            "ok": self.ok, "seconds": round(self.seconds, 2),
        }


def check_site(site: SiteConfig) -> QCReport:
    """Read the site's data once (read-only) and collect every problem; never raises on data."""
    t0 = time.perf_counter()
    report = QCReport(site.site_id)
    try:
        read = read_site(site)
    except ManifestError as exc:
        report.fatal.append(f"manifest unusable: {exc}")
        return report
    manifest, splits = read.manifest, read.splits
    report.source, report.rows = manifest.source, len(manifest.rows)
    usable = _classify(site, list(read.records), report)
    report.usable = len(usable)
    report.counts = _counts(usable, manifest.attribute_names)
    report.images = _image_stats(usable)
    report.problems["manifest"] = [
        {"line": p.line, "kind": p.kind, "detail": p.detail} for p in manifest.problems
    ]
    leaks = patients_in_several_splits(manifest.rows, splits)
    report.problems["patients-in-several-splits"] = [
        {"patient_id": pid, "splits": list(s)} for pid, s in sorted(leaks.items())
    ]
    report.problems["missing-attributes"] = {
        a: sum(1 for r in usable if not r.row.attributes.get(a, "")) for a in manifest.attribute_names
    }
    report.problems["missing-attributes"] = {k: v for k, v in report.problems["missing-attributes"].items() if v}
    _judge(site, report, manifest.attribute_names)
    report.seconds = time.perf_counter() - t0
    return report


def _classify(site: SiteConfig, records: list[ImageRecord], report: QCReport) -> list[ImageRecord]:
    """Sort records into usable ones and problem lists (the training policy, itemised)."""
    missing, unreadable, refused, outside = [], [], [], Counter()
    dup_groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    labels_by_path: dict[str, set[str]] = defaultdict(set)
    seen_uids: set[str] = set()
    seen_pixels: set[str] = set()
    first_path: dict[tuple[str, str], str] = {}
    usable = []
    for rec in records:
        labels_by_path[rec.row.path].add(rec.row.label)
        if rec.error:
            code, _, reason = rec.error.partition(": ")
            entry = {"line": rec.row.line, "path": rec.row.path, "reason": reason}
            if code in REFUSALS:
                refused.append({**entry, "kind": code})
            else:
                (missing if code == MISSING_FILE else unreadable).append(entry)
            continue
        if rec.row.label not in site.labels:
            outside[rec.row.label] += 1
            continue
        for kind, value in (("sop-instance-uid", rec.info.get("sop-instance-uid", "")),
                            ("pixels", rec.info.get("pixel-sha256", ""))):
            if value:
                first_path.setdefault((kind, value), rec.row.path)
        if reason := duplicate_reason(rec, seen_uids, seen_pixels):
            kind = "sop-instance-uid" if reason.endswith("uid") else "pixels"
            value = rec.info["sop-instance-uid"] if kind == "sop-instance-uid" else rec.info["pixel-sha256"]
            key = (kind, value)
            if not dup_groups[key]:
                dup_groups[key].append(first_path[key])
            dup_groups[key].append(rec.row.path)
            continue
        usable.append(rec)
    report.problems["missing-files"] = missing
    report.problems["unreadable"] = unreadable
    report.problems["refused"] = refused
    report.problems["labels-outside-set"] = dict(outside)
    report.problems["duplicates"] = [
        {"kind": kind, "kept": paths[0], "skipped": paths[1:]} for (kind, _), paths in dup_groups.items()
    ]
    report.problems["label-conflicts"] = [
        {"path": p, "labels": sorted(ls)} for p, ls in labels_by_path.items() if len(ls) > 1
    ]
    return usable


def _counts(usable: list[ImageRecord], attribute_names: tuple[str, ...]) -> dict[str, Any]:
    split_label: dict[str, Counter] = defaultdict(Counter)
    attrs: dict[str, Counter] = {a: Counter() for a in attribute_names}
    for r in usable:
        split_label[r.split][r.row.label] += 1
        for a in attribute_names:
            attrs[a][r.row.attributes.get(a, "") or "(missing)"] += 1
    return {
        "split": {s: sum(c.values()) for s, c in sorted(split_label.items())},
        "label": dict(sum(split_label.values(), Counter())),
        "split-label": {s: dict(c) for s, c in sorted(split_label.items())},
        "attributes": {a: dict(c.most_common()) for a, c in attrs.items()},
        "patients": len({r.row.patient_id for r in usable if r.row.patient_id}),
    }


def _image_stats(usable: list[ImageRecord]) -> dict[str, Any]:
    def dist(fn) -> dict[str, int]:
        return dict(Counter(fn(r.info) for r in usable).most_common())

    return {
        "kind": dist(lambda i: i.get("kind", "?")),
        "modality": dist(lambda i: i.get("modality") or "(none)"),
        "size": dist(lambda i: "x".join(str(v) for v in i.get("shape", []))),
        "spacing-mm": dist(lambda i: "x".join(f"{v:g}" for v in i["spacing"]) if i.get("spacing") else "(unknown)"),
        "frames": dist(lambda i: str(i.get("num-frames", 1))),
    }


def _judge(site: SiteConfig, report: QCReport, attribute_names: tuple[str, ...]) -> None:
    p = report.problems
    if report.usable == 0:
        report.fatal.append(
            f"no usable image among {report.rows} manifest rows: see missing-files, unreadable, "
            "refused and labels-outside-set"
        )
    elif not report.counts["split"].get("train"):
        report.fatal.append("no usable training image: check the split column or split-fractions")
    for key, what in (("manifest", "manifest rows dropped"), ("missing-files", "rows point at missing files"),
                      ("unreadable", "files unreadable"), ("refused", "files refused (not read)"),
                      ("duplicates", "duplicated images skipped"),
                      ("label-conflicts", "paths with conflicting labels"),
                      ("patients-in-several-splits", "patients in more than one split")):
        if p[key]:
            report.warnings.append(f"{len(p[key])} {what} (problems.{key})")
    if p["labels-outside-set"]:
        report.warnings.append(
            f"labels outside the declared set {list(site.labels)}: {p['labels-outside-set']} (rows skipped)"
        )
    for label in site.labels:
        if report.usable and not report.counts["split-label"].get("train", {}).get(label):
            report.warnings.append(f"declared label {label!r} has no training image at this site")
    for attr, n in p["missing-attributes"].items():
        report.warnings.append(f"attribute {attr!r} missing for {n} of {report.usable} usable images")
    if site.group_attribute and site.group_attribute not in attribute_names:
        report.warnings.append(
            f"group-attribute {site.group_attribute!r} is not a manifest column or DICOM attribute "
            f"(have: {', '.join(attribute_names) or 'none'})"
        )


def format_qc(report: QCReport) -> str:
    """A readable summary table of :class:`QCReport` for the terminal."""
    lines = [f"site {report.site_id}: {report.source}",
             f"  {report.rows_kind} {report.rows}, usable images {report.usable} ({report.seconds:.1f} s)"]
    c = report.counts
    if c:
        labels = sorted(c["label"])
        lines.append("  " + _row(["split", *labels, "total"]))
        for split, per in c["split-label"].items():
            lines.append("  " + _row([split, *(per.get(lb, 0) for lb in labels), sum(per.values())]))
        for attr, values in c["attributes"].items():
            lines.append(f"  {attr}: " + ", ".join(f"{v} {n}" for v, n in values.items()))
    for key, dist in report.images.items():
        shown = list(dist.items())[:6]
        more = f", ... ({len(dist) - 6} more)" if len(dist) > 6 else ""
        lines.append(f"  {key}: " + ", ".join(f"{v} ({n})" for v, n in shown) + more)
    for entry in report.problems.get("unreadable", [])[:20]:
        lines.append(f"  unreadable: {entry['path']}: {entry['reason']}")
    for entry in report.problems.get("refused", [])[:20]:
        lines.append(f"  refused: {entry['path']}: {entry['reason']}")
    for entry in report.problems.get("missing-files", [])[:20]:
        lines.append(f"  missing file: {entry['path']} (line {entry['line']})")
    lines += [f"  WARNING {w}" for w in report.warnings]
    lines += [f"  FATAL {f}" for f in report.fatal]
    lines.append("  result: " + ("OK" if report.ok else "FAILED (training would not start)"))
    return "\n".join(lines)


def _row(cells: list[Any]) -> str:
    return "".join(f"{c!s:>12}" for c in cells)


"""``medfed site check``: the QC a site administrator runs before the site trains.

Every kind of site medfed trains on is checked: manifest and DICOM-folder sites
(:mod:`medfed.common.intake.qc`), segmentation sites (:mod:`medfed.common.segmentation.qc`),
MedMNIST files and synthetic demo shards (:mod:`medfed.client.array_qc`), each after the
files site.yaml names (:mod:`medfed.common.site_files`). It reads every image once through
the training readers (warming the preprocessing cache), prints a table, writes the JSON
report into the site's state directory (or ``--report FILE``) and exits non-zero when
training could not start.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from medfed.common.errors import MedfedError
from medfed.common.logs import emit

log = logging.getLogger(__name__)

REPORT_NAME = "qc-report.json"


def add_check_arguments(subparsers: Any) -> None:
    """``medfed site check`` on the ``site`` command's subparsers."""
    p = subparsers.add_parser(
        "check", help="read every image once and report what training will use (QC)",
        description="Check a site's data before it trains (manifest, DICOM folder, segmentation, MedMNIST "
        ".npz or synthetic shard): counts per split, label and attribute group; sizes, spacing and "
        "modalities; missing and unreadable files, duplicates, patients in several splits, labels "
        "outside the declared set, missing attributes.",
    )
    p.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    p.add_argument("--report", type=Path, default=None,
                   help=f"where to write the JSON report (default <state-dir>/{REPORT_NAME})")
    p.set_defaults(func=cmd_site_check)


def cmd_site_check(args: argparse.Namespace) -> int:
    from medfed.common.site_config import load_site_config

    site = load_site_config(args.config)
    return _finish(site, check_any_site(site, args.config), args.report)


def check_any_site(site: Any, source: Path | None = None) -> Any:
    """The QC report of any site medfed trains on: its files first, then its own kind of check."""
    from medfed.common.intake.qc import QCReport
    from medfed.common.site_files import SiteDataError, check_site_files

    if site.task != "segmentation" and site.dataset in ("medmnist", "synthetic"):
        from medfed.client.array_qc import check_array_site

        return check_array_site(site, source)  # checks the files itself
    try:
        check_site_files(site, source)
    except SiteDataError as exc:
        return QCReport(site.site_id, source=f"{site.dataset} site", fatal=[exc.detail])
    if site.task == "segmentation":
        from medfed.common.segmentation.qc import check_seg_site

        return check_seg_site(site)
    from medfed.common.intake.qc import check_site

    return check_site(site)


def _finish(site: Any, report: Any, report_path: Path | None) -> int:
    from medfed.common.intake.qc import format_qc

    out = report_path or Path(site.state_dir) / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    tmp.replace(out)
    emit(format_qc(report))
    emit(f"report: {out}")
    if not report.ok:
        raise MedfedError(f"site check failed for {site.site_id}: {'; '.join(report.fatal)}")
    return 0

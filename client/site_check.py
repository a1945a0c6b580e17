"""``medfed site check``: the QC a site administrator runs before the site trains.

It reads every image once through the training readers (warming the preprocessing
cache), prints a table, writes the JSON report into the site's state directory (or
``--report FILE``) and exits non-zero when training could not start.
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
        description="Check a site's data before it trains: counts per split, label and attribute "
        "group; sizes, spacing and modalities; unreadable and missing files, duplicates, patients "
        "in several splits, labels outside the declared set, missing attributes.",
    )
    p.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
    p.add_argument("--report", type=Path, default=None,
                   help=f"where to write the JSON report (default <state-dir>/{REPORT_NAME})")
    p.set_defaults(func=cmd_site_check)


def cmd_site_check(args: argparse.Namespace) -> int:
    from medfed.common.site_config import load_site_config

    site = load_site_config(args.config)
    if site.task == "segmentation":
        from medfed.common.segmentation.qc import check_seg_site

        return _finish(site, check_seg_site(site), args.report)
    if site.dataset not in ("manifest", "dicom"):
        raise MedfedError(
            f"site {site.site_id} uses dataset {site.dataset!r}, which has no per-file intake to "
            "check: site check is for manifest and DICOM-folder sites"
        )
    from medfed.common.intake.qc import check_site

    return _finish(site, check_site(site), args.report)


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

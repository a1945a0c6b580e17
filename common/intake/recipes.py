"""Ready-made site descriptions for public datasets, and splitting one manifest into sites.

``medfed data covid-sites`` turns the COVID-19 chest X-ray collection (its
``metadata.csv`` with sex and age per image) into one manifest per simulated site, split
by patient so that no patient is at two sites, plus a ``site.yaml`` per site that points
at the images where they are (nothing is copied). The same splitter works for any
manifest with a ``patient_id`` column.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from medfed.common.errors import DataError

log = logging.getLogger(__name__)

COVID_LABELS = ("other", "covid")
COVID_UNLABELLED = "unlabelled"  # upstream 'todo': outside the declared set, so QC lists it and training skips it
COVID_AGE_BANDS = (40, 60)


def covid_chestxray_rows(folder: Path) -> list[dict[str, str]]:
    """Manifest rows (path, label, patient_id, sex, age, view) for the images present in ``folder``."""
    meta = folder / "subset_metadata.csv"
    if not meta.is_file():
        meta = folder / "metadata.csv"
    if not meta.is_file():
        raise DataError(
            f"{folder} has no metadata.csv: point --data at the covid-chestxray-dataset folder "
            "(metadata.csv and images/)"
        )
    rows = []
    with meta.open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            rel = f"{rec.get('folder') or 'images'}/{rec['filename']}"
            if not (folder / rel).is_file() or rec.get("modality", "X-ray") != "X-ray":
                continue
            finding = rec.get("finding", "")
            label = COVID_UNLABELLED if finding == "todo" else ("covid" if "COVID-19" in finding else "other")
            rows.append({
                "path": rel, "label": label, "patient_id": rec["patientid"],
                "sex": rec.get("sex", ""), "age": rec.get("age", ""), "view": rec.get("view", ""),
            })
    if not rows:
        raise DataError(f"no image listed in {meta} exists under {folder}")
    return rows


def split_by_patient(rows: Sequence[dict[str, str]], num_sites: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Seeded split of rows into ``num_sites`` sites, whole patients only, sizes balanced."""
    by_patient: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_patient[r.get("patient_id") or r["path"]].append(r)
    if num_sites < 1 or num_sites > len(by_patient):
        raise DataError(f"cannot split {len(by_patient)} patients into {num_sites} sites")
    patients = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(patients))
    sites: list[list[dict[str, str]]] = [[] for _ in range(num_sites)]
    for i in order:  # each patient goes to the currently smallest site
        smallest = min(range(num_sites), key=lambda k: (len(sites[k]), k))
        sites[smallest].extend(by_patient[patients[i]])
    return sites


def write_site(out_dir: Path, site_id: str, rows: Sequence[dict[str, str]], data_root: Path,
               labels: Sequence[str], extra: dict[str, object] | None = None) -> Path:
    """Write ``out_dir/site_id/{manifest.csv,site.yaml}``; returns the site.yaml path."""
    import yaml

    site_dir = out_dir / site_id
    site_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with (site_dir / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    config = {
        "site-id": site_id,
        "data-root": str(data_root.resolve()),
        "manifest": str((site_dir / "manifest.csv").resolve()),
        "labels": list(labels),
        "state-dir": "state",
        **(extra or {}),
    }
    path = site_dir / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def covid_sites(folder: Path, out_dir: Path, num_sites: int, seed: int = 0) -> list[Path]:
    """Site folders for the COVID-19 chest X-ray collection, split by patient."""
    rows = covid_chestxray_rows(folder)
    paths = []
    for k, site_rows in enumerate(split_by_patient(rows, num_sites, seed)):
        paths.append(write_site(
            out_dir, f"site-{k + 1}", site_rows, folder, COVID_LABELS,
            {"age-bands": list(COVID_AGE_BANDS), "group-attribute": "sex"},
        ))
    log.info("%d images of %d patients -> %d sites in %s", len(rows),
             len({r["patient_id"] for r in rows}), num_sites, out_dir)
    return paths

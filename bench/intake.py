"""Site intake throughput: DICOM decode + preprocessing (first epoch) vs the cache (later epochs).

Two sets are measured, each as a manifest site read by the training code
(:func:`medfed.common.intake.site_dataset.build_site_data`):

- ``real``: every real DICOM file in ``../shared/data/dicom_samples`` (CT, MR up to
  1024x1024, RGB ultrasound, enhanced multi-frame CT, JPEG 2000 CR when the
  ``dicom-codecs`` extra is installed, and the 16x16 DICOMDIR images), read in place;
- ``ct512``: ``--n`` generated 512x512 12-bit CT-like DICOM files (the usual clinical size).

"First epoch" starts with an empty cache, so every file is decoded, windowed, resized and
normalised. "Cached epoch" is a new reader (as in a new ClientApp process) that finds
every image in the cache. Imports (pydicom, MONAI) are loaded before timing; their cost is
printed separately. Figures are images per second; the target is cached >= 10x first.

Usage:
    python bench/intake.py [--n 300] [--image-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDFED_SHARED_DATA", REPO.parent / "shared" / "data"))


def _site_yaml(folder: Path, data_root: Path, rows: list[dict[str, str]], image_size: int) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    cfg = {"site-id": folder.name, "data-root": str(data_root), "manifest": str(folder / "manifest.csv"),
           "labels": ["a", "b"], "state-dir": str(folder / "state"), "image-size": image_size}
    (folder / "site.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "site.yaml"


def real_set(work: Path, image_size: int) -> Path | None:
    root = SHARED / "dicom_samples"
    if not root.is_dir():
        return None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ("DICOMDIR",) and p.suffix != ".md")
    rows = [{"path": str(p.relative_to(root)), "label": "ab"[i % 2], "patient_id": f"r{i}"} for i, p in enumerate(files)]
    return _site_yaml(work / "real", root, rows, image_size)


def ct_set(work: Path, n: int, image_size: int) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    data = work / "ct512-data"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 + (xx - 256) ** 2) < 220**2
    rows = []
    for i in range(n):
        img = np.where(body, rng.normal(1040, 40, (512, 512)), 0).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = CTImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds = Dataset()
        ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta, CTImageStorage, uid, "CT"
        ds.PatientID = f"p{i // 4}"
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelSpacing = [0.7, 0.7]
        ds.PixelData = img.tobytes()
        rel = f"ct/{i:05d}.dcm"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(data / rel, enforce_file_format=True)
        rows.append({"path": rel, "label": "ab"[i % 2], "patient_id": f"p{i // 4}"})
    return _site_yaml(work / "ct512", data, rows, image_size)


def measure(site_yaml: Path, repeats: int) -> dict[str, float]:
    from medfed.common.intake.site_dataset import build_site_data
    from medfed.common.site_config import load_site_config

    site = load_site_config(site_yaml)
    shutil.rmtree(Path(site.state_dir) / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    _, data, first = build_site_data(site)
    cold = time.perf_counter() - t0
    n = len(data.train) + len(data.val) + len(data.test)
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, _, again = build_site_data(site)
        warm.append(time.perf_counter() - t0)
        if again.cache_hits < n:
            raise RuntimeError(f"expected >= {n} cache hits, got {again.cache_hits}")
    w = statistics.median(warm)
    return {"images": n, "skipped": sum(first.skipped.values()), "first_s": cold, "cached_s": w,
            "first_ips": n / cold, "cached_ips": n / w, "speedup": cold / w}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="generated 512x512 CT files (default 300)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    import monai.transforms  # noqa: F401
    import pydicom  # noqa: F401
    imports = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="medfed-intake-bench-"))
    try:
        sets = {"real": real_set(work, args.image_size), "ct512": ct_set(work, args.n, args.image_size)}
        print(f"imports (pydicom + MONAI, paid once per process on a cache miss): {imports:.1f} s")
        print(f"{'set':<7} {'images':>6} {'skipped':>7} {'first epoch':>16} {'cached epoch':>18} {'speedup':>8}")
        for name, yaml_path in sets.items():
            if yaml_path is None:
                print(f"{name:<7} (shared data not found under {SHARED})")
                continue
            r = measure(yaml_path, args.repeats)
            print(f"{name:<7} {r['images']:>6} {r['skipped']:>7} "
                  f"{r['first_ips']:>8.1f} img/s ({r['first_s']:.2f} s) "
                  f"{r['cached_ips']:>8.0f} img/s ({r['cached_s']:.3f} s) {r['speedup']:>7.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

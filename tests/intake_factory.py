"""Builders for site data in tests: DICOM files with identifying tags, PNGs, manifests, site.yaml."""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

SECRET_NAME = "Doe^Janet-SECRETNAME"
SECRET_INSTITUTION = "St-SECRET-Hospital"


def write_dicom(path: Path, pixels: np.ndarray, *, patient_id: str, sex: str = "F", age: str = "045Y",
                name: str = SECRET_NAME, accession: str = "", modality: str = "CR",
                photometric: str = "MONOCHROME2", with_pixels: bool = True, uid: str | None = None) -> str:
    """Write an uncompressed single-frame DICOM; returns its SOPInstanceUID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    sop_uid = uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientAge = name, patient_id, sex, age
    ds.PatientBirthDate = "19800101"
    ds.AccessionNumber = accession or f"SECRET{zlib.crc32(patient_id.encode()) % 10**6:06d}"
    ds.InstitutionName = SECRET_INSTITUTION
    ds.Modality, ds.Manufacturer = modality, "ACME"
    if with_pixels:
        data = np.asarray(pixels, dtype=np.uint16)
        ds.Rows, ds.Columns = data.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = data.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def class_image(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A 12-bit image whose class is visible: label 1 has a bright disc in the centre."""
    img = rng.normal(1200, 150, (size, size))
    if label:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] += 1800
    return np.clip(img, 0, 4095)


def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels / 16, 0, 255).astype(np.uint8)).save(path)


def write_manifest(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_site_yaml(path: Path, **keys: object) -> Path:
    path.write_text(yaml.safe_dump(keys, sort_keys=False), encoding="utf-8")
    return path


def dicom_site(root: Path, n_patients: int = 12, images_per_patient: int = 3, seed: int = 0,
               site_id: str = "hosp-a", **site_keys: object) -> Path:
    """A manifest site of identifiable DICOM files; returns its site.yaml (``site_keys``: more site.yaml keys)."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    rows = []
    for p in range(n_patients):
        pid = f"PID-{seed}{p:04d}-SECRET"
        sex = "F" if p % 2 else "M"
        for i in range(images_per_patient):
            label = (p + i) % 2
            rel = f"dicom/{pid}/img{i}.dcm"
            write_dicom(data / rel, class_image(label, rng), patient_id=pid, sex=sex)
            rows.append({"path": rel, "label": ["normal", "abnormal"][label], "patient_id": pid, "sex": sex})
    write_manifest(data / "manifest.csv", rows)
    return write_site_yaml(
        root / "site.yaml", **{"site-id": site_id, "data-root": "data", "manifest": "manifest.csv",
                               "labels": ["normal", "abnormal"], "state-dir": "state",
                               "group-attribute": "sex", "image-size": 32, **site_keys}
    )

"""Hostile files (issue 14): links out of data-root, and images whose header declares too many pixels.

Every reader that takes a path from a manifest, a mask column or a folder scan refuses a file whose
real location is outside ``data-root``; every format is checked against ``max-image-pixels`` from
its header, before any pixel is decoded. A refusal is a per-file entry in the site's QC report,
named relative to the data root; the site goes on with the other files. No test here decodes a
large image: the decoders are replaced by ones that fail if called.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from medfed.common.errors import DataError
from medfed.common.intake.dicom_scan import scan_dicom_folder
from medfed.common.intake.paths import OutsideDataRoot, confined, root_relative
from medfed.common.intake.qc import check_site, format_qc
from medfed.common.intake.readers import ReadSettings, TooManyPixels, read_image
from medfed.common.intake.site_dataset import build_site_data
from medfed.common.intake.site_images import read_settings
from medfed.common.segmentation.pairs import read_segmentation_pairs
from medfed.common.site_config import DEFAULT_MAX_IMAGE_PIXELS, load_site_config

from tests.intake_factory import (
    class_image,
    write_dicom,
    write_manifest,
    write_png,
    write_site_yaml,
)

LABELS = ["normal", "abnormal"]
LIMIT = DEFAULT_MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def _restore_pil_limit(monkeypatch):
    """The readers set PIL.Image.MAX_IMAGE_PIXELS to the site's limit; put the original back afterwards."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture
def no_decoding(monkeypatch):
    """Make the pixel decoders fail loudly on anything large: a refusal must come from the header alone."""
    import nibabel.arrayproxy
    import pydicom.pixels
    from PIL import ImageFile

    def guard(original, pixels_of):
        def guarded(obj, *args, **kwargs):
            if pixels_of(obj) > 1_000_000:
                raise AssertionError("a large image was decoded")
            return original(obj, *args, **kwargs)
        return guarded

    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        guard(ImageFile.ImageFile.load, lambda img: img.size[0] * img.size[1]))
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        guard(pydicom.pixels.pixel_array, lambda ds: int(ds.Rows) * int(ds.Columns)))
    proxy = nibabel.arrayproxy.ArrayProxy
    monkeypatch.setattr(proxy, "__getitem__", guard(proxy.__getitem__, lambda p: int(np.prod(p.shape))))
    monkeypatch.setattr(proxy, "__array__", guard(proxy.__array__, lambda p: int(np.prod(p.shape))))


# --------------------------------------------------------------------------- hostile file builders
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bomb_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of ``width x height`` zeros: a few KB on disk, width*height bytes decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def write_huge_dicom(path: Path, rows: int, columns: int, frames: int = 1) -> Path:
    """A small DICOM whose header claims ``rows x columns x frames`` (the pixel data stays 8x8)."""
    import pydicom

    write_dicom(path, np.zeros((8, 8)), patient_id="HUGE-1")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)
    return path


def write_huge_nifti(path: Path, shape: tuple[int, ...]) -> Path:
    """A .nii.gz with a valid header declaring ``shape`` (uint8) and a truncated data section."""
    import nibabel

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\x00" * 64)
    return path


def write_nifti(path: Path, data: np.ndarray) -> Path:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))
    return path


def write_huge_npy(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy header declaring ``shape`` (uint8) with no data after it."""
    from numpy.lib import format as npy_format

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        npy_format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return path


def manifest_site(tmp_path: Path, extra: list[dict[str, object]], n_good: int = 6, **keys: object) -> Path:
    """A PNG manifest site with ``n_good`` usable images plus the ``extra`` rows; returns site.yaml."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    rows = []
    for i in range(n_good):
        rel = f"png/p{i}.png"
        write_png(data / rel, class_image(i % 2, rng))
        rows.append({"path": rel, "label": LABELS[i % 2], "patient_id": f"P{i}", "split": "train"})
    write_manifest(data / "manifest.csv", rows + extra)
    return write_site_yaml(tmp_path / "site.yaml", **{
        "site-id": "hostile", "data-root": "data", "manifest": "manifest.csv", "labels": LABELS,
        "state-dir": "state", "image-size": 16, **keys,
    })


def _row(path: str, patient: str = "X1") -> dict[str, object]:
    return {"path": path, "label": "normal", "patient_id": patient, "split": "train"}


def _refused(report) -> dict[str, dict]:
    return {entry["path"]: entry for entry in report.problems["refused"]}


# --------------------------------------------------------------------------- the helper
def test_confined_follows_links_and_refuses_leaving_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "real.png").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"x")
    (root / "in.png").symlink_to(root / "a" / "real.png")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "loop.png").symlink_to(root / "loop.png")
    assert confined(root / "a" / "real.png", root) == (root / "a" / "real.png").resolve()
    assert confined(root / "in.png", root) == (root / "a" / "real.png").resolve()
    for name in ("out.png", "dir_out/secret.png", "loop.png"):
        with pytest.raises(OutsideDataRoot) as info:
            confined(root / name, root)
        assert str(tmp_path) not in str(info.value) and "secret" not in str(info.value)
    assert root_relative(root / "a" / "real.png", root) == "a/real.png"
    assert root_relative(tmp_path / "x.png", root) == "x.png"  # never an absolute path


# --------------------------------------------------------------------------- links out of data-root
def test_classification_manifest_refuses_links_out_of_the_data_root(tmp_path):
    outside = tmp_path / "outside"
    secret_png = outside / "secret_scan.png"
    write_png(secret_png, class_image(1, np.random.default_rng(1)))
    secret_nii = write_nifti(outside / "secret_vol.nii.gz", np.zeros((12, 12, 3), np.float32))
    data = tmp_path / "data"
    (data / "links").mkdir(parents=True)
    (data / "links" / "out.png").symlink_to(secret_png)
    (data / "links" / "out.nii.gz").symlink_to(secret_nii)
    (data / "links" / "dir").symlink_to(outside, target_is_directory=True)
    write_png(data / "store" / "blob.png", class_image(0, np.random.default_rng(2)))
    (data / "links" / "in.png").symlink_to(data / "store" / "blob.png")  # inside: fine
    site = load_site_config(manifest_site(tmp_path, [
        _row("links/out.png", "X1"), _row("links/out.nii.gz", "X2"), _row("links/dir/secret_scan.png", "X3"),
        _row("links/in.png", "X4"),
    ]))

    report = check_site(site)
    refused = _refused(report)
    assert set(refused) == {"links/out.png", "links/out.nii.gz", "links/dir/secret_scan.png"}
    assert {e["kind"] for e in refused.values()} == {"outside-data-root"}
    assert all("outside the data root" in e["reason"] for e in refused.values())
    assert report.ok and report.usable == 7  # the 6 PNGs and the link that stays inside
    assert report.problems["unreadable"] == [] and report.problems["missing-files"] == []
    text = json.dumps(report.to_dict()) + format_qc(report)
    assert str(tmp_path) not in text and "secret_vol" not in text and "outside/" not in text
    assert "refused: links/out.png: resolves outside the data root" in format_qc(report)
    assert any("refused" in w for w in report.warnings)

    _, split_data, summary = build_site_data(site)
    assert len(split_data.train) == 7 and summary.skipped == {"outside-data-root": 3}


def test_segmentation_refuses_a_mask_linked_out_of_the_data_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    rng = np.random.default_rng(0)
    mask = (rng.random((20, 20)) > 0.5).astype(np.uint8)
    for name in ("img/0.npy", "img/1.npy"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / name, rng.random((20, 20)).astype(np.float32))
    (root / "lbl").mkdir()
    outside.mkdir()
    np.save(root / "lbl" / "real.npy", mask)
    np.save(outside / "secret.npy", mask)
    (root / "lbl" / "out.npy").symlink_to(outside / "secret.npy")
    (root / "lbl" / "in.npy").symlink_to(root / "lbl" / "real.npy")
    (root / "img" / "out.npy").symlink_to(outside / "secret.npy")
    csv = tmp_path / "seg.csv"
    csv.write_text("path,mask,split\nimg/0.npy,lbl/out.npy,train\nimg/1.npy,lbl/in.npy,train\n"
                   "img/out.npy,lbl/real.npy,train\n")
    pairs = read_segmentation_pairs(csv, root, image_size=16)
    kinds = {p.line: p.kind for p in pairs.problems}
    assert kinds == {2: "path-escapes-root", 4: "path-escapes-root"}
    assert len(pairs.splits["train"]) == 1  # the mask linked inside the root is fine
    assert all(str(tmp_path) not in p.detail and "secret" not in p.detail for p in pairs.problems)


def test_dicom_folder_scan_refuses_links_out_of_the_data_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    uid_in = write_dicom(root / "dicom" / "a.dcm", np.zeros((8, 8)), patient_id="P1")
    uid_out = write_dicom(outside / "secret.dcm", np.zeros((8, 8)), patient_id="P2")
    (root / "dicom" / "link_out.dcm").symlink_to(outside / "secret.dcm")
    (root / "store").mkdir()
    uid_linked = write_dicom(root / "store" / "b.dcm", np.zeros((8, 8)) + 1, patient_id="P3")
    (root / "dicom" / "link_in.dcm").symlink_to(root / "store" / "b.dcm")
    labels = write_manifest(root / "labels.csv", [
        {"sop_instance_uid": uid, "label": "normal"} for uid in (uid_in, uid_out, uid_linked)])
    manifest = scan_dicom_folder(root / "dicom", root, labels)
    assert sorted(r.path for r in manifest.rows) == ["dicom/a.dcm", "dicom/link_in.dcm"]
    problems = [p for p in manifest.problems if p.kind == "path-escapes-root"]
    assert [p.detail.split(":")[0] for p in problems] == ["dicom/link_out.dcm"]
    assert "outside the data root" in problems[0].detail and str(tmp_path) not in problems[0].detail


# --------------------------------------------------------------------------- too many pixels, per format
def test_png_with_a_huge_header_is_refused_without_decoding(tmp_path, no_decoding):
    from PIL import Image

    bomb = write_bomb_png(tmp_path / "bomb.png", 12000, 12000)
    assert bomb.stat().st_size < 200_000  # tiny on disk, 144 megapixels decoded
    tracemalloc.start()
    try:
        with pytest.raises(TooManyPixels) as info:
            read_image(bomb, ReadSettings())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value).startswith("144000000 pixels exceeds max-image-pixels=64000000 (site.yaml)")
    assert peak < 50e6
    assert Image.MAX_IMAGE_PIXELS == LIMIT  # Pillow's own bomb check uses the site's limit


def test_png_between_the_limit_and_twice_it_is_refused_by_our_check(tmp_path, no_decoding):
    """Pillow only warns up to twice MAX_IMAGE_PIXELS: the header check must still refuse."""
    png = write_bomb_png(tmp_path / "big.png", 40, 30)
    with pytest.raises(TooManyPixels, match=r"^1200 pixels exceeds max-image-pixels=1000 \(site.yaml\)"):
        read_image(png, ReadSettings(max_pixels=1000))
    with pytest.raises(TooManyPixels, match=r"^1200 pixels exceeds max-image-pixels=500 "):
        read_image(png, ReadSettings(max_pixels=500))  # above twice the limit: Pillow's own refusal


@pytest.mark.parametrize("rows, columns, frames, pixels", [
    (30000, 30000, 1, 900_000_000),
    (1000, 1000, 100, 100_000_000),  # multi-frame: every frame counts
])
def test_dicom_with_huge_rows_columns_is_refused_from_the_header(tmp_path, no_decoding, rows, columns, frames,
                                                                 pixels):
    path = write_huge_dicom(tmp_path / "huge.dcm", rows, columns, frames)
    with pytest.raises(TooManyPixels) as info:
        read_image(path, ReadSettings())
    assert str(info.value).startswith(f"{pixels} pixels exceeds max-image-pixels=64000000 (site.yaml)")


@pytest.mark.parametrize("shape, pixels", [((20000, 20000), 400_000_000), ((4000, 4000, 10), 160_000_000)])
def test_nifti_with_a_huge_header_shape_is_refused_before_reading_voxels(tmp_path, no_decoding, shape, pixels):
    path = write_huge_nifti(tmp_path / "huge.nii.gz", shape)
    assert path.stat().st_size < 10_000
    with pytest.raises(TooManyPixels) as info:
        read_image(path, ReadSettings())
    assert str(info.value).startswith(f"{pixels} pixels exceeds max-image-pixels=64000000 (site.yaml)")


def test_npy_with_a_huge_shape_header_is_refused_before_loading(tmp_path, monkeypatch):
    path = write_huge_npy(tmp_path / "huge.npy", (20000, 20000))

    def loaded(*_args, **_kwargs):
        raise AssertionError("the array was loaded")

    monkeypatch.setattr(np, "load", loaded)
    with pytest.raises(TooManyPixels) as info:
        read_image(path, ReadSettings())
    assert str(info.value).startswith("400000000 pixels exceeds max-image-pixels=64000000 (site.yaml)")


def test_images_within_the_limit_still_read(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path / "a.png", class_image(0, rng))  # 48 x 48
    np.save(tmp_path / "a.npy", rng.random((3, 10, 12)).astype(np.float32))
    write_nifti(tmp_path / "a.nii.gz", rng.random((10, 12, 4)).astype(np.float32))
    write_dicom(tmp_path / "a.dcm", class_image(1, rng), patient_id="P1")
    for name, shape in (("a.png", (48, 48)), ("a.npy", (10, 12, 3)), ("a.nii.gz", (10, 12)), ("a.dcm", (48, 48))):
        image, _ = read_image(tmp_path / name, ReadSettings(max_pixels=48 * 48))
        assert image.shape == shape


def test_read_settings_reject_a_bad_limit():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            ReadSettings(max_pixels=bad)


# --------------------------------------------------------------------------- the site's QC report and training
def test_qc_report_names_refused_files_relative_to_the_data_root(tmp_path, no_decoding):
    data = tmp_path / "data"
    write_bomb_png(data / "scans" / "x.png", 12000, 12000)
    write_huge_dicom(data / "scans" / "ct.dcm", 30000, 30000)
    write_huge_nifti(data / "vol" / "brain.nii.gz", (20000, 20000))
    write_huge_npy(data / "arr" / "big.npy", (20000, 20000))
    site = load_site_config(manifest_site(tmp_path, [
        _row("scans/x.png", "X1"), _row("scans/ct.dcm", "X2"), _row("vol/brain.nii.gz", "X3"),
        _row("arr/big.npy", "X4"),
    ]))
    report = check_site(site)
    refused = _refused(report)
    assert set(refused) == {"scans/x.png", "scans/ct.dcm", "vol/brain.nii.gz", "arr/big.npy"}
    assert {e["kind"] for e in refused.values()} == {"too-many-pixels"}
    assert refused["scans/x.png"]["reason"].startswith(
        "144000000 pixels exceeds max-image-pixels=64000000 (site.yaml)")
    assert "refused: scans/x.png: 144000000 pixels exceeds max-image-pixels=64000000 (site.yaml)" in format_qc(report)
    assert report.ok and report.usable == 6 and report.problems["unreadable"] == []
    assert str(tmp_path) not in json.dumps(report.to_dict())


def test_site_yaml_max_image_pixels_reaches_the_readers(tmp_path):
    site = load_site_config(manifest_site(tmp_path, [], n_good=4, **{"max-image-pixels": 2000}))
    assert read_settings(site).max_pixels == 2000
    report = check_site(site)  # every 48 x 48 image is 2304 pixels
    assert not report.ok and report.usable == 0
    assert any("no usable image" in f and "refused" in f for f in report.fatal)
    reasons = {e["reason"] for e in report.problems["refused"]}
    assert reasons and all(r.startswith("2304 pixels exceeds max-image-pixels=2000 (site.yaml)") for r in reasons)
    with pytest.raises(DataError, match="none of the 4 manifest rows") as info:
        build_site_data(site)
    assert "too-many-pixels" in str(info.value) and "png/" not in str(info.value)  # counts, never paths


def test_a_lower_limit_is_not_bypassed_by_the_preprocessing_cache(tmp_path):
    yaml_path = manifest_site(tmp_path, [], n_good=4)
    assert check_site(load_site_config(yaml_path)).usable == 4  # warms the cache
    text = yaml_path.read_text() + "max-image-pixels: 2000\n"
    yaml_path.write_text(text)
    assert check_site(load_site_config(yaml_path)).usable == 0


def test_refusals_are_logged_relative_to_the_data_root(tmp_path, caplog):
    outside = tmp_path / "outside"
    write_png(outside / "secret.png", class_image(1, np.random.default_rng(1)))
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(outside / "secret.png", data / "evil.png")
    site = load_site_config(manifest_site(tmp_path, [_row("evil.png")]))
    with caplog.at_level("WARNING", logger="medfed.common.intake.site_images"):
        check_site(site)
    messages = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert messages == [f"refused evil.png: {messages[0].split(': ', 1)[1]}"]
    assert str(tmp_path) not in messages[0] and "secret" not in messages[0]

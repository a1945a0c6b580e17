"""Image readers and preprocessing: real DICOM samples, generated files and broken inputs."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medfed.common.intake.preprocess import PreprocessSettings, preprocess
from medfed.common.intake.readers import (
    DICOM_CODECS_HINT,
    NIFTI_HINT,
    ImageMeta,
    ReadError,
    ReadSettings,
    detect_kind,
    read_header,
    read_image,
)
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

J2K_LABEL = "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91)"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    path = shared_data / "dicom_samples"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


def _store(dicom_dir: Path, name: str) -> Path:
    return dicom_dir / "pydicom_data_store" / name


def _test_file(dicom_dir: Path, name: str) -> Path:
    return dicom_dir / "pydicom_test_files" / name


def _raw(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array


def _new_dataset(path: Path) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.PatientID = "TEST-1"
    return ds


def _write_dicom(path: Path, arr: np.ndarray | None, photometric: str = "MONOCHROME2",
                 bits: int = 16, **attrs: object) -> Path:
    ds = _new_dataset(path)
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(rows: int = 8, cols: int = 12, top: int = 4000) -> np.ndarray:
    return np.linspace(0, top, rows * cols).reshape(rows, cols).astype(np.uint16)


def _write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# settings and kind detection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_center": 40.0},
        {"window_width": 400.0},
        {"window_center": 40.0, "window_width": 0.0},
        {"window_center": 40.0, "window_width": -5.0},
        {"window_center": float("nan"), "window_width": 400.0},
        {"frame": -2},
        {"frame": 1.5},
        {"window_center": "soft tissue", "window_width": 400.0},
    ],
)
def test_read_settings_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="window|frame"):
        ReadSettings(**kwargs)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.dcm", "dicom"), ("a.DICOM", "dicom"), ("a.png", "png"), ("a.JPG", "jpeg"),
        ("a.jpeg", "jpeg"), ("a.nii", "nifti"), ("scan.nii.gz", "nifti"), ("a.npy", "npy"),
    ],
)
def test_detect_kind_by_suffix(name: str, kind: str) -> None:
    assert detect_kind(Path(name)) == kind


def test_detect_kind_rejects_unknown_files(tmp_path: Path) -> None:
    weird = tmp_path / "notes.xyz"
    weird.write_text("hello")
    with pytest.raises(ReadError, match=r"unsupported file type '\.xyz'.*NIfTI"):
        detect_kind(weird)
    bare = tmp_path / "README"
    bare.write_text("x" * 300)
    with pytest.raises(ReadError, match="no suffix"):
        read_image(bare)


def test_suffixless_dicom_in_dicomdir_tree(dicom_dir: Path, tmp_path: Path) -> None:
    tree = _test_file(dicom_dir, "dicomdirtests")
    cr, mr = tree / "77654033" / "CR1" / "6154", tree / "98892003" / "MR1" / "4919"
    assert detect_kind(cr) == detect_kind(mr) == "dicom"
    cr_meta, mr_meta = read_header(cr), read_header(mr)
    assert cr_meta.tags["PatientAge"] == "047Y"
    assert mr_meta.tags["PatientAge"] == "045Y"
    assert mr_meta.tags["PatientSex"] == "M"
    assert cr_meta.tags["PatientSex"] == ""  # absent/empty -> ''
    assert set(cr_meta.tags) >= {"PatientID", "Manufacturer", "StudyInstanceUID", "BodyPartExamined"}
    assert cr_meta.spacing == (0.1, 0.1)  # ImagerPixelSpacing (no PixelSpacing in CR)
    image, meta = read_image(cr)
    assert image.shape == (16, 16) and meta.modality == "CR" and meta.photometric == "MONOCHROME1"
    # A UID-like suffix is sniffed too.
    uid_named = tmp_path / "1.2.826.0.1.3680043.2.1125.1"
    uid_named.write_bytes(cr.read_bytes())
    assert detect_kind(uid_named) == "dicom"


# --------------------------------------------------------------------------------------
# DICOM: real samples
# --------------------------------------------------------------------------------------


def test_ct_small_applies_modality_lut(dicom_dir: Path) -> None:
    path = _test_file(dicom_dir, "CT_small.dcm")
    ds, raw = _raw(path)
    assert "WindowCenter" not in ds  # no file window: the full HU range is returned
    image, meta = read_image(path)
    expected = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert image.dtype == np.float32 and image.shape == (128, 128)
    np.testing.assert_array_equal(image, expected.astype(np.float32))
    assert image.min() < 0  # HU, not raw stored values
    assert meta.kind == "dicom" and meta.modality == "CT" and meta.num_frames == 1
    assert meta.spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.transfer_syntax == "Explicit VR Little Endian"
    assert meta.photometric == "MONOCHROME2"
    assert meta.tags["PatientAge"] == "000Y" and meta.tags["PatientSex"] == "O"
    assert meta.tags["Modality"] == "CT"
    assert read_header(path) == dataclasses.replace(meta, pixel_sha256="")


def test_file_window_applied_after_rescale(dicom_dir: Path) -> None:
    path = _store(dicom_dir, "MR2_UNCR.dcm")
    ds, raw = _raw(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    image, meta = read_image(path)
    rescaled = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.clip(rescaled, center - width / 2, center + width / 2)
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-3)
    assert rescaled.max() > center + width / 2  # the window really clips
    assert image.max() == pytest.approx(center + width / 2)
    assert meta.shape == (1024, 1024)


def test_multivalued_file_window_uses_first(dicom_dir: Path) -> None:
    path = _store(dicom_dir, "MR-SIEMENS-DICOM-WithOverlays.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    center, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    image, _ = read_image(path)
    assert image.min() >= center - width / 2 and image.max() <= center + width / 2


def test_configured_window_overrides_file_window(dicom_dir: Path) -> None:
    path = _test_file(dicom_dir, "MR_small.dcm")
    ds, raw = _raw(path)
    file_image, _ = read_image(path)
    assert file_image.max() == pytest.approx(float(ds.WindowCenter) + float(ds.WindowWidth) / 2)
    settings = ReadSettings(window_center=300.0, window_width=200.0)
    image, _ = read_image(path, settings)
    assert image.min() >= 200.0 and image.max() <= 400.0
    np.testing.assert_array_equal(image, np.clip(raw.astype(np.float32), 200.0, 400.0))
    assert not np.array_equal(image, file_image)


def test_configured_window_on_ct_in_hu(dicom_dir: Path) -> None:
    path = _test_file(dicom_dir, "CT_small.dcm")
    _, raw = _raw(path)
    image, _ = read_image(path, ReadSettings(window_center=40.0, window_width=400.0))
    hu = raw.astype(np.float32) - 1024.0
    np.testing.assert_array_equal(image, np.clip(hu, -160.0, 240.0))
    assert image.min() == -160.0 and image.max() == 240.0


def test_enhanced_multiframe_frames(dicom_dir: Path) -> None:
    path = _store(dicom_dir, "eCT_Supplemental.dcm")
    _, raw = _raw(path)
    assert raw.shape == (2, 512, 512)
    middle, meta = read_image(path)
    # rescale (-1024) and window (49/102) live in the shared functional groups
    expected = np.clip(raw[1].astype(np.float32) - 1024.0, -2.0, 100.0)
    np.testing.assert_array_equal(middle, expected)
    assert meta.num_frames == 2 and meta.shape == (512, 512)
    assert meta.spacing == pytest.approx((0.388672, 0.388672))
    first, _ = read_image(path, ReadSettings(frame=0))
    assert not np.array_equal(first, middle)
    np.testing.assert_array_equal(read_image(path, ReadSettings(frame=1))[0], middle)
    with pytest.raises(ReadError, match="frame 5 is out of range: the file has 2 frame"):
        read_image(path, ReadSettings(frame=5))


def test_us_rgb(dicom_dir: Path) -> None:
    path = _store(dicom_dir, "US1_UNCR.dcm")
    _, raw = _raw(path)
    image, meta = read_image(path)
    assert image.shape == (480, 640, 3) and meta.shape == (480, 640, 3)
    np.testing.assert_array_equal(image, raw.astype(np.float32))
    assert meta.photometric == "RGB" and meta.modality == "US"
    assert read_header(path).shape == (480, 640, 3)


def test_jpeg2000_decodes(dicom_dir: Path) -> None:
    path = _store(dicom_dir, "RG1_J2KI.dcm")
    header = read_header(path)
    assert header.shape == (1955, 1841) and header.transfer_syntax == "JPEG 2000 Image Compression"
    assert header.spacing is None  # PixelSpacing is 0\0 in this file: unknown
    image, meta = read_image(path)
    assert image.shape == (1955, 1841) and meta.photometric == "MONOCHROME1"
    # MONOCHROME1 with the file window 15000/30000: out = 30000 - raw (raw 803..26512)
    assert image.min() == pytest.approx(30000 - 26512)
    assert image.max() == pytest.approx(30000 - 803)


def test_missing_jpeg2000_decoder(dicom_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels import get_decoder

    decoder = get_decoder("1.2.840.10008.1.2.4.91")
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg-openjpeg",)})
    with pytest.raises(ReadError) as info:
        read_image(_store(dicom_dir, "RG3_J2KI.dcm"))
    assert J2K_LABEL in str(info.value) and "dicom-codecs" in str(info.value)
    assert DICOM_CODECS_HINT in str(info.value)


def test_missing_decoder_error_from_pixel_array(dicom_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    def no_plugin(*_args: object, **_kwargs: object) -> np.ndarray:
        raise RuntimeError(
            "Unable to decompress 'JPEG 2000 Image Compression' pixel data because all "
            "plugins are missing dependencies:\n\tpylibjpeg - requires pylibjpeg-openjpeg"
        )

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_plugin)
    with pytest.raises(ReadError, match="dicom-codecs") as info:
        read_image(_store(dicom_dir, "RG3_J2KI.dcm"))
    assert J2K_LABEL in str(info.value)


def test_read_image_leaves_file_untouched(dicom_dir: Path) -> None:
    path = _test_file(dicom_dir, "CT_small.dcm")
    before = (path.stat().st_mtime_ns, _md5(path))
    read_image(path)
    read_header(path)
    assert (path.stat().st_mtime_ns, _md5(path)) == before


# --------------------------------------------------------------------------------------
# DICOM: generated files
# --------------------------------------------------------------------------------------


def test_monochrome1_inverted(tmp_path: Path) -> None:
    data = _ramp()
    mono2, _ = read_image(_write_dicom(tmp_path / "m2.dcm", data, "MONOCHROME2"))
    mono1, meta = read_image(_write_dicom(tmp_path / "m1.dcm", data, "MONOCHROME1"))
    assert meta.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(mono1, mono2.max() + mono2.min() - mono2)
    assert mono1[0, 0] > mono1[-1, -1]  # low stored value = bright in MONOCHROME1
    window = ReadSettings(window_center=1000.0, window_width=1000.0)
    mono2_w, _ = read_image(tmp_path / "m2.dcm", window)
    mono1_w, _ = read_image(tmp_path / "m1.dcm", window)
    np.testing.assert_array_equal(mono1_w, 1500.0 + 500.0 - mono2_w)
    assert mono1_w.min() == 500.0 and mono1_w.max() == 1500.0


def test_rescale_with_slope_and_signed_pixels(tmp_path: Path) -> None:
    data = np.arange(-48, 48, dtype=np.int16).reshape(8, 12)
    path = _write_dicom(tmp_path / "s.dcm", data, RescaleSlope="2.5", RescaleIntercept="-10")
    image, _ = read_image(path)
    np.testing.assert_allclose(image, data * 2.5 - 10)


def test_ybr_full_returned_as_rgb(tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image, meta = read_image(_write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL", 8))
    assert image.shape == (8, 10, 3) and meta.photometric == "YBR_FULL"
    assert np.abs(image - rgb).max() <= 2  # colour conversion rounding


def test_palette_colour_returned_as_rgb(tmp_path: Path) -> None:
    index = np.arange(80, dtype=np.uint8).reshape(8, 10)
    lut = np.arange(256, dtype=np.uint16) * 256
    attrs = {}
    for colour, table in (("Red", lut), ("Green", lut[::-1].copy()), ("Blue", np.zeros_like(lut))):
        attrs[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        attrs[f"{colour}PaletteColorLookupTableData"] = table.tobytes()
    path = _write_dicom(tmp_path / "pal.dcm", index, "PALETTE COLOR", 8, **attrs)
    assert read_header(path).shape == (8, 10, 3)
    image, _ = read_image(path)
    assert image.shape == (8, 10, 3)
    np.testing.assert_array_equal(image[..., 0], index * 256.0)
    np.testing.assert_array_equal(image[..., 1], (255 - index) * 256.0)


def test_modality_lut_sequence(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new(0x00283006, "US", [3 * i + 7 for i in range(256)])  # LUT Data
    data = np.arange(96, dtype=np.uint16).reshape(8, 12)
    path = _write_dicom(tmp_path / "lut.dcm", data, ModalityLUTSequence=[lut])
    image, _ = read_image(path)
    np.testing.assert_array_equal(image, 3.0 * data + 7)


def test_mislabelled_png_read_by_content(tmp_path: Path) -> None:
    from PIL import Image

    gray = _ramp(16, 16, 255).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "really_png.jpg", format="PNG")
    image, meta = read_image(tmp_path / "really_png.jpg")
    np.testing.assert_array_equal(image, gray)
    assert meta.kind == "png"
    Image.fromarray(gray).save(tmp_path / "x.png", format="TIFF")
    with pytest.raises(ReadError, match="unreadable PNG"):
        read_image(tmp_path / "x.png")


def test_constant_dicom_allowed(tmp_path: Path) -> None:
    image, _ = read_image(_write_dicom(tmp_path / "c.dcm", np.full((4, 4), 7, np.uint16)))
    assert np.all(image == 7.0)


def test_overflowing_rescale_rejected(tmp_path: Path) -> None:
    path = _write_dicom(tmp_path / "inf.dcm", _ramp(), RescaleSlope="1e308")
    with pytest.raises(ReadError, match="NaN or infinite"):
        read_image(path)


# --------------------------------------------------------------------------------------
# broken inputs: every one is a ReadError with a clear reason, never another exception
# --------------------------------------------------------------------------------------


def _truncated(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _png_bytes(tmp_path: Path) -> bytes:
    return _write_png(tmp_path / "ok.png", _ramp(32, 32).astype(np.uint8)).read_bytes()


BROKEN_CASES = {
    "dicom cut in header": lambda d, t: _truncated(_test_file(d, "CT_small.dcm"), t / "cut.dcm", 1000),
    "dicom cut in pixels": lambda d, t: _truncated(_test_file(d, "CT_small.dcm"), t / "cut.dcm", 20000),
    "dicom cut after meta": lambda d, t: _truncated(_test_file(d, "CT_small.dcm"), t / "cut.dcm", 300),
    "text named .dcm": lambda d, t: _write_text(t / "x.dcm", "this is not a DICOM file\n" * 20),
    "empty .dcm": lambda d, t: _write_text(t / "empty.dcm", ""),
    "DICOMDIR": lambda d, t: _test_file(d, "dicomdirtests/DICOMDIR"),
    "no pixel data": lambda d, t: _write_dicom(t / "sr.dcm", None),
    "image attrs, no pixel data": lambda d, t: _write_dicom(t / "np.dcm", None, Rows=4, Columns=4),
    "random-bytes PNG": lambda d, t: _write_bytes(t / "r.png", np.random.default_rng(1).bytes(500)),
    "truncated PNG": lambda d, t: _write_bytes(t / "cut.png", _png_bytes(t)[:60]),
    "random-bytes JPEG": lambda d, t: _write_bytes(t / "r.jpg", b"\xff\xd8\xff" + b"\x00" * 50),
    "garbage .nii.gz": lambda d, t: _write_bytes(t / "g.nii.gz", gzip.compress(b"abc" * 10)),
    "garbage .npy": lambda d, t: _write_bytes(t / "g.npy", b"\x93NUMPY garbage"),
    "object .npy": lambda d, t: _save_npy(t / "o.npy", np.array([{"a": 1}], dtype=object), True),
    "4D .npy": lambda d, t: _save_npy(t / "4d.npy", np.zeros((2, 3, 4, 5))),
    "(H, W, 4) .npy": lambda d, t: _save_npy(t / "rgba.npy", np.zeros((5, 6, 4))),
    "complex .npy": lambda d, t: _save_npy(t / "c.npy", np.zeros((5, 6), np.complex64)),
    "missing file": lambda d, t: t / "missing.png",
    "directory": lambda d, t: _mkdir(t / "folder.dcm"),
}
BROKEN_REASONS = {
    "dicom cut in header": "truncated or corrupt DICOM",
    "dicom cut in pixels": "truncated or corrupt DICOM pixel data",
    "dicom cut after meta": "truncated or corrupt DICOM",
    "text named .dcm": "not a DICOM file (no DICM preamble)",
    "empty .dcm": "not a DICOM file",
    "DICOMDIR": "DICOM has no pixel data",
    "no pixel data": "DICOM has no pixel data",
    "image attrs, no pixel data": "Pixel Data element is missing",
    "random-bytes PNG": "unreadable PNG",
    "truncated PNG": "unreadable PNG",
    "random-bytes JPEG": "unreadable JPEG",
    "garbage .nii.gz": "unreadable NIfTI",
    "garbage .npy": "unreadable .npy",
    "object .npy": "unreadable .npy",
    "4D .npy": "unsupported .npy array shape",
    "(H, W, 4) .npy": "unsupported .npy array shape",
    "complex .npy": "unsupported .npy dtype",
    "missing file": "file not found",
    "directory": "not a regular file",
}


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save_npy(path: Path, arr: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, arr, allow_pickle=allow_pickle)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


NEEDS_SHARED = {"dicom cut in header", "dicom cut in pixels", "dicom cut after meta", "DICOMDIR"}


def _broken(case: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The broken file for a case; only cases built from shared samples need shared data."""
    dicom_dir = request.getfixturevalue("dicom_dir") if case in NEEDS_SHARED else None
    return BROKEN_CASES[case](dicom_dir, tmp_path)


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_input_is_read_error(case: str, request: pytest.FixtureRequest,
                                    tmp_path: Path) -> None:
    path = _broken(case, request, tmp_path)
    with pytest.raises(ReadError) as info:
        read_image(path)
    message = str(info.value)
    assert BROKEN_REASONS[case] in message
    assert "\n" not in message and str(tmp_path) not in message and str(path) not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "case", ["text named .dcm", "DICOMDIR", "no pixel data", "random-bytes PNG", "4D .npy",
             "garbage .nii.gz", "missing file"],
)
def test_broken_input_header_is_read_error(case: str, request: pytest.FixtureRequest,
                                           tmp_path: Path) -> None:
    with pytest.raises(ReadError, match=BROKEN_REASONS[case].split(" (")[0]):
        read_header(_broken(case, request, tmp_path))


def test_nan_npy_rejected(tmp_path: Path) -> None:
    arr = np.ones((4, 4), np.float32)
    arr[0, 0] = np.inf
    with pytest.raises(ReadError, match="NaN or infinite"):
        read_image(_save_npy(tmp_path / "inf.npy", arr))


# --------------------------------------------------------------------------------------
# PNG / JPEG
# --------------------------------------------------------------------------------------


def test_png_8bit_gray(tmp_path: Path) -> None:
    data = _ramp(20, 30, 255).astype(np.uint8)
    path = _write_png(tmp_path / "g.png", data)
    image, meta = read_image(path)
    np.testing.assert_array_equal(image, data.astype(np.float32))
    assert meta.kind == "png" and meta.shape == (20, 30) and meta.spacing is None
    assert meta.modality is None and meta.tags == {} and meta.num_frames == 1
    assert read_header(path) == dataclasses.replace(meta, pixel_sha256="")


def test_png_16bit_gray_keeps_range(tmp_path: Path) -> None:
    data = _ramp(20, 30, 65535)
    path = _write_png(tmp_path / "g16.png", data)
    image, meta = read_image(path)
    assert image.max() == 65535.0 and image.min() == 0.0
    np.testing.assert_array_equal(image, data.astype(np.float32))
    assert meta.shape == (20, 30)


def test_png_rgba_and_palette_to_rgb(tmp_path: Path) -> None:
    from PIL import Image

    rgba = np.random.default_rng(2).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    image, meta = read_image(_write_png(tmp_path / "a.png", rgba))
    assert meta.shape == (10, 12, 3)
    np.testing.assert_array_equal(image, rgba[..., :3].astype(np.float32))
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png")
    assert read_header(tmp_path / "p.png").shape == (10, 12, 3)
    image, _ = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(image, np.asarray(palette.convert("RGB"), dtype=np.float32))
    gray_alpha = Image.fromarray(rgba[..., :2], mode="LA")
    gray_alpha.save(tmp_path / "la.png")
    image, _ = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(image, rgba[..., 0].astype(np.float32))


def test_jpeg_gray_and_rgb(tmp_path: Path) -> None:
    from PIL import Image

    gray = _ramp(32, 48, 255).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    image, meta = read_image(tmp_path / "g.jpg")
    assert meta.kind == "jpeg" and image.shape == (32, 48)
    assert np.abs(image - gray).mean() < 3
    rgb = np.dstack([gray, gray[::-1], np.full_like(gray, 128)])
    Image.fromarray(rgb).save(tmp_path / "c.jpeg", quality=95)
    image, meta = read_image(tmp_path / "c.jpeg")
    assert image.shape == (32, 48, 3) and meta.shape == (32, 48, 3)
    assert np.abs(image - rgb).mean() < 5


def test_jpeg_exif_orientation_applied(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.fromarray(_ramp(20, 30, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    image, _ = read_image(tmp_path / "rot.jpg")
    assert image.shape == (30, 20) and read_header(tmp_path / "rot.jpg").shape == (30, 20)


# --------------------------------------------------------------------------------------
# NIfTI and npy
# --------------------------------------------------------------------------------------


def _write_nifti(path: Path, data: np.ndarray, zooms: tuple[float, ...]) -> Path:
    import nibabel

    diagonal = [*zooms[:3], 1.0, 1.0, 1.0][:3]
    img = nibabel.Nifti1Image(data, np.diag([*diagonal, 1.0]))
    img.header.set_zooms(zooms)
    nibabel.save(img, str(path))
    return path


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_nifti_3d(tmp_path: Path, name: str) -> None:
    data = np.random.default_rng(3).normal(size=(20, 30, 5)).astype(np.float32)
    path = _write_nifti(tmp_path / name, data, (0.5, 0.7, 2.0))
    header = read_header(path)
    assert header.kind == "nifti" and header.shape == (20, 30) and header.num_frames == 5
    assert header.spacing == pytest.approx((0.5, 0.7)) and header.modality is None
    image, meta = read_image(path)
    np.testing.assert_array_equal(image, data[:, :, 2])
    assert dataclasses.replace(meta, pixel_sha256="") == header
    np.testing.assert_array_equal(read_image(path, ReadSettings(frame=0))[0], data[:, :, 0])
    with pytest.raises(ReadError, match="has 5 frame"):
        read_image(path, ReadSettings(frame=5))


def test_nifti_2d_and_4d(tmp_path: Path) -> None:
    flat = np.arange(12, dtype=np.int16).reshape(3, 4)
    image, meta = read_image(_write_nifti(tmp_path / "flat.nii", flat, (1.0, 2.0)))
    np.testing.assert_array_equal(image, flat)
    assert meta.num_frames == 1 and meta.spacing == (1.0, 2.0)
    series = np.random.default_rng(4).normal(size=(6, 7, 3, 2)).astype(np.float32)
    image, meta = read_image(_write_nifti(tmp_path / "t.nii.gz", series, (1.0, 1.0, 3.0, 2.0)))
    np.testing.assert_array_equal(image, series[:, :, 1, 0])  # first volume, middle slice
    assert meta.num_frames == 3


def test_nifti_without_nibabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_nifti(tmp_path / "v.nii", np.zeros((4, 4, 2), np.float32), (1.0, 1.0, 1.0))
    monkeypatch.setitem(sys.modules, "nibabel", None)  # import nibabel -> ImportError
    with pytest.raises(ReadError, match="nibabel") as info:
        read_image(path)
    assert NIFTI_HINT in str(info.value)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((6, 7), (6, 7)), ((6, 7, 3), (6, 7, 3)), ((3, 6, 7), (6, 7, 3)), ((1, 6, 7), (6, 7)),
     ((6, 7, 1), (6, 7))],
)
def test_npy_layouts(tmp_path: Path, shape: tuple[int, ...], layout: tuple[int, ...]) -> None:
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = _save_npy(tmp_path / "a.npy", data)
    image, meta = read_image(path)
    assert image.shape == layout and meta.shape == layout and read_header(path).shape == layout
    assert image.dtype == np.float32 and meta.kind == "npy"
    if shape[0] == 3:
        np.testing.assert_array_equal(image[..., 1], data[1])


# --------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "channels"), [((40, 50), 1), ((40, 50), 3), ((40, 50, 3), 1), ((40, 50, 3), 3),
                            ((1024, 1024), 1), ((7, 300), 1), ((16, 16, 1), 1)],
)
def test_preprocess_shape_dtype_range(shape: tuple[int, ...], channels: int) -> None:
    image = np.random.default_rng(5).normal(100.0, 50.0, shape).astype(np.float32)
    out = preprocess(image, PreprocessSettings(image_size=32, channels=channels))
    assert out.shape == (channels, 32, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0 and np.isfinite(out).all()


def test_preprocess_channel_conversion() -> None:
    gray = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb3 = preprocess(gray, PreprocessSettings(image_size=16, channels=3))
    np.testing.assert_array_equal(rgb3[0], rgb3[1])
    np.testing.assert_array_equal(rgb3[0], rgb3[2])
    np.testing.assert_allclose(rgb3[0], preprocess(gray, PreprocessSettings(16, 1))[0])
    # pure red/green/blue quadrants -> BT.601 luma levels
    rgb = np.zeros((64, 64, 3), np.float32)
    rgb[:32, :32, 0] = rgb[:32, 32:, 1] = rgb[32:, :32, 2] = 1.0
    rgb[32:, 32:] = 1.0  # white
    luma = preprocess(rgb, PreprocessSettings(image_size=8))[0]
    scaled = {name: (v - 0.114) / (1.0 - 0.114) for name, v in
              {"red": 0.299, "green": 0.587, "blue": 0.114}.items()}  # ScaleIntensity after luma
    assert luma[0, 0] == pytest.approx(scaled["red"], abs=1e-6)
    assert luma[0, -1] == pytest.approx(scaled["green"], abs=1e-6)
    assert luma[-1, 0] == pytest.approx(scaled["blue"], abs=1e-6)
    assert luma[-1, -1] == pytest.approx(1.0)


def test_preprocess_area_downsampling_averages() -> None:
    image = np.random.default_rng(6).random((1024, 1024)).astype(np.float32)
    image[:512] = 0.0
    image[:512, ::2] = 1.0  # 1-px stripes: aliased to 0 or 1 without anti-aliasing
    out = preprocess(image, PreprocessSettings(image_size=64))[0]
    blocks = image.reshape(64, 16, 64, 16).mean(axis=(1, 3))  # every pixel counts once
    expected = (blocks - blocks.min()) / (blocks.max() - blocks.min())
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert np.ptp(out[:32]) < 1e-5  # the striped half is flat grey


def test_preprocess_constant_image_is_zeros() -> None:
    out = preprocess(np.full((30, 40), 123.0, np.float32), PreprocessSettings(image_size=16))
    assert out.shape == (1, 16, 16) and not np.isnan(out).any() and np.all(out == 0.0)


def test_preprocess_real_dicom(dicom_dir: Path) -> None:
    image, _ = read_image(_store(dicom_dir, "MR2_UNCR.dcm"))
    out = preprocess(image, PreprocessSettings(image_size=64, channels=3))
    assert out.shape == (3, 64, 64) and 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: preprocess(np.zeros((2, 3, 8, 8), np.float32), PreprocessSettings()),
        lambda: preprocess(np.zeros((8, 8, 4), np.float32), PreprocessSettings()),
        lambda: preprocess(np.zeros((0, 8), np.float32), PreprocessSettings()),
        lambda: preprocess(np.array([[1.0, np.nan], [0.0, 1.0]]), PreprocessSettings()),
        lambda: preprocess(np.array([["a", "b"]]), PreprocessSettings()),
        lambda: preprocess(np.zeros((8, 8)), PreprocessSettings(image_size=4)),
        lambda: preprocess(np.zeros((8, 8)), PreprocessSettings(channels=2)),
        lambda: PreprocessSettings(image_size=32.0),  # type: ignore[arg-type]
    ],
    ids=["4d", "4-channels", "empty", "nan", "strings", "size-4", "channels-2", "float-size"],
)
def test_preprocess_rejects_ill_inputs(make) -> None:
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------------------------------------
# import cost and types
# --------------------------------------------------------------------------------------


def test_imports_stay_light() -> None:
    code = (
        "import sys, medfed.common.intake.readers, medfed.common.intake.preprocess; "
        "heavy = [m for m in ('monai', 'torch', 'nibabel', 'PIL', 'pydicom') if m in sys.modules]; "
        "sys.exit(str(heavy) if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_image_meta_is_frozen() -> None:
    meta = ImageMeta("png", (2, 2), 1, None, None, None, None, None, {})
    with pytest.raises(AttributeError):
        meta.kind = "dicom"  # type: ignore[misc]


def test_pixel_digest_is_of_stored_values_not_the_window(shared_data):
    """Two scans that saturate the same window are different images, not duplicates."""
    folder = shared_data / "dicom_samples" / "pydicom_test_files" / "dicomdirtests" / "77654033" / "CT2"
    (a, meta_a), (b, meta_b) = read_image(folder / "17166"), read_image(folder / "17196")
    np.testing.assert_array_equal(a, b)  # both above the file's window: one constant image
    assert meta_a.pixel_sha256 and meta_a.pixel_sha256 != meta_b.pixel_sha256
    assert read_image(folder / "17166")[1].pixel_sha256 == meta_a.pixel_sha256

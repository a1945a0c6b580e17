"""Manifest CSVs, DICOM folder scans, age bands and patient-level splits (medfed.common.intake)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medfed.common.errors import ConfigError, DataError
from medfed.common.intake.ages import AgeBands, bin_ages, parse_age_years
from medfed.common.intake.dicom_scan import (
    DEFAULT_ATTRIBUTE_TAGS,
    JOIN_KEYS,
    scan_dicom_folder,
)
from medfed.common.intake.manifest import (
    PROBLEM_KINDS,
    SPLIT_NAMES,
    Manifest,
    ManifestError,
    ManifestRow,
    read_manifest,
)
from medfed.common.intake.patient_split import (
    DEFAULT_FRACTIONS,
    assign_splits,
    patients_in_several_splits,
)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding, newline="")
    return path


def read(tmp_path: Path, text: str, encoding: str = "utf-8") -> Manifest:
    return read_manifest(write_csv(tmp_path / "labels.csv", text, encoding), tmp_path)


def kinds(manifest: Manifest) -> list[str]:
    return [problem.kind for problem in manifest.problems]


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    folder = shared_data / "dicom_samples" / "pydicom_test_files" / "dicomdirtests"
    if not folder.is_dir():
        pytest.skip(f"DICOM samples {folder} not found")
    return folder


@pytest.fixture(scope="module")
def dicom_headers(dicom_dir: Path, shared_data: Path) -> list[dict[str, str]]:
    """Every image file's path (relative to the data root) and join tags, read with pydicom directly."""
    headers = []
    for directory, _, files in os.walk(dicom_dir):
        for name in files:
            if name == "DICOMDIR":
                continue
            path = Path(directory) / name
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            headers.append({
                "path": path.relative_to(shared_data).as_posix(),
                "folder": path.relative_to(dicom_dir).parts[0],
                "PatientID": str(ds.PatientID),
                "SOPInstanceUID": str(ds.SOPInstanceUID),
            })
    return headers


def one_dicom_file(dicom_dir: Path) -> Path:
    return dicom_dir / "98892001" / "CT2N" / "6293"


def make_rows(n_patients: int, images: int = 1, prefix: str = "P") -> list[ManifestRow]:
    return [
        ManifestRow(line=0, path=f"{prefix}{p}/{i}.png", label="a", patient_id=f"{prefix}{p}")
        for p in range(n_patients)
        for i in range(images)
    ]


# ---------------------------------------------------------------------------
# read_manifest
# ---------------------------------------------------------------------------


def test_read_manifest_happy_path_with_bom_and_attributes(tmp_path):
    manifest = read(
        tmp_path,
        "Path,Label,Patient_ID,Split,Sex,Age,Race,Scanner\n"
        "img/a.png,pneumonia,P1,train,F,45,White,GE\n"
        "img/b.png, normal ,P2,,M,NA,N/A,nan\n"
        '"img/c, d.png",normal,,test, F ,70,Asian,Siemens\n',
        encoding="utf-8-sig",
    )
    assert manifest.problems == ()
    assert manifest.attribute_names == ("sex", "age", "race", "scanner")
    assert manifest.has_split_column
    assert manifest.source == "manifest labels.csv"
    a, b, c = manifest.rows
    assert (a.line, a.path, a.label, a.patient_id, a.split) == (2, "img/a.png", "pneumonia", "P1", "train")
    assert a.attributes == {"sex": "F", "age": "45", "race": "White", "scanner": "GE"}
    assert (b.label, b.split) == ("normal", "")
    assert b.attributes == {"sex": "M", "age": "", "race": "", "scanner": ""}
    assert (c.path, c.patient_id, c.attributes["sex"]) == ("img/c, d.png", "", "F")


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_read_manifest_semicolon_and_tab(tmp_path, delimiter):
    text = delimiter.join(["path", "label", "sex"]) + "\n" + delimiter.join(["x/1.png", "1", "F"]) + "\n"
    manifest = read(tmp_path, text)
    assert [(row.path, row.label, row.attributes["sex"]) for row in manifest.rows] == [("x/1.png", "1", "F")]
    assert not manifest.has_split_column


def test_read_manifest_patient_id_spellings(tmp_path):
    manifest = read(tmp_path, "path,label,PatientID\na.png,1,P7\n")
    assert manifest.rows[0].patient_id == "P7"
    assert manifest.attribute_names == ()


def test_missing_label_column_names_header_and_required(tmp_path):
    with pytest.raises(ManifestError) as info:
        read(tmp_path, "path,diagnosis\na.png,1\n")
    message = str(info.value)
    assert "['label']" in message and "['path', 'diagnosis']" in message and "['path', 'label']" in message
    assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "UTF-8"),
        (b"path,label\x00\n", "NUL"),
        (b"  \n\n", "empty"),
        (b"path,label,Path\na,b,c\n", "duplicate columns"),
    ],
)
def test_unusable_manifest_files_raise(tmp_path, content, expected):
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ManifestError, match=expected):
        read_manifest(path, tmp_path)


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        (",1", "empty-path"),
        ("a.png,", "empty-label"),
        ("a.png,NA", "empty-label"),
        ("a.png,1,holdout", "bad-split"),
        ("/abs/a.png,1", "absolute-path"),
        ("C:\\\\data\\\\a.png,1", "absolute-path"),
        ("s3://bucket/a.png,1", "absolute-path"),
        ("../a.png,1", "path-escapes-root"),
        ("img/../../a.png,1", "path-escapes-root"),
        ("./.,1", "empty-path"),
        ("a.png,1,train,extra", "extra-fields"),
    ],
)
def test_each_row_problem_kind(tmp_path, row, kind):
    manifest = read(tmp_path, f"path,label,split\nok.png,0\n{row}\n")
    assert [row.path for row in manifest.rows] == ["ok.png"]
    assert [(problem.line, problem.kind) for problem in manifest.problems] == [(3, kind)]
    assert kind in PROBLEM_KINDS
    assert "\n" not in manifest.problems[0].detail


def test_duplicates_dropped_but_label_conflicts_kept(tmp_path):
    manifest = read(
        tmp_path,
        "path,label,patient_id,age\n"
        "a.png,1,P1,40\n"
        "b.png,0,P2,50\n"
        "a.png,1,P1,40\n"  # exact duplicate (line 4)
        "./a.png, 1 ,P1,40\n"  # same after normalisation (line 5)
        "a.png,0,P1,40\n"  # conflicting label: kept for QC
        "b.png,0,P2,51\n",  # different attribute: not a duplicate
    )
    assert [(problem.line, problem.kind) for problem in manifest.problems] == [
        (4, "duplicate-row"),
        (5, "duplicate-row"),
    ]
    assert "line 2" in manifest.problems[0].detail
    assert [(row.line, row.path, row.label) for row in manifest.rows] == [
        (2, "a.png", "1"), (3, "b.png", "0"), (6, "a.png", "0"), (7, "b.png", "0"),
    ]


@pytest.mark.parametrize(
    ("raw", "split"),
    [("train", "train"), ("Training", "train"), ("VAL", "val"), ("valid", "val"), ("Validation", "val"),
     ("test", "test"), (" Testing ", "test"), ("", "")],
)
def test_split_normalisation(tmp_path, raw, split):
    manifest = read(tmp_path, f"path,label,split\na.png,1,{raw}\n")
    assert manifest.problems == ()
    assert manifest.rows[0].split == split


def test_paths_normalised_to_posix_relative(tmp_path):
    manifest = read(tmp_path, "path,label\n./img/a.png,1\nimg\\b.png,1\nimg/./x/../c.png,1\n")
    assert [row.path for row in manifest.rows] == ["img/a.png", "img/b.png", "img/c.png"]


def test_blank_lines_skipped_and_line_numbers_physical(tmp_path):
    manifest = read(tmp_path, 'path,label\n\na.png,"multi\nline"\n,1\n')
    assert manifest.rows[0].line == 3 and manifest.rows[0].label == "multi\nline"
    assert [(problem.line, problem.kind) for problem in manifest.problems] == [(5, "empty-path")]


def test_files_not_checked(tmp_path):
    assert read(tmp_path, "path,label\nmissing/nowhere.png,1\n").rows[0].path == "missing/nowhere.png"


# ---------------------------------------------------------------------------
# scan_dicom_folder on real DICOM files
# ---------------------------------------------------------------------------


def test_sample_folder_counts(dicom_headers):
    per_folder = Counter(header["folder"] for header in dicom_headers)
    assert per_folder == {"77654033": 7, "98892001": 7, "98892003": 17}
    # the folder names are not the patient ids: two folders hold patient 98890234
    assert Counter(header["PatientID"] for header in dicom_headers) == {"77654033": 7, "98890234": 24}


def test_scan_joined_on_sop_instance_uid(tmp_path, dicom_dir, dicom_headers, shared_data):
    labels = tmp_path / "labels.csv"
    lines = ["sop_instance_uid,label"] + [f"{h['SOPInstanceUID']},{h['folder']}" for h in dicom_headers]
    write_csv(labels, "\n".join(lines) + "\n")
    manifest = scan_dicom_folder(dicom_dir, shared_data, labels)
    assert manifest.problems == ()
    assert Counter(row.label for row in manifest.rows) == {"77654033": 7, "98892001": 7, "98892003": 17}
    assert all(row.path.split("/")[3] == row.label for row in manifest.rows)
    assert sorted(row.path for row in manifest.rows) == sorted(h["path"] for h in dicom_headers)
    assert [row.path for row in manifest.rows] == sorted(row.path for row in manifest.rows)
    assert not any(row.path.endswith("DICOMDIR") for row in manifest.rows)
    by_path = {h["path"]: h for h in dicom_headers}
    assert all(row.sop_instance_uid == by_path[row.path]["SOPInstanceUID"] for row in manifest.rows)
    assert all(row.patient_id == by_path[row.path]["PatientID"] for row in manifest.rows)
    assert manifest.attribute_names == ("sex", "age", "manufacturer", "modality")
    assert manifest.source == (
        "DICOM folder dicom_samples/pydicom_test_files/dicomdirtests/ joined on SOPInstanceUID"
    )
    assert not manifest.has_split_column
    ct = [row for row in manifest.rows if row.label == "98892001"]
    assert {(row.attributes["sex"], row.attributes["age"], row.attributes["modality"]) for row in ct} == {
        ("M", "43", "CT")
    }
    first = [row for row in manifest.rows if row.label == "77654033"]
    assert {row.attributes["sex"] for row in first} == {""}
    assert {row.attributes["age"] for row in first} == {"47", "42"}
    assert all(row.attributes["manufacturer"] for row in manifest.rows)


def test_scan_joined_on_patient_id(tmp_path, dicom_dir, shared_data):
    text = "PatientID;label;split\n77654033;sick;Training\n98890234;healthy;\n"
    labels = write_csv(tmp_path / "labels.csv", text)
    manifest = scan_dicom_folder(dicom_dir, shared_data, labels, join_key="patient-id")
    assert manifest.problems == ()
    assert Counter(row.patient_id for row in manifest.rows) == {"77654033": 7, "98890234": 24}
    assert Counter(row.label for row in manifest.rows) == {"sick": 7, "healthy": 24}
    assert {row.split for row in manifest.rows if row.label == "sick"} == {"train"}
    assert manifest.has_split_column
    assert all(row.line in (2, 3) for row in manifest.rows)


def test_csv_attributes_override_tags_and_patient_id(tmp_path, dicom_dir, shared_data):
    labels = write_csv(
        tmp_path / "labels.csv",
        "PatientID,label,sex,race\n77654033,a,F,Black\n98890234,b,,White\n",
    )
    manifest = scan_dicom_folder(dicom_dir, shared_data, labels, join_key="patient-id")
    assert manifest.attribute_names == ("sex", "race", "age", "manufacturer", "modality")
    first = {(row.attributes["sex"], row.attributes["race"]) for row in manifest.rows if row.label == "a"}
    assert first == {("F", "Black")}
    # the CSV column wins for every row, even where it is empty
    assert {row.attributes["sex"] for row in manifest.rows if row.label == "b"} == {""}
    assert {row.attributes["age"] for row in manifest.rows if row.label == "b"} == {"43", "45"}


def test_unmatched_files_reported(tmp_path, dicom_dir, shared_data):
    labels = write_csv(tmp_path / "labels.csv", "PatientID,label\n77654033,a\n0098890234,b\n")
    manifest = scan_dicom_folder(dicom_dir, shared_data, labels, join_key="patient-id")
    assert len(manifest.rows) == 7
    assert kinds(manifest) == ["no-label-match"] * 24
    assert all(problem.line == 0 for problem in manifest.problems)
    assert "98892003/MR1/15820" in " ".join(problem.detail for problem in manifest.problems)
    assert "'98890234' is not in labels CSV labels.csv" in manifest.problems[0].detail


def test_labels_csv_problems_and_accession_join(tmp_path, dicom_dir, shared_data):
    labels = write_csv(
        tmp_path / "labels.csv",
        "AccessionNumber,diagnosis\n2,x\n134,\n,y\n2,x\n428,z\n",
    )
    manifest = scan_dicom_folder(
        dicom_dir, shared_data, labels, join_key="accession-number", label_column="Diagnosis"
    )
    assert [(problem.line, problem.kind) for problem in manifest.problems] == [
        (3, "empty-label"), (4, "empty-key"), (5, "duplicate-row"),
    ] + [(0, "no-label-match")] * 4
    assert Counter(row.label for row in manifest.rows) == {"x": 25, "z": 2}


def test_scan_extra_attribute_tag(tmp_path, dicom_dir, shared_data):
    labels = write_csv(tmp_path / "labels.csv", "patient_id,label\n77654033,a\n")
    manifest = scan_dicom_folder(
        dicom_dir, shared_data, labels, join_key="patient-id",
        attribute_tags=("PatientSex", "BodyPartExamined"),
    )
    assert manifest.attribute_names == ("sex", "body_part_examined")


def test_scan_configuration_errors(tmp_path, dicom_dir, shared_data):
    labels = write_csv(tmp_path / "labels.csv", "sop_instance_uid,label\n1.2.3,a\n")
    with pytest.raises(ConfigError, match="sop-instance-uid"):
        scan_dicom_folder(dicom_dir, shared_data, labels, join_key="uid")
    with pytest.raises(ManifestError, match="labels CSV"):
        scan_dicom_folder(dicom_dir, shared_data, None)
    with pytest.raises(ConfigError, match="NotATag"):
        scan_dicom_folder(dicom_dir, shared_data, labels, attribute_tags=("NotATag",))
    with pytest.raises(ManifestError, match="not inside the data root"):
        scan_dicom_folder(dicom_dir, tmp_path, labels)
    with pytest.raises(ManifestError, match="has no PatientID column"):
        scan_dicom_folder(dicom_dir, shared_data, labels, join_key="patient-id")
    with pytest.raises(ManifestError, match="not found"):
        scan_dicom_folder(tmp_path / "nope", tmp_path, labels)
    assert set(JOIN_KEYS) == {"sop-instance-uid", "accession-number", "patient-id"}
    assert DEFAULT_ATTRIBUTE_TAGS == ("PatientSex", "PatientAge", "Manufacturer", "Modality")


def test_scan_bad_files_reported_not_fatal(tmp_path, dicom_dir):
    source = one_dicom_file(dicom_dir)
    data = source.read_bytes()
    folder = tmp_path / "dicom" / "site"
    (folder / "sub").mkdir(parents=True)
    (folder / "good").write_bytes(data)
    (folder / "x.dcm").write_text("this is not DICOM\n")
    (folder / "sub" / "truncated").write_bytes(data[:200])
    (folder / "sub" / "cut_pixels").write_bytes(data[:-10])
    (folder / ".hidden").write_bytes(data)
    (folder / "DICOMDIR").write_bytes(data)
    no_pixels = pydicom.dcmread(source)
    del no_pixels.PixelData
    no_pixels.SOPInstanceUID = "1.2.3.4"
    no_pixels.save_as(folder / "report")
    child = pydicom.dcmread(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'female' is not a valid CS value: the scan must cope anyway
        child.PatientAge, child.PatientSex, child.SOPInstanceUID = "006M", "female", "1.2.3.5"
    child.save_as(folder / "sub" / "child")
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    labels = write_csv(tmp_path / "labels.csv", f"SOPInstanceUID,label\n{uid},a\n1.2.3.4,b\n1.2.3.5,c\n")
    manifest = scan_dicom_folder(tmp_path / "dicom", tmp_path, labels)
    assert [(row.path, row.label) for row in manifest.rows] == [
        ("dicom/site/good", "a"), ("dicom/site/sub/child", "c"),
    ]
    assert manifest.rows[1].attributes["age"] == "0.5" and manifest.rows[1].attributes["sex"] == "F"
    problems = {problem.detail.split(":")[0]: problem for problem in manifest.problems}
    assert {path: problem.kind for path, problem in problems.items()} == {
        "dicom/site/report": "no-pixel-data",
        "dicom/site/sub/cut_pixels": "unreadable-header",
        "dicom/site/sub/truncated": "unreadable-header",
        "dicom/site/x.dcm": "unreadable-header",
    }
    assert "not a DICOM file" in problems["dicom/site/x.dcm"].detail
    assert "truncated" in problems["dicom/site/sub/cut_pixels"].detail
    assert all(problem.line == 0 for problem in manifest.problems)


# ---------------------------------------------------------------------------
# ages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45.0), ("45y", 45.0), ("6M", 0.5), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25),
     ("45", 45.0), ("45.5", 45.5), (" 130 ", 130.0), ("000Y", 0.0), ("", None), ("unknown", None),
     ("-5", None), ("131", None), ("200Y", None), ("nan", None), ("45Z", None)],
)
def test_parse_age_years(value, years):
    result = parse_age_years(value)
    assert result == (None if years is None else pytest.approx(years))


def test_age_bands_names_and_labels():
    bands = AgeBands((40, 60))
    assert bands.names == ("<=40", "41-60", ">60")
    assert [bands.label(age) for age in (0, 39.9, 40, 40.5, 41, 60, 60.5, 99)] == [
        "<=40", "<=40", "<=40", "41-60", "41-60", "41-60", ">60", ">60",
    ]
    assert AgeBands((18,)).names == ("<=18", ">18")
    assert AgeBands([40.5, 60]).names == ("<=40.5", "40.5-60", ">60")
    assert AgeBands((40.0, 65.0)).edges == (40.0, 65.0)


@pytest.mark.parametrize("edges", [(), (60, 40), (40, 40), (-1, 40), (math.nan,), ("old",)])
def test_age_bands_bad_edges_raise(edges):
    with pytest.raises(ConfigError):
        AgeBands(edges)


def test_bin_ages(tmp_path):
    manifest = read(tmp_path, "path,label,age\na,1,045Y\nb,1,\nc,1,unknown\nd,1,70\ne,1,6M\n")
    binned = bin_ages(manifest, AgeBands((40, 60)))
    assert [row.attributes["age_band"] for row in binned.rows] == ["41-60", "", "", ">60", "<=40"]
    assert binned.attribute_names == ("age", "age_band")
    assert "age_band" not in manifest.rows[0].attributes
    again = bin_ages(binned, AgeBands((50,)))
    assert again.attribute_names == ("age", "age_band")
    assert again.rows[0].attributes["age_band"] == "<=50"
    with pytest.raises(ConfigError, match="no 'years' attribute"):
        bin_ages(manifest, AgeBands((40,)), column="years")


# ---------------------------------------------------------------------------
# patient-level splits
# ---------------------------------------------------------------------------


def random_rows(rng: np.random.Generator) -> list[ManifestRow]:
    """A random manifest: patients with 1-5 images, some without ids, some with a fixed split."""
    rows = []
    for patient in range(int(rng.integers(1, 40))):
        fixed = str(rng.choice(SPLIT_NAMES)) if rng.random() < 0.2 else ""
        pid = "" if rng.random() < 0.1 else f"P{patient}"
        for image in range(int(rng.integers(1, 6))):
            rows.append(ManifestRow(0, f"p{patient}/{image}.png", "a", patient_id=pid, split=fixed))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


@pytest.mark.parametrize("seed", range(8))
def test_no_patient_in_two_splits(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(5):
        rows = random_rows(rng)
        splits = assign_splits(rows, seed=seed)
        assert len(splits) == len(rows) and set(splits) <= set(SPLIT_NAMES)
        assert patients_in_several_splits(rows, splits) == {}
        assert all(split == row.split for row, split in zip(rows, splits) if row.split)


def test_fractions_respected_on_200_patients():
    rng = np.random.default_rng(7)
    rows = [
        ManifestRow(0, f"p{p}/{i}.png", "a", patient_id=f"p{p}")
        for p in range(200)
        for i in range(int(rng.integers(1, 5)))
    ]
    counts = Counter(assign_splits(rows, seed=3))
    for name, fraction in zip(SPLIT_NAMES, DEFAULT_FRACTIONS):
        assert abs(counts[name] - fraction * len(rows)) <= 0.02 * len(rows)
    counts = Counter(assign_splits(rows, (0.8, 0.2, 0.0), seed=3))
    assert counts["test"] == 0 and abs(counts["val"] - 0.2 * len(rows)) <= 0.02 * len(rows)


def test_every_split_gets_a_patient():
    rows = make_rows(1, images=50, prefix="big") + make_rows(2, images=1)
    for seed in range(5):
        splits = assign_splits(rows, seed=seed)
        assert set(splits) == set(SPLIT_NAMES)
        assert {split for row, split in zip(rows, splits) if row.patient_id == "big0"} == {"train"}
    assert set(assign_splits(make_rows(2), seed=0)) <= set(SPLIT_NAMES)
    assert assign_splits([], seed=0) == ()


def test_fixed_splits_kept_and_patient_follows_them():
    rows = [
        ManifestRow(0, "a1", "x", patient_id="A", split="test"),
        ManifestRow(0, "a2", "x", patient_id="A"),
        ManifestRow(0, "b1", "x", patient_id="B", split="val"),
        ManifestRow(0, "b2", "x", patient_id="B", split="train"),
        ManifestRow(0, "b3", "x", patient_id="B", split="val"),
        ManifestRow(0, "b4", "x", patient_id="B"),
    ] + make_rows(20)
    splits = assign_splits(rows, seed=1)
    assert splits[:6] == ("test", "test", "val", "train", "val", "val")
    assert patients_in_several_splits(rows, splits) == {"B": ("train", "val")}


def test_rows_without_patient_are_separate_patients():
    rows = [ManifestRow(0, f"img{i}.png", "a") for i in range(100)]
    counts = Counter(assign_splits(rows, seed=0))
    assert counts == {"train": 70, "val": 15, "test": 15}


def test_splits_deterministic_order_independent_and_seeded():
    rows = random_rows(np.random.default_rng(5)) + make_rows(30, images=2, prefix="Q")
    first = assign_splits(rows, seed=11)
    assert assign_splits(rows, seed=11) == first
    by_path = dict(zip((row.path for row in rows), first))
    shuffled = list(reversed(rows))
    assert [by_path[row.path] for row in shuffled] == list(assign_splits(shuffled, seed=11))
    assert assign_splits(rows, seed=12) != first


def test_splits_independent_of_hash_seed():
    code = (
        "import json; from medfed.common.intake.manifest import ManifestRow; "
        "from medfed.common.intake.patient_split import assign_splits; "
        "rows = [ManifestRow(0, f'p{i % 37}/{i}', 'a', patient_id=f'id{i % 37}' if i % 5 else '') "
        "for i in range(150)]; print(json.dumps(assign_splits(rows, seed=4)))"
    )
    results = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(done.stdout))
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "fractions",
    [(0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (-0.1, 0.6, 0.5), (0.5, 0.5), (math.nan, 0.5, 0.5), ("a", 0, 0)],
)
def test_bad_fractions_raise(fractions):
    with pytest.raises(ConfigError):
        assign_splits(make_rows(5), fractions, seed=0)


def test_bad_split_value_in_rows_raises():
    with pytest.raises(DataError, match="holdout"):
        assign_splits([ManifestRow(3, "a", "x", split="holdout")])


def test_patients_in_several_splits_finds_planted_leak():
    rows = make_rows(10, images=2)
    splits = list(assign_splits(rows, seed=0))
    leaked = rows[4].patient_id
    index = next(i for i, row in enumerate(rows) if row.patient_id == leaked and i != 4)
    splits[index] = "test" if splits[4] != "test" else "train"
    assert patients_in_several_splits(rows, splits) == {leaked: tuple(sorted({splits[4], splits[index]}))}
    unknown = [ManifestRow(0, "a", "x"), ManifestRow(0, "b", "x")]
    assert patients_in_several_splits(unknown, ["train", "test"]) == {}
    with pytest.raises(DataError, match="one split per row"):
        patients_in_several_splits(rows, splits[:-1])


def test_modules_import_without_heavy_dependencies():
    code = (
        "import sys, medfed.common.intake.manifest, medfed.common.intake.patient_split; "
        "print(','.join(m for m in ('torch', 'monai', 'pydicom', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""

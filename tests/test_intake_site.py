"""Site intake end to end: site.yaml, QC on bad input, training data, cache, patient splits."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from medfed.common.cli import main
from medfed.common.errors import ConfigError, DataError
from medfed.common.intake.patient_split import patients_in_several_splits
from medfed.common.intake.qc import check_site
from medfed.common.intake.site_dataset import build_site_data
from medfed.common.intake.site_images import load_site_manifest, row_splits
from medfed.common.site_config import load_site_config, parse_site_config

from tests.intake_factory import (
    class_image,
    dicom_site,
    write_dicom,
    write_manifest,
    write_png,
    write_site_yaml,
)

LABELS = ["normal", "abnormal"]


def _tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- site.yaml
def test_site_yaml_keys_from_the_issue(tmp_path):
    path = write_site_yaml(tmp_path / "site.yaml", **{
        "site-id": "hosp-a", "data-root": "data", "manifest": "m.csv", "task": "classification",
        "labels": ["normal", "pneumonia"], "state-dir": "state", "age-bands": [40, 60],
    })
    site = load_site_config(path)
    assert site.dataset == "manifest"  # inferred from the manifest key
    assert site.labels == ("normal", "pneumonia") and site.age_bands == (40.0, 60.0)
    assert Path(site.data_root) == (tmp_path / "data").resolve()
    assert site.data_path(site.manifest) == (tmp_path / "data" / "m.csv").resolve()
    # node config values are scalars: lists arrive comma-separated
    flat = parse_site_config({"site-id": "a", "data-root": "d", "state-dir": "s", "manifest": "m.csv",
                              "labels": "normal, pneumonia"})
    assert flat.labels == ("normal", "pneumonia")


@pytest.mark.parametrize("keys, needle", [
    ({}, "give exactly one of manifest"),
    ({"manifest": "m.csv"}, "must declare its label set"),
    ({"manifest": "m.csv", "labels": ["a", "a"]}, "at least two distinct names"),
    ({"manifest": "m.csv", "dicom-dir": "d", "labels": LABELS}, "give exactly one of"),
    ({"dicom-dir": "d", "labels": LABELS}, "needs labels-csv"),
    ({"manifest": "m.csv", "labels": LABELS, "window-center": 40}, "go together"),
    ({"manifest": "m.csv", "labels": LABELS, "window-center": 40, "window-width": 0}, "positive"),
    ({"manifest": "m.csv", "labels": LABELS, "split-fractions": [0.5, 0.5, 0.5]}, "sum to 1"),
    ({"manifest": "m.csv", "labels": LABELS, "age-bands": [60, 40]}, "increasing"),
    ({"manifest": "m.csv", "labels": LABELS, "channels": 2}, "channels='2'"),
    ({"dicom-dir": "d", "labels-csv": "l.csv", "labels": LABELS, "label-join": "name"}, "label-join"),
    ({"manifest": "m.csv", "labels": [["nested"], "b"]}, "list of plain values"),
])
def test_bad_site_yaml_names_the_key(tmp_path, keys, needle):
    path = write_site_yaml(tmp_path / "site.yaml", **{"site-id": "a", "data-root": ".", "state-dir": "s", **keys})
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert needle in str(err.value)


# --------------------------------------------------------------------------- bad input
@pytest.fixture()
def messy_site(tmp_path, shared_data):
    """A PNG + DICOM site holding every kind of bad input the issue lists."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    rows = []
    for p in range(10):  # 10 good patients x 2 PNGs
        for i in range(2):
            label = (p + i) % 2
            rel = f"png/p{p}_{i}.png"
            write_png(data / rel, class_image(label, rng))
            rows.append({"path": rel, "label": LABELS[label], "patient_id": f"P{p}", "sex": "F" if p % 2 else "M",
                         "split": ["train", "train", "train", "val", "test"][p % 5], "race": "" if p == 3 else "x"})
    ct = shared_data / "dicom_samples" / "pydicom_test_files" / "CT_small.dcm"
    shutil.copy(ct, data / "ct.dcm")
    (data / "truncated.dcm").write_bytes(ct.read_bytes()[:1000])
    (data / "not_dicom.dcm").write_text("this is a text file, not DICOM")
    write_dicom(data / "no_pixels.dcm", np.zeros((4, 4)), patient_id="Q1", with_pixels=False)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    shutil.copy(data / "png/p0_0.png", data / "copy_of_p0_0.png")  # identical pixels
    shutil.copy(ct, data / "ct_again.dcm")  # same SOPInstanceUID
    bad = [
        {"path": "ct.dcm", "label": "normal", "patient_id": "C1", "split": "train"},
        {"path": "truncated.dcm", "label": "normal", "patient_id": "C2", "split": "train"},
        {"path": "not_dicom.dcm", "label": "normal", "patient_id": "C3", "split": "train"},
        {"path": "no_pixels.dcm", "label": "normal", "patient_id": "C4", "split": "train"},
        {"path": "broken.png", "label": "abnormal", "patient_id": "C5", "split": "train"},
        {"path": "missing/gone.png", "label": "abnormal", "patient_id": "C6", "split": "train"},
        {"path": "png/p1_0.png", "label": "cancer", "patient_id": "P1", "split": "train"},  # outside the set
        dict(rows[2]),  # an exact duplicate row
        {"path": "copy_of_p0_0.png", "label": "normal", "patient_id": "P0", "split": "test"},  # P0 in 2 splits
        {"path": "ct_again.dcm", "label": "normal", "patient_id": "C1", "split": "train"},
    ]
    write_manifest(data / "manifest.csv", rows + bad)
    return write_site_yaml(tmp_path / "site.yaml", **{
        "site-id": "messy", "data-root": "data", "manifest": "manifest.csv", "labels": LABELS,
        "state-dir": "state", "image-size": 32, "group-attribute": "sex",
    })


def test_site_check_lists_every_problem_and_training_skips_them(messy_site):
    site = load_site_config(messy_site)
    before = _tree_digest(Path(site.data_root))
    report = check_site(site)
    p = report.problems
    unreadable = {e["path"]: e["reason"] for e in p["unreadable"]}
    assert set(unreadable) == {"truncated.dcm", "not_dicom.dcm", "no_pixels.dcm", "broken.png"}
    assert "truncated" in unreadable["truncated.dcm"].lower()
    assert "not a dicom" in unreadable["not_dicom.dcm"].lower()
    assert "pixel data" in unreadable["no_pixels.dcm"].lower()
    assert "png" in unreadable["broken.png"].lower()
    assert [e["path"] for e in p["missing-files"]] == ["missing/gone.png"]
    assert p["labels-outside-set"] == {"cancer": 1}
    assert [x["kind"] for x in p["manifest"]] == ["duplicate-row"]
    dups = {d["kind"]: d for d in p["duplicates"]}
    assert dups["pixels"]["kept"] == "png/p0_0.png" and dups["pixels"]["skipped"] == ["copy_of_p0_0.png"]
    assert dups["sop-instance-uid"]["skipped"] == ["ct_again.dcm"]
    assert {"patient_id": "P0", "splits": ["test", "train"]} in p["patients-in-several-splits"]
    assert p["missing-attributes"]["race"] == 2 + 1  # patient 3's two images, and ct.dcm
    assert report.ok and report.usable == 21  # 20 PNGs + ct.dcm
    assert report.counts["split"] == {"test": 4, "train": 13, "val": 4}
    assert report.images["kind"] == {"png": 20, "dicom": 1}
    assert report.images["modality"]["CT"] == 1
    assert len(report.warnings) >= 6
    json.dumps(report.to_dict())  # JSON-able

    info, data, summary = build_site_data(site)  # the same policy in training
    assert (len(data.train), len(data.val), len(data.test)) == (13, 4, 4)
    assert summary.skipped == {"duplicate-row": 1, "unreadable": 4, "missing-file": 1, "label-outside-set": 1,
                               "duplicate-pixels": 1, "duplicate-sop-instance-uid": 1}
    assert info.label_names == tuple(LABELS) and info.image_size == 32 and info.in_channels == 1
    assert info.group_name == "sex" and set(info.group_values) == {"F", "M", "unknown"}
    assert _tree_digest(Path(site.data_root)) == before  # read-only: nothing changed or added


def test_site_check_cli_writes_report_and_exit_codes(messy_site, tmp_path, capsys):
    out = tmp_path / "qc.json"
    assert main(["site", "check", "--config", str(messy_site), "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unreadable: truncated.dcm" in printed and "result: OK" in printed
    assert json.loads(out.read_text())["usable"] == 21
    # fatal: a manifest without a label column
    data = tmp_path / "data"
    (data / "nolabel.csv").write_text("path,diagnosis\npng/p0_0.png,normal\n")
    bad = write_site_yaml(tmp_path / "bad.yaml", **{"site-id": "b", "data-root": "data", "manifest": "nolabel.csv",
                                                    "labels": LABELS, "state-dir": "state-b"})
    assert main(["site", "check", "--config", str(bad)]) == 1
    captured = capsys.readouterr()
    assert "label" in captured.err and "FATAL" in captured.out
    assert json.loads((tmp_path / "state-b" / "qc-report.json").read_text())["ok"] is False
    # fatal: no usable image
    (data / "gone.csv").write_text("path,label\nnope.png,normal\n")
    gone = write_site_yaml(tmp_path / "gone.yaml", **{"site-id": "g", "data-root": "data", "manifest": "gone.csv",
                                                      "labels": LABELS, "state-dir": "state-g"})
    assert main(["site", "check", "--config", str(gone)]) == 1
    assert "no usable image" in capsys.readouterr().err
    with pytest.raises(DataError, match="none of the 1 manifest rows"):
        build_site_data(load_site_config(gone))
    # a config error is exit 2
    assert main(["site", "check", "--config", str(tmp_path / "absent.yaml")]) == 2


# --------------------------------------------------------------------------- splits and cache
def test_patient_level_splits_when_the_manifest_has_none(tmp_path):
    site = load_site_config(dicom_site(tmp_path, n_patients=12, images_per_patient=3))
    manifest = load_site_manifest(site)
    splits = row_splits(site, manifest)
    assert set(splits) == {"train", "val", "test"}
    assert patients_in_several_splits(manifest.rows, splits) == {}
    _, data, _ = build_site_data(site)
    assert len(data.train) + len(data.val) + len(data.test) == 36
    assert len(data.train) >= 18  # about 70 % of whole patients


def test_cache_makes_later_reads_skip_decoding(tmp_path, monkeypatch):
    site = load_site_config(dicom_site(tmp_path, n_patients=6, images_per_patient=2))
    _, first, s1 = build_site_data(site)
    assert s1.cache_hits == 0
    from medfed.common.intake import readers

    def no_decoding(*a, **k):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(readers, "read_image", no_decoding)
    _, again, s2 = build_site_data(site)
    assert s2.cache_hits == 12
    np.testing.assert_array_equal(first.train.images, again.train.images)
    monkeypatch.undo()
    # an edited file is a miss, not a stale hit
    victim = next(Path(site.data_root).rglob("*.dcm"))
    write_dicom(victim, np.full((48, 48), 7), patient_id="PID-X")
    _, _, s3 = build_site_data(site)
    assert s3.cache_hits == 11


def test_cache_is_bounded_on_disk(tmp_path):
    path = dicom_site(tmp_path, n_patients=6, images_per_patient=2)
    text = path.read_text() + "cache-max-mb: 0.02\n"  # room for about 4 images of 32x32 float32
    path.write_text(text)
    site = load_site_config(path)
    build_site_data(site)
    cached = list((Path(site.state_dir) / "cache").rglob("*.npy"))
    assert 1 <= len(cached) <= 5
    assert sum(p.stat().st_size for p in cached) <= 0.02e6
    _, _, s2 = build_site_data(site)
    assert s2.cache_hits == len(cached)


def test_deploy_site_examples_parse():
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    sites = {p.name: load_site_config(p) for p in sorted(deploy.glob("site*.yaml"))}
    assert {"site-a.yaml", "site-b.yaml", "site-hospital.yaml"} <= set(sites)
    hospital = sites["site-hospital.yaml"]
    assert hospital.dataset == "manifest" and hospital.labels == ("normal", "pneumonia")
    assert hospital.data_path(hospital.manifest) == Path("/data/chest-xray/manifest.csv")


def test_dicom_folder_site_with_tag_attributes(shared_data, tmp_path):
    """A real DICOMDIR tree scanned in place, labels joined on SOPInstanceUID, attributes from tags."""
    import pydicom

    root = shared_data / "dicom_samples" / "pydicom_test_files"
    files = [p for p in (root / "dicomdirtests").rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    labels = tmp_path / "labels.csv"
    with labels.open("w") as f:
        f.write("SOPInstanceUID,label\n")
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            f.write(f"{ds.SOPInstanceUID},{'ct' if ds.Modality == 'CT' else 'other'}\n")
    site = load_site_config(write_site_yaml(tmp_path / "site.yaml", **{
        "site-id": "dicomdir", "data-root": str(root), "dicom-dir": "dicomdirtests",
        "labels-csv": str(labels), "labels": ["other", "ct"], "state-dir": "state",
        "age-bands": [44], "group-attribute": "sex", "image-size": 16,
    }))
    report = check_site(site)
    assert report.ok and report.rows == len(files) == 31 and report.usable == 31
    attrs = report.counts["attributes"]
    assert attrs["modality"] == {"MR": 17, "CT": 11, "CR": 3}
    assert attrs["sex"] == {"M": 24, "(missing)": 7}  # 77654033's PatientSex is empty
    assert attrs["age_band"] == {">44": 20, "<=44": 11}  # 045Y/047Y vs 042Y/043Y
    assert report.images["size"] == {"16x16": 31}
    assert report.problems["missing-attributes"]["sex"] == 7
    info, data, _ = build_site_data(site)
    assert info.group_values == ("M", "unknown")
    assert len(data.train) + len(data.val) + len(data.test) == 31

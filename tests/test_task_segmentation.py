"""Segmentation as a task: the same config, ClientApp, DP ledger, server and run outputs as classification."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from medfed.client.app import app
from medfed.common.arrays import model_to_arrays
from medfed.common.config import StudyConfig, parse_study_config
from medfed.common.errors import ConfigError
from medfed.common.models import ModelSpec, build_model
from medfed.common.segmentation.study import load_segmentation_study
from medfed.common.tasks import get_task, task_of_model
from medfed.server.selection import Selection, pool_validation

from tests.test_client_app import _context
from tests.test_simulate_e2e import medfed

SIZE = 32


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _seg_config(tmp_path, **kw) -> dict:
    base = dict(task="segmentation", num_sites=3, image_size=SIZE, local_steps=2, batch_size=8, lr=0.01,
                out_dir=str(tmp_path))
    return StudyConfig(**{**base, **kw}).to_dict()


def _seg_message(kind: str, config: dict | None = None) -> Message:
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(ModelSpec("unet", 1, 2, SIZE)))
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, **(config or {})})})
    return Message(content, dst_node_id=1, message_type=kind)


# --------------------------------------------------------------------------- config


def test_the_task_picks_its_default_model_and_refuses_the_other_tasks_models():
    assert StudyConfig().model == "cnn"
    assert StudyConfig(task="segmentation").model == "unet"
    assert parse_study_config({"task": "segmentation", "model": "basicunet"}).model == "basicunet"
    with pytest.raises(ConfigError, match="not a segmentation model: choose one of unet, basicunet"):
        StudyConfig(task="segmentation", model="cnn")
    with pytest.raises(ConfigError, match="not a classification model"):
        StudyConfig(model="unet")
    with pytest.raises(ConfigError, match="has no masks"):
        StudyConfig(task="segmentation", dataset="medmnist", data_path="x.npz")
    with pytest.raises(ConfigError, match="holds segmentation masks"):
        StudyConfig(dataset="npz", data_path="x.npz")
    with pytest.raises(ConfigError, match="task='detection' is not allowed"):
        StudyConfig(task="detection")
    assert task_of_model("basicunet") is get_task("segmentation")


def test_selection_uses_the_tasks_metric_when_sites_send_no_histograms():
    per_site = {"a": {"val-dice": 0.6, "num-examples": 30.0}, "b": {"val-dice": 0.9, "num-examples": 10.0}}
    pooled = pool_validation(per_site, score="dice")
    assert pooled.score == pytest.approx((0.6 * 30 + 0.9 * 10) / 40)  # weighted by validation images
    assert pooled.threshold is None
    sel = Selection()
    assert sel.consider(1, pooled) and not sel.consider(2, pool_validation(
        {"a": {"val-dice": 0.5, "num-examples": 30.0}}, score="dice"))


# --------------------------------------------------------------------------- data


def test_npz_study_is_split_iid_and_the_server_keeps_the_whole_test_split(tmp_path):
    rng = np.random.default_rng(0)

    def arrays(n):
        masks = (rng.random((n, SIZE, SIZE)) > 0.7).astype(np.uint8)
        return (rng.random((n, SIZE, SIZE)) * 255).astype(np.uint8), masks

    data = {}
    for split, n in (("train", 31), ("val", 9), ("test", 12)):
        data[f"{split}_images"], data[f"{split}_masks"] = arrays(n)
    path = tmp_path / "seg.npz"
    np.savez(path, **data)
    fed = load_segmentation_study("npz", str(path), 3, seed=0)
    assert [len(s.train) for s in fed.sites] == [11, 10, 10]
    assert sum(len(s.test) for s in fed.sites) == len(fed.central_test) == 12
    # every training image goes to exactly one site
    seen = np.concatenate([s.train.images.reshape(len(s.train), -1) for s in fed.sites])
    assert np.unique(seen, axis=0).shape[0] == 31
    with pytest.raises(ConfigError, match="cannot be shared among num-sites=40"):
        load_segmentation_study("npz", str(path), 40, seed=0)


# --------------------------------------------------------------------------- ClientApp


def test_segmentation_site_trains_and_reports_dice_on_val_and_test_only(tmp_path):
    ctx = _context(_seg_config(tmp_path), {"partition-id": 1, "num-partitions": 3})
    trained = app(_seg_message("train"), ctx)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    fed = load_segmentation_study("synthetic", "", 3, 0, SIZE)
    assert trained.content["metrics"]["num-examples"] == len(fed.sites[1].train)
    sent = _seg_message("train").content["arrays"]
    assert any(not np.array_equal(sent[k].numpy(), trained.content["arrays"][k].numpy()) for k in sent)

    evaluated = app(_seg_message("evaluate"), ctx)
    m = evaluated.content["metrics"]
    for split in ("val", "test"):
        assert 0.0 <= m[f"{split}-dice"] <= 1.0
        assert f"{split}-hd95" in m and m[f"{split}-num-examples"] == len(getattr(fed.sites[1], split))
    assert "val-hist-pos" not in m and not any(k.startswith("train-") for k in m)


def test_segmentation_with_dp_charges_the_ledger(tmp_path):
    ctx = _context(_seg_config(tmp_path, epsilon=4.0, num_server_rounds=2), {"partition-id": 0, "num-partitions": 3})
    replies = [app(_seg_message("train", {"server-round": r}), ctx) for r in (1, 2)]
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    eps = [r.content["metrics"]["epsilon"] for r in replies]
    assert 0 < eps[0] < eps[1] <= 4.0
    assert "train-loss" not in replies[0].content["metrics"]


# --------------------------------------------------------------------------- end to end


def test_simulate_segmentation_writes_test_dice(tmp_path):
    out = tmp_path / "run"
    res = medfed("simulate", "--task", "segmentation", "--sites", "2", "--rounds", "2", "--image-size", str(SIZE),
                 "--local-steps", "6", "--batch-size", "8", "--lr", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["model"]["name"] == "unet"
    assert 0.0 < summary["test"]["dice"] <= 1.0 and "hd95" in summary["test"]
    assert all("test-dice" in row for row in summary["sites"].values())
    report = (out / "report.md").read_text()
    assert "- Task: segmentation" in report and "| dice |" in report and "test-dice" in report


# --------------------------------------------------------------------------- a hospital site's own pairs


def _seg_site(tmp_path, n_patients: int = 8, bad_value: bool = False):
    from PIL import Image

    from tests.intake_factory import write_manifest, write_site_yaml

    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_patients):
        for k in range(2):
            mask = np.zeros((40, 40), np.uint8)
            r, c = rng.integers(8, 32, 2)
            mask[r - 5 : r + 5, c - 5 : c + 5] = 2 if bad_value and p == 0 else 1
            image = (rng.random((40, 40)) * 60 + mask.astype(bool) * 150).astype(np.uint8)
            Image.fromarray(image).save(root / "img" / f"p{p}-{k}.png")
            Image.fromarray(mask).save(root / "img" / f"p{p}-{k}-mask.png")
            rows.append({"path": f"img/p{p}-{k}.png", "mask": f"img/p{p}-{k}-mask.png", "patient_id": f"P{p}",
                         "split": "test" if p == 0 else ""})
    write_manifest(root / "manifest.csv", rows)
    return write_site_yaml(tmp_path / "site.yaml", **{
        "site-id": "hospital-a", "task": "segmentation", "data-root": "data", "manifest": "manifest.csv",
        "labels": ["background", "lesion"], "state-dir": "state", "image-size": SIZE})


def test_a_site_reads_its_image_mask_pairs_and_splits_them_by_patient(tmp_path):
    from medfed.client.site_data import site_runtime
    from medfed.common.site_config import load_site_config

    site = load_site_config(_seg_site(tmp_path))
    runtime = site_runtime(site, StudyConfig(task="segmentation"))
    data = runtime.data
    assert runtime.info.num_classes == 2 and runtime.info.label_names == ("background", "lesion")
    assert sum(len(s) for s in (data.train, data.val, data.test)) == 16
    assert len(data.train) > 0 and data.train.image_shape == (1, SIZE, SIZE)
    assert set(np.unique(data.train.masks)) <= {0, 1}  # nearest resize keeps labels
    # both images of a patient land in the same split: each split holds an even number of images
    assert all(len(s) % 2 == 0 for s in (data.train, data.val, data.test))


def test_a_mask_value_outside_the_declared_classes_stops_the_site(tmp_path):
    from medfed.common.errors import DataError
    from medfed.common.segmentation.site import build_seg_site_data
    from medfed.common.site_config import load_site_config

    with pytest.raises(DataError, match="mask has value 2 but labels declares 2 classes"):
        build_seg_site_data(load_site_config(_seg_site(tmp_path, bad_value=True)))


def test_site_check_reports_a_segmentation_sites_pairs_and_dropped_rows(tmp_path):
    import hashlib

    config = _seg_site(tmp_path)
    root = tmp_path / "data"
    (root / "img" / "p3-1-mask.png").unlink()  # one pair loses its mask
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    res = medfed("site", "check", "--config", str(config))
    assert res.returncode == 0, res.stderr
    assert "usable images 15" in res.stdout and "unreadable-mask" in res.stdout
    report = json.loads((tmp_path / "state" / "qc-report.json").read_text())
    assert report["ok"] and report["usable"] == 15 and report["rows"] == 16
    assert sum(report["counts"]["pairs"].values()) == 15 and report["counts"]["pairs"]["test"] == 2
    assert report["counts"]["label"] == ["background", "lesion"]
    assert 0 < report["counts"]["pixel-share"]["lesion"] < 0.2
    assert [p["kind"] for p in report["problems"]["manifest"]] == ["unreadable-mask"]
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}
    assert after == before  # the data root is only read


def test_site_check_fails_on_mask_values_outside_the_declared_classes(tmp_path):
    res = medfed("site", "check", "--config", str(_seg_site(tmp_path, bad_value=True)))
    assert res.returncode == 1
    assert "mask value(s) [2] outside the declared labels" in res.stdout + res.stderr

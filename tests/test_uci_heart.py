"""UCI Heart Disease (four real hospitals) and the tabular models: loader, config, models, DP, simulate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.common.config import StudyConfig
from medfed.common.data.uci_heart import (
    FEATURES,
    HOSPITALS,
    flamby_train_test,
    is_uci_heart_dir,
    load_uci_heart,
    pooled_moments,
    read_hospital,
)
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, build_model
from medfed.common.tabular import Z_CLIP, FeatureDecode, encode_features

SITES = ("cleveland", "hungary", "switzerland", "va")
# FLamby's published per-center totals: train/test 199/104, 172/89, 30/16, 85/45 (740 rows).
FLAMBY_TRAIN = {"cleveland": 199, "hungary": 172, "switzerland": 30, "va": 85}
FLAMBY_TEST = {"cleveland": 104, "hungary": 89, "switzerland": 16, "va": 45}
POSITIVES = {"cleveland": 139, "hungary": 98, "switzerland": 45, "va": 101}  # num > 0 after dropping rows
MALE = {"cleveland": 206, "hungary": 192, "switzerland": 43, "va": 125}  # sex = 1 after dropping rows


@pytest.fixture(scope="module")
def uci_dir(shared_data: Path) -> Path:
    path = shared_data / "uci_heart_disease"
    if not is_uci_heart_dir(path):
        pytest.skip(f"{path} does not hold the UCI processed.*.data files")
    return path


@pytest.fixture(scope="module")
def fed(uci_dir: Path):
    return load_uci_heart(uci_dir, seed=0)


def _write_uci(folder: Path, rows: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for _, name in HOSPITALS:
        (folder / name).write_text("\n".join(rows.get(name, ["50,1,4,130,250,0,0,150,0,1.0,2,0,3,1"] * 8)) + "\n")
    return folder


# ------------------------------------------------------------------ loader on the real files
def test_four_hospitals_with_flambys_counts(fed):
    assert fed.site_ids == SITES
    assert fed.info.name == "uci-heart" and fed.info.num_classes == 2
    assert (fed.info.in_channels, fed.info.image_size) == (13, 1) and len(FEATURES) == 13
    assert fed.info.group_name == "sex" and fed.info.group_values == ("female", "male")
    for s in fed.sites:
        assert len(s.train) + len(s.val) == FLAMBY_TRAIN[s.site_id]
        assert len(s.test) == FLAMBY_TEST[s.site_id]
        assert len(s.val) == round(0.2 * FLAMBY_TRAIN[s.site_id])
        splits = (s.train, s.val, s.test)
        assert sum(int(x.labels.sum()) for x in splits) == POSITIVES[s.site_id]
        assert sum(int(x.groups.sum()) for x in splits) == MALE[s.site_id]
        for x in splits:
            assert x.images.dtype == np.float32 and x.images.shape[1:] == (13, 1, 1)
            assert np.isfinite(x.images).all() and 0.0 <= x.images.min() and x.images.max() <= 1.0
            assert set(np.unique(x.groups)) <= {0, 1} and set(np.unique(x.labels)) <= {0, 1}
    assert len(fed.central_test) == sum(FLAMBY_TEST.values()) == 254
    assert len(fed.central_val) == sum(len(s.val) for s in fed.sites)


def test_sex_group_is_also_the_sex_feature(fed):
    sex = FEATURES.index("sex")
    for s in fed.sites:
        z = FeatureDecode()(torch.from_numpy(s.train.images)).numpy()
        if len(np.unique(s.train.groups)) == 2:  # higher z-score = male, within each hospital
            assert (z[s.train.groups == 1, sex].min() > z[s.train.groups == 0, sex].max())


def test_split_draws_are_scikit_learns_with_seed_43(uci_dir):
    # Pinned from scikit-learn 1.9 train_test_split(test_size=0.34, random_state=43, stratify=num>0).
    expected = {"cleveland": ([5, 13, 16, 24, 26, 34, 40, 42], 16832),
                "hungary": ([3, 7, 16, 21, 25, 26, 27, 28], 11704),
                "switzerland": ([5, 6, 7, 8, 13, 14, 18, 19], 326),
                "va": ([1, 5, 6, 9, 12, 26, 29, 33], 3089)}
    for site, name in HOSPITALS:
        _, num = read_hospital(uci_dir / name)
        train, test = flamby_train_test((num > 0).astype(np.int64))
        first, total = expected[site]
        assert sorted(test.tolist())[:8] == first and int(test.sum()) == total
        assert len(set(train.tolist()) | set(test.tolist())) == len(num) and not set(train) & set(test)


def _training_z(site) -> np.ndarray:
    rows = np.concatenate([site.train.images, site.val.images])  # FLamby's training rows
    return FeatureDecode()(torch.from_numpy(rows)).double().numpy()


def test_site_scaling_gives_zscores_of_each_hospitals_training_rows(uci_dir):
    for s in load_uci_heart(uci_dir, seed=0, scaling="site").sites:
        z = _training_z(s)
        constant = z.std(axis=0) < 1e-6  # Switzerland's cholesterol is always 0 (missing)
        np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(z[:, ~constant].std(axis=0, ddof=1), 1.0, atol=1e-4)
        assert constant.sum() == (1 if s.site_id == "switzerland" else 0)


def test_federated_scaling_uses_the_pooled_training_rows_statistics(fed):
    z = np.concatenate([_training_z(s) for s in fed.sites])
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0, ddof=1), 1.0, atol=1e-4)
    chol = list(FEATURES).index("chol")  # Switzerland's missing cholesterol (0) stays far below the others
    swiss = _training_z(next(s for s in fed.sites if s.site_id == "switzerland"))
    assert swiss[:, chol].max() < -1.5 and abs(z[:, chol].mean()) < 1e-4


def test_pooled_moments_equal_numpys_on_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (5, 17, 2)]
    mean, std = pooled_moments(parts)
    np.testing.assert_allclose(mean, np.concatenate(parts).mean(axis=0))
    np.testing.assert_allclose(std, np.concatenate(parts).std(axis=0, ddof=1))


def test_unknown_scaling_is_refused(uci_dir):
    with pytest.raises(ConfigError, match="feature-scaling"):
        load_uci_heart(uci_dir, seed=0, scaling="global")


def test_seed_changes_validation_rows_only(uci_dir, fed):
    other = load_uci_heart(uci_dir, seed=1)
    for a, b in zip(fed.sites, other.sites):
        np.testing.assert_array_equal(a.test.images, b.test.images)
        def rows(site):  # FLamby's training rows, in any order
            both = np.concatenate([site.train.images, site.val.images])
            return sorted(map(bytes, both.reshape(len(both), -1)))

        assert rows(a) == rows(b)
    assert any(not np.array_equal(a.val.images, b.val.images) for a, b in zip(fed.sites, other.sites))


# ------------------------------------------------------------------ bad input
def test_missing_file_names_what_is_missing(tmp_path):
    folder = _write_uci(tmp_path / "uci", {})
    (folder / "processed.va.data").unlink()
    assert not is_uci_heart_dir(folder)
    with pytest.raises(DataError, match="processed.va.data missing"):
        load_uci_heart(folder, 0)


@pytest.mark.parametrize("line, needle", [("50,1,4,130", "4 values, expected 14"),
                                          ("50,1,4,130,abc,0,0,150,0,1.0,2,0,3,1", "not a number"),
                                          ("50,2,4,130,250,0,0,150,0,1.0,2,0,3,1", "sex must be 0")])
def test_malformed_rows_are_refused_with_file_and_line(tmp_path, line, needle):
    good = "50,1,4,130,250,0,0,150,0,1.0,2,0,3,1"
    rows = [good, "40,0,2,120,200,0,1,160,0,0,?,?,?,0", line] * 3
    folder = _write_uci(tmp_path / "uci", {"processed.hungarian.data": rows})
    with pytest.raises(DataError, match=needle) as err:
        load_uci_heart(folder, 0)
    assert "processed.hungarian.data" in str(err.value)


def test_rows_with_missing_kept_values_are_dropped(tmp_path):
    complete = ["50,1,4,130,250,0,0,150,0,1.0,?,?,?,1", "40,0,2,120,200,0,1,160,0,0,?,?,?,0"] * 6
    folder = _write_uci(tmp_path / "uci", {"processed.va.data": complete + ["41,1,2,?,200,0,1,160,0,0,1,0,3,0"] * 5})
    raw, num = read_hospital(folder / "processed.va.data")
    assert raw.shape == (12, 10) and num.tolist() == [1.0, 0.0] * 6  # slope/ca/thal ignored, '?' rows dropped


# ------------------------------------------------------------------ config
def test_uci_heart_config_defaults_to_logistic_regression(uci_dir):
    cfg = StudyConfig(dataset="uci-heart", data_path=str(uci_dir), partition="natural")
    assert cfg.model == "logreg"
    assert StudyConfig(dataset="uci-heart", data_path=str(uci_dir), partition="natural", model="mlp").model == "mlp"


@pytest.mark.parametrize("kw, needle", [
    ({"model": "cnn"}, "feature vectors, not images"),
    ({"partition": "dirichlet"}, "partition natural"),
    ({"num_sites": 3}, "4 hospitals"),
    ({"data_path": ""}, "needs data-path"),
])
def test_bad_uci_heart_config(kw, needle):
    base = {"dataset": "uci-heart", "data_path": "/x", "partition": "natural", **kw}
    with pytest.raises(ConfigError, match=needle):
        StudyConfig(**base)


def test_tabular_model_refuses_image_datasets():
    with pytest.raises(ConfigError, match="reads feature vectors"):
        StudyConfig(model="logreg")  # synthetic images
    with pytest.raises(ConfigError, match="reads feature vectors"):
        build_model(ModelSpec("mlp", 1, 2, 28))


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("name, params", [("logreg", 13 * 2 + 2), ("mlp", 13 * 16 + 16 + 16 * 2 + 2)])
def test_tabular_model_shapes(name, params):
    model = build_model(ModelSpec(name, 13, 2, 1))
    x = torch.from_numpy(encode_features(np.random.default_rng(0).normal(size=(5, 13))))
    assert model(x).shape == (5, 2)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not list(model.buffers())  # nothing about the data travels in the model


def test_encoding_round_trips_and_clips():
    z = np.array([[0.0, 1.5, -3.25, Z_CLIP + 5, -Z_CLIP - 1]])
    x = encode_features(z)
    assert x.shape == (1, 5, 1, 1) and x.min() == 0.0 and x.max() == 1.0
    back = FeatureDecode()(torch.from_numpy(x)).numpy()[0]
    np.testing.assert_allclose(back, [0.0, 1.5, -3.25, Z_CLIP, -Z_CLIP], atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        encode_features(np.array([[np.nan]]))


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_tabular_models_pass_the_dp_checks(name, fed):
    from medfed.common.dp.model_check import check_per_sample_gradients, prepare_dp_model

    model = prepare_dp_model(build_model(ModelSpec(name, 13, 2, 1)))
    check_per_sample_gradients(model, torch.from_numpy(fed.sites[0].train.images[:3]), 2)  # raises if inexact


def test_dp_sgd_round_with_the_mlp_at_a_hospital(tmp_path, uci_dir):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from medfed.client.app import app
    from medfed.common.arrays import model_to_arrays

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = StudyConfig(dataset="uci-heart", data_path=str(uci_dir), partition="natural", model="mlp", local_steps=5,
                      batch_size=16, lr=0.01, epsilon=3.0, num_server_rounds=2, out_dir=str(tmp_path)).to_dict()
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                  run_config=cfg)
    torch.manual_seed(0)
    sent = model_to_arrays(build_model(ModelSpec("mlp", 13, 2, 1)))
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), dst_node_id=1,
                  message_type="train")
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content["metrics"]
    assert reply.content["site"]["site-id"] == "hungary" and m["num-examples"] == 138
    assert 0 < m["epsilon"] <= 3.0 and m["noise-multiplier"] > 0 and "train-loss" not in m
    got = reply.content["arrays"]
    assert any(not np.array_equal(sent[k].numpy(), got[k].numpy()) for k in sent)


# ------------------------------------------------------------------ end to end
def test_cli_detects_the_uci_folder(uci_dir, tmp_path):
    from medfed.common.cli import build_parser, study_from_args

    args = build_parser().parse_args(["simulate", "--data", str(uci_dir), "--partition", "natural",
                                      "--out", str(tmp_path)])
    cfg = study_from_args(args)
    assert (cfg.dataset, cfg.model, cfg.num_sites) == ("uci-heart", "logreg", 4)
    assert cfg.data_path == str(uci_dir.resolve())


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_baselines_run_from_the_uci_folder(tmp_path, uci_dir, mode):
    from medfed.simulations.baselines import run_baseline

    cfg = StudyConfig(dataset="uci-heart", data_path=str(uci_dir), partition="natural", model="mlp", mode=mode,
                      num_server_rounds=2, local_steps=5, batch_size=8, lr=0.01, out_dir=str(tmp_path))
    summary = run_baseline(cfg)
    assert summary["dataset"]["name"] == "uci-heart" and set(summary["sites"]) == set(SITES)
    assert {s: r["num-examples"] for s, r in summary["sites"].items()} == {
        "cleveland": 159, "hungary": 138, "switzerland": 24, "va": 68}
    reported = {s for s, r in summary["sites"].items() if "test-accuracy" in r}
    assert {"cleveland", "hungary"} <= reported, "sites with >= min-eval-n (20) test patients report"
    assert "switzerland" not in reported, "24 training patients: its test split is below min-eval-n"
    assert all(0.0 <= summary["sites"][s]["test-accuracy"] <= 1.0 for s in reported)
    if mode == "centralized":
        assert (tmp_path / "model.pt").is_file()
    else:  # each hospital's own model is kept, e.g. to test it at the other hospitals
        assert all((tmp_path / "sites" / s / "model.pt").is_file() for s in SITES)


def test_simulate_natural_split_on_the_simulation_engine(tmp_path, uci_dir):  # ~14 s (Ray start)
    from tests.test_simulate_e2e import medfed

    out = tmp_path / "fed"
    res = medfed("simulate", "--data", str(uci_dir), "--partition", "natural", "--rounds", "2", "--local-steps", "5",
                 "--batch-size", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "logreg" and summary["model"]["in_channels"] == 13
    assert set(summary["sites"]) == set(SITES) and summary["test"]["num-examples"] == 254
    assert summary["sites"]["switzerland"]["num-examples"] == 24

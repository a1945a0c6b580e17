"""Volumetric (3D) segmentation: data contract, synthetic volumes, .npz volumes, 3D U-Net, DP check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfed.common.config import parse_study_config
from medfed.common.data.splits import DatasetInfo
from medfed.common.dp.model_check import check_per_sample_gradients, prepare_dp_model
from medfed.common.errors import ConfigError, DataError
from medfed.common.models import ModelSpec, build_model, model_spec
from medfed.common.segmentation.data import SegSplit
from medfed.common.segmentation.losses import seg_loss
from medfed.common.segmentation.metrics import evaluate_segmentation
from medfed.common.segmentation.npz import NPZ_KEYS, load_segmentation_npz
from medfed.common.segmentation.study import load_segmentation_study
from medfed.common.segmentation.synthetic import make_synthetic_segmentation


@pytest.fixture(scope="module")
def vol16():
    return make_synthetic_segmentation(2, seed=3, image_size=16, sizes=[6, 4], spatial_dims=3)


def test_synthetic_volumes_have_cubic_shapes_binary_masks_and_shift(vol16):
    assert vol16.info.spatial_dims == 3 and vol16.info.image_size == 16
    for site in vol16.sites:
        assert site.train.images.shape[1:] == (1, 16, 16, 16)
        assert site.train.masks.shape[1:] == (16, 16, 16)
        assert site.train.spatial_dims == 3
        assert set(np.unique(site.train.masks)) <= {0, 1} and site.train.masks.any()
    # sites are different scanners: the brightest background differs
    bg = [float(s.train.images[:, 0][s.train.masks == 0].mean()) for s in vol16.sites]
    assert abs(bg[0] - bg[1]) > 0.05
    again = make_synthetic_segmentation(2, seed=3, image_size=16, sizes=[6, 4], spatial_dims=3)
    np.testing.assert_array_equal(again.sites[1].test.images, vol16.sites[1].test.images)


def test_2d_default_is_unchanged_by_the_volume_option():
    a = make_synthetic_segmentation(2, seed=1, image_size=32, sizes=[4, 4])
    b = make_synthetic_segmentation(2, seed=1, image_size=32, sizes=[4, 4], spatial_dims=2)
    assert a.info.spatial_dims == 2 and a.sites[0].train.images.ndim == 4
    np.testing.assert_array_equal(a.sites[1].train.images, b.sites[1].train.images)


def test_segsplit_refuses_images_and_masks_of_different_dimensionality():
    with pytest.raises(DataError, match="disagree on the number of spatial axes"):
        SegSplit(np.zeros((2, 1, 8, 8, 8), np.float32), np.zeros((2, 8, 8), np.int64))
    with pytest.raises(DataError, match="does not match the dataset"):
        info = DatasetInfo("v", 2, 1, 8, ("bg", "fg"), spatial_dims=3)
        from medfed.common.data.splits import FederatedData, SiteData

        split = SegSplit(np.zeros((2, 1, 8, 8), np.float32), np.zeros((2, 8, 8), np.int64))
        FederatedData(info, (SiteData("a", split, split, split),), None, None)


def test_npz_volumes_load_with_or_without_a_channel_axis(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8, 8), dtype=np.uint8)
        arrays[f"{split}_masks"] = rng.integers(0, 3, (n, 8, 8, 8))
    arrays["test_images"] = arrays["test_images"][:, None]  # (N, C, D, H, W) is fine too
    path = tmp_path / "vols.npz"
    np.savez(path, **{k: arrays[k] for k in NPZ_KEYS})
    info, train, val, test = load_segmentation_npz(path)
    assert info.spatial_dims == 3 and info.num_classes == 3 and info.image_size == 8
    assert train.images.shape == (3, 1, 8, 8, 8) and test.images.shape == (2, 1, 8, 8, 8)
    np.testing.assert_allclose(train.images[:, 0], arrays["train_images"] / 255, rtol=1e-6)
    study = load_segmentation_study("npz", str(path), 2, 0)
    assert study.info.spatial_dims == 3
    with pytest.raises(ConfigError, match="holds 3D volumes"):
        load_segmentation_study("npz", str(path), 2, 0, spatial_dims=2)
    bad = dict(arrays)
    bad["val_images"] = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "bad.npz", **{k: bad[k] for k in NPZ_KEYS})
    with pytest.raises(DataError, match="val_images.*to match its masks"):
        load_segmentation_npz(tmp_path / "bad.npz")


def test_config_and_model_spec_keep_volumes_to_segmentation(vol16):
    with pytest.raises(ConfigError, match="segmentation only"):
        parse_study_config({"spatial-dims": 3})
    with pytest.raises(ConfigError, match="spatial-dims=4"):
        parse_study_config({"task": "segmentation", "spatial-dims": 4})
    with pytest.raises(ConfigError, match="2D only"):
        ModelSpec("cnn", 1, 2, 16, spatial_dims=3)
    cfg = parse_study_config({"task": "segmentation"})
    spec = model_spec(cfg, vol16.info)  # spatial-dims 0: from the data
    assert spec.spatial_dims == 3 and spec.name == "unet"


@pytest.mark.parametrize("name", ["unet", "basicunet"])
def test_3d_networks_train_evaluate_and_have_exact_per_sample_gradients(name, vol16):
    torch.manual_seed(0)
    size = 16 if name == "unet" else 32
    data = vol16 if size == 16 else make_synthetic_segmentation(1, 0, 32, sizes=[3], spatial_dims=3)
    model = prepare_dp_model(build_model(ModelSpec(name, 1, 2, size, spatial_dims=3)))
    split = data.sites[0].train
    x, y = torch.from_numpy(split.images[:2]), torch.from_numpy(split.masks[:2])
    assert model(x).shape == (2, 2, size, size, size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = seg_loss()
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert loss_fn(model(x), y).item() < before
    metrics = evaluate_segmentation(model, data.sites[0].val, torch.device("cpu"))
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["num-examples"] == len(data.sites[0].val)
    check_per_sample_gradients(model, torch.from_numpy(split.images[:3]), 2,
                               targets=torch.from_numpy(split.masks[:3]), loss_fn=seg_loss(reduction="sum"))


def test_dp_segmentation_survives_empty_poisson_batches(vol16):
    """With expected batch 1 of 6 images, about a third of Poisson batches are empty: each is a noise-only step."""
    from medfed.common.dp.engine import DPSettings
    from medfed.common.training import TrainSettings, train

    empty = seg_loss()(torch.zeros((0, 2, 4, 4, 4), requires_grad=True), torch.zeros((0, 4, 4, 4), dtype=torch.int64))
    assert empty.item() == 0.0
    split = vol16.sites[0].train
    model = prepare_dp_model(build_model(ModelSpec("unet", 1, 2, 16, spatial_dims=3)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, split, TrainSettings(steps=12, batch_size=1, lr=0.01, seed=1), torch.device("cpu"),
                   dp=DPSettings(noise_multiplier=1.0, sample_rate=1 / len(split)), loss_fn=seg_loss())
    assert result.steps == 12 and np.isfinite(result.loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

"""Federated segmentation building blocks: data contract, loaders, DP-safe models, loss, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medfed.common.data.splits import DatasetInfo
from medfed.common.dp.model_check import (
    DPModelError,
    check_per_sample_gradients,
    prepare_dp_model,
)
from medfed.common.errors import ConfigError, DataError
from medfed.common.segmentation.data import (
    FederatedSegData,
    SegSiteData,
    SegSplit,
    to_label_mask,
)
from medfed.common.segmentation.losses import seg_loss
from medfed.common.segmentation.masks import resize_mask
from medfed.common.segmentation.metrics import (
    DICE,
    HD95,
    HD95_COUNT,
    SegSums,
    evaluate_segmentation,
    segmentation_metrics,
)
from medfed.common.segmentation.models import build_seg_model
from medfed.common.segmentation.npz import NPZ_KEYS, load_segmentation_npz
from medfed.common.segmentation.pairs import read_segmentation_pairs
from medfed.common.segmentation.synthetic import make_synthetic_segmentation
from torch import nn

CPU = torch.device("cpu")
# Opacus's full backward hooks warn when the input does not require grad: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth32() -> FederatedSegData:
    return make_synthetic_segmentation(image_size=32, seed=0)


def _split(n: int = 4, size: int = 8, channels: int = 1) -> SegSplit:
    rng = np.random.default_rng(0)
    return SegSplit(rng.random((n, channels, size, size), dtype=np.float32),
                    rng.integers(0, 2, (n, size, size)).astype(np.int64))


# --------------------------------------------------------------------------- data contract


def test_segsplit_valid_len_shape_and_subset_copies():
    split = _split(5)
    assert len(split) == 5 and split.image_shape == (1, 8, 8) and split.targets is split.masks
    sub = split.subset(np.array([0, 2]))
    assert len(sub) == 2 and np.array_equal(sub.masks, split.masks[[0, 2]])
    sub.images[...] = 0  # a copy: the original is untouched
    assert split.images[0].any()
    assert len(split.subset(np.array([], dtype=np.int64))) == 0


@pytest.mark.parametrize(("images", "masks", "groups", "fragment"), [
    (np.zeros((2, 1, 4, 4), np.float64), np.zeros((2, 4, 4), np.int64), None, "float32"),
    (np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64), None, "(N, C, H, W)"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32), None, "int64"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros((3, 4, 4), np.int64), None, "2 images but 3 masks"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 5), np.int64), None, "nearest"),
    (np.full((2, 1, 4, 4), 2.0, np.float32), np.zeros((2, 4, 4), np.int64), None, "[0, 1]"),
    (np.zeros((2, 1, 4, 4), np.float32), np.full((2, 4, 4), -1, np.int64), None, ">= 0"),
    (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 4, 4), np.int64), np.zeros(3, np.int64), "group"),
])
def test_segsplit_rejects_bad_arrays_with_a_reason(images, masks, groups, fragment):
    with pytest.raises(DataError, match="invalid SegSplit") as err:
        SegSplit(images, masks, groups)
    assert fragment in str(err.value)


def test_segsplit_collects_every_problem_at_once():
    with pytest.raises(DataError) as err:
        SegSplit(np.zeros((2, 1, 4, 4), np.float64), np.zeros((2, 4, 4), np.float32))
    assert "images must be" in str(err.value) and "masks must be" in str(err.value)


def test_to_label_mask_accepts_whole_floats_and_refuses_fractions():
    assert to_label_mask(np.array([[0.0, 1.0]], np.float32)).dtype == np.int64
    assert to_label_mask(np.array([[True, False]])).tolist() == [[1, 0]]
    with pytest.raises(DataError, match="non-integer"):
        to_label_mask(np.array([[0.0, 0.5]]))
    with pytest.raises(DataError, match="negative"):
        to_label_mask(np.array([[0, -1]]))


def test_federated_seg_data_checks_labels_and_shapes_against_info():
    info = DatasetInfo("t", 2, 1, 8, ("background", "object"))
    good = _split()
    FederatedSegData(info, (SegSiteData("a", good, good, good),), good, good)
    bad = SegSplit(good.images, np.full((4, 8, 8), 2, np.int64))
    with pytest.raises(DataError, match="a/val: label 2 out of range 0..1"):
        FederatedSegData(info, (SegSiteData("a", good, bad, good),), None, None)
    with pytest.raises(DataError, match="image shape"):
        FederatedSegData(info, (SegSiteData("a", *([_split(size=16)] * 3)),), None, None)


# --------------------------------------------------------------------------- synthetic sites


def test_synthetic_is_seeded_unequal_and_binary(synth32):
    again = make_synthetic_segmentation(image_size=32, seed=0)
    other = make_synthetic_segmentation(image_size=32, seed=1)
    for a, b in zip(synth32.sites, again.sites):
        assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.masks, b.test.masks)
    assert not np.array_equal(synth32.sites[0].train.masks, other.sites[0].train.masks)
    assert [len(s.train) for s in synth32.sites] == [160, 110, 80]
    assert [len(s.val) for s in synth32.sites] == [40, 27, 20] == [len(s.test) for s in synth32.sites]
    assert (synth32.info.num_classes, synth32.info.image_size) == (2, 32)
    assert len(synth32.central_val) == 87
    assert np.array_equal(synth32.central_test.masks, np.concatenate([s.test.masks for s in synth32.sites]))
    masks = synth32.sites[0].train.masks
    assert set(np.unique(masks)) == {0, 1}
    assert masks.reshape(len(masks), -1).any(axis=1).all()  # every image has an object


def _background_stats(split: SegSplit) -> tuple[float, float]:
    background = split.images[:, 0][split.masks == 0]
    return float(background.mean()), float(background.std())


def test_synthetic_sites_differ_like_scanners_and_not_without_shift(synth32):
    stats = [_background_stats(s.train) for s in synth32.sites]
    means, stds = zip(*stats)
    assert means[2] - means[0] > 0.1  # intensity bias 0 -> 0.2
    assert stds[2] > stds[0]  # noise 0.03 -> 0.09
    same = make_synthetic_segmentation(image_size=32, seed=0, shift=False)
    flat = [_background_stats(s.train)[0] for s in same.sites]
    assert max(flat) - min(flat) < 0.01


def test_synthetic_rejects_bad_settings():
    with pytest.raises(ConfigError, match="sizes has 2 entries for 3 sites"):
        make_synthetic_segmentation(sizes=[10, 10])
    with pytest.raises(ConfigError, match="image_size"):
        make_synthetic_segmentation(image_size=8)


# --------------------------------------------------------------------------- npz


def test_npz_round_trip_and_missing_key(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_masks"] = rng.integers(0, 3, (n, 16, 16)).astype(np.uint8)
    path = tmp_path / "organs.npz"
    np.savez(path, **arrays)
    info, train, val, test = load_segmentation_npz(path)
    assert (info.name, info.num_classes, info.in_channels, info.image_size) == ("organs", 3, 1, 16)
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    np.testing.assert_allclose(train.images[:, 0], arrays["train_images"] / 255, rtol=1e-6)
    assert np.array_equal(test.masks, arrays["test_masks"])

    np.savez(tmp_path / "partial.npz", **{k: v for k, v in arrays.items() if k != "val_masks"})
    with pytest.raises(DataError, match=r"lacks the arrays \['val_masks'\]"):
        load_segmentation_npz(tmp_path / "partial.npz")
    broken = dict(arrays, test_masks=arrays["test_masks"][:, :8])
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises(DataError, match="mask size"):
        load_segmentation_npz(tmp_path / "broken.npz")
    assert set(NPZ_KEYS) == set(arrays)


# --------------------------------------------------------------------------- manifest pairs


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_manifest_pairs_read_resize_and_refuse_bad_rows(tmp_path):
    root = tmp_path / "site"
    (root / "img").mkdir(parents=True)
    (root / "lbl").mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 5:25] = 1
    for i in range(3):
        _png(root / "img" / f"{i}.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    _png(root / "lbl" / "0.png", mask)
    np.save(root / "lbl" / "1.npy", mask.astype(np.int32))
    np.save(root / "lbl" / "small.npy", mask[:30, :30])
    np.save(root / "lbl" / "soft.npy", mask * 0.5)
    (tmp_path / "outside.png").write_bytes((root / "lbl" / "0.png").read_bytes())
    csv = tmp_path / "manifest.csv"
    csv.write_text(
        "path,mask,patient_id,split\n"
        "img/0.png,lbl/0.png,p0,train\n"          # line 2: PNG mask
        "img/1.png,lbl/1.npy,p1,val\n"            # line 3: .npy mask
        "img/2.png,../outside.png,p2,train\n"     # line 4: leaves the root
        "img/2.png,lbl/small.npy,p2,train\n"      # line 5: 40x40 image, 30x30 mask
        "img/2.png,lbl/soft.npy,p2,test\n"        # line 6: fractional mask
        "/etc/passwd,lbl/0.png,p3,train\n"        # line 7: absolute path
        "img/2.png,lbl/0.png,p2,\n"               # line 8: no split
    )
    before = sorted((p.name, p.stat().st_mtime_ns) for p in root.rglob("*"))
    pairs = read_segmentation_pairs(csv, root, image_size=32)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # read-only
    kinds = {p.line: p.kind for p in pairs.problems}
    assert kinds == {4: "path-escapes-root", 5: "shape-mismatch", 6: "not-a-label-mask", 7: "absolute-path"}
    assert all(f"line {p.line}" in p.detail for p in pairs.problems)
    assert "40x40" in next(p.detail for p in pairs.problems if p.line == 5)
    train, val = pairs.splits["train"], pairs.splits["val"]
    assert (len(train), len(val), len(pairs.splits["test"]), len(pairs.splits["unassigned"])) == (1, 1, 0, 1)
    assert train.image_shape == (1, 32, 32) and train.masks.shape == (1, 32, 32)
    assert set(np.unique(train.masks)) == {0, 1} and np.array_equal(train.masks, val.masks)
    assert train.masks.sum() == pytest.approx(mask.sum() * (32 / 40) ** 2, rel=0.1)
    assert pairs.patient_ids["val"] == ("p1",)


def test_resize_mask_nearest_keeps_labels():
    mask = np.array([[0, 3], [7, 0]], np.int64)
    big = resize_mask(mask, 6)
    assert set(np.unique(big)) == {0, 3, 7} and big[0, 5] == 3 and big[5, 0] == 7
    assert set(np.unique(resize_mask(np.kron(mask, np.ones((5, 5), np.int64)), 3))) <= {0, 3, 7}


# --------------------------------------------------------------------------- models and DP


@pytest.mark.parametrize("name", ["unet", "basicunet"])
@pytest.mark.parametrize("norm", ["instance", "group"])
def test_models_are_dp_safe_and_have_exact_per_sample_gradients(name, norm, synth32):
    torch.manual_seed(0)
    model = build_seg_model(name, in_channels=1, num_classes=2, norm=norm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    prepared = prepare_dp_model(model)
    split = synth32.sites[0].train
    x, y = torch.from_numpy(split.images[:3]), torch.from_numpy(split.masks[:3])
    assert prepared(x).shape == (3, 2, 32, 32)
    check_per_sample_gradients(prepared, x, num_classes=2, targets=y, loss_fn=seg_loss("sum"))


def test_gradient_check_catches_a_loss_that_couples_images(synth32):
    from monai.losses import DiceCELoss

    pooled = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # Dice over the whole batch

    def coupled(logits, masks):
        return pooled(logits, masks.unsqueeze(1)) * logits.shape[0]

    torch.manual_seed(0)
    model = prepare_dp_model(build_seg_model("unet", 1, 2, norm="group"))
    split = synth32.sites[0].train
    x, y = torch.from_numpy(split.images[:3]), torch.from_numpy(split.masks[:3])
    with pytest.raises(DPModelError, match="per-sample gradient"):
        check_per_sample_gradients(model, x, num_classes=2, targets=y, loss_fn=coupled)


def test_unet_3d_and_bad_arguments():
    model = build_seg_model("unet", in_channels=1, num_classes=3, spatial_dims=3)
    assert model(torch.rand(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    with pytest.raises(ConfigError, match="choose one of unet, basicunet"):
        build_seg_model("segresnet", 1, 2)
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_seg_model("unet", 1, 2, norm="batch")


# --------------------------------------------------------------------------- loss


def test_seg_loss_is_a_mean_of_per_image_losses():
    torch.manual_seed(0)
    logits, masks = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8))
    per_image = torch.stack([seg_loss()(logits[i : i + 1], masks[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(seg_loss()(logits, masks), per_image.mean())
    torch.testing.assert_close(seg_loss("sum")(logits, masks), per_image.sum())
    with pytest.raises(ValueError, match="do not match"):
        seg_loss()(logits, masks[:, :4])
    with pytest.raises(ValueError, match="reduction"):
        seg_loss("none")


# --------------------------------------------------------------------------- metrics


def _mask(size: int = 32, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((size, size), np.int64)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def test_dice_perfect_disjoint_empty_and_by_hand():
    truth = _mask(32, (4, 14, 4, 14))[None]
    assert segmentation_metrics(truth, truth)[DICE] == 1.0
    assert segmentation_metrics(_mask(32, (20, 30, 20, 30))[None], truth)[DICE] == 0.0
    empty = np.zeros((1, 32, 32), np.int64)
    both_empty = segmentation_metrics(empty, empty)
    assert both_empty[DICE] == 1.0 and both_empty[HD95_COUNT] == 0 and np.isnan(both_empty[HD95])
    # |A| = 100, |B| = 10 * 13 = 130, |A n B| = 10 * 10 = 100: Dice = 200 / 230
    pred = _mask(32, (4, 14, 4, 17))[None]
    assert segmentation_metrics(pred, truth)[DICE] == pytest.approx(200 / 230)
    logits = torch.from_numpy(np.stack([1 - pred, pred], axis=1).astype(np.float32))
    assert segmentation_metrics(logits, truth) == segmentation_metrics(pred, truth)


def test_dice_multiclass_mean_over_foreground_classes():
    truth = np.zeros((1, 10, 10), np.int64)
    truth[0, :5] = 1
    truth[0, 5:] = 2
    pred = truth.copy()
    pred[0, 5:] = 0  # class 1 perfect, class 2 missed
    assert segmentation_metrics(pred, truth, num_classes=3)[DICE] == pytest.approx(0.5)


def test_hd95_by_hand():
    # truth: one pixel; prediction: that pixel plus one 20 px away. Distances prediction ->
    # truth are {0, 20}, truth -> prediction {0}: HD95 = percentile([0, 20], 95) = 19.
    truth = np.zeros((1, 32, 32), np.int64)
    truth[0, 5, 5] = 1
    pred = truth.copy()
    pred[0, 5, 25] = 1
    m = segmentation_metrics(pred, truth)
    assert m[HD95] == pytest.approx(np.percentile([0, 20], 95)) == pytest.approx(19.0)
    assert m[HD95_COUNT] == 1 and m["num-examples"] == 1
    # a 10x10 square shifted by 3 px: every edge distance is <= 3, and 3 at the moved sides
    shifted = segmentation_metrics(_mask(32, (5, 15, 8, 18))[None], _mask(32, (5, 15, 5, 15))[None])
    assert shifted[HD95] == pytest.approx(3.0)
    # an empty prediction leaves the image out of HD95 but not out of Dice
    assert segmentation_metrics(np.zeros_like(truth), truth)[HD95_COUNT] == 0


def test_segsums_pool_exactly_like_the_concatenated_data():
    rng = np.random.default_rng(0)
    truth = np.stack([_mask(24, (r, r + 8, c, c + 8)) for r, c in rng.integers(0, 16, (7, 2))])
    pred = np.stack([_mask(24, (r, r + 6, c, c + 9)) for r, c in rng.integers(0, 16, (7, 2))])
    pred[2] = 0  # one empty prediction: in Dice, not in HD95
    sites = [SegSums.from_batch(pred[a:b], truth[a:b]) for a, b in ((0, 3), (3, 4), (4, 7))]
    pooled = sites[0].merge(sites[1]).merge(sites[2]).to_metrics()
    whole = segmentation_metrics(pred, truth)
    assert pooled.keys() == whole.keys()
    for key in whole:
        assert pooled[key] == pytest.approx(whole[key])
    assert whole[HD95_COUNT] == 6 and whole["num-examples"] == 7
    assert SegSums.from_record(sites[0].to_record()) == sites[0]
    assert np.isnan(SegSums().to_metrics()[DICE])


def test_evaluate_segmentation_batches_and_restores_mode(synth32):
    torch.manual_seed(0)
    model = build_seg_model("unet", 1, 2).train()
    split = synth32.sites[2].val
    metrics = evaluate_segmentation(model, split, CPU, batch_size=8)
    assert model.training
    assert metrics["num-examples"] == len(split) and 0 <= metrics[DICE] <= 1 and metrics["loss"] > 0


# --------------------------------------------------------------------------- learning


def test_unet_learns_the_synthetic_task(synth32):
    """30 Adam steps (lr 1e-2, batch 8) on site 0 reach val Dice ~0.88 on all sites (measured)."""
    torch.manual_seed(0)
    model = build_seg_model("unet", 1, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = seg_loss()
    train = synth32.sites[0].train
    images, masks = torch.from_numpy(train.images), torch.from_numpy(train.masks)
    generator = torch.Generator().manual_seed(0)
    before = evaluate_segmentation(model, synth32.central_val, CPU)[DICE]
    for _ in range(30):
        idx = torch.randperm(len(train), generator=generator)[:8]
        optimizer.zero_grad()
        loss_fn(model(images[idx]), masks[idx]).backward()
        optimizer.step()
    after = evaluate_segmentation(model, synth32.central_val, CPU)
    assert after[DICE] > 0.75 > before
    assert after[HD95] < 5.0

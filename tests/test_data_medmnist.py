"""MedMNIST loader: the real shared files, synthetic RGB/multiclass files, and error paths."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from medfed.common.data.medmnist import load_medmnist, load_medmnist_cached, subset_name
from medfed.common.errors import DataError

# Official sizes and label counts (PROVENANCE.md / medmnist INFO["..."]["n_samples"]).
OFFICIAL = {
    "pneumoniamnist": {
        "sizes": (4708, 524, 624),
        "counts": ((1214, 3494), (135, 389), (234, 390)),
        "labels": ("normal", "pneumonia"),
    },
    "breastmnist": {
        "sizes": (546, 78, 156),
        "counts": ((147, 399), (21, 57), (42, 114)),
        "labels": ("malignant", "normal-benign"),
    },
}


def shared_file(shared_data: Path, name: str) -> Path:
    path = shared_data / name / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return path


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_load_official_file(shared_data, name):
    info, *splits = load_medmnist(shared_file(shared_data, name))
    expected = OFFICIAL[name]
    assert info.name == name
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 1, 28)
    assert info.label_names == expected["labels"]
    assert info.group_name is None
    for split, n, counts in zip(splits, expected["sizes"], expected["counts"]):
        assert split.images.shape == (n, 1, 28, 28)
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int64
        assert split.groups is None
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0
        assert split.images.max() > 0.9  # scaled from 0..255, not left at 0..1/255
        assert tuple(np.bincount(split.labels)) == counts


def write_npz(path: Path, n=(7, 3, 4), shape=(8, 8, 3), num_classes=5, seed=0, **override):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, size in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (size, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(size) % num_classes).reshape(-1, 1).astype(np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path, arrays


def test_rgb_multiclass_file(tmp_path):
    path, arrays = write_npz(tmp_path / "mydermamnist.npz")
    info, train, val, test = load_medmnist(path)
    assert (info.num_classes, info.in_channels, info.image_size) == (5, 3, 8)
    assert info.label_names == tuple(f"class-{i}" for i in range(5))
    assert (len(train), len(val), len(test)) == (7, 3, 4)
    # channel-last uint8 -> channel-first float in [0, 1], pixel for pixel
    np.testing.assert_allclose(
        train.images[2, 1], arrays["train_images"][2, :, :, 1] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(test.labels, [0, 1, 2, 3])


def test_known_subset_names_labels_even_if_a_class_is_missing(tmp_path):
    path, _ = write_npz(tmp_path / "bloodmnist_64.npz", shape=(8, 8, 3), num_classes=3)
    info, *_ = load_medmnist(path)
    assert info.name == "bloodmnist" and info.num_classes == 8
    assert info.label_names[0] == "basophil"


def test_grayscale_labels_without_column(tmp_path):
    path, _ = write_npz(
        tmp_path / "x.npz", shape=(6, 6), num_classes=2,
        train_labels=np.array([0, 1, 0, 1, 0, 1, 0], np.int64),
    )
    info, train, *_ = load_medmnist(path)
    assert train.images.shape == (7, 1, 6, 6) and info.num_classes == 2


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(val_labels=None), "missing key.*val_labels"),
        (dict(test_labels=np.zeros((3, 1), np.uint8)), "4 images but .* 3 labels"),
        (dict(train_labels=np.zeros((7, 14), np.uint8)), "multi-label"),
        (dict(train_images=np.zeros((7, 8, 8), np.float32)), "dtype float32, expected uint8"),
        (dict(train_images=np.zeros((7, 8, 8, 8), np.uint8)), "only 2D"),
        (dict(val_images=np.zeros((3, 9, 9, 3), np.uint8)), "all splits of one file must agree"),
        (dict(train_images=np.zeros((7, 8, 6, 3), np.uint8)), "not square"),
        (dict(test_labels=np.full((4, 1), -1, np.int8)), "negative"),
        (dict(test_labels=np.zeros((4, 1), np.float32)), "expected integer"),
    ],
)
def test_bad_contents(tmp_path, override, match):
    path, _ = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=match):
        load_medmnist(path)


def test_chestmnist_is_rejected_by_name(tmp_path):
    path, _ = write_npz(tmp_path / "chestmnist.npz", shape=(8, 8), num_classes=2)
    with pytest.raises(DataError, match="'chestmnist' is a multi-label subset"):
        load_medmnist(path)


def test_known_subset_with_too_many_classes(tmp_path):
    path, _ = write_npz(tmp_path / "breastmnist.npz", shape=(8, 8), num_classes=3)
    with pytest.raises(DataError, match="only 2 classes"):
        load_medmnist(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nothere\.npz"):
        load_medmnist(tmp_path / "nothere.npz")
    with pytest.raises(DataError, match="not found"):
        load_medmnist_cached(tmp_path / "nothere.npz")


def test_not_a_zip_and_truncated(tmp_path):
    text = tmp_path / "text.npz"
    text.write_bytes(b"hello, not a zip file at all" * 10)
    with pytest.raises(DataError, match=r"text\.npz cannot be read"):
        load_medmnist(text)
    good, _ = write_npz(tmp_path / "good.npz")
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_medmnist(truncated)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_medmnist(single)


def test_pickled_object_arrays_are_refused(tmp_path):
    path, _ = write_npz(tmp_path / "obj.npz", train_labels=np.array([{"a": 1}] * 7, dtype=object))
    with pytest.raises(DataError, match="obj.npz"):
        load_medmnist(path)


def test_cache_hits_and_rereads_changed_file(tmp_path):
    load_medmnist_cached.cache_clear()
    path, _ = write_npz(tmp_path / "c.npz")
    first = load_medmnist_cached(path)
    assert load_medmnist_cached(str(path)) is first  # str and Path resolve to one key
    assert load_medmnist_cached.cache_info().hits == 1
    write_npz(path, n=(5, 3, 4), seed=1)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime moves for sure
    second = load_medmnist_cached(path)
    assert second is not first and len(second[1]) == 5


def test_subset_name():
    assert subset_name("/a/b/PneumoniaMNIST_224.npz") == "pneumoniamnist"
    assert subset_name("breastmnist.npz") == "breastmnist"

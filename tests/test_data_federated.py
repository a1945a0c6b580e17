"""build_federated_data / load_federated_cached: config names -> FederatedData."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.common.data.federated import build_federated_data, load_federated_cached
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError


def test_synthetic():
    fd = build_federated_data("synthetic", "", 3, "dirichlet", 0.5, seed=2)
    assert fd.site_ids == ("site-0", "site-1", "site-2")
    iid = build_federated_data("synthetic", "ignored", 3, "iid", 9.0, seed=2)
    np.testing.assert_array_equal(fd.sites[1].train.images, iid.sites[1].train.images)


def test_medmnist_from_shared_data(shared_data):
    path = shared_data / "breastmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    fd = build_federated_data("medmnist", str(path), 3, "dirichlet", 1.0, seed=0)
    assert fd.info.name == "breastmnist" and fd.site_ids == ("site-0", "site-1", "site-2")
    assert (len(fd.central_val), len(fd.central_test)) == (78, 156)  # whole official splits
    assert sum(len(s.train) for s in fd.sites) == 546
    assert sum(len(s.test) for s in fd.sites) == 156
    pooled = ImageSplit.concat([s.test for s in fd.sites])
    assert np.isclose(np.sort(pooled.images.sum(axis=(1, 2, 3))),
                      np.sort(fd.central_test.images.sum(axis=(1, 2, 3)))).all()


def write_small(path: Path, n_train: int = 60) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", 20), ("test", 20)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_cached_is_memoised_and_keyed_on_args(tmp_path):
    load_federated_cached.cache_clear()
    path = write_small(tmp_path / "toy.npz")
    a = load_federated_cached("medmnist", str(path), 2, "iid", 1.0, 0)
    assert load_federated_cached("medmnist", str(path), 2, "iid", 1.0, 0) is a
    assert load_federated_cached("medmnist", str(path), 3, "iid", 1.0, 0) is not a
    s1 = load_federated_cached("synthetic", "x", 2, "iid", 1.0, 0)
    assert load_federated_cached("synthetic", "y", 2, "iid", 1, 0) is s1


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (("imagenet", "", 2, "iid", 1.0, 0), ConfigError, "'imagenet'.*synthetic, medmnist"),
        (("synthetic", "", 2, "shards", 1.0, 0), ConfigError, "partition='shards'"),
        (("medmnist", "", 2, "iid", 1.0, 0), ConfigError, "needs data-path"),
        (("medmnist", "/nonexistent/x.npz", 2, "iid", 1.0, 0), DataError, "not found"),
        (("synthetic", "", 0, "iid", 1.0, 0), ConfigError, "num_sites"),
    ],
)
def test_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        build_federated_data(*args)
    with pytest.raises(exc, match=match):
        load_federated_cached(*args)


def test_too_many_sites_for_medmnist(tmp_path):
    path = write_small(tmp_path / "toy.npz")
    with pytest.raises(ConfigError, match="too large for the val split"):
        build_federated_data("medmnist", str(path), 15, "dirichlet", 1.0, 0)

"""Quantity skew, demographic skew, natural split and acquisition shift: properties and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medfed.common.config import PARTITIONS, SHIFTS, StudyConfig, parse_study_config
from medfed.common.data.federated import build_federated_data, load_federated_cached
from medfed.common.data.partition import (
    SCHEMES,
    default_group_fractions,
    partition_by_column,
    partition_by_groups,
    partition_splits,
    power_law_shares,
)
from medfed.common.data.shift import SHIFTS as SHIFT_NAMES
from medfed.common.data.shift import ScannerProfile, apply_scanner, scanner_profiles, shift_sites
from medfed.common.data.splits import ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError


def traced_split(n: int, seed: int, group_one: float = 0.3, classes: int = 3) -> ImageSplit:
    """Images whose first pixel is the sample's index / n, so a subset can be traced back."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 4, 4), dtype=np.float32) * 0.5 + 0.25
    images[:, 0, 0, 0] = np.arange(n) / n
    return ImageSplit(images, rng.integers(0, classes, n).astype(np.int64),
                      (rng.random(n) < group_one).astype(np.int64))


def indices(split: ImageSplit, n: int) -> np.ndarray:
    return np.rint(split.images[:, 0, 0, 0] * n).astype(np.int64)


SPLITS = (traced_split(3000, 0), traced_split(600, 1), traced_split(900, 2))


def site_indices(triples, j: int) -> list[np.ndarray]:
    return [indices(t[j], len(SPLITS[j])) for t in triples]


# ---------------------------------------------------------------------------- quantity


def test_power_law_shares_exact():
    np.testing.assert_allclose(power_law_shares(3, 1.0), [6 / 11, 3 / 11, 2 / 11])
    np.testing.assert_allclose(power_law_shares(4, 0.0), 0.25)
    with pytest.raises(ConfigError, match="quantity-exponent=-1"):
        power_law_shares(3, -1.0)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_quantity_sizes_follow_the_power_law(beta):
    k = 5
    triples = partition_splits(*SPLITS, k, "quantity", 1.0, seed=0, quantity_exponent=beta)
    shares = power_law_shares(k, beta)
    for j, split in enumerate(SPLITS):
        parts = site_indices(triples, j)
        allidx = np.concatenate(parts)
        assert len(allidx) == len(split) == len(np.unique(allidx))  # every sample exactly once
        sizes = np.array([len(p) for p in parts])
        assert np.abs(sizes / len(split) - shares).max() < 0.01, (sizes, shares)
        for t, p in zip(triples, parts):  # each site keeps the global class mix
            np.testing.assert_array_equal(t[j].labels, split.labels[p])
            mix = np.bincount(t[j].labels, minlength=3) / len(p)
            assert np.abs(mix - np.bincount(split.labels) / len(split)).max() < 0.05


def test_quantity_is_seeded_and_keeps_the_minimum():
    a = partition_splits(*SPLITS, 6, "quantity", 1.0, seed=4, quantity_exponent=3.0, min_train=40)
    b = partition_splits(*SPLITS, 6, "quantity", 1.0, seed=4, quantity_exponent=3.0, min_train=40)
    c = partition_splits(*SPLITS, 6, "quantity", 1.0, seed=5, quantity_exponent=3.0, min_train=40)
    pa, pb, pc = (site_indices(t, 0) for t in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
    assert [len(x) for x in pa] == [len(x) for x in pc]  # sizes depend on the exponent only
    assert min(len(x) for x in pa) == 40 and min(len(t[1]) for t in a) >= 2
    assert len(pa[0]) > 10 * len(pa[-1])  # steep: site-0 dominates


# ---------------------------------------------------------------------------- demographic


def group_fraction(split: ImageSplit) -> float:
    return float(np.mean(split.groups == 1))


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.9, 0.5, 0.1), (0.0, 1.0)])
def test_demographic_fractions_per_site(fractions):
    triples = partition_splits(*SPLITS, len(fractions), "demographic", 1.0, seed=0,
                               group_fractions=fractions)
    for j, split in enumerate(SPLITS):
        parts = site_indices(triples, j)
        allidx = np.concatenate(parts)
        assert len(np.unique(allidx)) == len(allidx)  # nobody at two sites
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 3 * 2  # equal sizes up to per-(group, class) rounding
        for t, f in zip(triples, fractions):
            assert abs(group_fraction(t[j]) - f) < 0.03 + 3 / len(t[j]), (j, group_fraction(t[j]), f)
            assert np.isin(indices(t[j], len(split)), allidx).all()
        # what is left out comes from one side only: the groups the fractions ask too little of
        left = np.setdiff1d(np.arange(len(split)), allidx)
        mean_f, glob = np.mean(fractions), group_fraction(split)
        if len(left) > 3 * 2 * len(fractions):
            assert (np.mean(split.groups[left] == 1) > 0.5) == (mean_f < glob)


def test_default_group_fractions_use_all_data():
    groups = SPLITS[0].groups
    f = default_group_fractions(groups, 4)
    assert np.isclose(f.mean(), np.mean(groups == 1)) and np.all(np.diff(f) < 0)
    parts = partition_by_groups(SPLITS[0].labels, groups, f, seed=0)
    assert sum(map(len, parts)) >= len(groups) - 4 * 3 * 2  # only rounding is lost
    got = [group_fraction(SPLITS[0].subset(p)) for p in parts]
    np.testing.assert_allclose(got, f, atol=0.015)


def test_demographic_seeded():
    args = (SPLITS[0].labels, SPLITS[0].groups, (0.7, 0.2))
    a, b, c = (partition_by_groups(*args, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_demographic_errors():
    no_groups = [ImageSplit(s.images, s.labels) for s in SPLITS]
    with pytest.raises(ConfigError, match="needs a group code.*train, val, test"):
        partition_splits(*no_groups, 2, "demographic", 1.0, seed=0)
    with pytest.raises(ConfigError, match="gives 3 fraction.*num-sites=2"):
        partition_splits(*SPLITS, 2, "demographic", 1.0, seed=0, group_fractions=(0.1, 0.2, 0.3))
    with pytest.raises(ConfigError, match="each in 0..1"):
        partition_by_groups(SPLITS[0].labels, SPLITS[0].groups, (1.5, 0.2), seed=0)
    only_zero = np.zeros(len(SPLITS[0]), np.int64)
    with pytest.raises(ConfigError, match="needs samples of group code 1"):
        partition_by_groups(SPLITS[0].labels, only_zero, (0.5, 0.5), seed=0)
    with pytest.raises(ConfigError, match="each site needs at least 500"):
        partition_by_groups(SPLITS[0].labels, SPLITS[0].groups, (1.0, 1.0, 1.0), seed=0, min_per_site=500)


# ---------------------------------------------------------------------------- natural


def test_partition_by_column():
    values = np.array(["va", "cleveland", "va", "hungary", "cleveland", "va"])
    parts = partition_by_column(values)
    assert list(parts) == ["cleveland", "hungary", "va"]
    assert [p.tolist() for p in parts.values()] == [[1, 4], [3], [0, 2, 5]]
    assert list(partition_by_column([3, 1, 3, 2])) == ["1", "2", "3"]
    with pytest.raises(DataError, match="1 of 3 samples have no value.*index 1"):
        partition_by_column(["a", "", "b"])
    with pytest.raises(DataError, match="no value"):
        partition_by_column(np.array([1.0, np.nan]))


def test_natural_needs_a_site_column():
    assert "natural" in SCHEMES
    with pytest.raises(ConfigError, match="'natural'.*'synthetic' has no such column"):
        build_federated_data("synthetic", "", 2, "natural", 1.0, 0)
    with pytest.raises(ConfigError, match="'natural'.*carry none"):
        partition_splits(*SPLITS, 2, "natural", 1.0, seed=0)


# ---------------------------------------------------------------------------- shift


def test_scanner_profiles_are_per_site_and_seed():
    a = scanner_profiles(3, seed=7)
    assert a == scanner_profiles(3, seed=7) and a[:2] == scanner_profiles(2, seed=7)  # not on K
    assert a != scanner_profiles(3, seed=8) and len(set(a)) == 3
    assert scanner_profiles(2, seed=7, strength=0.0) == [ScannerProfile(1.0, 0.0, 1.0, 0.0, 1.0, 0.0)] * 2
    with pytest.raises(ConfigError, match="shift-strength=5"):
        scanner_profiles(2, 0, strength=5.0)


def test_identity_scanner_keeps_images():
    split = SPLITS[1]
    out = apply_scanner(split, ScannerProfile(1.0, 0.0, 1.0, 0.0, 1.0, 0.0), seed=0)
    np.testing.assert_allclose(out.images, split.images, atol=1e-6)


def test_shift_changes_intensity_per_site_but_not_labels():
    rng = np.random.default_rng(0)
    base = ImageSplit(rng.random((200, 1, 28, 28), dtype=np.float32), rng.integers(0, 2, 200).astype(np.int64),
                      rng.integers(0, 2, 200).astype(np.int64))
    sites = tuple(SiteData(f"site-{k}", base, base, base) for k in range(3))
    shifted = shift_sites(sites, seed=3, strength=1.5)
    again = shift_sites(sites, seed=3, strength=1.5)
    stats = []
    for before, after, same in zip(sites, shifted, again):
        for part in ("train", "val", "test"):
            a, b = getattr(before, part), getattr(after, part)
            assert b.images.dtype == np.float32 and b.images.shape == a.images.shape
            assert 0.0 <= b.images.min() and b.images.max() <= 1.0
            np.testing.assert_array_equal(b.labels, a.labels)
            np.testing.assert_array_equal(b.groups, a.groups)
            np.testing.assert_array_equal(b.images, getattr(same, part).images)  # deterministic
        stats.append((after.train.images.mean(), after.train.images.std()))
        # the pixel-to-pixel difference shows a real transform, not rounding
        assert np.abs(after.train.images - before.train.images).mean() > 0.01
    stats = np.array(stats)
    assert np.ptp(stats[:, 0]) > 0.005 or np.ptp(stats[:, 1]) > 0.005  # sites differ from each other
    # the noise of train and test of one site is drawn with different seeds
    assert not np.array_equal(shifted[0].train.images, shifted[0].test.images)


def test_shift_is_applied_by_build_and_central_is_the_shifted_sites():
    plain = build_federated_data("synthetic", "", 2, "iid", 1.0, 0)
    fed = build_federated_data("synthetic", "", 2, "iid", 1.0, 0, shift="scanner")
    for a, b in zip(plain.sites, fed.sites):
        np.testing.assert_array_equal(a.test.labels, b.test.labels)
        assert not np.allclose(a.test.images, b.test.images)
    np.testing.assert_array_equal(fed.central_test.images,
                                  np.concatenate([s.test.images for s in fed.sites]))


def test_monai_is_not_imported_by_the_data_modules():
    code = ("import sys, medfed.common.data.federated, medfed.common.data.shift, "
            "medfed.common.data.partition_summary; print('monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# ---------------------------------------------------------------------------- build, cache, config


def test_synthetic_pool_for_quantity_and_demographic():
    q = build_federated_data("synthetic", "", 3, "quantity", 1.0, 0, quantity_exponent=1.0)
    sizes = [len(s.train) for s in q.sites]
    assert sizes[0] > sizes[1] > sizes[2] and abs(sizes[0] / sizes[2] - 3.0) < 0.3
    d = build_federated_data("synthetic", "", 2, "demographic", 1.0, 0, group_proportions=(0.85, 0.15))
    assert [round(group_fraction(s.train), 2) for s in d.sites] == [0.85, 0.15]


def test_cache_key_has_every_partition_parameter():
    load_federated_cached.cache_clear()
    base = load_federated_cached("synthetic", "", 2, "quantity", 1.0, 0)
    assert load_federated_cached("synthetic", "", 2, "quantity", 1.0, 0) is base
    for change in ({"quantity_exponent": 2.0}, {"min_site_size": 300}, {"shift": "scanner"},
                   {"shift": "scanner", "shift_strength": 0.5}):
        other = load_federated_cached("synthetic", "", 2, "quantity", 1.0, 0, **change)
        assert other is not base, change
        assert [len(s.train) for s in other.sites] != [len(s.train) for s in base.sites] or \
            not np.array_equal(other.sites[0].train.images, base.sites[0].train.images)
    d1 = load_federated_cached("synthetic", "", 2, "demographic", 1.0, 0, group_proportions=(0.8, 0.2))
    d2 = load_federated_cached("synthetic", "", 2, "demographic", 1.0, 0, group_proportions=(0.6, 0.4))
    assert d1 is not d2


def test_config_names_match_the_data_modules():
    assert PARTITIONS == SCHEMES and SHIFTS == SHIFT_NAMES
    cfg = parse_study_config({"partition": "demographic", "num-sites": 2, "group-proportions": "0.8, 0.2",
                              "shift": "scanner", "shift-strength": 2.0})
    assert cfg.group_fractions == (0.8, 0.2) and cfg.to_dict()["group-proportions"] == "0.8, 0.2"


@pytest.mark.parametrize(
    "mapping, needle",
    [
        ({"partition": "shards"}, "partition='shards' is not allowed: choose one of iid, dirichlet, quantity"),
        ({"quantity-exponent": 11.0}, "quantity-exponent=11.0 is out of range"),
        ({"min-site-size": 0}, "min-site-size=0 is out of range"),
        ({"shift": "mri"}, "shift='mri' is not allowed: choose one of none, scanner"),
        ({"shift-strength": -1.0}, "shift-strength=-1.0 is out of range"),
        ({"group-proportions": "0.8,0.2", "num-sites": 2}, "used by partition demographic only"),
        ({"partition": "demographic", "group-proportions": "0.8,0.2"}, "gives 2 fraction(s) for num-sites=4"),
        ({"partition": "demographic", "num-sites": 2, "group-proportions": "0.8,x"}, "fractions in 0..1"),
        ({"partition": "demographic", "num-sites": 2, "group-proportions": "1.2,0"}, "fractions in 0..1"),
        ({"shift": "scanner", "task": "segmentation"}, "shift='scanner' simulates scanners"),
    ],
)
def test_bad_partition_config(mapping, needle):
    with pytest.raises(ConfigError) as err:
        parse_study_config(mapping)
    assert needle in str(err.value)
    assert StudyConfig().shift == "none"


def test_group_contrast_injects_a_bias_into_one_groups_lesions_only():
    from medfed.common.data.federated import build_federated_data

    plain = build_federated_data("synthetic", "", 2, "iid", 1.0, 0)
    biased = build_federated_data("synthetic", "", 2, "iid", 1.0, 0, group_contrast=(0.4, 1.0))
    a, b = plain.sites[0].train, biased.sites[0].train
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.groups, b.groups)
    diff = np.abs(a.images - b.images).reshape(len(a), -1).max(axis=1)
    sick_women = (a.groups == 0) & (a.labels == 1)
    assert (diff[sick_women] > 0.01).all()  # women's lesions are fainter
    assert (diff[~sick_women] < 1e-6).all()  # men, and healthy women, are untouched
    with pytest.raises(ConfigError, match="real data"):
        build_federated_data("medmnist", "x.npz", 2, "iid", 1.0, 0, group_contrast=(0.4, 1.0))

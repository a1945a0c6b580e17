"""Partition invariants: disjoint, complete, non-empty, seeded, skew grows as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.data.partition import (
    dirichlet_proportions,
    partition_by_proportions,
    partition_iid,
    partition_splits,
    stratified_split,
)
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError

LABELS = np.repeat(np.arange(3), [500, 300, 200])


def assert_partition(parts: list[np.ndarray], n: int, min_size: int = 1) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint and complete
    assert allidx.min() == 0 and allidx.max() == n - 1
    assert min(len(p) for p in parts) >= min_size
    assert all(p.dtype == np.int64 for p in parts)


def label_tv(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    c = labels.max() + 1
    glob = np.bincount(labels, minlength=c) / len(labels)
    return float(np.mean([
        0.5 * np.abs(np.bincount(labels[p], minlength=c) / len(p) - glob).sum() for p in parts
    ]))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_iid(k):
    parts = partition_iid(LABELS, k, seed=0)
    assert_partition(parts, len(LABELS))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    same = partition_iid(LABELS, k, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    if k > 1:
        other = partition_iid(LABELS, k, seed=1)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_proportions():
    p = dirichlet_proportions(3, 5, 0.5, seed=0)
    assert p.shape == (3, 5)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(p, dirichlet_proportions(3, 5, 0.5, seed=0))
    assert not np.array_equal(p, dirichlet_proportions(3, 5, 0.5, seed=1))


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("k", [2, 10])
def test_by_proportions_is_a_partition(alpha, k):
    props = dirichlet_proportions(3, k, alpha, seed=3)
    parts = partition_by_proportions(LABELS, props, seed=3, min_per_site=5)
    assert_partition(parts, len(LABELS), min_size=5)
    again = partition_by_proportions(LABELS, props, seed=3, min_per_site=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_by_proportions_follows_the_proportions():
    props = np.array([[0.5, 0.3, 0.2], [0.0, 0.0, 1.0], [0.25, 0.25, 0.5]])
    parts = partition_by_proportions(LABELS, props, seed=0, min_per_site=0)
    counts = np.array([np.bincount(LABELS[p], minlength=3) for p in parts]).T  # (C, K)
    np.testing.assert_array_equal(counts, [[250, 150, 100], [0, 0, 300], [50, 50, 100]])


def test_min_per_site_tops_up_empty_sites():
    props = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    parts = partition_by_proportions(LABELS, props, seed=0, min_per_site=4)
    assert [len(p) for p in parts] == [992, 4, 4]
    assert_partition(parts, len(LABELS), min_size=4)


def test_smaller_alpha_gives_more_skew():
    def mean_tv(alpha):
        return np.mean([
            label_tv(partition_by_proportions(
                LABELS, dirichlet_proportions(3, 5, alpha, seed=s), seed=s), LABELS)
            for s in range(5)
        ])

    tv_small, tv_mid, tv_large = mean_tv(0.1), mean_tv(1.0), mean_tv(1000.0)
    assert tv_small > tv_mid > tv_large
    assert tv_small > 0.3 and tv_large < 0.05


def test_stratified_split():
    labels = np.repeat([0, 1], [90, 3])  # a rare class still reaches every part
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=0)
    assert_partition(parts, len(labels))
    for p in parts:
        assert set(labels[p]) == {0, 1}
    assert [len(p) for p in parts] == [64, 10, 19]
    with pytest.raises(ConfigError, match="fractions"):
        stratified_split(labels, (0.7, 0.2), seed=0)


def split_of(labels: np.ndarray, seed: int) -> ImageSplit:
    rng = np.random.default_rng(seed)
    n = len(labels)
    return ImageSplit(rng.random((n, 1, 2, 2), dtype=np.float32), labels.astype(np.int64),
                      np.arange(n, dtype=np.int64))  # groups = original index, to trace samples


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_splits_same_proportions_everywhere(scheme):
    rng = np.random.default_rng(0)
    sizes = (6000, 1500, 3000)
    train, val, test = (split_of(rng.integers(0, 3, n), s) for s, n in enumerate(sizes))
    triples = partition_splits(train, val, test, 4, scheme, alpha=0.5, seed=0)
    assert len(triples) == 4
    for j, split in enumerate((train, val, test)):
        parts = [t[j].groups for t in triples]
        assert_partition(parts, len(split), min_size=2)
        for t in triples:  # images travel with their labels
            np.testing.assert_array_equal(t[j].labels, split.labels[t[j].groups])
    # each site's share of class c is (almost) the same in train, val and test
    def shares(j, split):
        return np.array([[np.sum(t[j].labels == c) for t in triples] for c in range(3)]) \
            / np.bincount(split.labels)[:, None]

    s_train, s_val, s_test = shares(0, train), shares(1, val), shares(2, test)
    assert np.abs(s_train - s_val).max() < 0.01
    assert np.abs(s_train - s_test).max() < 0.01
    if scheme == "iid":
        np.testing.assert_allclose(s_train, 0.25, atol=0.01)


def test_partition_splits_real_file_like_sizes():
    """Breast-sized splits (546/78/156) with strong skew: every site keeps val and test data."""
    rng = np.random.default_rng(1)
    train, val, test = (split_of((rng.random(n) < 0.73).astype(int), s)
                        for s, n in enumerate((546, 78, 156)))
    triples = partition_splits(train, val, test, 8, "dirichlet", alpha=0.1, seed=4)
    assert min(len(t[1]) for t in triples) >= 2 and min(len(t[2]) for t in triples) >= 2
    a = partition_splits(train, val, test, 8, "dirichlet", alpha=0.1, seed=4)
    b = partition_splits(train, val, test, 8, "dirichlet", alpha=0.1, seed=5)
    assert all(np.array_equal(x[0].labels, y[0].labels) for x, y in zip(triples, a))
    assert not all(np.array_equal(x[0].groups, y[0].groups) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: partition_iid(LABELS, 0, 0), "num-sites=0"),
        (lambda: partition_iid(LABELS[:3], 4, 0), "allowed 1..3"),
        (lambda: partition_iid(LABELS.astype(float), 2, 0), "integer"),
        (lambda: dirichlet_proportions(2, 3, 0.0, 0), "alpha=0.0"),
        (lambda: dirichlet_proportions(2, 3, -1.0, 0), "alpha"),
        (lambda: dirichlet_proportions(0, 3, 1.0, 0), "num_classes"),
        (lambda: partition_by_proportions(LABELS, np.ones((2, 3)), 0), "shape"),
        (lambda: partition_by_proportions(LABELS, -np.ones((3, 3)), 0), ">= 0"),
        (lambda: partition_by_proportions(LABELS, np.ones((3, 3)), 0, 400), "min_per_site"),
        (lambda: partition_splits(*[split_of(np.arange(10) % 2, 0)] * 3, 3, "pathological", 1.0, 0),
         "partition='pathological'.*iid, dirichlet"),
        (lambda: partition_splits(*[split_of(np.arange(10) % 2, 0)] * 3, 6, "iid", 1.0, 0),
         "num-sites=6 is too large for the train split"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ConfigError, match=match):
        call()

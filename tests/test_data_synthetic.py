"""Synthetic federated data: seeded, heterogeneous, with ground truth for subgroup studies."""

from __future__ import annotations

import time

import numpy as np
import pytest

from medfed.common.data.splits import ImageSplit
from medfed.common.data.synthetic import default_site_sizes, make_synthetic
from medfed.common.errors import ConfigError


@pytest.fixture(scope="module")
def fd():
    return make_synthetic()


def pooled(site) -> ImageSplit:
    return ImageSplit.concat([site.train, site.val, site.test])


def test_defaults_shape_and_contract(fd):
    assert fd.info.name == "synthetic"
    assert (fd.info.num_classes, fd.info.in_channels, fd.info.image_size) == (2, 1, 28)
    assert fd.info.group_name == "sex" and fd.info.group_values == ("female", "male")
    assert [s.site_id for s in fd.sites] == ["site-0", "site-1", "site-2", "site-3"]
    sizes = [len(pooled(s)) for s in fd.sites]
    assert sizes == default_site_sizes(4) == [600, 400, 267, 178]
    for s in fd.sites:  # 70/10/20, stratified
        n = len(pooled(s))
        assert abs(len(s.train) - 0.7 * n) <= 2 and abs(len(s.test) - 0.2 * n) <= 2
        assert abs(s.train.labels.mean() - s.test.labels.mean()) < 0.05
    assert len(fd.central_test) == sum(len(s.test) for s in fd.sites)
    assert len(fd.central_val) == sum(len(s.val) for s in fd.sites)
    np.testing.assert_array_equal(fd.central_test.images[: len(fd.sites[0].test)],
                                  fd.sites[0].test.images)


def test_both_labels_and_groups_in_every_split(fd):
    for s in fd.sites:
        for split in (s.train, s.val, s.test):
            assert set(split.labels) == {0, 1}
        for split in (s.train, s.test):
            assert set(split.groups) == {0, 1}


def test_reproducible_and_seed_dependent(fd):
    again = make_synthetic()
    other = make_synthetic(seed=1)
    for a, b, c in zip(fd.sites, again.sites, other.sites):
        np.testing.assert_array_equal(a.train.images, b.train.images)
        np.testing.assert_array_equal(a.test.groups, b.test.groups)
        assert not np.array_equal(a.train.images, c.train.images)


def test_sites_are_heterogeneous(fd):
    prevalence = [pooled(s).labels.mean() for s in fd.sites]
    np.testing.assert_allclose(prevalence, [0.2, 0.4, 0.6, 0.8], atol=0.01)
    # acquisition differs: healthy-image intensity spread follows the site contrast
    spread = [pooled(s).images[pooled(s).labels == 0].std() for s in fd.sites]
    assert spread[1] > 1.3 * spread[0]  # default contrast 0.7 vs 1.2
    # noise differs: high-frequency energy (pixel differences) grows with site noise
    hf = [np.abs(np.diff(pooled(s).images, axis=-1)).mean() for s in fd.sites]
    assert hf[3] > 2 * hf[0]
    male = [pooled(s).groups.mean() for s in fd.sites]
    assert male[0] > male[-1] + 0.2


def test_explicit_site_settings():
    fd = make_synthetic(num_sites=2, samples_per_site=[50, 300], site_contrast=[1.0, 1.0],
                        site_noise=[0.0, 0.0], label_skew=0.0, group_fraction=[0.5, 0.5])
    assert [len(pooled(s)) for s in fd.sites] == [50, 300]
    a, b = pooled(fd.sites[0]), pooled(fd.sites[1])
    assert abs(a.labels.mean() - 0.5) < 0.02 and abs(b.groups.mean() - 0.5) < 0.02
    assert abs(a.images.std() - b.images.std()) < 0.01


def lesion_energy(split: ImageSplit, group: int) -> float:
    """Mean brightness difference diseased - healthy within one group."""
    m = split.groups == group
    x = split.images[m].reshape(m.sum(), -1)
    y = split.labels[m]
    return float(x[y == 1].max(axis=1).mean() - x[y == 0].max(axis=1).mean())


def test_group_contrast_is_ground_truth():
    kw = dict(num_sites=1, samples_per_site=[2000], site_noise=[0.0], label_skew=0.0)
    even = pooled(make_synthetic(**kw).sites[0])
    biased = pooled(make_synthetic(group_contrast=(1.0, 0.3), **kw).sites[0])
    assert abs(lesion_energy(even, 0) - lesion_energy(even, 1)) < 0.05
    assert lesion_energy(biased, 1) < 0.5 * lesion_energy(biased, 0)
    none = pooled(make_synthetic(disease_signal=0.0, **kw).sites[0])
    assert abs(lesion_energy(none, 0)) < 0.02


def test_disease_is_visible_to_a_simple_detector(fd):
    """Brightest-pixel score already separates the classes within a site (AUC > 0.75)."""
    s = pooled(fd.sites[0])
    score = s.images.reshape(len(s), -1).max(axis=1)
    pos, neg = score[s.labels == 1], score[s.labels == 0]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc > 0.75


def test_other_sizes_and_many_sites():
    fd = make_synthetic(num_sites=12, image_size=32, seed=3)
    assert fd.sites[0].train.images.shape[1:] == (1, 32, 32)
    sizes = [len(pooled(s)) for s in fd.sites]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) == 100
    single = make_synthetic(num_sites=1)
    assert len(single.sites) == 1 and abs(pooled(single.sites[0]).labels.mean() - 0.5) < 0.01


def test_fast():
    start = time.perf_counter()
    make_synthetic(seed=7)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_sites=0), "num_sites=0"),
        (dict(samples_per_site=[100, 100]), "samples_per_site"),
        (dict(samples_per_site=[100, 100, 100, 5]), ">= 20"),
        (dict(label_skew=0.6), "label_skew"),
        (dict(site_contrast=[1.0]), "site_contrast"),
        (dict(site_noise=[0.1, 0.1, 0.1, -1]), "site_noise"),
        (dict(group_contrast=(1.0,)), "group_contrast"),
        (dict(group_fraction=[0.0, 0.5, 0.5, 0.5]), "group_fraction"),
        (dict(image_size=4), "image_size"),
        (dict(disease_signal=-1), "disease_signal"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_synthetic(**kwargs)


def test_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        make_synthetic(label_skew=0.9, image_size=2)
    assert "label_skew" in str(e.value) and "image_size" in str(e.value)

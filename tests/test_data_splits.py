"""The data contract: validation, subset, concat."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import DataError


def make_split(
    n: int = 6, groups: bool = True, c: int = 1, size: int = 4, seed: int = 0
) -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit(
        rng.random((n, c, size, size), dtype=np.float32),
        (np.arange(n) % 2).astype(np.int64),
        (np.arange(n) // 3 % 2).astype(np.int64) if groups else None,
    )


INFO = DatasetInfo("toy", 2, 1, 4, ("a", "b"), "sex", ("female", "male"))


def test_subset_and_len():
    s = make_split(6)
    sub = s.subset(np.array([4, 1]))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.labels, s.labels[[4, 1]])
    np.testing.assert_array_equal(sub.groups, s.groups[[4, 1]])
    np.testing.assert_array_equal(sub.images, s.images[[4, 1]])
    assert len(s.subset(s.labels == 1)) == 3
    assert len(s.subset(np.array([], dtype=np.int64))) == 0
    assert len(s.subset(np.array([]))) == 0  # float empty index is tolerated


def test_subset_copies():
    s = make_split(6)
    sub = s.subset(np.arange(2))
    sub.images[0] = 0.5
    assert not np.all(s.images[0] == 0.5)


def test_concat_keeps_order_and_groups():
    a, b = make_split(3, seed=1), make_split(4, seed=2)
    ab = ImageSplit.concat([a, b])
    assert len(ab) == 7
    np.testing.assert_array_equal(ab.images[3:], b.images)
    np.testing.assert_array_equal(ab.groups, np.concatenate([a.groups, b.groups]))
    none = ImageSplit.concat([make_split(2, groups=False), make_split(3, groups=False)])
    assert none.groups is None


@pytest.mark.parametrize(
    "splits, match",
    [
        ([], "empty list"),
        ([make_split(2, groups=True), make_split(2, groups=False)], "with and without group"),
        ([make_split(2, size=4), make_split(2, size=5)], "different image shapes"),
    ],
)
def test_concat_errors(splits, match):
    with pytest.raises(DataError, match=match):
        ImageSplit.concat(splits)


@pytest.mark.parametrize(
    "images, labels, groups, match",
    [
        (np.zeros((2, 1, 4, 4), np.float64), np.zeros(2, np.int64), None, "float32"),
        (np.zeros((2, 4, 4), np.float32), np.zeros(2, np.int64), None, r"\(N, C, H, W\)"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int32), None, "int64"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1), np.int64), None, "int64"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(3, np.int64), None, "2 images but 3 labels"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64), np.zeros(1, np.int64), "group"),
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64), np.zeros(2, np.int8), "groups"),
        (np.full((2, 1, 4, 4), 2.0, np.float32), np.zeros(2, np.int64), None, r"\[0, 1\]"),
        (np.zeros((2, 1, 4, 4), np.float32), np.array([0, -1]), None, ">= 0"),
        ([[0.0]], np.zeros(1, np.int64), None, "float32"),
    ],
)
def test_imagesplit_rejects(images, labels, groups, match):
    with pytest.raises(DataError, match=match):
        ImageSplit(images, labels, groups)


def test_empty_split_is_valid():
    s = ImageSplit(np.zeros((0, 1, 4, 4), np.float32), np.zeros(0, np.int64))
    assert len(s) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1, label_names=("a",)), "num_classes"),
        (dict(label_names=("a",)), "label_names"),
        (dict(in_channels=0), "in_channels"),
        (dict(group_name="sex", group_values=()), "group_name and group_values"),
        (dict(name=""), "name"),
    ],
)
def test_datasetinfo_rejects(kwargs, match):
    base = dict(name="toy", num_classes=2, in_channels=1, image_size=4, label_names=("a", "b"))
    with pytest.raises(DataError, match=match):
        DatasetInfo(**{**base, **kwargs})


def site(site_id: str = "site-0", **kw) -> SiteData:
    return SiteData(site_id, make_split(6, **kw), make_split(4, **kw), make_split(4, **kw))


def test_federated_data_valid():
    fd = FederatedData(INFO, (site("site-0"), site("site-1")), make_split(8), None)
    assert fd.site_ids == ("site-0", "site-1")
    assert fd.site("site-1").site_id == "site-1"
    with pytest.raises(DataError, match="site-0, site-1"):
        fd.site("site-9")


def test_federated_data_checks_everything_at_once():
    bad_labels = make_split(6)
    bad_labels = ImageSplit(bad_labels.images, bad_labels.labels + 5, bad_labels.groups)
    with pytest.raises(DataError) as e:
        FederatedData(
            INFO,
            (site("a"), SiteData("a", bad_labels, make_split(2), make_split(2)), site("b", size=5)),
            make_split(3, groups=False),
            None,
        )
    msg = str(e.value)
    for part in ("unique", "label 6 out of range", "image shape", "group codes (sex) are missing"):
        assert part in msg


def test_federated_data_needs_sites_and_group_range():
    with pytest.raises(DataError, match="at least one site"):
        FederatedData(INFO, (), None, None)
    s = make_split(4)
    high = ImageSplit(s.images, s.labels, s.groups + 2)
    with pytest.raises(DataError, match="group code 3 out of range"):
        FederatedData(INFO, (SiteData("a", high, s, s),), None, None)
    plain = DatasetInfo("toy", 2, 1, 4, ("a", "b"))
    with pytest.raises(DataError, match="declares no group_name"):
        FederatedData(plain, (SiteData("a", s, s, s),), None, None)


def test_sitedata_rejects_shape_mismatch():
    with pytest.raises(DataError, match="image shapes differ"):
        SiteData("a", make_split(2, size=4), make_split(2, size=5), make_split(2, size=4))
    with pytest.raises(DataError, match="site_id"):
        SiteData("", make_split(2), make_split(2), make_split(2))

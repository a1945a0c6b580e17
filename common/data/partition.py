"""Split one dataset into sites: IID or label-skewed (Dirichlet), all seeded.

Index-level functions return lists of sorted int64 index arrays, one per site.
:func:`partition_splits` applies the *same* per-class site proportions to the official
train, val and test splits, so each site's val/test look like its train.

Minimum site size: :func:`partition_by_proportions` first allocates every class by
largest remainder; if a site then holds fewer than ``min_per_site`` samples, samples are
moved to it one at a time, always from the currently largest site and from that site's
most frequent class (the last index of that class in the donor's list). This is
deterministic given the seed and changes the proportions as little as possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError

__all__ = [
    "SCHEMES",
    "dirichlet_proportions",
    "partition_by_proportions",
    "partition_iid",
    "partition_splits",
    "stratified_split",
]

SCHEMES = ("iid", "dirichlet")


def partition_iid(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and cut them into ``num_sites`` parts (sizes differ by at most 1)."""
    labels = _as_labels(labels)
    _check_num_sites(num_sites, len(labels), "labels")
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_sites)]


def dirichlet_proportions(num_classes: int, num_sites: int, alpha: float, seed: int) -> np.ndarray:
    """Per-class site proportions ``(C, K)``, each row drawn from ``Dirichlet(alpha * 1_K)``.

    Small ``alpha`` (e.g. 0.1) gives strongly label-skewed sites, large ``alpha`` (e.g. 100)
    nearly IID ones.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes} is out of range: allowed >= 1")
    _check_num_sites(num_sites)
    _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(num_sites, float(alpha)), size=num_classes)


def partition_by_proportions(
    labels: np.ndarray,
    proportions: np.ndarray,
    seed: int,
    min_per_site: int = 2,
) -> list[np.ndarray]:
    """Give site ``k`` the share ``proportions[c, k]`` of the samples of each class ``c``.

    Counts are rounded by largest remainder (ties broken by the seeded RNG), then sites
    below ``min_per_site`` are topped up as described in the module docstring.
    """
    labels = _as_labels(labels)
    props = _check_proportions(proportions, labels)
    num_sites = props.shape[1]
    _check_num_sites(num_sites, len(labels), "labels")
    if min_per_site < 0 or min_per_site * num_sites > len(labels):
        raise ConfigError(
            f"min_per_site={min_per_site} is out of range: allowed 0..{len(labels) // num_sites} "
            f"for {len(labels)} samples and {num_sites} sites; lower num-sites or min_per_site"
        )
    rng = np.random.default_rng(seed)
    # parts[k][c] holds site k's indices of class c
    parts: list[list[list[int]]] = [[[] for _ in range(props.shape[0])] for _ in range(num_sites)]
    for c in range(props.shape[0]):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = _largest_remainder(len(idx), props[c], rng)
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k][c] = chunk.tolist()
    _top_up(parts, min_per_site)
    return [np.sort(np.fromiter(chain.from_iterable(p), dtype=np.int64)) for p in parts]


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into parts with the given fractions (e.g. 0.7/0.1/0.2), per class.

    Within each class, every part with a positive fraction gets at least one sample when
    the class has at least as many samples as there are such parts.
    """
    labels = _as_labels(labels)
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.ndim != 1 or frac.size == 0 or (frac < 0).any() or not np.isclose(frac.sum(), 1.0):
        raise ConfigError(
            f"fractions={list(fractions)} is invalid: give non-negative numbers summing to 1"
        )
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[np.zeros(0, np.int64)] for _ in frac]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        counts = _largest_remainder(len(idx), frac, rng)
        need = np.flatnonzero((frac > 0) & (counts == 0))
        for j in need:  # borrow from the largest part so small classes reach every part
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[j] += 1
        for j, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            out[j].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in out]


def partition_splits(
    train: ImageSplit,
    val: ImageSplit,
    test: ImageSplit,
    num_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_per_site: int = 2,
) -> list[tuple[ImageSplit, ImageSplit, ImageSplit]]:
    """Partition official train/val/test splits into ``num_sites`` (train, val, test) triples.

    ``scheme="iid"`` uses equal proportions for every class (a stratified IID split, so each
    site's class mix equals the global one); ``scheme="dirichlet"`` draws one ``(C, K)``
    proportion matrix with :func:`dirichlet_proportions`. The same matrix is applied to
    train, val and test; ``alpha`` is only used by ``"dirichlet"``.
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"partition={scheme!r} is not allowed: choose one of {', '.join(SCHEMES)}"
        )
    _check_num_sites(num_sites)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if num_sites * max(min_per_site, 1) > len(split):
            raise ConfigError(
                f"num-sites={num_sites} is too large for the {name} split of {len(split)} "
                f"samples: each site needs at least {max(min_per_site, 1)}; lower num-sites "
                f"to at most {len(split) // max(min_per_site, 1)}"
            )
    num_classes = int(max(s.labels.max(initial=0) for s in (train, val, test))) + 1
    if scheme == "iid":
        props = np.full((num_classes, num_sites), 1.0 / num_sites)
    else:
        props = dirichlet_proportions(num_classes, num_sites, alpha, seed)
    seeds = np.random.SeedSequence(seed).spawn(3)
    per_split = [
        partition_by_proportions(split.labels, props, _int_seed(ss), min_per_site)
        for split, ss in zip((train, val, test), seeds)
    ]
    return [
        (train.subset(per_split[0][k]), val.subset(per_split[1][k]), test.subset(per_split[2][k]))
        for k in range(num_sites)
    ]


# ---------------------------------------------------------------------------- helpers


def _largest_remainder(n: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``shares``; ties broken at random."""
    exact = n * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = n - int(counts.sum())
    if rest:
        remainder = exact - counts
        order = np.lexsort((rng.random(len(shares)), -remainder))
        counts[order[:rest]] += 1
    return counts


def _top_up(parts: list[list[list[int]]], min_per_site: int) -> None:
    """Move samples from the largest site to sites below ``min_per_site`` (in place)."""
    sizes = [sum(len(c) for c in p) for p in parts]
    for k in range(len(parts)):
        while sizes[k] < min_per_site:
            donor = int(np.argmax(sizes))
            cls = int(np.argmax([len(c) for c in parts[donor]]))
            parts[k][cls].append(parts[donor][cls].pop())
            sizes[donor] -= 1
            sizes[k] += 1


def _as_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ConfigError(
            f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise ConfigError(f"labels must be >= 0, got {int(labels.min())}")
    return labels.astype(np.int64, copy=False)


def _check_num_sites(num_sites: int, n: int | None = None, what: str = "") -> None:
    if not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ConfigError(f"num-sites={num_sites!r} is out of range: allowed integers >= 1")
    if n is not None and num_sites > n:
        raise ConfigError(
            f"num-sites={num_sites} is out of range: only {n} {what} to share, "
            f"so allowed 1..{n}"
        )


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(
            f"alpha={alpha} is out of range: the Dirichlet concentration must be > 0 "
            "(0.1 = strong label skew, 100 = nearly IID)"
        )


def _check_proportions(proportions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    props = np.asarray(proportions, dtype=np.float64)
    num_classes = int(labels.max(initial=-1)) + 1
    if props.ndim != 2 or props.shape[0] < num_classes or props.shape[1] < 1:
        raise ConfigError(
            f"proportions must have shape (num_classes >= {num_classes}, num_sites >= 1), "
            f"got {props.shape}"
        )
    if not np.isfinite(props).all() or (props < 0).any() or (props.sum(axis=1) <= 0).any():
        raise ConfigError("proportions must be finite, >= 0, with a positive sum in every row")
    return props / props.sum(axis=1, keepdims=True)


def _int_seed(ss: np.random.SeedSequence) -> int:
    return int(ss.generate_state(1, dtype=np.uint32)[0])

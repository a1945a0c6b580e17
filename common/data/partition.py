"""Split one dataset into sites, all seeded: IID, label skew, quantity skew, demographic skew.

Schemes (:data:`SCHEMES`):

- ``iid``: every site gets the global class mix and (almost) the same size.
- ``dirichlet``: label skew; each class is spread over sites by ``Dirichlet(alpha)``.
- ``quantity``: quantity skew; site ``k`` gets the share ``(k+1)**-beta / sum`` of every
  class (power-law sizes, site-0 the largest, global class mix everywhere).
- ``demographic``: site ``k`` holds the fraction ``f_k`` of group code 1 (e.g. 0.8, 0.2);
  see :func:`partition_by_groups`. Needs data with group codes.
- ``natural``: sites come from a column of the data (hospital, scanner), see
  :func:`partition_by_column`; datasets without such a column reject it.

Index-level functions return lists of sorted int64 index arrays, one per site.
:func:`partition_splits` applies the *same* per-class (or per-group) site proportions to
the official train, val and test splits, so each site's val/test look like its train.

Minimum site size: :func:`partition_by_proportions` first allocates every class by
largest remainder; if a site then holds fewer than ``min_per_site`` samples, samples are
moved to it one at a time, always from the currently largest site and from that site's
most frequent class (the last index of that class in the donor's list). This is
deterministic given the seed and changes the proportions as little as possible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import chain

import numpy as np
from medfed.common.data.splits import ImageSplit
from medfed.common.errors import ConfigError, DataError

__all__ = [
    "SCHEMES",
    "default_group_fractions",
    "dirichlet_proportions",
    "partition_by_column",
    "partition_by_groups",
    "partition_by_proportions",
    "partition_iid",
    "partition_splits",
    "power_law_shares",
    "stratified_split",
]

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "quantity", "demographic", "natural")
LABEL_SCHEMES = ("iid", "dirichlet", "quantity")  # one (C, K) proportion matrix for all splits


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
    parts = _allocate(labels, props, np.random.default_rng(seed))
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


def power_law_shares(num_sites: int, exponent: float) -> np.ndarray:
    """Site shares ``(k+1)**-exponent / sum`` for ``k = 0..K-1`` (0: equal, 1: Zipf, 2: steep)."""
    _check_num_sites(num_sites)
    if not np.isfinite(exponent) or not 0.0 <= exponent <= 10.0:
        raise ConfigError(
            f"quantity-exponent={exponent} is out of range: allowed 0..10 "
            "(0 = equal sizes, 1 = site k holds 1/(k+1) of site-0's share)"
        )
    w = np.arange(1, num_sites + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def default_group_fractions(groups: np.ndarray, num_sites: int) -> np.ndarray:
    """A spread of group-1 fractions centred on the global one, so all data can be used.

    With global fraction ``p`` and ``m = min(p, 1 - p)``, site ``k`` gets
    ``p + 0.75 * m * linspace(1, -1, K)[k]`` (e.g. 0.875 .. 0.125 for ``p = 0.5``).
    """
    groups = _as_codes(groups, "groups")
    _check_num_sites(num_sites)
    p = float(np.mean(groups == 1)) if len(groups) else 0.0
    if num_sites == 1:
        return np.array([p])
    return p + 0.75 * min(p, 1.0 - p) * np.linspace(1.0, -1.0, num_sites)


def partition_by_groups(
    labels: np.ndarray,
    groups: np.ndarray,
    fractions: Sequence[float],
    seed: int,
    min_per_site: int = 2,
) -> list[np.ndarray]:
    """Demographic skew: site ``k`` holds the fraction ``fractions[k]`` of group code 1.

    All sites get the same size ``s``, the largest for which the data holds enough of both
    group 1 and the other groups; the other groups keep their global ratio among
    themselves. Within each group, samples are shared out per class (so label mixes stay
    global). When the mean fraction differs from the global one, the surplus of the
    over-represented groups is left out (logged; the summary shows it); the default
    spread (:func:`default_group_fractions`) leaves nothing out.
    """
    labels = _as_labels(labels)
    groups = _as_codes(groups, "groups")
    if len(groups) != len(labels):
        raise DataError(f"{len(labels)} labels but {len(groups)} group codes")
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size < 1 or not np.isfinite(f).all() or (f < 0).any() or (f > 1).any():
        raise ConfigError(
            f"group-proportions={np.asarray(fractions).tolist()} is invalid: give one fraction of group 1 per "
            "site, each in 0..1 (e.g. 0.8,0.2)"
        )
    num_sites = len(f)
    is_one = groups == 1
    n_one, n_rest = int(is_one.sum()), int((~is_one).sum())
    need_one, need_rest = float(f.sum()), float((1.0 - f).sum())
    if (need_one > 0 and n_one == 0) or (need_rest > 0 and n_rest == 0):
        missing = "group code 1" if n_one == 0 else "groups other than code 1"
        raise ConfigError(
            f"group-proportions={f.tolist()} needs samples of {missing}, and the data has none: "
            "choose fractions 0 (or 1) for the missing group, or data holding both groups"
        )
    size = min(n_one / need_one if need_one > 0 else np.inf,
               n_rest / need_rest if need_rest > 0 else np.inf)
    size = int(np.floor(size + 1e-9))
    if size < max(min_per_site, 1):
        raise ConfigError(
            f"group-proportions={f.tolist()} leave {size} samples per site ({n_one} of group 1, "
            f"{n_rest} others, {num_sites} sites) but each site needs at least "
            f"{max(min_per_site, 1)}: move the fractions towards the global "
            f"{n_one / len(groups):.2f} or lower num-sites"
        )
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max(initial=0)) + 1
    # parts[k] holds one bucket per (group, class): _top_up moves from the fullest bucket
    parts: list[list[list[int]]] = [[] for _ in range(num_sites)]
    left_out = 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        want = size * f if g == 1 else size * (1.0 - f) * len(idx) / n_rest
        shares = np.append(want, max(len(idx) - want.sum(), 0.0))  # the last bin: left out
        sub = _allocate(labels[idx], np.tile(shares, (num_classes, 1)), rng)
        for k in range(num_sites):
            parts[k].extend(idx[bucket].tolist() for bucket in sub[k])
        left_out += sum(len(bucket) for bucket in sub[-1])
    _top_up(parts, min_per_site)
    if left_out:
        log.info("demographic partition: %d of %d samples left out so that every site holds its "
                 "group-1 fraction (%s)", left_out, len(labels), ", ".join(f"{x:.2f}" for x in f))
    return [np.sort(np.fromiter(chain.from_iterable(p), dtype=np.int64)) for p in parts]


def partition_by_column(values: Sequence[object] | np.ndarray) -> dict[str, np.ndarray]:
    """Natural split: one site per distinct value of a column (hospital, scanner, ...).

    Returns ``{name: sorted int64 indices}`` ordered by the sorted distinct values; the
    name is ``str(value)``. Missing values (``None``, ``""``, NaN) are rejected, since a
    sample without a site cannot be placed.
    """
    v = np.asarray(values)
    if v.ndim != 1 or v.size == 0:
        raise DataError(f"the site column must be a non-empty 1-D sequence, got shape {v.shape}")
    if v.dtype.kind == "f":
        missing = np.isnan(v)
    elif v.dtype.kind in "OUS":
        missing = np.array([x is None or (isinstance(x, float) and np.isnan(x)) or str(x).strip() == ""
                            for x in v.tolist()])
    else:
        missing = np.zeros(v.shape, dtype=bool)
    if missing.any():
        raise DataError(
            f"{int(missing.sum())} of {v.size} samples have no value in the site column "
            f"(first at index {int(np.flatnonzero(missing)[0])}): drop them or fill them in"
        )
    try:
        uniq, inverse = np.unique(v, return_inverse=True)
    except TypeError as exc:  # mixed types in an object column
        raise DataError(f"the site column mixes value types ({exc}): convert it to strings") from exc
    names = [str(u.item() if hasattr(u, "item") else u) for u in uniq]
    if len(set(names)) != len(names):
        raise DataError(f"site column values {names} are not distinct as names: convert them to strings")
    return {name: np.flatnonzero(inverse.reshape(-1) == i).astype(np.int64) for i, name in enumerate(names)}


def partition_splits(
    train: ImageSplit,
    val: ImageSplit,
    test: ImageSplit,
    num_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_per_site: int = 2,
    *,
    min_train: int | None = None,
    quantity_exponent: float = 1.0,
    group_fractions: Sequence[float] = (),
) -> list[tuple[ImageSplit, ImageSplit, ImageSplit]]:
    """Partition official train/val/test splits into ``num_sites`` (train, val, test) triples.

    ``iid`` uses equal proportions for every class (a stratified IID split); ``dirichlet``
    draws one ``(C, K)`` proportion matrix with :func:`dirichlet_proportions`; ``quantity``
    gives every class the shares :func:`power_law_shares`. The same matrix is applied to
    train, val and test. ``demographic`` applies :func:`partition_by_groups` with
    ``group_fractions`` (default :func:`default_group_fractions` of the train split) to
    each split. Every site keeps ``min_train`` (default ``min_per_site``) training and
    ``min_per_site`` val and test samples.
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"partition={scheme!r} is not allowed: choose one of {', '.join(SCHEMES)}"
        )
    if scheme == "natural":
        raise ConfigError(
            "partition 'natural' takes the sites from a column of the data (hospital, scanner), "
            "and these splits carry none: choose iid, dirichlet, quantity or demographic"
        )
    _check_num_sites(num_sites)
    splits = {"train": train, "val": val, "test": test}
    mins = {"train": min_per_site if min_train is None else min_train, "val": min_per_site,
            "test": min_per_site}
    for name, split in splits.items():
        need = max(mins[name], 1)
        if num_sites * need > len(split):
            raise ConfigError(
                f"num-sites={num_sites} is too large for the {name} split of {len(split)} "
                f"samples: each site needs at least {need}; lower num-sites "
                f"to at most {len(split) // need}"
                + (" or min-site-size" if name == "train" and min_train else "")
            )
    seeds = [_int_seed(ss) for ss in np.random.SeedSequence(seed).spawn(3)]
    if scheme == "demographic":
        missing = [name for name, split in splits.items() if split.groups is None]
        if missing:
            raise ConfigError(
                f"partition 'demographic' needs a group code (e.g. sex) per sample, and the "
                f"{', '.join(missing)} split(s) have none: choose iid, dirichlet or quantity, or "
                "data with groups"
            )
        fractions = (np.asarray(group_fractions, dtype=np.float64) if len(group_fractions)
                     else default_group_fractions(train.groups, num_sites))
        if len(fractions) != num_sites:
            raise ConfigError(
                f"group-proportions gives {len(fractions)} fraction(s) for num-sites={num_sites}: "
                "give one fraction of group 1 per site"
            )
        per_split = [
            partition_by_groups(split.labels, split.groups, fractions, s, mins[name])
            for (name, split), s in zip(splits.items(), seeds)
        ]
    else:
        num_classes = int(max(s.labels.max(initial=0) for s in splits.values())) + 1
        if scheme == "iid":
            props = np.full((num_classes, num_sites), 1.0 / num_sites)
        elif scheme == "quantity":
            props = np.tile(power_law_shares(num_sites, quantity_exponent), (num_classes, 1))
        else:
            props = dirichlet_proportions(num_classes, num_sites, alpha, seed)
        per_split = [
            partition_by_proportions(split.labels, props, s, mins[name])
            for (name, split), s in zip(splits.items(), seeds)
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


def _allocate(labels: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> list[list[list[int]]]:
    """``parts[k][c]``: site ``k``'s indices of class ``c``, ``props[c, k]`` of that class each."""
    num_classes, num_sites = props.shape
    parts: list[list[list[int]]] = [[[] for _ in range(num_classes)] for _ in range(num_sites)]
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if props[c].sum() <= 0:
            continue
        counts = _largest_remainder(len(idx), props[c], rng)
        for k, chunk in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k][c] = chunk.tolist()
    return parts


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


def _as_codes(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 1 or (codes.size and not np.issubdtype(codes.dtype, np.integer)):
        raise DataError(f"{what} must be a 1-D integer array, got {codes.dtype} {codes.shape}")
    if codes.size and codes.min() < 0:
        raise DataError(f"{what} must be >= 0, got {int(codes.min())}")
    return codes.astype(np.int64, copy=False)


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

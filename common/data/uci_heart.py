"""UCI Heart Disease: four real hospitals, preprocessed as FLamby's Fed-Heart-Disease.

Reads the four UCI ``processed.*.data`` files (comma-separated, no header, ``?`` for missing)
and returns a :class:`FederatedData` with one site per hospital, in FLamby's center order:
``cleveland``, ``hungary``, ``switzerland``, ``va`` (V.A. Long Beach).

Preprocessing, as FLamby (``flamby/datasets/fed_heart_disease/dataset.py``):

1. drop the columns ``slope``, ``ca``, ``thal`` (mostly missing outside Cleveland), then every
   row with a remaining ``?``: 303 / 261 / 46 / 130 rows (740 in all);
2. target ``num > 0`` (heart disease);
3. one-hot ``cp`` (levels 2, 3, 4) and ``restecg`` (levels 1, 2), first level dropped, which
   gives 13 features: :data:`FEATURES`;
4. train/test per hospital: 66 % / 34 % with scikit-learn's ``train_test_split(test_size=0.34,
   random_state=43, stratify=num > 0)`` (no stratification where a class has <= 2 rows:
   Switzerland), re-implemented here draw for draw: 199/104, 172/89, 30/16, 85/45;
5. z-scores (``feature-scaling``):

   - ``federated`` (default): the mean and (n-1) standard deviation of all four hospitals'
     training rows, computed from each hospital's count, per-feature sum and sum of squares
     (:func:`pooled_moments`), the aggregates a federated standardisation round exchanges;
     no row leaves a hospital. A hospital's shifted feature means then stay visible to the
     shared model, which can learn its base rate (VA and Switzerland: 74 % and 93 % disease);
   - ``site``: each hospital's own training statistics (FLamby's per-center option). A
     feature constant in a hospital's training rows gets standard deviation 1 here (FLamby
     divides by 1e-9 there).

Differences from FLamby, all documented: a validation split, :data:`VAL_FRACTION` of each
hospital's FLamby training rows, stratified with the study seed, is held out for choosing the
round (FLamby has none); z-scores beyond ±:data:`~medfed.common.tabular.Z_CLIP` are clipped
(:func:`~medfed.common.tabular.encode_features`).

Groups: ``sex`` (0 female, 1 male), also one of the features.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from medfed.common.data.partition import stratified_split
from medfed.common.data.splits import DatasetInfo, FederatedData, ImageSplit, SiteData
from medfed.common.errors import ConfigError, DataError
from medfed.common.tabular import Z_CLIP, encode_features

log = logging.getLogger(__name__)

__all__ = ["FEATURES", "HOSPITALS", "flamby_train_test", "is_uci_heart_dir", "load_uci_heart", "read_hospital"]

DATASET_NAME = "uci-heart"
HOSPITALS = (  # site id, UCI file (FLamby's center order 0..3)
    ("cleveland", "processed.cleveland.data"),
    ("hungary", "processed.hungarian.data"),
    ("switzerland", "processed.switzerland.data"),
    ("va", "processed.va.data"),
)
COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
           "slope", "ca", "thal", "num")
DROPPED = ("slope", "ca", "thal")
ONE_HOT = (("cp", (2, 3, 4)), ("restecg", (1, 2)))  # levels kept (the first, 1 and 0, dropped)
KEPT = tuple(c for c in COLUMNS[:-1] if c not in DROPPED)
NUMERIC = tuple(c for c in KEPT if c not in dict(ONE_HOT))
FEATURES = NUMERIC + tuple(f"{col}={level}" for col, levels in ONE_HOT for level in levels)
FLAMBY_TRAIN_FRACTION = 0.66
FLAMBY_SPLIT_SEED = 43
VAL_FRACTION = 0.2


def is_uci_heart_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding the four UCI ``processed.*.data`` files."""
    p = Path(path)
    return p.is_dir() and all((p / name).is_file() for _, name in HOSPITALS)


def read_hospital(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows without missing values of one UCI file: (features of :data:`KEPT`, ``num``)."""
    keep = [COLUMNS.index(c) for c in KEPT]
    rows, nums = [], []
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; give the folder of the UCI processed.*.data files") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(COLUMNS):
            raise DataError(f"{path}:{lineno}: {len(cells)} values, expected {len(COLUMNS)} "
                            f"({', '.join(COLUMNS)}); is this a UCI processed.*.data file?")
        picked = [cells[i] for i in keep] + [cells[-1]]
        if "?" in picked:
            continue  # FLamby drops every row with a missing value among the kept columns
        try:
            values = [float(c) for c in picked]
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not a number ({exc}); missing values must be '?'") from exc
        rows.append(values[:-1])
        nums.append(values[-1])
    if not rows:
        raise DataError(f"{path}: no complete rows; is this a UCI processed.*.data file?")
    return np.asarray(rows, dtype=np.float64), np.asarray(nums, dtype=np.float64)


def one_hot(raw: np.ndarray) -> np.ndarray:
    """(N, len(KEPT)) raw columns -> (N, 13) :data:`FEATURES` (numeric first, then the dummies)."""
    cols = [raw[:, KEPT.index(c)] for c in NUMERIC]
    for col, levels in ONE_HOT:
        values = raw[:, KEPT.index(col)]
        cols += [(values == level).astype(np.float64) for level in levels]
    return np.stack(cols, axis=1)


def flamby_train_test(labels01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's split of one hospital: scikit-learn's ``train_test_split`` with seed 43, draw for draw.

    ``test_size = 1 - 0.66`` rounds up (``ceil``), ``train_size = 0.66`` down, as scikit-learn
    does; stratified (``StratifiedShuffleSplit``) when both classes have more than 2 rows, else a
    plain ``ShuffleSplit``. Returns unsorted (train, test) row indices, in scikit-learn's order.
    """
    y = np.asarray(labels01, dtype=np.int64)
    n = len(y)
    n_test = math.ceil((1.0 - FLAMBY_TRAIN_FRACTION) * n)
    n_train = math.floor(FLAMBY_TRAIN_FRACTION * n)
    rng = np.random.RandomState(FLAMBY_SPLIT_SEED)
    classes, y_idx = np.unique(y, return_inverse=True)
    counts = np.bincount(y_idx)
    if len(classes) < 2 or (counts <= 2).any():
        perm = rng.permutation(n)
        return perm[n_test:n_test + n_train], perm[:n_test]
    class_rows = np.split(np.argsort(y_idx, kind="mergesort"), np.cumsum(counts)[:-1])
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        rows = class_rows[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(rows[:n_i[i]])
        test.extend(rows[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's ``_approximate_mode``: per-class draws, remainders broken at random."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(np.int64)


SCALINGS = ("federated", "site")


def pooled_moments(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n-1) standard deviation of the rows of ``parts`` together, from each part's
    count, sum and sum of squares only: what sites would send for federated standardisation."""
    n = sum(len(p) for p in parts)
    total = sum(p.sum(axis=0) for p in parts)
    squares = sum((p.astype(np.float64) ** 2).sum(axis=0) for p in parts)
    mean = total / n
    var = np.maximum(squares - n * mean**2, 0.0) / max(n - 1, 1)
    return mean, np.sqrt(var)


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    std = np.where(std > 0, std, 1.0)  # a constant feature (e.g. a category absent from a small hospital)
    return (x - mean) / std


def _split(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, idx: np.ndarray) -> ImageSplit:
    idx = np.sort(idx)
    return ImageSplit(encode_features(x[idx]), labels[idx], groups[idx])


def _read(site_id: str, path: Path) -> dict[str, np.ndarray]:
    """One hospital's one-hot features, labels, groups and FLamby train/test rows."""
    raw, num = read_hospital(path)
    labels = (num > 0).astype(np.int64)
    sex = raw[:, KEPT.index("sex")]
    if not np.isin(sex, (0.0, 1.0)).all():
        raise DataError(f"{path}: sex must be 0 (female) or 1 (male), found {sorted(set(sex.tolist()) - {0.0, 1.0})}")
    train_all, test = flamby_train_test(labels)
    return {"x": one_hot(raw), "labels": labels, "groups": sex.astype(np.int64), "train": np.sort(train_all),
            "test": test}


def _hospital(site_id: str, h: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray,
              seed: int) -> tuple[SiteData, int]:
    """One hospital's train/val/test splits and the number of clipped z-scores."""
    z = _standardise(h["x"], mean, std)
    clipped = int((np.abs(z) > Z_CLIP).sum())
    labels, groups, train_all = h["labels"], h["groups"], h["train"]
    val_fraction = [1.0 - VAL_FRACTION, VAL_FRACTION]
    tr, va = (train_all[p] for p in stratified_split(labels[train_all], val_fraction, seed))
    site = SiteData(site_id, _split(z, labels, groups, tr), _split(z, labels, groups, va),
                    _split(z, labels, groups, h["test"]))
    return site, clipped


def load_uci_heart(data_dir: str | Path, seed: int, scaling: str = "federated") -> FederatedData:
    """The four hospitals of the UCI folder ``data_dir`` (see the module docstring).

    ``scaling``: ``federated`` (z-scores with the mean and standard deviation of all hospitals'
    training rows, from per-hospital counts, sums and sums of squares) or ``site`` (each
    hospital's own training statistics).
    """
    if scaling not in SCALINGS:
        raise ConfigError(f"feature-scaling={scaling!r}: choose one of {', '.join(SCALINGS)}")
    folder = Path(data_dir).expanduser()
    missing = [name for _, name in HOSPITALS if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder} is not a UCI Heart Disease folder: {', '.join(missing)} missing; "
                        "give the folder holding processed.cleveland.data, processed.hungarian.data, "
                        "processed.switzerland.data and processed.va.data")
    hospitals = {site_id: _read(site_id, folder / name) for site_id, name in HOSPITALS}
    pooled = pooled_moments([h["x"][h["train"]] for h in hospitals.values()])
    sites, clipped = [], 0
    for site_id, h in hospitals.items():
        mean, std = pooled if scaling == "federated" else pooled_moments([h["x"][h["train"]]])
        site, n_clipped = _hospital(site_id, h, mean, std, seed)
        sites.append(site)
        clipped += n_clipped
    if clipped:
        log.info("uci-heart: %d z-score(s) beyond ±%g clipped", clipped, Z_CLIP)
    info = DatasetInfo(
        name=DATASET_NAME,
        num_classes=2,
        in_channels=len(FEATURES),
        image_size=1,
        label_names=("no disease", "disease"),
        group_name="sex",
        group_values=("female", "male"),
    )
    return FederatedData(
        info=info,
        sites=tuple(sites),
        central_test=ImageSplit.concat([s.test for s in sites]),
        central_val=ImageSplit.concat([s.val for s in sites]),
    )

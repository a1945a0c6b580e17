"""Seeded patient-level train/val/test splits for manifest rows.

All images of one patient go to the same split, so a model is never evaluated on a
patient it trained on. Rows that already carry a split keep it; the other rows are
grouped by patient (a row without a patient id is its own patient), the patients are
shuffled with ``numpy.random.default_rng(seed)`` over their sorted keys, and each is
given to the split furthest below its target image count. The result depends only on
the rows' contents and the seed (not on Python's hash seed).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from medfed.common.errors import ConfigError, DataError
from medfed.common.intake.manifest import SPLIT_NAMES, ManifestRow

__all__ = ["DEFAULT_FRACTIONS", "assign_splits", "patients_in_several_splits"]

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
_FRACTION_TOLERANCE = 1e-6

PatientKey = tuple[int, str]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """The fractions as floats; ConfigError unless 3 non-negative values summing to 1, train > 0."""
    try:
        values = tuple(float(value) for value in fractions)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"split fractions {fractions!r} must be 3 numbers (train, val, test)") from exc
    if len(values) != len(SPLIT_NAMES):
        raise ConfigError(
            f"split fractions {list(values)} must have 3 values (train, val, test), "
            f"e.g. {DEFAULT_FRACTIONS}"
        )
    if any(not math.isfinite(value) or value < 0 for value in values):
        raise ConfigError(f"split fractions {list(values)} must be finite and non-negative")
    if abs(sum(values) - 1.0) > _FRACTION_TOLERANCE:
        raise ConfigError(f"split fractions {list(values)} sum to {sum(values):g}, not 1; rescale them")
    if values[0] <= 0:
        raise ConfigError(
            f"split fractions {list(values)} give train nothing; the train fraction must be > 0"
        )
    return values[0], values[1], values[2]


def _patient_key(row: ManifestRow) -> PatientKey:
    """Patient id, or the row's path when the patient is unknown (kept apart by the tag)."""
    return (0, row.patient_id) if row.patient_id else (1, row.path)


def _fixed_split(row: ManifestRow) -> str:
    """The row's own split ('' if none); DataError for a value that is not a split name."""
    if row.split and row.split not in SPLIT_NAMES:
        raise DataError(
            f"manifest line {row.line} has split '{row.split}', not one of {list(SPLIT_NAMES)}; "
            "read manifests with read_manifest, which normalises split names"
        )
    return row.split


def _preferred_split(fixed: Counter[str]) -> str:
    """Split holding most of a patient's fixed rows (ties: SPLIT_NAMES order)."""
    return max(SPLIT_NAMES, key=lambda name: (fixed[name], -SPLIT_NAMES.index(name)))


def _seed_empty_splits(
    order: list[PatientKey],
    sizes: dict[PatientKey, int],
    counts: dict[str, int],
    fractions: Sequence[float],
    n_patients: int,
) -> dict[PatientKey, str]:
    """Give each empty split with a positive fraction one of the smallest free patients.

    Done only with at least 3 patients in all, so that no split ends up empty just
    because large patients came first in the shuffled order.
    """
    empty = [name for name, fraction in zip(SPLIT_NAMES, fractions) if fraction > 0 and counts[name] == 0]
    if n_patients < len(SPLIT_NAMES) or not empty:
        return {}
    position = {key: index for index, key in enumerate(order)}
    smallest = sorted(order, key=lambda key: (sizes[key], position[key]))
    seeded: dict[PatientKey, str] = {}
    for key, name in zip(smallest, sorted(empty, key=lambda name: fractions[SPLIT_NAMES.index(name)])):
        seeded[key] = name
        counts[name] += sizes[key]
    return seeded


def _greedy(
    order: list[PatientKey],
    sizes: dict[PatientKey, int],
    counts: dict[str, int],
    fractions: Sequence[float],
    total: int,
) -> dict[PatientKey, str]:
    """Give each patient, in order, to the split furthest below its target count."""
    targets = {name: fraction * total for name, fraction in zip(SPLIT_NAMES, fractions)}
    candidates = [name for name, fraction in zip(SPLIT_NAMES, fractions) if fraction > 0]
    chosen: dict[PatientKey, str] = {}
    for key in order:
        name = max(candidates, key=lambda split: (targets[split] - counts[split], -SPLIT_NAMES.index(split)))
        chosen[key] = name
        counts[name] += sizes[key]
    return chosen


def assign_splits(
    rows: Sequence[ManifestRow], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> tuple[str, ...]:
    """One split name per row, keeping every patient's images together.

    Rows with a split keep it; a patient with some fixed rows gets its other rows in the
    split holding most of its fixed rows (disagreeing fixed rows are left as they are;
    QC reports that leak). Free patients are shuffled by ``seed`` and assigned greedily
    so each split's image count approaches ``fractions * len(rows)``. With at least 3
    patients and all fractions > 0, every split gets at least one patient.
    """
    fractions = _check_fractions(fractions)
    fixed_by_patient: dict[PatientKey, Counter[str]] = {}
    sizes: Counter[PatientKey] = Counter()
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    for row in rows:
        key, split = _patient_key(row), _fixed_split(row)
        fixed_by_patient.setdefault(key, Counter())
        if split:
            fixed_by_patient[key][split] += 1
            counts[split] += 1
        else:
            sizes[key] += 1
    decided = {key: _preferred_split(fixed) for key, fixed in fixed_by_patient.items() if fixed}
    for key, split in decided.items():
        counts[split] += sizes.get(key, 0)
    free = sorted(key for key in sizes if key not in decided)
    rng = np.random.default_rng(seed)
    order = [free[index] for index in rng.permutation(len(free))]
    seeded = _seed_empty_splits(order, sizes, counts, fractions, len(fixed_by_patient))
    decided.update(seeded)
    decided.update(_greedy([key for key in order if key not in seeded], sizes, counts, fractions, len(rows)))
    return tuple(row.split or decided[_patient_key(row)] for row in rows)


def patients_in_several_splits(
    rows: Sequence[ManifestRow], splits: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """Patient id -> sorted split names, for patients (non-empty ids) found in more than one split."""
    if len(rows) != len(splits):
        raise DataError(
            f"got {len(rows)} rows but {len(splits)} split names; pass one split per row "
            "(e.g. the result of assign_splits)"
        )
    seen: dict[str, set[str]] = {}
    for row, split in zip(rows, splits):
        if row.patient_id and split:
            seen.setdefault(row.patient_id, set()).add(split)
    return {patient: tuple(sorted(names)) for patient, names in sorted(seen.items()) if len(names) > 1}

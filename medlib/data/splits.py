"""Patient-grouped splits, k-fold and few-shot draws: no patient ever sits on both sides of a split.

Stratification works on *patients*: each patient's label vector is the union of its images'
labels plus one extra column for "no finding" (multi-label), "negative" (binary) - so that
healthy patients are spread like the rest - and multi-class labels are one-hot. Patients are
then assigned by iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011): the rarest
label is placed first, each patient going to the split that still needs most of that label,
ties broken by the split that still needs most patients, then at random. It balances every
label of a multi-label set at once, where a stratified split on label *combinations* breaks
down (most combinations are unique). Fractions count patients, not images.

Few-shot draws (:func:`few_shot_indices`) come only from a given pool (the training
indices), so a few-shot training set never holds a validation or test image - the defect B2
of the public code of Baharoon et al. 2023, where few-shot runs silently merged val into train.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .imageset import ImageSet

SPLIT_NAMES = ("train", "val", "test")


def class_membership(ds: ImageSet) -> tuple[np.ndarray, list[str]]:
    """(N, C) boolean class membership per image and the class names used for stratification and few-shot.

    Multi-class: one column per class. Binary: the positive label and "negative". Multi-label:
    one column per label plus "no_finding" for images with no positive label - added only when
    such images exist (a data set with its own "no finding" label has none), and named
    "no_label" when a label is already called "no_finding". Task "none": no columns.
    """
    if ds.task == "none":
        return np.zeros((len(ds), 0), dtype=bool), []
    matrix = ds.label_matrix() > 0.5
    if ds.task == "multiclass":
        return matrix, list(ds.label_names)
    empty = ~matrix.any(axis=1, keepdims=True)
    if ds.task == "binary":
        return np.concatenate([matrix, empty], axis=1), [*ds.label_names, "negative"]
    if not empty.any():
        return matrix, list(ds.label_names)
    extra = "no_label" if "no_finding" in ds.label_names else "no_finding"
    return np.concatenate([matrix, empty], axis=1), [*ds.label_names, extra]


def _patient_table(ds: ImageSet, stratify: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique patients, each image's patient number, and each patient's class membership (union)."""
    patients, inverse = np.unique(ds.patient_ids, return_inverse=True)
    members, _ = class_membership(ds) if stratify else (np.zeros((len(ds), 0), dtype=bool), [])
    table = np.zeros((len(patients), members.shape[1]), dtype=np.float64)
    np.maximum.at(table, inverse, members.astype(np.float64))
    return patients, inverse, table


def iterative_stratification(labels: np.ndarray, fractions: Sequence[float], seed: int = 0) -> np.ndarray:
    """Assign each row of a (P, C) 0/1 matrix to a part so that every column follows ``fractions``."""
    labels = np.asarray(labels, dtype=np.float64)
    fractions = np.asarray(fractions, dtype=np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    y = labels[order]
    active = fractions > 0
    want_total = fractions * len(y)
    want_label = np.outer(fractions, y.sum(axis=0))
    assign = np.full(len(y), -1, dtype=np.int64)
    remaining = np.ones(len(y), dtype=bool)

    def place(row: int, need: np.ndarray) -> None:
        score = np.where(active, need, -np.inf)
        best = np.flatnonzero(score == score.max())
        if best.size > 1:
            totals = want_total[best]
            best = best[totals == totals.max()]
        part = int(best[rng.integers(best.size)]) if best.size > 1 else int(best[0])
        assign[row] = part
        remaining[row] = False
        want_label[part] -= y[row]
        want_total[part] -= 1

    while remaining.any():
        counts = y[remaining].sum(axis=0)
        present = np.flatnonzero(counts > 0)
        if present.size == 0:  # rows without any label: fill by patient count only
            for row in np.flatnonzero(remaining):
                place(row, want_total)
            break
        label = present[np.argmin(counts[present])]
        for row in np.flatnonzero(remaining & (y[:, label] > 0)):
            place(row, want_label[:, label])
    out = np.empty_like(assign)
    out[order] = assign
    return out


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    """Validate (train, val, test) fractions: three, non-negative, train and test > 0, summing to 1."""
    values = np.asarray(fractions, dtype=np.float64)
    if values.shape != (3,) or (values < 0).any() or values[0] <= 0 or values[2] <= 0:
        raise ValueError(f"fractions must be (train, val, test) with train, test > 0 and val >= 0, got {fractions}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {values.sum():g})")
    return values


def _by_part(assign_per_image: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Index arrays of the images assigned to each part."""
    return {name: np.flatnonzero(assign_per_image == k) for k, name in enumerate(names)}


def patient_split(ds: ImageSet, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                  stratify: bool = True, respect_official: bool = True) -> dict[str, np.ndarray]:
    """Train / val / test image indices, grouped by patient and stratified on labels.

    With ``respect_official`` and an official split in ``meta["split"]`` (e.g. MedMNIST+),
    that split is used as it is (``fractions`` ignored); when it has no ``val`` part, val
    patients are carved out of train with the share val / (train + val).
    """
    values = _check_fractions(fractions)
    if respect_official and "split" in ds.meta:
        return _official_split(ds, values, seed, stratify)
    patients, inverse, table = _patient_table(ds, stratify)
    needed = int((values > 0).sum())
    if len(patients) < needed:
        raise ValueError(f"{ds.name}: {len(patients)} patient(s) cannot fill {needed} splits")
    assign = iterative_stratification(table, values, seed)
    parts = _by_part(assign[inverse], SPLIT_NAMES)
    for name, value in zip(SPLIT_NAMES, values):
        if value > 0 and parts[name].size == 0:
            raise ValueError(f"{ds.name}: split {name!r} came out empty with {len(patients)} patients; "
                             f"use more data or larger fractions")
    return parts


def _official_split(ds: ImageSet, fractions: np.ndarray, seed: int, stratify: bool) -> dict[str, np.ndarray]:
    """The official split of ``meta["split"]``, checked for patient leaks; val carved from train if absent."""
    names = np.asarray(ds.meta["split"]).astype(str)
    unknown = sorted(set(names.tolist()) - set(SPLIT_NAMES))
    if unknown or len(names) != len(ds):
        raise ValueError(f"{ds.name}: meta['split'] must hold one of {SPLIT_NAMES} per image; found {unknown}")
    for required in ("train", "test"):
        if not (names == required).any():
            raise ValueError(f"{ds.name}: the official split has no {required!r} images; "
                             f"pass respect_official=False to split by patient")
    pids = ds.patient_ids
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = np.intersect1d(pids[names == a], pids[names == b])
        if shared.size:
            raise ValueError(f"{ds.name}: the official split puts patient {str(shared[0])!r} in both {a} and {b}; "
                             f"pass respect_official=False to split by patient")
    parts = {name: np.flatnonzero(names == name) for name in SPLIT_NAMES}
    if parts["val"].size == 0 and fractions[1] > 0:
        share = fractions[1] / (fractions[0] + fractions[1])
        inner = _carve(ds, parts["train"], share, seed, stratify)
        parts["val"] = parts["train"][inner]
        parts["train"] = np.setdiff1d(parts["train"], parts["val"])
    return parts


def _carve(ds: ImageSet, rows: np.ndarray, share: float, seed: int, stratify: bool) -> np.ndarray:
    """Positions within ``rows`` of a patient-grouped, stratified ``share`` of them."""
    members, _ = class_membership(ds) if stratify else (np.zeros((len(ds), 0), dtype=bool), [])
    patients, inverse = np.unique(ds.patient_ids[rows], return_inverse=True)
    table = np.zeros((len(patients), members.shape[1]))
    np.maximum.at(table, inverse, members[rows].astype(np.float64))
    assign = iterative_stratification(table, [1.0 - share, share], seed)
    return np.flatnonzero(assign[inverse] == 1)


def grouped_kfold(ds: ImageSet, k: int = 5, seed: int = 0, stratify: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) index pairs: folds partition the images, grouped by patient, stratified on labels.

    The folds depend only on (ds, k, seed), so every model of a comparison sees the same folds.
    """
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    patients, inverse, table = _patient_table(ds, stratify)
    if k > len(patients):
        raise ValueError(f"{ds.name}: k={k} folds need at least k patients, found {len(patients)}")
    assign = iterative_stratification(table, np.full(k, 1.0 / k), seed)[inverse]
    folds = []
    for fold in range(k):
        test = np.flatnonzero(assign == fold)
        if test.size == 0:
            raise ValueError(f"{ds.name}: fold {fold} came out empty; use fewer folds")
        folds.append((np.flatnonzero(assign != fold), test))
    return folds


def _check_pool(ds: ImageSet, pool: np.ndarray) -> np.ndarray:
    """Validate a pool of image indices: non-empty, integer, unique, inside the data set."""
    pool = np.asarray(pool)
    if pool.size == 0:
        raise ValueError(f"{ds.name}: the few-shot pool is empty; pass the training indices of a split")
    if pool.ndim != 1 or not np.issubdtype(pool.dtype, np.integer):
        raise ValueError(f"{ds.name}: the pool must be a 1-D array of image indices, got {pool.dtype} {pool.shape}")
    if pool.min() < 0 or pool.max() >= len(ds):
        raise ValueError(f"{ds.name}: pool indices must lie in 0..{len(ds) - 1}")
    if np.unique(pool).size != pool.size:
        raise ValueError(f"{ds.name}: the pool holds repeated indices")
    return pool.astype(np.int64)


def few_shot_indices(ds: ImageSet, pool: np.ndarray, n: int, seed: int, unit: str = "patient") -> np.ndarray:
    """n patients (with all their pool images) or n images per class, drawn only from ``pool``; sorted indices.

    Classes are those of :func:`class_membership` ("no_finding" / "negative" count as a class).
    Classes are served rarest first and each draws n units not drawn before, so every class
    has n units drawn for it (a unit may carry other classes too, so a class can end with more
    than n positives). Too few units of a class in the pool is an error, not a smaller draw.
    """
    pool = _check_pool(ds, pool)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if unit not in ("patient", "image"):
        raise ValueError(f"unit must be 'patient' or 'image', got {unit!r}")
    members, names = class_membership(ds)
    if not names:
        raise ValueError(f"{ds.name}: few-shot draws need labels; this data set has task 'none'")
    members = members[pool]
    if unit == "patient":
        units, inverse = np.unique(ds.patient_ids[pool], return_inverse=True)
        unit_members = np.zeros((len(units), members.shape[1]), dtype=bool)
        np.logical_or.at(unit_members, inverse, members)
    else:
        inverse = np.arange(len(pool))
        unit_members = members
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(unit_members), dtype=bool)
    for c in np.argsort(unit_members.sum(axis=0), kind="stable"):
        available = np.flatnonzero(unit_members[:, c] & ~taken)
        if available.size < n:
            raise ValueError(f"{ds.name}: class {names[c]!r} has {available.size} {unit}(s) left in the pool, "
                             f"fewer than n={n}; lower n or enlarge the pool")
        taken[rng.choice(available, size=n, replace=False)] = True
    return np.sort(pool[taken[inverse]])


def few_shot_repeats(ds: ImageSet, pool: np.ndarray, n: int, seeds: Sequence[int],
                     unit: str = "patient") -> list[np.ndarray]:
    """One few-shot draw per seed (seeded repeats give confidence intervals, unlike a single draw)."""
    if len(seeds) == 0:
        raise ValueError("few_shot_repeats needs at least one seed")
    return [few_shot_indices(ds, pool, n, int(seed), unit=unit) for seed in seeds]


def evenly_spaced_indices(pool: np.ndarray, n: int) -> np.ndarray:
    """n indices evenly spaced through ``pool`` in its order (the deterministic few-shot protocol)."""
    pool = np.asarray(pool)
    if pool.size == 0:
        raise ValueError("evenly_spaced_indices: the pool is empty")
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= pool.size:
        raise ValueError(f"evenly_spaced_indices: n must be an integer in 1..{pool.size}, got {n!r}")
    positions = np.rint(np.linspace(0, pool.size - 1, n)).astype(np.int64)
    return pool[positions]


__all__ = [
    "SPLIT_NAMES", "class_membership", "evenly_spaced_indices", "few_shot_indices", "few_shot_repeats",
    "grouped_kfold", "iterative_stratification", "patient_split",
]

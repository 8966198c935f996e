"""Tests of medlib.data.splits: patient grouping, stratification, k-fold, few-shot draws from a pool."""

from __future__ import annotations

import numpy as np
import pytest

from medlib.data.imageset import ImageSet
from medlib.data.splits import (class_membership, evenly_spaced_indices, few_shot_indices, few_shot_repeats,
                                grouped_kfold, iterative_stratification, patient_split)


def _multilabel(n_patients: int = 200, seed: int = 0) -> ImageSet:
    """1-4 images per patient; label prevalences about 40 %, 15 % and 5 % (per patient)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    pids = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient)
    patient_labels = (rng.random((n_patients, 3)) < [0.4, 0.15, 0.05]).astype(np.float32)
    labels = np.repeat(patient_labels, per_patient, axis=0)
    return ImageSet(images=np.zeros((len(pids), 4, 4), np.uint8), labels=labels, label_names=["a", "b", "c"],
                    task="multilabel", patient_ids=pids, name="toy-multilabel")


def _multiclass(n: int = 60, n_classes: int = 3) -> ImageSet:
    return ImageSet(images=np.zeros((n, 4, 4), np.uint8), labels=np.arange(n) % n_classes,
                    label_names=[f"c{k}" for k in range(n_classes)], task="multiclass",
                    patient_ids=np.arange(n) // 2, name="toy-multiclass")


def _patients_of(ds: ImageSet, idx: np.ndarray) -> set[str]:
    return set(ds.patient_ids[idx].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_patient_split_never_shares_a_patient_and_covers_everything(seed):
    ds = _multilabel(seed=seed)
    parts = patient_split(ds, seed=seed)
    train, val, test = parts["train"], parts["val"], parts["test"]
    assert not _patients_of(ds, train) & _patients_of(ds, val)
    assert not _patients_of(ds, train) & _patients_of(ds, test)
    assert not _patients_of(ds, val) & _patients_of(ds, test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val, test])), np.arange(len(ds)))
    n_patients = len(set(ds.patient_ids))
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(len(_patients_of(ds, parts[name])) - share * n_patients) <= 3


def test_patient_split_stratifies_every_label():
    ds = _multilabel(n_patients=400)
    parts = patient_split(ds, seed=0)
    for j in range(3):
        positives = {p for p, y in zip(ds.patient_ids, ds.labels[:, j]) if y}
        for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
            got = len(positives & _patients_of(ds, parts[name]))
            assert abs(got - share * len(positives)) <= 2, (j, name, got, len(positives))


def test_patient_split_is_deterministic_and_seed_dependent():
    ds = _multilabel()
    a, b, c = patient_split(ds, seed=3), patient_split(ds, seed=3), patient_split(ds, seed=4)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["test"], c["test"])


def test_patient_split_unlabelled_and_zero_val():
    ds = ImageSet(images=np.zeros((30, 2, 2), np.uint8), labels=None, label_names=[], task="none",
                  patient_ids=np.arange(30) // 3)
    parts = patient_split(ds, fractions=(0.8, 0.0, 0.2), seed=0)
    assert parts["val"].size == 0 and len(_patients_of(ds, parts["test"])) == 2
    assert not _patients_of(ds, parts["train"]) & _patients_of(ds, parts["test"])


@pytest.mark.parametrize("fractions, message", [
    ((0.5, 0.5), "train, val, test"),
    ((0.7, 0.2, 0.2), "sum to 1"),
    ((0.0, 0.5, 0.5), "train, test > 0"),
    ((0.9, -0.1, 0.2), "val >= 0"),
])
def test_patient_split_rejects_bad_fractions(fractions, message):
    with pytest.raises(ValueError, match=message):
        patient_split(_multilabel(), fractions=fractions)


def test_patient_split_too_few_patients():
    ds = ImageSet(images=np.zeros((4, 2, 2), np.uint8), labels=None, label_names=[], task="none",
                  patient_ids=["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="2 patient\\(s\\) cannot fill 3 splits"):
        patient_split(ds)


def test_official_split_is_respected_and_val_carved_from_train():
    ds = _multiclass(n=60)
    ds.meta["split"] = np.array(["train"] * 40 + ["test"] * 20)
    parts = patient_split(ds, fractions=(0.6, 0.2, 0.2), seed=0)
    np.testing.assert_array_equal(parts["test"], np.arange(40, 60))
    assert set(parts["val"]) | set(parts["train"]) == set(range(40))
    assert len(_patients_of(ds, parts["val"])) == 5  # share 0.2 / 0.8 of 20 patients
    assert not _patients_of(ds, parts["train"]) & _patients_of(ds, parts["val"])
    ds.meta["split"] = np.array(["train"] * 30 + ["val"] * 10 + ["test"] * 20)
    np.testing.assert_array_equal(patient_split(ds)["val"], np.arange(30, 40))
    ignored = patient_split(ds, respect_official=False)
    assert not np.array_equal(ignored["test"], np.arange(40, 60))


def test_official_split_that_leaks_a_patient_raises():
    ds = _multiclass(n=10)
    ds.meta["split"] = np.array(["train"] * 5 + ["test"] * 5)  # patient 2 owns images 4 and 5
    with pytest.raises(ValueError, match="puts patient '2' in both train and test.*respect_official=False"):
        patient_split(ds)


def test_grouped_kfold_partitions_grouped_stratified_and_deterministic():
    ds = _multilabel(n_patients=150)
    folds = grouped_kfold(ds, k=5, seed=1)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(ds)))
    for train, test in folds:
        assert not _patients_of(ds, train) & _patients_of(ds, test)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(ds)))
        positives = ds.labels[test].sum(axis=0)
        assert (positives > 0).all()
    again = grouped_kfold(ds, k=5, seed=1)
    for (a_train, a_test), (b_train, b_test) in zip(folds, again):
        np.testing.assert_array_equal(a_test, b_test)
    with pytest.raises(ValueError, match="k=200 folds need at least k patients, found 150"):
        grouped_kfold(ds, k=200)
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        grouped_kfold(ds, k=1)


def test_iterative_stratification_places_a_rare_label_on_both_sides():
    labels = np.zeros((10, 2))
    labels[[2, 7], 1] = 1
    labels[:, 0] = 1
    assign = iterative_stratification(labels, [0.5, 0.5], seed=0)
    assert sorted(assign[[2, 7]].tolist()) == [0, 1]
    assert np.bincount(assign).tolist() == [5, 5]


def test_class_membership_adds_no_finding_and_negative():
    members, names = class_membership(_multilabel())
    assert names == ["a", "b", "c", "no_finding"]
    assert (members.sum(axis=1) >= 1).all()
    binary = ImageSet(images=np.zeros((3, 2, 2), np.uint8), labels=np.array([[1.0], [0.0], [0.0]]),
                      label_names=["malignant"], task="binary", patient_ids=[0, 1, 2])
    members, names = class_membership(binary)
    assert names == ["malignant", "negative"] and members.tolist() == [[True, False], [False, True], [False, True]]


def test_few_shot_images_come_only_from_the_pool_with_n_per_class():
    ds = _multiclass(n=90)
    pool = patient_split(ds, seed=0)["train"]
    for seed in range(4):
        chosen = few_shot_indices(ds, pool, n=4, seed=seed, unit="image")
        assert set(chosen) <= set(pool)
        assert np.bincount(ds.labels[chosen], minlength=3).tolist() == [4, 4, 4]
    np.testing.assert_array_equal(few_shot_indices(ds, pool, 4, 7, "image"), few_shot_indices(ds, pool, 4, 7, "image"))
    assert not np.array_equal(few_shot_indices(ds, pool, 4, 7, "image"), few_shot_indices(ds, pool, 4, 8, "image"))


def test_few_shot_patients_bring_all_their_pool_images():
    ds = _multilabel(n_patients=200)
    parts = patient_split(ds, seed=0)
    pool = parts["train"]
    chosen = few_shot_indices(ds, pool, n=2, seed=0, unit="patient")
    assert set(chosen) <= set(pool)
    assert not set(chosen) & (set(parts["val"]) | set(parts["test"]))
    patients = _patients_of(ds, chosen)
    assert len(patients) == 2 * 4  # three labels plus "no finding", two patients each
    in_pool = {i for i in pool if ds.patient_ids[i] in patients}
    assert set(chosen) == in_pool
    members, _ = class_membership(ds)
    assert (members[chosen].sum(axis=0) >= 2).all()
    repeats = few_shot_repeats(ds, pool, 2, seeds=[0, 1, 2])
    np.testing.assert_array_equal(repeats[0], chosen)
    assert len({tuple(r) for r in repeats}) == 3


def test_few_shot_bad_input_raises():
    ds = _multiclass(n=30)
    with pytest.raises(ValueError, match="pool is empty"):
        few_shot_indices(ds, np.array([], dtype=np.int64), 1, 0)
    with pytest.raises(ValueError, match="class 'c0' has 2 image\\(s\\) left in the pool, fewer than n=3"):
        few_shot_indices(ds, np.array([0, 3, 1, 4, 2, 5]), 3, 0, unit="image")
    with pytest.raises(ValueError, match="repeated"):
        few_shot_indices(ds, np.array([0, 0, 1]), 1, 0)
    with pytest.raises(ValueError, match="lie in 0..29"):
        few_shot_indices(ds, np.array([0, 99]), 1, 0)
    with pytest.raises(ValueError, match="unit must be"):
        few_shot_indices(ds, np.arange(30), 1, 0, unit="study")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        few_shot_indices(ds, np.arange(30), 0, 0)


def test_evenly_spaced_indices_known_values():
    pool = np.arange(10) * 2
    assert evenly_spaced_indices(pool, 4).tolist() == [0, 6, 12, 18]
    assert evenly_spaced_indices(pool, 1).tolist() == [0]
    assert evenly_spaced_indices(pool, 10).tolist() == pool.tolist()
    with pytest.raises(ValueError, match="n must be an integer in 1..10"):
        evenly_spaced_indices(pool, 11)
    with pytest.raises(ValueError, match="pool is empty"):
        evenly_spaced_indices(np.array([], dtype=int), 1)


def test_class_membership_with_an_explicit_no_finding_label():
    labels = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    ds = ImageSet(images=np.zeros((3, 2, 2), np.uint8), labels=labels, label_names=["no_finding", "mass"],
                  task="multilabel", patient_ids=[0, 1, 2])
    members, names = class_membership(ds)
    assert names == ["no_finding", "mass"] and members.shape == (3, 2)
    labels[0, 0] = 0  # now one image has no positive label at all
    members, names = class_membership(ds)
    assert names == ["no_finding", "mass", "no_label"] and members[:, 2].tolist() == [True, False, False]

"""ImageSet validates what every source returns."""

import numpy as np
import pytest

from medlib.data import ImageSet


def _set(n=4, **kw):
    args = dict(images=np.zeros((n, 8, 8), np.uint8), labels=np.zeros((n, 2), np.float32), label_names=["a", "b"],
                task="multilabel", patient_ids=np.arange(n))
    args.update(kw)
    return ImageSet(**args)


def test_valid_set_and_subset():
    ds = _set(masks=np.zeros((4, 8, 8), np.uint8), mask_names=["lung"], meta={"site": np.array([0, 1, 2, 3])})
    sub = ds.subset([1, 3])
    assert len(sub) == 2 and sub.meta["site"].tolist() == [1, 3] and sub.patient_ids.tolist() == ["1", "3"]
    assert sub.masks.shape == (2, 8, 8)


@pytest.mark.parametrize("kw, message", [
    (dict(images=np.zeros((4, 8, 8), np.float32)), "must be uint8"),
    (dict(images=np.zeros((4, 8, 8, 2), np.uint8)), r"\(N, H, W\)"),
    (dict(labels=np.zeros((3, 2), np.float32)), "one row per image"),
    (dict(labels=np.full((4, 2), 2.0, np.float32)), "must be 0/1"),
    (dict(masks=np.zeros((4, 9, 8), np.uint8)), "must match images"),
    (dict(task="regression"), "task must be one of"),
    (dict(patient_ids=np.arange(3)), "patient_ids"),
])
def test_bad_input_is_rejected_with_a_reason(kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _set(**kw)


def test_empty_set_and_empty_subset_raise():
    with pytest.raises(ValueError, match="no images"):
        _set(n=0)
    with pytest.raises(ValueError, match="empty subset"):
        _set().subset([])


def test_multiclass_label_matrix_is_one_hot():
    ds = ImageSet(images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 2, 1]), label_names=["x", "y", "z"],
                  task="multiclass", patient_ids=np.arange(3))
    assert ds.label_matrix().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="class index"):
        ImageSet(images=np.zeros((1, 4, 4), np.uint8), labels=np.array([3]), label_names=["x"], task="multiclass",
                 patient_ids=np.arange(1))

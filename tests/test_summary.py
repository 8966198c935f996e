"""Descriptive tables computed from known small ImageSets."""

import numpy as np
import pytest

from medlib.data import ImageSet
from medlib.data.summary import describe, intensity_by_region, label_prevalence


def _ds():
    images = np.zeros((4, 4, 4), np.uint8)
    images[:, :2] = 200  # top half bright
    masks = np.zeros((4, 4, 4), np.uint8)
    masks[:, :2] = 1
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], np.float32)
    return ImageSet(images=images, labels=labels, label_names=["a", "b"], task="multilabel",
                    patient_ids=np.array([0, 0, 1, 2]), masks=masks, mask_names=["organ"], name="toy")


def test_label_prevalence_known_values():
    df = label_prevalence({"toy": _ds()})
    assert df.set_index("label")["prevalence"].to_dict() == {"a": 0.5, "b": 0.25}
    with pytest.raises(ValueError):
        label_prevalence({})


def test_intensity_by_region_known_values():
    df = intensity_by_region(_ds()).set_index("region")
    assert df.loc["organ", "mean"] == 200 and df.loc["background", "mean"] == 0
    assert df.loc["organ", "pixel_share"] == 0.5


def test_describe_counts_patients():
    row = describe({"toy": _ds()}).iloc[0]
    assert (row["images"], row["patients"], row["size"], row["masks"]) == (4, 3, "4x4", "organ")

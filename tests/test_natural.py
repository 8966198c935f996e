"""Tests for the natural-image stand-in (medlib.data.natural)."""

from __future__ import annotations

import numpy as np
import pytest

from medlib.data import natural
from medlib.data.imageset import ImageSet
from medlib.data.natural import (CLASS_NAMES, dead_leaves, labelled_image, make_natural, make_natural_labelled,
                                 photo_names)


def test_make_natural_is_an_unlabelled_rgb_imageset():
    data = make_natural(6, 64, seed=0, photo_fraction=0.5, cache=False)
    assert isinstance(data, ImageSet)
    assert data.images.shape == (6, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.task == "none" and data.labels is None and data.label_names == []
    assert len(set(data.patient_ids.tolist())) == 6
    assert data.meta["source"].shape == (6,)
    assert all(img.std() > 5 for img in data.images)


def test_natural_images_depend_only_on_seed_and_index():
    small = make_natural(4, 64, seed=5, cache=False)
    large = make_natural(7, 64, seed=5, cache=False)
    np.testing.assert_array_equal(small.images, large.images[:4])
    other = make_natural(4, 64, seed=6, cache=False)
    assert not np.array_equal(small.images, other.images)
    workers = make_natural(7, 64, seed=5, cache=False, workers=2)
    np.testing.assert_array_equal(workers.images, large.images)


def test_photo_fraction_switches_between_photos_and_dead_leaves():
    photos = make_natural(8, 64, seed=1, photo_fraction=1.0, cache=False)
    assert set(photos.meta["source"].tolist()) <= set(photo_names())
    leaves = make_natural(8, 64, seed=1, photo_fraction=0.0, cache=False)
    assert set(leaves.meta["source"].tolist()) == {"dead_leaves"}
    mixed = make_natural(60, 64, seed=1, photo_fraction=0.2, cache=False)
    share = (mixed.meta["source"] != "dead_leaves").mean()
    assert 0.05 < share < 0.4


def test_bundled_photos_load_offline():
    names = photo_names()
    for expected in ("astronaut", "camera", "coffee", "chelsea", "coins", "grass", "gravel", "brick", "moon",
                     "rocket", "hubble_deep_field", "retina", "china", "flower"):
        assert expected in names
    crop, name = natural.photo_crop(np.random.default_rng(0), 96)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8 and name in names


def test_dead_leaves_radii_follow_an_inverse_cube_law():
    radii = natural._sample_radii(np.random.default_rng(0), 200_000, 2.0, 60.0)
    assert radii.min() >= 2.0 and radii.max() <= 60.0
    # for density r^-3: P(r < 2 rmin) = (1 - 1/4) / (1 - (rmin / rmax)^2)
    expected = 0.75 / (1 - (2.0 / 60.0) ** 2)
    assert abs((radii < 4.0).mean() - expected) < 0.01
    hist, edges = np.histogram(np.log(radii), bins=10, range=(np.log(2), np.log(60)))
    slope = np.polyfit(edges[:-1], np.log(hist), 1)[0]  # density in log r is r^-2
    assert -2.3 < slope < -1.7


def test_dead_leaves_images_grey_and_colour():
    grey = dead_leaves(np.random.default_rng(3), 64, grey=True)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    colour = dead_leaves(np.random.default_rng(3), 64, grey=False)
    assert (colour[..., 0] != colour[..., 1]).mean() > 0.5
    assert len(np.unique(colour.reshape(-1, 3), axis=0)) > 50  # many leaves
    with pytest.raises(ValueError, match="rmin < rmax"):
        dead_leaves(np.random.default_rng(0), 64, rmin=10, rmax=5)


def test_make_natural_labelled_is_a_balanced_eight_class_task():
    data = make_natural_labelled(48, 64, seed=0, cache=False)
    assert data.task == "multiclass" and data.label_names == list(CLASS_NAMES) and len(CLASS_NAMES) == 8
    assert data.images.shape == (48, 64, 64, 3)
    assert data.labels.dtype == np.int64 and set(data.labels.tolist()) == set(range(8))
    again = make_natural_labelled(5, 64, seed=0, cache=False)
    np.testing.assert_array_equal(again.images, data.images[:5])
    np.testing.assert_array_equal(again.labels, data.labels[:5])


def test_labelled_foreground_object_matches_its_class():
    # the striped classes hold more edges at the image centre than the plain ones (same seeds, same shape)
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    plain = labelled_image(rng_a, 96, CLASS_NAMES.index("disc_plain")).astype(float).mean(axis=2)
    striped = labelled_image(rng_b, 96, CLASS_NAMES.index("disc_striped")).astype(float).mean(axis=2)
    centre = slice(38, 58)

    def edges(img):
        """Mean absolute neighbour difference at the image centre."""
        return np.abs(np.diff(img[centre, centre], axis=1)).mean() + np.abs(np.diff(img[centre, centre], axis=0)).mean()

    assert edges(striped) > edges(plain) + 3


def test_natural_cache_round_trip_and_bad_arguments():
    first = make_natural(5, 64, seed=2)
    again = make_natural(5, 64, seed=2)
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.meta["source"], again.meta["source"])
    labelled = make_natural_labelled(5, 64, seed=2)
    assert isinstance(make_natural_labelled(5, 64, seed=2).labels, np.memmap)
    np.testing.assert_array_equal(labelled.labels, make_natural_labelled(5, 64, seed=2, cache=False).labels)
    with pytest.raises(ValueError, match="64..512"):
        make_natural(4, 32)
    with pytest.raises(ValueError, match="photo_fraction"):
        make_natural(4, 64, photo_fraction=1.5)
    with pytest.raises(ValueError, match="positive int"):
        make_natural_labelled(0, 64)

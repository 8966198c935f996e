"""Cached feature extraction: shapes, correctness against the backbone, cache hits and cache keys."""

import numpy as np
import pytest
import torch

from medlib.data.phantoms import make_dataset
from medlib.data.transforms import ClassificationTransform
from medlib.eval.features import FeatureSet, concat_features, extract_features, weights_id
from medlib.models.backbones import create_backbone


@pytest.fixture(scope="module")
def ds():
    return make_dataset("cxr", 24, size=64, seed=3)


def _counting_backbone(seed: int = 0):
    backbone = create_backbone("random-vit-smoke", seed=seed)  # a random-* name is one init per seed
    calls = {"n": 0}
    original = backbone.features

    def counted(x, n_last=1):
        calls["n"] += 1
        return original(x, n_last=n_last)

    backbone.features = counted
    return backbone, calls


def test_shapes_labels_and_values_match_the_backbone(ds):
    backbone, _ = _counting_backbone()
    fs = extract_features(backbone, ds, n_last=4, batch_size=10, device="cpu", cache=False)
    assert isinstance(fs, FeatureSet) and len(fs) == 24
    assert fs.cls.shape == (24, 48) and fs.pooled.shape == (24, 48)
    assert fs.layers.shape == (24, 2, 48)  # n_last capped at the smoke ViT's depth of 2
    assert fs.cls.dtype == np.float32
    assert np.array_equal(fs.labels, ds.labels) and fs.label_names == ds.label_names and fs.task == "multilabel"
    assert np.allclose(fs.layers[:, -1], fs.cls)
    with torch.no_grad():
        x = ClassificationTransform(32, train=False)(ds.images[:5])
        direct = backbone.features(x, n_last=2)
    assert np.allclose(fs.cls[:5], direct["cls"].numpy(), atol=1e-5)
    assert np.allclose(fs.pooled[:5], direct["pooled"].numpy(), atol=1e-5)
    assert fs.probe_input(2, avgpool=True).shape == (24, 3 * 48)
    with pytest.raises(ValueError, match="n_last >= 3"):
        fs.probe_input(3)


def test_cache_hit_returns_identical_arrays_without_running_the_model(ds):
    backbone, calls = _counting_backbone(seed=1)
    first = extract_features(backbone, ds, batch_size=16, device="cpu")
    assert calls["n"] == 2 and not first.info["cache_hit"]
    second = extract_features(backbone, ds, batch_size=16, device="cpu")
    assert calls["n"] == 2 and second.info["cache_hit"]
    for name in ("cls", "pooled", "layers"):
        assert np.array_equal(np.asarray(getattr(first, name)), np.asarray(getattr(second, name)))
    assert second.key == first.key
    extract_features(backbone, ds, batch_size=16, device="cpu", cache=False)
    assert calls["n"] == 4  # cache=False always runs the model


def test_cache_key_depends_on_image_size_data_n_last_and_weights(ds):
    backbone, calls = _counting_backbone(seed=2)
    base = extract_features(backbone, ds, device="cpu")
    bigger = extract_features(backbone, ds, image_size=48, device="cpu")
    assert bigger.key != base.key and not bigger.info["cache_hit"] and bigger.info["image_size"] == 48
    fewer = extract_features(backbone, ds, n_last=1, device="cpu")
    assert fewer.key != base.key and fewer.layers.shape[1] == 1
    other_data = extract_features(backbone, ds.subset(np.arange(12)), device="cpu")
    assert other_data.key != base.key
    other_init, _ = _counting_backbone(seed=3)  # another random init must never reuse these features
    assert weights_id(other_init) != weights_id(backbone)
    assert extract_features(other_init, ds, device="cpu").key != base.key
    assert calls["n"] == 4  # one batch each: base, bigger, fewer, other_data


def test_subset_concat_and_bad_input(ds):
    backbone, _ = _counting_backbone(seed=4)
    fs = extract_features(backbone, ds, device="cpu", cache=False)
    a, b = fs.subset([0, 1, 2]), fs.subset([5, 6])
    both = concat_features([a, b])
    assert len(both) == 5 and np.array_equal(both.labels, ds.labels[[0, 1, 2, 5, 6]])
    assert np.array_equal(both.cls, fs.cls[[0, 1, 2, 5, 6]])
    with pytest.raises(ValueError, match="0..23"):
        fs.subset([30])
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(backbone, ds, batch_size=0)

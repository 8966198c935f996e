"""Weighted-vote kNN against hand-computed cases."""

import numpy as np
import pytest

from medlib.eval.knn import knn_accuracy, knn_predict_proba


def test_weighted_vote_matches_hand_computation():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([0, 1, 1])
    test = np.array([[2.0, 0.0]])  # cosine sims: 1, 0, 1/sqrt(2)
    proba = knn_predict_proba(train, labels, test, n_classes=2, k=3, temperature=0.5)
    w = np.exp(np.array([1.0, 0.0, 1 / np.sqrt(2)]) / 0.5)
    assert proba[0] == pytest.approx([w[0] / w.sum(), (w[1] + w[2]) / w.sum()], rel=1e-5)


def test_k_limits_the_neighbours_and_scale_does_not_matter():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 0, 1])
    proba = knn_predict_proba(train * 10, labels, np.array([[1.0, 0.05]]), n_classes=2, k=2)
    assert proba[0].tolist() == [1.0, 0.0]


def test_accuracy_on_separable_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0], 0.3, size=(20, 2))
    b = rng.normal([0, 5], 0.3, size=(20, 2))
    feats, labels = np.vstack([a, b]), np.repeat([0, 1], 20)
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2], k=5) == 1.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same D"):
        knn_predict_proba(np.zeros((3, 2)), np.zeros(3, int), np.zeros((1, 3)), 2)
    with pytest.raises(ValueError, match="labels for"):
        knn_predict_proba(np.zeros((3, 2)), np.zeros(2, int), np.zeros((1, 2)), 2)
    with pytest.raises(ValueError, match="0..1"):
        knn_predict_proba(np.ones((3, 2)), np.array([0, 1, 2]), np.ones((1, 2)), 2)

"""ML-kNN against a hand-computed example, on separable data, and its input checks."""

import numpy as np
import pytest
from sklearn.base import clone

from medlib.eval.metrics import macro_auroc
from medlib.eval.mlknn import MLkNN


def _circle(degrees):
    rad = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


# four training points at 0, 10, 90, 100 degrees; label A = [1, 1, 0, 0], label B = [1, 0, 0, 1]
X = _circle([0, 10, 90, 100])
Y = np.array([[1, 1], [1, 0], [0, 0], [0, 1]])


def test_hand_computed_k1():
    model = MLkNN(k=1, s=1.0).fit(X, Y)
    # prior = (1 + 2) / (2 + 4) for both labels
    assert model.prior_ == pytest.approx([0.5, 0.5])
    # own-neighbour-excluded 1-NN: 0->1, 1->0, 2->3, 3->2.
    # A: positives (0, 1) each see 1 positive -> c = [0, 2] -> (1 + c) / (2 + 2) = [.25, .75]
    assert model.cond_pos_[0] == pytest.approx([0.25, 0.75])
    assert model.cond_neg_[0] == pytest.approx([0.75, 0.25])
    # B: positives 0 (sees 1: no) and 3 (sees 2: no) -> c = [2, 0]; negatives 1, 2 see a positive -> c' = [0, 2]
    assert model.cond_pos_[1] == pytest.approx([0.75, 0.25])
    assert model.cond_neg_[1] == pytest.approx([0.25, 0.75])
    proba = model.predict_proba(_circle([3, 97]) * 7.0)  # scale does not matter: cosine on unit vectors
    # query at 3 deg: neighbour 0 -> A count 1: .5*.75 / (.5*.75 + .5*.25) = .75; B count 1 -> .25
    # query at 97 deg: neighbour 3 -> A count 0 -> .25; B count 1 -> .25
    assert proba == pytest.approx(np.array([[0.75, 0.25], [0.25, 0.25]]))
    assert model.predict(_circle([3])).tolist() == [[1, 0]]


def test_hand_computed_k2_uneven_prior_and_smoothing():
    x = _circle([0, 10, 90, 100, 180])
    y = np.array([[1], [1], [0], [0], [0]])
    model = MLkNN(k=2, s=0.5).fit(x, y)
    assert model.prior_[0] == pytest.approx((0.5 + 2) / (1 + 5))
    # 2-NN excluding self: 0 -> {1, 2}; 1 -> {0, 2}; 2 -> {3, 1}; 3 -> {2, 4}; 4 -> {3, 2}
    # positives 0, 1 have counts 1, 1 -> c = [0, 2, 0]; negatives 2, 3, 4 have counts 1, 0, 0 -> c' = [2, 1, 0]
    assert model.cond_pos_[0] == pytest.approx((0.5 + np.array([0, 2, 0])) / (0.5 * 3 + 2))
    assert model.cond_neg_[0] == pytest.approx((0.5 + np.array([2, 1, 0])) / (0.5 * 3 + 3))


def test_beats_chance_on_separable_multilabel_data():
    rng = np.random.default_rng(0)
    n, labels, dim = 240, 3, 16
    y = (rng.random((n, labels)) < 0.4).astype(int)
    centres = rng.normal(size=(labels, dim)) * 3
    x = y @ centres + rng.normal(size=dim) * 2 + rng.normal(scale=0.5, size=(n, dim))
    model = MLkNN(k=10).fit(x[:160], y[:160])
    assert macro_auroc(y[160:], model.predict_proba(x[160:])) > 0.9
    shuffled = MLkNN(k=10).fit(x[:160], rng.permutation(y[:160]))
    assert macro_auroc(y[160:], shuffled.predict_proba(x[160:])) < 0.75


def test_k_is_capped_and_estimator_api():
    model = MLkNN(k=50).fit(X, Y)
    assert model.k_ == 3 and model.cond_pos_.shape == (2, 4)
    assert clone(model).get_params() == {"k": 50, "s": 1.0, "batch_size": 1024}
    assert MLkNN(k=1).fit(X, Y[:, 0]).predict_proba(X).shape == (4, 1)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="positive integer"):
        MLkNN(k=0).fit(X, Y)
    with pytest.raises(ValueError, match="0/1"):
        MLkNN().fit(X, Y * 2)
    with pytest.raises(ValueError, match="n_samples=4"):
        MLkNN().fit(X, Y[:3])
    with pytest.raises(ValueError, match="at least 2"):
        MLkNN().fit(X[:1], Y[:1])
    with pytest.raises(ValueError, match="3 features"):
        MLkNN(k=1).fit(X, Y).predict_proba(np.zeros((1, 3)))
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        MLkNN().predict_proba(X)

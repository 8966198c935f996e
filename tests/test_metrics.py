"""Classification metrics against hand-computed values."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medlib.eval.metrics import (auroc_per_label, classification_metrics, macro_auroc, multiclass_accuracy,
                                 multiclass_auroc, multiclass_auroc_per_class, threshold_metrics,
                                 youden_threshold)


def test_auroc_per_label_known_values_and_skipped_labels():
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 1], [0, 1, 1]])
    s = np.array([[0.9, 0.2, 0.5], [0.1, 0.3, 0.5], [0.4, 0.8, 0.5], [0.6, 0.4, 0.5]])
    per = auroc_per_label(y, s, ["a", "b", "c"])
    # a: positives {0.9, 0.4} vs negatives {0.1, 0.6}: pairs won 0.9>0.1, 0.9>0.6, 0.4>0.1 -> 3/4
    # b: positives {0.3, 0.4} vs negatives {0.2, 0.8}: pairs won 0.3>0.2, 0.4>0.2 -> 2/4
    assert per["a"] == pytest.approx(0.75)
    assert per["b"] == pytest.approx(0.5)
    assert list(per.index) == ["a", "b"]
    assert per.attrs["skipped"] == ["c"]
    assert macro_auroc(y, s) == pytest.approx(0.625)


def test_auroc_ties_count_half_and_vector_input():
    assert macro_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert macro_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert macro_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_macro_auroc_nan_when_no_label_has_both_classes():
    per = auroc_per_label(np.ones((3, 2)), np.zeros((3, 2)), ["x", "y"])
    assert len(per) == 0 and per.attrs["skipped"] == ["x", "y"]
    assert np.isnan(macro_auroc(np.ones((3, 2)), np.zeros((3, 2))))


def test_multiclass_auroc_matches_sklearn_ovr_and_accuracy():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 2])
    p = rng.dirichlet(np.ones(3), size=len(y))
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert multiclass_auroc(y, p) == pytest.approx(expected)
    assert multiclass_accuracy(y, p) == pytest.approx(np.mean(p.argmax(1) == y))
    perfect = np.eye(3)[y]
    assert multiclass_auroc(y, perfect) == 1.0 and multiclass_accuracy(y, perfect) == 1.0


def test_multiclass_absent_class_is_skipped():
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    per = multiclass_auroc_per_class(y, p, ["a", "b", "c"])
    assert per.attrs["skipped"] == ["c"] and per.to_dict() == {"a": 1.0, "b": 1.0}


def test_youden_threshold_hand_case():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.35, 0.4, 0.8, 0.9])
    # thresholds 0.8: tpr 2/3, fpr 0 -> J 0.667; 0.35: tpr 1, fpr 1/3 -> J 0.667 (first max wins: 0.8)
    assert youden_threshold(y, s) == pytest.approx(0.8)
    m = threshold_metrics(y, s, 0.8)
    assert m == pytest.approx({"sensitivity": 2 / 3, "specificity": 1.0, "accuracy": 5 / 6, "f1": 0.8})


def test_youden_threshold_for_useless_score_predicts_nothing_positive():
    y = np.array([1, 0])
    s = np.array([0.1, 0.9])  # inverted score: J is best (0) at the start of the ROC curve
    t = youden_threshold(y, s)
    assert threshold_metrics(y, s, t)["sensitivity"] == 0.0
    assert threshold_metrics(y, s, t)["specificity"] == 1.0


def test_threshold_metrics_known_values():
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = threshold_metrics(y, s, 0.5)  # tp 2, fn 1, fp 1, tn 1
    assert m == pytest.approx({"sensitivity": 2 / 3, "specificity": 0.5, "accuracy": 0.6, "f1": 4 / 6})
    assert np.isnan(threshold_metrics([0, 0], [0.1, 0.2], 0.5)["sensitivity"])


def test_classification_metrics_by_task():
    assert classification_metrics("binary", [[0], [1]], [[0.2], [0.7]]) == {"auroc": 1.0}
    out = classification_metrics("multiclass", np.array([0, 1]), np.array([[0.9, 0.1], [0.4, 0.6]]))
    assert out == {"auroc": 1.0, "accuracy": 1.0}
    with pytest.raises(ValueError, match="task 'none'"):
        classification_metrics("none", [0], [[0.1]])


def test_bad_input_raises_with_a_reason():
    with pytest.raises(ValueError, match="same shape"):
        macro_auroc(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="0/1"):
        macro_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        macro_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="label names"):
        auroc_per_label(np.array([[0, 1], [1, 0]]), np.zeros((2, 2)), ["only-one"])
    with pytest.raises(ValueError, match="0..1"):
        multiclass_auroc(np.array([0, 2]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([1, 1], [0.2, 0.3])

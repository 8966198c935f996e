"""Classification metrics of the studies: per-label and macro AUROC, Youden thresholds, threshold metrics.

Conventions shared by every evaluation in medlib:

- multi-label / binary: ``y_true`` is an (N, L) 0/1 matrix (a 1-D vector is one label) and
  ``y_score`` the matching (N, L) scores; AUROC is computed per label and averaged (macro).
  A label whose test column holds one class only has no AUROC: it is *skipped* and named in
  ``auroc_per_label(...).attrs["skipped"]`` instead of silently counting as 0.5 or NaN.
- multi-class: ``y_true`` is (N,) class indices and ``y_score`` (N, C) probabilities; AUROC is
  one-vs-rest per class, averaged (sklearn's ``multi_class="ovr", average="macro"``), with
  absent classes skipped the same way; accuracy is top-1.
- thresholds follow sklearn's ``roc_curve``: a score ``>= threshold`` is positive.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve


def _as_matrix(y: np.ndarray, name: str) -> np.ndarray:
    """A 1-D vector as one column, a 2-D array as it is; anything else raises."""
    array = np.asarray(y, dtype=np.float64)
    if array.ndim == 1:
        return array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, L), got shape {array.shape}")
    return array


def _check_pair(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate multi-label truth (0/1) and scores of the same shape, without NaN."""
    y = _as_matrix(y_true, "y_true")
    s = _as_matrix(y_score, "y_score")
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and y_score {s.shape} must have the same shape")
    if len(y) == 0:
        raise ValueError("y_true is empty: no samples to score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold 0/1 labels (multi-class indices go to multiclass_auroc)")
    if not np.isfinite(s).all():
        raise ValueError("y_score holds NaN or inf; check the model's outputs")
    return y, s


def auroc_per_label(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str] | None = None) -> pd.Series:
    """AUROC of each label that has both classes; skipped labels are listed in ``.attrs["skipped"]``."""
    y, s = _check_pair(y_true, y_score)
    names = [f"label_{j}" for j in range(y.shape[1])] if label_names is None else list(label_names)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} label columns")
    values, skipped = {}, []
    for j, name in enumerate(names):
        positives = y[:, j].sum()
        if 0 < positives < len(y):
            values[name] = float(roc_auc_score(y[:, j], s[:, j]))
        else:
            skipped.append(name)
    series = pd.Series(values, dtype=np.float64, name="auroc")
    series.index.name = "label"
    series.attrs["skipped"] = skipped
    return series


def macro_auroc(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str] | None = None) -> float:
    """Mean AUROC over the labels that have both classes (NaN when none has)."""
    per_label = auroc_per_label(y_true, y_score, label_names)
    return float(per_label.mean()) if len(per_label) else float("nan")


def _check_multiclass(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,) class indices against (N, C) probabilities."""
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 2 or len(y) != len(p):
        raise ValueError(f"multi-class metrics need y_true (N,) and proba (N, C); got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("y_true is empty: no samples to score")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError("multi-class y_true must hold integer class indices")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"class indices must lie in 0..{p.shape[1] - 1}, found {y.min()}..{y.max()}")
    return y, p


def multiclass_auroc_per_class(y_true: np.ndarray, proba: np.ndarray,
                               class_names: Sequence[str] | None = None) -> pd.Series:
    """One-vs-rest AUROC of each class present in ``y_true`` (absent classes in ``.attrs["skipped"]``)."""
    y, p = _check_multiclass(y_true, proba)
    return auroc_per_label(np.eye(p.shape[1])[y], p, class_names)


def multiclass_auroc(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y_true`` (NaN when fewer than two are)."""
    per_class = multiclass_auroc_per_class(y_true, proba)
    return float(per_class.mean()) if len(per_class) else float("nan")


def multiclass_accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Top-1 accuracy of (N, C) probabilities against (N,) class indices."""
    y, p = _check_multiclass(y_true, proba)
    return float((p.argmax(axis=1) == y).mean())


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The threshold maximising Youden's J = tpr - fpr on the ROC curve (the highest one on ties)."""
    y, s = _check_pair(y_true, y_score)
    if y.shape[1] != 1:
        raise ValueError(f"youden_threshold takes one label; got {y.shape[1]} columns (loop over labels)")
    if not 0 < y.sum() < len(y):
        raise ValueError("youden_threshold needs both classes in y_true; this label has one class only")
    fpr, tpr, thresholds = roc_curve(y[:, 0], s[:, 0])
    youden = tpr - fpr
    best = int(np.flatnonzero(youden >= youden.max() - 1e-12)[0])  # ties (up to rounding): highest threshold
    if np.isinf(thresholds[best]):  # roc_curve's first point: nothing positive; keep that meaning, finitely
        return float(np.nextafter(np.max(s), np.inf))
    return float(thresholds[best])


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator > 0 else float("nan")


def threshold_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity, accuracy and F1 of one label when ``score >= threshold`` is positive."""
    y, s = _check_pair(y_true, y_score)
    if y.shape[1] != 1:
        raise ValueError(f"threshold_metrics takes one label; got {y.shape[1]} columns (loop over labels)")
    truth = y[:, 0] > 0.5
    predicted = s[:, 0] >= threshold
    tp = float(np.sum(truth & predicted))
    tn = float(np.sum(~truth & ~predicted))
    fp = float(np.sum(~truth & predicted))
    fn = float(np.sum(truth & ~predicted))
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, len(truth)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def classification_metrics(task: str, y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The headline metrics of a task: macro AUROC always, plus accuracy for multi-class."""
    if task in ("multilabel", "binary"):
        return {"auroc": macro_auroc(y_true, proba)}
    if task == "multiclass":
        return {"auroc": multiclass_auroc(y_true, proba), "accuracy": multiclass_accuracy(y_true, proba)}
    raise ValueError(f"no classification metrics for task {task!r}; expected multilabel, binary or multiclass")


__all__ = [
    "auroc_per_label", "classification_metrics", "macro_auroc", "multiclass_accuracy", "multiclass_auroc",
    "multiclass_auroc_per_class", "threshold_metrics", "youden_threshold",
]

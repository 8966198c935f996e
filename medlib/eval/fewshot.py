"""Few-shot evaluation on cached features: seeded repeats with confidence intervals, or the authors' single draw.

For each n in ``ns`` (e.g. 1, 2, 4, 8, 16, "all") the runner draws a training subset from the
**train split only** - never from val or test (defect B2 of the authors' code: its few-shot runs merged
val into train) - fits a probe on it, scores the test split and records one row per metric.

Protocols:

- ``"repeats"`` (default): ``repeats`` seeded draws per n with
  :func:`medlib.data.splits.few_shot_indices` (n patients - or images - per class), then the
  mean and a 95 % interval over the repeats (default: percentile bootstrap of the mean over the
  repeats, which stays inside the metric's range; a t-interval over a handful of repeats does not,
  e.g. t = 12.7 for two repeats). A single draw, as in
  the authors' code, gives no idea of the spread (defect B6).
- ``"paper"``: the authors' one deterministic draw - n evenly spaced images of the train split
  in total (:func:`medlib.data.splits.evenly_spaced_indices`) for ``unit="image"``, or one
  draw of n patients per class (NIH ChestX-ray14) for ``unit="patient"``; no interval.

A probe is any callable ``probe(train, val, test) -> test probabilities`` over
:class:`~medlib.eval.features.FeatureSet` s; :func:`knn_probe`, :func:`mlknn_probe`,
:func:`logistic_probe` and :func:`linear_probe_fn` build the usual ones. Probes that select
hyper-parameters see the full validation split for *selection only* and are never refit on
it (our assumption: the authors' code does not say how few-shot heads were tuned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..data.imageset import ImageSet
from ..data.splits import evenly_spaced_indices, few_shot_indices
from ..engine import derive_seed
from ..engine import progress as progress_bar
from .features import FeatureSet
from .knn import knn_predict_proba
from .linear import linear_probe, logistic_regression_probe
from .metrics import classification_metrics
from .mlknn import MLkNN

Probe = Callable[[FeatureSet, "FeatureSet | None", FeatureSet], np.ndarray]
PROTOCOLS = ("repeats", "paper")
INTERVALS = ("bootstrap", "percentile", "t")
#: Resamples of the percentile bootstrap over repeats (seeded, so summaries are reproducible).
BOOTSTRAP_RESAMPLES = 2000


# --------------------------------------------------------------------------- probes


def knn_probe(k: int = 20, temperature: float = 0.07, mlknn_k: int | None = None, s: float = 1.0) -> Probe:
    """kNN as the authors' code runs it: DINOv2's weighted vote for single-label tasks, ML-kNN for multi-label."""

    def probe(train: FeatureSet, val: FeatureSet | None, test: FeatureSet) -> np.ndarray:
        """Test probabilities of the kNN classifier fitted on ``train``."""
        if train.task == "multilabel":
            return mlknn_probe(mlknn_k or k, s)(train, val, test)
        if train.task == "binary":
            labels = np.asarray(train.labels)[:, 0].astype(np.int64)
            proba = knn_predict_proba(train.cls, labels, test.cls, n_classes=2, k=k, temperature=temperature)
            return proba[:, 1:]
        return knn_predict_proba(train.cls, np.asarray(train.labels), test.cls, n_classes=train.n_classes, k=k,
                                 temperature=temperature)

    return probe


def mlknn_probe(k: int = 10, s: float = 1.0) -> Probe:
    """ML-kNN (cosine, smoothing ``s``) on the CLS features; multi-label and binary tasks."""

    def probe(train: FeatureSet, val: FeatureSet | None, test: FeatureSet) -> np.ndarray:
        """Test posteriors of ML-kNN fitted on ``train``."""
        if train.task == "multiclass":
            raise ValueError("mlknn_probe is for multi-label / binary labels; use knn_probe for multi-class")
        return MLkNN(k=k, s=s).fit(train.cls, np.asarray(train.labels)).predict_proba(test.cls)

    return probe


def logistic_probe(n_c: int = 45, **kwargs: Any) -> Probe:
    """Logistic regression with C chosen on val, fitted on the few-shot images only (no refit on val)."""

    def probe(train: FeatureSet, val: FeatureSet | None, test: FeatureSet) -> np.ndarray:
        """Test probabilities of the logistic probe (C chosen on ``val``)."""
        return logistic_regression_probe(train, val, test, n_c=n_c, refit=False, **kwargs).test_proba

    return probe


def linear_probe_fn(**kwargs: Any) -> Probe:
    """The seed-002 linear-probe grid, head chosen on val, trained on the few-shot images only (no refit on val)."""

    def probe(train: FeatureSet, val: FeatureSet | None, test: FeatureSet) -> np.ndarray:
        """Test probabilities of the chosen grid head (chosen on ``val``)."""
        return linear_probe(train, val, test, refit=False, **kwargs).test_proba

    return probe


# --------------------------------------------------------------------------- the runner


@dataclass
class FewShotResult:
    """Long scores (one row per n, repeat and metric), their summary, the drawn training indices."""

    scores: pd.DataFrame
    summary: pd.DataFrame
    draws: dict[tuple[Any, int], np.ndarray]
    protocol: str
    skipped: dict[Any, str] = field(default_factory=dict)  # n -> why it could not be drawn


def check_split(split: dict[str, np.ndarray], n_images: int) -> dict[str, np.ndarray]:
    """Validate a {train, val?, test} split: index arrays inside the data, train and test present, disjoint."""
    for required in ("train", "test"):
        if required not in split or len(split[required]) == 0:
            raise ValueError(f"the split needs a non-empty {required!r} part; got parts {sorted(split)}")
    parts = {name: np.asarray(idx, dtype=np.int64) for name, idx in split.items() if name in ("train", "val", "test")}
    for name, idx in parts.items():
        if idx.size and (idx.min() < 0 or idx.max() >= n_images):
            raise ValueError(f"split {name!r} holds indices outside 0..{n_images - 1}")
    names = list(parts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(parts[a], parts[b])
            if shared.size:
                raise ValueError(f"split parts {a!r} and {b!r} share {shared.size} image(s) (e.g. {shared[0]}); "
                                 "few-shot training sets must come from train alone (defect B2)")
    return parts


def _check_aligned(ds: ImageSet, features: FeatureSet) -> None:
    if len(ds) != len(features):
        raise ValueError(f"features ({len(features)} rows) and data set {ds.name!r} ({len(ds)} images) differ; "
                         "extract the features from this ImageSet")
    if ds.labels is None or features.labels is None or not np.array_equal(np.asarray(ds.labels),
                                                                          np.asarray(features.labels)):
        raise ValueError(f"the labels of the features and of data set {ds.name!r} differ; extract the features "
                         "from this ImageSet")


def _draw(ds: ImageSet, pool: np.ndarray, n: Any, seed: int, unit: str, protocol: str) -> np.ndarray:
    """The training indices of one draw (always a subset of ``pool``)."""
    if n == "all":
        return np.sort(pool)
    if protocol == "paper" and unit == "image":
        return np.sort(evenly_spaced_indices(pool, int(n)))
    return few_shot_indices(ds, pool, int(n), seed, unit=unit)


def _check_ns(ns: Sequence[Any]) -> list[Any]:
    if not ns:
        raise ValueError("ns must name at least one few-shot size, e.g. (1, 2, 4, 8, 16, 'all')")
    for n in ns:
        if not (n == "all" or (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1)):
            raise ValueError(f"few-shot sizes must be positive integers or 'all', got {n!r}")
    return list(ns)


def run_few_shot(ds: ImageSet, features: FeatureSet, split: dict[str, np.ndarray], probe: Probe, *,
                 ns: Sequence[Any] = (1, 2, 4, 8, 16, "all"), repeats: int = 5, seed: int = 0,
                 unit: str = "patient", protocol: str = "repeats", interval: str = "bootstrap", confidence: float = 0.95,
                 skip_impossible: bool = False, progress: bool = False) -> FewShotResult:
    """Few-shot scores of ``probe`` for every n (train drawn from ``split["train"]`` only) and their summary.

    ``features`` are the FeatureSet of the whole ``ds`` (row i = image i). ``"all"`` uses the
    whole train split once. With ``skip_impossible`` an n that a class cannot supply is
    skipped (listed in ``result.skipped``) instead of raising.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    ns = _check_ns(ns)
    _check_aligned(ds, features)
    parts = check_split(split, len(ds))
    pool = parts["train"]
    val = features.subset(parts["val"]) if parts.get("val") is not None and parts["val"].size else None
    test = features.subset(parts["test"])
    y_test = np.asarray(test.labels)
    rows, draws, skipped = [], {}, {}
    jobs = [(n, r) for n in ns for r in range(1 if (n == "all" or protocol == "paper") else repeats)]
    for n, repeat in progress_bar(jobs, enabled=progress, desc="few-shot"):
        if n in skipped:
            continue
        draw_seed = derive_seed(seed, 0 if n == "all" else int(n), repeat)
        try:
            idx = _draw(ds, pool, n, draw_seed, unit, protocol)
        except ValueError as err:
            if not skip_impossible:
                raise
            skipped[n] = str(err)
            continue
        draws[(n, repeat)] = idx
        proba = probe(features.subset(idx), val, test)
        for metric, value in classification_metrics(test.task, y_test, proba).items():
            rows.append({"n": n, "repeat": repeat, "seed": draw_seed, "metric": metric, "value": value,
                         "n_train_images": int(idx.size),
                         "n_train_patients": int(np.unique(ds.patient_ids[idx]).size)})
    scores = pd.DataFrame(rows, columns=["n", "repeat", "seed", "metric", "value", "n_train_images",
                                         "n_train_patients"])
    return FewShotResult(scores, summarize(scores, interval, confidence), draws, protocol, skipped)


def summarize(scores: pd.DataFrame, interval: str = "bootstrap", confidence: float = 0.95) -> pd.DataFrame:
    """Mean, std and a ``confidence`` interval over repeats per (n, metric); NaN interval for one repeat.

    ``interval``: ``"bootstrap"`` (percentile bootstrap of the mean over the repeats,
    :data:`BOOTSTRAP_RESAMPLES` seeded resamples), ``"percentile"`` (percentiles of the repeats
    themselves) or ``"t"`` (Student t; it can leave a bounded metric's range with few repeats). The
    ``interval`` column says how each row's interval was made.
    """
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    missing = {"n", "metric", "value"} - set(scores.columns)
    if missing:
        raise ValueError(f"scores lack column(s) {sorted(missing)}; pass FewShotResult.scores")
    rows = []
    for (n, metric), group in scores.groupby(["n", "metric"], sort=False):
        values = group["value"].dropna().to_numpy(dtype=float)
        n_images = group["n_train_images"].mean() if "n_train_images" in group else np.nan
        rows.append({"n": n, "metric": metric, "repeats": int(values.size), **_interval(values, interval, confidence),
                     "n_train_images": float(n_images), "interval": interval_label(interval, confidence, values.size)})
    return pd.DataFrame(rows, columns=["n", "metric", "repeats", "mean", "std", "ci_low", "ci_high",
                                       "n_train_images", "interval"])


def interval_label(kind: str, confidence: float, repeats: int) -> str:
    """How an interval over ``repeats`` repeats was made, in words (``"none (one repeat)"`` below two)."""
    if repeats < 2:
        return "none (one repeat)"
    pct = f"{100 * confidence:g} %"
    return {"bootstrap": f"{pct} percentile bootstrap of the mean over {repeats} repeats",
            "percentile": f"{pct} percentiles of {repeats} repeats",
            "t": f"{pct} t-interval over {repeats} repeats"}[kind]


def _interval(values: np.ndarray, kind: str, confidence: float) -> dict[str, float]:
    """Mean, sample std and the bootstrap / percentile / t interval of ``values``."""
    if values.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    mean = float(values.mean())
    if values.size < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    std = float(values.std(ddof=1))
    tail = 100 * (1 - confidence) / 2
    if kind == "t":
        half = float(stats.t.ppf((1 + confidence) / 2, df=values.size - 1)) * std / np.sqrt(values.size)
        low, high = mean - half, mean + half
    elif kind == "bootstrap":
        rng = np.random.default_rng(0)
        means = values[rng.integers(0, values.size, (BOOTSTRAP_RESAMPLES, values.size))].mean(axis=1)
        low, high = (float(v) for v in np.percentile(means, [tail, 100 - tail]))
    else:
        low, high = (float(v) for v in np.percentile(values, [tail, 100 - tail]))
    return {"mean": mean, "std": std, "ci_low": min(low, mean), "ci_high": max(high, mean)}


__all__ = [
    "FewShotResult", "Probe", "check_split", "knn_probe", "linear_probe_fn", "logistic_probe", "mlknn_probe",
    "run_few_shot", "summarize", "interval_label",
]

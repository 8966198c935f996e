"""Bootstrap statistics for study 2 (Tayebi Arasteh et al. 2023): paired model comparison, confidence intervals, FDR.

Protocol (Tayebi Arasteh et al. 2023): 1000 bootstrap resamples of the test set with the
SAME indices for both models; per resample the per-label AUROC, its macro average, and a per-label
Youden threshold (argmax tpr - fpr) re-chosen in that resample with sensitivity, specificity,
accuracy and F1 at it; a one-sided p-value per label (H1: model a is better) and for the macro
AUROC; Benjamini-Hochberg correction across labels; mean +- std over resamples.

Choices made here (the paper leaves them open):

* Ties in the p-value. The paper's p is the share of resamples with ``AUC_a <= AUC_b``; with that
  exact rule two identical models get p = 1.0 (every resample is a tie). By default
  (``ties="half"``) a tie counts one half, so identical models get p = 0.5, the value of a fair
  coin; ``ties="paper"`` keeps the paper's rule. The two differ only by the share of exact ties.
* A resample in which a label has one class only is skipped for that label (its AUROC and threshold
  metrics are NaN there) and counted in ``BootstrapResult.skipped``; p-values and intervals use the
  remaining resamples. The macro average is over the labels valid in that resample.
* p = 0 means that no resample favoured model b; its resolution is 1 / (number of valid resamples).
* Youden threshold: the candidate thresholds are the distinct scores of the resample plus +inf
  ("nothing positive"), a sample is positive when ``score >= threshold``, and ties of J go to the
  highest threshold: exactly ``thresholds[argmax(tpr - fpr)]`` of ``sklearn.metrics.roc_curve``.

AUROC is computed from ranks on sorted scores (ties count one half, as ``roc_auc_score``), with the
bootstrap expressed as per-sample multiplicities, so all resamples of a label are a few numpy
array operations instead of one sklearn call per resample.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd

METRICS: tuple[str, ...] = ("auroc", "sensitivity", "specificity", "accuracy", "f1", "threshold")
"""Per-label metrics computed in every resample (``threshold`` is the Youden threshold itself)."""

Ties = Literal["half", "paper"]
_CHUNK_ELEMENTS = 1_000_000  # resamples x samples processed at once (bounds memory to ~100 MB)


# ----------------------------------------------------------------------------- validation


def _as_label_matrix(y_true: np.ndarray, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a (N, L) bool matrix; (N,) becomes one label; anything but 0/1 raises."""
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"{name} must be (N,) or (N, L) with N >= 2 samples and L >= 1 labels; got shape {y.shape}")
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{name} must be numeric 0/1 (or bool); got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{name} must be binary 0/1 (one column per label); found {y[row, col]!r} at row {row}, "
                         f"column {col}. Binarise multiclass labels first (one-vs-rest).")
    return y.astype(bool)


def _as_scores(scores: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """``scores`` as a finite float64 (N, L) matrix of the same shape as the labels."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[:, None]
    if s.shape != shape:
        raise ValueError(f"{name} has shape {np.shape(scores)} but y_true has {shape}: pass one score per sample "
                         f"and label, in the same order")
    if not np.isfinite(s).all():
        row, col = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"{name} must be finite; found {s[row, col]} at row {row}, column {col}")
    return s


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


# ----------------------------------------------------------------------------- core engine


def bootstrap_indices(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """The (n_resamples, n) sample indices of the bootstrap; the same seed gives the same indices."""
    _check_resamples(n_resamples)
    if n < 1:
        raise ValueError(f"need at least one sample to resample, got n={n}")
    return np.random.default_rng(seed).integers(0, n, size=(int(n_resamples), int(n)))


def _counts(indices: np.ndarray, n: int) -> np.ndarray:
    """Per-resample multiplicity of every sample: (B, n) int64 from (B, n) indices."""
    b = len(indices)
    flat = (indices + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n)


def _label_metrics(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """All METRICS of one label for every row of ``counts`` (sample multiplicities); NaN where one class."""
    order = np.argsort(s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # groups of tied scores, ascending
    c = counts[:, order]
    tot = np.add.reduceat(c, starts, axis=1)
    pos = np.add.reduceat(c * y_sorted, starts, axis=1)
    neg = tot - pos
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    p, q = np.where(valid, n_pos, 1).astype(np.float64), np.where(valid, n_neg, 1).astype(np.float64)
    neg_below = np.cumsum(neg, axis=1) - neg
    pos_below = np.cumsum(pos, axis=1) - pos
    auroc = (pos * (neg_below + 0.5 * neg)).sum(1) / (p * q)
    # Youden: threshold at group g predicts positive for score >= value_g; plus +inf (nothing positive).
    tp = np.concatenate([n_pos[:, None] - pos_below, np.zeros((len(c), 1), np.int64)], axis=1)
    fp = np.concatenate([n_neg[:, None] - neg_below, np.zeros((len(c), 1), np.int64)], axis=1)
    j = tp / p[:, None] - fp / q[:, None]
    # Ties go to the highest threshold, like sklearn; so a score absent from this resample is never
    # chosen: it ties with the next higher score present (or +inf), which wins.
    best = j.shape[1] - 1 - np.argmax(j[:, ::-1], axis=1)
    tp_b = np.take_along_axis(tp, best[:, None], 1)[:, 0].astype(np.float64)
    fp_b = np.take_along_axis(fp, best[:, None], 1)[:, 0].astype(np.float64)
    fn_b, tn_b = p - tp_b, q - fp_b
    out = {
        "auroc": auroc,
        "sensitivity": tp_b / p,
        "specificity": tn_b / q,
        "accuracy": (tp_b + tn_b) / (p + q),
        "f1": 2 * tp_b / (2 * tp_b + fp_b + fn_b),
        "threshold": np.r_[s_sorted[starts], np.inf][best],
    }
    return {k: np.where(valid, v, np.nan) for k, v in out.items()}


def _metrics_for_counts(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """METRICS -> (B, L) arrays for every row of ``counts`` (sample multiplicities) and label."""
    out = {k: np.empty((len(counts), y.shape[1])) for k in METRICS}
    for label in range(y.shape[1]):
        for k, v in _label_metrics(y[:, label], s[:, label], counts).items():
            out[k][:, label] = v
    return out


def _resampled_metrics(y: np.ndarray, s: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    """METRICS -> (B, L) arrays for the resamples given by ``indices`` (B, N)."""
    n = y.shape[0]
    step = max(1, _CHUNK_ELEMENTS // n)
    parts = [_metrics_for_counts(y, s, _counts(indices[lo:lo + step], n)) for lo in range(0, len(indices), step)]
    return {k: np.concatenate([part[k] for part in parts]) for k in METRICS}


def _macro(values: np.ndarray) -> np.ndarray:
    """Mean over labels (axis 1) ignoring NaN; NaN for a resample with no valid label."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(1)
    n = finite.sum(1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def label_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label AUROC and Youden-threshold metrics on the full data: METRICS -> (L,) arrays (NaN: one class)."""
    y = _as_label_matrix(y_true)
    s = _as_scores(scores, y.shape, "scores")
    return {k: v[0] for k, v in _metrics_for_counts(y, s, np.ones((1, len(y)), np.int64)).items()}


def auroc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank-based per-label AUROC (ties count one half, equal to sklearn's roc_auc_score); NaN for one class."""
    return label_metrics(y_true, scores)["auroc"]


# ----------------------------------------------------------------------------- p-values, FDR


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the labels that hold both classes (NaN when none does)."""
    return float(_macro(auroc(y_true, scores)[None, :])[0])


def resampled_macro_auroc(y_true: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(B,) macro AUROC on each bootstrap resample given by ``indices`` (B, N) (NaN where no label is valid)."""
    y = _as_label_matrix(y_true)
    s = _as_scores(scores, y.shape, "scores")
    return _macro(_resampled_metrics(y, s, np.asarray(indices))["auroc"])


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, level: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of ``values`` (e.g. repeats).

    The interval never leaves [min(values), max(values)], so it stays inside a bounded metric's range;
    with one value it is that value, with none NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if v.size == 0:
        return (float("nan"),) * 3
    if v.size == 1:
        return (float(v[0]),) * 3
    means = v[bootstrap_indices(v.size, n_resamples, seed)].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(v.mean()), float(low), float(high)


def one_sided_pvalue(a: np.ndarray, b: np.ndarray, ties: Ties = "half") -> np.ndarray | float:
    """Share of resamples (axis 0) where a <= b (H1: a is better); ties count 1/2 (``"half"``) or 1 (``"paper"``)."""
    if ties not in ("half", "paper"):
        raise ValueError(f"ties must be 'half' or 'paper', got {ties!r}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    valid = np.isfinite(a) & np.isfinite(b)
    tie_weight = 0.5 if ties == "half" else 1.0
    hits = ((a < b) & valid).sum(0) + tie_weight * ((a == b) & valid).sum(0)
    n = valid.sum(0)
    p = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    return float(p) if p.ndim == 0 else p


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg FDR-adjusted q-values (same order as the input; NaN p-values stay NaN, not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be a 1-D sequence, got shape {p.shape}")
    finite = np.isfinite(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1]; got min {p[finite].min()}, max {p[finite].max()}")
    q = np.full_like(p, np.nan)
    idx = np.flatnonzero(finite)
    if len(idx) == 0:
        return q
    order = np.argsort(p[idx], kind="stable")
    m = len(idx)
    ranked = p[idx][order] * m / np.arange(1, m + 1)
    adjusted = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    q[idx[order]] = adjusted
    return q


# ----------------------------------------------------------------------------- results


def _interval(values: np.ndarray, ci: float) -> tuple[float, float, float, float, int]:
    """(mean, std, low, high, n) of the finite values; percentile interval of level ``ci``."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan, np.nan, 0)
    lo, hi = np.percentile(v, [50 * (1 - ci), 50 * (1 + ci)])
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(lo), float(hi), len(v))


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """``"0.812 ± 0.010"`` (the paper's mean +- std over resamples)."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass(frozen=True)
class ConfidenceInterval:
    """Bootstrap distribution of one statistic of one model: point estimate, mean +- std and percentile interval."""

    estimate: float  # on the full data
    mean: float
    std: float
    low: float
    high: float
    level: float
    n_valid: int  # resamples used
    n_skipped: int  # resamples where the statistic was undefined (e.g. one class)
    values: np.ndarray  # (n_resamples,), NaN where skipped

    def __str__(self) -> str:
        return (f"{format_mean_std(self.mean, self.std)} [{self.level:.0%} CI {self.low:.3f}, {self.high:.3f}] "
                f"(full data {self.estimate:.3f}, {self.n_valid} resamples)")


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of two models on one test set: per-resample metrics, p / q values, tables."""

    label_names: list[str]
    model_names: tuple[str, str]
    n_resamples: int
    seed: int
    ties: str
    level: float
    full: dict[str, dict[str, np.ndarray]]  # model -> metric -> (L,) on the full test set
    samples: dict[str, dict[str, np.ndarray]]  # model -> metric -> (B, L) per resample, NaN where skipped
    macro: dict[str, dict[str, np.ndarray]]  # model -> metric -> (B,) mean over the labels valid in a resample
    skipped: np.ndarray  # (L,) resamples where the label had one class
    p_values: np.ndarray  # (L,) one-sided, H1: model a has the higher AUROC
    q_values: np.ndarray  # (L,) Benjamini-Hochberg across labels
    p_macro: float  # one-sided p of the macro AUROC

    def summary_table(self) -> pd.DataFrame:
        """Long table: model, label (plus "macro"), metric, full-data estimate, mean, std, CI bounds, n."""
        rows = []
        for model in self.model_names:
            for metric in METRICS:
                columns = [(name, self.samples[model][metric][:, j], self.full[model][metric][j])
                           for j, name in enumerate(self.label_names)]
                columns.append(("macro", self.macro[model][metric], float(np.nanmean(self.full[model][metric]))
                                if np.isfinite(self.full[model][metric]).any() else np.nan))
                for label, values, estimate in columns:
                    mean, std, low, high, n = _interval(values, self.level)
                    rows.append({"model": model, "label": label, "metric": metric, "estimate": float(estimate),
                                 "mean": mean, "std": std, "ci_low": low, "ci_high": high, "n_resamples": n,
                                 "mean ± std": format_mean_std(mean, std)})
        return pd.DataFrame(rows)

    def comparison_table(self) -> pd.DataFrame:
        """One row per label plus "macro": AUROC mean +- std of both models, difference with CI, p and q."""
        a, b = self.model_names
        entries = [(name, self.samples[a]["auroc"][:, j], self.samples[b]["auroc"][:, j], self.p_values[j],
                    self.q_values[j], int(self.skipped[j])) for j, name in enumerate(self.label_names)]
        entries.append(("macro", self.macro[a]["auroc"], self.macro[b]["auroc"], self.p_macro, np.nan,
                        int(np.isnan(self.macro[a]["auroc"]).sum())))
        rows = []
        for label, va, vb, p, q, skipped in entries:
            ma, sa, *_ = _interval(va, self.level)
            mb, sb, *_ = _interval(vb, self.level)
            md, sd, lo, hi, n = _interval(va - vb, self.level)
            rows.append({"label": label, f"auroc {a}": format_mean_std(ma, sa), f"auroc {b}": format_mean_std(mb, sb),
                         f"{a} mean": ma, f"{a} std": sa, f"{b} mean": mb, f"{b} std": sb,
                         "delta mean": md, "delta ci_low": lo, "delta ci_high": hi,
                         "p": float(p), "q": float(q), "n_resamples": n, "skipped": skipped})
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- public entry points


def paired_bootstrap(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_resamples: int = 1000,
                     seed: int = 0, label_names: Sequence[str] | None = None, *,
                     model_names: tuple[str, str] = ("a", "b"), ties: Ties = "half",
                     level: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of two models (same resampled indices): AUROC, Youden metrics, one-sided p, BH q."""
    y = _as_label_matrix(y_true)
    sa = _as_scores(scores_a, y.shape, "scores_a")
    sb = _as_scores(scores_b, y.shape, "scores_b")
    names = [f"label_{j}" for j in range(y.shape[1])] if label_names is None else [str(n) for n in label_names]
    if len(names) != y.shape[1]:
        raise ValueError(f"label_names has {len(names)} names for {y.shape[1]} label columns of y_true")
    if len(model_names) != 2 or model_names[0] == model_names[1]:
        raise ValueError(f"model_names must be two different names, got {model_names!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if ties not in ("half", "paper"):
        raise ValueError(f"ties must be 'half' or 'paper', got {ties!r}")
    indices = bootstrap_indices(len(y), n_resamples, seed)
    samples = {model_names[0]: _resampled_metrics(y, sa, indices), model_names[1]: _resampled_metrics(y, sb, indices)}
    macro = {m: {k: _macro(v) for k, v in samples[m].items()} for m in model_names}
    auc_a, auc_b = samples[model_names[0]]["auroc"], samples[model_names[1]]["auroc"]
    p_values = np.asarray(one_sided_pvalue(auc_a, auc_b, ties), dtype=np.float64)
    return BootstrapResult(
        label_names=names, model_names=tuple(model_names), n_resamples=int(n_resamples), seed=int(seed), ties=ties,
        level=float(level), full={model_names[0]: label_metrics(y, sa), model_names[1]: label_metrics(y, sb)},
        samples=samples, macro=macro, skipped=np.isnan(auc_a).sum(0), p_values=p_values,
        q_values=benjamini_hochberg(p_values),
        p_macro=float(one_sided_pvalue(macro[model_names[0]]["auroc"], macro[model_names[1]]["auroc"], ties)))


Metric = Callable[[np.ndarray, np.ndarray], float]


def bootstrap_ci(y_true: np.ndarray, scores: np.ndarray, metric: str | Metric = "auroc", n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> ConfidenceInterval:
    """Bootstrap interval of one model's statistic: a METRICS name (macro over labels, vectorised) or a callable.

    A callable gets ``(y_true[idx], scores[idx])`` per resample; a resample where it raises ValueError
    or returns NaN (e.g. sklearn's AUROC with one class present) is skipped and counted, and its
    warnings are silenced (the full-data call still warns). The same seed gives
    the same indices as ``paired_bootstrap``, so the macro AUROC distribution is the same as there.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    indices = bootstrap_indices(len(np.asarray(y_true)), n_resamples, seed)
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; use one of {METRICS} or pass a callable(y_true, scores)")
        y = _as_label_matrix(y_true)
        s = _as_scores(scores, y.shape, "scores")
        full = label_metrics(y, s)[metric]
        estimate = float(np.nanmean(full)) if np.isfinite(full).any() else np.nan
        values = _macro(_resampled_metrics(y, s, indices)[metric])
    else:
        y, s = np.asarray(y_true), np.asarray(scores)
        if len(y) != len(s):
            raise ValueError(f"y_true has {len(y)} samples but scores has {len(s)}")
        estimate = float(metric(y, s))
        values = np.array([_call_or_nan(metric, y[i], s[i]) for i in indices])
    mean, std, low, high, n = _interval(values, level)
    return ConfidenceInterval(estimate=estimate, mean=mean, std=std, low=low, high=high, level=float(level),
                              n_valid=n, n_skipped=len(values) - n, values=values)


def _call_or_nan(metric: Metric, y: np.ndarray, s: np.ndarray) -> float:
    """``metric(y, s)``, or NaN when it is undefined on this resample (raises ValueError)."""
    try:
        with warnings.catch_warnings():  # e.g. sklearn's UndefinedMetricWarning: the skip is counted instead
            warnings.simplefilter("ignore")
            return float(metric(y, s))
    except ValueError:
        return np.nan

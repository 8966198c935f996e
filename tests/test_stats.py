"""Bootstrap statistics (Tayebi Arasteh et al. 2023) against sklearn, scipy and hand-computed cases."""


import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from medlib.eval.stats import (
    METRICS,
    auroc,
    benjamini_hochberg,
    bootstrap_ci,
    bootstrap_indices,
    label_metrics,
    one_sided_pvalue,
    paired_bootstrap,
)


def _data(n: int = 300, n_labels: int = 3, seed: int = 0, signal: float = 1.0, decimals: int | None = 1):
    """Multi-label targets and scores with a given signal strength; rounding creates tied scores."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_labels)) < 0.3).astype(int)
    s = signal * y + rng.normal(size=(n, n_labels))
    return y, (np.round(s, decimals) if decimals is not None else s)


def _sklearn_youden(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """Reference: sklearn roc_curve, argmax(tpr - fpr), metrics of the predictions s >= threshold."""
    fpr, tpr, thresholds = roc_curve(y, s)
    t = thresholds[np.argmax(tpr - fpr)]
    pred = s >= t
    return {"threshold": t, "sensitivity": pred[y == 1].mean(), "specificity": (~pred[y == 0]).mean(),
            "accuracy": (pred == y).mean(), "f1": f1_score(y, pred, zero_division=0.0)}


def test_rank_auroc_equals_sklearn_with_ties():
    y, s = _data(decimals=0)  # heavy ties
    assert len(np.unique(s[:, 0])) < 10
    np.testing.assert_allclose(auroc(y, s), [roc_auc_score(y[:, j], s[:, j]) for j in range(3)], rtol=0, atol=1e-12)
    assert auroc(y[:, 1], s[:, 1]).shape == (1,)  # 1-D input is one label
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5]))[0] == 0.5
    assert auroc(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.2]))[0] == 1.0


def test_youden_metrics_equal_sklearn_roc_curve():
    y, s = _data(seed=3)
    s[:, 2] = -s[:, 2]  # an inverted score: best J is the "nothing positive" threshold +inf, like sklearn
    full = label_metrics(y, s)
    for j in range(3):
        ref = _sklearn_youden(y[:, j], s[:, j])
        for name, value in ref.items():
            assert full[name][j] == pytest.approx(value, abs=1e-12), (j, name)
    assert full["threshold"][2] == np.inf and full["sensitivity"][2] == 0.0 and full["specificity"][2] == 1.0


def test_resampled_metrics_equal_sklearn_on_the_same_indices():
    y, s_a = _data(n=120, seed=1)
    _, s_b = _data(n=120, seed=2, signal=0.5)
    res = paired_bootstrap(y, s_a, s_b, n_resamples=40, seed=7, model_names=("dino", "imagenet"))
    idx = bootstrap_indices(120, 40, seed=7)
    for i in (0, 17, 39):
        for j in range(3):
            yy = y[idx[i], j]
            for model, s in (("dino", s_a), ("imagenet", s_b)):
                got = {k: res.samples[model][k][i, j] for k in METRICS}
                assert got["auroc"] == pytest.approx(roc_auc_score(yy, s[idx[i], j]), abs=1e-12)
                for name, value in _sklearn_youden(yy, s[idx[i], j]).items():
                    assert got[name] == pytest.approx(value, abs=1e-12), (i, j, model, name)
    np.testing.assert_allclose(res.macro["dino"]["auroc"], res.samples["dino"]["auroc"].mean(1))


def test_identical_models_give_p_one_half_and_paper_ties_give_one():
    y, s = _data()
    res = paired_bootstrap(y, s, s.copy(), n_resamples=200, seed=0)
    np.testing.assert_array_equal(res.p_values, 0.5)
    assert res.p_macro == 0.5
    np.testing.assert_array_equal(res.q_values, 0.5)
    paper = paired_bootstrap(y, s, s.copy(), n_resamples=200, seed=0, ties="paper")
    np.testing.assert_array_equal(paper.p_values, 1.0)
    assert paper.p_macro == 1.0


def test_clearly_better_model_is_significant_and_the_reverse_is_not():
    y, good = _data(n=1000, n_labels=4, seed=0, signal=2.0, decimals=None)
    _, weak = _data(n=1000, n_labels=4, seed=1, signal=0.3, decimals=None)
    res = paired_bootstrap(y, good, weak, n_resamples=1000, seed=0)
    assert (res.p_values < 0.001).all() and (res.q_values < 0.001).all() and res.p_macro < 0.001
    reverse = paired_bootstrap(y, weak, good, n_resamples=1000, seed=0)
    assert (reverse.p_values > 0.999).all() and reverse.p_macro > 0.999


def test_one_sided_pvalue_counts_ties_as_specified():
    a = np.array([0.9, 0.8, 0.7, 0.6])
    b = np.array([0.8, 0.8, 0.9, 0.5])  # a > b, tie, a < b, a > b
    assert one_sided_pvalue(a, b) == pytest.approx((1 + 0.5) / 4)
    assert one_sided_pvalue(a, b, ties="paper") == pytest.approx(2 / 4)
    assert one_sided_pvalue(np.array([np.nan, 0.9]), np.array([0.1, 0.5])) == 0.0  # NaN resamples skipped
    with pytest.raises(ValueError, match="ties"):
        one_sided_pvalue(a, b, ties="strict")


def test_benjamini_hochberg_hand_computed_and_equal_to_scipy():
    # sorted p 0.01, 0.03, 0.04, 0.20 -> p*m/rank 0.04, 0.06, 0.0533, 0.20 -> running min from the top
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    np.testing.assert_allclose(benjamini_hochberg([0.5, np.nan, 0.01]), [0.5, np.nan, 0.02])  # NaN not counted
    p = np.random.default_rng(0).random(25) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), scipy.stats.false_discovery_control(p, method="bh"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.2, 1.5])


def test_determinism_given_the_seed():
    y, a = _data(n=80, seed=4)
    _, b = _data(n=80, seed=5)
    r1 = paired_bootstrap(y, a, b, n_resamples=50, seed=3)
    r2 = paired_bootstrap(y, a, b, n_resamples=50, seed=3)
    r3 = paired_bootstrap(y, a, b, n_resamples=50, seed=4)
    for k in METRICS:
        np.testing.assert_array_equal(r1.samples["a"][k], r2.samples["a"][k])
    np.testing.assert_array_equal(r1.p_values, r2.p_values)
    assert not np.array_equal(r1.samples["a"]["auroc"], r3.samples["a"]["auroc"])


def test_rare_label_resamples_are_skipped_and_counted():
    y = np.zeros((20, 2), int)
    y[:10, 0] = 1
    y[0, 1] = 1  # one positive: absent from about (19/20)^20 = 36 % of resamples
    s = np.random.default_rng(0).random((20, 2))
    res = paired_bootstrap(y, s, s[::-1].copy(), n_resamples=200, seed=1, label_names=["common", "rare"])
    idx = bootstrap_indices(20, 200, seed=1)
    expected = int((~(idx == 0).any(1)).sum())
    assert 40 < expected < 110 and res.skipped.tolist() == [0, expected]
    assert np.isnan(res.samples["a"]["f1"][:, 1]).sum() == expected
    missing = ~(idx == 0).any(1)
    np.testing.assert_allclose(res.macro["a"]["auroc"][missing], res.samples["a"]["auroc"][missing, 0])
    table = res.comparison_table().set_index("label")
    assert table.loc["rare", "n_resamples"] == 200 - expected and table.loc["rare", "skipped"] == expected


def test_tables_have_one_row_per_model_label_metric():
    y, a = _data(n=100, seed=6)
    _, b = _data(n=100, seed=7, signal=0.2)
    res = paired_bootstrap(y, a, b, n_resamples=100, seed=0, label_names=["x", "y", "z"], model_names=("ssl", "in"))
    summary = res.summary_table()
    assert len(summary) == 2 * len(METRICS) * 4
    row = summary.query("model == 'ssl' and label == 'macro' and metric == 'auroc'").iloc[0]
    assert row.ci_low <= row["mean"] <= row.ci_high and row.n_resamples == 100
    assert row["mean ± std"] == f"{row['mean']:.3f} ± {row['std']:.3f}"
    comparison = res.comparison_table()
    assert comparison.label.tolist() == ["x", "y", "z", "macro"]
    np.testing.assert_array_equal(comparison.p[:3], res.p_values)
    assert comparison.p.iloc[3] == res.p_macro and np.isnan(comparison.q.iloc[3])


def test_bootstrap_ci_vectorised_and_callable_paths_agree_with_paired():
    y, s = _data(n=150, seed=8)
    _, other = _data(n=150, seed=9)
    paired = paired_bootstrap(y, s, other, n_resamples=60, seed=2)
    ci = bootstrap_ci(y, s, "auroc", n_resamples=60, seed=2)
    np.testing.assert_allclose(ci.values, paired.macro["a"]["auroc"])
    assert ci.low <= ci.estimate <= ci.high and ci.n_valid == 60 and ci.n_skipped == 0
    one = bootstrap_ci(y[:, 0], s[:, 0], roc_auc_score, n_resamples=60, seed=2)
    np.testing.assert_allclose(one.values, paired.samples["a"]["auroc"][:, 0])
    assert one.estimate == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]))
    sens = bootstrap_ci(y, s, "sensitivity", n_resamples=60, seed=2)
    np.testing.assert_allclose(sens.values, paired.macro["a"]["sensitivity"])


def test_bootstrap_ci_callable_skips_undefined_resamples():
    y = np.array([1] + [0] * 9)
    s = np.linspace(0, 1, 10)
    ci = bootstrap_ci(y, s, roc_auc_score, n_resamples=100, seed=0)
    assert ci.n_skipped == int((~(bootstrap_indices(10, 100, 0) == 0).any(1)).sum()) > 0
    assert ci.n_valid + ci.n_skipped == 100 and np.isnan(ci.values).sum() == ci.n_skipped


@pytest.mark.parametrize("kwargs, match", [
    ({"scores_b": np.zeros((10, 3))}, "scores_b has shape"),
    ({"y_true": np.full((10, 2), 2)}, "binary 0/1"),
    ({"scores_a": np.full((10, 2), np.nan)}, "finite"),
    ({"label_names": ["only_one"]}, "label_names has 1 names for 2"),
    ({"n_resamples": 0}, "n_resamples must be >= 1"),
    ({"y_true": np.zeros((1, 2))}, "N >= 2"),
    ({"ties": "strict"}, "ties"),
])
def test_bad_input_raises_with_a_useful_message(kwargs, match):
    args = {"y_true": np.tile([[0, 1], [1, 0]], (5, 1)), "scores_a": np.zeros((10, 2)), "scores_b": np.zeros((10, 2)),
            "n_resamples": 5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(**args)


def test_bootstrap_ci_rejects_unknown_metric_and_length_mismatch():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        bootstrap_ci(np.array([0, 1, 0, 1]), np.zeros(4), "auc", n_resamples=5)
    with pytest.raises(ValueError, match="4 samples but scores has 3"):
        bootstrap_ci(np.array([0, 1, 0, 1]), np.zeros(3), roc_auc_score, n_resamples=5)


def test_macro_auroc_and_its_resamples_agree_with_sklearn():
    from sklearn.metrics import roc_auc_score

    from medlib.eval import stats as S

    rng = np.random.default_rng(0)
    y = (rng.random((80, 3)) < 0.4).astype(int)
    s = np.clip(y * 0.4 + rng.random((80, 3)) * 0.6, 0, 1)
    expected = np.mean([roc_auc_score(y[:, i], s[:, i]) for i in range(3)])
    assert S.macro_auroc(y, s) == pytest.approx(expected)
    idx = S.bootstrap_indices(80, 5, seed=1)
    boot = S.resampled_macro_auroc(y, s, idx)
    assert boot.shape == (5,)
    assert boot[2] == pytest.approx(np.mean([roc_auc_score(y[idx[2], i], s[idx[2], i]) for i in range(3)]))


def test_bootstrap_mean_ci_stays_inside_the_values():
    from medlib.eval import stats as S

    mean, low, high = S.bootstrap_mean_ci([0.7, 0.99])  # a t-interval here would pass 1
    assert mean == pytest.approx(0.845) and 0.7 <= low <= mean <= high <= 0.99
    assert S.bootstrap_mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(S.bootstrap_mean_ci([])))
    assert S.bootstrap_mean_ci([0.1, 0.2, 0.3], seed=3) == S.bootstrap_mean_ci([0.1, 0.2, 0.3], seed=3)
    with pytest.raises(ValueError, match="level"):
        S.bootstrap_mean_ci([0.1, 0.2], level=1.5)

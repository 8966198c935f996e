"""Few-shot runner: draws from train only, seeded repeats with intervals, Baharoon et al. 2023's single draw."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medlib.data.phantoms import make_dataset
from medlib.data.splits import evenly_spaced_indices, patient_split
from medlib.eval.features import FeatureSet
from medlib.eval.fewshot import (check_split, knn_probe, linear_probe_fn, logistic_probe, mlknn_probe, run_few_shot,
                                 summarize)


def features_for(ds, dim=16, seed=0):
    """Features aligned with ``ds`` whose labels are linearly readable from the CLS token."""
    rng = np.random.default_rng(seed)
    y = ds.label_matrix()
    cls = (y @ rng.normal(size=(y.shape[1], dim)) * 3 + rng.normal(size=(len(ds), dim))).astype(np.float32)
    layers = np.stack([rng.normal(size=cls.shape).astype(np.float32), cls], axis=1)
    return FeatureSet(cls=cls, pooled=rng.normal(size=cls.shape).astype(np.float32), layers=layers,
                      labels=ds.labels, label_names=list(ds.label_names), task=ds.task, backbone="synthetic",
                      dataset=ds.name, fingerprint="x")


@pytest.fixture(scope="module")
def knee():
    ds = make_dataset("knee", 96, size=64, seed=0)  # multi-label: acl_tear, meniscal_tear
    return ds, features_for(ds), patient_split(ds, (0.6, 0.2, 0.2), seed=0)


@pytest.fixture(scope="module")
def ct():
    ds = make_dataset("ct", 90, size=64, seed=0)
    return ds, features_for(ds), patient_split(ds, (0.6, 0.2, 0.2), seed=0)


def _spy(inner):
    seen = []

    def probe(train, val, test):
        seen.append((train, val, test))
        return inner(train, val, test)

    return probe, seen


def test_training_sets_come_from_train_only(ct):
    ds, fs, split = ct
    probe, seen = _spy(knn_probe(k=5))
    result = run_few_shot(ds, fs, split, probe, ns=(1, 2, "all"), repeats=3, unit="image")
    held_out = np.concatenate([split["val"], split["test"]])
    assert len(result.draws) == 3 + 3 + 1
    for (n, _), idx in result.draws.items():
        assert np.isin(idx, split["train"]).all() and not np.isin(idx, held_out).any()
        if n != "all":
            assert np.bincount(ds.labels[idx], minlength=5).min() >= n
    assert np.array_equal(result.draws[("all", 0)], np.sort(split["train"]))
    for train, val, test in seen:  # the probe saw the test split as test and the val split as val only
        assert len(test) == len(split["test"]) and len(val) == len(split["val"])
    assert {len(t) for t, _, _ in seen} >= {5, 10, len(split["train"])}


def test_repeats_differ_and_are_reproducible(knee):
    ds, fs, split = knee
    a = run_few_shot(ds, fs, split, mlknn_probe(k=3), ns=(1, 2), repeats=3, seed=1)
    b = run_few_shot(ds, fs, split, mlknn_probe(k=3), ns=(1, 2), repeats=3, seed=1)
    pd.testing.assert_frame_equal(a.scores, b.scores)
    assert len({tuple(a.draws[(1, r)]) for r in range(3)}) > 1  # seeded repeats are different draws
    assert set(a.scores.metric) == {"auroc"} and a.scores.groupby("n").size().to_dict() == {1: 3, 2: 3}
    row = a.summary.set_index("n").loc[2]
    assert row.repeats == 3 and row.ci_low < row["mean"] < row.ci_high
    assert a.scores.n_train_patients.min() >= 1


def test_summary_t_and_percentile_intervals_known_values():
    scores = pd.DataFrame({"n": [4, 4, 4, "all"], "metric": "auroc", "value": [0.6, 0.7, 0.8, 0.9],
                           "n_train_images": [8, 8, 8, 50]})
    t = summarize(scores, interval="t").set_index("n")
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)  # 4.303 * std 0.1 / sqrt(3)
    assert t.loc[4, "mean"] == pytest.approx(0.7) and t.loc[4, "std"] == pytest.approx(0.1)
    assert (t.loc[4, "ci_low"], t.loc[4, "ci_high"]) == pytest.approx((0.7 - half, 0.7 + half))
    assert t.loc["all", "repeats"] == 1 and np.isnan(t.loc["all", "ci_low"])
    assert t.loc[4, "interval"] == "95 % t-interval over 3 repeats" and t.loc["all", "interval"] == "none (one repeat)"
    p = summarize(scores, interval="percentile", confidence=0.5).set_index("n")
    assert (p.loc[4, "ci_low"], p.loc[4, "ci_high"]) == pytest.approx((0.65, 0.75))
    with pytest.raises(ValueError, match="interval"):
        summarize(scores, interval="wald")


def test_default_bootstrap_interval_stays_in_range_where_t_does_not():
    # Two repeats near the top of a bounded metric: the t-interval (t = 12.7) leaves [0, 1], the default
    # percentile bootstrap of the mean cannot (every resampled mean is a mean of observed values).
    scores = pd.DataFrame({"n": [1, 1], "metric": "mean_dj", "value": [0.66, 0.95], "n_train_images": [1, 1]})
    t = summarize(scores, interval="t").iloc[0]
    assert t.ci_high > 1
    b = summarize(scores).iloc[0]
    assert 0.66 <= b.ci_low <= b["mean"] <= b.ci_high <= 0.95
    assert b.ci_low < b.ci_high and "bootstrap" in b.interval
    assert summarize(scores).equals(summarize(scores))  # seeded


def test_paper_protocol_is_one_evenly_spaced_draw(ct):
    ds, fs, split = ct
    result = run_few_shot(ds, fs, split, knn_probe(k=3), ns=(4, 8), repeats=5, unit="image", protocol="paper")
    assert sorted(result.draws) == [(4, 0), (8, 0)]
    assert np.array_equal(result.draws[(8, 0)], np.sort(evenly_spaced_indices(split["train"], 8)))
    assert result.summary.repeats.eq(1).all() and result.summary.ci_low.isna().all()
    assert set(result.scores.metric) == {"auroc", "accuracy"}


def test_linear_and_logistic_probes_are_not_refit_on_val(knee):
    ds, fs, split = knee
    lin = run_few_shot(ds, fs, split, linear_probe_fn(lrs=(0.05,), epochs=5, batch_size=16, device="cpu"),
                       ns=(2,), repeats=2)
    log = run_few_shot(ds, fs, split, logistic_probe(n_c=3), ns=(2,), repeats=2)
    for result in (lin, log):
        assert result.scores.value.between(0, 1).all() and len(result.scores) == 2
    assert log.summary["mean"].iloc[0] > 0.6  # labels are readable from the features


def test_skip_impossible_and_bad_input(knee):
    ds, fs, split = knee
    with pytest.raises(ValueError, match="fewer than n=50"):
        run_few_shot(ds, fs, split, mlknn_probe(k=3), ns=(50,), repeats=1)
    result = run_few_shot(ds, fs, split, mlknn_probe(k=3), ns=(1, 50), repeats=2, skip_impossible=True)
    assert list(result.skipped) == [50] and set(result.scores.n) == {1}
    leaky = dict(split, val=np.concatenate([split["val"], split["train"][:2]]))
    with pytest.raises(ValueError, match="B2"):
        run_few_shot(ds, fs, leaky, mlknn_probe(), ns=(1,))
    with pytest.raises(ValueError, match="'test'"):
        check_split({"train": split["train"]}, len(ds))
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        run_few_shot(ds, fs, split, mlknn_probe(), ns=(0,))
    with pytest.raises(ValueError, match="protocol"):
        run_few_shot(ds, fs, split, mlknn_probe(), protocol="once")
    with pytest.raises(ValueError, match="extract the features"):
        run_few_shot(ds, fs.subset(np.arange(10)), split, mlknn_probe())

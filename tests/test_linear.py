"""Linear-probe grid (heads trained together, val selection, refit) and the logistic-regression probe."""

import numpy as np
import pytest
import torch

from medlib.data.phantoms import make_dataset
from medlib.data.splits import patient_split
from medlib.eval.features import FeatureSet, extract_features
from medlib.eval.linear import (ProbeConfig, c_grid, heads_proba, linear_probe, logistic_regression_probe,
                                probe_grid, train_heads)
from medlib.models.backbones import create_backbone


def make_features(n, task="multilabel", n_labels=3, dim=8, n_layers=4, seed=0, signal_in="cls", scale=3.0):
    """Synthetic features whose labels are linearly readable from ``signal_in`` ("cls" or "pooled")."""
    rng = np.random.default_rng(seed)
    if task == "multiclass":
        labels = rng.integers(0, n_labels, size=n)
        onehot = np.eye(n_labels)[labels]
    else:
        n_labels = 1 if task == "binary" else n_labels
        labels = (rng.random((n, n_labels)) < 0.4).astype(np.float32)
        onehot = labels
    centres = np.random.default_rng(123).normal(size=(n_labels, dim)) * scale
    signal = (onehot @ centres).astype(np.float32)
    layers = rng.normal(size=(n, n_layers, dim)).astype(np.float32)
    pooled = rng.normal(size=(n, dim)).astype(np.float32)
    if signal_in == "cls":
        layers[:, -1] += signal
    else:
        pooled += signal
    return FeatureSet(cls=layers[:, -1].copy(), pooled=pooled, layers=layers, labels=labels,
                      label_names=[f"l{j}" for j in range(n_labels)], task=task, backbone="synthetic",
                      dataset=f"synthetic-{seed}", fingerprint=str(seed))


def test_probe_grid_is_blocks_x_avgpool_x_lrs_and_drops_missing_blocks():
    configs, dropped = probe_grid(4)
    assert len(configs) == 2 * 2 * 4 and dropped == []
    assert {c.lr for c in configs} == {1e-3, 5e-3, 1e-2, 5e-2}
    assert {(c.n_blocks, c.avgpool) for c in configs} == {(1, False), (1, True), (4, False), (4, True)}
    configs, dropped = probe_grid(2, lrs=(0.1,))
    assert dropped == [4] and [(c.n_blocks, c.avgpool) for c in configs] == [(1, False), (1, True)]
    assert ProbeConfig(4, True, 0.1).input_dim(8) == 40
    with pytest.raises(ValueError, match="positive"):
        probe_grid(4, lrs=(0.0,))


def test_heads_trained_together_learn_as_if_alone():
    train = make_features(64)
    a, b = ProbeConfig(1, False, 0.05), ProbeConfig(4, True, 0.01)
    together = train_heads([a, b], train, epochs=3, batch_size=16, device="cpu")
    alone = train_heads([a], train, epochs=3, batch_size=16, device="cpu")
    for p, q in zip(together.heads[0].parameters(), alone.heads[0].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    other_seed = train_heads([a], train, epochs=3, batch_size=16, device="cpu", seed=1)
    assert not torch.allclose(other_seed.heads[0].linear.weight, alone.heads[0].linear.weight)


@pytest.mark.parametrize("task", ["multilabel", "binary", "multiclass"])
def test_linear_probe_learns_each_task(task):
    train, val, test = (make_features(n, task, seed=s) for n, s in ((160, 0), (48, 1), (64, 2)))
    result = linear_probe(train, val, test, lrs=(0.05,), epochs=10, batch_size=32, device="cpu")
    assert result.test_metrics["auroc"] > 0.9
    assert result.test_proba.shape == (64, train.n_classes)
    assert len(result.grid) == 4 and result.info["refit"] == "train+val"
    if task == "multiclass":
        assert result.test_metrics["accuracy"] > 0.7
        assert np.allclose(result.test_proba.sum(1), 1.0, atol=1e-5)
    assert set(result.test_per_label.index) <= set(train.label_names)


def test_selection_follows_the_validation_set():
    # the labels are readable only from the pooled patch tokens: every avgpool head must win
    train, val = make_features(160, signal_in="pooled", seed=0), make_features(48, signal_in="pooled", seed=1)
    result = linear_probe(train, val, None, lrs=(0.01, 0.05), epochs=8, batch_size=32, device="cpu")
    assert result.chosen["avgpool"] is True
    best = result.grid.sort_values("val_auroc", ascending=False).iloc[0]
    assert (best.n_blocks, best.avgpool, best.lr) == (result.chosen["n_blocks"], True, result.chosen["lr"])
    assert result.test_metrics == {} and result.test_proba is None
    by_loss = linear_probe(train, val, None, lrs=(0.01, 0.05), epochs=8, batch_size=32, device="cpu",
                           select_on="loss")
    lowest = by_loss.grid.loc[by_loss.grid.val_loss.idxmin()]
    assert (lowest.n_blocks, lowest.avgpool, lowest.lr) == tuple(by_loss.chosen.values())


def test_no_val_raises_and_test_labels_never_influence_selection():
    train, val, test = make_features(96, seed=0), make_features(32, seed=1), make_features(32, seed=2)
    with pytest.raises(ValueError, match="validation set.*B5"):
        linear_probe(train, None, test)
    kwargs = dict(lrs=(1e-3, 5e-2), epochs=3, batch_size=32, device="cpu")
    clean = linear_probe(train, val, test, **kwargs)
    rng = np.random.default_rng(9)
    garbage = make_features(32, seed=2)
    garbage.labels = rng.permutation(garbage.labels)
    dirty = linear_probe(train, val, garbage, **kwargs)
    assert dirty.chosen == clean.chosen
    assert dirty.grid.equals(clean.grid)
    assert np.allclose(dirty.test_proba, clean.test_proba)


def test_refit_false_tests_the_grid_head_and_profile_sets_the_grid():
    train, val, test = make_features(64, seed=0), make_features(32, seed=1), make_features(32, seed=2)
    result = linear_probe(train, val, test, profile="smoke", batch_size=16, device="cpu", refit=False)
    assert set(result.grid.lr) == {1e-2} and len(result.grid) == 4  # smoke: one lr, 2 blocks x 2 avgpool
    configs = [ProbeConfig(**result.chosen)]
    assert result.info["refit"] == "train only"
    assert np.allclose(heads_proba(_wrap(result.model, configs, train), test, "cpu")[0], result.test_proba)


def _wrap(head, configs, train):
    from medlib.eval.linear import AllHeads

    heads = AllHeads(configs, train.dim, train.n_classes)
    heads.heads[0].load_state_dict(head.state_dict())
    return heads


def test_mismatched_features_raise():
    train, val = make_features(32, n_labels=3), make_features(16, n_labels=2, seed=1)
    with pytest.raises(ValueError, match="do not match train"):
        linear_probe(train, val)
    with pytest.raises(ValueError, match="select_on"):
        linear_probe(train, make_features(16, seed=1), select_on="f1")


def test_logistic_regression_probe_chooses_c_on_val_and_refits():
    assert len(c_grid()) == 45 and c_grid()[0] == pytest.approx(1e-6) and c_grid()[-1] == pytest.approx(1e5)
    train, val, test = make_features(120, seed=0), make_features(48, seed=1), make_features(64, seed=2)
    result = logistic_regression_probe(train, val, test, n_c=6)
    assert len(result.grid) == 6 and result.chosen["C"] in set(c_grid(6))
    assert result.chosen["C"] == result.grid.C[result.grid.val_auroc.idxmax()]
    assert result.test_metrics["auroc"] > 0.9 and result.test_proba.shape == (64, 3)
    with pytest.raises(ValueError, match="B5"):
        logistic_regression_probe(train, None, test)


def test_logistic_regression_handles_one_class_labels_and_multiclass():
    train, val = make_features(40, seed=0), make_features(24, seed=1)
    train.labels[:, 2] = 0  # a label never positive in training: constant prediction, no crash
    result = logistic_regression_probe(train, val, val, n_c=3, refit=False)
    assert np.allclose(result.test_proba[:, 2], 0.0) and result.info["refit"] == "train only"
    mc = [make_features(n, "multiclass", seed=s) for n, s in ((90, 0), (30, 1), (30, 2))]
    out = logistic_regression_probe(*mc, n_c=4)
    assert out.test_metrics["accuracy"] > 0.7 and np.allclose(out.test_proba.sum(1), 1.0)


def test_probe_on_real_extracted_features():
    torch.manual_seed(0)
    ds = make_dataset("breast_us", 60, size=64, seed=1)
    split = patient_split(ds, (0.6, 0.2, 0.2), seed=0)
    fs = extract_features(create_backbone("random-vit-smoke"), ds, device="cpu")
    train, val, test = (fs.subset(split[k]) for k in ("train", "val", "test"))
    result = linear_probe(train, val, test, profile="smoke", batch_size=16, device="cpu")
    assert 0.0 <= result.test_metrics["auroc"] <= 1.0
    assert result.test_proba.shape == (len(split["test"]), 1)
    assert result.info["n_blocks_dropped"] == [4]  # the smoke ViT has two blocks

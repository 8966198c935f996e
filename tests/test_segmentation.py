"""Baharoon et al. 2023 segmentation: Dice / Jaccard known values, Dice loss, training that learns, Dice selection, few-shot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, jaccard_score

from medlib.data import ImageSet
from medlib.data.phantoms import make_dataset
from medlib.data.splits import patient_split
from medlib.eval import segmentation as seg
from medlib.eval.segmentation import (dice_jaccard, evaluate_segmenter, frozen_linear, frozen_unet, lr_grid,
                                      model_classes, predict_masks, scratch_unet, segmentation_few_shot,
                                      soft_dice_loss, summarize, train_segmenter)
from medlib.models.backbones import create_backbone


@pytest.fixture(scope="module")
def cxr() -> tuple[ImageSet, ImageSet]:
    """48 chest phantoms at 64 px (masks: left lung, right lung, heart): 32 train, 16 val."""
    ds = make_dataset("cxr", 48, size=64)
    return ds.subset(np.arange(32), name="cxr-train"), ds.subset(np.arange(32, 48), name="cxr-val")


@pytest.fixture(scope="module")
def small() -> tuple[ImageSet, ImageSet]:
    """12 chest phantoms at 64 px for runs whose learning is not the point: 8 train, 4 val."""
    ds = make_dataset("cxr", 12, size=64)
    return ds.subset(np.arange(8)), ds.subset(np.arange(8, 12))


def _tiny_unet() -> torch.nn.Module:
    return scratch_unet(4, base=4, depth=2)


# --------------------------------------------------------------------------- metrics


def test_dice_jaccard_known_values():
    pred = np.array([[0, 1], [1, 1]])
    true = np.array([[0, 1], [0, 1]])
    # class 1: |P| = 3, |T| = 2, overlap 2 -> Dice 4/5, Jaccard 2/3; class 0: |P| = 1, |T| = 2, overlap 1.
    fg = dice_jaccard(pred, true, n_classes=2)
    assert fg.classes == (1,)
    assert fg.dice == pytest.approx([0.8]) and fg.jaccard == pytest.approx([2 / 3])
    assert fg.macro_dice == pytest.approx(0.8) and fg.mean_dj == pytest.approx((0.8 + 2 / 3) / 2)
    both = dice_jaccard(torch.as_tensor(pred), torch.as_tensor(true), n_classes=2, exclude_background=False)
    assert both.dice == pytest.approx([2 / 3, 0.8]) and both.jaccard == pytest.approx([0.5, 2 / 3])
    assert both.macro_dice == pytest.approx((2 / 3 + 0.8) / 2)
    assert both.macro_jaccard == pytest.approx((0.5 + 2 / 3) / 2)


def test_dice_jaccard_empty_class_conventions():
    true = np.array([[0, 1, 1, 0]])
    # class 2 empty in both -> NaN and left out of the macro; class 3 predicted but absent -> 0.
    scores = dice_jaccard(np.array([[0, 1, 1, 0]]), true, n_classes=4)
    assert scores.dice[0] == 1.0 and math.isnan(scores.dice[1]) and math.isnan(scores.jaccard[1])
    assert scores.macro_dice == 1.0
    false_positive = dice_jaccard(np.array([[3, 1, 1, 0]]), true, n_classes=4)
    assert false_positive.dice[2] == 0.0 and false_positive.macro_dice == pytest.approx(0.5)
    missed = dice_jaccard(np.array([[0, 0, 0, 0]]), true, n_classes=4)
    assert missed.dice[0] == 0.0 and missed.macro_dice == 0.0
    nothing = dice_jaccard(np.zeros((3, 3), int), np.zeros((3, 3), int), n_classes=3)
    assert math.isnan(nothing.macro_dice) and math.isnan(nothing.mean_dj)


def test_dice_jaccard_matches_sklearn_on_random_maps():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 4, (5, 9, 9)), rng.integers(0, 4, (5, 9, 9))
    scores = dice_jaccard(pred, true, n_classes=4)
    labels = [1, 2, 3]
    assert scores.dice == pytest.approx(f1_score(true.ravel(), pred.ravel(), labels=labels, average=None))
    assert scores.jaccard == pytest.approx(jaccard_score(true.ravel(), pred.ravel(), labels=labels, average=None))


def test_dice_jaccard_rejects_bad_input():
    a = np.zeros((4, 4), int)
    with pytest.raises(ValueError, match=r"shape \(4, 4\) but true_labels \(4, 5\)"):
        dice_jaccard(a, np.zeros((4, 5), int), 2)
    with pytest.raises(TypeError, match="integer label map.*argmax"):
        dice_jaccard(a.astype(float), a, 2)
    with pytest.raises(ValueError, match=r"true_labels holds labels 0..3, outside 0..2 \(n_classes=3\)"):
        dice_jaccard(a, np.eye(4, dtype=int) * 3, 3)
    with pytest.raises(ValueError, match="no foreground class"):
        dice_jaccard(a, a, 1)


# --------------------------------------------------------------------------- loss


def test_soft_dice_loss_known_values():
    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[0, 1], [0, 0]]])
    # class 1: overlap 0.5, sum p + sum g = 2 + 1 -> Dice 1/3; class 0: overlap 1.5, 2 + 3 -> Dice 0.6.
    assert soft_dice_loss(logits, target, smooth=0.0).item() == pytest.approx(2 / 3)
    assert soft_dice_loss(logits, target, exclude_background=False, smooth=0.0).item() == pytest.approx(
        1 - (0.6 + 1 / 3) / 2)
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("exclude_background", [True, False])
def test_soft_dice_loss_gradient_sign(exclude_background):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=gen, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 6), generator=gen)
    loss = soft_dice_loss(logits, target, exclude_background)
    loss.backward()
    onehot = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).bool()
    assert (logits.grad[onehot] < 0).all()  # raising the true class's logit always lowers the loss
    with torch.no_grad():
        assert soft_dice_loss(logits - 1.0 * logits.grad, target, exclude_background) < loss


def test_soft_dice_loss_rejects_bad_input():
    logits = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"target has shape \(2, 5, 5\) but the logits need \(2, 4, 4\)"):
        soft_dice_loss(logits, torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels 3..3 but the logits have 3 classes \(0..2\)"):
        soft_dice_loss(logits, torch.full((2, 4, 4), 3))
    with pytest.raises(TypeError, match="integer label map"):
        soft_dice_loss(logits, torch.zeros(2, 4, 4))


def test_soft_dice_loss_equals_the_one_hot_form():
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(3, 5, 7, 9, generator=gen), torch.randint(0, 5, (3, 7, 9), generator=gen)
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 5).permute(0, 3, 1, 2).float()
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1e-5) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)
    assert soft_dice_loss(logits, target, exclude_background=False).item() == pytest.approx(1 - dice.mean().item(),
                                                                                              abs=1e-7)


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (128, 128)), ((5, 7), (16, 11)), ((16, 16), (4, 6)),
                                               ((8, 8), (8, 8))])
def test_matrix_resize_matches_bilinear_interpolate(size_in, size_out):
    x = torch.randn(2, 3, *size_in, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    got = seg.matrix_resize(x, size_out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    grad_expected, = torch.autograd.grad((expected * weights).sum(), x)
    grad_got, = torch.autograd.grad((got * weights).sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-5, rtol=1e-5)


def test_interpolation_matrix_rows_sum_to_one_and_reject_bad_sizes():
    matrix = seg.interpolation_matrix(8, 128)
    assert matrix.shape == (128, 8)
    torch.testing.assert_close(matrix.sum(1), torch.ones(128))
    assert (matrix >= 0).all()
    assert torch.equal(seg.interpolation_matrix(4, 4), torch.eye(4))
    with pytest.raises(ValueError, match="sizes >= 1"):
        seg.interpolation_matrix(0, 4)


def test_has_spatial_convs_tells_a_unet_from_a_linear_head():
    assert seg.has_spatial_convs(seg.scratch_unet(3))
    assert not seg.has_spatial_convs(seg.BNLinearSegHead(16, 3))
    assert not seg.has_spatial_convs(torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------- models


def test_model_builders():
    smoke = create_backbone("random-vit-smoke")
    linear = frozen_linear(smoke, 4)
    assert model_classes(linear) == 4 and seg.is_frozen(linear)
    assert linear.head.conv.in_channels == 48
    with pytest.raises(ValueError, match="has 2 blocks but the U-Net decoder reads the last 5"):
        frozen_unet(create_backbone("random-vit-smoke"), 4)
    unet = frozen_unet(create_backbone("random-vit-tiny"), 8)
    assert model_classes(unet) == 8 and seg.is_frozen(unet) and unet.head.n_grids == 5
    assert model_classes(scratch_unet(3)) == 3 and not seg.is_frozen(scratch_unet(3))
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        scratch_unet(0)


# --------------------------------------------------------------------------- training


def test_frozen_linear_head_learns_with_cached_features(cxr):
    train, val = cxr
    torch.manual_seed(0)
    backbone = create_backbone("random-vit-smoke")
    before_weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = frozen_linear(backbone, 4)
    before = summarize(evaluate_segmenter(model, val, 64, "cpu"))["dice"]
    result = train_segmenter(model, train, val, epochs=3, lr=0.1, batch_size=8, image_size=64, device="cpu")
    hist = result.history
    assert list(hist.columns) == ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_jaccard",
                                  "val_mean_dj", "seconds"]
    assert result.frozen and result.cached_features
    assert result.best_val_dice == hist["val_dice"].max() > before + 0.05
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert hist["lr"].iloc[0] == 0.1 and hist["lr"].is_monotonic_decreasing  # cosine
    assert all(torch.equal(v, before_weights[k]) for k, v in backbone.state_dict().items())
    restored = summarize(evaluate_segmenter(result.model, val, 64, "cpu"))["dice"]
    assert restored == pytest.approx(result.best_val_dice, abs=1e-6)


def test_fit_linear_map_reaches_at_least_what_sgd_reaches_on_its_training_images(cxr):
    train, val = cxr
    backbone = create_backbone("random-vit-smoke")
    sgd = train_segmenter(frozen_linear(backbone, 4), train, val, epochs=3, lr=0.1, batch_size=8, image_size=32,
                          device="cpu").model
    fit = seg.fit_linear_map(backbone, train, 32, device="cpu", max_iter=30)  # whitened: few iterations suffice
    assert isinstance(fit.head, seg.BNLinearSegHead) and model_classes(fit) == 4
    # BatchNorm holds the training tokens' own statistics, so the fitted map works on standardised tokens
    grid = seg._FeatureStore(fit, 32, "cpu", 8, 1e9).get(train).grids[-1]
    torch.testing.assert_close(fit.head.norm.running_mean, grid.mean(dim=(0, 2, 3)))
    on_train = {name: summarize(evaluate_segmenter(m, train, 32, "cpu"))["dice"] for name, m in
                (("sgd", sgd), ("fit", fit))}
    assert on_train["fit"] >= on_train["sgd"] - 0.01 and on_train["fit"] > 0.5, on_train
    again = seg.fit_linear_map(backbone, train, 32, device="cpu", max_iter=30)
    torch.testing.assert_close(again.head.conv.weight, fit.head.conv.weight)  # deterministic
    for bad in ({"max_iter": 0}, {"ridge": 0.0}):
        with pytest.raises(ValueError, match="max_iter must be"):
            seg.fit_linear_map(backbone, train, 32, device="cpu", **bad)
    with pytest.raises(ValueError, match="has no masks"):
        seg.fit_linear_map(backbone, ImageSet(images=train.images, labels=None, label_names=[], task="none",
                                              patient_ids=train.patient_ids, name="no-masks"), 32)


def test_scratch_unet_learns(cxr):
    train, val = cxr
    torch.manual_seed(0)
    model = scratch_unet(4, base=8, depth=3)
    before = summarize(evaluate_segmenter(model, val, 64, "cpu"))["dice"]
    result = train_segmenter(model, train, val, epochs=3, lr=1e-2, batch_size=8, image_size=64, device="cpu",
                             optimizer="adamw")
    assert not result.frozen and not result.cached_features
    assert result.best_val_dice > before + 0.1
    assert result.history["train_loss"].iloc[-1] < result.history["train_loss"].iloc[0]


def test_best_epoch_by_val_dice_is_really_restored(small, monkeypatch):
    train, val = small
    scripted = iter([0.2, 0.9, 0.1, float("nan")])
    states = []

    def fake_validate(model, val_set, cfg, device, store):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_loss": 0.5, "val_dice": next(scripted), "val_jaccard": 0.0, "val_mean_dj": 0.0}

    monkeypatch.setattr(seg, "_validate", fake_validate)
    torch.manual_seed(0)
    result = train_segmenter(_tiny_unet(), train, val, epochs=4, lr=0.05, batch_size=4, image_size=32,
                             device="cpu")
    assert result.best_epoch == 1 and result.best_val_dice == 0.9
    assert "validation Dice" in result.selection
    final = result.model.state_dict()
    assert all(torch.equal(final[k], states[1][k]) for k in final)
    assert not all(torch.equal(final[k], states[3][k]) for k in final)  # the last epoch was not kept


def test_validated_epochs_are_evenly_spaced_and_end_with_the_last():
    assert seg.validated_epochs(5, 0) == [0, 1, 2, 3, 4] and seg.validated_epochs(5, 9) == [0, 1, 2, 3, 4]
    assert seg.validated_epochs(10, 5) == [1, 3, 5, 7, 9]
    assert seg.validated_epochs(1000, 15) == [*range(66, 1000, 67), 999] and len(seg.validated_epochs(1000, 15)) == 15
    assert seg.validated_epochs(7, 3) == [2, 5, 6]


def test_training_validates_only_the_chosen_epochs(small):
    train, val = small
    result = train_segmenter(_tiny_unet(), train, val, epochs=6, lr=0.1, batch_size=4, image_size=32, device="cpu",
                             validations=2)
    validated = result.history["val_dice"].notna()
    assert validated.tolist() == [False, False, True, False, False, True]
    assert result.best_epoch in (2, 5) and "2 epochs validated" in result.selection
    with pytest.raises(ValueError, match="validations must be"):
        train_segmenter(_tiny_unet(), train, val, epochs=1, lr=0.1, batch_size=4, image_size=32, validations=-1)


def test_training_is_deterministic(small):
    train, val = small
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(train_segmenter(_tiny_unet(), train, val, epochs=1, lr=0.05, batch_size=4, image_size=32,
                                    device="cpu", seed=3, augment=True).history)
    pd.testing.assert_frame_equal(runs[0].drop(columns="seconds"), runs[1].drop(columns="seconds"))


def test_lr_grid_picks_best_val_dice_and_computes_features_once(cxr, monkeypatch):
    train, val = cxr
    calls = []
    original = seg._FeatureStore._compute

    def counting(self, ds):
        calls.append(ds.name)
        return original(self, ds)

    monkeypatch.setattr(seg._FeatureStore, "_compute", counting)
    backbone = create_backbone("random-vit-smoke")
    best, table = lr_grid(lambda: frozen_linear(backbone, 4), train, val, lrs=(1e-4, 1e-1), epochs=2,
                          batch_size=16, image_size=64, device="cpu")
    assert sorted(calls) == ["cxr-train", "cxr-val"]  # once per data set for the whole grid
    assert table["lr"].tolist() == [1e-4, 1e-1]
    assert table.loc[table["selected"], "lr"].item() == table.loc[table["best_val_dice"].idxmax(), "lr"]
    assert best.best_val_dice == table["best_val_dice"].max()


def test_lr_grid_restarts_are_seeded_runs_selected_on_validation(small):
    train, val = small
    best, table = lr_grid(_tiny_unet, train, val, lrs=(0.05,), restarts=2, epochs=1, batch_size=4, image_size=32,
                          device="cpu", seed=3, restart_below_prior=False)
    assert table["restart"].tolist() == [0, 1] and table["seed"].iloc[0] == 3 and table["seed"].iloc[1] != 3
    assert table["selected"].sum() == 1 and best.best_val_dice == table["best_val_dice"].max()
    again = lr_grid(_tiny_unet, train, val, lrs=(0.05,), restarts=2, epochs=1, batch_size=4, image_size=32,
                    device="cpu", seed=3, restart_below_prior=False)[1]
    pd.testing.assert_frame_equal(table.drop(columns="seconds_per_epoch"), again.drop(columns="seconds_per_epoch"))
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        lr_grid(_tiny_unet, train, val, lrs=(0.05,), restarts=0, epochs=1, batch_size=4, image_size=32)


def test_label_map_is_argmax_over_classes_first_on_ties():
    logits = torch.randn(3, 5, 17, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seg.label_map(logits), logits.argmax(dim=1))
    tied = torch.zeros(2, 4, 8, 8)
    tied[:, 1] = tied[:, 3] = 1.0
    assert torch.equal(seg.label_map(tied), torch.ones(2, 8, 8, dtype=torch.long)), "the first maximal class wins"
    assert seg.label_map(logits).shape == (3, 17, 9)


def test_classes_below_prior_compares_class_means_and_skips_unscored_classes():
    prior = pd.DataFrame({"dice": [0.5, 0.5], "dice_heart": [0.8, 0.6], "dice_lung": [0.5, 0.7],
                          "dice_tumour": [np.nan, np.nan]})
    model = pd.DataFrame({"dice": [0.9, 0.9], "dice_heart": [0.9, 0.4], "dice_lung": [0.9, 0.9],
                          "dice_tumour": [0.1, np.nan]})
    assert seg.classes_below_prior(model, prior) == ["heart"], "heart: 0.65 < 0.70; tumour: the prior never scores it"
    assert seg.classes_below_prior(model.assign(dice_heart=[0.8, 0.6]), prior) == [], "equal is not below"
    assert seg.classes_below_prior(model.assign(dice_lung=np.nan), prior) == ["heart", "lung"], "never scored is below"


def test_lr_grid_restarts_only_while_a_class_is_below_the_prior_on_validation(small, monkeypatch):
    train, val = small
    seen = []

    def below(scores, prior):
        seen.append((len(scores), len(prior)))
        return verdicts.pop(0)

    monkeypatch.setattr(seg, "classes_below_prior", below)
    kwargs = dict(lrs=(0.05,), restarts=3, epochs=1, batch_size=4, image_size=32, device="cpu", seed=3)
    verdicts = [[]]
    table = lr_grid(_tiny_unet, train, val, **kwargs)[1]
    assert table["restart"].tolist() == [0] and table["val_below_prior"].tolist() == [""]
    assert seen == [(len(val), len(val))], "judged on validation images, never test"
    verdicts = [["heart"], []]
    table = lr_grid(_tiny_unet, train, val, **{**kwargs, "restarts": 2})[1]
    assert table["restart"].tolist() == [0, 1] and table["val_below_prior"].tolist() == ["heart", ""]
    verdicts = [["heart"], ["heart", "lung"], ["lung"]]
    table = lr_grid(_tiny_unet, train, val, **kwargs)[1]
    assert table["restart"].tolist() == [0, 1, 2], "at most `restarts` runs"
    assert table["val_below_prior"].tolist() == ["heart", "heart, lung", "lung"], "every run is judged"
    assert table["selected"].sum() == 1 and not verdicts
    table = lr_grid(_tiny_unet, train, val, **{**kwargs, "restart_below_prior": False})[1]
    assert table["restart"].tolist() == [0, 1, 2] and table["val_below_prior"].isna().all(), "not judged"


def test_few_shot_draws_only_from_train(monkeypatch):
    ds = make_dataset("cxr", 40, size=64)
    parts = patient_split(ds, (0.6, 0.2, 0.2), seed=0)
    train, val, test = (ds.subset(parts[k], name=k) for k in ("train", "val", "test"))
    seen = []
    original = seg._fit

    def recording(model, train_set, rows, val_set, cfg, store=None):
        seen.append((train_set, np.array(rows), val_set))
        return original(model, train_set, rows, val_set, cfg, store)

    monkeypatch.setattr(seg, "_fit", recording)
    kwargs = dict(ns=(1, 2, "all"), repeats=2, seed=5, epochs=1, lr=0.05, batch_size=4, image_size=32,
                  device="cpu", model_name="unet")
    table = segmentation_few_shot(_tiny_unet, train, val, test, **kwargs)
    assert len(seen) == 6
    held_out = set(val.patient_ids) | set(test.patient_ids)
    for (train_set, rows, val_set), n in zip(seen, [1, 1, 2, 2, len(train), len(train)]):
        assert train_set is train and val_set is val and len(rows) == n == len(np.unique(rows))
        assert not set(train.patient_ids[rows]) & held_out
    assert table[["n", "n_images", "repeat"]].values.tolist() == [
        [1, 1, 0], [1, 1, 1], [2, 2, 0], [2, 2, 1], ["all", len(train), 0], ["all", len(train), 1]]
    assert set(table.columns) >= {"model", "dice", "jaccard", "mean_dj", "val_dice", "best_epoch"}
    assert table[["dice", "jaccard"]].notna().all().all() and (table["model"] == "unet").all()
    first_draws = [rows.tolist() for _, rows, _ in seen]
    seen.clear()
    segmentation_few_shot(_tiny_unet, train, val, test, **kwargs)
    assert [rows.tolist() for _, rows, _ in seen] == first_draws  # seeded
    with pytest.raises(ValueError, match="exceeds the .* training images"):
        segmentation_few_shot(_tiny_unet, train, val, test, ns=(len(train) + 1,), epochs=1, lr=0.1, batch_size=4,
                              image_size=32)


def test_predict_and_evaluate_at_native_resolution():
    ds = make_dataset("ct", 6, size=64)  # organs absent from some slices: NaN per class, finite macro
    model = frozen_linear(create_backbone("random-vit-smoke"), len(ds.mask_names) + 1)
    masks = predict_masks(model, ds, image_size=32, device="cpu")
    assert masks.shape == (6, 64, 64) and masks.dtype == np.uint8 and masks.max() < 8
    df = evaluate_segmenter(model, ds, image_size=32, device="cpu")
    assert len(df) == 6 and {"row", "patient_id", "dice_liver", "jaccard_spine", "mean_dj"} <= set(df.columns)
    assert df["dice"].notna().all()
    assert df["mean_dj"].to_numpy() == pytest.approx(((df["dice"] + df["jaccard"]) / 2).to_numpy())


@pytest.mark.parametrize("cached", [True, False])
def test_training_targets_are_the_masks_at_their_own_resolution(cached):
    ds = make_dataset("ct", 4, size=64)
    model = frozen_linear(create_backbone("random-vit-smoke"), len(ds.mask_names) + 1)
    store = seg._FeatureStore(model, 32, "cpu", 4, 1e9) if cached else None
    transform = seg.SegmentationTransform(32, train=False)
    rows = np.array([2, 0])
    logits, target = seg._train_logits(model, True, ds, rows, store.get(ds) if cached else None, transform,
                                       torch.Generator(), "cpu", native=True)
    assert logits.shape == (2, 8, 64, 64)
    np.testing.assert_array_equal(target.numpy(), ds.masks[rows])
    logits, target = seg._train_logits(model, True, ds, rows, store.get(ds) if cached else None, transform,
                                       torch.Generator(), "cpu", native=False)
    assert logits.shape == (2, 8, 32, 32) and target.shape == (2, 32, 32)
    scratch_logits, scratch_target = seg._train_logits(_tiny_unet_ct(), False, ds, rows, None, transform,
                                                       torch.Generator(), "cpu", native=True)
    assert scratch_logits.shape == (2, 8, 64, 64)  # resized up to the masks, as at scoring
    np.testing.assert_array_equal(scratch_target.numpy(), ds.masks[rows])


@pytest.mark.parametrize("seed", range(3))
def test_augmented_native_targets_keep_the_drawn_geometry(seed):
    ds = make_dataset("cxr", 2, size=64)
    transform = seg.SegmentationTransform(32, train=True, scale=(0.5, 1.0), hflip=0.5, rotation=10.0)
    small_x, small_y = seg._stack(ds, np.array([0, 1]), transform, torch.Generator().manual_seed(seed))
    big_x, big_y = seg._stack(ds, np.array([0, 1]), transform, torch.Generator().manual_seed(seed), native=True)
    torch.testing.assert_close(big_x, small_x)  # the images are those of the input-size path
    assert big_y.shape == (2, 64, 64) and small_y.shape == (2, 32, 32)
    shrunk = F.interpolate(big_y[:, None].float(), size=(32, 32), mode="nearest-exact")[:, 0].long()
    agree = float((shrunk == small_y).float().mean())
    shifted = float((torch.roll(shrunk, 2, dims=-1) == small_y).float().mean())
    assert agree > 0.95 and agree > shifted + 0.02, (agree, shifted)  # same crop, rotation and flip
    with pytest.raises(ValueError, match="needs square masks"):
        seg._native_mask(transform, np.zeros((64, 48), np.uint8), torch.Generator())


def _tiny_unet_ct() -> torch.nn.Module:
    return scratch_unet(8, base=4, depth=2)


def test_native_targets_draw_a_thin_structure_that_input_size_targets_miss():
    """Known answer: a 3-px-wide bar on 64 px masks, a model at 32 px input. Trained against 32 px label maps
    (the bar shrinks to 1-2 px, placed by nearest neighbour) a model cannot place the bar's borders; trained
    against the 64 px maps through bilinear upsampling of its logits, it can (0.99 vs 0.90 here)."""
    n, size = 24, 64
    images = np.zeros((n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for i in range(n):
        x = int(rng.integers(8, 54))
        images[i, :, x:x + 3] = 255
        masks[i, :, x:x + 3] = 1
    ds = ImageSet(images=images, labels=None, label_names=[], task="none",
                  patient_ids=np.array([f"p{i}" for i in range(n)]), masks=masks, mask_names=["bar"], name="bars")
    train, val = ds.subset(np.arange(16)), ds.subset(np.arange(16, 24))
    scores = {}
    for target_size in ("input", "native"):
        torch.manual_seed(0)
        model = scratch_unet(2, base=4, depth=1)
        result = train_segmenter(model, train, val, epochs=30, lr=0.05, batch_size=8, image_size=32, device="cpu",
                                 target_size=target_size)
        scores[target_size] = float(summarize(evaluate_segmenter(result.model, val, 32, "cpu"))["dice"])
    assert scores["native"] > 0.95 and scores["native"] > scores["input"] + 0.05, scores


def test_bad_inputs_raise_clearly(small):
    train, val = small
    kw = dict(epochs=1, lr=0.1, batch_size=4, image_size=32, device="cpu")
    with pytest.raises(ValueError, match="3 mask classes .* model outputs 3 classes; build it with n_classes=4"):
        train_segmenter(scratch_unet(3, base=4, depth=2), train, val, **kw)
    broken = train.subset(np.arange(4))
    broken.masks = np.zeros((4, 32, 32), np.uint8)
    with pytest.raises(ValueError, match=r"masks \(4, 32, 32\) do not match images \(4, 64, 64\)"):
        train_segmenter(_tiny_unet(), broken, val, **kw)
    no_masks = train.subset(np.arange(4))
    no_masks.masks = None
    with pytest.raises(ValueError, match="has no masks"):
        train_segmenter(_tiny_unet(), no_masks, val, **kw)
    with pytest.raises(ValueError, match="needs a validation set"):
        train_segmenter(_tiny_unet(), train, None, **kw)
    with pytest.raises(ValueError, match="not a multiple of .* patch size 8; use 32"):
        train_segmenter(frozen_linear(create_backbone("random-vit-smoke"), 4), train, val, **{**kw, "image_size": 36})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_segmenter(_tiny_unet(), train, val, **{**kw, "optimizer": "adam"})
    with pytest.raises(ValueError, match="cache_features=True needs augment=False"):
        train_segmenter(_tiny_unet(), train, val, **kw, augment=True, cache_features=True)


def test_unknown_training_option_names_the_accepted_ones(small):
    train, val = small
    with pytest.raises(ValueError, match="target_size must be one of"):
        train_segmenter(_tiny_unet(), train, val, epochs=1, lr=0.1, batch_size=4, image_size=32, device="cpu",
                        target_size="full")
    with pytest.raises(TypeError, match="training options are: epochs, lr, batch_size"):
        train_segmenter(_tiny_unet(), train, val, epochs=1, lr=0.1, batch_size=4, image_size=32, momentun=0.9)


# --------------------------------------------------------------------------- training loss and the image-blind prior


def test_segmentation_loss_counts_the_background():
    # Half the pixels are organ 1, half background. Painting everything as organ 1 is nearly free for the
    # foreground-only Dice (organ 1's soft Dice is still 2/3) but costs the background's Dice in "dice".
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, :, :2] = 1
    painted = torch.full((1, 2, 4, 4), -20.0)
    painted[:, 1] = 20.0
    fg = seg.segmentation_loss(painted, target, "dice_fg").item()
    both = seg.segmentation_loss(painted, target, "dice").item()
    assert fg == pytest.approx(1 - 2 / 3, abs=1e-4)
    assert both == pytest.approx(1 - (0 + 2 / 3) / 2, abs=1e-4)
    with_ce = seg.segmentation_loss(painted, target, "dice_ce").item()
    assert with_ce == pytest.approx(both + 0.5 * 40, rel=1e-3)  # CE: half the pixels cost 40 nats
    perfect = torch.where(target[:, None] == torch.arange(2)[None, :, None, None], 20.0, -20.0)
    assert all(seg.segmentation_loss(perfect, target, k).item() < 1e-4 for k in seg.LOSSES)
    with pytest.raises(ValueError, match="loss must be one of"):
        seg.segmentation_loss(perfect, target, "focal")
    with pytest.raises(ValueError, match="loss must be one of"):
        seg.SegTrainConfig(epochs=1, lr=0.1, batch_size=2, image_size=32, loss="focal")


def test_majority_prior_known_values():
    masks = np.array([[[0, 1], [2, 2]], [[0, 1], [1, 2]], [[1, 0], [1, 0]]])
    # per pixel: (0,0): 0,0,1 -> 0; (0,1): 1,1,0 -> 1; (1,0): 2,1,1 -> 1; (1,1): 2,2,0 -> 2
    assert seg.majority_prior(masks).tolist() == [[0, 1], [1, 2]]
    assert seg.majority_prior(np.array([[[0, 1]], [[1, 0]]])).tolist() == [[0, 0]]  # ties: lowest label
    with pytest.raises(ValueError, match="outside"):
        seg.majority_prior(masks, n_classes=2)
    with pytest.raises(TypeError):
        seg.majority_prior(masks.astype(float))


def test_evaluate_prior_scores_the_prior_map():
    ds = make_dataset("cxr", 12, size=64)
    train, test = ds.subset(np.arange(8)), ds.subset(np.arange(8, 12))
    prior = seg.majority_prior(np.asarray(train.masks), 4)
    table = seg.evaluate_prior(train, test)
    assert list(table["row"]) == [0, 1, 2, 3]
    for row in range(len(test)):
        expected = dice_jaccard(prior, np.asarray(test.masks[row]), 4)
        assert table.loc[row, "dice_heart"] == pytest.approx(expected.dice[2])
        assert table.loc[row, "dice"] == pytest.approx(expected.macro_dice)
    # the chest prior knows where the lungs usually are, so it is far from zero, and it is not perfect
    assert 0.3 < table["dice"].mean() < 0.99


def test_frozen_linear_head_is_dinov2s_bn_head_and_affine_at_inference():
    from medlib.eval.segmentation import BNLinearSegHead

    head = frozen_linear(create_backbone("random-vit-smoke"), 3).head
    assert isinstance(head, BNLinearSegHead) and isinstance(head.norm, torch.nn.BatchNorm2d)
    head.train()
    head(torch.randn(4, head.conv.in_channels, 4, 4) * 5 + 3, out_size=8)  # running statistics move
    head.eval()
    a, b = torch.randn(2, head.conv.in_channels, 4, 4), torch.randn(2, head.conv.in_channels, 4, 4)
    zero = head(torch.zeros_like(a), 8)
    # affine in the tokens: f(a + b) - f(0) = (f(a) - f(0)) + (f(b) - f(0))
    assert torch.allclose(head(a + b, 8) - zero, (head(a, 8) - zero) + (head(b, 8) - zero), atol=1e-4)
    with pytest.raises(ValueError, match="grid 0 must be"):
        head(torch.randn(4, 4, 4), 8)

"""Study-1 runners: tables over backbones x data sets, published figures, parameter counts, figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from medlib.config import get_profile, override
from medlib.data import phantoms
from medlib.studies import radiology_benchmark as bm
from medlib.eval.features import FeatureSet, extract_features
from medlib.models.backbones import WeightsNotFoundError, create_backbone

SMOKE = get_profile("smoke")


def _features(x: np.ndarray, labels: np.ndarray, task: str, names: list[str], backbone: str = "b") -> FeatureSet:
    x = x.astype(np.float32)
    return FeatureSet(cls=x, pooled=x, layers=x[:, None], labels=labels, label_names=names, task=task,
                      backbone=backbone, dataset="synthetic", fingerprint="f")


def _separable(task: str, n: int = 90, seed: int = 0) -> FeatureSet:
    """Three well-separated clusters: multi-class labels, a binary label (cluster 0) or multi-label."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(n) % 3
    x = np.eye(3)[cluster] * 4 + rng.normal(0, 0.3, size=(n, 3))
    x = np.concatenate([x, rng.normal(0, 0.3, size=(n, 5))], axis=1)
    if task == "multiclass":
        return _features(x, cluster.astype(np.int64), task, ["a", "b", "c"])
    if task == "binary":
        return _features(x, (cluster == 0).astype(np.float32)[:, None], task, ["pos"])
    labels = np.stack([cluster == 0, cluster != 2], axis=1).astype(np.float32)
    return _features(x, labels, task, ["first", "not_last"])


SPLIT = {"train": np.arange(0, 54), "val": np.arange(54, 72), "test": np.arange(72, 90)}


# --------------------------------------------------------------------------- published figures


def test_published_tables_hold_the_papers_numbers():
    nih = bm.PUBLISHED_FEW_SHOT_NIH.set_index(["model", "n"])["value"]
    assert len(nih) == 30 and nih[("DINOv2 ViT-L/14", "all")] == 0.763 and nih[("VGG-19 IN-1k", 1)] == 0.505
    seg = bm.PUBLISHED_SEG_MONTGOMERY.set_index(["model", "n"])["value"]
    assert seg[("U-Net (from scratch)", 1)] == 0.583 and seg[("DINOv2 ViT-L/14 (frozen)", "all")] == 0.974


@pytest.mark.parametrize("name, model, relation", [
    ("ssl-natural-vit-tiny", "DINOv2 ViT-L/14", "stand-in"),
    ("ssl-natural-vit-s14", "DINOv2 ViT-L/14", "stand-in"),
    ("dinov2-vit-l14", "DINOv2 ViT-L/14", "same model"),
    ("dinov2-vit-s14", "DINOv2 ViT-L/14", "stand-in"),
    ("sup-natural-vit-tiny", "ViT-L/16 IN-21k", "stand-in"),
    ("efficientnet-lite0.in1k", "DenseNet-201 IN-1k", "stand-in"),
    ("random-vit-tiny", None, "no published counterpart"),
])
def test_published_counterpart_names_the_stand_in(name, model, relation):
    got_model, got_relation = bm.published_counterpart(name)
    assert got_model == model and got_relation.startswith(relation)


def test_few_shot_vs_paper_puts_each_backbone_beside_its_counterpart():
    summary = pd.DataFrame({
        "backbone": ["ssl-natural-vit-tiny", "ssl-natural-vit-tiny", "random-vit-tiny", "ssl-natural-vit-tiny"],
        "protocol": ["repeats", "repeats", "repeats", "paper"], "n": [1, "all", 1, 1], "metric": "auroc",
        "mean": [0.6, 0.9, 0.55, 0.1], "ci_low": [0.5, np.nan, 0.5, np.nan], "ci_high": [0.7, np.nan, 0.6, np.nan]})
    table = bm.few_shot_vs_paper(summary, "smoke")
    assert list(table["backbone"]) == ["ssl-natural-vit-tiny", "ssl-natural-vit-tiny", "random-vit-tiny"]
    np.testing.assert_allclose(table["published"].iloc[:2], [0.502, 0.763])
    np.testing.assert_allclose(table["delta"].iloc[:2], [0.6 - 0.502, 0.9 - 0.763])
    assert np.isnan(table["published"].iloc[2]) and table["profile"].eq("smoke").all()
    assert table["ci_low"].iloc[0] == 0.5
    with pytest.raises(ValueError, match="protocol 'nope'"):
        bm.few_shot_vs_paper(summary, "smoke", protocol="nope")


def test_segmentation_vs_paper_maps_frozen_heads_and_scratch():
    ssl = "ssl-natural-vit-tiny"
    summary = pd.DataFrame({
        "dataset": "chest_xray", "backbone": [ssl, ssl, "-", "random-vit-tiny"],
        "model": [f"{ssl} + linear head", f"{ssl} + U-Net decoder", "U-Net from scratch", "random + linear head"],
        "n": [1, 1, 1, 1], "metric": "mean_dj", "mean": [0.8, 0.85, 0.5, 0.1], "ci_low": 0.0, "ci_high": 1.0})
    table = bm.segmentation_vs_paper(summary, "tiny", backbone=ssl)
    assert list(table["model"]) == [f"{ssl} + linear head", f"{ssl} + U-Net decoder", "U-Net from scratch"]
    np.testing.assert_allclose(table["published"], [0.929, 0.929, 0.583])
    np.testing.assert_allclose(table["delta"], [0.8 - 0.929, 0.85 - 0.929, 0.5 - 0.583])
    other = bm.segmentation_vs_paper(summary, "tiny", backbone="random-vit-tiny")  # no DINOv2 counterpart
    published = other.set_index("model")["published"]
    assert np.isnan(published["random + linear head"]) and published["U-Net from scratch"] == 0.583
    with pytest.raises(ValueError, match="no mean_dj rows"):
        bm.segmentation_vs_paper(summary, "tiny", backbone="missing", dataset="ct")


def test_primary_backbone_prefers_the_dinov2_stand_in_then_a_vit():
    vit, cnn = create_backbone("random-vit-smoke"), create_backbone("efficientnet-lite0.in1k", image_size=32)
    assert bm.primary_backbone({"efficientnet-lite0.in1k": cnn, "random-vit-smoke": vit,
                                "ssl-natural-vit-smoke": vit}) == "ssl-natural-vit-smoke"
    assert bm.primary_backbone({"efficientnet-lite0.in1k": cnn, "random-vit-smoke": vit}) == "random-vit-smoke"
    assert bm.primary_backbone({"efficientnet-lite0.in1k": cnn}) == "efficientnet-lite0.in1k"
    with pytest.raises(ValueError, match="at least one"):
        bm.primary_backbone({})


# --------------------------------------------------------------------------- kNN and probes


def test_knn_table_methods_scores_and_selection_on_val():
    features = {("b", "mc"): _separable("multiclass"), ("b", "bin"): _separable("binary"),
                ("b", "ml"): _separable("multilabel")}
    splits = {name: SPLIT for name in ("mc", "bin", "ml")}
    table = bm.knn_table(features, splits, ks=(3, 10, 500))
    assert len(table) == 9
    methods = table.groupby("dataset")["method"].first()
    assert methods["ml"] == "ML-kNN" and methods["mc"] == "weighted vote" and methods["bin"] == "weighted vote"
    assert table.loc[table["k"] < 500, "test_auroc"].min() > 0.99  # separable clusters (k = all train blurs them)
    assert table.loc[table["dataset"] == "mc", "test_accuracy"].min() > 0.99
    assert table.loc[table["dataset"] == "ml", "test_accuracy"].isna().all()
    assert table.loc[(table["dataset"] == "ml") & (table["k"] == 500), "k_used"].item() == 53  # n_train - 1
    assert table.loc[(table["dataset"] == "mc") & (table["k"] == 500), "k_used"].item() == 54
    assert table.groupby("dataset")["selected"].sum().eq(1).all()
    for _, group in table.groupby("dataset"):
        assert group.loc[group["selected"], "val_auroc"].item() == group["val_auroc"].max()


def test_knn_scores_binary_returns_the_positive_column():
    fs = _separable("binary")
    proba, method, used = bm.knn_scores(fs.subset(SPLIT["train"]), fs.subset(SPLIT["test"]), k=5)
    assert proba.shape == (18, 1) and method == "weighted vote" and used == 5
    assert np.all((proba >= 0) & (proba <= 1))


def test_probe_table_has_both_probes_chosen_on_val_and_tested():
    features = {("b", "mc"): _separable("multiclass"), ("b", "bin"): _separable("binary")}
    table = bm.probe_table(features, {"mc": SPLIT, "bin": SPLIT}, SMOKE, device="cpu")
    assert set(table["probe"]) == {"linear grid", "logistic regression"} and len(table) == 4
    assert table["test_auroc"].min() > 0.95
    assert table["val_auroc"].notna().all() and table["chosen"].str.len().min() > 0
    assert table.loc[table["probe"] == "linear grid", "chosen"].str.contains("n_blocks=1").all()
    assert (table[["n_train", "n_val", "n_test"]].to_numpy() == [54, 18, 18]).all()
    assert table.loc[table["dataset"] == "bin", "test_accuracy"].isna().all()


# --------------------------------------------------------------------------- data, backbones, few-shot


def test_load_datasets_and_splits_on_smoke():
    datasets = bm.load_datasets(SMOKE, names=["knee_acl", "breast_us"])
    assert list(datasets) == ["knee_acl", "breast_us"]
    assert datasets["knee_acl"].task == "binary" and len(datasets["breast_us"]) == SMOKE.data.n_per_dataset
    splits = bm.make_splits(datasets, seed=0)
    for name, ds in datasets.items():
        parts = {k: set(ds.patient_ids[v]) for k, v in splits[name].items()}
        assert not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    table = bm.describe_datasets(datasets, splits)
    assert (table[["train", "val", "test"]].sum(axis=1) == table["images"]).all()
    with pytest.raises(ValueError, match="unknown benchmark"):
        bm.load_datasets(SMOKE, names=["mnist"])


def test_load_datasets_without_phantoms_or_sources_warns_then_raises():
    empty = override(SMOKE, **{"data.n_per_dataset": 0})
    with pytest.warns(UserWarning, match="left out"), pytest.raises(ValueError, match="provides none"):
        bm.load_datasets(empty, names=["knee_acl"])


def test_load_backbones_lists_missing_weights():
    loaded, table = bm.load_backbones(["random-vit-smoke", "dinov2-vit-s14"], image_size=32)
    assert list(loaded) == ["random-vit-smoke"]
    assert list(table["status"]) == ["loaded", "missing"] and table["params_M"].iloc[0] > 0
    with pytest.raises(WeightsNotFoundError):
        bm.load_backbones(["dinov2-vit-s14"], skip_missing=False)
    with pytest.raises(WeightsNotFoundError, match="none of the backbones"):
        bm.load_backbones(["dinov2-vit-s14"])


def test_model_card_health_reads_embedded_cards_only(monkeypatch):
    cards = {"ssl-natural-vit-smoke": {"device": "cpu", "training": {"steps": 4},
                                       "health": {"passed": False, "mean_auroc_gain": -0.05, "criterion": "gain"}},
             "sup-natural-vit-smoke": None,
             "sup-cxr-vit-smoke": {"device": "cpu", "training": {"epochs": 1},
                                   "health": {"passed": True, "transfer_passed": False, "mean_auroc_gain": -0.02,
                                              "natural_auroc_gain": 0.01, "own_task": {"auroc_gain": 0.2},
                                              "draws": [{"mean_auroc_gain": -0.01}, {"mean_auroc_gain": -0.03}],
                                              "criterion": "own"}},
             "ssl-us-vit-smoke": {"device": "cpu", "training": {"steps": 2},
                                  "health": {"passed": True, "transfer_passed": True, "mean_auroc_gain": 0.04,
                                             "domain": {"tasks": ["breast_us_malignant"], "auroc_gain": 0.07},
                                             "criterion": "domain"}}}
    monkeypatch.setattr(bm, "load_model_card", lambda name: cards[name])
    table = bm.model_card_health(["ssl-natural-vit-smoke", "sup-natural-vit-smoke", "random-vit-smoke",
                                  "efficientnet-lite0.in1k", "sup-cxr-vit-smoke", "ssl-us-vit-smoke"])
    records = table.to_dict("records")
    assert len(records) == 3 and np.isnan(records[0].pop("own_task_auroc_gain"))  # SSL: judged on transfer
    assert records[2]["domain_auroc_gain"] == 0.07 and records[2]["passed"]  # continued SSL: on its domain
    records = records[:2]
    assert all(np.isnan(r.pop("domain_auroc_gain")) for r in records)
    assert np.isnan(records[0].pop("natural_auroc_gain"))  # a card written before the natural task was split out
    assert records == [{"backbone": "ssl-natural-vit-smoke", "passed": False, "mean_auroc_gain": -0.05, "gain_per_draw": "",
                        "transfer_passed": False, "criterion": "gain", "training": "4 steps", "device": "cpu"},
                       {"backbone": "sup-cxr-vit-smoke", "passed": True, "own_task_auroc_gain": 0.2,
                        "mean_auroc_gain": -0.02, "gain_per_draw": "-0.010 / -0.030", "transfer_passed": False,
                        "natural_auroc_gain": 0.01,
                        "criterion": "own",
                        "training": "1 epochs", "device": "cpu"}]


@pytest.fixture(scope="module")
def knee():
    """Smoke knee phantoms, their split and random-vit-smoke features."""
    ds = bm.load_datasets(SMOKE, names=["knee_acl"])["knee_acl"]
    split = bm.make_splits({"knee": ds}, seed=0)["knee"]
    backbone = create_backbone("random-vit-smoke")
    return ds, split, extract_features(backbone, ds, device="cpu"), backbone


def test_few_shot_table_has_repeats_with_intervals_and_a_single_draw(knee):
    ds, split, fs, _ = knee
    tables = bm.few_shot_table(ds, {"rand": fs}, split, SMOKE, probe="logistic", unit="image", device="cpu")
    summary = tables.summary
    assert set(summary["protocol"]) == {"repeats", "paper"}
    assert set(summary["n"]) == {1, 2, "all"} and bm.few_shot_sizes(SMOKE) == (1, 2, "all")
    repeats = summary[(summary["protocol"] == "repeats") & (summary["n"] != "all")]
    assert (repeats["repeats"] == SMOKE.eval.few_shot_repeats).all() and repeats["ci_low"].notna().all()
    assert summary.loc[summary["protocol"] == "paper", "ci_low"].isna().all()
    train = set(split["train"].tolist())
    assert tables.scores["n_train_images"].max() <= len(train)
    with pytest.raises(ValueError, match="few-shot probe"):
        bm.few_shot_probe("svm", SMOKE)


def test_cap_train_takes_evenly_spaced_train_images_only():
    split = {"train": np.arange(10, 30), "val": np.arange(30, 35), "test": np.arange(35, 40)}
    capped = bm.cap_train(split, 5)
    assert len(capped["train"]) == 5 and set(capped["train"]) <= set(split["train"])
    assert capped["train"][0] == 10 and capped["train"][-1] == 29
    np.testing.assert_array_equal(capped["val"], split["val"])
    np.testing.assert_array_equal(bm.cap_train(split, 0)["train"], split["train"])


# --------------------------------------------------------------------------- fine-tuning and parameter counts


def test_parameter_share_table_counts_lora_exactly():
    table = bm.parameter_share_table({"vit-t": "vit_tiny_patch16_224"})  # 12 blocks, D = 192, built on meta
    row = table.iloc[0]
    lora = 12 * 48 * ((192 + 576) + (192 + 768) + (768 + 192))  # r * (in + out) for qkv, fc1, fc2
    assert row["lora_trainable_M"] * 1e6 == pytest.approx(lora)
    assert row["lora_pct"] == pytest.approx(100 * lora / (row["params_M"] * 1e6 + lora))
    assert 0 < row["bitfit_pct"] < 1
    qkv = bm.parameter_share_table({"vit-t": "vit_tiny_patch16_224"}, targets=("qkv",)).iloc[0]
    assert qkv["lora_trainable_M"] * 1e6 == pytest.approx(12 * 48 * (192 + 576)) and qkv["lora_targets"] == "qkv"


def test_parameter_share_table_accepts_a_module_and_leaves_it_untouched():
    backbone = create_backbone("random-vit-smoke")
    before = sum(p.numel() for p in backbone.parameters())
    row = bm.parameter_share_table({"smoke": backbone}, r=4).iloc[0]
    assert row["params_M"] * 1e6 == before and sum(p.numel() for p in backbone.parameters()) == before
    assert all(p.requires_grad for p in backbone.parameters())


def test_peft_table_modes_shares_and_lora_on_a_cnn(knee):
    ds, split, _, backbone = knee
    tables = bm.peft_table({"rand": backbone}, ds, split, SMOKE, device="cpu")
    table = tables.table.set_index("mode")
    assert list(table.index) == ["full", "lora", "bitfit", "linear"]
    assert table.loc["full", "trainable_pct"] == pytest.approx(100)
    share = table["trainable_pct"]
    assert share["full"] > share["lora"] > share["bitfit"] > share["linear"] > 0
    assert table.loc["linear", "backbone_trainable_pct"] == 0 and table["test_auroc"].between(0, 1).all()
    cnn = create_backbone("efficientnet-lite0.in1k", image_size=32)
    skipped = bm.peft_table({"cnn": cnn}, ds, split, SMOKE, modes=("lora",), device="cpu").table
    assert np.isnan(skipped["test_auroc"].item()) and "not applicable" in skipped["note"].item()
    fig = bm.plot_peft(tables.table, "PEFT test")
    assert fig.axes[0].get_title() == "PEFT test"
    plt.close(fig)
    with pytest.raises(ValueError, match="no finished run"):
        bm.plot_peft(skipped, "empty")


def test_linear_mode_keeps_a_frozen_cnns_batchnorm_statistics(knee):
    """A frozen backbone stays in eval mode while the head trains (peft_finetune.FrozenAwareClassifier)."""
    ds, split, _, _ = knee
    cnn = create_backbone("efficientnet-lite0.in1k", image_size=32)
    before = {k: v.clone() for k, v in cnn.state_dict().items() if "running_" in k}
    result = bm.peft_table({"cnn": cnn}, ds, split, SMOKE, modes=("linear",), device="cpu").results[("cnn", "linear")]
    after = result.model.backbone.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    result.model.train()
    assert result.model.head.training and not result.model.backbone.training


# --------------------------------------------------------------------------- segmentation


SEG_PROFILE = override(SMOKE, **{"eval.seg_images": 20, "eval.seg_epochs": 1, "eval.seg_lrs": (0.1,),
                                 "eval.seg_batch_size": 8, "eval.few_shot_ns": (1, 4), "eval.seg_repeats": 2})


@pytest.fixture(scope="module")
def seg_run():
    """A one-epoch segmentation table on 20 chest phantoms: random-vit-tiny (6 blocks) at 32 px and a scratch U-Net."""
    datasets = bm.load_datasets(SEG_PROFILE, names=["chest_xray"])
    seg_sets = bm.segmentation_sets(datasets, SEG_PROFILE)
    backbones = {"rand": create_backbone("random-vit-tiny", image_size=32)}
    return seg_sets, backbones, bm.segmentation_table(backbones, seg_sets, SEG_PROFILE, device="cpu")


def test_segmentation_sets_are_patient_grouped_and_capped(seg_run):
    seg_sets, _, _ = seg_run
    parts = seg_sets["chest_xray"]
    assert sum(len(ds) for ds in parts.values()) == 20
    patients = {k: set(ds.patient_ids) for k, ds in parts.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients["val"])
    no_masks = parts["train"].subset(np.arange(3))
    no_masks.masks = None
    with pytest.raises(ValueError, match="no masks"):
        bm.segmentation_sets({"x": no_masks}, SEG_PROFILE)


def test_segmentation_table_trains_every_head_and_the_scratch_unet(seg_run):
    _, _, seg = seg_run
    assert list(seg.table["head"]) == [bm.PRIOR, bm.SEG_HEADS["linear"], bm.SEG_HEADS["unet"], bm.SCRATCH]
    prior_row = seg.table.iloc[0]
    assert prior_row["model"] == bm.PRIOR and prior_row["trainable"] == 0 and np.isnan(prior_row["lr"])
    table = seg.table.iloc[1:]
    assert table[["test_dice", "test_jaccard", "test_mean_dj"]].stack().between(0, 1).all()
    np.testing.assert_allclose(table["test_mean_dj"], (table["test_dice"] + table["test_jaccard"]) / 2, atol=1e-9)
    assert (table["lr"] == 0.1).all()
    # per-class Dice beside the macro, and the macro's bootstrap interval inside [0, 1] around it
    for name in ("left_lung", "right_lung", "heart"):
        assert seg.table[f"test_dice_{name}"].between(0, 1).all()
    assert (seg.table["test_dice_ci_low"] <= seg.table["test_dice"]).all()
    assert (seg.table["test_dice"] <= seg.table["test_dice_ci_high"]).all()
    assert seg.table[["test_dice_ci_low", "test_dice_ci_high"]].stack().between(0, 1).all()
    per_class = seg.per_class
    assert set(per_class["class"]) == {"left_lung", "right_lung", "heart", "mean"}
    assert set(per_class["model"]) == set(seg.table["model"])
    prior_heart = per_class[(per_class["model"] == bm.PRIOR) & (per_class["class"] == "heart")].iloc[0]
    assert prior_heart["dice"] == pytest.approx(prior_heart["prior_dice"])
    assert set(seg.models) == {("chest_xray", "rand", "linear"), ("chest_xray", "rand", "unet"),
                               ("chest_xray", "-", "scratch")}
    frozen = table.loc[table["backbone"] == "rand", "trainable"]
    assert frozen.max() < table.loc[table["backbone"] == "-", "trainable"].item()  # heads only vs a whole U-Net


def test_unet_decoder_skips_a_backbone_with_fewer_than_five_blocks():
    shallow = create_backbone("random-vit-smoke")  # 2 blocks
    jobs = bm._seg_jobs({"s": shallow}, ("linear", "unet"), scratch=True, image_size=32)
    assert [(name, head) for name, head, _ in jobs] == [("s", "linear"), ("-", "scratch")]


def test_a_linear_head_is_not_trained_on_a_grid_coarser_than_four_cells():
    vit = create_backbone("random-vit-smoke")  # patch 8: 32 px -> a 4 x 4 grid, 24 px -> 3 x 3
    assert bm.linear_head_out_of_scope({"v": vit}, 32) == {}
    assert bm.linear_head_out_of_scope({"v": vit}, 24) == {"v": 3}
    jobs = bm._seg_jobs({"v": vit}, ("linear",), scratch=True, image_size=24)
    assert [(name, head) for name, head, _ in jobs] == [("-", "scratch")]


def test_step_floors_of_the_segmentation_heads():
    p = override(SEG_PROFILE, **{"eval.seg_head_min_steps": 100, "eval.seg_min_steps": 40, "eval.seg_batch_size": 8,
                                 "eval.seg_epochs": 2})
    assert bm.head_epochs(p, "linear", 16, 2) == 50  # 2 steps an epoch, 100 steps
    assert bm.head_epochs(p, "unet", 16, 2) == 20  # the all-images floor, 40 steps
    assert bm.head_epochs(p, "scratch", 16, 2, all_images=False) == 2  # few-shot curves keep their epochs
    assert bm.head_epochs(p, "linear", 16, 2, all_images=False) == 50
    off = override(p, **{"eval.seg_head_min_steps": 0, "eval.seg_min_steps": 0})
    assert bm.head_epochs(off, "linear", 16, 2) == bm.head_epochs(off, "unet", 16, 2) == 2


def test_ct_segmentation_reads_whole_slices_not_organ_crops():
    p = override(SEG_PROFILE, **{"eval.seg_images": 12})
    organ = phantoms.make_dataset("ct", n=12, size=64, seed=p.seed)
    sets = bm.segmentation_sets({"ct_organs": organ}, override(p, **{"data.phantom_size": 64}))
    whole = phantoms.make_dataset("ct", n=12, size=64, seed=p.seed, view="slice")
    images = np.concatenate([np.asarray(sets["ct_organs"][k].images) for k in ("train", "val", "test")])
    assert images.shape[0] == 12
    assert sorted(map(bytes, images)) == sorted(map(bytes, np.asarray(whole.images)))
    assert sorted(map(bytes, images)) != sorted(map(bytes, np.asarray(organ.images)))


def test_segmentation_few_shot_table_and_its_summary(seg_run):
    seg_sets, backbones, seg = seg_run
    long = bm.segmentation_few_shot_table(backbones, seg_sets, SEG_PROFILE, heads=("linear",), lrs=seg.table,
                                          device="cpu")
    n_train = len(seg_sets["chest_xray"]["train"])
    assert set(long["n"]) == {1, 4, "all"} and long.groupby(["model", "n"]).size().eq(2).all()
    assert long.loc[long["n"] == "all", "n_images"].eq(n_train).all() and (long["lr"] == 0.1).all()
    epochs = long.groupby("n")["epochs"].first()  # equal optimiser steps across n, the linear head's budget at "all"
    full = bm.head_epochs(SEG_PROFILE, "linear", n_train, SEG_PROFILE.eval.seg_epochs)
    steps = full * int(np.ceil(n_train / SEG_PROFILE.eval.seg_batch_size))
    assert full >= SEG_PROFILE.eval.seg_epochs and steps >= SEG_PROFILE.eval.seg_head_min_steps
    assert epochs["all"] == full and epochs[1] == epochs[4] == steps  # n = 1 or 4: one batch per epoch
    summary = bm.summarize_repeats(long, ["dataset", "backbone", "model"], "mean_dj")
    assert len(summary) == 2 * 3 and summary["repeats"].eq(2).all()
    fig = bm.plot_seg_few_shot(summary, "seg test")
    assert fig.get_suptitle() == "seg test"
    plt.close(fig)
    models = {bm.seg_model_label(b, h): m for (_, b, h), m in seg.models.items()}
    fig = bm.plot_seg_overlays(models, seg_sets["chest_xray"]["test"], 32, 2, "overlays", device="cpu")
    assert len(fig.axes) == 2 * (1 + len(models))
    plt.close(fig)


@pytest.mark.parametrize("n, n_train, batch, epochs, expected", [
    (1, 56, 32, 15, 30),  # 15 epochs x 2 steps over all 56 = 30 steps of one image
    (16, 56, 32, 15, 30), (40, 56, 32, 15, 15), (56, 56, 32, 15, 15), (3, 10, 4, 2, 6),
])
def test_equal_step_epochs_keeps_the_number_of_updates(n, n_train, batch, epochs, expected):
    assert bm.equal_step_epochs(n, n_train, batch, epochs) == expected


def test_equal_step_epochs_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive sizes"):
        bm.equal_step_epochs(0, 10, 4, 2)


@pytest.mark.parametrize("n, sizes", [(17, [17]), (33, [16, 17]), (16, [16]), (1, [1]), (20, [16, 4])])
def test_segmentation_batches_fold_a_trailing_single_image_into_the_last_batch(n, sizes):
    """Regression: with 2 batches the old code raised IndexError; with 3+ it overwrote the first batch."""
    from medlib.eval.segmentation import _batches

    batches = _batches(np.arange(n), 16, None)
    assert [len(b) for b in batches] == sizes
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))


def test_summarize_repeats_known_values():
    long = pd.DataFrame({"model": "m", "n": [1, 1, 2], "n_images": [1, 1, 2], "score": [0.5, 0.7, 0.9]})
    out = bm.summarize_repeats(long, ["model"], "score").set_index("n")
    assert out.loc[1, "mean"] == pytest.approx(0.6) and out.loc[1, "repeats"] == 2
    # percentile bootstrap of the mean over two repeats: resampled means are 0.5, 0.6 or 0.7, so the interval
    # is [0.5, 0.7] - inside [0, 1], where the t-interval (t = 12.7) would be 0.6 +- 1.27
    assert (out.loc[1, "ci_low"], out.loc[1, "ci_high"]) == pytest.approx((0.5, 0.7))
    assert out.loc[1, "interval"] == "95 % percentile bootstrap of the mean over 2 repeats"
    assert np.isnan(out.loc[2, "ci_low"]) and out.loc[2, "interval"] == "none (one repeat)"
    with pytest.raises(ValueError, match="lacks column"):
        bm.summarize_repeats(long, ["model"], "dice")


# --------------------------------------------------------------------------- summary and figures


def test_headline_table_averages_over_data_sets():
    knn = pd.DataFrame({"backbone": ["a", "a", "a", "b"], "selected": [True, False, True, True],
                        "test_auroc": [0.8, 0.1, 0.6, 0.5]})
    probes = pd.DataFrame({"backbone": ["a", "b"], "probe": "linear grid", "test_auroc": [0.9, 0.7]})
    few = pd.DataFrame({"backbone": ["a", "a", "a"], "protocol": ["repeats", "repeats", "paper"], "metric": "auroc",
                        "n": [2, "all", 2], "mean": [0.6, 0.8, 0.1]})
    seg = pd.DataFrame({"backbone": ["a", "a", "-"], "head": [bm.SEG_HEADS["unet"], bm.SEG_HEADS["unet"], bm.SCRATCH],
                        "test_mean_dj": [0.4, 0.6, 0.9]})
    table = bm.headline_table(knn, probes, few, seg, ["a", "b"]).set_index("backbone")
    assert table.loc["a", "knn_auroc"] == pytest.approx(0.7) and table.loc["b", "linear_grid_auroc"] == 0.7
    assert table.loc["a", "fewshot_auroc_n=2"] == 0.6 and table.loc["a", "fewshot_auroc_n=all"] == 0.8
    assert table.loc["a", "seg_unet_mean_dj"] == pytest.approx(0.5) and np.isnan(table.loc["b", "seg_unet_mean_dj"])


def test_plot_few_shot_and_heatmap_have_titles():
    summary = pd.DataFrame({"backbone": "a", "protocol": ["repeats", "repeats", "paper"], "metric": "auroc",
                            "n": [1, "all", 1], "mean": [0.6, 0.8, 0.55], "ci_low": [0.5, np.nan, np.nan],
                            "ci_high": [0.7, np.nan, np.nan]})
    fig = bm.plot_few_shot(summary, "few", published=bm.PUBLISHED_FEW_SHOT_NIH)
    assert [ax.get_title() for ax in fig.axes][0] == "few" and len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "4", "8", "16", "all"]
    plt.close(fig)
    fig = bm.plot_heatmap(pd.DataFrame({"b": ["x", "y"], "d": ["p", "p"], "v": [0.1, 0.2]}), "b", "d", "v", "heat")
    assert fig.axes[0].get_title() == "heat"
    plt.close(fig)

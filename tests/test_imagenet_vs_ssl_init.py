"""Study 2 (Tayebi Arasteh et al. 2023): arms, pre-training overlap, the fine-tuning run, its cache, the tables and the two defects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from medlib.config import PROFILE_NAMES, get_profile, override
from medlib.data import phantoms
from medlib.eval import claims as claims_mod
from medlib.studies import imagenet_vs_ssl_init as init
from medlib.eval.finetune import FinetuneConfig
from medlib.models.backbones import WeightsNotFoundError, backbone_info, create_backbone

ARMS = ("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "sup-cxr-vit-tiny")


def _small_profile(**changes):
    base = {"eval.init_images": (24, 24, 24, 24, 24), "eval.init_epochs": 1, "eval.init_batch_size": 8,
            "eval.bootstrap": 40, "data.phantom_size": 64}
    return override(get_profile("smoke"), **{**base, **changes})


@pytest.fixture(scope="module")
def arms():
    try:
        return {name: create_backbone(name, image_size=32) for name in ARMS}
    except WeightsNotFoundError as err:  # the embedded weights are committed; a stripped checkout lacks them
        pytest.skip(f"embedded weights missing: {err}")


@pytest.fixture(scope="module")
def tiny_vit():
    return create_backbone("random-vit-smoke", image_size=32)


@pytest.fixture(scope="module")
def chest():
    ds = phantoms.make_dataset("cxr", 32, size=64, seed=0, site=0)
    return ds, init.make_splits({"x": ds}, seed=0)["x"]


# --------------------------------------------------------------------------- roles and pre-training data


def test_arm_roles_follow_the_names():
    assert init.arm_role("ssl-natural-vit-tiny") == "ssl_natural"
    assert init.arm_role("dinov2-vit-b14") == "ssl_natural"
    assert init.arm_role("sup-natural-vit-s14") == "sup_natural"
    assert init.arm_role("vit-b16-in21k") == "sup_natural"
    assert init.arm_role("sup-cxr-vit-tiny") == "sup_medical"
    assert init.arm_role("vit-b16-mimic-cxr") == "sup_medical"
    assert init.arm_role("efficientnet-lite0.in1k") == "cnn_reference"
    with pytest.raises(ValueError, match="plays no role"):
        init.arm_role("random-vit-tiny")


def test_medical_arm_is_never_tested_on_its_pretraining_site():
    assert "cxr:5" in init.pretraining_data("sup-cxr-vit-tiny")
    with pytest.raises(ValueError, match="pre-trained on 'cxr:5'"):
        init.assert_not_pretrained_on("sup-cxr-vit-tiny", "cxr:5")
    init.assert_not_pretrained_on("sup-cxr-vit-tiny", "cxr:0")  # another site is fine
    assert 5 not in init.INIT_SITES
    for name in PROFILE_NAMES:  # no profile tests any of its arms on a site it was pre-trained on
        p = get_profile(name)
        for arm in p.eval.init_arms:
            if arm.startswith(("sup-cxr-", "ssl-natural-", "sup-natural-")):
                assert not {f"cxr:{s}" for s in p.eval.init_sites} & set(init.pretraining_data(arm)), (name, arm)
    assert init.pretraining_data("vit-b16-mimic-cxr") == ("mimic_cxr",)
    with pytest.raises(ValueError):
        init.assert_not_pretrained_on("vit-b16-mimic-cxr", "mimic_cxr")


def test_finetune_run_refuses_the_pretraining_site(arms):
    site5 = phantoms.make_dataset("cxr", 24, size=64, seed=0, site=5)
    split = init.make_splits({"s5": site5})["s5"]
    with pytest.raises(ValueError, match="pre-trained on 'cxr:5'"):
        init.finetune_run(arms["sup-cxr-vit-tiny"], site5, split, FinetuneConfig(epochs=1, batch_size=8))
    grid = init.run_grid({"sup-cxr-vit-tiny": arms["sup-cxr-vit-tiny"]}, {"site5": site5}, {"site5": split},
                         _small_profile(), device="cpu")
    assert grid.runs == {}
    assert grid.excluded[["dataset", "backbone"]].values.tolist() == [["site5", "sup-cxr-vit-tiny"]]


# --------------------------------------------------------------------------- the arms are what they claim


def test_three_arms_start_from_different_weights_of_their_own_names(arms):
    table = init.verify_arms(arms)
    assert table["role"].tolist() == ["ssl_natural", "sup_natural", "sup_medical"]
    assert table["sha256"].nunique() == 3
    for name, bb in arms.items():
        assert bb.weights_path.stem == name
        assert str(bb.weights_path) == backbone_info(name)["weights_path"]
    states = {n: bb.state_dict() for n, bb in arms.items()}
    for a in ARMS:
        for b in ARMS:
            if a < b:
                assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a]), (a, b)


def test_natural_arm_loaded_with_the_medical_checkpoint_is_refused(arms):
    medical_file = arms["sup-cxr-vit-tiny"].weights_path
    impostor = create_backbone("sup-natural-vit-tiny", weights=medical_file, image_size=32)  # Tayebi Arasteh et al.'s defect
    with pytest.raises(ValueError, match="resolves to"):
        init.verify_arms({"ssl-natural-vit-tiny": arms["ssl-natural-vit-tiny"], "sup-natural-vit-tiny": impostor})


def test_an_arm_holding_another_model_is_refused(arms):
    with pytest.raises(ValueError, match="holds backbone"):
        init.verify_arms({"ssl-natural-vit-tiny": arms["ssl-natural-vit-tiny"],
                          "sup-natural-vit-tiny": arms["ssl-natural-vit-tiny"]})


def test_load_arms_validates_roles():
    with pytest.raises(ValueError, match="more than one arm"):
        init.load_arms(_small_profile(**{"eval.init_arms": ("ssl-natural-vit-tiny", "dinov2-vit-b14",
                                                            "sup-cxr-vit-tiny")}))
    with pytest.raises(ValueError, match="supervised arm"):
        init.load_arms(_small_profile(**{"eval.init_arms": ("ssl-natural-vit-tiny", "efficientnet-lite0.in1k")}))


# --------------------------------------------------------------------------- data


def test_load_datasets_uses_the_profile_sites_and_sizes():
    p = _small_profile(**{"eval.init_sites": (0, 3), "eval.init_images": (24, 28)})
    datasets = init.load_datasets(p)
    assert list(datasets) == ["VinDr-CXR-like", "ChestX-ray14-like"]
    assert [len(d) for d in datasets.values()] == [24, 28]
    assert [init.dataset_tag(d) for d in datasets.values()] == ["cxr:0", "cxr:3"]
    assert len(datasets["VinDr-CXR-like"].label_names) == 11  # VinDr-CXR has 11 labels in the paper too
    splits = init.make_splits(datasets)
    table = init.describe_datasets(datasets, splits)
    assert (table["train"] + table["val"] + table["test"] == table["images"]).all()
    assert init.ablation_dataset(datasets, override(p, **{"eval.init_ablation_site": 3})) == "ChestX-ray14-like"
    with pytest.raises(ValueError, match="not among the loaded"):
        init.ablation_dataset(datasets, p)  # site 1 is not loaded


@pytest.mark.parametrize("changes, message", [
    ({"eval.init_sites": (0, 5), "eval.init_images": (24, 24)}, "stand in for none"),
    ({"eval.init_sites": (0, 1), "eval.init_images": (24,)}, "same length"),
    ({"eval.init_sites": (0, 0), "eval.init_images": (24, 24)}, "repeats"),
    ({"eval.init_sites": (0,), "eval.init_images": (5,)}, "under 12"),
])
def test_bad_site_settings_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        init.load_datasets(_small_profile(**changes))


def test_fraction_indices_are_patient_grouped_stratified_and_deterministic(chest):
    ds, split = chest
    pool = split["train"]
    half = init.fraction_indices(ds, pool, 0.5, seed=0)
    assert np.isin(half, pool).all() and np.all(np.diff(half) > 0)
    assert 0.25 * len(pool) <= len(half) <= 0.75 * len(pool)
    chosen = set(ds.patient_ids[half])
    rest = set(ds.patient_ids[np.setdiff1d(pool, half)])
    assert not chosen & rest, "a patient's images must not be split between chosen and left out"
    np.testing.assert_array_equal(half, init.fraction_indices(ds, pool, 0.5, seed=0))
    np.testing.assert_array_equal(init.fraction_indices(ds, pool, 1.0), np.sort(pool))
    assert len(init.fraction_indices(ds, pool, 0.001)) >= 2
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            init.fraction_indices(ds, pool, bad)


# --------------------------------------------------------------------------- one run


def test_finetune_config_is_seed_003s_recipe():
    paper = init.finetune_config("paper")
    assert (paper.epochs, paper.lr, paper.backbone_lr, paper.weight_decay) == (100, 1e-5, 1e-5, 0.0)
    assert paper.pos_weight and paper.select_on == "val_loss"
    train, evaluate = init.transforms(32)
    assert train.rotation == 7.0 and train.hflip == 0.5 and train.vflip == 0.0 and train.scale is None
    assert not evaluate.train and evaluate.resize == 32


def test_splits_that_let_test_images_into_selection_are_refused(tiny_vit, chest):
    ds, split = chest
    cfg = FinetuneConfig(epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="share"):
        init.finetune_run(tiny_vit, ds, {**split, "val": split["test"]}, cfg, cache=False)  # Tayebi Arasteh et al.'s defect
    with pytest.raises(ValueError, match="validation split is empty"):
        init.finetune_run(tiny_vit, ds, {**split, "val": np.array([], dtype=int)}, cfg, cache=False)
    with pytest.raises(ValueError, match="lacks"):
        init.finetune_run(tiny_vit, ds, {"train": split["train"], "test": split["test"]}, cfg, cache=False)
    with pytest.raises(ValueError, match="subset of the train split"):
        init.finetune_run(tiny_vit, ds, split, cfg, train_indices=split["test"], cache=False)


def test_finetune_run_is_deterministic_cached_and_shaped(tiny_vit, chest):
    ds, split = chest
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, backbone_lr=1e-4, pos_weight=True)
    first = init.finetune_run(tiny_vit, ds, split, cfg, image_size=32, device="cpu")
    assert not first.cached
    assert first.test_proba.shape == (len(split["test"]), len(ds.label_names))
    assert ((first.test_proba >= 0) & (first.test_proba <= 1)).all()
    np.testing.assert_array_equal(first.y_test, ds.label_matrix()[split["test"]])
    assert first.n_train == len(split["train"]) and 0 <= first.best_epoch < 2 and len(first.history) == 2
    assert "validation" in first.selection
    again = init.finetune_run(tiny_vit, ds, split, cfg, image_size=32, device="cpu")
    assert again.cached
    np.testing.assert_allclose(again.test_proba, first.test_proba)
    fresh = init.finetune_run(tiny_vit, ds, split, cfg, image_size=32, device="cpu", cache=False)
    np.testing.assert_allclose(fresh.test_proba, first.test_proba, atol=1e-6)  # same seed, same numbers
    other = init.finetune_run(tiny_vit, ds, split, dataclasses.replace(cfg, epochs=1), image_size=32, device="cpu")
    assert not other.cached  # a different recipe is a different cache entry
    for p in tiny_vit.parameters():  # the caller's backbone is left untouched (a copy is fine-tuned)
        assert p.grad is None


def test_batch_size_avoids_a_single_image_last_batch():
    assert init._batch_without_singleton(17, 8) == 9
    assert init._batch_without_singleton(16, 8) == 8
    assert init._batch_without_singleton(25, 8) == 9  # 25 % 8 == 1, 25 % 9 == 7


def test_ablation_runs_the_vit_arms_on_each_fraction(arms, chest):
    ds, split = chest
    p = _small_profile(**{"eval.init_fractions": (0.5, 1.0)})
    two = {k: arms[k] for k in ("ssl-natural-vit-tiny", "sup-natural-vit-tiny")}
    ablation = init.run_ablation(two, "x", ds, split, p, device="cpu")
    assert sorted(ablation.runs) == [(0.5, n) for n in sorted(two)] + [(1.0, n) for n in sorted(two)]
    half = ablation.runs[(0.5, "ssl-natural-vit-tiny")]
    full = ablation.runs[(1.0, "ssl-natural-vit-tiny")]
    assert half.n_train < full.n_train and half.epochs >= full.epochs  # equal optimiser steps
    table = init.ablation_table(ablation, p)
    assert set(table["fraction"]) == {0.5, 1.0} and table["role"].iloc[0] == "ssl_natural"
    tests = init.ablation_tests(ablation, p)
    assert tests["comparison"].unique().tolist() == ["ssl_natural vs sup_natural"]
    with pytest.raises(ValueError, match="unknown role"):
        init.run_ablation(two, "x", ds, split, p, roles=("ssl",), device="cpu")


# --------------------------------------------------------------------------- tables on synthetic runs


def _synthetic_grid(n: int = 120, seed: int = 0) -> init.InitGrid:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < 0.3).astype(float)
    good = np.clip(y * 0.3 + rng.random((n, 3)) * 0.5, 0, 1)  # informative, not separable
    noise = rng.random((n, 3))  # chance
    labels = ["a", "b", "c"]

    def run(name, proba, dataset):
        return init.InitRun(name, dataset, labels, y, proba, 100, 1, 0, "epoch 0", pd.DataFrame(), 0.1)

    grid = init.InitGrid()
    for dataset in ("VinDr-CXR-like", "MIMIC-CXR-like", "PadChest-like"):
        grid.runs[(dataset, "ssl-natural-vit-tiny")] = run("ssl-natural-vit-tiny", good, dataset)
        grid.runs[(dataset, "sup-natural-vit-tiny")] = run("sup-natural-vit-tiny", noise, dataset)
        grid.runs[(dataset, "sup-cxr-vit-tiny")] = run("sup-cxr-vit-tiny", good.copy(), dataset)
    return grid


def test_metrics_and_paired_tests_separate_an_informative_arm_from_chance():
    p = _small_profile(**{"eval.bootstrap": 200})
    grid = _synthetic_grid()
    metrics = init.metrics_table(grid, p)
    assert metrics["role"].tolist()[:3] == ["ssl_natural", "sup_natural", "sup_medical"]
    ssl = metrics[metrics["role"] == "ssl_natural"]
    sup = metrics[metrics["role"] == "sup_natural"]
    assert ((ssl["auroc"] > 0.75) & (ssl["auroc"] < 1)).all()
    assert (np.abs(sup["auroc"] - 0.5) < 0.15).all()
    assert (ssl["ci_low"] < ssl["auroc_mean"]).all() and (ssl["auroc_mean"] < ssl["ci_high"]).all()
    assert ((ssl["sensitivity"] > 0.6) & (ssl["specificity"] > 0.6)).all()
    tests = init.comparison_table(grid, p)
    macro = tests[tests["label"] == "macro"]
    nat = macro[macro["comparison"] == "ssl_natural vs sup_natural"]
    med = macro[macro["comparison"] == "ssl_natural vs sup_medical"]
    assert (nat["p"] < 0.01).all() and (nat["q"] < 0.05).all() and (nat["delta mean"] > 0.2).all()
    assert np.allclose(med["p"], 0.5) and np.allclose(med["delta mean"], 0.0)  # identical predictions: a coin
    per_label = tests[(tests["label"] != "macro") & (tests["comparison"] == "ssl_natural vs sup_natural")]
    assert len(per_label) == 9 and (per_label["q"] >= per_label["p"]).all()  # BH never lowers a p-value
    labels = init.label_auroc_table(grid)
    assert len(labels) == 27 and labels["auroc"].between(0, 1).all()
    claims = init.claims_table(tests, None, p).set_index("id")
    for dataset in ("VinDr-CXR-like", "MIMIC-CXR-like", "PadChest-like"):
        assert claims.loc[f"1 ({dataset})", "verdict"] == "reproduced"  # informative vs chance
        assert claims.loc[f"2 ({dataset})", "verdict"] == "inconclusive"  # identical predictions
    assert claims.loc[4, "verdict"] == "reproduced" and claims.loc[3, "verdict"] == "not tested here"
    flags = claims_mod.sanity_flags(init.sanity_table(metrics), study="02", table="02_auroc")
    assert flags.empty  # chance-level arms are not flagged: their interval includes 0.5
    below = metrics.assign(auroc=0.3, ci_low=0.2, ci_high=0.4)
    assert len(claims_mod.sanity_flags(init.sanity_table(below), study="02", table="02_auroc")) == len(metrics)


def test_claim_3_is_judged_on_paired_resamples_of_the_ablation():
    p = _small_profile(**{"eval.bootstrap": 300})
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 2)) < 0.4).astype(float)
    informative = np.clip(y * 0.5 + rng.random((n, 2)) * 0.5, 0, 1)
    noise = rng.random((n, 2))

    def run(name, proba, n_train):
        return init.InitRun(name, "MIMIC-CXR-like", ["a", "b"], y, proba, n_train, 1, 0, "e", pd.DataFrame(), 0.1)

    ablation = init.InitAblation("MIMIC-CXR-like")
    # small data: SSL informative, supervised at chance (big gain); full data: both informative (no gain)
    ablation.runs[(0.1, "ssl-natural-vit-tiny")] = run("ssl-natural-vit-tiny", informative, 30)
    ablation.runs[(0.1, "sup-natural-vit-tiny")] = run("sup-natural-vit-tiny", noise, 30)
    ablation.runs[(1.0, "ssl-natural-vit-tiny")] = run("ssl-natural-vit-tiny", informative, 300)
    ablation.runs[(1.0, "sup-natural-vit-tiny")] = run("sup-natural-vit-tiny", informative, 300)
    est, low, high, n_small, n_full = init.ablation_gain_change(ablation, p)
    assert (n_small, n_full) == (30, 300) and est > 0.3 and 0 < low <= est <= high <= 2
    swapped = init.InitAblation("x", runs={(1.0 - f if f == 0.1 else 0.1, k): v for (f, k), v in ablation.runs.items()})
    est2, low2, high2, *_ = init.ablation_gain_change(swapped, p)
    assert est2 == pytest.approx(-est) and high2 < 0


def test_vs_paper_sets_the_vindr_figures_beside_ours():
    metrics = init.metrics_table(_synthetic_grid(), _small_profile())
    table = init.vs_paper(metrics, "smoke")
    published = dict(zip(table["published_model"], table["published"]))
    assert published["DINOv2 ViT-B/14"] == pytest.approx(0.8892)
    assert published["ViT-B/16 IN-21k"] == pytest.approx(0.8638)
    assert published["gain: SSL minus IN-21k"] == pytest.approx(0.0254)
    assert np.isnan(published["ViT-B/16 MIMIC-CXR supervised"])
    ssl = table[table["published_model"] == "DINOv2 ViT-B/14"].iloc[0]
    assert ssl["delta"] == pytest.approx(ssl["ours"] - 0.8892)
    assert (table["dataset"] == "VinDr-CXR-like").all() and (table["profile"] == "smoke").all()
    with pytest.raises(ValueError, match="VinDr"):
        init.vs_paper(metrics[metrics["dataset"] != "VinDr-CXR-like"], "smoke")


def test_figures_have_titles_and_labels():
    p = _small_profile()
    grid = _synthetic_grid()
    metrics = init.metrics_table(grid, p)
    fig = init.plot_auroc_by_dataset(metrics, "AUROC")
    assert fig.axes[0].get_title() == "AUROC" and fig.axes[0].get_ylabel()
    fig = init.plot_label_heatmap(init.label_auroc_table(grid), "labels")
    assert fig.axes[0].get_ylabel() == "label"
    table = metrics.assign(fraction=1.0)
    fig = init.plot_ablation(pd.concat([table, table.assign(fraction=0.5, n_train=50)]), "size")
    assert fig.axes[0].get_xscale() == "log"
    import matplotlib.pyplot as plt

    plt.close("all")

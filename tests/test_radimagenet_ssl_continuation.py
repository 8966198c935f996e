"""Study 3 runner: grouped folds, Lange & Shekel 2024's head and augmentation, best-epoch restore, caching, tables."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medlib.config import get_profile, override
from medlib.data import ImageSet
from medlib.studies import radimagenet_ssl_continuation as cv
from medlib.eval.finetune import Classifier, FinetuneConfig, evaluate_loss, make_loss, train_classifier


def _blobs(n=60, seed=0, flip=False, size=16, per_patient=2):
    """Binary set: a bright square = positive (or negative with ``flip``); ``per_patient`` images per patient."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.integers(0, 2, n // per_patient), per_patient)
    images = rng.integers(0, 80, (n, size, size)).astype(np.uint8)
    images[y == 1, 4:12, 4:12] = 230
    labels = (1 - y if flip else y)[:, None].astype(np.float32)
    return ImageSet(images=images, labels=labels, label_names=["positive"], task="binary",
                    patient_ids=np.repeat(np.arange(n // per_patient), per_patient), name=f"blobs{seed}{flip}")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255).unsqueeze(1)


def _tiny_classifier():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return Classifier(backbone, nn.Linear(16, 1))


# ----------------------------------------------------------------- best epoch really restored (Lange & Shekel 2024's bug)


def test_val_loss_selection_restores_an_earlier_epoch_not_the_last():
    # val labels are the opposite of train labels: the more the model learns, the worse its val loss,
    # so the best epoch is early and the last epoch is the worst - a model left at the last epoch
    # (Lange & Shekel 2024's public code) fails the last two assertions.
    train, val = _blobs(64, 0), _blobs(32, 1, flip=True)
    cfg = FinetuneConfig(epochs=5, batch_size=8, lr=3e-2, select_on="val_loss", warmup_fraction=0.0)
    res = train_classifier(_tiny_classifier(), train, val, cfg, transform_train=_to_float, transform_eval=_to_float,
                           device="cpu", progress=False)
    losses = res.history["val_loss"].to_numpy()
    assert res.best_epoch == int(np.argmin(losses))
    assert res.best_epoch < cfg.epochs - 1 and losses[-1] > losses.min() + 1e-3
    restored, _ = evaluate_loss(res.model, val, _to_float, make_loss(val), 8, "cpu")
    assert restored == pytest.approx(losses.min(), rel=1e-5)
    assert abs(restored - losses[-1]) > 1e-3


# ----------------------------------------------------------------- folds


def test_folds_partition_by_patient_and_are_reproducible():
    ds = _blobs(80, 3)
    folds = cv.make_folds(ds, 4, seed=1)
    assert len(folds) == 4
    tests = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(tests), np.arange(len(ds)))  # every image tested exactly once
    for f in folds:
        parts = [set(ds.patient_ids[getattr(f, k)]) for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(f.train) + len(f.val) + len(f.test) == len(ds)
        assert 0.1 < len(f.val) / (len(f.train) + len(f.val)) < 0.35
    again = cv.make_folds(ds, 4, seed=1)
    assert all(np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test) for a, b in zip(folds, again))


def test_fold_errors():
    with pytest.raises(ValueError, match="val_share"):
        cv.make_folds(_blobs(40), 2, val_share=0.9)
    with pytest.raises(ValueError, match="k must be"):
        cv.make_folds(_blobs(40), 1)
    with pytest.raises(ValueError, match="training patients"):
        cv.make_folds(_blobs(12, per_patient=2), 3)


# ----------------------------------------------------------------- grid, augmentation, data


def test_grid_settings_follow_the_profile():
    paper = cv.grid_settings("paper")
    assert [(s.lr, s.batch_size) for s in paper] == [(lr, b) for lr in (1e-5, 1e-6) for b in (8, 16, 32)]
    assert len(cv.grid_settings("smoke")) == 1
    with pytest.raises(ValueError, match="empty"):
        cv.grid_settings(override(get_profile("smoke"), **{"eval.cv_lrs": ()}))


def test_seed001_augment_shapes_randomness_and_bad_input():
    images = torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8)
    aug = cv.Seed001Augment(32)
    a = aug(images, generator=torch.Generator().manual_seed(0))
    b = aug(images, generator=torch.Generator().manual_seed(0))
    c = aug(images, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert aug(torch.randint(0, 255, (2, 40, 40, 3), dtype=torch.uint8)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float())
    with pytest.raises(ValueError, match="translate"):
        cv.Seed001Augment(32, translate=0.7)


def test_medical_pretraining_set_never_holds_an_evaluation_label():
    ds = cv.medical_pretraining_set(override(get_profile("smoke"), **{"eval.cv_medical_images": 12}))
    assert ds.task == "multiclass" and len(ds) == 5 * 12
    assert {"us:breast", "us:thyroid", "mr:knee", "xr:chest"} <= set(ds.label_names)
    assert not any(w in n for n in ds.label_names for w in ("malignant", "tear"))
    assert set(np.unique(ds.labels)) == set(range(len(ds.label_names)))


def test_cv_datasets_are_binary_and_held_out_from_the_continuation():
    p = override(get_profile("smoke"), **{"eval.cv_images": 12})
    data = cv.load_cv_datasets(p, ["thyroid_us", "acl_mri"])
    assert all(d.task == "binary" and len(d) == 12 for d in data.values())
    assert data["acl_mri"].label_names == ["acl_tear"]
    from medlib.data import phantoms

    seen = phantoms.make_dataset("thyroid_us", 12, size=p.data.phantom_size, seed=p.seed)  # what SSL trains on
    assert not np.array_equal(np.asarray(seen.images), np.asarray(data["thyroid_us"].images))
    with pytest.raises(ValueError, match="unknown"):
        cv.load_cv_datasets(p, ["lung"])
    with pytest.raises(ValueError, match="cannot fill"):
        cv.load_cv_datasets(override(p, **{"eval.cv_images": 3}))


# ----------------------------------------------------------------- one fold, cached


def _fold_case(epochs: int):
    """A smoke profile with ``epochs`` fine-tuning epochs, 40 blob images, their first fold, a ViT and a setting."""
    from medlib.models.backbones import create_backbone

    ds = _blobs(40, 5, size=32)
    return (override(get_profile("smoke"), **{"eval.cv_epochs": epochs}), ds, cv.make_folds(ds, 2, seed=0)[0],
            create_backbone("random-vit-smoke", image_size=32), cv.Setting(1e-3, 8))


def test_run_fold_restores_best_epoch_caches_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    p, ds, fold, bb, setting = _fold_case(epochs=2)
    first = cv.run_fold(bb, ds, fold, setting, p, device="cpu")
    assert not first["cached"]
    assert first["restored_val_loss"] == pytest.approx(first["best_val_loss"], rel=1e-3)
    assert 0.0 <= first["test_auroc"] <= 1.0 and first["n_test"] == len(fold.test)
    second = cv.run_fold(bb, ds, fold, setting, p, device="cpu")
    assert second["cached"] and second["test_auroc"] == first["test_auroc"]
    idx, probs = cv.load_fold_predictions(bb, ds, fold, setting, p)
    assert np.array_equal(idx, fold.test) and probs.shape == (len(fold.test),)
    assert ((probs >= 0) & (probs <= 1)).all()
    with pytest.raises(FileNotFoundError, match="run_fold first"):
        cv.load_fold_predictions(bb, ds, fold, cv.Setting(1e-2, 8), p)
    multi = ImageSet(images=ds.images, labels=ds.labels.astype(int)[:, 0], label_names=["a", "b"], task="multiclass",
                     patient_ids=ds.patient_ids)
    with pytest.raises(ValueError, match="binary"):
        cv.run_fold(bb, multi, fold, setting, p, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "plausible values", "killed before the predictions"])
def test_run_fold_reruns_a_fold_whose_cached_predictions_are_damaged(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    p, ds, fold, bb, setting = _fold_case(epochs=1)
    first = cv.run_fold(bb, ds, fold, setting, p, device="cpu")
    probs_file = cv.fold_cache_dir(bb, ds, fold, setting, p) / "test_probs.npy"
    if damage == "truncated":
        probs_file.write_bytes(probs_file.read_bytes()[:-7])
    elif damage == "plausible values":  # same size and header, other numbers: only the checksum sees it
        raw = bytearray(probs_file.read_bytes())
        raw[-4:] = np.float32(0.5).tobytes()
        probs_file.write_bytes(bytes(raw))
    else:
        probs_file.unlink()
    with pytest.warns(UserWarning):
        again = cv.run_fold(bb, ds, fold, setting, p, device="cpu")
    assert not again["cached"] and again["test_auroc"] == first["test_auroc"]  # run again, same seed, same result
    idx, probs = cv.load_fold_predictions(bb, ds, fold, setting, p)
    assert np.array_equal(idx, fold.test) and probs.shape == (len(fold.test),)
    assert cv.run_fold(bb, ds, fold, setting, p, device="cpu")["cached"]


# ----------------------------------------------------------------- tables


def _results():
    rows = []
    for task in ("thyroid_us", "acl_mri"):
        for role, base in ((cv.IN, 0.6), (cv.NAT, 0.7)):
            grid = (("lr 0.001, batch 16", 0.1, -0.05), ("lr 0.0001, batch 16", 0.0, 0.1))
            for setting, val_shift, test_shift in grid:
                for fold in range(3):
                    rows.append({"task": task, "role": role, "backbone": role.lower(), "setting": setting,
                                 "fold": fold, "val_auroc": base + val_shift + 0.01 * fold,
                                 "test_auroc": base + test_shift + 0.02 * fold})
    return pd.DataFrame(rows)


def test_setting_is_chosen_on_validation_not_test():
    chosen = cv.select_settings(_results())
    picked = chosen[chosen["chosen"]]
    assert set(picked["setting"]) == {"lr 0.001, batch 16"}  # best on val, although worse on test
    assert len(picked) == 2 * 2 * 3


def test_table1_mean_std_and_paper_columns():
    t1 = cv.table1(_results())
    row = t1[(t1["task"] == "thyroid_us") & (t1["role"] == cv.IN)].iloc[0]
    assert row["mean"] == pytest.approx(0.6 - 0.05 + 0.02)
    assert row["std"] == pytest.approx(np.std([0.0, 0.02, 0.04], ddof=1))
    assert row["folds"] == 3 and row["dataset"] == "Thyroid US"
    vs = cv.table1_vs_paper(t1, "smoke")
    pub = vs[(vs["dataset"] == "Thyroid US") & (vs["role"] == cv.IN)].iloc[0]
    assert (pub["published"], pub["published_std"]) == (0.76, 0.14)
    assert pub["delta"] == pytest.approx(row["mean"] - 0.76)
    wide = cv.format_table1(vs)
    assert wide.loc[wide["dataset"] == "Thyroid US", "IN (ResNet-50) (published)"].iloc[0] == "0.760 +- 0.140"
    assert "SSL-natural (ours)" in wide.columns and "DINOv2 ViT-S/14 (published)" in wide.columns
    assert not any("DINOv2" in c for c in wide.columns if c.endswith("(ours)"))
    grid = cv.grid_table(_results())
    assert {"thyroid_us", "acl_mri", "mean_test_auroc", "mean_val_auroc"} <= set(grid.columns)
    assert len(grid) == 4


def test_published_table1_matches_paper_results():
    pub = cv.PUBLISHED_TABLE1.set_index(["dataset", "role"])
    assert pub.loc[("ACL MRI", cv.CONT), "mean"] == 0.966
    assert pub.loc[("Meniscus MRI", cv.MED), "std"] == 0.02
    assert np.isnan(pub.loc[("Breast US", cv.CONT), "mean"])
    assert len(pub) == 16


def test_select_settings_needs_columns():
    with pytest.raises(ValueError, match="lack columns"):
        cv.select_settings(pd.DataFrame({"task": ["a"]}))


def test_continued_name_and_continuation_config():
    assert cv.continued_name("us", "tiny") == "ssl-us-vit-tiny"
    assert cv.continued_name("knee", "gpu") == "ssl-knee-vit-s14"
    with pytest.raises(ValueError, match="domain"):
        cv.continued_name("brain", "tiny")
    tiny = override(get_profile("tiny"), **{"eval.cv_ssl_fallback_steps": 0})
    cfg, info = cv.continuation_config("us", tiny)
    assert cfg.vertical_flip and cfg.steps == info["steps"] == round(tiny.ssl.steps * 0.34) and not info["capped"]
    assert cfg.n_local == tiny.ssl.n_local and cfg.centering == "sinkhorn_knopp"
    assert cfg.warmup_steps == tiny.ssl.warmup_steps * cfg.steps // tiny.ssl.steps
    capped, info = cv.continuation_config("knee", override(get_profile("tiny"), **{"eval.cv_ssl_fallback_steps": 5}))
    assert capped.steps == 5 and info["capped"] and capped.warmup_steps >= 1
    paper, info = cv.continuation_config("knee", "paper")  # Lange & Shekel 2024: 100 epochs x 100 iterations, 30 warm-up epochs
    assert paper.steps == 10_000 and paper.warmup_steps == 1_000 and paper.teacher_temp_warmup_steps == 3_000
    assert paper.base_lr == 2e-4 and paper.n_local == 8 and paper.vertical_flip and not info["capped"]
    with pytest.raises(ValueError, match="cv_ssl_steps_fraction"):
        cv.continuation_config("us", override(get_profile("tiny"), **{"eval.cv_ssl_steps_fraction": 1.5}))


# ----------------------------------------------------------------- continued SSL: fallback run, then found weights


def test_continuation_fallback_runs_the_recipe_and_weights_are_then_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path / "cache"))
    from medlib.engine import save_weights
    from medlib.models.backbones import create_backbone

    p = get_profile("smoke")
    run = cv.continue_ssl("us", p, device="cpu", progress=False)
    assert run.source == "continued here" and "MISSING" in run.message and run.backbone is not None
    cfg, info = cv.continuation_config("us", p)
    assert len(run.history) == info["steps"] == cfg.steps
    assert {"loss", "dino_loss", "ibot_loss", "koleo_loss"} <= set(run.history.columns)
    assert np.isfinite(run.history["loss"]).all()
    start = create_backbone(p.eval.cv_ssl_vit, image_size=p.backbone.image_size)
    moved = [not torch.allclose(a, b) for a, b in zip(start.state_dict().values(), run.backbone.state_dict().values())]
    assert any(moved)  # the continuation changed the weights
    long = cv.ssl_history_table({"us": run})
    assert set(long["term"]) == {"loss", "dino_loss", "ibot_loss", "koleo_loss"}
    # weights put where create_backbone looks are used as they are, with no run
    weights_dir = tmp_path / "weights"
    save_weights(run.backbone.model, weights_dir / f"{run.name}.safetensors")
    monkeypatch.setenv("MEDLIB_WEIGHTS_DIR", str(weights_dir))
    found = cv.continued_backbone("us", p, device="cpu", progress=False)
    assert found.source == "weights file" and str(weights_dir) in found.message
    assert torch.allclose(found.backbone(torch.zeros(1, 3, 32, 32)), run.backbone(torch.zeros(1, 3, 32, 32)), atol=1e-2)


def test_medical_cnn_is_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    from medlib.models.backbones import create_backbone

    p = override(get_profile("smoke"), **{"eval.cv_medical_images": 12})
    first, card = cv.build_medical_cnn(p, device="cpu", progress=False)
    assert first.kind == "cnn" and first.name == cv.MEDICAL_CNN_NAME and not first.is_dinov2
    assert card["images"]["train"] > 0 and 0.0 <= card["held_out_test"]["accuracy"] <= 1.0
    assert not any("malignant" in c or "tear" in c for c in card["classes"])
    imagenet = create_backbone("efficientnet-lite0.in1k", image_size=p.backbone.image_size)
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(first(x), imagenet(x))  # fine-tuned away from the ImageNet weights
    again, _ = cv.build_medical_cnn(p, device="cpu", progress=False)
    assert again.weights_path == first.weights_path and torch.allclose(again(x), first(x))
    torch.manual_seed(123)  # another process history: the rebuild must not depend on it (torch seeds at random)
    rebuilt, _ = cv.build_medical_cnn(p, device="cpu", progress=False, force=True)
    assert torch.equal(rebuilt(x), first(x))


def test_card_history_and_health_are_read_from_a_model_card():
    card = {"training": {"history_sampled": [{"step": 0, "loss": 9.0, "dino_loss": 6.0, "lr": 0.1},
                                             {"step": 10, "loss": 8.0, "dino_loss": 5.5, "lr": 0.2}]},
            "health": {"passed": True, "tasks": {"knee_acl": {"trained": {"auroc": 0.8, "accuracy": 0.7},
                                                              "random_init": {"auroc": 0.75}}}}}
    c = cv.ContinuedSSL("knee", "ssl-knee-vit-tiny", None, "committed", "", cv._card_history(card), card)
    long = cv.ssl_history_table({"knee": c})
    assert set(long["term"]) == {"loss", "dino_loss"} and len(long) == 4  # lr is not a loss term
    health = cv.card_health_table({"knee": c})
    assert health.set_index("model")["auroc"].to_dict() == {"trained": 0.8, "random_init": 0.75}
    empty = cv.ContinuedSSL("us", "ssl-us-vit-tiny", None, "missing", "")
    assert cv.ssl_history_table({"us": empty}).empty and cv.card_health_table({"us": empty}).empty


def test_built_weights_in_the_cache_are_used_with_their_card_curves(tmp_path, monkeypatch):
    import json

    from medlib.engine import save_weights
    from medlib.models.backbones import create_backbone

    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    monkeypatch.delenv("MEDLIB_WEIGHTS_DIR", raising=False)
    folder = tmp_path / "backbones"
    # the smoke architecture is never committed, so its weights can only come from the cache
    smoke_arch = override(get_profile("smoke"), **{"eval.cv_continued_suffix": "vit-smoke"})
    save_weights(create_backbone("random-vit-smoke").model, folder / "ssl-knee-vit-smoke.safetensors")
    card = {"training": {"steps": 3, "history_sampled": {"step": [0, 1, 2], "loss": [9.0, 8.5, 8.2],
                                                         "koleo_loss": [0.1, 0.0, -0.1]}}}
    (folder / "ssl-knee-vit-smoke.json").write_text(json.dumps(card))
    found = cv.continued_backbone("knee", smoke_arch, device="cpu", progress=False, fallback=False)
    assert found.source == "cache" and "3 SSL steps" in found.message
    assert found.backbone is not None and found.backbone.image_size == get_profile("smoke").backbone.image_size
    assert list(found.history["loss"]) == [9.0, 8.5, 8.2]
    s14 = override(get_profile("smoke"), **{"eval.cv_continued_suffix": "vit-s14"})  # never committed
    missing = cv.continued_backbone("us", s14, device="cpu", progress=False, fallback=False)
    assert missing.backbone is None and missing.source == "missing"

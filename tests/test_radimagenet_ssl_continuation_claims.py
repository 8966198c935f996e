"""Study 3: arm names from the loaded backbone, knee labels vs the generator, a planted-signal grid, claims, flags."""

import numpy as np
import pandas as pd
import pytest

from medlib.config import get_profile, override
from medlib.data import ImageSet, phantoms
from medlib.eval.claims import check_sanity, claims_frame, findings_markdown, interval_violations
from medlib.studies import radimagenet_ssl_continuation as cv


# ----------------------------------------------------------------- names


def test_arm_names_come_from_the_loaded_backbone_not_a_constant():
    assert not any("DINOv2" in r or "RIN" == r for r in cv.ROLES)
    tiny = get_profile("tiny").eval
    assert cv.arm_label(cv.NAT, tiny.cv_ssl_vit) == "SSL-natural"
    assert cv.arm_label(cv.CONT, tiny.cv_ssl_vit) == "SSL-natural + domain SSL"
    assert cv.arm_label(cv.MED, cv.MEDICAL_CNN_NAME) == cv.MED
    paper = get_profile("paper").eval
    assert cv.arm_label(cv.NAT, paper.cv_ssl_vit) == "DINOv2"
    assert cv.arm_label(cv.CONT, paper.cv_ssl_vit) == "DINOv2 + domain SSL"
    assert cv.arm_label(cv.MED, paper.cv_medical_cnn) == "RIN"
    assert cv.arm_label(cv.NAT, "dinov2-lookalike") == cv.NAT  # not in the registry, no dinov2 prefix


# ----------------------------------------------------------------- knee labels (the meniscus task)


def _mean_in_posterior_meniscus(ds: ImageSet) -> np.ndarray:
    images, masks = np.asarray(ds.images, dtype=float), np.asarray(ds.masks)
    half = images.shape[-1] // 2
    out = []
    for img, m in zip(images, masks):
        region = (m == 6)
        region[:, :half] = False  # posterior horn: the image's right half
        out.append(img[region].mean())
    return np.asarray(out)


def test_meniscus_labels_are_the_generators_hidden_state_and_an_oracle_reads_them_either_way():
    from sklearn.metrics import roc_auc_score

    from medlib.data.phantoms import knee

    ds = phantoms.make_dataset("knee", 24, size=64, seed=7, target="meniscal_tear", cache=False)
    y = ds.label_matrix()[:, 0]
    assert 0 < y.sum() < len(y)
    changed = []
    for i in range(len(ds)):
        same = knee.generate(i, size=64, seed=7, findings={"meniscal_tear": int(y[i])})
        other = knee.generate(i, size=64, seed=7, findings={"meniscal_tear": 1 - int(y[i])})
        assert np.array_equal(same.image, ds.images[i])  # the label is what the generator drew
        diff = np.abs(other.image.astype(int) - same.image.astype(int))
        assert diff.max() > 40  # the tear is painted ...
        changed.append(int((diff > 10).sum()))
    # ... but as a line under one pixel wide: it changes well under 1 % of the pixels at the 64 px input
    assert max(changed) < 0.01 * 64 * 64
    oracle = _mean_in_posterior_meniscus(ds)
    assert roc_auc_score(y, oracle) > 0.95
    assert roc_auc_score(1 - y, oracle) < 0.05


# ----------------------------------------------------------------- the grid on a planted signal


def _planted(n=48, seed=0, flip=False, size=32):
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.permutation(np.arange(n // 2) % 2), 2)  # balanced, two images per patient
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    images[y == 1, 8:24, 8:24] = 240
    labels = (1 - y if flip else y)[:, None].astype(np.float32)
    return ImageSet(images=images, labels=labels, label_names=["planted"], task="binary",
                    patient_ids=np.repeat(np.arange(n // 2), 2), name=f"planted{seed}{flip}")


@pytest.mark.parametrize("flip", [False, True])
def test_cross_validate_scores_a_planted_signal_whichever_class_is_positive(tmp_path, monkeypatch, flip):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    from medlib.models.backbones import create_backbone

    p = override(get_profile("smoke"), **{"eval.cv_epochs": 4})
    ds = _planted(flip=flip)
    folds = {"thyroid_us": cv.make_folds(ds, 2, seed=0)}
    bb = create_backbone("random-vit-smoke", image_size=32)
    models = cv.StudyModels({cv.NAT: {"us": bb}}, pd.DataFrame(), {cv.NAT: "tiny ViT"})
    res = cv.cross_validate(models, {"thyroid_us": ds}, folds, p, [cv.Setting(1e-3, 8)], roles=[cv.NAT],
                            device="cpu", progress=False)
    assert (res["arm"] == "tiny ViT").all()
    assert res["test_auroc"].min() > 0.9, res["test_auroc"].tolist()
    preds = cv.chosen_predictions(res, models, {"thyroid_us": ds}, folds, p)
    boot = cv.bootstrap_fold_auroc(preds, 50)
    table = cv.arm_auroc_table(boot)
    assert table["auroc"].iloc[0] == pytest.approx(res["test_auroc"].mean())
    assert table["ci_low"].iloc[0] > 0.5


# ----------------------------------------------------------------- bootstrap, claims, flags


def _preds(effects: dict, n=40, folds=4, seed=0, tasks=tuple(cv.CV_TASKS)):
    """Predictions with a known separation per (task, role): score = label * effect + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in tasks:
        y = np.tile([0, 1], n // 2)
        fold = (np.arange(n) // 2) % folds
        noise = rng.standard_normal((len(effects), n))
        for k, (role, eff) in enumerate(effects.items()):
            e = eff[t] if isinstance(eff, dict) else eff
            rows.append(pd.DataFrame({"task": t, "role": role, "arm": role, "fold": fold, "index": np.arange(n),
                                      "label": y, "prob": y * e + noise[k]}))
    return pd.concat(rows, ignore_index=True)


def test_bootstrap_auroc_matches_sklearn_and_stays_in_range():
    from sklearn.metrics import roc_auc_score

    preds = _preds({"a": 1.0, "b": -3.0})
    boot = cv.bootstrap_fold_auroc(preds, 200, seed=1)
    g = preds[(preds["task"] == "thyroid_us") & (preds["role"] == "a")]
    per_fold = [roc_auc_score(f["label"], f["prob"]) for _, f in g.groupby("fold")]
    assert boot["thyroid_us"].mean("a")[0] == pytest.approx(np.mean(per_fold))
    table = cv.arm_auroc_table(boot)
    assert ((table["ci_low"] >= 0) & (table["ci_high"] <= 1)).all()
    assert (table["ci_low"] <= table["auroc"]).all() and (table["auroc"] <= table["ci_high"]).all()
    assert interval_violations(table, metric="auroc") == []
    b = table[table["role"] == "b"]
    assert (b["ci_high"] < 0.5).all()  # a strongly inverted score is below chance, and says so
    with pytest.raises(ValueError, match="n_boot"):
        cv.bootstrap_fold_auroc(preds, 5)


def _paper_like():
    """Effects shaped like the paper: continued > natural, medical > IN everywhere, natural < medical but on breast."""
    return {cv.IN: 1.0, cv.MED: 2.0,
            cv.NAT: {"thyroid_us": 1.2, "breast_us": 3.0, "acl_mri": 1.2, "meniscus_mri": 1.2},
            cv.CONT: {"thyroid_us": 1.8, "breast_us": 1.8, "acl_mri": 1.8, "meniscus_mri": 1.8}}


def test_claims_follow_the_numbers():
    boot = cv.bootstrap_fold_auroc(_preds(_paper_like(), n=400), 200)
    claims = claims_frame(cv.study_claims(boot))
    assert list(claims["id"]) == [1, 2, 3, 4, 5]
    v = dict(zip(claims["id"], claims["verdict"]))
    assert v[1] == "reproduced" and v[2] == "reproduced" and v[3] == "reproduced"
    assert (claims["ci_low"] <= claims["ours"]).all() and (claims["ours"] <= claims["ci_high"]).all()
    assert all(claims["interval"].str.contains("bootstrap"))
    # reverse the continuation: claim 1 is then not reproduced, and the generated sentence says "lower than"
    worse = _paper_like()
    worse[cv.CONT] = 0.3
    boot = cv.bootstrap_fold_auroc(_preds(worse, n=400), 200)
    claims = claims_frame(cv.study_claims(boot))
    assert claims.loc[claims["id"] == 1, "verdict"].item() == "not reproduced"
    assert claims.loc[claims["id"] == 5, "verdict"].item() == "not reproduced"  # far below the medical CNN
    sentence = cv.continuation_sentence(cv.continuation_effects(boot))
    assert "lower than its parent" in sentence and "Thyroid US" in sentence and "interval excludes 0" in sentence
    assert "higher than" not in sentence
    assert "not reproduced" in findings_markdown(claims, None, "tiny")


def test_claims_not_tested_without_the_continued_arm():
    effects = _paper_like()
    effects.pop(cv.CONT)
    claims = claims_frame(cv.study_claims(cv.bootstrap_fold_auroc(_preds(effects), 50)))
    v = dict(zip(claims["id"], claims["verdict"]))
    assert v[1] == "not tested here" and v[5] == "not tested here" and v[2] != "not tested here"


def test_spread_claim_uses_fold_std():
    rng = np.random.default_rng(0)
    # CNNs: folds differ a lot (effect alternates per fold); ViTs: the same effect in every fold
    rows = []
    for t in cv.CV_TASKS:
        y = np.tile([0, 1], 100)
        fold = (np.arange(200) // 2) % 4
        for role, eff in ((cv.IN, np.where(fold % 2 == 0, 0.2, 3.0)), (cv.MED, np.where(fold % 2 == 0, 0.3, 3.0)),
                          (cv.NAT, np.full(200, 1.5)), (cv.CONT, np.full(200, 1.5))):
            rows.append(pd.DataFrame({"task": t, "role": role, "fold": fold, "index": np.arange(200), "label": y,
                                      "prob": y * eff + rng.standard_normal(200)}))
    claims = claims_frame(cv.study_claims(cv.bootstrap_fold_auroc(pd.concat(rows), 200)))
    assert claims.loc[claims["id"] == 4, "verdict"].item() == "reproduced"


def test_sanity_flags_below_chance_and_below_random_init_with_numeric_explanations():
    boot = cv.bootstrap_fold_auroc(_preds({cv.NAT: -3.0, cv.IN: 2.0}, n=80), 100)
    arms = cv.arm_auroc_table(boot)
    # pixels at chance: the below-chance arm is not explained, and a tiny run fails on it
    pixels = cv.arm_auroc_table(cv.bootstrap_fold_auroc(_preds({"pixels": 0.0}, n=80, seed=3), 100))
    knn = cv.arm_auroc_table(cv.bootstrap_fold_auroc(_preds({"random_init": 3.0, "before": 0.5, "after": 0.5,
                                                             "pixels": 0.5}, n=80, seed=4), 100))
    flags = cv.study_sanity_flags(arms, knn, pixels)
    ft = flags[flags["table"] == "03_table1"]
    assert set(ft["model"]) == {cv.NAT} and len(ft) == len(cv.CV_TASKS) and not ft["explained"].any()
    kf = flags[flags["table"] == "03_knn_health"]
    assert set(kf["model"]) == {"before", "after"} and not kf["explained"].any()  # pixels below random init
    with pytest.raises(AssertionError, match="unexplained"):
        check_sanity(flags, "tiny")
    # the same folds defeat a pixel model, and pixels beat random init: both flags carry an explanation
    pixels = cv.arm_auroc_table(cv.bootstrap_fold_auroc(_preds({"pixels": -3.0}, n=80, seed=3), 100))
    knn = cv.arm_auroc_table(cv.bootstrap_fold_auroc(_preds({"random_init": 3.0, "before": 0.5, "after": 0.5,
                                                             "pixels": 4.0}, n=80, seed=4), 100))
    flags = cv.study_sanity_flags(arms, knn, pixels)
    assert len(flags) and flags["explained"].all()
    assert check_sanity(flags, "tiny") is flags
    assert flags["explanation"].str.contains("pixels").all()


def test_knn_health_predictions_have_every_source_and_no_network_references_read_a_planted_signal():
    from medlib.models.backbones import create_backbone

    p = get_profile("smoke")
    ds = _planted(n=40)
    folds = {"thyroid_us": cv.make_folds(ds, 2, seed=0)}
    bb = create_backbone("random-vit-smoke", image_size=32)
    models = cv.StudyModels({cv.NAT: {"us": bb}}, pd.DataFrame(), {cv.NAT: "natural", cv.CONT: "continued"})
    preds = cv.knn_health_predictions(models, {"thyroid_us": ds}, folds, p, random_init=bb)
    assert set(preds["role"]) == {"random_init", "before", "pixels", "pixel_stats"}  # no continued ViT given
    assert set(preds.loc[preds["role"] == "before", "arm"]) == {"natural"}
    for fold in folds["thyroid_us"]:
        got = np.sort(preds[(preds["role"] == "pixels") & (preds["fold"] == fold.index)]["index"].to_numpy())
        assert np.array_equal(got, fold.test)
    knn = cv.arm_auroc_table(cv.bootstrap_fold_auroc(preds, 50))
    wide = cv.knn_health_wide(knn)
    assert wide.loc[0, "pixels"] > 0.9 and wide.loc[0, "pixel_stats"] > 0.9
    assert np.isnan(wide.loc[0, "gain"])

"""The health check's references and shift: pixel-statistics features, acquisition shift, mean gain."""

import numpy as np
import pytest
import torch

from medlib.models.health import (acquisition_shift, mean_auroc_gain, pixel_statistics_features,
                                 pixel_statistics_scores)


def test_pixel_statistics_of_constant_and_split_images_are_known():
    flat = np.full((1, 8, 8), 255, dtype=np.uint8)
    feats = pixel_statistics_features(flat, bins=4, grid=2)
    assert feats.shape == (1, 4 + 4)
    np.testing.assert_allclose(feats[0, :4], [0, 0, 0, 1])  # every pixel in the top bin
    np.testing.assert_allclose(feats[0, 4:], [1, 1, 1, 1])
    half = np.zeros((1, 8, 8), dtype=np.uint8)
    half[:, :, 4:] = 255  # left half black, right half white
    feats = pixel_statistics_features(half, bins=2, grid=2)
    np.testing.assert_allclose(feats[0], [0.5, 0.5, 0.0, 1.0, 0.0, 1.0])


def test_pixel_statistics_accept_rgb_and_odd_sizes():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 7, 9, 3), dtype=np.uint8)
    feats = pixel_statistics_features(rgb, bins=8, grid=3)
    assert feats.shape == (3, 8 + 9) and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[:, :8].sum(1), 1.0, rtol=1e-6)
    grey = rgb.mean(-1).astype(np.float32) / 255
    np.testing.assert_allclose(feats[:, 8:].mean(1), grey.mean((1, 2)), rtol=0.02)  # cells of near-equal size


def test_pixel_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pixel_statistics_features(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_statistics_features(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="grid"):
        pixel_statistics_features(np.zeros((2, 4, 4), dtype=np.uint8), grid=5)


def test_pixel_statistics_solve_an_intensity_coded_task_but_not_a_texture_task():
    """What the reference is for: brightness-coded labels are trivial for it, orientation-coded ones are not."""
    rng = np.random.default_rng(1)
    n, size = 200, 16
    labels = rng.integers(0, 2, n)
    bright = np.clip(rng.normal(100 + 60 * labels[:, None, None], 20, (n, size, size)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    shapes = np.zeros((n, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):  # same histogram and cell means: horizontal or vertical stripes
        period, phase = rng.choice([2, 4]), rng.integers(4)
        shapes[i] = np.where(((yy, xx)[label] + phase) % period < period // 2, 220, 30)
    scores = {name: pixel_statistics_scores(images, labels, 2)["auroc"]
              for name, images in (("intensity", bright), ("texture", shapes))}
    assert scores["intensity"] > 0.95 and scores["texture"] < 0.65, scores


def test_acquisition_shift_is_deterministic_and_keeps_dtype_and_shape():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(5, 9, 7), dtype=np.uint8)
    a, b = acquisition_shift(images, seed=3), acquisition_shift(images, seed=3)
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, acquisition_shift(images, seed=4))
    rgb = rng.integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    assert acquisition_shift(rgb, seed=0).shape == rgb.shape


def test_acquisition_shift_known_values():
    images = np.array([[[0, 64, 128, 255]]], dtype=np.uint8)  # (1, 1, 4)
    same = acquisition_shift(images, 0, gamma=(1.0, 1.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0))
    np.testing.assert_array_equal(same, images)  # no shift: the identity
    squared = acquisition_shift(images, 0, gamma=(2.0, 2.0), contrast=(1.0, 1.0), brightness=(0.0, 0.0))
    np.testing.assert_array_equal(squared[0, 0], np.round((images[0, 0] / 255.0) ** 2 * 255).astype(np.uint8))
    flat = acquisition_shift(images, 0, gamma=(1.0, 1.0), contrast=(0.0, 0.0), brightness=(0.1, 0.1))
    expected = round((images.astype(np.float64) / 255).mean() * 255 + 0.1 * 255)
    assert np.all(np.abs(flat.astype(int) - expected) <= 1)  # zero contrast: every pixel at mean + brightness


def test_acquisition_shift_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        acquisition_shift(np.zeros((2, 4, 4), dtype=np.float32), 0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        acquisition_shift(np.zeros((4, 4), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match="gamma"):
        acquisition_shift(np.zeros((2, 4, 4), dtype=np.uint8), 0, gamma=(0.0, 1.0))


def test_acquisition_shift_takes_intensity_coded_labels_from_pixel_statistics():
    """Why the criterion is scored under the shift: a brightness-coded label stops being free."""
    rng = np.random.default_rng(1)
    n, size = 300, 16
    labels = rng.integers(0, 2, n)
    bright = np.clip(rng.normal(110 + 25 * labels[:, None, None], 15, (n, size, size)), 0, 255).astype(np.uint8)
    raw = pixel_statistics_scores(bright, labels, 2)["auroc"]
    shifted = pixel_statistics_scores(acquisition_shift(bright, seed=5), labels, 2)["auroc"]
    assert raw > 0.95 and shifted < raw - 0.15, (raw, shifted)


def test_mean_auroc_gain_known_value_and_empty():
    tasks = {"a": {"trained": {"auroc": 0.9}, "random_init": {"auroc": 0.7}},
             "b": {"trained": {"auroc": 0.5}, "random_init": {"auroc": 0.6}}}
    assert mean_auroc_gain(tasks) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="at least one"):
        mean_auroc_gain({})


def test_mean_auroc_gain_over_named_tasks_only():
    tasks = {"a": {"trained": {"auroc": 0.9}, "random_init": {"auroc": 0.7}},
             "b": {"trained": {"auroc": 0.5}, "random_init": {"auroc": 0.6}},
             "c": {"trained": {"auroc": 0.8}, "random_init": {"auroc": 0.5}}}
    assert mean_auroc_gain(tasks, ("a", "c")) == pytest.approx(0.25)
    assert mean_auroc_gain(tasks, ("b",)) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match=r"\['d'\] are not among the scored tasks"):
        mean_auroc_gain(tasks, ("a", "d"))
    with pytest.raises(ValueError, match="at least one"):
        mean_auroc_gain(tasks, ())


def test_criterion_tasks_are_the_phantom_tasks_and_natural_is_scored_beside_them():
    """The issue's words: 'a held-out labelled phantom task'; natural shapes is the natural stand-ins' own domain."""
    from medlib.config import get_profile
    from medlib.models.health import CRITERION_TASKS, NATURAL_TASK, health_tasks

    tasks = health_tasks(get_profile("smoke"), 64)
    assert set(CRITERION_TASKS) | {NATURAL_TASK} == set(tasks) and NATURAL_TASK not in CRITERION_TASKS
    assert all(not tasks[name].name.startswith("natural") for name in CRITERION_TASKS)  # phantoms only


def test_random_init_twins_are_seeded_and_leave_the_global_rng_alone():
    from medlib.models.health import random_init_twins

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = random_init_twins("vit-smoke", seeds=(0, 1))
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    b = random_init_twins("vit-smoke", seeds=(0, 1))
    wa, wb = (dict(n.named_parameters()) for n in (a[0], b[0]))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(a[0].patch_embed.proj.weight, a[1].patch_embed.proj.weight)


@pytest.mark.slow
def test_health_check_fails_a_collapsed_backbone_and_a_random_twin():
    """The criterion can fail: constant features (collapse) and an untrained network do not pass."""
    from medlib.config import get_profile
    from medlib.models.health import HEALTH_DRAWS, health_check, random_init_twins

    profile = get_profile("smoke")
    collapsed = random_init_twins("vit-smoke", seeds=(7,))[0]
    with torch.no_grad():
        collapsed.norm.weight.zero_()  # every CLS feature = the final LayerNorm's bias: one point
    health = health_check(collapsed, "vit-smoke", profile, own_task=_quadrant_coded_set())
    assert not health["passed"] and not health["transfer_passed"] and health["mean_auroc_gain"] < 0
    assert health["criterion_tasks"] == ["ct_organ", "knee_acl", "breast_us_malignant"]
    first = health["draws"][0]  # draw 0 is the one scored in full in `tasks`
    phantom_gains = [t["trained"]["auroc"] - t["random_init"]["auroc"] for name, t in health["tasks"].items()
                     if name != "natural_class"]
    assert first["mean_auroc_gain"] == pytest.approx(np.mean(phantom_gains))  # natural shapes not in the mean
    natural = health["tasks"]["natural_class"]
    assert first["natural_auroc_gain"] == pytest.approx(natural["trained"]["auroc"] - natural["random_init"]["auroc"])
    assert first["mean_auroc_gain_all_tasks"] == pytest.approx((3 * first["mean_auroc_gain"]
                                                                + first["natural_auroc_gain"]) / 4)
    assert [d["seed"] for d in health["draws"]] == [profile.seed + d for d in range(HEALTH_DRAWS)]
    assert health["mean_auroc_gain"] == pytest.approx(np.mean([d["mean_auroc_gain"] for d in health["draws"]]))
    assert health["own_task"]["trained"]["auroc"] == pytest.approx(0.5) and "own supervised task" in health["criterion"]
    assert set(health["tasks"]) == set(health["tasks_unshifted"]) == {"ct_organ", "knee_acl", "breast_us_malignant",
                                                                       "natural_class"}
    for scores in health["tasks"].values():
        assert scores["trained"]["auroc"] == pytest.approx(0.5)  # ties everywhere: chance
        assert len(scores["random_init"]["auroc_per_seed"]) == len(health["random_init_seeds"])
    untrained = random_init_twins("vit-smoke", seeds=(11,))[0]
    health = health_check(untrained, "vit-smoke", profile)
    assert not health["passed"]
    assert len({round(d["mean_auroc_gain"], 9) for d in health["draws"]}) == HEALTH_DRAWS  # draws are other images
    assert health["mean_auroc_gain_draw_std"] > 0
    with pytest.raises(ValueError, match="at least one held-out draw"):
        health_check(untrained, "vit-smoke", profile, draws=0)


def test_draw_summary_known_values():
    from medlib.models.health import draw_summary

    tasks = {"ct_organ": {"trained": {"auroc": 0.9}, "random_init": {"auroc": 0.8}},
             "knee_acl": {"trained": {"auroc": 0.7}, "random_init": {"auroc": 0.6}},
             "breast_us_malignant": {"trained": {"auroc": 0.6}, "random_init": {"auroc": 0.5}},
             "natural_class": {"trained": {"auroc": 0.4}, "random_init": {"auroc": 0.6}}}
    summary = draw_summary(tasks, seed=7)
    assert summary["seed"] == 7 and summary["mean_auroc_gain"] == pytest.approx(0.1)
    assert summary["natural_auroc_gain"] == pytest.approx(-0.2)
    assert summary["mean_auroc_gain_all_tasks"] == pytest.approx(0.025)
    assert summary["task_gains"]["knee_acl"] == pytest.approx(0.1)


def test_draw_gains_text_formats_each_draw_and_is_empty_without_draws():
    from medlib.models.health import draw_gains_text, gains_text

    assert draw_gains_text({"draws": [{"mean_auroc_gain": 0.0731}, {"mean_auroc_gain": -0.02}]}) == "+0.073 / -0.020"
    assert gains_text([0.0731, -0.02]) == "+0.073 / -0.020" and gains_text([]) == ""
    assert draw_gains_text({"mean_auroc_gain": 0.05}) == ""


class _QuadrantMeans(torch.nn.Module):
    """A stand-in 'backbone' whose CLS features are the four quadrant means of the image (timm's two calls)."""

    def forward_features(self, x):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        grey = x.mean(1)
        return torch.stack([grey[:, :h, :w].mean((1, 2)), grey[:, :h, w:].mean((1, 2)),
                            grey[:, h:, :w].mean((1, 2)), grey[:, h:, w:].mean((1, 2))], 1)

    def forward_head(self, feats, pre_logits=False):
        return feats


def _quadrant_coded_set(n=96, size=32, seed=0):
    """Multi-label set: label 0 = bright top half, label 1 = bright bottom half, label 2 never present; 2 images per patient."""
    from medlib.data.imageset import ImageSet

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 3)).astype(np.float32)
    labels[:, 2] = 0
    images = rng.integers(40, 80, (n, size, size)).astype(np.uint8)
    images[labels[:, 0] == 1, : size // 2] += 120
    images[labels[:, 1] == 1, size // 2:] += 120
    return ImageSet(images=images, labels=labels, label_names=["top", "bottom", "absent"], task="multilabel",
                    patient_ids=np.array([f"p{i // 2}" for i in range(n)]), name="quadrants")


def test_own_task_scores_find_features_that_code_the_labels_and_skip_undefined_labels():
    from medlib.models.health import own_task_scores, random_init_twins

    ds = _quadrant_coded_set()
    twins = random_init_twins("vit-smoke", seeds=(0, 1))
    out = own_task_scores(_QuadrantMeans(), twins, ds, size=32)
    assert out["n_labels_scored"] == 2  # the label that never occurs has no AUROC and is skipped
    assert out["trained"]["auroc"] > 0.85 and out["pixel_statistics"]["auroc"] > 0.85  # cosine kNN: ~0.9
    assert len(out["random_init"]["auroc_per_seed"]) == 2
    assert out["auroc_gain"] == pytest.approx(out["trained"]["auroc"] - out["random_init"]["auroc"])
    again = own_task_scores(_QuadrantMeans(), twins, ds, size=32)
    assert again["trained"] == out["trained"] and again["random_init"] == out["random_init"]  # deterministic


def test_own_task_scores_reject_unlabelled_sets_and_too_few_patients():
    from medlib.data.imageset import ImageSet
    from medlib.models.health import own_task_scores

    images = np.zeros((8, 16, 16), dtype=np.uint8)
    unlabelled = ImageSet(images=images, labels=None, label_names=[], task="none",
                          patient_ids=np.array([f"p{i}" for i in range(8)]), name="u")
    with pytest.raises(ValueError, match="labelled task"):
        own_task_scores(_QuadrantMeans(), [], unlabelled, size=16)
    ds = _quadrant_coded_set(n=6)
    few = ImageSet(images=ds.images, labels=ds.labels, label_names=ds.label_names, task="multilabel",
                   patient_ids=np.array(["a", "a", "b", "b", "c", "c"]), name="few")
    with pytest.raises(ValueError, match="4 patients"):
        own_task_scores(_QuadrantMeans(), [], few, size=16)


def test_domain_tasks_map_a_recipes_data_to_its_phantom_tasks():
    from medlib.models.health import domain_tasks

    assert domain_tasks(("knee",)) == ("knee_acl",)
    assert domain_tasks(("breast_us", "thyroid_us")) == ("breast_us_malignant",)
    assert domain_tasks(["ct:2", "knee"]) == ("ct_organ", "knee_acl")  # sites ignored, criterion order kept
    assert domain_tasks(("natural",)) == () and domain_tasks(("cxr:5",)) == ()


def _synthetic_draws(monkeypatch, gains_per_draw):
    """health_check on made-up per-task gains (trained = 0.5 + gain, random init = 0.5), one dict per draw."""
    from medlib.models import health as H

    draws = iter(gains_per_draw)

    def fake_score_draw(model, twins, profile, size, device, unshifted):
        gains = next(draws)
        tasks = {t: {"trained": {"auroc": 0.5 + g}, "random_init": {"auroc": 0.5}} for t, g in gains.items()}
        return tasks, (tasks if unshifted else {}), 10

    monkeypatch.setattr(H, "_score_draw", fake_score_draw)
    monkeypatch.setattr(H, "random_init_twins", lambda suffix: [])


def test_domain_criterion_judges_the_domain_task_and_requires_no_collapse_elsewhere(monkeypatch):
    """Known values: a knee continuation gains 0.06 on knee ACL; it passes while transfer stays above zero."""
    from medlib.config import get_profile
    from medlib.models.health import HEALTH_MARGIN, health_check

    profile = get_profile("smoke")
    forgetful = {"ct_organ": 0.01, "knee_acl": 0.06, "breast_us_malignant": -0.01, "natural_class": -0.04}
    _synthetic_draws(monkeypatch, [forgetful] * 3)
    health = health_check(None, "vit-smoke", profile, domain=("knee_acl",))
    assert health["domain"]["tasks"] == ["knee_acl"] and health["domain"]["per_draw"] == pytest.approx([0.06] * 3)
    assert health["mean_auroc_gain"] == pytest.approx(0.02) and not health["transfer_passed"]  # recorded, not judged
    assert health["passed"] and "domain" in health["criterion"]
    collapsed_elsewhere = dict(forgetful, ct_organ=-0.08)  # transfer mean -0.01: below random init elsewhere
    _synthetic_draws(monkeypatch, [collapsed_elsewhere] * 3)
    health = health_check(None, "vit-smoke", profile, domain=("knee_acl",))
    assert health["mean_auroc_gain"] == pytest.approx(-0.01) and health["domain"]["auroc_gain"] == pytest.approx(0.06)
    assert not health["passed"]
    weak = [dict(forgetful, knee_acl=g) for g in (0.06, 0.02, 0.0)]  # mean 0.027 < margin: fails
    _synthetic_draws(monkeypatch, weak)
    health = health_check(None, "vit-smoke", profile, domain=("knee_acl",))
    assert health["domain"]["auroc_gain"] == pytest.approx(0.08 / 3) and 0.08 / 3 < HEALTH_MARGIN
    assert not health["passed"]
    _synthetic_draws(monkeypatch, [forgetful] * 3)  # the same gains judged on transfer (no domain): fails
    assert not health_check(None, "vit-smoke", profile)["passed"]


def test_domain_criterion_rejects_bad_tasks_and_a_second_criterion():
    from medlib.config import get_profile
    from medlib.models.health import health_check

    profile = get_profile("smoke")
    with pytest.raises(ValueError, match="domain tasks"):
        health_check(None, "vit-smoke", profile, domain=("natural_class",))
    with pytest.raises(ValueError, match="domain tasks"):
        health_check(None, "vit-smoke", profile, domain=())
    with pytest.raises(ValueError, match="not both"):
        health_check(None, "vit-smoke", profile, domain=("knee_acl",), own_task=_quadrant_coded_set())

"""Tests of the DiNO-Diffusion build (medlib.diffusion.build), its CLI and notebook 04's runners (CPU, 32 px)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medlib.config import PROFILE_NAMES, get_profile, override
from medlib.data.imageset import ImageSet
from medlib.diffusion import build as B
from medlib.studies import dino_diffusion as X
from medlib.engine import derive_seed
from medlib.models.backbones import get_spec

# A minimal LDM: the random smoke ViT as condition encoder (no weights file needed), a few images per site;
# its own profile name, so that its build folder is not the smoke profile's.
TEST_PROFILE = dataclasses.replace(override(get_profile("smoke"), **{
    "diffusion.encoder": "random-vit-smoke", "diffusion.n_per_site": 8, "diffusion.vae_steps": 2,
    "diffusion.ldm_steps": 2, "diffusion.checkpoint_every": 1, "diffusion.n_fid": 6, "diffusion.n_show": 2,
    "diffusion.num_inference_steps": 2, "diffusion.guidance_scales": (1.0, 3.0), "diffusion.step_grid": (1, 2),
    "diffusion.n_downstream": 64, "diffusion.aug_ns": (2,), "diffusion.aug_classifier": "random-vit-smoke",
    "diffusion.seg_train_images": 8, "eval.bootstrap": 20, "eval.seg_epochs": 1,
}), name="smoke-test")


@pytest.fixture(scope="module")
def built() -> B.LDMHandle:
    folder = B.build_ldm(TEST_PROFILE, device="cpu", progress=False)
    assert folder is not None and folder == B.output_dir(TEST_PROFILE)
    return B.load_ldm(TEST_PROFILE, device="cpu")


@pytest.fixture(scope="module")
def data() -> B.LDMData:
    return B.load_training_images(TEST_PROFILE)


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", PROFILE_NAMES, ids=lambda n: f"profile-{n}")  # an id "gpu" would be skipped
def test_every_profile_has_a_consistent_diffusion_config(name):
    cfg = get_profile(name).diffusion
    vae_factor = 8 if cfg.pretrained_vae else 2 ** (len(cfg.vae_channels) - 1)  # sd-vae-ft-mse: x8
    latent = cfg.image_size // vae_factor
    assert cfg.image_size % vae_factor == 0 and latent % 2 ** (len(cfg.unet_channels) - 1) == 0
    assert cfg.guidance_scale > 0 and cfg.num_inference_steps >= 1 and min(cfg.aug_ns) >= 1
    assert set(cfg.tokens) <= {"cls", "pooled", "registers"}  # global tokens only, never patch tokens
    assert get_spec(cfg.encoder).is_dinov2 == (name == "paper")  # only `paper` may say DINOv2
    assert bool(cfg.pretrained_vae) == (name == "paper")


def test_paper_profile_names_the_public_components():
    cfg = get_profile("paper").diffusion
    assert cfg.encoder == "dinov2-vit-b14-reg4" and cfg.pretrained_vae == "stabilityai/sd-vae-ft-mse"
    assert B.ldm_name("paper") == "ldm-cxr-256-sdvae"
    assert B.output_dir("tiny").parent == B.EMBEDDED_DIR and B.output_dir("smoke").parent.name == "smoke"
    assert B.output_dir(TEST_PROFILE) != B.output_dir("smoke")


def test_pretrained_vae_offline_error_says_what_to_do(tmp_path):
    with pytest.raises(B.LDMNotBuiltError, match="hf download"):
        B.load_pretrained_vae(str(tmp_path / "no-such-vae"), 64)


# --------------------------------------------------------------------------- data


def test_training_images_are_unlabelled_and_patient_split(data):
    cfg = TEST_PROFILE.diffusion
    assert data.train.dtype == np.uint8 and data.train.shape[1:] == (cfg.image_size, cfg.image_size)
    assert len(data.train) + len(data.heldout) == cfg.n_per_site * len(cfg.train_sites)
    assert set(data.train_sites) <= set(cfg.train_sites) and len(data.heldout) > 0
    assert not set(data.train_patients) & set(data.heldout_patients)  # no patient on both sides
    assert 0 not in set(data.train_sites) | set(data.heldout_sites)  # site 0 is kept for the downstream tasks
    again = B.load_training_images(TEST_PROFILE)
    np.testing.assert_array_equal(again.train, data.train)
    assert not hasattr(data, "labels")
    table = X.describe_ldm_data(data)
    assert table["train_images"].sum() == len(data.train) and list(table["site"]) == list(cfg.train_sites)


def test_downstream_is_site_zero_with_masks_and_a_patient_split():
    ds, split = X.load_downstream(TEST_PROFILE)
    assert ds.images.shape[1:] == (32, 32) and ds.masks.shape == ds.images.shape
    assert set(np.unique(ds.masks)) <= {0, 1, 2, 3} and ds.meta["site_name"] == "general-hospital"
    parts = [set(ds.patient_ids[split[k]]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    with pytest.raises(ValueError, match="not a label"):
        X.binary_task(ds, "no_such_finding")
    task = X.binary_task(ds, "cardiomegaly")
    j = ds.label_names.index("cardiomegaly")
    np.testing.assert_array_equal(task.labels[:, 0], ds.labels[:, j])


# --------------------------------------------------------------------------- build, cards, staleness


def test_card_records_what_the_issue_asks(built):
    card = built.card
    for key in ("recipe_hash", "recipe", "condition_encoder", "vae_training", "unet_training", "quality_at_build",
                "device", "wall_time_s", "built_from_commit", "data"):
        assert key in card, key
    assert card["condition_encoder"]["name"] == "random-vit-smoke"
    assert card["condition_encoder"]["weights_hash"] == B.encoder_fingerprint(built.pipe.image_encoder.backbone)
    assert card["unet_training"]["steps"] == TEST_PROFILE.diffusion.ldm_steps
    assert card["data"]["labels_used"] is False
    assert np.isfinite(card["vae_training"]["heldout_psnr"]) and np.isfinite(card["quality_at_build"]["fd_ssl"])
    assert card["quality_at_build"]["fid"] is None and "fid=False" in card["quality_at_build"]["fid_skipped"]
    from safetensors import safe_open

    with safe_open(str(built.path / "unet.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert f.metadata()["recipe_hash"] == card["recipe_hash"]
    assert all(p.dtype == torch.float32 for p in built.pipe.unet.parameters())  # cast back for sampling


def test_model_card_table_names_only_the_tokens_the_encoder_has(built):
    from medlib.studies import dino_diffusion as ex

    table = dict(ex.model_card_table(built).values.tolist())
    used = ex.token_names(built)
    assert len(used) == built.card["condition_encoder"]["num_tokens"] == built.pipe.image_encoder.num_tokens
    assert f"{len(used)} global tokens {used}" in table["condition encoder"]


def test_build_is_cached_and_goes_stale_when_the_encoder_changes(built, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("an up-to-date LDM must not be retrained")

    monkeypatch.setattr(B, "_train_unet", boom)
    assert B.build_ldm(TEST_PROFILE, device="cpu", progress=False) == built.path
    assert B.ldm_status(TEST_PROFILE)[0] == "fresh"
    other = B.load_condition_backbone(TEST_PROFILE)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # "the backbone was rebuilt"
    status, reason = B.ldm_status(TEST_PROFILE, other)
    assert status == "stale" and "condition backbone's weights changed" in reason
    monkeypatch.setattr(B, "load_condition_backbone", lambda profile: other)
    with pytest.raises(B.LDMNotBuiltError, match="rebuild"):
        B.load_ldm(TEST_PROFILE)


def test_recipe_hash_covers_training_fields_only(built):
    weights = built.card["condition_encoder"]["weights_hash"]
    base = B.recipe_hash(TEST_PROFILE, weights)
    assert B.recipe_hash(override(TEST_PROFILE, **{"diffusion.ldm_steps": 3}), weights) != base
    assert B.recipe_hash(override(TEST_PROFILE, **{"diffusion.vae_channels": (8, 16, 32)}), weights) != base
    assert B.recipe_hash(TEST_PROFILE, "0" * 16) != base
    for sampling in ({"diffusion.guidance_scale": 5.0}, {"diffusion.num_inference_steps": 9},
                     {"diffusion.aug_ns": (1, 2)}, {"diffusion.scheduler": "ddim"}):
        assert B.recipe_hash(override(TEST_PROFILE, **sampling), weights) == base, sampling


def test_stop_after_resumes_to_the_same_weights(built, tmp_path):
    profile = dataclasses.replace(override(TEST_PROFILE, **{"diffusion.ldm_steps": 3}), name="smoke-resume")
    assert B.ldm_status(profile)[0] == "missing"
    assert B.build_ldm(profile, device="cpu", progress=False, stop_after=2, evaluate=False) is None
    assert B.ldm_status(profile)[0] != "fresh"  # nothing exported yet
    folder = B.build_ldm(profile, device="cpu", progress=False, evaluate=False)
    card = json.loads((folder / B.CARD_NAME).read_text())
    assert card["unet_training"]["steps"] == 3 and B.ldm_status(profile)[0] == "fresh"
    from medlib.diffusion.train import train_ldm

    # an uninterrupted run of the same recipe ends with the same UNet (VAE taken from the build cache)
    handle = B.load_ldm(profile)
    data = B.load_training_images(profile)
    vae, _ = B._train_or_load_vae(profile, data, "cpu", False, B.work_dir(profile))
    pipe = B._make_pipeline(profile, B.load_condition_backbone(profile), vae)
    cfg = profile.diffusion
    train_ldm(pipe, data.train, steps=3, batch_size=cfg.ldm_batch_size, lr=cfg.ldm_lr, cond_dropout=cfg.cond_dropout,
              min_snr_gamma=cfg.min_snr_gamma, ema_decay=cfg.ema_decay, device="cpu", seed=profile.seed,
              out_dir=tmp_path, progress=False, warmup_steps=cfg.ldm_warmup_steps, save_pipeline=False)
    for (name, a), b in zip(pipe.unet.state_dict().items(), handle.pipe.unet.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, rtol=0, atol=0, msg=name)


def test_missing_ldm_error_names_the_command():
    profile = override(TEST_PROFILE, **{"diffusion.image_size": 48, "diffusion.vae_channels": (8, 16)})
    with pytest.raises(B.LDMNotBuiltError, match="python -m medlib.diffusion build --profile smoke-test"):
        B.load_ldm(profile)
    with pytest.raises(B.LDMNotBuiltError, match="make ldm|python -m medlib.diffusion build"):
        B.get_ldm(profile, device="cpu", build=False)


def test_cli_status_and_arguments(built, capsys):
    from medlib.diffusion.__main__ import main

    with pytest.raises(SystemExit):
        main(["build", "--profile", "smoke", "--stop-after", "0"])
    with pytest.raises(SystemExit):
        main(["build", "--profile", "nonsense"])
    code = main(["status", "--profile", "smoke"])  # the real smoke profile: not built in this test cache
    assert code == 1 and "missing" in capsys.readouterr().out


@pytest.mark.parametrize("card_path", sorted(B.EMBEDDED_DIR.glob("*/model_card.json")), ids=lambda p: p.parent.name)
def test_committed_ldm_is_fresh_small_and_honest(card_path: Path):
    card = json.loads(card_path.read_text())
    status, reason = B.ldm_status(card["profile"])
    assert status == "fresh", f"{reason}: rebuild with `make ldm PROFILE={card['profile']}`"
    assert card["condition_encoder"]["is_dinov2"] is False and "dinov2" not in card["name"]
    assert sum(p.stat().st_size for p in card_path.parent.iterdir()) < 20e6


# --------------------------------------------------------------------------- generation


def test_generate_is_seeded_and_checks_its_input(built, data):
    images = data.heldout[:2]
    a = X.generate(built, images=images, num_images_per_condition=2, num_inference_steps=2, seed=1)
    b = X.generate(built.pipe, images=images, num_images_per_condition=2, num_inference_steps=2, seed=1)
    c = X.generate(built, images=images, num_images_per_condition=2, num_inference_steps=2, seed=2)
    assert a.shape == (4, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    tokens = built.pipe.encode_condition(images)
    np.testing.assert_array_equal(X.generate(built, tokens=tokens, num_images_per_condition=2, num_inference_steps=2,
                                             seed=1), a)
    with pytest.raises(ValueError, match="exactly one"):
        X.generate(built, num_inference_steps=2)
    with pytest.raises(ValueError, match="exactly one"):
        X.generate(built, images=images, tokens=tokens)
    with pytest.raises(TypeError, match="DiNODiffusionPipeline"):
        X.generate("not a pipeline", images=images)


def test_reconstructions_and_interpolation_strips(built, data):
    recon = X.reconstructions(built, data.heldout[:2], TEST_PROFILE, seeds_per_image=3)
    assert recon.shape == (2, 3, 32, 32)
    assert not np.array_equal(recon[0, 0], recon[0, 1])  # seeds differ
    a, b = data.heldout[:1], data.heldout[1:2]
    strips, ts = X.interpolation_strips(built, a, b, TEST_PROFILE, n_steps=4, seed=3)
    assert strips.shape == (1, 4, 32, 32) and ts[0] == 0 and ts[-1] == 1
    # t = 0 is a's own tokens with the strip's fixed noise: the same image as a direct call with that noise
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(derive_seed(3, 0)))
    direct = built.pipe(condition_tokens=built.pipe.encode_condition(a), latents=noise,
                        guidance_scale=TEST_PROFILE.diffusion.guidance_scale, num_inference_steps=2)
    # (a is encoded alone here, together with b in the strip: allow one grey level of float noise)
    assert np.abs(strips[0, 0].astype(int) - direct[0].astype(int)).max() <= 1
    assert np.abs(strips[0, -1].astype(int) - direct[0].astype(int)).max() > 1  # b's end differs
    pairs = X.choose_pairs(np.array([1, 1, 2, 2]), 5, seed=0)
    assert pairs.shape == (5, 2) and all(np.array([1, 1, 2, 2])[i] != np.array([1, 1, 2, 2])[j] for i, j in pairs)


def test_manifold_conditions_stay_near_the_bank(built, data):
    tokens = X.manifold_conditions(built, data.train[:10], 4, k=3, seed=0)
    bank = built.pipe.encode_condition(data.train[:10]).cpu()
    assert tokens.shape == (4, *bank.shape[1:])
    lo, hi = bank.amin(dim=0), bank.amax(dim=0)
    assert torch.all(tokens >= lo - 1e-4) and torch.all(tokens <= hi + 1e-4)  # convex mixtures of real tokens


# --------------------------------------------------------------------------- quality


def test_sweep_settings_known_value():
    p = override(get_profile("tiny"), **{"diffusion.guidance_scales": (1.0, 2.0, 4.0),
                                          "diffusion.step_grid": (10, 20, 40)})
    assert X.sweep_settings(p) == [(1.0, 20), (2.0, 20), (4.0, 20), (2.0, 10), (2.0, 40)]


def test_sampling_sweep_and_memorisation(built, data):
    sweep = X.sampling_sweep(built, data, TEST_PROFILE, device="cpu")
    t = sweep.table
    assert list(t["mode"]).count("reconstruction") == len(X.sweep_settings(TEST_PROFILE))
    assert t["mode"].iloc[-1] == "real vs real (floor)" and t["mode"].iloc[-2] == "manifold sample"
    assert t["fid"].isna().all() and np.isfinite(t["fd_ssl"]).all()  # smoke: FID switched off, FD always
    assert (t["published_fid_best"] == 4.7).all()
    assert t["fd_ssl"].iloc[-1] < t["fd_ssl"].iloc[0]  # an untrained LDM is far worse than real images
    n = min(6, len(data.heldout))
    assert sweep.default_samples.shape == (n, 32, 32) and (t["n"] == n).all()
    assert sweep.fd_name == "FD_ssl-natural-vit-tiny"
    mem = X.memorisation_study(built, data, TEST_PROFILE, device="cpu")
    row = mem.table.iloc[0]
    assert row["n_synthetic"] == 6 and row["chance"] == pytest.approx(1 / len(data.train))
    assert 0 <= row["nearest_is_own_condition_pixel"] <= 1 and len(mem.synthetic) == 6


# --------------------------------------------------------------------------- downstream


def _binary_set(labels: list[int]) -> ImageSet:
    n = len(labels)
    return ImageSet(images=np.zeros((n, 8, 8), np.uint8), labels=np.array(labels, np.float32)[:, None],
                    label_names=["x"], task="binary", patient_ids=np.arange(n).astype(str))


def test_nested_draws_are_balanced_nested_and_checked():
    ds = _binary_set([1] * 6 + [0] * 10)
    draws = X.nested_draws(ds, np.arange(16), (1, 2, 4), seed=0)
    for n, rows in draws.items():
        assert len(rows) == 2 * n and ds.labels[rows, 0].sum() == n
    assert set(draws[1]) <= set(draws[2]) <= set(draws[4])
    np.testing.assert_array_equal(draws[4], X.nested_draws(ds, np.arange(16), (4,), seed=0)[4])
    assert not np.array_equal(draws[4], X.nested_draws(ds, np.arange(16), (4,), seed=1)[4])
    with pytest.raises(ValueError, match="6 positive"):
        X.nested_draws(ds, np.arange(16), (7,))


def test_mask_prior_known_values():
    masks = np.array([[[0, 1], [2, 2]], [[0, 1], [2, 0]], [[1, 1], [0, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(X.mask_prior(masks, 3), [[0, 1], [2, 0]])  # per-pixel majority
    with pytest.raises(ValueError, match="label maps"):
        X.mask_prior(masks[0], 3)


def test_score_attention_maps_known_values():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[:, 2:6, 1:4] = 1
    masks[:, 2:6, 5:7] = 3  # heart: not lung
    lung = np.isin(masks, X.LUNG_LABELS).astype(np.float32)
    maps = np.stack([lung, 1 - lung], axis=1)  # token 0 = exactly the lungs, token 1 = the complement
    table = X.score_attention_maps(maps, masks, ["cls", "pooled"]).set_index("token")
    assert table.loc["cls", "pixel_auroc_lung"] == pytest.approx(1.0)
    assert table.loc["cls", "dice_high"] == pytest.approx(1.0)
    assert table.loc["pooled", "pixel_auroc_lung"] == pytest.approx(0.0)
    assert table.loc["pooled", "dice_low"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token names"):
        X.score_attention_maps(maps, masks, ["cls"])
    with pytest.raises(ValueError, match="must match"):
        X.score_attention_maps(maps[:1], masks, ["cls", "pooled"])


def test_cross_attention_maps_are_token_shares_and_processors_are_restored(built, data):
    before = {k: type(v) for k, v in built.pipe.unet.attn_processors.items()}
    maps = X.cross_attention_maps(built, data.heldout[:2], num_inference_steps=2)
    assert maps.shape == (2, built.pipe.num_condition_tokens, 8, 8)
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, atol=1e-5)  # softmax over the global tokens
    assert {k: type(v) for k, v in built.pipe.unet.attn_processors.items()} == before
    assert X.token_names(built) == ["cls", "pooled"]


def test_augmentation_study_runs_three_arms_with_repeats(built):
    ds, split = X.load_downstream(TEST_PROFILE)
    result = X.augmentation_study(built, ds, split, TEST_PROFILE, device="cpu")
    t = result.table
    assert len(t) == 3 * TEST_PROFILE.diffusion.aug_repeats and (t["n_per_class"] == 2).all()
    first = t[t["repeat"] == 0]
    assert list(first["arm"]) == list(X.ARMS)
    assert list(first["real_images"]) == [4, 4, 0] and list(first["synthetic_images"]) == [0, 4, 4]
    assert ((t["ci_low"] <= t["auroc"] + 1e-9) & (t["auroc"] <= t["ci_high"] + 1e-9)).all()
    assert t["interval"].str.contains("percentile bootstrap over test images").all()
    # aug_steps = 2, batch 4: 4 images -> 2 epochs of 1 step, 8 images -> 1 epoch of 2 steps
    assert list(first["steps"]) == [2, 2, 2] and list(first["epochs"]) == [2, 1, 2]
    summary = result.summary.set_index("arm")
    assert (summary["repeats"] == 2).all() and summary.loc["real", "gain_vs_real"] == 0
    assert summary.loc["real + synthetic", "published_gain_pct_max"] == 20.0
    np.testing.assert_allclose(summary.loc["real + synthetic", "mean"],
                               t.loc[t["arm"] == "real + synthetic", "auroc"].mean())
    comp = result.comparisons.set_index("comparison").loc["real + synthetic - real"]
    wide = t.pivot(index="repeat", columns="arm", values="auroc")
    assert comp["estimate"] == pytest.approx((wide["real + synthetic"] - wide["real"]).mean())
    assert comp["ci_low"] <= comp["estimate"] <= comp["ci_high"] and -1 <= comp["ci_low"] and comp["ci_high"] <= 1
    assert comp["interval"] == X.AUG_INTERVAL
    assert ((result.summary["ci_low"] >= 0) & (result.summary["ci_high"] <= 1)).all()
    from medlib.eval.claims import interval_violations
    assert interval_violations(result.summary) == [] and interval_violations(result.comparisons) == []
    assert result.examples_real.shape == result.examples_synthetic.shape


def test_auroc_resampled_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.random(50), 1)  # ties
    assert X.auroc_resampled(y, s, np.arange(50)[None])[0] == pytest.approx(roc_auc_score(y, s))
    idx = rng.integers(0, 50, (5, 50))
    for row, value in zip(idx, X.auroc_resampled(y, s, idx)):
        assert value == pytest.approx(roc_auc_score(y[row], s[row]))
    assert np.isnan(X.auroc_resampled(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([[0, 1, 1]]))[0])


def test_percentile_interval_is_bounded_and_contains_the_estimate():
    draws = np.clip(np.random.default_rng(1).normal(0.98, 0.05, 1000), 0, 1)
    low, high = X.percentile_interval(draws, 0.99)
    assert 0 <= low <= 0.99 <= high <= 1
    low, high = X.percentile_interval(np.array([0.1, 0.2, 0.3]), 0.5)  # widened to the estimate
    assert high == 0.5
    assert all(np.isnan(X.percentile_interval(np.array([0.1]), 0.1)))


def _fake_augmentation(gain_small: float, gain_large: float, n_test: int = 200, seed: int = 0):
    """Scores whose AUROC is set by a separation shift per arm: real + synthetic better by the given gains."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_test // 2), np.ones(n_test // 2)].astype(int)
    scores = {}
    for n, gain in ((4, gain_small), (64, gain_large)):
        for arm, shift in (("real", 0.5), ("real + synthetic", 0.5 + gain), ("synthetic only", 0.0)):
            scores[(n, arm)] = np.stack([y * shift + rng.normal(0, 1, n_test) for _ in range(3)])
    table = pd.DataFrame([{"n_per_class": n, "repeat": r, "arm": arm, "auroc": 0.5}
                          for (n, arm) in scores for r in range(3)])
    boot, _ = X._augmentation_intervals(y, scores, 300, 0)
    return X.AugmentationResult(table=table, summary=pd.DataFrame(), comparisons=pd.DataFrame(), examples_real=None,
                                examples_synthetic=None, target="finding", y_test=y, scores=scores, boot=boot)


def test_augmentation_gains_every_n_and_the_trend():
    aug = _fake_augmentation(gain_small=1.5, gain_large=0.0)
    g = X.augmentation_gains(aug).set_index(["n_per_class", "comparison"])
    small, large = g.loc[(4, "real + synthetic - real")], g.loc[(64, "real + synthetic - real")]
    assert small["ci_low"] > 0  # a large separation gain is detected at n = 4
    assert large["ci_low"] < 0 < large["ci_high"]  # none at n = 64
    trend = g.loc[("4 vs 64", "(real + synthetic - real) at n=4 minus at n=64")]
    assert trend["estimate"] == pytest.approx(small["estimate"] - large["estimate"]) and trend["ci_low"] > 0
    assert g.loc[(4, "synthetic only - real"), "ci_high"] < 0
    from medlib.eval.claims import interval_violations
    assert interval_violations(g.reset_index()) == []


def test_source_retrieval_known_values():
    f_real = np.eye(4)
    same = X.source_retrieval_from_features(f_real, f_real + 0.01, n_resamples=50)
    assert same["estimate"] == pytest.approx(0.5) and same["top1"] == 1.0
    shuffled = X.source_retrieval_from_features(f_real, f_real[[1, 2, 3, 0]], n_resamples=50)
    assert shuffled["estimate"] < 0 and shuffled["top1"] == 0.0
    assert shuffled["ci_low"] <= shuffled["estimate"] <= shuffled["ci_high"]


def test_median_gap_known_value_and_interval():
    out = X.median_gap(np.array([3.0, 3.0, 3.0]), np.array([1.0, 1.0, 1.0]), n_resamples=20)
    assert out == {"estimate": 2.0, "ci_low": 2.0, "ci_high": 2.0}


def _transfer_with(pred_transfer: np.ndarray, pred_prior: np.ndarray, true: np.ndarray):
    test = ImageSet(images=np.zeros((len(true), 4, 4), np.uint8), masks=true, labels=None, label_names=[],
                    task="none", patient_ids=np.arange(len(true)).astype(str),
                    mask_names=["left_lung", "right_lung", "heart"], name="t")
    return X.MaskTransferResult(table=pd.DataFrame(), lr_tables={}, synthetic_train=None, test=test,
                                predictions={"mask transfer (synthetic pairs)": pred_transfer,
                                             "majority mask prior": pred_prior})


def test_segmentation_per_class_and_sanity_flags_a_class_below_the_prior():
    true = np.zeros((6, 4, 4), np.uint8)
    true[:, 0, :2], true[:, 0, 2:], true[:, 2:, 1:3] = 1, 2, 3
    good = true.copy()
    no_heart = true.copy()
    no_heart[no_heart == 3] = 0  # lungs perfect, heart missed: heart Dice 0 against a perfect prior
    table = X.segmentation_per_class(_transfer_with(no_heart, good, true), n_resamples=50)
    t = table.set_index("structure")
    assert t.loc["left_lung", "dice"] == 1.0 and t.loc["heart", "dice"] == 0.0 and t.loc["heart", "prior_dice"] == 1.0
    assert t.loc["heart", "dice_gain_vs_prior"] == -1.0 and t.loc["lungs (mean of both)", "dice"] == 1.0
    from medlib.eval.claims import interval_violations
    assert interval_violations(table) == []
    aug = _fake_augmentation(0.5, 0.5)
    flags = X.sanity_table(aug, table)
    assert list(flags["task"]) == ["heart"] and not flags["explained"].any()
    explained = X.sanity_table(aug, table, {("mask transfer (synthetic pairs)", "heart"): "a tested reason"})
    assert explained["explained"].all()


def test_claims_table_judges_the_four_claims_by_the_rule():
    aug = _fake_augmentation(gain_small=1.5, gain_large=0.0)
    true = np.zeros((6, 4, 4), np.uint8)
    true[:, 0, :2], true[:, 0, 2:], true[:, 2:, 1:3] = 1, 2, 3
    prior = true.copy()
    prior[:, 0, :] = 0  # the prior misses the lungs: transfer (perfect) beats it
    seg = X.segmentation_per_class(_transfer_with(true, prior, true), n_resamples=50)
    sweep = X.SweepResult(table=pd.DataFrame([{"mode": "reconstruction", "guidance_scale": 2.0, "steps": 20,
                                                "fid": np.nan}]), default_samples=None, manifold_samples=None,
                          fd_name="FD_x")
    from medlib.diffusion.metrics import MemorisationResult
    mem = X.MemorisationStudy(result=MemorisationResult(
        nn_pixel=np.ones(5), nn_feature=np.full(5, 0.3), heldout_nn_pixel=np.ones(5),
        heldout_nn_feature=np.full(5, 0.1), threshold_pixel=0.1, threshold_feature=0.01, near_copy_share_pixel=0.0,
        near_copy_share_feature=0.0, closest_pairs=np.zeros((5, 2), np.int64)), table=None, train=None, synthetic=None)
    quality = {"fd_fake": 10.5, "fd_floor": 10.0, "gap": 0.5, "ci_low": -1.0, "ci_high": 2.0, "n": 64,
               "resamples": 100}
    semantics = {"estimate": 0.3, "ci_low": 0.2, "ci_high": 0.4, "n": 64, "top1": 0.5, "chance_top1": 1 / 64}
    claims = X.claims_table(sweep, mem, aug, None, get_profile("tiny"), quality=quality, semantics=semantics,
                            seg_classes=seg).set_index("id")
    assert claims.loc[1, "verdict"] == "reproduced"  # [-1, 2] inside +-0.5 x 10
    assert claims.loc["2a", "verdict"] == "reproduced" and claims.loc["2b", "verdict"] == "reproduced"
    assert claims.loc[3, "verdict"] == "reproduced" and claims.loc["4a", "verdict"] == "reproduced"
    assert claims.loc["4b", "verdict"] == "reproduced"  # generations farther from training than held-out images
    worse = dict(quality, gap=8.0, ci_low=6.0, ci_high=9.0)
    c2 = X.claims_table(sweep, mem, _fake_augmentation(0.0, 1.5), None, get_profile("tiny"), quality=worse,
                        semantics=semantics, seg_classes=seg).set_index("id")
    assert c2.loc[1, "verdict"] == "not reproduced" and c2.loc["2b", "verdict"] == "not reproduced"
    assert c2.loc["2a", "verdict"] == "inconclusive"


def test_mask_downstream_is_the_masked_source_in_paper_and_the_downstream_set_otherwise(tmp_path):
    from PIL import Image

    ds, split = X.load_downstream(TEST_PROFILE)
    same, same_split = X.load_mask_downstream(TEST_PROFILE, ds, split)
    assert same is ds and same_split is split  # embedded profiles: the phantoms carry labels and masks
    rng = np.random.default_rng(0)
    for i in range(10):
        for folder in ("images", "leftMask", "rightMask"):
            (tmp_path / folder).mkdir(exist_ok=True)
            array = rng.integers(0, 256, (40, 40), dtype=np.uint8) if folder == "images" else \
                np.where(rng.random((40, 40)) < 0.3, 255, 0).astype(np.uint8)
            Image.fromarray(array).save(tmp_path / folder / f"case{i}.png")
    spec = f"segfolder:{tmp_path}/images?masks=leftMask,rightMask&mask_names=left_lung,right_lung&size=40"
    p = dataclasses.replace(TEST_PROFILE, data=dataclasses.replace(
        TEST_PROFILE.data, sources={**TEST_PROFILE.data.sources, "cxr_segmentation": spec}))
    p = override(p, **{"diffusion.seg_source_key": "cxr_segmentation"})
    masked, masked_split = X.load_mask_downstream(p, ds, split)
    assert len(masked) == 10 and masked.mask_names == ["left_lung", "right_lung"]
    assert masked.images.shape[1:] == (p.diffusion.image_size,) * 2 == masked.masks.shape[1:]
    assert sorted(np.concatenate(list(masked_split.values())).tolist()) == list(range(10))
    assert get_profile("paper").diffusion.seg_source_key == "cxr_segmentation"


def test_mask_transfer_uses_no_real_masks_for_training(built):
    ds, split = X.load_downstream(TEST_PROFILE)
    result = X.mask_transfer_study(built, ds, split, TEST_PROFILE, device="cpu")
    t = result.table.set_index("method")
    assert t.loc["mask transfer (synthetic pairs)", "real_masks_used"] == 0
    assert t.loc["supervised (real pairs)", "real_masks_used"] > 0
    assert ((t["dice"] >= 0) & (t["dice"] <= 1)).all() and "lung_dice" in t.columns
    assert t.loc["majority mask prior", "lung_dice"] > 0.5  # phantom anatomy is stereotyped: a strong prior
    assert t.loc["mask transfer (synthetic pairs)", "published_lung_dice"] == 0.844
    np.testing.assert_array_equal(result.synthetic_train.masks, ds.masks[split["train"][:8]])  # inherited masks
    assert not np.array_equal(result.synthetic_train.images, ds.images[split["train"][:8]])


def test_headline_table_sets_our_numbers_beside_the_paper():
    sweep = X.SweepResult(table=pd.DataFrame([
        {"mode": "reconstruction", "guidance_scale": 2.0, "steps": 20, "n": 64, "fid": 50.0, "fd_ssl": 3.0}]),
        default_samples=np.zeros((1, 2, 2), np.uint8), manifold_samples=np.zeros((1, 2, 2), np.uint8), fd_name="FD_x")
    aug = X.AugmentationResult(table=pd.DataFrame(), summary=pd.DataFrame([
        {"n_per_class": 4, "arm": "real + synthetic", "gain_vs_real_pct": 5.0, "repeats": 3},
        {"n_per_class": 16, "arm": "real + synthetic", "gain_vs_real_pct": -2.0, "repeats": 3},
        {"n_per_class": 4, "arm": "synthetic only", "gain_vs_real_pct": 30.0, "repeats": 3}]),
        comparisons=pd.DataFrame([{"n_per_class": 16, "comparison": "real + synthetic - real", "estimate": -0.01,
                                   "ci_low": -0.05, "ci_high": 0.03, "gain_pct_of_real": -2.0},
                                  {"n_per_class": 4, "comparison": "real + synthetic - real", "estimate": 0.03,
                                   "ci_low": -0.1, "ci_high": 0.16, "gain_pct_of_real": 5.0}]),
        examples_real=None, examples_synthetic=None, target="cardiomegaly")
    seg = X.MaskTransferResult(table=pd.DataFrame([{"method": "mask transfer (synthetic pairs)", "lung_dice": 0.7},
                                                   {"method": "majority mask prior", "lung_dice": 0.8}]),
                               lr_tables={}, synthetic_train=None, test=None, predictions={})
    table = X.headline_table(sweep, aug, seg, get_profile("tiny")).set_index("metric")
    assert table.loc["FID", "ours"] == 50.0 and table.loc["FID", "published"] == 4.7
    assert table.loc["AUROC gain from synthetic augmentation (%)", "ours"] == 5.0  # the smallest n, not the best
    setting = table.loc["AUROC gain from synthetic augmentation (%)", "ours_setting"]
    assert "[-0.100, +0.160]" in setting and "n = 16: -2.0 %" in setting
    assert "prior: 0.800" in table.loc["zero-shot lung Dice", "ours_setting"]
    assert table.loc["zero-shot lung Dice", "delta"] == pytest.approx(0.7 - 0.844)
    assert (table["profile"] == "tiny").all()


def test_dataclass_fields_of_train_fields_exist():
    names = {f.name for f in dataclasses.fields(get_profile("tiny").diffusion)}
    assert set(B.TRAIN_FIELDS) <= names


def test_augmentation_classifier_is_a_function_of_its_seed_not_of_the_process_rng():
    """torch seeds each process at random: the classifier's head must come from ``seed`` (the study re-ran
    differently before), and the caller's random stream is left alone."""
    ds, split = X.load_downstream(TEST_PROFILE)
    train, test = ds.subset(split["train"][:8]), ds.subset(split["test"][:8])
    runs = []
    for other_history in (1, 2):
        torch.manual_seed(other_history)
        runs.append(X.train_eval_classifier(train, test, TEST_PROFILE, steps=1, seed=5)["probs"])
    np.testing.assert_array_equal(runs[0], runs[1])
    other = X.train_eval_classifier(train, test, TEST_PROFILE, steps=1, seed=6)["probs"]
    assert not np.array_equal(other, runs[0])

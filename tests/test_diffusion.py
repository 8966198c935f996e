"""Tests of medlib.diffusion: the DiNO-Diffusion pipeline, the small VAE and the LDM training loop (CPU, 32 px)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medlib.diffusion.pipeline import (
    DiNODiffusionPipeline, DinoConditionEncoder, build_pipeline, manifold_sample, null_condition_like, slerp,
    small_unet_config,
)
from medlib.diffusion.train import cache_conditioning, diffusion_loss, drop_condition, train_ldm
from medlib.diffusion.vae import make_vae, reconstruct, small_vae_config, train_vae, vae_scale_factor
from medlib.models.backbones import BACKBONES, create_backbone

SIZE = 32
TINY_UNET = dict(unet_block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
                 norm_num_groups=8)


def _images(n: int = 8, seed: int = 0) -> np.ndarray:
    """Smooth stripes with a little noise: easy for a tiny VAE."""
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[:SIZE, :SIZE]
    return np.stack([((np.sin(xx / (3 + i % 4)) + 1) * 110 + rng.normal(0, 3, (SIZE, SIZE))).clip(0, 255)
                     for i in range(n)]).astype(np.uint8)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("random-vit-smoke")


def _pipe(backbone, seed: int = 0) -> DiNODiffusionPipeline:
    vae = make_vae(SIZE, block_out_channels=(8, 16, 16), seed=1)
    pipe = build_pipeline(backbone, vae, seed=seed, **TINY_UNET)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- condition tokens


def test_condition_is_global_tokens_only(backbone):
    pipe = _pipe(backbone)
    images = _images(3)
    tokens = pipe.encode_condition(images)
    assert tokens.shape == (3, 2, 48)  # CLS + pooled, no registers, never the 16 patch tokens
    assert pipe.num_condition_tokens == 2
    feats = backbone.features(pipe.image_encoder.preprocess(images))
    torch.testing.assert_close(tokens[:, 0], feats["cls"])
    torch.testing.assert_close(tokens[:, 1], feats["pooled"])


def test_condition_includes_register_tokens():
    spec = BACKBONES["random-vit-smoke"]
    reg_spec = type(spec)(**{**spec.__dict__, "name": "reg-vit-smoke", "kwargs": {**spec.kwargs, "reg_tokens": 2}})
    reg = create_backbone(reg_spec)
    encoder = DinoConditionEncoder.from_backbone(reg)
    tokens = encoder.encode(_images(2))
    assert encoder.num_tokens == 4 and tokens.shape == (2, 4, 48)  # T = 2 + registers
    feats = reg.features(encoder.preprocess(_images(2)))
    torch.testing.assert_close(tokens[:, 2:], feats["registers"])


def test_patch_tokens_are_refused():
    with pytest.raises(ValueError, match="global tokens only"):
        DinoConditionEncoder("random-vit-smoke", "vit_tiny_patch16_224", tokens=["cls", "patch"])


def test_encoder_stays_frozen(backbone):
    encoder = DinoConditionEncoder.from_backbone(backbone).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.backbone.training


# --------------------------------------------------------------------------- the pipeline


def test_save_load_round_trip_gives_identical_images(backbone, tmp_path):
    pipe = _pipe(backbone)
    images = _images(2)
    before = pipe(images=images, num_images_per_condition=2, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(7))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_encoder"] == ["medlib.diffusion.pipeline", "DinoConditionEncoder"]
    loaded = DiNODiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    after = loaded(images=images, num_images_per_condition=2, num_inference_steps=3,
                   generator=torch.Generator().manual_seed(7))
    assert before.shape == (4, SIZE, SIZE) and before.dtype == np.uint8
    np.testing.assert_array_equal(before, after)
    other_seed = loaded(images=images, num_images_per_condition=2, num_inference_steps=3,
                        generator=torch.Generator().manual_seed(8))
    assert not np.array_equal(before, other_seed)
    pipe.use_scheduler("dpm++")
    loaded.use_scheduler("dpm++")
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    a = pipe(condition_tokens=pipe.encode_condition(images), num_inference_steps=3, output_type="pt",
             generator=torch.Generator().manual_seed(1))
    b = loaded(condition_tokens=loaded.encode_condition(images), num_inference_steps=3, output_type="pt",
               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (2, 1, SIZE, SIZE) and 0 <= float(a.min()) and float(a.max()) <= 1


def test_guidance_one_is_the_conditional_prediction(backbone):
    pipe = _pipe(backbone, seed=3)
    torch.nn.init.normal_(pipe.unet.conv_out.weight, std=0.1)  # zero-initialised by diffusers: make outputs differ
    tokens = pipe.encode_condition(_images(2))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        cond = pipe.unet(latents, t, encoder_hidden_states=tokens).sample
        uncond = pipe.unet(latents, t, encoder_hidden_states=null_condition_like(tokens)).sample
        torch.testing.assert_close(pipe.predict(latents, t, tokens, 1.0), cond, rtol=0, atol=0)
        torch.testing.assert_close(pipe.predict(latents, t, tokens, 0.0), uncond, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pipe.predict(latents, t, tokens, 3.0), uncond + 3 * (cond - uncond),
                                   rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, uncond)


def test_pipeline_inputs_are_checked(backbone):
    pipe = _pipe(backbone)
    with pytest.raises(ValueError, match=r"condition_tokens must have shape \(N, 2, 48\)"):
        pipe(condition_tokens=torch.zeros(1, 3, 48), num_inference_steps=1)
    with pytest.raises(ValueError, match="not both"):
        pipe(images=_images(1), condition_tokens=torch.zeros(1, 2, 48), num_inference_steps=1)
    uncond = pipe(num_images_per_condition=3, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert uncond.shape == (3, SIZE, SIZE)
    wide = build_pipeline(create_backbone("random-vit-tiny"), make_vae(SIZE, block_out_channels=(8, 16, 16)),
                          **TINY_UNET)
    with pytest.raises(ValueError, match="encoder_hid_dim=192"):
        DiNODiffusionPipeline(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler,
                              image_encoder=wide.image_encoder)


# --------------------------------------------------------------------------- new conditions


def test_slerp_endpoints_and_norm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 48)).astype(np.float32), 2 * rng.normal(size=(3, 48)).astype(np.float32)
    np.testing.assert_array_equal(slerp(a, b, 0.0), a)
    np.testing.assert_array_equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.3)
    expected_norm = 0.7 * np.linalg.norm(a, axis=-1) + 0.3 * np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(np.linalg.norm(mid, axis=-1), expected_norm, rtol=1e-5)
    e0, e1 = torch.eye(2)[0], torch.eye(2)[1]
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([1.0, 1.0]) / 2**0.5)
    torch.testing.assert_close(slerp(e0, 3 * e0, 0.5), 2 * e0)  # parallel: no division by sin(0)
    with pytest.raises(ValueError, match="same shape"):
        slerp(a, b[:2], 0.5)


def test_manifold_sample_mixes_nearest_neighbours():
    rng = np.random.default_rng(0)
    bank = np.concatenate([rng.normal(0, 0.1, (10, 2, 4)), rng.normal(100, 0.1, (10, 2, 4))]).astype(np.float32)
    new = manifold_sample(bank, 50, k=5, rng=1)
    assert new.shape == (50, 2, 4) and new.dtype == np.float32
    cluster_means = new.mean(axis=(1, 2))
    assert np.all((np.abs(cluster_means) < 0.5) | (np.abs(cluster_means - 100) < 0.5))  # never between clusters
    np.testing.assert_array_equal(new, manifold_sample(bank, 50, k=5, rng=1))
    assert not np.array_equal(new, manifold_sample(bank, 50, k=5, rng=2))
    with pytest.raises(ValueError, match="k=30"):
        manifold_sample(bank, 2, k=30)


# --------------------------------------------------------------------------- training


def test_condition_dropout_rate():
    tokens = torch.ones(20000, 2, 4)
    out, dropped = drop_condition(tokens, 0.3, torch.Generator().manual_seed(0))
    rate = float(dropped.float().mean())
    assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / 20000) ** 0.5
    assert torch.all(out[dropped] == 0) and torch.all(out[~dropped] == 1)
    assert not drop_condition(tokens[:100], 0.0)[1].any() and drop_condition(tokens[:100], 1.0)[1].all()
    with pytest.raises(ValueError, match="cond_dropout=1.5"):
        drop_condition(tokens, 1.5)


class _ZeroUNet(torch.nn.Module):
    """Predicts zeros: the loss is then the mean square of the target, a known value."""

    def forward(self, x, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_known_values(backbone, prediction_type):
    scheduler = _pipe(backbone).training_scheduler()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 999])
    loss, mse = diffusion_loss(_ZeroUNet(), scheduler, latents, torch.zeros(2, 2, 48), noise, timesteps,
                               prediction_type, min_snr_gamma=5.0)
    ac = scheduler.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    target = noise if prediction_type == "epsilon" else ac.sqrt() * noise - (1 - ac).sqrt() * latents
    per_sample = target.pow(2).mean(dim=(1, 2, 3))
    snr = (ac / (1 - ac)).flatten()
    assert snr[0] > 5 > snr[1]  # one clipped, one not
    weights = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(loss, (per_sample * weights).mean())
    torch.testing.assert_close(mse, per_sample.mean())
    plain, _ = diffusion_loss(_ZeroUNet(), scheduler, latents, torch.zeros(2, 2, 48), noise, timesteps,
                              prediction_type, min_snr_gamma=None)
    torch.testing.assert_close(plain, per_sample.mean())


def test_v_prediction_training_sets_the_scheduler(backbone, tmp_path):
    pipe = _pipe(backbone)
    result = train_ldm(pipe, _images(4), steps=2, batch_size=4, prediction_type="v_prediction", device="cpu",
                       out_dir=tmp_path, progress=False)
    assert pipe.prediction_type == "v_prediction" and np.isfinite(result.history["loss"]).all()
    loaded = DiNODiffusionPipeline.from_pretrained(result.pipeline_dir)
    assert loaded.prediction_type == "v_prediction"
    assert loaded.use_scheduler("dpm++").scheduler.config.prediction_type == "v_prediction"


def _eval_loss(pipe: DiNODiffusionPipeline, cached: dict) -> float:
    """Loss on a fixed batch, fixed noise and timesteps: comparable before / after training."""
    g = torch.Generator().manual_seed(123)
    latents = torch.from_numpy(np.array(cached["latent_mean"])) * pipe.vae.config.scaling_factor
    tokens = torch.from_numpy(np.array(cached["tokens"]))
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=g)
    with torch.no_grad():
        return float(diffusion_loss(pipe.unet, pipe.training_scheduler(), latents, tokens, noise, timesteps)[0])


def test_training_reduces_loss_and_reuses_cached_latents(backbone, tmp_path):
    pipe = _pipe(backbone)
    images = np.repeat(_images(1), 8, axis=0)  # a trivial data set: one image
    calls = {"vae": 0, "encoder": 0}
    vae_encode, enc_encode = pipe.vae.encode, pipe.image_encoder.encode

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    pipe.vae.encode = counting("vae", vae_encode)
    pipe.image_encoder.encode = counting("encoder", enc_encode)
    cached = cache_conditioning(pipe, images, tmp_path / "cache", batch_size=4)
    assert calls == {"vae": 2, "encoder": 2}
    before = _eval_loss(pipe, cached)
    result = train_ldm(pipe, images, steps=25, batch_size=8, lr=2e-3, cond_dropout=0.5, ema_decay=0.0,
                       device="cpu", seed=0, out_dir=tmp_path, progress=False, encode_batch_size=4,
                       save_pipeline=False)
    assert calls == {"vae": 2, "encoder": 2}  # the cache written above was reused, not recomputed
    after = _eval_loss(pipe, cached)
    assert after < 0.7 * before, (before, after)
    assert len(result.history) == 25 and 0.3 < result.history["dropped"].mean() < 0.7
    train_ldm(pipe, images, steps=27, batch_size=8, lr=2e-3, cond_dropout=0.5, ema_decay=0.0, device="cpu", seed=0,
              out_dir=tmp_path, progress=False, save_pipeline=False)
    assert calls == {"vae": 2, "encoder": 2}  # continuing the run: still no encoding
    cache_conditioning(pipe, images[:4], tmp_path / "cache", batch_size=4)
    assert calls == {"vae": 3, "encoder": 3}  # other images: recomputed


def test_resume_equals_uninterrupted_run(backbone, tmp_path):
    images = _images(8)
    kwargs = dict(steps=4, batch_size=4, lr=1e-3, cond_dropout=0.25, ema_decay=0.9, device="cpu", seed=5,
                  progress=False, checkpoint_every=1, save_pipeline=False)
    full = train_ldm(_pipe(backbone), images, out_dir=tmp_path / "full", **kwargs)
    half = train_ldm(_pipe(backbone), images, out_dir=tmp_path / "split", stop_after=2,
                     **{**kwargs, "save_pipeline": True})
    assert half.steps_done == 2
    resumed_pipe = DiNODiffusionPipeline.from_pretrained(half.pipeline_dir)  # as a new session would
    rest = train_ldm(resumed_pipe, images, out_dir=tmp_path / "split", **kwargs)
    assert rest.steps_done == 4
    np.testing.assert_array_equal(full.history["loss"].to_numpy(), rest.history["loss"].to_numpy())
    for (name, a), b in zip(full.pipe.unet.state_dict().items(), rest.pipe.unet.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # EMA weights
    raw_full = torch.load(full.checkpoint, weights_only=True)["unet"]
    raw_rest = torch.load(rest.checkpoint, weights_only=True)["unet"]
    for name in raw_full:
        torch.testing.assert_close(raw_full[name], raw_rest[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(raw_full["conv_out.weight"], full.pipe.unet.state_dict()["conv_out.weight"])
    with pytest.raises(ValueError, match="different run"):
        train_ldm(_pipe(backbone), images, out_dir=tmp_path / "full", **{**kwargs, "lr": 5e-4})


def test_train_ldm_checks_image_size(backbone, tmp_path):
    with pytest.raises(ValueError, match="resize_images"):
        train_ldm(_pipe(backbone), np.zeros((4, 64, 64), np.uint8), steps=1, out_dir=tmp_path, device="cpu",
                  progress=False)


# --------------------------------------------------------------------------- the VAE


def test_small_vae_config_and_checks():
    config = small_vae_config(64, block_out_channels=(32, 64, 128, 128))
    assert config["in_channels"] == 1 and config["latent_channels"] == 4 and config["norm_num_groups"] == 32
    assert vae_scale_factor(make_vae(64, block_out_channels=(8, 16, 16, 16))) == 8
    with pytest.raises(ValueError, match="multiple of the downsampling factor 4"):
        small_vae_config(30)


def test_train_vae_learns_and_reports_metrics():
    vae = make_vae(SIZE, block_out_channels=(8, 16, 16))
    images = _images(12)
    untrained = np.abs(reconstruct(vae, images).astype(float) - images).mean()
    result = train_vae(vae, images, steps=30, batch_size=8, lr=2e-3, device="cpu", seed=0, progress=False)
    trained = np.abs(reconstruct(result.vae, images).astype(float) - images).mean()
    assert trained < 0.5 * untrained, (untrained, trained)
    assert result.history["loss"].iloc[-5:].mean() < result.history["loss"].iloc[:5].mean()
    assert len(result.heldout) == 1 and np.isfinite(result.psnr) and result.psnr > 15 and 0 < result.ssim <= 1
    assert result.vae.config.scaling_factor == pytest.approx(result.scaling_factor) and result.scaling_factor > 0


@pytest.mark.parametrize("channels, head_dim", [((32, 64, 128), 32), ((16, 32), 8)])
def test_unet_attention_heads_have_the_configured_width(channels, head_dim):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    config = small_unet_config(8, 4, 24, channels, 1, 16, head_dim)
    unet = UNet2DConditionModel(**config)
    widths = {m.to_q.out_features // m.heads for m in unet.modules() if isinstance(m, Attention)}
    assert widths == {head_dim}  # not diffusers' reading of attention_head_dim as a head count (width 1 at 32 ch)
    with pytest.raises(ValueError, match="must divide every level width"):
        small_unet_config(8, 4, 24, (32, 48), 1, 16, 32)

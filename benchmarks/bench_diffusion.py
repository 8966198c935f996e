"""DiNO-Diffusion UNet training and sampling throughput (study 4) against the diffusers-example default.

Ours = what `medlib.diffusion.train` does: latents and condition tokens cached on the device once, bf16
autocast and torch.compile on a GPU. Default = how diffusers' example training script runs out of the
box: fp32, no compile, every step encodes its images with the VAE and the condition encoder. Both train
the same UNet (the profile's `diffusion` sizes: `gpu` on a GPU, `tiny` on a CPU) on random weights -
throughput does not depend on them. Sampling: classifier-free-guided DPM-Solver++ steps + VAE decode,
bf16 (+ compile) vs fp32.
"""

from __future__ import annotations

from benchmarks import ratio, sig3

import time
from contextlib import nullcontext
from unittest import mock

import torch

from . import sync


def _parts(profile, device: str):
    """A fresh VAE, frozen condition encoder and UNet of the profile's sizes, on ``device``."""
    from medlib.diffusion.build import _make_pipeline
    from medlib.diffusion.vae import make_vae
    from medlib.models.backbones import create_backbone

    cfg = profile.diffusion
    encoder = create_backbone(cfg.encoder, pretrained=False, image_size=cfg.encoder_image_size)
    vae = make_vae(cfg.image_size, latent_channels=cfg.latent_channels, block_out_channels=cfg.vae_channels,
                   layers_per_block=cfg.vae_layers_per_block)
    pipe = _make_pipeline(profile, encoder, vae).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train_rate(pipe, images: torch.Tensor, uint8: torch.Tensor, steps: int, device: str, fast: bool) -> float:
    """Images/s of UNet training steps; ``fast``: cached latents / tokens, bf16, compile (GPU)."""
    from medlib.config import autocast_dtype
    from medlib.diffusion.train import diffusion_loss

    unet = pipe.unet.train()
    noise_scheduler = pipe.training_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    dtype = autocast_dtype(device) if fast else None
    model = torch.compile(unet) if fast and device.startswith("cuda") else unet

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return pipe.vae.encode(images).latent_dist.sample(), pipe.encode_condition(uint8)

    def autocast():
        return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None)

    cached = encode() if fast else None

    def step() -> None:
        latents, tokens = cached if fast else encode()
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        loss, _ = diffusion_loss(model, noise_scheduler, latents, tokens, noise, t, autocast=autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * images.shape[0] / (time.perf_counter() - start)


def _sample_rate(pipe, tokens: torch.Tensor, guidance_scale: float, n_steps: int, device: str, fast: bool) -> float:
    """Images/s of the pipeline's guided sampling + VAE decode; not ``fast``: fp32 (its bf16 autocast patched off).

    ``fast`` compiles the UNet in place on a GPU, so measure the default first.
    """
    if fast and device.startswith("cuda"):
        pipe.unet.compile()
    fp32 = nullcontext() if fast else mock.patch("medlib.diffusion.pipeline.autocast_dtype", return_value=None)

    def run() -> None:
        pipe(condition_tokens=tokens, guidance_scale=guidance_scale, num_inference_steps=n_steps, output_type="pt")

    with fp32:
        run()
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
    return tokens.shape[0] / (time.perf_counter() - start)


def main(steps: int | None = None) -> dict[str, float | str]:
    """Measure ours vs default training images/s and sampling images/s; print and return them."""
    from medlib.config import get_profile, resolve_device

    device = resolve_device("auto")
    on_gpu = device.startswith("cuda")
    profile = get_profile("gpu" if on_gpu else "tiny")
    cfg = profile.diffusion
    steps = steps or (30 if on_gpu else 3)
    batch = cfg.ldm_batch_size
    torch.manual_seed(0)
    images = torch.rand(batch, 1, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    uint8 = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pipe = _parts(profile, device)
    fast = _train_rate(pipe, images, uint8, steps, device, fast=True)
    pipe = _parts(profile, device)  # fresh weights and compile state for the default run
    default = _train_rate(pipe, images, uint8, steps, device, fast=False)
    tokens = pipe.encode_condition(uint8[:16])
    sample_default = _sample_rate(pipe, tokens, cfg.guidance_scale, cfg.num_inference_steps, device, fast=False)
    sample_fast = _sample_rate(pipe, tokens, cfg.guidance_scale, cfg.num_inference_steps, device, fast=True)
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    report = {
        "device": name, "profile": profile.name, "image_size": cfg.image_size, "batch": batch,
        "train_ours_images_per_s": sig3(fast), "train_default_images_per_s": sig3(default),
        "train_speedup": ratio(fast, default, 2),
        "sample_ours_images_per_s": sig3(sample_fast), "sample_default_images_per_s": sig3(sample_default),
        "sample_speedup": ratio(sample_fast, sample_default, 2), "sampling_steps": cfg.num_inference_steps,
        "ours": "cached latents + tokens" + (", bf16, torch.compile" if on_gpu else " (fp32 on CPU)"),
        "default": "fp32, no compile, VAE + encoder every step",
    }
    for key, value in report.items():
        print(f"{key:>28}: {value}")
    return report


if __name__ == "__main__":
    main()

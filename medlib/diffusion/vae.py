"""The small VAE of the latent diffusion model: a diffusers ``AutoencoderKL`` config, its training and its metrics.

The paper's VAE is not described (Jimenez-Perez et al. 2024 leave it unspecified). Our choice: a one-channel (grayscale) AutoencoderKL,
because radiographs are grey and a 1-channel VAE halves the work of the first and last convolutions;
``in_channels=3`` works the same way for colour data. It downsamples by ``2 ** (len(block_out_channels) - 1)``
(x4 with three blocks, x8 with four) into ``latent_channels`` (4) channels, and is trained with an L1 (or MSE)
reconstruction loss plus a small KL term, without the perceptual and adversarial losses of Stable Diffusion's
VAE (no LPIPS network is available offline). After training, ``scaling_factor`` is set to 1 / std of the
latents (Rombach et al. 2022, section G), so the diffusion model sees unit-variance latents.

Pixel convention: uint8 images in, float tensors in [-1, 1] for the VAE, uint8 images out.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..engine import derive_seed, make_accelerator, progress as progress_bar

__all__ = [
    "VAEResult", "images_to_vae_input", "latent_scaling_factor", "make_vae", "reconstruct", "reconstruction_metrics",
    "resize_images", "small_vae_config", "train_vae", "vae_output_to_images", "vae_scale_factor",
]


@dataclass
class VAEResult:
    """What :func:`train_vae` returns: the trained VAE, its per-step history and held-out reconstruction quality."""

    vae: AutoencoderKL  # trained in place; ``config.scaling_factor`` set to 1 / latent std
    history: pd.DataFrame  # one row per step: loss, reconstruction loss, KL, lr
    psnr: float  # mean PSNR (dB, data range 255) of held-out reconstructions
    ssim: float  # mean SSIM of held-out reconstructions
    scaling_factor: float
    heldout: np.ndarray  # indices of the held-out images
    wall_time_s: float


def small_vae_config(image_size: int, latent_channels: int = 4, in_channels: int = 1,
                     block_out_channels: Sequence[int] = (32, 64, 128), layers_per_block: int = 1,
                     norm_num_groups: int | None = None, mid_block_add_attention: bool = True) -> dict[str, Any]:
    """Keyword arguments of a small ``AutoencoderKL`` (downsampling ``2 ** (len(block_out_channels) - 1)``)."""
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) < 1 or any(c <= 0 for c in channels):
        raise ValueError(f"small_vae_config: block_out_channels={block_out_channels} must be positive channel counts.")
    if in_channels not in (1, 3):
        raise ValueError(f"small_vae_config: in_channels={in_channels}; use 1 (grayscale) or 3 (RGB).")
    factor = 2 ** (len(channels) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(f"small_vae_config: image_size={image_size} must be a positive multiple of the "
                         f"downsampling factor {factor} (from {len(channels)} blocks).")
    groups = norm_num_groups if norm_num_groups is not None else min(32, math.gcd(*channels))
    if any(c % groups for c in channels):
        raise ValueError(f"small_vae_config: norm_num_groups={groups} must divide every block width {channels}.")
    return dict(
        in_channels=in_channels, out_channels=in_channels, latent_channels=int(latent_channels),
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=int(layers_per_block), norm_num_groups=int(groups),
        sample_size=int(image_size), mid_block_add_attention=bool(mid_block_add_attention), scaling_factor=1.0,
    )


def make_vae(image_size: int, seed: int = 0, **kwargs: Any) -> AutoencoderKL:
    """A freshly initialised small AutoencoderKL in eval mode (``kwargs``: :func:`small_vae_config`); seeded init."""
    config = small_vae_config(image_size, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoencoderKL(**config).eval()


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent cell spans along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, 3]) -> uint8 (N, size, size[, 3]), bilinear with antialiasing (identity if already sized)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise ValueError(f"resize_images: expected uint8 (N, H, W) or (N, H, W, 3), got {arr.dtype} {arr.shape}.")
    if arr.shape[1] == size and arr.shape[2] == size:
        return arr
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).float()  # memory maps are read-only
    t = t[:, None] if arr.ndim == 3 else t.permute(0, 3, 1, 2)
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out.round().clamp(0, 255).to(torch.uint8)
    return (out[:, 0] if arr.ndim == 3 else out.permute(0, 2, 3, 1)).numpy()


def images_to_vae_input(images: np.ndarray | torch.Tensor, in_channels: int,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> float (N, in_channels, H, W) in [-1, 1] (grey repeated / RGB to luma)."""
    from ..ssl.train import images_to_tensor  # uint8 layout + channel conversion, shared with SSL

    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if not arr.flags.writeable:  # memory-mapped caches are read-only; torch wants a writable buffer
        arr = np.array(arr)
    return images_to_tensor(arr, in_channels).to(device).float().div_(127.5).sub_(1.0)


def vae_output_to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W) for one channel, (N, H, W, 3) for three."""
    out = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return out[:, 0].numpy() if out.shape[1] == 1 else out.permute(0, 2, 3, 1).numpy()


def _check_images(images: np.ndarray, vae: AutoencoderKL, where: str) -> np.ndarray:
    """Validate uint8 images whose side is a multiple of the VAE's downsampling factor."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3):
        raise ValueError(f"{where}: images must be uint8 (N, H, W) or (N, H, W, 3), got {arr.dtype} {arr.shape}. "
                         "Convert with skimage.util.img_as_ubyte.")
    factor = vae_scale_factor(vae)
    if arr.shape[1] % factor or arr.shape[2] % factor:
        raise ValueError(f"{where}: image size {arr.shape[1:3]} is not a multiple of the VAE's downsampling factor "
                         f"{factor}; resize with medlib.diffusion.vae.resize_images.")
    return arr


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 images; returns uint8 reconstructions of the same layout."""
    arr = _check_images(images, vae, "reconstruct")
    dev = next(vae.parameters()).device
    outs = []
    for start in range(0, len(arr), batch_size):
        x = images_to_vae_input(arr[start:start + batch_size], vae.config.in_channels, dev)
        outs.append(vae_output_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    rec = np.concatenate(outs)
    if arr.ndim == 4 and rec.ndim == 3:
        rec = np.repeat(rec[..., None], 3, axis=-1)
    elif arr.ndim == 3 and rec.ndim == 4:
        rec = rec.mean(axis=-1).round().astype(np.uint8)
    return rec


def reconstruction_metrics(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Mean PSNR (dB, data range 255) and SSIM (skimage.metrics) of the VAE's reconstructions of ``images``."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    arr = _check_images(images, vae, "reconstruction_metrics")
    rec = reconstruct(vae, arr, batch_size)
    channel_axis = -1 if arr.ndim == 4 else None
    psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(arr, rec)]
    ssim = [structural_similarity(a, b, data_range=255, channel_axis=channel_axis) for a, b in zip(arr, rec)]
    finite = [p for p in psnr if np.isfinite(p)]  # a perfect reconstruction has infinite PSNR
    return {"psnr": float(np.mean(finite)) if finite else float("inf"), "ssim": float(np.mean(ssim))}


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> float:
    """1 / std of the posterior means of ``images``: the LDM ``scaling_factor`` giving unit-variance latents."""
    arr = _check_images(images, vae, "latent_scaling_factor")
    dev = next(vae.parameters()).device
    means = [vae.encode(images_to_vae_input(arr[s:s + batch_size], vae.config.in_channels, dev)).latent_dist.mean
             for s in range(0, len(arr), batch_size)]
    std = float(torch.cat(means).float().std())
    if not math.isfinite(std) or std <= 0:
        raise FloatingPointError(f"latent_scaling_factor: latent std is {std}; the VAE has collapsed.")
    return 1.0 / std


def _split(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded permutation, at least one image on each side when n >= 2."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"train_vae: heldout_fraction={heldout_fraction} must be in [0, 1).")
    perm = np.random.default_rng(derive_seed(seed, 5)).permutation(n)
    n_held = min(n - 1, max(1, int(round(n * heldout_fraction)))) if heldout_fraction > 0 and n >= 2 else 0
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


class _VAELoss(torch.nn.Module):
    """Wraps a VAE so that one forward gives (reconstruction, KL per pixel): what DDP must see to sync gradients."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded posterior sample (N, C, H, W) and the mean KL to N(0, I) per input pixel."""
        posterior = self.vae.encode(x).latent_dist
        out = self.vae.decode(posterior.sample(generator=generator)).sample
        return out, posterior.kl().float().mean() / x[0].numel()


def train_vae(vae: AutoencoderKL, images: np.ndarray, *, steps: int, batch_size: int = 16, lr: float = 5e-4,
              kl_weight: float = 1e-6, loss: str = "l1", heldout_fraction: float = 0.1, device: str = "auto",
              seed: int = 0, progress: bool = True, max_grad_norm: float = 1.0,
              mixed_precision: str = "auto") -> VAEResult:
    """Train ``vae`` in place on uint8 images (reconstruction + ``kl_weight`` x KL); report held-out PSNR / SSIM.

    The last step sets ``vae.config.scaling_factor`` to 1 / std of the training latents. Batches and
    posterior samples are pure functions of ``(seed, step)``; the caller's torch random state is kept.
    """
    from ..ssl.train import batch_indices

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"train_vae: steps={steps} and batch_size={batch_size} must be positive.")
    if loss not in ("l1", "mse"):
        raise ValueError(f"train_vae: loss={loss!r}; choose 'l1' or 'mse'.")
    arr = _check_images(images, vae, "train_vae")
    if len(arr) < 2:
        raise ValueError(f"train_vae: needs at least 2 images, got {len(arr)}.")
    train_idx, held_idx = _split(len(arr), heldout_fraction, seed)
    t0 = time.perf_counter()
    accelerator = make_accelerator(device, mixed_precision)
    dev = accelerator.device
    vae.to(dev).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(_VAELoss(vae), optimizer)
    rec_fn = F.l1_loss if loss == "l1" else F.mse_loss
    history = []
    for step in progress_bar(range(steps), enabled=progress, desc="VAE"):
        idx = train_idx[batch_indices(len(train_idx), batch_size, seed, step)]
        x = images_to_vae_input(arr[idx], vae.config.in_channels, dev)
        generator = torch.Generator().manual_seed(derive_seed(seed, step, 4))
        with accelerator.autocast():
            out, kl = model(x, generator)  # KL per pixel, like the reconstruction term
        rec = rec_fn(out.float(), x)
        total = rec + kl_weight * kl
        if not torch.isfinite(total):
            raise FloatingPointError(f"train_vae: non-finite loss at step {step} (reconstruction {rec.item()}, "
                                     f"KL {kl.item()}); lower lr (now {lr}).")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(total)
        if max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        history.append({"step": step, "loss": total.item(), "rec_loss": rec.item(), "kl": kl.item(), "lr": lr})
    vae = accelerator.unwrap_model(model, keep_fp32_wrapper=False).vae.eval()
    scale = latent_scaling_factor(vae, arr[train_idx[:512]])
    vae.register_to_config(scaling_factor=scale)
    metrics = reconstruction_metrics(vae, arr[held_idx]) if len(held_idx) else {"psnr": float("nan"),
                                                                                "ssim": float("nan")}
    return VAEResult(vae=vae, history=pd.DataFrame(history), psnr=metrics["psnr"], ssim=metrics["ssim"],
                     scaling_factor=scale, heldout=held_idx, wall_time_s=time.perf_counter() - t0)

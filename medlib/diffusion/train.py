"""Training the DiNO-Diffusion UNet: cached latents and condition tokens, min-SNR loss, EMA, resumable.

:func:`train_ldm` follows diffusers' ``train_text_to_image.py``: VAE latents and frozen-encoder tokens are
computed ONCE per data set and cached in ``out_dir/cache`` (:func:`cache_conditioning`); every step then
samples a latent from the cached posterior, noise and timesteps, drops the condition to the null (zero)
token set with probability ``cond_dropout`` (for classifier-free guidance), noises the latent with a DDPM
schedule (``add_noise``), and regresses the UNet's output on epsilon or v with min-SNR-gamma weights
(Hang et al. 2023; ``diffusers.training_utils.compute_snr``). The UNet's weights are averaged with
``diffusers.training_utils.EMAModel``; accelerate gives bf16 on GPUs and DDP under ``accelerate launch``.

Everything random in a step is drawn from seeds derived from ``(seed, step, rank)``, so a run stopped and
resumed from ``out_dir/checkpoint.pt`` ends with exactly the weights and history of an uninterrupted run.
At the end ``pipe.unet`` holds the EMA weights (what is sampled from) and the pipeline is saved to
``out_dir/pipeline`` (``DiNODiffusionPipeline.from_pretrained`` reads it back).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr

from ..cache import array_fingerprint, load_npy, provenance, save_json, save_npy, stable_hash
from ..engine import Checkpointer, derive_seed, make_accelerator, progress as progress_bar
from .pipeline import DiNODiffusionPipeline, null_condition_like
from .vae import images_to_vae_input

__all__ = ["LDMResult", "cache_conditioning", "diffusion_loss", "drop_condition", "module_fingerprint", "train_ldm"]

_FORMAT = "medlib-ldm-checkpoint-v1"
_CACHE_FILES = ("latent_mean", "latent_std", "tokens")


@dataclass
class LDMResult:
    """What :func:`train_ldm` returns: the pipeline (EMA UNet), per-step history, files and timing."""

    pipe: DiNODiffusionPipeline  # trained in place; pipe.unet holds the EMA weights when ema_decay > 0
    history: pd.DataFrame  # one row per step: loss (min-SNR weighted), mse, lr, grad_norm, dropped fraction
    out_dir: Path
    checkpoint: Path
    pipeline_dir: Path | None  # out_dir/pipeline when saved
    steps_done: int
    wall_time_s: float  # summed over resumed sessions
    images_per_s: float  # training images per second in this session (nan when no step ran)


# --------------------------------------------------------------------------- cached latents and tokens


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, shapes, bytes): identifies the exact weights a cache was made with."""
    import hashlib

    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def cache_conditioning(pipe: DiNODiffusionPipeline, images: np.ndarray, cache_dir: str | Path, *,
                       batch_size: int = 64, data_fingerprint: str | None = None) -> dict[str, np.ndarray]:
    """VAE posterior (mean, std) and condition tokens of ``images``, computed once and cached as .npy.

    The cache is keyed by the images, the VAE and encoder weights and the token spec; a matching cache is
    memory-mapped without touching the VAE or the encoder, a stale one is recomputed.
    """
    cache_dir = Path(cache_dir)
    key = stable_hash({"data": data_fingerprint or array_fingerprint(np.asarray(images)),
                       "vae": module_fingerprint(pipe.vae), "encoder": module_fingerprint(pipe.image_encoder),
                       "encoder_config": _public(pipe.image_encoder.config)})
    meta_path = cache_dir / "cache.json"
    if meta_path.is_file() and all((cache_dir / f"{n}.npy").is_file() for n in _CACHE_FILES):
        import json

        if json.loads(meta_path.read_text()).get("key") == key:
            return {n: load_npy(cache_dir / f"{n}.npy") for n in _CACHE_FILES}
    dev = pipe.device
    means, stds, tokens = [], [], []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start:start + batch_size])
        posterior = pipe.vae.encode(images_to_vae_input(chunk, pipe.vae.config.in_channels, dev)).latent_dist
        means.append(posterior.mean.float().cpu().numpy())
        stds.append(posterior.std.float().cpu().numpy())
        tokens.append(pipe.encode_condition(chunk).cpu().numpy())
    arrays = {"latent_mean": np.concatenate(means), "latent_std": np.concatenate(stds),
              "tokens": np.concatenate(tokens)}
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}  # as read back from disk
    for name, array in arrays.items():
        save_npy(cache_dir / f"{name}.npy", array)
    save_json(meta_path, {"key": key, "n": int(len(images)), "shapes": {k: list(v.shape) for k, v in arrays.items()}})
    return arrays


# --------------------------------------------------------------------------- one step's pieces


def drop_condition(tokens: torch.Tensor, p: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's tokens by the null (zero) set with probability ``p``; returns (tokens, dropped mask)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cond_dropout={p} must be a probability in [0, 1].")
    dropped = torch.rand(tokens.shape[0], generator=generator).to(tokens.device) < p
    out = torch.where(dropped[:, None, None], null_condition_like(tokens), tokens)
    return out, dropped


def diffusion_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, latents: torch.Tensor,
                   tokens: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str = "epsilon",
                   min_snr_gamma: float | None = 5.0, autocast: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min-SNR-weighted loss, plain MSE) of the UNet's epsilon / v prediction on noised latents."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}; choose 'epsilon' or 'v_prediction'.")
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    ctx = autocast() if autocast is not None else contextlib.nullcontext()
    with ctx:
        pred = unet(noisy, timesteps, encoder_hidden_states=tokens).sample
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if not min_snr_gamma:
        return mse.mean(), mse.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=float(min_snr_gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    return (mse * weights).mean(), mse.mean()


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (``_name_or_path`` etc. differ after from_pretrained)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warm-up."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


# --------------------------------------------------------------------------- the loop


def train_ldm(pipe: DiNODiffusionPipeline, images: np.ndarray, *, steps: int, batch_size: int = 32,
              lr: float = 1e-4, cond_dropout: float = 0.1, min_snr_gamma: float | None = 5.0,
              prediction_type: str = "epsilon", ema_decay: float = 0.999, device: str = "auto", seed: int = 0,
              out_dir: str | Path, progress: bool = True, warmup_steps: int = 0, weight_decay: float = 1e-2,
              max_grad_norm: float = 1.0, checkpoint_every: int = 500, stop_after: int | None = None,
              mixed_precision: str = "auto", encode_batch_size: int = 64, save_pipeline: bool = True) -> LDMResult:
    """Train ``pipe.unet`` on uint8 ``images`` (the VAE and the image encoder stay frozen); resume if possible.

    ``steps`` is the total; a checkpoint in ``out_dir`` of the same run (data, recipe, seed, architecture)
    is resumed, and ``stop_after`` ends this call after that many steps (run a long build in chunks).
    Raising ``steps`` later continues a finished run. The caller's torch random state is left as it was.
    """
    with torch.random.fork_rng():
        return _train_ldm(pipe, images, steps=steps, batch_size=batch_size, lr=lr, cond_dropout=cond_dropout,
                          min_snr_gamma=min_snr_gamma, prediction_type=prediction_type, ema_decay=ema_decay,
                          device=device, seed=seed, out_dir=Path(out_dir), progress=progress,
                          warmup_steps=warmup_steps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                          checkpoint_every=checkpoint_every, stop_after=stop_after, mixed_precision=mixed_precision,
                          encode_batch_size=encode_batch_size, save_pipeline=save_pipeline)


def _validate(pipe: DiNODiffusionPipeline, images: np.ndarray, steps: int, batch_size: int, cond_dropout: float,
              prediction_type: str, ema_decay: float, checkpoint_every: int, world: int) -> np.ndarray:
    """Check the arguments; return the images as an array."""
    if not isinstance(pipe, DiNODiffusionPipeline):
        raise TypeError(f"train_ldm: pipe must be a DiNODiffusionPipeline, got {type(pipe).__name__}.")
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or len(arr) == 0:
        raise ValueError(f"train_ldm: images must be a non-empty uint8 (N, H, W) or (N, H, W, 3) array, got "
                         f"{arr.dtype} {arr.shape}.")
    if arr.shape[1] != pipe.image_size or arr.shape[2] != pipe.image_size:
        raise ValueError(f"train_ldm: images are {arr.shape[1]}x{arr.shape[2]} px but the pipeline generates "
                         f"{pipe.image_size} px; resize with medlib.diffusion.vae.resize_images(images, "
                         f"{pipe.image_size}).")
    if steps <= 0 or batch_size <= 0 or checkpoint_every <= 0:
        raise ValueError(f"train_ldm: steps={steps}, batch_size={batch_size} and checkpoint_every={checkpoint_every} "
                         "must be positive.")
    if batch_size % world:
        raise ValueError(f"train_ldm: batch_size={batch_size} (global) must be divisible by the {world} processes.")
    if not 0.0 <= cond_dropout <= 1.0:
        raise ValueError(f"train_ldm: cond_dropout={cond_dropout} must be a probability in [0, 1].")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"train_ldm: prediction_type={prediction_type!r}; choose 'epsilon' or 'v_prediction'.")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"train_ldm: ema_decay={ema_decay} must be in [0, 1) (0 disables the EMA).")
    return arr


def _train_ldm(pipe: DiNODiffusionPipeline, images: np.ndarray, *, steps: int, batch_size: int, lr: float,
               cond_dropout: float, min_snr_gamma: float | None, prediction_type: str, ema_decay: float, device: str,
               seed: int, out_dir: Path, progress: bool, warmup_steps: int, weight_decay: float, max_grad_norm: float,
               checkpoint_every: int, stop_after: int | None, mixed_precision: str, encode_batch_size: int,
               save_pipeline: bool) -> LDMResult:
    """The body of :func:`train_ldm` (inside a forked torch RNG)."""
    from ..ssl.train import batch_indices

    t0 = time.perf_counter()
    accelerator = make_accelerator(device, mixed_precision)
    rank, world, dev = accelerator.process_index, accelerator.num_processes, accelerator.device
    arr = _validate(pipe, images, steps, batch_size, cond_dropout, prediction_type, ema_decay, checkpoint_every, world)
    data_fp = array_fingerprint(arr)

    pipe.vae.to(dev).eval().requires_grad_(False)
    pipe.image_encoder.to(dev).eval()
    with accelerator.main_process_first():
        cached = cache_conditioning(pipe, arr, out_dir / "cache", batch_size=encode_batch_size,
                                    data_fingerprint=data_fp)
    store = dev if cached["latent_mean"].nbytes * 3 < 2**31 else torch.device("cpu")
    latent_mean, latent_std, tokens_all = (torch.from_numpy(np.array(cached[n], order="C")).to(store)
                                           for n in _CACHE_FILES)
    shift = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)
    scale = float(pipe.vae.config.scaling_factor)

    if pipe.prediction_type != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    noise_scheduler = pipe.training_scheduler()
    unet = pipe.unet
    run_key = stable_hash({"data": data_fp, "unet": _public(unet.config), "vae": module_fingerprint(pipe.vae),
                           "encoder": module_fingerprint(pipe.image_encoder), "seed": seed, "batch_size": batch_size,
                           "lr": lr, "cond_dropout": cond_dropout, "min_snr_gamma": min_snr_gamma,
                           "prediction_type": prediction_type, "ema_decay": ema_decay, "warmup_steps": warmup_steps,
                           "weight_decay": weight_decay, "max_grad_norm": max_grad_norm,
                           "schedule": _public(noise_scheduler.config)})
    checkpointer = Checkpointer(out_dir)
    state = checkpointer.load(map_location=dev)
    unet.to(dev).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[dict[str, Any]] = []
    start_step, past_wall = 0, 0.0
    if state is not None:
        if state.get("format") != _FORMAT or state.get("run_key") != run_key:
            raise ValueError(f"{checkpointer.path} belongs to a different run (data, recipe, seed, VAE, encoder or "
                             "UNet changed). Use another out_dir, or delete the checkpoint to start over.")
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_step, past_wall = list(state["history"]), int(state["step"]), float(state["wall_time_s"])
        if int(state["world_size"]) != world:
            warnings.warn(f"Resuming a run made with {state['world_size']} processes on {world}: the batches "
                          "differ from an uninterrupted run.", stacklevel=3)
    ema = None
    if ema_decay > 0:
        ema = EMAModel(unet.parameters(), decay=ema_decay, min_decay=0.0, model_cls=UNet2DConditionModel,
                       model_config=unet.config)
        if state is not None:
            ema.load_state_dict(state["ema"])
        ema.to(dev)
    model, optimizer = accelerator.prepare(unet, optimizer)

    local_batch = batch_size // world
    end_step = steps if stop_after is None else min(steps, start_step + stop_after)
    session_t0, steps_run = time.perf_counter(), 0
    bar = progress_bar(range(start_step, end_step), enabled=progress and accelerator.is_main_process, desc="LDM",
                       total=max(0, end_step - start_step))
    for step in bar:
        torch.manual_seed(derive_seed(seed, step, rank, 1))  # UNet dropout, if configured
        generator = torch.Generator().manual_seed(derive_seed(seed, step, rank, 3))
        idx = batch_indices(len(arr), batch_size, seed, step)[rank * local_batch:(rank + 1) * local_batch]
        sel = torch.from_numpy(idx).to(store)
        mean, std, cond = (t[sel].to(dev) for t in (latent_mean, latent_std, tokens_all))
        cond, dropped = drop_condition(cond, cond_dropout, generator)
        eps_z = torch.randn(mean.shape, generator=generator).to(dev)
        latents = (mean + std * eps_z - shift) * scale
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(dev)
        current_lr = _lr_at(step, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = current_lr
        loss, mse = diffusion_loss(model, noise_scheduler, latents, cond, noise, timesteps, prediction_type,
                                   min_snr_gamma, autocast=accelerator.autocast)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_ldm: non-finite loss at step {step}; lower lr (now {lr}) or raise "
                                     f"warmup_steps (now {warmup_steps}).")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = float("nan")
        if max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm))
        optimizer.step()
        if ema is not None:
            ema.step(unet.parameters())
        row = {"step": step, "loss": loss.item(), "mse": mse.item(), "lr": current_lr, "grad_norm": grad_norm,
               "dropped": float(dropped.float().mean())}
        history.append(row)
        steps_run += 1
        bar.set_postfix(loss=f"{row['loss']:.4f}", mse=f"{row['mse']:.4f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == end_step:
            _save(checkpointer, accelerator, unet, optimizer, ema, history, done,
                  past_wall + time.perf_counter() - t0, run_key, world)
    session_s = time.perf_counter() - session_t0
    steps_done = start_step + steps_run
    wall = past_wall + time.perf_counter() - t0
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # remove accelerate's autocast patch from pipe.unet
    if steps_run == 0 and not checkpointer.exists():
        _save(checkpointer, accelerator, unet, optimizer, ema, history, steps_done, wall, run_key, world)
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    pipeline_dir = out_dir / "pipeline" if save_pipeline else None
    result = LDMResult(pipe=pipe, history=pd.DataFrame(history), out_dir=out_dir, checkpoint=checkpointer.path,
                       pipeline_dir=pipeline_dir, steps_done=steps_done, wall_time_s=wall,
                       images_per_s=steps_run * batch_size / session_s if steps_run else float("nan"))
    if accelerator.is_main_process:
        _write_outputs(result, seed, data_fp, str(dev), world, recipe=dict(
            steps=steps, batch_size=batch_size, lr=lr, cond_dropout=cond_dropout, min_snr_gamma=min_snr_gamma,
            prediction_type=prediction_type, ema_decay=ema_decay, warmup_steps=warmup_steps,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm))
    accelerator.wait_for_everyone()
    return result


def _save(checkpointer: Checkpointer, accelerator, unet: torch.nn.Module, optimizer, ema: EMAModel | None,
          history: list[dict[str, Any]], step: int, wall: float, run_key: str, world: int) -> None:
    """Write the resumable state (main process only), then wait for every process."""
    if accelerator.is_main_process:
        checkpointer.save({
            "format": _FORMAT, "run_key": run_key, "step": step, "wall_time_s": wall, "world_size": world,
            "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "history": history,
        })
    accelerator.wait_for_everyone()


def _write_outputs(result: LDMResult, seed: int, data_fp: str, device: str, world: int,
                   recipe: dict[str, Any]) -> None:
    """history.csv, run.json (recipe, timing, provenance) and the pipeline folder."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result.history.to_csv(out / "history.csv", index=False)
    if result.pipeline_dir is not None:
        result.pipe.save_pretrained(result.pipeline_dir)
    last = result.history.iloc[-1].to_dict() if len(result.history) else {}
    save_json(out / "run.json", {
        "recipe": recipe, "steps_done": result.steps_done, "wall_time_s": result.wall_time_s,
        "images_per_s": None if math.isnan(result.images_per_s) else result.images_per_s, "device": device,
        "processes": world, "final": {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))},
        "provenance": provenance(seed=seed, data_fingerprint=data_fp, wall_time_s=result.wall_time_s),
    })

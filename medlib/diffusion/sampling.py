"""Sampling from a :class:`~medlib.diffusion.pipeline.DiNODiffusionPipeline`: seeded batched generation,
new conditions near the data manifold, and the UNet's cross-attention maps per condition token.

Any study can use these; study 4's protocol (which images, which settings, which tables) lives in
:mod:`medlib.studies.dino_diffusion`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..engine import derive_seed, progress as progress_bar
from .pipeline import DiNODiffusionPipeline, manifold_sample


def to_gray(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H, W) by the channel mean; grey input passes through."""
    arr = np.asarray(images)
    return arr if arr.ndim == 3 else arr.mean(axis=-1).round().astype(np.uint8)


def check_pipeline(pipe: Any, where: str) -> DiNODiffusionPipeline:
    """The pipeline itself, or the one a handle holds (``.pipe``, e.g. an ``LDMHandle``); a clear TypeError otherwise."""
    pipe = getattr(pipe, "pipe", pipe)
    if not isinstance(pipe, DiNODiffusionPipeline):
        raise TypeError(f"{where}: needs a DiNODiffusionPipeline (medlib.diffusion.build.get_ldm(profile).pipe), "
                        f"got {type(pipe).__name__}.")
    return pipe


def generate(pipe: Any, *, images: np.ndarray | None = None,
             tokens: np.ndarray | torch.Tensor | None = None, num_images_per_condition: int = 1,
             guidance_scale: float = 2.0, num_inference_steps: int = 20, seed: int = 0, batch_size: int = 64,
             progress: bool = False) -> np.ndarray:
    """Grey uint8 images (N x k, H, W) conditioned on real images' global tokens or on given tokens.

    Conditions are processed in batches of about ``batch_size`` generated images; batch b draws its
    noise from ``derive_seed(seed, b)`` on the CPU, so results do not depend on the device's RNG.
    The k images of condition i are rows ``i*k .. i*k + k - 1``.
    """
    pipe = check_pipeline(pipe, "generate")
    if (images is None) == (tokens is None):
        raise ValueError("generate: pass exactly one of images= (uint8 real images) or tokens= (condition tokens).")
    if num_images_per_condition < 1 or batch_size < 1 or num_inference_steps < 1:
        raise ValueError(f"generate: num_images_per_condition={num_images_per_condition}, batch_size={batch_size} "
                         f"and num_inference_steps={num_inference_steps} must be >= 1.")
    cond = pipe.encode_condition(images) if images is not None else torch.as_tensor(
        np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).float().to(pipe.device)
    if len(cond) == 0:
        raise ValueError("generate: no conditions given.")
    per_batch = max(1, batch_size // num_images_per_condition)
    out = []
    starts = range(0, len(cond), per_batch)
    for b, start in enumerate(progress_bar(starts, enabled=progress, desc="sampling", total=len(starts))):
        generator = torch.Generator().manual_seed(derive_seed(seed, b))
        batch = pipe(condition_tokens=cond[start:start + per_batch], num_images_per_condition=num_images_per_condition,
                     guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generator)
        out.append(to_gray(batch))
    return np.concatenate(out)


def manifold_conditions(pipe: Any, bank_images: np.ndarray, n: int, *, k: int = 5,
                        seed: int = 0) -> torch.Tensor:
    """n new condition token sets: Dirichlet mixtures of k nearest neighbours in the bank images' tokens."""
    pipe = check_pipeline(pipe, "manifold_conditions")
    bank = pipe.encode_condition(np.asarray(bank_images)).cpu()
    return manifold_sample(bank, n, k=min(int(k), len(bank)), rng=seed)


def token_names(pipe: Any) -> list[str]:
    """Names of the condition tokens in order: cls, pooled, register_0 ..."""
    pipe = check_pipeline(pipe, "token_names")
    names = []
    for kind in pipe.image_encoder.config.tokens:
        if kind == "registers":
            names += [f"register_{i}" for i in range(pipe.image_encoder.backbone.num_register_tokens)]
        else:
            names.append(kind)
    return names


class _CrossAttentionCapture:
    """A diffusers attention processor (the plain AttnProcessor's computation) keeping the attention probabilities."""

    def __init__(self, store: list[torch.Tensor]) -> None:
        self.store = store

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, queries, tokens)
        if cross:
            b = hidden_states.shape[0]
            self.store.append(probs.detach().float().reshape(b, -1, *probs.shape[1:]).mean(dim=1).cpu())
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@torch.no_grad()
def cross_attention_maps(pipe: Any, images: np.ndarray, *, num_inference_steps: int = 20,
                         seed: int = 0) -> np.ndarray:
    """(N, T, h, w) float maps: each condition token's cross-attention share per latent cell.

    The UNet's cross-attention layers (``attn2``) get a capturing processor while the pipeline generates
    from each image's own tokens without guidance (the conditional branch only); the probabilities are
    averaged over heads, resized to the latent grid, and averaged over layers and sampling steps.
    Softmax runs over the T global tokens, so the T maps sum to 1 in every cell: with T = 2 (CLS and
    pooled) one map is the complement of the other.
    """
    pipe = check_pipeline(pipe, "cross_attention_maps")
    unet = pipe.unet
    original = dict(unet.attn_processors)
    if not any(name.endswith("attn2.processor") for name in original):
        raise ValueError("cross_attention_maps: the UNet has no cross-attention (attn2) layers.")
    store: list[torch.Tensor] = []
    capture = _CrossAttentionCapture(store)
    unet.set_attn_processor({name: capture if name.endswith("attn2.processor") else proc
                             for name, proc in original.items()})
    try:
        generate(pipe, images=np.asarray(images), guidance_scale=1.0, num_inference_steps=num_inference_steps,
                 seed=seed, batch_size=len(images))
    finally:
        unet.set_attn_processor(original)
    size = int(unet.config.sample_size)
    total = None
    for probs in store:  # (B, queries, T)
        side = int(round(math.sqrt(probs.shape[1])))
        maps = probs.reshape(probs.shape[0], side, side, probs.shape[2]).permute(0, 3, 1, 2)
        maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        total = maps if total is None else total + maps
    return (total / len(store)).numpy()

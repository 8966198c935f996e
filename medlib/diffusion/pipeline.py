"""DiNO-Diffusion (Jimenez-Perez et al. 2024): a latent diffusion model conditioned on a frozen DINO encoder's GLOBAL tokens.

:class:`DiNODiffusionPipeline` is a diffusers ``DiffusionPipeline`` with four components:

* ``vae``: an ``AutoencoderKL`` (frozen during LDM training; see :mod:`medlib.diffusion.vae`),
* ``unet``: a ``UNet2DConditionModel`` whose cross-attention reads the condition tokens through its
  ``encoder_hid_dim`` projection (encoder width D -> ``cross_attention_dim``),
* ``scheduler``: DDIM or DPM-Solver++ (:func:`make_scheduler`; switch with ``pipe.use_scheduler(kind)``),
* ``image_encoder``: a :class:`DinoConditionEncoder`, a frozen medlib :class:`~medlib.models.backbones.Backbone`
  wrapped as a diffusers ``ModelMixin``: its config (backbone name, timm architecture, input size,
  normalisation, token kinds) and weights live in the ``image_encoder/`` subfolder, so
  ``pipe.save_pretrained(d)`` / ``DiNODiffusionPipeline.from_pretrained(d)`` round-trip the whole model.

The condition of an image is its GLOBAL tokens only, stacked as (B, T, D): the CLS token, the mean of the
patch tokens and the register tokens when the backbone has them (T = 2 + registers); never patch tokens,
which would let the model copy the image (the paper's argument). Classifier-free guidance uses an all-zero
token set as the unconditional condition (our choice; the UNet's projection bias makes it a learned null
embedding), the same zeros that replace a training condition with probability ``cond_dropout``.

Outputs are uint8 images: (N, H, W) for the default one-channel VAE (radiographs are grey), (N, H, W, 3)
for a three-channel VAE.

Beyond reconstruction (conditioning on a real image's tokens), new conditions come from :func:`slerp`
(between two images' tokens) and :func:`manifold_sample` (Dirichlet mixtures of k nearest neighbours in a
bank of real tokens: our assumption of what "sampling on the embedding manifold" means; the paper does not say).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from ..config import autocast_dtype
from ..data.transforms import NORMALIZATIONS, ClassificationTransform
from ..models.backbones import BACKBONES, Backbone, BackboneSpec, create_backbone
from .vae import vae_output_to_images, vae_scale_factor

__all__ = [
    "DiNODiffusionPipeline", "DinoConditionEncoder", "SCHEDULERS", "TOKEN_KINDS", "build_pipeline", "make_scheduler",
    "manifold_sample", "null_condition_like", "slerp", "small_unet_config",
]

#: The global token kinds a condition may stack, in this order.
TOKEN_KINDS = ("cls", "pooled", "registers")
#: Sampling schedulers by short name.
SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}

# Stable-Diffusion-style noise schedule (scaled linear betas), "trailing" spacing so that few-step sampling
# starts from pure noise (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed").
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="trailing", steps_offset=0)


# --------------------------------------------------------------------------- the frozen image encoder


class DinoConditionEncoder(ModelMixin, ConfigMixin):
    """A frozen medlib backbone as a diffusers model: uint8 images -> global condition tokens (B, T, D).

    Saved like any diffusers model (config.json + safetensors); the architecture is rebuilt from the config
    with ``create_backbone(..., pretrained=False)`` and the weights come from the saved file. Build one from
    a loaded backbone with :meth:`from_backbone` (the constructor alone gives random weights).
    """

    @register_to_config
    def __init__(self, backbone_name: str, arch: str, arch_kwargs: dict | None = None, kind: str = "vit",
                 image_size: int = 224, normalize: str = "imagenet", tokens: Sequence[str] = TOKEN_KINDS) -> None:
        super().__init__()
        bad = [t for t in tokens if t not in TOKEN_KINDS]
        if bad or not tokens or "patch" in tokens:
            raise ValueError(f"DinoConditionEncoder: tokens={list(tokens)}; choose from {TOKEN_KINDS} (global tokens "
                             "only: patch tokens are never a condition).")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"DinoConditionEncoder: normalize={normalize!r}; choose one of {NORMALIZATIONS}.")
        self.backbone: Backbone = create_backbone(_spec_from_config(backbone_name, arch, arch_kwargs or {}, kind),
                                                  pretrained=False, image_size=image_size)
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    @classmethod
    def from_backbone(cls, backbone: Backbone, tokens: Sequence[str] = TOKEN_KINDS,
                      normalize: str = "imagenet") -> DinoConditionEncoder:
        """Wrap (a copy of the weights of) a medlib Backbone; ``normalize`` as in ClassificationTransform."""
        if not isinstance(backbone, Backbone):
            raise TypeError(f"DinoConditionEncoder.from_backbone needs a medlib Backbone (create_backbone(...)), "
                            f"got {type(backbone).__name__}.")
        encoder = cls(backbone_name=backbone.name, arch=backbone.spec.arch, arch_kwargs=dict(backbone.spec.kwargs),
                      kind=backbone.kind, image_size=int(backbone.image_size), normalize=normalize,
                      tokens=list(tokens))
        encoder.backbone.load_state_dict(backbone.state_dict())
        return encoder.to(next(backbone.parameters()).device)

    @property
    def embed_dim(self) -> int:
        """Width D of every token."""
        return int(self.backbone.embed_dim)

    @property
    def num_tokens(self) -> int:
        """T: how many global tokens one image's condition holds (CLS, pooled, registers as configured)."""
        kinds = self.config.tokens
        return sum(1 for k in kinds if k != "registers") + (self.backbone.num_register_tokens
                                                            if "registers" in kinds else 0)

    def train(self, mode: bool = True) -> DinoConditionEncoder:
        """The encoder is frozen: it stays in eval mode whatever ``mode`` says."""
        super().train(mode)
        self.backbone.eval()
        return self

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W[, 3]) -> normalised float (N, 3, S, S) on the encoder's device (resize, no crop)."""
        arr = images if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype not in (np.uint8, torch.uint8) or arr.ndim not in (3, 4):
            raise ValueError(f"DinoConditionEncoder: images must be uint8 (N, H, W) or (N, H, W, 3), got "
                             f"{arr.dtype} {tuple(arr.shape)}.")
        size = int(self.config.image_size)
        transform = ClassificationTransform(size, train=False, normalize=self.config.normalize, resize=size)
        return transform(arr, device=self.device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> global tokens (B, T, D) in the configured order."""
        feats = self.backbone.features(pixel_values)
        parts = []
        for kind in self.config.tokens:
            parts.append(feats[kind] if kind == "registers" else feats[kind][:, None])
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images -> float32 tokens (N, T, D), in batches, without gradients."""
        n = len(images)
        if n == 0:
            raise ValueError("DinoConditionEncoder.encode: no images given.")
        out = [self(self.preprocess(images[s:s + batch_size])).float() for s in range(0, n, batch_size)]
        return torch.cat(out)


def _spec_from_config(name: str, arch: str, kwargs: dict, kind: str) -> BackboneSpec:
    """The registry spec when it matches the saved architecture, else an ad-hoc local spec."""
    registered = BACKBONES.get(name)
    if registered is not None and registered.arch == arch and dict(registered.kwargs) == dict(kwargs):
        return registered
    return BackboneSpec(name=name, kind=kind, arch=arch, kwargs=dict(kwargs), source="local",
                        description=f"image encoder of a DiNO-Diffusion pipeline ({arch} {kwargs})")


# --------------------------------------------------------------------------- building blocks


def make_scheduler(kind: str = "ddim", prediction_type: str = "epsilon", **overrides: Any):
    """A sampling scheduler ("ddim" or "dpm++" = DPM-Solver++ order 2) on the Stable-Diffusion noise schedule."""
    if kind not in SCHEDULERS:
        raise ValueError(f"make_scheduler: kind={kind!r}; choose one of {sorted(SCHEDULERS)}.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"make_scheduler: prediction_type={prediction_type!r}; choose 'epsilon' or 'v_prediction'.")
    config = dict(_SCHEDULE, prediction_type=prediction_type, **overrides)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **config)
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **config)


def small_unet_config(sample_size: int, in_channels: int, encoder_hid_dim: int,
                      block_out_channels: Sequence[int] = (64, 128, 256), layers_per_block: int = 2,
                      cross_attention_dim: int = 256, attention_head_dim: int = 32,
                      norm_num_groups: int | None = None) -> dict[str, Any]:
    """Keyword arguments of a small ``UNet2DConditionModel`` with cross-attention at every level.

    ``attention_head_dim`` is the width of each attention head, so level c has c / attention_head_dim heads.
    diffusers' ``UNet2DConditionModel`` reads its own ``attention_head_dim`` as the number of *heads* (a
    naming issue it keeps for compatibility, huggingface/diffusers#2011), so the heads per level are what
    it is given: passing 32 there would make 32 heads of width 1 at a 32-channel level.
    """
    channels = tuple(int(c) for c in block_out_channels)
    if len(channels) < 2:
        raise ValueError(f"small_unet_config: block_out_channels={block_out_channels} needs at least two levels.")
    if attention_head_dim < 1 or any(c % attention_head_dim for c in channels):
        raise ValueError(f"small_unet_config: attention_head_dim={attention_head_dim} must divide every level width "
                         f"{channels} (each level has width / attention_head_dim heads).")
    heads = tuple(c // int(attention_head_dim) for c in channels)
    if sample_size % 2 ** (len(channels) - 1):
        raise ValueError(f"small_unet_config: latent size {sample_size} must be divisible by "
                         f"{2 ** (len(channels) - 1)} ({len(channels)} levels).")
    groups = norm_num_groups if norm_num_groups is not None else min(32, *channels)
    if any(c % groups for c in channels):
        raise ValueError(f"small_unet_config: norm_num_groups={groups} must divide every level width {channels}.")
    return dict(
        sample_size=int(sample_size), in_channels=int(in_channels), out_channels=int(in_channels),
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=int(layers_per_block), norm_num_groups=int(groups),
        cross_attention_dim=int(cross_attention_dim), attention_head_dim=heads,  # heads per level, see above
        encoder_hid_dim=int(encoder_hid_dim), encoder_hid_dim_type="text_proj",
    )


def build_pipeline(backbone: Backbone | DinoConditionEncoder, vae: AutoencoderKL, *,
                   unet_block_out_channels: Sequence[int] = (64, 128, 256), layers_per_block: int = 2,
                   cross_attention_dim: int = 256, attention_head_dim: int = 32, norm_num_groups: int | None = None,
                   scheduler: str = "ddim", prediction_type: str = "epsilon", tokens: Sequence[str] = TOKEN_KINDS,
                   normalize: str = "imagenet", seed: int = 0) -> DiNODiffusionPipeline:
    """A fresh DiNO-Diffusion pipeline around a (trained) VAE and a frozen backbone; UNet init seeded."""
    encoder = backbone if isinstance(backbone, DinoConditionEncoder) else DinoConditionEncoder.from_backbone(
        backbone, tokens=tokens, normalize=normalize)
    latent_size = int(vae.config.sample_size) // vae_scale_factor(vae)
    config = small_unet_config(latent_size, vae.config.latent_channels, encoder.embed_dim, unet_block_out_channels,
                               layers_per_block, cross_attention_dim, attention_head_dim, norm_num_groups)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return DiNODiffusionPipeline(vae=vae, unet=unet, scheduler=make_scheduler(scheduler, prediction_type),
                                 image_encoder=encoder)


def null_condition_like(tokens: torch.Tensor) -> torch.Tensor:
    """The unconditional condition: an all-zero token set of the same shape (classifier-free guidance)."""
    return torch.zeros_like(tokens)


# --------------------------------------------------------------------------- the pipeline


class DiNODiffusionPipeline(DiffusionPipeline):
    """Latent diffusion conditioned on a frozen DINO encoder's global tokens (CLS, pooled, registers)."""

    model_cpu_offload_seq = "image_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDIMScheduler,
                 image_encoder: DinoConditionEncoder) -> None:
        super().__init__()
        _check_components(vae, unet, image_encoder)
        vae.eval()  # sampling in train mode takes other kernels (and would apply dropout)
        unet.eval()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, image_encoder=image_encoder)

    # ----------------------------------------------------------------- properties
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return vae_scale_factor(self.vae)

    @property
    def image_size(self) -> int:
        """Side of the generated images in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def num_condition_tokens(self) -> int:
        """T: tokens per condition."""
        return self.image_encoder.num_tokens

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts ("epsilon" or "v_prediction"), as the scheduler is configured."""
        return str(self.scheduler.config.prediction_type)

    def use_scheduler(self, kind: str) -> DiNODiffusionPipeline:
        """Switch the sampler ("ddim" or "dpm++"), keeping the noise schedule and prediction type; returns self."""
        fresh = make_scheduler(kind, self.prediction_type)
        keep = {k: v for k, v in self.scheduler.config.items() if k in fresh.config and not k.startswith("_")
                and k not in ("algorithm_type", "solver_order")}
        self.scheduler = SCHEDULERS[kind].from_config(fresh.config, **keep)
        return self

    def training_scheduler(self) -> DDPMScheduler:
        """A DDPM scheduler on the same noise schedule, for ``add_noise`` / ``get_velocity`` / SNR in training."""
        return DDPMScheduler.from_config(self.scheduler.config)

    # ----------------------------------------------------------------- conditions
    def encode_condition(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 images (N, H, W[, 3]) -> global condition tokens (N, T, D) on the pipeline's device."""
        return self.image_encoder.encode(images, batch_size=batch_size)

    def null_condition(self, n: int) -> torch.Tensor:
        """n unconditional (all-zero) token sets (n, T, D)."""
        return torch.zeros(n, self.num_condition_tokens, self.image_encoder.embed_dim, device=self.device)

    def _condition(self, images: Any, condition_tokens: Any,
                   num_images_per_condition: int) -> tuple[torch.Tensor, bool]:
        """(tokens (N, T, D) repeated per condition, whether the generation is conditional)."""
        if num_images_per_condition < 1:
            raise ValueError(f"num_images_per_condition={num_images_per_condition} must be >= 1.")
        if images is not None and condition_tokens is not None:
            raise ValueError("Pass images= or condition_tokens=, not both.")
        if images is None and condition_tokens is None:
            return self.null_condition(num_images_per_condition), False
        if images is not None:
            tokens = self.encode_condition(images)
        else:
            tokens = torch.as_tensor(np.asarray(condition_tokens) if not isinstance(condition_tokens, torch.Tensor)
                                     else condition_tokens).float().to(self.device)
            expected = (self.num_condition_tokens, self.image_encoder.embed_dim)
            if tokens.ndim == 2:
                tokens = tokens[None]
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
                raise ValueError(f"condition_tokens must have shape (N, {expected[0]}, {expected[1]}) (T global tokens "
                                 f"of width D, from encode_condition); got {tuple(tokens.shape)}.")
        return tokens.repeat_interleave(num_images_per_condition, dim=0), True

    # ----------------------------------------------------------------- denoising
    def predict(self, latents: torch.Tensor, t: torch.Tensor | int, tokens: torch.Tensor,
                guidance_scale: float = 1.0) -> torch.Tensor:
        """The UNet's output with classifier-free guidance: u + g (c - u); g = 1 is the conditional output alone."""
        dtype = autocast_dtype(str(latents.device))
        with torch.autocast(latents.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if guidance_scale == 1.0:
                return self.unet(latents, t, encoder_hidden_states=tokens).sample.float()
            both = self.unet(torch.cat([latents, latents]), t,
                             encoder_hidden_states=torch.cat([null_condition_like(tokens), tokens])).sample.float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> VAE output (N, C, H, W) in [-1, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample.clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor | None = None,
                 condition_tokens: np.ndarray | torch.Tensor | None = None, num_images_per_condition: int = 1,
                 guidance_scale: float = 2.0, num_inference_steps: int = 50,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                 eta: float = 0.0, latents: torch.Tensor | None = None) -> np.ndarray | torch.Tensor:
        """Generate images conditioned on ``images`` (via their global tokens) or ``condition_tokens`` (or neither).

        With neither, ``num_images_per_condition`` images are sampled unconditionally (null tokens).
        Returns ``output_type`` "np": uint8 (N, H, W) (one-channel VAE) or (N, H, W, 3); "pt": float
        (N, C, H, W) in [0, 1]; "latent": the final scaled latents. N = conditions x ``num_images_per_condition``.
        ``guidance_scale`` 1 disables classifier-free guidance (the default 2.0 is our choice: the paper does
        not give one); ``eta`` only matters for DDIM. On a GPU the UNet runs under bf16 autocast.
        """
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; choose 'np', 'pt' or 'latent'.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1.")
        tokens, conditional = self._condition(images, condition_tokens, num_images_per_condition)
        scale = float(guidance_scale) if conditional else 1.0
        n, device = tokens.shape[0], self.device
        shape = (n, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = {"eta": eta, "generator": generator} if isinstance(self.scheduler, DDIMScheduler) else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            output = self.predict(model_input, t, tokens, scale)
            latents = self.scheduler.step(output, t, latents, **extra).prev_sample
        if output_type == "latent":
            return latents
        decoded = self.decode_latents(latents.to(self.vae.dtype))
        if output_type == "pt":
            return (decoded.float() + 1) / 2
        return vae_output_to_images(decoded)

    def interpolate(self, image_a: np.ndarray, image_b: np.ndarray, ts: Sequence[float]) -> torch.Tensor:
        """Condition tokens (len(ts), T, D) on the slerp path between two uint8 images' tokens."""
        tokens = self.encode_condition(np.stack([np.asarray(image_a), np.asarray(image_b)]))
        return torch.stack([slerp(tokens[0], tokens[1], float(t)) for t in ts])


def _check_components(vae: AutoencoderKL, unet: UNet2DConditionModel, encoder: DinoConditionEncoder) -> None:
    """Raise ValueError when the VAE, UNet and encoder do not fit together."""
    if not isinstance(encoder, DinoConditionEncoder):
        raise TypeError(f"image_encoder must be a DinoConditionEncoder (wrap a backbone with "
                        f"DinoConditionEncoder.from_backbone), got {type(encoder).__name__}.")
    if unet.config.encoder_hid_dim != encoder.embed_dim:
        raise ValueError(f"unet.config.encoder_hid_dim={unet.config.encoder_hid_dim} but the image encoder's tokens "
                         f"have width {encoder.embed_dim}; build the UNet with encoder_hid_dim={encoder.embed_dim}.")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"unet.config.in_channels={unet.config.in_channels} but the VAE has "
                         f"{vae.config.latent_channels} latent channels; they must match.")


# --------------------------------------------------------------------------- new conditions


def _as_torch(x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(float tensor, whether the input was numpy)."""
    if isinstance(x, torch.Tensor):
        return x.float(), False
    return torch.from_numpy(np.asarray(x, dtype=np.float32)), True


def slerp(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, t: float) -> np.ndarray | torch.Tensor:
    """Spherical interpolation of token sets along the last axis; the norm goes linearly from |a| to |b|.

    Each token's direction follows the great circle from a's to b's direction (linear when they are
    (anti)parallel within 1e-6); ``t`` = 0 gives ``a`` and ``t`` = 1 gives ``b``.
    """
    ta, was_np = _as_torch(a)
    tb, _ = _as_torch(b)
    if ta.shape != tb.shape:
        raise ValueError(f"slerp: a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}.")
    if t == 0:
        out = ta.clone()
    elif t == 1:
        out = tb.clone()
    else:
        na, nb = ta.norm(dim=-1, keepdim=True), tb.norm(dim=-1, keepdim=True)
        ua, ub = ta / na.clamp_min(1e-12), tb / nb.clamp_min(1e-12)
        cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        sin = torch.sin(theta)
        near = sin.abs() < 1e-6
        safe = torch.where(near, torch.ones_like(sin), sin)
        direction = torch.where(near, (1 - t) * ua + t * ub,
                                (torch.sin((1 - t) * theta) * ua + torch.sin(t * theta) * ub) / safe)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out = direction * ((1 - t) * na + t * nb)
    return out.numpy() if was_np else out.to(a.dtype)


def manifold_sample(tokens_bank: np.ndarray | torch.Tensor, n: int, k: int = 5,
                    rng: np.random.Generator | int | None = None, alpha: float = 1.0) -> np.ndarray | torch.Tensor:
    """n new conditions: for a random anchor, a Dirichlet(alpha)-weighted mix of its k nearest bank entries.

    Neighbours are found on the flattened tokens (Euclidean, the anchor is its own first neighbour), so a
    new condition stays inside the convex hull of a small neighbourhood of real conditions. Our
    assumption; the paper does not describe how it samples the embedding manifold.
    """
    from sklearn.neighbors import NearestNeighbors

    bank, was_np = _as_torch(tokens_bank)
    if bank.ndim != 3:
        raise ValueError(f"manifold_sample: tokens_bank must be (M, T, D) condition tokens, got {tuple(bank.shape)}.")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"manifold_sample: k={k} must be in 1..{bank.shape[0]} (the bank size).")
    if n < 1 or alpha <= 0:
        raise ValueError(f"manifold_sample: n={n} must be >= 1 and alpha={alpha} > 0.")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    flat = bank.reshape(bank.shape[0], -1).cpu().numpy().astype(np.float64)
    anchors = rng.integers(0, bank.shape[0], size=n)
    _, neighbours = NearestNeighbors(n_neighbors=k).fit(flat).kneighbors(flat[anchors])
    weights = rng.dirichlet(np.full(k, float(alpha)), size=n)
    mixed = np.einsum("nk,nkf->nf", weights, flat[neighbours]).reshape(n, *bank.shape[1:]).astype(np.float32)
    return mixed if was_np else torch.from_numpy(mixed).to(device=tokens_bank.device, dtype=tokens_bank.dtype)


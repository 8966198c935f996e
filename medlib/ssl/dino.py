"""The DINOv2 recipe, piece by piece: multi-crop, heads, DINO / iBOT / KoLeo losses, centering, EMA, schedules.

Every piece is a small function or module that the training loop in :mod:`medlib.ssl.train` composes.
Choices that DINOv2's public code leaves open, or that we make differently, are marked "our choice":

- Heads: DINO and iBOT heads are *separate* by default (the DINOv2 paper unties them: "untying head
  weights ... improves performance"); ``separate_ibot_head=False`` shares one head.
- Masking: block-wise like DINOv2's ``MaskingGenerator`` (rectangles of >= 4 patches, aspect 0.3..3.3),
  topped up with random single patches so every masked image gets exactly the sampled count. As in
  DINOv2's collate, exactly ``int(n_images * mask_probability)`` images of a batch are masked and their
  ratios are stratified over ``mask_ratio`` (so the share of masked images is the probability, without
  batches that happen to have no masked image).
- iBOT loss: each masked image's token losses are averaged (weight 1 / #masked patches); the sum over
  images is divided by the number of *all* global-crop images, masked or not, as DINOv2's
  ``forward_masked`` does.
- Multi-crop: crops are cut with ``torchvision.ops.roi_align`` (bilinear, area-averaged when shrinking)
  for the whole batch at once; aspect ratio 3/4..4/3 is sampled and a box that does not fit is clipped to
  the image (torchvision retries ten times instead). Colour jitter applies brightness, contrast and
  saturation in a fixed order (no hue: a no-op on grey-level medical images). Gaussian-blur sigma
  (0.1..2.0 px at 224 px) is scaled with the crop size, so small crops are blurred like their 224 px
  counterparts would be.
- KoLeo: on the student's backbone CLS of each global crop, summed over the two crops (as DINOv2).
- Drop path: linearly increasing over blocks (timm's rule) up to ``drop_path``; the teacher has none.
- Last-layer freezing: the heads' last-layer gradients are dropped (set to None, as DINO v1 does), so
  AdamW neither moves nor decays them during ``freeze_last_layer_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import SSLConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights

# ----------------------------------------------------------------------------------------------
# Multi-crop augmentation
# ----------------------------------------------------------------------------------------------


def sample_boxes(rng: np.random.Generator, n: int, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """``n`` random-resized-crop boxes (x0, y0, x1, y1) in pixels: area share in ``scale``, log-uniform aspect."""
    area = height * width * rng.uniform(scale[0], scale[1], size=n)
    log_ratio = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=n)
    aspect = np.exp(log_ratio)
    w = np.minimum(np.sqrt(area * aspect), width)
    h = np.minimum(np.sqrt(area / aspect), height)
    x0 = rng.uniform(0.0, 1.0, size=n) * (width - w)
    y0 = rng.uniform(0.0, 1.0, size=n) * (height - h)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of a (n, C, H, W) batch as (n, 1, H, W) (the image itself when C == 1)."""
    if x.shape[1] == 1:
        return x
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def gaussian_blur_batch(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image of a (n, C, H, W) batch with its own sigma (separable kernel, reflect padding)."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    radius = max(1, int(math.ceil(2.0 * float(sigmas.max()))))
    radius = min(radius, h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigmas[:, None].to(x.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    k = kernel.shape[1]
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)
    return y.view(n, c, h, w)


@dataclass(frozen=True)
class MultiCropAugment:
    """DINOv2 multi-crop on a uint8 (B, C, H, W) batch: 2 global + ``n_local`` local crops, normalised.

    Random parameters come from a numpy Generator (sampled on the CPU, applied on the batch's device),
    so the same generator state gives the same crops on any device. Probabilities per view follow
    DINOv2: blur 1.0 / 0.1 / 0.5 (global 1 / global 2 / local), solarisation 0.2 on global 2 only.
    """

    global_size: int
    local_size: int
    n_local: int
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_reference_size: int = 224
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def from_config(cls, cfg: SSLConfig, **overrides: Any) -> "MultiCropAugment":
        """The augmentation an :class:`SSLConfig` describes (vertical flips with p 0.5 when asked)."""
        kwargs: dict[str, Any] = dict(global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local,
                                      global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale),
                                      vflip_p=0.5 if cfg.vertical_flip else 0.0, grayscale_p=cfg.grayscale_p)
        kwargs.update(overrides)
        return cls(**kwargs)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(global_crops (2B, C, G, G), local_crops (n_local*B, C, L, L) or None)``, view-major order."""
        if images.ndim != 4:
            raise ValueError(f"MultiCropAugment expects a (B, C, H, W) batch, got shape {tuple(images.shape)}.")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        globals_ = [self._view(x, 1, rng, self.global_size, self.global_scale, self.blur_p[i], self.solarize_p[i])
                    for i in range(2)]
        global_crops = torch.cat(globals_, dim=0)
        if self.n_local == 0:
            return global_crops, None
        local_crops = self._view(x, self.n_local, rng, self.local_size, self.local_scale, self.blur_p[2],
                                 self.solarize_p[2])
        return global_crops, local_crops

    def _view(self, x: torch.Tensor, n_views: int, rng: np.random.Generator, size: int, scale: tuple[float, float],
              blur_p: float, solarize_p: float) -> torch.Tensor:
        """``n_views`` views of each image (view-major): crop, flips, jitter, grey, blur, solarise, normalise."""
        b, c, h, w = x.shape
        n = b * n_views
        boxes = torch.from_numpy(sample_boxes(rng, n, h, w, scale, self.ratio)).to(x.device, x.dtype)
        source = (torch.arange(n, device=x.device) % max(b, 1)).to(x.dtype)
        rois = torch.cat([source[:, None], boxes], dim=1)
        from torchvision.ops import roi_align

        out = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

        def flags(p: float) -> torch.Tensor:
            return torch.from_numpy(rng.uniform(size=n) < p).to(x.device).view(n, 1, 1, 1)

        def factors(strength: float, active: np.ndarray) -> torch.Tensor:
            f = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=n)
            return torch.from_numpy(np.where(active, f, 1.0)).to(x.device, x.dtype).view(n, 1, 1, 1)

        out = torch.where(flags(self.hflip_p), out.flip(-1), out)
        out = torch.where(flags(self.vflip_p), out.flip(-2), out)
        jitter = rng.uniform(size=n) < self.jitter_p
        out = (out * factors(self.brightness, jitter)).clamp(0, 1)
        f_contrast = factors(self.contrast, jitter)
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        out = (f_contrast * out + (1 - f_contrast) * mean).clamp(0, 1)
        f_sat = factors(self.saturation, jitter)
        if c == 3:
            out = (f_sat * out + (1 - f_sat) * _gray(out)).clamp(0, 1)
            out = torch.where(flags(self.grayscale_p), _gray(out).expand_as(out), out)
        else:
            flags(self.grayscale_p)  # keep the random stream independent of the channel count
        blur = rng.uniform(size=n) < blur_p
        sigmas = rng.uniform(self.blur_sigma[0], self.blur_sigma[1], size=n) * size / self.blur_reference_size
        if blur.any():
            idx = torch.from_numpy(np.flatnonzero(blur)).to(x.device)
            blurred = gaussian_blur_batch(out[idx], torch.from_numpy(sigmas[blur]).to(x.device))
            out = out.index_copy(0, idx, blurred)
        out = torch.where(flags(solarize_p) & (out >= 0.5), 1.0 - out, out)
        mean_t, std_t = self._stats(c, x)
        return (out - mean_t) / std_t

    def _stats(self, c: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation mean / std for ``c`` channels (the channel average for one channel)."""
        mean, std = self.mean, self.std
        if c != len(mean):
            if c != 1:
                raise ValueError(f"Normalisation has {len(mean)} channels but the images have {c}.")
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        return x.new_tensor(mean).view(1, c, 1, 1), x.new_tensor(std).view(1, c, 1, 1)


# ----------------------------------------------------------------------------------------------
# Masking (iBOT)
# ----------------------------------------------------------------------------------------------


def block_mask(grid: tuple[int, int], n_masked: int, rng: np.random.Generator, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> np.ndarray:
    """A (h, w) bool mask with exactly ``n_masked`` patches: random rectangles, then single patches to top up."""
    h, w = grid
    if not 0 <= n_masked <= h * w:
        raise ValueError(f"n_masked={n_masked} must lie in [0, {h * w}] for a {h}x{w} patch grid.")
    mask = np.zeros((h, w), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while mask.sum() < n_masked:
        remaining = n_masked - int(mask.sum())
        added = 0
        for _ in range(10):
            if remaining < min_block:
                break
            target = rng.uniform(min_block, remaining)
            ratio = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(target * ratio)))
            bw = int(round(math.sqrt(target / ratio)))
            if 0 < bh < h and 0 < bw < w:
                top = int(rng.integers(0, h - bh + 1))
                left = int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= remaining:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
                    break
        if added == 0:
            free = np.flatnonzero(~mask.ravel())
            pick = rng.choice(free, size=remaining, replace=False)
            mask.ravel()[pick] = True
    return mask


def sample_masks(n_images: int, grid: tuple[int, int], mask_probability: float,
                 mask_ratio: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """iBOT masks (n_images, h*w) bool: ``int(n * p)`` images masked, ratios stratified over ``mask_ratio``."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability={mask_probability} must lie in [0, 1].")
    lo, hi = mask_ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must satisfy 0 <= low <= high <= 1.")
    n_patches = grid[0] * grid[1]
    n_masked_images = int(n_images * mask_probability)
    edges = np.linspace(lo, hi, n_masked_images + 1)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    for i in range(n_masked_images):
        count = int(n_patches * rng.uniform(edges[i], edges[i + 1]))
        masks[i] = block_mask(grid, count, rng).ravel()
    return torch.from_numpy(masks[rng.permutation(n_images)])


# ----------------------------------------------------------------------------------------------
# Backbone helpers (timm VisionTransformer)
# ----------------------------------------------------------------------------------------------


def check_vit(backbone: nn.Module) -> None:
    """Raise a clear error unless ``backbone`` is a timm VisionTransformer usable for DINOv2 training."""
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "norm", "num_prefix_tokens")
    missing = [name for name in needed if not hasattr(backbone, name)]
    if missing:
        raise TypeError(f"medlib.ssl needs a timm VisionTransformer; {type(backbone).__name__} lacks {missing}. "
                        "Create one with timm.create_model('vit_...', dynamic_img_size=True).")
    if getattr(backbone, "cls_token", None) is None:
        raise ValueError("The backbone has no class token (class_token=False); the DINO loss is computed on it.")
    if not isinstance(backbone.patch_drop, nn.Identity):
        raise ValueError("The backbone uses patch dropout (patch_drop_rate > 0), which would misalign iBOT masks; "
                         "build it with patch_drop_rate=0.")


def patch_grid(backbone: nn.Module, size: int) -> tuple[int, int]:
    """The patch grid (h, w) of a ``size`` x ``size`` input."""
    ph, pw = backbone.patch_embed.patch_size
    return size // ph, size // pw


def vit_tokens(backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``forward_features`` with iBOT masking: masked patch embeddings become ``mask_token`` before pos-embed.

    Returns the normalised tokens (B, prefix + patches, D). ``masks`` is (B, h*w) bool, row-major.
    """
    from timm.models._manipulate import checkpoint_seq

    x = backbone.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, L, D)
    if masks is not None:
        if mask_token is None:
            raise ValueError("vit_tokens: masks given without a mask_token.")
        n_patches = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1]
        if masks.shape != (x.shape[0], n_patches):
            raise ValueError(f"masks has shape {tuple(masks.shape)}, expected ({x.shape[0]}, {n_patches}) "
                             "for this input size and patch size.")
        m = masks.view(*x.shape[:-1], 1)
        x = torch.where(m, mask_token.to(x.dtype).view(*([1] * (x.ndim - 1)), -1), x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    if getattr(backbone, "grad_checkpointing", False) and not torch.jit.is_scripting():
        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return backbone.norm(x)


def set_drop_path(backbone: nn.Module, rate: float) -> None:
    """Set stochastic depth on every block, rising linearly from 0 to ``rate`` (timm's rule)."""
    from timm.layers import DropPath

    blocks = list(backbone.blocks)
    for i, block in enumerate(blocks):
        if not (hasattr(block, "drop_path1") and hasattr(block, "drop_path2")):
            raise TypeError(f"Block {i} ({type(block).__name__}) has no drop_path1/drop_path2; cannot set drop path.")
        r = rate * i / max(1, len(blocks) - 1)
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


def interpolate_pos_embed(model: nn.Module, new_img_size: int | tuple[int, int]) -> nn.Module:
    """Resize a timm ViT's absolute position embeddings to ``new_img_size`` (bicubic, via timm) in place."""
    from timm.layers import resample_abs_pos_embed

    size = (new_img_size, new_img_size) if isinstance(new_img_size, int) else tuple(new_img_size)
    old_grid = tuple(model.patch_embed.grid_size)
    model.patch_embed.set_input_size(img_size=size)
    new_grid = tuple(model.patch_embed.grid_size)
    if model.pos_embed is not None and new_grid != old_grid:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        resized = resample_abs_pos_embed(model.pos_embed.data, new_size=list(new_grid), old_size=list(old_grid),
                                         num_prefix_tokens=n_prefix)
        model.pos_embed = nn.Parameter(resized, requires_grad=model.pos_embed.requires_grad)
    return model


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor] | str | Path) -> nn.Module:
    """Load weights into a timm ViT, resampling ``pos_embed`` to the model's grid when sizes differ (strict)."""
    from timm.layers import resample_abs_pos_embed

    from ..engine import load_weights

    if isinstance(state, (str, Path)):
        state = load_weights(state)
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=n_prefix)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"Backbone weights do not match the architecture: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}. Check the model name / arch_kwargs.")
    return model


# ----------------------------------------------------------------------------------------------
# Heads and the student / teacher container
# ----------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> bottleneck -> L2-norm -> weight-normed prototypes (norm fixed to 1)."""

    def __init__(self, in_dim: int, n_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, n_prototypes, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype logits (..., n_prototypes), each a cosine similarity in [-1, 1]."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class DINOModel(nn.Module):
    """Backbone + DINO head (+ iBOT head) + mask token: the student, and (deep-copied) the teacher."""

    def __init__(self, backbone: nn.Module, n_prototypes: int, hidden_dim: int, bottleneck_dim: int,
                 use_ibot: bool = True, separate_ibot_head: bool = True) -> None:
        super().__init__()
        check_vit(backbone)
        self.backbone = backbone
        dim = backbone.embed_dim
        self.dino_head = DINOHead(dim, n_prototypes, hidden_dim, bottleneck_dim)
        self.ibot_head: nn.Module | None = None
        if use_ibot:
            self.ibot_head = DINOHead(dim, n_prototypes, hidden_dim, bottleneck_dim) if separate_ibot_head \
                else self.dino_head
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, mask_input: bool = True) -> dict[str, torch.Tensor]:
        """Outputs: ``cls`` (global CLS), ``dino_global``, ``dino_local`` and ``ibot`` (logits of masked patches).

        ``mask_input=True`` (student) replaces masked patches by the mask token; ``False`` (teacher) only
        selects the patch tokens at the masked positions for the iBOT head.
        """
        use_masks = masks if (mask_input and self.ibot_head is not None) else None
        tokens = vit_tokens(self.backbone, global_crops, use_masks, self.mask_token)
        cls = tokens[:, 0]
        out = {"cls": cls, "dino_global": self.dino_head(cls)}
        if local_crops is not None:
            out["dino_local"] = self.dino_head(vit_tokens(self.backbone, local_crops)[:, 0])
        if masks is not None and self.ibot_head is not None:
            patches = tokens[:, self.backbone.num_prefix_tokens:]
            out["ibot"] = self.ibot_head(patches[masks])
        return out


# ----------------------------------------------------------------------------------------------
# Losses and teacher centering
# ----------------------------------------------------------------------------------------------


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes in place when running distributed (DDP under accelerate); identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def dino_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Cross-entropy of student crops (n_crops, B, K) vs teacher global crops (n_global, B, K), same views excluded.

    The mean over (student crop, teacher crop) pairs of the batch-mean cross-entropy; the first
    ``n_global`` student crops are the same views as the teacher's.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError("dino_loss expects (n_crops, B, K) student logits and (n_global, B, K) teacher probs.")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    total, terms = student_logits.new_zeros((), dtype=torch.float32), 0
    for t_idx in range(teacher_probs.shape[0]):
        for s_idx in range(student_logits.shape[0]):
            if s_idx == t_idx:
                continue
            total = total - (teacher_probs[t_idx].float() * log_p[s_idx]).sum(-1).mean()
            terms += 1
    if terms == 0:
        raise ValueError("dino_loss needs at least one pair of different views (2 global crops, or local crops).")
    return total / terms


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
              student_temp: float) -> torch.Tensor:
    """iBOT loss on masked patches (M, K): per-image mean over its masked tokens, summed, / number of images."""
    n_images = masks.shape[0]
    if student_logits.shape[0] != int(masks.sum()):
        raise ValueError(f"ibot_loss: {student_logits.shape[0]} token logits but masks select {int(masks.sum())}.")
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    per_token = -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    weights = (1.0 / masks.sum(-1).clamp(min=1).float())[:, None].expand_as(masks)[masks]
    return (per_token * weights).sum() / n_images


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser: -mean log(distance to nearest other row) of L2-normalised ``x``.

    Finite for duplicate rows (distance eps-padded); 0 for a batch of one.
    """
    if x.shape[0] < 2:
        return x.float().sum() * 0.0
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets (n, K): rows sum to 1, prototype (column) mass ~ uniform, across processes."""
    logits = teacher_logits.float()
    n_total = _all_reduce_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
    local_max = logits.max() if logits.numel() else torch.tensor(float("-inf"), device=logits.device)
    max_logit = _all_reduce_max(local_max.detach().clone())  # every process joins, even with no rows
    q = torch.exp((logits - max_logit) / temp).t()  # (K, n)
    k = q.shape[0]
    q /= _all_reduce_sum(q.sum().clone())
    for _ in range(n_iterations):
        q /= _all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_total
    q *= n_total
    return q.t()


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max of ``t`` over processes (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class TeacherCentering(nn.Module):
    """Turns teacher logits into targets: softmax centering (EMA centre) or Sinkhorn-Knopp (3 iterations)."""

    def __init__(self, n_prototypes: int, mode: str = "sinkhorn_knopp", momentum: float = 0.9,
                 n_iterations: int = 3) -> None:
        super().__init__()
        if mode not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"centering={mode!r}; choose 'sinkhorn_knopp' or 'softmax'.")
        self.mode, self.momentum, self.n_iterations = mode, momentum, n_iterations
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Target probabilities (n, K); with softmax centering the centre is then updated from this batch."""
        if self.mode == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, temp, self.n_iterations)
        probs = F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
        self.update(teacher_logits)
        return probs

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the batch-mean teacher logits (over all processes)."""
        total = _all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        count = _all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        if count.item() == 0:
            return
        batch_center = total / count
        self.center.mul_(self.momentum).add_(batch_center * (1 - self.momentum))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter; buffers copied."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("ema_update: teacher and student have different parameter lists.")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in s_params], alpha=1.0 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


# ----------------------------------------------------------------------------------------------
# Schedules (pure functions of the step)
# ----------------------------------------------------------------------------------------------


def cosine_schedule(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine to ``end``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def peak_lr(cfg: SSLConfig) -> float:
    """The base lr scaled by sqrt(batch / 1024) (DINOv2's rule)."""
    return cfg.base_lr * math.sqrt(cfg.batch_size / 1024)


def lr_at(step: int, cfg: SSLConfig) -> float:
    """Learning rate: linear warm-up from 0 over ``warmup_steps``, then cosine to ``min_lr``."""
    return cosine_schedule(step, cfg.steps, peak_lr(cfg), cfg.min_lr, cfg.warmup_steps, 0.0)


def weight_decay_at(step: int, cfg: SSLConfig) -> float:
    """Weight decay: cosine from ``weight_decay[0]`` to ``weight_decay[1]`` over all steps."""
    return cosine_schedule(step, cfg.steps, cfg.weight_decay[0], cfg.weight_decay[1])


def teacher_momentum_at(step: int, cfg: SSLConfig) -> float:
    """EMA momentum: cosine from ``teacher_momentum[0]`` to ``teacher_momentum[1]`` over all steps."""
    return cosine_schedule(step, cfg.steps, cfg.teacher_momentum[0], cfg.teacher_momentum[1])


def teacher_temp_at(step: int, cfg: SSLConfig) -> float:
    """Teacher temperature: linear from ``teacher_temp[0]`` to ``[1]`` over the warm-up steps, then constant."""
    start, end = cfg.teacher_temp
    if step >= cfg.teacher_temp_warmup_steps:
        return end
    return start + (end - start) * step / cfg.teacher_temp_warmup_steps


def last_layer_frozen(step: int, cfg: SSLConfig) -> bool:
    """Whether the heads' last layers are frozen (their gradients dropped) at this step."""
    return step < cfg.freeze_last_layer_steps


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------

_LAYER0 = ("cls_token", "reg_token", "pos_embed", "patch_embed", "mask_token")


def vit_layer_id(name: str, depth: int) -> int:
    """DINOv2 layer index of a parameter: 0 for embeddings / tokens, i+1 for block i, depth+1 otherwise."""
    parts = name.split(".")
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    if any(part in _LAYER0 for part in parts):
        return 0
    return depth + 1


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norms, LayerScale gammas, tokens and position embeddings get no weight decay."""
    parts = name.split(".")
    return (param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name
            or any(part in ("cls_token", "reg_token", "pos_embed", "mask_token") for part in parts))


def param_groups(model: DINOModel, layer_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_mult`` (layer decay, patch-embed factor), ``wd_mult`` and ``is_last_layer``."""
    depth = len(model.backbone.blocks)
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        lr_mult = layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name.split("."):
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(name, param) else 1.0
        last = "last_layer" in name.split(".")
        key = (lr_mult, wd_mult, last)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                                        "is_last_layer": last})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set each group's lr and weight decay from the scheduled values and the group's multipliers."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def drop_last_layer_grads(optimizer: torch.optim.Optimizer) -> None:
    """Freeze the heads' last layers for this step: drop their gradients (AdamW then skips them)."""
    for group in optimizer.param_groups:
        if group.get("is_last_layer", False):
            for param in group["params"]:
                param.grad = None


def entropy_stats(probs: torch.Tensor) -> tuple[float, float]:
    """(mean per-row entropy, entropy of the mean row) of target probabilities (n, K), in nats."""
    p = probs.float().clamp_min(1e-12)
    per_row = -(p * p.log()).sum(-1).mean()
    marginal = p.mean(0)
    return float(per_row), float(-(marginal * marginal.log()).sum())


def feature_std(features: torch.Tensor) -> float:
    """Std over the batch of L2-normalised features, averaged over dims, x sqrt(D): ~1 isotropic, ~0 collapsed."""
    if features.shape[0] < 2:
        return float("nan")
    z = F.normalize(features.detach().float(), dim=-1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def detect_collapse(rows: Sequence[Mapping[str, float]], n_prototypes: int, n_targets: int) -> list[str]:
    """Collapse kinds suggested by recent history rows: 'uniform', 'one_prototype', 'features'."""
    if not rows:
        return []
    h = float(np.mean([r["teacher_entropy"] for r in rows]))
    hm = float(np.mean([r["teacher_marginal_entropy"] for r in rows]))
    stds = [float(r["feature_std"]) for r in rows if not math.isnan(float(r["feature_std"]))]
    kinds = []
    if h > 0.95 * math.log(n_prototypes):
        kinds.append("uniform")
    if hm < 0.05 * math.log(max(2, min(n_prototypes, n_targets))):
        kinds.append("one_prototype")
    if stds and float(np.mean(stds)) < 0.05:
        kinds.append("features")
    return kinds

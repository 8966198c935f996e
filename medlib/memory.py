"""Peak GPU memory of each job a profile runs, estimated on the ``meta`` device: does the batch fit the card?

Nothing here allocates real memory. Each job's model is built on the ``meta`` device (shapes and dtypes,
no data) with the profile's architecture, image size and batch size, and:

- **weights, gradients, optimiser state** are counted from the parameters: fp32 weights (4 B), fp32
  gradients (4 B, training only), AdamW's two fp32 moments (8 B), plus the EMA teacher's fp32 copy in SSL;
- **training activations** are the tensors autograd saves for backward: the forward (and loss) runs on meta
  inputs under :class:`torch.autograd.graph.saved_tensors_hooks`, and the saved tensors' bytes are summed
  (each storage once; parameters themselves are not activations, their bf16 autocast copies are);
- **inference activations** (``torch.inference_mode`` jobs: feature extraction, condition encoding,
  sampling) are the peak of the bytes of live tensors while the forward runs, tracked by a
  ``TorchDispatchMode`` that adds each new output storage and subtracts it when the tensor is freed.

Autocast is honoured: torch's autocast never acts on meta tensors, so :class:`MetaAutocast` applies CUDA
autocast's policy above autograd (matmul / convolution / attention inputs cast to bf16, normalisation,
softmax and losses in fp32; leaf weights cast once per forward), and autograd saves the bf16 copies as it
does on a GPU; and ``scaled_dot_product_attention`` runs the flash-attention kernel's meta
implementation, as a CUDA GPU does in bf16 (the meta device would otherwise take the math path and save the
whole attention matrix). **Margin**: the estimate is ``MARGIN`` (1.25) x the sum above, plus
``OVERHEAD_GIB`` (1.0 GiB) for the CUDA context, cuDNN / cuBLAS workspaces and allocator fragmentation; the
transient tensors of the backward pass (gradients of activations, one layer at a time) fall inside the margin.
``python -m medlib.memory --profile gpu`` prints the table; ``tests/test_memory.py`` fails when a job of the
``gpu`` profile does not fit an 80 GB card.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator
from unittest import mock

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2**30
CARD_BYTES = 80 * 10**9  # an "80 GB" card (H100 / A100 80GB): 80e9 bytes, about 74.5 GiB
MARGIN = 1.25
OVERHEAD_GIB = 1.0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _storage_bytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


def param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the module's parameters (and buffers unless ``trainable_only``)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    total = sum(p.numel() * p.element_size() for p in params)
    if not trainable_only:
        total += sum(b.numel() * b.element_size() for b in model.buffers())
    return int(total)


def saved_activation_bytes(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs (each storage counted once).

    Tensors sharing a storage with one of ``params`` are left out (weights are counted as weights).
    """
    param_keys = {_storage_key(p) for p in params}
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []  # keep saved tensors alive so storage keys are not reused while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_keys and key not in seen:
            seen[key] = _storage_bytes(t)
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out, keep
    return int(sum(seen.values()))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created (and still alive) while the mode is on: inference activations."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        fresh: dict[int, tuple[torch.Tensor, int]] = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key not in inputs and key not in fresh:  # views and in-place results add nothing
                    fresh[key] = (t, _storage_bytes(t))
        for t, n in fresh.values():
            self.live += n
            weakref.finalize(t, self._free, n)
        self.peak = max(self.peak, self.live)
        return out


def inference_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of live tensors made by ``fn()`` under ``torch.inference_mode`` (inputs and weights excluded)."""
    with torch.inference_mode(), LiveBytes() as mode:
        out = fn()
        del out
    return int(mode.peak)


@dataclass
class Estimate:
    """One job's memory estimate (bytes)."""

    job: str
    batch: int
    detail: str
    weights: int
    grads: int
    optimizer: int
    activations: int
    extra: int = 0

    @property
    def raw(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.extra

    @property
    def total(self) -> int:
        """The estimate: ``MARGIN`` x the counted bytes + ``OVERHEAD_GIB``."""
        return int(MARGIN * self.raw + OVERHEAD_GIB * GiB)

    def fits(self, card_bytes: int = CARD_BYTES) -> bool:
        return self.total <= card_bytes


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """``scaled_dot_product_attention`` as a CUDA GPU runs it: the flash kernel, which saves O(N) per head."""
    if attn_mask is not None or kwargs or query.device.type != "meta":
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     **kwargs)
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                              return_debug_mask=False, scale=scale)[0]


_SDPA = torch.nn.functional.scaled_dot_product_attention


_F = torch.nn.functional
#: CUDA autocast's lower-precision ops (run in bf16) and fp32 ops, at the torch-function level
_LOW = {_F.linear, _F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose2d, torch.matmul, torch.mm, torch.bmm,
        torch.addmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
        torch.ops.aten._scaled_dot_product_flash_attention}
_FP32 = {_F.layer_norm, _F.group_norm, _F.softmax, _F.log_softmax, torch.softmax, torch.log_softmax,
         torch.Tensor.softmax, torch.Tensor.log_softmax, _F.cross_entropy, _F.binary_cross_entropy_with_logits,
         _F.mse_loss, _F.normalize}


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast for meta tensors (torch's autocast only acts on its own device's tensors, never on meta).

    Above autograd, like autocast: float inputs of matmul / convolution / attention are cast to bf16 (the
    casts of leaf weights cached per forward, as autocast caches them), inputs of normalisation, softmax
    and losses to fp32; autograd then saves the bf16 copies exactly as under CUDA autocast.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}

    def _cast(self, t: Any, dtype: torch.dtype) -> Any:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype):
            return t
        if t.is_leaf and t.requires_grad:
            if id(t) not in self.cache:
                self.cache[id(t)] = t.to(dtype)
            return self.cache[id(t)]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in _LOW else torch.float32 if func in _FP32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _autocast(bf16: bool) -> Iterator[None]:
    """bf16 autocast on meta tensors (:class:`MetaAutocast`) + flash attention, as a CUDA GPU runs the job.

    On meta the dispatcher would pick SDPA's math path, which saves the (N x N) attention matrix; a CUDA GPU
    runs flash / memory-efficient attention, which saves only the output and the log-sum-exp.
    """
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_sdpa):
        if bf16:
            with MetaAutocast():
                yield
        else:
            yield


def training_estimate(job: str, model: nn.Module, forward: Callable[[], torch.Tensor], batch: int, detail: str,
                      bf16: bool = True, optimizer_bytes_per_param: int = 8, extra: int = 0) -> Estimate:
    """Weights + fp32 grads + AdamW state + saved activations of one training step of ``model`` (on meta)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    with _autocast(bf16):
        acts = saved_activation_bytes(forward, model.parameters())
    return Estimate(job, batch, detail, weights=param_bytes(model), grads=4 * n_trainable,
                    optimizer=optimizer_bytes_per_param * n_trainable, activations=acts, extra=extra)


def inference_estimate(job: str, model: nn.Module, forward: Callable[[], Any], batch: int, detail: str,
                       bf16: bool = True, extra: int = 0) -> Estimate:
    """Weights + the peak of live activations of one inference batch of ``model`` (on meta)."""
    with _autocast(bf16):
        acts = inference_peak_bytes(forward)
    return Estimate(job, batch, detail, weights=param_bytes(model), grads=0, optimizer=0, activations=acts,
                    extra=extra)


# --------------------------------------------------------------------------------------------- the jobs


def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _vit(arch: str, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                 drop_path_rate=drop_path, **kwargs)


def _effnet() -> nn.Module:
    from .models.backbones import _build_timm_model, get_spec

    with torch.device("meta"):
        return _build_timm_model(get_spec("efficientnet-lite0.in1k"), None, image_size=None, drop_path_rate=0.0)


def _classification_step(model: nn.Module, head_dim: int, n_classes: int, batch: int, size: int) -> Callable:
    with torch.device("meta"):
        head = nn.Linear(head_dim, n_classes)
    full = nn.Sequential(model, head)

    def step() -> torch.Tensor:
        logits = full(_meta((batch, 3, size, size)))
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), _meta(tuple(logits.shape)))

    return full, step


def _backbone_arch(p: Any) -> tuple[str, dict]:
    kwargs = dict(p.backbone.arch_kwargs)
    kwargs["img_size"] = p.backbone.image_size
    return p.backbone.arch, kwargs


def ssl_job(p: Any) -> Estimate:
    """One DINOv2 step (student forward + backward, EMA teacher forward) at the profile's SSL sizes."""
    from .ssl.dino import DINOModel, vit_tokens

    cfg = p.ssl
    arch, kwargs = _backbone_arch(p)
    kwargs["img_size"] = cfg.global_size
    bb = _vit(arch, kwargs, cfg.drop_path)
    with torch.device("meta"):
        student = DINOModel(bb, cfg.n_prototypes, cfg.head_hidden, cfg.head_bottleneck, use_ibot=True)
    student.train()
    b = cfg.batch_size
    patch = bb.patch_embed.patch_size[0]
    n_patches = (cfg.global_size // patch) ** 2
    # upper bound of the masked patches: every global crop masked at the largest ratio
    n_masked = int(math.ceil(2 * b * n_patches * cfg.mask_ratio[1]))
    dim = bb.embed_dim

    def step() -> torch.Tensor:
        g, loc = _meta((2 * b, 3, cfg.global_size, cfg.global_size)), _meta((cfg.n_local * b, 3, cfg.local_size,
                                                                            cfg.local_size))
        masks = _meta((2 * b, n_patches), torch.bool)
        tokens = vit_tokens(student.backbone, g, masks, student.mask_token)
        cls = tokens[:, 0]
        logits = torch.cat([student.dino_head(cls), student.dino_head(vit_tokens(student.backbone, loc)[:, 0])])
        patches = tokens[:, bb.num_prefix_tokens:].reshape(-1, dim)[:n_masked]  # static stand-in for patches[masks]
        ibot = student.ibot_head(patches)
        return (torch.log_softmax(logits.float() / cfg.student_temp, -1).sum()
                + torch.log_softmax(ibot.float() / cfg.student_temp, -1).sum())

    teacher_weights = param_bytes(student)  # the EMA teacher: an fp32 copy of the student
    # teacher targets alive through the step: DINO (2B, K) and iBOT (n_masked, K) probabilities, fp32
    targets = 4 * cfg.n_prototypes * (2 * b + n_masked)
    with _autocast(True):
        teacher_peak = inference_peak_bytes(lambda: vit_tokens(student.backbone, _meta(
            (2 * b, 3, cfg.global_size, cfg.global_size))))
    est = training_estimate("ssl (DINOv2 pre-training / continuation)", student, step, b,
                            f"{arch} {cfg.global_size}px x2 + {cfg.local_size}px x{cfg.n_local}, "
                            f"K={cfg.n_prototypes}", extra=teacher_weights + targets)
    est.activations = max(est.activations, teacher_peak)
    return est


def supervised_job(p: Any, batch: int = 64) -> Estimate:
    """Supervised pre-training of ``sup-natural`` / ``sup-cxr`` (``models.build._build_supervised``: batch 64)."""
    arch, kwargs = _backbone_arch(p)
    model, step = _classification_step(_vit(arch, kwargs, 0.1), _vit(arch, kwargs).num_features, 14, batch,
                                       kwargs["img_size"])
    model.train()
    return training_estimate("supervised pre-training", model, step, batch, f"{arch} {kwargs['img_size']}px")


def finetune_job(p: Any, name: str, batch: int, cnn: bool = False) -> Estimate:
    """Full fine-tuning (AdamW, bf16 autocast) of the profile's ViT (or the EfficientNet arm)."""
    size = p.backbone.image_size
    if cnn:
        bb, label = _effnet(), f"efficientnet-lite0 {size}px"
    else:
        arch, kwargs = _backbone_arch(p)
        bb, label = _vit(arch, kwargs), f"{arch} {size}px"
    model, step = _classification_step(bb, bb.num_features, 14, batch, size)
    model.train()
    return training_estimate(name, model, step, batch, label)


def features_job(p: Any, cnn: bool = False) -> Estimate:
    """Frozen-feature extraction (``eval.features``): one inference batch of ``eval.batch_size`` images."""
    size, batch = p.backbone.image_size, p.eval.batch_size
    if cnn:
        bb, label = _effnet(), f"efficientnet-lite0 {size}px"
    else:
        arch, kwargs = _backbone_arch(p)
        bb, label = _vit(arch, kwargs), f"{arch} {size}px"
    bb.eval()
    return inference_estimate("feature extraction" + (" (CNN)" if cnn else ""), bb,
                              lambda: bb.forward_features(_meta((batch, 3, size, size))), batch, label)


def _unet(p: Any) -> tuple[nn.Module, int, int]:
    from diffusers import UNet2DConditionModel

    from .diffusion.pipeline import small_unet_config

    cfg = p.diffusion
    factor = 2 ** (len(cfg.vae_channels) - 1)
    latent = cfg.image_size // factor
    from .models.backbones import get_spec

    spec = get_spec(cfg.encoder)
    encoder_dim = _vit(spec.arch, dict(spec.kwargs)).embed_dim
    config = small_unet_config(latent, cfg.latent_channels, encoder_dim, cfg.unet_channels,
                               cfg.unet_layers_per_block, cfg.cross_attention_dim, cfg.attention_head_dim)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return unet, latent, encoder_dim


def ldm_job(p: Any) -> Estimate:
    """One UNet training step (latents and condition tokens cached; bf16 autocast via accelerate)."""
    cfg = p.diffusion
    unet, latent, dim = _unet(p)
    unet.train()
    b = cfg.ldm_batch_size

    def step() -> torch.Tensor:
        out = unet(_meta((b, cfg.latent_channels, latent, latent)), _meta((b,), torch.long),
                   encoder_hidden_states=_meta((b, 3, dim))).sample
        return ((out.float() - _meta(tuple(out.shape))) ** 2).mean()

    return training_estimate("LDM UNet training", unet, step, b,
                             f"UNet {cfg.unet_channels} on {latent}x{latent} latents", optimizer_bytes_per_param=8,
                             extra=param_bytes(unet))  # + the EMA copy of the UNet


def vae_job(p: Any) -> Estimate:
    """One VAE training step (reconstruction + KL; bf16 autocast via accelerate)."""
    from diffusers import AutoencoderKL

    from .diffusion.vae import small_vae_config

    cfg = p.diffusion
    with torch.device("meta"):
        vae = AutoencoderKL(**small_vae_config(cfg.image_size, latent_channels=cfg.latent_channels,
                                               block_out_channels=cfg.vae_channels,
                                               layers_per_block=cfg.vae_layers_per_block))
    vae.train()
    b = cfg.vae_batch_size

    def step() -> torch.Tensor:
        x = _meta((b, 1, cfg.image_size, cfg.image_size))
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.mean + posterior.std * _meta(tuple(posterior.mean.shape))).sample
        return (rec.float() - x).abs().mean() + posterior.kl().mean()

    return training_estimate("VAE training", vae, step, b, f"VAE {cfg.vae_channels} at {cfg.image_size}px")


def sampling_job(p: Any, batch: int = 64) -> Estimate:
    """Guided sampling: the UNet on ``2 x batch`` latents (classifier-free guidance) under bf16, inference."""
    cfg = p.diffusion
    unet, latent, dim = _unet(p)
    unet.eval()
    return inference_estimate("LDM guided sampling", unet, lambda: unet(
        _meta((2 * batch, cfg.latent_channels, latent, latent)), _meta((2 * batch,), torch.long),
        encoder_hidden_states=_meta((2 * batch, 3, dim))).sample, batch, f"UNet {cfg.unet_channels}, guidance x2")


def profile_jobs(profile: Any) -> list[Estimate]:
    """Every training / feature-extraction / diffusion job of ``profile`` at its sizes, estimated."""
    from .config import get_profile

    p = get_profile(profile)
    e = p.eval
    jobs = [ssl_job(p), supervised_job(p), features_job(p), features_job(p, cnn=True),
            finetune_job(p, "study 1 full fine-tuning", e.finetune_batch_size),
            finetune_job(p, "study 2 init fine-tuning (ViT)", e.init_batch_size),
            finetune_job(p, "study 2 init fine-tuning (CNN)", e.init_batch_size, cnn=True),
            finetune_job(p, "study 3 CV fine-tuning", max(e.cv_batch_sizes))]
    jobs += [vae_job(p), ldm_job(p), sampling_job(p),
             finetune_job(p, "study 4 augmentation classifier (CNN)", p.diffusion.aug_batch_size, cnn=True)]
    return jobs


def table(estimates: list[Estimate], card_bytes: int = CARD_BYTES) -> str:
    """A markdown table: job, batch, what runs, estimate GiB, fits the card."""
    rows = ["| job | batch | model | weights+grads+optim GiB | activations GiB | estimate GiB | fits 80 GB |",
            "|---|---:|---|---:|---:|---:|---|"]
    for est in estimates:
        rows.append(f"| {est.job} | {est.batch} | {est.detail} | "
                    f"{(est.weights + est.grads + est.optimizer + est.extra) / GiB:.2f} | {est.activations / GiB:.2f} | "
                    f"{est.total / GiB:.2f} | {'yes' if est.fits(card_bytes) else 'NO'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu")
    args = parser.parse_args(argv)
    estimates = profile_jobs(args.profile)
    print(f"Peak GPU memory per job, profile {args.profile} (meta-device estimate x{MARGIN} + {OVERHEAD_GIB} GiB; "
          f"card {CARD_BYTES / GiB:.1f} GiB)")
    print(table(estimates))
    return 0 if all(est.fits() for est in estimates) else 1


__all__ = ["CARD_BYTES", "Estimate", "LiveBytes", "MARGIN", "OVERHEAD_GIB", "inference_peak_bytes", "main",
           "param_bytes", "profile_jobs", "saved_activation_bytes", "table"]


if __name__ == "__main__":  # pragma: no cover - python -m medlib.memory
    raise SystemExit(main())

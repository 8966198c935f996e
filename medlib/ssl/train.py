"""The DINOv2 training loop: from scratch or continued from existing weights, resumable, DDP-ready.

``train_ssl`` composes the pieces of :mod:`medlib.ssl.dino`. Everything random in a step (which images,
which crops, which masks, drop-path) is drawn from seeds derived from ``(seed, step, rank)``, so a run
stopped and resumed from its checkpoint gives exactly the weights and history of an uninterrupted run.
Under ``accelerate launch --multi_gpu`` each process takes its slice of the global batch
(``cfg.batch_size`` is the global batch, as DINOv2's lr scaling assumes) and DDP averages the gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..cache import array_fingerprint, provenance, save_json, stable_hash
from ..config import SSLConfig
from ..engine import Checkpointer, derive_seed, make_accelerator, progress as progress_bar, save_weights
from .dino import (
    DINOModel, MultiCropAugment, TeacherCentering, apply_schedules, check_vit, detect_collapse, dino_loss,
    drop_last_layer_grads, ema_update, entropy_stats, feature_std, ibot_loss, interpolate_pos_embed, koleo_loss,
    last_layer_frozen, load_backbone_weights, lr_at, param_groups, patch_grid, sample_masks, set_drop_path,
    teacher_momentum_at, teacher_temp_at, weight_decay_at,
)

__all__ = ["SSLResult", "train_ssl", "batch_indices", "images_to_tensor", "interpolate_pos_embed"]

HealthFn = Callable[[nn.Module, int], dict[str, float]]
_FORMAT = "medlib-ssl-checkpoint-v1"
_COLLAPSE_WINDOW = 10


@dataclass
class SSLResult:
    """What a DINOv2 run returns: both backbones, per-step history, files and timing."""

    student: nn.Module  # the trained student backbone (same architecture as the input backbone)
    teacher: nn.Module  # the EMA teacher backbone: what DINOv2 evaluates and releases
    history: pd.DataFrame  # one row per step: loss terms, lr, wd, momentum, teacher temp, entropies, feature std
    checkpoint: Path
    out_dir: Path
    steps_done: int
    wall_time_s: float  # summed over resumed sessions
    images_per_s: float  # source images per second in this session (nan when no step ran)
    collapse: list[str] = field(default_factory=list)  # collapse kinds warned about


def images_to_tensor(images: np.ndarray, in_chans: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> uint8 tensor (N, in_chans, H, W); grey replicated, RGB to luma if needed."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (N, H, W) or (N, H, W, 3); got dtype {arr.dtype}. "
                        "Convert with skimage.util.img_as_ubyte.")
    if arr.ndim == 3:
        t = torch.from_numpy(np.ascontiguousarray(arr))[:, None]
    elif arr.ndim == 4 and arr.shape[-1] == 3:
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 3); got {arr.shape}.")
    if t.shape[0] == 0:
        raise ValueError("images is empty: SSL needs at least one image.")
    if t.shape[1] == in_chans:
        return t.contiguous()
    if t.shape[1] == 1:
        return t.expand(-1, in_chans, -1, -1).contiguous()
    if in_chans == 1:
        weights = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
        return (t.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"Backbone expects {in_chans} channels but the images have {t.shape[1]}.")


def batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The global batch of ``step``: consecutive slices of per-epoch permutations, a pure function of (seed, step)."""
    start = step * batch_size
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < batch_size:
        pos = start + sum(len(o) for o in out)
        epoch, offset = divmod(pos, n_images)
        perm = np.random.default_rng(derive_seed(seed, epoch, 7)).permutation(n_images)
        out.append(perm[offset:offset + batch_size - sum(len(o) for o in out)])
    return np.concatenate(out)


def _validate(cfg: SSLConfig, n_processes: int) -> None:
    """Raise ValueError for settings the loop cannot honour."""
    if cfg.steps <= 0:
        raise ValueError(f"SSLConfig.steps={cfg.steps} must be positive.")
    if cfg.batch_size % n_processes:
        raise ValueError(f"SSLConfig.batch_size={cfg.batch_size} (global) must be divisible by the "
                         f"{n_processes} processes.")
    if cfg.centering not in ("sinkhorn_knopp", "softmax"):
        raise ValueError(f"SSLConfig.centering={cfg.centering!r}; choose 'sinkhorn_knopp' or 'softmax'.")
    if cfg.checkpoint_every <= 0:
        raise ValueError(f"SSLConfig.checkpoint_every={cfg.checkpoint_every} must be positive.")
    if cfg.teacher_temp_warmup_steps < 0 or cfg.warmup_steps < 0:
        raise ValueError("SSLConfig warm-up steps must be >= 0.")


def _run_key(cfg: SSLConfig, seed: int, data_fp: str, backbone: nn.Module, separate_ibot_head: bool) -> str:
    """Identity of a run: a checkpoint is resumed only by the same recipe, seed, data and architecture."""
    arch = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    return stable_hash({"cfg": recipe, "seed": seed, "data": data_fp, "arch": arch,
                        "separate_ibot_head": separate_ibot_head})


def _prepare_backbone(backbone: nn.Module, cfg: SSLConfig, init_from: str | Path | None) -> nn.Module:
    """A training copy: weights loaded, pos-embed at the global size, drop path set, unused head frozen."""
    check_vit(backbone)
    model = copy.deepcopy(backbone)
    if tuple(model.patch_embed.img_size) != (cfg.global_size, cfg.global_size):
        interpolate_pos_embed(model, cfg.global_size)
    if init_from is not None:
        load_backbone_weights(model, init_from)
    if cfg.local_size != cfg.global_size and cfg.n_local > 0 and not getattr(model, "dynamic_img_size", False):
        raise ValueError(f"Local crops are {cfg.local_size} px but the backbone has a fixed input size; create it "
                         "with timm.create_model(..., dynamic_img_size=True).")
    for size in (cfg.global_size, cfg.local_size):
        if any(size % p for p in model.patch_embed.patch_size):
            raise ValueError(f"Crop size {size} is not a multiple of the patch size {model.patch_embed.patch_size}.")
    set_drop_path(model, cfg.drop_path)
    for name in ("head", "fc_norm", "attn_pool", "head_drop"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            module.requires_grad_(False)  # not reached by the SSL forward; DDP needs every trainable param used
    return model


def _export_backbone(original: nn.Module, trained: nn.Module, cfg: SSLConfig) -> nn.Module:
    """A copy of the caller's architecture (original drop path, trainable flags) holding the trained weights."""
    out = copy.deepcopy(original)
    if tuple(out.patch_embed.img_size) != (cfg.global_size, cfg.global_size):
        interpolate_pos_embed(out, cfg.global_size)
    out.load_state_dict(trained.state_dict())
    return out.eval()


def train_ssl(backbone: nn.Module, images: np.ndarray, cfg: SSLConfig, *, out_dir: str | Path, seed: int,
              device: str = "auto", init_from: str | Path | None = None, progress: bool = True,
              health_fn: HealthFn | None = None, stop_after: int | None = None, separate_ibot_head: bool = True,
              mixed_precision: str = "auto") -> SSLResult:
    """Train ``backbone`` (a timm ViT) with DINOv2 (DINO + iBOT + KoLeo) on uint8 ``images``; resume if possible.

    ``init_from`` loads backbone weights first (continued pre-training, fresh heads); a checkpoint
    already in ``out_dir`` takes precedence and is resumed. ``health_fn(teacher_backbone, step)`` is
    called at every checkpoint and its numbers join the history. ``stop_after`` ends this call after
    that many steps (the schedules still span ``cfg.steps``): run a long build in chunks.
    The caller's torch random state is left as it was.
    """
    with torch.random.fork_rng():
        return _train_ssl(backbone, images, cfg, out_dir=Path(out_dir), seed=seed, device=device,
                          init_from=init_from, progress=progress, health_fn=health_fn, stop_after=stop_after,
                          separate_ibot_head=separate_ibot_head, mixed_precision=mixed_precision)


def _train_ssl(backbone: nn.Module, images: np.ndarray, cfg: SSLConfig, *, out_dir: Path, seed: int, device: str,
               init_from: str | Path | None, progress: bool, health_fn: HealthFn | None, stop_after: int | None,
               separate_ibot_head: bool, mixed_precision: str) -> SSLResult:
    """The body of :func:`train_ssl` (inside a forked torch RNG)."""
    t0 = time.perf_counter()
    accelerator = make_accelerator(device, mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    _validate(cfg, world)
    dev = accelerator.device
    in_chans = backbone.patch_embed.proj.in_channels
    data = images_to_tensor(images, in_chans)
    data_fp = array_fingerprint(np.asarray(images))
    if data.numel() < 2**30:
        data = data.to(dev)

    torch.manual_seed(derive_seed(seed, 0, 11))  # head initialisation
    student_bb = _prepare_backbone(backbone, cfg, init_from)
    use_ibot = cfg.ibot_weight > 0 and cfg.mask_probability > 0
    student = DINOModel(student_bb, cfg.n_prototypes, cfg.head_hidden, cfg.head_bottleneck, use_ibot=use_ibot,
                        separate_ibot_head=separate_ibot_head).to(dev)
    centering = nn.ModuleDict({"dino": TeacherCentering(cfg.n_prototypes, cfg.centering),
                               "ibot": TeacherCentering(cfg.n_prototypes, cfg.centering)}).to(dev)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.layer_decay, cfg.patch_embed_lr_mult), lr=0.0,
                                  betas=(0.9, 0.999))
    run_key = _run_key(cfg, seed, data_fp, backbone, separate_ibot_head)
    checkpointer = Checkpointer(out_dir)
    state = checkpointer.load(map_location=dev)
    teacher = copy.deepcopy(student)  # before accelerate patches the student's forward
    history: list[dict[str, Any]] = []
    start_step, past_wall = 0, 0.0
    if state is not None:
        if state.get("format") != _FORMAT or state.get("run_key") != run_key:
            raise ValueError(f"{checkpointer.path} belongs to a different run (recipe, seed, data or architecture "
                             "changed). Use another out_dir, or delete the checkpoint to start over.")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        centering.load_state_dict(state["centering"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_step, past_wall = list(state["history"]), int(state["step"]), float(state["wall_time_s"])
        if int(state["world_size"]) != world:
            warnings.warn(f"Resuming a run made with {state['world_size']} processes on {world}: the batches "
                          "and augmentations differ from an uninterrupted run.", stacklevel=3)
    teacher.requires_grad_(False)
    teacher.eval()
    student.train()
    model, optimizer = accelerator.prepare(student, optimizer)
    raw_student = accelerator.unwrap_model(model)
    if state is None:
        teacher.load_state_dict(raw_student.state_dict())  # DDP broadcast rank 0's weights: start equal

    augment = MultiCropAugment.from_config(cfg)
    local_batch = cfg.batch_size // world
    grid = patch_grid(student_bb, cfg.global_size)
    warned: list[str] = sorted({kind for r in history for kind in str(r.get("collapse", "")).split(",") if kind})
    check_from = max(cfg.warmup_steps, cfg.freeze_last_layer_steps)
    end_step = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    session_t0, steps_run = time.perf_counter(), 0

    bar = progress_bar(range(start_step, end_step), enabled=progress and accelerator.is_main_process,
                       desc="DINOv2", total=end_step - start_step)
    for step in bar:
        row = _train_step(step, model, raw_student, teacher, centering, optimizer, accelerator, augment, data,
                          cfg, seed, rank, local_batch, grid)
        recent = (history + [row])[-_COLLAPSE_WINDOW:]
        kinds = detect_collapse(recent, cfg.n_prototypes, 2 * local_batch) if step >= check_from else []
        row["collapse"] = ",".join(kinds)
        for kind in kinds:
            if kind not in warned:
                warned.append(kind)
                _warn_collapse(kind, step, row, cfg)
        history.append(row)
        steps_run += 1
        bar.set_postfix(loss=f"{row['loss']:.3f}", dino=f"{row['dino_loss']:.3f}", ibot=f"{row['ibot_loss']:.3f}",
                        koleo=f"{row['koleo_loss']:.3f}", H=f"{row['teacher_entropy']:.2f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == end_step:
            if health_fn is not None:
                row.update({f"health_{k}": float(v) for k, v in health_fn(teacher.backbone, done).items()})
            wall = past_wall + time.perf_counter() - t0
            _save(checkpointer, accelerator, raw_student, teacher, centering, optimizer, history, done, wall,
                  run_key, world)
    session_s = time.perf_counter() - session_t0
    wall = past_wall + time.perf_counter() - t0
    steps_done = start_step + steps_run
    if steps_run == 0 and not checkpointer.exists():
        _save(checkpointer, accelerator, raw_student, teacher, centering, optimizer, history, steps_done, wall,
              run_key, world)
    result = SSLResult(
        student=_export_backbone(backbone, raw_student.backbone, cfg),
        teacher=_export_backbone(backbone, teacher.backbone, cfg),
        history=pd.DataFrame(history), checkpoint=checkpointer.path, out_dir=out_dir, steps_done=steps_done,
        wall_time_s=wall, images_per_s=(steps_run * cfg.batch_size / session_s) if steps_run else float("nan"),
        collapse=warned)
    if accelerator.is_main_process:
        _write_outputs(result, cfg, seed, data_fp, device=str(dev), world=world)
    accelerator.wait_for_everyone()
    return result


def _train_step(step: int, model: nn.Module, raw_student: DINOModel, teacher: DINOModel, centering: nn.ModuleDict,
                optimizer: torch.optim.Optimizer, accelerator, augment: MultiCropAugment, data: torch.Tensor,
                cfg: SSLConfig, seed: int, rank: int, local_batch: int, grid: tuple[int, int]) -> dict[str, Any]:
    """One DINOv2 step (teacher targets, student losses, update, EMA); returns the step's history row."""
    dev = accelerator.device
    torch.manual_seed(derive_seed(seed, step, rank, 1))  # drop path and any other torch randomness
    rng = np.random.default_rng(derive_seed(seed, step, rank, 2))
    idx = batch_indices(data.shape[0], cfg.batch_size, seed, step)[rank * local_batch:(rank + 1) * local_batch]
    batch = data[torch.from_numpy(idx).to(data.device)].to(dev, non_blocking=True)
    global_crops, local_crops = augment(batch, rng)
    masks = None
    if raw_student.ibot_head is not None:
        masks = sample_masks(global_crops.shape[0], grid, cfg.mask_probability, tuple(cfg.mask_ratio), rng).to(dev)

    lr, wd = lr_at(step, cfg), weight_decay_at(step, cfg)
    temp, momentum = teacher_temp_at(step, cfg), teacher_momentum_at(step, cfg)
    apply_schedules(optimizer, lr, wd)
    n_global = 2
    with torch.no_grad(), accelerator.autocast():
        t_out = teacher(global_crops, masks=masks, mask_input=False)
    t_dino = centering["dino"](t_out["dino_global"].float(), temp)
    t_ibot = centering["ibot"](t_out["ibot"].float(), temp) if masks is not None else None

    with accelerator.autocast():
        s_out = model(global_crops, local_crops, masks=masks, mask_input=True)
    s_logits = s_out["dino_global"].float()
    if local_crops is not None:
        s_logits = torch.cat([s_logits, s_out["dino_local"].float()])
    b = global_crops.shape[0] // n_global
    l_dino = dino_loss(s_logits.view(-1, b, cfg.n_prototypes), t_dino.view(n_global, b, -1), cfg.student_temp)
    l_ibot = ibot_loss(s_out["ibot"], t_ibot, masks, cfg.student_temp) if masks is not None else l_dino * 0.0
    cls = s_out["cls"].float()
    l_koleo = sum(koleo_loss(chunk) for chunk in cls.chunk(n_global))
    loss = cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot + cfg.koleo_weight * l_koleo
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Non-finite SSL loss at step {step} (dino {l_dino.item()}, ibot {l_ibot.item()}, "
                                 f"koleo {l_koleo.item()}); lower base_lr or raise warmup_steps.")

    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if last_layer_frozen(step, cfg):
        drop_last_layer_grads(optimizer)
    grad_norm = float("nan")
    if cfg.clip_grad and cfg.clip_grad > 0:
        grad_norm = float(accelerator.clip_grad_norm_(raw_student.parameters(), cfg.clip_grad))
    optimizer.step()
    ema_update(teacher, raw_student, momentum)

    h_row, h_marginal = entropy_stats(t_dino)
    return {
        "step": step, "loss": loss.item(), "dino_loss": l_dino.item(), "ibot_loss": l_ibot.item(),
        "koleo_loss": l_koleo.item(), "lr": lr, "weight_decay": wd, "momentum": momentum, "teacher_temp": temp,
        "teacher_entropy": h_row, "teacher_marginal_entropy": h_marginal,
        "feature_std": feature_std(cls[:b]), "grad_norm": grad_norm,
        "n_masked": int(masks.sum()) if masks is not None else 0, "last_layer_frozen": last_layer_frozen(step, cfg),
    }


def _warn_collapse(kind: str, step: int, row: dict[str, Any], cfg: SSLConfig) -> None:
    """A loud warning with the numbers and what to try."""
    ln_k = math.log(cfg.n_prototypes)
    what = {
        "uniform": f"teacher entropy {row['teacher_entropy']:.3f} nats is at ln(K) = {ln_k:.3f} (uniform collapse)",
        "one_prototype": f"teacher batch-marginal entropy {row['teacher_marginal_entropy']:.3f} nats is ~0 "
                         "(everything maps to one prototype)",
        "features": f"CLS feature std {row['feature_std']:.4f} (x sqrt(D); ~1 healthy) is ~0 (feature collapse)",
    }[kind]
    hints = ["centering='sinkhorn_knopp'"] if cfg.centering != "sinkhorn_knopp" else []
    hints += [f"a longer lr warm-up (warmup_steps={cfg.warmup_steps})",
              f"freezing the last layer longer (freeze_last_layer_steps={cfg.freeze_last_layer_steps})",
              f"a lower base_lr (now {cfg.base_lr})",
              f"a sharper teacher for longer (teacher_temp={cfg.teacher_temp}, "
              f"teacher_temp_warmup_steps={cfg.teacher_temp_warmup_steps})"]
    if kind == "features":
        hints.append(f"KoLeo (koleo_weight={cfg.koleo_weight}) and more varied images")
    warnings.warn(f"\n*** DINOv2 COLLAPSE SUSPECTED at step {step}: {what}. ***\nTry: " + "; ".join(hints) + ".",
                  RuntimeWarning, stacklevel=4)


def _save(checkpointer: Checkpointer, accelerator, student: DINOModel, teacher: DINOModel, centering: nn.Module,
          optimizer, history: list[dict[str, Any]], step: int, wall: float, run_key: str, world: int) -> None:
    """Write the resumable state (main process only), then wait for every process."""
    if accelerator.is_main_process:
        checkpointer.save({
            "format": _FORMAT, "run_key": run_key, "step": step, "wall_time_s": wall, "world_size": world,
            "student": student.state_dict(), "teacher": teacher.state_dict(), "centering": centering.state_dict(),
            "optimizer": optimizer.state_dict(), "history": history,
        })
    accelerator.wait_for_everyone()


def _write_outputs(result: SSLResult, cfg: SSLConfig, seed: int, data_fp: str, device: str, world: int) -> None:
    """history.csv, student / teacher backbone safetensors and run.json (recipe, timing, health, provenance)."""
    out = result.out_dir
    result.history.to_csv(out / "history.csv", index=False)
    meta = {"recipe": "dinov2", "steps": str(result.steps_done), "seed": str(seed)}
    save_weights(result.student, out / "student_backbone.safetensors", metadata=meta)
    save_weights(result.teacher, out / "teacher_backbone.safetensors", metadata=meta)
    last = result.history.iloc[-1].to_dict() if len(result.history) else {}
    save_json(out / "run.json", {
        "config": dataclasses.asdict(cfg), "steps_done": result.steps_done, "wall_time_s": result.wall_time_s,
        "images_per_s": None if math.isnan(result.images_per_s) else result.images_per_s,
        "collapse": result.collapse, "device": device, "processes": world,
        "final": {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool))},
        "provenance": provenance(seed=seed, data_fingerprint=data_fp, wall_time_s=result.wall_time_s),
    })

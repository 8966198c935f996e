"""Supervised training of backbone + head: full fine-tuning, frozen probes, best-epoch restore.

One loop for every study: the supervised embedded backbones, study 1's full / LoRA / BitFit
fine-tuning, study 2's initialisation comparison and study 3's 5-fold grid. Selection uses the
validation set only (never the test set: protocol defect B5), and the epoch with the best
validation score is really restored at the end (the public code of Lange & Shekel 2024 forgot to copy it).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import autocast_dtype, resolve_device
from ..data.imageset import ImageSet

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FinetuneConfig:
    """Optimisation settings of one fine-tuning run."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # head learning rate
    backbone_lr: float | None = None  # None: same as lr; 0: backbone frozen (a probe)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    pos_weight: bool = False  # Tayebi Arasteh et al. 2023: BCE pos_weight = negatives / positives per label
    select_on: str = "val_loss"  # or "val_auroc"
    clip_grad: float | None = 3.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.select_on not in ("val_loss", "val_auroc"):
            raise ValueError(f"select_on must be 'val_loss' or 'val_auroc', got {self.select_on!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


class Classifier(nn.Module):
    """A backbone (returning (B, D) features from forward) followed by a head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class FinetuneResult:
    """The trained model (best epoch restored), per-epoch history and the selection made."""

    model: Classifier
    history: pd.DataFrame
    best_epoch: int
    selection: str
    wall_time_s: float
    extra: dict = field(default_factory=dict)


def make_loss(ds: ImageSet, pos_weight: bool = False, label_smoothing: float = 0.0) -> nn.Module:
    """BCE-with-logits for multi-label / binary (optional pos_weight = neg / pos), cross-entropy for multi-class."""
    if ds.task == "multiclass":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if ds.task not in ("multilabel", "binary"):
        raise ValueError(f"cannot train a classifier on task {ds.task!r}")
    weight = None
    if pos_weight:
        labels = ds.label_matrix()
        pos = labels.sum(0)
        weight = torch.as_tensor((len(labels) - pos) / np.maximum(pos, 1.0), dtype=torch.float32)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


def _targets(ds: ImageSet, idx: np.ndarray) -> torch.Tensor:
    if ds.task == "multiclass":
        return torch.as_tensor(np.asarray(ds.labels[idx]), dtype=torch.long)
    return torch.as_tensor(np.asarray(ds.labels[idx]), dtype=torch.float32)


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))


@torch.no_grad()
def predict(model: nn.Module, ds: ImageSet, transform: Transform, batch_size: int = 64,
            device: str = "auto") -> np.ndarray:
    """Probabilities (sigmoid for multi-label / binary, softmax for multi-class) for every image of ``ds``."""
    device = resolve_device(device)
    model.eval().to(device)
    dtype = autocast_dtype(device)
    out = []
    for idx in _batches(len(ds), batch_size, None):
        x = transform(torch.as_tensor(np.asarray(ds.images[idx]))).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            logits = model(x).float()
        out.append((logits.softmax(1) if ds.task == "multiclass" else logits.sigmoid()).cpu().numpy())
    return np.concatenate(out)


def evaluate_loss(model: nn.Module, ds: ImageSet, transform: Transform, loss_fn: nn.Module, batch_size: int,
                  device: str) -> tuple[float, np.ndarray]:
    """Mean loss and probabilities of ``model`` on ``ds`` (no augmentation)."""
    model.eval().to(device)
    losses, probs = [], []
    with torch.no_grad():
        for idx in _batches(len(ds), batch_size, None):
            x = transform(torch.as_tensor(np.asarray(ds.images[idx]))).to(device)
            logits = model(x).float()
            losses.append(float(loss_fn.to(device)(logits, _targets(ds, idx).to(device))) * len(idx))
            probs.append((logits.softmax(1) if ds.task == "multiclass" else logits.sigmoid()).cpu().numpy())
    return sum(losses) / len(ds), np.concatenate(probs)


def macro_auroc(ds: ImageSet, probs: np.ndarray) -> float:
    """Macro AUROC over labels that have both classes present (NaN if none)."""
    from sklearn.metrics import roc_auc_score

    y = ds.label_matrix()
    scores = [roc_auc_score(y[:, j], probs[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(scores)) if scores else float("nan")


def train_classifier(model: Classifier, train: ImageSet, val: ImageSet | None, cfg: FinetuneConfig, *,
                     transform_train: Transform, transform_eval: Transform, seed: int = 0, device: str = "auto",
                     progress: bool = True) -> FinetuneResult:
    """Train ``model`` on ``train``, select the epoch on ``val`` (never test) and restore it."""
    from tqdm.auto import tqdm

    device = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device)
    backbone_lr = cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr
    for p in model.backbone.parameters():
        p.requires_grad_(p.requires_grad and backbone_lr > 0)
    groups = [{"params": [p for p in model.head.parameters() if p.requires_grad], "lr": cfg.lr}]
    backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    loss_fn = make_loss(train, cfg.pos_weight, cfg.label_smoothing).to(device)
    steps_per_epoch = int(np.ceil(len(train) / cfg.batch_size))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_fraction * cfg.epochs * steps_per_epoch)
    dtype = autocast_dtype(device)
    history, best_score, best_state, best_epoch, step = [], None, None, cfg.epochs - 1, 0
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="fine-tune", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        running = 0.0
        for idx in _batches(len(train), cfg.batch_size, rng):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * _lr_factor(step, total, warmup)
            x = transform_train(torch.as_tensor(np.asarray(train.images[idx]))).to(device)
            y = _targets(train, idx).to(device)
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            running += loss.item() * len(idx)
            step += 1
        row = {"epoch": epoch, "train_loss": running / len(train)}
        if val is not None:
            val_loss, probs = evaluate_loss(model, val, transform_eval, loss_fn, cfg.batch_size, device)
            row.update(val_loss=val_loss, val_auroc=macro_auroc(val, probs))
            score = -val_loss if cfg.select_on == "val_loss" else row["val_auroc"]
            if best_score is None or score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        history.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "epoch"})
    if best_state is not None:
        model.load_state_dict(best_state)
        selection = f"epoch {best_epoch} by {cfg.select_on} on the validation set"
    else:
        selection = "last epoch (no validation set given; the test set is never used for selection)"
    return FinetuneResult(model.eval(), pd.DataFrame(history), best_epoch, selection, time.perf_counter() - start)

"""Segmentation evaluation (Baharoon et al. 2023, arXiv 2312.02366): Dice loss, Dice / Jaccard metrics, training with Dice-based selection.

Models (:func:`frozen_linear`, :func:`frozen_unet`, :func:`scratch_unet`) come from
:mod:`medlib.models.heads`; this module trains and scores them.

Conventions (each one a choice, stated once here):

- Label maps: 0 = background, k = ``mask_names[k - 1]``; a model has ``len(mask_names) + 1`` classes.
- Loss (:func:`segmentation_loss`, :func:`soft_dice_loss`): softmax probabilities against one-hot
  targets, the Dice of each class *pooled over the whole batch* (sums over images and pixels, then one
  ratio per class, as MONAI's ``batch=True``), smoothed by ``smooth`` in numerator and denominator,
  and averaged over **all classes, background included** (training default ``loss="dice"``, as
  MONAI's DiceLoss; our assumption, the paper says only "Dice loss"). The metric excludes the
  background. Pooling keeps classes absent from one image (CT organs) from giving 0/0 terms.
- Reference (:func:`majority_prior`, :func:`evaluate_prior`): the image-blind prior, the per-pixel
  majority class of the training masks; a trained model must beat it class by class.
- Metrics (:func:`dice_jaccard`): from hard label maps. A class empty in both prediction and truth has
  no Dice (NaN) and is *left out* of the macro mean; a class predicted but absent, or present but
  missed, scores 0. Macro = mean over the scored classes (background excluded by default, as the
  paper); ``mean_dj`` = (macro Dice + macro Jaccard) / 2, the quantity in the paper's figures.
  :func:`evaluate_segmenter` scores each image at the data set's own resolution (logits resized
  bilinearly) and data-set values are means over images (:func:`summarize`).
- Targets (``target_size``): the loss compares the logits with the label maps at the data set's own
  resolution (``"native"``, the default; logits resized bilinearly, as for scoring), not with label
  maps shrunk to the input size (``"input"``). A 128 px CT mask shrunk to 64 px by nearest neighbour
  moves organ borders by up to a pixel, which costs a 4-pixel-wide aorta most of its Dice: trained
  against 64 px maps, U-Nets scored the aorta and the spine below the image-blind prior at 128 px
  (our choice; the paper trains and scores at one size, 448 px).
- Selection (:func:`train_segmenter`): the epoch with the best mean validation Dice is restored at
  the end. With ``validations`` > 0 only that many evenly spaced epochs are validated (the last always):
  a run whose epochs are a single step (few-shot, n = 1) would otherwise validate after every step.
  Never AUROC (the authors' segmentation default, defect B4) and never the test set (B5).
- Optimisation: SGD (momentum 0.9) or AdamW, cosine decay of the learning rate to 0 per step, no
  warm-up (the authors' code: SGD + cosine, lr grid 1e-4 .. 1e-1, :func:`lr_grid`).
- Frozen backbones (no trainable backbone parameter: :func:`frozen_linear`, :func:`frozen_unet`): the
  backbone runs in eval mode under ``no_grad`` and only the head trains. Without augmentation its
  block grids do not change between epochs, so they are computed once per data set and reused by
  every epoch (and, inside :func:`lr_grid` and :func:`segmentation_few_shot`, by every run on the
  same backbone) unless they would exceed ``cache_limit_gb``. A backbone with trainable parameters
  (LoRA, BitFit, full fine-tuning) runs with gradients in train mode every step.
- Augmentation (``augment=True``): RandomResizedCrop(scale 0.75..1), jointly on image and mask, and
  *no* horizontal flip: left / right organs (lungs, kidneys) are labelled by side.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import autocast_dtype, resolve_device, seed_everything
from ..data.imageset import ImageSet
from ..data.splits import evenly_spaced_indices
from ..data.transforms import SegmentationTransform
from ..engine import derive_seed, progress
from ..models.adapters import freeze
from ..models.backbones import Backbone
from ..models.heads import LinearSegHead, SegmentationModel, UNet, UNetDecoder, _as_grid_list, _pair

OPTIMIZERS = ("sgd", "adamw")
#: Training losses (:func:`segmentation_loss`): "dice" (default) = soft Dice over all classes, background
#: included (MONAI DiceLoss's default; the paper says only "Dice loss", so including the background is our
#: assumption); "dice_ce" = that + cross-entropy (MONAI DiceCELoss); "dice_fg" = soft Dice over the
#: foreground classes only (the background then gets no direct gradient; see :func:`segmentation_loss`).
LOSSES = ("dice", "dice_ce", "dice_fg")
#: Resolution of the training targets: "native" = the label maps as stored (where they are scored), "input" =
#: resized to the model's input size by nearest neighbour.
TARGET_SIZES = ("native", "input")
#: The authors' learning-rate grid for the segmentation heads (1e-4 .. 1e-1).
LR_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
FEW_SHOT_NS = (1, 2, 4, 8, 16, "all")

# --------------------------------------------------------------------------- metrics and loss


@dataclass(frozen=True)
class SegScores:
    """Dice and Jaccard per scored class (NaN: empty in prediction and truth) and their macro means."""

    classes: tuple[int, ...]
    dice: np.ndarray
    jaccard: np.ndarray
    macro_dice: float
    macro_jaccard: float
    mean_dj: float


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _label_array(labels: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Integer label map as a numpy array; TypeError for float / bool inputs."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map (0 = background), got dtype {array.dtype}; "
                        "turn logits into labels with argmax over the class axis first.")
    return array


def label_map(logits: torch.Tensor) -> torch.Tensor:
    """The class of each pixel, (B, C, H, W) -> (B, H, W): ``argmax`` over classes, the first on ties.

    ``max(dim=1).indices`` gives the same labels (first maximal index on ties, as documented for both)
    and is about 10x faster on CPU than ``argmax(dim=1)``, which reduces across the strided class axis.
    """
    return logits.max(dim=1).indices


def _check_n_classes(n_classes: int, exclude_background: bool, where: str) -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"{where}: n_classes must be a positive int (background + foreground classes), "
                         f"got {n_classes!r}.")
    if exclude_background and n_classes < 2:
        raise ValueError(f"{where}: n_classes={n_classes} leaves no foreground class once the background is "
                         "excluded; pass n_classes = len(mask_names) + 1.")


def dice_jaccard(pred_labels: np.ndarray | torch.Tensor, true_labels: np.ndarray | torch.Tensor, n_classes: int,
                 exclude_background: bool = True) -> SegScores:
    """Per-class and macro Dice / Jaccard of two label maps of the same shape (all pixels pooled)."""
    pred = _label_array(pred_labels, "pred_labels")
    true = _label_array(true_labels, "true_labels")
    _check_n_classes(n_classes, exclude_background, "dice_jaccard")
    if pred.shape != true.shape:
        raise ValueError(f"dice_jaccard: pred_labels has shape {pred.shape} but true_labels {true.shape}; "
                         "resize the prediction to the mask (nearest neighbour) before scoring.")
    for name, array in (("pred_labels", pred), ("true_labels", true)):
        if array.size and (array.min() < 0 or array.max() >= n_classes):
            raise ValueError(f"dice_jaccard: {name} holds labels {int(array.min())}..{int(array.max())}, outside "
                             f"0..{n_classes - 1} (n_classes={n_classes}); is n_classes = len(mask_names) + 1?")
    counts = np.bincount(true.ravel().astype(np.int64) * n_classes + pred.ravel(),
                         minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        jaccard = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    start = 1 if exclude_background else 0
    dice, jaccard = dice[start:], jaccard[start:]
    macro_dice, macro_jaccard = _nanmean(dice), _nanmean(jaccard)
    return SegScores(classes=tuple(range(start, n_classes)), dice=dice, jaccard=jaccard, macro_dice=macro_dice,
                     macro_jaccard=macro_jaccard, mean_dj=(macro_dice + macro_jaccard) / 2)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, exclude_background: bool = True,
                   smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice of softmax(logits) (B, C, H, W) against label maps (B, H, W), pooled over the batch."""
    if logits.ndim != 4:
        raise ValueError(f"soft_dice_loss: logits must be (B, C, H, W), got shape {tuple(logits.shape)}.")
    n_classes = logits.shape[1]
    _check_n_classes(n_classes, exclude_background, "soft_dice_loss")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"soft_dice_loss: target has shape {tuple(target.shape)} but the logits need {expected} "
                         "(one label map per image at the logits' size).")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"soft_dice_loss: target must be an integer label map, got {target.dtype}.")
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= n_classes:
        raise ValueError(f"soft_dice_loss: target holds labels {low}..{high} but the logits have {n_classes} "
                         f"classes (0..{n_classes - 1}); build the model with n_classes = len(mask_names) + 1.")
    probs = logits.float().softmax(dim=1)
    classes = torch.arange(n_classes, device=target.device).view(1, n_classes, 1, 1)
    onehot = (target.unsqueeze(1) == classes).to(probs.dtype)  # = one_hot().permute(), without the strided copy
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - (dice[1:] if exclude_background else dice).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, loss: str = "dice") -> torch.Tensor:
    """The training loss named by ``loss`` (one of :data:`LOSSES`) of logits (B, C, H, W) and label maps (B, H, W).

    ``"dice"``: ``soft_dice_loss(exclude_background=False)``, the soft Dice over all classes;
    ``"dice_ce"``: that + mean pixel cross-entropy (MONAI's DiceCELoss with its defaults);
    ``"dice_fg"``: the soft Dice over the foreground classes only. With ``"dice_fg"`` nothing rewards
    a background pixel for being called background: painting it as an organ costs only that organ's
    soft Dice, which one large false-positive region moves little once the organ's own pixels are
    right. On the chest phantoms (tiny profile, U-Net from scratch) ``"dice_fg"`` painted the background
    as heart (test heart Dice 0.147, image-blind prior 0.843) where ``"dice"`` reached 0.937.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
    if loss == "dice_fg":
        return soft_dice_loss(logits, target, exclude_background=True)
    dice = soft_dice_loss(logits, target, exclude_background=False)
    if loss == "dice":
        return dice
    return dice + F.cross_entropy(logits.float(), target.long())


class DiceLoss(nn.Module):
    """:func:`soft_dice_loss` as a module (the authors' segmentation loss)."""

    def __init__(self, exclude_background: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        self.exclude_background = exclude_background
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of a batch."""
        return soft_dice_loss(logits, target, self.exclude_background, self.smooth)


# --------------------------------------------------------------------------- models


def grid_channels(backbone: Backbone, n: int) -> list[int]:
    """Channels of the last ``n`` grids of ``backbone.features`` (D each for a ViT, per stage for a CNN)."""
    if not 1 <= n <= backbone.depth:
        raise ValueError(f"Backbone {backbone.name!r} has {backbone.depth} blocks/stages; cannot read the last {n}.")
    if backbone.kind == "vit":
        return [backbone.embed_dim] * n
    return [int(info["num_chs"]) for info in backbone.model.feature_info][-n:]


@functools.lru_cache(maxsize=64)
def interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D linear interpolation as ``F.interpolate(mode="linear", align_corners=False)``."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"interpolation_matrix needs sizes >= 1, got n_in={n_in}, n_out={n_out}.")
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # n_in signals of length n_in
    matrix = F.interpolate(eye, size=n_out, mode="linear", align_corners=False).squeeze(1).T.float()
    return matrix.requires_grad_(False)  # memoised: callers must not modify it in place


def matrix_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, C, h, w) as two matrix products: the values of ``F.interpolate``
    (to float rounding), with a backward pass several times faster on the CPU for large upsampling factors."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    rows = interpolation_matrix(x.shape[-2], size[0]).to(x.device, x.dtype)
    cols = interpolation_matrix(x.shape[-1], size[1]).to(x.device, x.dtype)
    return rows @ x @ cols.T


class BNLinearSegHead(LinearSegHead):
    """DINOv2's linear segmentation head (``BNHead``, Oquab et al. 2023): BatchNorm, then the 1x1 conv, upsampled.

    The BatchNorm standardises each feature channel, which a frozen backbone's tokens need for SGD to
    fit a linear map in a few thousand steps; at inference it is a fixed affine map, so the head stays
    linear in the tokens. (It lives here, not in ``models/heads.py``, whose source is part of the
    supervised backbones' recipe hash.)
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__(in_dim, n_classes)
        self.norm = nn.BatchNorm2d(in_dim)

    def forward(self, grids: torch.Tensor | Sequence[torch.Tensor], out_size: int | tuple[int, int]) -> torch.Tensor:
        """Logits (B, n_classes, H, W) from a grid or a list of grids (the last one is used)."""
        grid = _as_grid_list(grids)[-1]
        return matrix_resize(self.conv(self.norm(grid)), _pair(out_size))


def last_grid_size(backbone: Backbone, image_size: int) -> int:
    """Side of the backbone's last token / feature grid at ``image_size`` (e.g. 8 for 64 px, patch 8)."""
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=next(backbone.parameters()).device)
        return int(backbone.features(probe, n_last=1)["grids"][-1].shape[-1])


def decoder_doublings(grid: int, image_size: int | None, n_blocks: int = 4) -> int:
    """Up-blocks of a U-Net decoder that double the resolution: until ``grid`` reaches ``image_size``, at most ``n_blocks``."""
    if grid < 1:
        raise ValueError(f"decoder_doublings: grid must be >= 1, got {grid}.")
    if image_size is None:
        return n_blocks
    return max(0, min(n_blocks, math.ceil(math.log2(max(image_size / grid, 1.0)))))


class InputSizeUNetDecoder(UNetDecoder):
    """The U-Net decoder whose up-blocks stop doubling once they reach the input size (our assumption).

    Baharoon et al. (2023) give four doubling up-blocks; with a patch-8 ViT at 64 px they would decode
    the 8 x 8 grid to 128 px, twice the input, and most of the decoder's work would be spent there only
    to be resized back. Here the first ``doublings`` blocks double (transposed conv, k2 s2) and the
    others keep the resolution (a 1x1 conv in its place); skips, widths and the classifier are unchanged.
    """

    def __init__(self, in_channels: int | Sequence[int], n_classes: int, channels: Sequence[int] | None = None,
                 doublings: int = 4) -> None:
        super().__init__(in_channels, n_classes, channels=channels)
        if not 0 <= doublings <= len(self.blocks):
            raise ValueError(f"doublings must be 0..{len(self.blocks)}, got {doublings}.")
        self.doublings = int(doublings)
        for block in self.blocks[self.doublings:]:
            block.up = nn.Conv2d(block.up.in_channels, block.up.out_channels, kernel_size=1)


def frozen_linear(backbone: Backbone, n_classes: int) -> SegmentationModel:
    """The authors' linear head (1x1 conv on the last block's grid, bilinear upsampling) on a frozen backbone."""
    _check_n_classes(n_classes, True, "frozen_linear")
    freeze(backbone).eval()
    return SegmentationModel(backbone, BNLinearSegHead(grid_channels(backbone, 1)[0], int(n_classes)))


def frozen_unet(backbone: Backbone, n_classes: int, channels: Sequence[int] | None = None,
                image_size: int | None = None) -> SegmentationModel:
    """The authors' U-Net-style decoder on the last 5 blocks of a frozen backbone (doubling up to ``image_size``)."""
    _check_n_classes(n_classes, True, "frozen_unet")
    need = UNetDecoder.n_grids
    if backbone.depth < need:
        raise ValueError(f"frozen_unet: backbone {backbone.name!r} has {backbone.depth} blocks but the U-Net "
                         f"decoder reads the last {need}; use frozen_linear, or a deeper backbone "
                         "(e.g. 'random-vit-tiny', 6 blocks).")
    chans = grid_channels(backbone, need)
    in_channels: int | list[int] = chans[0] if backbone.kind == "vit" else chans
    freeze(backbone).eval()
    doublings = 4 if image_size is None else decoder_doublings(last_grid_size(backbone, image_size), int(image_size))
    return SegmentationModel(backbone, InputSizeUNetDecoder(in_channels, int(n_classes), channels=channels,
                                                            doublings=doublings))


def scratch_unet(n_classes: int, base: int = 16, depth: int = 4) -> UNet:
    """The plain U-Net baseline trained from scratch (width ``base``, ``depth`` poolings)."""
    _check_n_classes(n_classes, True, "scratch_unet")
    return UNet(int(n_classes), in_ch=3, base=base, depth=depth)


def has_spatial_convs(module: nn.Module) -> bool:
    """Whether ``module`` holds a Conv2d wider than 1x1 (a U-Net, not a linear head): it trains channels-last."""
    return any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1) for m in module.modules())


def model_classes(model: nn.Module) -> int:
    """Number of output classes of a segmentation model (its final 1x1 conv)."""
    module = model.head if isinstance(model, SegmentationModel) else model
    for name in ("classifier", "conv"):
        layer = getattr(module, name, None)
        if isinstance(layer, nn.Conv2d):
            return int(layer.out_channels)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer giving class logits; pass a segmentation "
                         "model (frozen_linear, frozen_unet or scratch_unet).")
    return int(convs[-1].out_channels)


def is_frozen(model: nn.Module) -> bool:
    """True for a SegmentationModel whose backbone has no trainable parameter (only the head learns)."""
    return isinstance(model, SegmentationModel) and not any(p.requires_grad for p in model.backbone.parameters())


# --------------------------------------------------------------------------- checks and batches


def _check_seg_set(ds: ImageSet, n_classes: int, role: str) -> None:
    """Raise a clear error when ``ds`` cannot train / score a model with ``n_classes`` outputs."""
    where = f"{role} set {ds.name!r}"
    if ds.masks is None:
        raise ValueError(f"{where} has no masks; segmentation needs an ImageSet with label maps in .masks.")
    if ds.masks.shape != ds.images.shape[:3]:
        raise ValueError(f"{where}: masks {ds.masks.shape} do not match images {ds.images.shape[:3]}; each mask "
                         "must be an (H, W) label map the size of its image.")
    if ds.mask_names and len(ds.mask_names) + 1 != n_classes:
        raise ValueError(f"{where} has {len(ds.mask_names)} mask classes {ds.mask_names} + background, but the "
                         f"model outputs {n_classes} classes; build it with n_classes={len(ds.mask_names) + 1}.")
    high = int(np.max(ds.masks))
    if high >= n_classes:
        row = int(np.argmax(np.asarray(ds.masks).reshape(len(ds), -1).max(axis=1) >= n_classes))
        raise ValueError(f"{where}: row {row} holds label {high} but the model outputs {n_classes} classes "
                         f"(0..{n_classes - 1}); build it with n_classes={high + 1} or fix the masks.")


def _check_image_size(model: nn.Module, image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8 (the side in pixels the model sees), got {image_size!r}.")
    if isinstance(model, SegmentationModel) and model.backbone.kind == "vit":
        patch = model.backbone.patch_size
        if image_size % patch:
            raise ValueError(f"image_size={image_size} is not a multiple of backbone {model.backbone.name!r}'s patch "
                             f"size {patch}; use {patch * max(1, round(image_size / patch))}.")


def _stack(ds: ImageSet, rows: np.ndarray, transform: SegmentationTransform,
           generator: torch.Generator | None = None, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformed images (B, 3, S, S) and label maps (B, S, S) of ``rows`` (an all-zero mask if ds has none);
    ``native``: the label maps at the data set's own size instead, under the same geometry (:func:`_native_mask`)."""
    images, masks = [], []
    blank = np.zeros(ds.images.shape[1:3], dtype=np.uint8)
    for row in rows:
        mask = np.asarray(ds.masks[row]) if ds.masks is not None else blank
        image = np.asarray(ds.images[row])
        if native and transform.train:
            if generator is None:
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
            state = generator.get_state()
            out, _ = transform(image, mask, generator=generator)
            labels = _native_mask(transform, mask, torch.Generator().set_state(state))
        else:
            out, labels = transform(image, mask, generator=generator)
            if native:
                labels = torch.from_numpy(mask.astype(np.int64))
        images.append(out)
        masks.append(labels)
    return torch.stack(images), torch.stack(masks)


def _native_mask(transform: SegmentationTransform, mask: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """The label map under the geometry ``transform`` draws from ``generator``, at the mask's own (square) size.

    The random geometry depends only on the image's size and the generator, so a transform of the mask's size
    replaying the generator's state draws the same rotation, crop box and flips as ``transform`` did.
    """
    height, width = mask.shape[:2]
    if height != width:
        raise ValueError(f"augment=True with target_size='native' needs square masks, got {height} x {width}; "
                         "use target_size='input'.")
    twin = SegmentationTransform(height, train=True, scale=transform.scale, hflip=transform.hflip,
                                 rotation=transform.rotation, ratio=transform.ratio, vflip=transform.vflip)
    params = twin.sample(height, width, generator)  # the draws of transform(image, mask), replayed
    return twin.apply(torch.from_numpy(np.array(mask, dtype=np.uint8))[None], params, nearest=True)[0].long()


def _batches(rows: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of ``rows`` (shuffled with ``rng``); a trailing batch of one joins the previous (BatchNorm)."""
    order = rng.permutation(rows) if rng is not None else np.asarray(rows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()  # popped first: with two batches, batches[-2] would not exist after the pop
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def _autocast(device: str):
    dtype = autocast_dtype(device)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- frozen-feature cache


@dataclass
class _Cached:
    """A data set's frozen-backbone grids (CPU, float32) and its label maps at the model's input size and its own."""

    grids: list[torch.Tensor]
    masks: torch.Tensor
    native_masks: torch.Tensor


def _param_versions(module: nn.Module) -> tuple[int, ...]:
    """In-place modification counters of every parameter (they change if the weights are touched)."""
    return tuple(p._version for p in module.parameters())


class _FeatureStore:
    """Grids of one frozen backbone for whole data sets at one input size, computed once and reused."""

    def __init__(self, model: SegmentationModel, image_size: int, device: str, batch_size: int,
                 limit_bytes: float) -> None:
        self.backbone = model.backbone
        self.n_grids = int(model.head.n_grids)
        self.image_size = int(image_size)
        self.device = device
        self.batch_size = int(batch_size)
        self.limit_bytes = float(limit_bytes)
        self.versions = _param_versions(self.backbone)
        self._items: dict[int, tuple[ImageSet, _Cached | None]] = {}

    def matches(self, model: nn.Module, image_size: int) -> bool:
        """Whether the cached grids are valid for ``model`` (same backbone object, untouched weights) and size."""
        return (isinstance(model, SegmentationModel) and model.backbone is self.backbone
                and int(model.head.n_grids) == self.n_grids and int(image_size) == self.image_size
                and _param_versions(model.backbone) == self.versions)

    def get(self, ds: ImageSet) -> _Cached | None:
        """The cached grids of ``ds`` (computed on first use); None when they would exceed the memory limit."""
        key = id(ds)
        if key not in self._items:  # the ImageSet is kept alive with its entry, so its id is not reused
            self._items[key] = (ds, self._compute(ds))
        return self._items[key][1]

    @torch.no_grad()
    def _compute(self, ds: ImageSet) -> _Cached | None:
        transform = SegmentationTransform(self.image_size, train=False)
        self.backbone.eval().to(self.device)
        parts: list[list[torch.Tensor]] = []
        masks, native = [], []
        for rows in _batches(np.arange(len(ds)), self.batch_size, None):
            x, y = _stack(ds, rows, transform)
            with _autocast(self.device):
                grids = self.backbone.features(x.to(self.device), n_last=self.n_grids)["grids"]
            parts.append([g.float().cpu() for g in grids])
            masks.append(y)
            native.append(torch.as_tensor(np.asarray(ds.masks[rows]), dtype=torch.long))
            if len(parts) == 1:
                per_image = sum(g.numel() * 4 for g in parts[0]) / len(rows)
                if per_image * len(ds) > self.limit_bytes:
                    return None
        return _Cached([torch.cat([p[i] for p in parts]) for i in range(self.n_grids)], torch.cat(masks),
                       torch.cat(native))


# --------------------------------------------------------------------------- forward passes


def _train_logits(model: nn.Module, frozen: bool, ds: ImageSet, rows: np.ndarray, cached: _Cached | None,
                  transform: SegmentationTransform, generator: torch.Generator, device: str, native: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and target label maps of one training batch, at the input size or (``native``) the masks' own."""
    if cached is not None:
        grids = [g[rows].to(device) for g in cached.grids]
        target = (cached.native_masks if native else cached.masks)[rows].to(device)
        with _autocast(device):
            return model.head(grids, out_size=tuple(target.shape[-2:])).float(), target
    x, target = _stack(ds, rows, transform, generator, native=native)
    x, target = x.to(device), target.to(device)
    size = tuple(target.shape[-2:])
    with _autocast(device):
        if frozen:
            with torch.no_grad():
                grids = model.backbone.features(x, n_last=model.head.n_grids)["grids"]
            logits = model.head(grids, out_size=size)
        else:
            logits = model(x)
    logits = logits.float()
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits, target


@torch.no_grad()
def _native_logits(model: nn.Module, ds: ImageSet, image_size: int, device: str, batch_size: int,
                   store: _FeatureStore | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(rows, logits at the data set's own resolution) for every batch of ``ds``; the model in eval mode."""
    model.eval().to(device)
    frozen = is_frozen(model)
    cached = store.get(ds) if store is not None and frozen and store.matches(model, image_size) else None
    native = tuple(ds.images.shape[1:3])
    transform = SegmentationTransform(image_size, train=False)
    for rows in _batches(np.arange(len(ds)), batch_size, None):
        with _autocast(device):
            if cached is not None:
                logits = model.head([g[rows].to(device) for g in cached.grids], out_size=native)
            else:
                x = _stack(ds, rows, transform)[0].to(device)
                if frozen:
                    logits = model.head(model.backbone.features(x, n_last=model.head.n_grids)["grids"], out_size=native)
                else:
                    logits = model(x)
        logits = logits.float()
        if tuple(logits.shape[-2:]) != native:
            logits = F.interpolate(logits, size=native, mode="bilinear", align_corners=False)
        yield rows, logits


def predict_masks(model: nn.Module, ds: ImageSet, image_size: int, device: str = "auto",
                  batch_size: int = 16) -> np.ndarray:
    """Predicted label maps (N, H, W) uint8 at the data set's own resolution (argmax of resized logits)."""
    _check_image_size(model, image_size)
    device = resolve_device(device)
    out = np.zeros(ds.images.shape[:3], dtype=np.uint8)
    for rows, logits in _native_logits(model, ds, image_size, device, batch_size):
        out[rows] = label_map(logits).cpu().numpy().astype(np.uint8)
    return out


def _class_names(ds: ImageSet, n_classes: int) -> list[str]:
    names = ["background", *ds.mask_names]
    return names if len(names) == n_classes else ["background"] + [f"class_{k}" for k in range(1, n_classes)]


def _score_record(pred: np.ndarray, true: np.ndarray, n_classes: int, exclude_background: bool, names: list[str],
                  row: int, patient_id: str) -> dict[str, Any]:
    """One image's row of :func:`evaluate_segmenter`: Dice / Jaccard per class and macro."""
    scores = dice_jaccard(pred, true, n_classes, exclude_background)
    record: dict[str, Any] = {"row": int(row), "patient_id": str(patient_id)}
    for k, dice, jac in zip(scores.classes, scores.dice, scores.jaccard):
        record[f"dice_{names[k]}"] = dice
        record[f"jaccard_{names[k]}"] = jac
    record.update(dice=scores.macro_dice, jaccard=scores.macro_jaccard, mean_dj=scores.mean_dj)
    return record


def majority_prior(masks: np.ndarray | torch.Tensor, n_classes: int | None = None) -> np.ndarray:
    """The image-blind prior: the per-pixel majority class of training label maps (N, H, W) -> (H, W).

    Ties go to the lowest label (background first). A segmentation model that does not beat this map
    has learnt nothing from the image that the position of a pixel does not already say.
    """
    masks = _label_array(masks, "masks")
    if masks.ndim != 3 or len(masks) == 0:
        raise ValueError(f"majority_prior: masks must be a non-empty (N, H, W) stack, got shape {masks.shape}.")
    n_classes = int(masks.max()) + 1 if n_classes is None else int(n_classes)
    if masks.min() < 0 or masks.max() >= n_classes:
        raise ValueError(f"majority_prior: labels {int(masks.min())}..{int(masks.max())} outside 0..{n_classes - 1}.")
    counts = np.stack([(masks == k).sum(axis=0) for k in range(n_classes)])
    return counts.argmax(axis=0).astype(np.uint8)


def evaluate_prior(train: ImageSet, test: ImageSet, exclude_background: bool = True) -> pd.DataFrame:
    """Per-image Dice / Jaccard of the image-blind prior of ``train`` on ``test`` (same columns as
    :func:`evaluate_segmenter`); the prior is resized (nearest) to the test resolution when they differ."""
    if not train.mask_names or train.mask_names != test.mask_names:
        raise ValueError(f"evaluate_prior: train classes {train.mask_names} and test classes {test.mask_names} "
                         "must be the same, non-empty list.")
    n_classes = len(train.mask_names) + 1
    _check_seg_set(train, n_classes, "train")
    _check_seg_set(test, n_classes, "evaluation")
    prior = majority_prior(np.asarray(train.masks), n_classes)
    native = tuple(test.masks.shape[1:3])
    if prior.shape != native:
        prior = F.interpolate(torch.as_tensor(prior)[None, None].float(), size=native,
                              mode="nearest")[0, 0].numpy().astype(np.uint8)
    names = _class_names(test, n_classes)
    return pd.DataFrame.from_records([_score_record(prior, np.asarray(test.masks[row]), n_classes, exclude_background,
                                                    names, row, test.patient_ids[row]) for row in range(len(test))])


def _oracle_masks(masks: np.ndarray | torch.Tensor, grid: int, where: str) -> np.ndarray:
    """``masks`` as an (N, H, W) integer array, checked for a grid-oracle of side ``grid``."""
    masks = _label_array(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be (N, H, W), got shape {masks.shape}.")
    if not 1 <= int(grid) <= min(masks.shape[1:]):
        raise ValueError(f"{where}: grid must be 1..{min(masks.shape[1:])}, got {grid}.")
    return masks


def grid_oracle_masks(masks: np.ndarray | torch.Tensor, grid: int, n_classes: int) -> np.ndarray:
    """The best labelling of a ``grid`` x ``grid`` map: each cell's majority class of the true mask, at full size.

    It bounds a head that predicts one label per cell (nearest upsampling); a head that upsamples its
    logits bilinearly draws inside cells and can do better (see :func:`bilinear_grid_oracle_masks`).
    """
    masks = _oracle_masks(masks, grid, "grid_oracle_masks")
    onehot = F.one_hot(torch.as_tensor(masks, dtype=torch.long), int(n_classes)).permute(0, 3, 1, 2).float()
    cells = F.adaptive_avg_pool2d(onehot, int(grid))  # class shares per cell
    up = F.interpolate(cells, size=tuple(masks.shape[1:]), mode="nearest")
    return label_map(up).numpy().astype(np.uint8)


def bilinear_grid_oracle_masks(masks: np.ndarray | torch.Tensor, grid: int, n_classes: int, steps: int = 300,
                               lr: float = 0.3) -> np.ndarray:
    """The best labelling found that a ``grid`` x ``grid`` logit map can draw through bilinear upsampling, per image.

    Every head here predicts logits on a grid and upsamples them bilinearly, which draws inside a cell,
    so the cell-majority labelling (:func:`grid_oracle_masks`) is no bound. This fits a free logit map
    to each true mask (Adam from the cells' log class shares; per-image soft Dice over the classes
    present + 0.1 x cross-entropy) and returns its argmax at full size: an estimate of the ceiling from
    below (a better optimiser may find more); deterministic, as nothing in it is drawn at random.
    """
    masks = _oracle_masks(masks, grid, "bilinear_grid_oracle_masks")
    size = tuple(masks.shape[1:])
    target = torch.as_tensor(masks, dtype=torch.long)
    onehot = F.one_hot(target, int(n_classes)).permute(0, 3, 1, 2).float()
    present = (onehot.sum((2, 3)) > 0).float()
    with torch.enable_grad():
        logits = torch.log(F.adaptive_avg_pool2d(onehot, int(grid)) + 1e-3).requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=lr)
        for _ in range(int(steps)):
            up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = up.softmax(dim=1)
            dice = (2 * (probs * onehot).sum((2, 3)) + 1e-5) / (probs.sum((2, 3)) + onehot.sum((2, 3)) + 1e-5)
            loss = (1 - (dice * present).sum(1) / present.sum(1)).mean() + 0.1 * F.cross_entropy(up, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    up = F.interpolate(logits.detach(), size=size, mode="bilinear", align_corners=False)
    return label_map(up).numpy().astype(np.uint8)


def evaluate_grid_oracle(test: ImageSet, grid: int, exclude_background: bool = True) -> pd.DataFrame:
    """Per-image Dice / Jaccard of :func:`bilinear_grid_oracle_masks` on ``test`` (columns of :func:`evaluate_segmenter`)."""
    n_classes = len(test.mask_names) + 1
    _check_seg_set(test, n_classes, "evaluation")
    masks = np.asarray(test.masks)
    best = bilinear_grid_oracle_masks(masks, grid, n_classes)
    names = _class_names(test, n_classes)
    return pd.DataFrame.from_records([_score_record(best[row], masks[row], n_classes, exclude_background, names, row,
                                                    test.patient_ids[row]) for row in range(len(test))])


def _score_images(model: nn.Module, ds: ImageSet, image_size: int, device: str, batch_size: int,
                  exclude_background: bool, store: _FeatureStore | None, check: bool = True,
                  loss: str | None = None) -> tuple[pd.DataFrame, float]:
    """Per-image metrics of ``ds`` and the mean Dice loss over batches (``check``: validate ds and size first)."""
    n_classes = model_classes(model)
    if check:
        _check_seg_set(ds, n_classes, "evaluation")
        _check_image_size(model, image_size)
    names = _class_names(ds, n_classes)
    records, loss_sum = [], 0.0
    for rows, logits in _native_logits(model, ds, image_size, device, batch_size, store):
        target = torch.as_tensor(np.asarray(ds.masks[rows]), dtype=torch.long, device=logits.device)
        batch_loss = (soft_dice_loss(logits, target, exclude_background) if loss is None
                      else segmentation_loss(logits, target, loss))
        loss_sum += float(batch_loss) * len(rows)
        preds = label_map(logits).cpu().numpy()
        for i, row in enumerate(rows):
            records.append(_score_record(preds[i], np.asarray(ds.masks[row]), n_classes, exclude_background, names,
                                         row, ds.patient_ids[row]))
    return pd.DataFrame.from_records(records), loss_sum / len(ds)


def evaluate_segmenter(model: nn.Module, ds: ImageSet, image_size: int, device: str = "auto",
                       batch_size: int = 16, exclude_background: bool = True) -> pd.DataFrame:
    """Per-image Dice / Jaccard per class and macro (columns dice, jaccard, mean_dj) at native resolution."""
    return _score_images(model, ds, image_size, resolve_device(device), batch_size, exclude_background, None)[0]


def summarize(per_image: pd.DataFrame) -> pd.Series:
    """Data-set metrics: the mean over images of every metric column of :func:`evaluate_segmenter` (NaN skipped)."""
    columns = [c for c in per_image.columns if c.startswith(("dice", "jaccard", "mean_dj"))]
    if not columns:
        raise ValueError("summarize: no dice / jaccard columns; pass the DataFrame of evaluate_segmenter.")
    return per_image[columns].mean(skipna=True)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SegTrainConfig:
    """Settings of one segmentation training run (see :func:`train_segmenter`)."""

    epochs: int
    lr: float
    batch_size: int
    image_size: int
    device: str = "auto"
    seed: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = False
    exclude_background: bool = True
    loss: str = "dice"
    target_size: str = "native"
    validations: int = 0
    cache_features: bool | None = None
    cache_limit_gb: float = 2.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.target_size not in TARGET_SIZES:
            raise ValueError(f"target_size must be one of {TARGET_SIZES}, got {self.target_size!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        for name, low, note in (("epochs", 1, ""), ("batch_size", 1, ""), ("validations", 0, " (0 = every epoch)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}{note}, got {value!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if self.cache_features and self.augment:
            raise ValueError("cache_features=True needs augment=False: augmented images give new features every "
                             "epoch, so there is nothing to cache.")


@dataclass
class SegResult:
    """The trained model (best-validation-Dice epoch restored), per-epoch history and the selection made."""

    model: nn.Module
    history: pd.DataFrame
    best_epoch: int
    best_val_dice: float
    selection: str
    wall_time_s: float
    seconds_per_epoch: float
    frozen: bool
    cached_features: bool


def _make_optimizer(cfg: SegTrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's state (parameters and buffers such as BatchNorm statistics)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


_VAL_KEYS = ("val_loss", "val_dice", "val_jaccard", "val_mean_dj")


def _validate(model: nn.Module, val: ImageSet, cfg: SegTrainConfig, device: str,
              store: _FeatureStore | None) -> dict[str, float]:
    """Validation Dice loss and mean-over-images macro Dice / Jaccard / their average."""
    per_image, loss = _score_images(model, val, cfg.image_size, device, cfg.batch_size, cfg.exclude_background, store,
                                    check=False, loss=cfg.loss)  # checked once before training
    return {"val_loss": loss, "val_dice": _nanmean(per_image["dice"]), "val_jaccard": _nanmean(per_image["jaccard"]),
            "val_mean_dj": _nanmean(per_image["mean_dj"])}


def validated_epochs(epochs: int, validations: int) -> list[int]:
    """The epochs after which a run is validated: every epoch (``validations`` 0 or >= ``epochs``), else at most
    ``validations`` evenly spaced ones, every ``ceil(epochs / validations)``-th, the last epoch always included."""
    if validations <= 0 or validations >= epochs:
        return list(range(epochs))
    every = math.ceil(epochs / validations)
    return sorted({*range(every - 1, epochs, every), epochs - 1})


def _fit(model: nn.Module, train: ImageSet, rows: np.ndarray, val: ImageSet, cfg: SegTrainConfig,
         store: _FeatureStore | None = None) -> tuple[SegResult, _FeatureStore | None]:
    """Train on ``train[rows]``, select the epoch by validation Dice, restore it; reuse / return the feature store."""
    start = time.perf_counter()
    if val is None:
        raise ValueError("train_segmenter needs a validation set to select the epoch (the test set is never used "
                         "for selection); carve one with medlib.data.splits.patient_split.")
    device = resolve_device(cfg.device)
    n_classes = model_classes(model)
    _check_seg_set(train, n_classes, "train")
    _check_seg_set(val, n_classes, "val")
    _check_image_size(model, cfg.image_size)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= len(train):
        raise ValueError(f"training rows must be a non-empty selection of 0..{len(train) - 1}.")
    frozen = is_frozen(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter; nothing to train.")
    model.to(device)
    trained = model.head if frozen else model
    if has_spatial_convs(trained):  # channels-last 3x3 convolutions: ~15-25 % faster U-Net steps on the CPU
        trained.to(memory_format=torch.channels_last)
    if frozen and (store is None or not store.matches(model, cfg.image_size)):
        store = _FeatureStore(model, cfg.image_size, device, cfg.batch_size, cfg.cache_limit_gb * 1024 ** 3)
    use_store = store if frozen and cfg.cache_features is not False else None
    cached = use_store.get(train) if use_store is not None and not cfg.augment else None
    if cfg.cache_features and cached is None:
        raise ValueError(f"cache_features=True but the grids of {train.name!r} exceed cache_limit_gb="
                         f"{cfg.cache_limit_gb} (or the backbone is trainable); raise the limit or pass None.")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    transform = SegmentationTransform(cfg.image_size, train=cfg.augment, hflip=False)
    optimizer = _make_optimizer(cfg, params)
    total_steps = cfg.epochs * len(_batches(rows, cfg.batch_size, None))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    history, best_state, best_epoch, best_dice = [], None, 0, -math.inf
    check = set(validated_epochs(cfg.epochs, cfg.validations))
    for epoch in progress(range(cfg.epochs), enabled=cfg.progress, desc="segmentation", leave=False):
        t0 = time.perf_counter()
        model.train()
        if frozen:
            model.backbone.eval()
        lr_now, running = optimizer.param_groups[0]["lr"], 0.0
        for batch in _batches(rows, cfg.batch_size, rng):
            logits, target = _train_logits(model, frozen, train, batch, cached, transform, generator, device,
                                           native=cfg.target_size == "native")
            loss = segmentation_loss(logits, target, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(batch)
        scores = _validate(model, val, cfg, device, use_store) if epoch in check else dict.fromkeys(_VAL_KEYS, math.nan)
        row = {"epoch": epoch, "lr": lr_now, "train_loss": running / len(rows), **scores}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if epoch not in check:
            continue
        score = row["val_dice"] if not math.isnan(row["val_dice"]) else -math.inf
        if best_state is None or score > best_dice:
            best_dice, best_epoch, best_state = score, epoch, _snapshot(trained)
    trained.load_state_dict(best_state)
    frame = pd.DataFrame(history)
    result = SegResult(
        model=model.eval(), history=frame, best_epoch=best_epoch,
        best_val_dice=float(frame["val_dice"].iloc[best_epoch]),
        selection=f"epoch {best_epoch} of {cfg.epochs} by mean validation Dice (restored; "
                  f"{len(check)} epochs validated)",
        wall_time_s=time.perf_counter() - start, seconds_per_epoch=float(frame["seconds"].mean()),
        frozen=frozen, cached_features=cached is not None)
    return result, store


def train_segmenter(model: nn.Module, train: ImageSet, val: ImageSet, *, epochs: int, lr: float, batch_size: int,
                    image_size: int, device: str = "auto", seed: int = 0, optimizer: str = "sgd",
                    progress: bool = False, **options: Any) -> SegResult:
    """Train with the Dice loss (SGD / AdamW + cosine), keep the epoch with the best validation Dice.

    ``options`` are the other :class:`SegTrainConfig` fields: momentum, weight_decay, augment,
    exclude_background, loss, target_size ("native" or "input"), validations (at most this many
    validation passes, evenly spaced, :func:`validated_epochs`; 0 = every epoch), cache_features
    (None = cache frozen grids when they fit), cache_limit_gb. The history has one row per epoch: lr,
    train_loss, val_loss, val_dice, val_jaccard, val_mean_dj (NaN on epochs not validated) and
    seconds (training plus validation).
    """
    cfg = _config(options, epochs=epochs, lr=lr, batch_size=batch_size, image_size=image_size, device=device,
                  seed=seed, optimizer=optimizer, progress=progress)
    return _fit(model, train, np.arange(len(train)), val, cfg)[0]


def _config(train_kwargs: dict[str, Any], **fixed: Any) -> SegTrainConfig:
    """A SegTrainConfig from keyword arguments, naming the accepted ones when a name is wrong."""
    try:
        return SegTrainConfig(**{**train_kwargs, **fixed})
    except TypeError as err:
        accepted = ", ".join(f.name for f in SegTrainConfig.__dataclass_fields__.values())
        raise TypeError(f"{err}; training options are: {accepted}.") from err


def classes_below_prior(scores: pd.DataFrame, prior: pd.DataFrame) -> list[str]:
    """Foreground classes whose mean Dice in ``scores`` is below the prior's in ``prior`` (both per-image frames of
    :func:`evaluate_segmenter` on the same images); a class the prior never scores (NaN) is skipped."""
    out = []
    for column in [c for c in prior.columns if c.startswith("dice_")]:
        prior_dice, dice = _nanmean(prior[column].to_numpy()), _nanmean(scores[column].to_numpy())
        if not math.isnan(prior_dice) and (math.isnan(dice) or dice < prior_dice):
            out.append(column[len("dice_"):])
    return out


def lr_grid(model_factory: Callable[[], nn.Module], train: ImageSet, val: ImageSet,
            lrs: Sequence[float] = LR_GRID, *, seed: int = 0, restarts: int = 1, restart_below_prior: bool = True,
            **train_kwargs: Any) -> tuple[SegResult, pd.DataFrame]:
    """Train a fresh model per learning rate (and per restart) and keep the one with the best validation Dice.

    ``train_kwargs`` are :func:`train_segmenter`'s (epochs, batch_size, image_size, optimizer, ...).
    Restart 0 uses ``seed``, restart r > 0 ``derive_seed(seed, "restart", r)`` (initialisation and batch
    order); a run whose training collapsed a class shows it in its validation Dice, and selection on
    validation, never test, drops it. With ``restart_below_prior`` a learning rate gets its next
    restart only while its best run so far leaves a foreground class below the image-blind prior on
    validation (:func:`classes_below_prior`); otherwise every rate gets all ``restarts``.
    Frozen-backbone grids are computed once for the whole grid when the factory reuses one backbone.
    Returns the best run and a table (lr, restart, seed, best_val_dice, best_epoch, seconds_per_epoch,
    val_below_prior - the classes this run leaves below the prior on validation, None when not
    judged -, selected).
    """
    if len(lrs) == 0:
        raise ValueError("lr_grid needs at least one learning rate.")
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}.")
    store, best, best_run, rows = None, None, None, []
    prior_val = evaluate_prior(train, val) if restarts > 1 and restart_below_prior else None
    for lr in lrs:
        lr_best: tuple[float, list[str]] | None = None  # (validation Dice, classes below the prior) of the lr's best
        for restart in range(int(restarts)):
            run_seed = seed if restart == 0 else derive_seed(seed, "restart", restart)
            cfg = _config(train_kwargs, lr=float(lr), seed=run_seed)
            seed_everything(run_seed)
            result, store = _fit(model_factory(), train, np.arange(len(train)), val, cfg, store)
            score = result.best_val_dice if not math.isnan(result.best_val_dice) else -math.inf
            below: list[str] = []
            if prior_val is not None:
                val_scores, _ = _score_images(result.model, val, cfg.image_size, resolve_device(cfg.device),
                                              cfg.batch_size, cfg.exclude_background, store, check=False)
                below = classes_below_prior(val_scores, prior_val)
            if lr_best is None or score > lr_best[0]:
                lr_best = (score, below)
            rows.append({"lr": float(lr), "restart": restart, "seed": run_seed, "best_val_dice": result.best_val_dice,
                         "best_epoch": result.best_epoch, "seconds_per_epoch": result.seconds_per_epoch,
                         "val_below_prior": ", ".join(below) if prior_val is not None else None})
            if best is None or score > best[0]:
                best, best_run = (score, result), len(rows) - 1
            if prior_val is not None and not lr_best[1]:
                break  # the best run of this lr leaves no class below the prior on validation
    table = pd.DataFrame(rows)
    table["selected"] = np.arange(len(table)) == best_run
    return best[1], table


def fit_linear_map(backbone: Backbone, train: ImageSet, image_size: int, *, device: str = "auto",
                   max_iter: int = 300, batch_size: int = 16, ridge: float = 1e-4) -> SegmentationModel:
    """A linear head on ``backbone`` fitted on all of ``train`` at once by L-BFGS: the reach of a linear map.

    The head of :func:`frozen_linear` with its BatchNorm set to the training tokens' exact mean and
    variance and its 1x1 conv fitted by full-batch L-BFGS (strong-Wolfe line search, at most
    ``max_iter`` iterations, stopping earlier once the loss moves less than 1e-7) to the Dice +
    cross-entropy loss against the label maps at their own resolution. The fit runs on ZCA-whitened
    tokens (covariance + ``ridge`` x its largest eigenvalue) and is folded back into the head: the same
    linear maps of the tokens, but a well-conditioned problem (on the tiny chest phantoms L-BFGS
    converges in ~50 iterations whitened, and is still climbing at 300 on standardised tokens).
    No learning rate, batch order or step budget is left to choose, so the fit tells what a linear map
    of these tokens can draw on the images it sees, apart from how SGD gets there. Diagnostic, not a
    protocol: it fits the training images and never looks at validation or test.
    """
    if train.masks is None or not train.mask_names:
        raise ValueError(f"fit_linear_map: {train.name!r} has no masks.")
    if max_iter < 1 or ridge <= 0:
        raise ValueError(f"fit_linear_map: max_iter must be >= 1 and ridge > 0, got {max_iter} and {ridge}.")
    device = resolve_device(device)
    n_classes = len(train.mask_names) + 1
    model = frozen_linear(backbone, n_classes).to(device)
    _check_seg_set(train, n_classes, "train")
    cached = _FeatureStore(model, image_size, device, batch_size, float("inf")).get(train)
    grid = cached.grids[-1].to(device).float()
    target = cached.native_masks.to(device)
    n, channels, height, width = grid.shape
    tokens = grid.permute(0, 2, 3, 1).reshape(-1, channels).double()
    mean = tokens.mean(dim=0)
    centred = tokens - mean
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0) + ridge * eigenvalues.max().clamp_min(1e-12)
    zca = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    white = (centred @ zca).float().reshape(n, height, width, channels).permute(0, 3, 1, 2).contiguous()
    weight = torch.zeros(n_classes, channels, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=int(max_iter), history_size=20,
                                  tolerance_change=1e-7, line_search_fn="strong_wolfe")
    out_size = _pair(tuple(target.shape[-2:]))

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        logits = matrix_resize(F.conv2d(white, weight[:, :, None, None], bias), out_size)  # as the head upsamples
        loss = segmentation_loss(logits, target, "dice_ce")
        loss.backward()
        return loss

    optimizer.step(closure)
    head = model.head
    variance = covariance.diagonal()
    with torch.no_grad():  # W zca (x - mean) == W' (x - mean) / sqrt(var + eps) with W' = W zca sqrt(var + eps)
        head.norm.running_mean.copy_(mean.float())
        head.norm.running_var.copy_(variance.float())
        head.norm.weight.fill_(1.0)
        head.norm.bias.zero_()
        folded = (weight.detach().double() @ zca) * (variance + head.norm.eps).sqrt()
        head.conv.weight.copy_(folded.float()[:, :, None, None])
        head.conv.bias.copy_(bias.detach())
    head.eval()
    return model.eval()


def _few_shot_rows(n_train: int, n: int | str, repeat: int, seed: int, sampling: str) -> np.ndarray:
    """Row indices into the training set for one (n, repeat): random or evenly spaced images."""
    if n == "all":
        return np.arange(n_train)
    if sampling == "evenly_spaced":
        return evenly_spaced_indices(np.arange(n_train), int(n))
    rng = np.random.default_rng(derive_seed(seed, int(n), repeat))
    return np.sort(rng.choice(n_train, size=int(n), replace=False))


def _check_ns(ns: Sequence[int | str], n_train: int) -> None:
    for n in ns:
        if n == "all":
            continue
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"few-shot sizes must be positive ints or 'all', got {n!r}.")
        if n > n_train:
            raise ValueError(f"few-shot size n={n} exceeds the {n_train} training images; few-shot images are drawn "
                             "from the training split only (never val or test).")


def segmentation_few_shot(model_factory: Callable[[], nn.Module], train: ImageSet, val: ImageSet, test: ImageSet,
                          ns: Sequence[int | str] = FEW_SHOT_NS, repeats: int = 3, seed: int = 0, *,
                          model_name: str = "model", sampling: str = "random",
                          **train_kwargs: Any) -> pd.DataFrame:
    """Test Dice / Jaccard when training on n images drawn from ``train`` only, ``repeats`` seeded draws each.

    ``sampling="random"``: each (n, repeat) draws its own n images; ``"evenly_spaced"``: the authors'
    single deterministic draw (repeats then differ only in initialisation). Model initialisation
    and batch order depend on (seed, repeat) only, so curves over n are paired. The epoch is
    selected on the whole ``val`` set, which is never merged into training (defect B2). Returns a
    long table: model, n, n_images, repeat, dice, jaccard, mean_dj (test means over images),
    val_dice, best_epoch and one ``dice_<class>`` per foreground class.
    """
    if sampling not in ("random", "evenly_spaced"):
        raise ValueError(f"sampling must be 'random' or 'evenly_spaced', got {sampling!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
    _check_ns(ns, len(train))
    base = _config(train_kwargs, seed=seed)
    device = resolve_device(base.device)
    store, records = None, []
    for n in ns:
        for repeat in range(repeats):
            rows = _few_shot_rows(len(train), n, repeat, seed, sampling)
            run_seed = derive_seed(seed, repeat)
            seed_everything(run_seed)
            result, store = _fit(model_factory(), train, rows, val, replace(base, seed=run_seed), store)
            per_image, _ = _score_images(result.model, test, base.image_size, device, base.batch_size,
                                         base.exclude_background, store)
            records.append({"model": model_name, "n": n, "n_images": int(len(rows)), "repeat": repeat,
                            "dice": _nanmean(per_image["dice"]), "jaccard": _nanmean(per_image["jaccard"]),
                            "mean_dj": _nanmean(per_image["mean_dj"]), "val_dice": result.best_val_dice,
                            "best_epoch": result.best_epoch,
                            **{c: _nanmean(per_image[c]) for c in per_image.columns if c.startswith("dice_")}})
    return pd.DataFrame.from_records(records)


__all__ = [
    "BNLinearSegHead", "DiceLoss", "FEW_SHOT_NS", "InputSizeUNetDecoder", "LOSSES", "LR_GRID", "OPTIMIZERS",
    "SegResult", "SegScores", "SegTrainConfig", "TARGET_SIZES", "bilinear_grid_oracle_masks", "classes_below_prior",
    "decoder_doublings", "dice_jaccard", "evaluate_prior", "evaluate_segmenter", "fit_linear_map", "frozen_linear",
    "frozen_unet", "grid_channels", "is_frozen", "label_map", "last_grid_size", "lr_grid", "majority_prior",
    "model_classes", "predict_masks", "scratch_unet", "segmentation_few_shot", "segmentation_loss", "soft_dice_loss",
    "summarize", "train_segmenter", "validated_epochs",
]

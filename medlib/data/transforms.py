"""Torch-side transforms: uint8 images to normalised tensors, augmentation, and a Dataset over an ImageSet.

Everything works on torch tensors (``torchvision.transforms.v2.functional`` for the geometry),
so batches can be transformed on the GPU and no PIL sits in the hot path. Randomness comes
from an explicit ``torch.Generator``: the same generator state gives the same augmentation.

- Eval (Baharoon et al. 2023): resize the shorter side to ``resize`` (default ``size * 256 / 224``),
  centre-crop ``size``, then :func:`normalize_batch`.
- Train: optional rotation, RandomResizedCrop(size, scale, ratio), horizontal flip (along
  the width, the last dimension - the public code of Baharoon et al. 2023 flipped vertically under that name,
  defect B7), optional vertical flip, then :func:`normalize_batch`.
- Normalisation: ``"imagenet"`` = per-image min-max to [0, 1] then ImageNet mean / std (seed
  002's protocol); ``"minmax"`` = per-image min-max only; ``"none"`` = pixel / 255 only
  (Tayebi Arasteh et al. 2023: no intensity normalisation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .imageset import ImageSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "minmax", "none")


def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 array or tensor as a torch tensor (read-only arrays such as memory maps are copied)."""
    if isinstance(images, torch.Tensor):
        tensor = images
    else:
        array = np.ascontiguousarray(images)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())  # memory maps are read-only
    if tensor.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {tensor.dtype}; convert with medlib.data.sources.to_uint8")
    return tensor


def to_tensor_batch(images_uint8: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] on ``device`` (grey repeated to 3)."""
    tensor = _as_tensor(images_uint8)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.ndim == 4 and tensor.shape[-1] == 3:
        tensor = tensor.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected (N, H, W) or (N, H, W, 3) images, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device, non_blocking=True).float().div_(255.0)
    return tensor.expand(-1, 3, -1, -1).contiguous() if tensor.shape[1] == 1 else tensor.contiguous()


def _as_batch(images: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """One image ((H, W) or (H, W, 3)) or a batch as float (N, 3, H, W) in [0, 1]; flag whether it was single."""
    tensor = _as_tensor(images)
    single = tensor.ndim == 2 or (tensor.ndim == 3 and tensor.shape[-1] == 3)
    if single:
        tensor = tensor.unsqueeze(0)
    return to_tensor_batch(tensor, device or tensor.device), single


def normalize_batch(batch: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    """Normalise a float (N, 3, H, W) batch in [0, 1]: ``imagenet`` (min-max + mean/std), ``minmax`` or ``none``."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    if mode == "none":
        return batch
    low = batch.amin(dim=(1, 2, 3), keepdim=True)
    span = batch.amax(dim=(1, 2, 3), keepdim=True) - low
    batch = torch.where(span > 0, (batch - low) / span.clamp_min(1e-12), torch.zeros_like(batch))
    if mode == "minmax":
        return batch
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    """One uniform draw in [low, high) from ``generator``."""
    return low + (high - low) * float(torch.rand(1, generator=generator))


def random_resized_crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop, torchvision's algorithm with an explicit generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Augmentation:
    """Shared settings and random geometry of the classification and segmentation transforms."""

    def __init__(self, size: int, train: bool, scale: Sequence[float] | None, ratio: Sequence[float],
                 hflip: float | bool, vflip: float | bool, rotation: float, normalize: str) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.size = int(size)
        self.train = bool(train)
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = 0.5 if hflip is True else float(hflip)
        self.vflip = 0.5 if vflip is True else float(vflip)
        self.rotation = float(rotation)
        self.normalize = normalize

    def sample(self, height: int, width: int, generator: torch.Generator | None) -> dict[str, Any]:
        """Draw one image's random geometry: rotation angle, crop box, flips."""
        angle = _uniform(-self.rotation, self.rotation, generator) if self.rotation > 0 else 0.0
        crop = None if self.scale is None else random_resized_crop_params(height, width, self.scale, self.ratio,
                                                                         generator)
        hflip = self.hflip > 0 and float(torch.rand(1, generator=generator)) < self.hflip
        vflip = self.vflip > 0 and float(torch.rand(1, generator=generator)) < self.vflip
        return {"angle": angle, "crop": crop, "hflip": hflip, "vflip": vflip}

    def apply(self, image: torch.Tensor, params: dict[str, Any], nearest: bool = False) -> torch.Tensor:
        """Apply sampled geometry to a (C, H, W) tensor (bilinear, or nearest for label maps)."""
        # NEAREST_EXACT samples pixel centres like bilinear does; plain NEAREST would shift masks by up
        # to half a pixel against their images when resizing.
        mode = InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR
        if params["angle"]:
            rotate_mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
            image = F.rotate(image, params["angle"], interpolation=rotate_mode, fill=0.0)
        if params["crop"] is None:
            image = F.resize(image, [self.size, self.size], interpolation=mode, antialias=not nearest)
        else:
            top, left, h, w = params["crop"]
            image = F.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=mode,
                                   antialias=not nearest)
        if params["hflip"]:
            image = F.horizontal_flip(image)
        if params["vflip"]:
            image = F.vertical_flip(image)
        return image


class ClassificationTransform(_Augmentation):
    """uint8 image or batch -> normalised float (3, size, size) or (N, 3, size, size).

    ``train=False``: resize the shorter side to ``resize`` (default ``round(size * 256 / 224)``)
    and centre-crop ``size``. ``train=True``: rotation in +-``rotation`` degrees, then
    RandomResizedCrop(size, ``scale``, ``ratio``) (``scale=None``: plain resize to size), a
    horizontal flip with probability ``hflip`` (True = 0.5) and a vertical flip with
    probability ``vflip``, each image of a batch drawing its own parameters from ``generator``.
    ``photometric`` > 0 (train only) also scales brightness and contrast by factors drawn from
    [1 - photometric, 1 + photometric] per image (torchvision's ColorJitter ranges).
    """

    def __init__(self, size: int, train: bool = False, scale: Sequence[float] | None = (0.75, 1.0),
                 hflip: float | bool = True, rotation: float = 0.0, normalize: str = "imagenet",
                 resize: int | None = None, ratio: Sequence[float] = (3 / 4, 4 / 3), vflip: float | bool = False,
                 photometric: float = 0.0):
        super().__init__(size, train, scale, ratio, hflip, vflip, rotation, normalize)
        self.resize = int(resize) if resize is not None else int(round(size * 256 / 224))
        if self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")
        if not 0.0 <= photometric < 1.0:
            raise ValueError(f"photometric must be in [0, 1), got {photometric}")
        self.photometric = float(photometric)

    def _jitter(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Brightness then contrast factors in [1 - photometric, 1 + photometric] for one (C, H, W) image."""
        low, high = 1.0 - self.photometric, 1.0 + self.photometric
        image = F.adjust_brightness(image, _uniform(low, high, generator))
        return F.adjust_contrast(image, _uniform(low, high, generator))

    def __call__(self, images: np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
                 device: str | torch.device | None = None) -> torch.Tensor:
        """Transform one image or a batch (optionally moved to ``device`` first)."""
        batch, single = _as_batch(images, device)
        if self.train:
            height, width = batch.shape[-2:]
            batch = torch.stack([self.apply(img, self.sample(height, width, generator)) for img in batch])
            if self.photometric > 0:
                batch = torch.stack([self._jitter(img, generator) for img in batch])
        else:
            batch = F.resize(batch, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
            batch = F.center_crop(batch, [self.size, self.size])
        batch = normalize_batch(batch, self.normalize)
        return batch[0] if single else batch

    def __repr__(self) -> str:
        return (f"ClassificationTransform(size={self.size}, train={self.train}, scale={self.scale}, "
                f"hflip={self.hflip}, vflip={self.vflip}, rotation={self.rotation}, normalize={self.normalize!r}, "
                f"resize={self.resize}, photometric={self.photometric})")


class SegmentationTransform(_Augmentation):
    """(uint8 image, uint8 label map) -> (float (3, size, size), int64 (size, size)), jointly.

    ``train=True`` draws one geometry (rotation, RandomResizedCrop, flips) and applies it to
    both, the image bilinearly and the mask by nearest neighbour, so labels stay labels and
    stay aligned. ``train=False`` resizes both to size x size (no crop: the whole field of view
    is scored).
    """

    def __init__(self, size: int, train: bool = False, scale: Sequence[float] | None = (0.75, 1.0),
                 hflip: float | bool = True, rotation: float = 0.0, normalize: str = "imagenet",
                 ratio: Sequence[float] = (3 / 4, 4 / 3), vflip: float | bool = False):
        super().__init__(size, train, scale, ratio, hflip, vflip, rotation, normalize)

    def __call__(self, image: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one image and its mask together."""
        batch, single = _as_batch(image)
        if not single:
            raise ValueError("SegmentationTransform takes one image (H, W) or (H, W, 3) at a time")
        label_map = _as_tensor(mask)
        if label_map.shape != batch.shape[-2:]:
            raise ValueError(f"mask shape {tuple(label_map.shape)} differs from image {tuple(batch.shape[-2:])}")
        label_map = label_map.unsqueeze(0)
        if self.train:
            params = self.sample(*batch.shape[-2:], generator)
        else:
            params = {"angle": 0.0, "crop": None, "hflip": False, "vflip": False}
        out_image = self.apply(batch[0], params)
        out_mask = self.apply(label_map, params, nearest=True)
        return normalize_batch(out_image.unsqueeze(0), self.normalize)[0], out_mask[0].long()

    def __repr__(self) -> str:
        return (f"SegmentationTransform(size={self.size}, train={self.train}, scale={self.scale}, "
                f"hflip={self.hflip}, vflip={self.vflip}, rotation={self.rotation}, normalize={self.normalize!r})")


class TorchImageDataset(torch.utils.data.Dataset):
    """A torch Dataset over rows of an ImageSet returning (image, target) tensors.

    Targets: float (L,) for multi-label / binary, int64 scalar for multi-class, the int64 mask
    with ``with_masks=True``, and the row index for unlabelled data. Augmentation is
    reproducible: each item's generator is seeded from (a base seed drawn from ``generator``,
    the epoch set by :meth:`set_epoch`, the row), so results do not depend on worker count or
    order. ``transform`` is called as ``transform(image, generator=g)`` (or
    ``transform(image, mask, generator=g)`` with masks); None gives float [0, 1] (3, H, W).
    """

    def __init__(self, ds: ImageSet, indices: np.ndarray | Sequence[int] | None = None, transform: Any = None,
                 with_masks: bool = False, generator: torch.Generator | None = None) -> None:
        if with_masks and ds.masks is None:
            raise ValueError(f"ImageSet {ds.name!r} has no masks; pass with_masks=False")
        if with_masks and transform is None:
            raise ValueError("with_masks=True needs a joint transform such as SegmentationTransform")
        self.ds = ds
        self.indices = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(ds)):
            raise ValueError(f"indices must lie in 0..{len(ds) - 1}")
        self.transform = transform
        self.with_masks = with_masks
        self.base_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (call once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.indices.size)

    def _generator(self, row: int) -> torch.Generator:
        """The per-item generator for (base seed, epoch, row)."""
        state = np.random.SeedSequence([self.base_seed, self.epoch, row]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = int(self.indices[i])
        image = np.asarray(self.ds.images[row])
        generator = self._generator(row)
        if self.with_masks:
            return self.transform(image, np.asarray(self.ds.masks[row]), generator=generator)
        tensor = _as_batch(image)[0][0] if self.transform is None else self.transform(image, generator=generator)
        return tensor, self._target(row)

    def _target(self, row: int) -> torch.Tensor:
        """The label tensor of one row for the data set's task."""
        if self.ds.task == "none":
            return torch.tensor(row, dtype=torch.long)
        if self.ds.task == "multiclass":
            return torch.tensor(int(self.ds.labels[row]), dtype=torch.long)
        return torch.tensor(np.asarray(self.ds.labels[row], dtype=np.float32))


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ClassificationTransform", "SegmentationTransform", "TorchImageDataset",
    "normalize_batch", "random_resized_crop_params", "to_tensor_batch",
]

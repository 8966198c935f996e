"""The DINOv2 paper's patch-feature visualisation: a PCA of patch tokens shown as RGB.

Oquab et al. (2023, Fig. 1 and Sec. 7) show what a frozen ViT "sees": the last block's patch
tokens of several images are pooled and

1. a first PCA over *all* patches of *all* images is computed; its first component separates
   foreground from background, so thresholding it gives a foreground mask;
2. a second PCA with three components is fitted on the *foreground* patches only; each
   component, min-max scaled over all foreground patches of all images (so colours are
   comparable between images), becomes one of the R, G and B channels;
3. background patches are black; the patch grid is upsampled (bilinear) to the image size.

Our choices where the paper gives none (each "our assumption"):

- the first component is standardised (mean 0, std 1 over all patches) and its sign is fixed
  so that the patches on the image border score lower on average than the others (the
  border is usually background); foreground = standardised score > ``foreground_threshold``
  (0 by default: the paper keeps "patches with a positive value");
- images are resized to ``image_size`` (no crop, so the whole image is shown) and normalised
  like the backbone's other inputs (per-image min-max, ImageNet mean / std).

:func:`pca_rgb_from_grids` is the pure-numpy core (tested on synthetic grids);
:func:`patch_pca_rgb` runs a backbone first; :func:`plot_patch_pca` draws images above their
PCA colouring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from ..data.transforms import normalize_batch, to_tensor_batch
from ..models.backbones import Backbone


@dataclass
class PatchPCA:
    """The PCA colouring of a batch of images.

    ``rgb`` (N, H, W, 3) float in [0, 1], upsampled to the output size, background black;
    ``grid_rgb`` (N, h, w, 3) the same at patch resolution; ``foreground`` (N, h, w) bool;
    ``first_component`` (N, h, w) the standardised, sign-fixed first-component score;
    ``explained_variance_ratio`` of the second (foreground) PCA's components.
    """

    rgb: np.ndarray
    grid_rgb: np.ndarray
    foreground: np.ndarray
    first_component: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def foreground_share(self) -> float:
        """Share of patches kept as foreground (over all images)."""
        return float(self.foreground.mean())


def _border(h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of the outermost ring of patches."""
    mask = np.zeros((h, w), dtype=bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def _check_grids(grids: np.ndarray) -> np.ndarray:
    array = np.asarray(grids, dtype=np.float64)
    if array.ndim != 4:
        raise ValueError(f"grids must be (N, h, w, D) patch tokens, got shape {array.shape}")
    n, h, w, d = array.shape
    if n < 1 or h < 1 or w < 1 or d < 1:
        raise ValueError(f"grids must be non-empty (N, h, w, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("grids hold NaN or inf; check the backbone's outputs")
    return array


def _first_component(tokens: np.ndarray, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Standardised first principal component of every patch, signed so that border patches score low."""
    n, h, w = shape
    score = PCA(n_components=1, random_state=seed).fit_transform(tokens)[:, 0]
    std = score.std()
    score = (score - score.mean()) / (std if std > 0 else 1.0)
    score = score.reshape(n, h, w)
    border = np.broadcast_to(_border(h, w), score.shape)
    if h > 2 and w > 2 and score[border].mean() > score[~border].mean():
        score = -score
    return score


def _minmax(values: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] (a constant column becomes 0.5)."""
    low, high = values.min(axis=0), values.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, (values - low) / span, 0.5)


def pca_rgb_from_grids(grids: np.ndarray, n_components: int = 3, foreground_threshold: float | None = 0.0,
                       seed: int = 0) -> PatchPCA:
    """PCA colouring of patch tokens ``grids`` (N, h, w, D): foreground by the first component, RGB by a second PCA.

    ``foreground_threshold=None`` keeps every patch (one PCA on all patches). ``n_components``
    (1..3) components fill R, G, B in order; missing channels stay 0. The output ``rgb`` is at
    patch resolution here (:func:`patch_pca_rgb` upsamples).
    """
    array = _check_grids(grids)
    if not isinstance(n_components, (int, np.integer)) or not 1 <= n_components <= 3:
        raise ValueError(f"n_components must be 1, 2 or 3 (they become the R, G, B channels), got {n_components!r}")
    n, h, w, d = array.shape
    tokens = array.reshape(-1, d)
    if len(tokens) < 2:
        raise ValueError(f"a PCA needs at least 2 patches; the grids hold {len(tokens)}")
    first = _first_component(tokens, (n, h, w), seed)
    foreground = first > foreground_threshold if foreground_threshold is not None else np.ones_like(first, bool)
    kept = foreground.reshape(-1)
    if kept.sum() < max(2, n_components):
        raise ValueError(f"only {int(kept.sum())} of {kept.size} patches lie above foreground_threshold="
                         f"{foreground_threshold} (standardised first component); lower the threshold or pass "
                         "foreground_threshold=None to keep every patch")
    k = int(min(n_components, d, kept.sum() - 1))
    pca = PCA(n_components=k, random_state=seed).fit(tokens[kept])
    colours = np.zeros((len(tokens), 3))
    colours[kept, :k] = _minmax(pca.transform(tokens[kept]))
    grid_rgb = colours.reshape(n, h, w, 3)
    return PatchPCA(rgb=grid_rgb.copy(), grid_rgb=grid_rgb, foreground=foreground, first_component=first,
                    explained_variance_ratio=pca.explained_variance_ratio_.copy())


@torch.no_grad()
def patch_grids(backbone: Backbone, images: np.ndarray, image_size: int | None = None, batch_size: int = 16,
                device: str = "cpu") -> np.ndarray:
    """Last-block patch tokens (N, h, w, D) of uint8 ``images`` resized (not cropped) to ``image_size``."""
    size = int(image_size or backbone.image_size)
    if backbone.kind == "vit" and size % backbone.patch_size:
        fit = backbone.patch_size * max(1, round(size / backbone.patch_size))
        raise ValueError(f"image_size={size} is not a multiple of {backbone.name!r}'s patch size "
                         f"{backbone.patch_size}; use {fit}")
    backbone.eval().to(device)
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor_batch(np.asarray(images[start:start + batch_size]), device=device)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        grid = backbone.features(normalize_batch(x.clamp(0, 1)), n_last=1)["grid"]
        out.append(grid.float().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def patch_pca_rgb(backbone: Backbone, images: np.ndarray, n_components: int = 3,
                  foreground_threshold: float | None = 0.0, image_size: int | None = None,
                  out_size: int | None = None, seed: int = 0, device: str = "cpu") -> PatchPCA:
    """The DINOv2 paper's PCA colouring of ``backbone``'s patch tokens over several uint8 ``images``.

    ``image_size`` is the backbone's input side (default its own); ``out_size`` the side of the
    returned ``rgb`` (default the images' own height). See the module docstring for the steps.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be a non-empty uint8 batch (N, H, W) or (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    result = pca_rgb_from_grids(patch_grids(backbone, images, image_size, device=device), n_components,
                                foreground_threshold, seed)
    side = int(out_size or images.shape[1])
    grid = torch.from_numpy(result.grid_rgb).permute(0, 3, 1, 2).float()
    mask = torch.from_numpy(result.foreground[:, None].astype(np.float32))
    rgb = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    keep = F.interpolate(mask, size=(side, side), mode="nearest")
    result.rgb = (rgb * keep).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return result


def plot_patch_pca(images: np.ndarray, result: PatchPCA, title: str, ncols: int = 8, size: float = 1.6):
    """A figure of the images (top of each pair of rows) above their PCA colouring."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n != len(result.rgb):
        raise ValueError(f"{n} images but {len(result.rgb)} PCA colourings; pass the images given to patch_pca_rgb")
    ncols = min(ncols, n)
    blocks = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(2 * blocks, ncols, figsize=(size * ncols, 2 * size * blocks + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        row, col = 2 * (i // ncols), i % ncols
        image = np.asarray(images[i])
        axes[row, col].imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        axes[row + 1, col].imshow(result.rgb[i])
    fig.suptitle(title)
    return fig


__all__ = ["PatchPCA", "patch_grids", "patch_pca_rgb", "pca_rgb_from_grids", "plot_patch_pca"]

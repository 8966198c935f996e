"""The natural-image stand-in: procedural dead-leaves images mixed with the photos that packages ship.

Nothing can be downloaded here, so "natural images" for pre-training are

- dead-leaves images (Baradad et al., "Learning to See by Looking at Noise", NeurIPS 2021):
  occluding shapes - discs, squares, triangles, ellipses - whose radius density follows r^-3 between
  ``rmin`` and ``rmax`` (the scale-invariant law of natural images), in colour or grey, some with
  simple textures (stripes, smooth noise); drawn front to back until the image is covered;
- random crops of the real photographs bundled with scikit-image (``skimage.data``: astronaut,
  camera, coffee, chelsea, coins, grass, gravel, brick, moon, rocket, hubble_deep_field, retina and a
  few more, all offline) and scikit-learn (``load_sample_images``: china, flower), resized to the size.

:func:`make_natural` returns an unlabelled RGB ImageSet (task ``"none"``) for self-supervised
pre-training; :func:`make_natural_labelled` returns a supervised task (``"multiclass"``, 8 classes =
shape x texture of the dominant foreground object over a dead-leaves background with the same shapes as
distractors and a few small occluders in front). Every image is a pure function of (seed, index, size).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any

import numpy as np

from .imageset import ImageSet
from .phantoms._build import build_cached
from .phantoms._draw import blur, check_size, polygon_distance

NATURAL_CODE = 2001
LABELLED_CODE = 2002
GENERATOR_VERSION = "1"
SHAPES = ("disc", "square", "triangle", "ellipse")
TEXTURES = ("plain", "striped")
CLASS_NAMES = tuple(f"{shape}_{texture}" for shape in SHAPES for texture in TEXTURES)
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "coins", "grass", "gravel", "brick", "moon",
                  "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "clock", "page", "text", "cell")
SKLEARN_PHOTOS = ("china", "flower")


@lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, np.ndarray], ...]:
    """The bundled photos as read-only RGB uint8 arrays, loaded once per process."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        out.append((name, img))
    sample = load_sample_images()
    for name, img in zip(SKLEARN_PHOTOS, sample.images):
        out.append((name, np.asarray(img)))
    rgb = []
    for name, img in out:
        img = img.astype(np.uint8) if img.dtype != np.uint8 else img
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = np.ascontiguousarray(img[..., :3])
        img.setflags(write=False)
        rgb.append((name, img))
    return tuple(rgb)


def photo_names() -> list[str]:
    """Names of the bundled photos used as natural images (all load offline)."""
    return [name for name, _ in _photos()]


def photo_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A random crop (10 .. 100 % of the shorter side) of a random bundled photo, resized to (size, size, 3)."""
    from PIL import Image

    photos = _photos()
    name, img = photos[int(rng.integers(len(photos)))]
    u = rng.random(4)
    h, w = img.shape[:2]
    side = int(min(h, w) * np.sqrt(0.1 + 0.9 * u[0]))
    side = max(side, 16)
    top, left = int(u[1] * (h - side)), int(u[2] * (w - side))
    crop = img[top:top + side, left:left + side]
    if u[3] < 0.5:
        crop = crop[:, ::-1]
    out = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8), name


def _sample_radii(rng: np.random.Generator, n: int, rmin: float, rmax: float) -> np.ndarray:
    """n radii with density proportional to r^-3 on [rmin, rmax] (inverse-CDF sampling)."""
    u = rng.random(n)
    return (rmin ** -2 - u * (rmin ** -2 - rmax ** -2)) ** -0.5


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, angle: float, aspect: float) -> np.ndarray:
    """Boolean mask of a shape of radius r centred at the origin of (dx, dy), rotated by angle."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, c * dy - s * dx
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "square":
        h = r * 0.8
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
    verts = np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)
    return polygon_distance(u, v, verts) >= 0


def _leaf_colours(rng: np.random.Generator, mask: np.ndarray, dx: np.ndarray, dy: np.ndarray, colour: np.ndarray,
                  texture: str) -> np.ndarray:
    """Colours of a leaf's pixels: flat, striped (two colours) or noisy."""
    if texture == "striped":
        other = rng.random(3).astype(np.float32)
        period, angle = rng.uniform(3.0, 10.0), rng.uniform(0, np.pi)
        phase = (np.cos(angle) * dx + np.sin(angle) * dy)[mask] / period
        stripe = (np.floor(phase) % 2).astype(np.float32)[:, None]
        return colour[None, :] * (1 - stripe) + other[None, :] * stripe
    if texture == "noise":
        shade = 1.0 + 0.25 * rng.standard_normal(int(mask.sum())).astype(np.float32)
        return np.clip(colour[None, :] * shade[:, None], 0, 1)
    return np.broadcast_to(colour[None, :], (int(mask.sum()), 3))


def _paint_leaves(rng: np.random.Generator, img: np.ndarray, covered: np.ndarray, n: int, rmin: float, rmax: float,
                  grey: bool, texture_p: float, centre_box: float = 1.0, stop_fraction: float = 0.003) -> None:
    """Draw up to n leaves front to back into the uncovered pixels of img (in place).

    Stops early once less than ``stop_fraction`` of the image is uncovered (the caller fills the rest).
    """
    size = img.shape[0]
    radii = _sample_radii(rng, n, rmin, rmax)
    centres = rng.uniform(-0.1, 1.1, size=(n, 2)) * size * centre_box + size * (1 - centre_box) / 2
    shapes = rng.integers(len(SHAPES), size=n)
    angles = rng.uniform(0, 2 * np.pi, size=n)
    aspects = rng.uniform(0.35, 0.7, size=n)
    colours = rng.random((n, 3)).astype(np.float32)
    if grey:
        colours[:, 1:] = colours[:, :1]
    textures = np.where(rng.random(n) < texture_p, np.where(rng.random(n) < 0.6, 1, 2), 0)
    coords = np.arange(size, dtype=np.float32) + 0.5
    remaining = int((~covered).sum())
    for k in range(n):
        r, (cx, cy) = radii[k], centres[k]
        r0, r1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
        c0, c1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
        if r0 >= r1 or c0 >= c1 or covered[r0:r1, c0:c1].all():
            continue
        dy, dx = coords[r0:r1, None] - cy, coords[None, c0:c1] - cx
        mask = _shape_mask(SHAPES[shapes[k]], dx, dy, r, angles[k], aspects[k]) & ~covered[r0:r1, c0:c1]
        if not mask.any():
            continue
        texture = ("plain", "striped", "noise")[textures[k]]
        cols = _leaf_colours(rng, mask, np.broadcast_to(dx, mask.shape), np.broadcast_to(dy, mask.shape),
                             colours[k], texture)
        if grey and texture == "striped":
            cols = np.repeat(cols.mean(axis=1, keepdims=True), 3, axis=1)
        img[r0:r1, c0:c1][mask] = cols
        covered[r0:r1, c0:c1] |= mask
        remaining -= int(mask.sum())
        if remaining <= stop_fraction * size * size:
            return


def dead_leaves(rng: np.random.Generator, size: int, rmin: float | None = None, rmax: float | None = None,
                grey: bool | None = None, texture_p: float = 0.3, max_leaves: int = 1500) -> np.ndarray:
    """One dead-leaves image, (size, size, 3) uint8; radii in pixels (defaults: 2 % and 60 % of the size)."""
    rmin = max(1.5, 0.02 * size) if rmin is None else float(rmin)
    rmax = 0.6 * size if rmax is None else float(rmax)
    if not 0 < rmin < rmax:
        raise ValueError(f"dead_leaves needs 0 < rmin < rmax, got rmin={rmin}, rmax={rmax}")
    grey = bool(rng.random() < 0.25) if grey is None else grey
    img = np.zeros((size, size, 3), dtype=np.float32)
    covered = np.zeros((size, size), dtype=bool)
    _paint_leaves(rng, img, covered, max_leaves, rmin, rmax, grey, texture_p)
    background = rng.random(3).astype(np.float32)
    img[~covered] = background.mean() if grey else background
    img = blur(img, (0.5, 0.5, 0))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _natural_chunk(size: int, seed: int, photo_fraction: float, start: int, stop: int) -> dict[str, Any]:
    """Images start..stop-1 of make_natural (module level so worker processes can run it)."""
    images, meta = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([NATURAL_CODE, seed, i])
        if rng.random() < photo_fraction:
            img, source = photo_crop(rng, size)
        else:
            img, source = dead_leaves(rng, size), "dead_leaves"
        images.append(img)
        meta.append({"source": source})
    return {"images": np.stack(images), "patient_ids": [f"natural-{seed}-{i:07d}" for i in range(start, stop)],
            "meta": meta}


def _check_n(n: int) -> int:
    """Validate a number of images (a positive int) and return it."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (the number of images), got {n!r}")
    return int(n)


def make_natural(n: int, size: int, seed: int = 0, photo_fraction: float = 0.2, cache: bool = True,
                 workers: int = 1, progress: bool = False) -> ImageSet:
    """``n`` unlabelled RGB natural-image stand-ins: dead leaves plus a share of bundled-photo crops."""
    n, size = _check_n(n), check_size(size)
    if not 0.0 <= float(photo_fraction) <= 1.0:
        raise ValueError(f"photo_fraction must be in 0..1, got {photo_fraction!r}")
    key = {"kind": "natural", "n": n, "size": size, "seed": int(seed), "photo_fraction": float(photo_fraction),
           "version": GENERATOR_VERSION}
    arrays, meta = build_cached("natural", key if cache else None, n,
                                partial(_natural_chunk, size, int(seed), float(photo_fraction)),
                                {"images": ((size, size, 3), np.uint8)}, workers=workers, progress=progress,
                                desc="natural images")
    per_image = dict(meta["per_image"])
    ids = per_image.pop("patient_ids")
    return ImageSet(images=arrays["images"], labels=None, label_names=[], task="none", patient_ids=ids,
                    meta={**per_image, "seed": int(seed), "photo_fraction": float(photo_fraction),
                          "generator_version": GENERATOR_VERSION},
                    name=f"natural?size={size}&photo_fraction={photo_fraction}")


def labelled_image(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """A dead-leaves scene whose dominant foreground object has class ``label`` (shape x texture)."""
    shape, texture = CLASS_NAMES[label].split("_")
    grey = bool(rng.random() < 0.2)
    img = np.zeros((size, size, 3), dtype=np.float32)
    covered = np.zeros((size, size), dtype=bool)
    _paint_leaves(rng, img, covered, int(rng.integers(3, 9)), 0.03 * size, 0.08 * size, grey, 0.3, centre_box=0.8)
    u = rng.random(6)
    r = (0.24 + 0.14 * u[0]) * size
    cx, cy = size * (0.5 + 0.25 * (u[1] - 0.5)), size * (0.5 + 0.25 * (u[2] - 0.5))
    coords = np.arange(size, dtype=np.float32) + 0.5
    dy, dx = coords[:, None] - cy, coords[None, :] - cx
    mask = _shape_mask(shape, dx, dy, r, 2 * np.pi * u[3], 0.42 + 0.15 * u[4]) & ~covered
    colour = rng.random(3).astype(np.float32)
    if grey:
        colour[1:] = colour[0]
    cols = _leaf_colours(rng, mask, np.broadcast_to(dx, mask.shape), np.broadcast_to(dy, mask.shape), colour,
                         texture)
    if grey:
        cols = np.repeat(cols.mean(axis=1, keepdims=True), 3, axis=1)
    img[mask] = cols
    covered |= mask
    _paint_leaves(rng, img, covered, 1200, max(1.5, 0.02 * size), 0.25 * size, grey, 0.35)
    background = rng.random(3).astype(np.float32)
    img[~covered] = background.mean() if grey else background
    img = blur(img, (0.5, 0.5, 0))
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _labelled_chunk(size: int, seed: int, start: int, stop: int) -> dict[str, Any]:
    """Images start..stop-1 of make_natural_labelled (module level for worker processes)."""
    images, labels = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([LABELLED_CODE, seed, i])
        label = int(rng.integers(len(CLASS_NAMES)))
        images.append(labelled_image(rng, size, label))
        labels.append(label)
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int64),
            "patient_ids": [f"shapes-{seed}-{i:07d}" for i in range(start, stop)], "meta": [{} for _ in labels]}


def make_natural_labelled(n: int, size: int, seed: int = 0, cache: bool = True, workers: int = 1,
                          progress: bool = False) -> ImageSet:
    """``n`` RGB images labelled by the shape x texture of their dominant object (8 classes, multiclass)."""
    n, size = _check_n(n), check_size(size)
    key = {"kind": "natural_labelled", "n": n, "size": size, "seed": int(seed), "version": GENERATOR_VERSION}
    arrays, meta = build_cached("natural", key if cache else None, n, partial(_labelled_chunk, size, int(seed)),
                                {"images": ((size, size, 3), np.uint8), "labels": ((), np.int64)},
                                workers=workers, progress=progress, desc="labelled natural images")
    ids = meta["per_image"]["patient_ids"]
    return ImageSet(images=arrays["images"], labels=arrays["labels"], label_names=list(CLASS_NAMES),
                    task="multiclass", patient_ids=ids,
                    meta={"seed": int(seed), "generator_version": GENERATOR_VERSION},
                    name=f"natural-shapes?size={size}")

"""Abdominal CT axial slice phantoms (family ``"ct"``).

Radiological convention: the patient's right is on the image left, anterior is at the top.
A slice is painted in Hounsfield units (air, subcutaneous and visceral fat, abdominal-wall and
paraspinal muscles, bowel loops, liver with vessels and gallbladder, spleen, stomach with an
air-fluid level, pancreas, kidneys with cortex / medulla / sinus fat, aorta, IVC, psoas,
vertebra with cortex and spinal canal, ribs, lung bases, the table), then reconstructed with a
kernel blur and noise and shown in a soft-tissue window.

The slice level ``z`` runs from 0 (the liver dome) to 1 (below the kidneys); every organ has a
z-range over which it grows and shrinks, so a patient's slices at different ``z`` are consistent.

Labels (task ``"multiclass"``, ``label_names`` = liver, spleen, left_kidney, right_kidney,
stomach), by ``view``:

- ``view="organ"`` (default, OrganAMNIST-like): a target organ is drawn uniformly, the slice level
  is drawn where that organ is large, and the image is an organ-centred crop (zoomed so the organ
  fills about half the field); label = the target organ. Classes are balanced.
- ``view="slice"``: the whole slice at a uniformly drawn level; label = the labelled organ with
  the largest area in the mask (ground truth by construction). Classes follow the anatomy
  (liver and kidneys dominate, spleen and stomach are rare).

Mask (label map): 1 liver, 2 spleen, 3 left_kidney, 4 right_kidney, 5 stomach, 6 aorta, 7 spine.
Patients: blocks of 4 indices split into 1 .. 3 patients; a patient's images are slices of one body.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _draw as D
from ._base import FamilySpec, PhantomSample, check_index, check_seed, check_site

FAMILY = "ct"
CODE = 1002
BLOCK = 4
PARTITIONS = {(4,): 0.35, (2, 2): 0.25, (1, 3): 0.15, (3, 1): 0.1, (2, 1, 1): 0.15}
LABEL_NAMES = ("liver", "spleen", "left_kidney", "right_kidney", "stomach")
MASK_NAMES = ("liver", "spleen", "left_kidney", "right_kidney", "stomach", "aorta", "spine")
VIEWS = ("organ", "slice")
# z-range (start, end) of each organ, on the liver-dome (0) .. lower-pole (1) axis
Z_RANGE = {"liver": (-0.08, 0.72), "liver_left": (-0.08, 0.38), "spleen": (0.0, 0.52), "stomach": (-0.06, 0.48),
           "left_kidney": (0.3, 0.86), "right_kidney": (0.38, 0.94), "lung": (-0.3, 0.2), "gallbladder": (0.3, 0.55),
           "pancreas": (0.32, 0.58), "psoas": (0.45, 1.3), "bowel": (0.3, 1.4)}
# HU by contrast phase: (non-contrast, portal venous)
HU = {"fat": (-100, -100), "visceral": (-90, -90), "muscle": (45, 55), "liver": (58, 110), "spleen": (48, 115),
      "kidney_cortex": (32, 185), "kidney_medulla": (28, 130), "aorta": (42, 170), "ivc": (40, 130),
      "pancreas": (42, 95), "bowel_wall": (40, 90), "gallbladder": (8, 10), "bone": (230, 230),
      "cortex": (700, 700), "canal": (20, 20), "stomach_wall": (40, 90), "air": (-1000, -1000), "lung": (-860, -860)}


@dataclass(frozen=True)
class CTSite:
    """Scanner and protocol statistics of one site."""

    name: str
    contrast_p: float  # share of portal-venous (contrast) studies
    noise: tuple[float, float]  # HU noise sd range
    kernel: float  # reconstruction blur sigma (px at 128)
    window: tuple[float, float]  # (level, width)
    fov: tuple[float, float]  # body-size-in-image range
    oral_contrast_p: float


SITES: tuple[CTSite, ...] = (
    CTSite("routine-portal", 0.9, (8, 14), 0.6, (40, 400), (0.95, 1.08), 0.3),
    CTSite("low-dose", 0.7, (16, 28), 0.8, (40, 400), (0.92, 1.05), 0.2),
    CTSite("non-contrast", 0.1, (9, 15), 0.6, (40, 350), (0.95, 1.1), 0.1),
    CTSite("sharp-kernel", 0.85, (12, 20), 0.35, (50, 400), (0.98, 1.12), 0.4),
    CTSite("smooth-kernel", 0.9, (6, 10), 1.0, (40, 450), (0.92, 1.04), 0.5),
    CTSite("mixed-vendor", 0.6, (8, 24), 0.7, (35, 380), (0.9, 1.12), 0.3),
)


def site_label_names(site: int) -> list[str]:
    """Class names (the same at every CT site)."""
    check_site(site, FAMILY)
    return list(LABEL_NAMES)


@dataclass(frozen=True)
class Body:
    """One patient's body habitus and organ placement jitter."""

    ax: float
    ay: float
    fat: float
    jitter: np.ndarray  # (16, 2) organ centre offsets
    sizes: np.ndarray  # (16,) organ size factors
    z_shift: np.ndarray  # (16,) organ z-range shifts
    contrast: bool
    oral: bool
    texture: np.ndarray
    vessels: np.ndarray
    bowel: np.ndarray  # (12, 5) bowel loop x, y, r, content, z-phase


def _profile(z: float, organ: str, body: Body, k: int) -> float:
    """Size factor 0..1 of an organ at slice level z (a rounded bump over its z-range)."""
    z0, z1 = Z_RANGE[organ]
    z0, z1 = z0 + body.z_shift[k], z1 + body.z_shift[k]
    t = (z - z0) / (z1 - z0)
    if t <= 0 or t >= 1:
        return 0.0
    return float(np.sin(np.pi * t) ** 0.6)


def _sample_body(rng: np.random.Generator, spec: CTSite) -> Body:
    """Draw one patient's habitus, jitters and contrast (a fixed number of draws)."""
    u = rng.random(6)
    return Body(ax=0.8 + 0.1 * u[0], ay=0.56 + 0.08 * u[1], fat=0.03 + 0.09 * u[2],
                jitter=rng.normal(0, 0.025, size=(16, 2)), sizes=rng.uniform(0.85, 1.15, size=16),
                z_shift=rng.normal(0, 0.03, size=16), contrast=bool(u[3] < spec.contrast_p),
                oral=bool(u[4] < spec.oral_contrast_p), texture=rng.standard_normal((12, 12)).astype(np.float32),
                vessels=rng.standard_normal((9, 9)).astype(np.float32),
                bowel=rng.random((12, 5)))


# (cx, cy, ax, ay, angle) at full size, for a body of half-axes (0.85, 0.6)
ORGAN_BASE = {"liver": (-0.36, -0.02, 0.42, 0.4, 0.0), "liver_left": (0.02, -0.26, 0.28, 0.13, 0.1),
              "spleen": (0.52, 0.2, 0.12, 0.22, 0.55), "stomach": (0.3, -0.18, 0.22, 0.15, -0.3),
              "left_kidney": (0.34, 0.3, 0.1, 0.13, -0.5), "right_kidney": (-0.34, 0.31, 0.1, 0.13, 0.5),
              "lung": (0.0, 0.36, 0.17, 0.11, 0.0), "gallbladder": (-0.2, -0.14, 0.075, 0.055, 0.4),
              "pancreas": (0.12, 0.04, 0.26, 0.05, -0.15), "psoas": (0.0, 0.3, 0.065, 0.06, 0.0)}
ORGAN_INDEX = {"liver": 0, "liver_left": 1, "spleen": 2, "stomach": 3, "left_kidney": 4, "right_kidney": 5,
               "lung": 6, "gallbladder": 7, "pancreas": 8, "psoas": 9, "aorta": 10, "ivc": 11}


def _organ_ellipse(name: str, z: float, b: Body) -> tuple[float, float, float, float, float]:
    """(cx, cy, ax, ay, angle) of an organ at level z, in scene units (0 size when absent)."""
    base = ORGAN_BASE[name]
    k = ORGAN_INDEX[name]
    p = _profile(z, name, b, k)
    s = b.sizes[k] * p
    cx, cy = base[0] + b.jitter[k, 0], base[1] + b.jitter[k, 1]
    if name == "liver":  # the right lobe drifts down and laterally as it tapers
        cx, cy = cx - 0.05 * z, cy + 0.08 * z
    return cx * b.ax / 0.85, cy * b.ay / 0.6, base[2] * s, base[3] * s, base[4]


def _paint(hu: np.ndarray, alpha: np.ndarray, value: float) -> None:
    """Composite ``value`` over ``hu`` with soft coverage ``alpha`` (in place)."""
    hu += (np.float32(value) - hu) * alpha


def _hu(name: str, b: Body) -> float:
    """Hounsfield value of a tissue in this patient's contrast phase."""
    return float(HU[name][1 if b.contrast else 0])


def _body_layers(cv: D.Canvas, b: Body, edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU map with air, subcutaneous fat, muscle wall and visceral fat; the body and cavity masks."""
    hu = np.full((cv.size, cv.size), -1000.0, dtype=np.float32)
    body = cv.ellipse(0.0, 0.0, b.ax, b.ay, edge, square=0.12)
    _paint(hu, body, _hu("fat", b))
    wall = cv.ellipse(0.0, 0.0, b.ax - b.fat, b.ay - b.fat * 0.8, edge, square=0.12)
    _paint(hu, wall, _hu("muscle", b))
    cavity = cv.ellipse(0.0, -0.02, b.ax - b.fat - 0.035, b.ay - b.fat * 0.8 - 0.03, edge, square=0.12)
    _paint(hu, cavity, _hu("visceral", b))
    for sx in (-1.0, 1.0):
        _paint(hu, cv.ellipse(sx * 0.17, b.ay - b.fat - 0.09, 0.13, 0.09, edge) * body, _hu("muscle", b))
    return hu, body, cavity


def _bowel(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, cavity: np.ndarray, edge: float) -> None:
    """Bowel loops (wall + air / fluid / oral contrast) in the lower abdomen."""
    strength = _profile(z, "bowel", b, 12)
    if strength <= 0:
        return
    for x, y, r, content, phase in b.bowel:
        if np.sin(6.0 * z + 6.28 * phase) < 0.1:
            continue
        cx, cy, rad = (x * 1.2 - 0.6) * b.ax, (y * 0.9 - 0.65) * b.ay, (0.035 + 0.04 * r) * strength
        if rad < 0.01:
            continue
        loop = cv.ellipse(cx, cy, rad, rad * 0.85, edge) * cavity
        _paint(hu, loop, _hu("bowel_wall", b))
        fill = -1000.0 if content < 0.3 else (250.0 if (content > 0.75 and b.oral) else 15.0)
        _paint(hu, cv.ellipse(cx, cy, rad * 0.7, rad * 0.6, edge) * cavity, fill)


def _kidney(cv: D.Canvas, hu: np.ndarray, e: tuple[float, float, float, float, float], side: float, b: Body,
            edge: float) -> np.ndarray:
    """Paint a kidney (cortex, medulla, sinus fat at the hilum); return its soft mask."""
    cx, cy, ax, ay, ang = e
    if ax < 0.01:
        return cv.zeros()
    k = cv.ellipse(cx, cy, ax, ay, edge, angle=ang)
    _paint(hu, k, _hu("kidney_cortex", b))
    _paint(hu, cv.ellipse(cx, cy, ax * 0.62, ay * 0.68, edge, angle=ang), _hu("kidney_medulla", b))
    sinus = cv.ellipse(cx - side * ax * 0.55, cy - ay * 0.25, ax * 0.42, ay * 0.3, edge, angle=ang)
    _paint(hu, sinus, _hu("fat", b))
    return k * (np.float32(1.0) - sinus)


def _spine(cv: D.Canvas, hu: np.ndarray, b: Body, edge: float) -> np.ndarray:
    """Paint the vertebra (cortex, cancellous body, canal, posterior elements); return its mask."""
    cy = b.ay * 0.52
    body = cv.ellipse(0.0, cy, 0.095, 0.085, edge)
    _paint(hu, body, _hu("cortex", b))
    _paint(hu, cv.ellipse(0.0, cy, 0.08, 0.07, edge), _hu("bone", b))
    post = D.soft_polygon(cv.X, cv.Y, np.array([[-0.07, cy + 0.1], [0.07, cy + 0.1], [0.012, cy + 0.27],
                                                [-0.012, cy + 0.27]]), edge)
    _paint(hu, post, _hu("cortex", b) * 0.8)
    canal = cv.ellipse(0.0, cy + 0.125, 0.042, 0.036, edge)
    _paint(hu, canal, _hu("canal", b))
    return np.maximum(body, post * (np.float32(1.0) - canal))


def _ribs(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, edge: float) -> None:
    """Rib and costal-cartilage cross-sections inside the body wall (fewer at lower levels)."""
    n = int(round(5 * max(0.0, 1.0 - z * 1.3)))
    for k in range(n):
        ang = np.deg2rad(-55 + 150 * (k + 0.5) / max(n, 1) + 8 * np.sin(7 * z + k))
        for sx in (-1.0, 1.0):
            rx = sx * (b.ax - b.fat - 0.018) * np.cos(ang)
            ry = (b.ay - b.fat * 0.8 - 0.018) * np.sin(ang)
            _paint(hu, cv.ellipse(rx, ry, 0.026, 0.014, edge, angle=-sx * ang + np.pi / 2), _hu("cortex", b) * 0.55)


def _claim(masks: dict[str, np.ndarray], name: str, m: np.ndarray) -> None:
    """Record organ ``name`` painted with coverage ``m``: it hides what was painted under it."""
    for key in masks:
        masks[key] = masks[key] * (np.float32(1.0) - m)
    masks[name] = np.maximum(masks[name], m) if name in masks else m


def _liver(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, cavity: np.ndarray, edge: float,
           masks: dict[str, np.ndarray]) -> None:
    """Liver (right and left lobes, texture, portal vein branches with contrast) and the gallbladder."""
    liver = cv.zeros()
    for name in ("liver", "liver_left"):
        e = _organ_ellipse(name, z, b)
        if e[2] > 0.01:
            liver = np.maximum(liver, cv.ellipse(*e[:4], edge, angle=e[4], square=0.2) * cavity)
    if not liver.any():
        return
    _paint(hu, liver, _hu("liver", b))
    hu += liver * D.smooth_noise(None, hu.shape, 0, coarse=b.texture) * np.float32(6.0)
    if b.contrast:  # portal / hepatic vein branches: ridges of a smooth random field
        ridge = D.smooth_noise(None, hu.shape, 0, coarse=b.vessels)
        hu += liver * D.ramp(np.float32(0.12) - np.abs(ridge), 0.08) * np.float32(40.0)
    _claim(masks, "liver", liver)
    gb = _organ_ellipse("gallbladder", z, b)
    if gb[2] > 0.01:
        g = cv.ellipse(*gb[:4], edge, angle=gb[4])
        _paint(hu, g, _hu("gallbladder", b))
        _claim(masks, "gallbladder", g)


def _upper_organs(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, cavity: np.ndarray, edge: float,
                  masks: dict[str, np.ndarray]) -> None:
    """Spleen, stomach (wall, fluid and an air-fluid level) and pancreas."""
    for name in ("spleen", "stomach", "pancreas"):
        e = _organ_ellipse(name, z, b)
        if e[2] <= 0.01:
            continue
        m = cv.ellipse(*e[:4], edge, angle=e[4]) * cavity
        if name == "stomach":
            _paint(hu, m, _hu("stomach_wall", b))
            inner = cv.ellipse(e[0], e[1], e[2] * 0.82, e[3] * 0.78, edge, angle=e[4])
            _paint(hu, inner, 20.0)
            _paint(hu, inner * D.ramp(np.float32(e[1] - 0.2 * e[3]) - cv.Y, edge), _hu("air", b))
        else:
            _paint(hu, m, _hu(name, b))
        _claim(masks, name, m)


def _retroperitoneum(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, edge: float,
                     masks: dict[str, np.ndarray]) -> None:
    """Kidneys, psoas muscles, aorta, inferior vena cava, vertebra and ribs."""
    for name, side in (("left_kidney", 1.0), ("right_kidney", -1.0)):
        _claim(masks, name, _kidney(cv, hu, _organ_ellipse(name, z, b), side, b, edge))
    ps = _organ_ellipse("psoas", z, b)
    if ps[2] > 0.01:
        for sx in (-1.0, 1.0):
            _paint(hu, cv.ellipse(sx * 0.14, ps[1], ps[2], ps[3], edge), _hu("muscle", b))
    aorta = cv.ellipse(0.05, b.ay * 0.52 - 0.15, 0.042, 0.042, edge)
    _paint(hu, aorta, _hu("aorta", b))
    _claim(masks, "aorta", aorta)
    _paint(hu, cv.ellipse(-0.1, b.ay * 0.52 - 0.17, 0.05, 0.035, edge), _hu("ivc", b))
    _claim(masks, "spine", _spine(cv, hu, b, edge))
    _ribs(cv, hu, b, z, edge)


def _lung_bases(cv: D.Canvas, hu: np.ndarray, b: Body, z: float, cavity: np.ndarray, edge: float,
                masks: dict[str, np.ndarray]) -> None:
    """Posterior lung bases on the highest slices."""
    lung = _organ_ellipse("lung", z, b)
    if lung[2] <= 0.01:
        return
    for sx in (-1.0, 1.0):
        lm = cv.ellipse(sx * 0.45 * b.ax, lung[1], lung[2] * 1.2, lung[3], edge) * cavity
        _paint(hu, lm, _hu("lung", b))
        _claim(masks, "lung", lm)


def _render(cv: D.Canvas, b: Body, z: float, rng: np.random.Generator, spec: CTSite, noise: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Paint the slice in HU (later structures hide earlier ones), reconstruct, window; return (image, mask)."""
    size = cv.size
    edge = 1.2 * 2.0 / size / cv.scale
    hu, body, cavity = _body_layers(cv, b, edge)
    _bowel(cv, hu, b, z, cavity, edge)
    masks: dict[str, np.ndarray] = {}
    _liver(cv, hu, b, z, cavity, edge, masks)
    _upper_organs(cv, hu, b, z, cavity, edge, masks)
    _retroperitoneum(cv, hu, b, z, edge, masks)
    _lung_bases(cv, hu, b, z, cavity, edge, masks)
    table = cv.ellipse(0.0, b.ay + 1.4, 1.6, 1.36, edge)
    _paint(hu, table * (np.float32(1.0) - body) * D.ramp(np.float32(b.ay + 0.1) - cv.Y, edge), 150.0)
    hu = D.blur(hu, spec.kernel * size / 128 * min(cv.scale, 2.0) ** 0.5)
    hu += D.fast_noise(rng, (size, size)) * np.float32(noise)
    level, width = spec.window
    img = D.to_uint8(D.window(hu, level - width / 2, level + width / 2))
    mask = np.zeros((size, size), dtype=np.uint8)
    for k, name in enumerate(MASK_NAMES, start=1):
        if name in masks:
            mask[masks[name] > 0.5] = k
    return img, mask


def _choose_view(rng: np.random.Generator, b: Body, view: str) -> tuple[float, str | None]:
    """Draw the slice level and (for the organ view) the target organ (a fixed number of draws)."""
    u = rng.random(3)
    if view == "slice":
        return 0.9 * float(u[0]), None
    target = LABEL_NAMES[int(u[1] * len(LABEL_NAMES)) % len(LABEL_NAMES)]
    z0, z1 = Z_RANGE[target]
    k = ORGAN_INDEX[target]
    z0, z1 = z0 + b.z_shift[k], z1 + b.z_shift[k]
    return float(z0 + (z1 - z0) * (0.25 + 0.5 * u[2])), target


def generate(index: int, size: int = 128, seed: int = 0, site: int = 0, view: str = "organ") -> PhantomSample:
    """One abdominal CT slice phantom; ``view`` is "organ" (organ-centred crop) or "slice" (whole slice)."""
    index, seed = check_index(index, FAMILY), check_seed(seed, FAMILY)
    site, size = check_site(site, FAMILY), D.check_size(size)
    if view not in VIEWS:
        raise ValueError(f"view={view!r} is not a CT view; choose one of {VIEWS}")
    spec = SITES[site]
    block = index // BLOCK
    partition = D.sample_partition(np.random.default_rng([CODE, seed, site, block]), BLOCK, PARTITIONS)
    pnum, slice_no = D.patient_slot(index, BLOCK, partition)
    b = _sample_body(np.random.default_rng([CODE, seed, site, block, pnum, 1]), spec)
    rng = np.random.default_rng([CODE, seed, site, index, 2])
    z, target = _choose_view(rng, b, view)
    u = rng.random(4)
    fov = spec.fov[0] + (spec.fov[1] - spec.fov[0]) * u[0]
    noise = spec.noise[0] + (spec.noise[1] - spec.noise[0]) * u[1]
    if target is None:
        cv = D.Canvas.make(size, 0.0, fov, (0.0, 0.04 * (u[2] - 0.5)))
    else:
        cx, cy, ax, ay, _ = _organ_ellipse(target, z, b)
        zoom = float(np.clip(0.55 / max(ax, ay, 0.05), 1.2, 3.5))
        cv = D.Canvas.make(size, 0.0, zoom, (-zoom * cx + 0.1 * (u[2] - 0.5), -zoom * cy + 0.1 * (u[3] - 0.5)))
    img, mask = _render(cv, b, z, rng, spec, noise)
    if target is None:
        areas = np.bincount(mask.ravel(), minlength=len(MASK_NAMES) + 1)[1:len(LABEL_NAMES) + 1]
        label = int(np.argmax(areas))
    else:
        label = LABEL_NAMES.index(target)
    meta = {"site": site, "view": view, "z": z, "contrast": b.contrast, "noise_hu": float(noise),
            "zoom": float(cv.scale), "slice": slice_no}
    pid = f"{FAMILY}-s{site}-{seed}-{block:06d}-{pnum}"
    return PhantomSample(image=img, labels=np.array(label, dtype=np.int64), mask=mask, patient_id=pid, meta=meta)


SPEC = FamilySpec(name=FAMILY, code=CODE, task="multiclass", mask_names=MASK_NAMES, label_names=site_label_names,
                  generate=generate, params=("view",),
                  description="abdominal CT axial slice: organ label (organ-centred crop or whole slice)")

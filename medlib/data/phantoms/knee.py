"""Sagittal knee MRI phantoms (family ``"knee"``).

Anterior is on the image left, superior at the top. The slice is a composite sagittal view that
shows, together, the femur (shaft and condyle, dark cortex around marrow), the tibia (plateau,
head and tuberosity), the patella with its cartilage, femoral and tibial cartilage, the anterior
and posterior horns of the meniscus (dark wedges), the anterior cruciate ligament (ACL, a dark band
from the femoral notch down to the anterior tibial spine), the posterior cruciate ligament,
quadriceps and patellar tendons, Hoffa's fat pad, muscles and subcutaneous fat. Tissue classes get
intensities from a proton-density (PD) or fat-suppressed PD (PD-FS) table; the acquisition adds a
coil bias field, a little blur and Rician noise.

Labels (task ``"multilabel"``, ``label_names`` = ["acl_tear", "meniscal_tear"], patient level):

- ``acl_tear``: the ACL band is discontinuous (a gap filled with bright edema) and its distal part is
  lax (flatter, wavy); a joint effusion and, on PD-FS, bone bruises are more likely.
- ``meniscal_tear``: a bright (fluid-signal) line crosses the posterior horn and reaches its surface.

Mask (label map): 1 femur, 2 tibia, 3 patella, 4 cartilage, 5 acl, 6 meniscus.
``make_dataset("knee", ..., target="acl_tear")`` turns this into a binary task.
Patients: blocks of 2 indices; a patient has 1 or 2 images of the same knee (the second one a new
acquisition: sequence, positioning and noise change, the anatomy and the tears do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _draw as D
from ._base import FamilySpec, PhantomSample, check_index, check_seed, check_site, resolve_findings

FAMILY = "knee"
CODE = 1003
BLOCK = 2
PARTITIONS = {(2,): 0.6, (1, 1): 0.4}
LABEL_NAMES = ("acl_tear", "meniscal_tear")
MASK_NAMES = ("femur", "tibia", "patella", "cartilage", "acl", "meniscus")
# tissue intensities: (PD, PD-FS)
TISSUE = {"air": (0.02, 0.02), "fat": (0.82, 0.14), "marrow": (0.7, 0.16), "cortex": (0.05, 0.04),
          "muscle": (0.36, 0.3), "cartilage": (0.55, 0.52), "fluid": (0.72, 0.95), "ligament": (0.09, 0.07),
          "meniscus": (0.06, 0.05), "tendon": (0.07, 0.06), "edema": (0.6, 0.8), "bruise": (0.55, 0.7)}


@dataclass(frozen=True)
class KneeSite:
    """Scanner statistics and case mix of one site."""

    name: str
    fs_p: float  # share of fat-suppressed PD images
    noise: tuple[float, float]
    blur: float
    acl_p: float
    meniscus_p: tuple[float, float]  # P(meniscal tear | no ACL tear), P(meniscal tear | ACL tear)


SITES: tuple[KneeSite, ...] = (
    KneeSite("sports-clinic", 0.5, (0.02, 0.04), 0.5, 0.35, (0.3, 0.6)),
    KneeSite("general-radiology", 0.3, (0.03, 0.05), 0.6, 0.2, (0.25, 0.5)),
    KneeSite("low-field", 0.2, (0.05, 0.08), 0.9, 0.25, (0.3, 0.55)),
    KneeSite("research-3T", 0.7, (0.015, 0.03), 0.4, 0.4, (0.35, 0.65)),
    KneeSite("orthopaedic-trauma", 0.6, (0.03, 0.05), 0.6, 0.5, (0.3, 0.7)),
    KneeSite("elderly-cohort", 0.4, (0.03, 0.06), 0.7, 0.1, (0.45, 0.6)),
)


def site_label_names(site: int) -> list[str]:
    """Label names (the same at every knee site)."""
    check_site(site, FAMILY)
    return list(LABEL_NAMES)


@dataclass(frozen=True)
class Knee:
    """One patient's knee: geometry jitter, tears and their geometry."""

    scale: float
    condyle_r: float
    plateau_y: float
    slope: float
    notch: tuple[float, float]  # femoral ACL attachment
    spine: tuple[float, float]  # tibial ACL attachment
    acl_tear: bool
    meniscal_tear: bool
    gap: tuple[float, float]  # where along the ACL the tear is and how long it is
    lax: float
    tear_line: tuple[float, float, float]  # meniscal tear: offset, slope, surface (0 top / 1 bottom)
    effusion: bool
    texture: np.ndarray


def _sample_knee(rng: np.random.Generator, spec: KneeSite) -> Knee:
    """Draw one knee (a fixed number of draws)."""
    u = rng.random(16)
    acl = bool(u[0] < spec.acl_p)
    men = bool(u[1] < spec.meniscus_p[1 if acl else 0])
    return Knee(scale=0.95 + 0.1 * u[2], condyle_r=0.3 + 0.04 * u[3], plateau_y=0.1 + 0.04 * u[4],
                slope=0.05 + 0.08 * u[5], notch=(0.2 + 0.04 * u[6], -0.08 + 0.04 * u[7]),
                spine=(-0.1 + 0.05 * u[8], 0.16), acl_tear=acl, meniscal_tear=men,
                gap=(0.35 + 0.3 * u[9], 0.18 + 0.15 * u[10]), lax=0.5 + 0.5 * u[11],
                tear_line=(-0.3 + 0.6 * u[12], -0.5 + 1.0 * u[13], float(u[14] < 0.5)),
                effusion=bool(u[15] < (0.7 if acl else 0.2)), texture=rng.standard_normal((10, 10)).astype(np.float32))


def _paint(img: np.ndarray, alpha: np.ndarray, value: float) -> None:
    """Composite ``value`` over ``img`` with soft coverage ``alpha`` (in place)."""
    img += (np.float32(value) - img) * alpha


def _segment(cv: D.Canvas, p0: tuple[float, float], p1: tuple[float, float], half_width: float,
             edge: float) -> np.ndarray:
    """Soft band of half-width ``half_width`` along the segment p0 -> p1."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    t = ((cv.X - np.float32(x0)) * np.float32(dx) + (cv.Y - np.float32(y0)) * np.float32(dy)) * np.float32(1 / length2)
    nrm = np.float32(1.0 / np.sqrt(length2))
    d = ((cv.X - np.float32(x0)) * np.float32(dy) - (cv.Y - np.float32(y0)) * np.float32(dx)) * nrm
    inside = D.ramp(np.minimum(t, np.float32(1.0) - t) * np.float32(np.sqrt(length2)), edge)
    return D.band(d, half_width, edge) * inside


def _acl(cv: D.Canvas, k: Knee, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """ACL band (intact: straight and taut; torn: gap plus a lax, wavy distal stump) and the tear edema."""
    if not k.acl_tear:
        band = _segment(cv, k.notch, k.spine, 0.028, edge)
        return band, cv.zeros()
    g0, glen = k.gap
    start = g0 - glen / 2
    cut = (k.notch[0] + (k.spine[0] - k.notch[0]) * start, k.notch[1] + (k.spine[1] - k.notch[1]) * start)
    prox = _segment(cv, k.notch, cut, 0.03, edge)
    lax_start = (cut[0] - 0.03 - 0.05 * k.lax, cut[1] + 0.05 + 0.05 * k.lax)
    wave = np.float32(0.012) * np.sin(cv.X * np.float32(55.0))
    dist = D.ramp(np.float32(0.022) - np.abs(cv.Y - _line_y(cv.X, lax_start, k.spine) - wave), edge)
    dist *= D.ramp(np.minimum(cv.X - np.float32(k.spine[0]), np.float32(lax_start[0]) - cv.X), edge)
    edema = cv.ellipse(cut[0] - 0.02, cut[1] + 0.05, 0.08, 0.06, 0.03) * np.float32(0.8)
    return np.maximum(prox, dist), edema


def _line_y(X: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """y on the straight line through p0 and p1 at each x."""
    slope = (p1[1] - p0[1]) / (p1[0] - p0[0])
    return np.float32(p0[1]) + (X - np.float32(p0[0])) * np.float32(slope)


def _menisci(cv: D.Canvas, joint: float, edge: float) -> np.ndarray:
    """Anterior (small) and posterior (large) meniscal horns as dark wedges at the joint periphery."""
    out = cv.zeros()
    for outer, inner, h in ((-0.37, -0.22, 0.045), (0.4, 0.2, 0.06)):
        tri = np.array([[outer, joint - h], [inner, joint], [outer, joint + h * 0.8]])
        out = np.maximum(out, D.soft_polygon(cv.X, cv.Y, tri, edge))
    return out


def _soft_tissue(cv: D.Canvas, T: dict[str, float], tex: np.ndarray, edge: float) -> np.ndarray:
    """Air, skin and subcutaneous fat, quadriceps, hamstrings, gastrocnemius and popliteal vessels."""
    X, Y = cv.X, cv.Y
    img = np.full((cv.size, cv.size), T["air"], dtype=np.float32)
    front = np.float32(-0.74) - np.float32(0.05) * np.exp(-(Y + np.float32(0.3)) ** 2 * np.float32(8.0))
    leg = D.ramp(X - front, edge * 2) * D.ramp(np.float32(0.8) - np.float32(0.05) * Y - X, edge * 2)
    _paint(img, leg, T["fat"])
    for cx, cy, ax, ay in ((-0.38, -1.05, 0.3, 0.62), (0.46, -0.95, 0.26, 0.72), (0.44, 0.95, 0.28, 0.75),
                           (-0.3, 1.15, 0.15, 0.4)):
        muscle = cv.ellipse(cx, cy, ax, ay, edge * 2, square=0.3)
        _paint(img, muscle * (np.float32(0.92) + np.float32(0.1) * tex), T["muscle"])
    vessel = D.band(X - np.float32(0.5) - np.float32(0.05) * Y, 0.025, edge) * D.band(Y, 0.7, 0.1)
    _paint(img, vessel, T["ligament"])
    img += tex * np.float32(0.03) * leg
    return img


def _render(cv: D.Canvas, k: Knee, fs: bool, rng: np.random.Generator, noise: float, blur: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Paint tissue intensities, take the acquisition, return (uint8 image, uint8 mask)."""
    T = {name: v[1 if fs else 0] for name, v in TISSUE.items()}
    size, X, Y = cv.size, cv.X, cv.Y
    edge = 1.2 * 2.0 / size / cv.scale
    one = np.float32(1.0)
    tex = D.smooth_noise(None, (size, size), 0, coarse=k.texture)
    img = _soft_tissue(cv, T, tex, edge)
    r, jy = k.condyle_r, k.plateau_y
    ccy = jy - 0.045 - r
    tibia_y = jy + 0.03
    # femur: shaft + condyle, with the intercondylar notch (roof = Blumensaat's line) cut out
    notch = cv.ellipse(0.1, ccy + 0.78 * r, 0.2, 0.3, edge, angle=-0.7)
    shaft = D.band(X - np.float32(0.03), 0.2, edge) * D.ramp(np.float32(ccy) - Y, edge)
    femur = np.maximum(cv.ellipse(0.04, ccy, r, r * 0.95, edge), shaft) * (one - notch)
    marrow_f = np.maximum(cv.ellipse(0.04, ccy, r - 0.025, r * 0.95 - 0.025, edge),
                          D.band(X - np.float32(0.03), 0.175, edge) * D.ramp(np.float32(ccy) - Y, edge))
    marrow_f *= one - cv.ellipse(0.1, ccy + 0.78 * r, 0.225, 0.325, edge, angle=-0.7)
    plateau = Y - np.float32(tibia_y) - np.float32(k.slope) * X
    head = cv.ellipse(0.03, tibia_y + 0.3, 0.4, 0.3, edge, square=0.5) * D.ramp(plateau, edge)
    tibia = np.maximum(head, D.band(X - np.float32(0.05), 0.2, edge) * D.ramp(Y - np.float32(tibia_y + 0.3), edge))
    tibia = np.maximum(tibia, cv.ellipse(-0.33, tibia_y + 0.4, 0.09, 0.12, edge))
    marrow_t = np.maximum(cv.ellipse(0.03, tibia_y + 0.3, 0.375, 0.275, edge, square=0.5) *
                          D.ramp(plateau - np.float32(0.025), edge),
                          D.band(X - np.float32(0.05), 0.175, edge) * D.ramp(Y - np.float32(tibia_y + 0.3), edge))
    fcart = cv.ellipse(0.04, ccy, r + 0.028, r * 0.95 + 0.028, edge) * D.ramp(Y - np.float32(ccy + 0.05), edge)
    fcart *= D.ramp(np.float32(0.36) - np.abs(X - np.float32(0.04)), edge) * (one - notch)
    tcart = D.band(plateau + np.float32(0.015), 0.016, edge) * D.band(X - np.float32(0.02), 0.34, edge)
    pcx, pcy = -0.56, ccy - 0.05
    patella = cv.ellipse(pcx, pcy, 0.085, 0.2, edge, angle=0.12)
    pcart = cv.ellipse(pcx + 0.035, pcy, 0.075, 0.18, edge, angle=0.12) * D.ramp(X - np.float32(pcx), edge)
    _paint(img, cv.ellipse(-0.36, jy, 0.15, 0.17, edge * 3), T["fat"])  # Hoffa's fat pad
    _paint(img, notch * D.ramp(Y - np.float32(ccy), edge), T["fat"] * 0.8)
    if k.effusion:
        _paint(img, cv.ellipse(-0.42, ccy - 0.32, 0.08, 0.22, edge * 2, angle=0.2), T["fluid"])
    quad = _segment(cv, (pcx + 0.02, pcy - 0.18), (-0.46, -1.1), 0.035, edge)
    pat_t = _segment(cv, (pcx + 0.03, pcy + 0.18), (-0.36, tibia_y + 0.36), 0.03, edge)
    _paint(img, np.maximum(quad, pat_t), T["tendon"])
    pmarrow = cv.ellipse(pcx, pcy, 0.065, 0.18, edge, angle=0.12)
    for bone, marrow in ((femur, marrow_f), (tibia, marrow_t), (patella, pmarrow)):
        _paint(img, bone, T["cortex"])
        _paint(img, marrow, T["marrow"])
    img += (marrow_f + marrow_t) * tex * np.float32(0.04)
    cart = np.maximum(np.maximum(fcart * (one - femur), tcart * (one - tibia)), pcart * (one - patella))
    _paint(img, cart, T["cartilage"])
    men = _menisci(cv, tibia_y - 0.035, edge) * (one - femur) * (one - tibia)
    _paint(img, men, T["meniscus"])
    if k.meniscal_tear:
        off, slope, surf = k.tear_line
        cx = 0.3 + 0.05 * off
        line = D.band(Y - np.float32(tibia_y - 0.035) - np.float32(0.25 * slope) * (X - np.float32(cx)), 0.007, edge)
        reach = D.ramp((np.float32(cx + 0.08) - X) if surf < 0.5 else (X - np.float32(cx - 0.08)), edge)
        _paint(img, line * reach * D.ramp(men - np.float32(0.2), 0.2), T["fluid"])
    roof = (0.1 - 0.2 * np.cos(0.7), ccy + 0.78 * r - 0.2 * np.sin(0.7))
    pcl_a = _segment(cv, (roof[0] + 0.04, roof[1] + 0.04), (0.2, jy - 0.02), 0.035, edge)
    pcl_b = _segment(cv, (0.2, jy - 0.02), (0.3, tibia_y + 0.18), 0.035, edge)
    _paint(img, np.maximum(pcl_a, pcl_b), T["ligament"])
    acl, edema = _acl(cv, k, edge)
    _paint(img, edema, T["edema"])
    _paint(img, acl, T["ligament"])
    if k.acl_tear and fs:
        _paint(img, cv.ellipse(0.1, ccy + r * 0.7, 0.1, 0.07, 0.06) * marrow_f, T["bruise"])
        _paint(img, cv.ellipse(0.25, tibia_y + 0.1, 0.1, 0.06, 0.06) * marrow_t, T["bruise"])
    bias = one + np.float32(0.15) * (X + Y) * np.float32(-0.5) + np.float32(0.05) * tex
    img = D.blur(img * bias, blur * size / 128)
    re = img + D.fast_noise(rng, (size, size)) * np.float32(noise)
    im = D.fast_noise(rng, (size, size)) * np.float32(noise)
    img = np.sqrt(re * re + im * im)
    mask = np.zeros((size, size), dtype=np.uint8)
    for value, m in enumerate((femur, tibia, patella, cart, acl, men), start=1):
        mask[m > 0.5] = value
    return D.to_uint8(img * np.float32(1.1)), mask


def generate(index: int, size: int = 128, seed: int = 0, site: int = 0, findings: dict[str, int] | None = None
             ) -> PhantomSample:
    """One sagittal knee MRI phantom; ``findings`` forces labels, e.g. ``{"acl_tear": 1}``."""
    index, seed = check_index(index, FAMILY), check_seed(seed, FAMILY)
    site, size = check_site(site, FAMILY), D.check_size(size)
    spec = SITES[site]
    block = index // BLOCK
    partition = D.sample_partition(np.random.default_rng([CODE, seed, site, block]), BLOCK, PARTITIONS)
    pnum, slice_no = D.patient_slot(index, BLOCK, partition)
    knee = _sample_knee(np.random.default_rng([CODE, seed, site, block, pnum, 1]), spec)
    present = resolve_findings(findings, LABEL_NAMES, {"acl_tear": knee.acl_tear, "meniscal_tear": knee.meniscal_tear},
                               FAMILY)
    knee = Knee(**{**knee.__dict__, **present})
    rng = np.random.default_rng([CODE, seed, site, index, 2])
    u = rng.random(6)
    fs = bool(u[0] < spec.fs_p)
    noise = spec.noise[0] + (spec.noise[1] - spec.noise[0]) * u[1]
    cv = D.Canvas.make(size, 6.0 * (u[2] - 0.5), knee.scale * (0.95 + 0.1 * u[3]),
                       (0.06 * (u[4] - 0.5), 0.06 * (u[5] - 0.5)))
    img, mask = _render(cv, knee, fs, rng, noise, spec.blur)
    labels = np.array([float(knee.acl_tear), float(knee.meniscal_tear)], dtype=np.float32)
    meta = {"site": site, "sequence": "PD-FS" if fs else "PD", "noise": float(noise), "effusion": knee.effusion,
            "slice": slice_no}
    pid = f"{FAMILY}-s{site}-{seed}-{block:06d}-{pnum}"
    return PhantomSample(image=img, labels=labels, mask=mask, patient_id=pid, meta=meta)


SPEC = FamilySpec(name=FAMILY, code=CODE, task="multilabel", mask_names=MASK_NAMES, label_names=site_label_names,
                  generate=generate, params=("findings",),
                  description="sagittal knee MRI: ACL tear and meniscal tear labels")

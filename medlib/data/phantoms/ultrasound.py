"""Breast and thyroid ultrasound phantoms (families ``"breast_us"`` and ``"thyroid_us"``).

A B-mode image is an echogenicity map (tissue layers, structures, the lesion) drawn in scan
coordinates - lateral position across the probe and depth - seen through a fan-shaped (curvilinear)
field of view, multiplied by spatially correlated Rayleigh-like speckle, attenuated with depth
(imperfect time-gain compensation), log-compressed and quantised. Outside the fan is black.

Labels (task ``"binary"``, ``label_names`` = ["malignant"]) and the lesion mask (mask value 1):

- breast: benign lesions are smooth, oval, wider-than-tall ("parallel"), sometimes with a thin
  echogenic capsule and posterior enhancement; malignant lesions are irregular and spiculated,
  taller-than-wide, with an echogenic halo and posterior acoustic shadowing. About 15 % of breast
  images show no lesion (label 0, empty mask).
- thyroid (transverse view: strap muscles, two lobes and the isthmus over the trachea, carotid
  arteries and jugular veins): every image holds a nodule; benign nodules are iso- to hyperechoic,
  smooth, with a thin hypoechoic halo and sometimes cystic parts; malignant nodules are hypoechoic,
  taller-than-wide, with irregular / microlobulated margins and microcalcifications (bright foci).

Patients: blocks of 3 indices split into 1 .. 3 patients; a patient's images show the same lesion
from a slightly different probe position, angle and gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _draw as D
from ._base import FamilySpec, PhantomSample, check_index, check_seed, check_site, resolve_findings

CODES = {"breast_us": 1004, "thyroid_us": 1005}
BLOCK = 3
PARTITIONS = {(3,): 0.3, (2, 1): 0.2, (1, 2): 0.1, (1, 1, 1): 0.4}
LABEL_NAMES = ("malignant",)
MASK_NAMES = ("lesion",)


@dataclass(frozen=True)
class USSite:
    """Scanner and case-mix statistics of one ultrasound site."""

    name: str
    malignant_p: float
    sector_deg: float  # full opening angle of the fan
    gain: tuple[float, float]
    grain: tuple[float, float]  # speckle correlation (axial, lateral) in px at 128 px
    attenuation: float  # residual depth attenuation after TGC
    dynamic_range: float  # log-compression strength


SITES: tuple[USSite, ...] = (
    USSite("university-hospital", 0.35, 60.0, (0.95, 1.1), (0.7, 1.6), 0.5, 3.0),
    USSite("screening-programme", 0.2, 55.0, (0.9, 1.05), (0.6, 1.4), 0.4, 2.6),
    USSite("portable-device", 0.3, 70.0, (0.8, 1.2), (1.0, 2.2), 0.9, 3.6),
    USSite("oncology-referral", 0.55, 60.0, (1.0, 1.15), (0.7, 1.5), 0.5, 3.0),
    USSite("community-clinic", 0.25, 65.0, (0.85, 1.2), (0.8, 1.8), 0.7, 3.3),
    USSite("high-frequency-probe", 0.35, 45.0, (0.95, 1.1), (0.5, 1.1), 0.3, 2.4),
)


def site_label_names(site: int) -> list[str]:
    """Label names (the same at every site)."""
    check_site(site, "ultrasound")
    return list(LABEL_NAMES)


@dataclass(frozen=True)
class Lesion:
    """One patient's lesion: presence, malignancy and shape."""

    present: bool
    malignant: bool
    x: float  # lateral position (-1 .. 1 across the probe)
    depth: float  # 0 (skin) .. 1 (deepest)
    width: float  # half-width in scan units
    aspect: float  # height / width
    harmonics: np.ndarray  # (8, 2) amplitude, phase of the margin irregularity
    spicules: float
    echo: float  # internal echogenicity
    extra: np.ndarray  # per-lesion random numbers (calcifications, cysts, halo)
    tissue: np.ndarray  # coarse noise for the background tissue


def _sample_lesion(rng: np.random.Generator, spec: USSite, family: str, force: bool | None = None) -> Lesion:
    """Draw one lesion (a fixed number of draws, whatever the outcome); ``force`` sets a present lesion's type."""
    u = rng.random(10)
    present = family == "thyroid_us" or u[0] > 0.15 or force is not None
    malignant = bool(present and (u[1] < spec.malignant_p if force is None else force))
    if malignant:
        width, aspect, spic = 0.15 + 0.15 * u[2], 0.95 + 0.55 * u[3], 0.5 + 0.5 * u[4]
        amps = rng.uniform(0.04, 0.12, size=8) * np.linspace(1.0, 0.5, 8)
    else:
        width, aspect, spic = 0.18 + 0.17 * u[2], 0.45 + 0.3 * u[3], 0.0
        amps = rng.uniform(0.0, 0.03, size=8) * np.linspace(1.0, 0.3, 8)
    phases = rng.uniform(0, 2 * np.pi, size=8)
    if family == "thyroid_us":
        x = (0.45 if u[5] < 0.5 else -0.45) + 0.1 * (u[6] - 0.5)
        depth = 0.38 + 0.08 * u[7]
        width *= 0.8
        echo = 0.25 + 0.15 * u[8] if malignant else 0.75 + 0.5 * u[8]
    else:
        x, depth = 0.5 * (u[5] - 0.5), 0.35 + 0.25 * u[7]
        echo = 0.12 + 0.12 * u[8] if malignant else 0.2 + 0.15 * u[8]
    return Lesion(present=bool(present), malignant=malignant, x=float(x), depth=float(depth), width=float(width),
                  aspect=float(aspect), harmonics=np.stack([amps, phases], axis=1), spicules=float(spic),
                  echo=float(echo), extra=rng.random(24), tissue=rng.standard_normal((14, 14)).astype(np.float32))


@dataclass(frozen=True)
class Scan:
    """Scan coordinates of every pixel: lateral L (-1 .. 1), depth Z (0 .. 1) and the fan mask."""

    L: np.ndarray
    Z: np.ndarray
    fan: np.ndarray
    scale: float  # scan units per pixel (approx.)


def _scan(size: int, sector_deg: float, tilt: float, shift: float) -> Scan:
    """Map pixels to (lateral, depth) of a curvilinear probe whose apex sits above the image."""
    y, x = D.grid(size)
    half = np.deg2rad(sector_deg / 2)
    r0, r1 = 0.55, 2.45
    apex_y = -1.0 - r0 * np.cos(half) + 0.04
    dx, dy = x - np.float32(shift), y - np.float32(apex_y)
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dx, dy) - np.float32(tilt)
    L = theta * np.float32(1.0 / half)
    Z = (r - np.float32(r0)) * np.float32(1.0 / (r1 - r0))
    px = 2.0 / size
    fan = D.ramp(np.float32(1.0) - np.abs(L), px * 2 / half) * D.ramp(Z, px) * D.ramp(np.float32(1.0) - Z, px)
    return Scan(L=L, Z=Z, fan=fan, scale=px / (r1 - r0))


def _lesion_shape(s: Scan, les: Lesion, rot: float, width_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft lesion mask and the normalised radius field around its centre (irregular margin)."""
    ax = les.width * width_scale
    ay = les.width * les.aspect * 0.55  # depth units are about 1.8 x lateral units on screen
    dx = (s.L - np.float32(les.x)) * np.float32(1.0 / ax)
    dz = (s.Z - np.float32(les.depth)) * np.float32(1.0 / ay)
    if rot:
        c, sn = np.float32(np.cos(rot)), np.float32(np.sin(rot))
        dx, dz = c * dx + sn * dz, c * dz - sn * dx
    r = np.sqrt(dx * dx + dz * dz)
    phi = np.arctan2(dz, dx)
    bound = np.ones_like(r)
    for k, (amp, ph) in enumerate(les.harmonics, start=2):
        bound += np.float32(amp) * np.cos(np.float32(k) * phi + np.float32(ph))
    if les.spicules > 0:
        spikes = np.maximum(np.cos(np.float32(17.0) * phi + np.float32(les.extra[0] * 6.28)), 0) ** 6
        bound += np.float32(0.35 * les.spicules) * spikes
    edge = 1.5 * s.scale / (les.width * width_scale)
    return D.ramp(bound - r, edge), r / bound


def _breast_background(s: Scan, les: Lesion, size: int) -> np.ndarray:
    """Skin, subcutaneous fat lobules, fibroglandular layer, Cooper's ligaments, pectoralis, rib."""
    tex = D.smooth_noise(None, (size, size), 0, coarse=les.tissue)
    Z, L = s.Z, s.L
    wave = np.float32(0.05) * tex
    echo = np.full((size, size), 0.28, dtype=np.float32)
    echo += np.float32(0.7) * D.band(Z - np.float32(0.025), 0.012, 0.01)  # skin
    glandular = D.ramp(Z - np.float32(0.22) - wave, 0.04) * D.ramp(np.float32(0.62) + wave - Z, 0.04)
    echo += glandular * (np.float32(0.45) + np.float32(0.2) * tex)
    cooper = np.cos((Z * np.float32(9.0) - L * np.float32(2.0) + tex * np.float32(0.6)) * np.float32(6.28))
    echo += np.float32(0.25) * D.ramp(cooper - np.float32(0.9), 0.08) * D.ramp(np.float32(0.3) - Z, 0.05)
    pect = D.ramp(Z - np.float32(0.72) - wave, 0.02) * D.ramp(np.float32(0.88) - Z, 0.02)
    fibres = np.float32(0.5) + np.float32(0.5) * np.cos((Z * np.float32(40.0) + L * np.float32(4.0)) * np.float32(3.14))
    echo = echo * (np.float32(1.0) - pect) + pect * (np.float32(0.3) + np.float32(0.2) * fibres)
    rib = D.band(Z - np.float32(0.92) - np.float32(0.03) * L * L, 0.012, 0.01)
    echo += np.float32(0.8) * rib
    echo *= np.float32(1.0) - np.float32(0.75) * D.ramp(Z - np.float32(0.94), 0.02)
    return echo


def _blob(s: Scan, cl: float, cz: float, al: float, az: float, edge: float) -> np.ndarray:
    """Soft ellipse in scan coordinates (lateral centre / half-axis, depth centre / half-axis)."""
    u = (s.L - np.float32(cl)) * np.float32(1.0 / al)
    v = (s.Z - np.float32(cz)) * np.float32(1.0 / az)
    return D.ramp(np.float32(1.0) - u * u - v * v, edge)


def _thyroid_background(s: Scan, les: Lesion, size: int) -> np.ndarray:
    """Skin, strap muscles, thyroid lobes and isthmus, trachea with its shadow, carotid arteries."""
    one = np.float32(1.0)
    tex = D.smooth_noise(None, (size, size), 0, coarse=les.tissue)
    Z, L = s.Z, s.L
    echo = np.full((size, size), 0.3, dtype=np.float32) + np.float32(0.05) * tex
    echo += np.float32(0.6) * D.band(Z - np.float32(0.02), 0.01, 0.01)
    strap = D.band(Z - np.float32(0.16) - np.float32(0.05) * np.abs(L), 0.05, 0.02) * D.band(L, 0.75, 0.05)
    echo = echo * (one - strap) + strap * np.float32(0.2)
    gland = np.maximum(_blob(s, -0.45, 0.42, 0.33, 0.16, 0.08), _blob(s, 0.45, 0.42, 0.33, 0.16, 0.08))
    gland = np.maximum(gland, D.band(L, 0.2, 0.05) * D.band(Z - np.float32(0.27), 0.04, 0.02))
    echo = echo * (one - gland) + gland * (np.float32(0.62) + np.float32(0.06) * tex)
    trachea = _blob(s, 0.0, 0.45, 0.2, 0.13, 0.1)
    ring = (_blob(s, 0.0, 0.45, 0.22, 0.15, 0.1) - trachea) * D.ramp(np.float32(0.45) - Z, 0.02)
    echo = echo * (one - trachea) + np.float32(0.05) * trachea + np.float32(0.7) * ring
    echo *= one - np.float32(0.85) * D.band(L, 0.18, 0.04) * D.ramp(Z - np.float32(0.45), 0.03)  # air shadow
    for sx in (-1.0, 1.0):  # carotid arteries: anechoic lumen, bright wall
        lumen = _blob(s, sx * 0.86, 0.5, 0.1, 0.09, 0.1)
        wall = _blob(s, sx * 0.86, 0.5, 0.12, 0.11, 0.1)
        echo += np.float32(0.35) * (wall - lumen)
        echo *= one - np.float32(0.95) * lumen
    return echo


def _render(family: str, les: Lesion, spec: USSite, rng: np.random.Generator, size: int
            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Echogenicity map x speckle x attenuation -> log-compressed uint8, and the lesion mask."""
    u = rng.random(6)
    s = _scan(size, spec.sector_deg * (0.9 + 0.2 * u[0]), np.deg2rad(6.0) * (u[1] - 0.5), 0.06 * (u[2] - 0.5))
    if family == "breast_us":
        echo = _breast_background(s, les, size)
    else:
        echo = _thyroid_background(s, les, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    width_scale = 0.9 + 0.2 * u[3]
    if les.present:
        shape, rn = _lesion_shape(s, les, 0.3 * (u[4] - 0.5), width_scale)
        _lesion_echo(echo, s, les, shape, rn, width_scale, 0.9 if family == "thyroid_us" else 0.2)
        mask[(shape > 0.5) & (s.fan > 0.5)] = 1
    grain = (spec.grain[0] * size / 128, spec.grain[1] * size / 128)
    img = echo * D.speckle(rng, (size, size), grain) ** np.float32(0.7)
    gain = spec.gain[0] + (spec.gain[1] - spec.gain[0]) * u[5]
    img *= np.exp(-np.float32(spec.attenuation) * s.Z) * np.float32(gain)
    img = np.log1p(np.float32(spec.dynamic_range) * img) * np.float32(1.0 / np.log1p(spec.dynamic_range * 2.2))
    img = img * s.fan
    return D.to_uint8(img), mask, {"gain": float(gain)}


def _lesion_echo(echo: np.ndarray, s: Scan, les: Lesion, shape: np.ndarray, rn: np.ndarray,
                 width_scale: float, calcification_p: float) -> None:
    """Paint the lesion's interior, margin halo, calcifications and posterior shadowing / enhancement."""
    one = np.float32(1.0)
    ax = les.width * width_scale
    below = D.ramp(np.float32(ax * 0.8) - np.abs(s.L - np.float32(les.x)), 0.08) * D.ramp(s.Z - np.float32(les.depth), 0.05)
    below *= np.exp((np.float32(les.depth) - s.Z) * np.float32(2.0))  # fades with depth
    if les.malignant:
        halo = D.ramp(np.float32(1.35) - rn, 0.15) * (one - shape)
        echo += np.float32(0.25) * halo
        echo *= one - np.float32(0.6) * below * (one - shape)  # posterior shadowing
    else:
        echo *= one + np.float32(0.35) * below * (one - shape)  # posterior enhancement
        rim = D.band(rn - np.float32(1.04), 0.05, 0.03)
        if les.echo > 0.5:  # iso / hyperechoic thyroid nodule: thin hypoechoic halo
            echo *= one - np.float32(0.75) * rim
        else:  # breast: thin echogenic capsule in most benign lesions
            echo += np.float32(0.2) * rim * (les.extra[1] < 0.6)
    inner = echo * (one - shape) + shape * np.float32(les.echo)
    echo[...] = inner
    if les.malignant and les.extra[2] < calcification_p:  # microcalcifications
        for k in range(3, 3 + 6):
            ang, rad = les.extra[k] * 6.28, 0.7 * les.extra[k + 8]
            cx = les.x + rad * ax * np.cos(ang)
            cz = les.depth + rad * ax * les.aspect * 0.55 * np.sin(ang)
            dot = D.ramp(np.float32(0.012) - np.sqrt((s.L - np.float32(cx)) ** 2 * np.float32(0.3)
                                                     + (s.Z - np.float32(cz)) ** 2), 0.004)
            echo += np.float32(1.5) * dot * shape
    if not les.malignant and les.echo > 0.5 and les.extra[20] < 0.5:  # cystic part of a benign thyroid nodule
        cyst = D.ramp(np.float32(0.45) - rn - np.float32(0.3) * (s.L - np.float32(les.x)), 0.1)
        echo *= one - np.float32(0.9) * cyst * shape


def _generate(family: str, index: int, size: int, seed: int, site: int, findings: dict[str, int] | None
              ) -> PhantomSample:
    """Shared body of the breast and thyroid generators."""
    index, seed = check_index(index, family), check_seed(seed, family)
    site, size = check_site(site, family), D.check_size(size)
    spec, code = SITES[site], CODES[family]
    block = index // BLOCK
    partition = D.sample_partition(np.random.default_rng([code, seed, site, block]), BLOCK, PARTITIONS)
    pnum, view_no = D.patient_slot(index, BLOCK, partition)
    force = None
    if findings:
        force = resolve_findings(findings, LABEL_NAMES, {"malignant": False}, family)["malignant"]
    les = _sample_lesion(np.random.default_rng([code, seed, site, block, pnum, 1]), spec, family, force)
    rng = np.random.default_rng([code, seed, site, index, 2])
    img, mask, extra = _render(family, les, spec, rng, size)
    meta = {"site": site, "lesion": "none" if not les.present else ("malignant" if les.malignant else "benign"),
            "aspect": les.aspect if les.present else 0.0, "view": view_no, **extra}
    pid = f"{family}-s{site}-{seed}-{block:06d}-{pnum}"
    return PhantomSample(image=img, labels=np.array([float(les.malignant)], dtype=np.float32), mask=mask,
                         patient_id=pid, meta=meta)


def generate_breast_us(index: int, size: int = 128, seed: int = 0, site: int = 0,
                       findings: dict[str, int] | None = None) -> PhantomSample:
    """One breast ultrasound phantom; ``findings={"malignant": 0/1}`` forces the lesion type."""
    return _generate("breast_us", index, size, seed, site, findings)


def generate_thyroid_us(index: int, size: int = 128, seed: int = 0, site: int = 0,
                        findings: dict[str, int] | None = None) -> PhantomSample:
    """One thyroid ultrasound phantom; ``findings={"malignant": 0/1}`` forces the nodule type."""
    return _generate("thyroid_us", index, size, seed, site, findings)


BREAST_SPEC = FamilySpec(name="breast_us", code=CODES["breast_us"], task="binary", mask_names=MASK_NAMES,
                         label_names=site_label_names, generate=generate_breast_us, params=("findings",),
                         description="breast ultrasound: benign vs malignant lesion, lesion mask")
THYROID_SPEC = FamilySpec(name="thyroid_us", code=CODES["thyroid_us"], task="binary", mask_names=MASK_NAMES,
                          label_names=site_label_names, generate=generate_thyroid_us, params=("findings",),
                          description="thyroid ultrasound: benign vs malignant nodule, nodule mask")

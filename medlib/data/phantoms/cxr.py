"""Frontal chest radiograph phantoms (family ``"cxr"``).

Orientation follows the radiological convention: the patient's right is on the viewer's left,
so the heart bulges to the viewer's right and the *left* lung (mask value 1) is on the right
half of the image. Display convention: dense structures (bone, heart, mediastinum, fluid) are
bright and aerated lung is dark; an ``inverted`` image (MONOCHROME1-style storage, flagged in
``meta["inverted"]``) holds ``255 - pixel``.

The image is the projection of a layered density map: a body of varying thickness, two lungs
that remove density (air), mediastinum, heart, diaphragm domes, spine, posterior and anterior
ribs, clavicles, humeral heads, a gastric bubble, breast shadows, vascular markings radiating
from the hila, and the findings. An acquisition (exposure window, gamma, detector blur,
quantum noise, small rotation / scale / shift, optional sharpening) turns it into uint8.

Findings (multi-label, ground truth by construction):

- cardiomegaly: cardiothoracic ratio (heart width / widest inner thorax width) > 0.5; normal hearts
  are drawn at 0.36 .. 0.47, enlarged ones at 0.53 .. 0.66, so the ratio measured on the masks
  stays on its side of 0.5.
- effusion: fluid at a lung base with a meniscus rising laterally, blunting the costophrenic angle.
- nodule (small round opacity) and mass (larger lobulated opacity) inside a lung.
- pneumothorax: a collapsed lung edge (thin pleural line) with no lung markings beyond it at the
  apex / lateral edge.
- consolidation: patchy opacity in a lung zone; atelectasis: plate-like opacity and a raised
  hemidiaphragm; edema: perihilar haze with prominent vessels; emphysema: hyperlucent lungs with
  flat, low domes; support devices: tube, central line and ECG electrodes (metal-bright).
- ``no_finding`` = 1 when the image holds none of the findings (annotated at that site or not).

Prevalence and co-occurrence come from four latent patient states (cardiac failure, infection,
smoking, intensive care) through a logistic model; a ``site`` shifts the latent rates, the
prevalences and the acquisition, and annotates only some findings (``site_label_names``).
The label map mask marks 1 = left lung, 2 = right lung, 3 = heart. Lung masks are the anatomical
lung fields (they include pleural fluid and the pneumothorax space) minus the heart and mediastinum.

Patients: indices come in blocks of 4; each block is split into 1 .. 4 patients, so a patient has
1 .. 4 consecutive images (visits): same anatomy, chronic findings (cardiomegaly, emphysema,
nodule, mass) persist and nodules grow, acute findings and the acquisition change per visit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _draw as D
from ._base import FamilySpec, PhantomSample, check_index, check_seed, check_site, resolve_findings

FAMILY = "cxr"
CODE = 1001
BLOCK = 4
PARTITIONS = {(4,): 0.15, (3, 1): 0.1, (1, 3): 0.05, (2, 2): 0.2, (2, 1, 1): 0.15, (1, 1, 2): 0.1,
              (1, 1, 1, 1): 0.25}
FINDINGS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "emphysema", "mass",
            "nodule", "pneumothorax", "support_devices")
CHRONIC = ("cardiomegaly", "emphysema", "mass", "nodule")
MASK_NAMES = ("left_lung", "right_lung", "heart")
LATENTS = ("cardiac", "infection", "smoker", "icu")
AP_MAGNIFICATION = 1.06  # AP films magnify the whole chest a little (the cardiothoracic ratio is unchanged)

# Logistic model of finding presence: base logit + latent effects (cardiac, infection, smoker, icu).
BASE_LOGIT = {"atelectasis": -2.7, "cardiomegaly": -2.9, "consolidation": -3.2, "edema": -3.6,
              "effusion": -2.8, "emphysema": -3.4, "mass": -3.7, "nodule": -3.1, "pneumothorax": -3.8,
              "support_devices": -3.4}
LATENT_EFFECT = {"atelectasis": (0.3, 1.2, 0.2, 1.6), "cardiomegaly": (3.2, 0.0, 0.0, 0.4),
                 "consolidation": (0.0, 3.4, 0.3, 0.8), "edema": (2.8, 0.3, 0.0, 1.0),
                 "effusion": (2.0, 1.0, 0.3, 1.3), "emphysema": (0.0, 0.0, 2.9, 0.0),
                 "mass": (0.0, 0.0, 1.9, 0.0), "nodule": (0.0, 0.0, 1.7, 0.0),
                 "pneumothorax": (0.0, 0.0, 0.7, 1.7), "support_devices": (0.8, 0.5, 0.0, 4.5)}


@dataclass(frozen=True)
class CXRSite:
    """One acquisition site: which findings it annotates, its case mix and its acquisition statistics."""

    name: str
    description: str
    labels: tuple[str, ...]  # annotated findings (no_finding is always annotated)
    latent_p: tuple[float, float, float, float]  # P(cardiac), P(infection), P(smoker), P(icu)
    logit_shift: tuple[tuple[str, float], ...] = ()  # extra prevalence shift per finding
    ap_fraction: float = 0.1  # share of AP (portable) views among non-ICU patients
    exposure: tuple[float, float] = (1.0, 0.06)  # window-top multiplier: mean, sd
    gamma: tuple[float, float] = (1.0, 0.08)
    noise: float = 0.015  # quantum-noise sd at mid grey
    blur: float = 0.6  # detector blur sigma in px at 128 px
    rotation_sd: float = 1.5  # degrees
    shift_sd: float = 0.025
    scale_sd: float = 0.03
    invert_prob: float = 0.0  # share stored MONOCHROME1-style (inverted)
    sharpen: float = 0.0  # unsharp-mask strength


SITES: tuple[CXRSite, ...] = (
    CXRSite("general-hospital", "mixed in- and outpatients, every finding annotated", FINDINGS,
            (0.15, 0.15, 0.25, 0.12)),
    CXRSite("icu-portable", "intensive-care unit, mostly AP portable films, devices common",
            ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "pneumothorax",
             "support_devices"),
            (0.25, 0.3, 0.2, 0.7), ap_fraction=0.6, exposure=(0.92, 0.09), gamma=(1.1, 0.1), noise=0.025,
            blur=0.9, rotation_sd=3.0, shift_sd=0.04, scale_sd=0.05),
    CXRSite("screening-clinic", "outpatient screening, low prevalence, clean PA films",
            ("atelectasis", "cardiomegaly", "effusion", "emphysema", "mass", "nodule"),
            (0.06, 0.05, 0.3, 0.01), logit_shift=(("effusion", -0.5),), ap_fraction=0.02,
            exposure=(1.05, 0.04), gamma=(0.95, 0.05), noise=0.01, blur=0.5, rotation_sd=1.0),
    CXRSite("oncology-centre", "cancer centre: nodules, masses and effusions",
            ("atelectasis", "consolidation", "effusion", "mass", "nodule", "pneumothorax"),
            (0.1, 0.15, 0.6, 0.1), logit_shift=(("nodule", 1.0), ("mass", 1.2), ("effusion", 0.5)),
            exposure=(1.0, 0.05), gamma=(0.9, 0.06), noise=0.012, blur=0.55, sharpen=0.6),
    CXRSite("emergency-dept", "emergency department, a quarter of files stored inverted (MONOCHROME1)",
            ("cardiomegaly", "consolidation", "edema", "effusion", "pneumothorax"),
            (0.2, 0.25, 0.2, 0.2), logit_shift=(("pneumothorax", 1.2),), ap_fraction=0.35,
            exposure=(0.97, 0.1), gamma=(1.05, 0.12), noise=0.02, blur=0.75, rotation_sd=2.5,
            invert_prob=0.25),
    CXRSite("cardiology-clinic", "heart-failure clinic: cardiomegaly, edema, effusions",
            ("atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "emphysema", "nodule",
             "support_devices"),
            (0.55, 0.1, 0.2, 0.15), logit_shift=(("cardiomegaly", 0.5),), ap_fraction=0.15,
            exposure=(1.03, 0.05), gamma=(1.0, 0.06), noise=0.014, blur=0.6, sharpen=0.3),
)


def site_label_names(site: int) -> list[str]:
    """Label names annotated at a chest site: ``no_finding`` first, then its findings."""
    spec = SITES[check_site(site, FAMILY)]
    return ["no_finding"] + [f for f in FINDINGS if f in spec.labels]


@dataclass(frozen=True)
class Patient:
    """Anatomy, latent states and chronic findings of one patient (shared by all their visits)."""

    sex: str
    age: int
    latents: dict[str, bool]
    chronic: dict[str, bool]
    tw: float  # half-width of the inner thorax (lung lateral edge)
    bw: float  # half-width of the body
    apex: float  # y of the lung apices
    dome_r: float  # y of the right hemidiaphragm dome
    dome_l: float
    dome_curv: float  # how fast the domes drop laterally
    mw: float  # half-width of the mediastinum
    ctr_normal: float
    ctr_big: float
    heart_x: float  # heart centre offset to the viewer's right
    heart_aspect: float
    heart_angle: float
    hilum: float  # hilar height
    clavicle: float  # y of the clavicles' medial ends
    rib_spacing: float
    rib_phase: float
    vessel_n: float
    vessel_coarse: np.ndarray
    segment_coarse: np.ndarray
    texture_coarse: np.ndarray
    fine_coarse: np.ndarray
    nodule: tuple[float, float, float, float, float]  # side, u, v, radius, density
    mass: tuple[float, float, float, float, float]


@dataclass(frozen=True)
class Visit:
    """Acquisition and acute-finding geometry of one image."""

    view: str
    rotation: float
    scale: float
    shift: tuple[float, float]
    inspiration: float
    exposure: float
    gamma: float
    noise: float
    blur: float
    sharpen: float
    inverted: bool
    heel: float
    acute: dict[str, bool]
    effusion: tuple[float, float, float]  # side (0 right, 1 left, 2 both), height, meniscus
    pneumo: tuple[float, float]  # side, collapse (fraction of lung kept)
    consolidation: tuple[float, float, float, float]  # side, u, v, size
    atelectasis: tuple[float, float]  # side, height offset
    edema: float
    line_side: float
    electrodes: np.ndarray
    patch_coarse: np.ndarray


def _presence(rng: np.random.Generator, names: tuple[str, ...], latents: dict[str, bool], spec: CXRSite,
              age: int) -> dict[str, bool]:
    """Draw presences of ``names`` from the logistic latent model (one uniform per name, fixed order)."""
    shift = dict(spec.logit_shift)
    lat = np.array([latents[k] for k in LATENTS], dtype=np.float64)
    u = rng.random(len(names))
    out = {}
    for i, name in enumerate(names):
        logit = BASE_LOGIT[name] + float(np.dot(LATENT_EFFECT[name], lat)) + shift.get(name, 0.0)
        logit += 0.02 * (age - 55)
        out[name] = bool(u[i] < 1.0 / (1.0 + np.exp(-logit)))
    return out


def _sample_patient(rng: np.random.Generator, spec: CXRSite) -> Patient:
    """Draw one patient's anatomy, latent states and chronic findings (a fixed number of draws)."""
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(np.clip(rng.normal(55, 17), 18, 95))
    latents = {k: bool(rng.random() < p * (0.7 + 0.6 * (age - 18) / 77)) for k, p in zip(LATENTS, spec.latent_p)}
    chronic = _presence(rng, CHRONIC, latents, spec, age)
    tw = rng.uniform(0.70, 0.80) * (0.96 if sex == "F" else 1.0)
    u = rng.random(24)
    dome_r = 0.20 + 0.10 * u[0]
    return Patient(
        sex=sex, age=age, latents=latents, chronic=chronic, tw=tw, bw=tw + 0.10 + 0.08 * u[1],
        apex=-0.80 + 0.10 * u[2], dome_r=dome_r, dome_l=dome_r + 0.02 + 0.06 * u[3],
        dome_curv=0.6 + 0.3 * u[4], mw=0.10 + 0.04 * u[5], ctr_normal=0.36 + 0.11 * u[6],
        ctr_big=0.53 + 0.13 * u[7], heart_x=0.05 + 0.05 * u[8], heart_aspect=0.62 + 0.12 * u[9],
        heart_angle=-0.35 + 0.25 * u[10], hilum=-0.12 + 0.08 * u[11], clavicle=-0.70 + 0.08 * u[12],
        rib_spacing=0.95 + 0.1 * u[13], rib_phase=0.2 * u[14], vessel_n=20 + 10 * u[15],
        vessel_coarse=rng.standard_normal((12, 12), dtype=np.float32),
        segment_coarse=rng.standard_normal((14, 14), dtype=np.float32),
        texture_coarse=rng.standard_normal((14, 14), dtype=np.float32),
        fine_coarse=rng.standard_normal((40, 40), dtype=np.float32),
        nodule=(float(u[16] < 0.5), rng.uniform(-0.6, 0.6), rng.uniform(0.25, 0.8), 0.032 + 0.025 * u[17],
                0.16 + 0.08 * u[18]),
        mass=(float(u[19] < 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.7), 0.09 + 0.06 * u[20],
              0.2 + 0.08 * u[21]),
    )


def _sample_visit(rng: np.random.Generator, spec: CXRSite, patient: Patient) -> Visit:
    """Draw one image's acquisition and acute findings (a fixed number of draws)."""
    acute_names = tuple(f for f in FINDINGS if f not in CHRONIC)
    acute = _presence(rng, acute_names, patient.latents, spec, patient.age)
    u = rng.random(24)
    ap = patient.latents["icu"] or u[0] < spec.ap_fraction
    n = rng.standard_normal(8)
    return Visit(
        view="AP" if ap else "PA", rotation=float(n[0] * spec.rotation_sd),
        scale=float(np.clip(1.0 + n[1] * spec.scale_sd, 0.85, 1.12)),
        shift=(float(n[2] * spec.shift_sd), float(n[3] * spec.shift_sd)), inspiration=float(n[4] * 0.025),
        exposure=float(np.clip(spec.exposure[0] + n[5] * spec.exposure[1], 0.7, 1.3)),
        gamma=float(np.clip(spec.gamma[0] + n[6] * spec.gamma[1], 0.7, 1.4)),
        noise=spec.noise * (0.8 + 0.4 * u[1]), blur=spec.blur * (0.8 + 0.4 * u[2]), sharpen=spec.sharpen,
        inverted=bool(u[3] < spec.invert_prob), heel=float(n[7] * 0.04), acute=acute,
        effusion=(float(min(int(u[4] * 2.6), 2)), 0.05 + 0.22 * u[5] ** 1.5, 0.12 + 0.15 * u[6]),
        pneumo=(float(u[7] < 0.5), 0.72 + 0.16 * u[8]),
        consolidation=(float(u[9] < 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.15, 0.55), 0.16 + 0.1 * u[10]),
        atelectasis=(float(u[11] < 0.5), 0.08 + 0.08 * u[12]), edema=0.7 + 0.6 * u[13],
        line_side=float(u[14] < 0.6), electrodes=rng.uniform(-1, 1, size=(4, 2)),
        patch_coarse=rng.standard_normal((10, 10), dtype=np.float32),
    )


def _lung_geometry(p: Patient, f: dict[str, bool], v: Visit) -> dict[str, float]:
    """Per-visit lung geometry: domes after inspiration, emphysema flattening and atelectatic elevation."""
    dome_r, dome_l, curv = p.dome_r + v.inspiration, p.dome_l + v.inspiration, p.dome_curv
    tw, apex = p.tw, p.apex
    if f["emphysema"]:
        dome_r, dome_l, curv, tw, apex = dome_r + 0.1, dome_l + 0.1, curv * 0.35, tw + 0.03, apex - 0.03
    if f["atelectasis"]:
        if v.atelectasis[0] < 0.5:
            dome_r -= 0.06
        else:
            dome_l -= 0.06
    return {"dome_r": dome_r, "dome_l": dome_l, "curv": curv, "tw": tw, "apex": apex}


def _diaphragm(X: np.ndarray, g: dict[str, float]) -> np.ndarray:
    """y of the diaphragm under each point (right dome for x < 0, left dome for x > 0)."""
    centre = 0.5 * g["tw"]
    xr = (X + np.float32(centre)) * np.float32(1.0 / g["tw"])
    xl = (X - np.float32(centre + 0.05)) * np.float32(1.0 / g["tw"])
    yr = np.float32(g["dome_r"]) + np.float32(g["curv"]) * xr * xr
    yl = np.float32(g["dome_l"]) + np.float32(g["curv"]) * xl * xl
    return np.where(X < 0, yr, yl)


def _lung_ellipse(side: int, g: dict[str, float], p: Patient) -> tuple[float, float, float, float]:
    """(cx, cy, ax, ay) of a lung's outline ellipse; side 0 = right lung (viewer's left), 1 = left lung."""
    inner = p.mw - 0.06
    ax = (g["tw"] - inner) / 2
    cx = -(inner + ax) if side == 0 else inner + ax
    cy = 0.35
    return cx, cy, ax, cy - g["apex"]


def _heart(cv: D.Canvas, p: Patient, g: dict[str, float], ctr: float, edge: float) -> np.ndarray:
    """Soft heart silhouette whose width is ``ctr`` x the widest inner thorax width (2 x tw)."""
    half_w = ctr * g["tw"]
    k, phi = p.heart_aspect, p.heart_angle
    ax = half_w / np.sqrt(np.cos(phi) ** 2 + (k * np.sin(phi)) ** 2)
    ay = ax * k
    cx = p.heart_x * (1 + 2 * (ctr - 0.42))
    cy = g["dome_l"] - 0.45 * ay
    return cv.ellipse(cx, cy, ax, ay, edge, angle=phi)


def _mediastinum(cv: D.Canvas, p: Patient, edge: float) -> np.ndarray:
    """Soft superior mediastinum (great vessels) including the aortic knob."""
    X, Y = cv.X, cv.Y
    width = np.float32(p.mw) + np.float32(0.04) * D.smoothstep((Y + np.float32(0.2)) * np.float32(2.5))
    med = D.ramp(width - np.abs(X - np.float32(0.01)), edge)
    knob = cv.ellipse(p.mw + 0.02, -0.36, 0.075, 0.065, edge)
    return np.maximum(med, knob) * D.ramp(np.float32(0.2) - Y, 0.1)


def _ribs(cv: D.Canvas, p: Patient, g: dict[str, float], ydia: np.ndarray) -> np.ndarray:
    """Posterior (gull-wing arches) and anterior (fainter, medially descending) ribs inside the thorax."""
    X, Y = cv.X, cv.Y
    s = np.abs(X)
    top = np.float32(g["apex"] - 0.06)
    length = np.float32((g["dome_r"] + 0.3 - g["apex"]) * p.rib_spacing)
    lat = np.maximum(s - np.float32(0.22), 0)
    post = (Y - top + np.float32(0.15) * s - np.float32(1.5) * lat * lat) * (np.float32(10.0) / length)
    post = np.maximum(post, 0) + np.float32(p.rib_phase)
    frac = post - np.floor(post)
    rib = D.band(frac - np.float32(0.3), 0.17, 0.12)
    rib += D.band(frac - np.float32(0.14), 0.02, 0.06) * np.float32(0.5)  # cortical upper edge
    rib *= (post < 11.0).astype(np.float32) * D.ramp(s - np.float32(0.05), 0.04)
    ant = (Y - top - np.float32(0.1) + np.float32(0.5) * s) * (np.float32(7.0) / length)
    fa = ant - np.floor(ant)
    arib = D.band(fa - np.float32(0.5), 0.14, 0.12) * D.ramp(s - np.float32(0.28), 0.12)
    arib *= ((ant > 0) & (ant < 6.0)).astype(np.float32)
    thorax = cv.ellipse(0.0, 0.35, g["tw"] + 0.06, 0.35 - g["apex"] + 0.1, 0.05, square=0.25)
    thorax *= D.ramp(ydia + np.float32(0.12) - Y, 0.12)
    return (rib * np.float32(0.055) + arib * np.float32(0.018)) * thorax


def _clavicles(cv: D.Canvas, p: Patient, edge: float) -> np.ndarray:
    """Both clavicles as gently S-curved bands from the sternal notch to the shoulders."""
    sl = cv.rect(-0.8, 0.8, p.clavicle - 0.3, p.clavicle + 0.12)
    if sl is None:
        return cv.zeros()
    s, Y = np.abs(cv.X[sl]), cv.Y[sl]
    yc = np.float32(p.clavicle) - np.float32(0.28) * s + np.float32(0.3) * (s - np.float32(0.35)) ** 2
    thick = np.float32(0.02) + np.float32(0.012) * s
    cl = D.ramp(thick - np.abs(Y - yc), edge) * D.ramp(s - np.float32(0.07), 0.03)
    cl *= D.ramp(np.float32(0.72) - s, 0.06)
    return cv.region(sl, cl)


def _spine(cv: D.Canvas, edge: float) -> np.ndarray:
    """Vertebral column: bodies with end plates and paired pedicles."""
    sl = cv.rect(-0.1, 0.1, -1.5, 1.5)
    if sl is None:
        return cv.zeros()
    X, Y = cv.X[sl], cv.Y[sl]
    col = D.band(X, 0.065, edge)
    per = (Y + np.float32(1.0)) * np.float32(1.0 / 0.095)
    fr = per - np.floor(per)
    bodies = np.float32(0.75) + np.float32(0.25) * D.band(fr - np.float32(0.5), 0.38, 0.15)
    ped = D.band(np.abs(X) - np.float32(0.045), 0.014, edge) * D.band(fr - np.float32(0.35), 0.16, 0.1)
    return cv.region(sl, col * bodies + ped * np.float32(0.6))


def _vessels(cv: D.Canvas, p: Patient, strength: float) -> np.ndarray:
    """Vascular markings: wavy lines radiating and branching from both hila, fading to the periphery."""
    X, Y, size = cv.X, cv.Y, cv.size
    hx = np.where(X < 0, np.float32(-(p.mw + 0.03)), np.float32(p.mw + 0.06))
    dx, dy = X - hx, Y - np.float32(p.hilum)
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, np.abs(dx))
    warp = D.smooth_noise(None, (size, size), 0, coarse=p.vessel_coarse)
    phase = np.float32(p.vessel_n) * (np.float32(1) + np.float32(1.5) * r) * theta + warp * np.float32(4.0)
    c = np.float32(0.5) + np.float32(0.5) * np.cos(phase)
    c *= c
    c = c * c * c
    seg = D.smooth_noise(None, (size, size), 0, coarse=p.segment_coarse)
    amp = np.exp(-r * np.float32(1.7)) * np.clip(np.float32(0.45) + np.float32(0.6) * seg, 0.0, 1.0)
    hilum = np.exp(-(r * r) * np.float32(1.0 / 0.012))
    return (c * amp + hilum * np.float32(0.5)) * np.float32(strength)


def _effusion(cv: D.Canvas, g: dict[str, float], p: Patient, v: Visit, side: int, edge: float) -> np.ndarray:
    """Fluid region of one hemithorax: above the diaphragm up to a meniscus rising laterally."""
    X, Y = cv.X, cv.Y
    _, height, meniscus = v.effusion
    dome = g["dome_r"] if side == 0 else g["dome_l"]
    s = np.clip((np.abs(X) - np.float32(p.mw)) * np.float32(1.0 / (g["tw"] - p.mw)), 0, 1)
    level = np.float32(dome + g["curv"] * 0.25 - height) - np.float32(meniscus) * s * s
    side_mask = (X < 0) if side == 0 else (X >= 0)
    return D.ramp(Y - level, 0.06) * side_mask.astype(np.float32)


def _devices(cv: D.Canvas, v: Visit, edge: float) -> np.ndarray:
    """Endotracheal tube, a central venous line and ECG electrodes (metal density)."""
    X, Y = cv.X, cv.Y
    tube = D.band(X, 0.009, edge) * D.ramp(np.float32(-0.33) - Y, edge)
    sgn = np.float32(-1.0 if v.line_side < 0.5 else 1.0)
    t = np.clip((Y + np.float32(0.8)) * np.float32(1 / 0.55), 0, 1)
    lx = sgn * (np.float32(0.62) - np.float32(0.55) * np.sqrt(t))
    line = D.band(X - lx, 0.008, edge) * D.ramp(Y + np.float32(0.8), edge) * D.ramp(np.float32(-0.25) - Y, edge)
    out = np.maximum(tube, line * np.float32(0.8))
    for ex, ey in v.electrodes[:3]:
        cx, cy = float(ex) * 0.55, -0.25 + 0.3 * float(ey)
        r, sl = cv.ellipse_radius(cx, cy, 0.045, 0.045, reach=1.0)
        if sl is not None:
            ring = D.band((r - np.float32(0.67)) * np.float32(0.045), 0.01, edge)
            ring += D.ramp((np.float32(0.27) - r) * np.float32(0.045), edge)
            np.maximum(out[sl], ring, out=out[sl])
    return out


def _anatomy(cv: D.Canvas, p: Patient, g: dict[str, float], f: dict[str, bool], edge: float) -> dict[str, np.ndarray]:
    """Body, diaphragm, mediastinum, heart and both lungs (soft masks) and the lungs' air depth."""
    X, Y = cv.X, cv.Y
    body = cv.ellipse(0.0, 0.5, p.bw, 1.6, edge * 2, square=0.37)
    shoulder = D.ramp(Y - (np.float32(-1.02) + np.float32(0.3) * X * X), 0.04)
    body *= np.maximum(shoulder, D.band(X, 0.24, 0.04))
    ydia = _diaphragm(X, g)
    below = D.ramp(Y - ydia, edge)
    med = _mediastinum(cv, p, edge)
    heart = _heart(cv, p, g, p.ctr_big if f["cardiomegaly"] else p.ctr_normal, edge)
    heart *= D.ramp(ydia + np.float32(0.03) - Y, edge)
    free = (np.float32(1.0) - np.maximum(med, heart)) * (np.float32(1.0) - below)
    lungs, depth = [], cv.zeros()
    for side in (0, 1):
        cx, cy, ax, ay = _lung_ellipse(side, g, p)
        r, sl = cv.ellipse_radius(cx, cy, ax, ay, square=0.15, reach=1.05)
        lung = cv.zeros()
        if sl is not None:
            lung[sl] = D.ramp((np.float32(1.0) - r) * np.float32(ax), edge * 1.5)
            depth[sl] += lung[sl] * np.sqrt(np.clip(np.float32(1.0) - r * r, 0.0, 1.0))
        lungs.append(lung * free)
    return {"body": body, "ydia": ydia, "below": below, "med": med, "heart": heart, "lungs": lungs,
            "depth": depth}


def _pneumothorax(cv: D.Canvas, g: dict[str, float], p: Patient, v: Visit, lung: np.ndarray, px: float,
                  edge: float) -> tuple[np.ndarray, np.ndarray]:
    """(pneumothorax space beyond a collapsed lung edge, the visible pleural line)."""
    side = int(v.pneumo[0])
    cx, cy, ax, ay = _lung_ellipse(side, g, p)
    keep = v.pneumo[1]
    sx, sy = cx + (0.5 if side == 0 else -0.5) * ax * (1 - keep), cy + ay * (1 - keep) * 0.6
    r = D.ellipse_radius(cv.X, cv.Y, sx, sy, ax * keep, ay * keep, square=0.15)
    signed = (np.float32(1.0) - r) * np.float32(ax * keep)
    space = lung * (np.float32(1.0) - D.ramp(signed, edge))
    line = D.band(signed, 0.5 * px, 0.8 * px) * lung
    return space, line


def _lesions(cv: D.Canvas, p: Patient, g: dict[str, float], f: dict[str, bool], visit_no: int,
             edge: float) -> np.ndarray:
    """Nodule (small round) and mass (larger, lobulated) opacities; chronic lesions grow on follow-ups."""
    out = cv.zeros()
    growth = 1.0 + 0.08 * visit_no
    for name, (side, u, vv, rad, dd) in (("nodule", p.nodule), ("mass", p.mass)):
        if not f[name]:
            continue
        cx, cy, ax, ay = _lung_ellipse(int(side), g, p)
        ny = min(cy - vv * ay, (g["dome_r"] if side < 0.5 else g["dome_l"]) - 0.12)
        nx, rad = cx + u * ax * 0.8, rad * growth
        blob = cv.ellipse(nx, ny, rad, rad * 0.9, edge)
        if name == "mass":
            blob = np.maximum(blob, cv.ellipse(nx + rad * 0.6, ny + rad * 0.35, rad * 0.7, rad * 0.6, edge))
        out += np.float32(dd) * blob
    return out


def _parenchyma(cv: D.Canvas, p: Patient, v: Visit, g: dict[str, float], f: dict[str, bool],
                lungs: list[np.ndarray], edge: float) -> np.ndarray:
    """Markings, edema haze, consolidation and atelectasis (density added inside the aerated lungs)."""
    X, Y, size = cv.X, cv.Y, cv.size
    strength = 0.15 * (1.5 if f["edema"] else 1.0) * (0.6 if f["emphysema"] else 1.0)
    texture = D.smooth_noise(None, (size, size), 0, coarse=p.texture_coarse)
    fine = D.smooth_noise(None, (size, size), 0, coarse=p.fine_coarse)
    out = _vessels(cv, p, strength) + np.float32(0.02) * texture + np.float32(0.012) * np.abs(fine)
    if f["edema"]:
        hx = np.where(X < 0, np.float32(-p.mw), np.float32(p.mw))
        r2 = ((X - hx) ** 2 + (Y - np.float32(p.hilum)) ** 2) * np.float32(1.0 / (0.32 ** 2))
        out += np.float32(0.12 * v.edema) * np.exp(-r2) * (np.float32(1.0) + np.float32(0.3) * texture)
    if f["consolidation"]:
        side, u, vv, sz = v.consolidation
        cx, cy, ax, ay = _lung_ellipse(int(side), g, p)
        zone = cv.ellipse(cx + u * ax, cy - vv * ay, sz, sz * 0.8, 0.08)
        patch = D.smooth_noise(None, (size, size), 0, coarse=v.patch_coarse)
        out += np.float32(0.26) * zone * D.ramp(patch + np.float32(0.5), 0.7)
    if f["atelectasis"]:
        side, off = v.atelectasis
        dome = g["dome_r"] if side < 0.5 else g["dome_l"]
        plate = D.band(Y - np.float32(dome - off) - np.float32(0.06) * X, 0.014, edge)
        out += np.float32(0.16) * plate * lungs[int(side)]
    return out


def _acquire(dens: np.ndarray, cv: D.Canvas, v: Visit, rng: np.random.Generator) -> np.ndarray:
    """Exposure window, film-like curve, heel effect, detector blur, quantum noise, sharpening -> uint8."""
    size = cv.size
    img = D.window(dens * (np.float32(1.0) + np.float32(v.heel) * cv.X), 0.12, 0.12 + 0.8 * v.exposure, v.gamma)
    img += np.float32(0.35) * (D.smoothstep(img) - img)
    img = D.blur(img, v.blur * size / 128)
    if v.sharpen:
        img += np.float32(v.sharpen) * (img - D.blur(img, 2.0 * size / 128))
    noise = D.fast_noise(rng, (size, size))
    img += noise * np.sqrt(np.maximum(img, 0) + np.float32(0.02)) * np.float32(v.noise / 0.7)
    out = D.to_uint8(img)
    return np.uint8(255) - out if v.inverted else out


def _trachea(cv: D.Canvas, edge: float) -> np.ndarray:
    """The air column of the trachea down to the carina."""
    sl = cv.rect(-0.06, 0.06, -1.5, -0.25)
    if sl is None:
        return cv.zeros()
    return cv.region(sl, D.band(cv.X[sl] - np.float32(0.005), 0.033, edge) * D.ramp(np.float32(-0.3) - cv.Y[sl], edge))


def _bones(cv: D.Canvas, p: Patient, g: dict[str, float], a: dict[str, np.ndarray], edge: float) -> np.ndarray:
    """Spine, ribs (faint behind the heart and mediastinum), clavicles and humeral heads."""
    one = np.float32(1.0)
    bones = np.float32(0.06) * _spine(cv, edge) * (one - np.float32(0.75) * a["heart"])
    bones += _ribs(cv, p, g, a["ydia"]) * (one - np.float32(0.6) * np.maximum(a["heart"], a["med"]))
    bones += np.float32(0.16) * _clavicles(cv, p, edge)
    for sx in (-1.0, 1.0):
        bones += np.float32(0.14) * cv.ellipse(sx * (p.bw - 0.04), -0.66, 0.13, 0.15, edge * 2)
    return bones


def _render(p: Patient, v: Visit, f: dict[str, bool], size: int, rng: np.random.Generator, visit_no: int = 0
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw the density map, take the acquisition, return (uint8 image, uint8 mask, cardiothoracic ratio)."""
    px = 2.0 / size
    edge = 1.2 * px
    cv = D.Canvas.make(size, v.rotation, v.scale * (AP_MAGNIFICATION if v.view == "AP" else 1.0), v.shift)
    X, Y = cv.X, cv.Y
    g = _lung_geometry(p, f, v)
    a = _anatomy(cv, p, g, f, edge)
    body, lungs, heart, below = a["body"], a["lungs"], a["heart"], a["below"]
    thick = np.sqrt(np.clip(np.float32(1.0) - (X * np.float32(1.0 / (p.bw + 0.03))) ** 2, 0.0, 1.0))
    dens = body * (np.float32(0.3) + np.float32(0.34) * thick)
    lung = lungs[0] + lungs[1]
    fluid = cv.zeros()
    if f["effusion"]:
        where = int(v.effusion[0])
        for side in ((0, 1) if where == 2 else (where,)):
            fluid = np.maximum(fluid, _effusion(cv, g, p, v, side, edge) * lungs[side])
    pneumo = cv.zeros()
    if f["pneumothorax"]:
        pneumo, line = _pneumothorax(cv, g, p, v, lungs[int(v.pneumo[0])], px, edge)
        dens += np.float32(0.07) * line
    aerated = lung * (np.float32(1.0) - fluid)
    air = np.float32(0.32 * (1.12 if f["emphysema"] else 1.0))
    depth = (np.float32(0.55) + np.float32(0.45) * a["depth"]) * (
        D.ramp(a["ydia"] - Y, 0.25) * np.float32(0.35) + np.float32(0.65))
    dens -= air * depth * aerated
    dens -= np.float32(0.06) * pneumo * (np.float32(1.0) - fluid)
    dens += np.float32(0.025) * heart + np.float32(0.03) * a["med"] * (np.float32(1.0) - heart)
    dens += (_bones(cv, p, g, a, edge) - np.float32(0.09) * _trachea(cv, edge)) * body
    dens -= np.float32(0.12) * cv.ellipse(0.3, g["dome_l"] + 0.13, 0.09, 0.055, edge * 3) * below  # gastric bubble
    if p.sex == "F":
        for sx in (-1.0, 1.0):
            dens += np.float32(0.05) * cv.ellipse(sx * 0.45, 0.5, 0.34, 0.28, 0.12)
    marks = _parenchyma(cv, p, v, g, f, lungs, edge)
    dens += marks * aerated * (np.float32(1.0) - np.minimum(pneumo * np.float32(3.0), 1.0))
    dens += _lesions(cv, p, g, f, visit_no, edge) * lung
    if f["support_devices"]:
        dens += np.float32(0.45) * _devices(cv, v, edge)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[lungs[1] > 0.5] = 1
    mask[lungs[0] > 0.5] = 2
    mask[heart > 0.5] = 3
    ctr = p.ctr_big if f["cardiomegaly"] else p.ctr_normal
    return _acquire(dens, cv, v, rng), mask, ctr


def generate(index: int, size: int = 128, seed: int = 0, site: int = 0, findings: dict[str, int] | None = None,
             invert_prob: float | None = None) -> PhantomSample:
    """One frontal chest radiograph phantom; ``findings`` forces presences, ``invert_prob`` overrides the site's."""
    index, seed = check_index(index, FAMILY), check_seed(seed, FAMILY)
    site, size = check_site(site, FAMILY), D.check_size(size)
    spec = SITES[site]
    if invert_prob is not None:
        if not 0.0 <= float(invert_prob) <= 1.0:
            raise ValueError(f"invert_prob must be in 0..1, got {invert_prob!r}")
        spec = CXRSite(**{**spec.__dict__, "invert_prob": float(invert_prob)})
    block = index // BLOCK
    partition = D.sample_partition(np.random.default_rng([CODE, seed, site, block]), BLOCK, PARTITIONS)
    pnum, visit_no = D.patient_slot(index, BLOCK, partition)
    patient = _sample_patient(np.random.default_rng([CODE, seed, site, block, pnum, 1]), spec)
    rng_v = np.random.default_rng([CODE, seed, site, index, 2])
    visit = _sample_visit(rng_v, spec, patient)
    drawn = {**patient.chronic, **visit.acute}
    present = resolve_findings(findings, FINDINGS, {k: drawn[k] for k in FINDINGS}, FAMILY)
    image, mask, ctr = _render(patient, visit, present, size, rng_v, visit_no)
    names = site_label_names(site)
    any_finding = any(present.values())
    labels = np.array([0.0 if any_finding else 1.0] + [float(present[n]) for n in names[1:]], dtype=np.float32)
    meta = {"site": site, "view": visit.view, "exposure": visit.exposure, "gamma": visit.gamma,
            "inverted": visit.inverted, "rotation": visit.rotation, "scale": visit.scale,
            "visit": visit_no, "sex": patient.sex, "age": patient.age, "ctr": ctr,
            "findings_all": np.array([present[n] for n in FINDINGS], dtype=np.uint8)}
    pid = f"{FAMILY}-s{site}-{seed}-{block:06d}-{pnum}"
    return PhantomSample(image=image, labels=labels, mask=mask, patient_id=pid, meta=meta)


SPEC = FamilySpec(name=FAMILY, code=CODE, task="multilabel", mask_names=MASK_NAMES, label_names=site_label_names,
                  generate=generate, params=("findings", "invert_prob"),
                  description="frontal chest radiograph: lungs, heart, mediastinum, bones; 10 findings")

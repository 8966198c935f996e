"""Real-data sources: one registry, one spec string per data set, one :class:`ImageSet` back.

Every data set is named by a *spec* ``scheme:path?key=value&key=value`` and loaded with
:func:`load_source`::

    load_source("phantom:cxr?site=2&n=500&size=128&seed=0")
    load_source("medmnist:breastmnist?size=224&root=/data/medmnist", split="train")
    load_source("dicom:/data/ct_series?window=lung&size=256")

Query values are URL-unquoted (``%26`` for a literal ``&``); integers, floats and
``true`` / ``false`` are converted; everything else stays a string (comma-separated lists
such as ``label_cols=A,B`` are split by the loader). A parameter a loader does not take is
an error that lists the ones it does take. New schemes are added with
:func:`register_source`. Bad input never passes silently: a missing or unreadable file, a
CSV missing a column, a label outside the declared set, a mask whose size differs from its
image, an npz with the wrong keys or an empty split raise :class:`DataError`, naming the
file or row and saying what to do.

Schemes
-------
- ``phantom:FAMILY?n=&size=&seed=&site=&workers=`` - the embedded procedural phantoms
  (``cxr``, ``ct``, ``knee``, ``breast_us``, ``thyroid_us``; extra keys go to the family).
- ``natural:[labelled]?n=&size=&seed=`` - the natural-image stand-in.
- ``medmnist:FLAG?size=28|64|128|224&root=DIR`` - MedMNIST+ ``.npz`` files
  (``{flag}.npz`` at 28 px, ``{flag}_{size}.npz`` otherwise; ``root`` defaults to
  ``$MEDMNIST_ROOT`` or ``~/.medmnist``, the ``medmnist`` package's own default). The file
  is converted once, streamed, into memory-mapped ``.npy`` in the cache (``np.load`` of an
  npz would read it all into memory). The official split is kept in ``meta["split"]``
  (``train`` / ``val`` / ``test``) and chosen with ``split=``. MedMNIST has no patient ids:
  each image is its own patient (``meta["patient_id_note"]``). BreastMNIST's official
  label 0 is *malignant*, 1 *normal or benign*; this loader flips it so the one output is
  ``"malignant"`` (1 = malignant); ``positive=benign_or_normal`` keeps the official coding.
- ``dicom:FILE_OR_FOLDER?size=&window=&frames=all|middle&fit=pad|crop&glob=**/*`` - DICOM
  through pydicom (see *Intensity policy* and *De-identification*).
- ``folder:ROOT?labels=CSV&image_col=&label_cols=|finding_col=|class_col=...`` - images
  (png / jpg / tif, 8 or 16 bit, or DICOM) with labels from a CSV; without ``labels`` every
  image under ROOT is loaded unlabelled. See :func:`_load_folder` for every key.
- ``csv:PATH.csv?...`` - the same with the CSV as the path and its folder (or ``root=``) as ROOT.
- ``segfolder:IMAGES?masks=DIR[,DIR...]&mask_suffix=&merge=&missing=error|skip`` - images
  with mask folders, masks matched by file stem (relative mask folders are resolved
  against the image folder's parent).
- ``radimagenet:ROOT?modality=US&anatomy=thyroid[&positive=LABEL]`` - the RadImageNet
  layout ``ROOT/modality/anatomy/label/*.png``, one class per label folder.

Intensity policy (16-bit to uint8)
----------------------------------
Images are stored as uint8. Values are mapped linearly from a window ``[lo, hi]`` onto
0..255 and clipped (:func:`to_uint8`). For DICOM, ``window=auto`` (the default) uses, in
order: the file's VOI LUT Sequence (then min-max of its output), the file's first
WindowCenter / WindowWidth, or the 0.5 / 99.5 percentiles of the file's pixels (over all
its frames, so frames of one file share one mapping). The window applies to the output of
the modality LUT (RescaleSlope / Intercept, so CT is in Hounsfield units).
``window=lung|mediastinum|bone|brain|abdomen`` uses the named CT windows of
:data:`NAMED_WINDOWS`, ``window=40,400`` an explicit centre,width, and
``window=percentile|minmax|dicom`` forces one rule. MONOCHROME1 images are inverted after
windowing so that dense tissue is always bright. Colour (RGB, YBR, palette) images are
converted to grey (ITU-R 601 luma). 16-bit PNG / TIFF files use ``intensity=minmax``
(default) or ``intensity=percentile``.

Resizing
--------
``size=S`` gives S x S images. ``fit=pad`` (default) scales the longer side to S and pads the
shorter one symmetrically with black, so nothing is cut off; ``fit=crop`` scales the shorter
side to S and centre-crops the longer one. Images use bilinear (antialiased) resampling,
masks nearest-neighbour. Without ``size`` the native size is kept, which needs every image
to have the same shape.

De-identification
-----------------
No patient identifier leaves the DICOM loader: ``patient_ids`` are
``sha256(salt | PatientID)[:12]`` (``group=study`` hashes PatientID | StudyInstanceUID
instead, so each study is its own group; a file without PatientID falls back to its
StudyInstanceUID). ``meta`` holds hashed study ids, modality, photometric interpretation,
frame numbers, the window used and file paths relative to the root you gave; never names,
birth dates or raw ids. Pass your own ``salt=`` for data you publish features of.

Caching
-------
Folder, DICOM, segmentation and RadImageNet loads are written once into
``<cache>/sources/<hash>/`` as memory-mapped ``.npy``; the key covers the parameters, the
CSV's bytes and every file's name, size and modification time. ``cache=False`` reads into
memory instead.

Recipes
-------
NIH ChestX-ray14 (``Data_Entry_2017.csv``, images in ``images_001/images`` ... or one
``images`` folder; 14 findings, ``|``-separated, ``No Finding`` = all zeros)::

    folder:/data/nih?labels=Data_Entry_2017.csv&image_col=Image Index&finding_col=Finding Labels
      &no_finding=No Finding&patient_col=Patient ID&image_dir=images*/images&size=224

  (one line, no spaces around ``&``). Use ``image_dir=images`` when all PNGs sit in one
  folder. The official train/val-vs-test split: add a ``split`` column with pandas from
  ``train_val_list.txt`` / ``test_list.txt`` and pass ``split_col=split``.

CheXpert (``train.csv``; ``Path`` is relative to the folder *holding* ``CheXpert-v1.0``;
blank = negative; -1 = uncertain, mapped by ``u=ones`` (U-Ones) or ``u=zeros``; frontal
views only; the patient id is in the path)::

    folder:/data?labels=CheXpert-v1.0/train.csv&image_col=Path&u=ones
      &label_cols=Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion
      &where=Frontal/Lateral==Frontal&patient_regex=(patient\\d+)&size=224

VinDr-CXR (``annotations/image_labels_train.csv``: three radiologists per image, DICOM
images named ``{image_id}.dicom``; ``aggregate=max`` = positive if any reader says so)::

    folder:/data/vindr?labels=annotations/image_labels_train.csv&image_col=image_id&ext=.dicom
      &image_dir=train&label_cols=Aortic enlargement,Atelectasis,Cardiomegaly,Consolidation,
      ILD,Infiltration,Lung Opacity,Nodule/Mass,Pleural effusion,Pleural thickening,Pneumothorax
      &aggregate=max&size=224

  (VinDr-CXR has no patient ids: each image is its own patient.)

PadChest (labels are Python-style lists such as ``['pleural effusion', 'cardiomegaly']``,
16-bit PNGs spread over numbered folders, found by name with ``image_dir=*``; declare the
classes you study and ignore the other findings)::

    folder:/data/padchest?labels=PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv
      &image_col=ImageID&image_dir=*&finding_col=Labels&no_finding=normal&others=ignore
      &classes=cardiomegaly,pleural effusion,atelectasis,pneumonia,nodule
      &patient_col=PatientID&intensity=percentile&size=224

MIMIC-CXR-JPG (labels are per study in ``mimic-cxr-2.0.0-chexpert.csv``; join them to the
images first, three lines of pandas, then load the merged CSV)::

    meta = pd.read_csv("mimic-cxr-2.0.0-metadata.csv")
    lab = pd.read_csv("mimic-cxr-2.0.0-chexpert.csv")
    df = meta.merge(lab, on=["subject_id", "study_id"])
    df["path"] = ("files/p" + df.subject_id.astype(str).str[:2] + "/p" + df.subject_id.astype(str)
                  + "/s" + df.study_id.astype(str) + "/" + df.dicom_id + ".jpg")
    df.to_csv("/data/mimic/merged.csv", index=False)

    folder:/data/mimic?labels=merged.csv&image_col=path&patient_col=subject_id&u=zeros
      &label_cols=Cardiomegaly,Edema,Consolidation,Atelectasis,Pleural Effusion
      &where=ViewPosition==PA&size=224

Montgomery County (``CXR_png`` with ``ManualMask/leftMask`` and ``ManualMask/rightMask``,
same file names; ``merge=true`` unites them into one "lung" class)::

    segfolder:/data/MontgomerySet/CXR_png?masks=ManualMask/leftMask,ManualMask/rightMask
      &merge=true&mask_names=lung&size=256

  Without ``merge`` the left mask is class 1 and the right mask class 2.

Shenzhen (``CXR_png`` and ``mask`` with ``_mask`` appended to the stem; masks exist for 566
of the 662 images, so skip the others)::

    segfolder:/data/ChinaSet/CXR_png?masks=mask&mask_suffix=_mask&missing=skip
      &mask_names=lung&size=256

JSRT with the SCR masks (the JSRT ``.IMG`` files are raw 2048 x 2048 big-endian 12-bit;
convert them once to PNG at the 1024 px of the SCR masks, e.g.
``a = np.fromfile(p, ">u2").reshape(2048, 2048)[::2, ::2]`` then save ``(a >> 4)`` as 8-bit;
view one image and invert it if the lungs come out white)::

    segfolder:/data/jsrt/png?masks=scr/masks/left lung,scr/masks/right lung,scr/masks/heart
      &mask_names=left_lung,right_lung,heart&size=256

RadImageNet thyroid ultrasound as a binary task::

    radimagenet:/data/radimagenet?modality=US&anatomy=thyroid&positive=thyroid_nodule&size=224
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import unquote

from ..settings import PATH_SCHEMES, absolute_spec, medmnist_with_root  # noqa: F401  (re-exported)

import numpy as np

from ..cache import (CorruptCacheError, artifact_dir, discard_entry, entry_lock, file_hash, load_json,
                     load_npy, record_checksum, save_json, save_npy, stable_hash)
from .imageset import ImageSet


class DataError(ValueError):
    """Bad input data: the message says what is wrong, where (file / row / argument) and what to do."""


Loader = Callable[..., ImageSet]
_REGISTRY: dict[str, Loader] = {}

#: Named CT windows (centre, width) in Hounsfield units.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")


# --------------------------------------------------------------------------- registry and specs


def register_source(scheme: str) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(path, *, cache, **params) -> ImageSet`` under ``scheme``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", scheme):
        raise ValueError(f"Source scheme {scheme!r} must be lower-case letters, digits and '_'")

    def decorator(loader: Loader) -> Loader:
        _REGISTRY[scheme] = loader
        return loader

    return decorator


def registered_schemes() -> list[str]:
    """The schemes :func:`load_source` understands, sorted."""
    return sorted(_REGISTRY)


def _convert_value(text: str) -> Any:
    """A query value as int, float or bool when it reads as one, else the string."""
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``scheme:path?k=v&k=v`` into (scheme, path, params) with numeric values converted."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DataError(f"Data spec {spec!r} has no scheme; write it as scheme:path?key=value, "
                        f"with scheme one of {', '.join(registered_schemes())}")
    scheme, rest = spec.split(":", 1)
    path, _, query = rest.partition("?")
    params: dict[str, Any] = {}
    for item in query.split("&"):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key = unquote(key.strip())
        if not eq or not key:
            raise DataError(f"Data spec {spec!r}: parameter {item!r} must read key=value")
        if key in params:
            raise DataError(f"Data spec {spec!r}: parameter {key!r} given twice")
        params[key] = _convert_value(unquote(value.strip()))
    return scheme.strip().lower(), unquote(path.strip()), params


def _check_params(loader: Loader, scheme: str, params: dict[str, Any]) -> None:
    """Raise when ``params`` holds a key the loader does not take, listing the keys it takes."""
    signature = inspect.signature(loader)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return
    accepted = [name for name, p in signature.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "cache"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise DataError(f"{scheme}: unknown parameter(s) {', '.join(unknown)}; "
                        f"this scheme takes {', '.join(accepted)}")


def load_source(spec: str, *, split: str | None = None, cache: bool = True) -> ImageSet:
    """Load the data set named by ``spec`` (see the module docstring); ``split`` picks an official split."""
    scheme, path, params = parse_spec(spec)
    if scheme not in _REGISTRY:
        raise DataError(f"Unknown data scheme {scheme!r} in {spec!r}; registered schemes: "
                        f"{', '.join(registered_schemes())}")
    loader = _REGISTRY[scheme]
    _check_params(loader, scheme, params)
    ds = loader(path, cache=cache, **params)
    ds.meta.setdefault("source", spec)
    if split is not None:
        ds = select_split(ds, split)
    return ds


def select_split(ds: ImageSet, split: str) -> ImageSet:
    """The rows of ``ds`` whose ``meta["split"]`` equals ``split`` (memory-mapped when contiguous)."""
    if "split" not in ds.meta:
        raise DataError(f"{ds.name}: this source has no official split (meta['split']); "
                        f"load it without split= and use medlib.data.splits.patient_split")
    names = np.asarray(ds.meta["split"]).astype(str)
    rows = np.flatnonzero(names == split)
    if rows.size == 0:
        raise DataError(f"{ds.name}: split {split!r} is empty; available splits: "
                        f"{', '.join(sorted(set(names.tolist())))}")
    return _take(ds, rows, f"{ds.name}[{split}]")


def _take(ds: ImageSet, rows: np.ndarray, name: str) -> ImageSet:
    """Rows of ``ds``; a contiguous run is sliced (keeps memory maps), anything else is copied."""
    if rows[-1] - rows[0] + 1 != rows.size:
        return ds.subset(rows, name=name)
    sl = slice(int(rows[0]), int(rows[-1]) + 1)
    n = len(ds)
    return ImageSet(
        images=ds.images[sl], labels=None if ds.labels is None else ds.labels[sl],
        label_names=list(ds.label_names), task=ds.task, patient_ids=ds.patient_ids[sl],
        masks=None if ds.masks is None else ds.masks[sl], mask_names=list(ds.mask_names),
        meta={k: (v[sl] if isinstance(v, np.ndarray) and v.ndim and len(v) == n else v) for k, v in ds.meta.items()},
        name=name,
    )


# --------------------------------------------------------------------------- intensity and geometry


def to_uint8(array: np.ndarray, policy: str = "minmax", *, low: float = 0.5, high: float = 99.5,
             center: float | None = None, width: float | None = None) -> np.ndarray:
    """Map an array linearly onto 0..255 (clipped) by min-max, percentiles (low, high) or a window."""
    values = np.asarray(array, dtype=np.float64)
    if values.size == 0:
        raise DataError("to_uint8: empty array")
    if not np.isfinite(values).all():
        raise DataError("to_uint8: array holds NaN or inf; clean the data before converting")
    if policy == "minmax":
        lo, hi = float(values.min()), float(values.max())
    elif policy == "percentile":
        if not 0.0 <= low < high <= 100.0:
            raise DataError(f"to_uint8: percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
        lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    elif policy == "window":
        if center is None or width is None or width <= 0:
            raise DataError(f"to_uint8: policy 'window' needs center and a positive width, got {center}, {width}")
        lo, hi = center - width / 2.0, center + width / 2.0
    else:
        raise DataError(f"to_uint8: unknown policy {policy!r}; use minmax, percentile or window")
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.rint(scaled).astype(np.uint8)


def fit_image(image: np.ndarray, size: int | None, fit: str = "pad", nearest: bool = False) -> np.ndarray:
    """Resize a 2-D uint8 image to size x size: ``pad`` (letterbox, black) or ``crop`` (centre crop)."""
    from PIL import Image

    if size is None:
        return image
    if fit not in ("pad", "crop"):
        raise DataError(f"fit must be 'pad' or 'crop', got {fit!r}")
    h, w = image.shape
    scale = size / (max(h, w) if fit == "pad" else min(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample))
    if fit == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(resized[top:top + size, left:left + size])
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def _to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (..., 3) array, as float."""
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def read_image_file(path: str | Path, intensity: str = "minmax", window: str = "auto") -> np.ndarray:
    """One image file (png / jpg / tif / bmp, 8 or 16 bit, or DICOM's middle frame) as 2-D uint8."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path, window=window, frames="middle")[0][0]
    if not path.is_file():
        raise DataError(f"{path}: image file not found; check the folder and the image column / extension")
    try:
        with Image.open(path) as image:
            if image.mode == "L":
                return np.asarray(image).copy()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return to_uint8(np.asarray(image), policy=intensity)
            if image.mode in ("1", "P", "LA", "PA"):
                return np.asarray(image.convert("L")).copy()
            return to_uint8(_to_gray(np.asarray(image.convert("RGB"))), "window", center=127.5, width=255.0)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({err}); replace or remove the file") from err


# --------------------------------------------------------------------------- DICOM


def _hash_id(salt: str, *parts: str) -> str:
    """sha256 of salt and parts joined by '|', first 12 hex digits."""
    return hashlib.sha256("|".join((salt, *parts)).encode()).hexdigest()[:12]


def _dicom_window(values: np.ndarray, ds: Any, window: str | float, low: float, high: float) -> tuple[np.ndarray, str]:
    """Apply the window policy of the module docstring to modality-LUT output; return uint8 and its description."""
    from pydicom.pixels import apply_voi

    window = str(window)
    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if window in ("auto", "dicom"):
        if has_lut:
            return to_uint8(apply_voi(values, ds), "minmax"), "voi_lut"
        if has_window:
            center = float(np.atleast_1d(ds.WindowCenter)[0])
            width = float(np.atleast_1d(ds.WindowWidth)[0])
            return to_uint8(values, "window", center=center, width=width), f"dicom:{center:g},{width:g}"
        if window == "dicom":
            raise DataError("window=dicom but the file has no WindowCenter/WindowWidth or VOI LUT; "
                            "use window=auto, percentile, minmax or a named window")
        window = "percentile"
    if window == "percentile":
        return to_uint8(values, "percentile", low=low, high=high), f"percentile:{low:g},{high:g}"
    if window == "minmax":
        return to_uint8(values, "minmax"), "minmax"
    if window in NAMED_WINDOWS:
        center, width = NAMED_WINDOWS[window]
        return to_uint8(values, "window", center=center, width=width), f"{window}:{center:g},{width:g}"
    match = re.fullmatch(r"\s*([+-]?[\d.]+)\s*,\s*([\d.]+)\s*", window)
    if match:
        center, width = float(match.group(1)), float(match.group(2))
        return to_uint8(values, "window", center=center, width=width), f"{center:g},{width:g}"
    raise DataError(f"Unknown window {window!r}; use auto, dicom, percentile, minmax, "
                    f"{', '.join(NAMED_WINDOWS)} or 'center,width'")


def _dicom_header(path: Path) -> Any:
    """Read a DICOM header (no pixels), raising DataError naming the file when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); "
                        f"remove it or narrow the file pattern with glob=**/*.dcm") from err


def _n_frames(header: Any) -> int:
    """Number of frames a DICOM header declares (1 when absent)."""
    return int(header.get("NumberOfFrames", 1) or 1)


def read_dicom(path: str | Path, *, window: str | float = "auto", frames: str | int = "all",
               low: float = 0.5, high: float = 99.5, salt: str = "medlib",
               group: str = "patient") -> tuple[np.ndarray, dict[str, Any]]:
    """One DICOM file as uint8 frames (F, H, W) plus de-identified info (hashed ids, modality, window)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: DICOM file not found")
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err}); "
                        f"remove it or narrow the file pattern with glob=**/*.dcm") from err
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file holds no image (no PixelData); remove it from the folder")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoders raise many types; all mean the same thing here
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(f"{path}: cannot decode pixel data (transfer syntax {getattr(syntax, 'name', syntax)}): "
                        f"{err}. Install decoders: pip install pylibjpeg pylibjpeg-libjpeg "
                        f"pylibjpeg-openjpeg (or python-gdcm)") from err
    n_frames = _n_frames(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    colour = int(ds.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR"
    if n_frames == 1:
        pixels = pixels[None]
    chosen = _choose_frames(n_frames, frames, path)
    pixels = pixels[chosen]
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        out, window_used = _dicom_window(values, ds, window, low, high)
        if photometric == "MONOCHROME1":
            out = 255 - out
    elif colour:
        rgb = apply_color_lut(pixels, ds) if photometric == "PALETTE COLOR" else pixels
        gray = _to_gray(np.asarray(rgb))
        bits = 8 if np.asarray(rgb).dtype == np.uint8 else 16
        out = to_uint8(gray, "window", center=(2 ** bits - 1) / 2, width=2 ** bits - 1)
        window_used = f"luma:{bits}bit"
    else:
        raise DataError(f"{path}: unsupported PhotometricInterpretation {photometric!r}")
    study = str(ds.get("StudyInstanceUID", "") or "")
    patient = str(ds.get("PatientID", "") or "")
    if group == "study":
        patient_hash = _hash_id(salt, patient, study)
    elif group == "patient":
        patient_hash = _hash_id(salt, patient) if patient else _hash_id(salt, "study", study or str(path))
    else:
        raise DataError(f"group must be 'patient' or 'study', got {group!r}")
    info = {
        "patient_hash": patient_hash,
        "study_hash": _hash_id(salt, "study", study) if study else "",
        "modality": str(ds.get("Modality", "")),
        "photometric": photometric,
        "window": window_used,
        "frames": [int(i) for i in chosen],
        "n_frames_in_file": n_frames,
    }
    return np.ascontiguousarray(out.astype(np.uint8)), info


def _choose_frames(n_frames: int, frames: str | int, path: Path) -> np.ndarray:
    """Frame numbers to keep: all, the middle one, or one index."""
    if frames == "all":
        return np.arange(n_frames)
    if frames == "middle":
        return np.array([n_frames // 2])
    if isinstance(frames, int) and not isinstance(frames, bool):
        if not 0 <= frames < n_frames:
            raise DataError(f"{path}: frame {frames} requested but the file has {n_frames} frame(s)")
        return np.array([frames])
    raise DataError(f"frames must be 'all', 'middle' or a frame index, got {frames!r}")


def _list_files(root: Path, pattern: str, suffixes: Sequence[str] | None) -> list[Path]:
    """Regular, non-hidden files under ``root`` matching ``pattern`` (and ``suffixes``), sorted."""
    files = []
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if suffixes is not None and path.suffix.lower() not in suffixes:
            continue
        files.append(path)
    return files


def _files_key(files: Iterable[Path], root: Path) -> str:
    """A hash of relative names, sizes and modification times: changes when any file changes."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append((str(path.relative_to(root)) if path.is_relative_to(root) else str(path),
                        stat.st_size, stat.st_mtime_ns))
    return stable_hash(entries)


@register_source("dicom")
def _load_dicom(path: str, *, cache: bool = True, size: int | None = None, window: str = "auto",
                frames: str | int = "all", fit: str = "pad", glob: str = "**/*", low: float = 0.5,
                high: float = 99.5, salt: str = "medlib", group: str = "patient") -> ImageSet:
    """DICOM file or folder -> unlabelled grey ImageSet (task none), one image per kept frame."""
    root = Path(path).expanduser()
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = _list_files(root, glob, None), root
        if not files:
            raise DataError(f"{root}: no files match glob={glob!r}; check the folder or the pattern")
    else:
        raise DataError(f"{root}: no such DICOM file or folder")
    headers = [_dicom_header(f) for f in files]
    counts = []
    for f, header in zip(files, headers):
        n = _n_frames(header)
        counts.append(len(_choose_frames(n, frames, f)))
    total = int(sum(counts))
    options = dict(size=size, window=window, frames=frames, fit=fit, low=low, high=high, salt=salt, group=group)
    key = {"scheme": "dicom", "root": str(root.resolve()), "files": _files_key(files, base), **options}

    def build(alloc: Allocator) -> ImageSet:
        images: np.ndarray | None = None
        pids, studies, modality, photometric, windows, frame_no, names = [], [], [], [], [], [], []
        row = 0
        for f in files:
            frames_u8, info = read_dicom(f, window=window, frames=frames, low=low, high=high, salt=salt, group=group)
            resized = np.stack([fit_image(fr, size, fit) for fr in frames_u8])
            if images is None:
                images = alloc("images", (total, *resized.shape[1:]), np.uint8)
            if resized.shape[1:] != images.shape[1:]:
                raise DataError(f"{f}: image size {resized.shape[1:]} differs from {images.shape[1:]} of the "
                                f"first file; pass size=S to resize every image")
            images[row:row + len(resized)] = resized
            row += len(resized)
            for frame in info["frames"]:
                pids.append(info["patient_hash"])
                studies.append(info["study_hash"])
                modality.append(info["modality"])
                photometric.append(info["photometric"])
                windows.append(info["window"])
                frame_no.append(frame)
                names.append(str(f.relative_to(base)))
        assert images is not None
        meta = {
            "file": np.array(names), "frame": np.array(frame_no, dtype=np.int64), "study_hash": np.array(studies),
            "modality": np.array(modality), "photometric": np.array(photometric), "window": np.array(windows),
            "patient_id_note": f"sha256(salt|PatientID)[:12] (group={group}); no identifiers are kept",
            "uint8_policy": "linear window -> 0..255, clipped; MONOCHROME1 inverted (see medlib.data.sources)",
            "fit": fit,
        }
        return ImageSet(images=images, labels=None, label_names=[], task="none", patient_ids=np.array(pids),
                        meta=meta, name=f"dicom:{root.name}")

    return _cached_imageset(key, cache, build)


# --------------------------------------------------------------------------- caching


Allocator = Callable[[str, tuple[int, ...], Any], np.ndarray]


def _memory_alloc(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Allocate an in-memory array (the cache=False path)."""
    return np.zeros(shape, dtype=dtype)


def _save_imageset(folder: Path, ds: ImageSet) -> None:
    """Write an ImageSet as .npy files plus imageset.json (arrays already memory-mapped there are flushed)."""
    arrays: dict[str, np.ndarray | None] = {"images": ds.images, "labels": ds.labels, "masks": ds.masks,
                                             "patient_ids": ds.patient_ids}
    for name, array in arrays.items():
        if array is None:
            continue
        target = folder / f"{name}.npy"
        if isinstance(array, np.memmap) and array.filename and Path(array.filename) == target:
            array.flush()
            record_checksum(target)
        else:
            save_npy(target, np.asarray(array))
    meta_arrays = [k for k, v in ds.meta.items() if isinstance(v, np.ndarray)]
    for k in meta_arrays:
        value = ds.meta[k]
        save_npy(folder / f"meta_{k}.npy", value.astype(str) if value.dtype == object else value)
    save_json(folder / "imageset.json", checksum=True, obj={
        "label_names": ds.label_names, "task": ds.task, "mask_names": ds.mask_names, "name": ds.name,
        "has_labels": ds.labels is not None, "has_masks": ds.masks is not None, "meta_arrays": meta_arrays,
        "meta": {k: v for k, v in ds.meta.items() if k not in meta_arrays},
    })


def _load_imageset(folder: Path) -> ImageSet:
    """Read an ImageSet written by :func:`_save_imageset`, images and masks memory-mapped."""
    info = load_json(folder / "imageset.json")
    meta = dict(info["meta"])
    for k in info["meta_arrays"]:
        meta[k] = np.asarray(load_npy(folder / f"meta_{k}.npy", mmap=False))
    return ImageSet(
        images=load_npy(folder / "images.npy"),
        labels=np.asarray(load_npy(folder / "labels.npy", mmap=False)) if info["has_labels"] else None,
        label_names=info["label_names"], task=info["task"],
        patient_ids=np.asarray(load_npy(folder / "patient_ids.npy", mmap=False)),
        masks=load_npy(folder / "masks.npy") if info["has_masks"] else None,
        mask_names=info["mask_names"], meta=meta, name=info["name"],
    )


def _cached_imageset(key: dict[str, Any], cache: bool, build: Callable[[Allocator], ImageSet]) -> ImageSet:
    """Build once into ``<cache>/sources/<hash(key)>`` (memory-mapped, published atomically), then reload."""
    if not cache:
        return build(_memory_alloc)
    final = artifact_dir("sources", key)
    with entry_lock(final):  # a second process waits for this entry, then reuses it
        return _build_or_load_imageset(final, key, build)


def _build_or_load_imageset(final: Path, key: dict[str, Any], build: Callable[[Allocator], ImageSet]) -> ImageSet:
    """Load the cached ImageSet in ``final``, or build it there (a damaged one is rebuilt)."""
    if (final / "imageset.json").exists():
        try:
            return _load_imageset(final)
        except CorruptCacheError as err:
            discard_entry(final, err)  # damaged: built again below
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        def alloc(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

        ds = build(alloc)
        _save_imageset(tmp, ds)
        save_json(tmp / "key.json", key)
        del ds
        if not (final / "imageset.json").exists():
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "imageset.json").exists():  # another process did not win the race either
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load_imageset(final)


def _read_many(files: Sequence[Path], out: np.ndarray, reader: Callable[[Path], np.ndarray],
               workers: int, progress: bool, what: str) -> None:
    """Read ``files`` with ``reader`` into ``out`` rows (threads when workers > 1; PIL releases the GIL)."""
    def one(i: int) -> None:
        image = reader(files[i])
        if image.shape != out.shape[1:]:
            raise DataError(f"{files[i]}: image size {image.shape} differs from {out.shape[1:]}; "
                            f"pass size=S to resize every image")
        out[i] = image

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool, \
            tqdm(total=len(files), desc=f"reading {what}", unit="img", disable=not progress) as bar:
        for _ in pool.map(one, range(len(files))):
            bar.update(1)


# --------------------------------------------------------------------------- embedded sources


@register_source("phantom")
def _load_phantom(family: str, *, cache: bool = True, n: int | None = None, size: int = 128, seed: int = 0,
                  site: int = 0, workers: int = 1, progress: bool = False, **params: Any) -> ImageSet:
    """The embedded procedural phantoms: ``phantom:cxr?n=500&size=128&seed=0&site=2``."""
    from .phantoms import make_dataset

    if n is None:
        raise DataError(f"phantom:{family}: give the number of images, e.g. phantom:{family}?n=500")
    return make_dataset(family, n, size=size, seed=seed, site=site, cache=cache, workers=workers,
                        progress=progress, **params)


@register_source("natural")
def _load_natural(kind: str, *, cache: bool = True, n: int | None = None, size: int = 64, seed: int = 0,
                  workers: int = 1, progress: bool = False) -> ImageSet:
    """The natural-image stand-in: ``natural:?n=4000&size=64`` or ``natural:labelled?n=...``."""
    from .natural import make_natural, make_natural_labelled

    if n is None:
        raise DataError("natural: give the number of images, e.g. natural:?n=1000&size=64")
    options = dict(cache=cache, workers=workers, progress=progress)
    if kind in ("", "unlabelled"):
        return make_natural(n, size, seed, **options)
    if kind == "labelled":
        return make_natural_labelled(n, size, seed, **options)
    raise DataError(f"natural:{kind}: unknown kind; use natural: (unlabelled) or natural:labelled")


# --------------------------------------------------------------------------- MedMNIST+

_CHEST = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
          "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
           "lung-left", "lung-right", "pancreas", "spleen"]

#: task and label names per MedMNIST+ flag (2-D data sets).
MEDMNIST_TASKS: dict[str, tuple[str, list[str]]] = {
    "chestmnist": ("multilabel", _CHEST),
    "pneumoniamnist": ("binary", ["pneumonia"]),
    "breastmnist": ("binary", ["malignant"]),
    "organamnist": ("multiclass", _ORGANS),
    "organcmnist": ("multiclass", _ORGANS),
    "organsmnist": ("multiclass", _ORGANS),
    "pathmnist": ("multiclass", ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                 "normal colon mucosa", "cancer-associated stroma",
                                 "colorectal adenocarcinoma epithelium"]),
    "octmnist": ("multiclass", ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "dermamnist": ("multiclass", ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                  "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                  "melanocytic nevi", "vascular lesions"]),
    "bloodmnist": ("multiclass", ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                                  "lymphocyte", "monocyte", "neutrophil", "platelet"]),
    "retinamnist": ("multiclass", ["grade 0", "grade 1", "grade 2", "grade 3", "grade 4"]),
    "tissuemnist": ("multiclass", ["collecting duct, connecting tubule", "distal convoluted tubule",
                                   "glomerular endothelial cells", "interstitial endothelial cells",
                                   "leukocytes", "podocytes", "proximal tubule segments",
                                   "thick ascending limb"]),
}
MEDMNIST_SIZES = (28, 64, 128, 224)
_SPLITS = ("train", "val", "test")


def medmnist_file(flag: str, size: int, root: str | Path | None = None) -> Path:
    """Path of a MedMNIST+ file: ``root/{flag}.npz`` at 28 px, ``root/{flag}_{size}.npz`` otherwise."""
    if size not in MEDMNIST_SIZES:
        raise DataError(f"medmnist:{flag}: size must be one of {MEDMNIST_SIZES}, got {size}")
    base = Path(root or os.environ.get("MEDMNIST_ROOT", "~/.medmnist")).expanduser()
    return base / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")


def _npz_member_info(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype of one array inside an npz, read from its header only."""
    with zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(fh)
        raise DataError(f"{path}: array {key!r} has unsupported .npy format version {version}")


def _stream_npz_array(zf: zipfile.ZipFile, key: str, out: np.ndarray, chunk_rows: int = 4096) -> None:
    """Copy one C-ordered array out of an npz into ``out`` chunk by chunk (bounded memory)."""
    with zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = reader(fh)
        row_bytes = int(np.prod(out.shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, len(out), chunk_rows):
            stop = min(start + chunk_rows, len(out))
            buffer = fh.read(row_bytes * (stop - start))
            if len(buffer) != row_bytes * (stop - start):
                raise DataError(f"{key} in the npz is truncated at row {start}; download the file again")
            out[start:stop] = np.frombuffer(buffer, dtype=dtype).reshape((stop - start, *out.shape[1:]))


def _medmnist_labels(raw: np.ndarray, task: str, n_labels: int, path: Path, split: str) -> np.ndarray:
    """Validate and reshape one split's raw labels for the flag's task."""
    raw = np.asarray(raw)
    if raw.ndim == 1:
        raw = raw[:, None]
    if task == "multiclass":
        if raw.shape[1] != 1:
            raise DataError(f"{path}: {split}_labels has shape {raw.shape}; a multi-class flag needs (N, 1)")
        bad = np.flatnonzero((raw[:, 0] < 0) | (raw[:, 0] >= n_labels))
        if bad.size:
            raise DataError(f"{path}: {split}_labels row {bad[0]} holds class {raw[bad[0], 0]}, outside the "
                            f"declared 0..{n_labels - 1}; is the file for this flag?")
        return raw[:, 0].astype(np.int64)
    if raw.shape[1] != n_labels:
        raise DataError(f"{path}: {split}_labels has {raw.shape[1]} columns, expected {n_labels}")
    bad = np.flatnonzero(~np.isin(raw, (0, 1)).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: {split}_labels row {bad[0]} holds {raw[bad[0]].tolist()}, not 0/1")
    return raw.astype(np.float32)


@register_source("medmnist")
def _load_medmnist(flag: str, *, cache: bool = True, size: int = 28, root: str | None = None,
                   positive: str | None = None) -> ImageSet:
    """A MedMNIST+ npz (official split in meta["split"]), converted once to memory-mapped .npy."""
    flag = flag.strip().lower()
    if flag not in MEDMNIST_TASKS:
        raise DataError(f"medmnist:{flag}: unknown or 3-D flag; 2-D flags: {', '.join(sorted(MEDMNIST_TASKS))}")
    task, label_names = MEDMNIST_TASKS[flag]
    if flag == "breastmnist":
        positive = positive or "malignant"
        if positive not in ("malignant", "benign_or_normal"):
            raise DataError(f"medmnist:breastmnist: positive must be malignant or benign_or_normal, got {positive!r}")
        label_names = [positive]
    elif positive is not None:
        raise DataError(f"medmnist:{flag}: 'positive' only applies to breastmnist")
    path = medmnist_file(flag, size, root)
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST+ file not found. On a machine with internet: pip install medmnist, "
                        f"then in Python `medmnist.{_medmnist_class(flag)}(split='test', download=True, "
                        f"size={size}, root='{path.parent}')` (or download {path.name} from Zenodo record "
                        f"10519652); copy it here or pass root=FOLDER")
    stat = path.stat()
    key = {"scheme": "medmnist", "flag": flag, "size": size, "file": str(path.resolve()), "bytes": stat.st_size,
           "mtime": stat.st_mtime_ns, "positive": positive}

    def build(alloc: Allocator) -> ImageSet:
        return _build_medmnist(path, flag, size, task, label_names, positive, alloc)

    return _cached_imageset(key, cache, build)


def _medmnist_class(flag: str) -> str:
    """The medmnist package's class name for a flag (breastmnist -> BreastMNIST)."""
    return flag[:-len("mnist")].capitalize() + "MNIST"


def _build_medmnist(path: Path, flag: str, size: int, task: str, label_names: list[str], positive: str,
                    alloc: Allocator) -> ImageSet:
    """Stream the three official splits of a MedMNIST+ npz into one ImageSet."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable .npz ({err}); download it again") from err
    with zf:
        present = {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
        expected = {f"{s}_{kind}" for s in _SPLITS for kind in ("images", "labels")}
        if not expected <= present:
            raise DataError(f"{path}: not a MedMNIST+ file; it holds keys {sorted(present)} but needs "
                            f"{sorted(expected)}. Download the official file again")
        infos = {s: _npz_member_info(zf, f"{s}_images", path) for s in _SPLITS}
        shapes = {s: info[0] for s, info in infos.items()}
        tail = shapes["train"][1:]
        for s, (shape, fortran, dtype) in infos.items():
            if shape[1:] != tail or dtype != np.uint8 or fortran:
                raise DataError(f"{path}: {s}_images is {shape} {dtype}; expected uint8 (N, {tail}) in C order")
        if len(tail) not in (2, 3) or (len(tail) == 3 and tail[-1] != 3):
            raise DataError(f"{path}: images of shape {tail} look 3-D (volumes); only 2-D MedMNIST+ is supported")
        if tail[0] != size:
            raise DataError(f"{path}: images are {tail[0]} px but size={size} was asked; check the file name")
        counts = {s: shapes[s][0] for s in _SPLITS}
        total = sum(counts.values())
        images = alloc("images", (total, *tail), np.uint8)
        labels, start = [], 0
        for s in _SPLITS:
            _stream_npz_array(zf, f"{s}_images", images[start:start + counts[s]])
            with zf.open(f"{s}_labels.npy") as fh:
                raw = np.lib.format.read_array(fh, allow_pickle=False)
            if len(raw) != counts[s]:
                raise DataError(f"{path}: {s}_labels has {len(raw)} rows for {counts[s]} images")
            labels.append(_medmnist_labels(raw, task, len(label_names), path, s))
            start += counts[s]
    all_labels = np.concatenate(labels)
    note = ""
    if flag == "breastmnist":
        note = "official label 0 = malignant, 1 = normal/benign; "
        if positive == "malignant":
            all_labels = 1.0 - all_labels
            note += "flipped here so label 1 = malignant"
        else:
            note += "kept: label 1 = benign_or_normal"
    meta = {
        "split": np.repeat(np.array(_SPLITS), [counts[s] for s in _SPLITS]),
        "split_counts": counts,
        "patient_id_note": "MedMNIST has no patient ids: each image index is its own patient",
        "label_note": note,
        "file": path.name,
    }
    return ImageSet(images=images, labels=all_labels, label_names=list(label_names), task=task,
                    patient_ids=np.array([f"{flag}-{i:06d}" for i in range(total)]), meta=meta,
                    name=f"medmnist:{flag}@{size}")


# --------------------------------------------------------------------------- image folders + CSV


def _split_list(value: Any) -> list[str]:
    """A comma-separated parameter as a list of stripped, non-empty strings."""
    if value is None:
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _require_columns(df: Any, columns: Sequence[str], csv: Path, what: str) -> None:
    """Raise naming the CSV and the missing columns when any of ``columns`` is absent."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{csv}: {what} column(s) {missing} not found; the CSV has columns {list(df.columns)}")


def _parse_findings(value: Any, sep: str) -> list[str]:
    """One findings cell (``A|B``, ``['a', 'b']`` or blank) as a list of names."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    text = str(value).strip()
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"cannot parse list {text!r}") from err
        return [str(item).strip() for item in items if str(item).strip()]
    return [part.strip() for part in text.split(sep) if part.strip()]


def _labels_onehot(df: Any, csv: Path, label_cols: list[str], u: str | None) -> np.ndarray:
    """0/1 label columns (blank = 0; -1 = uncertain, mapped by ``u``); other values raise naming the row."""
    import pandas as pd

    _require_columns(df, label_cols, csv, "label")
    values = df[label_cols].apply(lambda col: pd.to_numeric(col, errors="coerce"))
    raw = df[label_cols]
    bad_text = values.isna() & raw.notna() & (raw.astype(str).apply(lambda c: c.str.strip()) != "")
    if bad_text.any().any():
        row, col = next(zip(*np.nonzero(bad_text.to_numpy())))
        raise DataError(f"{csv}: row {df.index[row] + 2} column {label_cols[col]!r} holds "
                        f"{raw.iat[row, col]!r}, not a number; labels must be 0, 1, -1 or blank")
    matrix = np.array(values.fillna(0.0).to_numpy(dtype=np.float64))
    uncertain = matrix == -1
    if uncertain.any():
        if u not in ("zeros", "ones"):
            row, col = np.argwhere(uncertain)[0]
            raise DataError(f"{csv}: row {df.index[row] + 2} column {label_cols[col]!r} is -1 (uncertain); "
                            f"choose a policy with u=zeros or u=ones")
        matrix[uncertain] = 1.0 if u == "ones" else 0.0
    bad = ~np.isin(matrix, (0.0, 1.0))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{csv}: row {df.index[row] + 2} column {label_cols[col]!r} holds {matrix[row, col]:g}; "
                        f"labels must be 0, 1, -1 (with u=) or blank")
    return matrix.astype(np.float32)


def _labels_findings(df: Any, csv: Path, column: str, classes: list[str], sep: str, no_finding: str,
                     others: str) -> tuple[np.ndarray, list[str]]:
    """A multi-label matrix from one findings column; findings outside ``classes`` raise (or are ignored)."""
    _require_columns(df, [column], csv, "finding")
    if others not in ("error", "ignore"):
        raise DataError(f"others must be 'error' or 'ignore', got {others!r}")
    parsed = []
    for row, value in zip(df.index, df[column]):
        try:
            findings = [f for f in _parse_findings(value, sep) if f != no_finding]
        except ValueError as err:
            raise DataError(f"{csv}: row {row + 2} column {column!r}: {err}") from err
        parsed.append(findings)
    names = classes or sorted({f for findings in parsed for f in findings})
    if not names:
        raise DataError(f"{csv}: column {column!r} holds no findings; check finding_col and no_finding")
    position = {name: j for j, name in enumerate(names)}
    matrix = np.zeros((len(df), len(names)), dtype=np.float32)
    for i, (row, findings) in enumerate(zip(df.index, parsed)):
        for finding in findings:
            if finding in position:
                matrix[i, position[finding]] = 1.0
            elif others == "error":
                raise DataError(f"{csv}: row {row + 2} has finding {finding!r}, outside the declared classes "
                                f"{names}; add it to classes= or pass others=ignore")
    return matrix, names


def _labels_classes(df: Any, csv: Path, column: str, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices from one column; a value outside ``classes`` raises naming the row."""
    _require_columns(df, [column], csv, "class")
    values = df[column].astype(str).str.strip()
    names = classes or sorted(values.unique().tolist())
    position = {name: j for j, name in enumerate(names)}
    out = np.empty(len(df), dtype=np.int64)
    for i, (row, value) in enumerate(zip(df.index, values)):
        if value not in position:
            raise DataError(f"{csv}: row {row + 2} has class {value!r}, outside the declared classes {names}; "
                            f"fix the row or add the class to classes=")
        out[i] = position[value]
    return out, names


def _apply_where(df: Any, where: str | None, csv: Path) -> Any:
    """Keep rows where ``column==value`` (or ``column!=value``)."""
    if not where:
        return df
    match = re.fullmatch(r"(.+?)(==|!=)(.*)", str(where))
    if not match:
        raise DataError(f"where={where!r}: write it as column==value or column!=value")
    column, op, value = match.group(1).strip(), match.group(2), match.group(3).strip()
    _require_columns(df, [column], csv, "where")
    keep = df[column].astype(str).str.strip() == value
    df = df[keep if op == "==" else ~keep]
    if df.empty:
        raise DataError(f"{csv}: no row satisfies where={where!r}")
    return df


def _image_index(root: Path, image_dir: str) -> Callable[[str], Path]:
    """A resolver from a CSV image value to a path: ``root/image_dir/value`` or, with a glob, by file name."""
    if "*" not in image_dir:
        base = root / image_dir
        return lambda value: base / value
    index: dict[str, Path] = {}
    for folder in sorted(root.glob(image_dir)):
        if folder.is_dir():
            for path in folder.iterdir():
                index.setdefault(path.name, path)
    if not index:
        raise DataError(f"{root}: image_dir={image_dir!r} matches no folder with files")
    return lambda value: index.get(Path(value).name, root / image_dir / value)


def _patients_from(df: Any, csv: Path, image_values: list[str], patient_col: str | None,
                   patient_regex: str | None) -> tuple[np.ndarray, str]:
    """Patient ids from a column, from a regex on the image value, or one per image (with a note)."""
    if patient_col:
        _require_columns(df, [patient_col], csv, "patient")
        return df[patient_col].astype(str).to_numpy(dtype=str), f"from column {patient_col!r}"
    if patient_regex:
        pattern = re.compile(patient_regex)
        ids = []
        for row, value in zip(df.index, image_values):
            match = pattern.search(value)
            if not match:
                raise DataError(f"{csv}: row {row + 2} image {value!r} does not match patient_regex={patient_regex!r}")
            ids.append(match.group(1) if match.groups() else match.group(0))
        return np.array(ids), f"from patient_regex {patient_regex!r}"
    return np.array(image_values), "no patient column: each image is its own patient"


class _ImageReader:
    """Reads one image file as 2-D uint8, resized to size x size (a class, so threads and pickling work)."""

    def __init__(self, size: int | None, fit: str, intensity: str = "minmax", window: str = "auto") -> None:
        self.size, self.fit, self.intensity, self.window = size, fit, intensity, window

    def __call__(self, path: Path) -> np.ndarray:
        """The image at ``path``, converted and resized."""
        return fit_image(read_image_file(path, intensity=self.intensity, window=self.window), self.size, self.fit)


def _read_images(files: Sequence[Path], reader: _ImageReader, alloc: Allocator, workers: int, progress: bool,
                 what: str) -> np.ndarray:
    """All ``files`` read into one (N, H, W) uint8 array from ``alloc`` (the first file fixes H, W)."""
    first = reader(files[0])
    images = alloc("images", (len(files), *first.shape), np.uint8)
    _read_many(files, images, reader, workers, progress, what)
    return images


def _read_label_csv(root: Path, labels: str) -> tuple[Path, Any]:
    """The label CSV (relative to ``root`` unless absolute) as a string DataFrame; blanks are NaN."""
    import pandas as pd

    csv = Path(labels).expanduser()
    csv = csv if csv.is_absolute() else root / csv
    if not csv.is_file():
        raise DataError(f"{csv}: label CSV not found (labels= is relative to {root})")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{csv}: cannot parse the CSV ({err})") from err
    if df.empty:
        raise DataError(f"{csv}: the CSV has no rows")
    return csv, df


def _load_unlabelled_folder(root: Path, cache: bool, reader: _ImageReader, workers: int,
                            progress: bool) -> ImageSet:
    """Every image under ``root`` (recursively), unlabelled, one patient per image."""
    files = _list_files(root, "**/*", IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    names = np.array([str(f.relative_to(root)) for f in files])
    key = {"scheme": "folder", "root": str(root.resolve()), "files": _files_key(files, root),
           "reader": vars(reader)}

    def build(alloc: Allocator) -> ImageSet:
        images = _read_images(files, reader, alloc, workers, progress, root.name)
        return ImageSet(images=images, labels=None, label_names=[], task="none", patient_ids=names,
                        meta={"file": names, "patient_id_note": "no labels: each image is its own patient"},
                        name=f"folder:{root.name}")

    return _cached_imageset(key, cache, build)


@register_source("folder")
def _load_folder(path: str, *, cache: bool = True, labels: str | None = None, image_col: str | None = None,
                 label_cols: str | None = None, finding_col: str | None = None, class_col: str | None = None,
                 classes: str | None = None, sep: str = "|", no_finding: str = "No Finding",
                 others: str = "error", u: str | None = None, patient_col: str | None = None,
                 patient_regex: str | None = None, where: str | None = None, split_col: str | None = None,
                 aggregate: str | None = None, image_dir: str = "", ext: str = "", size: int | None = None,
                 fit: str = "pad", intensity: str = "minmax", window: str = "auto", workers: int = 1,
                 progress: bool = False) -> ImageSet:
    """Images under ROOT with labels from a CSV (or unlabelled without ``labels``).

    Keys: ``labels`` CSV (relative to ROOT or absolute); ``image_col`` image path column
    (default: the first column), joined as ``ROOT/image_dir/value + ext`` (``image_dir`` may
    hold a ``*`` glob, then files are found by name); exactly one of ``label_cols=A,B``
    (0/1 columns, blank = 0, -1 = uncertain mapped by ``u=zeros|ones``; one column = binary),
    ``finding_col=C`` (``sep``-separated or Python-list findings, ``no_finding`` = none,
    ``classes=`` declares the label set, ``others=error|ignore`` for findings outside it) or
    ``class_col=C`` (multi-class, ``classes=`` optional); ``patient_col`` or
    ``patient_regex`` (one group, searched in the image value); ``where=col==value`` row
    filter; ``split_col`` column with train / val / test into ``meta["split"]``;
    ``aggregate=max|first`` for several rows per image; ``size``, ``fit``, ``intensity``
    (16-bit PNG policy), ``window`` (DICOM), ``workers`` reader threads, ``progress`` bar.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    reader = _ImageReader(size, fit, intensity, window)
    if labels is None:
        if any(v is not None for v in (label_cols, finding_col, class_col, patient_col, split_col, where)):
            raise DataError(f"folder:{root}: label, patient, split or where keys need labels=CSV")
        return _load_unlabelled_folder(root, cache, reader, workers, progress)
    csv, df = _read_label_csv(root, labels)
    image_col = image_col or str(df.columns[0])
    _require_columns(df, [image_col], csv, "image")
    df = _apply_where(df, where, csv)
    modes = [m for m in (label_cols, finding_col, class_col) if m]
    if len(modes) != 1:
        raise DataError(f"folder:{root}: give exactly one of label_cols=, finding_col= or class_col= "
                        f"(got {len(modes)})")
    df = _dedupe(df, csv, image_col, aggregate, bool(class_col))
    label_matrix, names, task = _table_labels(df, csv, label_cols, finding_col, class_col, _split_list(classes),
                                              sep, no_finding, others, u)
    if aggregate == "max":
        label_matrix, df = _aggregate_max(df, image_col, label_matrix)
    values = df[image_col].astype(str).str.strip().tolist()
    resolve = _image_index(root, image_dir)
    files = [resolve(v if not ext or v.lower().endswith(ext.lower()) else v + ext) for v in values]
    for row, f in zip(df.index, files):
        if not f.is_file():
            raise DataError(f"{csv}: row {row + 2} names image {f}, which does not exist; "
                            f"check image_dir= / ext= or remove the row")
    patients, patient_note = _patients_from(df, csv, values, patient_col, patient_regex)
    meta: dict[str, Any] = {"file": np.array(values), "patient_id_note": patient_note, "csv": csv.name}
    if split_col:
        _require_columns(df, [split_col], csv, "split")
        meta["split"] = df[split_col].astype(str).str.strip().to_numpy(dtype=str)
    key = {"scheme": "folder", "root": str(root.resolve()), "csv": file_hash(csv), "files": _files_key(files, root),
           "reader": vars(reader),
           "params": dict(image_col=image_col, label_cols=label_cols, finding_col=finding_col, class_col=class_col,
                          classes=classes, sep=sep, no_finding=no_finding, others=others, u=u,
                          patient_col=patient_col, patient_regex=patient_regex, where=where, split_col=split_col,
                          aggregate=aggregate, image_dir=image_dir, ext=ext)}

    def build(alloc: Allocator) -> ImageSet:
        images = _read_images(files, reader, alloc, workers, progress, root.name)
        return ImageSet(images=images, labels=label_matrix, label_names=names, task=task, patient_ids=patients,
                        meta=meta, name=f"folder:{root.name}")

    return _cached_imageset(key, cache, build)


@register_source("csv")
def _load_csv(path: str, *, cache: bool = True, root: str | None = None, **params: Any) -> ImageSet:
    """``csv:/data/nih/Data_Entry.csv?...`` = ``folder:`` with the CSV's folder (or ``root=``) as ROOT."""
    csv = Path(path).expanduser()
    _check_params(_load_folder, "csv", params)
    if "labels" in params:
        raise DataError("csv: the CSV is the path itself; drop labels=")
    return _load_folder(str(Path(root).expanduser() if root else csv.parent), cache=cache,
                        labels=str(csv.resolve()) if csv.exists() else str(csv), **params)


def _dedupe(df: Any, csv: Path, image_col: str, aggregate: str | None, multiclass: bool) -> Any:
    """Several rows naming one image raise, unless ``aggregate`` is ``first`` (keep it) or ``max`` (merged later)."""
    if aggregate not in (None, "max", "first"):
        raise DataError(f"aggregate must be max or first, got {aggregate!r}")
    if aggregate == "max" and multiclass:
        raise DataError("aggregate=max merges 0/1 labels; with class_col= use aggregate=first")
    duplicated = df[image_col].duplicated(keep=False)
    if not duplicated.any() or aggregate == "max":
        return df
    if aggregate == "first":
        return df[~df[image_col].duplicated(keep="first")]
    rows = (df.index[duplicated][:2] + 2).tolist()
    raise DataError(f"{csv}: rows {rows} name the same image {df.loc[df.index[duplicated][0], image_col]!r}; "
                    f"pass aggregate=max (positive if any row is, 0/1 labels) or aggregate=first")


def _aggregate_max(df: Any, image_col: str, matrix: np.ndarray) -> tuple[np.ndarray, Any]:
    """Merge rows naming the same image: labels by max, other columns from the first row."""
    keys = df[image_col].to_numpy()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    merged = np.zeros((len(first), matrix.shape[1]), dtype=np.float32)
    np.maximum.at(merged, inverse, matrix)
    order = np.argsort(first)
    return merged[order], df.iloc[np.sort(first)]


def _table_labels(df: Any, csv: Path, label_cols: str | None, finding_col: str | None, class_col: str | None,
                  classes: list[str], sep: str, no_finding: str, others: str,
                  u: str | None) -> tuple[np.ndarray, list[str], str]:
    """Labels, label names and task from whichever label key was given."""
    if u is not None and u not in ("zeros", "ones"):
        raise DataError(f"u must be zeros or ones, got {u!r}")
    if label_cols:
        cols = _split_list(label_cols)
        matrix = _labels_onehot(df, csv, cols, u)
        return matrix, cols, "binary" if len(cols) == 1 else "multilabel"
    if finding_col:
        matrix, names = _labels_findings(df, csv, finding_col, classes, sep, no_finding, others)
        return matrix, names, "multilabel"
    assert class_col is not None
    indices, names = _labels_classes(df, csv, class_col, classes)
    return indices, names, "multiclass"


# --------------------------------------------------------------------------- image + mask folders


def _mask_index(folder: Path) -> dict[str, Path]:
    """Image files in a mask folder keyed by stem."""
    if not folder.is_dir():
        raise DataError(f"{folder}: mask folder not found (relative mask folders are resolved against the "
                        f"image folder's parent)")
    return {p.stem: p for p in _list_files(folder, "*", IMAGE_SUFFIXES)}


@register_source("segfolder")
def _load_segfolder(path: str, *, cache: bool = True, masks: str | None = None, mask_names: str | None = None,
                    mask_suffix: str = "", merge: bool = False, missing: str = "error", size: int | None = None,
                    fit: str = "pad", intensity: str = "minmax", patient_regex: str | None = None) -> ImageSet:
    """Images plus one or more binary mask folders matched by stem -> ImageSet with label-map masks."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    folders = [Path(m).expanduser() for m in _split_list(masks)]
    if not folders:
        raise DataError(f"segfolder:{root}: give the mask folder(s), e.g. masks=/data/masks")
    folders = [f if f.is_absolute() else root.parent / f for f in folders]
    if missing not in ("error", "skip"):
        raise DataError(f"missing must be error or skip, got {missing!r}")
    names = _split_list(mask_names) or (["foreground"] if merge else [f.name for f in folders])
    if len(names) != (1 if merge else len(folders)):
        raise DataError(f"segfolder:{root}: {len(names)} mask_names for {1 if merge else len(folders)} mask class(es)")
    indices = [_mask_index(f) for f in folders]
    images, mask_files = [], []
    for image in _list_files(root, "*", IMAGE_SUFFIXES):
        found = [index.get(image.stem + mask_suffix) for index in indices]
        if any(m is None for m in found):
            if missing == "skip":
                continue
            absent = folders[[m is None for m in found].index(True)]
            raise DataError(f"{image}: no mask named {image.stem + mask_suffix}.* in {absent}; "
                            f"fix mask_suffix= or pass missing=skip")
        images.append(image)
        mask_files.append(found)
    if not images:
        raise DataError(f"{root}: no image has all its masks; check masks= and mask_suffix=")
    key = {"scheme": "segfolder", "root": str(root.resolve()), "files": _files_key(images, root),
           "masks": _files_key([m for ms in mask_files for m in ms], root.parent),
           "params": dict(masks=masks, mask_names=names, mask_suffix=mask_suffix, merge=merge, size=size, fit=fit,
                          intensity=intensity)}
    patients, note = _patients_by_regex(images, patient_regex)

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image_file(images[i], intensity=intensity)
        label_map = np.zeros(image.shape, dtype=np.uint8)
        for k, mask_path in enumerate(mask_files[i]):
            mask = read_image_file(mask_path)
            if mask.shape != image.shape:
                raise DataError(f"{mask_path}: mask size {mask.shape} differs from its image {images[i]} "
                                f"{image.shape}; resize the masks to their images first")
            label_map[mask > 0] = 1 if merge else k + 1
        return fit_image(image, size, fit), fit_image(label_map, size, fit, nearest=True)

    def build(alloc: Allocator) -> ImageSet:
        first_image, first_mask = one(0)
        out_images = alloc("images", (len(images), *first_image.shape), np.uint8)
        out_masks = alloc("masks", (len(images), *first_mask.shape), np.uint8)
        for i in range(len(images)):
            image, mask = one(i)
            if image.shape != out_images.shape[1:]:
                raise DataError(f"{images[i]}: size {image.shape} differs from {out_images.shape[1:]}; pass size=S")
            out_images[i], out_masks[i] = image, mask
        return ImageSet(images=out_images, labels=None, label_names=[], task="none", patient_ids=patients,
                        masks=out_masks, mask_names=names,
                        meta={"file": np.array([p.name for p in images]), "patient_id_note": note},
                        name=f"segfolder:{root.name}")

    return _cached_imageset(key, cache, build)


def _patients_by_regex(files: Sequence[Path], patient_regex: str | None) -> tuple[np.ndarray, str]:
    """Patient ids from a regex (one group) searched in each file name, or one per image."""
    if not patient_regex:
        return np.array([p.stem for p in files]), "no patient ids: each image is its own patient"
    pattern = re.compile(patient_regex)
    ids = []
    for path in files:
        match = pattern.search(path.name)
        if not match:
            raise DataError(f"{path}: file name does not match patient_regex={patient_regex!r}")
        ids.append(match.group(1) if match.groups() else match.group(0))
    return np.array(ids), f"from patient_regex {patient_regex!r}"


# --------------------------------------------------------------------------- RadImageNet


def _subfolder(parent: Path, name: str, what: str) -> Path:
    """The child folder of ``parent`` named ``name`` (case-insensitive), or an error listing the choices."""
    children = {p.name.lower(): p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if name.lower() not in children:
        raise DataError(f"{parent}: no {what} folder {name!r}; available: {sorted(p.name for p in children.values())}")
    return children[name.lower()]


@register_source("radimagenet")
def _load_radimagenet(path: str, *, cache: bool = True, modality: str | None = None, anatomy: str | None = None,
                      positive: str | None = None, size: int | None = None, fit: str = "pad",
                      workers: int = 1, progress: bool = False) -> ImageSet:
    """RadImageNet layout ROOT/modality/anatomy/label/images -> multi-class (or binary with ``positive``)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: RadImageNet folder not found")
    if anatomy and not modality:
        raise DataError("radimagenet: anatomy= needs modality= too")
    base = root if not modality else _subfolder(root, str(modality), "modality")
    base = base if not anatomy else _subfolder(base, str(anatomy), "anatomy")
    depth = 3 - bool(modality) - bool(anatomy)
    files = _list_files(base, "/".join(["*"] * (depth + 1)), IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{base}: no images at depth {depth + 1} (expected modality/anatomy/label/image files)")
    class_of = ["/".join(f.relative_to(base).parts[:depth]) for f in files]
    names = sorted(set(class_of))
    if positive is not None:
        if positive not in names:
            raise DataError(f"radimagenet: positive={positive!r} is not a label folder; labels: {names}")
        labels = np.array([[c == positive] for c in class_of], dtype=np.float32)
        label_names, task = [positive], "binary"
    else:
        labels = np.array([names.index(c) for c in class_of], dtype=np.int64)
        label_names, task = names, "multiclass"
    reader = _ImageReader(size, fit)
    rel = [str(f.relative_to(root)) for f in files]
    key = {"scheme": "radimagenet", "root": str(root.resolve()), "files": _files_key(files, root),
           "params": dict(modality=modality, anatomy=anatomy, positive=positive, size=size, fit=fit)}

    def build(alloc: Allocator) -> ImageSet:
        images = _read_images(files, reader, alloc, workers, progress, base.name)
        return ImageSet(images=images, labels=labels, label_names=label_names, task=task,
                        patient_ids=np.array([Path(r).stem for r in rel]),
                        meta={"file": np.array(rel),
                              "patient_id_note": "RadImageNet file names carry no patient ids: one per image"},
                        name=f"radimagenet:{base.relative_to(root) if base != root else root.name}")

    return _cached_imageset(key, cache, build)


__all__ = [
    "DataError", "NAMED_WINDOWS", "MEDMNIST_TASKS", "fit_image", "load_source", "medmnist_file", "parse_spec",
    "read_dicom", "read_image_file", "register_source", "registered_schemes", "select_split", "to_uint8",
]


# --------------------------------------------------------------------------- checking a spec without loading it

#: Schemes whose path is a file or folder on disk (the others name a built-in family or a MedMNIST flag).
#: Schemes that generate their images (stand-ins, never real data).
GENERATED_SCHEMES = ("phantom", "natural")


def check_spec(spec: str) -> list[str]:
    """Problems that would stop ``load_source(spec)``, found without reading any image (empty list: none found).

    Checks the syntax, the scheme, the loader's parameters and that every file or folder the spec
    names (path, ``labels=`` CSV, ``masks=`` folders, the MedMNIST ``.npz``) exists.
    """
    try:
        scheme, path, params = parse_spec(spec)
    except DataError as err:
        return [str(err)]
    if scheme not in _REGISTRY:
        close = difflib.get_close_matches(scheme, registered_schemes(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"{spec!r}: unknown scheme {scheme!r}{hint}; registered schemes: {', '.join(registered_schemes())}"]
    try:
        _check_params(_REGISTRY[scheme], scheme, params)
    except DataError as err:
        return [f"{spec!r}: {err}"]
    problems: list[str] = []
    if scheme == "medmnist":
        try:
            npz = medmnist_file(path, int(params.get("size", 28)), params.get("root"))
        except DataError as err:
            return [f"{spec!r}: {err}"]
        if not npz.is_file():
            problems.append(f"{spec!r}: MedMNIST+ file {npz} not found (download it with the medmnist package or "
                            "from https://zenodo.org/records/10519652 and pass root= or set medmnist_root)")
    elif scheme in PATH_SCHEMES:
        target = Path(path).expanduser()
        if not target.exists():
            problems.append(f"{spec!r}: {target} does not exist")
        base = target if target.is_dir() else target.parent
        labels = params.get("labels")
        if labels and scheme == "folder" and not _relative_to(base, str(labels)).is_file():
            problems.append(f"{spec!r}: label CSV {_relative_to(base, str(labels))} not found")
        if scheme == "segfolder":
            for folder in _split_list(params.get("masks") or ""):
                mask_dir = _relative_to(target.parent, folder)
                if not mask_dir.is_dir():
                    problems.append(f"{spec!r}: mask folder {mask_dir} not found")
    return problems


def _relative_to(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path

"""Run settings: what a data file (TOML) and command-line overrides say, parsed, and applied to a profile.

The lowest layer of :mod:`medlib.datafile`, which validates the settings against the data, the weights
and the notebooks. :func:`medlib.config.get_profile` applies the settings in force (``$MEDLIB_DATA_FILE``,
``$MEDLIB_OVERRIDES``) through :func:`apply_settings`; :func:`override` changes a profile's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import unquote

#: Source schemes whose path part is a file or folder (relative paths resolve against the data root).
PATH_SCHEMES = ("dicom", "folder", "csv", "segfolder", "radimagenet")


def override(profile: Any, **changes) -> Any:
    """Return a copy of ``profile`` with nested fields changed, e.g. ``override(p, **{"ssl.steps": 10})``."""
    sections: dict[str, dict] = {}
    top: dict = {}
    for key, value in changes.items():
        if "." in key:
            section, attr = key.split(".", 1)
            if not hasattr(profile, section):
                raise ValueError(f"Profile has no section {section!r}")
            if not hasattr(getattr(profile, section), attr):
                raise ValueError(f"Profile section {section!r} has no field {attr!r}")
            sections.setdefault(section, {})[attr] = value
        else:
            if not hasattr(profile, key):
                raise ValueError(f"Profile has no field {key!r}")
            top[key] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(profile, section), **values)
    return dataclasses.replace(profile, **top)


def absolute_spec(spec: str, root: str | Path) -> str:
    """``spec`` with a relative path (of the path schemes) or a missing MedMNIST ``root=`` resolved against ``root``."""
    scheme, sep, rest = spec.partition(":")
    if not sep:
        return spec
    path, q, query = rest.partition("?")
    name = scheme.strip().lower()
    if name in PATH_SCHEMES and path.strip() and not Path(unquote(path.strip())).expanduser().is_absolute():
        return f"{scheme}:{(Path(root).expanduser() / unquote(path.strip())).as_posix()}{q}{query}"
    return spec


def medmnist_with_root(spec: str, root: str | Path) -> str:
    """A ``medmnist:`` spec with ``root=`` added when it has none (other specs unchanged)."""
    scheme, sep, rest = spec.partition(":")
    if scheme.strip().lower() != "medmnist" or "root=" in rest:
        return spec
    return f"{spec}{'&' if '?' in rest else '?'}root={Path(root).expanduser().as_posix()}"


DATA_FILE_ENV = "MEDLIB_DATA_FILE"
OVERRIDES_ENV = "MEDLIB_OVERRIDES"
NOTEBOOK_ENV = "MEDLIB_NOTEBOOK"
DATA_ROOT_ENV = "MEDLIB_DATA"
NOTEBOOKS = ("00", "01", "02", "03", "04")
TOP_LEVEL_KEYS = ("profile", "root", "medmnist_root", "weights_dir", "allow_download", "allow_phantom", "sources",
                  "overrides")


class DataFileError(ValueError):
    """The data file, the overrides or the files they name are not usable; the message lists every problem."""

    def __init__(self, problems: Sequence[str], header: str = "The run cannot start") -> None:
        self.problems = list(problems)
        super().__init__(f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class DataKey:
    """One data set a notebook reads: its key in ``data.sources``, what it stands for and a source recipe."""

    key: str
    notebooks: tuple[str, ...]
    stands_for: str
    needs: str
    recipe: str


#: Every data key a notebook reads (notebook 02 only those of ``eval.init_sites``; 03 the ``ssl_*`` ones only
#: when the continued backbones' weights are missing; 04 the keys named by ``diffusion.source_key``, the LDM's
#: images and the augmentation study's labels, and ``diffusion.seg_source_key``, the masked chest set of the
#: mask-transfer study and the attention maps).
DATA_KEYS: Mapping[str, DataKey] = {k.key: k for k in (
    DataKey("cxr_multilabel", ("01", "04"), "NIH ChestX-ray14 / CheXpert (study 1 classification); the unlabelled "
            "MIMIC-CXR / CheXpert images of DiNO-Diffusion and its augmentation study's labels (study 4, "
            "diffusion.source_key)", "multi-label chest X-ray",
            "medmnist:chestmnist?size=224"),
    DataKey("organ_ct", ("01",), "abdominal CT organ classification (OrganAMNIST, from BTCV / AMOS-like CT)",
            "multi-class CT slices", "medmnist:organamnist?size=224"),
    DataKey("knee_mri", ("01",), "knee MRI, ACL tear (MRNet-like; RadImageNet knee MR)", "binary knee MRI",
            "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=acl_pathology&size=224"),
    DataKey("breast_us", ("01", "03"), "breast ultrasound, benign vs malignant (BreastMNIST / BUSI; RadImageNet "
            "breast US in study 3)", "binary ultrasound", "medmnist:breastmnist?size=224"),
    DataKey("cxr_segmentation", ("01", "04"), "chest X-ray lung (and heart) masks: Montgomery, JSRT (SCR masks), "
            "Shenzhen (study 1 segmentation; study 4's mask transfer and attention maps, diffusion.seg_source_key)",
            "images + lung masks", "segfolder:MontgomerySet/CXR_png?masks=ManualMask/leftMask,ManualMask/rightMask"
            "&mask_names=left_lung,right_lung&size=224"),
    DataKey("ct_segmentation", ("01",), "abdominal CT organ masks (AMOS, BTCV or another CT organ set, as 2-D slices)",
            "images + masks", "segfolder:amos_slices/images?masks=labels&size=224"),
    DataKey("vindr_cxr", ("02",), "VinDr-CXR (study 2)", "multi-label chest X-ray",
            "folder:vindr?labels=annotations/image_labels_train.csv&image_col=image_id&ext=.dicom&image_dir=train"
            "&label_cols=Atelectasis,Cardiomegaly,Pleural effusion,Pneumothorax&aggregate=max&size=224"),
    DataKey("mimic_cxr", ("02",), "MIMIC-CXR-JPG (study 2)", "multi-label chest X-ray",
            "folder:mimic?labels=merged.csv&image_col=path&patient_col=subject_id&u=zeros"
            "&label_cols=Cardiomegaly,Edema,Consolidation,Atelectasis,Pleural Effusion&size=224"),
    DataKey("padchest", ("02",), "PadChest (study 2)", "multi-label chest X-ray",
            "folder:padchest?labels=PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv&image_col=ImageID"
            "&image_dir=*&finding_col=Labels&no_finding=normal&others=ignore"
            "&classes=cardiomegaly,pleural effusion,atelectasis,pneumonia,nodule&patient_col=PatientID&size=224"),
    DataKey("chestxray14", ("02",), "NIH ChestX-ray14 (study 2)", "multi-label chest X-ray",
            "folder:nih?labels=Data_Entry_2017.csv&image_col=Image Index&finding_col=Finding Labels"
            "&no_finding=No Finding&patient_col=Patient ID&image_dir=images*/images&size=224"),
    DataKey("chexpert", ("02",), "CheXpert (study 2)", "multi-label chest X-ray",
            "folder:.?labels=CheXpert-v1.0/train.csv&image_col=Path&u=ones"
            "&label_cols=Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"
            "&where=Frontal/Lateral==Frontal&patient_regex=(patient\\d+)&size=224"),
    DataKey("thyroid_us", ("03",), "RadImageNet thyroid ultrasound (study 3)", "binary ultrasound",
            "radimagenet:radimagenet?modality=US&anatomy=thyroid&positive=thyroid_nodule&size=224"),
    DataKey("acl_mri", ("03",), "RadImageNet knee MRI, ACL tear (study 3)", "binary knee MRI",
            "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=acl_pathology&size=224"),
    DataKey("meniscus_mri", ("03",), "RadImageNet knee MRI, meniscal tear (study 3)", "binary knee MRI",
            "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=meniscal_tear&size=224"),
    DataKey("ssl_us_images", ("03",), "RadImageNet ultrasound images the DINOv2 continuation trains on (labels "
            "unused); needed only when the continued ultrasound ViT's weights are missing", "any images",
            "radimagenet:radimagenet?modality=US&anatomy=thyroid&size=224"),
    DataKey("ssl_knee_images", ("03",), "RadImageNet knee MR images the DINOv2 continuation trains on (labels "
            "unused); needed only when the continued knee ViT's weights are missing", "any images",
            "radimagenet:radimagenet?modality=MR&anatomy=knee&size=224"),
)}
#: Study 2: chest phantom site -> the data key that replaces it (medlib.studies.imagenet_vs_ssl_init.INIT_SITES).
INIT_SITE_KEYS: Mapping[int, str] = {0: "vindr_cxr", 1: "mimic_cxr", 2: "padchest", 3: "chestxray14", 4: "chexpert"}
#: Study 3: domain -> the data key of its continuation images (medlib.studies.radimagenet_ssl_continuation).
SSL_DOMAIN_KEYS: Mapping[str, str] = {"us": "ssl_us_images", "knee": "ssl_knee_images"}


@dataclass(frozen=True)
class RunSettings:
    """What a data file and the command-line overrides say, parsed (paths absolute)."""

    data_file: Path | None = None
    profile: str | None = None
    root: Path | None = None
    medmnist_root: Path | None = None
    weights_dir: Path | None = None
    allow_download: bool = False
    allow_phantom: tuple[str, ...] | bool = ()
    sources: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # file overrides, then command-line ones
    problems: tuple[str, ...] = ()  # found while parsing; reported by validate()

    @property
    def active(self) -> bool:
        """Whether a data file or an override is in force."""
        return self.data_file is not None or bool(self.overrides)

    def phantom_allowed(self, key: str) -> bool:
        """Whether data key ``key`` may fall back to a phantom stand-in in ``paper``."""
        return self.allow_phantom is True or (isinstance(self.allow_phantom, tuple) and key in self.allow_phantom)


# --------------------------------------------------------------------------- overrides


def _close(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def profile_fields(profile: Any) -> dict[str, Any]:
    """Every overridable field of a profile as ``section.field`` (or top-level name) -> current value."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(profile):
        value = getattr(profile, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        elif f.name != "name":
            out[f.name] = value
    return out


def parse_overrides(items: str | Sequence[str] | None) -> dict[str, str]:
    """``"a.b=1 c.d=x,y"`` (shell-quoted) or a list of ``key=value`` -> {key: raw text}; ValueError on a bad item."""
    if not items:
        return {}
    tokens = shlex.split(items) if isinstance(items, str) else [t for item in items for t in shlex.split(item)]
    out: dict[str, str] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq or not key.strip():
            raise DataFileError([f"override {token!r} must read section.field=value, e.g. eval.finetune_epochs=1"],
                                "Bad override")
        out[key.strip()] = value.strip()
    return out


def _parse_text(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce_value(key: str, value: Any, current: Any) -> Any:
    """``value`` (raw text from the command line, or a TOML value) as the type of the field's ``current`` value."""
    raw = value
    if isinstance(value, str) and not isinstance(current, str):
        value = _parse_text(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        kinds = {type(v) for v in current}
        if kinds <= {int, float} and kinds:
            value = [_parse_text(v) if isinstance(v, str) else v for v in value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{key}={raw!r}: expected numbers, e.g. {','.join(map(str, current))}")
            value = [float(v) if float in kinds else v for v in value]
        return tuple(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key}={raw!r}: expected true or false")
        return value
    if isinstance(current, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key}={raw!r}: expected an integer (now {current})")
        return value
    if isinstance(current, float) or (current is None and isinstance(value, (int, float))):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={raw!r}: expected a number (now {current})")
        return float(value)
    if isinstance(current, str):
        return str(raw) if not isinstance(raw, str) else raw
    if isinstance(current, dict):
        raise ValueError(f"{key}: a mapping cannot be overridden; use the data file's [sources] table")
    return value


def check_overrides(profile: Any, overrides: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Overrides validated against the profile's fields: (coerced values, problems with close matches)."""
    fields = profile_fields(profile)
    good: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in overrides.items():
        if key == "data.sources":
            problems.append("override data.sources: put data sets in the data file's [sources] table")
        elif key not in fields:
            problems.append(f"override {key!r}: profile {profile.name!r} has no such field{_close(key, fields)}")
        else:
            try:
                good[key] = coerce_value(key, value, fields[key])
            except ValueError as err:
                problems.append(f"override {err}")
    return good, problems


# --------------------------------------------------------------------------- the data file


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def read_data_file(path: str | Path, cli_overrides: Mapping[str, Any] | None = None) -> RunSettings:
    """Parse a data file (problems are collected in ``.problems``, a TOML syntax error raises at once)."""

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DataFileError([f"data file {path} does not exist (copy data.example.toml and fill it in)"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise DataFileError([f"{path}: not valid TOML: {err}"]) from err
    problems = [f"{path.name}: unknown key {k!r}{_close(k, TOP_LEVEL_KEYS)}; the file takes "
                f"{', '.join(TOP_LEVEL_KEYS)}" for k in raw if k not in TOP_LEVEL_KEYS]

    def folder(key: str) -> Path | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            problems.append(f"{path.name}: {key} must be a path string, got {value!r}")
            return None
        p = Path(value).expanduser()
        return (p if p.is_absolute() else path.parent / p).resolve()

    root = Path(os.environ[DATA_ROOT_ENV]).expanduser().resolve() if os.environ.get(DATA_ROOT_ENV) else folder("root")
    root = root or path.parent
    medmnist_root = folder("medmnist_root")
    sources_raw = raw.get("sources", {})
    if not isinstance(sources_raw, dict):
        problems.append(f"{path.name}: [sources] must be a table of key = \"source string\"")
        sources_raw = {}
    sources: dict[str, str] = {}
    for key, spec in sources_raw.items():
        if key not in DATA_KEYS:
            problems.append(f"{path.name}: [sources] key {key!r} is read by no notebook{_close(key, DATA_KEYS)}; "
                            f"keys: {', '.join(DATA_KEYS)}")
            continue
        if not isinstance(spec, str) or not spec.strip():
            problems.append(f"{path.name}: [sources] {key} must be a non-empty source string, got {spec!r}")
            continue
        spec = absolute_spec(spec.strip(), root)
        sources[key] = medmnist_with_root(spec, medmnist_root) if medmnist_root else spec
    allow = raw.get("allow_phantom", ())
    if allow is True:
        allowed: tuple[str, ...] | bool = True
    elif allow is False:
        allowed = ()
    elif isinstance(allow, (list, tuple)) and all(isinstance(a, str) for a in allow):
        allowed = tuple(allow)
        problems += [f"{path.name}: allow_phantom names {a!r}, which no notebook reads{_close(a, DATA_KEYS)}"
                     for a in allowed if a not in DATA_KEYS]
    else:
        problems.append(f"{path.name}: allow_phantom must be a list of data keys or true, got {allow!r}")
        allowed = ()
    download = raw.get("allow_download", False)
    if not isinstance(download, bool):
        problems.append(f"{path.name}: allow_download must be true or false, got {download!r}")
        download = False
    profile = raw.get("profile")
    if profile is not None and not isinstance(profile, str):
        problems.append(f"{path.name}: profile must be a profile name, got {profile!r}")
        profile = None
    file_overrides = raw.get("overrides", {})
    if not isinstance(file_overrides, dict):
        problems.append(f"{path.name}: [overrides] must be a table of \"section.field\" = value")
        file_overrides = {}
    return RunSettings(data_file=path, profile=profile, root=root, medmnist_root=medmnist_root,
                       weights_dir=folder("weights_dir"), allow_download=download, allow_phantom=allowed,
                       sources=sources, overrides={**_flatten(file_overrides), **dict(cli_overrides or {})},
                       problems=tuple(problems))


_CACHE: dict[tuple, RunSettings] = {}


def active_settings() -> RunSettings:
    """The settings in force: ``$MEDLIB_DATA_FILE`` and ``$MEDLIB_OVERRIDES`` (empty settings when neither is set)."""
    path = os.environ.get(DATA_FILE_ENV) or None
    text = os.environ.get(OVERRIDES_ENV) or ""
    stamp = None
    if path:
        try:
            stamp = Path(path).expanduser().stat().st_mtime_ns
        except OSError:
            stamp = None
    key = (path, stamp, text, os.environ.get(DATA_ROOT_ENV))
    if key not in _CACHE:
        overrides = parse_overrides(text)
        _CACHE.clear()
        _CACHE[key] = read_data_file(path, overrides) if path else RunSettings(overrides=overrides)
    return _CACHE[key]


def settings_env(data_file: str | Path | None, overrides: Sequence[str] | None) -> dict[str, str]:
    """The environment variables that carry a data file and overrides into the notebook kernels."""
    env: dict[str, str] = {}
    if data_file:
        env[DATA_FILE_ENV] = str(Path(data_file).expanduser().resolve())
    if overrides:
        env[OVERRIDES_ENV] = " ".join(shlex.quote(o) for item in overrides for o in shlex.split(item))
    return env


def apply_settings(profile: Any, settings: RunSettings | None = None) -> Any:
    """``profile`` with the data file's sources and the valid overrides applied (invalid ones are left to validate)."""
    settings = active_settings() if settings is None else settings
    if not settings.active:
        return profile
    if settings.sources:
        profile = dataclasses.replace(profile, data=dataclasses.replace(
            profile.data, sources={**profile.data.sources, **settings.sources}))
    good, _ = check_overrides(profile, settings.overrides)
    return override(profile, **good) if good else profile

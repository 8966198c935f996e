"""The data file: one human-edited TOML file that points a profile at your data and weights, and resizes a run.

``make reproduce PROFILE=paper DATA=my_data.toml OVERRIDES="eval.finetune_epochs=1"`` (or
``python -m medlib.reproduce --profile paper --data my_data.toml --override eval.finetune_epochs=1``)
reads it; ``data.example.toml`` at the repository root is the commented template. Layout::

    profile = "paper"              # optional: the profile the file is written for
    root = "/data"                 # relative source paths are under it ($MEDLIB_DATA overrides it)
    medmnist_root = "/data/medmnist"  # root= of medmnist: sources that name none
    weights_dir = "/data/weights"  # weight files under our names or the original release names
    allow_download = false         # true: fetch missing hub weights with huggingface_hub into its cache
    allow_phantom = []             # data keys that may fall back to a phantom stand-in (paper), or true

    [sources]                      # data key -> source string (medlib.data.sources)
    chestxray14 = "folder:nih?labels=Data_Entry_2017.csv&..."

    [overrides]                    # profile fields, validated against the profile
    "eval.finetune_epochs" = 1     # or [overrides.eval] finetune_epochs = 1

The file and the overrides reach every notebook kernel through ``$MEDLIB_DATA_FILE`` and
``$MEDLIB_OVERRIDES``, which :func:`medlib.config.get_profile` applies; every provenance record
names them (:func:`provenance_fields`). :func:`validate` checks everything before any compute
and reports every problem at once.
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
    from .data.sources import absolute_spec, medmnist_with_root

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
    from .config import override

    settings = active_settings() if settings is None else settings
    if not settings.active:
        return profile
    if settings.sources:
        profile = dataclasses.replace(profile, data=dataclasses.replace(
            profile.data, sources={**profile.data.sources, **settings.sources}))
    good, _ = check_overrides(profile, settings.overrides)
    return override(profile, **good) if good else profile


# --------------------------------------------------------------------------- what each notebook reads


def notebook_number(notebook: str | None) -> str | None:
    """``"01_dinov2_radiology_benchmark"`` / ``"01"`` -> ``"01"``; None stays None."""
    return None if not notebook else str(notebook)[:2]


def _continued_weights_found(profile: Any, domain: str) -> bool:
    from .models.backbones import locate_weights

    family = {"us": "ssl-us", "knee": "ssl-knee"}[domain]
    try:
        return locate_weights(f"{family}-{profile.eval.cv_continued_suffix}")[0] is not None
    except ValueError:
        return False


def notebook_keys(profile: Any, notebook: str) -> list[str]:
    """The data keys notebook ``notebook`` ("00" ... "04") reads under ``profile``."""
    number = notebook_number(notebook)
    if number == "01":
        return [k for k, v in DATA_KEYS.items() if "01" in v.notebooks]
    if number == "02":
        return [INIT_SITE_KEYS[s] for s in profile.eval.init_sites if s in INIT_SITE_KEYS]
    if number == "03":
        keys = ["thyroid_us", "breast_us", "acl_mri", "meniscus_mri"]
        return keys + [SSL_DOMAIN_KEYS[d] for d in SSL_DOMAIN_KEYS if not _continued_weights_found(profile, d)]
    if number == "04":
        keys = [profile.diffusion.source_key, profile.diffusion.seg_source_key]
        return [k for i, k in enumerate(keys) if k and k not in keys[:i]]
    return []


def notebook_models(profile: Any, notebook: str) -> list[str]:
    """The backbone names (and the diffusers VAE) notebook ``notebook`` loads under ``profile``."""
    number = notebook_number(notebook)
    if number == "01":
        return list(profile.backbone.compare)
    if number == "02":
        return list(profile.eval.init_arms)
    if number == "03":
        names = [profile.eval.cv_imagenet_cnn, profile.eval.cv_ssl_vit]
        return names + ([profile.eval.cv_medical_cnn] if profile.eval.cv_medical_cnn else [])
    if number == "04":
        from .diffusion.metrics import fd_backbone_name

        names = [profile.diffusion.encoder, profile.diffusion.aug_classifier, fd_backbone_name(profile)]
        return names + ([f"vae:{profile.diffusion.pretrained_vae}"] if profile.diffusion.pretrained_vae else [])
    return []


def phantom_stand_ins(profile: Any, notebooks: Iterable[str] = NOTEBOOKS) -> list[str]:
    """Data keys the notebooks read that have no source (so a phantom stands in), in order."""
    out: list[str] = []
    for nb in notebooks:
        for key in notebook_keys(profile, nb):
            if key not in profile.data.sources and key not in out:
                out.append(key)
    return out


def validate(profile: Any, notebooks: Iterable[str] | None = None, settings: RunSettings | None = None,
             check_weights: bool = True) -> None:
    """Check the data file, overrides, sources, files and weights of a run before any compute; raise one report.

    In ``paper`` a data key that a notebook reads and no source names is an error unless the data
    file's ``allow_phantom`` lists it; a ``phantom:`` / ``natural:`` source is one too. Other
    profiles fall back to phantoms by design, so only the named sources are checked there.
    """
    from .config import get_profile
    from .data.sources import GENERATED_SCHEMES, check_spec

    settings = active_settings() if settings is None else settings
    base = get_profile(profile)
    notebooks = [notebook_number(n) for n in (notebooks or NOTEBOOKS)]
    problems = list(settings.problems)
    if settings.profile and settings.profile != base.name:
        problems.append(f"{settings.data_file}: written for profile {settings.profile!r}, run with {base.name!r}")
    _, bad = check_overrides(base, settings.overrides)
    problems += bad
    p = base
    paper = p.name == "paper"
    seen: set[str] = set()
    for nb in notebooks:
        for key in notebook_keys(p, nb):
            if key in seen:
                continue
            seen.add(key)
            spec = p.data.sources.get(key)
            what = DATA_KEYS[key].stands_for if key in DATA_KEYS else key
            if spec is None:
                if paper and not settings.phantom_allowed(key):
                    problems.append(f"notebook {nb}: data key {key!r} ({what}) has no source; add it to [sources] "
                                    f"(e.g. {key} = \"{DATA_KEYS[key].recipe if key in DATA_KEYS else '...'}\") or "
                                    f"list it in allow_phantom to run a phantom stand-in, labelled as such")
                continue
            if paper and spec.split(":", 1)[0].strip().lower() in GENERATED_SCHEMES and not settings.phantom_allowed(key):
                problems.append(f"notebook {nb}: data key {key!r} is a generated stand-in ({spec!r}); name your real "
                                "data set or list the key in allow_phantom")
                continue
            problems += [f"notebook {nb}: data key {key!r}: {msg}" for msg in check_spec(spec)]
    weights_dir = settings.weights_dir or (Path(os.environ["MEDLIB_WEIGHTS_DIR"]).expanduser()
                                           if os.environ.get("MEDLIB_WEIGHTS_DIR") else None)
    if weights_dir is not None and not weights_dir.is_dir():
        problems.append(f"weights folder {weights_dir} does not exist (weights_dir / $MEDLIB_WEIGHTS_DIR)")
    if paper and "03" in notebooks and not p.eval.cv_medical_cnn:
        problems.append("notebook 03: eval.cv_medical_cnn is empty, which builds the medical CNN stand-in on phantoms; "
                        "name the RadImageNet ResNet-50 (radimagenet-resnet50) or another medical backbone")
    if check_weights and paper:
        from .models.backbones import locate_vae, locate_weights

        checked: set[str] = set()
        for nb in notebooks:
            for name in notebook_models(p, nb):
                if name in checked:
                    continue
                checked.add(name)
                try:
                    found, looked = locate_vae(name[4:]) if name.startswith("vae:") else locate_weights(name)
                except ValueError as err:
                    problems.append(f"notebook {nb}: {err}")
                    continue
                if found is None and looked:
                    problems.append(f"notebook {nb}: weights of {name!r} not found; looked at: " + "; ".join(looked))
    if problems:
        where = f" (data file {settings.data_file})" if settings.data_file else ""
        raise DataFileError(problems, f"Profile {p.name!r}{where}: the run cannot start")


def provenance_fields(profile_name: str | None = None) -> dict[str, Any]:
    """What provenance records add about the data file, the overrides and the sources in force ({} when none)."""
    settings = active_settings()
    if not settings.active and profile_name != "paper":
        return {}
    out: dict[str, Any] = {"overrides": {k: str(v) for k, v in settings.overrides.items()}}
    if settings.data_file is not None:
        out["data_file"] = str(settings.data_file)
        try:
            out["data_file_sha256"] = hashlib.sha256(settings.data_file.read_bytes()).hexdigest()
        except OSError:
            out["data_file_sha256"] = None
    if profile_name:
        from .config import get_profile

        p = get_profile(profile_name)
        out["data_sources"] = dict(p.data.sources)
        out["phantom_stand_ins"] = phantom_stand_ins(p) if p.name == "paper" else []
    return out


def sources_markdown(profile: Any) -> list[str]:
    """Markdown lines naming, per data key the notebooks read, its source or that a phantom stood in."""
    lines = ["| data key | notebooks | stands for | source |", "|---|---|---|---|"]
    for key, info in DATA_KEYS.items():
        readers = [nb for nb in NOTEBOOKS if key in notebook_keys(profile, nb)]
        if not readers:
            continue
        spec = profile.data.sources.get(key)
        shown = f"`{spec}`" if spec else "**PHANTOM STAND-IN** (no source given; allowed by the data file)"
        lines.append(f"| `{key}` | {', '.join(readers)} | {info.stands_for} | {shown} |")
    return lines

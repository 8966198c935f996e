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
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .settings import (  # noqa: F401  (re-exported: the data file's parsing lives in medlib.settings)
    DATA_FILE_ENV,
    DATA_KEYS,
    DATA_ROOT_ENV,
    DataFileError,
    DataKey,
    INIT_SITE_KEYS,
    NOTEBOOKS,
    NOTEBOOK_ENV,
    OVERRIDES_ENV,
    RunSettings,
    SSL_DOMAIN_KEYS,
    TOP_LEVEL_KEYS,
    _CACHE,
    _close,
    _flatten,
    _parse_text,
    active_settings,
    apply_settings,
    check_overrides,
    coerce_value,
    parse_overrides,
    profile_fields,
    read_data_file,
    settings_env,
    override,
)

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
    """The data sources (and, in ``paper``, the phantom stand-ins) of a profile run with a data file, overrides or
    in ``paper`` ({} otherwise); :func:`medlib.cache.settings_fields` records the data file and overrides."""
    if not profile_name or (not active_settings().active and profile_name != "paper"):
        return {}
    from .config import get_profile

    p = get_profile(profile_name)
    return {"data_sources": dict(p.data.sources),
            "phantom_stand_ins": phantom_stand_ins(p) if p.name == "paper" else []}


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

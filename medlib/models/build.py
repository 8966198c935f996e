"""Build the embedded backbones with the project's own recipes, write fp16 safetensors + model cards.

`python -m medlib.models build NAME|all --profile tiny` (or `make backbones`). The `tiny` weights
are committed under ``medlib/models/embedded/``; other profiles write to the cache. Every card
records the recipe and its hash; when the recipe code changes, the committed weights are flagged
stale (``tests/test_embedded_backbones.py``) instead of being used silently.

Families (names say what the weights are; nothing here is DINOv2):
- ``ssl-natural``: the DINOv2 recipe from scratch on the natural-image stand-in (stand-in for the
  public DINOv2 weights).
- ``sup-natural``: supervised on the labelled natural stand-in (stand-in for ImageNet-21k).
- ``sup-cxr``: supervised multi-label on chest phantoms of site 5, a site no study tests on
  (stand-in for MIMIC-CXR supervised pre-training).
- ``ssl-us`` / ``ssl-knee``: the recipe continued from ``ssl-natural`` on ultrasound / knee MRI
  phantoms with a fresh head (the continuation of Lange & Shekel 2024).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import git_commit, stable_hash
from ..config import Profile, cache_dir, get_profile, override, resolve_device, seeded_torch_rng
from .health import (HEALTH_DRAWS, HEALTH_MARGIN, domain_tasks, draw_gains_text, extract_cls,  # noqa: F401
                     gains_text, health_check)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
COMMITTED_SUFFIXES = ("vit-tiny",)  # the profile whose weights are committed


@dataclass(frozen=True)
class Recipe:
    """How one family of embedded backbones is built."""

    family: str
    kind: str  # "ssl" or "supervised"
    data: tuple[str, ...]  # "natural", "natural_labelled" or phantom families ("cxr:5" = cxr of site 5)
    init: str | None  # family to continue from (SSL continuation) or None (from scratch)
    stands_in_for: str
    steps_fraction: float = 1.0  # share of the profile's SSL steps (continuations are shorter)


RECIPES: dict[str, Recipe] = {r.family: r for r in (
    Recipe("ssl-natural", "ssl", ("natural",), None, "public DINOv2 weights (SSL on natural images)"),
    Recipe("sup-natural", "supervised", ("natural_labelled",), None, "ImageNet-21k supervised weights"),
    Recipe("sup-cxr", "supervised", ("cxr:5",), None, "MIMIC-CXR supervised weights (medical, supervised)"),
    Recipe("ssl-us", "ssl", ("breast_us", "thyroid_us"), "ssl-natural",
           "DINOv2 continued on RadImageNet ultrasound (seed 001)", steps_fraction=0.34),
    Recipe("ssl-knee", "ssl", ("knee",), "ssl-natural", "DINOv2 continued on RadImageNet knee MRI (seed 001)",
           steps_fraction=0.34),
)}
BUILD_ORDER = ("ssl-natural", "sup-natural", "sup-cxr", "ssl-us", "ssl-knee")
# the code that shapes the weights, per kind of recipe: whole files, plus the recipe functions of this
# module (not the card writing, CLI or health check, which do not change the weights). An SSL change
# leaves the supervised weights fresh and vice versa.
RECIPE_SOURCES = {"ssl": ("ssl/dino.py", "ssl/train.py"),
                  "supervised": ("eval/finetune.py", "data/transforms.py", "data/splits.py", "models/heads.py")}
RECIPE_FUNCTIONS = {"ssl": ("load_data", "_build_ssl"), "supervised": ("load_data", "_build_supervised")}


def split_name(name: str) -> tuple[str, str]:
    """``"ssl-natural-vit-tiny"`` -> (``"ssl-natural"``, ``"vit-tiny"``); raises on unknown families."""
    for family in RECIPES:
        if name.startswith(family + "-"):
            return family, name[len(family) + 1:]
    raise ValueError(f"{name!r} is not an embedded backbone name; families: {', '.join(RECIPES)} + '-<arch>'")


#: Where each recipe component's code lives now. The keys are frozen names that enter the recipe hash (they
#: are the files' paths when the weights were first built); when code moves, change the module here, never the
#: key: the hash covers what the code does, not where it lives, so a move leaves committed weights fresh.
RECIPE_MODULES = {
    "ssl/dino.py": "medlib.ssl.dino", "ssl/train.py": "medlib.ssl.train",
    "eval/finetune.py": "medlib.eval.finetune", "data/transforms.py": "medlib.data.transforms",
    "data/splits.py": "medlib.data.splits", "models/heads.py": "medlib.models.heads",
    "models/build.py": "medlib.models.build",
    "diffusion/train.py": "medlib.diffusion.train", "diffusion/vae.py": "medlib.diffusion.vae",
    "diffusion/pipeline.py": "medlib.diffusion.pipeline", "diffusion/build.py": "medlib.diffusion.build",
}


def _normalised_source(component: str, functions: tuple[str, ...] | None = None) -> str:
    """AST of a recipe component's module (or of some of its top-level functions) without docstrings."""
    if component not in RECIPE_MODULES:
        raise KeyError(f"{component!r} is not a recipe component; known: {', '.join(RECIPE_MODULES)}")
    spec = importlib.util.find_spec(RECIPE_MODULES[component])
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"recipe component {component!r}: module {RECIPE_MODULES[component]!r} not found")
    tree = ast.parse(Path(spec.origin).read_text())
    if functions is not None:
        tree = ast.Module(body=[n for n in tree.body if getattr(n, "name", None) in functions], type_ignores=[])
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def recipe_hash(name: str, profile: str | Profile) -> str:
    """Hash of everything that shapes the weights: recipe, profile sections, arch and the recipe code."""
    family, suffix = split_name(name)
    p = get_profile(profile)
    from ..data import natural, phantoms
    from .backbones import EMBEDDED_ARCHS

    kind = RECIPES[family].kind
    payload = {
        "recipe": asdict(RECIPES[family]), "arch": EMBEDDED_ARCHS[suffix],
        "data": {"n_per_dataset": p.data.n_per_dataset, "n_natural": p.data.n_natural}, "seed": p.seed,
        "code": {**{src: stable_hash(_normalised_source(src)) for src in RECIPE_SOURCES[kind]},
                 "models/build.py": stable_hash(_normalised_source("models/build.py", RECIPE_FUNCTIONS[kind]))},
        "data_generators": {"phantoms": phantoms.GENERATOR_VERSION, "natural": natural.GENERATOR_VERSION},
    }
    payload.update({"ssl": asdict(p.ssl)} if kind == "ssl" else {"sup_epochs": p.backbone.sup_epochs})
    if RECIPES[family].init:
        payload["init"] = recipe_hash(f"{RECIPES[family].init}-{suffix}", p)
    return stable_hash(payload)


def output_dir(suffix: str) -> Path:
    """Committed folder for the `tiny` architecture, the cache for the others."""
    return EMBEDDED_DIR if suffix in COMMITTED_SUFFIXES else cache_dir() / "backbones"


def load_data(recipe: Recipe, profile: Profile, size: int) -> "ImageSet":  # noqa: F821
    """The training images of a recipe, generated at ``size`` pixels."""
    from ..data import natural, phantoms
    from ..data.imageset import ImageSet

    sets = []
    for item in recipe.data:
        if item == "natural":
            sets.append(natural.make_natural(profile.data.n_natural, size=size, seed=profile.seed))
        elif item == "natural_labelled":
            sets.append(natural.make_natural_labelled(profile.data.n_natural, size=size, seed=profile.seed))
        else:
            family, _, site = item.partition(":")
            sets.append(phantoms.make_dataset(family, profile.data.n_per_dataset, size=size, seed=profile.seed,
                                              site=int(site or 0)))
    if len(sets) == 1:
        return sets[0]
    images = np.concatenate([np.asarray(s.images) for s in sets])
    return ImageSet(images=images, labels=None, label_names=[], task="none",
                    patient_ids=np.concatenate([s.patient_ids for s in sets]), name="+".join(recipe.data))


def own_task_data(recipe: Recipe, profile: Profile, size: int) -> "ImageSet | None":  # noqa: F821
    """A fresh held-out set (seed + 1000, never trained on) of a supervised recipe's task; None for SSL recipes."""
    if recipe.kind != "supervised":
        return None
    n = max(64, min(600, profile.data.n_per_dataset))
    held_out = override(profile, seed=profile.seed + 1000, **{"data.n_natural": n, "data.n_per_dataset": n})
    return load_data(recipe, held_out, size)


def _health(name: str, model: torch.nn.Module, profile: Profile, device: str, draws: int = HEALTH_DRAWS) -> dict:
    """The health check of a built backbone: SSL from scratch on transfer under shift, SSL continued on a domain on
    that domain's held-out task, supervised on its own held-out task."""
    from .backbones import EMBEDDED_ARCHS

    family, suffix = split_name(name)
    recipe = RECIPES[family]
    size = max(64, EMBEDDED_ARCHS[suffix][1]["img_size"])
    domain = domain_tasks(recipe.data) if recipe.init else ()  # only SSL recipes continue from weights
    return health_check(model, suffix, profile, device, own_task=own_task_data(recipe, profile, size),
                        draws=draws, domain=domain or None)


def _health_summary(health: dict) -> str:
    """One line: verdict, the criterion's number and the transfer gains."""
    if "own_task" in health:
        judged = f"own-task kNN AUROC gain {health['own_task']['auroc_gain']:+.3f}; "
    elif "domain" in health:
        domain = health["domain"]
        judged = (f"domain kNN AUROC gain {domain['auroc_gain']:+.3f} on {', '.join(domain['tasks'])} "
                  f"(per draw {gains_text(domain['per_draw'])}); ")
    else:
        judged = ""
    return (f"{'PASSED' if health['passed'] else 'FAILED'} ({judged}mean kNN AUROC gain over random init "
            f"{health['mean_auroc_gain']:+.3f} under acquisition shift (per draw {draw_gains_text(health) or 'n/a'}), "
            f"{health['mean_auroc_gain_unshifted']:+.3f} unshifted)")


def _build_ssl(recipe: Recipe, suffix: str, profile: Profile, device: str, progress: bool,
               work_dir: Path) -> tuple[torch.nn.Module, dict]:
    from ..ssl.train import train_ssl
    from .backbones import EMBEDDED_ARCHS, create_backbone

    arch, kwargs = EMBEDDED_ARCHS[suffix]
    if recipe.init:
        model = create_backbone(f"{recipe.init}-{suffix}").model  # continued: weights in, fresh head inside train_ssl
    else:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                  drop_path_rate=profile.ssl.drop_path, **kwargs)
    ssl_cfg = profile.ssl
    if recipe.init:
        steps = max(2, int(round(ssl_cfg.steps * recipe.steps_fraction)))
        ssl_cfg = override(profile, **{"ssl.steps": steps, "ssl.vertical_flip": True,
                                       "ssl.warmup_steps": max(1, ssl_cfg.warmup_steps * steps // ssl_cfg.steps),
                                       "ssl.teacher_temp_warmup_steps": max(1, ssl_cfg.teacher_temp_warmup_steps * steps // ssl_cfg.steps),
                                       "ssl.freeze_last_layer_steps": max(1, ssl_cfg.freeze_last_layer_steps * steps // ssl_cfg.steps),
                                       }).ssl
    # drawn at up to twice the global-crop size, so that crops keep detail (our assumption)
    data = load_data(recipe, profile, size=min(max(64, 2 * ssl_cfg.global_size), max(64, profile.data.phantom_size)))
    run_dir = work_dir / stable_hash({"ssl": asdict(ssl_cfg), "data": data.name, "n": len(data), "seed": profile.seed,
                                      "init": recipe.init, "arch": EMBEDDED_ARCHS[suffix]})
    result = train_ssl(model, np.asarray(data.images), ssl_cfg, out_dir=run_dir, seed=profile.seed, device=device,
                       progress=progress)
    last = result.history.tail(max(1, len(result.history) // 10)).mean(numeric_only=True)
    info = {"steps": ssl_cfg.steps, "batch_size": ssl_cfg.batch_size, "images": len(data), "data": data.name,
            "images_per_s": round(float(result.images_per_s), 1), "collapse": result.collapse,
            "final_metrics_mean_last_10pct": {k: round(float(v), 4) for k, v in last.items()},
            "initialised_from": recipe.init and f"{recipe.init}-{suffix}"}
    info["exported"] = "EMA teacher (what DINOv2 evaluates and releases)"
    info["ssl_wall_time_s"] = round(float(result.wall_time_s), 1)  # summed over resumed sessions
    return result.teacher, info


def _sampled_history(history: "pd.DataFrame", n_points: int = 100) -> dict[str, list]:  # noqa: F821
    """Loss terms, schedules and probe scores at about ``n_points`` steps (always the probe rows), for the card."""
    if history.empty:
        return {}
    every = max(1, len(history) // n_points)
    probed = history["health_knn_auroc_gain"].notna() if "health_knn_auroc_gain" in history else False
    keep = history[(history["step"] % every == 0) | (history["step"] == history["step"].max()) | probed]
    columns = [c for c in keep.columns if c != "collapse" and keep[c].dtype.kind in "fiub"]
    return {c: [None if v != v else round(float(v), 5) for v in keep[c]] for c in columns}


def _latest_run(work_dir: Path) -> Path | None:
    """The most recent SSL run folder under ``work_dir`` (the one with the newest ``run.json``), or None."""
    runs = sorted(work_dir.glob("*/run.json"), key=lambda f: f.stat().st_mtime)
    return runs[-1].parent if runs else None


def _latest_history(run: Path | None) -> dict[str, list]:
    """``_sampled_history`` of an SSL run folder's ``history.csv`` ({} without a run)."""
    import pandas as pd

    return _sampled_history(pd.read_csv(run / "history.csv")) if run else {}


def _run_config(run: Path | None) -> dict | None:
    """The SSL settings an SSL run folder trained with (its ``run.json``), or None without a run."""
    return json.loads((run / "run.json").read_text())["config"] if run else None


def _build_supervised(recipe: Recipe, suffix: str, profile: Profile, device: str, progress: bool) -> tuple[torch.nn.Module, dict]:
    import timm

    from ..data.splits import patient_split
    from ..data.transforms import ClassificationTransform
    from ..eval.finetune import Classifier, FinetuneConfig, macro_auroc, predict, train_classifier
    from .backbones import EMBEDDED_ARCHS
    from .heads import LinearHead

    arch, kwargs = EMBEDDED_ARCHS[suffix]
    size = kwargs["img_size"]
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, drop_path_rate=0.1,
                              **kwargs)
    data = load_data(recipe, profile, size=max(64, size))
    split = patient_split(data, fractions=(0.85, 0.1, 0.05), seed=profile.seed)
    train, val, test = (data.subset(split[k]) for k in ("train", "val", "test"))
    clf = Classifier(model, LinearHead(model.num_features, data.n_classes))
    cfg = FinetuneConfig(epochs=profile.backbone.sup_epochs, batch_size=64, lr=1e-3, weight_decay=0.05,
                         select_on="val_loss", label_smoothing=0.1 if data.task == "multiclass" else 0.0)
    # no photometric jitter: tried (brightness / contrast 0.4, a stand-in for augreg's RandAugment), it cut the
    # held-out macro AUROC of sup-natural from 0.866 to 0.627 at 8 epochs and did not pass the health check either
    res = train_classifier(clf, train, val, cfg, transform_train=ClassificationTransform(size, train=True),
                           transform_eval=ClassificationTransform(size, train=False), seed=profile.seed,
                           device=device, progress=progress)
    last = res.history.iloc[res.best_epoch].to_dict()
    probs = predict(res.model, test, ClassificationTransform(size, train=False), device=device)
    held_out = {"n_images": len(test), "macro_auroc": round(macro_auroc(test, probs), 4)}
    if data.task == "multiclass":
        held_out["accuracy"] = round(float((probs.argmax(1) == test.labels).mean()), 4)
    info = {"epochs": cfg.epochs, "images": len(train), "data": data.name, "selection": res.selection,
            "best_epoch_metrics": {k: round(float(v), 4) for k, v in last.items()}, "held_out_test": held_out}
    return res.model.backbone, info


def backbone_status(name: str, profile: str | Profile = "tiny") -> tuple[str, str]:
    """("fresh" | "stale" | "missing", reason) of one embedded backbone's weights against its current recipe."""
    p = get_profile(profile)
    _, suffix = split_name(name)
    out = output_dir(suffix)
    weights, card_path = out / f"{name}.safetensors", out / f"{name}.json"
    if not (weights.exists() and card_path.exists()):
        return "missing", f"no {weights.name} + {card_path.name} in {out} (make backbones PROFILE={p.name})"
    built, expected = json.loads(card_path.read_text()).get("recipe_hash"), recipe_hash(name, p)
    if built != expected:
        return "stale", f"built from recipe {built}, the recipe is now {expected} (make backbones PROFILE={p.name})"
    return "fresh", f"matches recipe {expected}"


def build(name: str, profile: str | Profile = "tiny", device: str = "auto", progress: bool = True,
          force: bool = False) -> Path:
    """Train one embedded backbone by its recipe and write ``<name>.safetensors`` + ``<name>.json``."""
    from safetensors.torch import save_file

    p = get_profile(profile)
    family, suffix = split_name(name)
    from .backbones import EMBEDDED_ARCHS

    if suffix not in EMBEDDED_ARCHS:
        raise ValueError(f"unknown architecture suffix {suffix!r}; choose one of {sorted(EMBEDDED_ARCHS)}")
    if suffix != p.backbone.embedded_suffix:
        raise ValueError(f"profile {p.name!r} builds '*-{p.backbone.embedded_suffix}' backbones, not {name!r}")
    out = output_dir(suffix)
    out.mkdir(parents=True, exist_ok=True)
    weights, card_path = out / f"{name}.safetensors", out / f"{name}.json"
    expected = recipe_hash(name, p)
    if not force and weights.exists() and card_path.exists():
        if json.loads(card_path.read_text()).get("recipe_hash") == expected:
            print(f"[build] {name}: up to date ({weights})")
            return weights
    device = resolve_device(device)
    recipe = RECIPES[family]
    start = time.perf_counter()
    work_dir = cache_dir() / "build" / name  # resumable: each SSL run has its own sub-folder
    with seeded_torch_rng(p.seed):  # initial weights and heads from the profile's seed: a rebuild gives the same
        if recipe.kind == "ssl":
            model, info = _build_ssl(recipe, suffix, p, device, progress, work_dir)
            run = _latest_run(work_dir)  # its run.json and history.csv, written by train_ssl
            info.setdefault("history_sampled", _latest_history(run))  # loss curves for the notebooks
        else:
            model, info = _build_supervised(recipe, suffix, p, device, progress)
            run = None
    info["seeded"] = p.seed
    wall = max(time.perf_counter() - start, info.get("ssl_wall_time_s", 0.0))  # a resumed run counts its past sessions
    health = _health(name, model, p, device)
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"name": name, "recipe_hash": expected})
    card = {
        "name": name, "family": family, "architecture": suffix, "timm_arch": EMBEDDED_ARCHS[suffix][0],
        "timm_kwargs": EMBEDDED_ARCHS[suffix][1], "is_dinov2": False, "stands_in_for": recipe.stands_in_for,
        "recipe": asdict(recipe), "recipe_hash": expected, "profile": p.name,
        # the settings the SSL run really used (a continuation scales steps and warm-ups, adds vertical flips)
        "ssl_config": _run_config(run),
        "training": info, "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "wall_time_s": round(wall, 1), "health": health,
        "built_from_commit": git_commit(), "health_checked_at_commit": git_commit(), "dtype": "float16",
        "parameters": int(sum(v.numel() for v in state.values())),
    }
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    print(f"[build] {name}: {wall:.0f} s, health {_health_summary(health)}")
    return weights


def recheck_health(name: str, profile: str | Profile = "tiny", device: str = "auto") -> dict:
    """Re-run the health check of built weights with the current check and rewrite the card's ``health`` (no training)."""
    from .backbones import create_backbone

    p = get_profile(profile)
    _, suffix = split_name(name)
    card_path = output_dir(suffix) / f"{name}.json"
    if not card_path.exists():
        raise FileNotFoundError(f"{card_path} does not exist: build the weights first "
                                f"(`python -m medlib.models build {name} --profile {p.name}`).")
    card = json.loads(card_path.read_text())
    health = _health(name, create_backbone(name).model, p, resolve_device(device))
    card.update(health=health, health_checked_at_commit=git_commit())
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
    print(f"[health] {name}: {_health_summary(health)}")
    return health


def build_all(profile: str | Profile = "tiny", device: str = "auto", progress: bool = True,
              force: bool = False) -> list[Path]:
    """Build every family for the profile's architecture, in dependency order."""
    p = get_profile(profile)
    return [build(f"{family}-{p.backbone.embedded_suffix}", p, device, progress, force) for family in BUILD_ORDER]

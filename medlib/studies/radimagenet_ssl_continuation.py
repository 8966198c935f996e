"""Study 3 (Lange & Shekel 2024, TAU course report): SSL continued on domain images, 5-fold cross-validated fine-tuning.

Notebook ``03_radimagenet_ssl_continuation`` is a sequence of short calls to this module:

- data: :data:`CV_TASKS` (thyroid US, breast US, ACL MRI, meniscus MRI, as phantoms or, in the
  ``paper`` profile, sources the profile names), :func:`load_cv_datasets`, :func:`make_folds`
  (patient-grouped, stratified k folds - the same folds for every model - with a validation part
  carved from each fold's training patients), :func:`describe_folds`;
- models: :func:`build_medical_cnn` (the medical-supervised CNN that stands in for RadImageNet,
  built and cached here), :func:`continued_backbone` (the committed ``ssl-us`` / ``ssl-knee``
  weights, or - when they are missing - a continuation run here with :func:`continue_ssl`),
  :func:`load_study_models` (the four roles of Table 1 and a status table saying which weights
  each role uses), :func:`ssl_history_table` (loss curves from the model card or the run),
  :func:`card_health_table`, :func:`knn_health_table` (kNN before / after the continuation);
- fine-tuning: :func:`grid_settings`, :func:`seed001_transforms`, :func:`run_fold` (one
  fine-tuning run with the paper's head, BCE, best-val-loss epoch restored and checked; its
  predictions cached on disk so a re-run is fast and a killed run resumes),
  :func:`cross_validate`, :func:`load_fold_predictions`;
- tables: :func:`restore_check`, :func:`select_settings` (the grid setting chosen on validation
  AUROC, never test),
  :func:`grid_table`, :func:`table1`, :func:`table1_vs_paper` (beside :data:`PUBLISHED_TABLE1`),
  :func:`format_table1`;
- figures: :func:`plot_ssl_curves`, :func:`plot_knn_health`, :func:`plot_grid`, :func:`plot_folds`;
- arms: :data:`ROLES` name our arms for what they are; :func:`arm_label` says DINOv2 / RIN only for
  the backbones the registry marks as such (the ``paper`` profile), :data:`PAPER_ARMS` names the
  paper's arms beside its numbers;
- intervals, claims, flags: :func:`chosen_predictions`, :func:`bootstrap_fold_auroc` (paired
  percentile bootstrap over test images within folds), :func:`arm_auroc_table`,
  :func:`pixel_baseline_predictions` (a pixel model on the same folds),
  :func:`knn_health_predictions` / :func:`knn_health_wide` (kNN with no-network references),
  :func:`continuation_effects` / :func:`continuation_sentence`, :func:`study_claims` (the five
  published claims), :func:`study_sanity_flags` (below chance, below random init; explained only
  where :func:`below_chance_explanations` / :func:`knn_explanations` find the numbers support it).

Every runner takes the profile for its sizes (``profile.eval.cv_*``), so no size is written in the
notebook. Names say what weights are: nothing here is DINOv2 unless the ``paper`` profile loads
Meta's weights.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..cache import (CorruptCacheError, array_fingerprint, artifact_dir, discard_entry, file_hash, load_npy, save_json,
                     save_npy, stable_hash, verify_file)
from ..config import Profile, cache_dir, display_path, get_profile, override, seeded_torch_rng
from ..data import phantoms
from ..data.imageset import ImageSet
from ..data.splits import grouped_kfold, patient_split
from ..data.transforms import ClassificationTransform
from ..models.backbones import (
    Backbone, BackboneSpec, WeightsNotFoundError, create_backbone, get_spec, load_model_card,
)
from ..models.heads import LinearHead, MLPHead
from ..eval.finetune import Classifier, FinetuneConfig, evaluate_loss, make_loss, macro_auroc, predict, train_classifier

CV_SEED_OFFSET = 2000  # evaluation phantoms: not the continuation's images (seed + 0) nor the health check's (+1000)
MEDICAL_SEED_OFFSET = 3000  # the medical CNN stand-in's pre-training phantoms: disjoint from all of the above
VAL_SHARE = 0.2  # share of each fold's training patients held out for epoch selection (our assumption)
CODE_VERSION = "1"  # bump when run_fold's computation changes: cached fold results are then recomputed
MEDICAL_CNN_NAME = "sup-medphantom-efficientnet-lite0"
#: The four arms of Table 1, named for what they are (the paper's names are in :data:`PAPER_ARMS`).
IN, MED, NAT, CONT = "IN", "medical-sup", "SSL-natural", "SSL-natural + domain SSL"
ROLES = (IN, MED, NAT, CONT)
ROLE_DESCRIPTIONS = {
    IN: "ImageNet-supervised CNN",
    MED: "medical-supervised CNN (RadImageNet in the paper)",
    NAT: "SSL ViT on natural images (DINOv2 in the paper)",
    CONT: "the same ViT after SSL continued on domain images",
}
#: The paper's name of each arm (its Table 1 columns): used only for published numbers.
PAPER_ARMS = {IN: "IN (ResNet-50)", MED: "RIN (ResNet-50)", NAT: "DINOv2 ViT-S/14", CONT: "DINOv2 ViT-S/14 + SSL"}


def arm_label(role: str, backbone_name: str | None) -> str:
    """What to call an arm in tables and figures, from the backbone actually loaded (never from the role alone).

    The natural SSL ViT is called DINOv2 only when its weights are Meta's (the registry's
    ``is_dinov2``, e.g. ``dinov2-vit-s14`` in the ``paper`` profile); the continued ViT is
    "DINOv2 + domain SSL" only when the backbone passed for it - its parent, the start point of
    the continuation - is one; the medical CNN is RIN only
    when it is RadImageNet's. Otherwise the role name says what it is.
    """
    name = (backbone_name or "").lower()
    try:
        dinov2 = bool(get_spec(backbone_name).is_dinov2) if backbone_name else False
    except (KeyError, ValueError):  # not in the registry: nothing says these are Meta's weights
        dinov2 = False
    if role == NAT and dinov2:
        return "DINOv2"
    if role == CONT and dinov2:
        return "DINOv2 + domain SSL"
    if role == MED and "radimagenet" in name:
        return "RIN"
    return role


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CVTask:
    """One evaluation task of study 3: the phantom (and binary target) that stands in for it."""

    family: str  # phantom family
    target: str | None  # binary target of a multi-label family (knee)
    domain: str  # "us" or "knee": which continued backbone fine-tunes on it
    published: str  # the row name in the published Table 1
    stands_in_for: str


CV_TASKS: Mapping[str, CVTask] = {
    "thyroid_us": CVTask("thyroid_us", None, "us", "Thyroid US", "RadImageNet thyroid ultrasound (349 images)"),
    "breast_us": CVTask("breast_us", None, "us", "Breast US", "RadImageNet breast ultrasound (780 images)"),
    "acl_mri": CVTask("knee", "acl_tear", "knee", "ACL MRI", "RadImageNet knee MRI, ACL tear (1021 images)"),
    "meniscus_mri": CVTask("knee", "meniscal_tear", "knee", "Meniscus MRI",
                           "RadImageNet knee MRI, meniscal tear (4201 images)"),
}
#: data key of the images a continuation trains on, when the profile names one (else the recipe's phantoms)
SSL_SOURCE_KEYS: Mapping[str, str] = {"us": "ssl_us_images", "knee": "ssl_knee_images"}
#: continued-SSL family of each domain (recipes in medlib.models.build.RECIPES)
DOMAIN_FAMILIES: Mapping[str, str] = {"us": "ssl-us", "knee": "ssl-knee"}


def _check_tasks(names: Sequence[str] | None) -> list[str]:
    names = list(CV_TASKS) if names is None else list(names)
    unknown = [n for n in names if n not in CV_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or no task(s) {unknown or names}; choose from {list(CV_TASKS)}")
    return names


def load_cv_datasets(profile: Profile | str, names: Sequence[str] | None = None,
                     progress: bool = False) -> dict[str, ImageSet]:
    """The study's binary tasks: ``profile.data.sources[name]`` where given, else ``cv_images`` phantoms each.

    Phantoms use seed ``profile.seed + 2000``: images that neither the SSL continuation (seed + 0)
    nor the build-time health check (seed + 1000) have seen.
    """
    from ..data.sources import load_source

    p = get_profile(profile)
    n = p.eval.cv_images or p.data.n_per_dataset
    if n < 2 * p.eval.folds:
        raise ValueError(f"profile {p.name!r}: {n} images per task cannot fill {p.eval.folds} folds; "
                         "raise eval.cv_images")
    out = {}
    for name in _check_tasks(names):
        task = CV_TASKS[name]
        if name in p.data.sources:
            out[name] = load_source(p.data.sources[name])
        else:
            out[name] = phantoms.make_dataset(task.family, n, size=p.data.phantom_size, seed=p.seed + CV_SEED_OFFSET,
                                              target=task.target, progress=progress)
        if out[name].task != "binary":
            raise ValueError(f"{name}: study 3 fine-tunes binary tasks (one sigmoid output); {out[name].name!r} is "
                             f"{out[name].task}")
    return out


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: image indices of its train, val (epoch selection) and test parts."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_folds(ds: ImageSet, k: int, seed: int = 0, val_share: float = VAL_SHARE) -> list[Fold]:
    """k patient-grouped, stratified folds; each fold's val part is ``val_share`` of its training patients.

    Depends only on (ds, k, seed, val_share), so every model of the comparison sees the same folds.
    """
    if not 0 < val_share <= 0.5:
        raise ValueError(f"val_share must be in (0, 0.5], got {val_share}")
    inner = int(round(1 / val_share))
    folds = []
    for i, (rest, test) in enumerate(grouped_kfold(ds, k, seed=seed)):
        sub = ds.subset(rest)
        if len(np.unique(sub.patient_ids)) < inner:
            raise ValueError(f"{ds.name}: fold {i} has fewer than {inner} training patients to carve a validation "
                             "part from; use more images or fewer folds")
        train, val = grouped_kfold(sub, inner, seed=seed + 1 + i)[0]
        folds.append(Fold(i, np.sort(rest[train]), np.sort(rest[val]), np.sort(test)))
    return folds


def describe_folds(datasets: Mapping[str, ImageSet], folds: Mapping[str, Sequence[Fold]]) -> pd.DataFrame:
    """One row per task: what it stands in for, images, patients, positives and images per part (mean over folds)."""
    rows = []
    for name, ds in datasets.items():
        parts = folds[name]
        y = ds.label_matrix()[:, 0]
        rows.append({"task": name, "stands_in_for": CV_TASKS[name].stands_in_for if name in CV_TASKS else "",
                     "source": ds.name, "images": len(ds), "patients": int(np.unique(ds.patient_ids).size),
                     "positive_share": float(y.mean()), "folds": len(parts),
                     **{f"{part}_per_fold": float(np.mean([len(getattr(f, part)) for f in parts]))
                        for part in ("train", "val", "test")}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the medical-supervised CNN stand-in


#: RadImageNet-like pre-training classes: modality:anatomy (CT organs, chest radiograph, ultrasound, knee MR).
MEDICAL_PRETRAIN_FAMILIES: tuple[tuple[str, dict], ...] = (
    ("ct", {}), ("cxr", {"site": 5}), ("breast_us", {}), ("thyroid_us", {}), ("knee", {}))


def medical_pretraining_set(profile: Profile | str) -> ImageSet:
    """The stand-in's supervised pre-training data: multi-class modality:anatomy labels, no evaluation target.

    CT slices are labelled by organ (``ct:liver`` ...), the other families by what they show
    (``xr:chest``, ``us:breast``, ``us:thyroid``, ``mr:knee``) - never by malignancy or tear,
    the labels study 3 evaluates. Images come from seed ``profile.seed + 3000``.
    """
    p = get_profile(profile)
    n = p.eval.cv_medical_images
    if n < 10:
        raise ValueError(f"profile {p.name!r}: eval.cv_medical_images={n} is too few to pre-train on")
    images, labels, pids, names = [], [], [], []
    fixed = {"cxr": "xr:chest", "breast_us": "us:breast", "thyroid_us": "us:thyroid", "knee": "mr:knee"}
    for family, params in MEDICAL_PRETRAIN_FAMILIES:
        ds = phantoms.make_dataset(family, n, size=p.data.phantom_size, seed=p.seed + MEDICAL_SEED_OFFSET, **params)
        if family == "ct":
            offset = len(names)
            names += [f"ct:{organ}" for organ in ds.label_names]
            labels.append(np.asarray(ds.labels) + offset)
        else:
            names.append(fixed[family])
            labels.append(np.full(len(ds), len(names) - 1))
        images.append(np.asarray(ds.images))
        pids.append(np.char.add(f"{family}/", ds.patient_ids.astype(str)))
    return ImageSet(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64), label_names=names,
                    task="multiclass", patient_ids=np.concatenate(pids), name="medical-pretraining-phantoms")


def _medical_spec(description: str) -> BackboneSpec:
    base = get_spec("efficientnet-lite0.in1k")
    return dataclasses.replace(base, name=MEDICAL_CNN_NAME, source="local", description=description,
                               citation="our stand-in for RadImageNet (Mei et al. 2022)")


def build_medical_cnn(profile: Profile | str, device: str = "auto", progress: bool = True,
                      force: bool = False) -> tuple[Backbone, dict]:
    """The medical-supervised CNN stand-in: EfficientNet-Lite0 (ImageNet) fine-tuned on :func:`medical_pretraining_set`.

    Built once per profile and cached (``<cache>/crossval_medical_cnn/<key>/``): weights as
    safetensors and a card (data, epochs, selection, held-out accuracy). Returns the backbone
    at ``profile.backbone.image_size`` and the card.
    """
    from ..engine import save_weights

    p = get_profile(profile)
    size = p.backbone.image_size
    key = {"recipe": "medical-cnn", "version": CODE_VERSION, "head_init": "seeded", "init": "efficientnet-lite0.in1k",
           "size": size,
           "images": p.eval.cv_medical_images, "epochs": p.eval.cv_medical_epochs, "seed": p.seed,
           "phantom_size": p.data.phantom_size, "families": MEDICAL_PRETRAIN_FAMILIES,
           "generator": phantoms.GENERATOR_VERSION}
    folder = artifact_dir("crossval_medical_cnn", key)
    weights, card_path = folder / "backbone.safetensors", folder / "card.json"
    description = ("EfficientNet-Lite0 (ImageNet-1k) fine-tuned supervised on modality:anatomy phantom classes "
                   "(CT organs, chest X-ray, breast / thyroid US, knee MR) - our stand-in for RadImageNet")
    if force or not (weights.exists() and card_path.exists()):
        ds = medical_pretraining_set(p)
        split = patient_split(ds, fractions=(0.8, 0.1, 0.1), seed=p.seed)
        train, val, test = (ds.subset(split[k]) for k in ("train", "val", "test"))
        init = create_backbone("efficientnet-lite0.in1k", image_size=size)
        with seeded_torch_rng(p.seed):  # the head's init from the seed: torch seeds each process at random
            head = LinearHead(init.embed_dim, ds.n_classes)
        clf = Classifier(init.train(), head)
        cfg = FinetuneConfig(epochs=p.eval.cv_medical_epochs, batch_size=32, lr=1e-3, backbone_lr=1e-4,
                             weight_decay=0.01, select_on="val_loss")
        t0 = time.perf_counter()
        res = train_classifier(clf, train, val, cfg, transform_train=ClassificationTransform(size, train=True),
                               transform_eval=ClassificationTransform(size, train=False), seed=p.seed, device=device,
                               progress=progress)
        probs = predict(res.model, test, ClassificationTransform(size, train=False), device=device)
        card = {"name": MEDICAL_CNN_NAME, "description": description, "profile": p.name, "key": key,
                "classes": ds.label_names, "images": {"train": len(train), "val": len(val), "test": len(test)},
                "epochs": cfg.epochs, "selection": res.selection, "wall_time_s": round(time.perf_counter() - t0, 1),
                "held_out_test": {"accuracy": float((probs.argmax(1) == test.labels).mean()),
                                  "macro_auroc": macro_auroc(test, probs)}}
        save_weights(res.model.backbone.model, weights)
        save_json(card_path, card)
    card = json.loads(card_path.read_text())
    return create_backbone(_medical_spec(description), weights=weights, image_size=size), card


# --------------------------------------------------------------------------- SSL continuation


@dataclass
class ContinuedSSL:
    """The continued SSL backbone of one domain, where its weights came from, and its training curve."""

    domain: str
    name: str
    backbone: Backbone | None  # None when neither weights nor a start point exist
    source: str  # "committed", "cache", "weights file", "continued here" or "missing"
    message: str  # one line for the notebook: which weights are used, and why
    history: pd.DataFrame = field(default_factory=pd.DataFrame)  # loss terms per (sampled) step
    card: dict | None = None


def continued_name(domain: str, profile: Profile | str) -> str:
    """``ssl-us-<suffix>`` or ``ssl-knee-<suffix>`` for the profile's ``eval.cv_continued_suffix``."""
    if domain not in DOMAIN_FAMILIES:
        raise ValueError(f"unknown domain {domain!r}; choose one of {list(DOMAIN_FAMILIES)}")
    return f"{DOMAIN_FAMILIES[domain]}-{get_profile(profile).eval.cv_continued_suffix}"


def _card_history(card: dict | None) -> pd.DataFrame:
    """The sampled loss history of a model card (``training.history_sampled``), as a table; empty if absent."""
    sampled = ((card or {}).get("training") or {}).get("history_sampled")
    if not sampled:
        return pd.DataFrame()
    return pd.DataFrame(sampled)


def continuation_config(domain: str, profile: Profile | str) -> tuple[Any, dict]:
    """The SSL settings of the domain's recipe (``RECIPES``) scaled to the profile, as ``medlib.models.build`` runs it.

    Steps are ``steps_fraction`` of the profile's (``eval.cv_ssl_steps_fraction`` when set), capped by
    ``eval.cv_ssl_fallback_steps`` when that is set; warm-ups scale with the steps; vertical flips on
    (the paper). Returns (SSLConfig, a dict saying what was scaled).
    """
    from ..models.build import RECIPES

    p = get_profile(profile)
    recipe = RECIPES[DOMAIN_FAMILIES[domain]]
    fraction = recipe.steps_fraction if p.eval.cv_ssl_steps_fraction is None else p.eval.cv_ssl_steps_fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"eval.cv_ssl_steps_fraction must be in (0, 1], got {fraction}")
    full = max(2, int(round(p.ssl.steps * fraction)))
    steps = min(full, p.eval.cv_ssl_fallback_steps) if p.eval.cv_ssl_fallback_steps > 0 else full

    def scaled(value: int) -> int:
        return max(1, value * steps // p.ssl.steps)

    cfg = override(p, **{"ssl.steps": steps, "ssl.vertical_flip": True, "ssl.warmup_steps": scaled(p.ssl.warmup_steps),
                         "ssl.teacher_temp_warmup_steps": scaled(p.ssl.teacher_temp_warmup_steps),
                         "ssl.freeze_last_layer_steps": scaled(p.ssl.freeze_last_layer_steps),
                         "ssl.checkpoint_every": max(1, min(p.ssl.checkpoint_every, steps))}).ssl
    return cfg, {"recipe_steps": full, "steps": steps, "capped": steps < full, "data": recipe.data,
                 "init": p.eval.cv_ssl_vit}


def continue_ssl(domain: str, profile: Profile | str, device: str = "auto", progress: bool = True) -> ContinuedSSL:
    """Continue the natural SSL ViT with the DINOv2 recipe on the domain's phantoms, here (cached, resumable).

    The fallback when the committed ``ssl-us`` / ``ssl-knee`` weights are missing: the same
    recipe as ``python -m medlib.models build`` (fresh DINO / iBOT heads inside ``train_ssl``,
    position embeddings interpolated to the global crop size, vertical flips), for the steps of
    :func:`continuation_config`. The run lives in ``<cache>/crossval_ssl/<key>/``.
    """
    from ..models.build import RECIPES, load_data
    from ..ssl.train import train_ssl

    p = get_profile(profile)
    name = continued_name(domain, p)
    cfg, info = continuation_config(domain, p)
    try:
        init = create_backbone(p.eval.cv_ssl_vit)
    except WeightsNotFoundError as err:
        return ContinuedSSL(domain, name, None, "missing",
                            f"{name}: no weights, and its start point {p.eval.cv_ssl_vit!r} is missing too "
                            f"({str(err).split('. ')[0]}); left out")
    recipe = RECIPES[DOMAIN_FAMILIES[domain]]
    size = min(max(64, 2 * cfg.global_size), max(64, p.data.phantom_size))
    key = SSL_SOURCE_KEYS[domain]
    if key in p.data.sources:  # real domain images (paper: RadImageNet US / knee MR); labels unused
        from ..data.sources import load_source

        data = load_source(p.data.sources[key])
    else:
        data = load_data(recipe, p, size=size)
    run_dir = cache_dir() / "crossval_ssl" / stable_hash({
        "ssl": dataclasses.asdict(cfg), "data": data.name, "n": len(data), "seed": p.seed,
        "init": p.eval.cv_ssl_vit, "init_weights": file_hash(init.weights_path) if init.weights_path else None})
    result = train_ssl(init.model, np.array(data.images), cfg, out_dir=run_dir, seed=p.seed, device=device,
                       progress=progress)
    backbone = create_backbone(name, weights=run_dir / "teacher_backbone.safetensors", image_size=p.backbone.image_size)
    capped = (f" (capped from the recipe's {info['recipe_steps']} by eval.cv_ssl_fallback_steps)"
              if info["capped"] else "")
    message = (f"{name}: weights MISSING here, so this notebook ran the continuation (cached in {run_dir}): "
               f"{info['steps']} steps"
               f"{capped} from {p.eval.cv_ssl_vit} on {data.name} ({len(data)} images), batch {cfg.batch_size}; "
               f"EMA teacher used")
    history = result.history[["step", "loss", "dino_loss", "ibot_loss", "koleo_loss"]].copy()
    return ContinuedSSL(domain, name, backbone, "continued here", message, history,
                        {"training": {"steps": info["steps"], "run_dir": str(run_dir), "collapse": result.collapse}})


def continued_backbone(domain: str, profile: Profile | str, device: str = "auto", progress: bool = True,
                       fallback: bool = True) -> ContinuedSSL:
    """The domain's continued SSL ViT: its built weights (committed, cache, weights dir), else :func:`continue_ssl`."""
    p = get_profile(profile)
    name = continued_name(domain, p)
    try:
        backbone = create_backbone(name, image_size=p.backbone.image_size)
    except WeightsNotFoundError:
        if not fallback:
            return ContinuedSSL(domain, name, None, "missing", f"{name}: weights missing; left out (fallback off)")
        return continue_ssl(domain, p, device=device, progress=progress)
    spec = get_spec(name)
    card = load_model_card(name) if spec.source == "embedded" else None
    path = Path(backbone.weights_path) if backbone.weights_path else None
    source = ("committed" if path is not None and path.parent.name == "embedded" else
              "cache" if path is not None and cache_dir() in path.parents else "weights file")
    steps = ((card or {}).get("training") or {}).get("steps")
    message = f"{name}: {source} weights {path}" + (f", built with {steps} SSL steps" if steps else "")
    return ContinuedSSL(domain, name, backbone, source, message, _card_history(card), card)


def ssl_history_table(continued: Mapping[str, ContinuedSSL]) -> pd.DataFrame:
    """Long table of the continuation's loss terms (and probed kNN gain): domain, backbone, step, term, value."""
    rows = []
    for domain, c in continued.items():
        if c.history.empty or "step" not in c.history:
            continue
        # loss, dino_loss, ibot_loss, koleo_loss and, where the build probed it, the kNN AUROC gain over random init
        terms = [t for t in c.history.columns if "loss" in str(t) or t == "health_knn_auroc_gain"]
        if not terms:
            continue
        long = c.history.melt(id_vars="step", value_vars=terms, var_name="term", value_name="value").dropna()
        long.insert(0, "backbone", c.name)
        long.insert(0, "domain", domain)
        rows.append(long)
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["domain", "backbone", "step", "term", "value"])


def card_health_table(continued: Mapping[str, ContinuedSSL]) -> pd.DataFrame:
    """The build-time kNN health recorded in each continued backbone's model card: backbone, task, model, auroc.

    ``model`` is the card's own key (e.g. ``trained`` / ``random_init``, or ``before`` / ``after``);
    empty when no card carries a ``health.tasks`` record (e.g. weights continued here).
    """
    rows = []
    for c in continued.values():
        tasks = ((c.card or {}).get("health") or {}).get("tasks") or {}
        for task, models in tasks.items():
            for which, scores in (models.items() if isinstance(models, dict) else []):
                if isinstance(scores, dict) and "auroc" in scores:
                    rows.append({"backbone": c.name, "task": task, "model": which, "auroc": float(scores["auroc"])})
    return pd.DataFrame(rows, columns=["backbone", "task", "model", "auroc"])


# --------------------------------------------------------------------------- the four roles


@dataclass
class StudyModels:
    """The backbone of each role for each domain (the continued ViT differs between US and knee)."""

    backbones: dict[str, dict[str, Backbone]]  # role -> domain -> backbone
    status: pd.DataFrame  # role, arm, domain, backbone, status, weights, stands_in_for
    arms: dict[str, str] = field(default_factory=dict)  # role -> label for tables and figures (arm_label)

    def arm(self, role: str) -> str:
        """The label of ``role`` for tables and figures (the role itself when unknown)."""
        return self.arms.get(role, role)

    def get(self, role: str, task: str) -> Backbone | None:
        """The backbone that plays ``role`` on ``task`` (None when missing)."""
        return self.backbones.get(role, {}).get(CV_TASKS[task].domain)


def load_study_models(profile: Profile | str, continued: Mapping[str, ContinuedSSL], device: str = "auto",
                      progress: bool = True) -> StudyModels:
    """Load the IN CNN, the medical CNN (built if needed), the natural SSL ViT and the continued ViTs.

    A role whose weights are missing is listed in ``status`` and left out of the comparison,
    never replaced silently.
    """
    p = get_profile(profile)
    size = p.backbone.image_size
    domains = list(DOMAIN_FAMILIES)
    out: dict[str, dict[str, Backbone]] = {}
    rows = []
    medical = p.eval.cv_medical_cnn or MEDICAL_CNN_NAME
    # the continued ViT's label follows its parent, the natural ViT the continuation starts from
    arms = {IN: arm_label(IN, p.eval.cv_imagenet_cnn), MED: arm_label(MED, medical),
            NAT: arm_label(NAT, p.eval.cv_ssl_vit), CONT: arm_label(CONT, p.eval.cv_ssl_vit)}

    def add(role: str, backbone: Backbone | None, status: str, weights: str, name: str, only: list[str]) -> None:
        for d in only:
            if backbone is not None:
                out.setdefault(role, {})[d] = backbone
            rows.append({"role": role, "arm": arms[role], "domain": d, "backbone": name, "status": status,
                         "weights": display_path(weights) if weights.startswith("/") else weights,
                         "stands_in_for": ROLE_DESCRIPTIONS[role]})

    for role, name in ((IN, p.eval.cv_imagenet_cnn), (NAT, p.eval.cv_ssl_vit)):
        try:
            bb = create_backbone(name, image_size=size)
            add(role, bb, "loaded", str(bb.weights_path), name, domains)
        except WeightsNotFoundError as err:
            add(role, None, "missing", str(err).split(". ")[0], name, domains)
    if p.eval.cv_medical_cnn:
        try:
            bb = create_backbone(p.eval.cv_medical_cnn, image_size=size)
            add(MED, bb, "loaded", str(bb.weights_path), p.eval.cv_medical_cnn, domains)
        except WeightsNotFoundError as err:
            add(MED, None, "missing", str(err).split(". ")[0], p.eval.cv_medical_cnn, domains)
    else:
        bb, card = build_medical_cnn(p, device=device, progress=progress)
        add(MED, bb, f"built here (held-out accuracy {card['held_out_test']['accuracy']:.3f})",
            str(bb.weights_path), MEDICAL_CNN_NAME, domains)
    for d, c in continued.items():
        weights = str(c.backbone.weights_path) if c.backbone is not None else c.message
        add(CONT, c.backbone, c.source, weights, c.name, [d])
    return StudyModels(out, pd.DataFrame(rows), arms)


# --------------------------------------------------------------------------- kNN health before / after


def knn_health_table(models: StudyModels, datasets: Mapping[str, ImageSet], folds: Mapping[str, Sequence[Fold]],
                     profile: Profile | str, device: str = "cpu", random_init: Backbone | None = None) -> pd.DataFrame:
    """kNN AUROC (k = 20, T = 0.07, CLS features) of random init, the natural SSL ViT and its continuation, per task.

    "before" is the natural SSL ViT, "after" the task's continued ViT (NaN when missing).
    Each fold's train + val images vote for its test images; the AUROC is the mean over folds.
    Columns: task, domain, random_init, before, after, gain (after - before).
    """
    from ..models.health import extract_cls, knn_scores

    size = get_profile(profile).backbone.image_size
    rows = []
    for task, ds in datasets.items():
        y = ds.label_matrix()[:, 0].astype(int)
        row: dict[str, Any] = {"task": task, "domain": CV_TASKS[task].domain}
        for which, bb in (("random_init", random_init), ("before", models.get(NAT, task)),
                          ("after", models.get(CONT, task))):
            if bb is None:
                row[which] = float("nan")
                continue
            feats = extract_cls(bb.model, np.array(ds.images), size, device)
            scores = [knn_scores(feats[pool], y[pool], feats[f.test], y[f.test], 2)["auroc"]
                      for f in folds[task] for pool in [np.concatenate([f.train, f.val])]]
            row[which] = float(np.nanmean(scores))
        row["gain"] = row["after"] - row["before"]
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- fine-tuning runs


@dataclass(frozen=True)
class Setting:
    """One point of the fine-tuning grid."""

    lr: float
    batch_size: int

    @property
    def label(self) -> str:
        """e.g. ``lr 1e-05, batch 8``."""
        return f"lr {self.lr:g}, batch {self.batch_size}"


def grid_settings(profile: Profile | str) -> list[Setting]:
    """The lr x batch grid of the profile (Lange & Shekel: {1e-5, 1e-6} x {8, 16, 32})."""
    p = get_profile(profile)
    if not p.eval.cv_lrs or not p.eval.cv_batch_sizes:
        raise ValueError(f"profile {p.name!r} has an empty fine-tuning grid (eval.cv_lrs / eval.cv_batch_sizes)")
    return [Setting(float(lr), int(b)) for lr, b in itertools.product(p.eval.cv_lrs, p.eval.cv_batch_sizes)]


class Seed001Augment:
    """The paper's training augmentation: rotation +-10, shear +-10, translation +-10 %, random resized crop, flip.

    A random affine per image (on uint8), then :class:`ClassificationTransform` (random resized crop
    with scale (0.75, 1) - the paper gives no scale, our assumption - horizontal flip,
    normalisation). Randomness from ``generator`` or torch's global generator (seeded by the loop).
    """

    def __init__(self, size: int, rotation: float = 10.0, shear: float = 10.0, translate: float = 0.1) -> None:
        if rotation < 0 or shear < 0 or not 0 <= translate < 0.5:
            raise ValueError(f"rotation and shear must be >= 0 and translate in [0, 0.5), got {rotation}, {shear}, "
                             f"{translate}")
        self.rotation, self.shear, self.translate = float(rotation), float(shear), float(translate)
        self.crop = ClassificationTransform(size, train=True, scale=(0.75, 1.0), hflip=True)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (N, H, W) or (N, H, W, 3) -> normalised float (N, 3, size, size)."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"expected uint8 (N, H, W) or (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
        channels_last = x.ndim == 4
        chw = x.permute(0, 3, 1, 2) if channels_last else x[:, None]
        h, w = chw.shape[-2:]
        out = []
        for img in chw:
            u = torch.rand(4, generator=generator) * 2 - 1
            out.append(TF.affine(img, angle=float(u[0]) * self.rotation,
                                 translate=[int(round(float(u[1]) * self.translate * w)),
                                            int(round(float(u[2]) * self.translate * h))],
                                 scale=1.0, shear=[float(u[3]) * self.shear, 0.0],
                                 interpolation=InterpolationMode.BILINEAR, fill=0))
        moved = torch.stack(out)
        moved = moved.permute(0, 2, 3, 1) if channels_last else moved[:, 0]
        return self.crop(moved.contiguous(), generator=generator)


def seed001_transforms(size: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], ClassificationTransform]:
    """(train, eval) transforms of study 3 at ``size`` pixels."""
    return Seed001Augment(size), ClassificationTransform(size, train=False)


def backbone_fingerprint(backbone: Backbone) -> dict:
    """What identifies a backbone's starting point: name, weights file hash (None for random init), image size."""
    path = backbone.weights_path
    return {"name": backbone.name, "weights": file_hash(path) if path is not None else None,
            "image_size": backbone.image_size}


def _fold_seed_and_config(fold: Fold, setting: Setting, p: Profile) -> tuple[int, FinetuneConfig]:
    """The seed and fine-tuning settings of one run (one seed per fold, the same for every model)."""
    cfg = FinetuneConfig(epochs=p.eval.cv_epochs, batch_size=setting.batch_size, lr=setting.lr, backbone_lr=None,
                         weight_decay=0.0, select_on="val_loss")
    return p.seed * 1000 + fold.index, cfg


def fold_cache_dir(backbone: Backbone, ds: ImageSet, fold: Fold, setting: Setting, profile: Profile | str) -> Path:
    """``<cache>/crossval_folds/<key>``: where one run's record, history and test predictions are kept."""
    p = get_profile(profile)
    seed, cfg = _fold_seed_and_config(fold, setting, p)
    key = {"version": CODE_VERSION, "backbone": backbone_fingerprint(backbone), "data": ds.name, "n": len(ds),
           "images": array_fingerprint(np.asarray(ds.images[fold.test[:8]])), "fold": fold.index,
           "train": array_fingerprint(fold.train), "val": array_fingerprint(fold.val),
           "test": array_fingerprint(fold.test), "cfg": dataclasses.asdict(cfg), "size": p.backbone.image_size,
           "seed": seed}
    return artifact_dir("crossval_folds", key)


def run_fold(backbone: Backbone, ds: ImageSet, fold: Fold, setting: Setting, profile: Profile | str, *,
             device: str = "auto", progress: bool = False, cache: bool = True) -> dict:
    """Fine-tune ``backbone`` + the paper's head on one fold; return its record (cached on disk with the predictions).

    Head: CLS -> LayerNorm -> Linear(D, 256) -> ReLU -> Linear(256, 1), sigmoid + BCE; all
    parameters trained (AdamW, one lr, no weight decay); ``eval.cv_epochs`` epochs; the epoch
    with the lowest validation loss is restored (the authors' code forgot to copy it) and the
    restoration is checked by re-evaluating the returned model on val. Test is scored once.
    When the last training batch would hold a single image, that image is left out (BatchNorm).
    """
    p = get_profile(profile)
    if ds.task != "binary":
        raise ValueError(f"run_fold needs a binary task, got {ds.task!r} ({ds.name})")
    for part in ("train", "val", "test"):
        idx = getattr(fold, part)
        if len(idx) == 0:
            raise ValueError(f"fold {fold.index} of {ds.name}: the {part} part is empty")
    seed, cfg = _fold_seed_and_config(fold, setting, p)
    size = p.backbone.image_size
    folder = fold_cache_dir(backbone, ds, fold, setting, p)
    if cache and (folder / "result.json").exists():
        try:  # the predictions must be whole: an entry damaged or cut short by a kill is run again
            for name in ("test_probs.npy", "test_indices.npy"):
                verify_file(folder / name)
            record = json.loads((folder / "result.json").read_text())
            return {**record, "cached": True}
        except CorruptCacheError as err:
            discard_entry(folder, err)
            folder = fold_cache_dir(backbone, ds, fold, setting, p)
    train_idx = fold.train
    if len(train_idx) % cfg.batch_size == 1 and len(train_idx) > 1:
        train_idx = train_idx[:-1]  # a last batch of one image cannot train BatchNorm (CNNs): leave that image out
    train, val, test = ds.subset(train_idx), ds.subset(fold.val), ds.subset(fold.test)
    transform_train, transform_eval = seed001_transforms(size)
    torch.manual_seed(seed)  # the head's initialisation: the same for every run of this fold
    model = Classifier(copy.deepcopy(backbone).train(), MLPHead(backbone.embed_dim, 1))
    res = train_classifier(model, train, val, cfg, transform_train=transform_train, transform_eval=transform_eval,
                           seed=seed, device=device, progress=progress)
    restored_val_loss, _ = evaluate_loss(res.model, val, transform_eval, make_loss(val), cfg.batch_size,
                                         str(next(res.model.parameters()).device))
    best_val_loss = float(res.history["val_loss"].iloc[res.best_epoch])
    if not np.isclose(restored_val_loss, best_val_loss, rtol=1e-3, atol=1e-5):
        raise RuntimeError(f"fold {fold.index} of {ds.name}: the returned model has val loss {restored_val_loss:.5f}, "
                           f"not the best epoch's {best_val_loss:.5f}: the best epoch was not restored")
    probs = predict(res.model, test, transform_eval, batch_size=max(cfg.batch_size, 32), device=device)[:, 0]
    history = res.history
    record = {"fold": fold.index, "lr": setting.lr, "batch_size": setting.batch_size, "epochs": cfg.epochs,
              "best_epoch": int(res.best_epoch), "best_val_loss": best_val_loss,
              "restored_val_loss": float(restored_val_loss), "last_val_loss": float(history["val_loss"].iloc[-1]),
              "val_auroc": float(history["val_auroc"].iloc[res.best_epoch]),
              "test_auroc": macro_auroc(test, probs[:, None]), "n_train": len(train), "n_val": len(val),
              "n_test": len(test), "train_s": round(float(res.wall_time_s), 2), "selection": res.selection}
    if cache:
        save_npy(folder / "test_probs.npy", probs.astype(np.float32))
        save_npy(folder / "test_indices.npy", fold.test.astype(np.int64))
        history.to_csv(folder / "history.csv", index=False)
        save_json(folder / "result.json", record)
    return {**record, "cached": False}


def load_fold_predictions(backbone: Backbone, ds: ImageSet, fold: Fold, setting: Setting,
                          profile: Profile | str) -> tuple[np.ndarray, np.ndarray]:
    """(test indices, test probabilities) that :func:`run_fold` cached for this run; raises if it has not run."""
    folder = fold_cache_dir(backbone, ds, fold, setting, profile)
    if not (folder / "result.json").exists():
        raise FileNotFoundError(f"no cached run for {backbone.name} on {ds.name}, fold {fold.index}, {setting.label}; "
                                "call run_fold first")
    return np.asarray(load_npy(folder / "test_indices.npy")), np.asarray(load_npy(folder / "test_probs.npy"))


def cross_validate(models: StudyModels, datasets: Mapping[str, ImageSet], folds: Mapping[str, Sequence[Fold]],
                   profile: Profile | str, settings: Sequence[Setting] | None = None, roles: Sequence[str] = ROLES,
                   device: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Every (task, role, setting, fold) fine-tuning run; one row each (cached runs are read back, not re-run).

    The same folds serve every model. Columns: task, role, backbone, setting, lr, batch_size,
    fold, test_auroc, val_auroc, best_val_loss, restored_val_loss, best_epoch, ... and cached.
    """
    from tqdm.auto import tqdm

    settings = list(settings) if settings is not None else grid_settings(profile)
    jobs = [(task, role, s, f) for task in datasets for role in roles if models.get(role, task) is not None
            for s in settings for f in folds[task]]
    if not jobs:
        raise ValueError("no fine-tuning run to do: every role is missing its backbone")
    rows = []
    bar = tqdm(jobs, desc="5-fold fine-tuning", disable=not progress)
    for task, role, s, f in bar:
        bar.set_postfix_str(f"{task} {role} {s.label} fold {f.index}", refresh=False)
        bb = models.get(role, task)
        record = run_fold(bb, datasets[task], f, s, profile, device=device)
        rows.append({"task": task, "role": role, "arm": models.arm(role), "backbone": bb.name, "setting": s.label,
                     **record})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- tables


def select_settings(results: pd.DataFrame) -> pd.DataFrame:
    """Per (task, role): the grid setting with the best mean validation AUROC over folds (never test); ties: first.

    Returns ``results`` with a boolean ``chosen`` column.
    """
    missing = {"task", "role", "setting", "val_auroc", "fold"} - set(results.columns)
    if missing:
        raise ValueError(f"results lack columns {sorted(missing)}")
    order = {s: i for i, s in enumerate(dict.fromkeys(results["setting"]))}
    means = results.groupby(["task", "role", "setting"], sort=False)["val_auroc"].mean().reset_index()
    means["order"] = means["setting"].map(order)
    means = means.sort_values(["task", "role", "val_auroc", "order"], ascending=[True, True, False, True])
    best = means.drop_duplicates(["task", "role"])[["task", "role", "setting"]]
    chosen = set(map(tuple, best.to_numpy()))
    out = results.copy()
    out["chosen"] = [(t, r, s) in chosen for t, r, s in zip(out["task"], out["role"], out["setting"])]
    return out


def restore_check(results: pd.DataFrame) -> pd.DataFrame:
    """Per role: runs, cached runs, runs with the best epoch restored, runs whose best epoch is not the last one."""
    ok = np.isclose(results["restored_val_loss"], results["best_val_loss"], rtol=1e-3, atol=1e-5)
    frame = results.assign(restored=ok, best_not_last=results["best_epoch"] < results["epochs"] - 1)
    out = frame.groupby("role", sort=False).agg(runs=("fold", "size"), cached=("cached", "sum"),
                                                 best_epoch_restored=("restored", "sum"),
                                                 best_epoch_not_last=("best_not_last", "sum"))
    return out.reset_index()


def grid_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean test AUROC over folds per (role, setting) for each task, their average, and the mean val AUROC."""
    test = results.pivot_table(index=["role", "setting"], columns="task", values="test_auroc", aggfunc="mean",
                               sort=False)
    test["mean_test_auroc"] = test.mean(axis=1)
    val = results.groupby(["role", "setting"], sort=False)["val_auroc"].mean().rename("mean_val_auroc")
    out = test.join(val).reset_index()
    out.columns.name = None
    return out


def table1(results: pd.DataFrame) -> pd.DataFrame:
    """Long Table 1: per (task, role) the mean and std over folds of test AUROC at the chosen setting."""
    if "chosen" not in results:
        results = select_settings(results)
    chosen = results[results["chosen"]]
    rows = []
    for (task, role), g in chosen.groupby(["task", "role"], sort=False):
        rows.append({"task": task, "dataset": CV_TASKS[task].published if task in CV_TASKS else task, "role": role,
                     "arm": g["arm"].iloc[0] if "arm" in g else role, "backbone": g["backbone"].iloc[0],
                     "setting": g["setting"].iloc[0],
                     "mean": float(g["test_auroc"].mean()),
                     "std": float(g["test_auroc"].std(ddof=1)) if len(g) > 1 else float("nan"), "folds": len(g)})
    return pd.DataFrame(rows)


#: Lange & Shekel 2024, Table 1: test AUC, mean +- std over 5 folds; NaN where the paper has n/a. Rows are keyed
#: by our role names; the paper's arm of each role is :data:`PAPER_ARMS`.
PUBLISHED_TABLE1 = pd.DataFrame(
    [(d, r, m, s) for d, vals in {
        "Thyroid US": ((0.76, 0.14), (0.85, 0.09), (0.71, 0.01), (0.74, 0.03)),
        "Breast US": ((0.90, 0.10), (0.94, 0.05), (0.954, 0.005), (np.nan, np.nan)),
        "ACL MRI": ((0.91, 0.08), (0.97, 0.03), (0.957, 0.005), (0.966, 0.002)),
        "Meniscus MRI": ((0.92, 0.06), (0.96, 0.02), (0.91, 0.01), (0.927, 0.007)),
    }.items() for r, (m, s) in zip(ROLES, vals)],
    columns=["dataset", "role", "mean", "std"])


def table1_vs_paper(table: pd.DataFrame, profile: Profile | str) -> pd.DataFrame:
    """Our Table 1 beside the published one: dataset, role, backbone, ours (+ std), published (+ std), delta."""
    from ..reporting import paper_vs_ours

    p = get_profile(profile)
    merged = paper_vs_ours(table, PUBLISHED_TABLE1, on=["dataset", "role"], value="mean", profile=p)
    keep = ["dataset", "role", "std", "backbone"] + (["arm"] if "arm" in table else [])
    stds = table[keep].rename(columns={"std": "ours_std"}).merge(
        PUBLISHED_TABLE1[["dataset", "role", "std"]].rename(columns={"std": "published_std"}), on=["dataset", "role"],
        how="left")
    out = merged.merge(stds, on=["dataset", "role"], how="left")
    if "arm" not in out:
        out["arm"] = out["role"]
    out["published_arm"] = out["role"].map(PAPER_ARMS)
    return out[["dataset", "role", "arm", "backbone", "ours", "ours_std", "published_arm", "published", "published_std",
                "delta", "profile"]]


def format_table1(vs_paper: pd.DataFrame) -> pd.DataFrame:
    """Wide Table 1 for reading: one row per dataset, 'mean +- std' per arm, ours (our arm's name) and published
    (the paper's arm name)."""
    def fmt(m: float, s: float) -> str:
        if np.isnan(m):
            return "n/a"
        return f"{m:.3f} +- {s:.3f}" if not np.isnan(s) else f"{m:.3f}"

    rows = []
    for dataset, g in vs_paper.groupby("dataset", sort=False):
        row = {"dataset": dataset}
        for _, r in g.iterrows():
            arm = r["arm"] if "arm" in r and isinstance(r["arm"], str) else r["role"]
            row[f"{arm} (ours)"] = fmt(r["ours"], r["ours_std"])
            row[f"{PAPER_ARMS.get(r['role'], r['role'])} (published)"] = fmt(r["published"], r["published_std"])
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


def plot_ssl_curves(history: pd.DataFrame, title: str) -> Any:
    """Loss terms of the continuation against the step, one panel per term, one line per domain."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if history.empty:
        raise ValueError("no continuation history to plot (the model cards carry none and nothing ran here)")
    terms = list(dict.fromkeys(history["term"]))
    from ..reporting import model_colour

    palette = {b: model_colour(b) for b in dict.fromkeys(history["backbone"])}
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3.4), squeeze=False)
    for ax, term in zip(axes[0], terms):
        sns.lineplot(data=history[history["term"] == term], x="step", y="value", hue="backbone", marker=".",
                     ax=ax, legend=ax is axes[0][-1], palette=palette)
        if ax is axes[0][-1]:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
        ax.set_title(term.replace("_", " "))
        ax.set_xlim(left=0)  # no negative step tick running into the y labels
        ax.set_xlabel("SSL step")
        ax.set_ylabel("loss" if ax is axes[0][0] else "")
    fig.suptitle(title)
    return fig


def plot_knn_health(health: pd.DataFrame, title: str) -> Any:
    """Grouped bars: kNN AUROC of the no-network references (where given), random init, before and after the
    continuation, per task."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    sources = [c for c in ("pixel_stats", "pixels", "random_init", "before", "after") if c in health]
    long = health.melt(id_vars=["task"], value_vars=sources, var_name="backbone", value_name="knn_auroc")
    from ..reporting import model_colour

    fig, ax = plt.subplots(figsize=(7, 3.2))
    sns.barplot(data=long, x="task", y="knn_auroc", hue="backbone", ax=ax,
                palette={s: model_colour(s) for s in sources})
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    ax.axhline(0.5, color="grey", lw=1, ls=":")
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("task")
    ax.set_ylabel("kNN AUROC (k = 20)")
    ax.set_title(title)
    return fig


def plot_grid(results: pd.DataFrame, title: str) -> Any:
    """Heatmap: mean test AUROC over tasks and folds per (role, grid setting)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = results.groupby(["role", "setting"], sort=False)["test_auroc"].mean().unstack("setting")
    table = table.reindex([r for r in ROLES if r in table.index])
    if "arm" in results:
        table.index = table.index.map(dict(zip(results["role"], results["arm"])))
    fig, ax = plt.subplots(figsize=(max(6.0, 3.0 + 1.6 * table.shape[1]), 1.0 + 0.55 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=".3f", cmap="viridis", vmin=0.5, vmax=1.0, ax=ax,
                cbar_kws={"label": "mean test AUROC"})
    ax.set_xlabel("fine-tuning setting")
    ax.set_ylabel("model")
    ax.set_title(title)
    return fig


def plot_folds(results: pd.DataFrame, title: str, published: pd.DataFrame | None = PUBLISHED_TABLE1) -> Any:
    """Per task: each fold's test AUROC (dots), the mean per role (bar) at the chosen setting, published mean +- std."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if "chosen" not in results:
        results = select_settings(results)
    chosen = results[results["chosen"]]
    if "arm" not in chosen:
        chosen = chosen.assign(arm=chosen["role"])
    arm_of = dict(zip(chosen["role"], chosen["arm"]))
    tasks = list(dict.fromkeys(chosen["task"]))
    role_order = [r for r in ROLES if r in set(chosen["role"])]
    roles = [arm_of[r] for r in role_order]
    from ..reporting import model_colour

    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.6), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        g = chosen[chosen["task"] == task]
        sns.barplot(data=g, x="arm", y="test_auroc", order=roles, errorbar=None, alpha=0.35, ax=ax, color="C0")
        sns.stripplot(data=g, x="arm", y="test_auroc", order=roles, hue="fold", palette="dark", size=5, ax=ax,
                      legend=ax is axes[0][-1], jitter=0.15)
        if published is not None and task in CV_TASKS:
            pub = published[published["dataset"] == CV_TASKS[task].published].set_index("role")
            xs = [i for i, r in enumerate(role_order) if r in pub.index and not np.isnan(pub.loc[r, "mean"])]
            if xs:
                ax.errorbar([x + 0.3 for x in xs], [pub.loc[role_order[x], "mean"] for x in xs],
                            yerr=[pub.loc[role_order[x], "std"] for x in xs], fmt="D", color=model_colour("published"),
                            ms=4, capsize=2,
                            label="published (the paper's arm)" if ax is axes[0][0] else None)
        ax.axhline(0.5, color="grey", lw=1, ls=":")
        ax.set_title(CV_TASKS[task].published if task in CV_TASKS else task)
        ax.set_xlabel("")
        ax.set_ylabel("test AUROC per fold" if ax is axes[0][0] else "")
        ax.tick_params(axis="x", rotation=90)  # long arm names: vertical labels never run into each other
    if published is not None:
        axes[0][0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize=9, frameon=False)
    axes[0][-1].legend(title="fold", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                       frameon=False)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- intervals, claims and sanity flags

#: "approaches but does not reach": the continued ViT's mean AUROC lies within this far below the medical CNN's
#: (our assumption, fixed from the published gaps - thyroid 0.11, ACL 0.004, meniscus 0.033, mean 0.049 - before
#: any result of ours was read).
APPROACH_MARGIN = 0.06
#: "much smaller fold-to-fold spread": the ViTs' mean fold std is less than this share of the CNNs' (our
#: assumption; published: about 0.010 / 0.071 = 0.14).
SPREAD_RATIO = 0.5
#: Tasks of claim 1 and 5: the paper has no continued-SSL number on breast US.
CONTINUED_TASKS = ("thyroid_us", "acl_mri", "meniscus_mri")
#: Pixel baseline: L2 logistic regression (C) on area-downsampled pixels (side) - our assumption.
PIXEL_SIDE, PIXEL_C = 16, 0.1
STUDY = "03"


def _interval_text(n_boot: int) -> str:
    return (f"95% percentile bootstrap over test images ({n_boot} resamples, stratified by label within each fold's "
            "test part, the same resample for every arm)")


def chosen_predictions(results: pd.DataFrame, models: StudyModels, datasets: Mapping[str, ImageSet],
                       folds: Mapping[str, Sequence[Fold]], profile: Profile | str) -> pd.DataFrame:
    """Each test image's predicted probability per (task, role) at the chosen setting, from :func:`run_fold`'s cache.

    Long table: task, role, arm, fold, index, label, prob.
    """
    if "chosen" not in results:
        results = select_settings(results)
    rows = []
    for (task, role), g in results[results["chosen"]].groupby(["task", "role"], sort=False):
        ds, bb = datasets[task], models.get(role, task)
        y = ds.label_matrix()[:, 0]
        setting = Setting(float(g["lr"].iloc[0]), int(g["batch_size"].iloc[0]))
        for f in folds[task]:
            idx, probs = load_fold_predictions(bb, ds, f, setting, profile)
            rows.append(pd.DataFrame({"task": task, "role": role, "arm": models.arm(role), "fold": f.index,
                                      "index": idx, "label": y[idx], "prob": probs}))
    return pd.concat(rows, ignore_index=True)


def _auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` (B, n) against 0/1 ``labels`` (B, n) (ties count one half); NaN if one class."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    pos = labels > 0.5
    n_pos = pos.sum(1)
    n_neg = labels.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


@dataclass
class FoldAUROC:
    """Per-fold test AUROC of several arms on one task: the point values and paired bootstrap replicates."""

    task: str
    arms: list[str]  # keys (roles, or other names) in the order of the arrays' axis 1
    point: np.ndarray  # (A, F)
    boot: np.ndarray  # (B, A, F)
    labels: dict[str, str] = field(default_factory=dict)  # key -> label for tables (the ``arm`` column when given)

    def mean(self, arm: str) -> tuple[float, np.ndarray]:
        """(mean over folds, its bootstrap replicates) of one arm."""
        i = self.arms.index(arm)
        return float(np.nanmean(self.point[i])), np.nanmean(self.boot[:, i], axis=1)

    def std(self, arm: str) -> tuple[float, np.ndarray]:
        """(std over folds, ddof 1, its bootstrap replicates) of one arm."""
        i = self.arms.index(arm)
        return float(np.nanstd(self.point[i], ddof=1)), np.nanstd(self.boot[:, i], axis=1, ddof=1)


def bootstrap_fold_auroc(preds: pd.DataFrame, n_boot: int, seed: int = 0, key: str = "role") -> dict[str, FoldAUROC]:
    """Per task: each arm's per-fold AUROC and ``n_boot`` paired bootstrap replicates of it.

    ``preds`` has columns task, ``key``, fold, index, label, prob (one row per test image and arm,
    e.g. :func:`chosen_predictions`). Each replicate redraws every fold's test images with
    replacement, positives and negatives separately (so each fold keeps its class counts and its
    AUROC is defined), and scores every arm on the same redraw. Every replicate is an AUROC, so
    every percentile interval of it lies in [0, 1].
    """
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    rng = np.random.default_rng(seed)
    out = {}
    for task, g in preds.groupby("task", sort=False):
        arms = list(dict.fromkeys(g[key]))
        fold_ids = sorted(set(g["fold"]))
        point = np.full((len(arms), len(fold_ids)), np.nan)
        boot = np.full((n_boot, len(arms), len(fold_ids)), np.nan)
        for j, fold in enumerate(fold_ids):
            part = g[g["fold"] == fold]
            wide = part.pivot_table(index="index", columns=key, values="prob", aggfunc="first")
            labels = part.drop_duplicates("index").set_index("index")["label"].reindex(wide.index).to_numpy()
            pos, neg = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
            if len(pos) == 0 or len(neg) == 0:
                continue
            draw = np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)
            for i, arm in enumerate(arms):
                if arm not in wide:
                    continue
                s = wide[arm].to_numpy()
                point[i, j] = _auroc_rows(s[None], labels[None])[0]
                boot[:, i, j] = _auroc_rows(s[draw], labels[draw])
        labels = dict(zip(g[key], g["arm"])) if "arm" in g else {}
        out[task] = FoldAUROC(task, arms, point, boot, labels)
    return out


def _ci(reps: np.ndarray) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))


def _published(task: str, role: str, what: str = "mean") -> float:
    pub = PUBLISHED_TABLE1
    row = pub[(pub["dataset"] == CV_TASKS[task].published) & (pub["role"] == role)]
    return float(row[what].iloc[0]) if len(row) else float("nan")


def arm_auroc_table(boot: Mapping[str, FoldAUROC], arms: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per (task, arm): mean over folds of the test AUROC with its bootstrap interval (the sanity-gate input)."""
    rows = []
    n = 0
    for task, b in boot.items():
        n = b.boot.shape[0]
        for role in b.arms:
            m, reps = b.mean(role)
            lo, hi = _ci(reps)
            arm = (arms or {}).get(role, b.labels.get(role, role))
            rows.append({"task": task, "role": role, "arm": arm, "auroc": m,
                         "ci_low": min(lo, m), "ci_high": max(hi, m)})
    out = pd.DataFrame(rows)
    out["interval"] = _interval_text(n)
    return out


def _diff(boot: Mapping[str, FoldAUROC], tasks: Sequence[str], a: str, b: str, sign: Mapping[str, float] | None = None
          ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per task with both arms: (tasks, point differences a - b (times sign), replicates (B, T))."""
    used, points, reps = [], [], []
    for t in tasks:
        if t not in boot or a not in boot[t].arms or b not in boot[t].arms:
            continue
        s = (sign or {}).get(t, 1.0)
        ma, ra = boot[t].mean(a)
        mb, rb = boot[t].mean(b)
        used.append(t)
        points.append(s * (ma - mb))
        reps.append(s * (ra - rb))
    if not used:
        return [], np.zeros(0), np.zeros((0, 0))
    return used, np.asarray(points), np.stack(reps, axis=1)


def _contain(estimate: float, ci: tuple[float, float]) -> tuple[float, float]:
    """A percentile interval widened, if need be, to contain its point estimate (the verdict rule needs it)."""
    return (min(ci[0], estimate), max(ci[1], estimate))


def continuation_effects(boot: Mapping[str, FoldAUROC]) -> pd.DataFrame:
    """Per task: the continued ViT minus its parent (mean test AUROC over folds), with its interval and the paper's."""
    rows = []
    for t in boot:
        used, points, reps = _diff(boot, [t], CONT, NAT)
        if not used:
            continue
        lo, hi = _contain(points[0], _ci(reps[:, 0]))
        pub = _published(t, CONT) - _published(t, NAT)
        rows.append({"task": t, "dataset": CV_TASKS[t].published, "auroc_delta": float(points[0]),
                     "ci_low": lo, "ci_high": hi, "published_delta": pub, "interval": _interval_text(reps.shape[0])})
    return pd.DataFrame(rows, columns=["task", "dataset", "auroc_delta", "ci_low", "ci_high", "published_delta",
                                       "interval"])


def continuation_sentence(effects: pd.DataFrame, arms: Mapping[str, str] | None = None) -> str:
    """One clause per direction, generated from :func:`continuation_effects`: where the continuation helped or hurt."""
    if effects.empty:
        return "The continued ViT was not fine-tuned here, so its effect is not measured."
    cont, nat = (arms or {}).get(CONT, CONT), (arms or {}).get(NAT, NAT)
    parts = []
    for label, mask in (("lower than", effects["auroc_delta"] < 0), ("higher than", effects["auroc_delta"] > 0),
                        ("equal to", effects["auroc_delta"] == 0)):
        sel = effects[mask]
        if sel.empty:
            continue
        items = ", ".join(
            f"{r.dataset} ({r.auroc_delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
            f"{'; the interval excludes 0' if (r.ci_high < 0 or r.ci_low > 0) else '; the interval includes 0'}"
            f"{'' if np.isnan(r.published_delta) else f', published {r.published_delta:+.3f}'})"
            for r in sel.itertuples(index=False))
        parts.append(f"{cont} is {label} its parent {nat} on {items}")
    return "After fine-tuning, " + "; ".join(parts) + "."


def study_claims(boot: Mapping[str, FoldAUROC]) -> list[dict]:
    """The five claims of Lange & Shekel 2024 (claims.md, section 03) as :func:`medlib.eval.claims.claim` rows.

    Every estimate is a function of the mean-over-folds test AUROCs of Table 1 (or their fold std),
    its interval the same function of the paired bootstrap replicates (:func:`bootstrap_fold_auroc`).
    """
    from ..eval.claims import claim

    n_boot = next(iter(boot.values())).boot.shape[0] if boot else 0
    how = _interval_text(n_boot)
    all_tasks = list(CV_TASKS)
    rows = []

    used, points, reps = _diff(boot, CONTINUED_TASKS, CONT, NAT)
    text = "Continued domain SSL improves on the natural DINOv2 (thyroid, ACL, meniscus)"
    published = "thyroid 0.71 -> 0.74, ACL 0.957 -> 0.966, meniscus 0.91 -> 0.927"
    if used:
        est = float(points.mean())
        pub = float(np.mean([_published(t, CONT) - _published(t, NAT) for t in used]))
        rows.append(claim(STUDY, 1, text, published, f"mean over {', '.join(used)} of AUROC({CONT}) - AUROC({NAT})",
                          est, _contain(est, _ci(reps.mean(1))), interval=how, published_effect=pub,
                          note=f"per task: {', '.join(f'{t} {p:+.3f}' for t, p in zip(used, points))}"))
    else:
        rows.append(claim(STUDY, 1, text, published, "", not_tested="the continued ViT has no fine-tuning results"))

    used, points, reps = _diff(boot, all_tasks, MED, IN)
    text = "The medical-supervised CNN (RadImageNet) beats the ImageNet CNN on all four tasks"
    if used:
        est = float(points.min())
        pub = float(min(_published(t, MED) - _published(t, IN) for t in used))
        rows.append(claim(STUDY, 2, text, "RIN - IN: +0.09, +0.04, +0.06, +0.04", f"min over {len(used)} tasks of "
                          f"AUROC({MED}) - AUROC({IN})", est, _contain(est, _ci(reps.min(1))), interval=how,
                          published_effect=pub,
                          note=f"per task: {', '.join(f'{t} {p:+.3f}' for t, p in zip(used, points))}"))
    else:
        rows.append(claim(STUDY, 2, text, "", "", not_tested="an arm is missing"))

    sign = {t: (1.0 if t == "breast_us" else -1.0) for t in all_tasks}
    used, points, reps = _diff(boot, all_tasks, NAT, MED, sign)
    text = "Natural DINOv2 is below RadImageNet on three of four tasks and above it on breast US"
    if used:
        est = float(points.min())
        pub = float(min(sign[t] * (_published(t, NAT) - _published(t, MED)) for t in used))
        rows.append(claim(STUDY, 3, text, "DINOv2 - RIN: thyroid -0.14, ACL -0.013, meniscus -0.05, breast +0.014",
                          f"min over {len(used)} tasks of s * (AUROC({NAT}) - AUROC({MED})), s = +1 on breast US, "
                          "-1 elsewhere", est, _contain(est, _ci(reps.min(1))), interval=how, published_effect=pub,
                          note=f"signed per task: {', '.join(f'{t} {p:+.3f}' for t, p in zip(used, points))}"))
    else:
        rows.append(claim(STUDY, 3, text, "", "", not_tested="an arm is missing"))

    vit, cnn = [], []
    for b in boot.values():
        for role, bucket in ((NAT, vit), (CONT, vit), (IN, cnn), (MED, cnn)):
            if role in b.arms:
                bucket.append(b.std(role))
    text = "The DINOv2 variants have much smaller fold-to-fold spread than the CNNs"
    if vit and cnn and all(len(b.point[0]) > 1 for b in boot.values()):
        v_point, c_point = np.mean([p for p, _ in vit]), np.mean([p for p, _ in cnn])
        v_reps, c_reps = np.mean([r for _, r in vit], axis=0), np.mean([r for _, r in cnn], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            est = float(v_point / c_point - SPREAD_RATIO)
            reps_ratio = v_reps / c_reps - SPREAD_RATIO
        rows.append(claim(STUDY, 4, text, "std 0.002-0.03 (DINOv2) vs 0.02-0.14 (CNNs); ratio of means about 0.14",
                          f"mean fold std (SSL ViTs) / mean fold std (CNNs) - {SPREAD_RATIO:g} ('much smaller' = "
                          f"under {SPREAD_RATIO:g} of the CNNs' spread, our assumption)", est,
                          _contain(est, _ci(reps_ratio)), interval=how, direction=-1,
                          published_effect=0.0099 / 0.0713 - SPREAD_RATIO,
                          note=f"mean fold std: SSL ViTs {v_point:.3f}, CNNs {c_point:.3f}"))
    else:
        rows.append(claim(STUDY, 4, text, "", "", not_tested="fewer than two folds or an arm family missing"))

    used, points, reps = _diff(boot, CONTINUED_TASKS, CONT, MED)
    text = "Continued SSL approaches but does not reach RadImageNet"
    if used:
        half = APPROACH_MARGIN / 2
        est = float(points.mean() + half)
        rows.append(claim(STUDY, 5, text, "continued - RIN: thyroid -0.11, ACL -0.004, meniscus -0.033",
                          f"mean over {', '.join(used)} of AUROC({CONT}) - AUROC({MED}), plus {half:g} (so "
                          f"'approaches but does not reach' = the gap lies in [-{APPROACH_MARGIN:g}, 0], our "
                          "assumption)", est, _contain(est, _ci(reps.mean(1) + half)), interval=how,
                          kind="equivalence", margin=half,
                          note=f"gap {points.mean():+.3f}; per task: "
                               f"{', '.join(f'{t} {p:+.3f}' for t, p in zip(used, points))}"))
    else:
        rows.append(claim(STUDY, 5, text, "", "", not_tested="the continued ViT has no fine-tuning results"))
    return rows


def pixel_baseline_predictions(datasets: Mapping[str, ImageSet], folds: Mapping[str, Sequence[Fold]],
                               side: int = PIXEL_SIDE, c: float = PIXEL_C) -> pd.DataFrame:
    """What a trivial image model gets on the same folds: L2 logistic regression on ``side`` x ``side`` pixels.

    Fitted on each fold's train + val images, scored on its test images. Long table in the form of
    :func:`chosen_predictions` (role ``pixels``).
    """
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression

    rows = []
    for task, ds in datasets.items():
        y = ds.label_matrix()[:, 0]
        x = torch.as_tensor(np.asarray(ds.images), dtype=torch.float32)
        x = x.mean(-1) if x.ndim == 4 else x
        feats = F.interpolate(x[:, None], size=(side, side), mode="area")[:, 0].reshape(len(ds), -1).numpy() / 255.0
        for f in folds[task]:
            fit = np.concatenate([f.train, f.val])
            model = LogisticRegression(C=c, max_iter=5000).fit(feats[fit], y[fit])
            rows.append(pd.DataFrame({"task": task, "role": "pixels", "arm": "pixels", "fold": f.index,
                                      "index": f.test, "label": y[f.test],
                                      "prob": model.predict_proba(feats[f.test])[:, 1]}))
    return pd.concat(rows, ignore_index=True)


def knn_health_predictions(models: StudyModels, datasets: Mapping[str, ImageSet], folds: Mapping[str, Sequence[Fold]],
                           profile: Profile | str, device: str = "cpu", random_init: Backbone | None = None,
                           pixels: bool = True) -> pd.DataFrame:
    """Each test image's kNN score (k = 20, T = 0.07) per fold for random init, before, after and two pixel references.

    ``pixels`` adds two references that use no network: a kNN on the 16 x 16 area-downsampled
    pixels (``pixels``) and one on grey-level histogram + 4 x 4 mean intensities
    (``pixel_stats``, :func:`medlib.models.health.pixel_statistics_features`, standardised on each
    fold's training pool). Long table in the form of :func:`chosen_predictions`.
    """
    import torch.nn.functional as F
    from ..eval.knn import knn_predict_proba
    from ..models.health import KNN_K, KNN_T, extract_cls, pixel_statistics_features

    size = get_profile(profile).backbone.image_size
    rows = []
    for task, ds in datasets.items():
        y = ds.label_matrix()[:, 0].astype(int)
        sources: list[tuple[str, np.ndarray]] = []
        for which, bb in (("random_init", random_init), ("before", models.get(NAT, task)),
                          ("after", models.get(CONT, task))):
            if bb is not None:
                sources.append((which, extract_cls(bb.model, np.array(ds.images), size, device)))
        if pixels:
            x = torch.as_tensor(np.asarray(ds.images), dtype=torch.float32)
            x = x.mean(-1) if x.ndim == 4 else x
            px = F.interpolate(x[:, None], size=(PIXEL_SIDE, PIXEL_SIDE), mode="area")[:, 0].reshape(len(ds), -1)
            sources.append(("pixels", px.numpy()))
            sources.append(("pixel_stats", pixel_statistics_features(np.asarray(ds.images))))
        for which, feats in sources:
            for f in folds[task]:
                pool = np.concatenate([f.train, f.val])
                if which == "pixel_stats":
                    mu, sd = feats[pool].mean(0), feats[pool].std(0) + 1e-6
                    fs = (feats - mu) / sd
                    proba = knn_predict_proba(fs[pool], y[pool], fs[f.test], 2, k=KNN_K, temperature=KNN_T)
                    rows.append(pd.DataFrame({"task": task, "role": which, "arm": which, "fold": f.index,
                                              "index": f.test, "label": y[f.test], "prob": proba[:, 1]}))
                    continue
                proba = knn_predict_proba(feats[pool], y[pool], feats[f.test], 2, k=KNN_K, temperature=KNN_T)
                arm = {"before": models.arm(NAT), "after": models.arm(CONT)}.get(which, which)
                rows.append(pd.DataFrame({"task": task, "role": which, "arm": arm, "fold": f.index,
                                          "index": f.test, "label": y[f.test], "prob": proba[:, 1]}))
    return pd.concat(rows, ignore_index=True)


def _sanity_input(table: pd.DataFrame, metric: str, reference: str, reference_value: Mapping[str, float] | float
                  ) -> pd.DataFrame:
    ref = table["task"].map(reference_value) if isinstance(reference_value, Mapping) else reference_value
    return pd.DataFrame({"model": table["arm"], "task": table["task"], "metric": metric, "score": table["auroc"],
                         "ci_low": table["ci_low"], "ci_high": table["ci_high"], "reference": reference,
                         "reference_value": ref})


def below_chance_explanations(arms: pd.DataFrame, pixels: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Explanations of below-chance arms that the numbers support: the same folds defeat a pixel model too.

    An arm below chance on a task is explained only when the logistic regression on raw pixels
    (:func:`pixel_baseline_predictions`), fitted and tested on exactly the same folds, is itself
    wholly below chance there: then the test parts of this data draw are anti-predictable from what
    the training parts show, whatever the model, and the fine-tuned arms inherit it. A task where
    the pixel model is at or above chance gets no explanation (the flag then fails a ``tiny`` run).
    """
    out = {}
    for r in pixels.itertuples(index=False):
        if r.ci_high < 0.5:
            out[("*", r.task)] = (
                f"the same folds defeat a model with no pretraining: logistic regression on {PIXEL_SIDE} x "
                f"{PIXEL_SIDE} pixels scores {r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] on them. The finding is "
                "a sub-pixel line at the input size (tests/test_radimagenet_ssl_continuation_claims.py checks the "
                "labels against the generator and the line's footprint), so no arm learns it from this many images, "
                "and each fold's training part carries chance associations of this draw that its test part reverses")
    return out


def knn_explanations(knn: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Explanations of trained ViTs below random init in kNN that the numbers support: a pixel-level task.

    Random init is explained away as a floor on a task only where a kNN with no network - on raw
    pixels or on pixel statistics - scores at least as high as random init there: random features at this size keep the
    pixel information, and such a task is separable from pixels alone. The SSL recipe trains
    invariance to crops, flips, blur, brightness and contrast, which discards part of that pixel-level
    information; the fine-tuned Table 1, not kNN, is the comparison of the arms.
    """
    out = {}
    for task, g in knn.groupby("task", sort=False):
        by = g.set_index("role")
        refs = [r for r in ("pixels", "pixel_stats") if r in by.index]
        if not refs or "random_init" not in by.index:
            continue
        best = max(refs, key=lambda r: by.loc[r, "auroc"])
        px, rnd = by.loc[best, "auroc"], by.loc["random_init", "auroc"]
        what = (f"{PIXEL_SIDE} x {PIXEL_SIDE} pixels" if best == "pixels"
                else "pixel statistics (grey-level histogram and 4 x 4 mean intensities)")
        if px >= rnd:
            out[("*", task)] = (
                f"the task is separable from pixels alone: a kNN on {what}, with no network, "
                f"scores {px:.3f} against random init's {rnd:.3f}, so random init is a pixel-level reference here, not "
                "a floor; the SSL recipe trains invariance to crops, flips, blur, brightness and contrast, which "
                "discards part of "
                "that pixel information (kNN measures neighbourhoods, not what fine-tuning can learn)")
    return out


def study_sanity_flags(arms: pd.DataFrame, knn: pd.DataFrame, pixels: pd.DataFrame) -> pd.DataFrame:
    """Sanity flags of notebook 03: any fine-tuned arm below chance, any trained ViT below random init in kNN.

    ``arms``: :func:`arm_auroc_table` of the fine-tuned arms; ``knn``: :func:`arm_auroc_table` of
    :func:`knn_health_predictions`; ``pixels``: :func:`arm_auroc_table` of the pixel baseline.
    """
    from ..eval.claims import SANITY_COLUMNS, sanity_flags

    frames = [sanity_flags(_sanity_input(arms, "test AUROC (mean over folds)", "chance", 0.5), study=STUDY,
                           table="03_table1", explanations=below_chance_explanations(arms, pixels))]
    rnd = knn[knn["role"] == "random_init"].set_index("task")["auroc"].to_dict()
    trained = knn[knn["role"].isin(["before", "after"])]
    if len(trained) and rnd:
        trained = trained[trained["task"].isin(list(rnd))]
        frames.append(sanity_flags(_sanity_input(trained, "kNN AUROC (mean over folds)", "random init", rnd),
                                   study=STUDY, table="03_knn_health", explanations=knn_explanations(knn)))
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SANITY_COLUMNS)


def knn_health_wide(knn: pd.DataFrame) -> pd.DataFrame:
    """One row per task from :func:`arm_auroc_table` of :func:`knn_health_predictions`: each source's kNN AUROC
    (mean over folds) and its interval, and ``gain`` = after - before."""
    rows = []
    for task, g in knn.groupby("task", sort=False):
        row: dict[str, Any] = {"task": task, "domain": CV_TASKS[task].domain if task in CV_TASKS else ""}
        for r in g.itertuples(index=False):
            row[r.role] = r.auroc
            row[f"{r.role}_ci_low"], row[f"{r.role}_ci_high"] = r.ci_low, r.ci_high
        row["gain"] = row.get("after", np.nan) - row.get("before", np.nan)
        rows.append(row)
    out = pd.DataFrame(rows)
    out["interval"] = knn["interval"].iloc[0] if len(knn) else ""
    return out

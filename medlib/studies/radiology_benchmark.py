"""Study 1 (Baharoon et al. 2023, arXiv 2312.02366): runners that loop over backbones x data sets and return tidy tables.

Notebook ``01_dinov2_radiology_benchmark`` stays a sequence of short calls to this module:

- data and models: :func:`load_datasets` (the four radiology benchmarks of the study, as
  phantoms or, in the ``paper`` profile, the sources the profile names), :func:`make_splits`
  (patient-grouped train / val / test), :func:`load_backbones`, :func:`model_card_health` (the
  build-time health check of our self-trained backbones), :func:`primary_backbone` (the one that
  plays DINOv2), :func:`extract_all`;
- frozen-feature evaluations: :func:`knn_table` (weighted vote, ML-kNN for multi-label),
  :func:`probe_table` (the linear-probe grid and logistic regression, chosen on val, refit on
  train + val, tested once), :func:`few_shot_table` (seeded repeats with 95 % intervals and
  the authors' single deterministic draw);
- fine-tuning: :func:`peft_table` (full / LoRA / BitFit / linear) and
  :func:`parameter_share_table` (trainable share of LoRA and BitFit, counted on any timm
  architecture without building its weights);
- segmentation: :func:`segmentation_sets`, :func:`segmentation_table` (frozen linear head,
  frozen U-Net decoder, U-Net from scratch), :func:`segmentation_few_shot_table` (as many
  optimiser steps for every n: :func:`equal_step_epochs`), :func:`summarize_repeats`;
- published figures: :data:`PUBLISHED_FEW_SHOT_NIH`, :data:`PUBLISHED_SEG_MONTGOMERY`,
  :func:`published_counterpart` (which of our backbones stands in for which published
  model), :func:`few_shot_vs_paper`, :func:`segmentation_vs_paper`; :func:`headline_table`;
- figures: :func:`plot_heatmap`, :func:`plot_few_shot`, :func:`plot_peft`,
  :func:`plot_seg_few_shot`, :func:`plot_seg_overlays`.

Every runner takes the profile for its sizes, so no size is written in the notebook.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import Profile, get_profile
from ..data import phantoms
from ..data.imageset import ImageSet
from ..data.sources import load_source
from ..data.splits import evenly_spaced_indices, patient_split
from ..engine import equal_step_epochs
from ..eval.claims import claim, claims_frame, sanity_flags
from ..eval.stats import bootstrap_ci
from ..models.adapters import LORA_DEFAULT_TARGETS, apply_bitfit, apply_lora, trainable_parameter_report
from ..models.backbones import Backbone, WeightsNotFoundError, create_backbone, get_spec, load_model_card
from ..models.health import draw_gains_text
from ..reporting import overlay_masks, paper_vs_ours
from ..eval import fewshot, segmentation
from ..eval.features import FeatureSet, extract_features
from ..eval.knn import knn_predict_proba
from ..eval.linear import linear_probe, logistic_regression_probe
from ..eval.metrics import classification_metrics
from ..eval.mlknn import MLkNN
from ..eval.peft_finetune import MODES, default_config, finetune_backbone

SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class BenchmarkDataset:
    """One benchmark of study 1: the phantom that stands in for it, or the profile source that replaces it."""

    family: str  # phantom family
    params: Mapping[str, Any]  # make_dataset keyword arguments (site, target)
    source_key: str | None  # key of profile.data.sources that replaces the phantom (paper profile)
    stands_in_for: str  # the real benchmark(s) of the paper it mimics
    seg_params: Mapping[str, Any] = field(default_factory=dict)  # generator parameters of its segmentation set


STUDY1_DATASETS: Mapping[str, BenchmarkDataset] = {
    "chest_xray": BenchmarkDataset("cxr", {"site": 0}, "cxr_multilabel", "NIH ChestX-ray14 / CheXpert (multi-label)"),
    # classification reads OrganAMNIST-like organ-centred crops; segmentation whole axial slices, as BTCV / AMOS
    "ct_organs": BenchmarkDataset("ct", {}, "organ_ct", "abdominal CT organs (BTCV / AMOS, OrganAMNIST)",
                                  seg_params={"view": "slice"}),
    "knee_acl": BenchmarkDataset("knee", {"target": "acl_tear"}, "knee_mri", "knee MRI ACL tear (MRNet-like)"),
    "breast_us": BenchmarkDataset("breast_us", {}, "breast_us", "breast ultrasound, benign vs malignant"),
}
#: Segmentation: the data key of a masked set replacing a benchmark's own images (``paper``: Montgomery / JSRT /
#: Shenzhen lung masks, an AMOS-like CT organ set); without one the benchmark's own images (phantoms have masks).
SEG_SOURCE_KEYS: Mapping[str, str] = {"chest_xray": "cxr_segmentation", "ct_organs": "ct_segmentation"}


def load_datasets(profile: Profile | str, names: Sequence[str] | None = None,
                  progress: bool = False) -> dict[str, ImageSet]:
    """The study's data sets: the profile's source where it names one, else the phantom (n_per_dataset images).

    A benchmark with neither (a ``paper`` profile without a source for it) is left out with
    a warning; none at all raises.
    """
    p = get_profile(profile)
    names = list(STUDY1_DATASETS) if names is None else list(names)
    unknown = [n for n in names if n not in STUDY1_DATASETS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(STUDY1_DATASETS)}")
    out: dict[str, ImageSet] = {}
    for name in names:
        spec = STUDY1_DATASETS[name]
        if spec.source_key and spec.source_key in p.data.sources:
            out[name] = load_source(p.data.sources[spec.source_key])
        elif p.data.n_per_dataset > 0:
            out[name] = phantoms.make_dataset(spec.family, n=p.data.n_per_dataset, size=p.data.phantom_size,
                                              seed=p.seed, progress=progress, **dict(spec.params))
        else:
            warnings.warn(f"profile {p.name!r} has no source for {name!r} (data.sources[{spec.source_key!r}]) and "
                          "no phantoms (n_per_dataset=0); left out", stacklevel=2)
    if not out:
        raise ValueError(f"profile {p.name!r} provides none of {names}; add sources to profile.data.sources")
    return out


def make_splits(datasets: Mapping[str, ImageSet], seed: int = 0,
                fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, dict[str, np.ndarray]]:
    """Patient-grouped, label-stratified train / val / test indices of every data set."""
    return {name: patient_split(ds, fractions, seed=seed) for name, ds in datasets.items()}


def describe_datasets(datasets: Mapping[str, ImageSet], splits: Mapping[str, Mapping[str, np.ndarray]]
                      ) -> pd.DataFrame:
    """One row per data set: what it stands in for, task, labels, images, patients and split sizes."""
    rows = []
    for name, ds in datasets.items():
        split = splits[name]
        rows.append({"dataset": name, "stands_in_for": STUDY1_DATASETS[name].stands_in_for if name in STUDY1_DATASETS
                     else "", "source": ds.name, "task": ds.task, "labels": len(ds.label_names),
                     "images": len(ds), "patients": int(np.unique(ds.patient_ids).size),
                     **{part: int(len(split[part])) for part in ("train", "val", "test")}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- backbones and features


def load_backbones(names: Sequence[str], image_size: int | None = None, skip_missing: bool = True
                   ) -> tuple[dict[str, Backbone], pd.DataFrame]:
    """Build each named backbone at ``image_size``; with ``skip_missing`` one without weights is listed, not fatal.

    Returns the loaded backbones and a status table (backbone, kind, parameters in millions,
    status, reason). Raises when no backbone could be loaded.
    """
    loaded: dict[str, Backbone] = {}
    rows = []
    for name in names:
        try:
            backbone = create_backbone(name, image_size=image_size)
        except WeightsNotFoundError as err:
            if not skip_missing:
                raise
            rows.append({"backbone": name, "kind": "", "params_M": float("nan"), "status": "missing",
                         "reason": str(err).split(". ")[0]})
            continue
        loaded[name] = backbone
        rows.append({"backbone": name, "kind": backbone.kind,
                     "params_M": sum(p.numel() for p in backbone.parameters()) / 1e6, "status": "loaded",
                     "reason": backbone.spec.description})
    if not loaded:
        raise WeightsNotFoundError(f"none of the backbones {list(names)} has weights here; see the table of reasons "
                                   "or build them with `make backbones`")
    return loaded, pd.DataFrame(rows)


def model_card_health(names: Sequence[str]) -> pd.DataFrame:
    """The recorded health check of each embedded backbone among ``names`` (kNN AUROC gain over random init).

    Columns: backbone, passed, own_task_auroc_gain (supervised backbones: the criterion), domain_auroc_gain (SSL
    continued on a domain: the criterion, its domain's held-out phantom task), mean_auroc_gain
    (transfer to the phantom tasks under shift, mean over held-out draws: the SSL criterion), gain_per_draw (that
    gain in each draw, e.g. "+0.07 / +0.04 / +0.03"), transfer_passed, natural_auroc_gain (the natural-shapes task,
    recorded beside it), criterion, training, device. Keys a card predates are NaN / empty.
    Backbones that are not project-trained, or have no model card, are left out.
    """
    columns = ["backbone", "passed", "own_task_auroc_gain", "domain_auroc_gain", "mean_auroc_gain", "gain_per_draw",
               "transfer_passed", "natural_auroc_gain", "criterion", "training", "device"]
    rows = []
    for name in names:
        if get_spec(name).source != "embedded":
            continue
        card = load_model_card(name)
        if not card or "health" not in card:
            continue
        health, training = card["health"], card.get("training", {})
        length = (f"{training['steps']} steps" if "steps" in training else
                  f"{training['epochs']} epochs" if "epochs" in training else "")
        rows.append({"backbone": name, "passed": bool(health.get("passed")),
                     "own_task_auroc_gain": float(health.get("own_task", {}).get("auroc_gain", float("nan"))),
                     "domain_auroc_gain": float(health.get("domain", {}).get("auroc_gain", float("nan"))),
                     "mean_auroc_gain": float(health.get("mean_auroc_gain", float("nan"))),
                     "gain_per_draw": draw_gains_text(health),
                     "transfer_passed": bool(health.get("transfer_passed", health.get("passed"))),
                     "natural_auroc_gain": float(health.get("natural_auroc_gain", float("nan"))),
                     "criterion": health.get("criterion", ""), "training": length, "device": card.get("device", "")})
    return pd.DataFrame(rows, columns=columns)


def extract_all(backbones: Mapping[str, Backbone], datasets: Mapping[str, ImageSet], *, image_size: int | None = None,
                batch_size: int = 128, n_last: int = 4, device: str = "auto",
                progress: bool = False) -> dict[tuple[str, str], FeatureSet]:
    """Cached frozen features of every (backbone, data set) pair, keyed by (backbone name, data set name)."""
    return {(b, d): extract_features(backbone, ds, image_size=image_size, n_last=n_last, batch_size=batch_size,
                                     device=device, progress=progress)
            for b, backbone in backbones.items() for d, ds in datasets.items()}


def _parts(fs: FeatureSet, split: Mapping[str, np.ndarray]) -> tuple[FeatureSet, FeatureSet, FeatureSet]:
    return fs.subset(split["train"]), fs.subset(split["val"]), fs.subset(split["test"])


# --------------------------------------------------------------------------- kNN


def _accuracy(task: str, y: np.ndarray, proba: np.ndarray) -> float:
    """Top-1 accuracy for single-label tasks (binary at 0.5); NaN for multi-label."""
    if task == "multiclass":
        return float((proba.argmax(1) == np.asarray(y)).mean())
    if task == "binary":
        return float(((proba[:, 0] >= 0.5) == (np.asarray(y)[:, 0] > 0.5)).mean())
    return float("nan")


def knn_scores(train: FeatureSet, query: FeatureSet, k: int, temperature: float = 0.07, s: float = 1.0
               ) -> tuple[np.ndarray, str, int]:
    """The authors' kNN: ML-kNN (cosine, smoothing s) for multi-label, DINOv2's weighted vote otherwise.

    Returns the query probabilities (binary: the positive column only), the method's name
    and the k actually used (ML-kNN caps k at n_train - 1, the vote at n_train).
    """
    if train.task == "multilabel":
        model = MLkNN(k=k, s=s).fit(train.cls, np.asarray(train.labels))
        return model.predict_proba(query.cls), "ML-kNN", model.k_
    labels = np.asarray(train.labels)
    labels = labels[:, 0].astype(np.int64) if train.task == "binary" else labels.astype(np.int64)
    n_classes = 2 if train.task == "binary" else train.n_classes
    proba = knn_predict_proba(train.cls, labels, query.cls, n_classes=n_classes, k=k, temperature=temperature)
    return (proba[:, 1:] if train.task == "binary" else proba), "weighted vote", min(k, len(train))


AUROC_INTERVAL = "95 % percentile bootstrap over test images"


def auroc_interval(task: str, y_true: np.ndarray, proba: np.ndarray, n_resamples: int = 1000, seed: int = 0
                   ) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the macro test AUROC over test images (inside [0, 1] by construction).

    Multi-class labels are one-hot coded, so the macro is one-vs-rest over classes as in
    :func:`medlib.eval.metrics.multiclass_auroc`; a resample where a label has one class only
    leaves that label out of that resample's macro.
    """
    y = np.asarray(y_true)
    s = np.asarray(proba, dtype=float)
    if task == "multiclass":
        y = np.eye(s.shape[1])[y.astype(np.int64).ravel()]
    ci = bootstrap_ci(y, s, "auroc", n_resamples=max(int(n_resamples), 10), seed=seed)
    return float(ci.low), float(ci.high)


def knn_table(features: Mapping[tuple[str, str], FeatureSet], splits: Mapping[str, Mapping[str, np.ndarray]],
              ks: Sequence[int], temperature: float = 0.07, s: float = 1.0, n_resamples: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """kNN on the train split for every (backbone, data set, k): val and test macro AUROC, k chosen on val.

    Columns: backbone, dataset, task, method, k, k_used, val_auroc, test_auroc, test_auroc_ci_low /
    test_auroc_ci_high (:func:`auroc_interval`, on the selected rows), test_accuracy (single-label
    tasks), selected (the k with the best val AUROC of that pair; test never chooses), interval.
    """
    rows, probas = [], []
    for (backbone, dataset), fs in features.items():
        train, val, test = _parts(fs, splits[dataset])
        for k in ks:
            val_proba, method, used = knn_scores(train, val, k, temperature, s)
            test_proba, _, _ = knn_scores(train, test, k, temperature, s)
            rows.append({"backbone": backbone, "dataset": dataset, "task": fs.task, "method": method, "k": int(k),
                         "k_used": int(used),
                         "val_auroc": classification_metrics(fs.task, np.asarray(val.labels), val_proba)["auroc"],
                         "test_auroc": classification_metrics(fs.task, np.asarray(test.labels), test_proba)["auroc"],
                         "test_accuracy": _accuracy(fs.task, np.asarray(test.labels), test_proba)})
            probas.append((fs.task, np.asarray(test.labels), test_proba))
    table = _mark_selected(pd.DataFrame(rows), ["backbone", "dataset"], "val_auroc")
    table["test_auroc_ci_low"], table["test_auroc_ci_high"], table["interval"] = np.nan, np.nan, ""
    for i in np.flatnonzero(table["selected"].to_numpy()):
        low, high = auroc_interval(*probas[i], n_resamples=n_resamples, seed=seed)
        table.loc[table.index[i], ["test_auroc_ci_low", "test_auroc_ci_high", "interval"]] = [low, high,
                                                                                                 AUROC_INTERVAL]
    return table


def _mark_selected(table: pd.DataFrame, by: list[str], column: str) -> pd.DataFrame:
    """Add a bool column ``selected``: the first row with the highest ``column`` in each group."""
    table = table.copy()
    table["selected"] = False
    scores = table[column].fillna(-np.inf)
    for _, index in table.groupby(by, sort=False).groups.items():
        table.loc[scores.loc[index].idxmax(), "selected"] = True
    return table


# --------------------------------------------------------------------------- probes


def probe_table(features: Mapping[tuple[str, str], FeatureSet], splits: Mapping[str, Mapping[str, np.ndarray]],
                profile: Profile | str, *, logistic: bool = True, device: str = "auto") -> pd.DataFrame:
    """Linear-probe grid (and logistic regression) per (backbone, data set): chosen on val, refit train+val, test once.

    Columns: backbone, dataset, task, probe, chosen (the selected configuration), val_auroc
    (of the chosen configuration), test_auroc, test_accuracy (multi-class only), n_train,
    n_val, n_test, seconds.
    """
    p = get_profile(profile)
    rows = []
    for (backbone, dataset), fs in features.items():
        train, val, test = _parts(fs, splits[dataset])
        runs: list[tuple[str, Callable[[], Any]]] = [
            ("linear grid", lambda: linear_probe(train, val, test, profile=p, seed=p.seed, device=device))]
        if logistic:
            runs.append(("logistic regression",
                         lambda: logistic_regression_probe(train, val, test, n_c=p.eval.logreg_n_c)))
        for probe, run in runs:
            start = time.perf_counter()
            result = run()
            chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.chosen.items())
            best = result.grid.loc[result.grid[list(result.chosen)].eq(pd.Series(result.chosen)).all(axis=1)]
            low, high = (auroc_interval(fs.task, np.asarray(test.labels), result.test_proba, p.eval.bootstrap, p.seed)
                         if result.test_proba is not None else (float("nan"), float("nan")))
            rows.append({"backbone": backbone, "dataset": dataset, "task": fs.task, "probe": probe, "chosen": chosen,
                         "val_auroc": float(best["val_auroc"].iloc[0]) if len(best) else float("nan"),
                         "test_auroc": result.test_metrics.get("auroc", float("nan")),
                         "test_auroc_ci_low": low, "test_auroc_ci_high": high, "interval": AUROC_INTERVAL,
                         "test_accuracy": result.test_metrics.get("accuracy", float("nan")),
                         "n_train": len(train), "n_val": len(val), "n_test": len(test),
                         "seconds": time.perf_counter() - start})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- few-shot


@dataclass
class FewShotTables:
    """Few-shot results of several backbones on one data set: summary (mean, 95 % interval), raw scores, skipped n."""

    summary: pd.DataFrame
    scores: pd.DataFrame
    skipped: dict[str, dict[Any, str]] = field(default_factory=dict)


def few_shot_probe(kind: str, profile: Profile | str, device: str = "auto") -> fewshot.Probe:
    """The few-shot probe named ``kind``: "linear" (the authors' grid), "logistic" or "knn", sized by the profile."""
    p = get_profile(profile)
    if kind == "linear":
        return fewshot.linear_probe_fn(profile=p, seed=p.seed, device=device)
    if kind == "logistic":
        return fewshot.logistic_probe(n_c=p.eval.logreg_n_c)
    if kind == "knn":
        return fewshot.knn_probe(k=min(p.eval.knn_ks))
    raise ValueError(f"few-shot probe {kind!r}; choose 'linear', 'logistic' or 'knn'")


def few_shot_sizes(profile: Profile | str) -> tuple[Any, ...]:
    """The few-shot sizes of a profile plus "all" (the whole train split)."""
    return tuple(get_profile(profile).eval.few_shot_ns) + ("all",)


def few_shot_table(ds: ImageSet, features: Mapping[str, FeatureSet], split: Mapping[str, np.ndarray],
                   profile: Profile | str, *, probe: str = "linear", unit: str = "patient",
                   protocols: Sequence[str] = ("repeats", "paper"), device: str = "auto") -> FewShotTables:
    """Few-shot test AUROC of every backbone (``features``: backbone -> FeatureSet of ``ds``), n = profile's + "all".

    ``"repeats"``: ``eval.few_shot_repeats`` seeded draws per n, mean and 95 % t-interval;
    ``"paper"``: the authors' single deterministic draw. Training images come from the train
    split only; an n that a class cannot supply is skipped and listed in ``skipped``.
    """
    p = get_profile(profile)
    summaries, scores, skipped = [], [], {}
    for backbone, fs in features.items():
        for protocol in protocols:
            result = fewshot.run_few_shot(ds, fs, dict(split), few_shot_probe(probe, p, device),
                                          ns=few_shot_sizes(p), repeats=p.eval.few_shot_repeats, seed=p.seed,
                                          unit=unit, protocol=protocol, skip_impossible=True)
            tags = {"backbone": backbone, "protocol": protocol, "probe": probe, "unit": unit}
            summaries.append(result.summary.assign(**tags))
            scores.append(result.scores.assign(**tags))
            if result.skipped:
                skipped[f"{backbone} ({protocol})"] = result.skipped
    summary = pd.concat(summaries, ignore_index=True)
    front = ["backbone", "protocol", "probe", "unit"]
    return FewShotTables(summary[front + [c for c in summary.columns if c not in front]],
                         pd.concat(scores, ignore_index=True), skipped)


# --------------------------------------------------------------------------- published figures


def _published(rows: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    ns: tuple[Any, ...] = (1, 2, 4, 8, 16, "all")
    return pd.DataFrame([{"model": model, "n": n, "value": v} for model, values in rows.items()
                         for n, v in zip(ns, values)])


#: Baharoon et al. 2023, few-shot NIH ChestX-ray14 linear probe, macro AUROC; n = patients per class (authors' figure data).
PUBLISHED_FEW_SHOT_NIH = _published({
    "DINOv2 ViT-L/14": (0.502, 0.528, 0.519, 0.584, 0.601, 0.763),
    "ViT-L/16 IN-21k": (0.520, 0.536, 0.548, 0.582, 0.586, 0.752),
    "DenseNet-201 IN-1k": (0.508, 0.525, 0.532, 0.580, 0.586, 0.735),
    "ResNet-152 IN-1k": (0.482, 0.502, 0.505, 0.556, 0.573, 0.718),
    "VGG-19 IN-1k": (0.505, 0.519, 0.521, 0.557, 0.572, 0.696),
})

#: Baharoon et al. 2023, few-shot Montgomery lung segmentation, mean of Dice and Jaccard; n = training images.
PUBLISHED_SEG_MONTGOMERY = _published({
    "DINOv2 ViT-L/14 (frozen)": (0.929, 0.941, 0.962, 0.961, 0.961, 0.974),
    "U-Net (from scratch)": (0.583, 0.788, 0.893, 0.941, 0.960, 0.973),
    "TransUNet": (0.884, 0.905, 0.950, 0.951, 0.964, 0.974),
})

_COUNTERPARTS: tuple[tuple[str, str, str], ...] = (
    ("dinov2-vit-l14", "DINOv2 ViT-L/14", "same model"),
    ("dinov2-", "DINOv2 ViT-L/14", "stand-in (another DINOv2 size)"),
    ("ssl-natural-", "DINOv2 ViT-L/14", "stand-in (DINOv2 recipe on our natural stand-in images)"),
    ("sup-natural-", "ViT-L/16 IN-21k", "stand-in (supervised ViT on our natural stand-in images)"),
    ("vit-b16-in21k", "ViT-L/16 IN-21k", "stand-in (ViT-B instead of ViT-L)"),
    ("efficientnet-lite0.in1k", "DenseNet-201 IN-1k", "stand-in (another supervised ImageNet-1k CNN)"),
    ("resnet50-in1k", "ResNet-152 IN-1k", "stand-in (ResNet-50 instead of ResNet-152)"),
)


def published_counterpart(backbone: str) -> tuple[str | None, str]:
    """(published few-shot NIH model our backbone is compared with, how it relates); (None, reason) when none."""
    for prefix, model, relation in _COUNTERPARTS:
        if backbone == prefix or (prefix.endswith("-") and backbone.startswith(prefix)):
            return model, relation
    return None, "no published counterpart"


def primary_backbone(backbones: Mapping[str, Backbone]) -> str:
    """The backbone that plays DINOv2: the first whose published counterpart is a DINOv2 model, else the first ViT."""
    if not backbones:
        raise ValueError("primary_backbone needs at least one backbone")
    for name in backbones:
        model, _ = published_counterpart(name)
        if model is not None and model.startswith("DINOv2"):
            return name
    return next((name for name, bb in backbones.items() if bb.kind == "vit"), next(iter(backbones)))


def few_shot_vs_paper(summary: pd.DataFrame, profile: Profile | str, protocol: str = "repeats") -> pd.DataFrame:
    """Our few-shot AUROC (mean and 95 % interval) beside the published NIH figure of each backbone's counterpart."""
    ours = summary[(summary["protocol"] == protocol) & (summary["metric"] == "auroc")].copy()
    if ours.empty:
        raise ValueError(f"no few-shot AUROC rows with protocol {protocol!r}; pass FewShotTables.summary")
    pairs = [published_counterpart(b) for b in ours["backbone"]]
    ours["model"] = [model for model, _ in pairs]
    ours["relation"] = [relation for _, relation in pairs]
    ours["value"] = ours["mean"]
    merged = paper_vs_ours(ours, PUBLISHED_FEW_SHOT_NIH, on=["model", "n"], value="value", profile=profile)
    merged.insert(0, "backbone", ours["backbone"].to_numpy())
    merged["relation"] = ours["relation"].to_numpy()
    merged["ci_low"], merged["ci_high"] = ours["ci_low"].to_numpy(), ours["ci_high"].to_numpy()
    merged["interval"] = ours["interval"].to_numpy() if "interval" in ours else ""
    return merged.rename(columns={"model": "published_model", "ours": "ours_mean"})


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class PeftTables:
    """Fine-tuning results: one row per (backbone, mode) and the full PeftResult of each run."""

    table: pd.DataFrame
    results: dict[tuple[str, str], Any] = field(default_factory=dict)


def cap_train(split: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The split with its train part cut to ``n`` evenly spaced images (n <= 0 or n >= train size: unchanged)."""
    out = {k: np.asarray(v) for k, v in split.items()}
    if 0 < n < len(out["train"]):
        out["train"] = np.sort(evenly_spaced_indices(out["train"], int(n)))
    return out


def peft_table(backbones: Mapping[str, Backbone], ds: ImageSet, split: Mapping[str, np.ndarray],
               profile: Profile | str, *, modes: Sequence[str] = MODES, device: str = "auto",
               progress: bool = False) -> PeftTables:
    """Full / LoRA / BitFit / linear fine-tuning of each backbone on ``ds``: epoch chosen on val, tested once.

    The train split is capped at ``eval.peft_train_images``; LoRA on a CNN is listed as not
    applicable. Columns: backbone, dataset, mode, test_auroc, trainable, total, trainable_pct
    (of the whole classifier, head included), backbone_trainable_pct, best_epoch, n_train,
    seconds, note, test_auroc_ci_low / test_auroc_ci_high (:func:`auroc_interval`) and interval.
    """
    p = get_profile(profile)
    split = cap_train(split, p.eval.peft_train_images)
    train, val, test = (ds.subset(split[k]) for k in ("train", "val", "test"))
    rows, results = [], {}
    for name, backbone in backbones.items():
        for mode in modes:
            base = {"backbone": name, "dataset": ds.name, "mode": mode, "n_train": len(train)}
            if mode == "lora" and backbone.kind != "vit":
                rows.append({**base, "test_auroc": float("nan"), "note": "not applicable: LoRA targets ViT blocks"})
                continue
            result = finetune_backbone(backbone, mode, train, val, test, default_config(mode, p), seed=p.seed,
                                       device=device, progress=progress)
            results[(name, mode)] = result
            low, high = auroc_interval(test.task, np.asarray(test.labels), result.test_proba, p.eval.bootstrap,
                                       p.seed)
            rows.append({**base, "test_auroc": result.test_metrics["auroc"], "test_auroc_ci_low": low,
                         "test_auroc_ci_high": high, "interval": AUROC_INTERVAL,
                         "trainable": int(result.parameters["trainable"]), "total": int(result.parameters["total"]),
                         "trainable_pct": 100 * result.parameters["share"],
                         "backbone_trainable_pct": 100 * result.backbone_parameters["share"],
                         "best_epoch": result.best_epoch, "seconds": result.info["wall_time_s"], "note": ""})
    return PeftTables(pd.DataFrame(rows), results)


#: timm architectures of the published DINOv2 models (counted on the meta device, no weights needed).
DINOV2_ARCHS: Mapping[str, str] = {
    "ViT-S/14 (DINOv2 architecture)": "vit_small_patch14_dinov2",
    "ViT-B/14 (DINOv2 architecture)": "vit_base_patch14_dinov2",
    "ViT-L/14 (DINOv2 architecture)": "vit_large_patch14_dinov2",
    "ViT-g/14 (DINOv2 architecture)": "vit_giant_patch14_dinov2",
}


def _count_model(model: str | nn.Module) -> nn.Module:
    """A fresh copy to count on: a timm architecture built on the meta device, or a deep copy of a module."""
    if isinstance(model, str):
        import timm

        with torch.device("meta"):
            return timm.create_model(model, pretrained=False, num_classes=0)
    return copy.deepcopy(model)


def parameter_share_table(models: Mapping[str, str | nn.Module], r: int = 48, alpha: float = 16,
                          targets: Sequence[str] = LORA_DEFAULT_TARGETS) -> pd.DataFrame:
    """Trainable share of LoRA (rank r on the ``targets`` linears) and BitFit for each model (timm arch name or module).

    Columns: model, lora_targets, params_M (backbone), lora_trainable_M, lora_pct (of backbone
    + adapters), bitfit_trainable_M, bitfit_pct. Heads are not counted.
    """
    rows = []
    for label, model in models.items():
        total = sum(p.numel() for p in _count_model(model).parameters())
        lora = trainable_parameter_report(apply_lora(_count_model(model), r=r, alpha=alpha, targets=targets))
        bitfit = trainable_parameter_report(apply_bitfit(_count_model(model)))
        rows.append({"model": label, "lora_targets": "/".join(targets), "params_M": total / 1e6,
                     "lora_trainable_M": lora["trainable"] / 1e6,
                     "lora_pct": 100 * lora["share"], "bitfit_trainable_M": bitfit["trainable"] / 1e6,
                     "bitfit_pct": 100 * bitfit["share"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- segmentation


SEG_HEADS = {"linear": "frozen linear head", "unet": "frozen U-Net decoder (last 5 blocks)"}
SCRATCH = "U-Net from scratch"


def segmentation_sets(datasets: Mapping[str, ImageSet], profile: Profile | str
                      ) -> dict[str, dict[str, ImageSet]]:
    """Train / val / test ImageSets (patient-grouped) of the first ``eval.seg_images`` images of each data set.

    A data set named in :data:`SEG_SOURCE_KEYS` whose key the profile's sources name is replaced by that source;
    a phantom whose :class:`BenchmarkDataset` has ``seg_params`` is drawn again with them (CT: whole slices).
    """
    p = get_profile(profile)
    cap = p.eval.seg_images

    def count(available: int) -> int:
        return available if cap <= 0 else min(cap, available)

    out = {}
    for name, ds in datasets.items():
        key, spec = SEG_SOURCE_KEYS.get(name), STUDY1_DATASETS.get(name)
        if key and key in p.data.sources:
            ds = load_source(p.data.sources[key])
        elif spec is not None and spec.seg_params and not (spec.source_key and spec.source_key in p.data.sources):
            ds = phantoms.make_dataset(spec.family, n=count(len(ds)), size=p.data.phantom_size, seed=p.seed,
                                       **{**dict(spec.params), **dict(spec.seg_params)})
        if ds.masks is None or not ds.mask_names:
            raise ValueError(f"data set {name!r} ({ds.name}) has no masks; segmentation needs label maps")
        small = ds.subset(np.arange(count(len(ds))))
        split = patient_split(small, SPLIT_FRACTIONS, seed=p.seed, stratify=False)
        out[name] = {part: small.subset(rows) for part, rows in split.items()}
    return out


def _seg_factory(head: str, backbone: Backbone | None, n_classes: int, image_size: int | None = None
                 ) -> Callable[[], nn.Module]:
    """A factory of fresh segmentation models of one kind (the frozen backbone is shared, so its grids cache);
    a U-Net decoder doubles its grid up to ``image_size`` (:func:`medlib.eval.segmentation.frozen_unet`)."""
    if head == "linear":
        return lambda: segmentation.frozen_linear(backbone, n_classes)
    if head == "unet":
        return lambda: segmentation.frozen_unet(backbone, n_classes, image_size=image_size)
    if head == "scratch":
        return lambda: segmentation.scratch_unet(n_classes)
    raise ValueError(f"segmentation head {head!r}; choose 'linear', 'unet' or 'scratch'")


#: A linear head labels its backbone's last grid cell by cell; below 4 x 4 cells (a stride-32 CNN stage at 64 px
#: is 2 x 2) it cannot draw an organ at all, so it is not trained (our assumption; at 224 px and up every grid passes).
LINEAR_HEAD_MIN_GRID = 4


def linear_head_out_of_scope(backbones: Mapping[str, Backbone], image_size: int) -> dict[str, int]:
    """Backbones whose last grid at ``image_size`` is coarser than :data:`LINEAR_HEAD_MIN_GRID`, with that grid."""
    grids = {name: head_grid(bb, image_size) for name, bb in backbones.items()}
    return {name: g for name, g in grids.items() if g < LINEAR_HEAD_MIN_GRID}


def _seg_jobs(backbones: Mapping[str, Backbone], heads: Sequence[str], scratch: bool, image_size: int
              ) -> list[tuple[str, str, Backbone | None]]:
    """(backbone label, head, backbone) of every model to train; heads needing 5 blocks skip shallower backbones,
    linear heads skip grids coarser than :data:`LINEAR_HEAD_MIN_GRID`."""
    coarse = linear_head_out_of_scope(backbones, image_size) if "linear" in heads else {}
    jobs = [(name, head, bb) for name, bb in backbones.items() for head in heads
            if (head != "unet" or bb.depth >= segmentation.UNetDecoder.n_grids)
            and (head != "linear" or name not in coarse)]
    return jobs + ([("-", "scratch", None)] if scratch else [])


def head_epochs(profile: Profile | str, head: str, n_images: int, epochs: int, *, all_images: bool = True) -> int:
    """Epochs for ``head`` on ``n_images``: ``epochs``, raised to reach a floor of optimiser steps (our assumption).

    A frozen linear head trains at least ``eval.seg_head_min_steps`` steps (cached token grids make them
    cheap); with ``all_images`` every head also trains at least ``eval.seg_min_steps`` steps.
    """
    p = get_profile(profile)
    floor = max(p.eval.seg_head_min_steps if head == "linear" else 0, p.eval.seg_min_steps if all_images else 0)
    if floor <= 0:
        return int(epochs)
    steps_per_epoch = int(np.ceil(n_images / p.eval.seg_batch_size))
    return max(int(epochs), int(np.ceil(floor / steps_per_epoch)))


def _train_kwargs(p: Profile, device: str) -> dict[str, Any]:
    # at most seg_epochs validation passes per run, as the paper's one per epoch (our assumption: with the step
    # floors a few-shot run has up to 1,000 one-step epochs, and validating after each cost about as much as training)
    return {"epochs": p.eval.seg_epochs, "batch_size": p.eval.seg_batch_size,
            "image_size": p.backbone.image_size, "device": device, "validations": p.eval.seg_epochs}


@dataclass
class SegTables:
    """Segmentation results: one row per (data set, model), per-class Dice, the trained models and the lr grids."""

    table: pd.DataFrame
    models: dict[tuple[str, str, str], nn.Module] = field(default_factory=dict)  # (dataset, backbone, head)
    lr_tables: dict[tuple[str, str, str], pd.DataFrame] = field(default_factory=dict)
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)

    def runs(self) -> pd.DataFrame:
        """Every training run behind the table: dataset, model, lr, restart, seed, best_val_dice, best_epoch,
        val_below_prior (the classes the run leaves below the prior on validation), selected, seconds_per_epoch."""
        frames = [lrs.assign(dataset=dataset, model=seg_model_label(backbone, head))
                  for (dataset, backbone, head), lrs in self.lr_tables.items()]
        if not frames:
            return pd.DataFrame(columns=["dataset", "model"])
        table = pd.concat(frames, ignore_index=True)
        front = ["dataset", "model"]
        return table[front + [c for c in table.columns if c not in front]]


PRIOR = "image-blind prior"
MEAN_INTERVAL = "95 % percentile bootstrap over test images"


def mean_interval(values: Sequence[float] | np.ndarray, n_resamples: int = 1000, seed: int = 0
                  ) -> tuple[float, float, float]:
    """Mean of the non-NaN ``values`` and its 95 % percentile-bootstrap interval (NaN interval below two values).

    Used for per-image Dice: every resampled mean is a mean of values in [0, 1], so the interval stays there.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (max(int(n_resamples), 10), v.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, min(float(low), mean), max(float(high), mean)


def _column_mean(frame: pd.DataFrame | None, column: str) -> float:
    """Mean of a per-image column, NaN when the frame is missing or the column has no value."""
    if frame is None or column not in frame or not frame[column].notna().any():
        return float("nan")
    return float(np.nanmean(frame[column]))


def _per_class_rows(per_image: pd.DataFrame, prior: pd.DataFrame, dataset: str, model: str, n_resamples: int,
                    seed: int, train: pd.DataFrame | None = None, prior_train: pd.DataFrame | None = None,
                    fit_train: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """One row per foreground class (and "mean" = macro): test Dice, its interval and the prior's Dice
    (with ``train`` / ``prior_train`` / ``fit_train``, the model's, the prior's and a full-batch linear
    fit's Dice on the training images too)."""
    classes = [c[len("dice_"):] for c in per_image.columns if c.startswith("dice_")]
    rows = []
    for name, column in [*[(c, f"dice_{c}") for c in classes], ("mean", "dice")]:
        mean, low, high = mean_interval(per_image[column], n_resamples, seed)
        rows.append({"dataset": dataset, "model": model, "class": name, "dice": mean, "ci_low": low, "ci_high": high,
                     "prior_dice": _column_mean(prior, column), "images": int(per_image[column].notna().sum()),
                     "interval": MEAN_INTERVAL, "train_dice": _column_mean(train, column),
                     "prior_train_dice": _column_mean(prior_train, column),
                     "fit_train_dice": _column_mean(fit_train, column)})
    return rows


def segmentation_table(backbones: Mapping[str, Backbone], seg_sets: Mapping[str, Mapping[str, ImageSet]],
                       profile: Profile | str, *, heads: Sequence[str] = ("linear", "unet"), scratch: bool = True,
                       device: str = "auto") -> SegTables:
    """Train every head on every backbone (+ a U-Net from scratch) on the whole train split; lr and epoch chosen on val.

    ``table`` columns: dataset, backbone, head, model, lr, best_epoch, val_dice, test_dice (with
    test_dice_ci_low / test_dice_ci_high, :func:`mean_interval` over test images), test_jaccard,
    test_mean_dj (macro over foreground classes, mean over test images), one ``test_dice_<class>``
    per class, trainable, seconds; plus one row for the :data:`PRIOR` (the per-pixel majority class
    of the training masks, :func:`medlib.eval.segmentation.evaluate_prior`) per data set.
    ``per_class`` is the long form: dataset, model, class (and "mean"), dice, ci_low, ci_high,
    prior_dice, images (test images where the class is scored), interval, and for linear heads
    train_dice / prior_train_dice / fit_train_dice (the head, the prior and a linear map fitted on the
    full batch, :func:`medlib.eval.segmentation.fit_linear_map`, on the training images; NaN elsewhere).
    """
    p = get_profile(profile)
    kwargs = _train_kwargs(p, device)
    rows, models, lr_tables, per_class = [], {}, {}, []
    jobs: list[tuple[str, str, Backbone | None]] = [("-", "prior", None),
                                                    *_seg_jobs(backbones, heads, scratch, kwargs["image_size"])]
    for dataset, parts in seg_sets.items():
        n_classes = len(parts["train"].mask_names) + 1
        prior_images = segmentation.evaluate_prior(parts["train"], parts["test"])
        prior_train = segmentation.evaluate_prior(parts["train"], parts["train"])
        for name, head, backbone in jobs:
            start = time.perf_counter()
            epochs, train_images, fit_images = np.nan, None, None
            if head == "prior":
                per_image, best, lrs = prior_images, None, None
            else:
                epochs = head_epochs(p, head, len(parts["train"]), kwargs["epochs"])
                best, lrs = segmentation.lr_grid(_seg_factory(head, backbone, n_classes, kwargs["image_size"]),
                                                 parts["train"], parts["val"], p.eval.seg_lrs, seed=p.seed,
                                                 restarts=p.eval.seg_restarts, **{**kwargs, "epochs": epochs})
                per_image = segmentation.evaluate_segmenter(best.model, parts["test"], kwargs["image_size"], device)
                if head == "linear":  # for capacity_explanations: does the head fit its own training images?
                    train_images = segmentation.evaluate_segmenter(best.model, parts["train"], kwargs["image_size"],
                                                                   device)
                    fit = segmentation.fit_linear_map(backbone, parts["train"], kwargs["image_size"], device=device,
                                                        max_iter=p.eval.seg_fit_iters)
                    fit_images = segmentation.evaluate_segmenter(fit, parts["train"], kwargs["image_size"], device)
            test = segmentation.summarize(per_image)
            label = PRIOR if head == "prior" else seg_model_label(name, head)
            mean, low, high = mean_interval(per_image["dice"], p.eval.bootstrap, p.seed)
            row = {"dataset": dataset, "backbone": name, "head": PRIOR if head == "prior" else SEG_HEADS.get(head, SCRATCH),
                   "model": label, "lr": float(lrs.loc[lrs["selected"], "lr"].iloc[0]) if lrs is not None else np.nan,
                   "epochs": epochs, "best_epoch": best.best_epoch if best is not None else np.nan,
                   "val_dice": best.best_val_dice if best is not None else np.nan,
                   "test_dice": float(test["dice"]), "test_dice_ci_low": low, "test_dice_ci_high": high,
                   "test_jaccard": float(test["jaccard"]), "test_mean_dj": float(test["mean_dj"]),
                   **{f"test_{c}": float(test[c]) for c in test.index if c.startswith("dice_")},
                   "trainable": int(sum(q.numel() for q in best.model.parameters() if q.requires_grad))
                   if best is not None else 0,
                   "seconds": time.perf_counter() - start, "interval": MEAN_INTERVAL}
            rows.append(row)
            per_class += _per_class_rows(per_image, prior_images, dataset, label, p.eval.bootstrap, p.seed,
                                         train_images, prior_train if train_images is not None else None, fit_images)
            if best is not None:
                key = (dataset, name, head)
                models[key], lr_tables[key] = best.model, lrs
    return SegTables(pd.DataFrame(rows), models, lr_tables, pd.DataFrame(per_class))


def head_grid(backbone: Backbone, image_size: int) -> int:
    """Side of the last token / feature grid that a linear head reads at ``image_size`` (e.g. 8 for 64 px, patch 8)."""
    return segmentation.last_grid_size(backbone, image_size)


def output_grid(head: str, backbone: Backbone | None, image_size: int) -> int:
    """Side of the grid a segmentation model predicts on before the final bilinear upsampling.

    A linear head: its backbone's last grid (:func:`head_grid`); a U-Net decoder: that grid doubled
    by its doubling up-blocks (:func:`medlib.eval.segmentation.decoder_doublings`); a U-Net from
    scratch: ``image_size``.
    """
    if head == "scratch" or backbone is None:
        return int(image_size)
    grid = head_grid(backbone, image_size)
    if head == "linear":
        return grid
    return grid * 2 ** segmentation.decoder_doublings(grid, image_size)


def resolution_ceilings(backbones: Mapping[str, Backbone], seg_sets: Mapping[str, Mapping[str, ImageSet]],
                        profile: Profile | str, *, heads: Sequence[str] = ("linear", "unet"), scratch: bool = True
                        ) -> pd.DataFrame:
    """Per class, the Dice of the best labelling found of the grid each segmentation model predicts on, beside the prior.

    Each model labels a grid (:func:`output_grid`) and upsamples its logits bilinearly to the masks'
    own resolution, where the image-blind prior also lives. The ceiling is a logit map on that grid
    fitted to each true test mask (:func:`medlib.eval.segmentation.bilinear_grid_oracle_masks`): what
    the best head on that grid could draw, estimated from below.
    Columns: dataset, model, grid, class (and "mean"), dice, ci_low, ci_high, prior_dice, images, interval.
    """
    p = get_profile(profile)
    size = p.backbone.image_size
    jobs = [(name, head, output_grid(head, backbone, size))
            for name, head, backbone in _seg_jobs(backbones, heads, scratch, size)]
    rows = []
    for dataset, parts in seg_sets.items():
        prior = segmentation.evaluate_prior(parts["train"], parts["test"])
        oracles: dict[int, pd.DataFrame] = {}
        for name, head, grid in jobs:
            if grid not in oracles:
                oracles[grid] = segmentation.evaluate_grid_oracle(parts["test"], grid)
            for r in _per_class_rows(oracles[grid], prior, dataset, seg_model_label(name, head), p.eval.bootstrap,
                                     p.seed):
                rows.append({**r, "grid": grid})
    front = ["dataset", "model", "grid", "class"]
    table = pd.DataFrame(rows)
    return table[front + [c for c in table.columns if c not in front]] if len(table) else table


def resolution_explanations(ceilings: pd.DataFrame, per_class: pd.DataFrame | None = None
                            ) -> dict[tuple[str, str], str]:
    """Explanations of "model below the image-blind prior" that the model's own grid ceiling supports.

    Where even the best labelling found of the grid a model predicts on (:func:`resolution_ceilings`)
    stays below the prior (its interval's upper end below the prior's Dice), a full-resolution prior
    beats any model that labels that grid: resolution, not training. The ceiling is estimated from
    below, so with ``per_class`` (:class:`SegTables`' long table) a model whose Dice exceeds the
    ceiling's interval shows that it does not bind, and gets no explanation.
    """
    scores = ({(r["model"], r["dataset"], r["class"]): r["dice"] for r in per_class.to_dict("records")}
              if per_class is not None else {})
    out: dict[tuple[str, str], str] = {}
    for r in ceilings.to_dict("records"):
        score = scores.get((r["model"], r["dataset"], r["class"]), float("nan"))
        if np.isfinite(score) and score > r["ci_high"]:
            continue
        if np.isfinite(r["ci_high"]) and r["ci_high"] < r["prior_dice"]:
            out[(r["model"], f"{r['dataset']} {r['class']}")] = (
                f"resolution: the model labels a {r['grid']} x {r['grid']} grid, and the best labelling found of "
                f"that grid (a logit map fitted to each true mask, upsampled bilinearly) scores Dice {r['dice']:.3f} "
                f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] against the full-resolution prior's {r['prior_dice']:.3f}")
    return out


def capacity_explanations(per_class: pd.DataFrame) -> dict[tuple[str, str], str]:
    """Explanations of "linear head below the image-blind prior" by what a linear map of the grid can fit.

    Only a frozen linear head that stays at or below the prior on the very images it was trained on
    (``train_dice`` <= ``prior_train_dice``) qualifies: it is not overfitting, nor picked badly on
    validation. Then ``fit_train_dice``, a linear map of the same tokens fitted by full-batch L-BFGS on
    those images (:func:`medlib.eval.segmentation.fit_linear_map`), says which of two causes it is:
    **capacity** when that fit does not beat the prior either (a linear map of this token grid does not
    draw the class better than its average position), **under-fit** when it does (the paper's recipe,
    SGD on the Dice loss within the profile's steps, stops short of what a linear map can do). Without
    ``fit_train_dice`` nothing is explained. U-Nets never qualify: they are not linear maps.
    """
    needed = {"model", "dataset", "class", "dice", "prior_dice", "train_dice", "prior_train_dice", "fit_train_dice"}
    if not needed <= set(per_class.columns):
        return {}
    out: dict[tuple[str, str], str] = {}
    for r in per_class.to_dict("records"):
        if not str(r["model"]).endswith(" + linear head"):
            continue
        head, prior, fit = r["train_dice"], r["prior_train_dice"], r["fit_train_dice"]
        if not (np.isfinite(head) and np.isfinite(prior) and np.isfinite(fit)) or head > prior:
            continue
        if fit <= prior:
            text = (f"capacity: on its own training images the linear head scores Dice {head:.3f} and a linear map "
                    f"of the same tokens fitted by full-batch L-BFGS {fit:.3f}, neither above the prior's {prior:.3f} "
                    "there: a linear map of this token grid does not draw this class better than its average position does")
        else:
            text = (f"under-fit: on its own training images the linear head scores Dice {head:.3f}, not above the "
                    f"prior's {prior:.3f}, while a linear map of the same tokens fitted by full-batch L-BFGS reaches "
                    f"{fit:.3f}: the paper's recipe (SGD on the Dice loss) stops short of what a linear map can do here")
        out[(r["model"], f"{r['dataset']} {r['class']}")] = text
    return out


def input_resolution_jobs(seg: SegTables, explained: Mapping[tuple[str, str], str] | None = None
                          ) -> list[tuple[str, str, str, list[str]]]:
    """(data set, backbone, head, classes) of every U-Net (decoder or from scratch) below the prior with no explanation.

    A class is below the prior when its interval's upper end is under the prior's Dice (the sanity
    rule); ``explained`` maps (model, "<data set> <class>") to an explanation found elsewhere.
    """
    explained = dict(explained or {})
    pc = seg.per_class
    below = pc[(pc["model"] != PRIOR) & (pc["ci_high"] < pc["prior_dice"])]
    jobs: dict[tuple[str, str, str], list[str]] = {}
    for dataset, backbone, head in seg.models:
        if head == "linear":
            continue
        label = seg_model_label(backbone, head)
        rows = below[(below["dataset"] == dataset) & (below["model"] == label)]
        classes = [c for c in rows["class"] if (label, f"{dataset} {c}") not in explained]
        if classes:
            jobs[(dataset, backbone, head)] = classes
    return [(d, b, h, c) for (d, b, h), c in jobs.items()]


def input_resolution_check(backbones: Mapping[str, Backbone], seg_sets: Mapping[str, Mapping[str, ImageSet]],
                           seg: SegTables, profile: Profile | str, jobs: Sequence[tuple[str, str, str, list[str]]],
                           device: str = "auto") -> pd.DataFrame:
    """Each job's model trained once more, the same way, but on images at the masks' own resolution.

    Models see ``profile.backbone.image_size`` px while the masks and the prior keep the data's own
    size (here at most twice the model's input, as the paper segments at 448 px what it classifies at
    224); a structure a few pixels wide (CT aorta) is then blurred in the input, though its position
    is not. Same lr (the one chosen on validation), step budget and seed as in
    :func:`segmentation_table`, with the same restart rule (a further seed only while a class stays
    below the prior on validation). Long table as ``SegTables.per_class`` plus image_size; empty when
    there is no job.
    """
    p = get_profile(profile)
    kwargs = _train_kwargs(p, device)
    rows: list[dict[str, Any]] = []
    for dataset, backbone_name, head, _classes in jobs:
        parts = seg_sets[dataset]
        size = min(int(parts["train"].images.shape[1]), 2 * int(kwargs["image_size"]))
        backbone = backbones.get(backbone_name)
        if backbone is not None and backbone.kind == "vit":
            size -= size % backbone.patch_size
        n_classes = len(parts["train"].mask_names) + 1
        label = seg_model_label(backbone_name, head)
        lr = _chosen_lr(seg.table, dataset, label, p.eval.seg_lrs[0])
        epochs = head_epochs(p, head, len(parts["train"]), kwargs["epochs"])
        best, _ = segmentation.lr_grid(_seg_factory(head, backbone, n_classes, size), parts["train"], parts["val"],
                                       (lr,), seed=p.seed, restarts=p.eval.seg_restarts,
                                       **{**kwargs, "epochs": epochs, "image_size": size})
        per_image = segmentation.evaluate_segmenter(best.model, parts["test"], size, device)
        prior = segmentation.evaluate_prior(parts["train"], parts["test"])
        rows += [{**r, "image_size": size}
                 for r in _per_class_rows(per_image, prior, dataset, label, p.eval.bootstrap, p.seed)]
    columns = ["dataset", "model", "class", "dice", "ci_low", "ci_high", "prior_dice", "images", "interval",
               "train_dice", "prior_train_dice", "image_size"]
    return pd.DataFrame(rows, columns=columns)


def input_resolution_explanations(check: pd.DataFrame, jobs: Sequence[tuple[str, str, str, list[str]]],
                                  image_size: int) -> dict[tuple[str, str], str]:
    """Explanations of a U-Net below the prior that :func:`input_resolution_check` supports, class by class.

    Where the same model, trained the same way on images at the masks' resolution, beats the prior
    with an interval above it, the deficit came from the ``image_size``-px input, not from the method.
    """
    out: dict[tuple[str, str], str] = {}
    for dataset, backbone, head, classes in jobs:
        label = seg_model_label(backbone, head)
        for cls in classes:
            row = check[(check["dataset"] == dataset) & (check["model"] == label) & (check["class"] == cls)]
            if len(row) and row["ci_low"].item() > row["prior_dice"].item():
                r = row.iloc[0]
                out[(label, f"{dataset} {cls}")] = (
                    f"input resolution: the model sees the image at {image_size} px; trained the same way at the "
                    f"masks' {int(r['image_size'])} px it scores Dice {r['dice']:.3f} [{r['ci_low']:.3f}, "
                    f"{r['ci_high']:.3f}], above the prior's {r['prior_dice']:.3f}")
    return out


def seg_model_label(backbone: str, head: str) -> str:
    """A short label for a segmentation model, e.g. ``"ssl-natural-vit-tiny + U-Net decoder"``."""
    if head == "scratch":
        return SCRATCH
    return f"{backbone} + {'linear head' if head == 'linear' else 'U-Net decoder'}"


def segmentation_few_shot_table(backbones: Mapping[str, Backbone], seg_sets: Mapping[str, Mapping[str, ImageSet]],
                                profile: Profile | str, *, heads: Sequence[str] = ("linear", "unet"),
                                scratch: bool = True, lrs: pd.DataFrame | None = None, equal_steps: bool = True,
                                device: str = "auto") -> pd.DataFrame:
    """Test Dice / Jaccard when each model trains on n images (profile sizes + "all"), ``eval.seg_repeats`` draws each.

    ``lrs`` is :func:`segmentation_table`'s table: each model reuses the lr chosen there
    (else the profile grid's first). Sizes larger than the train split are left out. With
    ``equal_steps`` (our assumption) every n trains for as many optimiser steps as
    ``eval.seg_epochs`` epochs over the whole train split (:func:`equal_step_epochs`), so small
    n are not also starved of updates; otherwise every n trains ``eval.seg_epochs`` epochs.
    The all-images floor ``eval.seg_min_steps`` does not apply here (its cost times sizes x repeats),
    so the curve's "all" point may train fewer steps than :func:`segmentation_table`'s row.
    Long table: dataset, backbone, head, model, n, n_images, repeat, epochs, dice, jaccard,
    mean_dj, val_dice, best_epoch, lr.
    """
    p = get_profile(profile)
    kwargs = _train_kwargs(p, device)
    frames = []
    jobs = _seg_jobs(backbones, heads, scratch, kwargs["image_size"])
    for dataset, parts in seg_sets.items():
        n_train, n_classes = len(parts["train"]), len(parts["train"].mask_names) + 1
        ns = [n for n in few_shot_sizes(p) if n == "all" or n <= n_train]
        for name, head, backbone in jobs:
            label = seg_model_label(name, head)
            lr = _chosen_lr(lrs, dataset, label, p.eval.seg_lrs[0])
            for n in ns:
                size = n_train if n == "all" else int(n)
                full = head_epochs(p, head, n_train, kwargs["epochs"], all_images=False)
                epochs = (equal_step_epochs(size, n_train, kwargs["batch_size"], full) if equal_steps
                          else head_epochs(p, head, size, kwargs["epochs"], all_images=False))
                long = segmentation.segmentation_few_shot(
                    _seg_factory(head, backbone, n_classes, kwargs["image_size"]), parts["train"], parts["val"],
                    parts["test"], ns=[n],
                    repeats=p.eval.seg_repeats, seed=p.seed, model_name=label, lr=lr, **{**kwargs, "epochs": epochs})
                frames.append(long.assign(dataset=dataset, backbone=name, head=SEG_HEADS.get(head, SCRATCH), lr=lr,
                                          epochs=epochs))
    table = pd.concat(frames, ignore_index=True)
    front = ["dataset", "backbone", "head", "model"]
    return table[front + [c for c in table.columns if c not in front]]


def _chosen_lr(lrs: pd.DataFrame | None, dataset: str, model: str, default: float) -> float:
    if lrs is None:
        return float(default)
    row = lrs[(lrs["dataset"] == dataset) & (lrs["model"] == model)]
    return float(row["lr"].iloc[0]) if len(row) else float(default)


def summarize_repeats(long: pd.DataFrame, by: Sequence[str], value: str, n_column: str = "n_images"
                      ) -> pd.DataFrame:
    """Mean, std and 95 % interval of ``value`` over repeats, per ``by`` groups and n (few-shot curves).

    The interval is :func:`medlib.eval.fewshot.summarize`'s default, a percentile bootstrap of the mean over
    the repeats (inside the metric's range; the ``interval`` column says so).
    """
    missing = [c for c in [*by, "n", value] if c not in long.columns]
    if missing:
        raise ValueError(f"summarize_repeats: the table lacks column(s) {missing}")
    frames = []
    for keys, group in long.groupby(list(by), sort=False):
        scores = pd.DataFrame({"n": group["n"], "metric": value, "value": group[value],
                               "n_train_images": group[n_column] if n_column in group else np.nan})
        summary = fewshot.summarize(scores)
        for column, key in zip(by, keys if isinstance(keys, tuple) else (keys,)):
            summary[column] = key
        frames.append(summary)
    out = pd.concat(frames, ignore_index=True)
    return out[list(by) + [c for c in out.columns if c not in by]]


def segmentation_vs_paper(summary: pd.DataFrame, profile: Profile | str, backbone: str,
                          dataset: str = "chest_xray") -> pd.DataFrame:
    """Our few-shot chest mean(Dice, Jaccard) beside the published Montgomery curve of the matching model.

    The frozen heads of ``backbone`` are set beside "DINOv2 ViT-L/14 (frozen)" when the backbone
    stands in for DINOv2 (the paper does not say which head that row used, so both of ours are
    shown; any other backbone gets no published figure), the scratch U-Net beside
    "U-Net (from scratch)".
    """
    ours = summary[(summary["dataset"] == dataset) & (summary["metric"] == "mean_dj")
                   & summary["backbone"].isin([backbone, "-"])].copy()
    if ours.empty:
        raise ValueError(f"no mean_dj rows for data set {dataset!r} and backbone {backbone!r}; "
                         "pass summarize_repeats(segmentation_few_shot_table(...), ...)")
    dinov2 = (published_counterpart(backbone)[0] or "").startswith("DINOv2")
    ours["published_model"] = np.where(ours["backbone"] == "-", "U-Net (from scratch)",
                                       "DINOv2 ViT-L/14 (frozen)" if dinov2 else "none")
    ours["value"] = ours["mean"]
    published = PUBLISHED_SEG_MONTGOMERY.rename(columns={"model": "published_model"})
    merged = paper_vs_ours(ours, published, on=["published_model", "n"], value="value", profile=profile)
    merged.insert(0, "model", ours["model"].to_numpy())
    merged["ci_low"], merged["ci_high"] = ours["ci_low"].to_numpy(), ours["ci_high"].to_numpy()
    merged["interval"] = ours["interval"].to_numpy() if "interval" in ours else ""
    return merged.rename(columns={"ours": "ours_mean"})


def headline_table(knn: pd.DataFrame, probes: pd.DataFrame, few_summary: pd.DataFrame, seg: pd.DataFrame,
                   backbones: Sequence[str]) -> pd.DataFrame:
    """One row per backbone: mean test AUROC of kNN (k chosen on val) and of each probe over the data sets,
    few-shot AUROC (seeded repeats) at the smallest n and with all data, frozen U-Net decoder mean(Dice, Jaccard)."""
    columns: dict[str, pd.Series] = {"knn_auroc": knn[knn["selected"]].groupby("backbone")["test_auroc"].mean()}
    for probe, group in probes.groupby("probe", sort=False):
        columns[f"{probe.replace(' ', '_')}_auroc"] = group.groupby("backbone")["test_auroc"].mean()
    repeats = few_summary[(few_summary["protocol"] == "repeats") & (few_summary["metric"] == "auroc")]
    numbers = [n for n in repeats["n"] if n != "all"]
    for n in ([min(numbers)] if numbers else []) + ["all"]:
        columns[f"fewshot_auroc_n={n}"] = repeats[repeats["n"] == n].set_index("backbone")["mean"]
    decoder = seg[seg["head"] == SEG_HEADS["unet"]]
    columns["seg_unet_mean_dj"] = decoder.groupby("backbone")["test_mean_dj"].mean()
    return pd.DataFrame(columns).reindex(list(backbones)).rename_axis("backbone").reset_index()


# --------------------------------------------------------------------------- figures


def _n_positions(ns: Sequence[Any]) -> tuple[list[Any], dict[Any, int]]:
    """Categorical x positions of few-shot sizes, numbers ascending then "all"."""
    order = sorted({n for n in ns if n != "all"}, key=float) + (["all"] if "all" in set(ns) else [])
    return order, {n: i for i, n in enumerate(order)}


def _curve(ax: Any, frame: pd.DataFrame, pos: dict[Any, int], label: str, **style: Any) -> None:
    """One mean curve with its 95 % band (where the interval exists)."""
    frame = frame.assign(x=frame["n"].map(pos)).sort_values("x")
    line = ax.plot(frame["x"], frame["mean"], marker="o", label=label, **style)[0]
    band = frame.dropna(subset=["ci_low", "ci_high"])
    if len(band):
        ax.fill_between(band["x"], band["ci_low"], band["ci_high"], color=line.get_color(), alpha=0.2)


def plot_heatmap(table: pd.DataFrame, index: str, columns: str, value: str, title: str, fmt: str = ".3f"):
    """An annotated heatmap of ``value`` pivoted to ``index`` x ``columns``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = table.pivot_table(index=index, columns=columns, values=value, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 3, 0.55 * grid.shape[0] + 1.6))
    sns.heatmap(grid, annot=True, fmt=fmt, cmap="viridis", cbar_kws={"label": value}, ax=ax)
    ax.set(title=title, xlabel=columns, ylabel=index)
    return fig


def plot_few_shot(summary: pd.DataFrame, title: str, metric: str = "auroc", published: pd.DataFrame | None = None,
                  xlabel: str = "training size n"):
    """Few-shot curves per backbone (mean and 95 % band over repeats; the paper's single draw dashed).

    With ``published`` (e.g. :data:`PUBLISHED_FEW_SHOT_NIH`) a second panel shows the
    published curves on their own axes: they were measured on other data.
    """
    import matplotlib.pyplot as plt

    rows = summary[summary["metric"] == metric]
    order, pos = _n_positions(rows["n"].tolist() + ([] if published is None else published["n"].tolist()))
    ncols = 1 if published is None else 2
    from ..reporting import legend_outside, model_colour

    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 5.2), squeeze=False)
    ax = axes[0, 0]
    for backbone, group in rows.groupby("backbone", sort=False):
        colour = model_colour(backbone)  # one colour per model in every figure
        _curve(ax, group[group["protocol"] == "repeats"], pos, f"{backbone} (mean, 95% CI)", color=colour)
        single = group[group["protocol"] == "paper"]
        if len(single):
            _curve(ax, single, pos, f"{backbone} (single draw)", color=colour, linestyle="--", alpha=0.6,
                   markerfacecolor="none")
    ax.set(title=title, xlabel=xlabel, ylabel=f"test {_METRIC_LABELS.get(metric, metric)}", xticks=range(len(order)),
           xticklabels=[str(n) for n in order])
    legend_outside(ax, "below", ncol=1)
    if published is not None:
        for model, group in published.groupby("model", sort=False):
            axes[0, 1].plot(group["n"].map(pos), group["value"], marker="s", color=model_colour(model),
                            label=f"{model} (published)")
        axes[0, 1].set(title="Published (Baharoon et al. 2023, NIH ChestX-ray14)", xlabel="patients per class",
                       ylabel="macro AUROC", xticks=range(len(order)), xticklabels=[str(n) for n in order])
        legend_outside(axes[0, 1], "below", ncol=1)
    return fig


#: axis labels of the metrics the figures plot
_METRIC_LABELS = {"auroc": "AUROC", "mean_dj": "mean of Dice and Jaccard", "dice": "Dice", "jaccard": "Jaccard"}


def plot_peft(table: pd.DataFrame, title: str):
    """Test AUROC per fine-tuning mode (bars labelled with the trainable share) and the trainable share (log)."""
    import matplotlib.pyplot as plt

    done = table.dropna(subset=["test_auroc"])
    if done.empty:
        raise ValueError("plot_peft: no finished run in the table (every test_auroc is NaN)")
    modes = list(dict.fromkeys(done["mode"]))
    backbones = list(dict.fromkeys(done["backbone"]))
    from ..reporting import legend_outside, model_colour

    width = 0.8 / len(backbones)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for i, backbone in enumerate(backbones):
        rows = done[done["backbone"] == backbone].set_index("mode")
        x = np.array([modes.index(m) for m in rows.index]) + (i - (len(backbones) - 1) / 2) * width
        bars = axes[0].bar(x, rows["test_auroc"], width, label=backbone, color=model_colour(backbone))
        axes[0].bar_label(bars, labels=[f"{v:.2g}%" for v in rows["trainable_pct"]], fontsize=8, rotation=90,
                          padding=2)
        axes[1].bar(x, rows["trainable_pct"], width, label=backbone, color=model_colour(backbone))
    low = max(0.0, float(done["test_auroc"].min()) - 0.1)
    axes[0].set(title=title, xlabel="fine-tuning mode (bar label: % trainable)", ylabel="test macro AUROC",
                ylim=(low, 1.0), xticks=range(len(modes)), xticklabels=modes)
    legend_outside(axes[0], "below")
    axes[1].axhline(1.0, color="k", linestyle=":", label="1 % (the paper's claim)")
    axes[1].set(yscale="log", title="Trainable parameters (head included)", xlabel="fine-tuning mode",
                ylabel="% of parameters trained", xticks=range(len(modes)), xticklabels=modes)
    legend_outside(axes[1], "below")
    return fig


def plot_seg_few_shot(summary: pd.DataFrame, title: str, metric: str = "mean_dj"):
    """One panel per data set: few-shot segmentation curves (mean and 95 % band, clipped to [0, 1]) of every model."""
    import matplotlib.pyplot as plt

    rows = summary[summary["metric"] == metric]
    datasets = list(dict.fromkeys(rows["dataset"]))
    order, pos = _n_positions(rows["n"].tolist())
    from ..reporting import legend_outside, model_colour

    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 5.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        heads: dict[str, str] = {}
        for model, group in rows[rows["dataset"] == dataset].groupby("model", sort=False):
            head = model.split(" + ", 1)[1] if " + " in model else ""  # colour = backbone, line style = decoder
            style = heads.setdefault(head, styles[len(heads) % len(styles)])
            _curve(ax, group, pos, model, color=model_colour(model.split(" + ", 1)[0]), linestyle=style)
        ax.set(title=f"{dataset}", xlabel="training images n",
               ylabel=f"test {_METRIC_LABELS.get(metric, metric.replace('_', ' '))}",
               xticks=range(len(order)), xticklabels=[str(n) for n in order], ylim=(0, 1))  # bands clipped
        legend_outside(ax, "below", ncol=1)
    fig.suptitle(title)
    return fig


def plot_seg_overlays(models: Mapping[str, nn.Module], ds: ImageSet, image_size: int, n_show: int, title: str,
                      device: str = "auto", size: float = 1.7):
    """Rows of test images: the true masks, then each model's predicted masks (same colours)."""
    import matplotlib.pyplot as plt

    rows = np.arange(min(n_show, len(ds)))
    shown = ds.subset(rows)
    predictions = {label: segmentation.predict_masks(model, shown, image_size, device=device)
                   for label, model in models.items()}
    columns = [("truth", np.asarray(shown.masks))] + list(predictions.items())
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(size * len(columns), size * len(rows) + 0.5),
                             squeeze=False)
    for j, (label, masks) in enumerate(columns):
        axes[0, j].set_title(label.replace(" + ", "\n+ "), fontsize=8)
        for i in range(len(rows)):
            axes[i, j].imshow(overlay_masks(np.asarray(shown.images[i]), masks[i]))
            axes[i, j].axis("off")
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- claims and sanity flags

STUDY = "01"
#: Equivalence margins of the "similar" / "close" / "gap closes" claims, fixed in code before any result was
#: read (our assumption; the paper gives none): 0.05 AUROC, 0.05 Dice (or mean of Dice and Jaccard).
AUROC_MARGIN = 0.05
DICE_MARGIN = 0.05
#: The paper's bound on the adapters' trainable share (percent of the model's parameters).
PEFT_SHARE_BOUND = 1.0
END_TO_END = ("difference of the two arms' 95 % intervals taken end to end (low - high, high - low), "
              "a conservative interval for a difference of independent estimates")


def backbone_arm(backbone: str) -> str:
    """"ssl" (stands in for DINOv2), "random" (random initialisation), "supervised" (a supervised counterpart)
    or "other", from :func:`published_counterpart` and the backbone's name."""
    if backbone.startswith("random-"):
        return "random"
    model, relation = published_counterpart(backbone)
    if model is None:
        return "other"
    return "ssl" if model.startswith("DINOv2") else "supervised"


def _diff(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, tuple[float, float]]:
    """a - b with the end-to-end interval [a.low - b.high, a.high - b.low] (estimate kept inside it)."""
    est = float(a["score"]) - float(b["score"])
    low, high = float(a["ci_low"]) - float(b["ci_high"]), float(a["ci_high"]) - float(b["ci_low"])
    if not (np.isfinite(low) and np.isfinite(high)):
        return est, (float("nan"), float("nan"))
    return est, (min(low, est), max(high, est))


def _mean_diff(pairs: Sequence[tuple[float, tuple[float, float]]]) -> tuple[float | None, tuple[float, float]]:
    """Mean of differences and the mean of their interval ends (each end averaged over the pairs)."""
    if not pairs:
        return None, (float("nan"), float("nan"))
    est = float(np.mean([p[0] for p in pairs]))
    lows, highs = [p[1][0] for p in pairs], [p[1][1] for p in pairs]
    return est, (min(float(np.mean(lows)), est), max(float(np.mean(highs)), est))


def _score(row: Mapping[str, Any], value: str, low: str, high: str) -> dict[str, float]:
    return {"score": float(row[value]), "ci_low": float(row[low]), "ci_high": float(row[high])}


def _frozen_claim_pairs(table: pd.DataFrame, value: str, low: str, high: str
                        ) -> tuple[list[tuple[float, tuple[float, float]]], list[str]]:
    """Per data set: the SSL stand-in minus the best supervised arm (by test score), with end-to-end intervals."""
    pairs, notes = [], []
    for dataset, group in table.groupby("dataset", sort=False):
        arms = group["backbone"].map(backbone_arm)
        ssl, sup = group[arms == "ssl"], group[arms == "supervised"]
        if ssl.empty or sup.empty:
            continue
        best = sup.loc[sup[value].idxmax()]
        pairs.append(_diff(_score(ssl.iloc[0], value, low, high), _score(best, value, low, high)))
        notes.append(f"{dataset} {pairs[-1][0]:+.3f} vs {best['backbone']}")
    return pairs, notes


def study1_claims(knn: pd.DataFrame, probes: pd.DataFrame, few_summary: pd.DataFrame, seg: pd.DataFrame,
                  seg_summary: pd.DataFrame, peft: pd.DataFrame, shares: pd.DataFrame) -> pd.DataFrame:
    """The five claims of Baharoon et al. 2023 (arXiv 2312.02366), judged on this notebook's own numbers.

    Our SSL stand-in (:func:`backbone_arm` "ssl") plays DINOv2 and the measures say so; the
    supervised arms are the stand-ins of the supervised ImageNet models. Intervals: bootstrap over
    test images (kNN, probes, fine-tuning, segmentation) or over seeded repeats (few-shot), differences
    taken end to end (:data:`END_TO_END`). Margins: :data:`AUROC_MARGIN`, :data:`DICE_MARGIN`.
    """
    rows = []
    # 1. frozen features competitive with the supervised ImageNet models (kNN and linear probe)
    knn_sel = knn[knn["selected"]] if "selected" in knn else knn
    linear = probes[probes["probe"] == "linear grid"]
    pairs_k, notes_k = _frozen_claim_pairs(knn_sel, "test_auroc", "test_auroc_ci_low", "test_auroc_ci_high")
    pairs_l, notes_l = _frozen_claim_pairs(linear, "test_auroc", "test_auroc_ci_low", "test_auroc_ci_high")
    est, ci = _mean_diff(pairs_k + pairs_l)
    rows.append(claim(STUDY, 1, "Frozen DINOv2 features are competitive with supervised ImageNet models (kNN, linear "
                      "probe)", "competitive, per data set", "test AUROC(SSL stand-in) - best supervised stand-in, "
                      "mean over data sets and over kNN / linear probe", est, ci, interval=END_TO_END + ", ends "
                      "averaged over the data sets", kind="equivalence", margin=AUROC_MARGIN,
                      note="kNN: " + "; ".join(notes_k) + ". Linear probe: " + "; ".join(notes_l)))
    # 2. few-shot: near chance at the smallest n, rising; DINOv2 on top at 16
    fs = few_summary[(few_summary.get("protocol", "repeats") == "repeats") & (few_summary["metric"] == "auroc")]
    numeric = sorted({n for n in fs["n"] if n != "all"})
    if len(numeric) >= 1 and (fs["backbone"].map(backbone_arm) == "ssl").any():
        top = numeric[-1]
        at = fs[fs["n"] == top].rename(columns={"mean": "score"})
        ssl = at[at["backbone"].map(backbone_arm) == "ssl"].iloc[0]
        others = at[at["backbone"].map(backbone_arm).isin(["supervised", "random", "other"])]
        best = others.loc[others["score"].idxmax()]
        est2, ci2 = _diff(ssl, best)
        first = fs[(fs["n"] == numeric[0]) & (fs["backbone"] == ssl["backbone"])]["mean"]
        rise = float(ssl["score"]) - float(first.iloc[0]) if len(first) else float("nan")
        rows.append(claim(STUDY, 2, f"Few-shot: DINOv2 is on top at {top} patients per class (and curves rise with n "
                          "from near chance)", "NIH: 0.601 at 16, 0.763 with all data", f"few-shot linear-probe "
                          f"AUROC(SSL stand-in) - best other backbone ({best['backbone']}) at n = {top}", est2, ci2,
                          interval=END_TO_END + " (each arm: percentile bootstrap of the mean over repeats)",
                          note=f"the SSL stand-in's curve moves {rise:+.3f} from n = {numeric[0]} "
                               f"({float(first.iloc[0]):.3f}) to n = {top}"))
    else:
        rows.append(claim(STUDY, 2, "Few-shot: DINOv2 on top at 16 patients per class", "NIH: 0.601 at 16",
                          "few-shot AUROC", not_tested="no SSL stand-in or no few-shot sizes in this run"))
    # 3. frozen encoder + U-Net decoder beats a scratch U-Net at one image; the gap closes with all images
    ss = seg_summary[seg_summary["metric"] == "mean_dj"].rename(columns={"mean": "score"})
    dec = ss[ss["model"].str.endswith("U-Net decoder") & (ss["backbone"].map(backbone_arm) == "ssl")]
    scr = ss[ss["model"] == SCRATCH]
    for part, n, text, published, kw in (
            ("3a", min((n for n in ss["n"] if n != "all"), default=None),
             "Segmentation: a frozen DINOv2 encoder + U-Net decoder beats a U-Net from scratch with few images",
             "Montgomery, 1 image: 0.929 vs 0.583", {"published_effect": 0.929 - 0.583}),
            ("3b", "all", "Segmentation: the gap to the U-Net from scratch closes with all images",
             "Montgomery, all: 0.974 vs 0.973", {"kind": "equivalence", "margin": DICE_MARGIN})):
        a, b = dec[dec["n"] == n], scr[scr["n"] == n]
        if n is None or a.empty or b.empty:
            rows.append(claim(STUDY, part, text, published, "mean(Dice, Jaccard) difference",
                              not_tested="the few-shot segmentation table lacks the SSL stand-in or the scratch U-Net"))
            continue
        est3, ci3 = _diff(a.iloc[0], b.iloc[0])
        rows.append(claim(STUDY, part, text, published, f"chest phantoms, n = {n} image(s): mean(Dice, Jaccard) of "
                          f"{a.iloc[0]['model']} - {SCRATCH}", est3, ci3,
                          interval=END_TO_END + " (each arm: percentile bootstrap of the mean over repeats)", **kw))
    # 4. hardest multi-organ set: the frozen DINOv2 encoder beats the other encoders; easy sets: all similar
    dec_rows = seg[seg["head"] == SEG_HEADS["unet"]]
    for part, dataset, text, published, kw in (
            ("4a", "ct_organs", "Multi-organ segmentation (AMOS): a frozen DINOv2 encoder beats the other encoders",
             "AMOS: DINOv2 ahead", {}),
            ("4b", "chest_xray", "Easy segmentation sets (Montgomery, Shenzhen, MSD heart): all encoders similar",
             "all similar", {"kind": "equivalence", "margin": DICE_MARGIN})):
        group = dec_rows[dec_rows["dataset"] == dataset]
        arms = group["backbone"].map(backbone_arm)
        ssl, others = group[arms == "ssl"], group[arms.isin(["supervised", "other"])]
        if ssl.empty or others.empty:
            rows.append(claim(STUDY, part, text, published, "test Dice difference",
                              not_tested=f"no frozen U-Net decoder of the SSL stand-in and a pretrained other on "
                                         f"{dataset}"))
            continue
        best = others.loc[others["test_dice"].idxmax()]
        est4, ci4 = _diff(_score(ssl.iloc[0], "test_dice", "test_dice_ci_low", "test_dice_ci_high"),
                          _score(best, "test_dice", "test_dice_ci_low", "test_dice_ci_high"))
        rows.append(claim(STUDY, part, text, published, f"{dataset} phantoms: test Dice of the SSL stand-in + U-Net "
                          f"decoder - best other pretrained encoder ({best['backbone']})", est4, ci4,
                          interval=END_TO_END + " (each arm: percentile bootstrap over test images)", **kw))
    # 5. LoRA / BitFit: under 1 % of the parameters, close to full fine-tuning
    published_rows = shares[shares["model"].isin(list(DINOV2_ARCHS)) & (shares["lora_targets"] == "qkv/fc1/fc2")]
    if len(published_rows):
        worst = max(float(published_rows["lora_pct"].max()), float(published_rows["bitfit_pct"].max()))
        largest = published_rows.loc[published_rows["params_M"].idxmax()]
        est5 = max(float(largest["lora_pct"]), float(largest["bitfit_pct"])) - PEFT_SHARE_BOUND
        rows.append(claim(STUDY, "5a", "LoRA and BitFit adapt DINOv2 with under 1 % of its parameters",
                          "under 1 %", f"largest trainable share of LoRA (r = 48, qkv/fc1/fc2) and BitFit on "
                          f"{largest['model']} (the most favourable size), percent - 1", est5, (est5, est5),
                          interval="exact parameter count (no sampling)", direction=-1,
                          note=f"LoRA {float(largest['lora_pct']):.2f} %, BitFit {float(largest['bitfit_pct']):.3f} %;"
                               f" largest share over the DINOv2 architecture sizes {worst:.2f} %"))
    full = peft[peft["mode"] == "full"]
    pairs5 = []
    for mode in ("lora", "bitfit"):
        m = peft[(peft["mode"] == mode) & peft["test_auroc"].notna()]
        if len(m) and len(full):
            pairs5.append(_diff(_score(m.iloc[0], "test_auroc", "test_auroc_ci_low", "test_auroc_ci_high"),
                                _score(full.iloc[0], "test_auroc", "test_auroc_ci_low", "test_auroc_ci_high")))
    if pairs5:
        worst5 = min(pairs5, key=lambda p: p[0])
        rows.append(claim(STUDY, "5b", "LoRA and BitFit keep performance close to full fine-tuning", "close",
                          "test AUROC of the worse of LoRA / BitFit - full fine-tuning (SSL stand-in, chest "
                          "phantoms)", worst5[0], worst5[1], interval=END_TO_END + " (each arm: percentile "
                          "bootstrap over test images)", kind="equivalence", margin=AUROC_MARGIN,
                          note="LoRA " + f"{pairs5[0][0]:+.3f}" + (f", BitFit {pairs5[1][0]:+.3f}" if len(pairs5) > 1
                                                                  else "")))
    return claims_frame(rows)


def sanity_results(knn: pd.DataFrame, probes: pd.DataFrame, peft: pd.DataFrame, seg_per_class: pd.DataFrame
                   ) -> pd.DataFrame:
    """Every result of notebook 01 beside its trivial reference, for :func:`medlib.eval.claims.sanity_flags`.

    kNN / probe / fine-tuning AUROC against chance (0.5) and, for trained backbones, against
    ``random-vit-*`` on the same data set and method; segmentation Dice per class against the
    image-blind prior. Intervals: :func:`auroc_interval` / :func:`mean_interval` (bootstrap over test images).
    """
    rows = []
    knn_sel = knn[knn["selected"]] if "selected" in knn else knn
    for name, table, method in (("kNN", knn_sel, None), ("probe", probes, "probe"), ("fine-tuning", peft, "mode")):
        table = table[table["test_auroc"].notna()]
        for r in table.to_dict("records"):
            label = name if method is None else f"{name} {r[method]}"
            base = {"model": f"{r['backbone']} ({label})", "task": r["dataset"], "metric": "test AUROC",
                    "score": r["test_auroc"], "ci_low": r.get("test_auroc_ci_low", np.nan),
                    "ci_high": r.get("test_auroc_ci_high", np.nan)}
            rows.append({**base, "reference": "chance", "reference_value": 0.5})
            if backbone_arm(r["backbone"]) in ("ssl", "supervised", "other"):
                same = table[(table["dataset"] == r["dataset"]) & (table["backbone"].map(backbone_arm) == "random")]
                if method is not None:
                    same = same[same[method] == r[method]]
                if len(same):
                    rows.append({**base, "reference": f"random init ({same.iloc[0]['backbone']})",
                                 "reference_value": float(same.iloc[0]["test_auroc"])})
    for r in seg_per_class[seg_per_class["model"] != PRIOR].to_dict("records"):
        rows.append({"model": r["model"], "task": f"{r['dataset']} {r['class']}", "metric": "test Dice",
                     "score": r["dice"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                     "reference": PRIOR, "reference_value": r["prior_dice"]})
    return pd.DataFrame(rows, columns=["model", "task", "metric", "score", "ci_low", "ci_high", "reference",
                                       "reference_value"])


#: Flags of notebook 01 that are a true property of the data, each with the test that shows it.
SANITY_EXPLANATIONS: dict[tuple[str, str], str] = {}
PIXEL_STATISTICS = "pixel statistics (no network)"
RAW_PIXELS = "raw pixels 16 x 16 (no network)"
#: What each no-network reference keeps of an image, for the explanations it supports.
REFERENCE_CARRIES = {PIXEL_STATISTICS: "raw intensity (grey-level histogram, 4 x 4 mean intensities)",
                     RAW_PIXELS: "the raw pixel pattern (the grey image averaged to 16 x 16)"}


def no_network_features(datasets: Mapping[str, ImageSet], splits: Mapping[str, Mapping[str, np.ndarray]]
                        ) -> dict[tuple[str, str], FeatureSet]:
    """FeatureSets of the two references that use no network (:data:`PIXEL_STATISTICS`, :data:`RAW_PIXELS`).

    Features are :func:`medlib.models.health.pixel_statistics_features` and
    :func:`medlib.models.health.raw_pixel_features`, standardised with the train split's mean and std.
    """
    from ..models.health import pixel_statistics_features, raw_pixel_features

    features = {}
    for reference, extract in ((PIXEL_STATISTICS, pixel_statistics_features), (RAW_PIXELS, raw_pixel_features)):
        for name, ds in datasets.items():
            x = extract(np.asarray(ds.images))
            train = x[splits[name]["train"]]
            x = ((x - train.mean(0)) / (train.std(0) + 1e-6)).astype(np.float32)
            features[(reference, name)] = FeatureSet(
                cls=x, pooled=x, layers=x[:, None, :], labels=ds.labels, label_names=list(ds.label_names),
                task=ds.task, backbone=reference, dataset=name, fingerprint=reference)
    return features


def pixel_statistics_knn(datasets: Mapping[str, ImageSet], splits: Mapping[str, Mapping[str, np.ndarray]],
                         profile: Profile | str) -> pd.DataFrame:
    """The kNN table (k chosen on val, intervals: :func:`knn_table`) of both no-network references."""
    p = get_profile(profile)
    return knn_table(no_network_features(datasets, splits), splits, p.eval.knn_ks, n_resamples=p.eval.bootstrap,
                     seed=p.seed)


def no_network_probes(datasets: Mapping[str, ImageSet], splits: Mapping[str, Mapping[str, np.ndarray]],
                      profile: Profile | str, device: str = "auto") -> pd.DataFrame:
    """The probe table (:func:`probe_table`: linear grid and logistic regression) of both no-network references."""
    return probe_table(no_network_features(datasets, splits), splits, profile, device=device)


def _best_reference(table: pd.DataFrame, dataset: str, method: str | None, value: str | None
                    ) -> dict[str, Any] | None:
    """The no-network reference row of ``dataset`` (and method) whose interval reaches highest."""
    rows = table[table["dataset"] == dataset]
    if "selected" in rows and method is None:
        rows = rows[rows["selected"]]
    if method is not None:
        rows = rows[rows[method] == value]
    rows = rows.dropna(subset=["test_auroc_ci_high"])
    return None if rows.empty else rows.iloc[int(np.argmax(rows["test_auroc_ci_high"].to_numpy()))].to_dict()


def intensity_explanations(knn: pd.DataFrame, probes: pd.DataFrame, pixel_knn: pd.DataFrame,
                           pixel_probes: pd.DataFrame | None = None) -> dict[tuple[str, str], str]:
    """Explanations of "trained backbone below random init" on frozen features that the numbers support.

    A random ViT keeps its input's pixels (close to a random projection of each patch); a recipe that
    trains invariances (the SSL recipe's colour jitter and crops, the supervised stand-ins'
    augmentations) learns to discard some of them. Where the same method (kNN; or the same probe) on a
    no-network reference - pixel statistics or raw pixels - reaches the random init's AUROC (its
    interval reaches it), the label is readable from the pixels alone and losing to random init is that
    property, not a broken backbone. Only those (model, data set) pairs get an explanation.
    """
    out: dict[tuple[str, str], str] = {}
    frames = [("kNN", knn[knn["selected"]] if "selected" in knn else knn, None, pixel_knn),
              ("probe", probes, "probe", pixel_probes)]
    for name, table, method, refs in frames:
        if refs is None or not len(refs) or not len(table):
            continue
        for dataset, rows in table.groupby("dataset"):
            for _, r in rows.iterrows():
                if backbone_arm(r["backbone"]) == "random":
                    continue
                random = rows[rows["backbone"].map(backbone_arm) == "random"]
                if method is not None:
                    random = random[random[method] == r[method]]
                ref = _best_reference(refs, dataset, method, r[method] if method is not None else None)
                if random.empty or ref is None:
                    continue
                rand = float(random.iloc[0]["test_auroc"])
                if float(ref["test_auroc_ci_high"]) >= rand:
                    label = name if method is None else f"{name} {r[method]}"
                    how = "a kNN" if method is None else f"the same probe ({r[method]})"
                    out[(f"{r['backbone']} ({label})", dataset)] = (
                        f"{dataset}'s label is readable without a network, from {REFERENCE_CARRIES[ref['backbone']]}: "
                        f"{how} on {ref['backbone']} scores {float(ref['test_auroc']):.3f} "
                        f"[{float(ref['test_auroc_ci_low']):.3f}, {float(ref['test_auroc_ci_high']):.3f}] against "
                        f"random init's {rand:.3f}; a random ViT keeps its input's pixels, a trained one learns to "
                        "discard some of them (the model cards' health check, under an acquisition shift, shows the "
                        "trained backbones' gain)")
    return out


def study1_flags(knn: pd.DataFrame, probes: pd.DataFrame, peft: pd.DataFrame, seg_per_class: pd.DataFrame,
                 explanations: Mapping[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """The sanity flags of notebook 01 (results whose interval lies wholly below their trivial reference)."""
    return sanity_flags(sanity_results(knn, probes, peft, seg_per_class), study=STUDY, table="01",
                        explanations={**SANITY_EXPLANATIONS, **dict(explanations or {})})


__all__ = [
    "BenchmarkDataset", "DINOV2_ARCHS", "FewShotTables", "PUBLISHED_FEW_SHOT_NIH", "PUBLISHED_SEG_MONTGOMERY",
    "PeftTables", "SCRATCH", "SEG_HEADS", "STUDY1_DATASETS", "SegTables", "cap_train", "describe_datasets",
    "equal_step_epochs", "extract_all", "few_shot_probe", "few_shot_sizes", "few_shot_table", "few_shot_vs_paper",
    "headline_table", "knn_scores", "knn_table", "load_backbones", "load_datasets", "make_splits", "model_card_health",
    "parameter_share_table", "peft_table", "plot_few_shot", "plot_heatmap", "plot_peft", "plot_seg_few_shot",
    "plot_seg_overlays", "primary_backbone", "probe_table", "published_counterpart", "seg_model_label",
    "segmentation_few_shot_table", "segmentation_sets", "segmentation_table", "segmentation_vs_paper",
    "summarize_repeats", "AUROC_MARGIN", "DICE_MARGIN", "PRIOR", "SANITY_EXPLANATIONS", "auroc_interval",
    "backbone_arm", "headline_findings", "intensity_explanations", "mean_interval", "no_network_features", "no_network_probes",
    "pixel_statistics_knn", "RAW_PIXELS", "head_epochs", "head_grid", "resolution_ceilings", "LINEAR_HEAD_MIN_GRID",
    "linear_head_out_of_scope",
    "resolution_explanations", "capacity_explanations", "output_grid", "input_resolution_jobs",
    "input_resolution_check", "input_resolution_explanations",
    "sanity_results", "study1_claims", "study1_flags",
]


def headline_findings(knn: pd.DataFrame, probes: pd.DataFrame, seg: pd.DataFrame, claims: pd.DataFrame) -> str:
    """Sentences for the notebook's findings, generated from its tables: which backbone wins most cells of the
    frozen-feature tables and the segmentation table, and whether the one-shot segmentation gap keeps its sign."""
    knn_sel = knn[knn["selected"]] if "selected" in knn else knn
    cells = [("kNN", knn_sel), *[(p, g) for p, g in probes.groupby("probe", sort=False)]]
    wins: dict[str, int] = {}
    total = 0
    for _, table in cells:
        for _, group in table.dropna(subset=["test_auroc"]).groupby("dataset", sort=False):
            wins[group.loc[group["test_auroc"].idxmax(), "backbone"]] = wins.get(
                group.loc[group["test_auroc"].idxmax(), "backbone"], 0) + 1
            total += 1
    lines = []
    if total:
        leader, count = max(wins.items(), key=lambda kv: kv[1])
        lines.append(f"- Frozen features: **{leader}** has the highest test AUROC in {count} of {total} (method, data "
                     f"set) cells (kNN, linear probe, logistic regression)" + (
                         "; it wins every one." if count == total else "."))
    trained = seg[seg["head"] != PRIOR]
    if len(trained):
        seg_wins = [g.loc[g["test_dice"].idxmax(), "model"] for _, g in trained.groupby("dataset", sort=False)]
        lines.append("- Segmentation: the best test Dice per data set is " + ", ".join(
            f"{d}: **{m}**" for d, m in zip(trained["dataset"].unique(), seg_wins)) + ".")
    one = claims[claims["id"].astype(str) == "3a"]
    if len(one) and np.isfinite(one["ours"].iloc[0]):
        ours = float(one["ours"].iloc[0])
        sign = "the same sign as" if ours > 0 else "the **opposite** sign to"
        lines.append(f"- Few-shot segmentation at the smallest n: frozen SSL stand-in + U-Net decoder minus the U-Net "
                     f"from scratch = {ours:+.3f} (interval [{one['ci_low'].iloc[0]:+.3f}, "
                     f"{one['ci_high'].iloc[0]:+.3f}]), {sign} the published gap (+0.346 on Montgomery).")
    return "\n".join(lines)

"""Study 4, Jimenez-Perez et al. 2024, DiNO-Diffusion (https://arxiv.org/abs/2407.11594): notebook 04's runners.

Each runner returns tidy tables; the claims table and sanity flags of the notebook come from
:func:`claims_table` and :func:`sanity_table` (intervals: percentile bootstraps, bounded by construction).

Notebook 04 stays a sequence of short calls to this module and to :mod:`medlib.diffusion.build`:

- generation (:func:`medlib.diffusion.sampling.generate`, seeded and batched) in the paper's three modes:
  :func:`reconstructions` (several seeds conditioned on one real image's global tokens),
  :func:`interpolation_strips` (slerp between two images' tokens, one fixed noise per strip) and
  :func:`~medlib.diffusion.sampling.manifold_conditions` (new token sets near the data: Dirichlet mixtures of k nearest real
  neighbours, :func:`medlib.diffusion.pipeline.manifold_sample`);
- quality: :func:`sampling_sweep` (FID / KID, FD in an SSL space and PRDC against held-out images, per
  guidance scale and number of sampling steps, with a real-vs-real floor), :func:`memorisation_study`;
- downstream use: :func:`load_downstream` (site-0 chest phantoms with labels and lung / heart masks, a
  site the LDM never saw; ``paper``: the labelled ``diffusion.source_key`` set) and :func:`load_mask_downstream`
  (``paper``: the masked ``diffusion.seg_source_key`` set for the segmentation parts), :func:`augmentation_study` (real, real + synthetic and synthetic-only
  classifiers at several n, AUROC with bootstrap intervals), :func:`mask_transfer_study` (zero-shot
  segmentation, protocol (a)), :func:`~medlib.diffusion.sampling.cross_attention_maps` + :func:`score_attention_maps` (protocol (b));
- published figures (:data:`PUBLISHED`) and :func:`headline_table`; figures (``plot_*``).

Every size comes from ``profile.diffusion``; the metrics come from :mod:`medlib.diffusion.metrics`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..config import Profile, get_profile, seeded_torch_rng
from ..data.imageset import ImageSet
from ..engine import derive_seed, progress as progress_bar
from ..diffusion.build import LDMData, LDMHandle
from ..diffusion.pipeline import DiNODiffusionPipeline
from ..diffusion.sampling import (check_pipeline, cross_attention_maps, generate, manifold_conditions, to_gray,
                                 token_names)

#: Published figures of Jimenez-Perez et al. 2024 (https://arxiv.org/abs/2407.11594), as paper_results.md lists them.
PUBLISHED = pd.DataFrame([
    {"metric": "FID", "value": 4.7, "setting": "held-out MIMIC-CXR, LDM trained on 868k chest X-rays"},
    {"metric": "AUROC gain from synthetic augmentation (%)", "value": 20.0,
     "setting": "'up to 20 %' in small-data settings (relative or absolute not stated)"},
    {"metric": "zero-shot lung Dice", "value": 0.844, "setting": "best of JSRT, Montgomery, Shenzhen"},
])
DOWNSTREAM_SPLIT = (0.6, 0.1, 0.3)  # train / val / test of the site-0 downstream data (our assumption)
ARMS = ("real", "real + synthetic", "synthetic only")
LUNG_LABELS = (1, 2)  # cxr phantom masks: 1 left lung, 2 right lung, 3 heart


def _published(metric: str) -> float:
    """The paper's value of one PUBLISHED metric."""
    return float(PUBLISHED.set_index("metric").loc[metric, "value"])



# --------------------------------------------------------------------------- generation



def _defaults(profile: str | Profile, guidance_scale: float | None, steps: int | None) -> tuple[float, int]:
    cfg = get_profile(profile).diffusion
    return (cfg.guidance_scale if guidance_scale is None else float(guidance_scale),
            cfg.num_inference_steps if steps is None else int(steps))


def reconstructions(pipe: DiNODiffusionPipeline | LDMHandle, images: np.ndarray, profile: str | Profile, *,
                    seeds_per_image: int | None = None, guidance_scale: float | None = None,
                    num_inference_steps: int | None = None, seed: int = 0) -> np.ndarray:
    """(n, k, H, W) uint8: k generations conditioned on each real image's global tokens ("reconstruction")."""
    p = get_profile(profile)
    k = p.diffusion.seeds_per_image if seeds_per_image is None else int(seeds_per_image)
    g, s = _defaults(p, guidance_scale, num_inference_steps)
    images = np.asarray(images)
    out = generate(pipe, images=images, num_images_per_condition=k, guidance_scale=g, num_inference_steps=s, seed=seed)
    return out.reshape(len(images), k, *out.shape[1:])


def choose_pairs(sites: np.ndarray, n_pairs: int, seed: int = 0) -> np.ndarray:
    """(n_pairs, 2) indices of image pairs, from two different sites whenever there are two."""
    sites = np.asarray(sites)
    if len(sites) < 2 or n_pairs < 1:
        raise ValueError(f"choose_pairs: need >= 2 images and n_pairs >= 1, got {len(sites)} images, "
                         f"n_pairs={n_pairs}.")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        a = int(rng.integers(len(sites)))
        others = np.flatnonzero(sites != sites[a])
        others = others if len(others) else np.setdiff1d(np.arange(len(sites)), [a])
        pairs.append((a, int(rng.choice(others))))
    return np.asarray(pairs, dtype=np.int64)


@torch.no_grad()
def interpolation_strips(pipe: DiNODiffusionPipeline | LDMHandle, images_a: np.ndarray, images_b: np.ndarray,
                         profile: str | Profile, *, n_steps: int | None = None, guidance_scale: float | None = None,
                         num_inference_steps: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(strips (P, n_steps, H, W) uint8, ts): slerp between the tokens of a_i and b_i, ONE noise per strip.

    Keeping the initial noise fixed along a strip means every change between neighbours comes from the
    condition alone.
    """
    pipe = check_pipeline(pipe, "interpolation_strips")
    p = get_profile(profile)
    n_steps = p.diffusion.interpolation_steps if n_steps is None else int(n_steps)
    if n_steps < 2:
        raise ValueError(f"interpolation_strips: n_steps={n_steps} must be >= 2 (the two end points).")
    images_a, images_b = np.asarray(images_a), np.asarray(images_b)
    if images_a.shape != images_b.shape:
        raise ValueError(f"interpolation_strips: images_a {images_a.shape} and images_b {images_b.shape} differ.")
    g, s = _defaults(p, guidance_scale, num_inference_steps)
    ts = np.linspace(0.0, 1.0, n_steps)
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    strips = []
    for i, (a, b) in enumerate(zip(images_a, images_b)):
        tokens = pipe.interpolate(a, b, ts)
        generator = torch.Generator().manual_seed(derive_seed(seed, i))
        noise = torch.randn(shape, generator=generator).repeat(n_steps, 1, 1, 1)
        strips.append(to_gray(pipe(condition_tokens=tokens, latents=noise, guidance_scale=g,
                                    num_inference_steps=s)))
    return np.stack(strips), ts



# --------------------------------------------------------------------------- data tables


def describe_ldm_data(data: LDMData) -> pd.DataFrame:
    """One row per site: site name, LDM-train and held-out images (no labels are used)."""
    from ..data.phantoms import cxr

    rows = []
    for site in sorted(set(data.train_sites.tolist()) | set(data.heldout_sites.tolist())):
        rows.append({"site": int(site), "site_name": cxr.SITES[site].name if site >= 0 else "real source",
                     "train_images": int((data.train_sites == site).sum()),
                     "heldout_images": int((data.heldout_sites == site).sum())})
    return pd.DataFrame(rows)


def model_card_table(handle: LDMHandle) -> pd.DataFrame:
    """The LDM's model card as a two-column table (what was used, how long it trained, how good it was)."""
    card = handle.card
    q = card.get("quality_at_build", {})
    vae = card.get("vae_training", {})
    unet = card.get("unet_training", {})
    enc = card.get("condition_encoder", {})
    rows = [
        ("weights", handle.source), ("status", f"{handle.status}: {'; '.join(handle.notes)}"),
        ("condition encoder", f"{enc.get('name')} ("
                              + ("DINOv2" if enc.get("is_dinov2") else "a self-trained stand-in, not DINOv2")
                              + f"), {enc.get('num_tokens')} global "
                              f"tokens {token_names(handle)} (configured: {enc.get('tokens')}), "
                              f"weights {enc.get('weights_hash')}"),
        ("training data", card.get("data", {}).get("data")),
        ("VAE", f"{vae.get('vae')}, {vae.get('steps')} steps, held-out PSNR "
                f"{vae.get('heldout_psnr', float('nan')):.2f} dB, SSIM {vae.get('heldout_ssim', float('nan')):.3f}"),
        ("UNet", f"{unet.get('steps')} steps x batch {unet.get('batch_size')}, final loss "
                 f"{unet.get('final_loss_mean_last_10pct')}, {card.get('parameters', {}).get('unet', 0) / 1e6:.2f} M "
                 "parameters"),
        ("built on", f"{card.get('device')} ({card.get('torch_threads')} threads), {card.get('wall_time_s')} s, "
                     f"commit {card.get('built_from_commit')}"),
        ("quality at build", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in q.items()
                                       if k in ("fid", "kid_mean", "fd_name", "fd_ssl", "n_real", "mode"))),
        ("recipe hash", card.get("recipe_hash")),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


# --------------------------------------------------------------------------- quality: sweep and memorisation


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide medlib's progress bars inside (per-call feature extraction bars would flood a notebook)."""
    old = os.environ.get("MEDLIB_PROGRESS")
    os.environ["MEDLIB_PROGRESS"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MEDLIB_PROGRESS", None)
        else:
            os.environ["MEDLIB_PROGRESS"] = old


def _fd_backbone(profile: Profile):
    from ..models.backbones import create_backbone
    from ..diffusion import metrics

    size = int(profile.diffusion.fd_image_size)
    return create_backbone(metrics.fd_backbone_name(profile), **({"image_size": size} if size > 0 else {}))


@dataclass
class SweepResult:
    """Quality per sampling setting, and the generated sets of the default setting and of manifold sampling."""

    table: pd.DataFrame
    default_samples: np.ndarray
    manifold_samples: np.ndarray
    fd_name: str


def sweep_settings(profile: str | Profile) -> list[tuple[float, int]]:
    """(guidance, steps) pairs: every guidance scale at the default steps, every step count at the default guidance."""
    cfg = get_profile(profile).diffusion
    settings = [(float(g), int(cfg.num_inference_steps)) for g in cfg.guidance_scales]
    settings += [(float(cfg.guidance_scale), int(s)) for s in cfg.step_grid]
    settings.append((float(cfg.guidance_scale), int(cfg.num_inference_steps)))
    return list(dict.fromkeys(settings))


def sampling_sweep(pipe: DiNODiffusionPipeline | LDMHandle, data: LDMData, profile: str | Profile, *,
                   device: str = "cpu", progress: bool = False) -> SweepResult:
    """FID / KID (when enabled), FD_SSL and PRDC of reconstructions of held-out images per sampling setting.

    Reference = the same held-out real images (patients the LDM never saw). Extra rows: manifold samples
    at the default setting, and the **real-vs-real floor** (LDM-training images against the held-out
    ones, same n), which is what a perfect generator would score with this few images.
    """
    from ..diffusion import metrics

    pipe = check_pipeline(pipe, "sampling_sweep")
    p = get_profile(profile)
    cfg = p.diffusion
    n = min(cfg.n_fid, len(data.heldout), len(data.train))
    if n < 2:
        raise ValueError(f"sampling_sweep: needs >= 2 held-out and training images, have {len(data.heldout)} / "
                         f"{len(data.train)}.")
    # the floor's real images are kept out of the training reference of the near-copy check
    real, floor = data.heldout[:n], data.train[:n]
    train_ref = data.train[n:5 * n] if len(data.train) > n + 1 else data.train
    fd_bb = _fd_backbone(p)
    default = (float(cfg.guidance_scale), int(cfg.num_inference_steps))
    rows, samples = [], {}

    def report(mode: str, fake: np.ndarray, g: float | None, s: int | None, seconds: float, fid: bool) -> None:
        with _quiet_progress():
            rep = metrics.generative_report(train_ref, real, fake, backbone=fd_bb, device=device, fid=fid)
        rows.append({"mode": mode, "guidance_scale": g, "steps": s, "n": len(fake), "fid": rep["fid"],
                     "kid_mean": rep["kid_mean"], "fd_ssl": rep["fd_ssl"], "precision": rep["precision"],
                     "recall": rep["recall"], "density": rep["density"], "coverage": rep["coverage"],
                     "near_copy_share_pixel": rep["near_copy_share_pixel"],
                     "seconds_per_image": seconds / max(1, len(fake))})

    for g, s in progress_bar(sweep_settings(p), enabled=progress, desc="sweep"):
        t0 = time.perf_counter()
        fake = generate(pipe, images=real, guidance_scale=g, num_inference_steps=s, seed=p.seed)
        samples[(g, s)] = fake
        report("reconstruction", fake, g, s, time.perf_counter() - t0, cfg.fid_sweep or (cfg.fid and (g, s) == default))
    t0 = time.perf_counter()
    tokens = manifold_conditions(pipe, train_ref, n, k=cfg.manifold_k, seed=p.seed)
    manifold = generate(pipe, tokens=tokens, guidance_scale=default[0], num_inference_steps=default[1], seed=p.seed + 1)
    report("manifold sample", manifold, *default, time.perf_counter() - t0, cfg.fid)
    report("real vs real (floor)", floor, None, None, 0.0, cfg.fid)
    table = pd.DataFrame(rows)
    table["published_fid_best"] = _published("FID")  # the paper's best FID (868k training images, other data)
    return SweepResult(table=table, default_samples=samples[default], manifold_samples=manifold,
                       fd_name=metrics.fd_name(fd_bb))


@dataclass
class MemorisationStudy:
    """Near-copy check of generations conditioned on TRAINING images (the riskiest mode)."""

    result: Any  # metrics.MemorisationResult
    table: pd.DataFrame
    train: np.ndarray  # the training images searched
    synthetic: np.ndarray  # generated from train[:n]'s tokens


def memorisation_study(pipe: DiNODiffusionPipeline | LDMHandle, data: LDMData, profile: str | Profile, *,
                       device: str = "cpu", max_train: int = 4000) -> MemorisationStudy:
    """Generate from the tokens of n training images; nearest training image of each, against held-out reals.

    Besides the near-copy share (:func:`medlib.diffusion.metrics.memorisation`), the table gives how often
    the nearest training image is the very image whose tokens conditioned the generation (chance = 1 / N):
    the copy the paper's global-token design is meant to prevent.
    """
    from ..diffusion import metrics

    p = get_profile(profile)
    cfg = p.diffusion
    train = data.train[:max_train]
    n = min(cfg.n_fid, len(train))
    if n < 1 or len(data.heldout) < 1:
        raise ValueError("memorisation_study: needs training and held-out images.")
    synthetic = generate(pipe, images=train[:n], guidance_scale=cfg.guidance_scale,
                         num_inference_steps=cfg.num_inference_steps, seed=p.seed + 2)
    with _quiet_progress():
        result = metrics.memorisation(train, synthetic, data.heldout[:max(n, 2)], backbone=_fd_backbone(p),
                                      device=device)
    own = np.arange(n)
    row = {"n_synthetic": n, "n_train_searched": len(train), **result.summary(),
           "nearest_is_own_condition_pixel": float(np.mean(result.nn_index_pixel == own)),
           "nearest_is_own_condition_feature": float(np.mean(result.nn_index_feature == own))
           if result.nn_index_feature is not None else float("nan"),
           "chance": 1.0 / len(train)}
    return MemorisationStudy(result=result, table=pd.DataFrame([row]), train=train, synthetic=synthetic)


# --------------------------------------------------------------------------- downstream data


def _resize_labels(masks: np.ndarray, size: int) -> np.ndarray:
    """uint8 label maps (N, H, W) -> (N, size, size) by nearest neighbour."""
    if masks.shape[1] == size and masks.shape[2] == size:
        return np.asarray(masks)
    t = torch.from_numpy(np.array(masks, dtype=np.float32))[:, None]  # a copy: memory maps are read-only
    return torch.nn.functional.interpolate(t, size=(size, size), mode="nearest")[:, 0].to(torch.uint8).numpy()


def resize_set(ds: ImageSet, size: int) -> ImageSet:
    """The ImageSet at ``size`` px (images bilinear + antialias, grey; masks nearest)."""
    from ..diffusion.vae import resize_images

    images = resize_images(to_gray(np.asarray(ds.images)), size)
    masks = None if ds.masks is None else _resize_labels(np.asarray(ds.masks), size)
    return ImageSet(images=images, labels=None if ds.labels is None else np.asarray(ds.labels),
                    label_names=list(ds.label_names), task=ds.task, patient_ids=ds.patient_ids, masks=masks,
                    mask_names=list(ds.mask_names), meta=dict(ds.meta), name=f"{ds.name}@{size}px")


def binary_task(ds: ImageSet, target: str) -> ImageSet:
    """A multi-label set as the binary task ``target`` (one label column); raises with the label names."""
    if ds.task == "binary" and ds.label_names == [target]:
        return ds
    if ds.task != "multilabel" or target not in ds.label_names:
        raise ValueError(f"binary_task: {target!r} is not a label of {ds.name!r} ({ds.task}: {ds.label_names}).")
    j = ds.label_names.index(target)
    return ImageSet(images=ds.images, labels=np.asarray(ds.labels[:, j:j + 1], dtype=np.float32), label_names=[target],
                    task="binary", patient_ids=ds.patient_ids, masks=ds.masks, mask_names=list(ds.mask_names),
                    meta=dict(ds.meta), name=f"{ds.name}&target={target}")


def load_downstream(profile: str | Profile, progress: bool = False) -> tuple[ImageSet, dict[str, np.ndarray]]:
    """Labelled chest images with lung / heart masks for augmentation and segmentation, and a patient split.

    Embedded profiles: site-0 chest phantoms (``general-hospital``), a site the LDM never trained on,
    ``diffusion.n_downstream`` of them (0 = ``data.n_per_dataset``), at the LDM's image size. ``paper``:
    the source named by ``diffusion.source_key`` (its official split when it has one; it may lack masks).
    Split: patient-grouped, label-stratified train / val / test = 60 / 10 / 30 % (our assumption).
    """
    from ..data import phantoms
    from ..data.splits import patient_split

    p = get_profile(profile)
    cfg = p.diffusion
    if cfg.source_key and cfg.source_key in p.data.sources:
        from ..data.sources import load_source

        ds = load_source(p.data.sources[cfg.source_key])
    else:
        n = cfg.n_downstream or p.data.n_per_dataset
        ds = phantoms.make_dataset("cxr", n, size=max(phantoms.MIN_SIZE, p.data.phantom_size), seed=p.seed, site=0,
                                   progress=progress)
    ds = resize_set(ds, cfg.image_size)
    return ds, patient_split(ds, DOWNSTREAM_SPLIT, seed=p.seed)


def load_mask_downstream(profile: str | Profile, ds: ImageSet | None = None, split: dict[str, np.ndarray] | None = None,
                         progress: bool = False) -> tuple[ImageSet, dict[str, np.ndarray]]:
    """Chest images with lung masks for the mask-transfer study and the attention maps, and a patient split.

    ``paper`` names them by ``diffusion.seg_source_key`` (``cxr_segmentation``: Montgomery, JSRT + SCR or
    Shenzhen as a ``segfolder:`` source), a set other than the labelled ``diffusion.source_key`` one, which
    has no masks; it is resized to the LDM's image size and split by patient like :func:`load_downstream`
    (its official split when it has one). Without that key (the embedded profiles) it is the downstream set
    itself, ``ds`` / ``split`` when given (site-0 phantoms carry labels and masks), else :func:`load_downstream`.
    """
    from ..data.splits import patient_split

    p = get_profile(profile)
    cfg = p.diffusion
    if cfg.seg_source_key and cfg.seg_source_key in p.data.sources:
        from ..data.sources import load_source

        masked = resize_set(load_source(p.data.sources[cfg.seg_source_key]), cfg.image_size)
        return masked, patient_split(masked, DOWNSTREAM_SPLIT, seed=p.seed)
    if ds is not None and split is not None and ds.masks is not None:
        return ds, split
    return load_downstream(p, progress=progress)


# --------------------------------------------------------------------------- augmentation


def nested_draws(ds: ImageSet, pool: np.ndarray, ns: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """n positives + n negatives per n, drawn from ``pool`` in one seeded order, so smaller draws nest in larger."""
    if ds.task != "binary":
        raise ValueError(f"nested_draws: needs a binary task, {ds.name!r} is {ds.task}.")
    ns = sorted(int(n) for n in ns)
    if not ns or ns[0] < 1:
        raise ValueError(f"nested_draws: ns={ns} must be positive image counts per class.")
    pool = np.asarray(pool, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(pool)
    y = np.asarray(ds.labels)[order, 0] > 0.5
    pos, neg = order[y], order[~y]
    if ns[-1] > min(len(pos), len(neg)):
        raise ValueError(f"nested_draws: n={ns[-1]} per class but the pool holds {len(pos)} positive and {len(neg)} "
                         "negative images; lower diffusion.aug_ns or enlarge the data.")
    return {n: np.sort(np.concatenate([pos[:n], neg[:n]])) for n in ns}


def _with_images(ds: ImageSet, images: np.ndarray, rows: np.ndarray, name: str, repeat: int = 1) -> ImageSet:
    """New images carrying the labels / masks / patients of ``ds[rows]`` (each row repeated ``repeat`` times)."""
    rows = np.repeat(np.asarray(rows, dtype=np.int64), repeat)
    labels = None if ds.labels is None else np.asarray(ds.labels)[rows]
    return ImageSet(images=np.ascontiguousarray(images), labels=labels,
                    label_names=list(ds.label_names), task=ds.task,
                    patient_ids=np.char.add("syn:", ds.patient_ids[rows].astype(str)),
                    masks=None if ds.masks is None else np.asarray(ds.masks)[rows], mask_names=list(ds.mask_names),
                    name=name)


def _concat(a: ImageSet, b: ImageSet, name: str) -> ImageSet:
    return ImageSet(images=np.concatenate([a.images, b.images]), labels=np.concatenate([a.labels, b.labels]),
                    label_names=list(a.label_names), task=a.task,
                    patient_ids=np.concatenate([a.patient_ids, b.patient_ids]), name=name)


def train_eval_classifier(train: ImageSet, test: ImageSet, profile: str | Profile, *, steps: int | None = None,
                          device: str = "cpu", seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Fine-tune ``diffusion.aug_classifier`` with study 1's train_classifier for a fixed number of steps; test probs.

    Every run gets about ``diffusion.aug_steps`` optimiser steps (whole epochs, so up to one epoch more)
    and keeps its last step: no validation-based selection, which on a small validation split adds noise
    of its own (our assumption).
    """
    from ..data.transforms import ClassificationTransform
    from ..eval.finetune import Classifier, FinetuneConfig, predict, train_classifier
    from ..models.backbones import create_backbone
    from ..models.heads import LinearHead

    p = get_profile(profile)
    cfg = p.diffusion
    steps = cfg.aug_steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"train_eval_classifier: steps={steps} must be >= 1.")
    size = cfg.image_size
    batch = min(cfg.aug_batch_size, len(train))
    per_epoch = math.ceil(len(train) / batch)
    epochs = math.ceil(steps / per_epoch)
    backbone = create_backbone(cfg.aug_classifier, image_size=size)
    with seeded_torch_rng(seed):  # the head's init from ``seed``: torch seeds each process at random
        head = LinearHead(backbone.embed_dim, train.n_classes)
    model = Classifier(backbone, head)
    # our assumptions: head lr aug_lr, backbone lr aug_lr / 10, rotation 7 deg (Tayebi Arasteh et al. 2023,
    # arXiv 2308.07688), no flip (laterality)
    fc = FinetuneConfig(epochs=epochs, batch_size=batch, lr=cfg.aug_lr, backbone_lr=cfg.aug_lr / 10,
                        weight_decay=1e-4)
    t_train = ClassificationTransform(size, train=True, scale=(0.8, 1.0), hflip=False, rotation=7.0)
    t_eval = ClassificationTransform(size, train=False, resize=size)
    res = train_classifier(model, train, None, fc, transform_train=t_train, transform_eval=t_eval, seed=seed,
                           device=device, progress=progress)
    probs = predict(res.model, test, t_eval, device=device)
    return {"probs": probs, "epochs": epochs, "steps": epochs * per_epoch, "seconds": res.wall_time_s}


@dataclass
class AugmentationResult:
    """AUROC per (n, arm, repeat) with bootstrap intervals, the summary over repeats and paired gains."""

    table: pd.DataFrame  # one row per (n, repeat, arm): test AUROC and its bootstrap interval
    summary: pd.DataFrame  # one row per (n, arm): mean over repeats with its interval, std / min / max, gain
    comparisons: pd.DataFrame  # gains over real per n and the change of the gain with n (augmentation_gains)
    examples_real: np.ndarray
    examples_synthetic: np.ndarray
    target: str
    y_test: np.ndarray | None = None  # test labels
    scores: dict | None = None  # (n, arm) -> (repeats, test images) scores
    boot: dict | None = None  # (n, arm) -> (mean AUROC over repeats, its bootstrap draws on one shared plan)


def augmentation_study(pipe: DiNODiffusionPipeline | LDMHandle, ds: ImageSet, split: dict[str, np.ndarray],
                       profile: str | Profile, *, device: str = "cpu", progress: bool = False) -> AugmentationResult:
    """Classifiers on n real labelled images per class, on real + synthetic, and on synthetic only.

    Synthetic images are generated from the training images' own tokens (``diffusion.aug_synthetic_per_real``
    per image) and carry their labels. Every run trains for about ``diffusion.aug_steps`` optimiser steps,
    whatever its n and arm, keeps its last step (:func:`train_eval_classifier`; our assumption) and is
    tested on the real test split (AUROC with a bootstrap interval over test images, ``eval.bootstrap``
    resamples); the validation split is not used. ``diffusion.aug_repeats`` repeats redraw the real images and
    the training seed: with a few images per class one run's AUROC moves by more than its test-set
    interval shows, so gains are judged on the mean over repeats with a two-level percentile bootstrap
    (test images and repeats, paired across arms and n: :func:`augmentation_gains`).
    """
    from ..eval.stats import bootstrap_ci

    pipe = check_pipeline(pipe, "augmentation_study")
    p = get_profile(profile)
    cfg = p.diffusion
    k, repeats = int(cfg.aug_synthetic_per_real), int(cfg.aug_repeats)
    if k < 1 or repeats < 1:
        raise ValueError(f"augmentation_study: diffusion.aug_synthetic_per_real={k} and aug_repeats={repeats} must "
                         "be >= 1.")
    task = binary_task(ds, cfg.aug_target)
    test = task.subset(split["test"])
    y_test = np.asarray(test.labels)[:, 0]
    draws = {r: nested_draws(task, split["train"], cfg.aug_ns, seed=p.seed + r) for r in range(repeats)}
    needed = np.unique(np.concatenate([d[max(d)] for d in draws.values()]))  # every image some draw uses
    synthetic = generate(pipe, images=np.asarray(task.images)[needed], num_images_per_condition=k,
                         guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                         seed=p.seed + 3, progress=progress)
    position = {int(r): i for i, r in enumerate(needed)}
    rows, scores_by_run = [], {}
    for r, by_n in progress_bar(draws.items(), enabled=progress, desc="augmentation repeats"):
        for n, draw in by_n.items():
            real = task.subset(draw, name=f"real n={n}")
            syn_rows = np.concatenate([np.arange(position[int(i)] * k, position[int(i)] * k + k) for i in draw])
            syn = _with_images(task, synthetic[syn_rows], draw, f"synthetic n={n}", repeat=k)
            arms = {"real": real, "real + synthetic": _concat(real, syn, f"real+synthetic n={n}"),
                    "synthetic only": syn}
            for arm, train_set in arms.items():
                out = train_eval_classifier(train_set, test, p, device=device, seed=p.seed + r)
                scores_by_run[(n, r, arm)] = out["probs"][:, 0]
                ci = bootstrap_ci(y_test, out["probs"][:, 0], "auroc", n_resamples=p.eval.bootstrap, seed=p.seed)
                rows.append({"n_per_class": n, "repeat": r, "arm": arm,
                             "real_images": len(real) if arm != "synthetic only" else 0,
                             "synthetic_images": len(syn) if arm != "real" else 0, "epochs": out["epochs"],
                             "steps": out["steps"], "auroc": ci.estimate, "ci_low": ci.low, "ci_high": ci.high,
                             "interval": "95 % percentile bootstrap over test images (this run)",
                             "seconds": out["seconds"]})
    table = pd.DataFrame(rows)
    scores = {(n, arm): np.stack([scores_by_run[(n, r, arm)] for r in range(repeats)])
              for n in sorted(cfg.aug_ns) for arm in ARMS}
    boot, _ = _augmentation_intervals(y_test, scores, p.eval.bootstrap, p.seed)
    summary = (table.groupby(["n_per_class", "arm"], sort=False)["auroc"]
               .agg(mean="mean", std="std", min="min", max="max", repeats="count").reset_index())
    summary.insert(2, "metric", "auroc")
    cis = [percentile_interval(boot[(int(r.n_per_class), r.arm)][1], r.mean) for r in summary.itertuples()]
    summary.insert(4, "ci_low", [c[0] for c in cis])
    summary.insert(5, "ci_high", [c[1] for c in cis])
    summary.insert(6, "interval", AUG_INTERVAL)
    base = summary[summary["arm"] == "real"].set_index("n_per_class")["mean"]
    summary["gain_vs_real"] = summary["mean"] - summary["n_per_class"].map(base)
    summary["gain_vs_real_pct"] = 100 * summary["gain_vs_real"] / summary["n_per_class"].map(base)
    summary["published_gain_pct_max"] = np.where(summary["arm"] == "real + synthetic",
                                                 _published("AUROC gain from synthetic augmentation (%)"), np.nan)
    first = draws[0][max(draws[0])]
    show = min(len(first), 6)
    result = AugmentationResult(table=table, summary=summary, comparisons=pd.DataFrame(),
                                examples_real=np.asarray(task.images)[first[:show]],
                                examples_synthetic=synthetic[np.array([position[int(i)] for i in first[:show]]) * k],
                                target=cfg.aug_target, y_test=y_test, scores=scores, boot=boot)
    result.comparisons = augmentation_gains(result)
    repeats_with_gain = table.pivot_table(index=["n_per_class", "repeat"], columns="arm", values="auroc")
    wins = {(n, f"{arm} - real"): int((part[arm] - part["real"] > 0).sum())
            for n, part in repeats_with_gain.groupby(level=0) for arm in ARMS[1:]}
    result.comparisons["repeats_with_gain"] = [wins.get((r.n_per_class, r.comparison), np.nan)
                                               for r in result.comparisons.itertuples()]
    return result


# --------------------------------------------------------------------------- zero-shot segmentation (a)


def mask_prior(masks: np.ndarray, n_classes: int) -> np.ndarray:
    """The per-pixel majority label of training masks: a segmenter that never looks at the image."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) == 0:
        raise ValueError(f"mask_prior: needs label maps (N, H, W), got {masks.shape}.")
    counts = np.stack([(masks == c).sum(axis=0) for c in range(n_classes)])
    return counts.argmax(axis=0).astype(np.uint8)


def _scores(pred: np.ndarray, true: np.ndarray, n_classes: int, names: Sequence[str]) -> dict[str, float]:
    """Mean-over-images macro Dice / Jaccard, per-class Dice and the lung Dice (mean of both lungs)."""
    from ..eval.segmentation import dice_jaccard

    per = [dice_jaccard(a, b, n_classes) for a, b in zip(pred, true)]
    out = {"dice": float(np.nanmean([s.macro_dice for s in per])),
           "jaccard": float(np.nanmean([s.macro_jaccard for s in per]))}
    dice = np.array([s.dice for s in per])  # (N, n_classes - 1)
    for j, name in enumerate(names):
        out[f"dice_{name}"] = float(np.nanmean(dice[:, j]))
    lungs = [j for j, name in enumerate(names) if "lung" in name]
    out["lung_dice"] = float(np.nanmean(dice[:, lungs])) if lungs else float("nan")
    return out


@dataclass
class MaskTransferResult:
    """Protocol (a): test scores of the segmenter trained on synthetic pairs, beside references."""

    table: pd.DataFrame
    lr_tables: dict[str, pd.DataFrame]
    synthetic_train: ImageSet  # synthetic images with their conditioning images' masks
    test: ImageSet
    predictions: dict[str, np.ndarray]  # method -> (N, H, W) test label maps
    source: str = ""  # the masked set's source string (diffusion.seg_source_key); "" = the site-0 phantoms


def mask_transfer_study(pipe: DiNODiffusionPipeline | LDMHandle, ds: ImageSet, split: dict[str, np.ndarray],
                        profile: str | Profile, *, device: str = "cpu", progress: bool = False) -> MaskTransferResult:
    """Zero-shot segmentation, protocol (a): train on (synthetic image, original mask) pairs only; test on reals.

    ``ds`` / ``split`` are the downstream set of :func:`load_downstream`; where the profile names a masked
    chest set (``diffusion.seg_source_key``, ``paper``) that set is read instead (:func:`load_mask_downstream`),
    since the labelled set has no masks. Images with masks condition the LDM (one generation each); a U-Net
    from scratch (our assumption: the
    paper's segmenter is unknown) trains on the synthetic images with the ORIGINAL masks, its epoch and
    lr chosen on synthetic validation pairs too (no real mask is used before the test). References: the
    same U-Net trained on the real pairs (supervised ceiling), the per-pixel majority mask of the training
    masks (an image-blind prior: chest anatomy is stereotyped), and the alignment of the synthetic images
    with the masks they inherit (the real-trained U-Net's Dice on them).
    """
    from ..eval.segmentation import lr_grid, predict_masks, scratch_unet

    pipe = check_pipeline(pipe, "mask_transfer_study")
    p = get_profile(profile)
    cfg = p.diffusion
    ds, split = load_mask_downstream(p, ds, split)
    if ds.masks is None or not ds.mask_names:
        key = cfg.seg_source_key or "cxr_segmentation"
        raise ValueError(f"mask_transfer_study: {ds.name!r} has no masks; protocol (a) needs images with masks: name "
                         f"a chest set with lung masks as data.sources[{key!r}] (diffusion.seg_source_key).")
    n_classes = len(ds.mask_names) + 1
    train_rows = split["train"][:cfg.seg_train_images]
    val_rows = split["val"][:max(2, cfg.seg_train_images // 4)]
    real_train, real_val, test = ds.subset(train_rows), ds.subset(val_rows), ds.subset(split["test"])
    syn_images = generate(pipe, images=np.concatenate([real_train.images, real_val.images]),
                          guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps,
                          seed=p.seed + 4, progress=progress)
    syn_train = _with_images(real_train, syn_images[:len(real_train)], np.arange(len(real_train)), "synthetic pairs")
    syn_val = _with_images(real_val, syn_images[len(real_train):], np.arange(len(real_val)), "synthetic val pairs")
    kwargs = dict(lrs=p.eval.seg_lrs, seed=p.seed, epochs=p.eval.seg_epochs, batch_size=p.eval.seg_batch_size,
                  image_size=cfg.image_size, device=device, progress=progress)
    fits, lr_tables = {}, {}
    for method, (train, val) in {"mask transfer (synthetic pairs)": (syn_train, syn_val),
                                 "supervised (real pairs)": (real_train, real_val)}.items():
        fits[method], lr_tables[method] = lr_grid(lambda: scratch_unet(n_classes), train, val, **kwargs)
    true = np.asarray(test.masks)
    predictions = {m: predict_masks(fit.model, test, cfg.image_size, device=device) for m, fit in fits.items()}
    predictions["majority mask prior"] = np.repeat(mask_prior(real_train.masks, n_classes)[None], len(test), axis=0)
    rows = []
    real_masks_used = {"mask transfer (synthetic pairs)": 0, "supervised (real pairs)": len(real_train) + len(real_val),
                       "majority mask prior": len(real_train)}
    for method, pred in predictions.items():
        rows.append({"method": method, "evaluated_on": f"{len(test)} real test images",
                     "real_masks_used": real_masks_used[method], **_scores(pred, true, n_classes, ds.mask_names)})
    aligned = predict_masks(fits["supervised (real pairs)"].model, syn_train, cfg.image_size, device=device)
    rows.append({"method": "alignment: real-trained U-Net on synthetic images vs inherited masks",
                 "evaluated_on": f"{len(syn_train)} synthetic training images", "real_masks_used": np.nan,
                 **_scores(aligned, np.asarray(syn_train.masks), n_classes, ds.mask_names)})
    table = pd.DataFrame(rows)
    table["published_lung_dice"] = np.where(table["method"] == "mask transfer (synthetic pairs)",
                                            _published("zero-shot lung Dice"), np.nan)
    source = p.data.sources.get(cfg.seg_source_key, "") if cfg.seg_source_key else ""
    return MaskTransferResult(table=table, lr_tables=lr_tables, synthetic_train=syn_train, test=test,
                              predictions=predictions, source=source)


# --------------------------------------------------------------------------- zero-shot segmentation (b)



def score_attention_maps(maps: np.ndarray, masks: np.ndarray, token_names: Sequence[str],
                         labels: Sequence[int] = LUNG_LABELS) -> pd.DataFrame:
    """Per token: pixel AUROC of the (upsampled) map for the lung fields, and Dice of its Otsu threshold.

    ``dice_high`` takes map > Otsu threshold as lung, ``dice_low`` map < threshold. Choosing the better
    of the two afterwards looks at the masks, so it is an optimistic upper bound, not zero-shot.
    """
    from skimage.filters import threshold_otsu
    from sklearn.metrics import roc_auc_score

    maps, masks = np.asarray(maps, dtype=np.float32), np.asarray(masks)
    if maps.ndim != 4 or masks.ndim != 3 or len(maps) != len(masks):
        raise ValueError(f"score_attention_maps: maps (N, T, h, w) and masks (N, H, W) must match, got {maps.shape} "
                         f"and {masks.shape}.")
    if len(token_names) != maps.shape[1]:
        raise ValueError(f"score_attention_maps: {len(token_names)} token names for {maps.shape[1]} maps.")
    up = torch.nn.functional.interpolate(torch.from_numpy(maps), size=masks.shape[1:], mode="bilinear",
                                         align_corners=False).numpy()
    truth = np.isin(masks, labels)
    rows = []
    for t, name in enumerate(token_names):
        aucs, high, low = [], [], []
        for m, y in zip(up[:, t], truth):
            if y.all() or not y.any():
                continue
            aucs.append(roc_auc_score(y.ravel(), m.ravel()))
            thr = threshold_otsu(m) if np.ptp(m) > 0 else m.mean()
            for pred, acc in ((m > thr, high), (m < thr, low)):
                acc.append(2 * (pred & y).sum() / max(1, pred.sum() + y.sum()))
        rows.append({"token": name, "images": len(aucs), "pixel_auroc_lung": float(np.mean(aucs)) if aucs else np.nan,
                     "dice_high": float(np.mean(high)) if high else np.nan,
                     "dice_low": float(np.mean(low)) if low else np.nan})
    return pd.DataFrame(rows)



# --------------------------------------------------------------------------- intervals, claims and sanity gates

#: Equivalence margin of claim 1 (samples as close to held-out images as real images are): the gap of our
#: FD to the real-vs-real floor may be up to this share of the floor itself (our assumption, fixed in code).
FD_MARGIN_FRACTION = 0.5
CI_LEVEL = 0.95


def percentile_interval(draws: np.ndarray, estimate: float, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap ``draws`` (NaN draws dropped), widened to contain ``estimate``.

    The percentiles of a bounded statistic stay inside its range. Widening to the estimate only ever
    makes the interval larger (a skewed bootstrap can leave the plug-in estimate just outside).
    """
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if len(draws) < 2 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(min(low, estimate)), float(max(high, estimate))


def auroc_resampled(y: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) of ``scores`` for binary ``y`` in each resample ``indices`` (B, N) -> (B,).

    NaN in a resample that holds one class only (:func:`medlib.eval.stats.resampled_macro_auroc` on one label).
    """
    from ..eval.stats import resampled_macro_auroc

    y = np.asarray(y).astype(np.int64).reshape(-1, 1)
    s = np.asarray(scores, dtype=float).reshape(-1, 1)
    return resampled_macro_auroc(y, s, np.atleast_2d(np.asarray(indices, dtype=np.int64)))


def resample_plan(n_test: int, n_repeats: int, n_resamples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(test indices (B, n_test), repeat indices (B, n_repeats)): a two-level bootstrap over test images and repeats.

    The same plan serves every arm and every n, so their differences are paired (same test images,
    same repeats: the draws of repeat r nest across n).
    """
    if n_test < 2 or n_repeats < 1 or n_resamples < 2:
        raise ValueError(f"resample_plan: needs >= 2 test images, >= 1 repeat and >= 2 resamples, got {n_test}, "
                         f"{n_repeats}, {n_resamples}.")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_test, (n_resamples, n_test)), rng.integers(0, n_repeats, (n_resamples, n_repeats))


def mean_auroc_draws(y: np.ndarray, scores: np.ndarray, plan: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Bootstrap draws (B,) of the mean test AUROC over repeats; ``scores`` (R, N): one row per repeat."""
    test_idx, rep_idx = plan
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    per_repeat = np.stack([auroc_resampled(y, s, test_idx) for s in scores], axis=1)  # (B, R)
    return np.nanmean(np.take_along_axis(per_repeat, rep_idx, axis=1), axis=1)


AUG_INTERVAL = "95 % percentile bootstrap over test images and repeats, paired across arms and n"


def _augmentation_intervals(y: np.ndarray, scores: dict[tuple[int, str], np.ndarray], n_resamples: int,
                            seed: int) -> tuple[dict[tuple[int, str], tuple[float, np.ndarray]], tuple]:
    """(n, arm) -> (mean AUROC over repeats, its bootstrap draws), all on one resample plan."""
    n_rep, n_test = next(iter(scores.values())).shape
    plan = resample_plan(n_test, n_rep, n_resamples, seed)
    full = np.arange(n_test)[None]
    out = {}
    for key, s in scores.items():
        estimate = float(np.mean([auroc_resampled(y, row, full)[0] for row in s]))
        out[key] = (estimate, mean_auroc_draws(y, s, plan))
    return out, plan


def augmentation_gains(augmentation: "AugmentationResult") -> pd.DataFrame:
    """Gain in mean AUROC over repeats of each arm over real, at every n, and the change of the gain with n.

    Rows ``comparison = "<arm> - real"`` per n, and ``"gain at n_min - gain at n_max"`` (the paper: the
    gain shrinks as real data grow, so positive). Intervals: :data:`AUG_INTERVAL`.
    """
    boot = augmentation.boot
    rows = []
    ns = sorted({n for n, _ in boot})
    for n in ns:
        real_est, real_draws = boot[(n, "real")]
        for arm in ARMS[1:]:
            est, draws = boot[(n, arm)]
            gain, gain_draws = est - real_est, draws - real_draws
            low, high = percentile_interval(gain_draws, gain)
            rows.append({"n_per_class": n, "comparison": f"{arm} - real", "metric": "auroc gain", "estimate": gain,
                         "ci_low": low, "ci_high": high, "interval": AUG_INTERVAL,
                         "gain_pct_of_real": 100 * gain / real_est if real_est else float("nan")})
    if len(ns) >= 2:
        lo_n, hi_n = ns[0], ns[-1]
        d = {n: (boot[(n, "real + synthetic")][0] - boot[(n, "real")][0],
                 boot[(n, "real + synthetic")][1] - boot[(n, "real")][1]) for n in (lo_n, hi_n)}
        est = d[lo_n][0] - d[hi_n][0]
        low, high = percentile_interval(d[lo_n][1] - d[hi_n][1], est)
        rows.append({"n_per_class": f"{lo_n} vs {hi_n}",
                     "comparison": f"(real + synthetic - real) at n={lo_n} minus at n={hi_n}",
                     "metric": "auroc gain difference", "estimate": est, "ci_low": low, "ci_high": high,
                     "interval": AUG_INTERVAL, "gain_pct_of_real": float("nan")})
    return pd.DataFrame(rows)


def per_image_dice(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes - 1) Dice of each foreground class in each image (NaN where absent from both)."""
    from ..eval.segmentation import dice_jaccard

    return np.array([dice_jaccard(a, b, n_classes).dice for a, b in zip(pred, true)], dtype=float)


SEG_INTERVAL = "95 % percentile bootstrap over test images (paired with the prior)"


def segmentation_per_class(transfer: "MaskTransferResult", *, n_resamples: int = 1000, seed: int = 0,
                           prior: str = "majority mask prior") -> pd.DataFrame:
    """Per method and structure (each mask class, and both lungs together): test Dice beside the prior's.

    Dice is the mean over test images; ``dice_gain_vs_prior`` is the method's Dice minus the
    image-blind prior's on the same images. Intervals: :data:`SEG_INTERVAL`.
    """
    test = transfer.test
    names = list(test.mask_names)
    n_classes = len(names) + 1
    true = np.asarray(test.masks)
    dice = {m: per_image_dice(pred, true, n_classes) for m, pred in transfer.predictions.items()}
    lungs = [j for j, name in enumerate(names) if "lung" in name]
    structures = [(name, [j]) for j, name in enumerate(names)] + ([("lungs (mean of both)", lungs)] if lungs else [])
    idx = np.random.default_rng(seed).integers(0, len(true), (n_resamples, len(true)))

    def stat(values: np.ndarray, cols: list[int]) -> tuple[float, np.ndarray]:
        per_image = np.nanmean(values[:, cols], axis=1)
        with np.errstate(invalid="ignore"), warnings_off():
            return float(np.nanmean(per_image)), np.nanmean(per_image[idx], axis=1)

    rows = []
    for method, values in dice.items():
        if method == prior:
            continue
        for structure, cols in structures:
            est, draws = stat(values, cols)
            p_est, p_draws = stat(dice[prior], cols)
            low, high = percentile_interval(draws, est)
            g_low, g_high = percentile_interval(draws - p_draws, est - p_est)
            rows.append({"method": method, "structure": structure, "dice": est, "dice_ci_low": low,
                         "dice_ci_high": high, "prior_dice": p_est, "dice_gain_vs_prior": est - p_est,
                         "dice_gain_vs_prior_ci_low": g_low, "dice_gain_vs_prior_ci_high": g_high,
                         "interval": SEG_INTERVAL, "test_images": len(true)})
    return pd.DataFrame(rows)


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    """Silence numpy's "mean of empty slice" (an all-NaN column is NaN, as meant)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def fd_floor_gap(real: np.ndarray, fake: np.ndarray, floor: np.ndarray, backbone: Any, *, n_resamples: int = 200,
                 seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """FD(real, fake) - FD(real, floor) in the SSL space, with a percentile bootstrap interval.

    ``fake[i]`` is generated from ``real[i]``'s tokens, so (real, fake) are resampled together; the floor
    images independently. Duplicates in a resample bias FD upwards in both terms alike.
    """
    from ..diffusion import metrics

    with _quiet_progress():
        f_real, f_fake, f_floor = (metrics.ssl_features(x, backbone, device=device) for x in (real, fake, floor))
    fd_fake, fd_floor = metrics.frechet_distance(f_real, f_fake), metrics.frechet_distance(f_real, f_floor)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        i = rng.integers(0, len(f_real), len(f_real))
        j = rng.integers(0, len(f_floor), len(f_floor))
        draws.append(metrics.frechet_distance(f_real[i], f_fake[i]) - metrics.frechet_distance(f_real[i], f_floor[j]))
    low, high = percentile_interval(np.array(draws), fd_fake - fd_floor)
    return {"fd_fake": fd_fake, "fd_floor": fd_floor, "gap": fd_fake - fd_floor, "ci_low": low, "ci_high": high,
            "n": len(f_real), "resamples": n_resamples}


def _cosine_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return 1.0 - a @ b.T


def source_retrieval(real: np.ndarray, generated: np.ndarray, backbone: Any, *, n_resamples: int = 1000,
                     seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """How much closer each generation is to its own source than to the other sources, in the SSL space.

    ``generated[i]`` is conditioned on ``real[i]``. Per generation: the share of other real images
    farther from it than its source (cosine distance of CLS features; ties count one half), 0.5 when
    the source is no closer than a random other image. Returns the mean share minus 0.5 (range
    [-0.5, 0.5]), a percentile bootstrap interval over generations, and top-1 retrieval accuracy.
    """
    from ..diffusion import metrics

    real, generated = np.asarray(real), np.asarray(generated)
    if len(real) != len(generated) or len(real) < 3:
        raise ValueError(f"source_retrieval: needs >= 3 paired images, got {len(real)} and {len(generated)}.")
    with _quiet_progress():
        f_real, f_gen = (metrics.ssl_features(x, backbone, device=device) for x in (real, generated))
    return source_retrieval_from_features(f_real, f_gen, n_resamples=n_resamples, seed=seed)


def source_retrieval_from_features(f_real: np.ndarray, f_gen: np.ndarray, *, n_resamples: int = 1000,
                                   seed: int = 0) -> dict[str, float]:
    """:func:`source_retrieval` on given features (rows paired)."""
    d = _cosine_distances(np.asarray(f_gen, float), np.asarray(f_real, float))
    n = len(d)
    own = np.diag(d)[:, None]
    others = ~np.eye(n, dtype=bool)
    share = (((d > own) + 0.5 * (d == own)) * others).sum(1) / (n - 1)
    est = float(share.mean() - 0.5)
    idx = np.random.default_rng(seed).integers(0, n, (n_resamples, n))
    low, high = percentile_interval(share[idx].mean(1) - 0.5, est)
    return {"estimate": est, "ci_low": low, "ci_high": high, "n": n,
            "top1": float(np.mean(np.argmin(d, axis=1) == np.arange(n))), "chance_top1": 1.0 / n}


def median_gap(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """median(a) - median(b), with a percentile bootstrap interval (a and b resampled independently)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    est = float(np.median(a) - np.median(b))
    draws = (np.median(a[rng.integers(0, len(a), (n_resamples, len(a)))], axis=1)
             - np.median(b[rng.integers(0, len(b), (n_resamples, len(b)))], axis=1))
    low, high = percentile_interval(draws, est)
    return {"estimate": est, "ci_low": low, "ci_high": high}


def quality_and_semantics(sweep: SweepResult, data: LDMData, profile: str | Profile, *,
                          device: str = "cpu") -> tuple[dict[str, float], dict[str, float]]:
    """Inputs of claims 1 and 4a from the sweep's default reconstructions of the held-out images.

    Claim 1: :func:`fd_floor_gap` (reconstructions vs the real-vs-real floor, the sweep's floor images);
    claim 4a: :func:`source_retrieval` (is each reconstruction nearest its own source?).
    """
    p = get_profile(profile)
    n = len(sweep.default_samples)
    real, floor = data.heldout[:n], data.train[:n]
    backbone = _fd_backbone(p)
    quality = fd_floor_gap(real, sweep.default_samples, floor, backbone, n_resamples=min(200, p.eval.bootstrap),
                           seed=p.seed, device=device)
    semantics = source_retrieval(real, sweep.default_samples, backbone, n_resamples=p.eval.bootstrap, seed=p.seed,
                                 device=device)
    return quality, semantics


STUDY = "04"


def claims_table(sweep: SweepResult, memorisation: "MemorisationStudy", augmentation: "AugmentationResult",
                 transfer: "MaskTransferResult", profile: str | Profile, *, quality: dict[str, float],
                 semantics: dict[str, float], seg_classes: pd.DataFrame | None = None) -> pd.DataFrame:
    """The four claims of the paper (reference/claims.md, section 04), judged on this notebook's numbers.

    ``quality`` is :func:`fd_floor_gap` of the default reconstructions, ``semantics`` :func:`source_retrieval`
    of the same reconstructions. Verdicts by :func:`medlib.eval.claims.claim`.
    """
    from ..eval.claims import claim, claims_frame

    p = get_profile(profile)
    rows = []
    # 1. closeness to held-out images: FD gap to the real-vs-real floor (an equivalence claim)
    floor = quality["fd_floor"]
    t = sweep.table
    fid_note = ""
    fids = t.set_index("mode")["fid"] if "fid" in t.columns else pd.Series(dtype=float)
    default = t[(t["mode"] == "reconstruction") & (t["guidance_scale"] == p.diffusion.guidance_scale)
                & (t["steps"] == p.diffusion.num_inference_steps)]
    if len(default) and "fid" in t.columns and np.isfinite(default["fid"].iloc[0]) and \
            np.isfinite(fids.get("real vs real (floor)", np.nan)):
        fid_note = (f"; Inception FID {default['fid'].iloc[0]:.1f} against a real-vs-real floor of "
                    f"{fids['real vs real (floor)']:.1f} at the same n")
    if np.isfinite(floor) and floor > 0:
        rows.append(claim(
            STUDY, 1, "Samples are close to held-out real images", "FID as low as 4.7 (held-out MIMIC-CXR)",
            f"{sweep.fd_name}(reconstructions, held-out) - {sweep.fd_name}(training images, held-out) "
            f"(floor {floor:.2f}, n = {quality['n']})", quality["gap"], (quality["ci_low"], quality["ci_high"]),
            interval=f"95 % percentile bootstrap over images ({quality['resamples']} resamples)", kind="equivalence",
            margin=FD_MARGIN_FRACTION * floor,
            note=f"margin = {FD_MARGIN_FRACTION:g} x the floor (our assumption); the paper's FID level is not "
                 f"comparable (phantoms, {quality['n']} images, another feature space){fid_note}"))
    else:
        rows.append(claim(STUDY, 1, "Samples are close to held-out real images", "FID as low as 4.7",
                          "FD gap to the real-vs-real floor", not_tested="no positive real-vs-real floor was measured"))
    # 2. augmentation: gain at the smallest n, and the gain shrinking as n grows
    gains = augmentation_gains(augmentation)
    rs = gains[gains["comparison"] == "real + synthetic - real"]
    published = "up to 20 % AUC gain in small-data settings; the gain shrinks as real data grow"
    if len(rs):
        small = rs.iloc[0]
        others = "; ".join(f"n={int(r.n_per_class)}: {r.estimate:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                           for r in rs.itertuples(index=False))
        rows.append(claim(
            STUDY, "2a", "Synthetic augmentation raises AUROC in the small-data setting", published,
            f"AUROC(real + synthetic) - AUROC(real), mean of {augmentation.table['repeat'].nunique()} repeats, "
            f"n = {int(small['n_per_class'])} per class ({augmentation.target})",
            small["estimate"], (small["ci_low"], small["ci_high"]), interval=AUG_INTERVAL,
            note=f"gain at every n: {others}; relative gain at the smallest n {small['gain_pct_of_real']:+.1f} %"))
    trend = gains[gains["metric"] == "auroc gain difference"]
    if len(trend):
        tr = trend.iloc[0]
        n_lo, n_hi = tr["n_per_class"].split(" vs ")
        rows.append(claim(STUDY, "2b", "The augmentation gain shrinks as real data grow", published,
                          f"gain at n = {n_lo} minus gain at n = {n_hi} per class", tr["estimate"],
                          (tr["ci_low"], tr["ci_high"]), interval=AUG_INTERVAL))
    else:
        rows.append(claim(STUDY, "2b", "The augmentation gain shrinks as real data grow", published,
                          "gain difference between n's", not_tested="this profile runs a single n"))
    # 3. zero-shot segmentation by mask transfer against the image-blind prior
    if seg_classes is None:
        seg_classes = segmentation_per_class(transfer, n_resamples=p.eval.bootstrap, seed=p.seed)
    lungs = seg_classes[(seg_classes["method"] == "mask transfer (synthetic pairs)")
                        & (seg_classes["structure"] == "lungs (mean of both)")]
    sup = seg_classes[(seg_classes["method"] == "supervised (real pairs)")
                      & (seg_classes["structure"] == "lungs (mean of both)")]
    if len(lungs):
        r = lungs.iloc[0]
        sup_note = (f"; the U-Net on real pairs reaches {sup['dice'].iloc[0]:.3f} [{sup['dice_ci_low'].iloc[0]:.3f}, "
                    f"{sup['dice_ci_high'].iloc[0]:.3f}]" if len(sup) else "")
        rows.append(claim(
            STUDY, 3, "Zero-shot lung segmentation by mask transfer from synthetic pairs works",
            "up to 84.4 % lung Dice (JSRT, Montgomery, Shenzhen)",
            "lung Dice(mask transfer) - lung Dice(image-blind majority-mask prior)", r["dice_gain_vs_prior"],
            (r["dice_gain_vs_prior_ci_low"], r["dice_gain_vs_prior_ci_high"]), interval=SEG_INTERVAL,
            note=f"mask transfer {r['dice']:.3f} [{r['dice_ci_low']:.3f}, {r['dice_ci_high']:.3f}], prior "
                 f"{r['prior_dice']:.3f}{sup_note}; the paper's level is on other data"))
    else:
        rows.append(claim(STUDY, 3, "Zero-shot lung segmentation by mask transfer", "up to 84.4 % lung Dice",
                          "lung Dice gain over the prior", not_tested="the downstream masks have no lungs"))
    # 4. semantics kept without copying
    rows.append(claim(
        STUDY, "4a", "Global-token conditioning keeps the source image's semantics",
        "reconstructions keep the source's content", "P(source closer to its reconstruction than another held-out "
        f"image) - 0.5, cosine in the condition encoder's CLS space (n = {semantics['n']})",
        semantics["estimate"], (semantics["ci_low"], semantics["ci_high"]),
        interval=f"95 % percentile bootstrap over generations",
        note=f"top-1 retrieval of the source {semantics['top1']:.3f} (chance {semantics['chance_top1']:.3f}); the "
             "space is the condition encoder's own, which favours this test"))
    res = memorisation.result
    if res.nn_feature is not None:
        gap = median_gap(res.nn_feature, res.heldout_nn_feature, n_resamples=p.eval.bootstrap, seed=p.seed)
        rows.append(claim(
            STUDY, "4b", "Global-token conditioning does not copy the image (no memorisation)",
            "global tokens prevent copying the image",
            "median nearest-training-image distance of generations from training tokens - that of held-out real "
            "images (cosine, SSL CLS space)", gap["estimate"], (gap["ci_low"], gap["ci_high"]),
            interval="95 % percentile bootstrap over images, the two sets resampled independently",
            note=f"near-copies (below the held-out 1st percentile): {res.near_copy_share_feature:.3f} in features, "
                 f"{res.near_copy_share_pixel:.3f} in pixels; a positive gap: generations farther from the training "
                 "set than unseen real images are. Read with 4a: a generator of noise never copies either"))
    return claims_frame(rows)


def sanity_table(augmentation: "AugmentationResult", seg_classes: pd.DataFrame,
                 explanations: dict[tuple[str, str], str] | None = None) -> pd.DataFrame:
    """Sanity flags of notebook 04: a classifier's AUROC below chance, a segmenter's Dice below the prior.

    Classifiers: each (n, arm) mean AUROC over repeats with :data:`AUG_INTERVAL`; segmenters: each
    method and mask class against the image-blind prior's Dice of that class.
    """
    from ..eval.claims import sanity_flags

    rows = []
    for (n, arm), (est, draws) in augmentation.boot.items():
        low, high = percentile_interval(draws, est)
        rows.append({"table": "04_augmentation", "model": f"classifier on {arm}",
                     "task": f"{augmentation.target}, n = {n} per class", "metric": "AUROC", "score": est,
                     "ci_low": low, "ci_high": high, "reference": "chance", "reference_value": 0.5})
    for r in seg_classes.itertuples(index=False):
        if r.structure.startswith("lungs (mean"):
            continue
        rows.append({"table": "04_segmentation_per_class", "model": r.method, "task": r.structure,
                     "metric": "Dice", "score": r.dice, "ci_low": r.dice_ci_low, "ci_high": r.dice_ci_high,
                     "reference": "image-blind prior", "reference_value": r.prior_dice})
    results = pd.DataFrame(rows)
    flags = []
    for table, part in results.groupby("table", sort=False):
        flags.append(sanity_flags(part, study=STUDY, table=table, explanations=explanations))
    from ..eval.claims import SANITY_COLUMNS

    flags = [f for f in flags if len(f)]
    return pd.concat(flags, ignore_index=True) if flags else pd.DataFrame(columns=SANITY_COLUMNS)


# --------------------------------------------------------------------------- published beside ours


def headline_table(sweep: SweepResult, augmentation: AugmentationResult, transfer: MaskTransferResult,
                   profile: str | Profile) -> pd.DataFrame:
    """Our headline numbers beside the paper's three (FID, AUROC gain, zero-shot lung Dice)."""
    from ..reporting import paper_vs_ours

    p = get_profile(profile)
    t = sweep.table
    default = t[(t["mode"] == "reconstruction") & (t["guidance_scale"] == p.diffusion.guidance_scale)
                & (t["steps"] == p.diffusion.num_inference_steps)].iloc[0]
    gains = augmentation.comparisons
    gains = gains[gains["comparison"] == "real + synthetic - real"].sort_values("n_per_class")
    small = gains.iloc[0]
    every = "; ".join(f"n = {int(r.n_per_class)}: {r.gain_pct_of_real:+.1f} % ({r.estimate:+.3f} "
                      f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}])" for r in gains.itertuples(index=False))
    transfer_row = transfer.table[transfer.table["method"] == "mask transfer (synthetic pairs)"].iloc[0]
    prior = transfer.table[transfer.table["method"] == "majority mask prior"]
    prior_dice = float(prior["lung_dice"].iloc[0]) if len(prior) else float("nan")
    ours = pd.DataFrame([
        {"metric": "FID", "value": default["fid"],
         "ours_setting": f"{int(default['n'])} reconstructions of held-out phantoms vs those images"
                         + (" (FID off in this profile)" if pd.isna(default["fid"]) else "")
                         + f"; {sweep.fd_name} = {default['fd_ssl']:.3g}"},
        {"metric": "AUROC gain from synthetic augmentation (%)", "value": small["gain_pct_of_real"],
         "ours_setting": f"relative gain of the mean AUROC of real + synthetic over real at the smallest n "
                         f"({int(small['n_per_class'])} per class, {augmentation.target}; not the best n). Absolute "
                         f"gain, {AUG_INTERVAL}, at every n: {every}"},
        {"metric": "zero-shot lung Dice", "value": transfer_row["lung_dice"],
         "ours_setting": "mask transfer: U-Net on synthetic images + inherited masks, "
                         + (f"real test images of {transfer.source}" if transfer.source else "real site-0 test phantoms")
                         + (f"; image-blind majority-mask prior: {prior_dice:.3f}" if np.isfinite(prior_dice) else "")},
    ])
    table = paper_vs_ours(ours, PUBLISHED, on=["metric"], profile=p)
    return table.merge(ours[["metric", "ours_setting"]], on="metric").merge(
        PUBLISHED[["metric", "setting"]].rename(columns={"setting": "published_setting"}), on="metric")


# --------------------------------------------------------------------------- figures


def _show(ax: Any, img: np.ndarray, title: str | None = None) -> None:
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def plot_sample_grid(real: np.ndarray, vae_recon: np.ndarray, recon: np.ndarray, manifold: np.ndarray,
                     title: str) -> Any:
    """Rows = conditioning images: real | VAE reconstruction | k generations; last row: manifold samples."""
    import matplotlib.pyplot as plt

    n, k = recon.shape[:2]
    cols = max(2 + k, min(len(manifold), 2 + k))
    fig, axes = plt.subplots(n + 1, cols, figsize=(1.5 * cols, 1.55 * (n + 1)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        for j, (img, head) in enumerate([(real[i], "real (condition)"), (vae_recon[i], "VAE only")]
                                        + [(recon[i, s], f"generated, draw {s + 1}") for s in range(k)]):
            axes[i, j].axis("on")
            _show(axes[i, j], img, head if i == 0 else None)
    for j, img in enumerate(manifold[:cols]):  # its own row, each cell headed: not under the columns above
        axes[n, j].axis("on")
        _show(axes[n, j], img, f"manifold sample {j + 1}")
    axes[n, 0].set_ylabel("manifold", fontsize=9)
    fig.suptitle(title)
    return fig


def plot_interpolations(real_a: np.ndarray, real_b: np.ndarray, strips: np.ndarray, ts: np.ndarray, title: str) -> Any:
    """One row per pair: real a | generations along the slerp path | real b."""
    import matplotlib.pyplot as plt

    n, m = strips.shape[:2]
    fig, axes = plt.subplots(n, m + 2, figsize=(1.4 * (m + 2), 1.5 * n + 0.4), squeeze=False,
                             layout="constrained")
    for i in range(n):
        _show(axes[i, 0], real_a[i], "real a" if i == 0 else None)
        for j in range(m):
            _show(axes[i, j + 1], strips[i, j], f"t={ts[j]:.2f}" if i == 0 else None)
        _show(axes[i, m + 1], real_b[i], "real b" if i == 0 else None)
    fig.suptitle(title)
    return fig


def plot_sweep(table: pd.DataFrame, profile: str | Profile, title: str, fd_name: str = "FD_SSL") -> Any:
    """FD_SSL (and FID where computed) against guidance scale and against sampling steps; floor as a line."""
    import matplotlib.pyplot as plt

    cfg = get_profile(profile).diffusion
    rec = table[table["mode"] == "reconstruction"]
    floor = table[table["mode"] == "real vs real (floor)"]
    panels = [("guidance_scale", rec[rec["steps"] == cfg.num_inference_steps], "guidance scale"),
              ("steps", rec[rec["guidance_scale"] == cfg.guidance_scale], "sampling steps")]
    metrics = [("fd_ssl", fd_name)] + ([("fid", "FID")] if rec["fid"].notna().sum() >= 2 else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.4 * len(metrics) + 0.8), squeeze=False,
                             layout="constrained")
    for r, (col, label) in enumerate(metrics):
        for c, (x, part, xlabel) in enumerate(panels):
            ax = axes[r, c]
            part = part.sort_values(x)
            ax.plot(part[x], part[col], "o-", label="reconstructions of held-out images")
            if len(floor) and np.isfinite(floor[col].iloc[0]):
                ax.axhline(floor[col].iloc[0], color="k", ls="--", lw=1, label="real vs real (floor, same n)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{label} (lower is better)" if c == 0 else "")
            ax.set_title(f"{label} vs {xlabel}", fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9, frameon=False)  # off the data
    fig.suptitle(title)
    return fig


def plot_augmentation(table: pd.DataFrame, title: str) -> Any:
    """Test AUROC against n real images per class: each repeat as a dot, the mean over repeats as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    arms = list(dict.fromkeys(table["arm"]))
    for i, arm in enumerate(arms):
        part = table[table["arm"] == arm]
        colour = f"C{i}"
        jitter = 1 + 0.06 * (i - (len(arms) - 1) / 2)  # side by side on the log axis
        ax.scatter(part["n_per_class"] * jitter, part["auroc"], s=14, alpha=0.45, color=colour)
        mean = part.groupby("n_per_class")["auroc"].mean()
        ax.plot(mean.index * jitter, mean.to_numpy(), "o-", color=colour, label=f"{arm} (mean of repeats)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled real images per class n (their tokens also make the synthetic images)")
    ax.set_ylabel("test AUROC (real images)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title)
    return fig


def plot_segmentation(transfer: MaskTransferResult, n: int, title: str) -> Any:
    """Top: synthetic training images with the masks they inherit. Bottom: real test images, truth and predictions."""
    import matplotlib.pyplot as plt

    from ..reporting import overlay_masks

    methods = list(transfer.predictions)
    n = min(n, len(transfer.test), len(transfer.synthetic_train))
    rows = 1 + len(methods) + 1
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.7 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    syn = transfer.synthetic_train
    for j in range(n):
        axes[0, j].imshow(overlay_masks(syn.images[j], syn.masks[j]))
        axes[1, j].imshow(overlay_masks(transfer.test.images[j], transfer.test.masks[j]))
        for r, m in enumerate(methods):
            axes[2 + r, j].imshow(overlay_masks(transfer.test.images[j], transfer.predictions[m][j]))
    labels = ["synthetic + inherited mask", "real test + truth"] + methods
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label if len(label) < 26 else label[:24] + "...", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_attention(images: np.ndarray, maps: np.ndarray, masks: np.ndarray, names: Sequence[str], title: str) -> Any:
    """Rows: image with lung outline, then each token's cross-attention map (upsampled)."""
    import matplotlib.pyplot as plt

    n, t = maps.shape[:2]
    fig, axes = plt.subplots(1 + t, n, figsize=(1.6 * n, 1.7 * (1 + t)), squeeze=False,
                             layout="constrained")
    up = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(maps, dtype=np.float32)), size=images.shape[1:3],
                                         mode="bilinear", align_corners=False).numpy()
    lung = np.isin(masks, LUNG_LABELS)
    for j in range(n):
        _show(axes[0, j], images[j])
        axes[0, j].contour(lung[j], levels=[0.5], colors="c", linewidths=0.8)
        for r in range(t):
            axes[1 + r, j].imshow(up[j, r], cmap="magma")
            axes[1 + r, j].contour(lung[j], levels=[0.5], colors="c", linewidths=0.6)
            axes[1 + r, j].set_xticks([])
            axes[1 + r, j].set_yticks([])
    axes[0, 0].set_ylabel("image + lungs", fontsize=8)
    for r, name in enumerate(names):
        axes[1 + r, 0].set_ylabel(f"attn: {name}", fontsize=8)
    fig.suptitle(title)
    return fig


def plot_training_data(data: LDMData, per_site: int, title: str) -> Any:
    """A few LDM training images of each site (one row per site)."""
    import matplotlib.pyplot as plt

    from ..data.phantoms import cxr

    sites = sorted(set(data.train_sites.tolist()))
    fig, axes = plt.subplots(len(sites), per_site, figsize=(1.4 * per_site, 1.5 * len(sites)), squeeze=False,
                             layout="constrained")
    for r, site in enumerate(sites):
        rows = np.flatnonzero(data.train_sites == site)[:per_site]
        for j in range(per_site):
            axes[r, j].axis("off")
            if j < len(rows):
                _show(axes[r, j], data.train[rows[j]])
        axes[r, 0].axis("on")
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(cxr.SITES[site].name if site >= 0 else "source", fontsize=8)
    fig.suptitle(title)
    return fig


__all__ = [
    "AUG_INTERVAL", "FD_MARGIN_FRACTION", "SEG_INTERVAL", "augmentation_gains", "auroc_resampled", "claims_table",
    "fd_floor_gap", "mean_auroc_draws", "median_gap", "per_image_dice", "percentile_interval", "quality_and_semantics",
    "resample_plan",
    "sanity_table", "segmentation_per_class", "source_retrieval", "source_retrieval_from_features",
    "ARMS", "AugmentationResult", "DOWNSTREAM_SPLIT", "LUNG_LABELS", "MaskTransferResult", "MemorisationStudy",
    "PUBLISHED", "SweepResult", "augmentation_study", "binary_task", "choose_pairs", "cross_attention_maps",
    "describe_ldm_data", "generate", "headline_table", "interpolation_strips", "load_downstream", "load_mask_downstream",
    "manifold_conditions",
    "mask_prior", "mask_transfer_study", "memorisation_study", "model_card_table", "nested_draws", "plot_attention",
    "plot_augmentation", "plot_interpolations", "plot_sample_grid", "plot_segmentation", "plot_sweep",
    "plot_training_data", "reconstructions", "resize_set", "sampling_sweep", "score_attention_maps", "sweep_settings",
    "token_names", "train_eval_classifier",
]

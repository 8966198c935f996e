"""Profiles, paths, seeding and device choice: the one place where sizes live.

A notebook receives only a profile *name*; everything it needs (data sizes, image size,
model names, epochs, grids) comes from :func:`get_profile`. Profiles are frozen
dataclasses, so a notebook cannot change them by accident; derive a variant with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .accel import activate, active_switches, resolve_device  # noqa: F401  (resolve_device: re-exported)
from .settings import active_settings, apply_settings, override  # noqa: F401  (override: re-exported)



@dataclass(frozen=True)
class DataConfig:
    """Sizes of the data every notebook draws from."""

    phantom_size: int  # pixel size at which phantoms are generated and cached
    n_per_dataset: int  # images per phantom data set (per site / family)
    n_natural: int  # natural stand-in images for SSL / supervised pre-training
    n_show: int  # images per grid in figures
    sources: dict[str, str] = field(default_factory=dict)  # logical name -> source spec


@dataclass(frozen=True)
class BackboneConfig:
    """The ViT architecture of the embedded backbones and which names a study compares."""

    arch: str  # timm architecture name the embedded ViTs are built from
    arch_kwargs: dict = field(default_factory=dict)  # img_size, patch_size, embed_dim, depth, ...
    image_size: int = 64  # input size for feature extraction / fine-tuning
    embedded_suffix: str = "vit-tiny"  # embedded names end with this, e.g. ssl-natural-vit-tiny
    compare: tuple[str, ...] = ()  # backbone names compared in the studies
    sup_epochs: int = 8  # epochs of the supervised embedded backbones (sup-natural, sup-cxr)


@dataclass(frozen=True)
class SSLConfig:
    """DINOv2 recipe settings, scaled to the profile (official values in comments)."""

    global_size: int  # 224
    local_size: int  # 96 / 98
    n_local: int  # 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    batch_size: int = 64  # 1024
    steps: int = 1000
    warmup_steps: int = 100  # 10 epochs
    base_lr: float = 4e-3  # x sqrt(batch / 1024)
    min_lr: float = 1e-6
    weight_decay: tuple[float, float] = (0.04, 0.4)
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    drop_path: float = 0.1  # 0.3
    n_prototypes: int = 4096  # 65536
    head_hidden: int = 512  # 2048
    head_bottleneck: int = 128  # 256
    teacher_momentum: tuple[float, float] = (0.992, 1.0)
    teacher_temp: tuple[float, float] = (0.04, 0.07)
    teacher_temp_warmup_steps: int = 300  # 30 epochs
    student_temp: float = 0.1
    centering: str = "sinkhorn_knopp"  # or "softmax"
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    freeze_last_layer_steps: int = 100  # first epoch
    vertical_flip: bool = False  # Lange & Shekel 2024 adds vertical flips on domain images
    grayscale_p: float = 0.2  # probability of a grey view (DINOv2: 0.2)
    checkpoint_every: int = 200


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation protocol sizes (few-shot grid, kNN k, probe / fine-tune epochs)."""

    knn_ks: tuple[int, ...] = (10, 20, 100, 200)
    few_shot_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    few_shot_repeats: int = 5
    probe_epochs: int = 10
    probe_lrs: tuple[float, ...] = (1e-3, 5e-3, 1e-2, 5e-2)
    finetune_epochs: int = 10
    finetune_batch_size: int = 32
    seg_epochs: int = 10
    folds: int = 5
    bootstrap: int = 1000
    batch_size: int = 128
    logreg_n_c: int = 45  # C values of the logistic-regression probe, 10**linspace(-6, 5, n) (official: 45)
    seg_images: int = 0  # images per segmentation data set (0 = all of data.n_per_dataset)
    seg_repeats: int = 3  # seeded repeats of each few-shot segmentation size
    seg_lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # segmentation-head lr grid, chosen on val (Baharoon et al. 2023)
    seg_batch_size: int = 8  # segmentation batch (not given by Baharoon et al. 2023; small batches give more steps)
    # our assumption: a frozen linear head trains at least this many optimiser steps (epochs raised to reach it);
    # the paper's 10 epochs over thousands of 448 px images are thousands of steps, 15 epochs over 58 images are 120
    seg_head_min_steps: int = 0
    # our assumption: every head trained on all images trains at least this many steps (CT slices, seven small
    # structures, need several hundred; few-shot curves keep eval.seg_epochs' steps, see segmentation_few_shot_table)
    seg_min_steps: int = 0
    # at most this many seeded runs of each all-images segmentation model, the best on validation Dice kept; a further
    # run only while the best so far leaves a class below the image-blind prior on validation (our assumption; on CT
    # slices about one U-Net-from-scratch run in three collapsed a class at lr 0.1, and validation Dice shows it)
    seg_restarts: int = 1
    # retrain each U-Net still below the prior at the masks' resolution (notebook 01's input-resolution check)
    seg_resolution_check: bool = True
    # at most this many L-BFGS iterations for the full-batch linear fit (segmentation.fit_linear_map) that tells
    # capacity from under-fit where a linear head is below the prior (tiny, whitened: chest converges in ~50)
    seg_fit_iters: int = 300
    peft_train_images: int = 0  # cap on the training images of full / LoRA / BitFit fine-tuning (0 = whole train split)
    # study 2 (Tayebi Arasteh et al. 2023): initialisations compared by full fine-tuning (medlib.studies.imagenet_vs_ssl_init); paper values
    init_arms: tuple[str, ...] = ("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "sup-cxr-vit-tiny",
                                  "efficientnet-lite0.in1k")  # SSL natural, sup. natural, sup. medical, CNN ref.
    init_sites: tuple[int, ...] = (0, 1, 2, 3, 4)  # chest phantom sites = the paper's data sets (never site 5)
    init_images: tuple[int, ...] = (1500, 6000, 3000, 4000, 5000)  # phantom images per site (sizes differ)
    init_epochs: int = 100  # Tayebi Arasteh et al. 2023: 100 epochs, AdamW, no weight decay
    init_batch_size: int = 30  # Tayebi Arasteh et al. 2023: batch ~30
    init_lr: float = 1e-5  # backbone learning rate (Tayebi Arasteh et al. 2023)
    init_head_lr: float = 1e-5  # head learning rate (Tayebi Arasteh et al. 2023: one rate for the whole network)
    init_fractions: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # data-size ablation (our assumption)
    init_ablation_site: int = 1  # the site whose train split is subsampled
    # study 3 (Lange & Shekel 2024): 5-fold cross-validated fine-tuning grid (medlib.studies.radimagenet_ssl_continuation); paper values as defaults
    cv_images: int = 0  # images per evaluation task (0 = data.n_per_dataset)
    cv_epochs: int = 30  # fine-tuning epochs per fold (best val-loss epoch restored)
    cv_lrs: tuple[float, ...] = (1e-5, 1e-6)  # learning-rate grid (Lange & Shekel 2024)
    cv_batch_sizes: tuple[int, ...] = (8, 16, 32)  # batch-size grid (Lange & Shekel 2024)
    cv_imagenet_cnn: str = "efficientnet-lite0.in1k"  # the "IN" baseline (paper: ResNet-50 ImageNet)
    cv_medical_cnn: str = ""  # the "RIN" baseline; "" = build the medical-supervised CNN stand-in
    cv_medical_images: int = 400  # images per phantom family to pre-train the stand-in on
    cv_medical_epochs: int = 4  # epochs of that supervised pre-training
    cv_ssl_vit: str = "ssl-natural-vit-tiny"  # the natural SSL ViT (paper: DINOv2 ViT-S/14)
    cv_continued_suffix: str = "vit-tiny"  # continued SSL ViTs are ssl-us-<suffix> / ssl-knee-<suffix>
    cv_ssl_fallback_steps: int = 0  # cap on the steps of a continuation run here when weights are missing (0 = recipe)
    # share of ssl.steps a continuation runs (None = the recipe's steps_fraction, 0.34). `paper` sets 1.0: its ssl
    # section is Lange & Shekel 2024's continuation itself (100 epochs x 100 iterations)
    cv_ssl_steps_fraction: float | None = None


@dataclass(frozen=True)
class DiffusionConfig:
    """DiNO-Diffusion (Jimenez-Perez et al. 2024) sizes: LDM data, VAE, UNet, training, sampling and notebook 04's evaluations.

    The paper gives none of these (protocols.md, Jimenez-Perez et al. 2024: UNKNOWN); every value is our assumption,
    scaled to the profile. Fields in ``medlib.diffusion.build.TRAIN_FIELDS`` shape the weights (recipe hash).
    """

    image_size: int = 64  # side of the generated images (pixels)
    train_sites: tuple[int, ...] = (1, 2, 3, 4)  # chest-phantom sites the LDM trains on, unlabelled
    n_per_site: int = 600  # phantoms per training site
    heldout_fraction: float = 0.1  # patients held out of LDM training (FID reference, memorisation)
    source_key: str = ""  # key of data.sources replacing the phantoms as unlabelled training data (paper); its labels
    # also feed the augmentation study (study.load_downstream)
    seg_source_key: str = ""  # key of data.sources with chest images + lung masks for the mask-transfer study and the
    # attention maps (paper: cxr_segmentation); "" = the downstream set itself (site-0 phantoms carry labels and masks)
    encoder: str = "ssl-natural-vit-tiny"  # frozen condition backbone (paper: DINOv2 ViT-B/14 reg4)
    encoder_image_size: int = 64
    tokens: tuple[str, ...] = ("cls", "pooled", "registers")  # global tokens only
    pretrained_vae: str = ""  # frozen public diffusers VAE (paper: stabilityai/sd-vae-ft-mse); "" = train ours
    vae_channels: tuple[int, ...] = (32, 64, 64)  # x4 downsampling
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    vae_steps: int = 600  # tiny: ~0.56 s CPU per step on one core (measured)
    vae_batch_size: int = 16
    vae_lr: float = 5e-4
    kl_weight: float = 1e-6
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_layers_per_block: int = 1
    cross_attention_dim: int = 128
    attention_head_dim: int = 32
    ldm_steps: int = 1600  # tiny: ~0.75 s CPU per step on one core (measured); VAE + UNet <= ~30 min
    ldm_batch_size: int = 32
    ldm_lr: float = 3e-4
    ldm_warmup_steps: int = 100
    cond_dropout: float = 0.1  # condition -> null tokens during training (classifier-free guidance)
    prediction_type: str = "epsilon"
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    checkpoint_every: int = 100
    scheduler: str = "dpm++"  # sampler: "dpm++" or "ddim"
    num_inference_steps: int = 20
    guidance_scale: float = 2.0
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 4.0)  # sweep at num_inference_steps
    step_grid: tuple[int, ...] = (10, 20, 40)  # sweep at guidance_scale
    n_show: int = 6  # conditioning images in the sample grids
    seeds_per_image: int = 3  # reconstructions per conditioning image
    n_interpolations: int = 3  # interpolation strips
    interpolation_steps: int = 7  # images per strip (end points included)
    manifold_k: int = 5  # neighbours mixed by manifold sampling
    n_fid: int = 64  # generated (and real) images per FID / FD estimate
    fid: bool = True  # Inception FID at the default sampling setting (slow on CPU)
    fid_sweep: bool = False  # Inception FID for every sweep setting too (FD_SSL is always computed)
    n_downstream: int = 0  # site-0 chest phantoms for augmentation / segmentation (0 = data.n_per_dataset)
    aug_target: str = "cardiomegaly"  # binary finding of the augmentation study
    aug_ns: tuple[int, ...] = (4, 16, 64)  # labelled real images per class
    aug_synthetic_per_real: int = 1
    aug_classifier: str = "efficientnet-lite0.in1k"
    aug_steps: int = 40  # optimiser steps of every classifier run, whatever its n and arm (last step kept)
    aug_batch_size: int = 16
    aug_repeats: int = 3  # redraws of the real images + training seed (one run's AUROC is noisy at small n)
    aug_lr: float = 1e-3
    seg_train_images: int = 80  # images whose tokens (and masks) train the mask-transfer segmenter
    n_attention: int = 8  # images whose cross-attention maps are scored
    fd_backbone: str = ""  # backbone of FD_SSL ("" = the profile's embedded SSL ViT; paper: DINOv2 ViT-L/14)
    fd_image_size: int = 0  # input size of notebook 04's FD_SSL / PRDC / retrieval features (0 = the backbone's own)


@dataclass(frozen=True)
class Profile:
    """Everything a notebook needs to know about how big to run."""

    name: str
    description: str
    data: DataConfig
    backbone: BackboneConfig
    ssl: SSLConfig
    eval: EvalConfig
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available else cpu
    num_workers: int = 0
    diffusion: DiffusionConfig = DiffusionConfig()
    # CPU threads each notebook computes with under `make reproduce` (0: an equal share of the cores). The CPU
    # profiles pin 1: the order of a float sum, and so the last digits of every trained model, depends on the
    # thread count (tiny's tables differed between 1 and 2 threads, and one verdict at its margin with them)
    cpu_threads: int = 0

    def resolved_device(self) -> str:
        """The torch device string this profile runs on; its accelerator switches (``medlib.accel``) become active."""
        device = resolve_device(self.device)
        activate(self, device)
        return device


_VIT_TINY_64 = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
_VIT_SMOKE_32 = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
_VIT_S14_224 = dict(img_size=224, patch_size=14)

_PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="a few dozen images, tiny models, a few steps: CI / nbval, seconds per notebook",
        cpu_threads=1,
        data=DataConfig(phantom_size=64, n_per_dataset=48, n_natural=64, n_show=8),
        backbone=BackboneConfig(
            arch="vit_tiny_patch16_224", arch_kwargs=_VIT_SMOKE_32, image_size=32,
            embedded_suffix="vit-smoke", sup_epochs=1,
            compare=("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "efficientnet-lite0.in1k", "random-vit-tiny"),
        ),
        ssl=SSLConfig(global_size=32, local_size=16, n_local=2, batch_size=8, steps=4, warmup_steps=1,
                      teacher_temp_warmup_steps=2, n_prototypes=64, head_hidden=64, head_bottleneck=32,
                      freeze_last_layer_steps=1, checkpoint_every=2),
        eval=EvalConfig(knn_ks=(5,), few_shot_ns=(1, 2), few_shot_repeats=2, probe_epochs=2,
                        probe_lrs=(1e-2,), finetune_epochs=1, finetune_batch_size=8, seg_epochs=1,
                        folds=2, bootstrap=50, batch_size=16, logreg_n_c=3, seg_images=24, seg_repeats=1,
                        init_images=(40, 48, 28, 32, 36), init_epochs=1, init_batch_size=8, init_lr=1e-4,
                        init_head_lr=1e-3, init_fractions=(0.5, 1.0),
                        seg_lrs=(1e-1,), seg_head_min_steps=20, seg_resolution_check=False, seg_fit_iters=25,
                        cv_epochs=2, cv_lrs=(1e-4,), cv_batch_sizes=(8,), cv_medical_images=16, cv_medical_epochs=1),
        diffusion=DiffusionConfig(image_size=32, n_per_site=16, encoder_image_size=32, vae_channels=(8, 16, 16),
                                  vae_steps=3, vae_batch_size=8, unet_channels=(16, 32), cross_attention_dim=32,
                                  attention_head_dim=8, ldm_steps=4, ldm_batch_size=8, ldm_warmup_steps=1,
                                  checkpoint_every=2, num_inference_steps=4, guidance_scales=(1.0, 3.0),
                                  step_grid=(2, 4), n_show=3, seeds_per_image=2, n_interpolations=1,
                                  interpolation_steps=4, n_fid=12, fid=False, n_downstream=120, aug_target="no_finding",
                                  aug_ns=(3,), aug_steps=2, aug_batch_size=4, aug_repeats=2, seg_train_images=12,
                                  n_attention=3),
    ),
    "tiny": Profile(
        name="tiny",
        description="thousands of images, small self-trained ViTs at 64 px: 2-core CPU, minutes; teaching",
        cpu_threads=1,
        data=DataConfig(phantom_size=128, n_per_dataset=1200, n_natural=4000, n_show=16),
        backbone=BackboneConfig(
            arch="vit_tiny_patch16_224", arch_kwargs=_VIT_TINY_64, image_size=64,
            embedded_suffix="vit-tiny",
            # 8 epochs (16 steps each on the 1,020 chest phantoms) left sup-cxr at held-out AUROC 0.64, its kNN
            # features below random init on its own task (-0.034): 30 epochs, as the gpu profile (our assumption)
            sup_epochs=30,
            compare=("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "efficientnet-lite0.in1k", "random-vit-tiny"),
        ),
        # Sized for a 2-core CPU build (~15-30 images/s). Our assumption, not the paper's: at this small
        # scale the official teacher temperature ramp (0.04 -> 0.07) and momentum 0.992 drift to uniform
        # collapse, so the teacher stays at 0.04 and follows the student faster (0.98 -> 1). Also ours, for a
        # 2.9 M-parameter ViT trained from scratch in 700 steps: 1,024 prototypes, the patch embedding at the
        # full learning rate (DINOv2's 0.2 steadies large ViTs) and no drop path - in a trial on this CPU these
        # passed the health check (+0.059 mean kNN AUROC under shift); grey-only views + half the lr gave +0.046.
        ssl=SSLConfig(global_size=64, local_size=32, n_local=4, batch_size=48, steps=700, warmup_steps=70,
                      n_prototypes=1024, head_hidden=384, head_bottleneck=128, patch_embed_lr_mult=1.0, drop_path=0.0,
                      teacher_temp=(0.04, 0.04), teacher_temp_warmup_steps=1, teacher_momentum=(0.98, 1.0),
                      freeze_last_layer_steps=70, checkpoint_every=50),
        eval=EvalConfig(knn_ks=(10, 20, 100), few_shot_ns=(1, 2, 4, 8, 16), few_shot_repeats=5,
                        probe_epochs=30, finetune_epochs=8, finetune_batch_size=32, seg_epochs=15,
                        folds=5, bootstrap=1000, logreg_n_c=8, seg_images=80, seg_repeats=2, seg_lrs=(1e-1,),
                        seg_head_min_steps=1000, seg_min_steps=500, seg_restarts=2,
                        init_images=(240, 480, 300, 360, 420), init_epochs=4, init_batch_size=32, init_lr=1e-4,
                        init_head_lr=1e-3, init_fractions=(0.1, 0.3, 1.0),
                        peft_train_images=160,
                        # study 3: the paper's lr grid x100 (a few dozen steps per fold here, not 30 epochs)
                        cv_images=80, cv_epochs=3, cv_lrs=(1e-4, 1e-3), cv_batch_sizes=(16,),
                        cv_medical_images=200, cv_medical_epochs=3, cv_ssl_fallback_steps=12),
        diffusion=DiffusionConfig(),  # the defaults: sized for a 2-core CPU build (~30 min) and notebook
    ),
    "gpu": Profile(
        name="gpu",
        description="paper-like sizes (224 px, ViT-S/14) on embedded data, self-trained: one GPU",
        data=DataConfig(phantom_size=224, n_per_dataset=8000, n_natural=50000, n_show=16),  # a multiple of patch 14
        backbone=BackboneConfig(
            arch="vit_small_patch14_dinov2", arch_kwargs=_VIT_S14_224, image_size=224,
            embedded_suffix="vit-s14", sup_epochs=30,
            compare=("ssl-natural-vit-s14", "sup-natural-vit-s14", "efficientnet-lite0.in1k", "random-vit-s14"),
        ),
        ssl=SSLConfig(global_size=224, local_size=98, n_local=8, batch_size=256, steps=4000, warmup_steps=400,
                      n_prototypes=16384, head_hidden=2048, head_bottleneck=256, drop_path=0.3,
                      teacher_temp_warmup_steps=1200, freeze_last_layer_steps=400, checkpoint_every=500),
        eval=EvalConfig(few_shot_repeats=5, probe_epochs=10, finetune_epochs=20, finetune_batch_size=64,
                        init_arms=("ssl-natural-vit-s14", "sup-natural-vit-s14", "sup-cxr-vit-s14",
                                   "efficientnet-lite0.in1k"),
                        init_images=(1000, 4000, 2000, 2500, 3000), init_epochs=8, init_batch_size=64,
                        init_lr=5e-5, init_head_lr=1e-3, init_fractions=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
                        seg_epochs=10, batch_size=256,
                        cv_images=800, cv_epochs=10, cv_lrs=(1e-5, 1e-4), cv_batch_sizes=(32,),
                        cv_medical_images=2000, cv_medical_epochs=5, cv_ssl_vit="ssl-natural-vit-s14",
                        cv_continued_suffix="vit-s14"),
        num_workers=8,
        diffusion=DiffusionConfig(image_size=128, n_per_site=2000, encoder="ssl-natural-vit-s14",
                                  encoder_image_size=224, vae_channels=(64, 128, 128), vae_steps=3000,
                                  vae_batch_size=32, unet_channels=(64, 128, 256), unet_layers_per_block=2,
                                  cross_attention_dim=256, ldm_steps=8000, ldm_batch_size=64, ldm_lr=2e-4,
                                  ldm_warmup_steps=400, ema_decay=0.999, checkpoint_every=1000,
                                  guidance_scales=(1.0, 1.5, 2.0, 3.0, 5.0), step_grid=(10, 20, 50), n_show=8,
                                  n_fid=1000, fid_sweep=True, aug_ns=(4, 16, 64, 256), aug_synthetic_per_real=2,
                                  aug_steps=300, aug_batch_size=32, aug_repeats=5, seg_train_images=400,
                                  n_attention=32),
    ),
    "paper": Profile(
        name="paper",
        description="real data sets and real DINOv2 / IN-21k weights supplied by the user: GPU(s)",
        # no sources here: a data file names them (data.example.toml; `make reproduce PROFILE=paper DATA=...`),
        # and a data key without one is an error in `paper` unless the file allows its phantom stand-in
        data=DataConfig(phantom_size=224, n_per_dataset=64, n_natural=64, n_show=16),
        backbone=BackboneConfig(
            arch="vit_base_patch14_dinov2", arch_kwargs=dict(img_size=224), image_size=224,
            embedded_suffix="vit-s14",
            compare=("dinov2-vit-s14", "dinov2-vit-b14", "dinov2-vit-l14", "vit-b16-in21k", "resnet50-in1k",
                     "random-vit-s14"),  # the random-init floor of ViT-S/14, as in the embedded profiles
        ),
        ssl=SSLConfig(global_size=224, local_size=98, n_local=8, batch_size=256, steps=10000, warmup_steps=1000,
                      base_lr=2e-4, n_prototypes=65536, head_hidden=2048, head_bottleneck=256, drop_path=0.4,
                      teacher_momentum=(0.994, 1.0), weight_decay=(0.04, 0.2), vertical_flip=True,
                      teacher_temp_warmup_steps=3000, freeze_last_layer_steps=100, checkpoint_every=1000),
        eval=EvalConfig(probe_epochs=10, finetune_epochs=30, finetune_batch_size=32, seg_epochs=10, batch_size=256,
                        init_arms=("dinov2-vit-b14", "vit-b16-in21k", "vit-b16-mimic-cxr"),
                        cv_imagenet_cnn="resnet50-in1k", cv_medical_cnn="radimagenet-resnet50",
                        cv_ssl_vit="dinov2-vit-s14", cv_continued_suffix="vit-s14", cv_ssl_steps_fraction=1.0),
        num_workers=8,
        diffusion=DiffusionConfig(image_size=256, source_key="cxr_multilabel", seg_source_key="cxr_segmentation",
                                  encoder="dinov2-vit-b14-reg4",
                                  encoder_image_size=224, pretrained_vae="stabilityai/sd-vae-ft-mse",
                                  unet_channels=(128, 256, 512), unet_layers_per_block=2, cross_attention_dim=768,
                                  attention_head_dim=64, ldm_steps=50000, ldm_batch_size=128, ldm_lr=1e-4,
                                  ldm_warmup_steps=1000, ema_decay=0.9999, checkpoint_every=2000,
                                  guidance_scales=(1.0, 1.5, 2.0, 3.0, 5.0), step_grid=(10, 25, 50), n_show=8,
                                  n_fid=5000, fid_sweep=True, aug_ns=(4, 16, 64, 256), aug_synthetic_per_real=2,
                                  aug_steps=500, aug_batch_size=32, aug_repeats=5, seg_train_images=400,
                                  n_attention=32, fd_backbone="dinov2-vit-l14"),
    ),
    # the `gpu` profile's switches (medlib.accel: bf16 autocast, torch.compile, DataLoader workers + pinned memory,
    # accelerate bf16) at the smoke profile's sizes, on the CPU: CI runs every GPU-side path without a GPU. ViT-S/14
    # (random init, no weights to build) at 56 px = 4 x 4 patches, as backbone, condition encoder and SSL continuation.
    # Phantoms at 112 px (>= 64, a multiple of 8 and 14): notebook 01 runs its patch PCA at data.phantom_size.
    "gpu-switches": Profile(
        name="gpu-switches",
        description="the gpu profile's switches (bf16, torch.compile, workers, pinned memory) at smoke sizes on the CPU: CI",
        data=DataConfig(phantom_size=112, n_per_dataset=48, n_natural=64, n_show=8),
        backbone=BackboneConfig(
            arch="vit_small_patch14_dinov2", arch_kwargs=dict(img_size=56, patch_size=14), image_size=56,
            embedded_suffix="vit-s14", sup_epochs=1,
            compare=("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "efficientnet-lite0.in1k", "random-vit-s14"),
        ),
        ssl=SSLConfig(global_size=56, local_size=28, n_local=2, batch_size=8, steps=4, warmup_steps=1,
                      teacher_temp_warmup_steps=2, n_prototypes=64, head_hidden=64, head_bottleneck=32,
                      freeze_last_layer_steps=1, checkpoint_every=2),
        eval=EvalConfig(knn_ks=(5,), few_shot_ns=(1, 2), few_shot_repeats=2, probe_epochs=2,
                        probe_lrs=(1e-2,), finetune_epochs=1, finetune_batch_size=8, seg_epochs=1,
                        folds=2, bootstrap=50, batch_size=16, logreg_n_c=3, seg_images=24, seg_repeats=1,
                        init_images=(40, 48, 28, 32, 36), init_epochs=1, init_batch_size=8, init_lr=1e-4,
                        init_head_lr=1e-3, init_fractions=(0.5, 1.0),
                        seg_lrs=(1e-1,), seg_fit_iters=25,
                        cv_epochs=2, cv_lrs=(1e-4,), cv_batch_sizes=(8,), cv_medical_images=16, cv_medical_epochs=1,
                        cv_ssl_vit="random-vit-s14", cv_continued_suffix="vit-s14", cv_ssl_fallback_steps=2),
        device="cpu",
        num_workers=2,
        diffusion=DiffusionConfig(image_size=32, n_per_site=16, encoder="random-vit-s14", encoder_image_size=56,
                                  vae_channels=(8, 16, 16),
                                  vae_steps=3, vae_batch_size=8, unet_channels=(16, 32), cross_attention_dim=32,
                                  attention_head_dim=8, ldm_steps=4, ldm_batch_size=8, ldm_warmup_steps=1,
                                  checkpoint_every=2, num_inference_steps=4, guidance_scales=(1.0, 3.0),
                                  step_grid=(2, 4), n_show=3, seeds_per_image=2, n_interpolations=1,
                                  interpolation_steps=4, n_fid=12, fid=False, n_downstream=120, aug_target="no_finding",
                                  aug_ns=(3,), aug_steps=2, aug_batch_size=4, aug_repeats=2, seg_train_images=12,
                                  n_attention=3),
    ),
}


#: Every profile name, for command lines (`--profile`).
PROFILE_NAMES = tuple(_PROFILES)


def get_profile(name: str | Profile) -> Profile:
    """Return the named profile (or pass a Profile through); raises with the valid names."""
    if isinstance(name, Profile):
        return name
    if name not in _PROFILES:
        raise ValueError(f"Unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}.")
    settings = active_settings()  # $MEDLIB_DATA_FILE / $MEDLIB_OVERRIDES, if set
    if not settings.active:
        return _PROFILES[name]
    cached = _APPLIED.get(name)
    if cached is None or cached[0] is not settings:
        cached = _APPLIED[name] = (settings, apply_settings(_PROFILES[name], settings))
    return cached[1]


_APPLIED: dict[str, tuple[object, Profile]] = {}  # profile name -> (the settings applied, the result)


def _assigned_names(source: str) -> list[str]:
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


def check_injected_parameters(history: list[str]) -> None:
    """Raise when papermill injected a parameter the notebook's ``parameters`` cell does not define.

    ``history`` is the kernel's list of executed cell sources (IPython's ``In``); papermill's injected
    cell starts with ``# Parameters`` and follows the notebook's own parameters cell. Papermill itself
    only warns ("Passed unknown parameter") and runs on with the defaults.
    """
    for i, source in enumerate(history):
        if i == 0 or not source.lstrip().startswith("# Parameters"):
            continue
        valid = _assigned_names(history[i - 1])
        unknown = [n for n in _assigned_names(source) if n not in valid]
        if unknown:
            raise ValueError(f"unknown notebook parameter(s) {unknown}; this notebook takes {valid} "
                             f"(e.g. papermill -p profile smoke)")


def notebook_profile(name: str | None) -> Profile:
    """The profile a notebook runs: the papermill parameter if given, else ``$MEDLIB_PROFILE``, else ``tiny``.

    A data file (``$MEDLIB_DATA_FILE``) and overrides (``$MEDLIB_OVERRIDES``) are applied; ``make reproduce``
    (:func:`medlib.reproduce.reproduce`) has checked their keys, files and weights before any notebook ran.

    Inside a kernel, a misspelt papermill parameter (``-p profle smoke``) is an error here, not a silent
    run of the default profile.
    """
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython ships with every Jupyter kernel
        shell = None
    if shell is not None:
        check_injected_parameters([str(s) for s in shell.user_ns.get("In", [])])
    return get_profile(name or os.environ.get("MEDLIB_PROFILE", "tiny"))


def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml), or the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def display_path(path: str | Path) -> str:
    """A path as a table shows it: ``<site-packages>/...`` for installed packages, ``<cache>/...`` inside the cache,
    repository-relative, else as is.

    Tables then stay the same from one machine, checkout or cache location to another.
    """
    text = str(path)
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, TypeError):
        return text
    import sysconfig

    for root, shown in ((sysconfig.get_paths()["purelib"], "<site-packages>"), (cache_dir(), "<cache>"),
                        (repo_root(), "")):
        try:
            rel = resolved.relative_to(Path(root).resolve())
        except ValueError:
            continue
        return f"{shown}/{rel.as_posix()}" if shown else rel.as_posix()
    return text


def cache_dir() -> Path:
    """Where generated data sets, features and checkpoints are cached (``MEDLIB_CACHE`` overrides)."""
    path = Path(os.environ.get("MEDLIB_CACHE", repo_root() / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """The folder figures are written to (``MEDLIB_FIGURES`` overrides)."""
    path = Path(os.environ.get("MEDLIB_FIGURES", repo_root() / "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def reports_dir(profile: str | Profile) -> Path:
    """``reports/<profile>/`` (``MEDLIB_REPORTS`` overrides the ``reports`` root)."""
    name = get_profile(profile).name
    path = Path(os.environ.get("MEDLIB_REPORTS", repo_root() / "reports")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run the block on torch's CPU generator seeded with ``seed``; the caller's random stream is restored after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for local use."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def autocast_dtype(device: str):
    """bf16 on GPUs that support it, and on the CPU while the active switches say so (``medlib.accel``); else None (fp32)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "cpu" and active_switches().bf16:
        return torch.bfloat16
    return None

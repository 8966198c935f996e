"""A dry run of the real path: every notebook in ``paper`` mode on a miniature "download", no phantom anywhere.

:func:`build_download` writes, with random values, a small copy of each format the ``paper``
profile reads - a DINOv2 ViT-S/14 checkpoint in the original facebookresearch layout with the
real shapes (518 px position grid) under its release name ``dinov2_vits14_pretrain.pth``; a
RadImageNet ResNet-50 (real shapes) under its release name; a populated Hugging Face cache in
the hub's own layout holding ``timm/vit_small_patch14_reg4_dinov2.lvd142m`` (real shapes) and
``stabilityai/sd-vae-ft-mse`` (the hub layout, a small config); MedMNIST+ ``.npz`` files; an
NIH-style folder with ``Data_Entry_2017.csv``; a CheXpert-style CSV; segmentation folders
(lung / organ masks); a RadImageNet-style tree - and a data file naming them. The run uses
``--override`` to stay within about three minutes on one contended CPU core: 56 px backbone inputs
(the smallest size both ViT-S/14 and the patch-8 embedded ViT of notebook 02 take; 4 x 4 patches),
28 / 14 px SSL crops, 32 px LDM images with 28 px encoder inputs, FD_SSL features at 56 px
(``diffusion.fd_image_size``; at the backbone's own 224 px they were most of notebook 04's time),
a couple of dozen images per set, one epoch / one or two steps, two folds, 20 bootstrap resamples,
and backbone names chosen so that only ViT-S/14-sized real checkpoints are built (real-shape
ViT-B/L/g files with random values would be large and slow on a CPU): ``dinov2-vit-s14`` stands
for the DINOv2 arms, ``dinov2-vit-s14-reg4`` for notebook 04's ViT-B/14 reg4 encoder, the package's
EfficientNet-Lite0 for the ImageNet CNNs, ``random-vit-s14`` for the random-init baseline notebook
01's exercises compare against, and the embedded ``sup-natural-vit-tiny`` for the supervised arm of
notebook 02 (its ViT-B/16 checkpoints are too large to build here). Notebook 04 reads two chest
keys: ``cxr_multilabel`` (LDM images, augmentation labels) and ``cxr_segmentation`` (the
Montgomery-style ``segfolder:`` set of the mask transfer and the attention maps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the overrides of the dry run (the same keys a researcher may use to shrink a run)
DRY_RUN_OVERRIDES = {
    "data.n_per_dataset": 32, "data.n_show": 3, "data.phantom_size": 70,
    "backbone.image_size": 56, "backbone.compare": ["dinov2-vit-s14", "efficientnet-lite0.in1k", "random-vit-s14"],
    "ssl.global_size": 28, "ssl.local_size": 14, "ssl.n_local": 2, "ssl.batch_size": 4, "ssl.steps": 2,
    "ssl.warmup_steps": 1, "ssl.teacher_temp_warmup_steps": 1, "ssl.n_prototypes": 64, "ssl.head_hidden": 64,
    "ssl.head_bottleneck": 32, "ssl.freeze_last_layer_steps": 1, "ssl.checkpoint_every": 1,
    "eval.knn_ks": [5], "eval.few_shot_ns": [1], "eval.few_shot_repeats": 1, "eval.probe_epochs": 1,
    "eval.probe_lrs": [1e-2], "eval.finetune_epochs": 1, "eval.finetune_batch_size": 8, "eval.seg_epochs": 1,
    "eval.folds": 2, "eval.bootstrap": 20, "eval.batch_size": 32, "eval.logreg_n_c": 2, "eval.seg_images": 12,
    "eval.seg_repeats": 1, "eval.seg_lrs": [1e-1], "eval.peft_train_images": 8,
    "eval.init_arms": ["dinov2-vit-s14", "sup-natural-vit-tiny"], "eval.init_sites": [0, 3, 4],
    "eval.init_images": [24, 24, 24], "eval.init_epochs": 1, "eval.init_batch_size": 8, "eval.init_lr": 1e-4,
    "eval.init_head_lr": 1e-3, "eval.init_fractions": [0.5, 1.0],
    "eval.cv_epochs": 1, "eval.cv_lrs": [1e-4], "eval.cv_batch_sizes": [16],
    "eval.cv_imagenet_cnn": "efficientnet-lite0.in1k", "eval.cv_ssl_fallback_steps": 2,
    "diffusion.image_size": 32, "diffusion.encoder": "dinov2-vit-s14-reg4", "diffusion.encoder_image_size": 28,
    "diffusion.unet_channels": [16, 32], "diffusion.unet_layers_per_block": 1, "diffusion.cross_attention_dim": 32,
    "diffusion.attention_head_dim": 8, "diffusion.ldm_steps": 2, "diffusion.ldm_batch_size": 4,
    "diffusion.ldm_warmup_steps": 1, "diffusion.checkpoint_every": 2, "diffusion.num_inference_steps": 2,
    "diffusion.guidance_scale": 1.0, "diffusion.guidance_scales": [1.0, 3.0], "diffusion.step_grid": [2, 3],
    "diffusion.n_show": 2, "diffusion.seeds_per_image": 2, "diffusion.n_interpolations": 1,
    "diffusion.interpolation_steps": 3, "diffusion.n_fid": 8, "diffusion.fid": False, "diffusion.fid_sweep": False,
    "diffusion.n_downstream": 32, "diffusion.aug_target": "Cardiomegaly", "diffusion.aug_ns": [2],
    "diffusion.aug_steps": 1, "diffusion.aug_batch_size": 4, "diffusion.aug_repeats": 2,
    "diffusion.seg_train_images": 8, "diffusion.n_attention": 2, "diffusion.fd_backbone": "dinov2-vit-s14",
    "diffusion.fd_image_size": 56, "eval.cv_images": 16,
    "eval.init_ablation_site": 3,
}
CHEST = ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule"]


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8)


def _medmnist(root: Path, flag: str, n_labels: int, multilabel: bool, rng: np.random.Generator, n: int = 60) -> None:
    arrays = {}
    for split, m in (("train", n), ("val", n // 4), ("test", n // 4)):
        arrays[f"{split}_images"] = _images(rng, m, 64)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, (m, n_labels)) if multilabel
                                     else (np.arange(m) % n_labels)[:, None]).astype(np.uint8)
    np.savez(root / f"{flag}_64.npz", **arrays)


def _nih(root: Path, rng: np.random.Generator, n: int = 48) -> None:
    rows = ["Image Index,Finding Labels,Patient ID"]
    for i in range(n):
        name = f"{i:08d}_000.png"
        _png(root / "images" / name, _images(rng, 1, 64)[0])
        found = [c for c in CHEST if rng.random() < 0.4]
        rows.append(f"{name},{'|'.join(found) or 'No Finding'},{i // 2}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")


def _chexpert(root: Path, rng: np.random.Generator, n: int = 48) -> None:
    labels = ["Atelectasis", "Cardiomegaly", "Pleural Effusion"]
    rows = ["Path,Frontal/Lateral," + ",".join(labels)]
    for i in range(n):
        rel = f"CheXpert-v1.0/train/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
        _png(root / rel, _images(rng, 1, 64)[0])
        values = [str(int(v)) if v >= 0 else "-1.0" for v in rng.integers(-1, 2, len(labels))]
        values[i % len(labels)] = "1.0"
        rows.append(f"{rel},Frontal," + ",".join(values))
    (root / "CheXpert-v1.0" / "train.csv").write_text("\n".join(rows) + "\n")


def _vindr(root: Path, rng: np.random.Generator, n: int = 40) -> None:
    """VinDr-CXR's layout: train/<image_id>.<ext>, three readers per image in image_labels_train.csv."""
    labels = ["Atelectasis", "Cardiomegaly", "Pleural effusion"]
    rows = ["image_id,rad_id," + ",".join(labels)]
    for i in range(n):
        image_id = f"{i:032x}"
        _png(root / "train" / f"{image_id}.png", _images(rng, 1, 64)[0])
        for reader in ("R1", "R2", "R3"):
            values = rng.integers(0, 2, len(labels))
            values[i % len(labels)] = 1
            rows.append(f"{image_id},{reader}," + ",".join(map(str, values)))
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "image_labels_train.csv").write_text("\n".join(rows) + "\n")


def _segfolder(root: Path, classes: list[str], rng: np.random.Generator, n: int = 30) -> None:
    for i in range(n):
        _png(root / "images" / f"case{i:03d}.png", _images(rng, 1, 64)[0])
        for c, cls in enumerate(classes):
            mask = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(8, 40, 2)
            mask[y:y + 16 + 4 * c, x:x + 12] = 255
            _png(root / cls / f"case{i:03d}.png", mask)


def _radimagenet(root: Path, rng: np.random.Generator, n: int = 16) -> None:
    tree = {("US", "thyroid"): ["normal", "thyroid_nodule"], ("US", "breast"): ["benign", "malignant"],
            ("MR", "knee"): ["normal", "acl_pathology", "meniscal_tear"]}
    for (modality, anatomy), labels in tree.items():
        for label in labels:
            for i in range(n):
                _png(root / modality / anatomy / label / f"{anatomy}{label}{i:03d}.png", _images(rng, 1, 64)[0])


def _hub_file(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """Files of hub ``repo`` in the Hugging Face cache layout (blobs, snapshots/<commit>, refs/main)."""
    import hashlib

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def _weights(weights: Path, hub: Path) -> None:
    import timm
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save, save_file

    torch.manual_seed(0)
    weights.mkdir(parents=True, exist_ok=True)
    # DINOv2 ViT-S/14, original facebookresearch layout and shapes (mask_token, 37 x 37 + 1 positions)
    state = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518).state_dict()
    state["mask_token"] = torch.zeros(1, 384)
    torch.save(state, weights / "dinov2_vits14_pretrain.pth")
    # RadImageNet ResNet-50 (torchvision / timm key names), under a release name
    resnet = timm.create_model("resnet50", pretrained=False).state_dict()
    torch.save(resnet, weights / "RadImageNet-ResNet50_notop.pth")
    # the Hugging Face cache: a timm DINOv2 ViT-S/14 reg4 (real shapes) and the SD VAE's hub layout
    reg4 = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
    _hub_file(hub, "timm/vit_small_patch14_reg4_dinov2.lvd142m",
              {"model.safetensors": save({k: v.contiguous() for k, v in reg4.state_dict().items()}),
               "config.json": json.dumps({"architecture": "vit_small_patch14_reg4_dinov2"}).encode()})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64)
    tmp = weights.parent / "vae_tmp"
    vae.save_pretrained(tmp)
    _hub_file(hub, "stabilityai/sd-vae-ft-mse", {name: (tmp / name).read_bytes() for name in
                                                 ("config.json", "diffusion_pytorch_model.safetensors")})
    del save_file


def build_download(root: Path) -> Path:
    """Write the miniature download under ``root`` and the data file naming it; return the data file."""
    rng = np.random.default_rng(0)
    data = root / "data"
    (data / "medmnist").mkdir(parents=True)
    _medmnist(data / "medmnist", "chestmnist", 14, True, rng)
    _medmnist(data / "medmnist", "organamnist", 11, False, rng)
    _nih(data / "nih", rng)
    _chexpert(data / "chexpert", rng)
    _vindr(data / "vindr", rng)
    _segfolder(data / "montgomery", ["leftMask", "rightMask"], rng)
    _segfolder(data / "amos", ["liver", "kidney"], rng)
    _radimagenet(data / "radimagenet", rng)
    _weights(root / "weights", root / "hf" / "hub")
    overrides = "\n".join(f'"{k}" = {json.dumps(v)}' for k, v in DRY_RUN_OVERRIDES.items())
    text = f'''# data file of the paper dry run (tests/test_paper_dry_run.py)
profile = "paper"
root = "data"
medmnist_root = "data/medmnist"
weights_dir = "weights"
allow_download = false
allow_phantom = []

[sources]
cxr_multilabel = "medmnist:chestmnist?size=64"
organ_ct = "medmnist:organamnist?size=64"
knee_mri = "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=acl_pathology&size=64"
breast_us = "radimagenet:radimagenet?modality=US&anatomy=breast&positive=malignant&size=64"
cxr_segmentation = "segfolder:montgomery/images?masks=leftMask,rightMask&mask_names=left_lung,right_lung&size=64"
ct_segmentation = "segfolder:amos/images?masks=liver,kidney&mask_names=liver,kidney&size=64"
chestxray14 = "folder:nih?labels=Data_Entry_2017.csv&image_col=Image Index&finding_col=Finding Labels&no_finding=No Finding&patient_col=Patient ID&image_dir=images&classes={','.join(CHEST)}&size=64"
chexpert = "folder:chexpert?labels=CheXpert-v1.0/train.csv&image_col=Path&u=ones&label_cols=Atelectasis,Cardiomegaly,Pleural Effusion&where=Frontal/Lateral==Frontal&patient_regex=(patient\\\\d+)&size=64"
vindr_cxr = "folder:vindr?labels=annotations/image_labels_train.csv&image_col=image_id&ext=.png&image_dir=train&label_cols=Atelectasis,Cardiomegaly,Pleural effusion&aggregate=max&size=64"
thyroid_us = "radimagenet:radimagenet?modality=US&anatomy=thyroid&positive=thyroid_nodule&size=64"
acl_mri = "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=acl_pathology&size=64"
meniscus_mri = "radimagenet:radimagenet?modality=MR&anatomy=knee&positive=meniscal_tear&size=64"
ssl_us_images = "radimagenet:radimagenet?modality=US&anatomy=thyroid&size=64"
ssl_knee_images = "radimagenet:radimagenet?modality=MR&anatomy=knee&size=64"

[overrides]
{overrides}
'''
    path = root / "my_data.toml"
    path.write_text(text)
    return path


def dry_run_env(root: Path) -> dict[str, str]:
    """Environment of the dry run: its own reports, figures, cache and Hugging Face cache; offline."""
    return dict(os.environ, MEDLIB_REPORTS=str(root / "reports"), MEDLIB_FIGURES=str(root / "figures"),
                MEDLIB_CACHE=str(root / "cache"), HF_HUB_CACHE=str(root / "hf" / "hub"), HF_HUB_OFFLINE="1",
                MEDLIB_PROGRESS="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.xdist_group("paper")
def test_paper_dry_run_every_notebook_on_real_formats(tmp_path):
    data_file = build_download(tmp_path)
    env = {k: v for k, v in dry_run_env(tmp_path).items() if k not in ("MEDLIB_WEIGHTS_DIR", "MEDLIB_DATA_FILE",
                                                                        "MEDLIB_OVERRIDES", "MEDLIB_PROFILE")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medlib.reproduce", "--profile", "paper", "--data", str(data_file),
                           "--force"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"paper dry run: {wall:.1f} s")
    reports = tmp_path / "reports" / "paper"
    runs = json.loads((reports / "runs.json").read_text())
    assert {r["status"] for r in runs.values()} == {"ok"} and len(runs) == 5
    summary = (reports / "summary.md").read_text()
    assert "PHANTOM STAND-IN" not in summary and "phantom stand-ins" not in summary
    for needle in ("chestmnist", "Data_Entry_2017.csv", "CheXpert-v1.0/train.csv", "montgomery/images",
                   "radimagenet"):
        assert needle in summary, needle
    tables = "\n".join(p.read_text() for p in (reports / "tables").glob("*.csv"))
    assert "phantom:" not in tables  # no data set of any table is a phantom
    for needle in ("medmnist:chestmnist", "folder:", "radimagenet:", "segfolder:"):
        assert needle in tables, needle
    # notebook 04's mask transfer read the masked chest set (cxr_segmentation), not the labelled one
    assert "montgomery/images" in (reports / "tables" / "04_summary.csv").read_text()
    record = json.loads(next((reports / "tables").glob("*.json")).read_text())
    assert record["data_file"] == str(data_file) and record["phantom_stand_ins"] == []
    assert record["overrides"]["backbone.image_size"] == "56"

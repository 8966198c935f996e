"""Known-answer toys: every segmentation path and every classification path of study 1 must solve a planted task.

Segmentation: three foreground classes drawn as coloured blocks aligned with the 8-pixel patch grid, one
of them small (a single 2 x 2-cell block, about 6 % of the image); the colour of a block names its class.
Classification: the positive images carry a planted colour tint; the positive class is coded both ways,
so a probability column taken for the wrong class shows as AUROC < 0.1 instead of > 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlib.data import ImageSet
from medlib.eval import segmentation as seg
from medlib.eval.features import extract_features
from medlib.eval.finetune import FinetuneConfig
from medlib.eval.fewshot import knn_probe
from medlib.eval.linear import linear_probe, logistic_regression_probe
from medlib.eval.metrics import macro_auroc
from medlib.eval.peft_finetune import finetune_backbone
from medlib.models.backbones import create_backbone

COLOURS = np.array([[20, 20, 20], [230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=np.uint8)


def _seg_toy(n: int, seed: int, size: int = 32, cell: int = 8) -> ImageSet:
    """Images whose pixels take the colour of their class; big classes 1, 2 as random cell runs, class 3 small."""
    rng = np.random.default_rng(seed)
    g = size // cell
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        grid = np.zeros((g, g), dtype=np.uint8)
        grid[:, : rng.integers(1, g - 1)] = 1  # a left band of class 1
        grid[rng.integers(0, g // 2):, -1] = 2  # a right column of class 2
        r, c = rng.integers(0, g - 1), rng.integers(1, g - 2)
        grid[r, c] = 3  # one cell of the small class
        masks[i] = np.kron(grid, np.ones((cell, cell), dtype=np.uint8))
    images = COLOURS[masks] + rng.integers(0, 10, (n, size, size, 1)).astype(np.uint8)
    return ImageSet(images=images, labels=None, label_names=[], task="none",
                    patient_ids=np.array([f"p{seed}-{i}" for i in range(n)]), masks=masks,
                    mask_names=["big_a", "big_b", "small"], name=f"seg-toy-{seed}")


@pytest.fixture(scope="module")
def seg_sets():
    return _seg_toy(24, 0), _seg_toy(8, 1), _seg_toy(8, 2)


@pytest.mark.parametrize("path", ["linear", "unet", "scratch"])
def test_every_segmentation_path_solves_the_toy(seg_sets, path):
    train, val, test = seg_sets
    torch.manual_seed(0)
    if path == "scratch":
        model, lr = seg.scratch_unet(4, base=8, depth=2), 0.05
    elif path == "linear":
        model, lr = seg.frozen_linear(create_backbone("random-vit-smoke"), 4), 0.5
    else:
        model, lr = seg.frozen_unet(create_backbone("random-vit-tiny", image_size=32), 4), 0.1
    result = seg.train_segmenter(model, train, val, epochs={"scratch": 40, "linear": 30, "unet": 12}[path], lr=lr, batch_size=8,
                                 image_size=32, device="cpu")
    scores = seg.summarize(seg.evaluate_segmenter(result.model, test, 32, "cpu"))
    per_class = {c: scores[f"dice_{c}"] for c in train.mask_names}
    assert all(v > 0.9 for v in per_class.values()), per_class
    prior = seg.summarize(seg.evaluate_prior(train, test))
    assert all(per_class[c] > prior[f"dice_{c}"] for c in train.mask_names)


def _cls_toy(n: int, seed: int, flip: bool) -> ImageSet:
    """Binary task: positives tinted red, negatives green, under noise; ``flip`` codes the positive class the other way."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    base = rng.integers(60, 160, (n, 32, 32, 1))
    tint = np.where(y[:, None, None, None] > 0, [60, 0, 0], [0, 60, 0])
    images = np.clip(base + tint + rng.integers(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    labels = (1 - y if flip else y)[:, None]
    return ImageSet(images=images, labels=labels, label_names=["finding"], task="binary",
                    patient_ids=np.array([f"c{seed}-{i}" for i in range(n)]), name=f"cls-toy-{seed}-{flip}")


@pytest.mark.parametrize("flip", [False, True])
def test_every_classification_path_finds_the_planted_signal(flip):
    train, val, test = _cls_toy(48, 0, flip), _cls_toy(16, 1, flip), _cls_toy(32, 2, flip)
    backbone = create_backbone("random-vit-smoke")
    feats = [extract_features(backbone, ds, image_size=32, batch_size=32, device="cpu", cache=False)
             for ds in (train, val, test)]
    y = np.asarray(test.labels)
    aurocs = {"knn": macro_auroc(y, knn_probe(k=10)(*feats)),
              "linear probe": linear_probe(*feats, lrs=(1e-2,), epochs=30, seed=0, device="cpu").test_metrics["auroc"],
              "logistic regression": logistic_regression_probe(*feats, n_c=5).test_metrics["auroc"]}
    cfg = FinetuneConfig(epochs=6, batch_size=16, lr=1e-2, backbone_lr=1e-3, select_on="val_auroc")
    for mode in ("full", "lora", "bitfit"):
        result = finetune_backbone(create_backbone("random-vit-smoke"), mode, train, val, test, cfg, image_size=32,
                                   lora_r=4, seed=0, device="cpu")
        aurocs[mode] = result.test_metrics["auroc"]
    assert all(v > 0.9 for v in aurocs.values()), aurocs

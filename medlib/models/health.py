"""Health check of a backbone: kNN on its CLS features over held-out labelled phantoms, vs random init.

Written into every embedded model card and re-run by a test. The score per task is the AUROC of the
official weighted-vote kNN (k = 20, T = 0.07): one-vs-rest macro AUROC for multi-class, AUROC for
binary tasks. Accuracy is reported too, but it is not the criterion: on imbalanced binary tasks it
mostly measures the majority class (our assumption, stated in the README).

Beside the random-init twin, each task also gets a no-network reference: the same kNN on pixel
statistics (grey-level histogram + a coarse grid of mean intensities). It is context, not the
criterion: a task that pixel statistics solve says little about learned features (the phantoms code
several labels in echogenicity and intensity layout, which photometric augmentations teach a network
to ignore).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import Profile

HEALTH_MARGIN = 0.03  # mean kNN AUROC a trained backbone must gain over the same network at random init
KNN_K = 20
KNN_T = 0.07


@torch.no_grad()
def extract_cls(model: torch.nn.Module, images: np.ndarray, size: int, device: str = "cpu",
                batch_size: int = 128) -> np.ndarray:
    """CLS features of a timm model (``forward_features`` then its pooling) for uint8 images."""
    from ..data.transforms import ClassificationTransform

    transform = ClassificationTransform(size, train=False)
    model.eval().to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = transform(torch.as_tensor(np.asarray(images[i:i + batch_size]))).to(device)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy())
    return np.concatenate(out)


def pixel_statistics_features(images: np.ndarray, bins: int = 16, grid: int = 4) -> np.ndarray:
    """No-network features of uint8 images (N, bins + grid**2): grey-level histogram + grid x grid mean intensities."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"pixel_statistics_features expects uint8 images, got {x.dtype}.")
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.mean(axis=-1)
    elif x.ndim != 3:
        raise ValueError(f"pixel_statistics_features expects (N, H, W) or (N, H, W, 1|3) images, got {x.shape}.")
    if bins < 1 or grid < 1 or grid > min(x.shape[1:]):
        raise ValueError(f"need bins >= 1 and 1 <= grid <= image side, got bins={bins}, grid={grid}.")
    x = x.astype(np.float32) / 255.0
    hist = np.stack([np.histogram(img, bins=bins, range=(0.0, 1.0))[0] for img in x]).astype(np.float32)
    hist /= x.shape[1] * x.shape[2]
    rows = np.array_split(np.arange(x.shape[1]), grid)
    cols = np.array_split(np.arange(x.shape[2]), grid)
    cells = [x[:, r[0]:r[-1] + 1, c[0]:c[-1] + 1].mean(axis=(1, 2)) for r in rows for c in cols]
    return np.concatenate([hist, np.stack(cells, axis=1)], axis=1)


def knn_scores(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
               n_classes: int) -> dict[str, float]:
    """Accuracy and macro one-vs-rest AUROC (plain AUROC for two classes) of the weighted-vote kNN."""
    from ..eval.knn import knn_predict_proba
    from ..eval.metrics import multiclass_accuracy, multiclass_auroc

    proba = knn_predict_proba(train, train_labels, test, n_classes, k=KNN_K, temperature=KNN_T)
    return {"accuracy": multiclass_accuracy(test_labels, proba), "auroc": multiclass_auroc(test_labels, proba)}


def pixel_statistics_scores(images: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """:func:`knn_scores` of :func:`pixel_statistics_features` (standardised on the first half, tested on the second)."""
    feats = pixel_statistics_features(images)
    half = len(feats) // 2
    feats = (feats - feats[:half].mean(0)) / (feats[:half].std(0) + 1e-6)
    return knn_scores(feats[:half], labels[:half], feats[half:], labels[half:], n_classes)


def health_tasks(profile: Profile, size: int) -> dict:
    """Held-out labelled tasks (seed offset 1000, never used for training): CT organs, knee ACL, breast US, natural."""
    from ..data import natural, phantoms

    n = max(64, min(600, profile.data.n_per_dataset))
    seed = profile.seed + 1000
    return {
        "ct_organ": phantoms.make_dataset("ct", n, size=size, seed=seed),
        "knee_acl": phantoms.make_dataset("knee", n, size=size, seed=seed, target="acl_tear"),
        "breast_us_malignant": phantoms.make_dataset("breast_us", n, size=size, seed=seed),
        "natural_class": natural.make_natural_labelled(n, size=size, seed=seed),
    }


def health_check(model: torch.nn.Module, suffix: str, profile: Profile, device: str = "cpu") -> dict:
    """kNN AUROC / accuracy of ``model``, its random-init twin and pixel statistics per task; passed on the mean AUROC gain."""
    from .backbones import EMBEDDED_ARCHS, create_backbone

    size = EMBEDDED_ARCHS[suffix][1]["img_size"]
    random_model = create_backbone(f"random-{suffix}").model
    result: dict = {"k": KNN_K, "temperature": KNN_T, "criterion": f"mean kNN AUROC gain >= {HEALTH_MARGIN}",
                    "tasks": {}}
    for task, ds in health_tasks(profile, max(64, size)).items():
        labels = ds.labels if ds.task == "multiclass" else ds.labels[:, 0].astype(int)
        n_classes = len(ds.label_names) if ds.task == "multiclass" else 2
        half = len(ds) // 2
        scores = {}
        for which, net in (("trained", model), ("random_init", random_model)):
            feats = extract_cls(net, np.asarray(ds.images), size, device)
            scores[which] = knn_scores(feats[:half], labels[:half], feats[half:], labels[half:], n_classes)
        scores["pixel_statistics"] = pixel_statistics_scores(np.asarray(ds.images), labels, n_classes)
        result["tasks"][task] = scores
        result["n_images"] = len(ds)
    gains = [t["trained"]["auroc"] - t["random_init"]["auroc"] for t in result["tasks"].values()]
    result["mean_auroc_gain"] = float(np.mean(gains))
    result["passed"] = bool(result["mean_auroc_gain"] >= HEALTH_MARGIN)
    return result

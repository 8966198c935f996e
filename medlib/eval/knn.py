"""k-nearest-neighbour evaluation: DINOv2's weighted vote (single-label) on L2-normalised features."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _check(train: np.ndarray, test: np.ndarray, labels: np.ndarray, k: int) -> None:
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got {train.shape} and {test.shape}")
    if len(labels) != len(train):
        raise ValueError(f"{len(labels)} labels for {len(train)} training features")
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")


def knn_predict_proba(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                      n_classes: int, k: int = 20, temperature: float = 0.07, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities by the official DINOv2 kNN: cosine top-k, votes weighted by exp(sim / T), normalised."""
    _check(train_features, test_features, train_labels, k)
    k = min(k, len(train_features))
    train = F.normalize(torch.as_tensor(np.asarray(train_features), dtype=torch.float32), dim=1)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"train labels must lie in 0..{n_classes - 1}")
    out = []
    for start in range(0, len(test_features), batch_size):
        test = F.normalize(torch.as_tensor(np.asarray(test_features[start:start + batch_size]), dtype=torch.float32), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(test), n_classes).scatter_add_(1, labels[idx], weights)
        out.append((votes / votes.sum(1, keepdim=True)).numpy())
    return np.concatenate(out)


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy of the weighted-vote kNN classifier."""
    n_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    proba = knn_predict_proba(train_features, train_labels, test_features, n_classes, k, temperature)
    return float((proba.argmax(1) == np.asarray(test_labels)).mean())

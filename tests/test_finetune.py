"""The shared fine-tuning loop: it learns, selects on val only, restores the best epoch, handles every task."""

import numpy as np
import pytest
import torch
from torch import nn

from medlib.data import ImageSet
from medlib.eval.finetune import Classifier, FinetuneConfig, make_loss, predict, train_classifier


def _stripes(n=64, seed=0, task="binary"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 16, 16)).astype(np.uint8)
    for i in range(n):
        if y[i]:
            images[i, ::4] = 255  # horizontal bright lines
        else:
            images[i, :, ::4] = 255  # vertical bright lines
    labels = y if task == "multiclass" else y[:, None].astype(np.float32)
    names = ["vertical", "horizontal"] if task == "multiclass" else ["horizontal"]
    return ImageSet(images=images, labels=labels, label_names=names, task=task, patient_ids=np.arange(n))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255).unsqueeze(1)


def _model(n_out):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten())
    return Classifier(backbone, nn.Linear(128, n_out))


@pytest.mark.parametrize("task, n_out", [("binary", 1), ("multiclass", 2)])
def test_learns_a_separable_task(task, n_out):
    train, val = _stripes(96, 0, task), _stripes(32, 1, task)
    cfg = FinetuneConfig(epochs=8, batch_size=16, lr=1e-2)
    res = train_classifier(_model(n_out), train, val, cfg, transform_train=_to_float, transform_eval=_to_float,
                           device="cpu", progress=False)
    probs = predict(res.model, val, _to_float, device="cpu")
    pred = probs.argmax(1) if task == "multiclass" else (probs[:, 0] > 0.5).astype(int)
    truth = val.labels if task == "multiclass" else val.labels[:, 0]
    assert (pred == truth).mean() > 0.9
    assert res.history["train_loss"].iloc[-1] < res.history["train_loss"].iloc[0]


def test_best_epoch_is_really_restored():
    train, val = _stripes(64, 0), _stripes(32, 1)
    cfg = FinetuneConfig(epochs=4, batch_size=16, lr=1e-2)
    res = train_classifier(_model(1), train, val, cfg, transform_train=_to_float, transform_eval=_to_float,
                           device="cpu", progress=False)
    best = res.history["val_loss"].idxmin()
    assert res.best_epoch == best
    from medlib.eval.finetune import evaluate_loss
    loss, _ = evaluate_loss(res.model, val, _to_float, make_loss(val), 16, "cpu")
    assert loss == pytest.approx(res.history["val_loss"].min(), rel=1e-4)


def test_without_val_uses_last_epoch_and_says_so():
    res = train_classifier(_model(1), _stripes(32), None, FinetuneConfig(epochs=2, batch_size=16),
                           transform_train=_to_float, transform_eval=_to_float, device="cpu", progress=False)
    assert res.best_epoch == 1 and "test set is never used" in res.selection


def test_deterministic_given_seed():
    runs = [train_classifier(_model(1), _stripes(32), None, FinetuneConfig(epochs=2, batch_size=8),
                             transform_train=_to_float, transform_eval=_to_float, seed=3, device="cpu",
                             progress=False).history["train_loss"].tolist() for _ in range(2)]
    assert runs[0] == runs[1]


def test_frozen_backbone_does_not_change():
    model = _model(1)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    train_classifier(model, _stripes(32), None, FinetuneConfig(epochs=1, batch_size=8, backbone_lr=0.0),
                     transform_train=_to_float, transform_eval=_to_float, device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))


def test_pos_weight_is_negatives_over_positives():
    ds = ImageSet(images=np.zeros((4, 4, 4), np.uint8), labels=np.array([[1, 0], [0, 0], [0, 1], [0, 1]], np.float32),
                  label_names=["a", "b"], task="multilabel", patient_ids=np.arange(4))
    assert make_loss(ds, pos_weight=True).pos_weight.tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="select_on"):
        FinetuneConfig(select_on="test_auroc")

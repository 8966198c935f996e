"""One test per defect of Baharoon et al. 2023's code (protocols.md, B1-B7): each fails if we made the same mistake."""

import inspect

import numpy as np
import pytest
import torch

from medlib.data.phantoms import make_dataset
from medlib.data.splits import patient_split
from medlib.data.transforms import ClassificationTransform
from medlib.eval.features import FeatureSet
from medlib.eval.fewshot import mlknn_probe, run_few_shot
from medlib.eval.finetune import FinetuneConfig
from medlib.eval.linear import linear_probe, logistic_regression_probe
from medlib.eval.peft_finetune import config_from_text, finetune_backbone, parse_bool, train_transform
from medlib.models.backbones import create_backbone


@pytest.fixture(scope="module")
def knee():
    ds = make_dataset("knee", 80, size=64, seed=4)
    return ds, patient_split(ds, (0.6, 0.2, 0.2), seed=0)


@pytest.fixture(scope="module")
def smoke_backbone():
    torch.manual_seed(0)
    return create_backbone("random-vit-smoke")


def _features(ds, seed=0):
    rng = np.random.default_rng(seed)
    y = ds.label_matrix()
    cls = (y @ rng.normal(size=(y.shape[1], 12)) * 3 + rng.normal(size=(len(ds), 12))).astype(np.float32)
    return FeatureSet(cls=cls, pooled=rng.normal(size=cls.shape).astype(np.float32), layers=cls[:, None].copy(),
                      labels=ds.labels, label_names=list(ds.label_names), task=ds.task, backbone="synthetic",
                      dataset=ds.name, fingerprint="x")


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_b1_text_false_keeps_the_backbone_frozen(knee, smoke_backbone):
    assert bool("False") is True  # the trap Baharoon et al. 2023 fell into
    assert parse_bool("False") is False and parse_bool("false") is False
    ds, split = knee
    mode, cfg = config_from_text({"finetune": "False", "lora": "False", "bitfit": "False", "epochs": "1",
                                  "batch_size": "16", "lr": "0.01"})
    assert mode == "linear"
    train, val, test = (ds.subset(split[k]) for k in ("train", "val", "test"))
    before = _params(smoke_backbone)
    result = finetune_backbone(smoke_backbone, mode, train, val, test, cfg, device="cpu")
    after = _params(result.model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.backbone_parameters["trainable"] == 0


def test_b2_few_shot_training_sets_hold_no_val_or_test_image(knee):
    ds, split = knee
    fs = _features(ds)
    seen = []

    def spy(train, val, test):
        seen.append(train)
        return mlknn_probe(k=3)(train, val, test)

    result = run_few_shot(ds, fs, split, spy, ns=(1, 2, "all"), repeats=2)
    held_out = np.concatenate([split["val"], split["test"]])
    for idx in result.draws.values():
        assert not np.isin(idx, held_out).any()
    held_rows = {row.tobytes() for row in fs.cls[held_out]}
    for train in seen:  # what the probe was trained on: not one held-out feature row
        assert not any(row.tobytes() in held_rows for row in train.cls)
    assert len(seen[-1]) == len(split["train"])  # "all" = the train split, not train + val


def test_b3_lora_and_bitfit_parameters_get_gradients_and_change(knee, smoke_backbone):
    ds, split = knee
    train, val, test = (ds.subset(split[k]) for k in ("train", "val", "test"))
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=1e-2, warmup_fraction=0.0)
    before = _params(smoke_backbone)
    for mode, marker in (("lora", "lora_"), ("bitfit", "bias")):
        result = finetune_backbone(smoke_backbone, mode, train, val, test, cfg, lora_r=4, device="cpu")
        model = result.model.train()
        trainable = {k: p for k, p in model.backbone.named_parameters() if p.requires_grad}
        assert trainable and all(marker in k for k in trainable)
        x = torch.randn(4, 3, 32, 32)
        model.zero_grad()
        model(x).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), mode
        moved = [k for k, p in trainable.items() if k in before and not torch.equal(before[k], p.detach())]
        if mode == "lora":  # adapters are new parameters: lora_B starts at zero and must have left it
            moved = [k for k, p in trainable.items() if "lora_B" in k and p.detach().abs().sum() > 0]
        assert moved, f"{mode}: no adapted parameter changed during finetune_backbone"


def test_b4_segmentation_selects_by_dice_not_auroc(smoke_backbone):
    seg = pytest.importorskip("medlib.eval.segmentation", reason="medlib.eval.segmentation is not written yet")
    ds = make_dataset("cxr", 24, size=64, seed=1)
    split = patient_split(ds, (0.5, 0.25, 0.25), seed=0)
    model = seg.frozen_linear(smoke_backbone, n_classes=len(ds.mask_names) + 1)
    result = seg.train_segmenter(model, ds.subset(split["train"]), ds.subset(split["val"]), epochs=3, lr=0.05,
                                 batch_size=8, image_size=32, device="cpu")
    history = result.history
    assert not any("auroc" in column.lower() for column in history.columns)
    assert result.best_epoch == int(history["val_dice"].idxmax())
    assert "dice" in result.selection.lower() and "auroc" not in result.selection.lower()


def test_b5_probes_never_select_on_test(knee):
    ds, split = knee
    fs = _features(ds)
    train, val, test = (fs.subset(split[k]) for k in ("train", "val", "test"))
    for probe, kwargs in ((linear_probe, dict(lrs=(1e-3, 5e-2), epochs=3, batch_size=16, device="cpu")),
                          (logistic_regression_probe, dict(n_c=5))):
        with pytest.raises(ValueError, match="B5"):
            probe(train, None, test, **kwargs)
        clean = probe(train, val, test, **kwargs)
        garbage = test.subset(np.arange(len(test)))
        garbage.labels = 1 - np.asarray(garbage.labels)  # test labels inverted: any test-based choice would move
        dirty = probe(train, val, garbage, **kwargs)
        assert dirty.chosen == clean.chosen and dirty.grid.equals(clean.grid)


def test_b6_few_shot_reports_repeats_with_an_interval(knee):
    ds, split = knee
    signature = inspect.signature(run_few_shot).parameters
    assert signature["protocol"].default == "repeats" and signature["repeats"].default > 1
    result = run_few_shot(ds, _features(ds), split, mlknn_probe(k=3), ns=(2,), repeats=4)
    row = result.summary.iloc[0]
    assert row.repeats == 4 and np.isfinite(row.ci_low) and row.ci_low < row["mean"] < row.ci_high
    assert result.scores.groupby("n").repeat.nunique().iloc[0] == 4


def test_b7_horizontal_flip_mirrors_width():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    plain = ClassificationTransform(8, train=False, resize=8)
    for flip in (ClassificationTransform(8, train=True, scale=None, hflip=1.0), train_transform(8)):
        flip.scale, flip.hflip = None, 1.0
        out = flip(image)
        assert torch.allclose(out, plain(np.ascontiguousarray(image[:, ::-1])), atol=1e-6)  # width mirrored
        assert not torch.allclose(out, plain(np.ascontiguousarray(image[::-1, :])), atol=1e-3)  # not height

"""Fine-tuning modes (full / LoRA / BitFit / linear), settings read from text, the training transforms."""

import numpy as np
import pytest
import torch

from medlib.data.phantoms import make_dataset
from medlib.data.splits import patient_split
from medlib.eval.finetune import FinetuneConfig
from medlib.eval.peft_finetune import (DEFAULT_BACKBONE_LR, config_from_text, default_config, finetune_backbone,
                                       mode_from_flags, parse_bool, prepare_backbone, train_transform)
from medlib.models.backbones import create_backbone

CFG = FinetuneConfig(epochs=1, batch_size=16, lr=1e-2, warmup_fraction=0.0)


@pytest.fixture(scope="module")
def data():
    ds = make_dataset("breast_us", 64, size=64, seed=2)
    split = patient_split(ds, (0.6, 0.2, 0.2), seed=0)
    return tuple(ds.subset(split[k], name=k) for k in ("train", "val", "test"))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("random-vit-smoke")


def _changed(before: dict, model) -> set[str]:
    after = {k: v.detach().cpu() for k, v in model.backbone.named_parameters()}
    return {k for k, v in before.items() if k in after and not torch.equal(v, after[k])}


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), (" no ", False), ("0", False),
                                            ("off", False), ("True", True), ("YES", True), ("1", True), (1, True),
                                            (0, False), (False, False), (True, True)])
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


@pytest.mark.parametrize("garbage", ["Flase", "", "2", 2, None, 0.5, "maybe"])
def test_parse_bool_raises_on_garbage(garbage):
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool(garbage)


def test_mode_and_config_from_text():
    assert mode_from_flags() == "linear" and mode_from_flags("False", "no", "0") == "linear"
    assert mode_from_flags(finetune="True") == "full" and mode_from_flags(lora="yes") == "lora"
    with pytest.raises(ValueError, match="choose one"):
        mode_from_flags(lora="true", bitfit="true")
    mode, cfg = config_from_text({"finetune": "False", "epochs": "3", "lr": "1e-3", "backbone_lr": "None",
                                  "pos_weight": "no", "select_on": "val_auroc", "clip_grad": "null"})
    assert mode == "linear"
    assert cfg == FinetuneConfig(epochs=3, lr=1e-3, backbone_lr=None, pos_weight=False, select_on="val_auroc",
                                 clip_grad=None)
    assert config_from_text({"mode": "bitfit"})[0] == "bitfit"
    with pytest.raises(ValueError, match="unknown setting"):
        config_from_text({"learning_rate": "1"})
    with pytest.raises(ValueError, match="valid int"):
        config_from_text({"epochs": "2.5"})
    with pytest.raises(ValueError, match="contradicts"):
        config_from_text({"mode": "full", "finetune": "False"})


def test_default_config_per_mode():
    assert default_config("full", "smoke").backbone_lr == 1e-5
    assert default_config("lora", "smoke").epochs == 1 and default_config("linear").backbone_lr == 0.0
    assert DEFAULT_BACKBONE_LR["bitfit"] > 0
    with pytest.raises(ValueError, match="mode="):
        default_config("prompt")


def test_prepare_backbone_sets_the_trainable_parameters(backbone):
    import copy

    lora = prepare_backbone(copy.deepcopy(backbone), "lora", lora_r=4)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    bitfit = prepare_backbone(copy.deepcopy(backbone), "bitfit")
    assert all(n.endswith("bias") for n, p in bitfit.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in prepare_backbone(copy.deepcopy(backbone), "linear").parameters())


def test_linear_mode_keeps_the_backbone_and_the_callers_object(data, backbone):
    train, val, test = data
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    before = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    result = finetune_backbone(backbone, "linear", train, val, test, CFG, device="cpu")
    assert _changed(before, result.model) == set()
    assert result.parameters["trainable"] == 48 + 1  # the linear head only
    assert result.backbone_parameters["trainable"] == 0 and result.config.backbone_lr == 0.0
    assert 0 <= result.test_metrics["auroc"] <= 1 and result.test_proba.shape == (len(test), 1)
    assert all(torch.equal(v, original[k]) for k, v in backbone.state_dict().items())


def test_full_lora_bitfit_train_the_right_parameters(data, backbone):
    train, val, test = data
    before = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    full = finetune_backbone(backbone, "full", train, val, test, FinetuneConfig(epochs=1, batch_size=16, lr=1e-2,
                                                                                 backbone_lr=1e-3), device="cpu")
    assert len(_changed(before, full.model)) == len(before)
    bitfit = finetune_backbone(backbone, "bitfit", train, val, test, CFG, device="cpu")
    changed = _changed(before, bitfit.model)
    assert changed and all(k.endswith("bias") for k in changed)
    lora = finetune_backbone(backbone, "lora", train, val, test, CFG, lora_r=4, device="cpu")
    assert _changed(before, lora.model) == set()  # base weights frozen ...
    lora_b = [p for n, p in lora.model.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # ... adapters (B starts at zero) learned
    assert lora.config.backbone_lr == DEFAULT_BACKBONE_LR["lora"]
    shares = {r.mode: r.backbone_parameters["share"] for r in (full, bitfit, lora)}
    assert shares["full"] == 1.0 and 0 < shares["bitfit"] < shares["lora"] < 1.0


def test_finetune_bad_input(data, backbone):
    train, val, test = data
    with pytest.raises(ValueError, match="mode="):
        finetune_backbone(backbone, "prefix", train, val, test, CFG)
    with pytest.raises(ValueError, match="mode='linear'"):
        finetune_backbone(backbone, "full", train, val, test, FinetuneConfig(epochs=1, backbone_lr=0.0))


def test_train_transform_flips_width_not_height():
    image = np.zeros((8, 8), dtype=np.uint8)
    image[:, :2] = 255  # a bright band on the left edge
    t = train_transform(8)
    t.scale, t.hflip = None, 1.0  # keep the geometry, always flip
    out = t(image)[0].numpy()
    assert out[:, -2:].mean() > out[:, :2].mean()  # the band moved to the right edge
    assert np.allclose(out[0], out[-1])  # rows unchanged top to bottom: no vertical flip
    assert t.vflip == 0.0 and train_transform(8).hflip == 0.5

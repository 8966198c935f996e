"""LoRA / BitFit / freezing: what is trainable, exact parameter counts, and defect B3 (gradients must flow)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from medlib.models.adapters import (
    apply_bitfit,
    apply_lora,
    freeze,
    lora_target_regex,
    trainable_parameter_report,
)
from medlib.models.backbones import create_backbone
from medlib.models.heads import LinearHead

R = 48


def _smoke():
    torch.manual_seed(0)
    return create_backbone("random-vit-smoke")


def _lora_count(backbone: nn.Module, targets=("qkv", "fc1", "fc2"), r: int = R) -> int:
    """r * (in + out) for every targeted nn.Linear inside the transformer blocks."""
    return sum(r * (m.in_features + m.out_features) for name, m in backbone.named_modules()
               if isinstance(m, nn.Linear) and ".blocks." in f".{name}" and name.rsplit(".", 1)[-1] in targets)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_target_regex_selects_block_linears_only():
    pattern = lora_target_regex()
    assert re.fullmatch(pattern, "model.blocks.3.attn.qkv")
    assert re.fullmatch(pattern, "model.blocks.11.mlp.fc2")
    assert re.fullmatch(pattern, "blocks.0.mlp.fc1")
    for name in ("model.patch_embed.proj", "model.blocks.3.attn.proj", "model.head", "fc1", "model.blocks.3.attn"):
        assert not re.fullmatch(pattern, name), name
    with pytest.raises(ValueError, match="non-empty module names"):
        lora_target_regex(("qkv", "a.b"))


def test_lora_exact_trainable_count_and_untouched_patch_embed():
    backbone = _smoke()
    expected = _lora_count(backbone)
    assert expected == 2 * R * ((48 + 144) + (48 + 192) + (192 + 48))
    total_before = sum(p.numel() for p in backbone.parameters())
    apply_lora(backbone, r=R, alpha=16, dropout=0.1)
    report = trainable_parameter_report(backbone)
    assert report == {"trainable": expected, "total": total_before + expected,
                      "share": expected / (total_before + expected)}
    assert type(backbone.model.patch_embed.proj) is nn.Conv2d
    assert not any(p.requires_grad for p in backbone.model.patch_embed.parameters())
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"blocks\.\d+\.(attn\.qkv|mlp\.fc1|mlp\.fc2)\.lora_[AB]\.", n)
                             for n in trainable)
    qkv = backbone.model.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (R, 48) and qkv.lora_B["default"].weight.shape == (144, R)
    assert qkv.scaling["default"] == pytest.approx(16 / R)


def test_lora_starts_as_identity():
    backbone = _smoke()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = backbone(x)
        after = apply_lora(backbone)(x)
    torch.testing.assert_close(before, after)


def test_b3_lora_parameters_get_gradients_and_change():
    """One step: B gets a gradient (A cannot yet: B = 0); the next step A does too. Frozen weights never move."""
    backbone = apply_lora(_smoke())
    head = LinearHead(48, 3)
    model = nn.Sequential(backbone, head).train()
    before = _snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 1])

    _step(model, x, y, opt)
    params = dict(model.named_parameters())
    lora_a = [n for n in params if ".lora_A." in n]
    lora_b = [n for n in params if ".lora_B." in n]
    assert len(lora_a) == len(lora_b) == 6
    for name in lora_b:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
        assert not torch.equal(params[name], before[name]), name
    for name in lora_a:  # dL/dA = B^T (...) = 0 while B is still zero
        assert torch.count_nonzero(params[name].grad) == 0 and torch.equal(params[name], before[name]), name
    after_one = _snapshot(model)

    _step(model, x, y, opt)
    for name in lora_a:
        assert params[name].grad.abs().sum() > 0 and not torch.equal(params[name], after_one[name]), name
    for name, value in before.items():
        if ".lora_" not in name and not name.startswith("1."):
            assert torch.equal(params[name], value), f"frozen weight {name} changed"
    assert not torch.equal(params["1.linear.weight"], before["1.linear.weight"])  # the head trains


def test_b3_negative_control_no_grad_backbone_starves_adapters():
    """The seed-002 defect: a backbone under no_grad leaves every LoRA parameter without a gradient."""
    backbone = apply_lora(_smoke()).train()
    head = LinearHead(48, 2)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 32, 32))
    nn.functional.cross_entropy(head(feats), torch.tensor([0, 1])).backward()
    assert all(p.grad is None for n, p in backbone.named_parameters() if p.requires_grad)


def test_bitfit_trains_biases_only():
    backbone = apply_bitfit(_smoke())
    biases = {n for n, _ in backbone.named_parameters() if n.endswith(".bias")}
    assert {n for n, p in backbone.named_parameters() if p.requires_grad} == biases
    head = LinearHead(48, 3)
    model = nn.Sequential(backbone, head).train()
    assert all(p.requires_grad for p in head.parameters())
    before = _snapshot(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _step(model, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1]), opt)
    params = dict(model.named_parameters())
    qkv_bias = "0.model.blocks.0.attn.qkv.bias"
    assert params[qkv_bias].grad.abs().sum() > 0 and not torch.equal(params[qkv_bias], before[qkv_bias])
    for name, value in before.items():
        if name.startswith("0.") and not name.endswith(".bias"):
            assert params[name].grad is None and torch.equal(params[name], value), name
    report = trainable_parameter_report(backbone)
    assert report["trainable"] == sum(backbone.get_parameter(n).numel() for n in biases)


def test_freeze_and_report():
    backbone = freeze(_smoke())
    assert trainable_parameter_report(backbone)["trainable"] == 0
    assert trainable_parameter_report(backbone)["share"] == 0.0
    assert trainable_parameter_report(nn.Linear(3, 2)) == {"trainable": 8, "total": 8, "share": 1.0}
    assert trainable_parameter_report(nn.Module()) == {"trainable": 0, "total": 0, "share": 0.0}


def test_vit_s14_shares_for_the_report():
    """ViT-S/14 at 224 px: exact LoRA (r=48) and BitFit counts; the shares are what the notebook reports."""
    lora = apply_lora(create_backbone("dinov2-vit-s14", pretrained=False))
    d, hidden, depth = 384, 1536, 12
    norms, layer_scales = 4 * d, 2 * d
    qkv, proj, fc1, fc2 = d * 3 * d + 3 * d, d * d + d, d * hidden + hidden, hidden * d + d
    block = norms + layer_scales + qkv + proj + fc1 + fc2
    patch_embed, cls_token, pos_embed, final_norm = 3 * 14 * 14 * d + d, d, (1 + 16 * 16) * d, 2 * d
    base_total = patch_embed + cls_token + pos_embed + depth * block + final_norm
    assert base_total == 21_628_800
    lora_params = depth * R * ((d + 3 * d) + (d + hidden) + (hidden + d))
    assert trainable_parameter_report(lora) == {"trainable": lora_params, "total": base_total + lora_params,
                                                "share": lora_params / (base_total + lora_params)}
    bitfit = trainable_parameter_report(apply_bitfit(create_backbone("dinov2-vit-s14", pretrained=False)))
    bias_params = d + depth * (3 * d + hidden + 4 * d) + d  # patch_embed; qkv, fc1, proj/fc2/norm1/norm2; norm
    assert bitfit == {"trainable": bias_params, "total": base_total, "share": bias_params / base_total}
    assert bitfit["share"] < 0.01 < trainable_parameter_report(lora)["share"]


def test_lora_errors():
    with pytest.raises(ValueError, match="LoRA targets transformer blocks.*cnn"):
        apply_lora(create_backbone("efficientnet-lite0.in1k"))
    with pytest.raises(ValueError, match="LoRA target 'query' matches no nn.Linear"):
        apply_lora(_smoke(), targets=("qkv", "query"))
    with pytest.raises(ValueError, match="rank r must be >= 1"):
        apply_lora(_smoke(), r=0)
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_bitfit(nn.Linear(3, 2, bias=False))

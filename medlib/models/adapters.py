"""Parameter-efficient fine-tuning: LoRA (via peft), BitFit, freezing and a trainable-parameter report.

Baharoon et al. 2023 fine-tunes DINOv2 three ways: full, LoRA (r = 48, alpha = 16, dropout 0.1 on the
qkv / fc1 / fc2 linears of every transformer block) and BitFit (only bias terms). Each
function here changes the backbone *in place* and returns it; the head is a separate
module and stays trainable.

Defect B3 of the seed-002 code: the backbone ran under ``torch.no_grad()``, so LoRA and
BitFit parameters never received a gradient. Nothing here wraps a forward pass; the
backbone must run with gradients enabled (tests/test_adapters.py checks that one
optimisation step changes the adapter parameters and nothing frozen).
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn

from .backbones import Backbone

LORA_DEFAULT_TARGETS = ("qkv", "fc1", "fc2")


def lora_target_regex(targets: Sequence[str] = LORA_DEFAULT_TARGETS) -> str:
    """A peft ``target_modules`` regex matching the named linears inside transformer blocks only.

    ``("qkv", "fc1", "fc2")`` matches ``...blocks.3.attn.qkv`` and ``...blocks.3.mlp.fc1`` but
    never ``patch_embed.proj`` or a head.
    """
    if not targets or not all(re.fullmatch(r"\w+", t) for t in targets):
        raise ValueError(f"LoRA targets must be non-empty module names like 'qkv', 'fc1'; got {tuple(targets)}.")
    return rf".*blocks\.\d+\.(?:[\w.]+\.)?(?:{'|'.join(targets)})"


def _check_vit(backbone: nn.Module, what: str) -> None:
    if isinstance(backbone, Backbone) and backbone.kind != "vit":
        raise ValueError(f"{what} targets transformer blocks; backbone {backbone.name!r} is a {backbone.kind}. "
                         "Use apply_bitfit or full fine-tuning for CNNs.")


def apply_lora(
    backbone: nn.Module,
    r: int = 48,
    alpha: float = 16,
    dropout: float = 0.1,
    targets: Sequence[str] = LORA_DEFAULT_TARGETS,
) -> nn.Module:
    """Inject LoRA adapters (peft) into the blocks' ``targets`` linears; freeze everything else in ``backbone``.

    Each adapted ``nn.Linear(in, out)`` gains ``r * (in + out)`` trainable parameters
    (A: r x in, initialised randomly; B: out x r, initialised to zero).
    """
    from peft import LoraConfig, inject_adapter_in_model

    _check_vit(backbone, "LoRA")
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got {r}.")
    pattern = lora_target_regex(targets)
    names = [name for name, module in backbone.named_modules()
             if isinstance(module, nn.Linear) and re.fullmatch(pattern, name)]
    for target in targets:
        if not any(name.rsplit(".", 1)[-1] == target for name in names):
            raise ValueError(f"LoRA target {target!r} matches no nn.Linear inside a transformer block of "
                             f"{type(backbone).__name__}; the block linears are named like "
                             f"{sorted({n.rsplit('.', 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})}.")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    return inject_adapter_in_model(config, backbone)


def freeze(backbone: nn.Module) -> nn.Module:
    """Make every parameter of ``backbone`` non-trainable (BatchNorm statistics still follow .train()/.eval())."""
    for param in backbone.parameters():
        param.requires_grad_(False)
    return backbone


def apply_bitfit(backbone: nn.Module) -> nn.Module:
    """BitFit: freeze ``backbone`` except its bias terms (parameters named ``*.bias``)."""
    freeze(backbone)
    n_bias = 0
    for name, param in backbone.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            param.requires_grad_(True)
            n_bias += 1
    if n_bias == 0:
        raise ValueError(f"{type(backbone).__name__} has no bias parameters: BitFit would train nothing.")
    return backbone


def trainable_parameter_report(model: nn.Module) -> dict[str, float]:
    """Counts of trainable and total parameters (adapters included in the total) and the trainable share."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}

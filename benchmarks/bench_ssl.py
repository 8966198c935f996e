"""DINOv2-recipe training throughput against the forward/backward-only ceiling measured in the same run.

On a GPU: ViT-S/14, 2 x 224 + 8 x 96 crops, bf16 (the `gpu` profile). On a CPU: the `tiny` profile's
ViT (64 px, 2 x 64 + n x 32 crops). The end-to-end figure is `train_ssl` itself (multi-crop
augmentation, masking, student + teacher, losses, EMA, schedules). The ceiling is the same student
forward/backward + teacher forward on crops that already sit on the device: what the model alone
costs. Their ratio says how much the recipe's overhead costs.
"""

from __future__ import annotations

from benchmarks import ratio, sig3

import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from . import sync


def _model_ceiling(model: torch.nn.Module, cfg, batch: int, device: str, steps: int) -> float:
    """Images/s of student fwd+bwd on all crops + teacher fwd on global crops, crops pre-made on the device."""
    import copy

    from medlib.config import autocast_dtype
    from medlib.ssl.dino import DINOModel

    student = DINOModel(model, cfg.n_prototypes, cfg.head_hidden, cfg.head_bottleneck).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    g = torch.randn(2 * batch, 3, cfg.global_size, cfg.global_size, device=device)
    loc = torch.randn(cfg.n_local * batch, 3, cfg.local_size, cfg.local_size, device=device)
    dtype = autocast_dtype(device)

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                t = teacher(g)["dino_global"]
            out = student(g, loc)
            loss = out["dino_global"].float().logsumexp(-1).mean() + out["dino_local"].float().logsumexp(-1).mean() \
                + 0 * t.float().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main(steps: int | None = None) -> dict[str, float | str]:
    """Measure end-to-end SSL images/s and the model-only ceiling; print and return them."""
    import timm

    from medlib.config import get_profile, resolve_device
    from medlib.data import natural
    from medlib.models.backbones import EMBEDDED_ARCHS
    from medlib.ssl.train import train_ssl

    device = resolve_device("auto")
    profile = get_profile("gpu" if device == "cuda" else "tiny")
    arch, kwargs = EMBEDDED_ARCHS[profile.backbone.embedded_suffix]
    steps = steps or (30 if device == "cuda" else 4)
    cfg = replace(profile.ssl, steps=steps + 1, checkpoint_every=10_000)
    n_images = max(4 * cfg.batch_size, 256)
    images = natural.make_natural(n_images, size=max(64, cfg.global_size), seed=0).images

    def make_model():
        return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        result = train_ssl(make_model(), np.asarray(images), cfg, out_dir=tmp, seed=0, device=device, progress=False)
    end_to_end = float(result.images_per_s)
    ceiling = _model_ceiling(make_model(), cfg, cfg.batch_size, device, steps)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    report = {
        "device": name, "profile": profile.name, "arch": profile.backbone.embedded_suffix,
        "crops": f"2x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}", "batch": cfg.batch_size,
        "end_to_end_images_per_s": sig3(end_to_end), "end_to_end_crops_per_s": sig3(end_to_end * (2 + cfg.n_local)),
        "model_ceiling_images_per_s": sig3(ceiling), "fraction_of_ceiling": ratio(end_to_end, ceiling),
    }
    for key, value in report.items():
        print(f"{key:>28}: {value}")
    return report


if __name__ == "__main__":
    main()

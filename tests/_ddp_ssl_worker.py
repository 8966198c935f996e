"""Worker for the DDP test: `accelerate launch --multi_gpu --num_processes 2 tests/_ddp_ssl_worker.py OUTDIR`.

Each rank runs a few DINOv2 steps on the CPU (gloo) and writes the sha256 of its student and teacher
weights to OUTDIR/rank<r>.json, so the test can check that every process holds the same model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import timm
import torch

from medlib.config import get_profile
from medlib.ssl.train import train_ssl


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names and bytes, in order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: Path) -> None:
    """Train 3 steps with a global batch of 8 split over the processes; record hashes per rank."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                                 depth=2, num_heads=2, dynamic_img_size=True)
    initial = weights_hash(backbone)
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32), dtype=np.uint8)
    cfg = dataclasses.replace(get_profile("smoke").ssl, steps=3, batch_size=8, checkpoint_every=2)
    result = train_ssl(backbone, images, cfg, out_dir=out_dir / "run", seed=0, device="cpu", progress=False)
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    record = {"rank": rank, "world": world, "initial": initial, "student": weights_hash(result.student),
              "teacher": weights_hash(result.teacher), "steps": result.steps_done,
              "finite": bool(np.isfinite(result.history["loss"]).all())}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

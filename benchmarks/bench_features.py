"""Feature extraction end to end (study 1) against the model-only ceiling and a naive baseline, in one run.

End to end = ``medlib.eval.features.extract_features`` (cache off): cached uint8 phantoms, a writable
batch copy, pinned memory, uint8 moved to the device, resized and normalised there, bf16 autocast
(+ torch.compile on a GPU), CLS / pooled / last-4 outputs copied back. Ceiling = the same forward
(same dtype, same compile) on a batch that already sits on the device, nothing else. Naive = what the
public code of the studies does: PNG files decoded by PIL, torchvision Resize / CenterCrop / ToTensor
/ Normalize in a DataLoader, fp32 forward. GPU: ViT-S/14 and ViT-B/14 at 224 px (random weights: speed
does not depend on them). CPU: the `tiny` ViT at 64 px, so that `make bench` finishes on a laptop.
"""

from __future__ import annotations

from benchmarks import ratio, sig3

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import sync


def _ceiling(backbone, size: int, batch: int, n_images: int, device: str, compile_model: bool) -> float:
    """Images/s of ``backbone.features`` alone on a normalised batch already on the device."""
    from medlib.config import autocast_dtype

    dtype = autocast_dtype(device)
    forward = torch.compile(backbone.features) if compile_model else backbone.features
    x = torch.randn(batch, 3, size, size, device=device)
    n_batches = max(2, n_images // batch)
    with torch.inference_mode(), torch.autocast(device_type=device.split(":")[0], dtype=dtype,
                                                enabled=dtype is not None):
        for _ in range(2):  # warm-up (and compilation)
            forward(x, n_last=4)
        sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            out = forward(x, n_last=4)
            {k: v.float().cpu() for k, v in out.items() if k in ("cls", "pooled", "layers")}
        sync(device)
    return n_batches * batch / (time.perf_counter() - start)


def _naive(model_name: str, kwargs: dict, images: np.ndarray, size: int, batch: int, device: str,
           workers: int) -> float:
    """Images/s of the public-code pattern: PNG + PIL + torchvision transforms in a DataLoader, fp32."""
    import timm
    from PIL import Image
    from torchvision import transforms

    model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs).eval().to(device)
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, img in enumerate(images):
            path = Path(tmp) / f"{i:06d}.png"
            Image.fromarray(np.asarray(img)).save(path)
            paths.append(path)

        class PngFolder(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int) -> torch.Tensor:
                return tf(Image.open(paths[i]).convert("RGB"))

        loader = torch.utils.data.DataLoader(PngFolder(), batch_size=batch, num_workers=workers)
        with torch.inference_mode():
            model(torch.randn(2, 3, size, size, device=device))  # warm-up
            sync(device)
            start = time.perf_counter()
            for x in loader:
                model.forward_features(x.to(device)).float().cpu()
            sync(device)
    return len(images) / (time.perf_counter() - start)


def main(n_images: int | None = None) -> dict[str, dict[str, float | str]]:
    """Measure end-to-end, ceiling and naive images/s for each model; print and return them."""
    import os

    from medlib.config import resolve_device
    from medlib.data import phantoms
    from medlib.eval.features import extract_features
    from medlib.models.backbones import EMBEDDED_ARCHS, create_backbone  # noqa: F401

    device = resolve_device("auto")
    on_gpu = device.startswith("cuda")
    if on_gpu:
        models = {"dinov2-vit-s14": ("vit_small_patch14_dinov2", dict(img_size=224, patch_size=14)),
                  "dinov2-vit-b14": ("vit_base_patch14_dinov2", dict(img_size=224, patch_size=14))}
        size, batch, n_images, source_size = 224, 256, n_images or 8192, 256
    else:
        models = {"random-vit-tiny": EMBEDDED_ARCHS["vit-tiny"]}
        size, batch, n_images, source_size = 64, 128, n_images or 512, 128
    ds = phantoms.make_dataset("cxr", n_images, size=source_size, seed=0)
    images = ds.images
    workers = min(8, os.cpu_count() or 1) if on_gpu else 0
    report: dict[str, dict[str, float | str]] = {}
    for label, (arch, kwargs) in models.items():
        # the architecture of the name, at random init (pretrained=False): throughput does not depend on weights
        backbone = create_backbone(label, pretrained=False, image_size=size) if on_gpu else create_backbone(label)
        extract_features(backbone, ds.subset(np.arange(min(len(ds), 2 * batch))), batch_size=batch, device=device,
                         cache=False, compile_model=on_gpu)  # warm-up / compile
        sync(device)
        start = time.perf_counter()
        extract_features(backbone, ds, batch_size=batch, device=device, cache=False, compile_model=on_gpu)
        sync(device)
        end_to_end = n_images / (time.perf_counter() - start)
        ceiling = _ceiling(backbone, size, batch, n_images, device, compile_model=on_gpu)
        naive = _naive(arch, kwargs, np.asarray(images), size, min(batch, 64), device, workers)
        name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
        report[label] = {"device": name, "image_size": size, "batch": batch, "images": n_images,
                         "end_to_end_images_per_s": sig3(end_to_end), "ceiling_images_per_s": sig3(ceiling),
                         "naive_images_per_s": sig3(naive), "fraction_of_ceiling": ratio(end_to_end, ceiling),
                         "speedup_over_naive": ratio(end_to_end, naive, 2),
                         "dtype": "bf16 + torch.compile" if on_gpu else "fp32"}
        for key, value in report[label].items():
            print(f"{label} {key:>26}: {value}")
    return report


if __name__ == "__main__":
    main()

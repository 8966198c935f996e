"""Batched, cached feature extraction from a frozen backbone: the input of kNN, ML-kNN and linear probes.

:func:`extract_features` runs a :class:`~medlib.models.backbones.Backbone` once over an
:class:`~medlib.data.imageset.ImageSet` with Baharoon et al.'s evaluation transform (resize to
``size * 256 / 224``, centre crop ``size``, per-image min-max rescale, ImageNet mean / std)
and returns a :class:`FeatureSet`: the final CLS token, the average-pooled patch tokens of
the last block and the CLS token of each of the last ``n_last`` blocks - everything
DINOv2's linear-probe grid needs, so probes never touch the backbone again.

Results are cached on disk (``medlib.cache.artifact_dir("features", key)``) under a key made
of the backbone name, its weights (the weights file's hash; for a backbone without a file,
a hash of its parameters, so two random inits never share features), the images'
fingerprint, the transform, the image size and ``n_last``. A backbone changed in memory
after loading from a file (fine-tuned, LoRA-merged) keeps its file's key: pass ``cache=False``.

On a GPU, uint8 batches come from DataLoader workers in pinned memory, go to the device, are transformed
there and run under bf16 autocast (through ``torch.compile`` in the ``gpu`` / ``paper`` profiles); on a CPU
the path is plain fp32 in the main process, except under the ``gpu-switches`` profile, which runs the GPU's
switches on the CPU (:mod:`medlib.accel`).
"""

from __future__ import annotations

import contextlib

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..accel import active_switches, feature_loader, quiet_pinning
from ..cache import (CorruptCacheError, array_fingerprint, artifact_dir, discard_entry, entry_lock, file_hash,
                     load_npy, provenance, save_json, save_npy)
from ..config import autocast_dtype, resolve_device
from ..data.imageset import ImageSet
from ..data.transforms import ClassificationTransform
from ..engine import progress as progress_bar
from ..models.backbones import Backbone, create_backbone

FEATURE_FORMAT_VERSION = "1"
_ARRAYS = ("cls", "pooled", "layers")


@dataclass
class FeatureSet:
    """Frozen-backbone features of one ImageSet, with its labels carried along for probes.

    ``cls`` (N, D), ``pooled`` (N, D) and ``layers`` (N, n, D; oldest block first, so
    ``layers[:, -1]`` is ``cls``) are float32 (possibly memory-mapped from the cache).
    ``labels`` / ``label_names`` / ``task`` are copied from the ImageSet (never cached).
    """

    cls: np.ndarray
    pooled: np.ndarray
    layers: np.ndarray
    labels: np.ndarray | None
    label_names: list[str]
    task: str
    backbone: str
    dataset: str
    fingerprint: str  # of the images
    key: str = ""  # the cache key hash ("" when not cached)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.cls)
        if self.cls.ndim != 2 or self.pooled.shape != self.cls.shape:
            raise ValueError(f"FeatureSet {self.dataset!r}: cls {self.cls.shape} and pooled {self.pooled.shape} "
                             "must both be (N, D)")
        if self.layers.ndim != 3 or self.layers.shape[0] != n or self.layers.shape[2] != self.cls.shape[1]:
            raise ValueError(f"FeatureSet {self.dataset!r}: layers must be (N={n}, n_last, D={self.cls.shape[1]}), "
                             f"got {self.layers.shape}")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"FeatureSet {self.dataset!r}: {len(self.labels)} label rows for {n} feature rows")

    def __len__(self) -> int:
        return len(self.cls)

    @property
    def dim(self) -> int:
        """Feature width D."""
        return int(self.cls.shape[1])

    @property
    def n_classes(self) -> int:
        """Outputs a head needs: labels (multi-label / binary) or classes (multi-class)."""
        return len(self.label_names)

    @property
    def n_layers(self) -> int:
        """How many final blocks' CLS tokens ``layers`` holds."""
        return int(self.layers.shape[1])

    def subset(self, indices: np.ndarray | list[int]) -> "FeatureSet":
        """The rows ``indices`` (copied into memory), labels included."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"FeatureSet {self.dataset!r}: empty subset requested (an empty split?)")
        if idx.min() < 0 or idx.max() >= len(self):
            raise ValueError(f"FeatureSet {self.dataset!r}: indices must lie in 0..{len(self) - 1}")
        return FeatureSet(
            cls=np.asarray(self.cls[idx]), pooled=np.asarray(self.pooled[idx]), layers=np.asarray(self.layers[idx]),
            labels=None if self.labels is None else np.asarray(self.labels[idx]), label_names=list(self.label_names),
            task=self.task, backbone=self.backbone, dataset=self.dataset, fingerprint=self.fingerprint, key=self.key,
            info=dict(self.info),
        )

    def probe_input(self, n_blocks: int = 1, avgpool: bool = False, normalize: bool = False) -> np.ndarray:
        """DINOv2's probe input: CLS of the last ``n_blocks`` blocks concatenated (+ pooled patch tokens)."""
        if not 1 <= n_blocks <= self.n_layers:
            raise ValueError(f"n_blocks={n_blocks} but these features hold {self.n_layers} block(s); "
                             f"re-extract with n_last >= {n_blocks}")
        parts = [np.asarray(self.layers[:, -n_blocks:]).reshape(len(self), -1)]
        if avgpool:
            parts.append(np.asarray(self.pooled))
        x = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def label_matrix(self) -> np.ndarray:
        """Labels as an (N, L) 0/1 matrix whatever the task (one-hot for multi-class)."""
        if self.labels is None:
            raise ValueError(f"FeatureSet {self.dataset!r} has no labels (task 'none')")
        if self.task == "multiclass":
            return np.eye(len(self.label_names), dtype=np.float32)[np.asarray(self.labels, dtype=np.int64)]
        return np.asarray(self.labels, dtype=np.float32)


def concat_features(parts: list[FeatureSet]) -> FeatureSet:
    """Stack FeatureSets of one backbone and task row-wise (e.g. train + val for a refit)."""
    if not parts:
        raise ValueError("concat_features needs at least one FeatureSet")
    first = parts[0]
    for other in parts[1:]:
        if (other.task, other.label_names, other.backbone, other.dim, other.n_layers) != \
                (first.task, first.label_names, first.backbone, first.dim, first.n_layers):
            raise ValueError(f"cannot concatenate FeatureSet {other.dataset!r} with {first.dataset!r}: backbone, "
                             "task, label names, width or n_last differ")
    labels = None if first.labels is None else np.concatenate([np.asarray(p.labels) for p in parts])
    return FeatureSet(
        cls=np.concatenate([np.asarray(p.cls) for p in parts]),
        pooled=np.concatenate([np.asarray(p.pooled) for p in parts]),
        layers=np.concatenate([np.asarray(p.layers) for p in parts]),
        labels=labels, label_names=list(first.label_names), task=first.task, backbone=first.backbone,
        dataset="+".join(p.dataset for p in parts), fingerprint="+".join(p.fingerprint for p in parts),
    )


def weights_id(backbone: Backbone) -> str:
    """What identifies a backbone's weights: its file's hash, else ``random-<hash of its parameters>``."""
    path = getattr(backbone, "weights_path", None)
    if path is not None and Path(path).is_file():
        return f"file-{file_hash(path)}"
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"random-{digest.hexdigest()[:16]}"


def feature_cache_key(backbone: Backbone, fingerprint: str, transform: ClassificationTransform, n_last: int) -> dict:
    """The dict that names one cached feature extraction (hashed by ``artifact_dir``)."""
    return {"version": FEATURE_FORMAT_VERSION, "backbone": backbone.name, "weights": weights_id(backbone),
            "data": fingerprint, "transform": repr(transform), "image_size": transform.size, "n_last": n_last}


def _load_cached(folder: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays in ``folder`` (memory-mapped), or None when any is missing."""
    paths = {name: folder / f"{name}.npy" for name in _ARRAYS}
    if not all(path.is_file() for path in paths.values()):
        return None
    try:
        return {name: load_npy(path) for name, path in paths.items()}
    except CorruptCacheError as err:
        discard_entry(folder, err)  # damaged: extracted again
        return None


def _batch_features(backbone: Backbone, x: torch.Tensor, n_last: int, forward: Any) -> dict[str, np.ndarray]:
    """Run one normalised batch through ``forward`` and return float32 numpy views."""
    out = forward(x, n_last=n_last)
    return {name: out[name].float().cpu().numpy() for name in _ARRAYS}


def _run(backbone: Backbone, ds: ImageSet, transform: ClassificationTransform, n_last: int, batch_size: int,
         device: str, compile_model: bool, show: bool) -> dict[str, np.ndarray]:
    """Extract all features of ``ds`` in batches on ``device`` (bf16 autocast on GPUs and under the GPU switches).

    Batches come from :func:`medlib.accel.feature_loader`: in the main process on a plain CPU run, from the
    active switches' DataLoader workers into pinned memory on a GPU (or under ``gpu-switches``).
    """
    backbone.eval().to(device)
    dtype = autocast_dtype(device)
    switches = active_switches()
    forward = torch.compile(backbone.features, dynamic=switches.dynamic) if compile_model else backbone.features
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    loader = feature_loader(ds.images, batch_size, device, switches)
    with torch.inference_mode(), quiet_pinning():
        for batch in progress_bar(loader, enabled=show, desc=f"features {backbone.name}", total=len(loader)):
            x = transform(batch, device=device)  # uint8 moved first, resized and normalised on the device
            n = x.shape[0]
            if compile_model and n < batch_size and not switches.dynamic:  # one static graph: pad the last batch
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                out = _batch_features(backbone, x, n_last, forward)
            out = {name: value[:n] for name, value in out.items()}  # eval mode: padding rows change no other row
            for name in _ARRAYS:
                chunks[name].append(out[name])
    return {name: np.concatenate(parts).astype(np.float32, copy=False) for name, parts in chunks.items()}


def extract_features(backbone: Backbone | str, ds: ImageSet, *, image_size: int | None = None, n_last: int = 4,
                     batch_size: int = 128, device: str = "auto", cache: bool = True, progress: bool = False,
                     compile_model: bool | None = None) -> FeatureSet:
    """CLS, pooled patch tokens and the last ``n_last`` blocks' CLS of every image, cached on disk.

    ``compile_model`` (``torch.compile`` the forward) defaults to the active switches (``medlib.accel``).

    ``backbone`` is a Backbone or a registry name; ``image_size`` defaults to the backbone's.
    ``n_last`` is capped at the backbone's depth (a CNN always gives one "layer"); the
    FeatureSet's ``n_layers`` says how many were kept.
    """
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, image_size=image_size)
    if compile_model is None:
        compile_model = active_switches().compile
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_last < 1:
        raise ValueError(f"n_last must be >= 1, got {n_last}")
    n_last = min(n_last, backbone.depth)
    size = int(image_size or backbone.image_size)
    transform = ClassificationTransform(size, train=False)
    fingerprint = array_fingerprint(np.asarray(ds.images))
    key = feature_cache_key(backbone, fingerprint, transform, n_last)
    folder = artifact_dir("features", key)
    with entry_lock(folder) if cache else contextlib.nullcontext():  # one extraction per entry at a time
        return _extract(backbone, ds, folder, key, fingerprint, transform, size, n_last, batch_size, device, cache,
                        progress, compile_model)


def _extract(backbone: Backbone, ds: ImageSet, folder: Path, key: dict, fingerprint: str,
             transform: ClassificationTransform, size: int, n_last: int, batch_size: int, device: str, cache: bool,
             progress: bool, compile_model: bool) -> FeatureSet:
    """The cached features of ``ds`` in ``folder``, or extracted now (and cached when ``cache``)."""
    arrays = _load_cached(folder) if cache else None
    info: dict[str, Any] = {"cache_hit": arrays is not None, "image_size": size, "n_last": n_last,
                            "transform": repr(transform), "cache_dir": str(folder) if cache else None}
    if arrays is None:
        device = resolve_device(device)
        start = time.perf_counter()
        arrays = _run(backbone, ds, transform, n_last, batch_size, device, compile_model, progress)
        info.update(device=device, wall_time_s=time.perf_counter() - start)
        if cache:
            for name in _ARRAYS:
                save_npy(folder / f"{name}.npy", arrays[name])
            save_json(folder / "provenance.json", provenance(data_fingerprint=fingerprint,
                                                             wall_time_s=info["wall_time_s"], key=key,
                                                             dataset=ds.name, device=device))
    return FeatureSet(cls=arrays["cls"], pooled=arrays["pooled"], layers=arrays["layers"], labels=ds.labels,
                      label_names=list(ds.label_names), task=ds.task, backbone=backbone.name, dataset=ds.name,
                      fingerprint=fingerprint, key=folder.name if cache else "", info=info)


__all__ = ["FeatureSet", "concat_features", "extract_features", "feature_cache_key", "weights_id"]

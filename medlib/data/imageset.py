"""`ImageSet`: the one in-memory form every data source returns (phantoms, MedMNIST, DICOM, folders)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

TASKS = ("multilabel", "binary", "multiclass", "none")


@dataclass
class ImageSet:
    """Images with labels, optional masks, patient ids and metadata, validated on construction.

    - ``images``: uint8, (N, H, W) grayscale or (N, H, W, 3) RGB (may be a memory map).
    - ``labels``: float32 (N, L) for multi-label / binary (L = 1), int64 (N,) for multi-class,
      or None for unlabelled data (task "none").
    - ``masks``: optional uint8 label maps (N, H, W); 0 = background, k = ``mask_names[k - 1]``.
    - ``patient_ids``: (N,) str; several images may share a patient (splits group by it).
    """

    images: np.ndarray
    labels: np.ndarray | None
    label_names: list[str]
    task: str
    patient_ids: np.ndarray
    masks: np.ndarray | None = None
    mask_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "unnamed"

    def __post_init__(self) -> None:
        where = f"ImageSet {self.name!r}"
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if self.images.dtype != np.uint8:
            raise TypeError(f"{where}: images must be uint8, got {self.images.dtype}; convert with medlib.data.sources.to_uint8")
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] != 3):
            raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, 3), got {self.images.shape}")
        n = len(self.images)
        if n == 0:
            raise ValueError(f"{where}: no images; check the source path or the split")
        self.patient_ids = np.asarray(self.patient_ids).astype(str)
        if self.patient_ids.shape != (n,):
            raise ValueError(f"{where}: patient_ids must have shape ({n},), got {self.patient_ids.shape}")
        if self.task == "none":
            if self.labels is not None:
                raise ValueError(f"{where}: task 'none' takes labels=None")
        else:
            if self.labels is None or len(self.labels) != n:
                raise ValueError(f"{where}: labels must have one row per image ({n})")
            if self.task == "multiclass":
                if self.labels.ndim != 1:
                    raise ValueError(f"{where}: multiclass labels must be (N,) class indices")
                if self.labels.min() < 0 or self.labels.max() >= len(self.label_names):
                    raise ValueError(f"{where}: class index outside 0..{len(self.label_names) - 1}")
            else:
                if self.labels.ndim != 2 or self.labels.shape[1] != len(self.label_names):
                    raise ValueError(f"{where}: {self.task} labels must be (N, {len(self.label_names)}), got {self.labels.shape}")
                if not np.isin(self.labels, (0, 1)).all():
                    raise ValueError(f"{where}: {self.task} labels must be 0/1")
        if self.masks is not None:
            if self.masks.shape != self.images.shape[:3]:
                raise ValueError(f"{where}: masks {self.masks.shape} must match images {self.images.shape[:3]}")
            if self.masks.dtype != np.uint8:
                raise TypeError(f"{where}: masks must be uint8 label maps")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_classes(self) -> int:
        """Number of outputs a head needs (labels for multi-label, classes for multi-class)."""
        return len(self.label_names)

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> "ImageSet":
        """A new ImageSet with the given rows (copies into memory)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"ImageSet {self.name!r}: empty subset requested (an empty split?)")
        return ImageSet(
            images=np.asarray(self.images[idx]),
            labels=None if self.labels is None else np.asarray(self.labels[idx]),
            label_names=list(self.label_names),
            task=self.task,
            patient_ids=self.patient_ids[idx],
            masks=None if self.masks is None else np.asarray(self.masks[idx]),
            mask_names=list(self.mask_names),
            meta={k: (np.asarray(v)[idx] if isinstance(v, np.ndarray) and len(v) == len(self) else v)
                  for k, v in self.meta.items()},
            name=name or self.name,
        )

    def label_matrix(self) -> np.ndarray:
        """Labels as an (N, L) 0/1 matrix whatever the task (one-hot for multi-class)."""
        if self.labels is None:
            raise ValueError(f"ImageSet {self.name!r} has no labels")
        if self.task == "multiclass":
            return np.eye(len(self.label_names), dtype=np.float32)[self.labels]
        return self.labels.astype(np.float32)

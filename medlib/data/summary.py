"""Descriptive tables of ImageSets: label prevalence, intensity per mask region, a one-row summary."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .imageset import ImageSet


def label_prevalence(datasets: dict[str, ImageSet]) -> pd.DataFrame:
    """Long table (dataset, label, prevalence, n_images): share of images carrying each label."""
    rows = []
    for name, ds in datasets.items():
        matrix = ds.label_matrix()
        for j, label in enumerate(ds.label_names):
            rows.append({"dataset": name, "label": label, "prevalence": float(matrix[:, j].mean()),
                         "n_images": len(ds)})
    if not rows:
        raise ValueError("label_prevalence needs at least one labelled data set")
    return pd.DataFrame(rows)


def intensity_by_region(ds: ImageSet, max_images: int = 256) -> pd.DataFrame:
    """Mean and std of pixel intensity inside each mask region (and background) over the first images."""
    if ds.masks is None:
        raise ValueError(f"ImageSet {ds.name!r} has no masks")
    n = min(len(ds), max_images)
    images = np.asarray(ds.images[:n], dtype=np.float32)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    masks = np.asarray(ds.masks[:n])
    names = ["background", *ds.mask_names]
    rows = []
    for label, region in enumerate(names):
        sel = masks == label
        if sel.any():
            values = images[sel]
            rows.append({"dataset": ds.name, "region": region, "mean": float(values.mean()),
                         "std": float(values.std()), "pixel_share": float(sel.mean())})
    return pd.DataFrame(rows)


def describe(datasets: dict[str, ImageSet]) -> pd.DataFrame:
    """One row per data set: images, patients, size, channels, task, labels, masks."""
    rows = []
    for name, ds in datasets.items():
        rows.append({
            "dataset": name, "images": len(ds), "patients": int(len(np.unique(ds.patient_ids))),
            "size": "x".join(str(s) for s in ds.images.shape[1:3]),
            "channels": 3 if ds.images.ndim == 4 else 1, "task": ds.task, "labels": len(ds.label_names),
            "masks": ", ".join(ds.mask_names) if ds.masks is not None else "-",
        })
    return pd.DataFrame(rows)

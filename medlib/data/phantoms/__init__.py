"""Procedural radiology phantoms: images that look like their modality, with labels and masks by construction.

Families (``FAMILIES``):

- ``"cxr"``: frontal chest radiograph, multi-label findings that depend on the acquisition ``site``
  (see :mod:`medlib.data.phantoms.cxr`); masks 1 left lung, 2 right lung, 3 heart.
- ``"ct"``: abdominal CT axial slice, multi-class organ label (:mod:`medlib.data.phantoms.ct`).
- ``"knee"``: sagittal knee MRI, labels ``acl_tear`` and ``meniscal_tear`` (:mod:`medlib.data.phantoms.knee`).
- ``"breast_us"`` and ``"thyroid_us"``: ultrasound, binary ``malignant`` label and a lesion mask
  (:mod:`medlib.data.phantoms.ultrasound`).

Every sample is a pure function of (family, seed, site, index, size, params): sample ``i`` is the
same whatever the order, the batch or the number of workers. :func:`make_dataset` builds an
:class:`~medlib.data.imageset.ImageSet` and caches it on disk (uint8 ``.npy`` files, memory-mapped on
reload) under ``medlib.cache.artifact_dir("phantoms", key)``.

>>> from medlib.data.phantoms import make_dataset
>>> chest = make_dataset("cxr", 64, size=128, site=2)          # doctest: +SKIP
>>> knee_acl = make_dataset("knee", 64, target="acl_tear")     # binary task   # doctest: +SKIP
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from ..imageset import ImageSet
from . import ct, cxr, knee, ultrasound
from ._base import N_SITES, FamilySpec, PhantomSample, check_seed, check_site
from ._build import build_cached
from ._draw import MAX_SIZE, MIN_SIZE, check_size

FAMILIES: tuple[str, ...] = ("cxr", "ct", "knee", "breast_us", "thyroid_us")
GENERATOR_VERSION = "1"
_SPECS: dict[str, FamilySpec] = {"cxr": cxr.SPEC, "ct": ct.SPEC, "knee": knee.SPEC,
                                 "breast_us": ultrasound.BREAST_SPEC, "thyroid_us": ultrasound.THYROID_SPEC}

__all__ = ["FAMILIES", "GENERATOR_VERSION", "N_SITES", "MIN_SIZE", "MAX_SIZE", "PhantomSample", "family_spec",
           "generate_one", "make_dataset", "site_label_names"]


def family_spec(family: str) -> FamilySpec:
    """The description of a family (task, mask names, accepted params); raises for unknown names."""
    if family not in _SPECS:
        raise ValueError(f"Unknown phantom family {family!r}; choose one of {', '.join(FAMILIES)}")
    return _SPECS[family]


def site_label_names(family: str, site: int = 0) -> list[str]:
    """Label names a family annotates at a site (chest sites differ; other families do not)."""
    return family_spec(family).label_names(check_site(site, family))


def _check_params(spec: FamilySpec, params: dict[str, Any]) -> None:
    """Raise a TypeError naming the accepted parameters when ``params`` holds others."""
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        accepted = ", ".join(spec.params) or "none"
        raise TypeError(f"family {spec.name!r} got unknown parameter(s) {unknown}; it accepts: {accepted}")


def generate_one(family: str, index: int, size: int = 128, seed: int = 0, site: int = 0,
                 **params: Any) -> PhantomSample:
    """Generate sample ``index`` of a family (deterministic per family, seed, site, index, size, params)."""
    spec = family_spec(family)
    _check_params(spec, params)
    return spec.generate(index, size=size, seed=seed, site=site, **params)


def _chunk(family: str, size: int, seed: int, site: int, params: dict[str, Any], start: int, stop: int
           ) -> dict[str, Any]:
    """Generate indices start..stop-1 and stack them (runs in worker processes, so module level)."""
    spec = _SPECS[family]
    samples = [spec.generate(i, size=size, seed=seed, site=site, **params) for i in range(start, stop)]
    return {"images": np.stack([s.image for s in samples]), "masks": np.stack([s.mask for s in samples]),
            "labels": np.stack([s.labels for s in samples]), "patient_ids": [s.patient_id for s in samples],
            "meta": [s.meta for s in samples]}


def _select_target(images: ImageSet, target: str | None) -> ImageSet:
    """Turn a multi-label set into a binary one on the label ``target`` (None: unchanged)."""
    if target is None:
        return images
    if images.task != "multilabel":
        raise ValueError(f"target={target!r} needs a multi-label family; {images.name!r} is {images.task}")
    if target not in images.label_names:
        raise ValueError(f"target={target!r} is not a label of {images.name!r}; labels: {images.label_names}")
    j = images.label_names.index(target)
    return ImageSet(images=images.images, labels=np.asarray(images.labels[:, j:j + 1], dtype=np.float32),
                    label_names=[target], task="binary", patient_ids=images.patient_ids, masks=images.masks,
                    mask_names=images.mask_names, meta=images.meta, name=f"{images.name}&target={target}")


def dataset_name(family: str, site: int, params: dict[str, Any]) -> str:
    """The ImageSet name of a phantom data set, e.g. ``phantom:cxr?site=2`` (scalar params appended)."""
    extra = "".join(f"&{k}={v}" for k, v in sorted(params.items()) if isinstance(v, (str, int, float, bool)))
    return f"phantom:{family}?site={site}{extra}"


def make_dataset(family: str, n: int, size: int = 128, seed: int = 0, site: int = 0, cache: bool = True,
                 workers: int = 1, progress: bool = False, target: str | None = None, **params: Any) -> ImageSet:
    """Build (or load from the cache) ``n`` phantoms of a family as an ImageSet.

    ``target`` picks one label of a multi-label family as a binary task (e.g. ``target="acl_tear"``);
    ``params`` go to the generator (e.g. ``view="slice"`` for CT, ``findings={...}`` to force labels).
    The cache key is (family, n, size, seed, site, params, GENERATOR_VERSION); images, masks and labels
    are uint8 / float .npy files written atomically and memory-mapped when loaded.
    """
    spec = family_spec(family)
    _check_params(spec, params)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int (the number of images), got {n!r}")
    size, seed, site = check_size(size), check_seed(seed, family), check_site(site, family)
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    key = {"family": family, "n": int(n), "size": size, "seed": seed, "site": site, "params": params,
           "version": GENERATOR_VERSION}
    label_dtype = np.int64 if spec.task == "multiclass" else np.float32
    n_labels = None if spec.task == "multiclass" else len(spec.label_names(site))
    arrays, meta = build_cached(
        kind="phantoms", key=key if cache else None, n=int(n),
        fn=partial(_chunk, family, size, seed, site, params),
        layout={"images": ((size, size), np.uint8), "masks": ((size, size), np.uint8),
                "labels": (() if n_labels is None else (n_labels,), label_dtype)},
        workers=int(workers), progress=progress, desc=f"phantom {family} site {site}")
    per_image = dict(meta["per_image"])
    patient_ids = per_image.pop("patient_ids")
    images = ImageSet(images=arrays["images"], labels=arrays["labels"], label_names=spec.label_names(site),
                      task=spec.task, patient_ids=patient_ids, masks=arrays["masks"],
                      mask_names=list(spec.mask_names),
                      meta={**per_image, "family": family, "site_name": _site_name(family, site), "seed": seed,
                            "size": size, "generator_version": GENERATOR_VERSION, "cache_dir": meta.get("cache_dir")},
                      name=dataset_name(family, site, params))
    return _select_target(images, target)


def _site_name(family: str, site: int) -> str:
    """The descriptive name of a family's site (e.g. "icu-portable")."""
    module = {"cxr": cxr, "ct": ct, "knee": knee}.get(family, ultrasound)
    return module.SITES[site].name

"""The sample container and the family description every phantom generator provides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

N_SITES = 6  # every family accepts site = 0 .. N_SITES - 1


@dataclass
class PhantomSample:
    """One generated image: uint8 (H, W) image, labels, uint8 (H, W) label-map mask, patient id, metadata."""

    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    patient_id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilySpec:
    """What a family generates: task, label names per site, mask names, accepted params and the generator."""

    name: str
    code: int  # first entry of every seed sequence of this family
    task: str  # "multilabel", "binary" or "multiclass"
    mask_names: tuple[str, ...]
    label_names: Callable[[int], list[str]]  # site -> label names
    generate: Callable[..., PhantomSample]  # (index, size, seed, site, **params) -> PhantomSample
    params: tuple[str, ...] = ()  # keyword parameters the generator accepts
    description: str = ""


def check_site(site: int, family: str) -> int:
    """Validate a site number (0 .. N_SITES - 1) and return it as an int."""
    if isinstance(site, bool) or not isinstance(site, (int, np.integer)):
        raise TypeError(f"site for family {family!r} must be an int in 0..{N_SITES - 1}, got {site!r}")
    if not 0 <= int(site) < N_SITES:
        raise ValueError(f"site={site} is not a valid site for family {family!r}: use 0..{N_SITES - 1}")
    return int(site)


def check_index(index: int, family: str) -> int:
    """Validate a sample index (a non-negative int) and return it."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or int(index) < 0:
        raise ValueError(f"index for family {family!r} must be a non-negative int, got {index!r}")
    return int(index)


def check_seed(seed: int, family: str) -> int:
    """Validate a seed (a non-negative int) and return it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"seed for family {family!r} must be a non-negative int, got {seed!r}")
    return int(seed)


def resolve_findings(overrides: dict[str, int] | None, names: tuple[str, ...], drawn: dict[str, bool],
                     family: str) -> dict[str, bool]:
    """Apply a ``findings={name: 0/1}`` override to drawn presences; ``no_finding=1`` clears all."""
    if not overrides:
        return drawn
    if not isinstance(overrides, dict):
        raise TypeError(f"findings for family {family!r} must be a dict name -> 0/1, got {type(overrides).__name__}")
    out = dict(drawn)
    for name, value in overrides.items():
        if name == "no_finding":
            if value:
                out = {k: False for k in out}
            continue
        if name not in names:
            raise ValueError(f"findings: unknown finding {name!r} for family {family!r}; valid: {list(names)}")
        out[name] = bool(value)
    return out

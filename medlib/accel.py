"""The accelerator switches in one place: bf16 autocast, ``torch.compile``, DataLoader workers, pinned memory.

A profile's switches follow from its device. On a GPU every profile runs bf16 autocast (where the GPU has
bf16) and the feature cache loads its batches with the profile's ``num_workers`` DataLoader workers into
pinned memory; the ``gpu`` and ``paper`` profiles also compile the feature-extraction forward and the
diffusion pipeline's UNet with ``torch.compile``. On a CPU every switch is off (plain fp32, eager, batches
read in the main process) - except under a profile of :data:`SWITCHES_ON_CPU` (``gpu-switches``), which
runs the ``gpu`` profile's switches on the CPU, so CI executes every GPU-side path without a GPU: bf16
autocast on the CPU (``torch.autocast("cpu")``, accelerate ``mixed_precision="bf16"``), ``torch.compile``
with inductor's C++ backend, DataLoader workers with ``pin_memory=True``.

Where each switch is read:

- ``bf16``: :func:`medlib.config.autocast_dtype` (feature extraction, segmentation, fine-tuning, the
  diffusion pipeline's ``predict``) and through it :func:`medlib.engine.make_accelerator` (SSL, VAE, LDM).
- ``compile``: :func:`medlib.eval.features.extract_features` and :func:`medlib.diffusion.build.get_ldm`
  (the sampling UNet, :func:`compile_unet`).
- ``num_workers`` / ``pin_memory``: the feature cache's DataLoader (:func:`feature_loader`).

A notebook activates its profile's switches with ``p.resolved_device()``; library code reads them with
:func:`active_switches`; tests scope them with :func:`use`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

#: profiles that run another profile's GPU switches on the CPU: profile -> the profile whose switches it runs
SWITCHES_ON_CPU = {"gpu-switches": "gpu"}
#: profiles that also compile (feature extraction, sampling UNet) when their switches are on
COMPILING_PROFILES = ("gpu", "paper")


@dataclass(frozen=True)
class Switches:
    """What a run turns on beyond plain fp32 eager PyTorch."""

    bf16: bool = False  # bf16 autocast on the CPU too (a GPU gets bf16 from autocast_dtype whenever it has it)
    compile: bool = False  # torch.compile the feature-extraction forward and the sampling UNet
    num_workers: int = 0  # DataLoader workers of the feature cache
    pin_memory: bool = False  # page-locked host batches (on a machine without an accelerator torch skips pinning)
    # torch.compile's shapes. Static (False) for feature extraction, which pads its last batch to the full batch so
    # one graph serves all batches; measured on this project's 2-core CPU: dynamic=True compiled ViT-S/14 in 64 s
    # but EfficientNet-Lite0 ran past 400 s, automatic (None) recompiled EfficientNet for the last batch (+100 s).
    # The sampling UNet sees many batch sizes (guidance doubles them): automatic dynamic, one recompile.
    dynamic: bool = False

    @property
    def any(self) -> bool:
        return self.bf16 or self.compile or self.num_workers > 0 or self.pin_memory


_OFF = Switches()
_active: Switches = _OFF


def resolve_device(device: str = "auto") -> str:
    """Map "auto" to "cuda" when a GPU is present, else "cpu"; validate explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Device {device!r} requested but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return device


def switches_for(profile: Any, device: str | None = None) -> Switches:
    """The switches a profile (a ``medlib.config.Profile``) runs on ``device`` (default: its resolved device)."""
    if isinstance(profile, str):
        raise TypeError(f"switches_for takes a Profile, not the name {profile!r}: "
                        "pass medlib.config.get_profile(name).")
    p = profile
    device = resolve_device(device or p.device)
    source = SWITCHES_ON_CPU.get(p.name)
    if source is None and not device.startswith("cuda"):
        return _OFF
    compiles = (source or p.name) in COMPILING_PROFILES
    return Switches(bf16=source is not None, compile=compiles, num_workers=int(p.num_workers), pin_memory=True)


def activate(profile: Any, device: str | None = None) -> Switches:
    """Make ``profile``'s switches the process's active ones (a notebook's ``p.resolved_device()`` calls this)."""
    global _active
    _active = switches_for(profile, device)
    return _active


def active_switches() -> Switches:
    """The switches of the profile activated last in this process (all off before any)."""
    return _active


@contextlib.contextmanager
def use(switches: Switches | Any) -> Iterator[Switches]:
    """Run the block under ``switches`` (or a profile's), restoring the previous ones after."""
    global _active
    previous = _active
    _active = switches if isinstance(switches, Switches) else switches_for(switches)
    try:
        yield _active
    finally:
        _active = previous


def compile_module(fn: Any, switches: Switches | None = None) -> Any:
    """``torch.compile(fn)`` when the switches say so (``dynamic`` as they say), else ``fn`` unchanged."""
    s = active_switches() if switches is None else switches
    if not s.compile:
        return fn
    return torch.compile(fn, dynamic=s.dynamic)


def compile_unet(pipe: Any, switches: Switches | None = None) -> bool:
    """Compile ``pipe.unet`` in place (``nn.Module.compile``) when the switches say so; True when compiled."""
    s = active_switches() if switches is None else switches
    if not s.compile or getattr(pipe.unet, "_compiled_call_impl", None) is not None:
        return False
    pipe.unet.compile(dynamic=None)  # automatic dynamic shapes: static first, the batch dim dynamic on a new size
    return True


def loader_kwargs(device: str, switches: Switches | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for ``device`` under the switches: workers, pinning, prefetching."""
    s = active_switches() if switches is None else switches
    kwargs: dict[str, Any] = {"num_workers": int(s.num_workers), "pin_memory": bool(s.pin_memory)}
    if s.num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=2)
    return kwargs


def feature_loader(images: Any, batch_size: int, device: str, switches: Switches | None = None) -> DataLoader:
    """A DataLoader of uint8 batches of ``images`` (N, H, W[, C]), in order, with the switches' workers / pinning.

    On a CUDA device batches arrive in page-locked memory (``pin_memory``); on a machine without an
    accelerator torch's DataLoader skips pinning with a warning, which :func:`quiet_pinning` silences.
    """
    return DataLoader(_Batches(images, batch_size), batch_size=None, shuffle=False, **loader_kwargs(device, switches))


class _Batches(Dataset):
    """Batch ``i`` of an array, as a writable tensor copy (memory-mapped arrays are not writable)."""

    def __init__(self, images: Any, batch_size: int) -> None:
        self.images, self.batch_size = images, int(batch_size)

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.batch_size
        return torch.from_numpy(np.array(self.images[start:start + self.batch_size]))


@contextlib.contextmanager
def quiet_pinning() -> Iterator[None]:
    """Silence torch's 'pin_memory ... no accelerator' warning (the flag matters on a GPU, is a no-op here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")
        yield


__all__ = ["COMPILING_PROFILES", "SWITCHES_ON_CPU", "Switches", "activate", "active_switches", "compile_module",
           "compile_unet", "feature_loader", "loader_kwargs", "quiet_pinning", "switches_for", "use"]

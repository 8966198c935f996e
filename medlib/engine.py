"""One training-loop helper for SSL, fine-tuning and diffusion: accelerate, bf16, checkpoint / resume, progress.

- :func:`make_accelerator` builds an ``accelerate.Accelerator`` for a device string; the same loop then
  runs unchanged under ``accelerate launch --multi_gpu`` (DDP), with bf16 autocast on GPUs that have it.
- :class:`Checkpointer` keeps one "latest" checkpoint per run folder, written atomically and read back
  with ``torch.load(weights_only=True)``: only tensors and plain Python values, never arbitrary pickles.
- :func:`equal_step_epochs` gives a smaller training set as many optimiser steps as the full one had.
- :func:`derive_seed` makes per-step seeds a pure function of ``(seed, step, rank, ...)``, so a resumed
  run draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .cache import atomic_path
from .config import autocast_dtype, resolve_device, seed_everything

_PLAIN = (int, float, bool, str, type(None))


def set_seed_all(seed: int, deterministic: bool = False) -> np.random.Generator:
    """Seed python, numpy and torch (all devices); optionally ask torch for deterministic kernels."""
    rng = seed_everything(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return rng


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (e.g. ``derive_seed(seed, step, rank)``)."""
    ints = [int(p) if not isinstance(p, str) else int.from_bytes(p.encode()[:8].ljust(8, b"\0"), "little")
            for p in parts]
    if any(i < 0 for i in ints):
        raise ValueError(f"derive_seed needs non-negative parts, got {parts}.")
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def equal_step_epochs(n_images: int, n_train: int, batch_size: int, epochs: int) -> int:
    """Epochs that give ``n_images`` training images as many optimiser steps as ``epochs`` over ``n_train`` images."""
    if min(n_images, n_train, batch_size, epochs) < 1:
        raise ValueError(f"equal_step_epochs needs positive sizes, got n_images={n_images}, n_train={n_train}, "
                         f"batch_size={batch_size}, epochs={epochs}")
    steps = epochs * int(np.ceil(n_train / batch_size))
    return int(np.ceil(steps / np.ceil(n_images / batch_size)))


def make_accelerator(device: str = "auto", mixed_precision: str = "auto", **kwargs: Any):
    """An ``accelerate.Accelerator`` on ``device`` ("auto", "cpu", "cuda"); bf16 on capable GPUs when "auto".

    In a single process a fresh accelerator is built every call (so a notebook can switch devices);
    under ``accelerate launch`` the launcher's distributed set-up is kept and the device is per rank.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if device.startswith("cuda:"):
        raise ValueError(f"device={device!r}: pick the GPU with CUDA_VISIBLE_DEVICES and pass device='cuda'.")
    resolved = resolve_device(device)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if autocast_dtype(resolved) is not None else "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}; choose 'auto', 'no', 'bf16' or 'fp16'.")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=resolved == "cpu", mixed_precision=mixed_precision, **kwargs)


def _interactive() -> bool:
    """True in a terminal or a Jupyter kernel; ``MEDLIB_PROGRESS=0/1`` overrides."""
    flag = os.environ.get("MEDLIB_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    in_kernel = "ipykernel" in sys.modules
    return in_kernel or bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable: Iterable | None = None, *, enabled: bool | None = None, **kwargs: Any):
    """A ``tqdm.auto`` bar, shown in terminals and notebooks, hidden in logs or when ``enabled=False``."""
    from tqdm.auto import tqdm

    show = _interactive() if enabled is None else (enabled and _interactive())
    return tqdm(iterable, disable=not show, **kwargs)


def _check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"Checkpoint key {key!r} at {where} must be str or int.")
            _check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"Checkpoint value at {where} has type {type(obj).__name__}; only tensors, numbers, "
                    "strings, None, lists, tuples and dicts can be saved (convert it first).")


def _brief(err: Exception) -> str:
    """The exception's type and the start of its first line (torch's unpickling errors are pages long)."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:120]}"


class Checkpointer:
    """The latest checkpoint of one run folder: atomic save, safe (``weights_only``) load."""

    def __init__(self, out_dir: str | Path, name: str = "checkpoint.pt") -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / name

    def exists(self) -> bool:
        """Whether a checkpoint has been written."""
        return self.path.is_file()

    def save(self, state: Mapping[str, Any]) -> Path:
        """Write ``state`` (tensors and plain values only) atomically; readers never see half a file."""
        _check_plain(state)
        with atomic_path(self.path) as tmp:
            torch.save(dict(state), tmp)
        return self.path

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """The saved state, or None when there is none; a clear error when the file is unreadable."""
        if not self.exists():
            return None
        try:
            return torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file and the fix
            raise RuntimeError(f"Checkpoint {self.path} cannot be loaded safely ({_brief(err)}). It is truncated "
                               "or was not written by medlib; delete it to start the run over.") from err

    def clear(self) -> None:
        """Delete the checkpoint (start the next run from scratch)."""
        if self.exists():
            self.path.unlink()


def save_weights(state: Mapping[str, torch.Tensor] | torch.nn.Module, path: str | Path,
                 dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Save a state dict (or a module's) as safetensors, atomically, optionally cast to ``dtype`` (floats only)."""
    from safetensors.torch import save_file

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or from .pt / .pth / .bin with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {path} does not exist; check the path (offline: nothing is downloaded).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file and the fix
        raise RuntimeError(f"{path} is not a plain state dict readable with weights_only=True ({_brief(err)}). "
                           "Convert it to safetensors with a trusted tool.") from err
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat name -> tensor state dict.")
    return state

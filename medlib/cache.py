"""Content-hash keyed artifacts, atomic writes and provenance records."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .config import cache_dir, repo_root


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-serialisable object (dict keys sorted): the same input, the same key."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    raise TypeError(f"Cannot hash object of type {type(obj).__name__}")


def file_hash(path: str | Path, length: int = 16) -> str:
    """sha256 of a file's bytes (streamed), truncated to ``length`` hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def array_fingerprint(array: np.ndarray, length: int = 16) -> str:
    """sha256 of an array's shape, dtype and bytes: a data fingerprint for provenance."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:length]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600 files; publish with the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Write an array as .npy atomically (readers never see a half-written file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return path


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Load a cached .npy, memory-mapped by default."""
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def save_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically with sorted keys and indentation."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    return path


def artifact_dir(kind: str, key: Any) -> Path:
    """``<cache>/<kind>/<hash(key)>``: the folder for one cached artifact."""
    return cache_dir() / kind / stable_hash(key)


def git_commit() -> str:
    """The current git commit (with ``+dirty`` when the tree has changes), or ``unknown``."""
    try:
        root = repo_root()
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty and commit else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: tuple[str, ...] = ("torch", "timm", "numpy", "scikit-learn", "diffusers", "peft",
                                                "accelerate", "pydicom", "scikit-image")) -> dict[str, str]:
    """Installed versions of the packages that shape the numbers."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _lock_hash() -> str:
    from .lock import lock_hash

    return lock_hash()


def provenance(profile: Any = None, seed: int | None = None, data_fingerprint: str | None = None,
               wall_time_s: float | None = None, **extra: Any) -> dict[str, Any]:
    """A provenance record: commit, profile, seed, package versions, lock hash, data fingerprint, wall time, machine."""
    record: dict[str, Any] = {
        "git_commit": git_commit(),
        "profile": getattr(profile, "name", profile),
        "seed": seed if seed is not None else getattr(profile, "seed", None),
        "packages": package_versions(),
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "lock": _lock_hash(),
    }
    if data_fingerprint is not None:
        record["data_fingerprint"] = data_fingerprint
    if wall_time_s is not None:
        record["wall_time_s"] = round(float(wall_time_s), 3)
    record.update(extra)
    return record

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


_FILE_HASHES: dict[tuple, str] = {}


def file_hash(path: str | Path, length: int = 16) -> str:
    """sha256 of a file's bytes (streamed), truncated to ``length`` hex digits.

    Remembered per process for a file whose path, size, inode and modification time are unchanged
    (study 3 fingerprints the same weights file for every fold run; a 100 MB checkpoint takes a
    noticeable fraction of a second to hash).
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns)
    full = _FILE_HASHES.get(key)
    if full is None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        full = _FILE_HASHES[key] = digest.hexdigest()
    return full[:length]


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


class CorruptCacheError(RuntimeError):
    """A cached file that fails its recorded checksum, shape or dtype, or cannot be read; names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cache entry {self.path} is damaged ({reason}); it is rebuilt when the code that "
                         f"made it runs again (or delete it; `python -m medlib.cache verify` checks a whole cache)")


CHECK_SUFFIX = ".check.json"
_VERIFIED: dict[tuple[str, int, int], bool] = {}  # (path, mtime_ns, size) already verified in this process


def _check_path(path: Path) -> Path:
    return path.with_name(path.name + CHECK_SUFFIX)


def _npy_header(path: Path) -> tuple[list[int], str] | None:
    """(shape, dtype) from a .npy header, or None when the header cannot be read."""
    try:
        with open(path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
        return list(shape), np.dtype(dtype).str
    except (ValueError, OSError, EOFError):
        return None


def record_checksum(path: str | Path) -> Path:
    """Write ``<file>.check.json`` beside a cache file: sha256, size, and shape / dtype for .npy files."""
    path = Path(path)
    record: dict[str, Any] = {"sha256": file_hash(path, length=64), "bytes": path.stat().st_size}
    if path.suffix == ".npy":
        header = _npy_header(path)
        if header is not None:
            record["shape"], record["dtype"] = header
    target = _check_path(path)
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True))
    stat = path.stat()
    _VERIFIED[(str(path), stat.st_mtime_ns, stat.st_size)] = True
    return target


def verify_file(path: str | Path) -> None:
    """Check a cache file against its recorded checksum; raise :class:`CorruptCacheError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CorruptCacheError(path, "missing")
    stat = path.stat()
    memo = (str(path), stat.st_mtime_ns, stat.st_size)
    if _VERIFIED.get(memo):
        return
    check = _check_path(path)
    if not check.is_file():
        raise CorruptCacheError(path, "no checksum was recorded when it was written")
    try:
        record = json.loads(check.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise CorruptCacheError(path, f"its checksum record {check.name} is unreadable: {err}") from err
    if stat.st_size != record.get("bytes"):
        raise CorruptCacheError(path, f"{stat.st_size} bytes, {record.get('bytes')} when written (truncated?)")
    if path.suffix == ".npy" and "shape" in record:
        header = _npy_header(path)
        if header is None or header != (record["shape"], record["dtype"]):
            raise CorruptCacheError(path, f"array header {header} differs from the recorded "
                                          f"{(record['shape'], record['dtype'])}")
    if file_hash(path, length=64) != record.get("sha256"):
        raise CorruptCacheError(path, "its contents changed since it was written (checksum mismatch)")
    _VERIFIED[memo] = True


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    """Write an array as .npy atomically (readers never see a half-written file), with its checksum record."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    record_checksum(path)
    return path


def load_npy(path: str | Path, mmap: bool = True, verify: bool = True) -> np.ndarray:
    """Load a cached .npy (memory-mapped by default) after checking it against its checksum record."""
    if verify:
        verify_file(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise CorruptCacheError(path, f"unreadable as .npy: {err}") from err


def save_json(path: str | Path, obj: Any, checksum: bool = False) -> Path:
    """Write JSON atomically with sorted keys and indentation (``checksum``: with a checksum record)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
    if checksum:
        record_checksum(path)
    return path


def load_json(path: str | Path, verify: bool = True) -> Any:
    """Read a cached JSON file (checked against its checksum record when ``verify``); damage names the file."""
    if verify:
        verify_file(path)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CorruptCacheError(path, f"unreadable as JSON: {err}") from err


def discard_entry(folder: str | Path, err: CorruptCacheError | None = None) -> None:
    """Delete one damaged cache entry (a folder under the cache), saying which file was damaged."""
    import shutil
    import warnings

    folder = Path(folder)
    root = cache_dir().resolve()
    if root not in folder.resolve().parents:
        raise ValueError(f"discard_entry: {folder} is not inside the cache {root}; refusing to delete it")
    if err is not None:
        warnings.warn(f"{err.path}: {err.reason}; rebuilding {folder.name}", stacklevel=2)
    shutil.rmtree(folder, ignore_errors=True)


def verify_cache(root: str | Path | None = None) -> list[tuple[Path, str]]:
    """(file, problem) for every damaged file under the cache: a checksum, size or header mismatch, or a
    cached .npy / JSON file written without a checksum record (checksum records themselves are skipped)."""
    root = Path(root) if root is not None else cache_dir()
    problems = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(CHECK_SUFFIX) or path.name.startswith("."):
            continue
        if not (_check_path(path).is_file() or path.suffix == ".npy"):
            continue  # files written without checksums by design (checkpoints, logs, provenance)
        try:
            verify_file(path)
        except CorruptCacheError as err:
            problems.append((path, err.reason))
    return problems


@contextmanager
def entry_lock(folder: str | Path, timeout_s: float = 6 * 3600) -> Iterator[None]:
    """Hold an exclusive file lock for one cache entry: a second process that wants the same entry waits
    here while the first builds it, then finds it built. Locks are advisory (``fcntl.flock``) and released
    by the OS if the holder dies; without ``fcntl`` (Windows) this does nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    with open(lock_path, "a+") as fh:
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"waited {timeout_s:.0f} s for another process building {folder}")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def artifact_dir(kind: str, key: Any) -> Path:
    """``<cache>/<kind>/<hash(key)>``: the folder for one cached artifact."""
    return cache_dir() / kind / stable_hash(key)


#: Tracked folders that runs write into: changes there are results, not code, and do not make a commit dirty.
RUN_OUTPUTS = ("reports", "figures")


def git_commit() -> str:
    """The current git commit (``+dirty`` when code, not run outputs, has uncommitted changes), or ``unknown``."""
    try:
        root = repo_root()
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){out}" for out in RUN_OUTPUTS)], cwd=root,
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


def settings_fields() -> dict[str, Any]:
    """What provenance records add about the data file and the overrides in force ({} when none)."""
    from .settings import active_settings

    settings = active_settings()
    if not settings.active:
        return {}
    out: dict[str, Any] = {"overrides": {k: str(v) for k, v in settings.overrides.items()}}
    if settings.data_file is not None:
        out["data_file"] = str(settings.data_file)
        try:
            out["data_file_sha256"] = hashlib.sha256(settings.data_file.read_bytes()).hexdigest()
        except OSError:
            out["data_file_sha256"] = None
    return out


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
    record.update(settings_fields())  # the data file and overrides in force (none: nothing added)
    if data_fingerprint is not None:
        record["data_fingerprint"] = data_fingerprint
    if wall_time_s is not None:
        record["wall_time_s"] = round(float(wall_time_s), 3)
    record.update(extra)
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m medlib.cache verify [--repair]``: check every cached file; ``--repair`` deletes damaged entries."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medlib.cache", description=main.__doc__)
    parser.add_argument("command", choices=("verify",))
    parser.add_argument("--repair", action="store_true", help="delete each damaged entry (its folder)")
    args = parser.parse_args(argv)
    root = cache_dir()
    problems = verify_cache(root)
    for path, reason in problems:
        print(f"DAMAGED {path}: {reason}")
        if args.repair:
            parts = path.relative_to(root).parts
            if len(parts) >= 3:  # <cache>/<kind>/<key>/...: the whole entry goes
                discard_entry(root / parts[0] / parts[1])
                print(f"  removed {root / parts[0] / parts[1]}; the next run rebuilds it")
            else:
                path.unlink(missing_ok=True)
                _check_path(path).unlink(missing_ok=True)
                print(f"  removed {path}; the next run rebuilds it")
    print(f"{len(problems)} damaged file(s) under {root}")
    return 1 if problems and not args.repair else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Build image arrays chunk by chunk (optionally in worker processes) and cache them on disk.

Used by the phantom families and the natural-image stand-in. A cached artifact is a folder
``medlib.cache.artifact_dir(kind, key)`` holding one ``.npy`` per array (written through
``medlib.cache.atomic_path``: a reader never sees a half-written file) and ``meta.json`` (written
last, with ``medlib.cache.save_json``; its presence marks the artifact complete). Arrays are
memory-mapped when loaded.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ...cache import (CorruptCacheError, artifact_dir, atomic_path, discard_entry, entry_lock, load_json,
                      load_npy, record_checksum, save_json)

Layout = dict[str, tuple[tuple[int, ...], Any]]  # array name -> (per-item shape, dtype)


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """Split 0..n into contiguous (start, stop) chunks: small enough to balance the workers."""
    size = int(max(1, min(256, -(-n // (workers * 4)))))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _run(fn: Callable[[int, int], dict[str, Any]], n: int, workers: int, progress: bool, desc: str
         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (start, result) for every chunk in order, computed in this process or in ``workers`` processes."""
    from tqdm.auto import tqdm

    chunks = _chunks(n, workers)
    with tqdm(total=n, desc=desc, disable=not progress, leave=False) as bar:
        if workers <= 1:
            for start, stop in chunks:
                yield start, fn(start, stop)
                bar.update(stop - start)
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(fn, start, stop) for start, stop in chunks]
            for (start, stop), future in zip(chunks, futures):
                yield start, future.result()
                bar.update(stop - start)


@contextmanager
def _outputs(folder: Path | None, n: int, layout: Layout) -> Iterator[dict[str, np.ndarray]]:
    """Arrays to fill: memory maps written atomically into ``folder``, or plain arrays when not caching."""
    if folder is None:
        yield {k: np.empty((n,) + shape, dtype=dtype) for k, (shape, dtype) in layout.items()}
        return
    with ExitStack() as stack:
        paths = {k: stack.enter_context(atomic_path(folder / f"{k}.npy")) for k in layout}
        arrays = {k: np.lib.format.open_memmap(paths[k], mode="w+", dtype=dtype, shape=(n,) + shape)
                  for k, (shape, dtype) in layout.items()}
        yield arrays
        for array in arrays.values():
            array.flush()
        arrays.clear()
    for k in layout:  # renamed into place: record what was written
        record_checksum(folder / f"{k}.npy")


def _columns(per_item: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-item metadata dicts -> one array per key (keys of the first item)."""
    if not per_item:
        return {}
    return {key: np.asarray([m[key] for m in per_item]) for key in per_item[0]}


def _load(folder: Path, layout: Layout) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load a complete cached artifact: memory-mapped arrays and the metadata with typed columns."""
    meta = load_json(folder / "meta.json")
    arrays = {k: load_npy(folder / f"{k}.npy", mmap=True) for k in layout}
    meta["per_image"] = {k: np.asarray(v, dtype=meta["dtypes"][k]) for k, v in meta["per_image"].items()}
    meta["cache_dir"] = str(folder)
    return arrays, meta


def build_cached(kind: str, key: dict[str, Any] | None, n: int, fn: Callable[[int, int], dict[str, Any]],
                 layout: Layout, workers: int = 1, progress: bool = False, desc: str = ""
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays of ``n`` items made by ``fn(start, stop)`` chunk by chunk, cached under ``artifact_dir(kind, key)``.

    ``fn`` returns a dict with one stacked array per ``layout`` entry, ``"patient_ids"`` (list of str)
    and ``"meta"`` (list of per-item dicts of scalars or small arrays). ``key=None`` disables the cache.
    Returns (arrays, meta) where ``meta["per_image"]`` maps each metadata key (and ``patient_ids``) to an
    array with one row per item.
    """
    folder = artifact_dir(kind, key) if key is not None else None
    if folder is None:
        return _build(None, key, n, fn, layout, workers, progress, desc)
    with entry_lock(folder):  # a second process waits for this entry, then reuses it
        if (folder / "meta.json").exists():
            try:
                return _load(folder, layout)
            except CorruptCacheError as err:
                discard_entry(folder, err)
        return _build(folder, key, n, fn, layout, workers, progress, desc)


def _build(folder: Path | None, key: dict[str, Any] | None, n: int, fn: Callable[[int, int], dict[str, Any]],
           layout: Layout, workers: int, progress: bool, desc: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Make the ``n`` items chunk by chunk into ``folder`` (or memory when None) and load them back."""
    ids: list[str] = []
    per_item: list[dict[str, Any]] = []
    with _outputs(folder, n, layout) as arrays:
        for start, result in _run(fn, n, workers, progress, desc):
            stop = start + len(result["patient_ids"])
            for name in layout:
                arrays[name][start:stop] = result[name]
            ids.extend(result["patient_ids"])
            per_item.extend(result["meta"])
        if folder is None:
            columns = {"patient_ids": np.asarray(ids), **_columns(per_item)}
            return dict(arrays), {"per_image": columns, "cache_dir": None}
    columns = {"patient_ids": np.asarray(ids), **_columns(per_item)}
    save_json(folder / "meta.json", checksum=True,
              obj={"key": key, "n": n, "per_image": {k: v.tolist() for k, v in columns.items()},
                   "dtypes": {k: v.dtype.str for k, v in columns.items()}})
    return _load(folder, layout)

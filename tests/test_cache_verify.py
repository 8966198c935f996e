"""Damaged cache entries are detected (naming the file) and rebuilt, whatever the damage."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from medlib import cache
from medlib.data import phantoms


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path / "cache"))
    cache._VERIFIED.clear()
    return tmp_path / "cache"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"\x00garbage\xff" * 10)


def _plausible(path):  # same size and header, plausible values: only the checksum can tell
    array = np.load(path)
    changed = array.copy()
    changed.flat[: max(1, changed.size // 2)] = 0
    with open(path, "r+b") as fh:
        offset = len(path.read_bytes()) - changed.nbytes
        fh.seek(offset)
        fh.write(np.ascontiguousarray(changed).tobytes())


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "plausible wrong values": _plausible}


@pytest.mark.parametrize("damage", DAMAGE)
def test_load_npy_names_the_damaged_file(cache_root, damage):
    path = cache.save_npy(cache_root / "x" / "a.npy", np.arange(100, dtype=np.float32).reshape(10, 10))
    assert np.array_equal(cache.load_npy(path), np.arange(100, dtype=np.float32).reshape(10, 10))
    DAMAGE[damage](path)
    cache._VERIFIED.clear()
    with pytest.raises(cache.CorruptCacheError) as info:
        cache.load_npy(path)
    assert info.value.path == path and str(path) in str(info.value)


def test_json_garbage_and_a_missing_record_are_damage(cache_root):
    path = cache.save_json(cache_root / "x" / "run.json", {"a": 1}, checksum=True)
    assert cache.load_json(path) == {"a": 1}
    path.write_text("{not json")
    cache._VERIFIED.clear()
    with pytest.raises(cache.CorruptCacheError, match="run.json"):
        cache.load_json(path)
    bare = cache_root / "x" / "old.npy"
    np.save(bare, np.zeros(3))
    with pytest.raises(cache.CorruptCacheError, match="no checksum"):
        cache.load_npy(bare)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_phantom_set_is_rebuilt_and_the_run_goes_on(cache_root, damage):
    first = phantoms.make_dataset("cxr", 12, size=64, seed=5)
    images = np.array(first.images)
    folder = next((cache_root / "phantoms").rglob("images.npy")).parent
    DAMAGE[damage](folder / "images.npy")
    cache._VERIFIED.clear()
    assert [str(p) for p, _ in cache.verify_cache(cache_root)] == [str(folder / "images.npy")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = phantoms.make_dataset("cxr", 12, size=64, seed=5)
    assert np.array_equal(np.asarray(again.images), images)
    assert any("images.npy" in str(w.message) for w in caught)
    assert cache.verify_cache(cache_root) == []


def test_damaged_features_are_extracted_again(cache_root):
    from medlib.eval.features import extract_features

    ds = phantoms.make_dataset("cxr", 8, size=64, seed=1)
    first = extract_features("random-vit-tiny", ds, image_size=32, device="cpu")
    cls_file = next((cache_root / "features").rglob("cls.npy"))
    _plausible(cls_file)
    cache._VERIFIED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = extract_features("random-vit-tiny", ds, image_size=32, device="cpu")
    assert again.info["cache_hit"] is False
    assert np.allclose(np.asarray(again.cls), np.asarray(first.cls))


def test_cache_verify_command_reports_and_repairs(cache_root, capsys):
    path = cache.save_npy(cache_root / "kind" / "key" / "a.npy", np.ones(4))
    assert cache.main(["verify"]) == 0
    _garbage(path)
    cache._VERIFIED.clear()
    assert cache.main(["verify"]) == 1
    assert f"DAMAGED {path}" in capsys.readouterr().out
    assert cache.main(["verify", "--repair"]) == 0
    assert not (cache_root / "kind" / "key").exists()


def test_discard_entry_refuses_paths_outside_the_cache(cache_root, tmp_path):
    with pytest.raises(ValueError, match="not inside the cache"):
        cache.discard_entry(tmp_path / "elsewhere")
    assert json  # noqa: keep the import for readers who extend the damage kinds


def _build_in_child(args):
    import os

    root, seed = args
    os.environ["MEDLIB_CACHE"] = root
    from medlib.data import phantoms as ph

    return np.asarray(ph.make_dataset("knee", 6, size=64, seed=seed).images).sum()


def test_two_processes_build_one_entry_once(cache_root):
    import multiprocessing

    from medlib import cache as C

    with C.entry_lock(cache_root / "kind" / "entry"):
        pass  # the lock can be taken and released
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        sums = pool.map(_build_in_child, [(str(cache_root), 3), (str(cache_root), 3)])
    assert sums[0] == sums[1]
    entries = [p for p in (cache_root / "phantoms").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 1 and not list((cache_root / "phantoms").glob(".*.npy*"))  # no half-written leftovers

"""Content-hash keys, atomic writes, memory-mapped reloads and provenance records."""

import json

import numpy as np
import pytest

from medlib.cache import (array_fingerprint, artifact_dir, atomic_path, file_hash, load_npy, provenance, save_json,
                          save_npy, stable_hash)


def test_stable_hash_ignores_key_order_and_sees_values():
    assert stable_hash({"a": 1, "b": (2, 3)}) == stable_hash({"b": [2, 3], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash("x", length=10)) == 10


def test_stable_hash_rejects_unhashable_objects():
    with pytest.raises(TypeError, match="Cannot hash"):
        stable_hash({"f": object()})


def test_npy_round_trip_is_memory_mapped(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = save_npy(tmp_path / "a.npy", arr)
    back = load_npy(path)
    assert isinstance(back, np.memmap) and np.array_equal(back, arr)
    assert not list(tmp_path.glob(".a.npy*")), "temporary files must not be left behind"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_fingerprints_change_with_content(tmp_path):
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    b[0, 0] = 1
    assert array_fingerprint(a) != array_fingerprint(b)
    assert array_fingerprint(a) == array_fingerprint(a.copy())
    (tmp_path / "f").write_bytes(b"abc")
    assert file_hash(tmp_path / "f") == "ba7816bf8f01cfea"  # sha256("abc")


def test_artifact_dir_uses_the_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    d = artifact_dir("phantoms", {"n": 3})
    assert d.parent == tmp_path / "phantoms" and d.name == stable_hash({"n": 3})


def test_provenance_record_has_the_required_fields(tmp_path):
    rec = provenance(profile="smoke", seed=1, data_fingerprint="abc", wall_time_s=1.23456)
    for key in ("git_commit", "profile", "seed", "packages", "machine", "data_fingerprint", "wall_time_s"):
        assert key in rec
    assert rec["wall_time_s"] == 1.235 and rec["packages"]["numpy"] == np.__version__
    save_json(tmp_path / "p.json", rec)
    assert json.loads((tmp_path / "p.json").read_text())["profile"] == "smoke"


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    path = save_npy(tmp_path / "p.npy", np.zeros(2, np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_git_commit_is_dirty_for_code_changes_not_for_run_outputs(tmp_path, monkeypatch):
    import subprocess

    from medlib import cache

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.json").write_text("1")
    (tmp_path / "code.py").write_text("x = 1")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(cache, "repo_root", lambda: tmp_path)
    assert not cache.git_commit().endswith("+dirty")
    (tmp_path / "figures" / "a.json").write_text("2")  # a run rewrote a tracked figure record
    assert not cache.git_commit().endswith("+dirty")
    (tmp_path / "code.py").write_text("x = 2")
    assert cache.git_commit().endswith("+dirty")

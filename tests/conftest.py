"""Shared test set-up: an isolated cache, one torch thread per worker, headless matplotlib."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# Under `pytest -n N` each worker gets one core: the notebook kernels and builds the tests start inherit one
# OpenMP thread too, since two processes spinning two threads each on two cores run many times slower.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point MEDLIB_CACHE at a per-session temp folder so tests never touch the user's cache."""
    cache = tmp_path_factory.mktemp("medlib-cache")
    old = os.environ.get("MEDLIB_CACHE")
    os.environ["MEDLIB_CACHE"] = str(cache)
    import torch

    torch.set_num_threads(1)
    yield cache
    if old is None:
        os.environ.pop("MEDLIB_CACHE", None)
    else:
        os.environ["MEDLIB_CACHE"] = old


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is visible (never fake them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""medlib.engine: safe atomic checkpoints, weights files, seeds, accelerator and progress."""

from __future__ import annotations

import pytest
import torch

from medlib.engine import (
    Checkpointer, derive_seed, load_weights, make_accelerator, progress, save_weights, set_seed_all,
)


class _Custom:
    """An object that must not be written into a weights_only checkpoint."""


def test_checkpointer_roundtrip_plain_state(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    assert ckpt.load() is None and not ckpt.exists()
    state = {"step": 7, "lr": 0.5, "name": "dino", "none": None, "flags": [True, False],
             "model": {"w": torch.arange(6.0).view(2, 3)}, "history": [{"loss": 1.5, "collapse": ""}],
             "betas": (0.9, 0.999)}
    path = ckpt.save(state)
    assert path == tmp_path / "run" / "checkpoint.pt" and ckpt.exists()
    loaded = ckpt.load()
    assert loaded["step"] == 7 and loaded["name"] == "dino" and loaded["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["history"] == [{"loss": 1.5, "collapse": ""}]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint.pt"]  # no temp files left behind


def test_checkpointer_rejects_objects_and_keeps_previous_file(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save({"step": 1})
    with pytest.raises(TypeError, match=r"state\['extra'\]\[0\].*_Custom"):
        ckpt.save({"step": 2, "extra": [_Custom()]})
    assert ckpt.load() == {"step": 1}
    ckpt.clear()
    assert not ckpt.exists()


def test_checkpointer_refuses_pickled_objects_and_truncated_files(tmp_path):
    ckpt = Checkpointer(tmp_path)
    torch.save({"obj": _Custom()}, ckpt.path)
    with pytest.raises(RuntimeError, match="cannot be loaded safely.*delete it"):
        ckpt.load()
    ckpt.save({"w": torch.ones(100)})
    ckpt.path.write_bytes(ckpt.path.read_bytes()[:50])
    with pytest.raises(RuntimeError, match=str(ckpt.path)):
        ckpt.load()


def test_save_and_load_weights(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = save_weights(model, tmp_path / "w.safetensors", dtype=torch.float16, metadata={"steps": "5"})
    state = load_weights(path)
    assert state["weight"].dtype == torch.float16
    assert torch.allclose(state["weight"].float(), model.weight, atol=1e-3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    assert torch.equal(load_weights(tmp_path / "w.pt")["bias"], model.bias.detach())
    torch.save({"model": _Custom()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="weights_only"):
        load_weights(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(tmp_path / "missing.safetensors")


def test_derive_seed_is_pure_and_spreads():
    assert derive_seed(0, 5, 1) == derive_seed(0, 5, 1)
    seeds = {derive_seed(0, step, rank) for step in range(50) for rank in range(2)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 5) != derive_seed(5, 1)
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1)


def test_set_seed_all_reproduces_draws():
    set_seed_all(3)
    a = torch.rand(4)
    rng = set_seed_all(3)
    assert torch.equal(a, torch.rand(4)) and rng.integers(0, 10**6) == set_seed_all(3).integers(0, 10**6)


def test_make_accelerator_cpu_and_bad_arguments():
    acc = make_accelerator("cpu")
    assert acc.device.type == "cpu" and acc.mixed_precision == "no" and acc.num_processes == 1
    acc_bf16 = make_accelerator("cpu", "bf16")
    assert acc_bf16.mixed_precision == "bf16"
    assert make_accelerator("cpu", "no").mixed_precision == "no"  # a fresh state each call in one process
    with pytest.raises(ValueError, match="mixed_precision"):
        make_accelerator("cpu", "fp8")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        make_accelerator("cuda:1")


def test_progress_can_be_silenced(monkeypatch):
    bar = progress(range(5), enabled=False)
    assert bar.disable and list(bar) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("MEDLIB_PROGRESS", "0")
    assert progress(range(2), enabled=True).disable
    monkeypatch.setenv("MEDLIB_PROGRESS", "1")
    assert not progress(range(2)).disable

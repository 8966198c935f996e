"""Profiles: one place for sizes, validated names, overrides, devices and seeding."""

import dataclasses

import numpy as np
import pytest
import torch

from medlib.config import PROFILE_NAMES, get_profile, override, resolve_device, seed_everything


def test_every_profile_exists_and_is_named_after_itself():
    for name in PROFILE_NAMES:
        p = get_profile(name)
        assert p.name == name
        assert p.description


def test_unknown_profile_lists_the_valid_names():
    with pytest.raises(ValueError, match="smoke, tiny, gpu, paper"):
        get_profile("huge")


def test_profiles_grow_from_smoke_to_gpu():
    smoke, tiny, gpu = (get_profile(n) for n in ("smoke", "tiny", "gpu"))
    assert smoke.data.n_per_dataset < tiny.data.n_per_dataset < gpu.data.n_per_dataset
    assert smoke.ssl.steps < tiny.ssl.steps
    assert gpu.backbone.image_size == 224


def test_profiles_are_frozen_and_override_returns_a_copy():
    p = get_profile("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 3  # type: ignore[misc]
    q = override(p, seed=3, **{"ssl.steps": 7})
    assert (q.seed, q.ssl.steps) == (3, 7)
    assert (p.seed, p.ssl.steps) == (0, get_profile("smoke").ssl.steps)


def test_override_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field 'stepz'"):
        override(get_profile("smoke"), **{"ssl.stepz": 1})
    with pytest.raises(ValueError, match="no section"):
        override(get_profile("smoke"), **{"nope.steps": 1})


def test_paper_profile_follows_seed001_continuation_settings():
    ssl = get_profile("paper").ssl
    assert ssl.teacher_momentum == (0.994, 1.0) and ssl.weight_decay == (0.04, 0.2)
    assert ssl.vertical_flip and ssl.centering == "sinkhorn_knopp" and ssl.n_local == 8


def test_seed_everything_is_deterministic():
    seed_everything(5)
    a = (np.random.rand(3), torch.rand(3))
    rng = seed_everything(5)
    b = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert isinstance(rng, np.random.Generator)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_notebook_profile_prefers_the_parameter_then_the_environment(monkeypatch):
    from medlib.config import notebook_profile

    monkeypatch.setenv("MEDLIB_PROFILE", "smoke")
    assert notebook_profile(None).name == "smoke" and notebook_profile("gpu").name == "gpu"
    monkeypatch.delenv("MEDLIB_PROFILE")
    assert notebook_profile(None).name == "tiny"


def test_seeded_torch_rng_is_a_function_of_the_seed_and_restores_the_callers_stream():
    import torch

    from medlib.config import seeded_torch_rng

    torch.manual_seed(99)
    expected_next = torch.rand(2)
    torch.manual_seed(99)
    with seeded_torch_rng(5):
        a = torch.rand(3)
    assert torch.equal(torch.rand(2), expected_next)  # the caller's stream went on as if nothing ran
    with seeded_torch_rng(5):
        assert torch.equal(torch.rand(3), a)
    with seeded_torch_rng(6):
        assert not torch.equal(torch.rand(3), a)


def test_display_path_is_the_same_on_every_machine(tmp_path, monkeypatch):
    from medlib.config import display_path, repo_root

    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path / "somewhere"))
    assert display_path(tmp_path / "somewhere" / "kind" / "a.npy") == "<cache>/kind/a.npy"
    assert display_path(repo_root() / "medlib" / "config.py") == "medlib/config.py"
    assert display_path("/elsewhere/file") == "/elsewhere/file"


def test_patch14_profiles_draw_phantoms_at_a_multiple_of_the_patch():
    """Notebook 01's patch PCA reads the phantoms at data.phantom_size: a ViT-S/14 needs a multiple of 14."""
    for name in PROFILE_NAMES:
        p = get_profile(name)
        if "patch14" in p.backbone.arch:
            assert p.data.phantom_size % 14 == 0, (name, p.data.phantom_size)


def test_display_path_hides_where_packages_are_installed():
    import sysconfig

    from medlib.config import display_path

    inside = f"{sysconfig.get_paths()['purelib']}/somepkg/weights.pth"
    assert display_path(inside) == "<site-packages>/somepkg/weights.pth"

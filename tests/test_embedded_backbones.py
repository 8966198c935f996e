"""Committed embedded backbones: fresh (recipe hash), healthy, honestly named, loadable; the build path runs."""

import json
from pathlib import Path

import pytest
import torch

from medlib.models.build import EMBEDDED_DIR, HEALTH_MARGIN, build, domain_tasks, recipe_hash, split_name

CARDS = sorted(EMBEDDED_DIR.glob("*.json"))

# Committed weights whose health check FAILED when built, kept so the notebooks run, with the failure in
# their cards and the README. SSL backbones from scratch are judged on transfer (mean kNN AUROC gain over random
# init on the three held-out phantom tasks under acquisition shift, averaged over three held-out draws), SSL
# continued on a domain on that domain's held-out task (and a transfer mean above zero), supervised ones on a
# held-out set of their own task.
# strict=True: a rebuild that passes turns these into failures, so the list cannot go stale.
KNOWN_UNHEALTHY: dict[str, str] = {}  # none (ssl-knee: judged on its domain, see the README)


def _health_param(card_path: Path):
    reason = KNOWN_UNHEALTHY.get(card_path.stem)
    marks = [pytest.mark.xfail(strict=True, reason=f"built unhealthy on CPU: {reason}")] if reason else []
    return pytest.param(card_path, marks=marks, id=card_path.stem)


def test_embedded_weights_are_committed():
    assert CARDS, "no embedded backbones committed: run `make backbones` (PROFILE=tiny)"
    total = sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir())
    assert total < 50e6, f"committed weights take {total / 1e6:.1f} MB (> 50 MB)"


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_card_is_fresh_and_honest(card_path: Path):
    card = json.loads(card_path.read_text())
    name = card["name"]
    assert (EMBEDDED_DIR / f"{name}.safetensors").exists()
    assert card["recipe_hash"] == recipe_hash(name, card["profile"]), (
        f"{name} is STALE: its recipe code or settings changed since it was built. "
        f"Rebuild with `python -m medlib.models build {name} --profile {card['profile']}` (or `make backbones`).")
    assert "dinov2" not in name.lower() and card["is_dinov2"] is False
    for key in ("recipe", "training", "device", "wall_time_s", "health", "built_from_commit", "stands_in_for"):
        assert key in card
    assert set(card["health"]["tasks"]) == {"ct_organ", "knee_acl", "breast_us_malignant", "natural_class"}
    assert "transfer_passed" in card["health"]  # the transfer check is recorded for every backbone
    assert card["health"]["criterion_tasks"] == ["ct_organ", "knee_acl", "breast_us_malignant"]
    assert "natural_auroc_gain" in card["health"] and "mean_auroc_gain_all_tasks" in card["health"]
    draws = card["health"]["draws"]  # the SSL verdict averages independent held-out draws
    assert [d["seed"] for d in draws] == [0, 1, 2]
    assert card["health"]["mean_auroc_gain"] == pytest.approx(sum(d["mean_auroc_gain"] for d in draws) / len(draws))
    if card["recipe"]["kind"] == "supervised":  # judged on a held-out set of its own task
        assert card["health"]["own_task"]["task"] == card["training"]["data"]
        assert card["ssl_config"] is None
    else:  # the SSL settings the run really used, not the profile's (a continuation is shorter, flips vertically)
        assert card["ssl_config"]["steps"] == card["training"]["steps"]
        assert card["ssl_config"]["vertical_flip"] is bool(card["recipe"]["init"])


@pytest.mark.parametrize("card_path", [_health_param(c) for c in CARDS])
def test_card_health_check_passed(card_path: Path):
    card = json.loads(card_path.read_text())
    health, recipe = card["health"], card["recipe"]
    if recipe["kind"] == "ssl" and recipe["init"]:  # continued on a domain: judged on that domain's held-out task
        assert health["domain"]["tasks"] == list(domain_tasks(recipe["data"])) != []
        assert health["domain"]["auroc_gain"] == pytest.approx(sum(health["domain"]["per_draw"]) / len(health["draws"]))
        value = health["domain"]["auroc_gain"]
        assert health["passed"] == (value >= HEALTH_MARGIN and health["mean_auroc_gain"] > 0)
    else:
        assert "domain" not in health
        value = health["own_task"]["auroc_gain"] if "own_task" in health else health["mean_auroc_gain"]
        assert health["passed"] == (value >= HEALTH_MARGIN)  # the recorded verdict is the criterion's
    assert health["passed"], f"{card_path.stem} failed its health check: criterion value {value:+.3f}"


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_loads_through_the_same_api_as_real_names(card_path: Path):
    from medlib.models.backbones import create_backbone

    bb = create_backbone(card_path.stem)
    size = bb.image_size
    feats = bb.features(torch.rand(2, 3, size, size), n_last=2)
    assert feats["cls"].shape == (2, bb.embed_dim) and torch.isfinite(feats["cls"]).all()


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.stem)
def test_card_health_is_reproduced_from_the_weights(card_path: Path):
    """Recomputed now from the committed weights (draw 0 only, to keep the test short): the card's numbers hold."""
    from medlib.config import get_profile
    from medlib.models.backbones import create_backbone
    from medlib.models.build import _health

    card = json.loads(card_path.read_text())
    health = _health(card_path.stem, create_backbone(card_path.stem).model, get_profile(card["profile"]), "cpu", draws=1)
    assert health["draws"][0]["mean_auroc_gain"] == pytest.approx(card["health"]["draws"][0]["mean_auroc_gain"],
                                                                  abs=0.01)
    assert health["mean_auroc_gain_unshifted"] == pytest.approx(card["health"]["mean_auroc_gain_unshifted"], abs=0.01)
    if "domain" in card["health"]:  # continued SSL: its domain's task in draw 0
        assert health["domain"]["per_draw"][0] == pytest.approx(card["health"]["domain"]["per_draw"][0], abs=0.01)
    if "own_task" in card["health"]:  # supervised: the verdict is one held-out set of its own task
        assert health["own_task"]["auroc_gain"] == pytest.approx(card["health"]["own_task"]["auroc_gain"], abs=0.01)


@pytest.mark.slow
@pytest.mark.xdist_group("build")
def test_smoke_build_path_writes_loadable_weights_and_cards():
    """`smoke` runs every build path for a few steps: SSL from scratch, supervised, SSL continuation."""
    from medlib.models.backbones import create_backbone

    for name in ("ssl-natural-vit-smoke", "sup-natural-vit-smoke", "ssl-us-vit-smoke"):
        weights = build(name, "smoke", device="cpu", progress=False)
        card = json.loads(weights.with_suffix(".json").read_text())
        assert card["recipe_hash"] == recipe_hash(name, "smoke") and card["training"]
        assert "health" in card and set(card["health"]["tasks"]) == {"ct_organ", "knee_acl", "breast_us_malignant", "natural_class"}
        for scores in card["health"]["tasks"].values():  # the no-network reference sits beside the two networks
            assert set(scores) == {"trained", "random_init", "pixel_statistics"}
            assert 0.0 <= scores["pixel_statistics"]["auroc"] <= 1.0
        bb = create_backbone(name)
        assert bb.features(torch.rand(1, 3, 32, 32))["cls"].shape == (1, 48)
        if name.startswith("ssl-"):  # loss curves travel with the card (notebook 03 plots them)
            curve = card["training"]["history_sampled"]
            assert curve["step"][-1] == card["training"]["steps"] - 1 and len(curve["loss"]) == len(curve["step"])
            assert card["ssl_config"]["steps"] == card["training"]["steps"]  # what the run used
            assert card["ssl_config"]["vertical_flip"] is name.startswith("ssl-us")  # the continuation's flips
            assert ("domain" in card["health"]) is name.startswith("ssl-us")  # judged on its domain's task
            if name.startswith("ssl-us"):
                assert card["health"]["domain"]["tasks"] == ["breast_us_malignant"]
        else:
            assert card["ssl_config"] is None
    # a second call is a no-op (up to date)
    assert build("ssl-natural-vit-smoke", "smoke", device="cpu", progress=False) == weights.parent / "ssl-natural-vit-smoke.safetensors"


def test_names_and_profiles_are_checked():
    with pytest.raises(ValueError, match="not an embedded backbone name"):
        split_name("dinov2-vit-s14")
    with pytest.raises(ValueError, match="builds"):
        build("ssl-natural-vit-tiny", "smoke")


def test_sampled_history_keeps_ends_and_probe_rows():
    import numpy as np
    import pandas as pd

    from medlib.models.build import _sampled_history

    history = pd.DataFrame({"step": np.arange(1000), "loss": np.linspace(10, 5, 1000), "collapse": [""] * 1000,
                            "health_knn_auroc_gain": [0.05 if s == 333 else np.nan for s in range(1000)]})
    out = _sampled_history(history, n_points=10)
    assert out["step"][0] == 0 and out["step"][-1] == 999 and 333 in out["step"] and 100 in out["step"]
    assert "collapse" not in out and len(out["step"]) == 12
    assert out["health_knn_auroc_gain"][out["step"].index(333)] == 0.05 and out["health_knn_auroc_gain"][0] is None
    assert out["loss"][0] == 10.0
    assert _sampled_history(pd.DataFrame()) == {}


def test_recipe_hash_follows_only_the_settings_of_its_kind():
    """An SSL setting re-hashes the SSL families (and continuations) only; a supervised one the supervised only."""
    from medlib.config import get_profile, override

    base = get_profile("smoke")
    ssl_changed = override(base, **{"ssl.steps": base.ssl.steps + 1})
    sup_changed = override(base, **{"backbone.sup_epochs": base.backbone.sup_epochs + 1})
    for name in ("ssl-natural-vit-smoke", "ssl-us-vit-smoke"):
        assert recipe_hash(name, ssl_changed) != recipe_hash(name, base)
        assert recipe_hash(name, sup_changed) == recipe_hash(name, base)
    for name in ("sup-natural-vit-smoke", "sup-cxr-vit-smoke"):
        assert recipe_hash(name, ssl_changed) == recipe_hash(name, base)
        assert recipe_hash(name, sup_changed) != recipe_hash(name, base)
    assert recipe_hash("ssl-us-vit-smoke", base) != recipe_hash("ssl-knee-vit-smoke", base)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.xdist_group("build")
def test_gpu_profile_build_path_runs_at_vit_s14_shapes_on_cpu(tmp_path, monkeypatch):
    """`make backbones PROFILE=gpu` at its real shapes (ViT-S/14 at 224 px, 2x224 + 8x98 crops, batch 2), cut to
    2 steps on CPU: SSL from scratch, the continuation from it, and the supervised path write loadable weights.
    The health check is replaced here (at 224 px it costs minutes on CPU); its own tests run it at smoke size."""
    import medlib.models.build as build_module
    from medlib.config import get_profile, override
    from medlib.models.backbones import create_backbone

    monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path))
    gpu = get_profile("gpu")
    assert (gpu.ssl.global_size, gpu.ssl.local_size, gpu.ssl.n_local) == (224, 98, 8)
    cut = override(gpu, **{"ssl.steps": 2, "ssl.batch_size": 2, "ssl.warmup_steps": 1,
                           "ssl.teacher_temp_warmup_steps": 1, "ssl.freeze_last_layer_steps": 1,
                           "data.n_natural": 8, "data.n_per_dataset": 40, "backbone.sup_epochs": 1})
    checked = []
    monkeypatch.setattr(build_module, "_health", lambda name, model, profile, device: checked.append(name) or {
        "passed": False, "mean_auroc_gain": float("nan"), "mean_auroc_gain_unshifted": float("nan"),
        "replaced_in_test": True})
    for name in ("ssl-natural-vit-s14", "ssl-knee-vit-s14", "sup-cxr-vit-s14"):
        weights = build(name, cut, device="cpu", progress=False)
        assert weights.parent == tmp_path / "backbones"  # not committed: only the tiny ones are
        card = json.loads(weights.with_suffix(".json").read_text())
        assert card["recipe_hash"] == recipe_hash(name, cut) and card["timm_arch"] == "vit_small_patch14_dinov2"
        if name.startswith("ssl-"):
            assert card["training"]["steps"] == 2 and card["ssl_config"]["global_size"] == 224
            assert card["training"]["initialised_from"] == ("ssl-natural-vit-s14" if "knee" in name else None)
        bb = create_backbone(name)
        feats = bb.features(torch.rand(1, 3, 224, 224), n_last=2)
        assert feats["cls"].shape == (1, 384) and feats["grid"].shape == (1, 384, 16, 16)
        assert torch.isfinite(feats["cls"]).all()
    assert checked == ["ssl-natural-vit-s14", "ssl-knee-vit-s14", "sup-cxr-vit-s14"]


@pytest.mark.slow
@pytest.mark.xdist_group("build")
def test_a_rebuild_reproduces_the_weights(tmp_path, monkeypatch):
    """`make backbones` is seeded by the profile: two builds in two empty caches give identical weights."""
    from safetensors.torch import load_file

    from medlib.models import build as build_module

    monkeypatch.setattr(build_module, "_health", lambda name, model, profile, device: {
        "passed": False, "mean_auroc_gain": float("nan"), "mean_auroc_gain_unshifted": float("nan"),
        "replaced_in_test": True})
    for name in ("ssl-natural-vit-smoke", "sup-natural-vit-smoke"):
        states = []
        for run in ("a", "b"):
            monkeypatch.setenv("MEDLIB_CACHE", str(tmp_path / run))
            weights = build(name, "smoke", device="cpu", progress=False)
            assert str(weights).startswith(str(tmp_path / run))
            states.append(load_file(str(weights)))
            assert json.loads(weights.with_suffix(".json").read_text())["training"]["seeded"] == 0
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), f"{name}: a rebuild differs"

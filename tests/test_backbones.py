"""Backbone registry, weight loading (local files, DINOv2 original layout, embedded, package) and the feature API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from medlib.models import backbones as bb
from medlib.models.backbones import (
    EMBEDDED_ARCHS,
    BackboneSpec,
    WeightsMismatchError,
    WeightsNotFoundError,
    backbone_info,
    create_backbone,
    efficientnet_lite0_state_dict,
    linear_probe_input,
    list_backbones,
    load_model_card,
)

SMOKE = "ssl-natural-vit-smoke"  # an embedded name with the smoke architecture


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt by timm to reach the hub or a URL fails the test."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(builder, fn, refuse)


@pytest.fixture
def empty_embedded(tmp_path, monkeypatch):
    """Point the committed-weights folder at an empty temp folder (independent of what the repo ships)."""
    folder = tmp_path / "embedded"
    folder.mkdir()
    monkeypatch.setattr(bb, "EMBEDDED_DIR", folder)
    monkeypatch.delenv("MEDLIB_WEIGHTS_DIR", raising=False)
    return folder


def _x(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- registry


def test_registry_names_and_timm_archs():
    names = list_backbones()
    for short, size in {"s": "small", "b": "base", "l": "large", "g": "giant"}.items():
        assert bb.BACKBONES[f"dinov2-vit-{short}14"].arch == f"vit_{size}_patch14_dinov2.lvd142m"
        assert bb.BACKBONES[f"dinov2-vit-{short}14-reg4"].arch == f"vit_{size}_patch14_reg4_dinov2.lvd142m"
    assert bb.BACKBONES["vit-b16-in21k"].arch == "vit_base_patch16_224.augreg_in21k"
    assert bb.BACKBONES["resnet50-in1k"].arch == "resnet50.a1_in1k"
    assert bb.BACKBONES["radimagenet-resnet50"].source == "local"
    assert bb.BACKBONES["efficientnet-lite0.in1k"].source == "package"
    for family in ("ssl-natural", "sup-natural", "sup-cxr", "ssl-us", "ssl-knee", "random"):
        for suffix in ("vit-smoke", "vit-tiny", "vit-s14"):
            assert f"{family}-{suffix}" in names
    assert len(names) == 8 + 5 + 6 * 3  # DINOv2, other real names (incl. vit-b16-mimic-cxr), embedded
    assert [n for n in names if bb.BACKBONES[n].is_dinov2] == list_backbones(source="hub")[:8] == sorted(
        n for n in names if n.startswith("dinov2-"))
    assert set(list_backbones(kind="cnn")) == {"resnet50-in1k", "radimagenet-resnet50", "efficientnet-lite0.in1k"}
    assert all(timm.is_model(spec.arch.split(".")[0]) for spec in bb.BACKBONES.values())


def test_embedded_archs_as_agreed():
    assert dict(EMBEDDED_ARCHS) == {
        "vit-smoke": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)),
        "vit-tiny": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)),
        "vit-s14": ("vit_small_patch14_dinov2", dict(img_size=224, patch_size=14)),
    }


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown backbone 'dinov2-vit-s'.*'dinov2-vit-s14'.*list_backbones"):
        create_backbone("dinov2-vit-s")


def test_backbone_info_hub_entry():
    info = backbone_info("dinov2-vit-b14-reg4")
    assert info["hf_hub_id"] == "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    assert info["original_url"].startswith("https://dl.fbaipublicfiles.com/dinov2/")
    assert info["mean"] == (0.485, 0.456, 0.406) and info["weights_available"] is False
    assert backbone_info("vit-b16-in21k")["mean"] == (0.5, 0.5, 0.5)
    assert backbone_info("random-vit-tiny")["weights_available"] is True


# --------------------------------------------------------------------------- feature API


@pytest.mark.parametrize("size", [32, 64, 96])
def test_vit_features_at_native_and_other_sizes(size):
    model = create_backbone("random-vit-smoke")
    assert (model.embed_dim, model.patch_size, model.num_prefix_tokens, model.image_size) == (48, 8, 1, 32)
    assert not model.training
    with torch.no_grad():
        feats = model.features(_x(size), n_last=2)
        cls = model(_x(size))
    h = size // 8
    assert feats["cls"].shape == (2, 48) and feats["pooled"].shape == (2, 48)
    assert feats["grid"].shape == (2, 48, h, h)
    assert feats["layers"].shape == (2, 2, 48)
    assert [g.shape for g in feats["grids"]] == [(2, 48, h, h)] * 2
    assert feats["registers"].shape == (2, 0, 48)
    torch.testing.assert_close(feats["cls"], cls)
    torch.testing.assert_close(feats["layers"][:, -1], feats["cls"])
    torch.testing.assert_close(feats["pooled"], feats["grid"].mean(dim=(2, 3)))
    assert feats["grids"][-1] is feats["grid"]
    assert not torch.allclose(feats["layers"][:, 0], feats["layers"][:, 1])


def test_vit_tokens_are_final_normed():
    model = create_backbone("random-vit-smoke")
    with torch.no_grad():
        tokens = model.model.forward_features(_x(32))  # timm: final norm applied
        feats = model.features(_x(32))
    torch.testing.assert_close(feats["cls"], tokens[:, 0])
    torch.testing.assert_close(feats["grid"].flatten(2).transpose(1, 2), tokens[:, 1:])


def test_feature_input_errors():
    model = create_backbone("random-vit-smoke")
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        model.features(_x(36))
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"n_last must be in 1\.\.2"):
        model.features(_x(32), n_last=3)


def test_dinov2_architecture_at_224_with_registers():
    model = create_backbone("dinov2-vit-s14-reg4", pretrained=False)
    assert model.is_dinov2 and model.image_size == 224 and model.patch_size == 14
    assert model.model.pos_embed.shape == (1, 16 * 16, 384)  # resized grid, no class position (reg4 layout)
    assert (model.num_register_tokens, model.num_prefix_tokens) == (4, 5)
    assert model.mean == (0.485, 0.456, 0.406)
    with torch.no_grad():
        feats = model.features(_x(56, batch=1), n_last=4)
    assert feats["registers"].shape == (1, 4, 384) and feats["grid"].shape == (1, 384, 4, 4)
    assert feats["layers"].shape == (1, 4, 384)
    assert linear_probe_input(feats, n_blocks=4, avgpool=True).shape == (1, 5 * 384)


def test_linear_probe_input_matches_dinov2_layout():
    feats = {"layers": torch.arange(2 * 3 * 2.0).reshape(2, 3, 2), "pooled": torch.full((2, 2), -1.0)}
    out = linear_probe_input(feats, n_blocks=2, avgpool=True)
    torch.testing.assert_close(out[0], torch.tensor([2.0, 3.0, 4.0, 5.0, -1.0, -1.0]))
    assert linear_probe_input(feats, n_blocks=1).shape == (2, 2)
    with pytest.raises(ValueError, match="n_last=4"):
        linear_probe_input(feats, n_blocks=4)


def test_drop_path_rate_reaches_timm():
    model = create_backbone("random-vit-smoke", drop_path_rate=0.2)
    assert model.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


# --------------------------------------------------------------------------- local weights


def _reference_state(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    ref = create_backbone("random-vit-smoke", seed=seed)
    return ref, {k: v.clone().contiguous() for k, v in ref.model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_weights_round_trip(tmp_path, suffix):
    ref, state = _reference_state()
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = create_backbone(SMOKE, weights=path)
    assert model.weights_path == path
    x = _x(32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_wrapper_state_dict_and_fp16_load(tmp_path):
    ref, _ = _reference_state(1)
    torch.save(ref.state_dict(), tmp_path / "wrapped.pt")  # keys prefixed with "model."
    save_file({k: v.half() for k, v in ref.model.state_dict().items()}, str(tmp_path / "half.safetensors"))
    x = _x(32)
    with torch.no_grad():
        torch.testing.assert_close(create_backbone(SMOKE, weights=tmp_path / "wrapped.pt")(x), ref(x))
        half = create_backbone(SMOKE, weights=tmp_path / "half.safetensors")
        assert all(p.dtype == torch.float32 for p in half.parameters())
        torch.testing.assert_close(half(x), ref(x), atol=2e-2, rtol=1e-2)


def test_image_size_resizes_position_embeddings(tmp_path):
    ref, state = _reference_state(2)
    save_file(state, str(tmp_path / "w.safetensors"))
    model = create_backbone(SMOKE, weights=tmp_path / "w.safetensors", image_size=64)
    expected = timm.layers.resample_abs_pos_embed(state["pos_embed"], new_size=(8, 8), old_size=(4, 4),
                                                  num_prefix_tokens=1)
    torch.testing.assert_close(model.model.pos_embed.data, expected)
    assert model.image_size == 64 and model.features(_x(64))["grid"].shape == (2, 48, 8, 8)


def _tiny_dinov2_spec(reg: bool) -> BackboneSpec:
    arch = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    return BackboneSpec(name=f"tiny-dinov2{'-reg4' if reg else ''}", kind="vit", arch=arch, source="local",
                        kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=2), image_size=32)


@pytest.mark.parametrize("reg", [False, True])
def test_original_dinov2_layout_is_converted(tmp_path, reg):
    """facebookresearch keys (mask_token, register_tokens, pos_embed incl. the class position) load via timm."""
    torch.manual_seed(3)
    ref = create_backbone(_tiny_dinov2_spec(reg), pretrained=False)
    for p in ref.parameters():  # make layer-scale and tokens non-trivial
        p.data.normal_(0, 0.05)
    state = dict(ref.model.state_dict())
    orig = {k: v.clone() for k, v in state.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    orig["mask_token"] = torch.zeros(1, 48)
    orig["cls_token"] = state["cls_token"].clone()
    if reg:  # timm folds the class position into cls_token; the original keeps it in pos_embed
        orig["register_tokens"] = state["reg_token"].clone()
        orig["pos_embed"] = torch.cat([torch.zeros(1, 1, 48), state["pos_embed"]], dim=1)
    else:
        orig["pos_embed"] = state["pos_embed"].clone()
    torch.save(orig, tmp_path / "dinov2_original.pth")
    model = create_backbone(_tiny_dinov2_spec(reg), weights=tmp_path / "dinov2_original.pth")
    x = _x(32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x)["grid"], ref.features(x)["grid"])
        if reg:
            torch.testing.assert_close(model.features(x)["registers"], ref.features(x)["registers"])


def test_real_dinov2_original_checkpoint_shape_resized_to_224(tmp_path):
    """A ViT-S/14 reg4 file in the released layout (518 px: 37 x 37 positions) loads at 224 and at 56 px."""
    src = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=518)
    state = src.state_dict()
    orig = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    orig.update(mask_token=torch.zeros(1, 384), register_tokens=state["reg_token"],
                pos_embed=torch.cat([torch.zeros(1, 1, 384), state["pos_embed"]], dim=1))
    assert orig["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    save_file({k: v.contiguous() for k, v in orig.items()}, str(tmp_path / "dinov2_vits14_reg4.safetensors"))
    model = create_backbone("dinov2-vit-s14-reg4", weights=tmp_path / "dinov2_vits14_reg4.safetensors")
    assert model.model.pos_embed.shape == (1, 256, 384)
    torch.testing.assert_close(model.model.reg_token.data, state["reg_token"])
    with torch.no_grad():
        assert model.features(_x(56, batch=1))["registers"].shape == (1, 4, 384)


def test_weights_dir_env_var(tmp_path, monkeypatch, empty_embedded):
    ref, state = _reference_state(4)
    save_file(state, str(tmp_path / f"{SMOKE}.safetensors"))
    monkeypatch.setenv("MEDLIB_WEIGHTS_DIR", str(tmp_path))
    model = create_backbone(SMOKE)
    assert model.weights_path == tmp_path / f"{SMOKE}.safetensors"
    with torch.no_grad():
        torch.testing.assert_close(model(_x(32)), ref(_x(32)))
    assert backbone_info(SMOKE)["weights_available"] is True


# --------------------------------------------------------------------------- embedded weights


def test_embedded_committed_file_wins_over_cache(empty_embedded):
    _, committed = _reference_state(5)
    _, cached = _reference_state(6)
    cache_file = bb.cached_weights_path(SMOKE)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(cached, str(cache_file))
    cache_file.with_suffix(".json").write_text(json.dumps({"recipe_hash": "cache"}))
    assert create_backbone(SMOKE).weights_path == cache_file
    assert load_model_card(SMOKE) == {"recipe_hash": "cache"}
    save_file({k: v.half() for k, v in committed.items()}, str(bb.embedded_weights_path(SMOKE)))
    bb.embedded_weights_path(SMOKE).with_suffix(".json").write_text(json.dumps({"recipe_hash": "abc123"}))
    model = create_backbone(SMOKE)
    assert model.weights_path == empty_embedded / f"{SMOKE}.safetensors"
    assert load_model_card(SMOKE)["recipe_hash"] == "abc123"
    torch.testing.assert_close(model.model.pos_embed.data, committed["pos_embed"], atol=1e-3, rtol=1e-3)
    assert backbone_info(SMOKE)["model_card"] == {"recipe_hash": "abc123"}
    cache_file.unlink()
    cache_file.with_suffix(".json").unlink()


def test_embedded_helpers_reject_non_embedded_names():
    with pytest.raises(ValueError, match="not an embedded"):
        bb.embedded_weights_path("dinov2-vit-s14")
    with pytest.raises(ValueError, match="not an embedded"):
        load_model_card("random-vit-tiny")


# --------------------------------------------------------------------------- errors


def test_missing_real_weights_say_where_to_get_them(empty_embedded):
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("dinov2-vit-s14")
    msg = str(err.value)
    for part in ("timm/vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth", "weights=",
                 "MEDLIB_WEIGHTS_DIR/dinov2-vit-s14.safetensors", "downloading is not allowed"):
        assert part in msg
    with pytest.raises(WeightsNotFoundError, match="timm/resnet50.a1_in1k"):
        create_backbone("resnet50-in1k")
    with pytest.raises(WeightsNotFoundError, match="local file only.*RadImageNet"):
        create_backbone("radimagenet-resnet50")


def test_missing_embedded_weights_say_how_to_build(empty_embedded):
    with pytest.raises(WeightsNotFoundError, match=r"make backbones.*python -m medlib.models build ssl-us-vit-tiny"):
        create_backbone("ssl-us-vit-tiny")
    assert create_backbone("ssl-us-vit-tiny", pretrained=False).weights_path is None  # explicit random init


def test_bad_weight_files(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_backbone(SMOKE, weights=tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="suffix '.npz'"):
        create_backbone(SMOKE, weights=tmp_path / "w.npz")
    other = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    torch.save(other, tmp_path / "resnet.pth")
    with pytest.raises(WeightsMismatchError, match="does not fit backbone"):
        create_backbone(SMOKE, weights=tmp_path / "resnet.pth")
    torch.save({"weights": np.array([1.0]), "callback": Path("x")}, tmp_path / "pickle.pth")
    with pytest.raises(WeightsMismatchError, match="Could not read"):  # weights_only=True refuses arbitrary objects
        create_backbone(SMOKE, weights=tmp_path / "pickle.pth")


def test_contradictory_arguments():
    with pytest.raises(ValueError, match="contradict"):
        create_backbone(SMOKE, weights="x.safetensors", pretrained=False)
    with pytest.raises(ValueError, match="random init by definition.*ssl-natural-vit-smoke"):
        create_backbone("random-vit-smoke", weights="x.safetensors")


# --------------------------------------------------------------------------- genuine ImageNet CNN


def _photo(image: np.ndarray, mean, std, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_efficientnet_lite0_classifies_real_photos():
    from skimage import data

    classifier = timm.create_model("tf_efficientnet_lite0.in1k", pretrained=True,
                                   pretrained_cfg_overlay=dict(state_dict=efficientnet_lite0_state_dict()))
    classifier.eval()
    backbone = create_backbone("efficientnet-lite0.in1k")
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.embed_dim == 1280 and backbone.reduction == 32
    x = torch.cat([_photo(data.chelsea(), backbone.mean, backbone.std),
                   _photo(data.coffee(), backbone.mean, backbone.std)])
    with torch.no_grad():
        top5 = classifier(x).topk(5).indices
        torch.testing.assert_close(backbone(x), classifier.forward_head(classifier.forward_features(x),
                                                                        pre_logits=True))
        feats = backbone.features(x, n_last=5)
    assert set(top5[0].tolist()) & {281, 282, 283, 284, 285}, f"chelsea top-5 {top5[0].tolist()} has no cat"
    assert top5[0, 0].item() in range(281, 286)
    assert set(top5[1].tolist()) & {504, 967, 968}, f"coffee top-5 {top5[1].tolist()} has no cup"
    assert feats["grid"].shape == (2, 1280, 7, 7) and feats["layers"].shape == (2, 1, 1280)
    assert [g.shape[1] for g in feats["grids"]] == [16, 24, 40, 112, 320]
    assert [g.shape[-1] for g in feats["grids"]] == [112, 56, 28, 14, 7]


def test_random_names_are_one_init_whatever_ran_before():
    """A random-* baseline is a pure function of (name, seed): the global RNG neither changes it nor is changed."""
    torch.manual_seed(1)
    a = create_backbone("random-vit-smoke")
    after_a = torch.rand(3)
    torch.manual_seed(2)
    torch.rand(1000)  # a different history before the second call (e.g. a data set generated or loaded from cache)
    b = create_backbone("random-vit-smoke")
    wa, wb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # creating it drew nothing from the caller's stream
    c = create_backbone("random-vit-smoke", seed=1)
    assert not torch.equal(c.model.patch_embed.proj.weight, a.model.patch_embed.proj.weight)
    assert torch.equal(create_backbone("random-vit-smoke", seed=0).model.patch_embed.proj.weight,
                       a.model.patch_embed.proj.weight)  # seed 0 is the default


def test_seed_is_refused_for_backbones_with_weights():
    with pytest.raises(ValueError, match="seed=3 picks the init of a random-\\* backbone"):
        create_backbone("ssl-natural-vit-tiny", seed=3)

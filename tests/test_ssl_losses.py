"""The DINOv2 pieces against hand-computed values: losses, centering, EMA, schedules, groups, masks, crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from medlib.config import SSLConfig
from medlib.ssl.dino import (
    DINOHead, DINOModel, IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment, TeacherCentering, block_mask, cosine_schedule,
    detect_collapse, dino_loss, ema_update, entropy_stats, feature_std, ibot_loss, interpolate_pos_embed, koleo_loss,
    last_layer_frozen, load_backbone_weights, lr_at, param_groups, sample_masks, sinkhorn_knopp, teacher_momentum_at,
    teacher_temp_at, vit_tokens, weight_decay_at,
)
from medlib.engine import save_weights


def tiny_vit(img_size: int = 32, **kw) -> torch.nn.Module:
    """The test ViT of the brief: 48-dim, 2 blocks, patch 8."""
    torch.manual_seed(0)
    kw.setdefault("dynamic_img_size", True)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, embed_dim=48,
                             depth=2, num_heads=2, **kw)


def cfg(**kw) -> SSLConfig:
    """A small SSLConfig with explicit schedule settings."""
    base = dict(global_size=32, local_size=16, n_local=2, batch_size=256, steps=100, warmup_steps=10, base_lr=4e-3,
                min_lr=1e-6, weight_decay=(0.04, 0.4), teacher_momentum=(0.992, 1.0), teacher_temp=(0.04, 0.07),
                teacher_temp_warmup_steps=30, freeze_last_layer_steps=5)
    base.update(kw)
    return SSLConfig(**base)


# --------------------------------------------------------------------------- losses


def _ce(t: list[float], s: list[float], temp: float) -> float:
    """-sum_k t_k log softmax(s / temp)_k, written out."""
    z = [v / temp for v in s]
    log_norm = math.log(sum(math.exp(v) for v in z))
    return -sum(tk * (zk - log_norm) for tk, zk in zip(t, z))


def test_dino_loss_two_crops_two_prototypes_by_hand():
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # (2 crops, B=1, K=2)
    t = torch.tensor([[[0.7, 0.3]], [[0.2, 0.8]]])
    # pairs (student 1, teacher 0) and (student 0, teacher 1): ln(1+e^4) - 1.2 and ln(e^2+1) - 0.4
    expected = ((math.log(1 + math.e ** 4) - 1.2) + (math.log(math.e ** 2 + 1) - 0.4)) / 2
    assert expected == pytest.approx(2.2725390, abs=1e-6)
    assert dino_loss(s, t, student_temp=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_dino_loss_local_crops_pair_with_both_teacher_views():
    torch.manual_seed(1)
    s = torch.randn(3, 2, 4)  # 2 global + 1 local crop, batch 2
    t = F.softmax(torch.randn(2, 2, 4), dim=-1)
    pairs = [(1, 0), (2, 0), (0, 1), (2, 1)]
    expected = np.mean([np.mean([_ce(t[ti, b].tolist(), s[si, b].tolist(), 0.1) for b in range(2)])
                        for si, ti in pairs])
    assert dino_loss(s, t, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_needs_two_views():
    with pytest.raises(ValueError, match="different views"):
        dino_loss(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3), 0.1)


def test_ibot_loss_weights_each_image_by_its_masked_count():
    masks = torch.tensor([[True, False, False, False],  # image A: 1 masked patch
                          [True, True, False, True],  # image B: 3 masked patches
                          [False, False, False, False]])  # image C: not masked (still counts in the mean)
    torch.manual_seed(2)
    s = torch.randn(4, 3)
    t = F.softmax(torch.randn(4, 3), dim=-1)
    ce = [_ce(t[i].tolist(), s[i].tolist(), 0.1) for i in range(4)]
    expected = (ce[0] / 1 + (ce[1] + ce[2] + ce[3]) / 3) / 3
    assert ibot_loss(s, t, masks, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_rejects_mismatched_tokens_and_handles_no_masks():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    s = torch.zeros(0, 3, requires_grad=True)
    assert ibot_loss(s, torch.zeros(0, 3), masks, 0.1).item() == 0.0
    with pytest.raises(ValueError, match="masks select"):
        ibot_loss(torch.zeros(2, 3), torch.zeros(2, 3), masks, 0.1)


def test_koleo_three_known_points():
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.tensor([[1.0], [3.0], [0.5]])
    # nearest distances on the unit circle: 1, 1, sqrt(3)  ->  -(0 + 0 + ln sqrt 3) / 3
    assert koleo_loss(x).item() == pytest.approx(-math.log(3) / 6, abs=1e-6)


def test_koleo_is_finite_with_duplicates_and_zero_for_one_row():
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    one = torch.ones(1, 3, requires_grad=True)
    single = koleo_loss(one)
    single.backward()
    assert single.item() == 0.0 and torch.equal(one.grad, torch.zeros(1, 3))


def test_sinkhorn_knopp_rows_sum_to_one_and_columns_balance():
    torch.manual_seed(0)
    logits = torch.randn(12, 4) * 0.3
    q = sinkhorn_knopp(logits, temp=0.1, n_iterations=3)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-5)
    imbalance = (q.sum(0) - 3.0).abs().max()  # 12 samples / 4 prototypes -> 3 each
    softmax_imbalance = (F.softmax(logits / 0.1, dim=-1).sum(0) - 3.0).abs().max()
    assert imbalance < 0.5 < softmax_imbalance
    q50 = sinkhorn_knopp(logits, temp=0.1, n_iterations=50)
    assert torch.allclose(q50.sum(0), torch.full((4,), 3.0), atol=1e-4)
    assert torch.allclose(sinkhorn_knopp(logits + 5.0, 0.1), q, atol=1e-6)  # shift invariant (no overflow)


def test_centering_of_no_rows_is_safe():
    for mode in ("sinkhorn_knopp", "softmax"):
        centering = TeacherCentering(4, mode)
        assert centering(torch.zeros(0, 4), temp=0.1).shape == (0, 4)
        assert torch.equal(centering.center, torch.zeros(1, 4))


def test_softmax_centering_uses_then_updates_the_center():
    centering = TeacherCentering(3, "softmax", momentum=0.9)
    centering.center.copy_(torch.tensor([[0.1, 0.0, -0.1]]))
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    probs = centering(logits, temp=0.5)
    assert torch.allclose(probs, F.softmax((logits - torch.tensor([[0.1, 0.0, -0.1]])) / 0.5, dim=-1))
    expected_center = 0.9 * torch.tensor([0.1, 0.0, -0.1]) + 0.1 * torch.tensor([0.5, 1.0, 0.0])
    assert torch.allclose(centering.center[0], expected_center)
    with pytest.raises(ValueError, match="sinkhorn_knopp"):
        TeacherCentering(3, "kmeans")


def test_ema_update_formula():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.weight.copy_(torch.tensor([[3.0, -2.0]]))
        teacher.bias.fill_(0.0)
        student.bias.fill_(1.0)
    ema_update(teacher, student, momentum=0.9)
    assert torch.allclose(teacher.weight, torch.tensor([[1.2, 1.6]]))
    assert teacher.bias.item() == pytest.approx(0.1)
    assert torch.equal(student.weight, torch.tensor([[3.0, -2.0]]))


# --------------------------------------------------------------------------- schedules


def test_schedules_at_known_steps():
    c = cfg()
    peak = 4e-3 * math.sqrt(256 / 1024)
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(peak / 2)
    assert lr_at(10, c) == pytest.approx(peak)
    assert lr_at(55, c) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    assert lr_at(100, c) == pytest.approx(1e-6)
    assert weight_decay_at(0, c) == pytest.approx(0.04)
    assert weight_decay_at(50, c) == pytest.approx(0.22)
    assert weight_decay_at(100, c) == pytest.approx(0.4)
    assert teacher_momentum_at(0, c) == pytest.approx(0.992)
    assert teacher_momentum_at(50, c) == pytest.approx(0.996)
    assert teacher_momentum_at(100, c) == pytest.approx(1.0)
    assert teacher_temp_at(0, c) == pytest.approx(0.04)
    assert teacher_temp_at(15, c) == pytest.approx(0.055)
    assert teacher_temp_at(30, c) == teacher_temp_at(99, c) == pytest.approx(0.07)
    assert [last_layer_frozen(s, c) for s in (0, 4, 5, 6)] == [True, True, False, False]
    assert cosine_schedule(3, 10, 1.0, 0.0, warmup_steps=4, warmup_start=0.5) == pytest.approx(0.875)


def test_param_groups_layer_decay_patch_embed_and_no_decay():
    model = DINOModel(tiny_vit(num_classes=0), n_prototypes=16, hidden_dim=32, bottleneck_dim=8)
    groups = param_groups(model, layer_decay=0.9, patch_embed_lr_mult=0.2)
    info = {name: (g["lr_mult"], g["wd_mult"], g["is_last_layer"]) for g in groups for name in g["names"]}
    assert info["backbone.patch_embed.proj.weight"] == (pytest.approx(0.9 ** 3 * 0.2), 1.0, False)
    assert info["backbone.patch_embed.proj.bias"][1] == 0.0
    assert info["backbone.cls_token"] == (pytest.approx(0.9 ** 3), 0.0, False)
    assert info["backbone.pos_embed"][1] == 0.0
    assert info["mask_token"] == (pytest.approx(0.9 ** 3), 0.0, False)
    assert info["backbone.blocks.0.attn.qkv.weight"] == (pytest.approx(0.81), 1.0, False)
    assert info["backbone.blocks.1.mlp.fc1.weight"] == (pytest.approx(0.9), 1.0, False)
    assert info["backbone.blocks.1.norm1.weight"][1] == 0.0
    assert info["backbone.norm.weight"] == (1.0, 0.0, False)
    assert info["dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert info["dino_head.last_layer.parametrizations.weight.original1"] == (1.0, 1.0, True)
    assert "dino_head.last_layer.parametrizations.weight.original0" not in info  # norm fixed to 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(info) == trainable and sum(len(g["names"]) for g in groups) == len(trainable)


# --------------------------------------------------------------------------- heads and backbone


def test_dino_head_weight_norm_fixed_and_outputs_are_cosines():
    head = DINOHead(48, 10, hidden_dim=32, bottleneck_dim=8)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.equal(magnitude, torch.ones_like(magnitude))
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-5)
    out = head(torch.randn(5, 48) * 10)
    assert out.shape == (5, 10) and out.abs().max() <= 1.0 + 1e-5


def test_vit_tokens_matches_timm_without_mask():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit_tokens(model, x), model.forward_features(x), atol=1e-6)
        small = torch.randn(2, 3, 16, 16)  # dynamic_img_size: local crops
        assert torch.allclose(vit_tokens(model, small), model.forward_features(small), atol=1e-6)


def test_vit_tokens_mask_replaces_patches_before_position_embedding():
    model = tiny_vit().eval()
    token = torch.nn.Parameter(torch.randn(1, 48))
    full = torch.ones(2, 16, dtype=torch.bool)
    out = vit_tokens(model, torch.randn(2, 3, 32, 32), full, token)
    assert torch.allclose(out[0], out[1], atol=1e-5)  # fully masked: the image no longer matters
    assert not torch.allclose(out[0, 1], out[0, 2], atol=1e-3)  # but positions still do
    out[:, 1:].sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected \\(2, 16\\)"):
        vit_tokens(model, torch.randn(2, 3, 32, 32), torch.ones(2, 9, dtype=torch.bool), token)


def test_dino_model_rejects_non_vit():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        DINOModel(torch.nn.Linear(3, 3), 8, 8, 8)


def test_interpolate_pos_embed_keeps_prefix_and_constant_fields():
    model = tiny_vit(dynamic_img_size=False)
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.25
    cls_before = model.pos_embed[:, :1].clone()
    interpolate_pos_embed(model, 64)
    assert model.pos_embed.shape == (1, 1 + 64, 48)
    assert torch.equal(model.pos_embed[:, :1], cls_before)
    assert torch.allclose(model.pos_embed[:, 1:], torch.full((1, 64, 48), 0.25), atol=1e-5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)  # fixed-size model now takes 64 px
    before = model.pos_embed.clone()
    interpolate_pos_embed(model, 64)
    assert torch.equal(model.pos_embed, before)


def test_load_backbone_weights_resamples_pos_embed(tmp_path):
    source = tiny_vit(img_size=64)
    path = save_weights(source, tmp_path / "vit64.safetensors")
    target = load_backbone_weights(tiny_vit(img_size=32), path)
    assert target.pos_embed.shape == (1, 17, 48)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    with pytest.raises(ValueError, match="do not match"):
        load_backbone_weights(tiny_vit(img_size=32, num_classes=0), path)


# --------------------------------------------------------------------------- masks


def test_block_mask_has_exact_count_and_is_deterministic():
    for n in (0, 1, 5, 17, 32, 64):
        mask = block_mask((8, 8), n, np.random.default_rng(n))
        assert mask.sum() == n
    a = block_mask((8, 8), 20, np.random.default_rng(3))
    assert np.array_equal(a, block_mask((8, 8), 20, np.random.default_rng(3)))
    with pytest.raises(ValueError, match="n_masked"):
        block_mask((4, 4), 17, np.random.default_rng(0))


def test_sample_masks_probability_and_ratio_range():
    rng = np.random.default_rng(0)
    shares, ratios = [], []
    for _ in range(200):
        masks = sample_masks(16, (8, 8), 0.5, (0.1, 0.5), rng)
        counts = masks.sum(1).numpy()
        shares.append((counts > 0).mean())
        ratios.extend(counts[counts > 0] / 64)
    assert np.mean(shares) == pytest.approx(0.5)
    assert min(ratios) >= 0.09 and max(ratios) <= 0.5
    assert np.mean(ratios) == pytest.approx(0.3, abs=0.02)  # stratified over the range
    first_masked = [bool(sample_masks(16, (8, 8), 0.5, (0.1, 0.5), rng)[0].any()) for _ in range(50)]
    assert 0 < sum(first_masked) < 50  # masked images are shuffled within the batch
    with pytest.raises(ValueError, match="mask_probability"):
        sample_masks(4, (4, 4), 1.5, (0.1, 0.5), rng)


# --------------------------------------------------------------------------- multi-crop


def _plain(**kw) -> MultiCropAugment:
    """Geometry-only identity augmentation, optionally with some ops switched on."""
    base = dict(global_size=32, local_size=16, n_local=2, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0,
                jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
    base.update(kw)
    return MultiCropAugment(**base)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_multicrop_shapes_order_and_determinism():
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    aug = MultiCropAugment(global_size=32, local_size=16, n_local=3)
    g, loc = aug(images, np.random.default_rng(0))
    assert g.shape == (8, 3, 32, 32) and loc.shape == (12, 3, 16, 16)
    g2, loc2 = aug(images, np.random.default_rng(0))
    assert torch.equal(g, g2) and torch.equal(loc, loc2)
    g3, _ = aug(images, np.random.default_rng(1))
    assert not torch.equal(g, g3)
    assert torch.isfinite(g).all() and g.min() >= -2.2 and g.max() <= 2.7  # ImageNet-normalised [0, 1]


def test_multicrop_identity_and_flips():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    g, _ = _plain()(images, np.random.default_rng(0))
    assert torch.allclose(g[:3], _normalise(images), atol=1e-5)
    assert torch.allclose(g[3:], _normalise(images), atol=1e-5)
    gv, _ = _plain(vflip_p=1.0)(images, np.random.default_rng(0))
    assert torch.allclose(gv[:3], _normalise(images.flip(-2)), atol=1e-5)
    gh, _ = _plain(hflip_p=1.0)(images, np.random.default_rng(0))
    assert torch.allclose(gh[:3], _normalise(images.flip(-1)), atol=1e-5)
    assert MultiCropAugment.from_config(cfg(vertical_flip=True)).vflip_p == 0.5
    assert MultiCropAugment.from_config(cfg()).vflip_p == 0.0


def test_multicrop_solarises_only_the_second_global_view():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    g, loc = _plain(solarize_p=(0.0, 1.0, 0.0), n_local=1)(images, np.random.default_rng(0))
    x = images.float() / 255
    solarised = torch.where(x >= 0.5, 1 - x, x) * 255
    assert torch.allclose(g[:2], _normalise(images), atol=1e-5)
    assert torch.allclose(g[2:], _normalise(solarised), atol=1e-4)
    assert loc.min() >= -2.2


def test_multicrop_blur_smooths_and_grayscale_input_works():
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    plain, _ = _plain(n_local=0, mean=(0.5,), std=(0.25,))(images, np.random.default_rng(0))
    blurred, _ = _plain(n_local=0, mean=(0.5,), std=(0.25,), blur_p=(1.0, 1.0, 1.0), blur_sigma=(7.0, 7.0))(
        images, np.random.default_rng(0))
    assert plain.shape == (4, 1, 32, 32)
    assert blurred.std() < 0.8 * plain.std()


# --------------------------------------------------------------------------- health


def test_collapse_detector_kinds():
    k = 64
    uniform = torch.full((8, k), 1 / k)
    one = F.one_hot(torch.zeros(8, dtype=torch.long), k).float()
    healthy = F.one_hot(torch.arange(8), k).float() * 0.9 + 0.1 / k
    feats_same = torch.ones(8, 16)
    feats_ok = torch.randn(8, 16)

    def row(p: torch.Tensor, f: torch.Tensor) -> dict:
        h, hm = entropy_stats(p)
        return {"teacher_entropy": h, "teacher_marginal_entropy": hm, "feature_std": feature_std(f)}

    assert entropy_stats(uniform)[0] == pytest.approx(math.log(k), rel=1e-5)
    assert detect_collapse([row(uniform, feats_ok)], k, 8) == ["uniform"]
    assert detect_collapse([row(one, feats_ok)], k, 8) == ["one_prototype"]
    assert detect_collapse([row(healthy, feats_same)], k, 8) == ["features"]
    assert detect_collapse([row(healthy, feats_ok)], k, 8) == []
    assert feature_std(torch.randn(4096, 16)) == pytest.approx(1.0, abs=0.05)

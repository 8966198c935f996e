"""The DINOv2-style PCA colouring of patch tokens: foreground split, colours, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medlib.eval.patch_pca import PatchPCA, patch_grids, patch_pca_rgb, pca_rgb_from_grids, plot_patch_pca
from medlib.models.backbones import create_backbone


def _synthetic(n: int = 3, side: int = 6, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grids whose border ring is one token, the inner block another; the inner block's halves differ more weakly."""
    rng = np.random.default_rng(seed)
    grids = rng.normal(0, 0.05, size=(n, side, side, d))
    inner = np.zeros((side, side), dtype=bool)
    inner[1:-1, 1:-1] = True
    left = inner.copy()
    left[:, side // 2:] = False
    grids[:, ~inner, 0] += 6.0  # background: far along axis 0
    grids[:, inner, 1] += 1.0  # foreground
    grids[:, left, 2] += 1.5  # left half of the foreground differs along axis 2
    return grids, inner, left


def test_foreground_is_the_inner_block_and_background_is_black():
    grids, inner, _ = _synthetic()
    out = pca_rgb_from_grids(grids)
    assert isinstance(out, PatchPCA)
    assert out.rgb.shape == (3, 6, 6, 3) and out.foreground.shape == (3, 6, 6)
    np.testing.assert_array_equal(out.foreground, np.broadcast_to(inner, out.foreground.shape))
    assert np.all(out.rgb[~out.foreground] == 0)
    assert out.foreground_share == pytest.approx(inner.mean())


def test_colours_span_unit_range_and_separate_the_halves_consistently_across_images():
    grids, inner, left = _synthetic()
    out = pca_rgb_from_grids(grids)
    fg = out.rgb[out.foreground]
    assert fg.min() >= 0 and fg.max() <= 1
    np.testing.assert_allclose(fg.min(axis=0), 0, atol=1e-12)  # each channel min-max scaled over all images
    np.testing.assert_allclose(fg.max(axis=0), 1, atol=1e-12)
    right = inner & ~left
    left_colour = out.rgb[:, left].mean(axis=1)  # (N, 3)
    right_colour = out.rgb[:, right].mean(axis=1)
    # the first foreground component (red) is the left / right split: far apart in every image, the same
    # part the same red in every image (the other channels only hold noise here)
    assert np.abs(left_colour[:, 0] - right_colour[:, 0]).min() > 0.5
    assert np.ptp(left_colour[:, 0]) < 0.05 and np.ptp(right_colour[:, 0]) < 0.05
    assert out.explained_variance_ratio[0] > 0.8


def test_sign_of_the_first_component_does_not_decide_the_foreground():
    grids, inner, _ = _synthetic()
    flipped = pca_rgb_from_grids(-grids)
    np.testing.assert_array_equal(flipped.foreground, np.broadcast_to(inner, flipped.foreground.shape))


def test_no_threshold_keeps_every_patch_and_fewer_components_leave_channels_empty():
    grids, _, _ = _synthetic()
    out = pca_rgb_from_grids(grids, n_components=2, foreground_threshold=None)
    assert out.foreground.all()
    assert np.all(out.rgb[..., 2] == 0) and out.rgb[..., :2].max() == pytest.approx(1.0)
    assert len(out.explained_variance_ratio) == 2


def test_same_input_gives_the_same_colouring():
    grids, _, _ = _synthetic(seed=3)
    a, b = pca_rgb_from_grids(grids, seed=1), pca_rgb_from_grids(grids, seed=1)
    np.testing.assert_array_equal(a.rgb, b.rgb)


@pytest.mark.parametrize("bad, kwargs, match", [
    (np.zeros((2, 3, 3)), {}, r"\(N, h, w, D\)"),
    (np.full((1, 2, 2, 4), np.nan), {}, "NaN"),
    (None, {"n_components": 4}, "n_components"),
    (None, {"foreground_threshold": 50.0}, "lower the threshold"),
])
def test_bad_input_raises_with_a_useful_message(bad, kwargs, match):
    grids = _synthetic()[0] if bad is None else bad
    with pytest.raises(ValueError, match=match):
        pca_rgb_from_grids(grids, **kwargs)


def test_patch_pca_rgb_on_a_backbone_upsamples_to_the_image():
    backbone = create_backbone("random-vit-smoke")  # 32 px, patch 8
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(5, 40, 40), dtype=np.uint8)
    images[:, 10:30, 10:30] = 255
    grids = patch_grids(backbone, images, image_size=32)
    assert grids.shape == (5, 4, 4, backbone.embed_dim)
    out = patch_pca_rgb(backbone, images, image_size=32)
    assert out.rgb.shape == (5, 40, 40, 3) and out.grid_rgb.shape == (5, 4, 4, 3)
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1
    background = np.repeat(np.repeat(~out.foreground, 10, axis=1), 10, axis=2)  # 4x4 grid -> 40 px, nearest
    assert np.all(out.rgb[background] == 0)
    assert patch_pca_rgb(backbone, images, image_size=32, out_size=16).rgb.shape == (5, 16, 16, 3)


def test_patch_pca_rgb_rejects_a_size_off_the_patch_grid_and_float_images():
    backbone = create_backbone("random-vit-smoke")
    images = np.zeros((2, 32, 32), dtype=np.uint8)
    with pytest.raises(ValueError, match="multiple of"):
        patch_pca_rgb(backbone, images, image_size=30)
    with pytest.raises(ValueError, match="uint8"):
        patch_pca_rgb(backbone, images.astype(np.float32))


def test_plot_patch_pca_draws_image_and_colour_rows():
    import matplotlib.pyplot as plt

    grids, _, _ = _synthetic(n=3)
    out = pca_rgb_from_grids(grids)
    images = np.zeros((3, 6, 6), dtype=np.uint8)
    fig = plot_patch_pca(images, out, "PCA test", ncols=2)
    assert fig.get_suptitle() == "PCA test" and len(fig.axes) == 2 * 2 * 2
    plt.close(fig)
    with pytest.raises(ValueError, match="PCA colourings"):
        plot_patch_pca(images[:2], out, "bad")

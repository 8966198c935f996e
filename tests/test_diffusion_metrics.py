"""Tests of medlib.diffusion.metrics: the offline FID Inception mapping, FID / KID, FD, PRDC and memorisation."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch

from medlib.cache import file_hash
from medlib.config import cache_dir
from medlib.diffusion import metrics as M
from medlib.models.backbones import create_backbone

BACKBONE = "random-vit-smoke"  # 32 px, 48-d CLS, random init: fast and needs no weights file


def _smooth(n: int, size: int = 32, seed: int = 0, freq: float = 3.0) -> np.ndarray:
    """Random smooth grey images (blurred noise + a sinusoid): distinct, deterministic per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        phase, angle = rng.uniform(0, 2 * np.pi, 2)
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        cells = -(-size // 4)
        noise = rng.normal(size=(cells, cells)).repeat(4, 0).repeat(4, 1)[:size, :size]
        out.append(np.clip(128 + 60 * wave + 25 * noise, 0, 255))
    return np.stack(out).astype(np.uint8)


def _noise(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(BACKBONE)


# --------------------------------------------------------------------------- the offline Inception


def test_mapped_weights_reproduce_fid_helper_features():
    """The same images through fid-helper's TorchScript net and torch-fidelity's extractor: equal 2048-d features."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    script = M._load_fid_helper(M.fid_helper_model_path())
    for images in (_smooth(2, size=299, seed=3), _smooth(1, size=48, seed=4)):
        ours = M.inception_features(images, batch_size=2)
        x = M._to_nchw_uint8(images).float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)  # torch-fidelity's
        with torch.no_grad():
            ref = script((x - 128) / 128).numpy()  # fid-helper's input range (-1, 0.9921875)
        assert ours.shape == ref.shape == (len(images), 2048)
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
        assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()


def test_weights_are_built_once_in_the_cache_keyed_by_source_hash():
    path = M.inception_weights_path()
    assert path.is_file() and cache_dir() in path.parents
    assert file_hash(M.fid_helper_model_path()) in path.name
    stamp = path.stat().st_mtime_ns
    M._WEIGHTS_MEMO.clear()  # force the file check again: it must reuse the file, not rewrite it
    assert M.inception_weights_path() == path and path.stat().st_mtime_ns == stamp
    state = torch.load(path, weights_only=True)
    assert torch.isnan(state["fc.weight"]).all()  # no classifier: logits can never look valid
    assert torch.equal(state["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))


def test_conversion_rejects_other_state_dicts():
    state = M._load_fid_helper(M.fid_helper_model_path()).state_dict()
    broken = dict(state)
    broken.pop("net.layers.mixed_4.tower.conv_1.weight")
    with pytest.raises(ValueError, match="missing"):
        M.convert_fid_helper_state_dict(broken)
    with pytest.raises(ValueError, match="unmapped"):
        M.convert_fid_helper_state_dict({**state, "net.layers.extra.weight": torch.zeros(1)})


def test_inception_score_is_refused():
    with pytest.raises(ValueError, match="classifier"):
        M.inception_score(_smooth(4))


def test_fid_kid_matches_torch_fidelity_calculate_metrics():
    """Our FID / KID equal torch-fidelity's own end-to-end call with the mapped weights (same data, same seed)."""
    import torch_fidelity

    real, fake = _smooth(5, seed=10), _noise(5, seed=12)
    out = M.fid_kid(real, fake, batch_size=4, kid_subsets=20, seed=7)
    assert set(out) >= {"fid", "kid_mean", "kid_std", "n_real", "n_fake"}
    assert out["extractor"] == M.INCEPTION_NAME and out["n_real"] == out["n_fake"] == 5
    assert out["kid_subset_size"] == 5 and out["fid_method"].startswith("exact")  # min(1000, n); n <= 2048
    ref = torch_fidelity.calculate_metrics(
        input1=M.UInt8ImageDataset(fake), input2=M.UInt8ImageDataset(real), fid=True, kid=True, cuda=False,
        feature_extractor=M.TORCH_FIDELITY_EXTRACTOR, feature_extractor_weights_path=str(M.inception_weights_path()),
        kid_subsets=20, kid_subset_size=5, rng_seed=7, batch_size=4, cache=False, save_cpu_ram=True, verbose=False)
    assert out["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert out["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert math.isnan(out["kid_std"]), "every subset is the whole set: no spread was measured"
    assert out["fid"] > 0 and out["kid_mean"] > 0
    sub = M.fid_kid(real, fake, batch_size=4, kid_subsets=20, kid_subset_size=3, seed=7)
    ref = torch_fidelity.calculate_metrics(
        input1=M.UInt8ImageDataset(fake), input2=M.UInt8ImageDataset(real), fid=False, kid=True, cuda=False,
        feature_extractor=M.TORCH_FIDELITY_EXTRACTOR, feature_extractor_weights_path=str(M.inception_weights_path()),
        kid_subsets=20, kid_subset_size=3, rng_seed=7, batch_size=4, cache=False, save_cpu_ram=True, verbose=False)
    assert sub["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4)
    assert sub["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-4) and sub["kid_std"] > 0


def test_fid_ranks_sets_and_caches_features():
    real, same, other = _smooth(5, seed=10), _smooth(5, seed=11), _noise(5, seed=12)
    f_real = M.inception_features(real)
    assert f_real.shape == (5, 2048) and f_real.dtype == np.float32
    M.inception_features(same)  # self-contained: under pytest-xdist the test above may run on another worker
    assert len(list((cache_dir() / "inception_features").glob("*/features.npy"))) >= 2
    np.testing.assert_array_equal(M.inception_features(real, cache=False), f_real)  # recomputed: identical
    near, far = M.fid_kid(real, same)["fid"], M.fid_kid(real, other)["fid"]
    assert near < 0.5 * far
    assert abs(M.frechet_distance(f_real, f_real)) < 1e-6 * far


def test_fid_kid_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        M.fid_kid(_smooth(1), _smooth(3))
    with pytest.raises(ValueError, match="kid_subset_size"):
        M.fid_kid(_smooth(3), _smooth(4), kid_subset_size=4)
    with pytest.raises(ValueError, match="uint8"):
        M.fid_kid(_smooth(3).astype(np.float32), _smooth(3))
    with pytest.raises(ValueError, match="shape"):
        M.fid_kid(np.zeros((3, 8, 8, 2), np.uint8), _smooth(3))


def test_uint8_dataset_gives_three_channel_uint8_tensors():
    grey = _smooth(3, size=16)
    for images in (grey, grey[..., None], np.repeat(grey[..., None], 3, axis=-1)):
        ds = M.UInt8ImageDataset(images)
        assert len(ds) == 3 and ds[1].dtype == torch.uint8 and ds[1].shape == (3, 16, 16)
        assert torch.equal(ds[1][2], torch.from_numpy(grey[1]))


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    # equal covariances: FD = ||mu1 - mu2||^2
    assert M.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert abs(M.frechet_distance(a, a)) < 1e-8
    b = rng.normal(size=(150, 6)) * 2 + 1
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-8)
    # diagonal Gaussians: FD = ||mu||^2 + sum (s1 - s2)^2 with s the standard deviations
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.5])
    mu = np.array([1.0, 0.0, -1.0])
    expected = mu @ mu + np.sum((s1 - s2) ** 2)
    assert M.frechet_distance_from_stats(mu, np.diag(s1**2), np.zeros(3), np.diag(s2**2)) == pytest.approx(expected)


def test_frechet_distance_matches_torch_fidelity_and_survives_rank_deficiency():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 10)), rng.normal(size=(30, 10)) * 1.5 + 0.3
    stats = [{"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert M.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    # fewer samples than dimensions: singular covariances; the sample route (SVD) agrees with sqrtm / eigh on the
    # covariances and with torch-fidelity, and gives ~0 for identical sets
    c, d = rng.normal(size=(6, 64)), rng.normal(size=(9, 64)) * 0.7 + 0.2
    s1, s2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    fd = M.frechet_distance(c, d)
    assert fd == pytest.approx(M.frechet_distance_from_stats(c.mean(0), s1, d.mean(0), s2), rel=1e-5)
    direct = fd - np.sum((c.mean(0) - d.mean(0)) ** 2) - np.trace(s1) - np.trace(s2)
    assert -2 * M._trace_sqrt_product_psd(s1, s2) == pytest.approx(direct, rel=1e-6)
    ref = fid_statistics_to_metric({"mu": c.mean(0), "sigma": s1}, {"mu": d.mean(0), "sigma": s2}, verbose=False)
    assert fd == pytest.approx(ref["frechet_inception_distance"], rel=1e-5)
    assert abs(M.frechet_distance(c, c)) < 1e-9 * np.trace(s1)


def test_frechet_distance_rejects_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="2-D"):
        M.frechet_distance(np.zeros(5), x)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(x[:1], x)
    with pytest.raises(ValueError, match="widths differ"):
        M.frechet_distance(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.full((5, 3), np.nan), x)


# --------------------------------------------------------------------------- SSL features


def test_ssl_features_shape_determinism_and_batching(backbone):
    images = _smooth(5, size=40)
    f1 = M.ssl_features(images, backbone, batch_size=2)
    f2 = M.ssl_features(images, backbone, batch_size=64)
    assert f1.shape == (5, backbone.embed_dim) and f1.dtype == np.float32
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    rgb = np.repeat(images[..., None], 3, axis=-1)
    np.testing.assert_allclose(M.ssl_features(rgb, backbone), f1, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f1[0], f1[1])  # different images, different features
    assert M.ssl_features(images, BACKBONE).shape == f1.shape  # a registry name works too
    with pytest.raises(ValueError, match="patch size"):
        M.ssl_features(images, backbone, image_size=30)
    with pytest.raises(ValueError, match="batch_size"):
        M.ssl_features(images, backbone, batch_size=0)


def test_ssl_preprocess_resizes_and_normalises():
    images = np.full((2, 20, 20), 255, np.uint8)
    x = M.ssl_preprocess(images, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


def test_fd_ssl_zero_for_identical_sets_and_names(backbone):
    a, b = _smooth(6, seed=20), _noise(6, seed=21)
    assert abs(M.fd_ssl(a, a, backbone)) < 1e-6
    assert M.fd_ssl(a, b, backbone) > 1e-3
    assert M.fd_name("dinov2-vit-l14") == "FD_DINOv2"
    assert M.fd_name(backbone) == f"FD_{BACKBONE}"
    assert M.fd_backbone_name("paper") == "dinov2-vit-l14"
    assert M.fd_backbone_name("smoke") == "ssl-natural-vit-tiny"
    with pytest.raises(ValueError, match="Backbone"):
        M.fd_ssl(a, a, 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PRDC


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    same = M.prdc(x, x, k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=1e-12)  # each ball holds itself + k-1 others: exactly 1
    far = M.prdc(x, x + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_computed_example():
    real = np.array([[0.0], [1.0], [3.0]])
    fake = np.array([[0.5], [2.9], [10.0]])
    out = M.prdc(real, fake, k=1)
    # k=1 radii: real 1, 1, 2; fake 2.4, 2.4, 7.1. Fake 0.5 lies in the balls of real 0 and 1, fake 2.9 in
    # that of real 3, fake 10 in none -> precision 2/3, density 3/3; every real point is in a fake ball and
    # its nearest fake is closer than its own radius -> recall = coverage = 1.
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(1.0)
    assert out["density"] == pytest.approx(1.0)  # (2 + 1 + 0) / (k * 3)
    assert out["coverage"] == pytest.approx(1.0)


def test_prdc_matches_reference_package_and_is_chunk_invariant():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(80, 5)), rng.normal(size=(70, 5)) * 1.3 + 0.4
    ours = M.prdc(real, fake, k=5)
    assert M.prdc(real, fake, k=5, chunk=7) == pytest.approx(ours)
    prdc_pkg = pytest.importorskip("prdc")  # reference only (Naeem et al.'s code); not a medlib dependency
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ref = prdc_pkg.compute_prdc(real, fake, nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key


def test_prdc_rejects_bad_input():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="more than k"):
        M.prdc(x, x, k=4)
    with pytest.raises(ValueError, match="positive integer"):
        M.prdc(x, x, k=0)
    with pytest.raises(ValueError, match="widths differ"):
        M.prdc(x, np.zeros((4, 3)), k=1)


# --------------------------------------------------------------------------- memorisation


def test_pixel_vectors_distance_scale():
    images = _smooth(2, size=64, seed=5)
    v = M.pixel_vectors(images, size=32)
    assert v.shape == (2, 32 * 32)
    assert np.linalg.norm(v[0]) == pytest.approx(1.0)  # z-scored / sqrt(P): unit norm
    brighter = (images.astype(np.int32) // 2 + 60).astype(np.uint8)  # brightness / contrast change only
    assert np.linalg.norm(M.pixel_vectors(brighter, 32)[0] - v[0]) < 0.05
    assert np.linalg.norm(v[0] - v[1]) > 0.5


def test_memorisation_flags_copies(backbone):
    train, heldout = _smooth(20, seed=30), _smooth(10, seed=31)
    copies = [3, 7, 11, 15, 19]
    synthetic = np.concatenate([train[copies], _smooth(5, seed=32)])
    res = M.memorisation(train, synthetic, heldout, backbone=backbone)
    assert res.nn_pixel.shape == res.nn_feature.shape == (10,)
    assert res.heldout_nn_pixel.shape == res.heldout_nn_feature.shape == (10,)
    np.testing.assert_allclose(res.nn_pixel[:5], 0, atol=1e-6)
    np.testing.assert_allclose(res.nn_feature[:5], 0, atol=1e-5)
    assert res.nn_index_pixel[:5].tolist() == copies and res.nn_index_feature[:5].tolist() == copies
    assert sorted(res.closest_pairs[:5, 0].tolist()) == [0, 1, 2, 3, 4]
    assert {tuple(p) for p in res.closest_pairs[:5].tolist()} == {(i, c) for i, c in enumerate(copies)}
    assert res.near_copy_share_pixel >= 0.5 and res.near_copy_share_feature >= 0.5
    assert res.threshold_pixel == pytest.approx(np.quantile(res.heldout_nn_pixel, 0.01))
    explicit = M.memorisation(train, synthetic, heldout, threshold_pixel=0.1)
    assert explicit.near_copy_share_pixel == 0.5 and explicit.nn_feature is None
    summary = res.summary()
    assert summary["near_copy_share_pixel"] == res.near_copy_share_pixel and "median_nn_feature" in summary


def test_memorisation_with_given_features_and_bad_input():
    train, synthetic, heldout = _smooth(6, seed=40), _smooth(4, seed=41), _smooth(3, seed=42)
    rng = np.random.default_rng(0)
    ft, fs, fh = rng.normal(size=(6, 4)), rng.normal(size=(4, 4)), rng.normal(size=(3, 4))
    fs[0] = 2.5 * ft[2]  # same direction: cosine distance 0
    res = M.memorisation(train, synthetic, heldout, train_feats=ft, synthetic_feats=fs, heldout_feats=fh)
    assert res.feature_extractor == "given features"
    assert res.nn_index_feature[0] == 2 and res.nn_feature[0] == pytest.approx(0, abs=1e-12)
    assert res.closest_pairs_feature[0].tolist() == [0, 2]
    with pytest.raises(ValueError, match="all three"):
        M.memorisation(train, synthetic, heldout, train_feats=ft)
    with pytest.raises(ValueError, match="rows"):
        M.memorisation(train, synthetic, heldout, train_feats=ft[:5], synthetic_feats=fs, heldout_feats=fh)
    with pytest.raises(ValueError, match="quantile"):
        M.memorisation(train, synthetic, heldout, quantile=1.5)


def test_plot_memorisation(backbone):
    import matplotlib.figure
    import matplotlib.pyplot as plt

    train, heldout, synthetic = _smooth(8, seed=50), _smooth(4, seed=51), _smooth(4, seed=52)
    res = M.memorisation(train, synthetic, heldout, backbone=backbone)
    fig = M.plot_memorisation(res, train, synthetic, n_pairs=3)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 2 * 3 + 2  # three pairs (two rows) + pixel and feature histograms
    assert all(ax.get_xlabel() for ax in fig.axes[-2:])
    plt.close(fig)
    with pytest.raises(ValueError, match="do not match"):
        M.plot_memorisation(res, train, synthetic[:3])
    with pytest.raises(ValueError, match="n_pairs"):
        M.plot_memorisation(res, train, synthetic, n_pairs=0)


# --------------------------------------------------------------------------- the report


def test_generative_report_and_frame(backbone):
    train, heldout = _smooth(12, seed=60), _smooth(6, seed=61)
    good, bad = _smooth(6, seed=62), _noise(6, seed=63)
    reports = {
        "similar": M.generative_report(train, heldout, good, backbone=backbone, fid=True, k=2),
        "noise": M.generative_report(train, heldout, bad, backbone=backbone, fid=False, k=2),
    }
    rep = reports["similar"]
    assert rep["inception_extractor"] == M.INCEPTION_NAME and np.isfinite(rep["fid"]) and rep["kid_subset_size"] == 6
    assert rep["fd_name"] == f"FD_{BACKBONE}" and BACKBONE in rep["ssl_extractor"]
    assert isinstance(rep["memorisation"], M.MemorisationResult)
    assert 0 <= rep["precision"] <= 1 and 0 <= rep["coverage"] <= 1 and rep["prdc_k"] == 2
    assert np.isnan(reports["noise"]["fid"]) and reports["noise"]["inception_extractor"] is None
    assert reports["noise"]["fd_ssl"] > rep["fd_ssl"]
    assert reports["noise"]["coverage"] <= rep["coverage"]
    small = M.generative_report(train, heldout[:3], good[:4], backbone=backbone, fid=False)
    assert small["prdc_k"] == 2  # k = 5 capped at min(3, 4) - 1
    frame = M.report_frame(reports)
    assert frame["condition"].tolist() == ["similar", "noise"]
    assert "memorisation" not in frame.columns and "near_copy_share_pixel" in frame.columns
    with pytest.raises(ValueError, match="no reports"):
        M.report_frame({})


@pytest.mark.gpu
def test_fid_kid_on_gpu_matches_cpu():
    real, fake = _smooth(4, seed=70), _noise(4, seed=71)
    cpu = M.fid_kid(real, fake, device="cpu")
    gpu = M.fid_kid(real, fake, device="cuda")
    assert gpu["fid"] == pytest.approx(cpu["fid"], rel=1e-2)
    assert gpu["kid_mean"] == pytest.approx(cpu["kid_mean"], rel=5e-2, abs=1e-4)

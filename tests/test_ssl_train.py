"""medlib.ssl.train: the DINOv2 loop runs, resumes exactly, warns on collapse, learns, and runs under DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from medlib.config import SSLConfig, get_profile
from medlib.engine import save_weights
from medlib.ssl.dino import IMAGENET_MEAN, IMAGENET_STD, vit_tokens
from medlib.ssl.train import _prepare_backbone, _validate, batch_indices, images_to_tensor, train_ssl

REPO = Path(__file__).resolve().parent.parent


def tiny_vit(img_size: int = 32, seed: int = 0, **kw) -> torch.nn.Module:
    """The test ViT of the brief: 48-dim, 2 blocks, patch 8, dynamic image size."""
    torch.manual_seed(seed)
    kw.setdefault("dynamic_img_size", True)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8, embed_dim=48,
                             depth=2, num_heads=2, **kw)


def smoke_cfg(**kw) -> SSLConfig:
    """The smoke profile's recipe (32 px globals, 16 px locals, 64 prototypes), with changes."""
    return dataclasses.replace(get_profile("smoke").ssl, **kw)


def noise_images(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random uint8 grey images."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Exactly equal state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- inputs


def test_images_to_tensor_channels_and_errors():
    grey = noise_images(2, 8)
    t = images_to_tensor(grey, 3)
    assert t.shape == (2, 3, 8, 8) and t.dtype == torch.uint8 and torch.equal(t[:, 0], t[:, 2])
    rgb = np.zeros((2, 8, 8, 3), np.uint8)
    rgb[..., 0] = 100
    assert images_to_tensor(rgb, 3).shape == (2, 3, 8, 8)
    assert images_to_tensor(rgb, 1)[0, 0, 0, 0].item() == 30  # luma of (100, 0, 0)
    with pytest.raises(TypeError, match="uint8"):
        images_to_tensor(grey.astype(np.float32), 3)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        images_to_tensor(np.zeros((2, 8, 8, 4), np.uint8), 3)


def test_batch_indices_are_pure_and_cover_each_epoch():
    assert np.array_equal(batch_indices(10, 4, 0, 3), batch_indices(10, 4, 0, 3))
    first_epoch = np.concatenate([batch_indices(12, 4, 0, s) for s in range(3)])
    assert sorted(first_epoch) == list(range(12))
    assert not np.array_equal(batch_indices(12, 4, 0, 0), batch_indices(12, 4, 1, 0))
    big = batch_indices(5, 12, 0, 0)  # batch larger than the data: wraps over epochs
    assert len(big) == 12 and sorted(big[:5]) == list(range(5))


# --------------------------------------------------------------------------- training runs


def test_train_ssl_smoke_outputs(tmp_path):
    backbone = tiny_vit()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = train_ssl(backbone, noise_images(), smoke_cfg(), out_dir=tmp_path, seed=0, device="cpu", progress=False)
    h = result.history
    assert len(h) == 4 and result.steps_done == 4
    for column in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "weight_decay", "momentum", "teacher_temp",
                   "teacher_entropy", "teacher_marginal_entropy", "feature_std", "collapse"):
        assert column in h
    assert np.isfinite(h[["loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy"]].to_numpy()).all()
    assert h["lr"].iloc[0] == 0.0 and h["teacher_temp"].iloc[-1] == pytest.approx(0.07)
    assert (h["n_masked"] > 0).all() and h["last_layer_frozen"].tolist() == [True, False, False, False]
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # caller's model untouched
    assert result.teacher.state_dict().keys() == backbone.state_dict().keys()
    assert not torch.equal(result.student.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)
    for name in ("checkpoint.pt", "history.csv", "student_backbone.safetensors", "teacher_backbone.safetensors",
                 "run.json"):
        assert (tmp_path / name).is_file(), name
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["steps_done"] == 4 and run["config"]["n_prototypes"] == 64 and result.images_per_s > 0


def test_train_ssl_leaves_the_callers_random_state_alone(tmp_path):
    backbone = tiny_vit()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_ssl(backbone, noise_images(), smoke_cfg(steps=1), out_dir=tmp_path, seed=0, device="cpu", progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.gpu
def test_train_ssl_bf16_on_gpu(tmp_path):
    result = train_ssl(tiny_vit(), noise_images(), smoke_cfg(steps=3), out_dir=tmp_path, seed=0, device="cuda",
                       progress=False)
    assert np.isfinite(result.history["loss"]).all()
    assert next(result.teacher.parameters()).device.type == "cpu"  # exported backbones live on the CPU
    assert json.loads((tmp_path / "run.json").read_text())["device"].startswith("cuda")


@pytest.mark.parametrize("changes", [dict(centering="softmax"), dict(ibot_weight=0.0, n_local=0, clip_grad=0.0)])
def test_train_ssl_variants_run(tmp_path, changes):
    result = train_ssl(tiny_vit(), noise_images(), smoke_cfg(steps=2, **changes), out_dir=tmp_path, seed=1,
                       device="cpu", progress=False)
    assert np.isfinite(result.history["loss"]).all()
    if changes.get("ibot_weight") == 0.0:
        assert (result.history["ibot_loss"] == 0).all() and (result.history["n_masked"] == 0).all()


def test_resume_after_stop_is_exact(tmp_path):
    cfg = smoke_cfg(steps=6, checkpoint_every=3)
    images = noise_images()
    full = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "full", seed=3, device="cpu", progress=False)
    half = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "split", seed=3, device="cpu", progress=False,
                     stop_after=3)
    assert half.steps_done == 3 and not state_equal(half.student, full.student)
    rest = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "split", seed=3, device="cpu", progress=False)
    assert rest.steps_done == 6
    assert state_equal(rest.student, full.student) and state_equal(rest.teacher, full.teacher)
    pd.testing.assert_frame_equal(rest.history, full.history)
    again = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "split", seed=3, device="cpu", progress=False)
    assert again.steps_done == 6 and np.isnan(again.images_per_s) and state_equal(again.teacher, full.teacher)


def test_resume_after_crash_repeats_steps_since_last_checkpoint(tmp_path):
    cfg = smoke_cfg(steps=6, checkpoint_every=2)
    images = noise_images()

    def health(backbone: torch.nn.Module, step: int) -> dict[str, float]:
        return {"pos_abs": float(backbone.pos_embed.abs().mean())}

    def crashing_health(backbone: torch.nn.Module, step: int) -> dict[str, float]:
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return health(backbone, step)

    full = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "a", seed=5, device="cpu", progress=False,
                     health_fn=health)
    with pytest.raises(KeyboardInterrupt):
        train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "b", seed=5, device="cpu", progress=False,
                  health_fn=crashing_health)
    resumed = train_ssl(tiny_vit(), images, cfg, out_dir=tmp_path / "b", seed=5, device="cpu", progress=False,
                        health_fn=health)
    assert state_equal(resumed.student, full.student) and state_equal(resumed.teacher, full.teacher)
    pd.testing.assert_frame_equal(resumed.history, full.history)
    assert full.history["health_pos_abs"].notna().tolist() == [False, True, False, True, False, True]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    images = noise_images()
    train_ssl(tiny_vit(), images, smoke_cfg(steps=2), out_dir=tmp_path, seed=0, device="cpu", progress=False)
    with pytest.raises(ValueError, match="different run"):
        train_ssl(tiny_vit(), images, smoke_cfg(steps=3), out_dir=tmp_path, seed=0, device="cpu", progress=False)


def test_continued_pretraining_loads_weights_and_interpolates(tmp_path):
    source = tiny_vit(img_size=64, seed=7)  # "public" weights at another resolution
    path = save_weights(source, tmp_path / "public.safetensors")
    cfg = smoke_cfg()
    prepared = _prepare_backbone(tiny_vit(img_size=48), cfg, init_from=path)
    assert tuple(prepared.patch_embed.img_size) == (32, 32) and prepared.pos_embed.shape == (1, 17, 48)
    assert torch.equal(prepared.blocks[1].attn.proj.weight, source.blocks[1].attn.proj.weight)
    result = train_ssl(tiny_vit(img_size=48), noise_images(), cfg, out_dir=tmp_path / "run", seed=0, device="cpu",
                       progress=False, init_from=path)
    assert result.teacher.pos_embed.shape == (1, 17, 48) and np.isfinite(result.history["loss"]).all()


def test_fixed_size_backbone_with_local_crops_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        train_ssl(tiny_vit(dynamic_img_size=False), noise_images(), smoke_cfg(), out_dir=tmp_path, seed=0,
                  device="cpu", progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="divisible by the 2 processes"):
        _validate(smoke_cfg(batch_size=7), 2)
    with pytest.raises(ValueError, match="centering"):
        _validate(smoke_cfg(centering="kmeans"), 1)
    with pytest.raises(ValueError, match="steps"):
        _validate(smoke_cfg(steps=0), 1)


def test_collapse_is_warned_loudly_and_recorded(tmp_path):
    constant = np.zeros((16, 32, 32), np.uint8)  # black: every crop, jittered or not, is identical
    cfg = smoke_cfg(steps=3, warmup_steps=0, freeze_last_layer_steps=0, koleo_weight=0.0, mask_probability=0.0,
                    drop_path=0.0)
    with pytest.warns(RuntimeWarning) as record:
        result = train_ssl(tiny_vit(), constant, cfg, out_dir=tmp_path, seed=0, device="cpu", progress=False)
    messages = [str(w.message) for w in record]
    assert any("COLLAPSE SUSPECTED" in m and "feature std 0.0000" in m and "koleo_weight" in m for m in messages)
    assert "features" in result.collapse and result.history["collapse"].str.contains("features").all()


# --------------------------------------------------------------------------- learning and DDP (slow)


def stripes(n: int, seed: int, size: int = 32, noise: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal (0) or vertical (1) square-wave stripes of random period, phase and grey levels, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, size, size), np.uint8)
    for i in range(n):
        period, phase = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
        lo, hi = np.sort(rng.uniform(0, 255, 2))
        coord = yy if labels[i] == 0 else xx
        wave = (np.sin(2 * np.pi * coord / period + phase) > 0).astype(float)
        images[i] = np.clip(lo + (hi - lo) * wave + rng.normal(0, noise, (size, size)), 0, 255).astype(np.uint8)
    return images, labels


def knn_accuracy(backbone: torch.nn.Module, train: tuple, test: tuple, k: int = 10) -> float:
    """Cosine kNN (majority of k) on L2-normalised CLS tokens."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def feats(images: np.ndarray) -> torch.Tensor:
        x = (images_to_tensor(images, 3).float() / 255 - mean) / std
        with torch.no_grad():
            return F.normalize(vit_tokens(backbone.eval(), x)[:, 0], dim=-1)

    f_train, f_test = feats(train[0]), feats(test[0])
    neighbours = (f_test @ f_train.T).topk(k, dim=1).indices
    votes = torch.from_numpy(train[1])[neighbours].float().mean(1)
    return float(((votes > 0.5).long().numpy() == test[1]).mean())


@pytest.mark.slow
def test_recipe_learns_stripe_orientation_without_collapse(tmp_path):
    train_images, _ = stripes(512, seed=1)
    probe_train, probe_test = stripes(200, seed=2), stripes(400, seed=3)
    backbone = tiny_vit()
    random_acc = knn_accuracy(backbone, probe_train, probe_test)
    # Sinkhorn-Knopp centering, lr warm-up, frozen last layer; a constant teacher temperature of 0.04 and a faster
    # teacher (momentum 0.98 -> 1) suit a 300-step run (the official 0.04 -> 0.07 warm-up spans 30 epochs).
    cfg = smoke_cfg(global_size=32, local_size=16, n_local=4, batch_size=32, steps=300, warmup_steps=20,
                    freeze_last_layer_steps=20, base_lr=1e-2, n_prototypes=64, head_hidden=128, head_bottleneck=64,
                    teacher_temp=(0.04, 0.04), teacher_temp_warmup_steps=0, teacher_momentum=(0.98, 1.0),
                    drop_path=0.0, checkpoint_every=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a collapse warning fails the test
        result = train_ssl(backbone, train_images, cfg, out_dir=tmp_path, seed=0, device="cpu", progress=False)
    teacher_acc = knn_accuracy(result.teacher, probe_train, probe_test)
    student_acc = knn_accuracy(result.student, probe_train, probe_test)
    h = result.history
    assert result.collapse == [] and (h["collapse"] == "").all()
    # measured here: random 0.69, teacher 0.80, student 0.82 (seeds 0 and 1 alike)
    assert min(teacher_acc, student_acc) >= random_acc + 0.08, (random_acc, teacher_acc, student_acc)
    assert h["dino_loss"].tail(20).mean() < h["dino_loss"].head(20).mean() - 0.3
    assert h["teacher_entropy"].tail(20).mean() < 0.9 * np.log(64)


@pytest.mark.slow
def test_ddp_two_cpu_processes_hold_identical_weights(tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed next to the interpreter")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    port = str(29500 + os.getpid() % 1000)
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           str(REPO / "tests" / "_ddp_ssl_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2] and all(r["finite"] and r["steps"] == 3 for r in records)
    assert records[0]["student"] == records[1]["student"] and records[0]["teacher"] == records[1]["teacher"]
    assert records[0]["student"] != records[0]["initial"]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    shutil.rmtree(tmp_path / "run")

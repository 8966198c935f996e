"""Every branch on CUDA reached without a GPU: device-agnostic paths under the GPU switches (medlib.accel), a
faked ``torch.cuda`` where only the decision is tested, and - in one slow test - every notebook executed under the
``gpu-switches`` profile (bf16 autocast, torch.compile, DataLoader workers + pin_memory, accelerate bf16, ViT-S/14).

Branches that cannot run here, one line each:
- medlib/diffusion/metrics.py ``torch.cuda.device(...)`` / torch-fidelity ``cuda=True``: needs a CUDA device
  (its device validation is tested below; the GPU run is tests/test_diffusion_metrics.py::test_fid_kid_on_gpu...).
- medlib/models/build.py and medlib/diffusion/build.py cards: ``torch.cuda.get_device_name()`` needs a CUDA
  device; it only names the card in the model card, after the (device-agnostic) build.
- medlib/ssl/dino.py ``dist.is_initialized()`` all-reduce branches: DDP, covered by tests/_ddp_ssl_worker.py (gloo, CPU).
- benchmarks/ ``device.startswith("cuda")`` (``torch.cuda.synchronize``, compile only on a GPU): benchmarks time
  a GPU; the compiled bf16 paths they time run here through medlib.accel in the slow notebook test.
- pinned memory itself: ``Tensor.pin_memory()`` needs an accelerator; on a CPU-only machine torch's DataLoader
  skips pinning, so the tests below check that the loader is asked to pin (the switch), not the page-locking.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medlib import accel
from medlib.config import autocast_dtype, get_profile, resolve_device

ROOT = Path(__file__).resolve().parent.parent
GPU_SWITCHES = accel.switches_for(get_profile("gpu-switches"))


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` says a bf16-capable GPU is there: only for code that decides, never allocates, on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# ------------------------------------------------------------------------------------- decisions on the device


def test_resolve_device_picks_cuda_when_a_gpu_is_visible(fake_cuda):
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"


def test_resolve_device_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_autocast_dtype_bf16_on_a_bf16_gpu_and_under_the_switches_on_the_cpu(fake_cuda):
    assert autocast_dtype("cuda") is torch.bfloat16
    with accel.use(accel.Switches()):
        assert autocast_dtype("cpu") is None
    with accel.use(get_profile("gpu-switches")):
        assert autocast_dtype("cpu") is torch.bfloat16


def test_switches_follow_the_profile_and_the_device(fake_cuda):
    gpu_on_cuda = accel.switches_for(get_profile("gpu"), "cuda")
    assert gpu_on_cuda.compile and gpu_on_cuda.pin_memory and gpu_on_cuda.num_workers == get_profile("gpu").num_workers
    assert not gpu_on_cuda.bf16  # a GPU gets bf16 from autocast_dtype's cuda branch, not from the switch
    assert not accel.switches_for(get_profile("smoke"), "cuda").compile and accel.switches_for(get_profile("smoke"), "cuda").pin_memory
    assert accel.switches_for(get_profile("paper"), "cuda").compile
    assert not accel.switches_for(get_profile("gpu"), "cpu").any  # the gpu profile on a CPU-only machine: plain fp32
    cpu = accel.switches_for(get_profile("gpu-switches"))
    assert cpu.bf16 and cpu.compile and cpu.pin_memory and cpu.num_workers > 0 and not cpu.dynamic


def test_a_profile_activates_its_switches_when_it_resolves_its_device():
    with accel.use(accel.Switches()):
        assert get_profile("gpu-switches").resolved_device() == "cpu"
        assert accel.active_switches() == GPU_SWITCHES
        get_profile("smoke").resolved_device()
        assert not accel.active_switches().any


def test_gpu_switches_profile_has_the_gpu_switches_and_smoke_sizes():
    p, smoke, gpu = get_profile("gpu-switches"), get_profile("smoke"), get_profile("gpu")
    assert p.device == "cpu" and p.backbone.arch == gpu.backbone.arch == "vit_small_patch14_dinov2"
    assert p.backbone.image_size % 14 == 0 and p.ssl.global_size % 14 == 0 and p.ssl.local_size % 14 == 0
    assert p.data.n_per_dataset == smoke.data.n_per_dataset and p.data.phantom_size % 14 == 0
    assert p.eval.batch_size == smoke.eval.batch_size
    assert any(name.endswith("vit-s14") for name in p.backbone.compare) and p.diffusion.encoder.endswith("vit-s14")


# ------------------------------------------------------------------------------------------------ accelerate


def test_make_accelerator_rejects_an_indexed_cuda_device():
    from medlib.engine import make_accelerator

    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        make_accelerator("cuda:1")


def test_accelerate_runs_bf16_autocast_on_the_cpu_under_the_switches():
    from medlib.engine import make_accelerator

    with accel.use(get_profile("gpu-switches")):
        acc = make_accelerator("cpu")
        assert acc.mixed_precision == "bf16"
        model, opt = acc.prepare(torch.nn.Linear(4, 2), torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
        with acc.autocast():
            out = model(torch.randn(3, 4))
        assert torch.equal(out, out.to(torch.bfloat16).float())  # computed in bf16 (accelerate returns fp32)
        acc.backward(out.float().sum())
    with accel.use(accel.Switches()):
        assert make_accelerator("cpu").mixed_precision == "no"


# ----------------------------------------------------------------------------------- feature cache, compile


def test_feature_loader_uses_workers_and_asks_for_pinned_memory():
    images = np.arange(10 * 4 * 4, dtype=np.uint8).reshape(10, 4, 4)
    loader = accel.feature_loader(images, 4, "cpu", GPU_SWITCHES)
    assert loader.num_workers == GPU_SWITCHES.num_workers > 0 and loader.pin_memory
    with accel.quiet_pinning():
        batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), images)
    plain = accel.feature_loader(images, 4, "cpu", accel.Switches())
    assert plain.num_workers == 0 and not plain.pin_memory


def test_features_under_the_gpu_switches_match_plain_fp32(tmp_path):
    """bf16 + torch.compile (inductor, one static graph: the last batch padded) + workers: the fp32 eager features."""
    from medlib.data.imageset import ImageSet
    from medlib.eval.features import extract_features
    from medlib.models.backbones import create_backbone

    rng = np.random.default_rng(0)
    ds = ImageSet(images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
                  labels=(np.arange(10) % 2).astype(np.float32)[:, None], label_names=["a"], task="binary",
                  patient_ids=np.array([str(i) for i in range(10)]), name="gpu-paths")
    backbone = create_backbone("random-vit-s14", image_size=28)
    with accel.use(accel.Switches()):
        plain = extract_features(backbone, ds, batch_size=4, device="cpu", cache=False)
    with accel.use(get_profile("gpu-switches")):
        fast = extract_features(backbone, ds, batch_size=4, device="cpu", cache=False)  # batches 4, 4, 2
    assert fast.cls.dtype == np.float32 and fast.cls.shape == plain.cls.shape
    cos = (fast.cls * plain.cls).sum(1) / np.linalg.norm(fast.cls, axis=1) / np.linalg.norm(plain.cls, axis=1)
    assert cos.min() > 0.98  # bf16 rounding, not a different computation


def test_compile_module_and_unet_follow_the_switch():
    fn = torch.nn.Linear(2, 2)
    assert accel.compile_module(fn, accel.Switches()) is fn
    assert accel.compile_module(fn, GPU_SWITCHES) is not fn

    class Pipe:
        unet = torch.nn.Linear(2, 2)

    assert not accel.compile_unet(Pipe, accel.Switches())
    assert accel.compile_unet(Pipe, GPU_SWITCHES) and Pipe.unet._compiled_call_impl is not None
    assert not accel.compile_unet(Pipe, GPU_SWITCHES)  # once


# ------------------------------------------------------------------------------------ diffusion, segmentation


def test_pipeline_predict_runs_bf16_under_the_switches():
    from medlib.diffusion.pipeline import build_pipeline
    from medlib.diffusion.vae import make_vae
    from medlib.models.backbones import create_backbone

    pipe = build_pipeline(create_backbone("random-vit-smoke"), make_vae(32, block_out_channels=(8, 16, 16), seed=1),
                          unet_block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                          attention_head_dim=8, seed=0)
    torch.nn.init.normal_(pipe.unet.conv_out.weight, std=0.1)
    tokens = pipe.encode_condition(np.zeros((2, 32, 32), np.uint8))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with accel.use(accel.Switches()):
            plain = pipe.predict(latents, torch.tensor(500), tokens, 2.0)
        with accel.use(get_profile("gpu-switches")):  # bf16 only: the compiled UNet (minutes to compile here) runs in notebook 04
            fast = pipe.predict(latents, torch.tensor(500), tokens, 2.0)
    assert fast.dtype is torch.float32
    torch.testing.assert_close(fast, plain, rtol=0.1, atol=0.1)


def test_segmentation_autocast_is_bf16_under_the_switches():
    from medlib.eval.segmentation import _autocast

    with accel.use(get_profile("gpu-switches")), _autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with accel.use(accel.Switches()), _autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_fid_device_check_reaches_the_cuda_branch_decision():
    from medlib.diffusion import metrics as M

    with pytest.raises(ValueError, match="device must be"):
        M.fid_kid(np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8), np.uint8), device="mps")


# -------------------------------------------------------------------------- every notebook under the switches


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.xdist_group("gpu-switches")  # its own group: runs beside the smoke reproduce tests
def test_every_notebook_runs_under_the_gpu_switches(tmp_path):
    """One run of all notebooks on the gpu-switches profile (CPU): every GPU-side path, end to end.

    Measured on the shared 2-core CI machine (load ~4): 520 s in all (00: 19 s, 01: 82 s, 02: 34 s, 03: 112 s,
    04: 266 s with the UNet compile), inductor's cache warm for notebook 01's three feature graphs; from a cold
    cache notebook 01 compiles them first (about 3-4 minutes more).
    """
    env = {**os.environ, "MEDLIB_CACHE": str(tmp_path / "cache"), "MEDLIB_FIGURES": str(tmp_path / "figures"),
           "MEDLIB_REPORTS": str(tmp_path / "reports"), "MEDLIB_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from medlib.reproduce import reproduce; "
            "runs = reproduce('gpu-switches', kernel='medlib', keep_going=True, force=True); "
            "[print('RUN', r.notebook, r.status, round(r.wall_time_s, 1), r.error) for r in runs]; "
            "sys.exit(any(r.status != 'ok' for r in runs))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=2700)
    runs = [line for line in proc.stdout.splitlines() if line.startswith("RUN ")]
    print("\n".join(runs), f"\ngpu-switches: all notebooks in {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, "\n".join(runs) + proc.stderr[-3000:]
    assert len(runs) == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.py")))

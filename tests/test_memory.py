"""medlib.memory: meta-device peak-memory estimates, checked against hand counts, real CPU tensors and an 80 GB card."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlib import memory


def test_saved_activations_of_a_linear_layer_are_its_input_by_hand():
    with torch.device("meta"):
        layer = nn.Linear(64, 32)
    x = torch.empty(16, 64, device="meta")
    # fp32: autograd saves the input (16 x 64 x 4 B); the weight is a parameter, not an activation
    assert memory.saved_activation_bytes(lambda: layer(x), layer.parameters()) == 16 * 64 * 4
    # bf16 autocast: the bf16 copies of the input and of the weight are saved (2 B each)
    with memory._autocast(True):
        got = memory.saved_activation_bytes(lambda: layer(x), layer.parameters())
    assert got == 16 * 64 * 2 + 32 * 64 * 2


def test_meta_estimate_equals_the_same_count_on_real_cpu_tensors():
    """The meta run saves exactly what a real CPU run saves (same ops, same shapes, same dtypes)."""
    import timm

    kwargs = dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2)
    real = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs).train()
    with torch.device("meta"):
        meta = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **kwargs).train()
    x_real, x_meta = torch.randn(4, 3, 28, 28), torch.empty(4, 3, 28, 28, device="meta")

    def real_bytes() -> int:  # the reference: distinct real storages by address
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in real.parameters()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            out = real.forward_features(x_real)
        del out
        return sum(seen.values())

    with torch.autocast("cpu", torch.bfloat16):
        estimate = memory.saved_activation_bytes(lambda: meta.forward_features(x_meta), meta.parameters())
    assert estimate == real_bytes()


def test_inference_peak_of_a_two_layer_mlp_by_hand():
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(10, 100), nn.ReLU(), nn.Linear(100, 5))
    x = torch.empty(8, 10, device="meta")
    # fc1 output (8 x 100 x 4) stays alive while relu makes its output (8 x 100 x 4); fc2's output is smaller
    assert memory.inference_peak_bytes(lambda: mlp(x)) == 2 * 8 * 100 * 4


def test_estimate_adds_grads_adamw_state_margin_and_overhead():
    est = memory.Estimate("job", 1, "", weights=100, grads=100, optimizer=200, activations=600)
    assert est.raw == 1000
    assert est.total == int(memory.MARGIN * 1000 + memory.OVERHEAD_GIB * memory.GiB)
    assert not memory.Estimate("big", 1, "", 0, 0, 0, activations=80 * 10**9).fits()


@pytest.fixture(scope="module")
def gpu_jobs() -> dict[str, memory.Estimate]:
    return {est.job: est for est in memory.profile_jobs("gpu")}


# The gpu profile's DINOv2 step (batch 256, 2 x 224 + 8 x 98 crops, 16,384 prototypes) is estimated at about
# 107 GiB: it does not fit one 80 GB card. Strict: this test fails (XPASS) once the profile is fixed.
SSL_JOB = "ssl (DINOv2 pre-training / continuation)"


def test_every_gpu_profile_job_fits_an_80_gb_card(gpu_jobs):
    too_big = {job: round(est.total / memory.GiB, 1) for job, est in gpu_jobs.items() if not est.fits()}
    assert set(too_big) <= {SSL_JOB}, f"gpu-profile jobs that do not fit an 80 GB card (GiB): {too_big}"
    assert len(gpu_jobs) >= 12


@pytest.mark.xfail(strict=True, reason="gpu profile ssl.batch_size=256 needs ~107 GiB (estimate); 128 would fit")
def test_the_gpu_profile_ssl_step_fits_an_80_gb_card(gpu_jobs):
    assert gpu_jobs[SSL_JOB].fits()


def test_the_ssl_step_at_half_the_batch_would_fit():
    import dataclasses

    from medlib.config import get_profile, override

    half = override(get_profile("gpu"), **{"ssl.batch_size": 128})
    assert dataclasses.asdict(half.ssl)["batch_size"] == 128
    assert memory.ssl_job(half).fits()


def test_cli_prints_the_table(capsys):
    code = memory.main(["--profile", "smoke"])
    out = capsys.readouterr().out
    assert code == 0 and "| job | batch |" in out and "LDM UNet training" in out

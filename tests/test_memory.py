"""medlib.memory: meta-device peak-memory estimates, checked against hand counts, real CPU tensors and an 80 GB card."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlib import memory


def test_saved_activations_of_a_linear_layer_by_hand():
    with torch.device("meta"):
        layer = nn.Linear(64, 32)
    x = torch.empty(16, 64, device="meta", requires_grad=True)  # an inner layer: its input needs a gradient too
    # fp32: autograd saves the input (16 x 64 x 4 B); the weight is a parameter, counted as weights
    assert memory.saved_activation_bytes(lambda: layer(x), layer.parameters()) == 16 * 64 * 4
    # bf16 autocast: the bf16 copies of the input (for the weight's gradient) and of the weight (for the input's)
    with memory._autocast(True):
        got = memory.saved_activation_bytes(lambda: layer(x), layer.parameters())
    assert got == 16 * 64 * 2 + 32 * 64 * 2


def test_meta_autocast_saves_what_cpu_autocast_saves_for_a_linear_layer():
    """MetaAutocast (meta) against torch's own autocast on real CPU tensors: the same saved tensors."""
    real = nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        real(x)
    assert sorted(saved, key=str) == sorted([((16, 64), torch.bfloat16), ((64, 32), torch.bfloat16)], key=str)
    # ... which is what the meta estimate counts (test above): 16 x 64 x 2 + 32 x 64 x 2 bytes


def test_meta_estimate_equals_the_same_count_on_real_cpu_tensors():
    """The meta run saves exactly what a real CPU run saves (same ops, same shapes, same dtypes): a ViT MLP block."""
    from timm.layers import Mlp

    torch.manual_seed(0)
    real = nn.Sequential(nn.LayerNorm(48), Mlp(48, 192), nn.LayerNorm(48), Mlp(48, 96)).train()
    with torch.device("meta"):
        meta = nn.Sequential(nn.LayerNorm(48), Mlp(48, 192), nn.LayerNorm(48), Mlp(48, 96)).train()
    x_real = torch.randn(4, 17, 48, requires_grad=True)
    x_meta = torch.empty(4, 17, 48, device="meta", requires_grad=True)

    def real_bytes() -> int:  # the reference: distinct real storages by address
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in real.parameters()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = real(x_real)
        del out
        return sum(seen.values())

    estimate = memory.saved_activation_bytes(lambda: meta(x_meta), meta.parameters())
    assert estimate == real_bytes() > 0


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


def test_every_gpu_profile_job_fits_an_80_gb_card(gpu_jobs):
    too_big = {job: round(est.total / memory.GiB, 1) for job, est in gpu_jobs.items() if not est.fits()}
    assert not too_big, f"gpu-profile jobs that do not fit an 80 GB card (GiB): {too_big}"
    assert len(gpu_jobs) >= 12


def test_a_batch_that_cannot_fit_fails_the_check():
    from medlib.config import get_profile, override

    big = override(get_profile("gpu"), **{"ssl.batch_size": 1024})  # DINOv2's global batch on one card
    assert not memory.ssl_job(big).fits()


def test_cli_prints_the_table(capsys):
    code = memory.main(["--profile", "smoke"])
    out = capsys.readouterr().out
    assert code == 0 and "| job | batch |" in out and "LDM UNet training" in out

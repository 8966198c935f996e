"""Benchmark scripts (run them directly; they are not tests)."""


def sync(device: str) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()

"""Benchmark scripts (run them directly; they are not tests)."""


def sync(device: str) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def sig3(x: float) -> float:
    """``x`` to three significant figures: the form every reported throughput takes."""
    return float(f"{float(x):.3g}")


def ratio(a: float, b: float, digits: int = 3) -> float:
    """The ratio of two *reported* figures (each at three significant figures), so a reader who divides the
    report's numbers gets the report's ratio."""
    return round(sig3(a) / sig3(b), digits)

"""Images per second of every phantom family (and the natural stand-in) at 128 px on one CPU core.

Run ``python -m benchmarks.bench_phantoms`` (or ``make bench``). Numeric libraries are limited to one
thread; each generator is warmed up, then timed over a fixed number of images. Two rates are printed:
wall-clock (what a user waits) and CPU-time (robust when other jobs share the machine).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

TARGET_CXR_PER_S = 300.0  # the design target for chest phantoms at 128 px on one core


def _rate(make: Callable[[int], object], n: int) -> tuple[float, float]:
    """(wall-clock images/s, CPU-time images/s) of ``make(i)`` over n indices after a warm-up."""
    for i in range(min(3, n)):
        make(10_000 + i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        make(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, n / max(cpu, 1e-9)


def main(size: int = 128, n: int = 300, natural_n: int = 40) -> dict[str, dict[str, float]]:
    """Measure images/s per family at ``size`` px on one core; print a table and return it."""
    from threadpoolctl import threadpool_limits

    from medlib.data import natural
    from medlib.data.phantoms import FAMILIES, generate_one

    import torch

    results: dict[str, dict[str, float]] = {}
    threads = torch.get_num_threads()
    with threadpool_limits(limits=1):
        torch.set_num_threads(1)
        for family in FAMILIES:
            count = n if family == "cxr" else max(n // 3, 20)
            wall, cpu = _rate(lambda i, f=family: generate_one(f, i, size=size), count)
            results[family] = {"images_per_s": wall, "cpu_images_per_s": cpu, "n": count}
        leaves = _rate(lambda i: natural.dead_leaves(np.random.default_rng(i), size), natural_n)
        shapes = _rate(lambda i: natural.labelled_image(np.random.default_rng(i), size, i % 8), natural_n)
        results["natural_dead_leaves"] = {"images_per_s": leaves[0], "cpu_images_per_s": leaves[1], "n": natural_n}
        results["natural_labelled"] = {"images_per_s": shapes[0], "cpu_images_per_s": shapes[1], "n": natural_n}
    torch.set_num_threads(threads)  # leave the caller's setting as it was
    print(f"Phantom generation at {size} px, one core")
    print(f"{'family':<22}{'images/s (wall)':>17}{'images/s (cpu)':>16}{'n':>6}")
    for name, row in results.items():
        print(f"{name:<22}{row['images_per_s']:>17.0f}{row['cpu_images_per_s']:>16.0f}{row['n']:>6d}")
    cxr = results["cxr"]["cpu_images_per_s"]
    verdict = "meets" if cxr >= TARGET_CXR_PER_S else "MISSES"
    print(f"chest phantoms: {cxr:.0f} images/s (cpu) {verdict} the target of {TARGET_CXR_PER_S:.0f}/s")
    return results


if __name__ == "__main__":
    main()

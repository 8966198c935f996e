"""`make bench`: run every benchmark, write reports/bench/bench.json and bench.md (machine named)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import pandas as pd

from medlib.cache import provenance
from medlib.reporting import to_markdown


def main(argv: list[str] | None = None) -> int:
    """Run the phantom and SSL benchmarks (GPU when present) and write their results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="reports/bench")
    parser.add_argument("--only", nargs="*",
                        choices=["phantoms", "ssl", "stats", "features", "diffusion", "reproduce"],
                        default=["phantoms", "ssl", "stats", "features", "diffusion", "reproduce"])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"provenance": provenance(machine_detail=platform.platform())}
    if "phantoms" in args.only:
        from . import bench_phantoms

        results["phantoms"] = bench_phantoms.main()
    if "ssl" in args.only:
        from . import bench_ssl

        results["ssl"] = bench_ssl.main()
    if "features" in args.only:
        from . import bench_features

        results["features"] = bench_features.main()
    if "diffusion" in args.only:
        from . import bench_diffusion

        results["diffusion"] = bench_diffusion.main()
    if "stats" in args.only:
        from . import bench_stats

        results["stats"] = bench_stats.main()
    if "reproduce" in args.only:
        from . import bench_reproduce

        results["reproduce"] = bench_reproduce.main()
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"# Benchmarks on {results['provenance']['machine']}", ""]
    if "phantoms" in results:
        df = pd.DataFrame(results["phantoms"]).T.reset_index().rename(columns={"index": "family"})
        lines += ["## Phantoms (images/s at 128 px, one core)", "", to_markdown(df, "{:.0f}"), ""]
    if "ssl" in results:
        lines += ["## DINOv2-recipe training", ""] + [f"- {k}: {v}" for k, v in results["ssl"].items()]
    if "stats" in results:
        lines += ["", "## Paired bootstrap (study 2)", ""] + [f"- {k}: {v}" for k, v in results["stats"].items()]
    if "features" in results:
        df = pd.DataFrame(results["features"]).T.reset_index().rename(columns={"index": "model"})
        lines += ["", "## Feature extraction (study 1): end to end vs model-only ceiling vs naive PIL/fp32 loader", "",
                  to_markdown(df), ""]
    if "diffusion" in results:
        lines += ["", "## DiNO-Diffusion UNet (study 4): ours vs the diffusers-example default", ""] + [
            f"- {k}: {v}" for k, v in results["diffusion"].items()]
    if "reproduce" in results:
        lines += ["", "## `make reproduce` wall times beside their budgets (smoke: cold cache; tiny: as recorded)",
                  ""] + [f"- {k}: {v}" for k, v in results["reproduce"].items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make reproduce` wall times beside their budgets: a cold `smoke` run, one notebook at a time and `--jobs auto`, the
recorded per-notebook times of the committed `tiny` reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Wall-time budgets of a whole `make reproduce` on two idle cores from a cold cache (seconds).
BUDGETS_S = {"smoke": 90.0, "tiny": 1200.0}


def cold_reproduce_s(profile: str = "smoke", jobs: int | str = 1, kernel: str = "medlib") -> dict[str, float]:
    """Wall seconds of ``python -m medlib.reproduce --profile <profile> --force --jobs <jobs>`` with an empty
    cache, reports and figures folder (all temporary), and each notebook's own recorded seconds."""
    with tempfile.TemporaryDirectory(prefix="medlib-bench-") as tmp:
        env = {**os.environ, "MEDLIB_CACHE": f"{tmp}/cache", "MEDLIB_REPORTS": f"{tmp}/reports",
               "MEDLIB_FIGURES": f"{tmp}/figures"}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "medlib.reproduce", "--profile", profile, "--kernel", kernel,
                               "--force", "--keep-going", "--jobs", str(jobs)], env=env, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"reproduce --profile {profile} --jobs {jobs} failed:\n{done.stderr[-2000:]}")
        records = json.loads((Path(tmp) / "reports" / profile / "runs.json").read_text())
    times = {name: round(float(r["wall_time_s"]), 1) for name, r in sorted(records.items())}
    return {"wall_s": round(wall, 1), **times}


def recorded_times(profile: str = "tiny", reports: Path | None = None) -> dict[str, object]:
    """Each notebook's last recorded wall time in ``reports/<profile>/runs.json`` (as committed), their sum, the
    span from the first start to the last end (the run's wall time when one run made them all, notebooks at once
    included) and the machine; the records do not say whether the caches were cold."""
    from datetime import datetime

    path = (reports or Path("reports")) / profile / "runs.json"
    if not path.is_file():
        return {"missing": str(path)}
    records = json.loads(path.read_text())
    times = {name: round(float(r.get("wall_time_s", float("nan"))), 1) for name, r in sorted(records.items())}
    out: dict[str, object] = {**times, "sum_s": round(sum(times.values()), 1)}
    try:
        ends = {name: datetime.strptime(r["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp() for name, r in records.items()}
        out["span_s"] = round(max(ends.values()) - min(ends[n] - float(records[n]["wall_time_s"]) for n in ends), 1)
    except (KeyError, TypeError, ValueError):
        pass  # records without end times: the sum stands alone
    out["machines"] = sorted({str(r.get("machine", "?")) for r in records.values()})
    return out


def main(jobs: tuple[int | str, ...] = (1, "auto")) -> dict[str, object]:
    """Cold `smoke` runs at each ``jobs`` and the committed `tiny` times, each beside its budget."""
    report: dict[str, object] = {"budget_smoke_s": BUDGETS_S["smoke"], "budget_tiny_s": BUDGETS_S["tiny"]}
    walls = {}
    for n in jobs:
        run = cold_reproduce_s("smoke", n)
        walls[n] = run["wall_s"]
        report[f"smoke_cold_jobs{n}"] = run
        report[f"smoke_cold_jobs{n}_within_budget"] = run["wall_s"] <= BUDGETS_S["smoke"]
    if 1 in walls and len(walls) > 1:
        report["smoke_speedup_vs_jobs1"] = {n: round(walls[1] / w, 2) for n, w in walls.items() if n != 1}
    tiny = recorded_times("tiny")
    report["tiny_recorded"] = tiny
    if "sum_s" in tiny:
        report["tiny_recorded_within_budget"] = float(tiny.get("span_s", tiny["sum_s"])) <= BUDGETS_S["tiny"]
    print(report)
    return report


if __name__ == "__main__":
    main()

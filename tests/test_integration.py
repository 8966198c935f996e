"""End to end: `make reproduce PROFILE=smoke` executes every notebook and its outputs parse."""

import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from medlib.eval import claims

ROOT = Path(__file__).resolve().parent.parent


def _reproduce(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """``make reproduce PROFILE=smoke`` into ``folder`` (reports, figures and an empty cache of its own)."""
    env = dict(os.environ, MEDLIB_REPORTS=str(folder / "reports"), MEDLIB_FIGURES=str(folder / "figures"),
               MEDLIB_CACHE=str(folder / "cache"))
    proc = subprocess.run(["make", "reproduce", "PROFILE=smoke", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=2400)  # two cores shared with the gpu-switches test: minutes, not seconds
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One smoke reproduce from an empty cache, shared by the tests below.

    ``MEDLIB_TEST_SMOKE_RUN`` names the folder (``make test`` passes one, then runs nbval on its warm cache);
    it must not exist yet, so the run still starts from an empty cache.
    """
    named = os.environ.get("MEDLIB_TEST_SMOKE_RUN")
    if named:
        folder = Path(named)
        assert not folder.exists(), f"MEDLIB_TEST_SMOKE_RUN={named} exists; the smoke run needs an empty folder"
        folder.mkdir(parents=True)
    else:
        folder = tmp_path_factory.mktemp("smoke_run")
    _reproduce(folder)
    return folder


@pytest.mark.slow
@pytest.mark.xdist_group("reproduce")
def test_make_reproduce_smoke(smoke_run):
    tmp_path = smoke_run
    reports = tmp_path / "reports" / "smoke"
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    runs = json.loads((reports / "runs.json").read_text())
    for name in notebooks:
        assert runs[name]["status"] == "ok"
        assert (reports / f"{name}.ipynb").stat().st_size > 0
        assert "<html" in (reports / f"{name}.html").read_text()[:2000].lower()
    tables = list((reports / "tables").glob("*.csv"))
    may_be_empty = ("_sanity_flags", "_input_resolution_check")  # no flag, or no U-Net left to check (smoke: off)
    assert tables and all(len(pd.read_csv(t)) > 0 for t in tables if not t.stem.endswith(may_be_empty))
    for table in tables:  # the same scans as the committed tiny reports get (tests/test_committed_reports.py)
        frame = pd.read_csv(table)
        assert not claims.interval_violations(frame), (table.name, claims.interval_violations(frame))
        assert not claims.stand_in_name_violations(frame), (table.name, claims.stand_in_name_violations(frame))
    for number in ("01", "02", "03", "04"):
        assert (reports / "tables" / f"{number}_claims.csv").exists(), f"notebook {number} wrote no claims table"
    for record in (tmp_path / "figures").glob("*_smoke.json"):
        texts = json.loads(record.read_text()).get("texts", [])
        assert not claims.figure_name_violations(texts), (record.name, claims.figure_name_violations(texts))
    figures = list((tmp_path / "figures").glob("00_*_smoke.png"))
    assert len(figures) >= 5
    assert (reports / "index.md").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("reproduce")
def test_a_second_run_from_an_empty_cache_writes_byte_identical_tables_and_an_unchanged_one_is_reused(
        smoke_run, tmp_path):
    _reproduce(tmp_path)
    first = sorted((smoke_run / "reports" / "smoke" / "tables").glob("*"))
    second = sorted((tmp_path / "reports" / "smoke" / "tables").glob("*"))
    # results: every table but the timing tables and the model cards (a card records its build: wall time, commit)
    results = [p for p in first if p.suffix in (".csv", ".md") and not p.stem.endswith(("_timing", "_card"))]
    assert [p.name for p in first] == [p.name for p in second]
    differ = [p.name for p in results if p.read_bytes() != (tmp_path / "reports" / "smoke" / "tables" /
                                                             p.name).read_bytes()]
    assert not differ, f"tables that differ between two runs from empty caches: {differ}"
    start = time.perf_counter()
    proc = _reproduce(tmp_path)  # nothing changed: every report is reused
    assert time.perf_counter() - start < 60, "an unchanged reproduce must take seconds, not minutes"
    assert proc.stdout.count("report reused") == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.py")))

"""End to end: `make reproduce PROFILE=smoke` executes every notebook and its outputs parse."""

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from medlib.eval import claims

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.xdist_group("reproduce")
def test_make_reproduce_smoke(tmp_path):
    env = dict(os.environ, MEDLIB_REPORTS=str(tmp_path / "reports"), MEDLIB_FIGURES=str(tmp_path / "figures"))
    proc = subprocess.run(["make", "reproduce", "PROFILE=smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = tmp_path / "reports" / "smoke"
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    runs = json.loads((reports / "runs.json").read_text())
    for name in notebooks:
        assert runs[name]["status"] == "ok"
        assert (reports / f"{name}.ipynb").stat().st_size > 0
        assert "<html" in (reports / f"{name}.html").read_text()[:2000].lower()
    tables = list((reports / "tables").glob("*.csv"))
    assert tables and all(len(pd.read_csv(t)) > 0 for t in tables if not t.stem.endswith("_sanity_flags"))
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

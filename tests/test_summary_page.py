"""The cross-study summary page, written from a temporary reports / figures / notebooks folder."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from medlib import summary_page
from medlib.reporting import paper_vs_ours, save_table

NOTEBOOK = textwrap.dedent('''\
    # %% [markdown]
    # # 07 - A study of seven things (Doe et al. 2031)
    #
    # Some text.

    # %% tags=["parameters"]
    profile = None

    # %% [markdown]
    # **Our assumptions, in one place**: seven is enough;
    # the moon is made of cheese.
    #
    # Defects not repeated: none.
    ''')


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("MEDLIB_FIGURES", str(tmp_path / "figures"))
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    (notebooks / "07_seven.py").write_text(NOTEBOOK)
    (notebooks / "08_eight.py").write_text("# %%\nprofile = None\n")
    return tmp_path, notebooks


def _fill(tmp_path: Path) -> None:
    ours = pd.DataFrame({"model": ["A", "B"], "value": [0.81, 0.72]})
    published = pd.DataFrame({"model": ["A", "B"], "value": [0.889, 0.864]})
    save_table(paper_vs_ours(ours, published, on=["model"], profile="smoke"), "07_vs_paper", "smoke")
    save_table(pd.DataFrame({"model": ["A"], "paper_model": ["X"], "auroc": [0.5]}), "07_internal", "smoke")
    figures = tmp_path / "figures"
    figures.mkdir(exist_ok=True)
    for name in ("07_curve_smoke.png", "07_curve_tiny.png", "08_bars_smoke.png"):
        (figures / name).write_bytes(b"\x89PNG fake")
    reports = tmp_path / "reports" / "smoke"
    (reports / "07_seven.html").write_text("<html></html>")
    (reports / "runs.json").write_text(json.dumps({"07_seven": {"status": "ok", "wall_time_s": 12.5}}))


def test_paper_column_detection(tmp_path):
    def table(columns):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.csv"
        pd.DataFrame(columns=columns).to_csv(path, index=False)
        return summary_page.has_paper_column(path)

    assert table(["model", "ours", "published", "delta"])
    assert table(["claim", "paper"]) and table(["label", "AUROC (published)"])
    assert not table(["model", "paper_model", "auroc"]) and not table(["published_model", "ours"])
    with pytest.raises(ValueError, match="cannot read"):
        summary_page.has_paper_column(tmp_path / "missing.csv")


def test_notebook_title_and_assumptions(folders):
    _, notebooks = folders
    py = notebooks / "07_seven.py"
    assert summary_page.notebook_title(py) == "07 - A study of seven things (Doe et al. 2031)"
    assert summary_page.notebook_assumptions(py) == ("**Our assumptions, in one place**: seven is enough; "
                                                     "the moon is made of cheese.")
    assert summary_page.notebook_assumptions(notebooks / "08_eight.py") == ""
    assert summary_page.notebook_title(notebooks / "08_eight.py") == "08_eight"


def test_write_summary_gathers_paper_tables_figures_and_links(folders):
    tmp_path, notebooks = folders
    _fill(tmp_path)
    html_path = summary_page.write_summary("smoke", notebooks_dir=notebooks)
    reports = tmp_path / "reports" / "smoke"
    assert html_path == reports / "summary.html"
    md = (reports / "summary.md").read_text()
    assert "profile `smoke`" in md and "<b>not</b> reproductions" in md
    assert "| 07 - A study of seven things (Doe et al. 2031) | ok | 12.5 | [07_seven.html](07_seven.html) |" in md
    assert "| 08_eight | not run | - | - |" in md
    assert "### 07_vs_paper" in md and "0.889" in md and "07_internal" not in md  # only tables with a paper column
    assert "[![07_curve_smoke](../../figures/07_curve_smoke.png)](07_seven.html)" in md  # figure -> its report
    assert "07_curve_tiny" not in md  # another profile's figure stays out
    assert "[![08_bars_smoke](../../figures/08_bars_smoke.png)](../../figures/08_bars_smoke.png)" in md  # no report
    assert "the moon is made of cheese" in md
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "</html>" in page
    assert '<a href="07_seven.html"><img src="../../figures/07_curve_smoke.png"' in page
    assert "<td>0.889</td>" in page


def test_write_summary_on_an_empty_reports_folder(folders):
    _, notebooks = folders
    html_path = summary_page.write_summary("tiny", notebooks_dir=notebooks)
    md = html_path.with_suffix(".md").read_text()
    assert "profile `tiny`" in md and "No table with published figures" in md


def test_render_markdown_makes_tables():
    out = summary_page.render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<table>" in out and "<td>1</td>" in out


def test_reproduce_writes_the_summary(folders, monkeypatch):
    from medlib import reproduce

    tmp_path, notebooks = folders
    monkeypatch.setattr(reproduce, "discover_notebooks", lambda only=None: [])
    monkeypatch.setattr(summary_page, "repo_root", lambda: tmp_path)
    reproduce.reproduce("smoke")
    assert (tmp_path / "reports" / "smoke" / "summary.html").is_file()


def test_summary_opens_with_the_scoreboard_and_the_flags(folders):
    from medlib.eval import claims as C

    tmp_path, notebooks = folders
    _fill(tmp_path)
    table = C.claims_frame([C.claim("07", 1, "seven beats six", "yes", "score(7) - score(6)", 0.2, (0.1, 0.3),
                                    interval="bootstrap"),
                            C.claim("07", 2, "eight is near", "yes", "-", not_tested="no eight here")])
    save_table(table, "07_claims", "smoke")
    flags = C.sanity_flags(pd.DataFrame({"model": ["m"], "task": ["t"], "metric": ["auroc"], "score": [0.3],
                                         "ci_low": [0.2], "ci_high": [0.4], "reference": ["chance"],
                                         "reference_value": [0.5]}), study="07", table="07_x")
    save_table(flags, "07_sanity_flags", "smoke")
    md = (summary_page.write_summary("smoke", notebooks_dir=notebooks)).with_suffix(".md").read_text()
    assert md.index("## Scoreboard") < md.index("## The notebooks") < md.index("### 07_vs_paper")
    assert "| [07](07_seven.html) | 1 | seven beats six | **reproduced** | +0.200 [+0.100, +0.300] |" in md
    assert "| **not tested here** | - | no eight here | smoke |" in md
    assert "**m on t: auroc 0.300 [0.200, 0.400] below chance (0.500)** - unexplained" in md


def test_scoreboard_without_claims_says_so(folders):
    md = summary_page.write_summary("tiny", notebooks_dir=folders[1]).with_suffix(".md").read_text()
    assert "No claims table has been written for this profile yet." in md

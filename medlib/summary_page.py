"""The cross-study summary page: ``reports/<profile>/summary.md`` and ``summary.html``, the page a reader opens first.

It gathers, for every study notebook, every reproduced table that has a published column
(a column named ``published`` or ``paper``, or ending in ``(published)``: the tables made with
:func:`medlib.reporting.paper_vs_ours` and the claims tables), the notebook's figures
(``figures/NN_*_<profile>.png``), each linked to the notebook's executed HTML report, the run
status of each notebook, and the assumptions the notebooks state in their "Our assumptions, in
one place" paragraph. The page states the profile
first, so nobody mistakes a phantom number for a reproduction on real data.

Markdown is rendered with the ``markdown`` package when it is installed, else with ``mistune``
(which Jupyter's nbconvert ships).
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .cache import atomic_path
from .config import Profile, figures_dir, get_profile, repo_root, reports_dir

#: a column of published figures: "published" / "paper" (as reporting.paper_vs_ours writes), or "... (published)"
PAPER_COLUMN = re.compile(r"^(published|paper)$|\((published|paper)\)$", re.IGNORECASE)
_ASSUMPTIONS = re.compile(r"our assumptions?,? in one place", re.IGNORECASE)
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f5f5f5; padding: 0 0.2em; }
.profile { background: #fff6dd; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
"""


@dataclass
class StudySection:
    """One notebook's part of the page: its title, report, status, paper tables, figures and assumptions."""

    number: str
    stem: str
    title: str
    html: Path | None
    status: str
    wall_time_s: float | None
    tables: list[Path] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    assumptions: str = ""


def has_paper_column(table_csv: Path) -> bool:
    """Whether a saved table (its ``.csv``) has a column of published figures (see :data:`PAPER_COLUMN`)."""
    try:
        columns = pd.read_csv(table_csv, nrows=0).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError) as err:
        raise ValueError(f"cannot read the header of table {table_csv}: {err}") from err
    return any(PAPER_COLUMN.search(str(c).strip()) for c in columns)


def notebook_title(py_path: Path) -> str:
    """The first markdown heading of a jupytext percent notebook (``# # 01 - ...``), or its file stem."""
    for line in py_path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#\s+#\s+(.+)$", line)
        if match:
            return match.group(1).strip()
    return py_path.stem


def notebook_assumptions(py_path: Path) -> str:
    """The notebook's "Our assumptions, in one place" paragraph (markdown, comment marks removed), or ""."""
    lines = [line[2:] if line.startswith("# ") else ("" if line.strip() == "#" else None)
             for line in py_path.read_text(encoding="utf-8").splitlines()]
    for i, line in enumerate(lines):
        if line is not None and _ASSUMPTIONS.search(line):
            paragraph = []
            for text in lines[i:]:
                if not text:  # a blank markdown line or code ends the paragraph
                    break
                paragraph.append(text)
            return " ".join(paragraph).strip()
    return ""


def _runs(profile: Profile) -> dict[str, dict]:
    path = reports_dir(profile) / "runs.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and re-run `make reproduce`") from err


def collect_sections(profile: str | Profile, notebooks_dir: Path | None = None) -> list[StudySection]:
    """One section per notebook ``NN_name.py`` (and per table / figure number without a notebook), in order."""
    p = get_profile(profile)
    out_dir = reports_dir(p)
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else repo_root() / "notebooks"
    runs = _runs(p)
    tables_dir = out_dir / "tables"
    tables = sorted(t for t in tables_dir.glob("[0-9][0-9]_*.csv") if has_paper_column(t)) if tables_dir.is_dir() \
        else []
    figures = sorted(figures_dir().glob(f"[0-9][0-9]_*_{p.name}.png"))
    notebooks = {path.stem[:2]: path for path in sorted(notebooks_dir.glob("[0-9][0-9]_*.py"))}
    numbers = sorted(set(notebooks) | {t.name[:2] for t in tables} | {f.name[:2] for f in figures})
    sections = []
    for number in numbers:
        py = notebooks.get(number)
        stem = py.stem if py is not None else number
        run = runs.get(stem, {})
        report = out_dir / f"{stem}.html"
        sections.append(StudySection(
            number=number, stem=stem, title=notebook_title(py) if py is not None else f"notebook {number}",
            html=report if report.is_file() else None,
            status=str(run.get("status", "not run")) + (f" (reused {run['reused'][:10]}: inputs unchanged since "
                                                          f"{str(run.get('created', '?'))[:10]})"
                                                          if run.get("reused") else ""),
            wall_time_s=run.get("wall_time_s"),
            tables=[t for t in tables if t.name.startswith(f"{number}_")],
            figures=[f for f in figures if f.name.startswith(f"{number}_")],
            assumptions=notebook_assumptions(py) if py is not None else ""))
    return sections


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _fmt_effect(x: object) -> str:
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return "-" if v != v else f"{v:+.3f}"


def scoreboard_markdown(profile: str | Profile, sections: list[StudySection] | None = None,
                        report_link=None) -> list[str]:
    """The scoreboard: every claim of every study's ``NN_claims.csv`` with its verdict and interval, and the
    sanity flags of ``NN_sanity_flags.csv`` in bold, each linked to its notebook."""
    p = get_profile(profile)
    out_dir = reports_dir(p)
    tables = out_dir / "tables"
    sections = sections if sections is not None else collect_sections(p)
    report_link = report_link or (lambda s: _rel(s.html, out_dir) if s.html else None)
    links = {s.number: (f"[{s.number}]({report_link(s)})" if report_link(s) else s.number) for s in sections}
    rows, flag_lines = [], []
    for path in sorted(tables.glob("[0-9][0-9]_claims.csv")) if tables.is_dir() else []:
        frame = pd.read_csv(path)
        for r in frame.to_dict("records"):
            verdict = str(r.get("verdict", ""))
            ours = _fmt_effect(r.get("ours"))
            cell = lambda x: str(x).replace("|", "/") if x == x else ""  # noqa: E731 (NaN -> "")
            figure = (f"{ours} [{_fmt_effect(r.get('ci_low'))}, {_fmt_effect(r.get('ci_high'))}]" if ours != "-"
                      else "-")
            measure = cell(r.get("measure")) if ours != "-" else cell(r.get("note"))
            rows.append(f"| {links.get(path.name[:2], path.name[:2])} | {cell(r.get('id'))} | {cell(r.get('claim'))} | "
                        f"**{verdict}** | {figure} | {measure} | {p.name} |")
    for path in sorted(tables.glob("[0-9][0-9]_sanity_flags.csv")) if tables.is_dir() else []:
        frame = pd.read_csv(path)
        for r in frame.to_dict("records"):
            why = r.get("explanation") if r.get("explained") in (True, "True") else "unexplained"
            flag_lines.append(f"- {links.get(path.name[:2], path.name[:2])}: **{r['model']} on {r['task']}: "
                              f"{r['metric']} {float(r['score']):.3f} [{float(r['ci_low']):.3f}, "
                              f"{float(r['ci_high']):.3f}] below {r['reference']} "
                              f"({float(r['reference_value']):.3f})** - {why}")
    if not rows:
        return ["## Scoreboard", "", "No claims table has been written for this profile yet.", ""]
    lines = ["## Scoreboard: the published claims", "",
             "Each study's claims, judged by one rule (`medlib.eval.claims.verdict`): **reproduced** when our "
             "interval lies wholly on the published side of no effect, **not reproduced** when our estimate "
             "points the other way and the interval excludes the published effect, else **inconclusive**.", "",
             "| notebook | claim | published claim | verdict | ours [95 % interval] | measure | profile |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    lines += ["### Sanity flags", ""]
    lines += (flag_lines or ["No trained model scored below its trivial reference (chance, image-blind prior, "
                             "random initialisation) with an interval that excludes it."]) + [""]
    return lines


def _paper_data_sentence(p: Profile) -> str:
    """The header's data sentence for ``paper``: real sources, and every phantom stand-in named."""
    from .datafile import active_settings, phantom_stand_ins

    stand_ins = phantom_stand_ins(p)
    where = active_settings().data_file
    text = "the data sets named per data key in the table below" + (
        f" (data file <code>{html.escape(where.name)}</code>)" if where else "")
    if stand_ins:
        text += (f"; <b>phantom stand-ins, not real data,</b> for {', '.join(stand_ins)}: results on those are "
                 "not reproductions")
    return text + "."


def _sources_section(p: Profile) -> list[str]:
    """``paper`` (or a run with a data file): the source of every data key, phantom stand-ins flagged."""
    from .datafile import active_settings, sources_markdown

    settings = active_settings()
    if p.name != "paper" and not settings.active:
        return []
    lines = ["## Data sources", "", *sources_markdown(p), ""]
    if settings.overrides:
        lines += ["Overrides: " + ", ".join(f"`{k}={v}`" for k, v in settings.overrides.items()) + ".", ""]
    return lines


def figure_caption(png: Path) -> str:
    """A figure's caption: its title from the provenance record ``save_figure`` wrote, else its file name."""
    record = png.with_suffix(".json")
    try:
        data = json.loads(record.read_text()) if record.is_file() else {}
    except json.JSONDecodeError:
        data = {}
    title = data.get("title") or next(iter(data.get("texts") or []), "")
    return str(title).strip() or png.stem


def _profile_box(p: Profile) -> list[str]:
    embedded = p.name != "paper"
    return [f'<div class="profile"><b>Profile <code>{p.name}</code></b>: {html.escape(p.description)}. '
            f"Seed {p.seed}; backbones at {p.backbone.image_size} px; data: "
            + ("procedural phantoms and self-trained stand-in backbones (embedded), so the <i>ours</i> columns "
               "are <b>not</b> reproductions of the papers' numbers: compare which method wins and how curves "
               "move, not levels." if embedded else
               _paper_data_sentence(p)) + "</div>", ""]


def _run_commits(p: Profile) -> str:
    """One sentence naming the code version(s) the notebooks ran at (from ``runs.json``)."""
    commits = sorted({str(r.get("git_commit", "")) for r in _runs(p).values()} - {""})
    if not commits:
        return ""
    named = ", ".join(f"`{c.replace('+dirty', '')}`" + (" (with uncommitted changes)" if c.endswith("+dirty") else "")
                      for c in commits)
    return (f"The notebooks ran at commit {named}." if len(commits) == 1 else
            f"The notebooks ran at {len(commits)} code versions: {named}; `runs.json` records each notebook's.")


def summary_markdown(profile: str | Profile, notebooks_dir: Path | None = None, *,
                     report_link=None, figure_path=None, table_link=None, caption=None,
                     site: bool = False) -> str:
    """The summary page as markdown (see the module docstring for what it holds).

    The link functions say where a notebook's report (``report_link(section)``), a figure
    (``figure_path(png)``) and a table's csv (``table_link(csv)``) are found from the page; the defaults
    suit ``reports/<profile>/summary.md``. ``site`` writes MyST figures with captions (the companion site).
    """
    p = get_profile(profile)
    out_dir = reports_dir(p)
    sections = collect_sections(p, notebooks_dir)
    report_link = report_link or (lambda s: _rel(s.html, out_dir) if s.html else None)
    figure_path = figure_path or (lambda png: _rel(png, out_dir))
    table_link = table_link or (lambda csv: _rel(csv, out_dir))
    caption = caption or figure_caption
    lines = [f"# Summary of the four studies - profile `{p.name}`", "", *_profile_box(p), *_sources_section(p),
             "Each table below sets our figure (`ours`) beside the published one (`published`), measured on the "
             "profile above. Each figure links to the executed notebook that made it. "
             + _run_commits(p) + f" Page written {time.strftime('%Y-%m-%d')}.", "",
             *scoreboard_markdown(p, sections, report_link=report_link),
             "## The notebooks", "",
             "| notebook | status | wall time (s) | report |", "|---|---|---|---|"]
    for s in sections:
        target = report_link(s)
        link = f"[{s.stem if site or not s.html else s.html.name}]({target})" if target else "-"
        wall = f"{s.wall_time_s:.1f}" if isinstance(s.wall_time_s, (int, float)) else "-"
        lines.append(f"| {s.title} | {s.status} | {wall} | {link} |")
    for s in sections:
        target = report_link(s)
        lines += ["", f"## {s.title}", ""]
        if target:
            lines += [f"Executed notebook: [{s.stem if site or not s.html else s.html.name}]({target}).", ""]
        if not s.tables and not s.figures:
            lines += ["No table with published figures and no figure for this profile yet.", ""]
        for table in s.tables:
            md = table.with_suffix(".md")
            body = md.read_text(encoding="utf-8").strip() if md.is_file() else "(markdown version missing)"
            lines += [f"### {table.stem}", "",
                      f"Rounded for reading; full precision in [{table.name}]({table_link(table)}).", "",
                      body, ""]
        if s.figures:
            lines += ["### Figures", ""]
            for fig in s.figures:
                text = caption(fig)
                if site:
                    lines += [f"```{{figure}} {figure_path(fig)}", f":alt: {text}", f":name: fig-{fig.stem}", "",
                              f"{text}. " + (f"Made by [notebook {s.number}]({target})." if target else ""),
                              "```", ""]
                else:
                    link = target or figure_path(fig)
                    lines += [f"[![{text}]({figure_path(fig)})]({link})", "", f"*Figure: {text}.*", ""]
        if s.assumptions:
            lines += ["### Assumptions stated in the notebook", "", s.assumptions, ""]
    return "\n".join(lines).rstrip() + "\n"


def site_summary_markdown(profile: str | Profile, notebook_doc, figure_path, caption=None,
                          notebooks_dir: Path | None = None) -> str:
    """The summary page for the companion site: notebook links go to ``notebook_doc(stem)``, figures are
    captioned MyST figures at ``figure_path(png)``, tables link their csv under ``tables/``."""
    return summary_markdown(profile, notebooks_dir, site=True,
                            report_link=lambda s: notebook_doc(s.stem) if s.html or s.stem[:2].isdigit() else None,
                            figure_path=figure_path, table_link=lambda csv: f"tables/{csv.name}",
                            caption=caption)


def tables_markdown(profile: str | Profile, csv_path, notebook_doc) -> str:
    """Every table of the profile, notebook by notebook, rounded for reading, each with its csv download."""
    p = get_profile(profile)
    tables_dir = reports_dir(p) / "tables"
    notebooks = {path.stem[:2]: path.stem for path in sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.py"))}
    lines = [f"# Every table - profile `{p.name}`", "",
             "The tables each notebook wrote, rounded for reading. Each links its csv, which keeps full "
             "precision; the rounded versions are what the notebooks show.", ""]
    current = None
    for csv in sorted(tables_dir.glob("[0-9][0-9]_*.csv")) if tables_dir.is_dir() else []:
        number = csv.name[:2]
        if number != current:
            current = number
            stem = notebooks.get(number)
            lines += [f"## Notebook {number}", ""]
            if stem:
                lines += [f"From [{stem}]({notebook_doc(stem)}).", ""]
        md = csv.with_suffix(".md")
        body = md.read_text(encoding="utf-8").strip() if md.is_file() else ""
        lines += [f"### {csv.stem}", "", f"Download [{csv.name}]({csv_path(csv)}).", "", body, ""]
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(text: str) -> str:
    """Markdown to an HTML fragment: the ``markdown`` package if installed, else ``mistune`` (Jupyter's)."""
    try:
        import markdown
    except ImportError:
        import mistune

        return mistune.create_markdown(escape=False, plugins=["table"])(text)
    return markdown.markdown(text, extensions=["tables"])


def write_summary(profile: str | Profile, notebooks_dir: Path | None = None) -> Path:
    """Write ``reports/<profile>/summary.md`` and ``summary.html``; return the HTML path."""
    p = get_profile(profile)
    out_dir = reports_dir(p)
    text = summary_markdown(p, notebooks_dir)
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Summary - profile {html.escape(p.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"{render_markdown(text)}\n</body>\n</html>\n")
    out = out_dir / "summary.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


__all__ = ["StudySection", "collect_sections", "figure_caption", "has_paper_column", "notebook_assumptions",
           "notebook_title", "render_markdown", "scoreboard_markdown", "site_summary_markdown", "summary_markdown",
           "tables_markdown", "write_summary"]

"""The companion site: executed notebooks, summary scoreboard, benchmark and the docs/ pages as one static site.

``python -m medlib.site build --profile tiny`` (or ``make site``) writes ``reports/<profile>/site/``, a
self-contained static HTML site (Sphinx + MyST-NB + the book theme; table of contents and search) built
fully offline from what ``make reproduce`` left behind. Nothing is executed again:

- each executed notebook ``reports/<profile>/NN_name.ipynb`` becomes a page, after :func:`clean_notebook`
  removes what is noise for a reader (progress bars, warnings, echoed file paths, absolute paths, long floats)
  and writes the profile's values where the prose names a profile field;
- ``summary_page.summary_markdown`` gives the scoreboard page, its figures copied into the site with real
  captions (each figure's title, from the provenance record :func:`medlib.reporting.save_figure` wrote);
- every table of the profile is rendered on one page, with its csv (full precision) as a download;
- ``reports/bench/bench.md`` gives the benchmark page; every ``docs/*.md`` page is in the table of contents.

Every figure, table and script the pages use lies inside the site folder, so it can be published alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .config import PROFILE_NAMES, Profile, cache_dir, figures_dir, get_profile, repo_root, reports_dir

#: a text progress bar (tqdm): "desc:  42%|████▏     | 21/50 [00:02<00:03, 9.1it/s]"
PROGRESS = re.compile(r"\d+%\|.*\||\|\s*\d+/\d+\s*\[|\d+(\.\d+)?\s*(it/s|s/it)\b")
#: the first line of a Python warning as ``warnings`` prints it ("file.py:12: SomeWarning: text")
WARNING_LINE = re.compile(r"^\S*:\d+: \w*Warning: ")
#: an echoed list of paths, e.g. what save_figure returns as a cell's last expression
PATH_ECHO = re.compile(r"^\s*\[?\s*((Posix|Windows)?Path\('[^']*'\),?\s*)+\]?\s*$", re.S)
#: a float printed with six or more decimals (pandas' default), not part of a version, a hash or an arXiv id
LONG_FLOAT = re.compile(r"(?<![\w.])(-?\d+\.\d{6,})(?![\w.])")
ANSI = re.compile(r"\x1b\[[\d;]*[A-Za-z]")
#: a profile field named in prose: `profile.eval.knn_ks`
PROFILE_FIELD = re.compile(r"`profile\.(\w+)\.(\w+)`")
#: absolute paths that mean nothing off this machine (after the known prefixes are made relative)
ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:work|home|root|tmp|Users|opt|usr|var|mnt|srv)/(?:[\w.+@-]+/)*")
TEXT_MIMES = ("text/plain", "text/html", "text/markdown")


def round_number(text: str) -> str:
    """A long float as a reader reads it: three decimals, or two significant digits below 0.001."""
    value = float(text)
    return f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.3f}"


def readable_paths(text: str) -> str:
    """Absolute paths made relative: the repository, the cache, site-packages; any other machine path elided."""
    prefixes = [(str(repo_root()) + "/", ""), (str(cache_dir()) + "/", "<cache>/"),
                (sysconfig.get_paths()["purelib"] + "/", "site-packages/"),
                (sys.prefix + "/", "<python>/")]
    for prefix, short in prefixes:
        text = text.replace(prefix, short)
    text = re.sub(r"(?:\S*/)?\.venv/lib/python[\d.]+/site-packages/", "site-packages/", text)
    return ABSOLUTE.sub(".../", text)


def clean_text(text: str) -> str:
    """Readable paths and rounded floats in one output text."""
    return LONG_FLOAT.sub(lambda m: round_number(m.group(1)), readable_paths(text))


def clean_stream(text: str) -> str:
    """A stream's text without progress bars and warnings (their source line included)."""
    kept: list[str] = []
    skip_source = False
    for line in re.split(r"\r\n|\n|\r", text):
        if skip_source and line.startswith((" ", "\t")):
            skip_source = False
            continue
        skip_source = False
        if WARNING_LINE.search(line):
            skip_source = True
            continue
        if PROGRESS.search(line) or not line.strip():
            continue
        kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


def profile_value(profile: Profile, section: str, name: str) -> str | None:
    """The value of ``profile.<section>.<name>`` as prose quotes it, or None when there is no such field."""
    part = getattr(profile, section, None)
    if part is None or not dataclasses.is_dataclass(part) or not hasattr(part, name):
        return None
    value = getattr(part, name)
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value)


def quote_profile_values(markdown: str, profile: Profile) -> str:
    """Replace `profile.eval.x` in prose by its value in the profile the notebook ran on."""
    def value(match: re.Match) -> str:
        found = profile_value(profile, match.group(1), match.group(2))
        return match.group(0) if found is None else f"**{found}**"

    return PROFILE_FIELD.sub(value, markdown)


def _explain_stop(nb: Any) -> None:
    """Papermill's red "An Exception was encountered" banners become one plain note after the title, and a
    target where the run stopped (the error itself stays in its cell)."""
    banners = [c for c in nb.cells if "papermill-error-cell-tag" in c.get("metadata", {}).get("tags", [])]
    if not banners:
        return
    error = next((o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"), None)
    what = f"`{error['ename']}`" if error else "an error"
    for cell in banners:
        if "papermill-error-cell" in cell.source and "id=" in cell.source:
            cell.source = "(papermill-error-cell)=\n**The run stopped at the next cell**, which raised the error shown under it."
        else:
            nb.cells.remove(cell)
    note = nbformat_new_markdown(
        "```{note}\nThis notebook's run stopped before its end: a cell raised " + what + " "
        "([where it stopped](#papermill-error-cell)). The cells after it did not run on this profile, so their "
        "outputs are absent; the error message says why the notebook stops there.\n```")
    first_heading = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
    nb.cells.insert(first_heading + 1, note)


def nbformat_new_markdown(text: str) -> Any:
    import nbformat

    return nbformat.v4.new_markdown_cell(text)


def clean_notebook(nb: Any, profile: str | Profile) -> Any:
    """An executed notebook as a reader should see it (in place; returns it).

    Progress bars and warnings leave the streams, echoed path lists leave the results, paths are made
    relative, floats with more than four decimals are rounded (the csv tables keep full precision), prose
    quotes the profile's values instead of field names, and papermill's injected parameter cell is hidden.
    """
    p = get_profile(profile)
    _explain_stop(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            # links to the docs pages (../docs/glossary.md#auroc from notebooks/) point at the site's own pages
            cell.source = quote_profile_values(readable_paths(cell.source.replace("](../docs/", "](../")), p)
            continue
        if cell.cell_type != "code":
            continue
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = clean_stream(out.get("text", ""))
                if not text.strip():
                    continue
                out["text"] = clean_text(text)
            elif out.get("output_type") in ("execute_result", "display_data"):
                data = out.get("data", {})
                if set(data) == {"text/plain"} and PATH_ECHO.match(str(data["text/plain"])):
                    continue
                for mime in TEXT_MIMES:
                    if mime in data:
                        value = data[mime]
                        data[mime] = clean_text("".join(value) if isinstance(value, list) else value)
            elif out.get("output_type") == "error":
                out["traceback"] = [readable_paths(ANSI.sub("", line)) for line in out.get("traceback", [])]
            outputs.append(out)
        cell["outputs"] = outputs
    return nb


def _docs_dir() -> Path:
    return repo_root() / "docs"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def stage_sources(profile: str | Profile, src: Path) -> dict[str, list[str]]:
    """Write the Sphinx source tree for ``profile`` into ``src``; return what it holds, page by page kind."""
    import nbformat

    from .summary_page import figure_caption, site_summary_markdown, tables_markdown

    p = get_profile(profile)
    out_dir = reports_dir(p)
    docs = _docs_dir()
    if not (docs / "conf.py").is_file():
        raise FileNotFoundError(f"{docs / 'conf.py'} is missing: the site's Sphinx configuration lives in docs/")
    shutil.copytree(docs, src, dirs_exist_ok=True, ignore=shutil.ignore_patterns("_build", "__pycache__"))
    staged: dict[str, list[str]] = {"notebooks": [], "pages": sorted(x.stem for x in docs.glob("*.md"))}
    for ipynb in sorted(out_dir.glob("[0-9][0-9]_*.ipynb")):
        nb = clean_notebook(nbformat.read(ipynb, as_version=4), p)
        (src / "notebooks").mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, src / "notebooks" / ipynb.name)
        staged["notebooks"].append(ipynb.stem)
    if not staged["notebooks"]:
        raise FileNotFoundError(f"No executed notebook in {out_dir}: run `make reproduce PROFILE={p.name}` first")
    results = src / "results"
    (results / "figures").mkdir(parents=True, exist_ok=True)
    (results / "tables").mkdir(parents=True, exist_ok=True)
    for png in sorted(figures_dir().glob(f"[0-9][0-9]_*_{p.name}.png")):
        shutil.copy2(png, results / "figures" / png.name)
    for csv in sorted((out_dir / "tables").glob("*.csv")):
        shutil.copy2(csv, results / "tables" / csv.name)
    _write(results / "summary.md", site_summary_markdown(p, notebook_doc=lambda stem: f"../notebooks/{stem}.ipynb",
                                                         figure_path=lambda png: f"figures/{png.name}",
                                                         caption=figure_caption))
    _write(results / "tables.md", tables_markdown(p, csv_path=lambda csv: f"tables/{csv.name}",
                                                  notebook_doc=lambda stem: f"../notebooks/{stem}.ipynb"))
    bench = out_dir.parent / "bench" / "bench.md"
    if (docs / "benchmark.md").is_file():
        page = (docs / "benchmark.md").read_text(encoding="utf-8")
        if bench.is_file():
            body = bench.read_text(encoding="utf-8")
            body = re.sub(r"^#(?=\s)", "##", body, flags=re.M)  # the page keeps one top heading
            page = page.rstrip() + "\n\n" + clean_text(body)
        else:
            page = page.rstrip() + "\n\nNo benchmark has been run on this machine yet (`make bench`).\n"
        _write(src / "benchmark.md", page)
    _write(src / "_site_profile.json", json.dumps({"profile": p.name}))
    return staged


def build(profile: str | Profile = "tiny", out: Path | None = None, quiet: bool = True) -> Path:
    """Build the site of ``profile`` into ``out`` (default ``reports/<profile>/site``); return its index.html."""
    p = get_profile(profile)
    out = Path(out) if out is not None else reports_dir(p) / "site"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medlib-site-") as tmp:
        src, build_dir = Path(tmp) / "src", Path(tmp) / "html"
        stage_sources(p, src)
        env = {**os.environ, "MEDLIB_SITE_PROFILE": p.name, "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-j", "1", "-d", str(Path(tmp) / "doctrees"),
               *(["-q"] if quiet else []), str(src), str(build_dir)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        warnings = [line for line in (proc.stderr or "").splitlines() if "WARNING" in line or "ERROR" in line]
        if proc.returncode != 0:
            raise RuntimeError(f"sphinx failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        if warnings:
            raise RuntimeError("the site built with warnings (broken references or pages):\n" + "\n".join(warnings[:40]))
        for leftover in (".buildinfo", ".doctrees", "_sources", "objects.inv", "_static/locales"):
            target = build_dir / leftover
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        for source_map in build_dir.rglob("*.map"):  # debugger aids of the theme's scripts, never loaded
            source_map.unlink()
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(build_dir, out)
    if not quiet:
        print(f"[site:{p.name}] built in {time.perf_counter() - start:.1f} s -> {out / 'index.html'}")
    return out / "index.html"


class _PageLinks(HTMLParser):
    """The resources (img / script / stylesheet), links and element ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.resources: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag in ("img", "script", "source", "iframe", "video", "audio") and a.get("src"):
            self.resources.append(a["src"])
        elif tag == "link" and a.get("href") and any(r in a.get("rel", "") for r in ("stylesheet", "icon", "preload")):
            self.resources.append(a["href"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def site_pages(site: Path) -> list[Path]:
    """The reader-facing pages of a built site (the theme's template fragments under _static excluded)."""
    return sorted(p for p in Path(site).rglob("*.html") if "_static" not in p.relative_to(site).parts)


def check_links(site: Path) -> list[str]:
    """Problems of a built site, read from its files: a missing local target (page, figure, table, script,
    anchor) or a resource (image, script, stylesheet) loaded from outside the site folder."""
    from urllib.parse import unquote, urlsplit

    site = Path(site).resolve()
    parsed: dict[Path, _PageLinks] = {}

    def parse(page: Path) -> _PageLinks:
        if page not in parsed:
            parser = _PageLinks()
            parser.feed(page.read_text(encoding="utf-8", errors="replace"))
            parsed[page] = parser
        return parsed[page]

    problems = []
    for page in site_pages(site):
        info = parse(page)
        name = page.relative_to(site).as_posix()
        for kind, targets in (("resource", info.resources), ("link", info.links)):
            for target in targets:
                parts = urlsplit(target)
                if parts.scheme in ("http", "https") or target.startswith("//"):
                    if kind == "resource":
                        problems.append(f"{name}: loads {target} from outside the site")
                    continue
                if parts.scheme in ("mailto", "data", "javascript"):
                    continue
                if parts.scheme:
                    problems.append(f"{name}: {kind} with scheme {parts.scheme!r}: {target}")
                    continue
                path = (page.parent / unquote(parts.path)).resolve() if parts.path else page
                if site not in path.parents and path != site:
                    problems.append(f"{name}: {kind} {target} points outside the site folder")
                elif not path.exists():
                    problems.append(f"{name}: broken {kind} {target}")
                elif (kind == "link" and parts.fragment and path.suffix == ".html"
                      and unquote(parts.fragment) not in parse(path).ids):
                    problems.append(f"{name}: link {target} names an anchor its page does not have")
    return problems


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) executables, or None when headless Chromium is not installed."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def browser_check(site: Path, screenshots: dict[str, Path] | None = None, width: int = 1280,
                  height: int = 1400) -> dict[str, list[str]]:
    """Open every page of ``site`` in headless Chromium; return the problems found per page.

    A page fails when it does not finish loading, has no title or article, shows an image that did not
    load, or logs a console error (a missing script, stylesheet or figure). ``screenshots`` maps page paths
    (relative to the site) to PNG files to write.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise FileNotFoundError("headless Chromium is not installed: apt-get install chromium chromium-driver")
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--allow-file-access-from-files", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    problems: dict[str, list[str]] = {}
    try:
        driver.set_page_load_timeout(60)
        site = Path(site).resolve()
        for page in site_pages(site):
            name = page.relative_to(site).as_posix()
            driver.get(page.as_uri())
            found_problems = []
            state = driver.execute_script("return document.readyState")
            if state != "complete":
                found_problems.append(f"did not finish loading ({state})")
            if not driver.title.strip():
                found_problems.append("has no title")
            if name not in ("genindex.html", "search.html") and not driver.execute_script(
                    "return document.querySelector('article') !== null"):
                found_problems.append("has no article")
            broken = driver.execute_script(
                "return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0)"
                ".map(i => i.getAttribute('src'))")
            found_problems += [f"image did not load: {src}" for src in broken]
            for entry in driver.get_log("browser"):
                if entry.get("level") == "SEVERE":
                    found_problems.append(f"console error: {entry.get('message', '')[:300]}")
            if screenshots and name in screenshots:
                Path(screenshots[name]).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(screenshots[name]))
            if found_problems:
                problems[name] = found_problems
    finally:
        driver.quit()
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m medlib.site build --profile tiny [--out DIR]``."""
    parser = argparse.ArgumentParser(description="Build the companion site (static HTML, offline).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build reports/<profile>/site from the executed notebooks")
    b.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    b.add_argument("--out", type=Path, default=None, help="output folder (default reports/<profile>/site)")
    c = sub.add_parser("check", help="check a built site: links, then every page in headless Chromium")
    c.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    c.add_argument("--site", type=Path, default=None, help="site folder (default reports/<profile>/site)")
    c.add_argument("--screenshot", nargs=2, action="append", metavar=("PAGE", "PNG"), default=[],
                   help="also save a screenshot of PAGE (e.g. results/summary.html) to PNG")
    args = parser.parse_args(argv)
    if args.command == "build":
        index = build(args.profile, args.out, quiet=False)
        print(f"open {index}")
        return 0
    site = args.site or reports_dir(args.profile) / "site"
    problems = check_links(site)
    for problem in problems:
        print(problem)
    pages = browser_check(site, {page: Path(png) for page, png in args.screenshot})
    for page, found in pages.items():
        for problem in found:
            print(f"{page}: {problem}")
    print(f"[site] {len(site_pages(site))} pages checked: {len(problems)} link problems, "
          f"{sum(map(len, pages.values()))} browser problems")
    return 1 if problems or pages else 0


if __name__ == "__main__":
    raise SystemExit(main())

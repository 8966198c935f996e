"""The companion site: built offline from the executed notebooks, self-contained, every page loads in Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medlib import site
from medlib.config import repo_root

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("site")]

TINY = repo_root() / "reports" / "tiny"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build of the tiny site from the committed executed notebooks (nothing is re-executed)."""
    out = tmp_path_factory.mktemp("site") / "site"
    env = {k: os.environ.pop(k) for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY") if k in os.environ}
    os.environ.update({"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"})  # no network
    try:
        site.build("tiny", out)
    finally:
        for k in ("http_proxy", "https_proxy"):
            os.environ.pop(k, None)
        os.environ.update(env)
    return out


def test_site_builds_offline_with_every_page(built: Path) -> None:
    pages = {p.relative_to(built).as_posix() for p in site.site_pages(built)}
    expected = {"index.html", "search.html", "results/summary.html", "results/tables.html"}
    expected |= {f"notebooks/{p.stem}.html" for p in TINY.glob("[0-9][0-9]_*.ipynb")}
    expected |= {f"{p.stem}.html" for p in (repo_root() / "docs").glob("*.md")}
    assert expected <= pages, f"missing pages: {sorted(expected - pages)}"
    assert (built / "searchindex.js").is_file(), "the site has no search index"


def test_site_is_self_contained(built: Path) -> None:
    problems = site.check_links(built)
    assert not problems, "\n".join(problems)
    figures = list((built / "_images").glob("*_tiny.png"))
    assert figures, "the summary's figures were not copied into the site"
    assert list((built / "_downloads").rglob("*.csv")), "the tables' csv files were not copied into the site"


def test_committed_site_is_self_contained() -> None:
    committed = TINY / "site"
    assert (committed / "index.html").is_file(), "reports/tiny/site is not committed: run `make site`"
    problems = site.check_links(committed)
    assert not problems, "\n".join(problems)


def test_every_page_loads_in_headless_chromium(built: Path, tmp_path: Path) -> None:
    if site.find_chromium() is None:
        message = "headless Chromium is missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs it)")
        pytest.skip(message)
    shots = {"results/summary.html": tmp_path / "summary.png",
             "notebooks/02_imagenet_vs_ssl_init.html": tmp_path / "study.png"}
    problems = site.browser_check(built, shots)
    assert not problems, "\n".join(f"{page}: {p}" for page, found in problems.items() for p in found)
    for png in shots.values():
        assert png.is_file() and png.stat().st_size > 20_000, f"screenshot {png.name} is empty"

"""What a reader sees on the rendered pages: no progress bars, warnings, path echoes, absolute paths, long floats
or words from the project's development (seed numbers, session, issue, defect codes)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from medlib import site
from medlib.config import repo_root

SITE = repo_root() / "reports" / "tiny" / "site"

#: name -> pattern found in a page's visible text
NOISE = {
    "progress bar": site.PROGRESS,
    "warning": re.compile(r"\b\w*Warning: |warnings\.warn"),
    "path echo": re.compile(r"PosixPath\(|WindowsPath\("),
    "absolute path": re.compile(r"(?<![\w.])/(work|home|root|tmp|Users)/|\.venv/|site-packages/\w+/\w+\.py"),
    "unrounded float": site.LONG_FLOAT,
    "seed number": re.compile(r"\bseed 00\d\b", re.I),
    # the project's history: "session 9", "this session", "the issue" (a course's sessions are teaching, not history)
    "development word": re.compile(r"\b(session \d+|(this|last|next|previous|a later) session|issues?)\b", re.I),
    "defect code": re.compile(r"\bB[1-7]\b"),
}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "svg"):
            self._skip += 1
        for key, value in attrs:
            if key in ("alt", "title") and value:
                self.parts.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "svg") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(page: Path) -> str:
    parser = _Text()
    parser.feed(page.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parser.parts)


def scan(text: str) -> list[str]:
    hits = []
    for name, pattern in NOISE.items():
        for match in pattern.finditer(text):
            hits.append(f"{name}: ...{text[max(0, match.start() - 50):match.end() + 30]!r}...")
    return hits


PAGES = sorted(site.site_pages(SITE)) if SITE.is_dir() else []


def test_the_committed_site_exists() -> None:
    assert PAGES, f"{SITE} has no page: run `make site`"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(SITE).as_posix() for p in PAGES])
def test_rendered_page_has_no_noise(page: Path) -> None:
    hits = scan(visible_text(page))
    assert not hits, f"{page.relative_to(SITE)}:\n" + "\n".join(hits[:30])


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("save_figure(fig, '01_x', profile)")
    code.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=(
            "/x/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found.\n"
            "  from .autonotebook import tqdm as notebook_tqdm\n"
            "\rphantom cxr:  50%|█████     | 60/120 [00:01<00:01, 98.1it/s]\rkept line\n")),
        nbformat.v4.new_output("execute_result", data={"text/plain": "[PosixPath('/work/x/figures/01_x_tiny.png')]"}),
        nbformat.v4.new_output("execute_result", data={
            "text/plain": "auroc 0.010963 wall 186.218113 weights " + str(repo_root()) + "/medlib/models/a.safetensors",
            "text/html": "<td>0.123456789</td><td>/work/cold-cache/x/backbone.safetensors</td>"}),
    ]
    text = nbformat.v4.new_markdown_cell("k runs over `profile.eval.knn_ks`; `profile.eval.nope` stays.")
    return nbformat.v4.new_notebook(cells=[text, code])


def test_clean_notebook_removes_noise_and_quotes_values() -> None:
    from medlib.config import get_profile

    nb = site.clean_notebook(_notebook(), "tiny")
    markdown = nb.cells[0].source
    assert "profile.eval.knn_ks" not in markdown and ", ".join(map(str, get_profile("tiny").eval.knn_ks)) in markdown
    assert "`profile.eval.nope`" in markdown  # an unknown field is left as written
    outputs = nb.cells[1].outputs
    assert [o.output_type for o in outputs] == ["stream", "execute_result"]
    assert outputs[0].text == "kept line\n"
    plain, html = outputs[1].data["text/plain"], outputs[1].data["text/html"]
    assert "0.011" in plain and "186.218" in plain and "186.218113" not in plain
    assert "medlib/models/a.safetensors" in plain and str(repo_root()) not in plain
    assert "0.123" in html and "/work/" not in html
    assert not scan(plain + html + outputs[0].text)


def test_numbers_are_rounded_for_reading() -> None:
    assert site.round_number("0.010963") == "0.011"
    assert site.round_number("186.218113") == "186.218"
    assert site.round_number("0.0000123456") == "1.23e-05"
    assert site.clean_text("version 0.29.1, hash 0a5816645bef") == "version 0.29.1, hash 0a5816645bef"

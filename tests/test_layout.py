"""The architecture as tests: no import cycle in medlib, study protocols only in ``medlib/studies``,
one study module per notebook, and recipe hashes that do not depend on where code lives."""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

from medlib.studies import STUDY_MODULES

ROOT = Path(__file__).resolve().parents[1]
MEDLIB = ROOT / "medlib"


def _module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (module level and inside functions), from the source's AST."""
    top = package_root.name
    files = {_module_name(f, package_root): f for f in package_root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != top:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == top)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan): each one is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_medlib_has_no_import_cycle():
    cycles = import_cycles(import_graph(MEDLIB))
    assert not cycles, f"import cycles between medlib modules (break them by moving the shared code down): {cycles}"


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x  # a function-level import counts too\n")
    (pkg / "c.py").write_text("import toy.a\n")
    assert import_cycles(import_graph(pkg)) == [["toy.a", "toy.sub.b"]]


def test_study_modules_stand_alone():
    """A study imports reusable code, never another study; nothing in medlib outside studies imports a study."""
    graph = import_graph(MEDLIB)
    studies = {f"medlib.studies.{m}" for m in STUDY_MODULES.values()}
    assert studies <= set(graph), f"missing study modules: {studies - set(graph)}"
    for module, targets in graph.items():
        if module in studies:
            assert not (targets & studies), f"{module} imports another study: {targets & studies}"
        elif module != "medlib.studies":
            assert not (targets & studies), f"{module} (reusable code) imports a study module: {targets & studies}"


def test_study_protocols_live_only_in_studies():
    """Published tables and paper-vs-ours comparisons are study protocol: only ``medlib/studies`` has them."""
    pattern = re.compile(r"^(PUBLISHED\w*\s*=\s*(pd\.DataFrame|_published)|from \S+ import .*\bpaper_vs_ours\b|\s+from \S+ import .*\bpaper_vs_ours\b)",
                         re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in MEDLIB.rglob("*.py")
                 if "studies" not in p.parts and pattern.search(p.read_text())]
    assert not offenders, f"study protocol outside medlib/studies: {offenders}"
    assert {p.stem for p in (MEDLIB / "studies").glob("*.py")} - {"__init__"} == set(STUDY_MODULES.values())


@pytest.mark.parametrize("notebook, module", sorted(STUDY_MODULES.items()))
def test_each_notebook_imports_its_study_as_one_short_name(notebook: str, module: str):
    source = (ROOT / "notebooks" / f"{notebook}.py").read_text()
    assert f"from medlib.studies import {module} as study\n" in source
    others = set(STUDY_MODULES.values()) - {module}
    assert not any(f"studies import {o}" in source or f"studies.{o}" in source for o in others)


def test_recipe_hash_does_not_depend_on_where_the_code_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Moving a recipe module (and saying so in RECIPE_MODULES) leaves every recipe hash unchanged."""
    from medlib.diffusion import build as ldm_build
    from medlib.models import build

    before = {name: build.recipe_hash(name, "tiny") for name in ("ssl-natural-vit-tiny", "sup-cxr-vit-tiny")}
    ldm_before = ldm_build.recipe_hash("tiny", "weights")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "__init__.py").write_text("")
    for component in ("ssl/dino.py", "eval/finetune.py", "diffusion/pipeline.py"):
        shutil.copy(MEDLIB / component, moved / component.replace("/", "_"))
        monkeypatch.setitem(build.RECIPE_MODULES, component, "elsewhere." + component.replace("/", "_")[:-3])
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("elsewhere", None)
    assert {name: build.recipe_hash(name, "tiny") for name in before} == before
    assert ldm_build.recipe_hash("tiny", "weights") == ldm_before
    # ... while a change of what the code does changes it
    (moved / "ssl_dino.py").write_text((moved / "ssl_dino.py").read_text() + "\nEXTRA = 1\n")
    assert build.recipe_hash("ssl-natural-vit-tiny", "tiny") != before["ssl-natural-vit-tiny"]


def test_unknown_recipe_component_is_a_clear_error():
    from medlib.models.build import _normalised_source

    with pytest.raises(KeyError, match="not a recipe component"):
        _normalised_source("eval/benchmark.py")


def test_status_reports_every_committed_weight_fresh(capsys: pytest.CaptureFixture[str]):
    from medlib.models.__main__ import status

    assert status("tiny") == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("fresh") >= 6 and "LDM" in out

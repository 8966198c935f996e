"""environment.yml (conda users) and pyproject.toml (make setup) describe the same environment."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_list_the_same_packages():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    start = env_lines.index("  - pip:")
    pip_lines = [line.strip()[2:] for line in env_lines[start + 1:] if line.strip().startswith("- ")]
    pip_pkgs = {_normalise(p) for p in pip_lines if not p.startswith("-e")}
    assert pip_pkgs == {_normalise(d) for d in deps}
    # pinned versions must agree too (torch / torchvision come from the local wheels)
    pins = {_normalise(d): d for d in deps if "==" in d}
    for p in pip_lines:
        if _normalise(p) in pins:
            assert p == pins[_normalise(p)]


def test_card_packages_are_present():
    deps = {_normalise(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    card = {"jupyterlab", "papermill", "jupytext", "torch", "timm", "diffusers", "peft", "seaborn", "scikit-learn",
            "torch-fidelity", "nbval"}
    assert card <= deps


def test_ci_calls_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text() and "make reproduce" in (ROOT / "README.md").read_text()

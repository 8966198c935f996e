"""environment.yml (conda users) and pyproject.toml (make setup) describe the same environment."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(req: str) -> str:
    return re.split(r"[<>=!~ ;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_installs_the_lock():
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    start = env_lines.index("  - pip:")
    pip_lines = [line.strip()[2:] for line in env_lines[start + 1:] if line.strip().startswith("- ")]
    assert pip_lines == ["-r requirements.lock", "-e ."]


def test_lock_pins_every_dependency_and_the_pins_mirror_it():
    from medlib import lock

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    locked = lock.read_lock(ROOT / "pylock.toml")
    assert lock.unsatisfied(deps, locked) == []
    assert (ROOT / "requirements.lock").read_text() == lock.pins_text(locked), "run `make lock`"
    assert "medlib" not in locked and "prdc" in locked  # the PRDC reference implementation is installed


def test_lock_check_finds_a_stale_lock():
    from medlib import lock

    assert lock.unsatisfied(["timm>=99", "not-a-package", "numpy"], {"timm": "1.0.31", "numpy": "2.4.6"}) == [
        "timm: locked 1.0.31, pyproject asks >=99", "not-a-package: not in the lock"]
    assert lock.lock_hash(ROOT / "pylock.toml") != "none" and lock.lock_hash(ROOT / "no-such.toml") == "none"


def test_card_packages_are_present():
    deps = {_normalise(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    card = {"jupyterlab", "papermill", "jupytext", "torch", "timm", "diffusers", "peft", "seaborn", "scikit-learn",
            "torch-fidelity", "nbval"}
    assert card <= deps


def test_ci_calls_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text() and "make reproduce" in (ROOT / "README.md").read_text()

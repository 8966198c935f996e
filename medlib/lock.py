"""The locked environment: ``pylock.toml`` (PEP 751, written by ``pip lock``) pins every package with its hash.

``make lock`` regenerates it from ``pyproject.toml``; ``make setup`` installs with the lock's versions as
pip constraints (``python -m medlib.lock constraints``); ``requirements.lock`` (the same pins as plain
``name==version`` lines) serves conda users through ``environment.yml``. Provenance records carry the
lock's hash (:func:`lock_hash`), so every figure and table says which environment made it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from .config import repo_root

LOCK_NAME = "pylock.toml"
PINS_NAME = "requirements.lock"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path | None = None) -> dict[str, str]:
    """{normalised name: version} of every package in the lock except the project itself."""
    path = Path(path) if path is not None else repo_root() / LOCK_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `make lock` to write it from pyproject.toml")
    data = tomllib.loads(path.read_text())
    return {_normalise(p["name"]): str(p["version"]) for p in data.get("packages", [])
            if "version" in p and not p.get("directory")}


def pins_text(lock: dict[str, str]) -> str:
    """``name==version`` lines, sorted: the lock as pip constraints / a requirements file."""
    header = f"# generated from {LOCK_NAME} by `make lock` (python -m medlib.lock pins); do not edit\n"
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(lock.items()))


def lock_hash(path: str | Path | None = None) -> str:
    """sha256 (16 hex digits) of ``pylock.toml``, or ``"none"`` when there is no lock."""
    import hashlib

    path = Path(path) if path is not None else repo_root() / LOCK_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "none"


def unsatisfied(dependencies: list[str], lock: dict[str, str]) -> list[str]:
    """The ``pyproject.toml`` dependencies that the lock lacks or pins outside their specifier."""
    from packaging.requirements import Requirement

    problems = []
    for dep in dependencies:
        req = Requirement(dep)
        version = lock.get(_normalise(req.name))
        if version is None:
            problems.append(f"{req.name}: not in the lock")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}: locked {version}, pyproject asks {req.specifier}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m medlib.lock pins|check``: print the lock as pins, or check it against pyproject.toml."""
    parser = argparse.ArgumentParser(prog="python -m medlib.lock", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("pins", "check"))
    args = parser.parse_args(argv)
    lock = read_lock()
    if args.command == "pins":
        sys.stdout.write(pins_text(lock))
        return 0
    deps = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]["dependencies"]
    problems = unsatisfied(deps, lock)
    for line in problems:
        print(f"lock out of date: {line} (run `make lock`)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

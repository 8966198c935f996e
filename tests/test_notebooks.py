"""Each notebook exists as a jupytext pair, in sync, with one papermill parameters cell."""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no NN_name.py notebooks"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_is_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py.name} has no paired .ipynb; run `make sync`"
    from_py = [(c.cell_type, c.source.strip()) for c in jupytext.read(py).cells]
    from_nb = [(c.cell_type, c.source.strip()) for c in nbformat.read(ipynb, as_version=4).cells]
    assert from_py == from_nb, f"{py.name} and {ipynb.name} differ; run `make sync`"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_profile(py):
    cells = [c for c in jupytext.read(py).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and "profile" in cells[0].source


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_ipynb_holds_executed_outputs(py):
    """Every code cell the tiny run executed carries its outputs; after a cell that failed (its error shown) none
    ran. A cell whose source changed since that run (not in the run's executed notebook) shows no output at all."""
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    report = py.parent.parent / "reports" / "tiny" / py.with_suffix(".ipynb").name
    executed = {c.source.strip() for c in nbformat.read(report, as_version=4).cells if c.cell_type == "code"}
    code = [c for c in nb.cells if c.cell_type == "code"]
    changed = [c for c in code if c.source.strip() not in executed]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in changed), \
        f"{py.stem}: a cell changed since the tiny run shows an output it never produced"
    code = [c for c in code if c.source.strip() in executed]
    failed = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    ran = code[:failed[0] + 1] if failed else code
    assert ran and all(c.get("execution_count") for c in ran), \
        f"{py.with_suffix('.ipynb').name} must be committed executed (the tiny run's outputs: make notebooks)"
    if failed:  # a run that stopped: the records must say so
        import json

        runs = json.loads((py.parent.parent / "reports" / "tiny" / "runs.json").read_text())
        assert runs[py.stem]["status"] == "failed", f"{py.stem} shows an error but its tiny run is recorded as ok"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_can_read_the_profile_parameter(py):
    import papermill as pm

    params = pm.inspect_notebook(str(py.with_suffix(".ipynb")))
    assert "profile" in params, f"papermill cannot parse the parameters cell of {py.name}"

"""The papermill runner: executes the .py source, renders HTML, keeps partial output on failure."""

import json
import os
import textwrap

import nbformat
import pytest

from medlib import reproduce

GOOD = textwrap.dedent('''\
    # %% tags=["parameters"]
    profile = "tiny"

    # %%
    print("profile is", profile)
    ''')
BAD = GOOD + '\n# %%\nraise ValueError("broken on purpose")\n\n# %%\nprint("never")\n'


@pytest.fixture()
def nb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_REPORTS", str(tmp_path / "reports"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    return folder


@pytest.mark.slow
def test_run_notebook_injects_the_profile_and_renders_html(nb_dir, tmp_path):
    (nb_dir / "00_good.py").write_text(GOOD)
    source_before = (nb_dir / "00_good.py").read_text()
    run = reproduce.run_notebook(nb_dir / "00_good.py", "smoke", kernel="python3", progress=False)
    assert run.status == "ok" and run.html.exists()
    nb = nbformat.read(run.output, as_version=4)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "profile is smoke" in outputs
    assert (nb_dir / "00_good.py").read_text() == source_before, "notebooks/ must never be modified"
    assert json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())["00_good"]["status"] == "ok"


def test_kernel_environment_sets_restores_and_respects_the_user(monkeypatch):
    monkeypatch.delenv("MEDLIB_PROGRESS", raising=False)
    monkeypatch.setenv("MEDLIB_TEST_USER", "mine")
    with reproduce.kernel_environment({"MEDLIB_PROGRESS": "0", "MEDLIB_TEST_USER": "theirs"}):
        assert os.environ["MEDLIB_PROGRESS"] == "0"
        assert os.environ["MEDLIB_TEST_USER"] == "mine", "a value the user set must win"
    assert "MEDLIB_PROGRESS" not in os.environ and os.environ["MEDLIB_TEST_USER"] == "mine"
    with reproduce.kernel_environment(MEDLIB_TEST_USER="forced"):  # keyword values override the user's
        assert os.environ["MEDLIB_TEST_USER"] == "forced" and os.environ["MEDLIB_PROGRESS"] == "0"
    assert os.environ["MEDLIB_TEST_USER"] == "mine" and "MEDLIB_PROGRESS" not in os.environ
    with pytest.raises(RuntimeError), reproduce.kernel_environment({"MEDLIB_PROGRESS": "0"}):
        raise RuntimeError("cell failed")
    assert "MEDLIB_PROGRESS" not in os.environ, "restored after an error too"


@pytest.mark.slow
def test_headless_runs_hide_progress_bars_in_the_report(nb_dir, monkeypatch):
    monkeypatch.delenv("MEDLIB_PROGRESS", raising=False)
    (nb_dir / "00_bars.py").write_text(GOOD + textwrap.dedent('''
        # %%
        import os
        from medlib.engine import progress
        print("progress env", os.environ.get("MEDLIB_PROGRESS"), "disabled", progress(range(3)).disable)
        '''))
    run = reproduce.run_notebook(nb_dir / "00_bars.py", "smoke", kernel="python3", progress=False)
    nb = nbformat.read(run.output, as_version=4)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "progress env 0 disabled True" in outputs
    assert "MEDLIB_PROGRESS" not in os.environ


@pytest.mark.slow
def test_failed_cell_keeps_partial_notebook_and_summarises(nb_dir):
    (nb_dir / "01_bad.py").write_text(BAD)
    run = reproduce.run_notebook(nb_dir / "01_bad.py", "smoke", kernel="python3", progress=False)
    assert run.status == "failed" and run.output.exists() and run.html.exists()
    assert "ValueError: broken on purpose" in run.error


def test_discover_notebooks_filters_and_complains(nb_dir):
    (nb_dir / "00_a.py").write_text(GOOD)
    (nb_dir / "01_b.py").write_text(GOOD)
    (nb_dir / "helper.py").write_text("")
    assert [p.stem for p in reproduce.discover_notebooks(nb_dir)] == ["00_a", "01_b"]
    assert [p.stem for p in reproduce.discover_notebooks(nb_dir, only=["01"])] == ["01_b"]
    with pytest.raises(FileNotFoundError, match="matches"):
        reproduce.discover_notebooks(nb_dir, only=["07"])


def test_main_rejects_unknown_profiles():
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "huge"])


def test_index_lists_earlier_runs_of_the_profile_beside_this_one(nb_dir, tmp_path):
    from medlib.reporting import write_run_record

    write_run_record("smoke", "00_datasets", 12.5, "ok")
    out = tmp_path / "reports" / "smoke"
    (out / "00_datasets.html").write_text("<html></html>")
    run = reproduce.NotebookRun(notebook="01_bench", status="failed", wall_time_s=3.0, output=out / "01_bench.ipynb",
                                html=None, error="cell 3")
    text = reproduce.write_index("smoke", [run]).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 0")]
    assert len(rows) == 2
    assert rows[0].startswith("| 00_datasets | ok | 12.5 |") and "[00_datasets.html](00_datasets.html)" in rows[0]
    assert rows[1].startswith("| 01_bench | failed | 3.0 |") and rows[1].endswith("| - |")


@pytest.mark.slow
def test_refresh_committed_runs_the_given_profile_headless_and_writes_the_pair(nb_dir, monkeypatch):
    monkeypatch.setenv("MEDLIB_PROFILE", "tiny")
    (nb_dir / "00_env.py").write_text(GOOD + '\n# %%\nimport os\nprint("env", os.environ["MEDLIB_PROFILE"], '
                                      'os.environ.get("MEDLIB_PROGRESS"))\n')
    out = reproduce.refresh_committed(nb_dir / "00_env.py", "smoke", kernel="python3")
    nb = nbformat.read(out, as_version=4)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert out == nb_dir / "00_env.ipynb" and "env smoke 0" in outputs
    assert os.environ["MEDLIB_PROFILE"] == "tiny", "the caller's profile is restored"

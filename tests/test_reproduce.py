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


def test_a_killed_run_is_recorded_as_interrupted_at_the_next_run(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("MEDLIB_REPORTS", str(tmp_path / "reports"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    from medlib.reporting import write_run_record

    write_run_record("smoke", "01_killed", 0.0, "running", pid=dead.pid)
    write_run_record("smoke", "02_alive", 0.0, "running", pid=os.getpid())
    assert reproduce.mark_killed_runs("smoke") == ["01_killed"]
    records = json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())
    assert records["01_killed"]["status"] == "interrupted" and "killed" in records["01_killed"]["error"]
    assert records["02_alive"]["status"] == "running"
    (tmp_path / "reports" / "smoke" / "runs.json").write_text("{not json")
    write_run_record("smoke", "03_next", 1.0, "ok")  # a damaged record file does not block the next record
    assert list(json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())) == ["03_next"]


STATUS = textwrap.dedent('''\
    # %% tags=["parameters"]
    profile = "tiny"

    # %%
    import json, os
    print("status while running:", json.load(open(os.path.join(os.environ["MEDLIB_REPORTS"], profile,
                                                               "runs.json")))["07_status"]["status"])
    ''')


@pytest.mark.slow
def test_a_run_is_recorded_running_then_old_outputs_never_pose_as_its_results(nb_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_FIGURES", str(tmp_path / "figures"))
    (nb_dir / "07_status.py").write_text(STATUS)
    run = reproduce.run_notebook(nb_dir / "07_status.py", "smoke", kernel="python3", progress=False)
    nb = nbformat.read(run.output, as_version=4)
    assert "status while running: running" in json.dumps([c.get("outputs", []) for c in nb.cells])
    reports, figures = tmp_path / "reports" / "smoke", tmp_path / "figures"
    (reports / "tables").mkdir(parents=True, exist_ok=True)
    figures.mkdir(exist_ok=True)
    stale = [reports / "tables" / "07_old.csv", figures / "07_old_smoke.png", reports / "07_status.html"]
    for path in stale:
        path.write_text("from an earlier run")
    keep = figures / "07_old_tiny.png"  # another profile's figure stays
    keep.write_text("tiny")
    (nb_dir / "07_status.py").write_text(STATUS + '\n# %%\nraise RuntimeError("fails midway")\n')
    run = reproduce.run_notebook(nb_dir / "07_status.py", "smoke", kernel="python3", progress=False)
    assert run.status == "failed"
    assert not stale[0].exists() and not stale[1].exists() and keep.exists()
    assert "from an earlier run" not in stale[2].read_text()  # the HTML is the failed run's own
    assert json.loads((reports / "runs.json").read_text())["07_status"]["status"] == "failed"


@pytest.mark.slow
def test_sigterm_mid_notebook_is_recorded_as_interrupted(nb_dir, tmp_path):
    (nb_dir / "08_term.py").write_text(GOOD + textwrap.dedent('''
        # %%
        import os, signal, time
        os.kill(os.getppid(), signal.SIGTERM)  # the runner's process
        time.sleep(30)
        '''))
    with pytest.raises(reproduce._Terminated):
        reproduce.run_notebook(nb_dir / "08_term.py", "smoke", kernel="python3", progress=False)
    record = json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())["08_term"]
    assert record["status"] == "interrupted" and "partial" in record["error"]


def test_unknown_injected_parameter_is_an_error_naming_the_valid_ones():
    from medlib.config import check_injected_parameters

    history = ["", 'profile = None  # "smoke" | "tiny"', '# Parameters\nprofle = "smoke"\n', "import x"]
    with pytest.raises(ValueError, match=r"unknown notebook parameter\(s\) \['profle'\]; this notebook takes "
                                         r"\['profile'\]"):
        check_injected_parameters(history)
    check_injected_parameters(["", "profile = None", '# Parameters\nprofile = "smoke"\n'])
    check_injected_parameters(["", "profile = None", "print(1)"])  # nothing injected: nothing to check


@pytest.mark.slow
def test_papermill_with_a_misspelt_parameter_fails_at_once(nb_dir, tmp_path):
    import papermill as pm

    source = nb_dir / "09_params.py"
    source.write_text(GOOD.replace('print("profile is", profile)',
                                   'from medlib.config import notebook_profile\np = notebook_profile(profile)\n'
                                   'print("ran on", p.name)'))
    import jupytext

    with pytest.raises(pm.PapermillExecutionError, match="profle"):
        pm.execute_notebook(jupytext.read(source), str(tmp_path / "out.ipynb"), parameters={"profle": "smoke"},
                            kernel_name="python3", language="python", progress_bar=False)


@pytest.mark.slow
def test_reproduce_reuses_a_notebook_whose_inputs_did_not_change(nb_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "discover_notebooks", lambda only=None: [nb_dir / "00_good.py"])
    monkeypatch.setattr("medlib.summary_page.write_summary", lambda profile: tmp_path / "summary.html")
    (nb_dir / "00_good.py").write_text(GOOD)
    first = reproduce.reproduce("smoke", kernel="python3")
    assert [r.reused for r in first] == [False] and first[0].status == "ok"
    import time as _time

    start = _time.perf_counter()
    second = reproduce.reproduce("smoke", kernel="python3")
    assert [r.reused for r in second] == [True] and _time.perf_counter() - start < 10
    records = json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())
    assert "reused" in records["00_good"]
    assert "ok (reused)" in (tmp_path / "reports" / "smoke" / "index.md").read_text()
    third = reproduce.reproduce("smoke", kernel="python3", force=True)
    assert [r.reused for r in third] == [False]
    (nb_dir / "00_good.py").write_text(GOOD + "\n# %%\nprint('changed')\n")
    assert [r.reused for r in reproduce.reproduce("smoke", kernel="python3")] == [False]


def test_inputs_fingerprint_follows_source_profile_and_settings(nb_dir, monkeypatch):
    (nb_dir / "00_good.py").write_text(GOOD)
    base = reproduce.inputs_fingerprint(nb_dir / "00_good.py", "smoke")
    assert reproduce.inputs_fingerprint(nb_dir / "00_good.py", "smoke") == base
    assert reproduce.inputs_fingerprint(nb_dir / "00_good.py", "tiny") != base
    monkeypatch.setenv("MEDLIB_DATA", "/somewhere/else")
    assert reproduce.inputs_fingerprint(nb_dir / "00_good.py", "smoke") != base
    monkeypatch.delenv("MEDLIB_DATA")
    monkeypatch.setenv("MEDLIB_CACHE", str(nb_dir / "another-cache"))  # where the cache lives changes no number
    assert reproduce.inputs_fingerprint(nb_dir / "00_good.py", "smoke") == base
    (nb_dir / "00_good.py").write_text(GOOD + "\n")
    assert reproduce.inputs_fingerprint(nb_dir / "00_good.py", "smoke") != base


@pytest.mark.slow
def test_a_kernel_that_dies_is_recorded_as_failed(nb_dir, tmp_path):
    (nb_dir / "06_dies.py").write_text(GOOD + "\n# %%\nimport os\nos._exit(1)\n")
    run = reproduce.run_notebook(nb_dir / "06_dies.py", "smoke", kernel="python3", progress=False)
    assert run.status == "failed" and "Dead" in run.error
    record = json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())["06_dies"]
    assert record["status"] == "failed"


def test_publish_committed_takes_outputs_of_matching_cells_only(tmp_path, monkeypatch):
    import jupytext
    import nbformat

    from medlib import reproduce

    py = tmp_path / "07_toy.py"
    py.write_text("# %% tags=[\"parameters\"]\nprofile = None\n\n# %%\nx = 1\nx\n\n# %%\ny = 2\n")
    executed = jupytext.read(py)
    injected = nbformat.v4.new_code_cell('profile = "tiny"', metadata={"tags": ["injected-parameters"]})
    executed.cells.insert(1, injected)
    for i, cell in enumerate(executed.cells):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"out{i}")]
    executed.cells[3].source = "y = 3"  # the .py changed since the run
    reports = tmp_path / "reports" / "tiny"
    reports.mkdir(parents=True)
    nbformat.write(executed, reports / "07_toy.ipynb")
    monkeypatch.setattr(reproduce, "reports_dir", lambda profile: reports)
    out = reproduce.publish_committed(py, "tiny")
    nb = nbformat.read(out, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in jupytext.read(py).cells]  # inputs of the .py
    assert 'profile = "tiny"' not in [c.source for c in nb.cells]
    assert nb.cells[1].outputs[0]["text"] == "out2" and nb.cells[1].execution_count == 3
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None  # stale cell shows no old output
    with pytest.raises(FileNotFoundError, match="make reproduce"):
        reproduce.publish_committed(tmp_path / "08_missing.py", "tiny")


def test_cpu_profiles_pin_their_threads_so_jobs_does_not_change_the_numbers():
    assert reproduce.notebook_threads("tiny", 1, cpus=2) == reproduce.notebook_threads("tiny", 2, cpus=2) == 1
    assert reproduce.notebook_threads("smoke", 1, cpus=16) == 1
    assert reproduce.notebook_threads("gpu", 1, cpus=16) == 16 and reproduce.notebook_threads("gpu", 2, cpus=16) == 8
    assert reproduce.resolve_jobs("auto", "tiny", 5, cpus=2) == 2
    assert reproduce.resolve_jobs("auto", "tiny", 5, cpus=16) == 5, "never more jobs than notebooks"
    assert reproduce.resolve_jobs("auto", "smoke", 1, cpus=2) == 1
    assert reproduce.resolve_jobs("auto", "tiny", 5, cpus=1) == 1
    assert reproduce.resolve_jobs("auto", "gpu", 5, cpus=16) == 1, "a GPU profile runs one notebook at a time"
    assert reproduce.resolve_jobs(3, "gpu", 5) == 3
    for bad in (0, -1, True, 1.5, "two"):
        with pytest.raises(ValueError, match="jobs must be"):
            reproduce.resolve_jobs(bad, "tiny", 5)


def test_the_thread_count_is_part_of_a_notebooks_inputs(monkeypatch):
    path = reproduce.discover_notebooks(only=["00"])[0]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = reproduce.inputs_fingerprint(path, "smoke")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert reproduce.inputs_fingerprint(path, "smoke") != one, "a report made with other threads is not reused"


def test_jobs_argument_takes_auto_or_a_positive_count(capsys):
    assert reproduce._jobs_arg("auto") == "auto" and reproduce._jobs_arg("3") == 3
    for bad in ("0", "x", "-2"):
        with pytest.raises(SystemExit):
            reproduce.main(["--profile", "smoke", "--jobs", bad])
        assert "--jobs: must be an int >= 1 or 'auto'" in capsys.readouterr().err


def test_job_threads_shares_the_cores_and_keeps_one():
    assert reproduce.job_threads(1, cpus=2) == 2
    assert reproduce.job_threads(2, cpus=2) == 1
    assert reproduce.job_threads(3, cpus=2) == 1, "never zero threads"
    assert reproduce.job_threads(2, cpus=16) == 8 and reproduce.job_threads(3, cpus=16) == 5
    assert reproduce.job_threads(1) >= 1


def test_longest_first_orders_by_the_last_wall_time(nb_dir, tmp_path):
    paths = [nb_dir / f"{n}.py" for n in ("00_a", "01_b", "02_c", "03_d")]
    assert reproduce.longest_first(paths, "smoke") == paths, "no records: discovery order"
    runs = tmp_path / "reports" / "smoke" / "runs.json"
    runs.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text(json.dumps({"00_a": {"wall_time_s": 5.0}, "01_b": {"wall_time_s": 50.0},
                                "03_d": {"wall_time_s": 20.0}}))
    assert [p.stem for p in reproduce.longest_first(paths, "smoke")] == ["02_c", "01_b", "03_d", "00_a"], \
        "a notebook never timed goes first (it may be the longest)"
    runs.write_text("{not json")
    assert reproduce.longest_first(paths, "smoke") == paths
    other = tmp_path / "reports" / "tiny" / "runs.json"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text(json.dumps({"00_a": {"wall_time_s": 30.0}, "01_b": {"wall_time_s": 2000.0},
                                 "02_c": {"wall_time_s": 300.0}, "03_d": {"wall_time_s": 1000.0}}))
    assert [p.stem for p in reproduce.longest_first(paths, "smoke")] == ["01_b", "03_d", "02_c", "00_a"], \
        "another profile that times every notebook gives the order"
    runs.write_text(json.dumps({"00_a": {"wall_time_s": 5.0}, "01_b": {"wall_time_s": 50.0},
                                "02_c": {"wall_time_s": 1.0}, "03_d": {"wall_time_s": 20.0}}))
    assert [p.stem for p in reproduce.longest_first(paths, "smoke")] == ["01_b", "03_d", "00_a", "02_c"], \
        "the profile's own records win when they time every notebook"


def test_reproduce_rejects_a_bad_jobs_count():
    with pytest.raises(ValueError, match="jobs"):
        reproduce.reproduce("smoke", jobs=0)
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "smoke", "--jobs", "0"])


THREADS = GOOD + textwrap.dedent('''
    # %%
    import os, time
    time.sleep(float(os.environ.get("SLEEP", "0")))
    print("threads", os.environ.get("OMP_NUM_THREADS"))
    ''')


@pytest.mark.slow
def test_jobs_run_notebooks_at_once_in_workers_with_a_share_of_threads(nb_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    names = ["00_one", "01_two", "02_three"]
    for name in names:
        (nb_dir / f"{name}.py").write_text(THREADS)
    monkeypatch.setattr(reproduce, "discover_notebooks", lambda only=None: [nb_dir / f"{n}.py" for n in names])
    monkeypatch.setattr("medlib.summary_page.write_summary", lambda profile: tmp_path / "summary.html")
    runs = reproduce.reproduce("smoke", kernel="python3", jobs=2)
    assert [r.notebook for r in runs] == names and all(r.status == "ok" and r.html.exists() for r in runs)
    records = json.loads((tmp_path / "reports" / "smoke" / "runs.json").read_text())
    assert all(records[n]["status"] == "ok" and records[n]["inputs"] for n in names)
    for run in runs:
        nb = nbformat.read(run.output, as_version=4)
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert f"threads {reproduce.notebook_threads('smoke', 2)}" in text and "profile is smoke" in text
    assert all(records[n]["cpu_threads"] == "1" for n in names), "smoke pins one thread per notebook"
    assert [r.reused for r in reproduce.reproduce("smoke", kernel="python3", jobs=2)] == [True] * 3


@pytest.mark.slow
def test_jobs_start_nothing_new_after_a_failure_unless_keep_going(nb_dir, tmp_path, monkeypatch):
    (nb_dir / "00_bad.py").write_text(BAD)
    (nb_dir / "01_slow.py").write_text(THREADS)
    (nb_dir / "02_never.py").write_text(THREADS)
    paths = [nb_dir / f"{n}.py" for n in ("00_bad", "01_slow", "02_never")]
    monkeypatch.setenv("SLEEP", "8")  # 01_slow is still running when 00_bad fails
    monkeypatch.setattr(reproduce, "discover_notebooks", lambda only=None: paths)
    monkeypatch.setattr("medlib.summary_page.write_summary", lambda profile: tmp_path / "summary.html")
    runs = reproduce.reproduce("smoke", kernel="python3", jobs=2)
    assert {r.notebook: r.status for r in runs} == {"00_bad": "failed", "01_slow": "ok"}, \
        "the running notebook finishes, no new one starts"
    assert "broken on purpose" in runs[0].error
    monkeypatch.setenv("SLEEP", "0")
    runs = reproduce.reproduce("smoke", kernel="python3", jobs=2, keep_going=True)
    assert {r.notebook: r.status for r in runs} == {"00_bad": "failed", "01_slow": "ok", "02_never": "ok"}

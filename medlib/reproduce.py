"""`make reproduce`: execute every notebook with papermill into reports/<profile>/ and render HTML.

The jupytext ``.py`` file is the source of truth; it is read in memory and executed, so
``notebooks/`` is never modified. A failed cell leaves the partial executed notebook (and its
HTML) in ``reports/<profile>/``, prints a one-line summary and makes the command exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import PROFILE_NAMES, display_path, get_profile, repo_root, reports_dir
from .reporting import write_run_record


@dataclass
class NotebookRun:
    """The outcome of executing one notebook."""

    notebook: str
    status: str  # "ok" or "failed"
    wall_time_s: float
    output: Path
    html: Path | None
    error: str | None = None
    reused: bool = False


def shared_inputs(profile: str) -> dict:
    """What every notebook of a run depends on: the medlib code, the embedded weights, the profile (with its
    data sources), the lock and the ``MEDLIB_*`` settings that change numbers. Computed once per run."""
    import dataclasses
    import hashlib

    from .lock import lock_hash

    root = Path(__file__).resolve().parent
    code = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        code.update(str(path.relative_to(root)).encode())
        code.update(path.read_bytes())
    weights = hashlib.sha256()
    for path in sorted(root.rglob("embedded/**/*")):
        if path.is_file():
            weights.update(str(path.relative_to(root)).encode())
            weights.update(hashlib.sha256(path.read_bytes()).digest())
    return {"code": code.hexdigest(), "weights": weights.hexdigest(),
            "profile": dataclasses.asdict(get_profile(profile)), "lock": lock_hash(),
            # not MEDLIB_CACHE: where the cache lives changes no number (its entries are keyed by their inputs and
            # verified), and a fresh clone must be able to reuse reports made with another cache folder
            "env": {k: v for k, v in sorted(os.environ.items()) if k in ("MEDLIB_DATA", "MEDLIB_WEIGHTS_DIR",
                                                                       "MEDMNIST_ROOT", "MEDLIB_DATA_FILE",
                                                                       "MEDLIB_OVERRIDES", "OMP_NUM_THREADS")},
            "data_file": _data_file_hash()}


def _data_file_hash() -> str | None:
    """sha256 of the data file in force (its contents change results even when its path does not)."""
    import hashlib

    from .datafile import active_settings

    path = active_settings().data_file
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def inputs_fingerprint(py_path: Path, profile: str, shared: dict | None = None) -> str:
    """Hash of everything a notebook's results depend on: its source and :func:`shared_inputs`."""
    import hashlib

    from .cache import stable_hash

    shared = shared_inputs(profile) if shared is None else shared
    return stable_hash({"notebook": hashlib.sha256(py_path.read_bytes()).hexdigest(), **shared})


def _run_records(folder: Path) -> dict:
    """The run records in ``folder/runs.json``; empty when missing or damaged (the next run rewrites it)."""
    import json

    try:
        records = json.loads((folder / "runs.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return records if isinstance(records, dict) else {}


def _reusable(py_path: Path, profile: str, fingerprint: str) -> bool:
    """Whether the last run of this notebook ended ok on the same inputs and its report is still there."""
    out = reports_dir(profile)
    record = _run_records(out).get(py_path.stem, {})
    return (record.get("status") == "ok" and record.get("inputs") == fingerprint
            and (out / f"{py_path.stem}.html").is_file())


def discover_notebooks(folder: Path | None = None, only: list[str] | None = None) -> list[Path]:
    """The paired notebooks ``NN_name.py`` in order, optionally filtered by number or name prefix."""
    folder = folder or repo_root() / "notebooks"
    paths = sorted(p for p in folder.glob("[0-9][0-9]_*.py"))
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            raise FileNotFoundError(f"No notebook in {folder} matches {only}")
    return paths


# Headless runs write stderr into the rendered report: text progress bars and import-time warnings there are
# noise for a reader. tqdm honours TQDM_DISABLE; the "IProgress not found" TqdmWarning comes from tqdm.auto.
HEADLESS = {"MEDLIB_PROGRESS": "0", "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore:IProgress not found,ignore::DeprecationWarning,ignore::FutureWarning"}


@contextmanager
def kernel_environment(defaults: Mapping[str, str] = HEADLESS, **forced: str) -> Iterator[None]:
    """Environment for the kernels started inside: ``forced`` always, ``defaults`` unless the user set them."""
    wanted = {**{k: v for k, v in defaults.items() if k not in os.environ}, **forced}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: Seconds a kernel may take to answer its first request (papermill's default of 60 once failed notebook 01 of a
#: cold `smoke` run of `make bench` on 2 cores; the cause was not found, a slow start is not worth a failed run).
KERNEL_START_TIMEOUT_S = 300


def render_html(ipynb: Path) -> Path:
    """Render an executed notebook to HTML beside it (nbconvert's lab template)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(ipynb, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(nb)
    html = ipynb.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that the run record says "interrupted" before the process ends."""


@contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`_Terminated` (main thread only; elsewhere nothing changes)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise _Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_killed_runs(profile: str) -> list[str]:
    """Records left "running" by a process that no longer exists (a SIGKILL, a crash) become "interrupted"."""
    import json

    from .cache import save_json

    path = reports_dir(profile) / "runs.json"
    if not path.exists():
        return []
    records = json.loads(path.read_text())
    killed = [name for name, rec in records.items()
              if rec.get("status") == "running" and not _pid_alive(int(rec.get("pid", -1)))]
    for name in killed:
        records[name].update(status="interrupted", error="the process running it ended without a record "
                                                          "(killed?); its outputs are partial")
    if killed:
        save_json(path, records)
    return killed


def clear_previous_outputs(stem: str, profile: str) -> list[Path]:
    """Remove the notebook's previous HTML, tables and figures, so nothing older poses as this run's result."""
    from .config import figures_dir

    number = stem[:2]
    out_dir = reports_dir(profile)
    old = [out_dir / f"{stem}.html", *sorted((out_dir / "tables").glob(f"{number}_*")),
           *sorted(figures_dir().glob(f"{number}_*_{get_profile(profile).name}.*"))]
    removed = []
    for path in old:
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def run_notebook(py_path: Path, profile: str, kernel: str = "medlib", timeout: int | None = None,
                 progress: bool = True, fingerprint: str | None = None) -> NotebookRun:
    """Execute one paired notebook with papermill (parameter ``profile``) into ``reports/<profile>/``.

    The run is recorded as "running" before it starts and as ok / failed / interrupted when it ends,
    whatever ends it (an exception, SIGINT, SIGTERM; a SIGKILL is found by :func:`mark_killed_runs` at the
    next run). Its previous HTML, tables and figures are removed first, so a failed or interrupted run
    leaves only its own partial outputs, under a record that says so.
    """
    import jupytext
    import papermill as pm

    out_dir = reports_dir(profile)
    output = out_dir / f"{py_path.stem}.ipynb"
    nb = jupytext.read(py_path)
    clear_previous_outputs(py_path.stem, profile)
    write_run_record(profile, py_path.stem, 0.0, "running", None, pid=os.getpid())
    start = time.perf_counter()
    error = None
    status = "interrupted"
    try:
        with kernel_environment(MEDLIB_NOTEBOOK=py_path.stem), _sigterm_as_exception():
            pm.execute_notebook(nb, str(output), parameters={"profile": profile}, kernel_name=kernel,
                                language="python", cwd=str(py_path.parent), progress_bar=progress,
                                execution_timeout=timeout, start_timeout=KERNEL_START_TIMEOUT_S)
        status = "ok"
    except pm.PapermillExecutionError as exc:
        status = "failed"
        error = f"cell {exc.cell_index} (exec {exc.exec_count}): {exc.ename}: {str(exc.evalue).splitlines()[0] if exc.evalue else ''}"
    except Exception as exc:  # noqa: BLE001 - a dead kernel, a timeout ...: recorded as failed, the run goes on
        status = "failed"
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    except (KeyboardInterrupt, _Terminated) as exc:
        error = f"interrupted ({type(exc).__name__ if isinstance(exc, KeyboardInterrupt) else exc}); outputs are partial"
        write_run_record(profile, py_path.stem, time.perf_counter() - start, "interrupted", error)
        if output.exists():
            render_html(output)
        raise
    wall = time.perf_counter() - start
    html = render_html(output) if output.exists() else None
    write_run_record(profile, py_path.stem, wall, status, error, inputs=fingerprint,
                     cpu_threads=os.environ.get("OMP_NUM_THREADS"))
    return NotebookRun(py_path.stem, status, wall, output, html, error)


def reproduce(profile: str, kernel: str = "medlib", only: list[str] | None = None,
              keep_going: bool = False, force: bool = False, site: bool = False, data: str | Path | None = None,
              overrides: list[str] | None = None, jobs: int | str = 1) -> list[NotebookRun]:
    """Execute every notebook for ``profile``; stop at the first failure unless ``keep_going``.

    ``jobs`` > 1 executes that many notebooks at once, each in its own process, the longest first
    (:func:`longest_first`); ``"auto"`` picks the count (:func:`resolve_jobs`). Each notebook computes with
    :func:`notebook_threads` CPU threads (recorded, and part of its inputs); caches are shared
    safely (one build per entry, :func:`medlib.cache.entry_lock`). After a failure without
    ``keep_going`` no further notebook starts, and the running ones finish.

    A notebook whose inputs (:func:`inputs_fingerprint`) are those of its last successful run is not
    executed again: its report is reused and the records say so. ``force`` re-executes everything.
    ``site`` also builds the companion site (:mod:`medlib.site`) at the end.
    ``data`` (a data file) and ``overrides`` (``section.field=value``) reach every notebook through
    ``$MEDLIB_DATA_FILE`` / ``$MEDLIB_OVERRIDES``; both are validated with the selected notebooks'
    data keys, files and weights before anything runs (:func:`medlib.datafile.validate`).
    """
    from .datafile import settings_env

    with kernel_environment({}, **settings_env(data, overrides)):
        return _reproduce(profile, kernel, only, keep_going, force, site, jobs)


def _reproduce(profile: str, kernel: str, only: list[str] | None, keep_going: bool, force: bool,
               site: bool = False, jobs: int | str = 1) -> list[NotebookRun]:
    get_profile(profile)  # validate early
    paths = discover_notebooks(only=only)
    jobs = resolve_jobs(jobs, profile, len(paths))
    threads = str(notebook_threads(profile, jobs))
    with kernel_environment({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}):
        return _reproduce_paths(profile, kernel, paths, keep_going, force, site, jobs)


def _reproduce_paths(profile: str, kernel: str, paths: list[Path], keep_going: bool, force: bool,
                     site: bool, jobs: int) -> list[NotebookRun]:
    from .datafile import active_settings, validate

    if get_profile(profile).name == "paper" or active_settings().active:
        validate(profile, [p.stem for p in paths])  # every problem at once, before any compute
    for name in mark_killed_runs(profile):
        print(f"[reproduce:{profile}] {name}: its last run was killed; recorded as interrupted", flush=True)
    runs: list[NotebookRun] = []
    shared = shared_inputs(profile)
    to_run: list[tuple[Path, str]] = []
    for path in paths:
        fingerprint = inputs_fingerprint(path, profile, shared)
        if not force and _reusable(path, profile, fingerprint):
            import json

            from .cache import save_json

            records = json.loads((reports_dir(profile) / "runs.json").read_text())
            record = records[path.stem]
            record["reused"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")  # the summary page says it was reused
            save_json(reports_dir(profile) / "runs.json", records)
            run = NotebookRun(path.stem, "ok", float(record.get("wall_time_s", 0.0)),
                              reports_dir(profile) / f"{path.stem}.ipynb", reports_dir(profile) / f"{path.stem}.html",
                              reused=True)
            runs.append(run)
            print(f"[reproduce:{profile}] {path.stem}: inputs unchanged since its last successful run "
                  f"({record.get('created', '?')}); report reused (--force re-executes)", flush=True)
            continue
        to_run.append((path, fingerprint))
    if jobs > 1 and len(to_run) > 1:
        runs += _run_parallel(to_run, profile, kernel, jobs, keep_going)
    else:
        for path, fingerprint in to_run:
            print(f"[reproduce:{profile}] {path.stem} ...", flush=True)
            run = run_notebook(path, profile, kernel, fingerprint=fingerprint)
            runs.append(run)
            _print_finished(profile, run)
            if run.status != "ok" and not keep_going:
                break
    write_index(profile, runs)
    from .summary_page import write_summary  # the cross-study page a reader opens first

    print(f"[reproduce:{profile}] summary -> {write_summary(profile)}", flush=True)
    if site and any((reports_dir(profile)).glob("[0-9][0-9]_*.ipynb")):
        from .site import build as build_site  # the companion site: notebooks, summary, tables, docs pages

        try:
            print(f"[reproduce:{profile}] site -> {build_site(profile)}", flush=True)
        except (ImportError, RuntimeError, FileNotFoundError) as err:  # the reports stand without the site
            print(f"[reproduce:{profile}] site not built: {err}", file=sys.stderr, flush=True)
    return runs


def _print_finished(profile: str, run: NotebookRun) -> None:
    print(f"[reproduce:{profile}] {run.notebook}: {run.status} in {run.wall_time_s:.1f} s -> {run.html}", flush=True)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def job_threads(jobs: int, cpus: int | None = None) -> int:
    """CPU threads for each of ``jobs`` notebooks run at once: an equal share of the cores, at least one."""
    cpus = cpus if cpus is not None else _cpus()
    return max(1, int(cpus) // max(1, int(jobs)))


def notebook_threads(profile: str, jobs: int, cpus: int | None = None) -> int:
    """CPU threads each notebook computes with: the profile's pin (``cpu_threads``), else its share of the cores.

    ``$OMP_NUM_THREADS``, when set, wins (and is recorded); the pin makes the numbers independent of ``jobs``.
    """
    pinned = get_profile(profile).cpu_threads
    return int(pinned) if pinned > 0 else job_threads(jobs, cpus)


def resolve_jobs(jobs: int | str, profile: str, notebooks: int, cpus: int | None = None) -> int:
    """``jobs`` as a count: ``"auto"`` is as many notebooks at once as the cores hold at the profile's pinned
    threads (``cpu_threads``; at most ``notebooks``), and one for a profile without a pin (a GPU profile)."""
    if jobs == "auto":
        pinned = get_profile(profile).cpu_threads
        if pinned <= 0:
            return 1
        cpus = cpus if cpus is not None else _cpus()
        return max(1, min(int(notebooks), int(cpus) // int(pinned)))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1 or 'auto', got {jobs!r}.")
    return jobs


def longest_first(paths: list[Path], profile: str) -> list[Path]:
    """``paths`` ordered by their last recorded wall time, longest first, so that running notebooks at once ends
    as early as the longest allows. The times come from this profile's run records, or, when those miss a
    notebook, from another profile's that time them all (relative lengths carry over; a fresh clone has the
    committed ``tiny`` records); otherwise a notebook never timed goes first, the rest in their order."""
    def wall(records: dict, path: Path) -> float | None:
        record = records.get(path.stem)
        value = record.get("wall_time_s") if isinstance(record, dict) else None
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    own = reports_dir(profile)
    own_records = _run_records(own)
    others = sorted(f for f in own.parent.iterdir() if f.is_dir() and f != own) if own.parent.is_dir() else []
    for records in (own_records, *map(_run_records, others)):
        if all(wall(records, path) is not None for path in paths):
            return sorted(paths, key=lambda path: wall(records, path), reverse=True)
    return sorted(paths, key=lambda path: wall(own_records, path) or float("inf"), reverse=True)  # stable


def _worker_command(path: Path, profile: str, kernel: str, fingerprint: str) -> list[str]:
    return [sys.executable, "-m", "medlib.reproduce", "--profile", profile, "--kernel", kernel,
            "--worker", str(path), "--fingerprint", fingerprint]


def _finished_run(path: Path, profile: str, returncode: int, wall: float) -> NotebookRun:
    """A worker's outcome from its run record (status, error), with the wall time seen from here."""
    out = reports_dir(profile)
    record = _run_records(out).get(path.stem, {})
    status = record.get("status", "failed")
    error = record.get("error")
    if returncode != 0 and status == "ok":
        status, error = "failed", f"its worker process exited with code {returncode}"
    if status == "running":  # the worker died before it could write its end
        status, error = "interrupted", f"its worker process ended with code {returncode} before its record"
    html = out / f"{path.stem}.html"
    return NotebookRun(path.stem, status, float(record.get("wall_time_s", wall) or wall), out / f"{path.stem}.ipynb",
                       html if html.exists() else None, error)


def _run_parallel(to_run: list[tuple[Path, str]], profile: str, kernel: str, jobs: int,
                  keep_going: bool) -> list[NotebookRun]:
    """Execute notebooks ``jobs`` at a time in worker processes (``--worker``), the longest first."""
    fingerprints = {path: fp for path, fp in to_run}
    pending = longest_first([path for path, _ in to_run], profile)
    # the workers inherit OMP_NUM_THREADS / MKL_NUM_THREADS (notebook_threads) from _reproduce
    print(f"[reproduce:{profile}] {len(pending)} notebooks, {jobs} at a time, {os.environ.get('OMP_NUM_THREADS', '?')} "
          f"CPU thread(s) each", flush=True)
    running: dict[Path, tuple[subprocess.Popen, float]] = {}
    runs: dict[Path, NotebookRun] = {}
    stop = False
    try:
        with _sigterm_as_exception():
            while pending or running:
                while pending and len(running) < jobs and not stop:
                    path = pending.pop(0)
                    print(f"[reproduce:{profile}] {path.stem} ...", flush=True)
                    proc = subprocess.Popen(_worker_command(path, profile, kernel, fingerprints[path]))
                    running[path] = (proc, time.perf_counter())
                for path, (proc, started) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[path]
                    run = runs[path] = _finished_run(path, profile, proc.returncode, time.perf_counter() - started)
                    _print_finished(profile, run)
                    stop = stop or (run.status != "ok" and not keep_going)
                if stop and not running:
                    break
                time.sleep(0.2)
    except (KeyboardInterrupt, _Terminated):
        deadline = time.time() + 30  # the workers record "interrupted" themselves (they got SIGINT too)
        for proc, _ in running.values():
            if proc.poll() is None and not _wait(proc, deadline):
                proc.send_signal(signal.SIGTERM)
        for proc, _ in running.values():
            _wait(proc, time.time() + 30)
        raise
    return [runs[path] for path, _ in to_run if path in runs]


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for ``proc`` until ``deadline`` (time.time()); whether it ended."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.time()))
        return True
    except subprocess.TimeoutExpired:
        return False


def write_index(profile: str, runs: list[NotebookRun]) -> Path:
    """A small ``reports/<profile>/index.md``: each notebook's latest run (this call's, else ``runs.json``) and tables."""
    import json

    out_dir = reports_dir(profile)
    lines = [f"# Reports - profile `{profile}`", "", f"{get_profile(profile).description}", "",
             "| notebook | status | wall time (s) | run at | html |", "|---|---|---|---|---|"]
    records = json.loads((out_dir / "runs.json").read_text()) if (out_dir / "runs.json").exists() else {}
    latest = {name: (rec.get("status", "?"), float(rec.get("wall_time_s", float("nan"))), rec.get("created", ""))
              for name, rec in records.items()}
    latest.update({run.notebook: (run.status + (" (reused)" if run.reused else ""), run.wall_time_s,
                                  latest.get(run.notebook, ("", 0, ""))[2]) for run in runs})
    for name in sorted(latest):
        status, wall, when = latest[name]
        html = out_dir / f"{name}.html"
        link = f"[{html.name}]({html.name})" if html.exists() else "-"
        lines.append(f"| {name} | {status} | {wall:.1f} | {when} | {link} |")
    tables = sorted((out_dir / "tables").glob("*.md")) if (out_dir / "tables").exists() else []
    if tables:
        lines += ["", "## Tables", ""] + [f"- [{t.stem}](tables/{t.name})" for t in tables]
    index = out_dir / "index.md"
    index.write_text("\n".join(lines) + "\n")
    return index


def refresh_committed(py_path: Path, profile: str = "smoke", kernel: str = "medlib", timeout: int = 1800) -> Path:
    """Execute a notebook's ``.py`` on ``profile`` and write the paired ``.ipynb`` with its outputs (for nbval)."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(py_path)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    with kernel_environment(MEDLIB_PROFILE=profile):
        NotebookClient(nb, timeout=timeout, kernel_name=kernel,
                       resources={"metadata": {"path": str(py_path.parent)}}).execute()
    out = py_path.with_suffix(".ipynb")
    jupytext.write(nb, out)
    return out


def publish_committed(py_path: Path, profile: str = "tiny") -> Path:
    """Write a notebook's committed ``.ipynb``: the ``.py``'s cells with the outputs of its executed ``profile`` report.

    A code cell whose source changed since that run keeps no output (and no execution count), so a
    stale publication is visible; papermill's injected-parameters cell and run metadata are left out.
    """
    import jupytext
    import nbformat

    report = reports_dir(profile) / f"{py_path.stem}.ipynb"
    if not report.is_file():
        raise FileNotFoundError(f"{display_path(report)} does not exist: run `make reproduce PROFILE={profile}` first.")
    executed = nbformat.read(report, as_version=4)
    ran = {}
    for cell in executed.cells:
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", []):
            ran.setdefault(cell.source.strip(), cell)
    nb = jupytext.read(py_path)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        match = ran.get(cell.source.strip())
        cell.outputs = list(match.outputs) if match is not None else []
        cell.execution_count = match.execution_count if match is not None else None
    out = py_path.with_suffix(".ipynb")
    jupytext.write(nb, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m medlib.reproduce --profile tiny``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    parser.add_argument("--kernel", default="medlib", help="Jupyter kernel name (make setup registers 'medlib')")
    parser.add_argument("--only", nargs="*", help="notebook numbers or name prefixes, e.g. 00 01")
    parser.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    parser.add_argument("--force", action="store_true", help="re-execute notebooks whose inputs did not change")
    parser.add_argument("--site", action="store_true",
                        help="then build the companion site reports/<profile>/site (python -m medlib.site build)")
    parser.add_argument("--data", help="a data file (TOML, see data.example.toml): sources, weights folder, overrides")
    parser.add_argument("--override", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="profile fields to change, e.g. eval.finetune_epochs=1 backbone.compare=dinov2-vit-s14")
    parser.add_argument("--jobs", type=_jobs_arg, default="auto",
                        help="notebooks executed at once, each in its own process, or 'auto' (default): as many "
                             "as the cores hold at the profile's pinned CPU threads (smoke, tiny: 1 each), else 1")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one notebook, for --jobs: its .py path
    parser.add_argument("--fingerprint", help=argparse.SUPPRESS)
    parser.add_argument("--refresh-committed", action="store_true",
                        help="instead: re-execute notebooks/*.ipynb in place on the profile (smoke) for nbval")
    parser.add_argument("--publish-committed", action="store_true",
                        help="instead: write notebooks/*.ipynb with the outputs of the profile's executed reports")
    args = parser.parse_args(argv)
    if args.worker:
        run = run_notebook(Path(args.worker), args.profile, args.kernel, progress=False, fingerprint=args.fingerprint)
        return 0 if run.status == "ok" else 1
    if args.publish_committed:
        for path in discover_notebooks(only=args.only):
            print(f"[publish] {path.stem}: {args.profile} outputs -> {display_path(publish_committed(path, args.profile))}")
        return 0
    if args.refresh_committed:
        for path in discover_notebooks(only=args.only):
            print(f"[refresh] {path.stem} on {args.profile} -> {refresh_committed(path, args.profile, args.kernel)}")
        return 0
    from .datafile import DataFileError

    started = time.perf_counter()
    try:
        runs = reproduce(args.profile, args.kernel, args.only, args.keep_going, args.force, site=args.site,
                         data=args.data, overrides=args.override, jobs=args.jobs)
    except DataFileError as err:
        print(str(err), file=sys.stderr)
        return 2
    failed = [r for r in runs if r.status != "ok"]
    for r in failed:
        print(f"FAILED {r.notebook}: {r.error} (partial notebook: {r.output})", file=sys.stderr)
    total = sum(r.wall_time_s for r in runs if not r.reused)
    reused = sum(r.reused for r in runs)
    print(f"[reproduce:{args.profile}] {len(runs) - len(failed)}/{len(runs)} notebooks ok ({reused} reused) in "
          f"{time.perf_counter() - started:.1f} s wall (notebooks executed: {total:.1f} s"
          f"{f', --jobs {args.jobs}' if args.jobs != 1 else ''})")
    return 1 if failed else 0


def _jobs_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'auto', got {value!r}")
    return jobs


if __name__ == "__main__":
    raise SystemExit(main())

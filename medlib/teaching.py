"""The teaching layer: helpers for the notebooks' "predict, then run" exercises, and the student edition.

Every study notebook ends with an *Exercises* section. Each exercise is a group of cells, tagged:

- ``exercise``: the cell the student edits. It writes a ``prediction`` (before running), makes
  ONE change to what the notebook did (a smaller k, fewer folds, another guidance scale ...), runs
  it through ``medlib`` in seconds, and leaves an ``answer`` for the student to fill in after
  reading the result.
- ``solution`` (with ``hide-cell``, so the site folds it away): a model prediction and the answer,
  read from the run with the reasoning in comments.
- ``self-check``: asserts that the prediction was written down and that the answer agrees with
  what the run showed, with one of the ``check_*`` functions below. They raise an informative
  :class:`AssertionError` for a missing or wrong answer - a prediction itself is never graded.

``python -m medlib.teaching student --out DIR`` writes the student edition: every notebook
without its ``solution`` cells (``make student``). ``python -m medlib.teaching inventory`` lists
the exercises of every notebook.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

EXERCISE, SOLUTION, SELF_CHECK = "exercise", "solution", "self-check"
#: Tags a solution cell carries: ``solution`` (stripped from the student edition) and MyST-NB's ``hide-cell``.
SOLUTION_TAGS = (SOLUTION, "hide-cell")
DIRECTIONS = ("higher", "lower", "same")
STUDY_NOTEBOOKS = ("01", "02", "03", "04")
MIN_EXERCISES = 3


# --------------------------------------------------------------------------- self-checks


def _missing(value: Any) -> bool:
    return value is None or value is Ellipsis or (isinstance(value, str) and not value.strip())


def check_prediction(prediction: Any) -> None:
    """Fail unless a prediction was written down (any non-empty text or value): it is never graded."""
    if _missing(prediction):
        raise AssertionError("Write your prediction in `prediction` (a sentence is enough) BEFORE you run the "
                             "exercise cell, then run it. Predictions are not graded - the point is to compare "
                             "what you expected with what happened.")


def check_choice(answer: Any, observed: str, choices: Sequence[str] = DIRECTIONS, what: str = "the result",
                 prediction: Any = "") -> None:
    """Fail unless ``answer`` is one of ``choices`` and equals ``observed`` (what the run showed)."""
    check_prediction(prediction)
    if observed not in choices:
        raise ValueError(f"observed={observed!r} is not one of the choices {list(choices)}")
    if _missing(answer):
        raise AssertionError(f"Fill in `answer` after running the exercise cell: one of {list(choices)} - "
                             f"what did {what} do?")
    text = str(answer).strip().lower()
    if text not in choices:
        raise AssertionError(f"`answer` must be one of {list(choices)}, got {answer!r}.")
    if text != observed:
        raise AssertionError(f"Not what the run shows: you answered {text!r}, but {what} came out {observed!r}. "
                             "Look at the table the exercise cell printed again (and, if your prediction differed, "
                             "ask yourself why).")


def check_number(answer: Any, observed: float, tol: float, what: str = "the value", prediction: Any = "") -> None:
    """Fail unless ``answer`` is a number within ``tol`` of ``observed`` (what the run showed)."""
    check_prediction(prediction)
    if _missing(answer):
        raise AssertionError(f"Fill in `answer` with a number after running the exercise cell: {what}.")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        raise AssertionError(f"`answer` must be a number ({what}), got {answer!r}.") from None
    if not math.isfinite(float(observed)):
        raise AssertionError(f"The run gave no finite value for {what} ({observed}); re-run the exercise cell.")
    if not math.isfinite(value) or abs(value - float(observed)) > tol:
        raise AssertionError(f"Not what the run shows: you answered {value:.4g} for {what}, but the run gives "
                             f"{float(observed):.4g} (tolerance {tol:g}). Read it off the exercise cell's output.")


def check_in_range(value: float, low: float, high: float, what: str = "the value") -> None:
    """Fail unless ``low <= value <= high`` (a plausibility check on a result)."""
    if not (math.isfinite(float(value)) and low <= float(value) <= high):
        raise AssertionError(f"{what} = {value!r} lies outside the plausible range [{low}, {high}]: check the "
                             "change you made in the exercise cell.")


def direction(before: float, after: float, tol: float = 0.0) -> str:
    """``"higher"`` / ``"lower"`` when ``after`` differs from ``before`` by more than ``tol``, else ``"same"``."""
    if not (math.isfinite(before) and math.isfinite(after)):
        raise ValueError(f"direction needs finite values, got before={before}, after={after}")
    if after > before + tol:
        return "higher"
    if after < before - tol:
        return "lower"
    return "same"


# --------------------------------------------------------------------------- comparisons


def paired_change(before: pd.DataFrame, after: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """Join two tables on ``keys``: ``before``, ``after``, ``change`` (after - before) and its ``direction``."""
    for name, t in (("before", before), ("after", after)):
        missing = set(keys) | {value}
        missing -= set(t.columns)
        if missing:
            raise ValueError(f"the {name} table lacks columns {sorted(missing)}")
    a = before[list(keys) + [value]].rename(columns={value: "before"})
    b = after[list(keys) + [value]].rename(columns={value: "after"})
    out = a.merge(b, on=list(keys), how="inner", validate="one_to_one")
    if out.empty:
        raise ValueError(f"no rows in common on {list(keys)}")
    out["change"] = out["after"] - out["before"]
    out["direction"] = [direction(x, y) for x, y in zip(out["before"], out["after"])]
    return out


def majority_direction(change: pd.DataFrame) -> str:
    """The direction most rows of a :func:`paired_change` table took (``"same"`` on a tie of higher and lower)."""
    counts = change["direction"].value_counts()
    up, down = int(counts.get("higher", 0)), int(counts.get("lower", 0))
    return "higher" if up > down else "lower" if down > up else "same"


def interval_width_change(before: pd.DataFrame, after: pd.DataFrame, keys: Sequence[str],
                          low: str = "ci_low", high: str = "ci_high") -> pd.DataFrame:
    """Per row: the width of the interval ``[low, high]`` before and after, and their ratio (after / before)."""
    b = before.assign(width=before[high] - before[low])
    a = after.assign(width=after[high] - after[low])
    out = paired_change(b, a, keys, "width").rename(columns={"before": "width_before", "after": "width_after"})
    out["ratio"] = out["width_after"] / out["width_before"].where(out["width_before"] > 0)
    return out


# --------------------------------------------------------------------------- study 1: acquisition shift


def shifted(ds, seed: int):
    """The ImageSet with every image under its own random gamma / contrast / brightness (a scanner change)."""
    import dataclasses

    from .models.health import acquisition_shift

    return dataclasses.replace(ds, images=acquisition_shift(np.asarray(ds.images), seed=seed),
                               name=f"{ds.name}-shifted{seed}")


def frozen_features(backbones: Mapping[str, Any], ds, key: str, *, shift: bool = False, seed: int = 0,
                    image_size: int | None = None, batch_size: int = 64, device: str = "auto") -> dict:
    """``{(backbone, key): FeatureSet}`` of ``ds`` as generated, or under :func:`shifted` when ``shift``.

    The mapping is what the studies' kNN and probe tables take (e.g. study 1's ``knn_table``);
    features are cached on disk like the notebooks' own.
    """
    from .eval.features import extract_features

    data = shifted(ds, seed) if shift else ds
    return {(name, key): extract_features(bb, data, image_size=image_size, batch_size=batch_size, device=device)
            for name, bb in backbones.items()}


# --------------------------------------------------------------------------- study 2: bootstrap, size


def delta_interval(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *, n_resamples: int = 1000,
                   seed: int = 0, paired: bool = True, level: float = 0.95) -> dict[str, float]:
    """Bootstrap interval of macro AUROC(a) - AUROC(b) on one test set.

    ``paired=True`` scores both models on the same resampled images (the paper's test); ``False``
    resamples them independently, as if they had been tested on two different samples.
    """
    from .eval.stats import bootstrap_indices, macro_auroc, resampled_macro_auroc

    y = np.asarray(y_true)
    if y.ndim == 1:
        y = y[:, None]
    sa, sb = (np.asarray(s).reshape(y.shape) for s in (scores_a, scores_b))
    ia = bootstrap_indices(len(y), n_resamples, seed)
    ib = ia if paired else bootstrap_indices(len(y), n_resamples, seed + 1)
    d = resampled_macro_auroc(y, sa, ia) - resampled_macro_auroc(y, sb, ib)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise ValueError("no resample had both classes of some label: the test set is too small")
    alpha = (1 - level) / 2
    low, high = np.quantile(d, [alpha, 1 - alpha])
    return {"paired": bool(paired), "delta": float(macro_auroc(y, sa) - macro_auroc(y, sb)),
            "ci_low": float(low), "ci_high": float(high), "width": float(high - low), "n_valid": int(d.size)}


def count_significant(tests: pd.DataFrame, column: str = "p", alpha: float = 0.05, label: str = "macro") -> int:
    """How many rows of a comparison table (``label`` rows only) have ``column`` (``p`` or ``q``) below ``alpha``."""
    if column not in tests.columns:
        raise ValueError(f"the table has no column {column!r}; columns: {list(tests.columns)}")
    rows = tests[tests["label"] == label] if "label" in tests.columns else tests
    return int((rows[column].astype(float) < alpha).sum())


def probe_auroc_vs_size(backbones: Mapping[str, Any], ds, test: np.ndarray, draws: Mapping[float, np.ndarray], *,
                        image_size: int | None = None, batch_size: int = 64, C: float = 1.0,
                        device: str = "auto") -> pd.DataFrame:
    """Test macro AUROC of a logistic-regression probe on frozen CLS features, per backbone and training draw.

    A cheap stand-in for study 2's fine-tuning ablation. ``draws`` maps a fraction to the indices of
    the training images at that fraction (e.g. study 2's ``fraction_indices``; the same draw for every
    backbone), ``test`` holds the test indices. Features are standardised on the training part, one L2
    logistic regression per label; labels with one class in the training part or in the test split are
    left out of the macro mean (``labels_scored``).
    """
    from sklearn.linear_model import LogisticRegression

    from .eval.features import extract_features
    from .eval.metrics import macro_auroc

    y = ds.label_matrix() if hasattr(ds, "label_matrix") else np.asarray(ds.labels)
    if y.ndim == 1:
        y = y[:, None]
    test = np.asarray(test)
    rows = []
    for name, bb in backbones.items():
        x = np.asarray(extract_features(bb, ds, image_size=image_size, batch_size=batch_size, device=device).cls,
                       dtype=np.float64)
        for f, train in draws.items():
            train = np.asarray(train)
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
            xtr, xte = (x[train] - mu) / sd, (x[test] - mu) / sd
            keep = [j for j in range(y.shape[1])
                    if len(np.unique(y[train, j])) == 2 and len(np.unique(y[test, j])) == 2]
            scores = np.zeros((len(test), len(keep)))
            for c, j in enumerate(keep):
                model = LogisticRegression(C=C, max_iter=2000).fit(xtr, y[train, j])
                scores[:, c] = model.predict_proba(xte)[:, 1]
            auroc = macro_auroc(y[test][:, keep], scores) if keep else float("nan")
            rows.append({"backbone": name, "fraction": float(f), "n_train": int(len(train)),
                         "labels_scored": len(keep), "test_auroc": float(auroc)})
    return pd.DataFrame(rows)


def gap_by_size(table: pd.DataFrame, a: str, b: str, value: str = "test_auroc") -> pd.DataFrame:
    """Per fraction of a :func:`probe_auroc_vs_size` table: ``gap`` = value(a) - value(b)."""
    wide = table.pivot_table(index="fraction", columns="backbone", values=value)
    for name in (a, b):
        if name not in wide.columns:
            raise ValueError(f"backbone {name!r} not in the table; it has {list(wide.columns)}")
    out = wide[[a, b]].copy()
    out["gap"] = out[a] - out[b]
    out.columns.name = None
    return out.reset_index()


# --------------------------------------------------------------------------- study 3: selection, folds, arms


def selection_optimism(results: pd.DataFrame) -> pd.DataFrame:
    """Per (task, role): mean test AUROC at the setting chosen on validation vs on test, and the optimism.

    ``results`` has one row per (task, role, setting, fold) with ``val_auroc`` and ``test_auroc``
    (study 3's ``cross_validate``). Choosing on test picks the best test mean, so ``optimism``
    (test-chosen minus validation-chosen) is never negative: it is the bias of peeking at test.
    """
    missing = {"task", "role", "setting", "val_auroc", "test_auroc"} - set(results.columns)
    if missing:
        raise ValueError(f"results lack columns {sorted(missing)}")
    means = results.groupby(["task", "role", "setting"], sort=False)[["val_auroc", "test_auroc"]].mean()
    rows = []
    for (task, role), g in means.groupby(level=["task", "role"], sort=False):
        by_val = g["val_auroc"].idxmax()
        by_test = g["test_auroc"].idxmax()
        rows.append({"task": task, "role": role, "settings": len(g), "chosen_on_val": by_val[2],
                     "chosen_on_test": by_test[2], "test_auroc_val_chosen": float(g.loc[by_val, "test_auroc"]),
                     "test_auroc_test_chosen": float(g.loc[by_test, "test_auroc"])})
    out = pd.DataFrame(rows)
    out["optimism"] = out["test_auroc_test_chosen"] - out["test_auroc_val_chosen"]
    return out


def arm_difference(boot: Mapping[str, Any], a: str, b: str, level: float = 0.95) -> pd.DataFrame:
    """Per task: mean-over-folds test AUROC of arm ``a`` minus arm ``b``, with a paired bootstrap interval.

    ``boot`` maps task -> :class:`medlib.studies.radimagenet_ssl_continuation.FoldAUROC`; tasks
    where either arm is missing are skipped.
    """
    alpha = (1 - level) / 2
    rows = []
    for task, fb in boot.items():
        if a not in fb.arms or b not in fb.arms:
            continue
        (ma, ra), (mb, rb) = fb.mean(a), fb.mean(b)
        d = ra - rb
        d = d[np.isfinite(d)]
        low, high = np.quantile(d, [alpha, 1 - alpha]) if d.size else (np.nan, np.nan)
        rows.append({"task": task, "a": a, "b": b, "delta": ma - mb, "ci_low": float(min(low, ma - mb)),
                     "ci_high": float(max(high, ma - mb))})
    if not rows:
        raise ValueError(f"no task has both arms {a!r} and {b!r}")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- study 4: tokens, sampling


def midpoint_norm_ratio(a: Any, b: Any, method: str = "slerp") -> float:
    """Mean over tokens of |midpoint| / mean(|a|, |b|) for the ``method`` ("slerp" or "lerp") midpoint at t = 0.5."""
    from .diffusion.pipeline import slerp

    ta, tb = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64) for x in (a, b))
    if ta.shape != tb.shape:
        raise ValueError(f"a and b must have the same shape, got {ta.shape} and {tb.shape}")
    if method == "slerp":
        mid = np.asarray(slerp(ta.astype(np.float32), tb.astype(np.float32), 0.5), dtype=np.float64)
    elif method == "lerp":
        mid = 0.5 * (ta + tb)
    else:
        raise ValueError(f"method must be 'slerp' or 'lerp', got {method!r}")
    ends = 0.5 * (np.linalg.norm(ta, axis=-1) + np.linalg.norm(tb, axis=-1))
    return float(np.mean(np.linalg.norm(mid, axis=-1) / np.maximum(ends, 1e-12)))


def seed_diversity(samples: np.ndarray) -> float:
    """Mean over conditions and pixels of the std across seeds, (n, k, H, W) images (k >= 2), in grey levels."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim < 3 or x.shape[1] < 2:
        raise ValueError(f"samples must be (n conditions, k >= 2 seeds, ...), got {x.shape}")
    return float(x.std(axis=1).mean())


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference of two image stacks of the same shape (grey levels)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} and {y.shape}")
    return float(np.abs(x - y).mean())


# --------------------------------------------------------------------------- notebooks and the student edition


@dataclass
class Exercise:
    """One exercise of a notebook: the indices of its cells, by tag."""

    exercise: int
    solutions: list[int] = field(default_factory=list)
    self_checks: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return bool(self.solutions) and bool(self.self_checks)


def cell_tags(cell: Mapping[str, Any]) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def exercises(nb: Any) -> list[Exercise]:
    """The exercises of a notebook: each ``exercise`` cell with the solution / self-check cells after it.

    A solution or self-check cell before the first exercise cell is an error.
    """
    out: list[Exercise] = []
    for i, cell in enumerate(nb["cells"]):
        tags = cell_tags(cell)
        if EXERCISE in tags:
            out.append(Exercise(i))
        elif SOLUTION in tags or SELF_CHECK in tags:
            if not out:
                raise ValueError(f"cell {i} is tagged {tags} but no exercise cell comes before it")
            (out[-1].solutions if SOLUTION in tags else out[-1].self_checks).append(i)
    return out


def validate_notebook(nb: Any, name: str = "notebook", minimum: int = MIN_EXERCISES) -> list[str]:
    """Problems with a notebook's exercises (empty when fine): too few, or one without solution / self-check."""
    problems = []
    found = exercises(nb)
    if len(found) < minimum:
        problems.append(f"{name}: {len(found)} exercises, needs at least {minimum}")
    for n, ex in enumerate(found, 1):
        if not ex.solutions:
            problems.append(f"{name}: exercise {n} (cell {ex.exercise}) has no solution cell")
        if not ex.self_checks:
            problems.append(f"{name}: exercise {n} (cell {ex.exercise}) has no self-check cell")
        for i in ex.solutions:
            missing = [t for t in SOLUTION_TAGS if t not in cell_tags(nb["cells"][i])]
            if missing:
                problems.append(f"{name}: solution cell {i} lacks the tags {missing}")
    return problems


def strip_solutions(nb: Any) -> Any:
    """A copy of the notebook without its ``solution`` cells (and without outputs)."""
    import copy

    out = copy.deepcopy(nb)
    out["cells"] = [c for c in out["cells"] if SOLUTION not in cell_tags(c)]
    for c in out["cells"]:
        if c.get("cell_type") == "code":
            c["outputs"] = []
            c["execution_count"] = None
    return out


def notebook_sources(root: Path | None = None) -> list[Path]:
    """The notebooks' jupytext sources, ``notebooks/NN_*.py``, in order."""
    from .config import repo_root

    root = Path(root) if root is not None else repo_root()
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.py"))


def write_student_edition(out: Path, root: Path | None = None) -> list[Path]:
    """Write every notebook without solutions to ``out``/NN_name.ipynb and .py; returns the paths written."""
    import jupytext

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in notebook_sources(root):
        nb = strip_solutions(jupytext.read(src))
        nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
        for suffix, fmt in ((".ipynb", "ipynb"), (".py", "py:percent")):
            path = out / (src.stem + suffix)
            jupytext.write(nb, path, fmt=fmt)
            written.append(path)
    (out / "README.md").write_text(
        "# Student edition\n\nThe notebooks of the companion without the solution cells, generated by "
        "`make student` (`python -m medlib.teaching student`). Run them from the repository root's `notebooks/` "
        "folder or with `PYTHONPATH` pointing at the repository. In each exercise: write your `prediction`, run "
        "the `exercise` cell, fill in `answer`, then run the `self-check` cell.\n")
    return written


def inventory(root: Path | None = None) -> pd.DataFrame:
    """One row per notebook: exercises, complete ones (with a solution and a self-check), problems."""
    import jupytext

    rows = []
    for src in notebook_sources(root):
        nb = jupytext.read(src)
        found = exercises(nb)
        rows.append({"notebook": src.stem, "exercises": len(found), "complete": sum(e.complete for e in found),
                     "problems": "; ".join(validate_notebook(nb, src.stem, minimum=0))})
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlib.teaching", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("student", help="write the solution-free student edition of every notebook")
    st.add_argument("--out", default="build/student", help="output folder (default build/student)")
    sub.add_parser("inventory", help="list the exercises of every notebook")
    args = parser.parse_args(argv)
    if args.command == "student":
        written = write_student_edition(Path(args.out))
        print(f"student edition: {len(written)} files in {args.out}")
        return 0
    table = inventory()
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The teaching layer: self-check helpers fail for wrong answers, exercise helpers compute what they say,
and the student edition has no solutions while every study notebook has its exercises."""

from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest

from medlib import teaching

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- self-checks


def test_check_prediction_refuses_an_empty_prediction():
    for empty in ("", "   ", None, ...):
        with pytest.raises(AssertionError, match="prediction"):
            teaching.check_prediction(empty)
    teaching.check_prediction("lower, because k = 1 gives binary scores")


def test_check_choice_fails_for_a_wrong_or_missing_answer():
    teaching.check_choice("lower", "lower", prediction="x")
    teaching.check_choice(" Lower ", "lower", prediction="x")  # case and spaces do not matter
    with pytest.raises(AssertionError, match="came out 'lower'"):
        teaching.check_choice("higher", "lower", prediction="x")
    with pytest.raises(AssertionError, match="Fill in `answer`"):
        teaching.check_choice(None, "lower", prediction="x")
    with pytest.raises(AssertionError, match="one of"):
        teaching.check_choice("down", "lower", prediction="x")
    with pytest.raises(AssertionError, match="prediction"):
        teaching.check_choice("lower", "lower", prediction="")
    with pytest.raises(ValueError):
        teaching.check_choice("a", "c", choices=("a", "b"), prediction="x")


def test_check_number_uses_its_tolerance():
    teaching.check_number(0.61, 0.6, tol=0.05, prediction="x")
    teaching.check_number("0.6", 0.6, tol=0, prediction="x")
    with pytest.raises(AssertionError, match="run gives 0.6"):
        teaching.check_number(0.7, 0.6, tol=0.05, prediction="x")
    with pytest.raises(AssertionError, match="must be a number"):
        teaching.check_number("about half", 0.6, tol=0.05, prediction="x")
    with pytest.raises(AssertionError, match="Fill in"):
        teaching.check_number(None, 0.6, tol=0.05, prediction="x")
    with pytest.raises(AssertionError, match="no finite value"):
        teaching.check_number(0.6, float("nan"), tol=0.05, prediction="x")


def test_check_in_range():
    teaching.check_in_range(0.5, 0, 1)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(AssertionError, match="plausible range"):
            teaching.check_in_range(bad, 0, 1)


def test_direction():
    assert teaching.direction(0.5, 0.6) == "higher"
    assert teaching.direction(0.5, 0.4) == "lower"
    assert teaching.direction(0.5, 0.5) == "same"
    assert teaching.direction(0.5, 0.52, tol=0.05) == "same"
    with pytest.raises(ValueError):
        teaching.direction(float("nan"), 0.5)


# ----------------------------------------------------------------- comparisons


def test_paired_change_and_majority():
    before = pd.DataFrame({"d": ["a", "b", "c"], "m": ["x"] * 3, "auc": [0.8, 0.7, 0.6]})
    after = pd.DataFrame({"d": ["c", "b", "a"], "m": ["x"] * 3, "auc": [0.65, 0.6, 0.7]})
    change = teaching.paired_change(before, after, ["d", "m"], "auc")
    assert change.set_index("d")["change"].round(3).to_dict() == {"a": -0.1, "b": -0.1, "c": 0.05}
    assert teaching.majority_direction(change) == "lower"
    assert teaching.majority_direction(change.iloc[1:]) == "same"  # one up, one down
    with pytest.raises(ValueError, match="lacks columns"):
        teaching.paired_change(before, after.drop(columns="auc"), ["d", "m"], "auc")


def test_interval_width_change():
    before = pd.DataFrame({"t": ["a", "b"], "ci_low": [0.5, 0.6], "ci_high": [0.7, 0.7]})
    after = pd.DataFrame({"t": ["a", "b"], "ci_low": [0.4, 0.62], "ci_high": [0.8, 0.68]})
    w = teaching.interval_width_change(before, after, ["t"]).set_index("t")
    assert w.loc["a", "ratio"] == pytest.approx(2.0)
    assert w.loc["b", "ratio"] == pytest.approx(0.6)
    assert list(w["direction"]) == ["higher", "lower"]


def test_shifted_changes_intensities_but_not_labels():
    from medlib.data.imageset import ImageSet

    rng = np.random.default_rng(0)
    ds = ImageSet(images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), labels=np.arange(6) % 2,
                  label_names=["a", "b"], task="multiclass", patient_ids=np.array([str(i) for i in range(6)]), name="toy")
    out = teaching.shifted(ds, seed=3)
    assert out.images.shape == ds.images.shape and out.images.dtype == np.uint8
    assert not np.array_equal(out.images, ds.images)
    np.testing.assert_array_equal(out.labels, ds.labels)
    np.testing.assert_array_equal(teaching.shifted(ds, seed=3).images, out.images)  # deterministic per seed


# ----------------------------------------------------------------- study 2 and 3 helpers


def _toy_scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, (n, 2))
    shared = rng.normal(size=(n, 2))  # noise both models share: hard images are hard for both
    a = y + shared + 0.3 * rng.normal(size=(n, 2))
    b = y + shared + 0.3 * rng.normal(size=(n, 2)) - 0.2 * y
    return y, a, b


def test_delta_interval_paired_is_narrower_than_unpaired():
    y, a, b = _toy_scores()
    paired = teaching.delta_interval(y, a, b, n_resamples=400, seed=1, paired=True)
    unpaired = teaching.delta_interval(y, a, b, n_resamples=400, seed=1, paired=False)
    assert paired["delta"] == pytest.approx(unpaired["delta"])  # the point estimate does not resample
    assert paired["delta"] > 0
    assert paired["ci_low"] <= paired["delta"] <= paired["ci_high"]
    assert unpaired["width"] > 1.5 * paired["width"]


def test_count_significant():
    tests = pd.DataFrame({"label": ["macro", "macro", "macro", "x"], "p": [0.01, 0.04, 0.2, 0.001],
                          "q": [0.03, 0.06, 0.2, 0.001]})
    assert teaching.count_significant(tests, "p") == 2
    assert teaching.count_significant(tests, "q") == 1
    with pytest.raises(ValueError, match="no column"):
        teaching.count_significant(tests, "fdr")


def test_probe_auroc_vs_size_separates_informative_from_noise_features():
    from medlib.eval.features import FeatureSet

    class Fixed:  # stands in for a backbone: extract_features is patched below
        def __init__(self, x):
            self.x = x

    rng = np.random.default_rng(0)
    n = 120
    y = (np.arange(n) % 2).astype(np.float32)[:, None]
    good = y + 0.3 * rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, 4))

    class Data:
        labels = y

        def label_matrix(self):
            return y

    import medlib.eval.features as features

    def fake_extract(bb, ds, **kw):
        x = bb.x.astype(np.float32)
        return FeatureSet(cls=x, pooled=x, layers=x[:, None], labels=y, label_names=["f"], task="binary",
                          backbone="b", dataset="d", fingerprint="0")

    original = features.extract_features
    features.extract_features = fake_extract
    try:
        table = teaching.probe_auroc_vs_size({"good": Fixed(good), "noise": Fixed(noise)}, Data(),
                                             np.arange(80, n), {0.25: np.arange(20), 1.0: np.arange(80)})
    finally:
        features.extract_features = original
    assert set(table["n_train"]) == {20, 80}
    wide = teaching.gap_by_size(table, "good", "noise")
    assert (wide["good"] > 0.9).all() and (wide["gap"] > 0.3).all()
    with pytest.raises(ValueError, match="not in the table"):
        teaching.gap_by_size(table, "good", "missing")


def test_selection_optimism_is_never_negative_and_zero_with_one_setting():
    rows = []
    for setting, (val, test) in {"lr1": (0.8, 0.6), "lr2": (0.7, 0.75)}.items():
        for fold in range(2):
            rows.append({"task": "t", "role": "r", "setting": setting, "fold": fold, "val_auroc": val,
                         "test_auroc": test})
    results = pd.DataFrame(rows)
    opt = teaching.selection_optimism(results).iloc[0]
    assert opt["chosen_on_val"] == "lr1" and opt["chosen_on_test"] == "lr2"
    assert opt["optimism"] == pytest.approx(0.15)
    one = teaching.selection_optimism(results[results["setting"] == "lr1"])
    assert one["optimism"].iloc[0] == 0


def test_arm_difference_uses_paired_replicates():
    from medlib.studies.radimagenet_ssl_continuation import FoldAUROC

    rng = np.random.default_rng(0)
    boot = rng.uniform(0.6, 0.8, (100, 1, 3))
    fb = FoldAUROC(task="t", arms=["a", "b"], point=np.array([[0.8, 0.8, 0.8], [0.7, 0.7, 0.7]]),
                   boot=np.concatenate([boot + 0.1, boot], axis=1))
    d = teaching.arm_difference({"t": fb}, "a", "b").iloc[0]
    assert d["delta"] == pytest.approx(0.1)
    assert d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)  # paired: the shared noise cancels
    with pytest.raises(ValueError, match="no task"):
        teaching.arm_difference({"t": fb}, "a", "c")


# ----------------------------------------------------------------- study 4 helpers


def test_midpoint_norm_ratio():
    a = np.array([[1.0, 0.0], [2.0, 0.0]])
    b = np.array([[0.0, 1.0], [0.0, 2.0]])
    assert teaching.midpoint_norm_ratio(a, b, "lerp") == pytest.approx(np.cos(np.pi / 4))
    assert teaching.midpoint_norm_ratio(a, b, "slerp") == pytest.approx(1.0, abs=1e-5)
    assert teaching.midpoint_norm_ratio(a, a, "lerp") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        teaching.midpoint_norm_ratio(a, b, "cubic")


def test_seed_diversity_and_mean_abs_difference():
    same = np.zeros((2, 3, 4, 4))
    assert teaching.seed_diversity(same) == 0
    varied = same.copy()
    varied[:, 1] = 10
    assert teaching.seed_diversity(varied) == pytest.approx(np.std([0, 10, 0]))
    with pytest.raises(ValueError):
        teaching.seed_diversity(np.zeros((2, 1, 4, 4)))
    assert teaching.mean_abs_difference(np.zeros((2, 2)), np.full((2, 2), 3)) == 3
    with pytest.raises(ValueError):
        teaching.mean_abs_difference(np.zeros(2), np.zeros(3))


# ----------------------------------------------------------------- notebooks and the student edition


def _nb(*cells):
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src, metadata={"tags": list(tags)})
                                           for src, tags in cells])


def test_exercises_group_cells_and_validation_finds_gaps():
    nb = _nb(("x = 1", ()), ("a", ("exercise",)), ("s", ("solution", "hide-cell")), ("c", ("self-check",)),
             ("b", ("exercise",)), ("c2", ("self-check",)))
    found = teaching.exercises(nb)
    assert [(e.exercise, e.solutions, e.self_checks) for e in found] == [(1, [2], [3]), (4, [], [5])]
    problems = teaching.validate_notebook(nb, "toy")
    assert any("at least 3" in p for p in problems)
    assert any("exercise 2" in p and "no solution" in p for p in problems)
    nb2 = _nb(("a", ("exercise",)), ("s", ("solution",)), ("c", ("self-check",)))
    assert any("lacks the tags ['hide-cell']" in p for p in teaching.validate_notebook(nb2, "toy", minimum=1))
    with pytest.raises(ValueError, match="no exercise cell"):
        teaching.exercises(_nb(("s", ("solution",)),))


def test_strip_solutions_removes_only_solution_cells():
    nb = _nb(("a", ("exercise",)), ("s", ("solution", "hide-cell")), ("c", ("self-check",)))
    out = teaching.strip_solutions(nb)
    assert [c.source for c in out.cells] == ["a", "c"]
    assert len(nb.cells) == 3  # the original is untouched


@pytest.mark.parametrize("number", teaching.STUDY_NOTEBOOKS)
def test_every_study_notebook_has_complete_exercises(number):
    (src,) = (ROOT / "notebooks").glob(f"{number}_*.py")
    nb = jupytext.read(src)
    assert teaching.validate_notebook(nb, src.stem) == []
    found = teaching.exercises(nb)
    assert len(found) >= teaching.MIN_EXERCISES
    for ex in found:
        source = nb.cells[ex.exercise].source
        assert "prediction" in source and "answer" in source, f"{src.stem} cell {ex.exercise}"
        for i in ex.self_checks:
            assert "teaching.check_" in nb.cells[i].source, f"{src.stem} self-check cell {i} uses no teaching check"
    # the exercises come after the findings: no exercise cell before the last cell tagged otherwise
    first = found[0].exercise
    assert all("Findings" not in c.source for c in nb.cells[first:] if c.cell_type == "markdown")


def test_every_notebook_has_learning_goals_after_its_title():
    for src in teaching.notebook_sources(ROOT):
        cells = jupytext.read(src).cells
        assert cells[0].source.startswith("# "), src.stem
        assert "**Learning goals.**" in cells[1].source and "**Time on a laptop**" in cells[1].source, src.stem


def test_student_edition_has_no_solutions(tmp_path):
    written = teaching.write_student_edition(tmp_path / "student", root=ROOT)
    sources = teaching.notebook_sources(ROOT)
    assert {p.name for p in written} == {s.stem + ext for s in sources for ext in (".ipynb", ".py")}
    for src in sources:
        full = jupytext.read(src)
        student = nbformat.read(tmp_path / "student" / (src.stem + ".ipynb"), as_version=4)
        tags = [teaching.cell_tags(c) for c in student.cells]
        assert not any(teaching.SOLUTION in t for t in tags), src.stem
        n_solution = sum(teaching.SOLUTION in teaching.cell_tags(c) for c in full.cells)
        assert len(student.cells) == len(full.cells) - n_solution
        for tag in (teaching.EXERCISE, teaching.SELF_CHECK, "parameters"):
            assert sum(tag in t for t in tags) == sum(tag in teaching.cell_tags(c) for c in full.cells), (src.stem, tag)
        py = jupytext.read(tmp_path / "student" / (src.stem + ".py"))
        assert [c.source for c in py.cells] == [c.source for c in student.cells]
        if src.stem[:2] in teaching.STUDY_NOTEBOOKS:
            assert len(teaching.exercises(student)) >= teaching.MIN_EXERCISES
            assert all(not e.solutions and e.self_checks for e in teaching.exercises(student))


def test_cli_writes_the_student_edition(tmp_path, capsys):
    assert teaching.main(["student", "--out", str(tmp_path / "s")]) == 0
    assert "student edition" in capsys.readouterr().out
    assert (tmp_path / "s" / "02_imagenet_vs_ssl_init.ipynb").exists()

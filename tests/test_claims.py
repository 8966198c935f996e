"""The one verdict rule, claims tables, generated findings, interval scans and sanity gates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medlib.eval import claims as C


@pytest.mark.parametrize("estimate, low, high, direction, effect, expected", [
    (0.05, 0.01, 0.09, 1, None, "reproduced"),          # same direction, interval excludes 0
    (0.05, -0.01, 0.09, 1, None, "inconclusive"),       # same direction, interval includes 0
    (-0.05, -0.09, -0.01, 1, None, "not reproduced"),   # opposite, interval excludes every positive effect
    (-0.01, -0.05, 0.03, 1, 0.05, "not reproduced"),    # opposite, interval excludes the published +0.05
    (-0.01, -0.05, 0.06, 1, 0.05, "inconclusive"),      # opposite, but the published effect is still inside
    (-0.05, -0.09, -0.01, -1, None, "reproduced"),      # a published decrease, found
    (0.05, 0.01, 0.09, -1, -0.02, "not reproduced"),    # a published decrease, opposite found
    (0.0, 0.0, 0.0, 1, None, "inconclusive"),           # exactly no effect: neither side is excluded
])
def test_directional_rule(estimate, low, high, direction, effect, expected):
    assert C.verdict(estimate, low, high, direction=direction, published_effect=effect) == expected


def test_equivalence_rule():
    assert C.verdict(0.01, -0.02, 0.03, kind="equivalence", margin=0.05) == "reproduced"
    assert C.verdict(0.10, 0.07, 0.13, kind="equivalence", margin=0.05) == "not reproduced"
    assert C.verdict(0.04, 0.01, 0.08, kind="equivalence", margin=0.05) == "inconclusive"
    with pytest.raises(ValueError, match="margin"):
        C.verdict(0.0, -0.1, 0.1, kind="equivalence")


def test_verdict_rejects_bad_input_and_marks_missing():
    with pytest.raises(ValueError, match="contain the estimate"):
        C.verdict(0.5, 0.0, 0.1)
    with pytest.raises(ValueError, match="kind"):
        C.verdict(0.5, 0.0, 1.0, kind="bigger")
    with pytest.raises(ValueError, match="direction"):
        C.verdict(0.5, 0.0, 1.0, direction=2)
    assert C.verdict(0.5, np.nan, np.nan) == "inconclusive"
    assert C.verdict(np.nan, np.nan, np.nan) == "not tested here"


def test_claims_table_and_findings_follow_the_numbers():
    rows = [C.claim("01", 1, "A beats B", "yes", "AUROC(A) - AUROC(B)", 0.04, (0.01, 0.07), interval="bootstrap"),
            C.claim("01", 2, "C is close to D", "gap < 1 %", "AUROC(C) - AUROC(D)", 0.2, (0.15, 0.25),
                    kind="equivalence", margin=0.02, interval="bootstrap"),
            C.claim("01", 3, "E beats F", "yes", "-", not_tested="no F arm here")]
    table = C.claims_frame(rows)
    assert list(table.columns) == C.CLAIM_COLUMNS
    assert list(table["verdict"]) == ["reproduced", "not reproduced", "not tested here"]
    assert "equivalence margin +-0.02" in table.loc[1, "interval"]
    text = C.findings_markdown(table, profile="tiny")
    assert text.startswith("Of 3 published claims tested on the `tiny` profile: 1 reproduced, 1 not reproduced, "
                           "1 not tested here.")
    assert "**reproduced**: ours AUROC(A) - AUROC(B) = +0.040 [+0.010, +0.070]" in text
    assert "no F arm here" in text
    with pytest.raises(ValueError, match="unknown verdict"):
        C.claims_frame([{**rows[0], "verdict": "sort of"}])


@pytest.mark.parametrize("name, expected", [
    ("auroc", (0.0, 1.0)), ("test_dice", (0.0, 1.0)), ("mean_dj", (0.0, 1.0)), ("AUROC delta", (-1.0, 1.0)),
    ("auroc_gain", (-1.0, 1.0)), ("fid", None), ("seconds", None)])
def test_metric_range(name, expected):
    assert C.metric_range(name) == expected


def test_interval_scan_finds_impossible_intervals():
    good = pd.DataFrame({"metric": ["mean_dj", "auroc"], "mean": [0.9, 0.6], "ci_low": [0.8, 0.5],
                         "ci_high": [1.0, 0.7]})
    assert C.interval_violations(good) == []
    bad = good.assign(ci_high=[1.36, 0.7])
    problems = C.interval_violations(bad)
    assert len(problems) == 1 and "1.36" in problems[0] and "mean_dj" in problems[0]
    named = pd.DataFrame({"auroc_ci_low": [-0.1], "auroc_ci_high": [0.4]})
    assert len(C.interval_violations(named)) == 1
    swapped = pd.DataFrame({"ci_low": [0.6], "ci_high": [0.4]})
    assert "ci_low" in C.interval_violations(swapped, metric="auroc")[0]


def test_sanity_flags_only_intervals_wholly_below_the_reference():
    results = pd.DataFrame({
        "model": ["a", "b", "c"], "task": ["t", "t", "u"], "metric": "auroc", "score": [0.40, 0.48, 0.30],
        "ci_low": [0.35, 0.40, 0.25], "ci_high": [0.45, 0.56, 0.35], "reference": "chance",
        "reference_value": 0.5})
    flags = C.sanity_flags(results, study="03", table="03_grid", explanations={("c", "u"): "labels are noise"})
    assert list(flags["model"]) == ["a", "c"]
    assert list(flags["explained"]) == [False, True]
    with pytest.raises(C.UnexplainedSanityFlag, match="a on t"):
        C.check_sanity(flags, "tiny")
    assert len(C.check_sanity(flags, "smoke")) == 2  # smoke sizes are too small to judge: reported, not fatal
    assert len(C.check_sanity(flags[flags["explained"]], "tiny")) == 1
    with pytest.raises(ValueError, match="lack"):
        C.sanity_flags(results.drop(columns="reference"), study="03", table="x")


def test_interval_scan_reads_the_table_metric_with_delta_columns():
    table = pd.DataFrame({"delta mean": [0.1], "delta ci_low": [-0.2], "delta ci_high": [2.5]})
    assert C.interval_violations(table) == []  # no metric known: only the order is checked
    problems = C.interval_violations(table, metric="auroc")
    assert len(problems) == 1 and "(-1.0, 1.0)" in problems[0]


def test_stand_in_names_are_flagged_outside_published_columns():
    table = pd.DataFrame({"role": ["DINOv2", "ssl-natural"], "model": ["ssl-natural-vit-tiny", "x"],
                          "description": ["ViT-Tiny trained with the DINOv2 recipe", "DINOv2-style SSL"],
                          "published_model": ["DINOv2 ViT-L/14", "-"], "DINOv2 (ours)": [0.7, 0.8],
                          "DINOv2 (published)": [0.9, 0.9], "claim": ["Frozen DINOv2 features ...", ""]})
    problems = C.stand_in_name_violations(table)
    assert problems == ["column header 'DINOv2 (ours)'", "row 0, column 'role': 'DINOv2'"]
    assert C.stand_in_name_violations(table, real_weights=True) == []
    assert C.figure_name_violations(["AUROC by arm", "DINOv2+SSL", "published DINOv2"]) == ["DINOv2+SSL"]


def test_save_figure_records_the_texts_a_reader_sees(tmp_path, monkeypatch):
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medlib.reporting import save_figure

    monkeypatch.setenv("MEDLIB_FIGURES", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="ssl-natural-vit-tiny")
    ax.set(title="AUROC vs n", xlabel="n", ylabel="AUROC")
    ax.set_xticks([0, 1], ["one", "two"])
    ax.legend()
    save_figure(fig, "09_demo", "smoke")
    texts = json.loads((tmp_path / "09_demo_smoke.json").read_text())["texts"]
    assert {"AUROC vs n", "n", "AUROC", "one", "two", "ssl-natural-vit-tiny"} <= set(texts)
    plt.close(fig)


def test_interval_scan_guesses_the_metric_from_the_table_and_claims_measures():
    metrics = pd.DataFrame({"dataset": ["a"], "auroc": [0.9], "ci_low": [0.8], "ci_high": [1.2]})
    assert len(C.interval_violations(metrics)) == 1
    tests = pd.DataFrame({"a_auroc": ["0.5 ± 0.1"], "delta mean": [0.1], "delta ci_low": [-1.5], "delta ci_high": [0.3]})
    assert len(C.interval_violations(tests)) == 1
    claims = pd.DataFrame({"measure": ["AUROC(a) - AUROC(b)", "Dice(a)", "AUROC gain (%)"], "ours": [-0.2, 0.5, 40.0],
                           "ci_low": [-0.5, 0.4, 10.0], "ci_high": [0.1, 1.1, 70.0]})
    problems = C.interval_violations(claims)
    assert len(problems) == 1 and "row 1" in problems[0]


def test_saying_what_a_stand_in_is_not_is_allowed():
    table = pd.DataFrame({"stands_in_for": ["SSL ViT (DINOv2 in the paper)"],
                          "value": ["ssl-natural-vit-tiny (a self-trained stand-in, not DINOv2)"],
                          "arm": ["DINOv2 (ours)"]})
    assert C.stand_in_name_violations(table) == ["row 0, column 'arm': 'DINOv2 (ours)'"]

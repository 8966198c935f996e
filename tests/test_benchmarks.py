"""The benchmarks run end to end at toy sizes and report consistent figures (no speed is asserted here).

Speed targets live in `make bench`; these tests only keep the benchmark code from rotting: every
benchmark runs on this machine, names its device, and its ratios are the ratios of its own numbers.
"""

import json
import math

import pytest

from benchmarks import bench_phantoms, bench_stats
from benchmarks import run as bench_run


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_stats_reports_a_speedup_of_its_own_timings():
    report = bench_stats.main(n=200, n_labels=2, n_resamples=20, sklearn_resamples=4)
    assert _positive(report["medlib_paired_bootstrap_s"]) or report["medlib_paired_bootstrap_s"] == 0
    assert _positive(report["sklearn_loop_auroc_only_s"])
    if report["medlib_paired_bootstrap_s"] > 0:
        expected = report["sklearn_loop_auroc_only_s"] / report["medlib_paired_bootstrap_s"]
        assert report["speedup"] == pytest.approx(expected, rel=0.1, abs=0.2)


def test_bench_phantoms_rates_every_family_and_restores_threads():
    import torch

    from medlib.data import phantoms

    threads = torch.get_num_threads()
    report = bench_phantoms.main(size=64, n=2, natural_n=1)
    assert set(phantoms.FAMILIES) <= set(report)
    for family, row in report.items():
        assert row and all(_positive(v) for v in row.values()), (family, row)
    assert torch.get_num_threads() == threads


@pytest.mark.slow
@pytest.mark.long
def test_bench_ssl_end_to_end_is_a_fraction_of_its_ceiling():
    from benchmarks import bench_ssl

    report = bench_ssl.main(steps=1)
    assert report["device"].startswith(("CPU", "NVIDIA")) and report["profile"] in ("tiny", "gpu")
    assert _positive(report["end_to_end_images_per_s"]) and _positive(report["model_ceiling_images_per_s"])
    assert report["fraction_of_ceiling"] == pytest.approx(
        report["end_to_end_images_per_s"] / report["model_ceiling_images_per_s"], abs=0.0006)  # the reported figures' ratio


@pytest.mark.slow
def test_bench_features_compares_end_to_end_ceiling_and_naive():
    from benchmarks import bench_features

    report = bench_features.main(n_images=16)
    assert report, "at least one model"
    for row in report.values():
        for key in ("end_to_end_images_per_s", "ceiling_images_per_s", "naive_images_per_s"):
            assert _positive(row[key]), (key, row)
        assert row["fraction_of_ceiling"] == pytest.approx(
            row["end_to_end_images_per_s"] / row["ceiling_images_per_s"], abs=0.0006)  # the reported figures' ratio
        assert row["speedup_over_naive"] == pytest.approx(
            row["end_to_end_images_per_s"] / row["naive_images_per_s"], abs=0.006)


@pytest.mark.slow
@pytest.mark.long
def test_bench_diffusion_reports_training_and_sampling_speedups():
    from benchmarks import bench_diffusion

    report = bench_diffusion.main(steps=1)
    for key in ("train_ours_images_per_s", "train_default_images_per_s", "sample_ours_images_per_s",
                "sample_default_images_per_s"):
        assert _positive(report[key]), (key, report)
    assert report["train_speedup"] == pytest.approx(
        report["train_ours_images_per_s"] / report["train_default_images_per_s"], abs=0.006)


def test_bench_runner_writes_json_and_markdown_naming_the_machine(tmp_path, monkeypatch):
    from functools import partial

    monkeypatch.setattr(bench_stats, "main", partial(bench_stats.main, n=100, n_labels=2, n_resamples=10,
                                                     sklearn_resamples=2))
    assert bench_run.main(["--out", str(tmp_path), "--only", "stats"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results) == {"provenance", "stats"} and results["provenance"]["machine"]
    text = (tmp_path / "bench.md").read_text()
    assert text.startswith("# Benchmarks on ") and "Paired bootstrap" in text


def test_bench_runner_rejects_unknown_benchmarks(tmp_path):
    with pytest.raises(SystemExit):
        bench_run.main(["--out", str(tmp_path), "--only", "nonsense"])


def test_bench_reproduce_sets_times_beside_budgets_and_computes_its_ratio(tmp_path, monkeypatch):
    from benchmarks import bench_reproduce

    runs = tmp_path / "tiny" / "runs.json"
    runs.parent.mkdir()
    runs.write_text(json.dumps({"00_a": {"wall_time_s": 30.04, "machine": "x86_64 2 cores"},
                                "01_b": {"wall_time_s": 1500.0, "machine": "x86_64 2 cores"}}))
    recorded = bench_reproduce.recorded_times("tiny", tmp_path)
    assert recorded == {"00_a": 30.0, "01_b": 1500.0, "sum_s": 1530.0, "machines": ["x86_64 2 cores"]}
    runs.write_text(json.dumps({  # two notebooks at once: the run's span, not the sum, is what a user waits
        "00_a": {"wall_time_s": 30.0, "created": "2026-01-01T10:00:30+0000", "machine": "m"},
        "01_b": {"wall_time_s": 1500.0, "created": "2026-01-01T10:25:10+0000", "machine": "m"}}))
    spanned = bench_reproduce.recorded_times("tiny", tmp_path)
    assert spanned["sum_s"] == 1530.0 and spanned["span_s"] == 1510.0, spanned
    runs.write_text(json.dumps({"00_a": {"wall_time_s": 30.04, "machine": "x86_64 2 cores"},
                                "01_b": {"wall_time_s": 1500.0, "machine": "x86_64 2 cores"}}))
    assert bench_reproduce.recorded_times("smoke", tmp_path) == {"missing": str(tmp_path / "smoke" / "runs.json")}
    walls = {1: 150.0, 2: 75.0}
    monkeypatch.setattr(bench_reproduce, "cold_reproduce_s", lambda profile, jobs: {"wall_s": walls[jobs]})
    monkeypatch.setattr(bench_reproduce, "recorded_times", lambda profile: recorded)
    report = bench_reproduce.main(jobs=(1, 2))
    assert report["smoke_speedup_vs_jobs1"] == {2: 2.0}
    assert report["smoke_cold_jobs1_within_budget"] is False and report["smoke_cold_jobs2_within_budget"] is True
    assert report["tiny_recorded_within_budget"] is False and report["budget_tiny_s"] == 1200.0

"""Figures and tables land where they should, with provenance, and refuse unlabelled output."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from medlib import reporting  # noqa: E402


@pytest.fixture()
def out_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLIB_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("MEDLIB_REPORTS", str(tmp_path / "reports"))
    return tmp_path


def test_save_figure_writes_png_svg_and_provenance(out_dirs):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("A line")
    paths = reporting.save_figure(fig, "00_line", "smoke")
    plt.close(fig)
    assert {p.suffix for p in paths} == {".png", ".svg"} and all(p.stat().st_size > 0 for p in paths)  # a plot: both
    record = json.loads((out_dirs / "figures" / "00_line_smoke.json").read_text())
    assert record["profile"] == "smoke" and record["figure"] == "00_line"


def test_save_figure_rejects_bad_names_and_unlabelled_figures(out_dirs):
    fig, ax = plt.subplots()
    ax.set_title("t")
    with pytest.raises(ValueError, match="notebook number"):
        reporting.save_figure(fig, "line", "smoke")
    fig2, _ = plt.subplots()
    with pytest.raises(ValueError, match="no title"):
        reporting.save_figure(fig2, "00_blank", "smoke")
    plt.close("all")


def test_save_table_and_markdown(out_dirs):
    df = pd.DataFrame({"model": ["a", "b|c"], "auroc": [0.81234, np.nan]})
    paths = reporting.save_table(df, "00_demo", "smoke")
    assert pd.read_csv(paths["csv"]).shape == (2, 2)
    md = paths["md"].read_text()
    assert "| a | 0.812 |" in md and "b\\|c" in md and "n/a" in md
    with pytest.raises(ValueError, match="empty"):
        reporting.save_table(df.iloc[:0], "00_empty", "smoke")
    empty = reporting.save_table(df.iloc[:0], "00_empty", "smoke", allow_empty=True)
    assert pd.read_csv(empty["csv"]).columns.tolist() == ["model", "auroc"]
    assert empty["md"].read_text().splitlines() == ["| model | auroc |", "|---|---|"]
    with pytest.raises(ValueError, match="empty"):
        reporting.save_table(pd.DataFrame(), "00_nothing", "smoke", allow_empty=True)


def test_paper_vs_ours_computes_delta_and_checks_columns():
    ours = pd.DataFrame({"model": ["x", "y"], "value": [0.9, 0.5]})
    pub = pd.DataFrame({"model": ["x"], "value": [0.8]})
    table = reporting.paper_vs_ours(ours, pub, on=["model"], profile="tiny")
    assert table.loc[0, "delta"] == pytest.approx(0.1) and np.isnan(table.loc[1, "published"])
    assert (table["profile"] == "tiny").all()
    with pytest.raises(KeyError, match="lack columns"):
        reporting.paper_vs_ours(ours.drop(columns="value"), pub, on=["model"])


def test_overlay_masks_colours_only_labelled_pixels():
    img = np.full((4, 4), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 1
    out = reporting.overlay_masks(img, mask, alpha=1.0)
    assert out.shape == (4, 4, 3)
    assert np.allclose(out[1, 1], 100 / 255) and not np.allclose(out[0, 0], 100 / 255)
    with pytest.raises(ValueError, match="differs"):
        reporting.overlay_masks(img, np.zeros((3, 3), np.uint8))


def test_image_grid_shapes():
    fig = reporting.image_grid(np.zeros((5, 8, 8), np.uint8), titles=list("abcde"), ncols=3, suptitle="grid")
    assert len(fig.axes) == 6
    plt.close(fig)


def test_image_figures_are_png_only_and_files_are_world_readable(out_dirs):
    import os
    import stat

    fig = reporting.image_grid(np.zeros((2, 8, 8), np.uint8), suptitle="images")
    paths = reporting.save_figure(fig, "00_images", "smoke")
    plt.close(fig)
    assert [p.suffix for p in paths] == [".png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o666 & ~umask


def test_save_table_moves_times_apart_so_results_are_byte_identical(out_dirs):
    first = pd.DataFrame({"model": ["a", "b"], "auroc": [0.8, 0.7], "seconds": [1.5, 2.0], "cached": [False, True]})
    second = first.assign(seconds=[9.1, 0.2], cached=[True, True])  # same results, another run's times
    paths = reporting.save_table(first, "00_runs", "smoke")
    text = paths["csv"].read_bytes()
    timing = pd.read_csv(paths["csv"].with_name("00_runs_timing.csv"))
    assert list(timing.columns) == ["model", "seconds", "cached"] and timing["seconds"].tolist() == [1.5, 2.0]
    reporting.save_table(second, "00_runs", "smoke")
    assert paths["csv"].read_bytes() == text
    assert "seconds" not in pd.read_csv(paths["csv"]).columns

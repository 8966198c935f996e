"""Figure lint: every committed figure has a title and labels; what save_figure measured (fonts, legends over data,
overlapping texts, model colours) is within bounds; the same model has the same colour in every figure.

The committed figures are linted from their provenance records (written by ``reporting.save_figure``); the
measurements exist for figures saved by the current code, so a fresh set is also drawn here from the study
plotting functions and linted in full.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from medlib import reporting  # noqa: E402
from medlib.config import repo_root  # noqa: E402

RECORDS = sorted((repo_root() / "figures").glob("[0-9][0-9]_*_tiny.json"))
DEVELOPMENT_WORDS = re.compile(r"\bseed 00\d\b|\bB[1-7]\b|\bsession\b|\bissues?\b", re.I)


def lint_problems(record: dict) -> list[str]:
    """What is wrong with one figure, read from its provenance record."""
    problems = []
    texts = record.get("texts") or []
    title = record.get("title") or (texts[0] if texts else "")
    if not title.strip():
        problems.append("no title")
    problems += [f"development words in {t!r}" for t in texts if DEVELOPMENT_WORDS.search(t)]
    lint = record.get("lint")
    if lint:
        if lint.get("min_font_pt") is not None and lint["min_font_pt"] < reporting.MIN_FONT_PT:
            problems.append(f"font of {lint['min_font_pt']} pt (< {reporting.MIN_FONT_PT})")
        if lint.get("unlabelled_axes"):
            problems.append(f"axes {lint['unlabelled_axes']} plot data without title or axis labels")
        if lint.get("legends_over_data"):
            problems.append(f"legend over the data in axes {lint['legends_over_data']}")
        if lint.get("overlapping_texts"):
            problems.append(f"overlapping texts: {lint['overlapping_texts'][:5]}")
        for model, colour in (lint.get("model_colours") or {}).items():
            if colour.lower() != reporting.model_colour(model).lower():
                problems.append(f"{model} drawn in {colour}, not its palette colour {reporting.model_colour(model)}")
    return problems


@pytest.mark.parametrize("record", RECORDS, ids=[r.stem for r in RECORDS])
def test_committed_figure(record: Path) -> None:
    data = json.loads(record.read_text())
    assert record.with_suffix(".png").is_file(), f"{record.name} has no png beside it"
    problems = lint_problems(data)
    assert not problems, f"{record.stem}: " + "; ".join(problems)


def test_committed_figures_share_one_palette() -> None:
    seen: dict[str, dict[str, str]] = {}
    for record in RECORDS:
        for model, colour in (json.loads(record.read_text()).get("lint") or {}).get("model_colours", {}).items():
            seen.setdefault(model, {})[record.stem] = colour.lower()
    mixed = {m: c for m, c in seen.items() if len(set(c.values())) > 1}
    assert not mixed, f"one model, several colours: {mixed}"


def test_model_colours_are_one_per_family() -> None:
    c = reporting.model_colour
    assert c("ssl-natural-vit-tiny") == c("SSL-natural") == c("ssl_natural") == c("ssl-natural-vit-small")
    assert c("random-vit-tiny") != c("ssl-natural-vit-tiny") != c("sup-natural-vit-tiny")
    assert c("SSL-natural + domain SSL") == c("ssl-knee-vit-tiny") != c("SSL-natural")
    assert c("DINOv2 ViT-L/14") != c("ssl-natural-vit-tiny")  # a published model is not our stand-in
    assert c("some new model") == c("some new model")
    families = [colour for _, _, colour in reporting.MODEL_FAMILIES]
    assert len(set(families)) == len(families)


@pytest.fixture()
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDLIB_FIGURES", str(tmp_path))
    reporting.set_style()
    return tmp_path


def _few_shot_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = []
    for backbone in ("ssl-natural-vit-tiny", "sup-natural-vit-tiny", "random-vit-tiny", "efficientnet-lite0.in1k"):
        for protocol in ("repeats", "paper"):
            for i, n in enumerate((1, 2, 4, 8, 16, "all")):
                m = 0.55 + 0.05 * i + 0.01 * len(backbone) % 3
                rows.append({"metric": "auroc", "backbone": backbone, "protocol": protocol, "n": n, "mean": m,
                             "ci_low": m - 0.03 if protocol == "repeats" else np.nan,
                             "ci_high": m + 0.03 if protocol == "repeats" else np.nan})
    published = pd.DataFrame([{"model": model, "n": n, "value": 0.5 + 0.04 * i}
                              for model in ("DINOv2 ViT-L/14", "ViT-L/16 IN-21k", "DenseNet-201 IN-1k")
                              for i, n in enumerate((1, 2, 4, 8, 16, "all"))])
    return pd.DataFrame(rows), published


def test_fresh_study_figures_pass_the_lint(fresh: Path) -> None:
    import matplotlib.pyplot as plt

    from medlib.studies import imagenet_vs_ssl_init as s2
    from medlib.studies import radiology_benchmark as s1

    summary, published = _few_shot_frames()
    figures = {"01_fewshot_auroc": s1.plot_few_shot(summary, "Few-shot linear probe", published=published)}
    peft = pd.DataFrame([{"mode": m, "backbone": b, "test_auroc": 0.7 + 0.02 * i, "trainable_pct": p}
                         for i, (m, p) in enumerate((("full", 100.0), ("lora", 0.9), ("bitfit", 0.1)))
                         for b in ("ssl-natural-vit-tiny", "random-vit-tiny")])
    figures["01_peft"] = s1.plot_peft(peft, "Fine-tuning modes")
    seg = pd.DataFrame([{"metric": "mean_dj", "dataset": d, "model": f"{b} + {h}", "n": n, "mean": 0.4 + 0.05 * i,
                         "ci_low": 0.35 + 0.05 * i, "ci_high": 0.45 + 0.05 * i}
                        for d in ("cxr", "ct") for b in ("ssl-natural-vit-tiny", "random-vit-tiny")
                        for h in ("linear", "U-Net") for i, n in enumerate((1, 4, "all"))])
    figures["01_segmentation_fewshot"] = s1.plot_seg_few_shot(seg, "Few-shot segmentation")
    labels = pd.DataFrame([{"dataset": d, "role": r, "label": f"finding {k}", "auroc": 0.5 + 0.03 * k}
                           for d in ("site A", "site B") for r in s2.ROLES for k in range(8)])
    figures["02_label_auroc"] = s2.plot_label_heatmap(labels, "Per-label test AUROC")
    problems = {}
    for name, fig in figures.items():
        reporting.save_figure(fig, name, "smoke")
        plt.close(fig)
        record = json.loads((fresh / f"{name}_smoke.json").read_text())
        assert record["lint"]["min_font_pt"] is not None
        found = lint_problems(record)
        if found:
            problems[name] = found
    assert not problems, problems
    colours = json.loads((fresh / "01_fewshot_auroc_smoke.json").read_text())["lint"]["model_colours"]
    assert colours["ssl-natural-vit-tiny"] == reporting.model_colour("ssl-natural-vit-tiny").lower()
    assert len(set(colours.values())) == len(colours), f"two models share a colour: {colours}"


def test_lint_sees_a_legend_over_data_and_small_fonts(fresh: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    x = np.linspace(0, 1, 200)
    for k in range(4):
        ax.plot(x, np.full_like(x, 0.9 - 0.05 * k), label=f"random-vit-tiny {k}")
    ax.legend(loc="upper right", fontsize=6)
    ax.set(title="bad figure", xlabel="x", ylabel="y")
    lint = reporting.figure_lint(fig)
    plt.close(fig)
    assert lint["legends_over_data"] == [0]
    assert lint["min_font_pt"] == 6

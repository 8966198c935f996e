"""Figure style, saving figures with provenance, tables (csv + md) and paper-vs-ours tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .cache import atomic_path, provenance, save_json
from .config import Profile, figures_dir, get_profile, reports_dir

MASK_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#fabed4", "#469990", "#dcbeff")


def set_style() -> None:
    """The companion's figure style: seaborn whitegrid, readable fonts, tight layout."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "figure.constrained_layout.use": True,
                         "axes.titleweight": "bold", "image.cmap": "gray"})


def save_figure(fig: Any, name: str, profile: str | Profile, formats: tuple[str, ...] | None = None,
                **provenance_extra: Any) -> list[Path]:
    """Save ``figures/<name>_<profile>.png`` (+ ``.svg`` for plots without images) and a ``.json`` provenance record."""
    profile_name = get_profile(profile).name
    if len(name) < 3 or not name[:2].isdigit() or name[2] != "_":
        raise ValueError(f"Figure name {name!r} must start with its notebook number, e.g. '01_fewshot_auroc'")
    if not fig.axes or not any(ax.get_title() or ax.get_xlabel() for ax in fig.axes) and not fig.get_suptitle():
        raise ValueError(f"Figure {name!r} has no title or axis labels; give it a caption-worthy title")
    if formats is None:  # vector output only where it helps: an SVG of embedded raster images is just bigger
        has_images = any(ax.get_images() for ax in fig.axes)
        formats = ("png",) if has_images else ("png", "svg")
    stem = figures_dir() / f"{name}_{profile_name}"
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight")
        paths.append(path)
    save_json(stem.with_suffix(".json"), provenance(profile=profile_name, figure=name, texts=figure_texts(fig),
                                                    **provenance_extra))
    return paths


def figure_texts(fig: Any) -> list[str]:
    """Every visible text of a figure: suptitle, axes titles, axis and tick labels, legends, annotations."""
    texts = [fig.get_suptitle()] if fig.get_suptitle() else []
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in (*ax.get_xticklabels(), *ax.get_yticklabels(), *ax.texts)]
        legend = ax.get_legend()
        if legend is not None:
            texts += [t.get_text() for t in legend.get_texts()] + [legend.get_title().get_text()]
    texts += [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


#: columns that depend on the machine, its load or the cache's state, not on the computation: ``save_table``
#: writes them to ``<name>_timing`` so that the result tables of two runs are byte-identical
TIMING_COLUMNS = ("seconds", "train_s", "seconds_per_image", "wall_time_s", "time_s", "cached", "cache_hit")


def save_table(df: pd.DataFrame, name: str, profile: str | Profile, float_format: str = "{:.3f}",
               allow_empty: bool = False, **provenance_extra: Any) -> dict[str, Path]:
    """Write ``reports/<profile>/tables/<name>.csv`` and ``.md`` (+ provenance json); return the paths.

    An empty table is an error unless ``allow_empty`` (e.g. "no sanity flag"), and then it needs its columns.
    Wall-time and cache-state columns (:data:`TIMING_COLUMNS`) go to ``<name>_timing`` with the row keys.
    """
    if df.empty and not (allow_empty and len(df.columns)):
        raise ValueError(f"Table {name!r} is empty; nothing to save (allow_empty=True keeps a header-only table)")
    folder = reports_dir(profile) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    timing = [c for c in df.columns if str(c) in TIMING_COLUMNS]
    if timing and not name.endswith("_timing"):  # results stay byte-identical between runs; times go apart
        keys = [c for c in df.columns if c not in timing and not pd.api.types.is_float_dtype(df[c])]
        save_table(df[keys + timing], f"{name}_timing", profile, float_format, allow_empty, **provenance_extra)
        df = df.drop(columns=timing)
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    with atomic_path(csv_path) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(to_markdown(df, float_format) + "\n")
    save_json(folder / f"{name}.json", provenance(profile=get_profile(profile).name, table=name, **provenance_extra))
    return {"csv": csv_path, "md": md_path}


def to_markdown(df: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency), floats formatted, NaN as 'n/a'."""
    def fmt(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return "n/a" if np.isnan(value) else float_format.format(value)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def paper_vs_ours(ours: pd.DataFrame, published: pd.DataFrame, on: list[str], value: str = "value",
                  profile: str | Profile | None = None) -> pd.DataFrame:
    """Join our results with published figures on ``on``; adds 'published', 'ours', 'delta' and 'profile' columns."""
    missing = [c for c in on + [value] if c not in ours.columns]
    if missing:
        raise KeyError(f"Our results lack columns {missing}; have {list(ours.columns)}")
    pub_missing = [c for c in on + [value] if c not in published.columns]
    if pub_missing:
        raise KeyError(f"Published table lacks columns {pub_missing}; have {list(published.columns)}")
    merged = ours[on + [value]].rename(columns={value: "ours"}).merge(
        published[on + [value]].rename(columns={value: "published"}), on=on, how="left")
    merged["delta"] = merged["ours"] - merged["published"]
    if profile is not None:
        merged["profile"] = get_profile(profile).name
    return merged


def overlay_masks(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4,
                  colours: Iterable[str] = MASK_COLOURS) -> np.ndarray:
    """RGB float image in [0, 1] with label-map ``mask`` (0 = background) blended on top of ``image``."""
    from matplotlib.colors import to_rgb

    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    rgb = image.astype(np.float32) / 255.0
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    palette = [to_rgb(c) for c in colours]
    out = rgb.copy()
    for label in np.unique(mask):
        if label == 0:
            continue
        colour = np.asarray(palette[(int(label) - 1) % len(palette)], dtype=np.float32)
        sel = mask == label
        out[sel] = (1 - alpha) * rgb[sel] + alpha * colour
    return out


def image_grid(images: np.ndarray, titles: list[str] | None = None, masks: np.ndarray | None = None,
               ncols: int = 8, size: float = 1.6, suptitle: str | None = None) -> Any:
    """A matplotlib figure showing uint8 images (optionally with mask overlays) in a grid."""
    import matplotlib.pyplot as plt

    n = len(images)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = images[i]
        if masks is not None:
            ax.imshow(overlay_masks(img, masks[i]))
        else:
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def write_run_record(profile: str | Profile, notebook: str, wall_time_s: float, status: str,
                     error: str | None = None, **extra: Any) -> Path:
    """Record one notebook's run in ``reports/<profile>/runs.json`` (status, wall time, provenance)."""
    from .cache import entry_lock

    path = reports_dir(profile) / "runs.json"
    record = provenance(profile=get_profile(profile).name, wall_time_s=wall_time_s, status=status, error=error,
                        **extra)
    with entry_lock(path):  # two runs at once must not drop each other's records
        try:
            records = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError:
            records = {}  # a damaged record file is rewritten from this run on
        records[notebook] = record
        save_json(path, records)
    return path

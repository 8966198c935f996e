"""Figure style, saving figures with provenance, tables (csv + md) and paper-vs-ours tables."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .cache import atomic_path, provenance as _base_provenance, save_json
from .config import Profile, figures_dir, get_profile, reports_dir
from .datafile import provenance_fields


def provenance(profile: str | None = None, **fields: Any) -> dict[str, Any]:
    """A provenance record (:func:`medlib.cache.provenance`) with the data file, overrides and data sources in force."""
    return {**_base_provenance(profile=profile, **fields), **provenance_fields(profile)}

MASK_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#fabed4", "#469990", "#dcbeff")


#: the smallest font a figure may use (points); :func:`figure_lint` measures it
MIN_FONT_PT = 8.0

#: One colour per model family, the same in every figure (Okabe-Ito colour-blind-safe hues). A name is matched
#: against the patterns in order; the first match gives its colour. Our stand-ins and the roles they play share
#: a family: ``ssl-natural-vit-tiny`` and the study-3 arm "SSL-natural" are one model.
MODEL_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (r"domain ssl|ssl-(us|knee|cxr|ct|mri|med\w*)-vit|continued", "SSL continued on domain images", "#D55E00"),
    (r"ssl[-_ ]?nat", "SSL on natural images", "#0072B2"),
    (r"random", "random initialisation", "#7F7F7F"),
    (r"sup[-_ ]?nat", "supervised on natural images", "#E69F00"),
    (r"sup[-_ ]?med|sup-cxr|medical|radimagenet", "supervised on medical images", "#CC79A7"),
    (r"efficientnet|^in$|cnn[-_ ]reference|imagenet cnn", "ImageNet CNN", "#009E73"),
    (r"u-?net from scratch|scratch", "trained from scratch", "#56B4E9"),
)
#: published models (the papers' own), each its own colour, kept apart from the stand-ins' hues
PUBLISHED_COLOURS: dict[str, str] = {
    "dinov2": "#332288", "vit-l/16 in-21k": "#882255", "densenet-201": "#117733", "resnet-152": "#44AA99",
    "vgg-19": "#999933", "radimagenet": "#AA4499",
}
_FALLBACK_COLOURS = ("#661100", "#6699CC", "#888888", "#DDCC77", "#AA4466", "#4477AA")


def model_key(label: str) -> str:
    """The model a legend label names: the text before a parenthesis or " + " (``"x (mean, 95% CI)"`` -> ``x``)."""
    return re.split(r"\s+\(|\s+\+\s+(?!domain)", str(label).strip(), maxsplit=1)[0].strip()


def model_family(name: str) -> str | None:
    """The family of a model name (see :data:`MODEL_FAMILIES`), ``"published"`` for a paper's model, or None."""
    low = str(name).strip().lower()
    if "published" in low or any(low.startswith(k) for k in PUBLISHED_COLOURS):
        return "published"
    for pattern, family, _ in MODEL_FAMILIES:
        if re.search(pattern, low):
            return family
    return None


def model_colour(name: str) -> str:
    """The colour of a model in every figure: its family's (:data:`MODEL_FAMILIES`), a published model's own
    (:data:`PUBLISHED_COLOURS`), else a colour fixed by the name's hash."""
    low = str(name).strip().lower()
    for prefix, colour in PUBLISHED_COLOURS.items():
        if low.startswith(prefix):
            return colour
    for pattern, _, colour in MODEL_FAMILIES:
        if re.search(pattern, low):
            return colour
    digest = int(hashlib.sha256(low.encode()).hexdigest(), 16)
    return _FALLBACK_COLOURS[digest % len(_FALLBACK_COLOURS)]


def legend_outside(ax: Any, where: str = "right", **kwargs: Any) -> Any:
    """A legend beside (``"right"``) or under (``"below"``) the axes, never over the data."""
    style = {"fontsize": 9, "frameon": False, "borderaxespad": 0.0}
    if where == "below":
        style.update(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=kwargs.pop("ncol", 2))
    else:
        style.update(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    style.update(kwargs)
    return ax.legend(**style)


def set_style() -> None:
    """The companion's figure style (seaborn whitegrid, fonts of at least 8 pt, constrained layout) and table
    display (three decimals, long cells shown whole; the csv files keep full precision)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    mpl.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "figure.constrained_layout.use": True,
                         "axes.titleweight": "bold", "image.cmap": "gray", "legend.fontsize": 9,
                         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.labelsize": 10})
    pd.set_option("display.precision", 3)
    pd.set_option("display.max_colwidth", None)
    pd.set_option("display.width", 200)


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
    save_json(stem.with_suffix(".json"), provenance(profile=profile_name, figure=name, title=figure_title(fig),
                                                    texts=figure_texts(fig), lint=figure_lint(fig),
                                                    **provenance_extra))
    return paths


def figure_title(fig: Any) -> str:
    """The figure's caption-worthy title: its suptitle, else the first axes title."""
    if fig.get_suptitle():
        return fig.get_suptitle().strip()
    return next((ax.get_title().strip() for ax in fig.axes if ax.get_title().strip()), "")


def _boxes_overlap(a: Any, b: Any, pad: float = 0.5) -> bool:
    return a.x0 + pad < b.x1 and b.x0 + pad < a.x1 and a.y0 + pad < b.y1 and b.y0 + pad < a.y1


def figure_lint(fig: Any) -> dict[str, Any]:
    """What a reader's eye checks, measured on the drawn figure (save_figure stores it in the provenance record):
    the smallest font, axes that plot data without axis labels, legends drawn over data points, overlapping
    tick labels and texts, and the colour of each model named in a legend (see :func:`model_colour`)."""
    import matplotlib.colors as mcolors

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    sizes, unlabelled, legends_over_data, overlaps, colours = [], [], [], [], {}
    texts = list(fig.texts) + ([fig._suptitle] if getattr(fig, "_suptitle", None) else [])
    for legend in fig.legends:
        texts += list(legend.get_texts())
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        is_colorbar = hasattr(ax, "_colorbar") or ax.get_label() == "<colorbar>"
        ticks = [t for t in (*ax.get_xticklabels(), *ax.get_yticklabels()) if ax.axison and t.get_visible() and t.get_text()]
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *ticks]
        legend = ax.get_legend()
        if legend is not None:
            texts += list(legend.get_texts())
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                colour = None
                for getter in ("get_color", "get_facecolor", "get_edgecolor"):
                    if hasattr(handle, getter):
                        value = getattr(handle, getter)()
                        value = value[0] if hasattr(value, "__len__") and len(value) and not isinstance(value, str) \
                            and hasattr(value[0], "__len__") else value
                        try:
                            colour = mcolors.to_hex(value)
                            break
                        except (ValueError, TypeError):
                            continue
                if colour and model_family(model_key(text.get_text())) is not None:
                    colours[model_key(text.get_text())] = colour
            box = legend.get_window_extent(renderer)
            points = []
            for line in ax.get_lines():
                xy = line.get_xydata()
                if len(xy):
                    points.append(ax.transData.transform(xy))
            for coll in ax.collections:
                offsets = coll.get_offsets()
                if len(offsets) and coll.get_offset_transform() is ax.transData:
                    points.append(ax.transData.transform(offsets))
            inside = ax.bbox
            if points and box.overlaps(inside):
                pts = np.concatenate(points)
                pts = pts[np.isfinite(pts).all(axis=1)]
                if len(pts) and ((pts[:, 0] >= box.x0) & (pts[:, 0] <= box.x1) & (pts[:, 1] >= box.y0)
                                 & (pts[:, 1] <= box.y1)).any():
                    legends_over_data.append(i)
        has_data = bool(ax.get_lines() or ax.collections or ax.patches) and not ax.get_images()
        if has_data and not is_colorbar and not (ax.get_xlabel() or ax.get_ylabel() or ax.get_title()):
            unlabelled.append(i)
        labels = [t for t in (*ticks, *ax.texts) if t.get_visible() and t.get_text().strip()]
        boxes = [t.get_window_extent(renderer) for t in labels]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                if _boxes_overlap(boxes[a], boxes[b]):
                    overlaps.append(f"{labels[a].get_text()!r} / {labels[b].get_text()!r}")
    for table in [c for ax in fig.axes for c in ax.get_children() if type(c).__name__ == "Table"]:
        sizes += [cell.get_text().get_fontsize() for cell in table.get_celld().values()]
    sizes += [t.get_fontsize() for t in texts if t is not None and t.get_visible() and t.get_text().strip()]
    return {"min_font_pt": float(min(sizes)) if sizes else None, "unlabelled_axes": unlabelled,
            "legends_over_data": legends_over_data, "overlapping_texts": overlaps[:20], "model_colours": colours}


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
TIMING_COLUMNS = ("seconds", "seconds_per_epoch", "train_s", "seconds_per_image", "wall_time_s", "time_s", "cached", "cache_hit")


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

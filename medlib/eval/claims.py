"""Published claims against our numbers: one verdict rule, valid intervals, sanity gates, generated findings.

Every study notebook ends with a claims table made here, so the four notebooks judge their papers
by the same rule and their "Findings" prose is generated from the table, never written by hand.

- :func:`verdict` - the rule. A claim is an effect (ours minus the reference, in the metric's units)
  with a published direction. *Directional* claims: **reproduced** when our interval lies wholly on
  the published side of no-effect; **not reproduced** when our estimate lies on the other side (or
  at no-effect) and the interval excludes the published effect (any effect of the published sign
  when the paper gives no number); otherwise **inconclusive**. *Equivalence* claims ("similar",
  "close to", "the gap closes"): reproduced when the interval lies inside ``[-margin, margin]``, not
  reproduced when it lies wholly outside, otherwise inconclusive. A claim we cannot measure (an arm
  or a data set we do not have) is **not tested here**, with the reason.
- :func:`claim` builds one row, :func:`claims_frame` the table, :func:`findings_markdown` the words.
- :func:`interval_violations` scans a table for intervals outside their metric's range.
- :func:`sanity_flags` flags a trained model whose interval lies wholly below its trivial reference
  (chance, the image-blind prior, random initialisation); :func:`check_sanity` fails a ``tiny`` run
  on a flag that carries no explanation.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not tested here")
KINDS = ("directional", "equivalence")
CLAIM_COLUMNS = ["study", "id", "claim", "published", "measure", "ours", "ci_low", "ci_high", "interval",
                 "verdict", "note"]
SANITY_COLUMNS = ["study", "table", "model", "task", "metric", "score", "ci_low", "ci_high", "reference",
                  "reference_value", "explained", "explanation"]

#: Ranges of the bounded metrics this companion reports (a column's name is matched case-insensitively).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "auroc": (0.0, 1.0), "auc": (0.0, 1.0), "dice": (0.0, 1.0), "jaccard": (0.0, 1.0), "mean_dj": (0.0, 1.0),
    "accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "precision": (0.0, 1.0),
    "recall": (0.0, 1.0), "density": (0.0, math.inf), "coverage": (0.0, 1.0), "ssim": (-1.0, 1.0),
}


def verdict(estimate: float, ci_low: float, ci_high: float, *, direction: int = 1, kind: str = "directional",
            published_effect: float | None = None, margin: float | None = None) -> str:
    """The verdict of one claim from our effect and its interval (see the module's docstring for the rule)."""
    if kind not in KINDS:
        raise ValueError(f"verdict: kind must be one of {KINDS}, got {kind!r}")
    values = (estimate, ci_low, ci_high)
    if any(v is None or not np.isfinite(v) for v in values):
        return "inconclusive" if estimate is not None and np.isfinite(estimate) else "not tested here"
    if ci_low > ci_high or not ci_low <= estimate <= ci_high:
        raise ValueError(f"verdict: the interval [{ci_low}, {ci_high}] must contain the estimate {estimate}")
    if kind == "equivalence":
        if margin is None or margin <= 0:
            raise ValueError("verdict: an equivalence claim needs a positive margin")
        if -margin <= ci_low and ci_high <= margin:
            return "reproduced"
        if ci_low > margin or ci_high < -margin:
            return "not reproduced"
        return "inconclusive"
    if direction not in (1, -1):
        raise ValueError(f"verdict: direction must be +1 or -1, got {direction!r}")
    est = direction * estimate
    low, high = sorted((direction * ci_low, direction * ci_high))
    if low > 0:
        return "reproduced"
    bound = 0.0 if published_effect is None else direction * published_effect
    if est <= 0 and high < bound:
        return "not reproduced"
    return "inconclusive"


def claim(study: str, id: int | str, text: str, published: str, measure: str, estimate: float | None = None,
          ci: tuple[float, float] | None = None, *, interval: str = "", direction: int = 1,
          kind: str = "directional", published_effect: float | None = None, margin: float | None = None,
          note: str = "", not_tested: str | None = None) -> dict[str, Any]:
    """One row of a claims table: the claim, our effect with its interval, and its verdict by :func:`verdict`.

    ``measure`` says what ``estimate`` is (e.g. "AUROC(ssl-natural) - AUROC(best supervised-natural)");
    ``interval`` says how the interval was made. ``not_tested`` (a reason) marks a claim we cannot measure.
    """
    low, high = (np.nan, np.nan) if ci is None else (float(ci[0]), float(ci[1]))
    if not_tested is not None or estimate is None:
        return {"study": study, "id": id, "claim": text, "published": published, "measure": measure,
                "ours": np.nan, "ci_low": np.nan, "ci_high": np.nan, "interval": interval,
                "verdict": "not tested here", "note": not_tested or note or "not measured"}
    v = verdict(float(estimate), low, high, direction=direction, kind=kind, published_effect=published_effect,
                margin=margin)
    if kind == "equivalence":
        interval = f"{interval}; equivalence margin +-{margin:g}" if interval else f"equivalence margin +-{margin:g}"
    return {"study": study, "id": id, "claim": text, "published": published, "measure": measure,
            "ours": float(estimate), "ci_low": low, "ci_high": high, "interval": interval, "verdict": v, "note": note}


def claims_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The claims table (columns :data:`CLAIM_COLUMNS`); raises on an unknown verdict or a missing column."""
    frame = pd.DataFrame(list(rows))
    missing = [c for c in CLAIM_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"claims_frame: rows lack {missing}; build them with medlib.eval.claims.claim")
    bad = set(frame["verdict"]) - set(VERDICTS)
    if bad:
        raise ValueError(f"claims_frame: unknown verdict(s) {sorted(bad)}; one of {VERDICTS}")
    return frame[CLAIM_COLUMNS].reset_index(drop=True)


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:+.3f}"


def findings_markdown(claims: pd.DataFrame, flags: pd.DataFrame | None = None, profile: str = "") -> str:
    """The notebook's "Findings" in words, generated from its claims table (and its sanity flags)."""
    claims = claims_frame(claims.to_dict("records"))
    counts = claims["verdict"].value_counts()
    head = ", ".join(f"{int(counts.get(v, 0))} {v}" for v in VERDICTS if counts.get(v, 0))
    where = f" on the `{profile}` profile" if profile else ""
    lines = [f"Of {len(claims)} published claims tested{where}: {head}.", ""]
    for row in claims.itertuples(index=False):
        if row.verdict == "not tested here":
            lines.append(f"- **{row.id}. {row.claim}** - not tested here: {row.note}.")
            continue
        ours = f"{row.measure} = {_fmt(row.ours)} [{_fmt(row.ci_low)}, {_fmt(row.ci_high)}]"
        note = f" {row.note}." if row.note else ""
        lines.append(f"- **{row.id}. {row.claim}** (published: {row.published}) - **{row.verdict}**: ours {ours}"
                     f" ({row.interval}).{note}")
    if flags is not None and len(flags):
        lines += ["", "Results below their trivial reference (sanity flags):", ""]
        for f in flags.itertuples(index=False):
            why = f.explanation if f.explained else "**unexplained**"
            lines.append(f"- **{f.model} on {f.task}: {f.metric} {f.score:.3f} [{f.ci_low:.3f}, {f.ci_high:.3f}] "
                         f"below {f.reference} ({f.reference_value:.3f})** - {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- intervals


def metric_range(name: str) -> tuple[float, float] | None:
    """The range of a bounded metric named ``name`` (``auroc``, ``test_dice``, ``AUROC delta`` ...), else None.

    A difference of two bounded metrics (a name with ``delta``, ``gain``, ``diff`` or `` - ``) has range
    ``[lo - hi, hi - lo]``; a percentage (``%``) is not checked.
    """
    key = str(name).lower()
    if "%" in key or "percent" in key:
        return None
    for metric, (lo, hi) in sorted(METRIC_RANGES.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"(^|[^a-z]){re.escape(metric)}($|[^a-z])", key):
            if re.search(r"delta|gain|diff| - ", key):
                return (lo - hi, hi - lo)
            return (lo, hi)
    return None


_PAIRS = (("ci_low", "ci_high"), ("low", "high"), ("lo", "hi"), ("ci_lo", "ci_hi"))


def interval_violations(table: pd.DataFrame, metric: str | None = None) -> list[str]:
    """Intervals of ``table`` outside their metric's range, or not containing their estimate, as messages.

    The metric of a row comes from a ``metric`` (or claims' ``measure``) column, else from ``metric``, else
    from the interval's own name (``auroc_ci_low``), else from the table's first metric-named column
    (``auroc``, ``test_dice`` ...). Rows whose metric has no known range are only checked for order.
    """
    problems: list[str] = []
    columns = list(table.columns)
    pairs = [(lo, hi, None) for lo, hi in _PAIRS if lo in columns and hi in columns]
    pairs += [(c, c[:-len("_ci_low")] + "_ci_high", c[:-len("_ci_low")]) for c in columns
              if c.endswith("_ci_low") and c[:-len("_ci_low")] + "_ci_high" in columns]
    pairs += [(c, c.replace("low", "high"), c.replace(" low", "").replace("_low", ""))
              for c in columns if re.search(r"ci[ _]low$", c) and c.replace("low", "high") in columns
              and (c, c.replace("low", "high"), None) not in pairs and not c.endswith("_ci_low")]
    guessed = next((c for c in columns if metric_range(c) is not None and "ci" not in str(c).lower()
                    and pd.api.types.is_numeric_dtype(table[c]) is not None), None)
    row_column = "metric" if "metric" in columns else "measure" if "measure" in columns else None
    for lo_col, hi_col, prefix in pairs:
        for i, row in table.iterrows():
            row_metric = row.get(row_column) if row_column else None
            row_metric = row_metric if isinstance(row_metric, str) and row_metric else None
            if row_metric is None and metric is None and guessed is not None and (prefix is None or
                                                                                 metric_range(prefix) is None):
                row_metric = guessed
            name = " ".join(str(x) for x in (row_metric or metric, prefix) if x)
            rng = metric_range(name) if name else None
            lo, hi = pd.to_numeric(row[lo_col], errors="coerce"), pd.to_numeric(row[hi_col], errors="coerce")
            if not (np.isfinite(lo) and np.isfinite(hi)):
                continue
            if lo > hi + 1e-12:
                problems.append(f"row {i}: {lo_col}={lo:.4g} > {hi_col}={hi:.4g}")
            if rng is not None and (lo < rng[0] - 1e-9 or hi > rng[1] + 1e-9):
                problems.append(f"row {i}: [{lo:.4g}, {hi:.4g}] ({lo_col}/{hi_col}) leaves {name}'s range {rng}")
    return problems


# --------------------------------------------------------------------------- names

#: a real model's name; "DINOv2 recipe" / "DINOv2-style" / "DINOv2 architecture" describe how a stand-in was
#: made or shaped, not what its weights are, and "not DINOv2" / "DINOv2 in the paper" say what it is not: allowed
REAL_MODEL_NAME = re.compile(r"(?<!not )dino\s*v2(?![-\s]*(recipe|style|architecture|'s recipe|in the paper))",
                             re.IGNORECASE)
#: columns that name the papers' models on purpose
PUBLISHED_COLUMN = re.compile(r"^(published|paper)|\((published|paper)\)$|^claim$|^stands_in_for$", re.IGNORECASE)


def stand_in_name_violations(table: pd.DataFrame, *, real_weights: bool = False) -> list[str]:
    """Cells and headers outside published columns that call one of our models by a real model's name.

    With ``real_weights`` (the ``paper`` profile loads real DINOv2) nothing is flagged.
    """
    if real_weights:
        return []
    problems = [f"column header {c!r}" for c in table.columns
                if not PUBLISHED_COLUMN.search(str(c)) and REAL_MODEL_NAME.search(str(c))]
    for column in table.columns:
        if PUBLISHED_COLUMN.search(str(column)):
            continue
        for i, value in table[column].items():
            if isinstance(value, str) and REAL_MODEL_NAME.search(value):
                problems.append(f"row {i}, column {column!r}: {value[:80]!r}")
    return problems


def figure_name_violations(texts: Sequence[str], *, real_weights: bool = False) -> list[str]:
    """Figure texts (titles, axes, ticks, legends; see ``reporting.figure_texts``) that use a real model's name."""
    return [] if real_weights else [t for t in texts if REAL_MODEL_NAME.search(t) and "published" not in t.lower()
                                    and "paper" not in t.lower()]


# --------------------------------------------------------------------------- sanity gates


def sanity_flags(results: pd.DataFrame, *, study: str, table: str, explanations: Mapping[tuple[str, str], str]
                 | None = None) -> pd.DataFrame:
    """Rows of ``results`` whose interval lies wholly below their trivial reference, as flags.

    ``results`` has columns ``model``, ``task``, ``metric``, ``score``, ``ci_low``, ``ci_high``,
    ``reference`` (its name: "chance", "image-blind prior", "random init") and ``reference_value``.
    ``explanations`` maps ``(model, task)`` (``"*"`` for any) to a stated, tested explanation.
    """
    need = ["model", "task", "metric", "score", "ci_low", "ci_high", "reference", "reference_value"]
    missing = [c for c in need if c not in results.columns]
    if missing:
        raise ValueError(f"sanity_flags: results lack {missing}")
    explanations = dict(explanations or {})
    below = results[pd.to_numeric(results["ci_high"], errors="coerce")
                    < pd.to_numeric(results["reference_value"], errors="coerce")]
    rows = []
    for r in below.itertuples(index=False):
        why = (explanations.get((r.model, r.task)) or explanations.get((r.model, "*"))
               or explanations.get(("*", r.task)) or "")
        rows.append({"study": study, "table": table, "model": r.model, "task": r.task, "metric": r.metric,
                     "score": float(r.score), "ci_low": float(r.ci_low), "ci_high": float(r.ci_high),
                     "reference": r.reference, "reference_value": float(r.reference_value),
                     "explained": bool(why), "explanation": why})
    return pd.DataFrame(rows, columns=SANITY_COLUMNS)


class UnexplainedSanityFlag(AssertionError):
    """A trained model scored below its trivial reference with no stated explanation."""


def check_sanity(flags: pd.DataFrame, profile: str, strict_profiles: Sequence[str] = ("tiny",)) -> pd.DataFrame:
    """Return ``flags``; raise :class:`UnexplainedSanityFlag` on an unexplained one in a strict profile."""
    bad = flags[~flags["explained"].astype(bool)] if len(flags) else flags
    if len(bad) and profile in strict_profiles:
        lines = [f"{r.model} on {r.task} ({r.table}): {r.metric} [{r.ci_low:.3f}, {r.ci_high:.3f}] below "
                 f"{r.reference} {r.reference_value:.3f}" for r in bad.itertuples(index=False)]
        raise UnexplainedSanityFlag("results below their trivial reference, unexplained (find the cause, or state "
                                    "and test the explanation):\n  " + "\n  ".join(lines))
    return flags


__all__ = [
    "CLAIM_COLUMNS", "KINDS", "METRIC_RANGES", "SANITY_COLUMNS", "UnexplainedSanityFlag", "VERDICTS",
    "check_sanity", "claim", "claims_frame", "figure_name_violations", "findings_markdown", "interval_violations",
    "metric_range", "sanity_flags", "stand_in_name_violations", "verdict",
]

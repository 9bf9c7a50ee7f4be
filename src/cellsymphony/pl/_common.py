"""Helpers shared by the plotting functions: saving/showing, colours, reading tables out of ``uns``."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._settings import logger

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# scanpy's default categorical palettes (matplotlib's tab10 / tab20, then a longer list), so that
# colours match what scanpy would draw when the data carries no ``uns[f"{key}_colors"]``
_TAB10 = [
    "#1f77b4", "#ff7f0e", "#279e68", "#d62728", "#aa40fc",
    "#8c564b", "#e377c2", "#b5bd61", "#17becf", "#aec7e8",
]  # fmt: skip
_TAB20 = [
    "#1f77b4", "#ff7f0e", "#279e68", "#d62728", "#aa40fc", "#8c564b", "#e377c2", "#b5bd61",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#ad494a", "#8c6d31",
]  # fmt: skip


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: the given Axes and its figure, or a new figure with one Axes."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def finish(fig: Figure, *, show: bool | None, save: str | os.PathLike | bool | None, name: str) -> None:
    """Save ``fig`` (``save`` = a path, or ``True`` for ``figures/<name>.png``) and show it when asked.

    ``show=None`` shows the figure only with an interactive backend and when it is not being saved,
    so plotting functions are safe under the Agg backend (scripts, tests, the docs build).
    """
    import matplotlib
    import matplotlib.pyplot as plt

    if save:
        path = Path("figures") / f"{name}.png" if save is True else Path(save)
        if not path.suffix:
            path = path.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        logger.info("saved figure to %s", path)
    if show is None:
        interactive = matplotlib.get_backend().lower() not in {"agg", "pdf", "svg", "ps", "cairo", "template"}
        show = interactive and not save
    if show:
        plt.show()


def palette_for(data: Any, key: str, categories: Sequence[str], palette: Any = None) -> dict[str, str]:
    """Map each category to a colour: ``palette`` (dict, list or colormap name), else
    ``uns[f"{key}_colors"]`` as scanpy stores it, else scanpy's default palettes."""
    import matplotlib as mpl
    from matplotlib.colors import to_hex

    cats = [str(c) for c in categories]
    if isinstance(palette, Mapping):
        missing = [c for c in cats if c not in palette]
        if missing:
            raise ValueError(f"palette has no colour for {missing[:5]}.")
        return {c: to_hex(palette[c]) for c in cats}
    if isinstance(palette, str):
        cmap = mpl.colormaps[palette]
        n = getattr(cmap, "N", 256)
        if n <= 32:  # a qualitative map: take its colours in order
            return {c: to_hex(cmap(i % n)) for i, c in enumerate(cats)}
        return {c: to_hex(cmap(i / max(len(cats) - 1, 1))) for i, c in enumerate(cats)}
    if palette is not None:
        colours = list(palette)
        if len(colours) < len(cats):
            raise ValueError(f"palette has {len(colours)} colours for {len(cats)} categories.")
        return {c: to_hex(colours[i]) for i, c in enumerate(cats)}
    stored = data.uns.get(f"{key}_colors") if data is not None else None
    if stored is not None and len(stored) >= len(cats):
        return {c: to_hex(stored[i]) for i, c in enumerate(cats)}
    if len(cats) <= 10:
        base = _TAB10
    elif len(cats) <= 20:
        base = _TAB20
    else:
        cmap = mpl.colormaps["gist_ncar"]
        return {c: to_hex(cmap(0.05 + 0.9 * i / (len(cats) - 1))) for i, c in enumerate(cats)}
    return {c: base[i] for i, c in enumerate(cats)}


def uns_entry(mdata: Any, key: str, producer: str) -> Any:
    """``mdata.uns[key]``, or a ValueError naming the function that writes it and the keys present."""
    if key in mdata.uns:
        return mdata.uns[key]
    mods = getattr(mdata, "mod", {})
    for _mod, adata in mods.items():
        if key in adata.uns:
            return adata.uns[key]
    raise ValueError(
        f"uns has no entry {key!r}: run {producer} first (with key_added={key!r}); "
        f"uns has {sorted(map(str, mdata.uns))}."
    )


def as_frame(obj: Any) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a dict of equal-length columns, or a 2-d array."""
    if isinstance(obj, pd.DataFrame):
        return obj.copy()
    if isinstance(obj, Mapping):
        cols = {k: np.asarray(v) for k, v in obj.items()}
        lengths = {v.shape[0] for v in cols.values() if v.ndim == 1}
        if len(lengths) == 1:
            return pd.DataFrame({k: v for k, v in cols.items() if v.ndim == 1})
    raise ValueError(f"Expected a table (DataFrame or dict of columns), got {type(obj).__name__}.")


# ---------------------------------------------------------------------------------------------
# classifier metrics: every layout a metrics record can come in, normalised to one long table
METRIC_NAMES = {
    "precision": "precision",
    "p": "precision",
    "prec": "precision",
    "recall": "recall",
    "r": "recall",
    "rec": "recall",
    "f1": "f1",
    "f1-score": "f1",
    "f1_score": "f1",
    "f": "f1",
    "support": "support",
}
METRIC_LABELS = {"precision": "P", "recall": "R", "f1": "F1", "support": "n"}
_SUMMARY_ROWS = {"macro avg", "weighted avg", "micro avg", "accuracy", "macro", "weighted", "micro", "avg"}


def _metric_of(token: str) -> str | None:
    return METRIC_NAMES.get(token.strip().lower())


def split_metric_column(col: str) -> tuple[str, str] | None:
    """``"T cell_precision"`` / ``"precision_T cell"`` / ``"T cell P"`` / ``"f1:B cell"`` -> (class, metric)."""
    col = str(col)
    seps = [sep for sep in ("|", ":", "/", "__", "_", " ", ".") if sep in col]
    # a metric suffix under any separator first (compare_classifiers' "<class> P"), then a prefix, so
    # that a class such as "p_x" in "p_x F1" is not read as "precision" of "x F1"
    for sep in seps:
        head, _, tail = col.rpartition(sep)
        if head and _metric_of(tail):
            return head.strip(), _metric_of(tail)
    for sep in seps:
        head, _, tail = col.partition(sep)
        if tail and _metric_of(head):
            return tail.strip(), _metric_of(head)
    return None


def per_class_long(metrics: Any, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-class metrics of one classifier as a long table with columns class, metric, value.

    Accepts a DataFrame indexed by class with metric columns (as ``sklearn``'s
    ``classification_report(output_dict=True)`` transposed), a long table (class, metric, value),
    a dict of per-class arrays (``precision``, ``recall``, ``f1``, optional ``support`` and
    ``classes``), a dict holding such a table under ``per_class``, or a dict class -> dict of metrics.
    """
    if isinstance(metrics, Mapping):
        for sub in ("per_class", "per_class_metrics", "table", "report"):
            if sub in metrics:
                return per_class_long(metrics[sub], metrics.get("classes", classes))
        keyed = {k: v for k, v in metrics.items() if _metric_of(str(k))}
        arrays = {_metric_of(k): np.asarray(v) for k, v in keyed.items() if np.ndim(v) == 1}
        if arrays:
            cls = metrics.get("classes", metrics.get("class", classes))
            if cls is None:
                raise ValueError("The metrics record has per-class arrays but no class names.")
            cls = [str(c) for c in np.asarray(cls)]
            rows = [
                {"class": c, "metric": m, "value": float(v[i])}
                for m, v in arrays.items()
                for i, c in enumerate(cls)
                if i < len(v)
            ]
            return pd.DataFrame(rows)
        nested = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
        if nested:
            rows = [
                {"class": str(c), "metric": _metric_of(m), "value": float(v)}
                for c, d in nested.items()
                if str(c).lower() not in _SUMMARY_ROWS
                for m, v in d.items()
                if _metric_of(str(m)) and np.ndim(v) == 0
            ]
            if rows:
                return pd.DataFrame(rows)
        raise ValueError(f"Cannot find per-class precision/recall/F1 in the metrics record (keys {list(metrics)}).")
    df = as_frame(metrics)
    lower = {c: str(c).lower() for c in df.columns}
    if {"class", "metric", "value"} <= set(lower.values()):
        df = df.rename(columns={c: lower[c] for c in df.columns})
        out = df[["class", "metric", "value"]].copy()
        out["metric"] = out["metric"].map(lambda m: _metric_of(str(m)) or str(m))
        return out
    metric_cols = {c: _metric_of(str(c)) for c in df.columns if _metric_of(str(c))}
    if metric_cols:
        class_col = next((c for c in df.columns if str(c).lower() in {"class", "label", "cell_type"}), None)
        names = df[class_col].astype(str) if class_col is not None else df.index.astype(str)
        rows = [
            {"class": n, "metric": m, "value": float(v)}
            for n, (_, row) in zip(names, df.iterrows(), strict=True)
            if n.lower() not in _SUMMARY_ROWS
            for c, m in metric_cols.items()
            for v in [row[c]]
        ]
        return pd.DataFrame(rows)
    raise ValueError(f"Cannot find per-class precision/recall/F1 columns in {list(df.columns)}.")


def comparison_long(table: pd.DataFrame) -> pd.DataFrame:
    """A ``compare_classifiers`` table (rows: classifier x sample) as a long table model, class, metric, value.

    Wide tables have one column per class and metric (``"T cell_precision"``, ``"f1 B cell"``...);
    long tables have columns class, metric, value plus the columns naming the model.
    """
    df = as_frame(table)
    lower = {str(c).lower(): c for c in df.columns}
    id_names = [
        lower[n]
        for n in ("arch", "architecture", "model", "classifier", "method", "label_key", "labels", "sample", "split")
        if n in lower
    ]
    if {"class", "metric", "value"} <= set(lower):
        ids = id_names or [c for c in df.columns if str(c).lower() not in {"class", "metric", "value"}]
        model = df[ids].astype(str).agg(" / ".join, axis=1) if ids else pd.Series(df.index.astype(str))
        return pd.DataFrame(
            {
                "model": model.to_numpy(),
                "class": df[lower["class"]].astype(str).to_numpy(),
                "metric": [(_metric_of(str(m)) or str(m)) for m in df[lower["metric"]]],
                "value": df[lower["value"]].astype(float).to_numpy(),
            }
        )
    if {"class", "precision"} <= set(lower) or {"class", "f1"} <= set(lower):
        ids = id_names or []
        model = df[ids].astype(str).agg(" / ".join, axis=1) if ids else pd.Series(df.index.astype(str))
        rows = []
        for mname, (_, row) in zip(model, df.iterrows(), strict=True):
            for lc, col in lower.items():
                m = _metric_of(lc)
                if m:
                    rows.append({"model": mname, "class": str(row[lower["class"]]), "metric": m, "value": float(row[col])})
        return pd.DataFrame(rows)
    split = {c: split_metric_column(c) for c in df.columns}
    split = {c: s for c, s in split.items() if s is not None and s[0].lower() not in _SUMMARY_ROWS}
    if not split:
        raise ValueError(
            "Cannot read the comparison table: expected columns like '<class>_precision' / '<class>_f1', "
            f"or columns class, metric, value; got {list(df.columns)[:12]}."
        )
    if not id_names:
        id_names = [c for c in df.columns if c not in split and not pd.api.types.is_numeric_dtype(df[c])]
    if id_names:
        model = df[id_names].astype(str).agg(" / ".join, axis=1)
    else:
        model = pd.Series(df.index.astype(str), index=df.index)
    rows = [
        {"model": mname, "class": cls, "metric": m, "value": float(row[c])}
        for mname, (_, row) in zip(model, df.iterrows(), strict=True)
        for c, (cls, m) in split.items()
    ]
    return pd.DataFrame(rows)


def natural_key(s: str) -> list:
    """Sort key that orders ``"2" < "10"`` (cluster names)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(s))]

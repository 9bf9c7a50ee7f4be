"""Helpers shared by the plotting functions: saving/showing, colours, reading records out of ``uns``.

Metric tables are read by :func:`cellsymphony._results.metrics_of`, in the one schema their producers write."""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


# figures the caller handed in (through ``ax=``): the caller shows them, once all its panels are drawn
_GIVEN_FIGURES: weakref.WeakSet = weakref.WeakSet()


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: the given Axes and its figure, or a new figure with one Axes."""
    import matplotlib.pyplot as plt

    if ax is not None:
        _GIVEN_FIGURES.add(ax.figure)
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def finish(fig: Figure, *, show: bool | None, save: str | os.PathLike | bool | None, name: str) -> None:
    """Save ``fig`` (``save`` = a path, or ``True`` for ``figures/<name>.png``) and show it when asked.

    ``show=None`` shows the figure only with an interactive backend, when it is not being saved and when
    the function made it: so plotting functions are safe under the Agg backend (scripts, tests, the docs
    build), and drawing into one panel of the caller's figure (``ax=``) does not show (and, in a notebook,
    close) that figure before its other panels are drawn.
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
        show = interactive and not save and fig not in _GIVEN_FIGURES
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


def natural_key(s: str) -> list:
    """Sort key that orders ``"2" < "10"`` (cluster names)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(s))]

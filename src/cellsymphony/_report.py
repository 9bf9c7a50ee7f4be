"""The HTML report of a pipeline run: figures from ``cs.pl`` and the result tables, in one folder.

``write_report(mdata, out_dir, settings_note=...)`` writes ``out_dir/figures/*.png`` and
``out_dir/report.html`` (figures linked by relative path, so the folder can be moved or zipped).
Which records to show is read from ``uns["cellsymphony"]["outputs"]``, where each producer records the
keys it wrote (classifiers, comparisons, contrastive alignments, enrichment and coherence tables, nucleus-label
transfers); each can also be named. Metrics are read from the producers' metric tables
(:mod:`cellsymphony._results`).
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._constants import CONTRASTIVE_KEY, MOD_MORPH, MOD_RNA, NICHE_KEY, REGISTRATION_KEY, UNS_KEY
from ._settings import logger
from ._utils import atomic_path, uns_table

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}.problem{color:#a00}
nav a{margin-right:1em}
"""


# ------------------------------------------------------------------------------------------- discovery
# the function names producers record in uns["cellsymphony"]["outputs"]
CLASSIFIER_FN = "tl.train_classifier"
COMPARISON_FN = "tl.compare_classifiers"
CONTRASTIVE_FN = "tl.align_contrastive"
ENRICHMENT_FN = "tl.cluster_enrichment"
COHERENCE_FN = "tl.spatial_coherence"
TRANSFER_FN = "pp.transfer_nucleus_labels"


def _label_columns(mdata: Any, exclude: Sequence[str]) -> list[str]:
    """Categorical per-cell columns worth a spatial map (labels, predictions, niches), each once:
    ``mdata.obs`` columns, and modality label columns (``mod:name``) not already there by name."""
    out: list[str] = []
    seen: set[str] = set()
    cols = sorted(mdata.obs.columns, key=lambda c: ":" in str(c))  # unprefixed first
    for col in cols:
        s = mdata.obs[col]
        name = str(col)
        base = name.split(":")[-1]
        if name in exclude or base in seen or base.endswith(("_split", "_confident", "_pruned", "_empty")):
            continue
        if base in {"sample", "in_image", "segmentation_method", "cell_id"}:
            continue
        if isinstance(s.dtype, pd.CategoricalDtype) and 2 <= len(s.cat.categories) <= 40:
            out.append(name)
            seen.add(base)
    return out


# ------------------------------------------------------------------------------------------- html bits
def _table_html(df: pd.DataFrame, *, index: bool = True, digits: int = 3) -> str:
    def fmt(v):
        if isinstance(v, float | np.floating):
            if not np.isfinite(v):
                return "inf" if v > 0 else ("-inf" if v < 0 else "")
            if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
                return f"{v:.2e}"
            return f"{v:.{digits}f}"
        return html.escape(str(v))

    return df.to_html(index=index, formatters=dict.fromkeys(df.columns, fmt), escape=False, border=0, na_rep="")


def _scalars(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Flatten the scalar (and short vector) entries of a nested dict, for a two-column table."""
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_scalars(v, prefix=f"{name}."))
        elif isinstance(v, str | int | float | bool | np.integer | np.floating | np.bool_):
            out[name] = v
        elif isinstance(v, np.ndarray) and v.ndim == 1 and v.size <= 4 and v.dtype.kind in "fiu":
            out[name] = ", ".join(f"{x:.3g}" for x in v)
    return out


def _classifier_summary(mdata: Any, keys: Sequence[str]) -> pd.DataFrame:
    """One row per classifier: architecture, labels, the summary metrics and per-class F1, from its metric
    table (the pooled figures, sample ``"all"``, where it has several sections)."""
    from ._results import ALL, metrics_of

    rows = []
    for k in keys:
        params = mdata.uns[k].get("params", {})
        long = metrics_of(mdata, k, "cs.tl.train_classifier")
        sample = ALL if (long["sample"] == ALL).any() else long["sample"].iloc[0]
        long = long[long["sample"] == sample]
        row = {"classifier": k, "arch": str(params.get("arch", "")), "labels": str(params.get("label_key", ""))}
        summary = long[long["class"] == ALL].set_index("metric")["value"]
        for name in ("macro_f1", "weighted_f1", "accuracy"):
            if name in summary:
                row[name] = float(summary[name])
        for _, r in long[(long["metric"] == "f1") & (long["class"] != ALL)].iterrows():
            row[f"F1 {r['class']}"] = float(r["value"])
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- the report
UMAP_MAX_CELLS = 50_000


def umap_cells(mdata: Any, max_cells: int | None, seed: int = 0) -> tuple[Any, str]:
    """The cells a report's UMAP is drawn from: all of them, or a view of ``max_cells`` drawn at random
    (the same ones for the same data and ``seed``), with the caption text that says so."""
    n = int(mdata.n_obs)
    if max_cells is None or n <= max_cells:
        return mdata, ""
    rows = np.sort(np.random.default_rng(seed).choice(n, int(max_cells), replace=False))
    return mdata[rows], f"; {int(max_cells):,} of the {n:,} cells, drawn at random (seed {seed})"


def write_report(
    mdata: Any,
    out_dir: str | os.PathLike,
    *,
    settings_note: str | Mapping[str, Any] | pd.DataFrame,
    timings: Mapping[str, float] | None = None,
    classifier_keys: Sequence[str] | None = None,
    comparison_key: str | None = None,
    contrastive_key: str | None = None,
    enrichment_keys: Sequence[str] | None = None,
    registration_key: str | None = None,
    label_keys: Sequence[str] | None = None,
    niche_key: str = NICHE_KEY,
    title: str = "cellsymphony report",
    dpi: int = 110,
    umap_max_cells: int | None = UMAP_MAX_CELLS,
) -> Path:
    """Write ``out_dir/figures/*.png`` and ``out_dir/report.html`` for an analysed MuData.

    Parameters
    ----------
    mdata
        The analysed MuData.
    out_dir
        Output folder (created).
    settings_note
        How this run's settings differ from the paper's: text, a mapping ``setting -> (paper, here)``
        (or ``setting -> text``), or a DataFrame; shown in its own section.
    timings
        Seconds per pipeline step; default ``mdata.uns["cellsymphony"]["timings"]`` where present.
    classifier_keys
        ``uns`` keys of classifier records; default every key :func:`cellsymphony.tl.train_classifier`
        recorded in ``uns["cellsymphony"]["outputs"]``.
    comparison_key
        ``uns`` key of a :func:`cellsymphony.tl.compare_classifiers` record; default the first recorded.
    contrastive_key
        ``uns`` key of the contrastive record; default ``"X_cs_contrastive"`` or the first recorded by
        :func:`cellsymphony.tl.align_contrastive`.
    enrichment_keys
        ``uns`` keys of enrichment tables; default every key recorded by :func:`cellsymphony.tl.cluster_enrichment`.
    registration_key
        ``uns`` key of a nucleus-label transfer; default the first recorded by
        :func:`cellsymphony.pp.transfer_nucleus_labels`. An automatic
        registration (``uns["he_registration"]``, :meth:`cellsymphony.io.Registration.apply`) has its own
        section: the QC per sample and :func:`cellsymphony.pl.registration`'s figure.
    label_keys
        Categorical columns to map in space; default the categorical columns of ``mdata.obs``
        (labels, predictions, niches).
    niche_key
        Column of the niches, for the patch gallery and the embedding figure.
    title
        Title of the page.
    dpi
        Resolution of the PNG figures.
    umap_max_cells
        The UMAP figures of a larger section are drawn from this many cells drawn at random (seed 0, so
        the same cells every time; the caption says so): the neighbour graph and UMAP of a whole section take
        many minutes per figure on a CPU, and hundreds of thousands of points add nothing to the picture.
        ``None`` draws every cell.

    Returns
    -------
    The path of ``report.html``. Figures that cannot be drawn (a missing input) are listed in the
    report's "Not drawn" section with the reason, and logged.
    """
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import pl

    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    problems: list[tuple[str, str]] = []
    sections: list[tuple[str, str, list[str]]] = []  # (id, heading, html parts)

    drawn: list[str] = []

    def figure(name: str, caption: str, draw: Callable[[], Any]) -> str:
        path = fig_dir / f"{name}.png"
        t0 = time.perf_counter()
        try:
            obj = draw()
            fig = obj if hasattr(obj, "savefig") else obj.figure
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        except Exception as err:  # noqa: BLE001 - one missing input must not lose the rest of the report
            problems.append((name, f"{type(err).__name__}: {err}"))
            logger.warning("report: figure %s not drawn: %s", name, err)
            return ""
        finally:
            plt.close("all")
        drawn.append(name)
        # progress: on a whole section each figure takes seconds to a minute
        logger.info("report: figure %d (%s) drawn in %.1f s", len(drawn), name, time.perf_counter() - t0)
        rel = path.relative_to(out).as_posix()
        return (
            f'<figure><a href="{rel}"><img src="{rel}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def table(name: str, build: Callable[[], pd.DataFrame], **kw) -> str:
        """A result table as HTML; a record that lacks it goes to "Not drawn" like a figure."""
        try:
            return _table_html(build(), **kw)
        except ValueError as err:
            problems.append((name, f"{type(err).__name__}: {err}"))
            logger.warning("report: table %s not written: %s", name, err)
            return ""

    from ._results import metrics_of, metrics_wide, output_keys, retrieval_frame

    classifier_keys = list(classifier_keys) if classifier_keys is not None else output_keys(mdata, CLASSIFIER_FN)
    if comparison_key is None:
        found = output_keys(mdata, COMPARISON_FN)
        comparison_key = found[0] if found else None
    if contrastive_key is None:
        found = output_keys(mdata, CONTRASTIVE_FN)
        contrastive_key = CONTRASTIVE_KEY if CONTRASTIVE_KEY in found else (found[0] if found else None)
    enrichment_keys = list(enrichment_keys) if enrichment_keys is not None else output_keys(mdata, ENRICHMENT_FN)
    if registration_key is None:
        found = [k for k in output_keys(mdata, TRANSFER_FN) if k != REGISTRATION_KEY]  # that one has its own section
        registration_key = found[0] if found else None
    label_keys = list(label_keys) if label_keys is not None else _label_columns(mdata, exclude=())
    # cs.tl.niches writes its label on the modality: mdata.obs shows it as "<mod>:<niche_key>"
    niche_key = next((c for c in label_keys if c.split(":")[-1] == niche_key), niche_key) if niche_key else niche_key

    # ---- data
    parts = [f"<p>{mdata.n_obs:,} cells; modalities {', '.join(sorted(getattr(mdata, 'mod', {})))}.</p>"]
    samples = mdata.uns.get(UNS_KEY, {}).get("samples", {})
    if samples:
        reg = pd.DataFrame(
            {s: {k: v for k, v in d.items() if np.ndim(v) == 0} for s, d in samples.items()}
        ).T
        reg.index.name = "sample"
        parts.append(_table_html(reg))
    latest = mdata.uns.get(UNS_KEY, {}).get("latest", {})
    if latest:
        parts.append("<p>Representations: " + ", ".join(f"{m}: <code>{html.escape(str(k))}</code>" for m, k in latest.items()) + "</p>")
    sections.append(("data", "Data", parts))

    # ---- tissue maps
    parts = []
    for col in label_keys:
        parts.append(figure(f"spatial_{_slug(col)}", f"{col} over the H&E (micrometres)", lambda c=col: pl.spatial(mdata, c)))
    if niche_key and niche_key in label_keys:
        parts.append(figure(
            f"patch_gallery_{_slug(niche_key)}", f"H&E patches per {niche_key}: the morphological pattern of each cluster",
            lambda: pl.patch_gallery(mdata, niche_key, n=8, size=160, mpp=0.5),
        ))  # fmt: skip
    sections.append(("tissue", "Tissue", parts))

    # ---- registration
    if registration_key is not None:
        rec = mdata.uns[registration_key]
        stats = {k: v for k, v in _scalars(rec).items() if not k.startswith("params.")}
        parts = [_table_html(pd.DataFrame({"value": stats}).rename_axis(registration_key)) if stats else ""]
        parts.append(figure(f"registration_{_slug(registration_key)}", "Registration QC: matched H&E nuclei and offsets",
                            lambda: pl.registration(mdata, registration_key)))  # fmt: skip
        sections.append(("registration", "Registration QC", parts))

    # ---- automatic H&E registration (cs.io.register_he, Registration.apply)
    auto = mdata.uns.get(REGISTRATION_KEY)
    if isinstance(auto, Mapping) and isinstance(auto.get("samples"), Mapping) and auto["samples"]:
        per = auto["samples"]
        qc = pd.DataFrame({s: {k: v for k, v in _scalars(e).items() if not k.startswith("params.")}
                           for s, e in per.items()}).T
        qc.index.name = "sample"
        parts = [_table_html(qc)]
        for s in per:
            parts.append(figure(f"he_registration_{_slug(str(s))}",
                                f"H&E registration of sample {s}: DAPI over the registered H&E, residual map, QC",
                                lambda s=s: pl.registration(mdata, REGISTRATION_KEY, sample=str(s))))
        sections.append(("he_registration", "H&E registration", parts))

    # ---- classifiers
    if classifier_keys or comparison_key:
        parts = []
        if comparison_key is not None:
            parts.append(f"<h3>Comparison (<code>uns[{html.escape(comparison_key)!r}]</code>)</h3>")
            parts.append(table("comparison", lambda: metrics_wide(metrics_of(mdata, comparison_key, "cs.tl.compare_classifiers")),
                               index=False))  # fmt: skip
            parts.append(figure("metrics_comparison", "Per-class precision, recall and F1 of the compared classifiers",
                                lambda: pl.metrics(mdata, comparison_key)))  # fmt: skip
        if classifier_keys:
            parts.append("<h3>Trained classifiers</h3>")
            parts.append(table("classifier summary", lambda: _classifier_summary(mdata, classifier_keys), index=False))
            parts.append(figure("metrics", "Per-class precision, recall and F1 on the held-out cells",
                                lambda: pl.metrics(mdata, classifier_keys)))  # fmt: skip
            for k in classifier_keys:
                parts.append(figure(f"confusion_{_slug(k)}", f"{k}: confusion matrix (held-out cells)", lambda k=k: pl.confusion(mdata, k)))
                parts.append(figure(f"history_{_slug(k)}", f"{k}: training curves", lambda k=k: pl.history(mdata, k)))
        sections.append(("classifiers", "Cell-type classifiers", parts))

    # ---- contrastive
    if contrastive_key is not None:
        parts = []
        ret = table("retrieval", lambda: retrieval_frame(metrics_of(mdata, contrastive_key, "cs.tl.align_contrastive")))
        if ret:
            parts.append("<h3>Held-out retrieval (recall@k, with chance)</h3>" + ret)
        parts.append(figure(f"history_{_slug(contrastive_key)}", "Contrastive training curves", lambda: pl.history(mdata, contrastive_key)))
        color = niche_key if niche_key in label_keys else (label_keys[0] if label_keys else None)
        shown, subsampled = umap_cells(mdata, umap_max_cells)
        for mod in (MOD_MORPH, MOD_RNA):
            if mod in getattr(mdata, "mod", {}) and contrastive_key in mdata.mod[mod].obsm:
                parts.append(figure(f"umap_{_slug(contrastive_key)}_{mod}", f"UMAP of the {mod} projection ({contrastive_key}){subsampled}",
                                    lambda m=mod: pl.embedding(shown, contrastive_key, color, mod=m)))  # fmt: skip
        sections.append(("contrastive", "Contrastive alignment", parts))

    # ---- enrichment
    if enrichment_keys:
        parts = []
        for k in enrichment_keys:
            tab = uns_table(mdata.uns[k])
            parts.append(f"<h3><code>{html.escape(k)}</code></h3>")
            parts.append(figure(f"enrichment_{_slug(k)}", f"{k}: log2 odds ratio per cluster and label (stars: BH q)",
                                lambda k=k: pl.enrichment(mdata, k)))  # fmt: skip
            shown = tab.sort_values("qval").head(15)
            parts.append("<p>Most significant pairs:</p>" + _table_html(shown, index=False))
        sections.append(("enrichment", "Cell-type enrichment in clusters", parts))

    # ---- spatial coherence
    coherence = output_keys(mdata, COHERENCE_FN)
    if coherence:
        parts = []
        for k in coherence:
            parts.append(f"<h3><code>{html.escape(k)}</code>: same-cluster fraction of spatial neighbours against a permutation null</h3>")
            parts.append(_table_html(uns_table(mdata.uns[k])))
        sections.append(("coherence", "Spatial coherence of clusters", parts))

    # ---- timings
    if timings is None:
        timings = mdata.uns.get(UNS_KEY, {}).get("timings")
    if timings:
        t = pd.DataFrame({"seconds": {str(k): float(v) for k, v in dict(timings).items()}})
        t.loc["total"] = t["seconds"].sum()
        sections.append(("timings", "Timings", [_table_html(t.rename_axis("step"))]))

    # ---- settings vs paper
    sections.append(("settings", "Settings that differ from the paper", [_settings_html(settings_note)]))
    if problems:
        items = "".join(f"<li><b>{html.escape(n)}</b>: <span class='problem'>{html.escape(e)}</span></li>" for n, e in problems)
        sections.append(("problems", "Not drawn", [f"<ul>{items}</ul>"]))

    from . import __version__

    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{sid}">{html.escape(h)}</a>' for sid, h, _ in sections)
    body = "\n".join(f'<h2 id="{sid}">{html.escape(h)}</h2>\n' + "\n".join(p for p in ps if p) for sid, h, ps in sections)
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>cellsymphony {html.escape(__version__)}, written {now}.</p><nav>{nav}</nav>\n{body}\n</body></html>"
    )
    report = out / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%d figures%s)", report, len(list(fig_dir.glob("*.png"))),
                f", {len(problems)} not drawn" if problems else "")  # fmt: skip
    return report


def _settings_html(note: Any) -> str:
    if isinstance(note, pd.DataFrame):
        return "<div class='note'>" + _table_html(note, index=False) + "</div>"
    if isinstance(note, Mapping):
        rows = []
        for k, v in note.items():
            if isinstance(v, Mapping):
                rows.append({"setting": k, **{str(c): str(x) for c, x in v.items()}})
            elif isinstance(v, tuple | list) and len(v) == 2:
                rows.append({"setting": k, "paper": str(v[0]), "this run": str(v[1])})
            else:
                rows.append({"setting": k, "paper": "", "this run": str(v)})
        return "<div class='note'>" + _table_html(pd.DataFrame(rows).fillna(""), index=False) + "</div>"
    text = html.escape(str(note)).replace("\n\n", "</p><p>").replace("\n", "<br>")
    return f"<div class='note'><p>{text}</p></div>"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))

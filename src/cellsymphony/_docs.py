"""Parameter text shared by several docstrings, injected with :func:`inject_docs`."""

from __future__ import annotations

DOC_PARAMS = {
    "mdata": "MuData with modalities ``'rna'`` and ``'morphology'`` as made by :func:`cellsymphony.io.read_xenium`.",
    "mdata_or_adata": (
        "MuData as made by :func:`cellsymphony.io.read_xenium`, or an AnnData holding the one modality this "
        "function needs."
    ),
    "copy": "Return a modified copy instead of writing in place.",
    "device": "Torch device (``'cpu'``, ``'cuda'``, ``'cuda:1'``); ``None`` uses ``cs.settings.device``.",
    "client": (
        "A ``dask.distributed.Client``: cells are split into spatially compact chunks, per sample, and each "
        "chunk runs as a task on the cluster's workers (each loads the model once and reads only its chunk's "
        "data; one torch thread per worker unless ``$CELLSYMPHONY_TORCH_THREADS`` is set on the workers); "
        "results equal those of a single process. Paths must be readable from the workers. ``None``: this "
        "process. Multi-GPU: one worker per GPU (see the scaling page of the docs)."
    ),
    "seed": "Seed of every random draw, so repeated runs give identical results.",
    "gene_rep": (
        "Key in ``mdata['rna'].obsm`` of the expression embedding; ``None`` uses the latest one written "
        "(by :func:`cellsymphony.pp.embed_expression`)."
    ),
    "morph_rep": (
        "Key in ``mdata['morphology'].obsm`` of the morphology embedding; ``None`` uses the latest one "
        "written (by :func:`cellsymphony.pp.embed_morphology`)."
    ),
    # the plotting functions' last three parameters
    "ax": "Axes to draw into; default a new figure.",
    "show": (
        "Show the figure; ``None`` shows it only with an interactive backend, when not saving and when not "
        "drawing into a given ``ax`` (its figure is the caller's to show)."
    ),
}


def save_doc(name: str) -> str:
    """The ``save`` parameter text of a plotting function whose default file is ``figures/<name>.png``."""
    return f"Path to save the figure to, or ``True`` for ``figures/{name}.png``."


def inject_docs(**extra: str):
    """Decorator filling ``{name}`` fields of a docstring from :data:`DOC_PARAMS` (and ``extra``)."""

    def decorate(obj):
        if obj.__doc__:
            obj.__doc__ = obj.__doc__.format(**{**DOC_PARAMS, **extra})
        return obj

    return decorate

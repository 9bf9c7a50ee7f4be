from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import CONTRASTIVE_KEY, MOD_MORPH, MOD_RNA
from .._docs import inject_docs
from .._settings import logger
from .._utils import params_record

if TYPE_CHECKING:
    from mudata import MuData

    from ..models.contrastive import ContrastiveAligner


@inject_docs()
def align_contrastive(
    mdata: MuData,
    *,
    gene_rep: str | None = None,
    morph_rep: str | None = None,
    stain_augmentation: int | dict | None = None,
    dim: int = 128,
    hidden: int = 256,
    temperature: float = 0.07,
    learn_temperature: bool = True,
    epochs: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    test_size: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    key_added: str = CONTRASTIVE_KEY,
    dropout: float = 0.1,
    weight_decay: float = 1e-4,
    retrieval_cells: int | None = 10_000,
    early_stopping: bool = False,
    patience: int = 5,
) -> ContrastiveAligner:
    """Align expression and morphology embeddings in a shared space with symmetric InfoNCE.

    Each modality goes through its own projection network (input standardisation,
    ``Linear -> LayerNorm -> GELU -> Dropout -> Linear``, L2 normalisation) into a ``dim``-dimensional
    space; the two are trained together so that a cell's expression and morphology projections are
    closer than those of other cells in the batch (CLIP's bidirectional InfoNCE with a learnable,
    log-parameterised temperature clamped to ``[0.01, 1]``). AdamW with cosine learning-rate decay.
    Cells are paired by ``obs_names``; ``test_size`` of the pairs are held out to report the loss and
    cross-modal retrieval on cells the networks never saw.

    Parameters
    ----------
    mdata
        {mdata}
    gene_rep
        {gene_rep}
    morph_rep
        {morph_rep}
    stain_augmentation
        Train on the cells and stain-jittered copies of them (:func:`cellsymphony.pp.augment_stain`; each
        copy keeps its cell's expression): ``None`` (off), the number of copies per cell, or a dict with
        ``n_copies`` (2), ``strength`` (0.15) and ``seed`` (default ``seed``). The held-out cells are those
        drawn without augmentation, and their copies are left out, so held-out loss and retrieval are
        measured on original cells; the projections are written for the cells of ``mdata`` only.
        Recorded in ``params["stain_augmentation"]`` and in the saved aligner.
    dim
        Dimension of the shared space.
    hidden
        Width of the hidden layer of each projection network.
    temperature
        Initial softmax temperature.
    learn_temperature
        Learn the temperature during training, or keep it fixed.
    epochs
        Passes over the training cells.
    batch_size
        Cells per batch; the other cells of a batch are the negatives. Clamped, with a warning, to the
        number of training cells.
    lr
        Peak learning rate (AdamW, cosine decay to zero).
    test_size
        Fraction of the paired cells held out for evaluation (0 for none: held-out figures are NaN).
    seed
        {seed}
    device
        {device}
    key_added
        Key of the outputs.
    dropout
        Dropout after the hidden layer during training.
    weight_decay
        AdamW weight decay of the linear layers' weights.
    retrieval_cells
        Score the held-out retrieval among at most this many held-out cells, drawn at random with ``seed``
        (``None``: every held-out cell). Its cost grows with the square of the cells, and recall@k depends
        on the number of candidates, so a fixed pool keeps whole sections fast and comparable.
    early_stopping
        Stop once the held-out loss has not improved for ``patience`` epochs and keep the weights of the best
        epoch. Off by default: results stay those of earlier versions, and the held-out cells on which the
        retrieval is reported do not select the model. Turn it on when ``cs.pl.history`` shows the held-out
        loss rising early (in the demo it rises from epoch 3 of 30).
    patience
        Epochs without improvement of the held-out loss before stopping (with ``early_stopping``).

    Returns
    -------
    The trained :class:`~cellsymphony.models.ContrastiveAligner` (save it with ``.save(dir)``, apply it
    to new sections with ``.transform``). Writes:

    - ``mdata['rna'].obsm[key_added]`` and ``mdata['morphology'].obsm[key_added]``: ``(n_cells, dim)``
      L2-normalised projections of every cell of each modality (paired or not); NaN rows where the
      input row had a NaN/inf.
    - ``mdata.uns[key_added]``: ``params`` (arguments, resolved input keys, effective batch size),
      ``history`` (DataFrame: epoch, train_loss, test_loss, temperature), ``retrieval`` (DataFrame
      indexed ``recall@1/5/10``: rna_to_morphology, morphology_to_rna, chance = k / n_cells, n_cells,
      on the held-out cells, at most ``retrieval_cells`` of them; a view of ``metrics_table``),
      ``metrics_table`` (the retrieval as a long table ``model, sample, class, metric, value``: metrics
      ``recall@<k>_rna_to_morphology`` / ``_morphology_to_rna`` / ``_chance`` and ``support``), ``n_cells`` (n_rna, n_morphology, n_paired, n_nan_rna,
      n_nan_morphology, n_used, n_train, n_test; with ``stain_augmentation`` they count the augmented rows)
      and ``test_obs_names``;
    - ``mdata.uns["cellsymphony"]["outputs"][key_added]``: this function's name and the keys it wrote.

    Raises
    ------
    ValueError
        When a modality or embedding is missing (naming the function to run), when the modalities
        share no ``obs_names``, or when too few paired cells with finite rows remain.
    """
    from ..models.contrastive import ContrastiveAligner
    from ._stain_augmentation import augmentation_spec, augmented_fit

    aligner = ContrastiveAligner(
        dim=dim, hidden=hidden, dropout=dropout, temperature=temperature, learn_temperature=learn_temperature
    )
    spec = augmentation_spec(stain_augmentation, seed)
    fit = aligner.fit if spec is None else augmented_fit(aligner, spec)
    fit(
        mdata,
        gene_rep=gene_rep,
        morph_rep=morph_rep,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        test_size=test_size,
        retrieval_cells=retrieval_cells,
        early_stopping=early_stopping,
        patience=patience,
        seed=seed,
        device=device,
    )
    from .._results import METRICS_TABLE, record_outputs, retrieval_frame

    z = {mod: aligner.transform(mdata, mod) for mod in (MOD_RNA, MOD_MORPH)}
    for mod, arr in z.items():
        mdata.mod[mod].obsm[key_added] = arr
    info = aligner.fit_info
    table = aligner.metrics_table.assign(model=str(key_added))
    mdata.uns[key_added] = {
        "params": params_record(
            gene_rep=aligner.gene_rep,
            morph_rep=aligner.morph_rep,
            dim=dim,
            hidden=hidden,
            dropout=dropout,
            temperature=temperature,
            learn_temperature=learn_temperature,
            final_temperature=aligner.temperature,
            epochs=epochs,
            batch_size=info["batch_size"],
            batch_size_requested=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            test_size=test_size,
            retrieval_cells=retrieval_cells,
            early_stopping=early_stopping,
            patience=patience,
            best_epoch=aligner.best_epoch,
            seed=seed,
            device=aligner.device,
            stain_augmentation=aligner.fit_params.get("stain_augmentation"),
        ),
        "history": aligner.history.copy(),
        METRICS_TABLE: table,
        "retrieval": retrieval_frame(table),
        "n_cells": {k: int(v) for k, v in info.items() if k.startswith("n_")},
        "test_obs_names": np.asarray(aligner.test_obs_names, dtype=str),
    }
    mdata.update()
    record_outputs(
        mdata, key_added, "tl.align_contrastive", [f"{mod}:obsm[{key_added!r}]" for mod in z] + [f"uns[{key_added!r}]"]
    )
    logger.info(
        "added .obsm[%r] to 'rna' and 'morphology' and .uns[%r] (held-out recall@1 rna->morphology %.3f, chance %.4f)",
        key_added, key_added, aligner.retrieval["rna_to_morphology"].iloc[0], aligner.retrieval["chance"].iloc[0],
    )  # fmt: skip
    return aligner
